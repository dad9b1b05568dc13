"""The device pipeline on 1, 2, 4 and 8 emulated CPU devices: throughput per device, scaling.

What runs: ``jmed.augment_and_sample`` (``RandomFlip``, ``RandomAffine``, ``RandomGamma``,
``RandomNoise``, then ``LabelSampler`` patches) jitted on a batch of whole volumes split
over a 1D mesh of N devices (``NamedSharding(mesh, P("data"))``, the patches come out
split the same way), as in the train step of ``examples/device_augmentation.py``. Weak
scaling: every device gets the same number of volumes, so N devices augment N times as
many volumes per call. Reported per device count: ms per volume, volumes per second in
total and per device, and the throughput relative to one device.

Each device count runs in its own subprocess with
``XLA_FLAGS=--xla_force_host_platform_device_count=N`` and ``JAX_PLATFORMS=cpu``. These
are **emulated CPU devices**: they share the host's cores (the table header says how
many), so on a 2-core machine the total throughput can grow by at most about 2x
whatever N is; what the rows show is the cost of partitioning the program over N
devices, not how an accelerator scales. Timing: the first call alone (compile time =
first call - median), then the median of the timed runs; a run is a burst of calls of
at least 0.25 s (each call with its own key), divided by the number of calls.

    PYTHONPATH=. python benchmarks/bench_device.py [--quick] [--devices 1 2 4 8] [--runs N]
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEVICE_COUNTS = (1, 2, 4, 8)
DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"
MIN_RUN_S = 0.25


@dataclass(frozen=True)
class Config:
    """Volumes of ``volume``^3 voxels (2 mm phantoms), ``per_device`` of them per device,
    ``num_patches`` patches of ``patch``^3 from each."""

    volume: int
    per_device: int
    patch: int
    num_patches: int


FULL = Config(volume=96, per_device=2, patch=64, num_patches=4)
QUICK = Config(volume=64, per_device=1, patch=32, num_patches=2)


def _augmentation(T):
    return T.Compose(
        [
            T.RandomFlip(axes=0),
            T.RandomAffine(scales=0.1, degrees=10, translation=4),
            T.RandomGamma(log_gamma=(-0.3, 0.3)),
            T.RandomNoise(std=(0.0, 0.05)),
        ]
    )


def _child(config: Config, devices: int, runs: int) -> dict:
    """Time the sharded augmentation on this process's devices (run with its own XLA_FLAGS)."""
    import jax
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P  # noqa: N817

    import jmed
    import jmed.transforms as T  # noqa: N812

    if jax.device_count() != devices:
        raise RuntimeError(
            f"expected {devices} devices, JAX sees {jax.device_count()} (XLA_FLAGS not applied?)"
        )
    mesh = jax.make_mesh((devices,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    split, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
    batch_size = config.per_device * devices
    # a few distinct phantoms, repeated: every device gets the same amount of work
    phantoms = [
        jmed.datasets.phantom(
            i, shape=(config.volume,) * 3, spacing=(2.0,) * 3, num_classes=3
        ).without_history()
        for i in range(min(batch_size, 4))
    ]
    batch = jax.device_put(jmed.stack([phantoms[i % len(phantoms)] for i in range(batch_size)]), split)
    sampler = jmed.LabelSampler(config.patch, "seg", {0: 1, 1: 1, 2: 1})
    augmentation = _augmentation(T)

    @functools.partial(jax.jit, in_shardings=(replicated, split), out_shardings=split)
    def step(i, batch):
        key = jax.random.fold_in(jax.random.key(0), i)
        return jmed.augment_and_sample(
            key, batch, sampler=sampler, num_patches=config.num_patches, augmentation=augmentation
        )

    calls = iter(range(2**31))

    def call():
        return step(np.uint32(next(calls)), batch)

    start = time.perf_counter()
    out = jax.block_until_ready(call())
    first = time.perf_counter() - start
    # each timed run is a burst of calls lasting at least MIN_RUN_S: single calls of a
    # few milliseconds would measure the scheduler of a shared machine
    start = time.perf_counter()
    jax.block_until_ready(call())
    repeat = max(1, min(100, math.ceil(MIN_RUN_S / max(time.perf_counter() - start, 1e-6))))
    times = []
    cpu_start = time.process_time()
    for _ in range(runs):
        start = time.perf_counter()
        jax.block_until_ready([call() for _ in range(repeat)])
        times.append((time.perf_counter() - start) / repeat)
    # CPU seconds of all threads: less sensitive than wall time to other load on the machine
    cpu_per_call = (time.process_time() - cpu_start) / (runs * repeat)
    shards = out["t1"].data.addressable_shards
    return {
        "devices": devices,
        "batch_size": batch_size,
        "first_s": first,
        "median_s": statistics.median(times),
        "runs": runs,
        "calls_per_run": repeat,
        "cpu_s_per_call": cpu_per_call,
        "output_shards": len(shards),
        "patches_per_shard": int(shards[0].data.shape[0]),
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
    }


def _child_env(devices: int) -> dict:
    flags = re.sub(rf"{DEVICE_COUNT_FLAG}=\S+", "", os.environ.get("XLA_FLAGS", "")).strip()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    env["XLA_FLAGS"] = f"{flags} {DEVICE_COUNT_FLAG}={devices}".strip()
    return env


def _spawn(config: Config, devices: int, runs: int) -> dict:
    from jmed import runtime

    command = [sys.executable, __file__, "--child", str(devices), "--config", json.dumps(asdict(config))]
    command += ["--runs", str(runs)]
    if runtime.applied_threshold() is not None:
        command += ["--tune-allocator", str(runtime.applied_threshold())]
    out = subprocess.run(command, capture_output=True, text=True, env=_child_env(devices), timeout=1800)
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"{devices} device(s): child failed: {out.stderr.strip()[-300:]}")


def run(config: Config, runs: int, device_counts=DEVICE_COUNTS) -> dict:
    """One subprocess per device count, one after the other; ``{devices: result}``.

    Each result also gets ``volumes_per_s`` (total), ``per_device_volumes_per_s`` and
    ``scaling`` (total throughput over that of the smallest device count run).
    """
    results = {n: _spawn(config, n, runs) for n in device_counts}
    base = results[min(device_counts)]
    base_rate = base["batch_size"] / base["median_s"]
    for n, r in results.items():
        r["volumes_per_s"] = r["batch_size"] / r["median_s"]
        r["per_device_volumes_per_s"] = r["volumes_per_s"] / n
        r["scaling"] = r["volumes_per_s"] / base_rate
    return results


def _name(config: Config, devices: int) -> str:
    return (
        f"augment_and_sample, {devices} emulated CPU device{'s' if devices > 1 else ''}, "
        f"{config.per_device} x {config.volume}^3 per device"
    )


def cases(quick: bool, volume=None) -> list:
    """Rows for ``benchmarks.run`` (``volume`` is not used: the volumes are phantoms)."""
    from benchmarks.common import Case, Timing

    config = QUICK if quick else FULL

    @functools.cache
    def results(runs: int) -> dict:
        try:
            return run(config, runs)
        except Exception as error:  # reported once per row, not run again for each
            return {"error": f"failed: {type(error).__name__}: {str(error)[:160]}"}

    def measure(devices: int):
        def one(runs: int) -> dict:
            all_results = results(runs)
            if "error" in all_results:
                return {"jmed": all_results["error"]}
            r = all_results[devices]
            note = (
                f"EMULATED CPU devices sharing {r['cores']} cores; {r['volumes_per_s']:.1f} volumes/s in total, "
                f"{r['per_device_volumes_per_s']:.1f} per device; throughput vs 1 device {r['scaling']:.2f}x "
                f"(ideal on real devices: {devices}x); CPU time {1e3 * r['cpu_s_per_call'] / r['batch_size']:.1f} "
                "ms per volume (all threads)"
            )
            per_volume_ms = 1e3 * r["median_s"] / r["batch_size"]
            compile_s = max(r["first_s"] - r["median_s"], 0.0)
            return {"jmed": Timing(per_volume_ms, r["runs"], 1e3 * r["first_s"], compile_s, note)}

        return one

    shared_note = (
        f"flip + affine + gamma + noise, then {config.num_patches} LabelSampler patches of {config.patch}^3 "
        "per volume, one jitted program, batch split P('data'); one subprocess per device count"
    )
    return [
        Case(
            "device pipeline",
            _name(config, n),
            measure=measure(n),
            unit="volume",
            note=shared_note if n == DEVICE_COUNTS[0] else "",
        )
        for n in DEVICE_COUNTS
    ]


def main(argv: list[str] | None = None) -> None:
    sys.path.insert(0, str(ROOT))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"small configuration ({QUICK})")
    parser.add_argument("--devices", type=int, nargs="+", default=list(DEVICE_COUNTS))
    parser.add_argument(
        "--runs", type=int, default=None, help="timed calls per device count (default 7, --quick 3)"
    )
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    parser.add_argument("--tune-allocator", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    runs = args.runs or (3 if args.quick else 7)
    if args.child:
        if args.tune_allocator:
            from jmed import runtime

            runtime.tune_host_allocator(args.tune_allocator)
        result = _child(Config(**json.loads(args.config)), args.child, runs)
        print("RESULT " + json.dumps(result), flush=True)
        return
    config = QUICK if args.quick else FULL
    from benchmarks.common import apply_allocator

    print(f"host allocator: {apply_allocator(False)}")
    results = run(config, runs, tuple(args.devices))
    print(f"\n{config}; EMULATED CPU devices (they share the host's cores), median of {runs} runs")
    header = ("devices", "ms/volume", "volumes/s", "per device", "scaling", "CPU ms/volume", "compile s")
    print(" ".join(f"{h:>13s}" for h in header))
    for n, r in results.items():
        cells = (
            f"{n}",
            f"{1e3 * r['median_s'] / r['batch_size']:.2f}",
            f"{r['volumes_per_s']:.1f}",
            f"{r['per_device_volumes_per_s']:.1f}",
            f"{r['scaling']:.2f}x",
            f"{1e3 * r['cpu_s_per_call'] / r['batch_size']:.2f}",
            f"{r['first_s'] - r['median_s']:.2f}",
        )
        print(" ".join(f"{c:>13s}" for c in cells))


if __name__ == "__main__":
    main()
