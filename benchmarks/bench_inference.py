"""Benchmark: sliding-window inference (grid aggregation) with an identity model.

jmed ``sliding_window_inference`` next to TorchIO ``GridSampler`` + ``GridAggregator``
and MONAI ``sliding_window_inference`` on the same volume and parameters (patch 96^3,
overlap 48, batch 4, identity model). Times are the median of ``--repeats`` runs after a
warm-up; jmed's compile time (first call) is reported separately. Ratios are
``other / jmed`` (> 1: jmed is faster). MONAI has no Hann window and TorchIO no Gaussian.

Usage::

    PYTHONPATH=. python benchmarks/bench_inference.py [--data DIR] [--threads 2] [--devices 8]
        [--sizes mni,256] [--no-anchors]

``--devices N`` (N > 1) also times the sharded path on N emulated CPU devices (all
devices share the same cores, so this measures overhead, not scaling).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _parse():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = ROOT.parent / "shared" / "data" / "mni152"
    parser.add_argument("--data", type=Path, default=default, help="folder with the MNI152 T1 NIfTI")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (match the cores)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--devices", type=int, default=1, help="emulated CPU devices for the sharded rows")
    parser.add_argument("--sizes", default="mni,256", help="comma list of 'mni' and/or cube sizes")
    parser.add_argument(
        "--no-anchors", dest="anchors", action="store_false", help="time jmed only (no TorchIO, MONAI)"
    )
    return parser.parse_args()


ARGS = _parse() if __name__ == "__main__" else None
if ARGS is not None and ARGS.devices > 1 and "XLA_FLAGS" not in os.environ:
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={ARGS.devices}"

import jax  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(ROOT))
import jmed  # noqa: E402

PATCH, OVERLAP, BATCH = 96, 48, 4


def identity(x):
    return x


def median_time(fn, repeats):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def load_volumes(args):
    volumes = {}
    for size in args.sizes.split(","):
        if size == "mni":
            files = sorted(args.data.glob("*t1*.nii*")) if args.data.is_dir() else []
            if files:
                image = jmed.load(files[0])
                data = np.asarray(image.data, np.float32)
                volumes["MNI " + "x".join(map(str, data.shape[:3]))] = jmed.Image(data, image.affine)
            else:
                rng = np.random.default_rng(0)
                data = rng.random((197, 233, 189, 1), np.float32)
                volumes["synthetic 197x233x189"] = jmed.Image(data)
        else:
            n = int(size)
            data = np.random.default_rng(1).random((n, n, n, 1), np.float32)
            volumes[f"synthetic {n}^3"] = jmed.Image(data)
    return volumes


def time_jmed(image, mode, repeats, mesh=None, **kwargs):
    image = image.replace(data=jax.device_put(image.data))

    def run():
        out = jmed.sliding_window_inference(
            identity, image, PATCH, overlap=OVERLAP, batch_size=BATCH, mode=mode, mesh=mesh, **kwargs
        )
        jax.block_until_ready(out.data)
        return out

    start = time.perf_counter()
    out = run()
    compile_s = time.perf_counter() - start
    error = float(np.abs(np.asarray(out.data, np.float32) - np.asarray(image.data)).max())
    return compile_s, median_time(run, repeats), error


def time_torchio(image, mode, repeats):
    try:
        import torch
        import torchio as tio
    except ImportError:
        return None
    tensor = torch.from_numpy(np.moveaxis(np.asarray(image.data), -1, 0).copy())
    subject = tio.Subject(t1=tio.ScalarImage(tensor=tensor, affine=np.asarray(image.affine)))

    def run():
        sampler = tio.inference.GridSampler(subject, PATCH, OVERLAP)
        loader = torch.utils.data.DataLoader(sampler, batch_size=BATCH)
        aggregator = tio.inference.GridAggregator(sampler, overlap_mode=mode)
        with torch.no_grad():
            for batch in loader:
                aggregator.add_batch(batch["t1"][tio.DATA], batch[tio.LOCATION])
        return aggregator.get_output_tensor()

    return median_time(run, repeats)


def time_monai(image, mode, repeats):
    try:
        import monai.inferers
        import torch
    except ImportError:
        return None
    tensor = torch.from_numpy(np.moveaxis(np.asarray(image.data), -1, 0)[None].copy())

    def run():
        with torch.no_grad():
            return monai.inferers.sliding_window_inference(
                tensor, (PATCH,) * 3, BATCH, identity, overlap=OVERLAP / PATCH, mode=mode
            )

    return median_time(run, repeats)


def _ms(seconds):
    return "-" if seconds is None else f"{1000 * seconds:8.1f}"


def _ratio(other, mine):
    return "-" if other is None else f"{other / mine:6.2f}"


def main():
    args = ARGS or _parse()
    try:
        import torch

        torch.set_num_threads(args.threads)
    except ImportError:
        pass
    volumes = load_volumes(args)
    print(f"jax {jax.__version__}, devices: {jax.device_count()} x {jax.devices()[0].platform}")
    print(f"patch {PATCH}^3, overlap {OVERLAP}, batch {BATCH}, identity model; median of {args.repeats} runs")
    header = (
        f"{'volume':24} {'mode':9} {'compile s':>9} {'jmed ms':>8} {'max err':>8} "
        f"{'torchio ms':>10} {'tio/jmed':>8} {'monai ms':>8} {'monai/jmed':>10}"
    )
    print(header)
    print("-" * len(header))
    tio_modes = {"crop": "crop", "average": "average", "hann": "hann", "gaussian": None}
    monai_modes = {"crop": None, "average": "constant", "hann": None, "gaussian": "gaussian"}
    for name, image in volumes.items():
        for mode in ("hann", "gaussian", "average", "crop"):
            compile_s, mine, error = time_jmed(image, mode, args.repeats)
            anchors = args.anchors
            tio_t = (
                time_torchio(image, tio_modes[mode], args.repeats) if anchors and tio_modes[mode] else None
            )
            monai_t = (
                time_monai(image, monai_modes[mode], args.repeats) if anchors and monai_modes[mode] else None
            )
            print(
                f"{name:24} {mode:9} {compile_s:9.2f} {_ms(mine)} {error:8.1e} "
                f"{_ms(tio_t):>10} {_ratio(tio_t, mine):>8} {_ms(monai_t):>8} {_ratio(monai_t, mine):>10}"
            )
    print()
    print("memory options (hann unless stated; jmed only)")
    name, image = next(iter(volumes.items()))
    for label, kwargs, mode in [
        ("float32 accumulator", {}, "hann"),
        ("bfloat16 accumulator", {"accumulation_dtype": "bfloat16"}, "hann"),
        ("output on host", {"output_on_host": True}, "hann"),
    ]:
        compile_s, mine, error = time_jmed(image, mode, args.repeats, **kwargs)
        print(f"{name:24} {label:24} compile {compile_s:6.2f} s  {_ms(mine)} ms  max err {error:.1e}")
    if jax.device_count() > 1:
        print()
        print("sharded over emulated CPU devices (shared cores: overhead, not scaling)")
        for n in sorted({1, 2, jax.device_count()}):
            mesh = jax.make_mesh((n,), ("data",), devices=jax.devices()[:n])
            for label, kwargs in [("psum (device)", {}), ("host accumulation", {"output_on_host": True})]:
                compile_s, mine, error = time_jmed(image, "hann", args.repeats, mesh=mesh, **kwargs)
                print(
                    f"{name:24} {n} devices {label:18} compile {compile_s:6.2f} s  {_ms(mine)} ms  "
                    f"max err {error:.1e}"
                )


def cases(quick: bool, volume) -> list:
    """Sliding-window rows for ``benchmarks.run`` (identity model, patch 96^3, overlap 48).

    ``average`` has both anchors, ``hann`` TorchIO only (jmed's target: <= 30 ms on the
    MNI-size volume); ``gaussian`` (MONAI only) is added in the full run.
    """
    from benchmarks.common import Case

    patch = volume.scaled(PATCH)[0]
    overlap = patch // 2
    modes = [("average", "average", "constant"), ("hann", "hann", None)]
    if not quick:
        modes += [("gaussian", None, "gaussian")]

    def build(mode, tio_mode, monai_mode):
        def fns():
            try:
                import torch
            except ImportError:  # no anchors installed: jmed alone
                torch = None

            image = jmed.Image(jax.device_put(volume.t1[..., None]), volume.affine)
            out = {
                "jmed": lambda i: (
                    jmed.sliding_window_inference(
                        identity, image, patch, overlap=overlap, batch_size=BATCH, mode=mode
                    ).data
                )
            }
            if torch is None:
                return out
            tensor = torch.from_numpy(volume.t1[None].copy())
            try:
                import torchio as tio

                if tio_mode is not None:
                    subject = tio.Subject(t1=tio.ScalarImage(tensor=tensor, affine=volume.affine))

                    def run_tio(i):
                        sampler = tio.inference.GridSampler(subject, patch, overlap)
                        loader = torch.utils.data.DataLoader(sampler, batch_size=BATCH)
                        aggregator = tio.inference.GridAggregator(sampler, overlap_mode=tio_mode)
                        with torch.no_grad():
                            for batch in loader:
                                aggregator.add_batch(batch["t1"][tio.DATA], batch[tio.LOCATION])
                        return aggregator.get_output_tensor()

                    out["torchio"] = run_tio
            except ImportError:
                pass
            try:
                import monai.inferers

                if monai_mode is not None:

                    def run_monai(i):
                        with torch.no_grad():
                            return monai.inferers.sliding_window_inference(
                                tensor[None],
                                (patch,) * 3,
                                BATCH,
                                identity,
                                overlap=overlap / patch,
                                mode=monai_mode,
                            )

                    out["monai"] = run_monai
            except ImportError:
                pass
            return out

        return fns

    return [
        Case(
            "inference",
            f"sliding window {mode}, patch {patch}^3, overlap {overlap}, batch {BATCH}",
            build=build(mode, tio_mode, monai_mode),
            unit="volume",
            note="identity model; jmed compiles the model once, cut and add per volume shape",
        )
        for mode, tio_mode, monai_mode in modes
    ]


if __name__ == "__main__":
    main()
