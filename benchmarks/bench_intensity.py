"""Time jmed's intensity and MRI-artifact transforms next to TorchIO and MONAI.

Each jmed transform is jitted (``jax.jit(transform)(key, subject)``, a new key per call,
voxel data already a device array) and timed per call on one volume (the MNI152 T1, 197x233x189, or a synthetic volume of
that size). Compile time is reported separately. TorchIO and MONAI run the same transform
with the same parameters when they are importable; ratios are theirs / jmed.

Usage: ``PYTHONPATH=. python benchmarks/bench_intensity.py [--data DIR] [--runs N]
[--threads N] [--only NAME ...]``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import jax
import numpy as np

import jmed
from jmed import transforms as T

REPO = Path(__file__).resolve().parents[1]
# ../shared/data/mni152 from the repository root (also tried one level further up, for
# checkouts in a subfolder of the workspace)
_CANDIDATES = [REPO.parent / "shared" / "data" / "mni152", REPO.parents[1] / "shared" / "data" / "mni152"]
DEFAULT_DATA = next((p for p in _CANDIDATES if p.exists()), _CANDIDATES[0])
T1_NAME = "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"


def load_volume(data_dir: Path) -> tuple[np.ndarray, np.ndarray, str]:
    path = data_dir / T1_NAME
    if path.exists():
        image = jmed.load(path)
        return np.asarray(image.data, np.float32), np.asarray(image.affine), str(path)
    rng = np.random.default_rng(0)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in (197, 233, 189)], indexing="ij"), -1)
    data = 80.0 * (np.sqrt((grid**2).sum(-1)) < 0.8) + 5 * rng.standard_normal(grid.shape[:3])
    return data[..., None].astype(np.float32), np.eye(4), "synthetic 197x233x189"


# name -> (jmed transform, torchio factory, monai factory); same parameters where they exist
def transforms():
    return {
        "RandomBiasField": (
            T.RandomBiasField(coefficients=0.5, order=3),
            lambda tio: tio.RandomBiasField(coefficients=0.5, order=3),
            lambda mt: mt.RandBiasField(coeff_range=(-0.5, 0.5), degree=3, prob=1.0),
        ),
        "RandomBlur (1 mm)": (
            T.RandomBlur(std=(1.0, 1.0)),
            lambda tio: tio.RandomBlur(std=(1.0, 1.0)),
            lambda mt: mt.RandGaussianSmooth(sigma_x=(1, 1), sigma_y=(1, 1), sigma_z=(1, 1), prob=1.0),
        ),
        "RandomNoise": (
            T.RandomNoise(std=(0.0, 0.25)),
            lambda tio: tio.RandomNoise(std=(0.0, 0.25)),
            lambda mt: mt.RandGaussianNoise(prob=1.0, std=0.25),
        ),
        "RandomGamma": (
            T.RandomGamma(log_gamma=0.3),
            lambda tio: tio.RandomGamma(log_gamma=0.3),
            lambda mt: mt.RandAdjustContrast(prob=1.0, gamma=(0.74, 1.35)),
        ),
        "RandomMotion": (
            T.RandomMotion(degrees=10, translation=10, num_transforms=2),
            lambda tio: tio.RandomMotion(degrees=10, translation=10, num_transforms=2),
            None,
        ),
        "RandomGhosting": (
            T.RandomGhosting(num_ghosts=(4, 10), intensity=(0.5, 1)),
            lambda tio: tio.RandomGhosting(num_ghosts=(4, 10), intensity=(0.5, 1)),
            None,
        ),
        "RandomSpike": (
            T.RandomSpike(num_spikes=1, intensity=(1, 3)),
            lambda tio: tio.RandomSpike(num_spikes=1, intensity=(1, 3)),
            lambda mt: mt.RandKSpaceSpikeNoise(prob=1.0),
        ),
        "RandomBrightness": (
            T.RandomBrightness(),
            None,
            lambda mt: mt.RandScaleIntensity(factors=0.25, prob=1.0),
        ),
        "RandomContrast": (T.RandomContrast(), None, None),
        "RandomSwap": (
            T.RandomSwap(patch_size=15, num_iterations=100),
            lambda tio: tio.RandomSwap(patch_size=15, num_iterations=100),
            None,
        ),
    }


def median_ms(fn, runs: int) -> float:
    times = []
    for i in range(runs):
        start = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def time_jmed(transform, subject, runs: int) -> tuple[float, float]:
    fn = jax.jit(lambda key, s: transform(key, s)["t1"].data)
    key = jax.random.key(0)
    start = time.perf_counter()
    fn(key, subject).block_until_ready()
    compile_ms = 1e3 * (time.perf_counter() - start)
    return median_ms(
        lambda i: fn(jax.random.fold_in(key, i + 1), subject).block_until_ready(), runs
    ), compile_ms


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2, help="torch threads for TorchIO/MONAI")
    parser.add_argument("--only", nargs="*", help="names of transforms to time")
    args = parser.parse_args(argv)

    data, affine, source = load_volume(args.data)
    # data already on the device, as after a loader step (TorchIO/MONAI get torch tensors)
    subject = jmed.Subject(t1=jmed.Image(jax.device_put(data), affine))
    try:
        import torch
        import torchio as tio

        torch.set_num_threads(args.threads)
        tio_subject = tio.Subject(
            t1=tio.ScalarImage(tensor=torch.from_numpy(np.moveaxis(data, -1, 0)), affine=affine)
        )
    except ImportError:
        tio = None
    try:
        import monai.transforms as mt
        import torch

        monai_input = torch.from_numpy(np.moveaxis(data, -1, 0).copy())
    except ImportError:
        mt = None

    print(
        f"volume: {source}, shape {data.shape}; median of {args.runs} runs after warm-up; jax {jax.__version__}"
    )
    header = f"{'transform':<20}{'jmed ms':>10}{'compile ms':>12}{'torchio ms':>12}{'x':>7}{'monai ms':>10}{'x':>7}"
    print(header)
    print("-" * len(header))
    for name, (transform, tio_factory, monai_factory) in transforms().items():
        if args.only and not any(o in name for o in args.only):
            continue
        ours, compile_ms = time_jmed(transform, subject, args.runs)
        row = f"{name:<20}{ours:>10.1f}{compile_ms:>12.0f}"
        if tio is not None and tio_factory is not None:
            t = tio_factory(tio)
            t(tio_subject)
            theirs = median_ms(lambda i, t=t: t(tio_subject), args.runs)
            row += f"{theirs:>12.1f}{theirs / ours:>7.1f}"
        else:
            row += f"{'-':>12}{'':>7}"
        if mt is not None and monai_factory is not None:
            m = monai_factory(mt)
            m(monai_input)
            theirs = median_ms(lambda i, m=m: m(monai_input), args.runs)
            row += f"{theirs:>10.1f}{theirs / ours:>7.1f}"
        else:
            row += f"{'-':>10}{'':>7}"
        print(row, flush=True)


def cases(quick: bool, volume) -> list:
    """Intensity/MRI rows for ``benchmarks.run``: jitted jmed on the T1, new key per call."""
    from benchmarks.common import Case

    def build(name):
        def fns():
            try:
                import torch
            except ImportError:  # no anchors installed: jmed alone
                torch = None

            transform, tio_factory, monai_factory = transforms()[name]
            subject = jmed.Subject(t1=jmed.Image(jax.device_put(volume.t1[..., None]), volume.affine))
            fn = jax.jit(lambda key, s: transform(key, s)["t1"].data)
            out = {"jmed": lambda i: fn(jax.random.key(i), subject)}
            if torch is None:
                return out
            tensor = torch.from_numpy(volume.t1[None].copy())
            try:
                import torchio as tio

                if tio_factory is not None:
                    tio_subject = tio.Subject(t1=tio.ScalarImage(tensor=tensor, affine=volume.affine))
                    t = tio_factory(tio)
                    out["torchio"] = lambda i: t(tio_subject)
            except ImportError:
                pass
            try:
                import monai.transforms as mt

                if monai_factory is not None:
                    m = monai_factory(mt)
                    out["monai"] = lambda i: m(tensor)
            except ImportError:
                pass
            return out

        return fns

    return [Case("intensity/MRI", name, build=build(name), unit="volume") for name in transforms()]


if __name__ == "__main__":
    main()
