"""Spatial augmentation benchmark: jmed next to TorchIO and MONAI (when importable).

Image + 3-class label map, MNI-size volume (197x233x189, from ``--data`` when present,
else synthetic) and a 256^3 volume. Reports compile time and the median of ``--repeats``
runs after warm-up (ms), the ratio to jmed, and the vmapped batch throughput. Two rows of
``benchmarks.run`` time RandomAffine on the T1 alone, kept as host numpy data, read by
``jmed.load`` and taken from nibabel's ``get_fdata()`` (float64, Fortran order).

Run with ``taskset -c 0,1 python benchmarks/bench_spatial.py`` to use 2 CPU cores.
"""

from __future__ import annotations

import argparse
import functools
import os
import time
import warnings
from pathlib import Path

import jax
import numpy as np

import jmed
from jmed.transforms import Compose, RandomAffine, RandomElasticDeformation, RandomFlip

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "mni152"

AFFINE_KW = dict(scales=0.1, degrees=10, translation=5)
ELASTIC_KW = dict(num_control_points=7, max_displacement=7.5, locked_borders=2)


def load_volume(data_dir: Path | None, shape=(197, 233, 189)):
    """T1 and a 3-class label map (background / GM / WM) as numpy arrays, plus affine."""
    if data_dir is not None and data_dir.exists():
        import nibabel as nib

        t1_path = next(data_dir.glob("*t1*.nii*"))
        gm_path = next(data_dir.glob("*gm*.nii*"))
        wm_path = next(data_dir.glob("*wm*.nii*"))
        t1 = nib.load(t1_path)
        gm, wm = (np.asarray(nib.load(p).dataobj, np.float32) for p in (gm_path, wm_path))
        labels = np.where((gm > 0.5) | (wm > 0.5), np.where(wm > gm, 2, 1), 0).astype(np.uint8)
        return np.asarray(t1.dataobj, np.float32), labels, t1.affine, f"MNI152 ({t1_path.name})"
    rng = np.random.default_rng(0)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"), -1)
    radius = np.linalg.norm(grid / np.array([0.8, 0.9, 0.7]), axis=-1)
    labels = np.where(radius < 0.5, 2, np.where(radius < 0.8, 1, 0)).astype(np.uint8)
    image = (labels * 50 + 5 * rng.standard_normal(shape)).astype(np.float32)
    affine = np.eye(4)
    affine[:3, 3] = -(np.array(shape) - 1) / 2
    return image, labels, affine, "synthetic"


def timeit(fn, repeats):
    start = time.perf_counter()
    fn(0)
    first = time.perf_counter() - start
    times = []
    for i in range(repeats):
        start = time.perf_counter()
        fn(i + 1)
        times.append(time.perf_counter() - start)
    return first, float(np.median(times))


def jmed_cases():
    return {
        "RandomAffine": RandomAffine(**AFFINE_KW),
        "RandomElasticDeformation": RandomElasticDeformation(**ELASTIC_KW),
        "fused flip+affine+elastic": Compose(
            [RandomFlip(axes=(0,)), RandomAffine(**AFFINE_KW), RandomElasticDeformation(**ELASTIC_KW)]
        ),
    }


