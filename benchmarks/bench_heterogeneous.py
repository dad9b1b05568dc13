"""Patch loading from a heterogeneous dataset: jmed's Queue next to TorchIO's Queue.

Every subject has its own shape, voxel spacing (0.8-1.6 mm, most of them anisotropic)
and orientation (RAS, LPS, PIR, ...), as in a dataset gathered from several scanners:
``jmed.datasets.phantom`` heads (a T1 and a 3-class label map, one seed per subject)
written as ``.nii.gz`` to a temporary folder. Both loaders get the same pipeline:

- preprocessing ``ToCanonical`` + ``Resample(1)`` (1 mm isotropic, no cropping, so every
  volume keeps its own shape);
- augmentation ``RandomFlip(axes=(0,))``, ``RandomAffine(scales=0.1, degrees=10)``,
  ``RandomElasticDeformation(num_control_points=7, max_displacement=7.5,
  locked_borders=2)``, ``RandomNoise(std=(0, 0.25))``, ``RandomGamma(log_gamma=(-0.3,
  0.3))`` (TorchIO's defaults, written out);
- ``LabelSampler`` (classes 0, 1, 2 equally likely), 8 patches per volume, a queue of 32
  patches, batches of 4, 2 worker processes.

Each loader runs in its own subprocess (see ``bench_loader.py``); the clock starts when
the first batch is asked for, before the loader is built. Reported per loader: patches/s
in the steady state (last three quarters of the batches), patches/s over the whole run
(also over its first 2 epochs, the batches that complete them), the time to the first
batch and the peak resident memory of the process and its workers.

jmed runs twice with the same, initially empty, persistent compilation cache folder:
the first run compiles, the second should load its programs from the cache. The folder
reaches the loader through ``jmed.Queue``'s ``COMPILATION_CACHE_ARGUMENT`` when it has
one, else through JAX's environment variables (``JAX_COMPILATION_CACHE_DIR``, with
``JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0`` so that small programs are kept), which
the spawned workers inherit. Programs built in each process are counted with
``jax.monitoring`` (one ``/jax/core/compile/backend_compile_duration`` event per program
handed to XLA, persistent-cache hits included; ``/jax/compilation_cache/cache_hits`` for
those loaded from the cache): the child installs the listeners in the loader's workers
through grain's ``worker_init_fn``. ``JAX_LOG_COMPILES=1`` is set as well, and the
"Finished XLA compilation" lines of the child's stderr cross-check the total.

    python benchmarks/bench_heterogeneous.py [--quick] [--subjects 12] [--epochs 4]
        [--seed 0] [--compilation-cache DIR] [--system-allocator]
"""

from __future__ import annotations

import argparse
import functools
import inspect
import json
import os
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
PROBABILITIES = {0: 1, 1: 1, 2: 1}
SAMPLES_PER_VOLUME = 8
MAX_LENGTH = 32
BATCH_SIZE = 4
NUM_WORKERS = 2
SPACING_RANGE = (0.8, 1.6)
# orientation codes of the data axes, one per subject (cycled beyond 16 subjects)
ORIENTATIONS = (
    "RAS", "LPS", "LAS", "PIR", "ASL", "SRA", "IPL", "RSP",
    "LIA", "PLS", "ARI", "SLP", "RPI", "AIL", "SPR", "LSA",
)  # fmt: skip
# name of jmed.Queue's persistent compilation cache argument; when the Queue has no such
# argument, the folder is given through JAX's environment variables below instead
COMPILATION_CACHE_ARGUMENT = "compilation_cache_dir"
COMPILATION_CACHE_ENV = {
    "JAX_COMPILATION_CACHE_DIR": "{folder}",
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1",
}
BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"
LOGGED_COMPILATION = "Finished XLA compilation"


@dataclass(frozen=True)
class Config:
    """A run: subjects, epochs, the ranges of their shapes (voxels) and fields of view (mm).

    Whole-run rates are also given over the first ``prefix_epochs`` epochs when the run is
    longer.
    """

    subjects: int
    epochs: int
    shape_range: tuple[int, int]
    fov_range: tuple[float, float]
    patch: int
    prefix_epochs: int = 2


