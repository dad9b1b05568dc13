"""Time preprocessing transforms on a 197x233x189 volume, next to TorchIO and MONAI.

Usage: ``PYTHONPATH=. python benchmarks/bench_preprocessing.py [--data DIR] [--runs N]``

``--data`` is a folder with the MNI152 2009a files (default ``../shared/data/mni152``
relative to the repository root); without it a synthetic volume of the same shape is
used. Each row is the median of ``--runs`` calls after a warm-up call; "first" is the
warm-up call (compilation included for jmed). jmed inputs are device arrays (what a
preprocessing pipeline holds after loading); TorchIO and MONAI get torch tensors.
Ratios are anchor time / jmed time (> 1: jmed is faster).
"""

from __future__ import annotations

import argparse
import glob
import os
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np

import jmed
from jmed.transforms import (
    CropOrPad,
    HistogramStandardization,
    KeepLargestComponent,
    Resample,
    RescaleIntensity,
    ToCanonical,
    ZNormalization,
    train_histogram,
)

SHAPE = (197, 233, 189)


def _load(data_dir: str | None):
    paths = sorted(glob.glob(os.path.join(data_dir, "*t1*.nii*"))) if data_dir else []
    if paths:
        t1 = jmed.load(paths[0])
        gm = sorted(glob.glob(os.path.join(data_dir, "*gm*.nii*")))
        seg = (np.asarray(jmed.load(gm[0]).data) > 0.5).astype(np.uint8) if gm else None
        source = paths[0]
    else:
        rng = np.random.default_rng(0)
        grid = np.meshgrid(*[np.linspace(-1, 1, n) for n in SHAPE], indexing="ij")
        radius = np.sqrt(sum(g**2 for g in grid))
        data = np.where(radius < 0.8, 80 + 20 * np.cos(6 * grid[0]), 0) + rng.normal(0, 5, SHAPE)
        t1 = jmed.ScalarImage(np.maximum(data, 0).astype(np.float32), jmed.affine.from_spacing((1, 1, 1)))
        seg = ((radius < 0.6) | (radius > 0.9) & (radius < 0.92)).astype(np.uint8)[..., None]
        source = "synthetic"
    if seg is None:
        seg = (np.asarray(t1.data) > np.percentile(np.asarray(t1.data), 80)).astype(np.uint8)
    return t1, jmed.Image(seg, np.asarray(t1.affine), kind="label"), source


def _time(fn, runs: int) -> tuple[float, float]:
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - t0
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return float(np.median(times)), first


def _anchors(t1, seg):
    """Callables per operation for TorchIO and MONAI (None where not installed)."""
    out = {"torchio": {}, "monai": {}}
    try:
        import torch

        torch.set_num_threads(2)
    except ImportError:
        return out
    data = torch.as_tensor(np.asarray(t1.data)).permute(3, 0, 1, 2).contiguous()
    labels = torch.as_tensor(np.asarray(seg.data)).permute(3, 0, 1, 2).contiguous()
    affine = np.asarray(t1.affine)
    try:
        import torchio as tio

        image = tio.ScalarImage(tensor=data, affine=affine)
        label = tio.LabelMap(tensor=labels, affine=affine)
        out["torchio"] = {
            "ToCanonical": lambda t=tio.ToCanonical(): t(image),
            "Resample(1.5 mm)": lambda t=tio.Resample(1.5): t(image),
            "CropOrPad(160, 192, 160)": lambda t=tio.CropOrPad((160, 192, 160)): t(image),
            "RescaleIntensity(0.5, 99.5 %)": lambda t=tio.RescaleIntensity(out_min_max=(0, 1), percentiles=(0.5, 99.5)): (
                t(image)
            ),
            "ZNormalization": lambda t=tio.ZNormalization(): t(image),
            "KeepLargestComponent": lambda t=tio.KeepLargestComponent(): t(label),
        }
    except ImportError:
        pass
    try:
        import monai.transforms as mt
        from monai.data import MetaTensor

        meta = MetaTensor(data, affine=torch.as_tensor(affine))
        out["monai"] = {
            "ToCanonical": lambda t=mt.Orientation(axcodes="RAS"): t(meta),
            "Resample(1.5 mm)": lambda t=mt.Spacing(pixdim=1.5, mode="bilinear"): t(meta),
            "CropOrPad(160, 192, 160)": lambda t=mt.ResizeWithPadOrCrop((160, 192, 160)): t(meta),
            "RescaleIntensity(0.5, 99.5 %)": lambda t=mt.ScaleIntensityRangePercentiles(0.5, 99.5, 0.0, 1.0, clip=True): (
                t(meta)
            ),
            "ZNormalization": lambda t=mt.NormalizeIntensity(): t(meta),
            "KeepLargestComponent": lambda t=mt.KeepLargestConnectedComponent(applied_labels=1, connectivity=1): (
                t(labels)
            ),
        }
    except ImportError:
        pass
    return out