def bench_jmed(subject, repeats, batch):
    rows = {}
    subject = jax.device_put(subject)
    for name, transform in jmed_cases().items():
        fn = jax.jit(lambda k, s, t=transform: t(k, s).without_history())
        compile_s, median_s = timeit(
            lambda i, fn=fn: jax.block_until_ready(fn(jax.random.key(i), subject)), repeats
        )
        rows[name] = (compile_s - median_s, median_s)
        if batch:
            batched = jax.device_put(jmed.stack([subject] * batch))
            vfn = jax.jit(jax.vmap(lambda k, s, t=transform: t(k, s).without_history()))

            def run_batch(i, vfn=vfn, batched=batched):
                keys = jax.random.split(jax.random.key(i), batch)
                jax.block_until_ready(vfn(keys, batched))

            _, batch_s = timeit(run_batch, max(3, repeats // 2))
            rows[name] += (batch / batch_s,)
    return rows


def bench_label_modes(labels, repeats):
    """Label resampling alone: nearest vs partial volume with 2 and 50 classes."""
    import jax.numpy as jnp

    from jmed.ops.interpolation import resample
    from jmed.transforms.spatial import affine_mapping

    shape = labels.shape
    params = (jnp.array([1.05, 0.95, 1.0]), jnp.array([8.0, -6.0, 10.0]), jnp.array([2.0, 0.0, -1.0]))
    matrix = affine_mapping(*params, shape, np.eye(4)).matrix
    rng = np.random.default_rng(0)
    coarse = rng.integers(0, 50, tuple(-(-n // 8) for n in shape))
    many = np.kron(coarse, np.ones((8, 8, 8), np.uint8))[: shape[0], : shape[1], : shape[2]]
    maps = {"2 classes": (labels > 0).astype(np.uint8), "50 classes": many.astype(np.uint8)}
    rows = {}
    for name, data in maps.items():
        data = jax.device_put(data[..., None])
        for order in ("nearest", "partial_volume"):
            fn = jax.jit(lambda d, m, order=order: resample(d, m, shape, order=order))
            _, median_s = timeit(lambda i, fn=fn, data=data: jax.block_until_ready(fn(data, matrix)), repeats)
            rows[f"{order}, {name}"] = median_s
    return rows


def bench_torchio(image, labels, affine, repeats):
    transforms = _anchor_transforms_torchio()
    if transforms is None:
        return None
    import torch
    import torchio as tio

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    subject = tio.Subject(
        t1=tio.ScalarImage(tensor=torch.from_numpy(image[None]), affine=affine),
        seg=tio.LabelMap(tensor=torch.from_numpy(labels[None].astype(np.int16)), affine=affine),
    )
    return {name: timeit(lambda i, t=t: t(subject), repeats)[1] for name, t in transforms.items()}


def bench_monai(image, labels, repeats):
    transforms = _anchor_transforms_monai()
    if transforms is None:
        return None
    import torch

    data = {"t1": torch.from_numpy(image[None]), "seg": torch.from_numpy(labels[None].astype(np.float32))}
    return {name: timeit(lambda i, t=t: t(data), repeats)[1] for name, t in transforms.items()}


def report(title, jm, tio_rows, monai_rows, batch):
    print(f"\n{title}")
    header = f"{'transform':28s} {'jmed ms':>9s} {'compile s':>9s}"
    if batch:
        header += f" {'vol/s b=' + str(batch):>10s}"
    header += f" {'TorchIO ms':>11s} {'x jmed':>7s} {'MONAI ms':>9s} {'x jmed':>7s}"
    print(header)
    for name, values in jm.items():
        compile_s, median_s = values[:2]
        line = f"{name:28s} {median_s * 1e3:9.1f} {compile_s:9.2f}"
        if batch:
            line += f" {values[2]:10.2f}"
        for rows in (tio_rows, monai_rows):
            if rows is None:
                line += f" {'n/a':>11s} {'':>7s}"
            else:
                line += f" {rows[name] * 1e3:11.1f} {rows[name] / median_s:7.2f}"
        print(line)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA if DEFAULT_DATA.exists() else None)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--no-anchors", action="store_true", help="skip TorchIO and MONAI")
    parser.add_argument("--no-256", action="store_true", help="skip the 256^3 volume")
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    print(f"jax {jax.__version__}, devices {jax.devices()}, CPU cores {len(os.sched_getaffinity(0))}")

    image, labels, affine, source = load_volume(args.data)
    volumes = [(f"{source}, shape {image.shape}", image, labels, affine)]
    if not args.no_256:
        padded = [np.zeros((256, 256, 256), a.dtype) for a in (image, labels)]
        start = [(256 - n) // 2 for n in image.shape]
        region = tuple(slice(s, s + n) for s, n in zip(start, image.shape))
        for dst, src in zip(padded, (image, labels)):
            dst[region] = src
        volumes.append(("the same zero-padded to 256^3", padded[0], padded[1], affine))

    for title, img, lab, aff in volumes:
        subject = jmed.Subject(t1=jmed.ScalarImage(img, aff), seg=jmed.LabelMap(lab, aff))
        jm = bench_jmed(subject, args.repeats, args.batch)
        # anchors on the MNI-size volume only (their elastic takes tens of seconds per run)
        anchors = not args.no_anchors and img is image
        tio_rows = bench_torchio(img, lab, aff, args.repeats) if anchors else None
        monai_rows = bench_monai(img, lab, args.repeats) if anchors else None
        report(title, jm, tio_rows, monai_rows, args.batch)
        if img is image:
            print("\nlabel map alone (resample kernel, same rotation)")
            for name, median_s in bench_label_modes(lab, args.repeats).items():
                print(f"{name:28s} {median_s * 1e3:9.1f} ms")


def cases(quick: bool, volume) -> list:
    """Spatial rows for ``benchmarks.run``: image + label map, jitted jmed, per subject.

    Under ``--quick`` TorchIO's and MONAI's elastic rows are skipped (tens of seconds a call).
    """
    from benchmarks.common import Case

    @functools.lru_cache(maxsize=1)
    def synthetic(shape):  # built once for all the rows of that shape
        from benchmarks.common import load_volume

        return load_volume(None, shape)

    def build(name, shape=None, anchors=True):
        def fns():
            vol = volume if shape is None else synthetic(shape)
            subject = vol.subject()
            transform = jmed_cases()[name]
            fn = jax.jit(lambda k, s: transform(k, s).without_history())
            out = {"jmed": lambda i: fn(jax.random.key(i), subject)}
            if not anchors:
                return out
            tio_rows = _anchor_transforms_torchio()
            if tio_rows is not None:
                tio_subject = vol.torchio_subject()
                out["torchio"] = lambda i, t=tio_rows[name]: t(tio_subject)
            monai_rows = _anchor_transforms_monai()
            if monai_rows is not None:
                import torch

                data = {
                    "t1": torch.from_numpy(vol.t1[None].copy()),
                    "seg": torch.from_numpy(vol.seg[None].astype(np.float32)),
                }
                out["monai"] = lambda i, t=monai_rows[name]: t(data)
            return out

        return fns

    elastic_note = "MONAI elastic: Gaussian-smoothed field (closest settings)"
    rows = []
    for name in jmed_cases():
        slow = "Elastic" in name or "fused" in name
        rows.append(
            Case(
                "spatial",
                name,
                build=build(name),
                unit="subject (t1+seg)",
                note=elastic_note if slow else "",
                quick_skip=("torchio", "monai") if slow else (),
            )
        )

    if not quick:  # a larger volume (synthetic 256^3); elastic anchors take minutes there
        for name, anchors in (("RandomAffine", True), ("fused flip+affine+elastic", False)):
            rows.append(
                Case(
                    "spatial",
                    f"{name}, 256^3",
                    build=build(name, (256, 256, 256), anchors),
                    unit="subject (t1+seg)",
                    note="synthetic 256^3" + ("" if anchors else "; jmed only"),
                )
            )

    def batched(name, batch):
        def fns():
            transform = jmed_cases()[name]
            stacked = jax.device_put(jmed.stack([volume.subject(device=False)] * batch))
            fn = jax.jit(jax.vmap(lambda k, s: transform(k, s).without_history()))
            return {"jmed": lambda i: fn(jax.random.split(jax.random.key(i), batch), stacked)}

        return fns

    def from_file(source):
        """RandomAffine on the T1 alone, a numpy-backed Image made from the NIfTI file by
        ``jmed.load`` or from nibabel's ``get_fdata()`` (float64, Fortran order)."""

        def fns():
            import tempfile

            import nibabel as nib

            from benchmarks.common import T1_NAME

            with tempfile.TemporaryDirectory() as tmp:
                path = volume.folder / T1_NAME if volume.folder is not None else Path(tmp) / "t1.nii.gz"
                if volume.folder is None:
                    nib.save(nib.Nifti1Image(volume.t1, volume.affine), path)
                if source == "jmed.load":
                    image = jmed.load(path)
                else:
                    nifti = nib.load(path)
                    image = jmed.ScalarImage(nifti.get_fdata(), nifti.affine)
            transform = RandomAffine(**AFFINE_KW)
            fn = jax.jit(lambda k, im: transform(k, im))
            return {"jmed": lambda i: fn(jax.random.key(i), image)}

        return fns

    for source, label in (("jmed.load", "jmed.load"), ("nibabel", "nibabel array (get_fdata)")):
        rows.append(
            Case(
                "spatial",
                f"RandomAffine, image from {label}",
                build=from_file(source),
                unit="image (t1)",
                note="jmed only; host numpy data handed to jit on each call (no device_put)",
            )
        )

    batch = 2 if quick else 4
    rows.append(
        Case(
            "spatial",
            f"fused flip+affine+elastic, vmap batch {batch}",
            build=batched("fused flip+affine+elastic", batch),
            unit=f"batch of {batch}",
            note="jmed only (no batched anchor)",
        )
    )
    return rows


def _anchor_transforms_torchio():
    try:
        import torchio as tio
    except ImportError:
        return None
    affine_t = tio.RandomAffine(**AFFINE_KW)
    elastic_t = tio.RandomElasticDeformation(**ELASTIC_KW)
    return {
        "RandomAffine": affine_t,
        "RandomElasticDeformation": elastic_t,
        "fused flip+affine+elastic": tio.Compose([tio.RandomFlip(axes=(0,)), affine_t, elastic_t]),
    }


def _anchor_transforms_monai():
    try:
        from monai.transforms import Compose as MCompose
        from monai.transforms import Rand3DElasticd, RandAffined, RandFlipd
    except ImportError:
        return None
    keys = ("t1", "seg")
    modes = ("bilinear", "nearest")
    radians = np.deg2rad(10)
    affine_t = RandAffined(
        keys,
        prob=1.0,
        rotate_range=(radians,) * 3,
        scale_range=(0.1,) * 3,
        translate_range=(5,) * 3,
        mode=modes,
    )
    elastic_t = Rand3DElasticd(keys, sigma_range=(5, 7), magnitude_range=(50, 100), prob=1.0, mode=modes)
    return {
        "RandomAffine": affine_t,
        "RandomElasticDeformation": elastic_t,
        "fused flip+affine+elastic": MCompose(
            [RandFlipd(keys, prob=0.5, spatial_axis=0), affine_t, elastic_t]
        ),
    }


if __name__ == "__main__":
    main()