FULL = Config(subjects=12, epochs=4, shape_range=(150, 200), fov_range=(150.0, 250.0), patch=64)
QUICK = Config(subjects=3, epochs=1, shape_range=(48, 64), fov_range=(48.0, 80.0), patch=32)


def subject_specs(
    num_subjects: int,
    shape_range: tuple[int, int],
    fov_range: tuple[float, float],
    seed: int = 0,
) -> list[dict]:
    """Shape, spacing and orientation of each subject, deterministic from ``seed``.

    Spacings are drawn per axis in ``SPACING_RANGE`` (every fourth subject isotropic),
    shapes per axis in ``shape_range`` such that the field of view (shape x spacing) stays
    in ``fov_range``; shapes and spacings are all distinct, orientations cycle through
    ``ORIENTATIONS``.
    """
    rng = np.random.default_rng(seed)
    specs, shapes, spacings = [], set(), set()
    while len(specs) < num_subjects:
        i = len(specs)
        draw = rng.uniform(*SPACING_RANGE, 1 if i % 4 == 0 else 3)
        spacing = tuple(float(s) for s in np.round(np.broadcast_to(draw, 3), 2))
        low = np.maximum(shape_range[0], np.ceil(fov_range[0] / np.array(spacing)))
        high = np.minimum(shape_range[1], np.floor(fov_range[1] / np.array(spacing)))
        if np.any(low > high):
            raise ValueError(
                f"no shape in shape_range={shape_range} gives a field of view in fov_range={fov_range} "
                f"at spacing {spacing}"
            )
        shape = tuple(int(n) for n in rng.integers(low, high + 1))
        if shape in shapes or spacing in spacings:
            continue
        shapes.add(shape)
        spacings.add(spacing)
        specs.append({"shape": shape, "spacing": spacing, "orientation": ORIENTATIONS[i % len(ORIENTATIONS)]})
    return specs


def write_subjects(folder: Path, config: Config, seed: int = 0) -> list[dict]:
    """Write ``config.subjects`` phantoms (``t1_i.nii.gz``, ``seg_i.nii.gz``); their records."""
    import nibabel as nib

    from jmed.datasets import phantom

    folder.mkdir(parents=True, exist_ok=True)
    records = []
    for i, spec in enumerate(subject_specs(config.subjects, config.shape_range, config.fov_range, seed)):
        subject = phantom(seed + i, num_classes=3, **spec)
        record = {}
        for name, dtype in (("t1", np.float32), ("seg", np.uint8)):
            image = subject[name]
            path = folder / f"{name}_{i}.nii.gz"
            data = np.asarray(image.data)[..., 0].astype(dtype)
            nib.save(nib.Nifti1Image(data, np.asarray(image.affine, np.float64)), str(path))
            record[name] = str(path)
        records.append(record)
    return records


def _torchio_augmentation(tio) -> list:
    return [
        tio.RandomFlip(axes=(0,), flip_probability=0.5),
        tio.RandomAffine(scales=0.1, degrees=10),
        tio.RandomElasticDeformation(num_control_points=7, max_displacement=7.5, locked_borders=2),
        tio.RandomNoise(mean=0, std=(0, 0.25)),
        tio.RandomGamma(log_gamma=(-0.3, 0.3)),
    ]


def _jmed_augmentation(T) -> list:
    return [
        T.RandomFlip(axes=(0,), flip_probability=0.5),
        T.RandomAffine(scales=0.1, degrees=10),
        T.RandomElasticDeformation(num_control_points=7, max_displacement=7.5, locked_borders=2),
        T.RandomNoise(mean=0.0, std=(0.0, 0.25)),
        T.RandomGamma(log_gamma=(-0.3, 0.3)),
    ]


# --- counting compilations ------------------------------------------------------------