def main(argv: list[str] | None = None) -> None:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    default = os.path.join(root, "..", "shared", "data", "mni152")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=default if os.path.isdir(default) else None)
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")

    t1, seg, source = _load(args.data)
    t1_dev = t1.replace(data=jnp.asarray(t1.data))
    seg_np = seg
    landmarks = train_histogram([np.asarray(t1.data)])

    jmed_ops = {
        "ToCanonical": lambda t=ToCanonical(): t(t1_dev),
        "Resample(1.5 mm)": lambda t=Resample(1.5): t(t1_dev),
        "CropOrPad(160, 192, 160)": lambda t=CropOrPad((160, 192, 160)): t(t1_dev),
        "RescaleIntensity(0.5, 99.5 %)": lambda t=RescaleIntensity(out_min_max=(0, 1), percentiles=(0.5, 99.5)): (
            t(t1_dev)
        ),
        "ZNormalization": lambda t=ZNormalization(): t(t1_dev),
        "HistogramStandardization": lambda t=HistogramStandardization(landmarks): t(t1_dev),
        "KeepLargestComponent": lambda t=KeepLargestComponent(): t(seg_np),
    }
    jitted = {
        "RescaleIntensity(0.5, 99.5 %)": jax.jit(
            lambda im, t=RescaleIntensity(out_min_max=(0, 1), percentiles=(0.5, 99.5)): t(im)
        ),
        "ZNormalization": jax.jit(lambda im, t=ZNormalization(): t(im)),
        "CropOrPad(160, 192, 160)": jax.jit(lambda im, t=CropOrPad((160, 192, 160)): t(im)),
        "HistogramStandardization": jax.jit(lambda im, t=HistogramStandardization(landmarks): t(im)),
    }
    anchors = _anchors(t1, seg)

    print(f"volume: {source}, shape {t1.spatial_shape}; jax {jax.__version__} on {jax.devices()[0].platform}")
    header = f"{'operation':32s} {'jmed ms':>8s} {'first':>8s} {'jit ms':>8s} {'torchio':>8s} {'ratio':>6s} {'monai':>8s} {'ratio':>6s}"
    print(header)
    print("-" * len(header))
    for name, fn in jmed_ops.items():
        median, first = _time(fn, args.runs)
        jit_ms = ""
        if name in jitted:
            jit_ms = f"{_time(lambda f=jitted[name]: f(t1_dev), args.runs)[0] * 1e3:8.1f}"
        cells = []
        for anchor in ("torchio", "monai"):
            other = anchors[anchor].get(name)
            if other is None:
                cells += ["       -", "     -"]
                continue
            try:
                t_other, _ = _time(other, args.runs)
            except Exception:  # a missing optional dependency of the anchor (e.g. skimage)
                cells += ["     n/a", "     -"]
                continue
            cells += [f"{t_other * 1e3:8.1f}", f"{t_other / median:6.2f}"]
        print(f"{name:32s} {median * 1e3:8.1f} {first * 1e3:8.0f} {jit_ms:>8s} " + " ".join(cells))