def _record_compilations(folder: str, role: str) -> None:
    """Append a line to ``folder/role.pid.log`` for every program this process hands to XLA."""
    import jax.monitoring

    path = os.path.join(folder, f"{role}.{os.getpid()}.log")

    def write(line: str) -> None:
        with open(path, "a") as f:
            f.write(line + "\n")

    def on_duration(event: str, duration: float, **kwargs) -> None:
        if event == BACKEND_COMPILE_EVENT:
            write(f"compile {duration:.6f}")

    def on_event(event: str, **kwargs) -> None:
        if event == CACHE_HIT_EVENT:
            write("cache_hit")

    jax.monitoring.register_event_duration_secs_listener(on_duration)
    jax.monitoring.register_event_listener(on_event)


class _WorkerInit:
    """grain ``worker_init_fn``: the loader's own one (if any), then the compilation listeners."""

    def __init__(self, folder: str, chained=None):
        self.folder = folder
        self.chained = chained

    def __call__(self, worker_index: int, worker_count: int) -> None:
        if self.chained is not None:
            self.chained(worker_index, worker_count)
        _record_compilations(self.folder, f"worker{worker_index}")


def _count_compilations_in_workers(folder: str) -> None:
    """Give every ``mp_prefetch`` of this process a ``worker_init_fn`` recording compilations."""
    import grain

    from benchmarks import bench_heterogeneous  # by its importable name: workers unpickle it

    original = grain.IterDataset.mp_prefetch

    def mp_prefetch(self, options=None, worker_init_fn=None, *args, **kwargs):
        init = bench_heterogeneous._WorkerInit(folder, worker_init_fn)
        return original(self, options, init, *args, **kwargs)

    grain.IterDataset.mp_prefetch = mp_prefetch


def read_compilations(folder: Path) -> dict:
    """Per process role (``main``, ``worker0``, ...): programs built, seconds, cache hits."""
    out = {}
    for path in sorted(Path(folder).glob("*.log")):
        role, pid, _ = path.name.split(".")
        lines = path.read_text().split("\n")
        durations = [float(line.split()[1]) for line in lines if line.startswith("compile ")]
        out[role] = {
            "pid": int(pid),
            "compilations": len(durations),
            "compile_s": sum(durations),
            "cache_hits": sum(line == "cache_hit" for line in lines),
        }
    return out


# --- the loaders (in the child process) -------------------------------------------------


def _run_torchio(records: list[dict], patch: int, epochs: int) -> dict:
    import torch
    import torchio as tio

    from benchmarks.bench_loader import _measure

    torch.set_num_threads(1)

    def batches():
        subjects = [tio.Subject(t1=tio.ScalarImage(r["t1"]), seg=tio.LabelMap(r["seg"])) for r in records]
        transform = tio.Compose([tio.ToCanonical(), tio.Resample(1), *_torchio_augmentation(tio)])
        dataset = tio.SubjectsDataset(subjects, transform=transform)
        sampler = tio.LabelSampler(patch, "seg", PROBABILITIES)
        queue = tio.Queue(dataset, MAX_LENGTH, SAMPLES_PER_VOLUME, sampler, num_workers=NUM_WORKERS)
        loader = tio.SubjectsLoader(queue, batch_size=BATCH_SIZE, num_workers=0)
        for _ in range(epochs):
            for batch in loader:
                yield batch["t1"][tio.DATA].shape[0]

    return _measure(batches())


def _run_jmed(
    records: list[dict], patch: int, epochs: int, compile_log: str | None, compilation_cache: str | None
) -> dict:
    import jmed
    import jmed.transforms as T
    from benchmarks.bench_loader import _measure

    options = {COMPILATION_CACHE_ARGUMENT: compilation_cache} if compilation_cache else {}
    if compile_log:
        _record_compilations(compile_log, "main")
        _count_compilations_in_workers(compile_log)

    def batches():
        queue = jmed.Queue(
            records,
            jmed.LabelSampler(patch, "seg", PROBABILITIES),
            SAMPLES_PER_VOLUME,
            MAX_LENGTH,
            batch_size=BATCH_SIZE,
            num_workers=NUM_WORKERS,
            seed=0,
            preprocessing=T.Compose([T.ToCanonical(), T.Resample(1)]),
            augmentation=T.Compose(_jmed_augmentation(T)),
            label_names="seg",
            num_epochs=epochs,
            **options,
        )
        with iter(queue) as it:
            for batch in it:
                yield batch["t1"].data.shape[0]

    return _measure(batches())