def cases(quick: bool, volume) -> list:
    """Preprocessing rows for ``benchmarks.run``: jitted jmed where jittable, else eager."""
    from benchmarks.common import Case

    target = volume.scaled((160, 192, 160))
    spec = {
        "ToCanonical": (
            lambda: ToCanonical(),
            lambda tio: tio.ToCanonical(),
            lambda mt: mt.Orientation(axcodes="RAS"),
            False,
        ),
        "Resample(1.5 mm)": (
            lambda: Resample(1.5),
            lambda tio: tio.Resample(1.5),
            lambda mt: mt.Spacing(pixdim=1.5, mode="bilinear"),
            False,
        ),
        f"CropOrPad{target}": (
            lambda: CropOrPad(target),
            lambda tio: tio.CropOrPad(target),
            lambda mt: mt.ResizeWithPadOrCrop(target),
            True,
        ),
        "RescaleIntensity(0.5, 99.5 %)": (
            lambda: RescaleIntensity(out_min_max=(0, 1), percentiles=(0.5, 99.5)),
            lambda tio: tio.RescaleIntensity(out_min_max=(0, 1), percentiles=(0.5, 99.5)),
            lambda mt: mt.ScaleIntensityRangePercentiles(0.5, 99.5, 0.0, 1.0, clip=True),
            True,
        ),
        "ZNormalization": (
            lambda: ZNormalization(),
            lambda tio: tio.ZNormalization(),
            lambda mt: mt.NormalizeIntensity(),
            True,
        ),
        "HistogramStandardization": (
            lambda: HistogramStandardization(volume.landmarks()),
            lambda tio: tio.HistogramStandardization({"t1": volume.torchio_landmarks()}),
            None,
            True,
        ),
    }

    def build(name, make_jmed, make_tio, make_monai, jittable):
        def fns():
            t1 = jmed.ScalarImage(jnp.asarray(volume.t1), volume.affine)
            transform = make_jmed()
            if jittable:
                fn = jax.jit(lambda im: transform(im))
                out = {"jmed": lambda i: fn(t1)}
            else:
                out = {"jmed": lambda i: transform(t1)}
            try:
                import torch
            except ImportError:  # no anchors installed: jmed alone
                return out
            tensor = torch.from_numpy(volume.t1[None].copy())
            try:
                import torchio as tio

                subject = tio.Subject(t1=tio.ScalarImage(tensor=tensor, affine=volume.affine))
                t = make_tio(tio)
                out["torchio"] = lambda i: t(subject)
            except ImportError:
                pass
            try:
                import monai.transforms as mt
                from monai.data import MetaTensor

                if make_monai is not None:
                    meta = MetaTensor(tensor, affine=torch.as_tensor(volume.affine))
                    m = make_monai(mt)
                    out["monai"] = lambda i: m(meta)
            except ImportError:
                pass
            return out

        return Case(
            "preprocessing", name, build=fns, note="" if jittable else "eager (shape from header values)"
        )

    rows = [build(name, *value) for name, value in spec.items()]

    def keep_largest():
        try:
            import torch
        except ImportError:  # no anchors installed: jmed alone
            torch = None

        labels = jmed.LabelMap((volume.seg > 0).astype(np.uint8), volume.affine)
        transform = KeepLargestComponent()
        out = {"jmed": lambda i: transform(labels)}
        if torch is None:
            return out
        tensor = torch.from_numpy((volume.seg[None] > 0).astype(np.uint8))
        try:
            import torchio as tio

            label = tio.LabelMap(tensor=tensor, affine=volume.affine)
            t = tio.KeepLargestComponent()
            out["torchio"] = lambda i: t(label)
        except ImportError:
            pass
        try:
            import monai.transforms as mt

            m = mt.KeepLargestConnectedComponent(applied_labels=1, connectivity=1)
            out["monai"] = lambda i: m(tensor)
        except ImportError:
            pass
        return out

    rows.append(Case("preprocessing", "KeepLargestComponent", build=keep_largest, note="eager, label map"))
    return rows


if __name__ == "__main__":
    main()