def _child(args) -> None:
    if args.tune_allocator:
        from jmed import runtime

        runtime.tune_host_allocator(args.tune_allocator)
    records = json.loads(Path(args.records).read_text())
    if args.child == "torchio":
        result = _run_torchio(records, args.patch, args.epochs)
    else:
        result = _run_jmed(records, args.patch, args.epochs, args.compile_log, args.compilation_cache)
    print("RESULT " + json.dumps(result), flush=True)


def _queue_takes_cache_folder() -> bool:
    import jmed

    return COMPILATION_CACHE_ARGUMENT in inspect.signature(jmed.Queue).parameters


def _spawn(
    kind: str,
    records_file: Path,
    patch: int,
    epochs: int,
    compile_log: Path | None = None,
    compilation_cache: Path | None = None,
) -> dict | None:
    """Run one loader in a subprocess with this process's allocator setting."""
    from benchmarks.common import run_child
    from jmed import runtime

    command = [sys.executable, __file__, "--child", kind, "--records", str(records_file)]
    command += ["--patch", str(patch), "--epochs", str(epochs)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if compile_log is not None:
        compile_log.mkdir(parents=True, exist_ok=True)
        command += ["--compile-log", str(compile_log)]
        env["JAX_LOG_COMPILES"] = "1"
    if compilation_cache is not None:
        if _queue_takes_cache_folder():
            command += ["--compilation-cache", str(compilation_cache)]
        else:
            # the child and its spawned workers read these when they import jax
            env.update({k: v.format(folder=compilation_cache) for k, v in COMPILATION_CACHE_ENV.items()})
    if runtime.applied_threshold() is not None:
        command += ["--tune-allocator", str(runtime.applied_threshold())]
    result, out = run_child(command, what=kind, env=env, timeout=3600)
    if result is not None:
        if compilation_cache is not None:
            result["compilation_cache_by"] = (
                f"Queue({COMPILATION_CACHE_ARGUMENT}=)" if _queue_takes_cache_folder() else "environment"
            )
        if compile_log is not None:
            result["compilations"] = read_compilations(compile_log)
            result["logged_compilations"] = out.stderr.count(LOGGED_COMPILATION)
        return result
    return None


def run(config: Config, seed: int = 0, compilation_cache: Path | None = None) -> dict:
    """Write the subjects, run TorchIO's loader once and jmed's twice; the children's results.

    ``compilation_cache``: the persistent compilation cache folder of both jmed runs
    (default: a fresh temporary one). The second jmed run lasts one epoch: it is there
    for its start-up.
    """
    from benchmarks.bench_loader import rates

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        records = write_subjects(folder / "data", config, seed)
        records_file = folder / "records.json"
        records_file.write_text(json.dumps(records))
        cache = compilation_cache or folder / "compilation-cache"
        cache.mkdir(parents=True, exist_ok=True)
        results = {
            "torchio": _spawn("torchio", records_file, config.patch, config.epochs),
            "jmed": _spawn("jmed", records_file, config.patch, config.epochs, folder / "compiles-1", cache),
        }
        results["cache_files"] = sum(1 for p in cache.rglob("*") if p.is_file())
        results["jmed_second"] = _spawn("jmed", records_file, config.patch, 1, folder / "compiles-2", cache)
    prefix = config.subjects * SAMPLES_PER_VOLUME * config.prefix_epochs
    for library in ("torchio", "jmed"):
        result = results[library]
        if result is not None and config.epochs > config.prefix_epochs:
            result["prefix"] = rates(result["arrivals_s"], result["sizes"], prefix)
    return results


# --- tables -----------------------------------------------------------------------------


def _epochs(n: int) -> str:
    return f"{n} epoch{'s' if n > 1 else ''}"


def _workers(result: dict) -> list[dict]:
    compilations = result.get("compilations", {})
    return [compilations[k] for k in sorted(compilations) if k.startswith("worker")]


def compilation_note(result: dict) -> str:
    """Programs built per worker (and in the main process), with a log cross-check.

    Programs loaded from the persistent compilation cache count as built (XLA is asked
    for them) and are also given apart.
    """
    workers = _workers(result)
    main = result.get("compilations", {}).get("main", {}).get("compilations", 0)
    counts = ", ".join(str(w["compilations"]) for w in workers) or "none recorded"
    note = f"compilations per worker: {counts}"
    if workers:
        note += f" (persistent-cache hits {', '.join(str(w['cache_hits']) for w in workers)})"
    if main:
        note += f"; main process: {main}"
    total = main + sum(w["compilations"] for w in workers)
    if result.get("logged_compilations") is not None and result["logged_compilations"] != total:
        note += f"; JAX_LOG_COMPILES counted {result['logged_compilations']}"
    return note


def cases(quick: bool, volume=None) -> list:
    """Heterogeneous-dataset Queue rows for ``benchmarks.run`` (``volume`` is not used).

    One run per loader (jmed: two, sharing a persistent compilation cache) feeds every
    row: ms per patch in the steady state, over the first epochs and the whole run
    (start-up included), and the time to the first batch of the first and second runs.
    """
    from benchmarks.common import Case, Timing

    config = QUICK if quick else FULL

    @functools.cache
    def results() -> dict:
        try:
            return run(config)
        except Exception as error:  # reported once per row, not run again for each
            return {"error": f"failed: {type(error).__name__}: {str(error)[:120]}"}

    def rows(pick) -> dict:
        if "error" in results():
            return {"jmed": results()["error"]}
        out = {}
        for library in ("jmed", "torchio"):
            result = results()[library]
            if result is None:
                out[library] = "failed"
                continue
            out[library] = pick(library, result)
        return out

    def steady(runs: int) -> dict:
        return rows(
            lambda library, r: Timing(
                1e3 / max(r["patches_per_s"], 1e-9),
                1,
                None,
                None,
                f"{r['patches_per_s']:.1f} patches/s; peak {r['peak_bytes'] / 2**20:.0f} MiB",
            )
        )

    def whole(prefix: bool):
        def measure(runs: int) -> dict:
            def pick(library, r):
                part = r["prefix"] if prefix else r
                note = f"{part['overall_patches_per_s']:.1f} patches/s ({part['patches']} patches)"
                return Timing(1e3 / max(part["overall_patches_per_s"], 1e-9), 1, None, None, note)

            return rows(pick)

        return measure

    def first_batch(second: bool):
        def measure(runs: int) -> dict:
            def pick(library, r):
                if library == "torchio":
                    note = "nothing compiled: the same run serves both rows" if second else ""
                    return Timing(1e3 * r["first_batch_s"], 1, None, None, note)
                if second:
                    r = results()["jmed_second"]
                    if r is None:
                        return "failed"
                workers = _workers(r)
                note = compilation_note(r)
                if not second:
                    note += f"; {results()['cache_files']} files in the compilation cache afterwards"
                if r.get("compilation_cache_by"):
                    note += f"; cache given by {r['compilation_cache_by']}"
                compile_s = max((w["compile_s"] for w in workers), default=None)
                return Timing(1e3 * r["first_batch_s"], 1, None, compile_s, note)

            return rows(pick)

        return measure

    name = f"Queue, {config.subjects} mixed subjects"
    note = (
        "shapes, spacings (0.8-1.6 mm) and orientations all differ; ToCanonical + Resample(1); "
        "flip, affine, elastic, noise, gamma; "
        f"{config.patch}^3 label-balanced patches, {SAMPLES_PER_VOLUME}/volume, queue {MAX_LENGTH}, "
        f"batch {BATCH_SIZE}, {NUM_WORKERS} workers, one subprocess per loader"
    )
    out = [
        Case(
            "loading",
            f"{name} x {_epochs(config.epochs)} (steady)",
            measure=steady,
            unit="patch (steady: last 3/4 of the batches)",
            note=note
            + ("; quick: too short for a steady state (the rate is a filled queue drained)" if quick else ""),
        ),
    ]
    if config.epochs > config.prefix_epochs:
        out.append(
            Case(
                "loading",
                f"{name}, first {config.prefix_epochs} of {config.epochs} epochs (whole run)",
                measure=whole(prefix=True),
                unit="patch (whole run: start-up included)",
                note=f"rate up to the batch completing {config.prefix_epochs} epochs",
            )
        )
    out += [
        Case(
            "loading",
            f"{name} x {_epochs(config.epochs)} (whole run)",
            measure=whole(prefix=False),
            unit="patch (whole run: start-up included)",
        ),
        Case(
            "loading",
            f"{name}: time to the first batch",
            measure=first_batch(second=False),
            unit="first batch",
            note="from an empty persistent compilation cache; compile s: most compile seconds of a worker",
        ),
        Case(
            "loading",
            f"{name}: time to the first batch, second run",
            measure=first_batch(second=True),
            unit="first batch",
            note="jmed reruns with the compilation cache of the first run",
        ),
    ]
    return out


def main(argv: list[str] | None = None) -> None:
    sys.path.insert(0, str(ROOT))
    from benchmarks.common import add_allocator_option, apply_allocator

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"small configuration ({QUICK})")
    parser.add_argument("--subjects", type=int, help="number of subjects (default 12, --quick 3)")
    parser.add_argument("--epochs", type=int, help="epochs of the first runs (default 4, --quick 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--compilation-cache", type=Path, help="persistent compilation cache folder (default: a fresh one)"
    )
    parser.add_argument("--json", type=Path, help="also write the children's results to this file")
    add_allocator_option(parser)
    parser.add_argument("--tune-allocator", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--child", choices=["torchio", "jmed"], help=argparse.SUPPRESS)
    parser.add_argument("--records", help=argparse.SUPPRESS)
    parser.add_argument("--patch", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--compile-log", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child(args)
        return
    config = QUICK if args.quick else FULL
    config = replace(config, subjects=args.subjects or config.subjects, epochs=args.epochs or config.epochs)
    print(f"host allocator: {apply_allocator(args.system_allocator)}")
    for i, spec in enumerate(subject_specs(config.subjects, config.shape_range, config.fov_range, args.seed)):
        print(f"subject {i}: shape {spec['shape']}, spacing {spec['spacing']} mm, {spec['orientation']}")
    results = run(config, args.seed, args.compilation_cache)
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=1))
    print(
        f"\n{config.subjects} subjects x {config.epochs} epochs, {SAMPLES_PER_VOLUME} patches of {config.patch}^3 "
        f"per volume, max_length {MAX_LENGTH}, batch {BATCH_SIZE}, {NUM_WORKERS} workers"
    )
    print(
        f"{'loader':22s} {'steady/s':>9s} {'whole/s':>8s} {'first ' + str(config.prefix_epochs) + ' ep/s':>11s} "
        f"{'1st batch s':>12s} {'peak MiB':>9s}  compilations"
    )
    for name, key in (
        ("TorchIO Queue", "torchio"),
        ("jmed Queue", "jmed"),
        ("jmed Queue, 2nd run", "jmed_second"),
    ):
        r = results[key]
        if r is None:
            print(f"{name:22s} failed")
            continue
        prefix = f"{r['prefix']['overall_patches_per_s']:11.1f}" if "prefix" in r else f"{'-':>11s}"
        print(
            f"{name:22s} {r['patches_per_s']:9.1f} {r['overall_patches_per_s']:8.1f} {prefix} "
            f"{r['first_batch_s']:12.1f} {r['peak_bytes'] / 2**20:9.0f}  "
            + (compilation_note(r) if key != "torchio" else "")
        )
    print(f"files in the compilation cache after the first jmed run: {results['cache_files']}")


if __name__ == "__main__":
    main()
