"""Patch loading: jmed's grain Queue next to TorchIO's Queue, and the label sampler alone.

Same volumes and settings for both loaders: subjects written as ``.nii.gz`` (T1 plus a
3-class label map), ``LabelSampler`` with 64^3 patches, 16 patches per volume, a queue of
64 patches, batches of 4, 2 worker processes. Each loader runs in its own subprocess
(so peak memory is its own) with the allocator setting of the benchmark process
(``jmed.tune_host_allocator()`` unless ``--system-allocator``; TorchIO's forked workers
inherit it). The table reports patches per second in the steady state (over the last
three quarters of the batches), patches per second over the whole run with the time to
the first batch (worker start-up and compilation), and the peak resident memory summed
over the process and its workers. Rates end at the last batch's arrival. Runs are long
enough (default 6 subjects x 8 epochs) for the steady rate not to be a queue being
drained.

The sampler benchmark draws 16 label-balanced 64^3 patches from a 197x233x189 volume:
jitted jmed (compile time separate) next to TorchIO's ``LabelSampler`` and MONAI's
``RandCropByLabelClasses`` (median of repeats after a warm-up).

    python benchmarks/bench_loader.py [--data DIR] [--subjects 6] [--epochs 8] [--repeats 7]
        [--system-allocator]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
PATCH = 64
SAMPLES_PER_VOLUME = 16
MAX_LENGTH = 64
BATCH_SIZE = 4
NUM_WORKERS = 2
PROBABILITIES = {0: 1, 1: 1, 2: 1}


def _volumes(data_dir: Path | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """T1, label map (0 background, 1 white matter, 2 grey matter) and affine."""
    import nibabel as nib

    if data_dir is not None and (data_dir / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz").exists():
        t1_img = nib.load(str(data_dir / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"))
        t1 = t1_img.get_fdata(dtype=np.float32)
        wm = nib.load(str(data_dir / "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz")).get_fdata()
        gm = nib.load(str(data_dir / "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz")).get_fdata()
        seg = np.zeros(t1.shape, np.uint8)
        seg[wm > 0.5] = 1
        seg[gm > 0.5] = 2
        return t1, seg, t1_img.affine
    shape = (197, 233, 189)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"), -1)
    radius = np.sqrt((grid**2).sum(-1))
    seg = np.zeros(shape, np.uint8)
    seg[radius < 0.8] = 2
    seg[radius < 0.5] = 1
    t1 = (seg * 40.0 + np.random.default_rng(0).normal(0, 5, shape)).astype(np.float32)
    return t1, seg, np.diag([1.0, 1.0, 1.0, 1.0])


def _write_subjects(folder: Path, data_dir: Path | None, num_subjects: int) -> list[dict]:
    import nibabel as nib

    t1, seg, affine = _volumes(data_dir)
    records = []
    for i in range(num_subjects):
        t1_path, seg_path = folder / f"t1_{i}.nii.gz", folder / f"seg_{i}.nii.gz"
        nib.save(nib.Nifti1Image(t1 * (1 + 0.01 * i), affine), str(t1_path))
        nib.save(nib.Nifti1Image(seg, affine), str(seg_path))
        records.append({"t1": str(t1_path), "seg": str(seg_path)})
    return records


class _PeakMemory:
    """Peak resident memory summed over this process and its children (psutil if present)."""

    def __init__(self):
        self.peak = 0
        self._stop = threading.Event()
        try:
            import psutil

            self._process = psutil.Process()
        except ImportError:
            self._process = None
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self):
        while not self._stop.is_set():
            total = 0
            for p in [self._process, *self._process.children(recursive=True)]:
                try:
                    total += p.memory_info().rss
                except Exception:
                    pass
            self.peak = max(self.peak, total)
            time.sleep(0.05)

    def __enter__(self):
        if self._process is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._process is None:
            import resource

            self.peak = 1024 * (
                resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                + resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
            )
        else:
            self._thread.join()


def _time_batches(batches) -> tuple[list[float], list[int]]:
    """Arrival time of each batch (seconds from the start) and its number of patches.

    The clock starts when the first batch is asked for, so whatever the iterator does
    before delivering it (building the loader, starting workers, compiling) counts.
    """
    start = time.perf_counter()
    arrivals, sizes = [], []
    for n in batches:
        arrivals.append(time.perf_counter() - start)
        sizes.append(n)
    return arrivals, sizes


def rates(arrivals: list[float], sizes: list[int], patches: int | None = None) -> dict:
    """Time to the first batch, steady and whole-run patches/s of a run's batch arrivals.

    The steady rate is taken over the last three quarters of the batches, so that neither
    start-up nor the elements workers prepared meanwhile count. Rates end at the arrival
    of the last batch: stopping the workers afterwards is not delivery (work a loader
    does between epochs, such as TorchIO restarting its workers, is counted).
    ``patches``: the whole-run rate up to the batch that completes this many patches
    (a prefix of the run, e.g. its first epochs) instead of the whole run.
    """
    q = len(arrivals) // 4
    steady = sum(sizes[q + 1 :]) / max(arrivals[-1] - arrivals[q], 1e-9)
    last = len(sizes) - 1
    if patches is not None:
        last = min(int(np.searchsorted(np.cumsum(sizes), patches)), last)
    return {
        "first_batch_s": arrivals[0],
        "patches_per_s": steady,
        "overall_patches_per_s": sum(sizes[: last + 1]) / max(arrivals[last], 1e-9),
        "patches": sum(sizes[: last + 1]),
    }


def _run_torchio(records: list[dict], epochs: int) -> dict:
    import torch
    import torchio as tio

    torch.set_num_threads(1)
    subjects = [tio.Subject(t1=tio.ScalarImage(r["t1"]), seg=tio.LabelMap(r["seg"])) for r in records]
    dataset = tio.SubjectsDataset(subjects)
    sampler = tio.LabelSampler(PATCH, "seg", PROBABILITIES)
    queue = tio.Queue(dataset, MAX_LENGTH, SAMPLES_PER_VOLUME, sampler, num_workers=NUM_WORKERS)
    loader = tio.SubjectsLoader(queue, batch_size=BATCH_SIZE, num_workers=0)

    def batches():
        for _ in range(epochs):
            for batch in loader:
                yield batch["t1"][tio.DATA].shape[0]

    return _measure(batches())


def _run_jmed(records: list[dict], epochs: int, cache_dir: str | None) -> dict:
    sys.path.insert(0, str(ROOT))
    import jmed

    queue = jmed.Queue(
        records,
        jmed.LabelSampler(PATCH, "seg", PROBABILITIES),
        samples_per_volume=SAMPLES_PER_VOLUME,
        max_length=MAX_LENGTH,
        batch_size=BATCH_SIZE,
        num_workers=NUM_WORKERS,
        seed=0,
        label_names="seg",
        num_epochs=epochs,
        cache_dir=cache_dir,
    )

    def batches():
        with iter(queue) as it:
            for batch in it:
                yield batch["t1"].data.shape[0]

    return {**_measure(batches()), "estimate_bytes": queue.get_max_memory()}


def _measure(batches) -> dict:
    """Time ``batches`` (an iterator of batch sizes) and record the peak memory meanwhile."""
    with _PeakMemory() as memory:
        arrivals, sizes = _time_batches(batches)
    return {**rates(arrivals, sizes), "peak_bytes": memory.peak, "arrivals_s": arrivals, "sizes": sizes}


def _median_times(fn, repeats: int) -> tuple[float, float]:
    """Median wall and CPU (process) seconds of ``fn()`` over ``repeats`` calls."""
    wall, cpu = [], []
    for _ in range(repeats):
        w, c = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - w)
        cpu.append(time.process_time() - c)
    return float(np.median(wall)), float(np.median(cpu))


def _sampler_times(data_dir: Path | None, repeats: int) -> list[tuple[str, float, float, float | None]]:
    sys.path.insert(0, str(ROOT))
    import jax

    import jmed

    t1, seg, affine = _volumes(data_dir)
    subject = jmed.Subject(t1=jmed.ScalarImage(t1, affine), seg=jmed.LabelMap(seg, affine))
    subject = jax.device_put(subject)
    sampler = jax.jit(jmed.LabelSampler(PATCH, "seg", PROBABILITIES), static_argnums=2)
    start = time.perf_counter()
    jax.block_until_ready(sampler(jax.random.key(0), subject, SAMPLES_PER_VOLUME))
    compile_s = time.perf_counter() - start
    keys = iter(jax.random.split(jax.random.key(1), repeats))
    rows = [
        (
            "jmed LabelSampler (jit)",
            *_median_times(
                lambda: jax.block_until_ready(sampler(next(keys), subject, SAMPLES_PER_VOLUME)), repeats
            ),
            compile_s,
        )
    ]
    try:
        import torch
        import torchio as tio

        torch.set_num_threads(2)
        tio_subject = tio.Subject(
            t1=tio.ScalarImage(tensor=t1[None], affine=affine),
            seg=tio.LabelMap(tensor=seg[None], affine=affine),
        )
        tio_sampler = tio.LabelSampler(PATCH, "seg", PROBABILITIES)
        list(tio_sampler(tio_subject, num_patches=SAMPLES_PER_VOLUME))
        times = _median_times(lambda: list(tio_sampler(tio_subject, num_patches=SAMPLES_PER_VOLUME)), repeats)
        rows.append(("TorchIO LabelSampler", *times, None))
    except ImportError:
        pass
    try:
        from monai.transforms import RandCropByLabelClassesd

        crop = RandCropByLabelClassesd(
            keys=["t1", "seg"],
            label_key="seg",
            spatial_size=(PATCH,) * 3,
            ratios=[1, 1, 1],
            num_classes=3,
            num_samples=SAMPLES_PER_VOLUME,
        )
        crop.set_random_state(0)
        data = {"t1": t1[None], "seg": seg[None]}
        crop(data)
        rows.append(("MONAI RandCropByLabelClassesd", *_median_times(lambda: crop(data), repeats), None))
    except ImportError:
        pass
    return rows


def _child(args) -> None:
    if args.tune_allocator:
        from jmed import runtime  # importable: _spawn puts the repository on PYTHONPATH

        runtime.tune_host_allocator(args.tune_allocator)
    records = json.loads(Path(args.records).read_text())
    if args.child == "torchio":
        result = _run_torchio(records, args.epochs)
    else:
        result = _run_jmed(records, args.epochs, args.cache_dir)
    print("RESULT " + json.dumps(result), flush=True)


def _spawn(kind: str, records_file: Path, epochs: int, cache_dir: str | None = None) -> dict | None:
    """Run one loader in a subprocess with this process's allocator setting."""
    from benchmarks.common import run_child
    from jmed import runtime

    command = [
        sys.executable,
        __file__,
        "--child",
        kind,
        "--records",
        str(records_file),
        "--epochs",
        str(epochs),
    ]
    if cache_dir:
        command += ["--cache-dir", cache_dir]
    if runtime.applied_threshold() is not None:
        command += ["--tune-allocator", str(runtime.applied_threshold())]
    return run_child(command, what=kind)[0]


def main(argv: list[str] | None = None) -> None:
    candidates = [
        ROOT.parent / "shared" / "data" / "mni152",
        ROOT.parent.parent / "shared" / "data" / "mni152",
    ]
    default_data = next((c for c in candidates if c.exists()), candidates[0])
    sys.path.insert(0, str(ROOT))
    from benchmarks.common import add_allocator_option, apply_allocator

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=default_data if default_data.exists() else None)
    parser.add_argument("--subjects", type=int, default=6)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--skip-loaders", action="store_true")
    add_allocator_option(parser)
    parser.add_argument("--tune-allocator", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--child", choices=["torchio", "jmed"], help=argparse.SUPPRESS)
    parser.add_argument("--records", help=argparse.SUPPRESS)
    parser.add_argument("--cache-dir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child(args)
        return
    print(f"host allocator: {apply_allocator(args.system_allocator)}")
    print(f"data: {args.data or 'synthetic 197x233x189'}; cpu cores: {os.cpu_count()}")
    print(f"\n16 label-balanced {PATCH}^3 patches from one volume (median of {args.repeats}):")
    rows = _sampler_times(args.data, args.repeats)
    jmed_wall, jmed_cpu = rows[0][1], rows[0][2]
    print(
        f"{'method':32s} {'wall ms':>8s} {'cpu ms':>8s} {'compile s':>10s} {'wall vs jmed':>13s} {'cpu vs jmed':>12s}"
    )
    for name, wall, cpu, compile_s in rows:
        compile_text = f"{compile_s:10.2f}" if compile_s is not None else f"{'':10s}"
        print(
            f"{name:32s} {1000 * wall:8.1f} {1000 * cpu:8.1f} {compile_text} "
            f"{wall / jmed_wall:12.1f}x {cpu / jmed_cpu:11.1f}x"
        )
    if args.skip_loaders:
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        records = _write_subjects(folder, args.data, args.subjects)
        records_file = folder / "records.json"
        records_file.write_text(json.dumps(records))
        runs = [("TorchIO Queue", _spawn("torchio", records_file, args.epochs))]
        runs.append(("jmed Queue", _spawn("jmed", records_file, args.epochs)))
        cache = str(folder / "cache")
        _spawn("jmed", records_file, 1, cache)  # fill the decode-once cache
        runs.append(("jmed Queue + warm cache", _spawn("jmed", records_file, args.epochs, cache)))
    print(
        f"\nQueue: {args.subjects} subjects x {args.epochs} epochs, {SAMPLES_PER_VOLUME} patches of {PATCH}^3 "
        f"per volume, label sampler, max_length {MAX_LENGTH}, batch {BATCH_SIZE}, {NUM_WORKERS} workers"
    )
    print(
        "patches/s in the steady state (last 3/4 of the batches), and over the whole run including start-up"
    )
    print(
        f"{'loader':26s} {'steady/s':>9s} {'vs TorchIO':>11s} {'overall/s':>10s} {'vs TorchIO':>11s} "
        f"{'1st batch s':>12s} {'peak MiB':>9s}"
    )
    reference = runs[0][1]
    for name, result in runs:
        if result is None:
            print(f"{name:26s} failed")
            continue
        ratios = []
        for key in ("patches_per_s", "overall_patches_per_s"):
            ratios.append(f"{result[key] / reference[key]:10.2f}x" if reference else f"{'':11s}")
        print(
            f"{name:26s} {result['patches_per_s']:9.1f} {ratios[0]} {result['overall_patches_per_s']:10.1f} "
            f"{ratios[1]} {result['first_batch_s']:12.1f} {result['peak_bytes'] / 2**20:9.0f}"
        )
        if "estimate_bytes" in result:
            print(f"{'':26s} (queue's own memory estimate: {result['estimate_bytes'] / 2**20:.0f} MiB)")


def cases(quick: bool, volume) -> list:
    """Patch sampling and Queue throughput rows for ``benchmarks.run``.

    Queue: ``--quick`` uses 2 subjects x 1 epoch and no cache run (full: 6 x 8, plus a warm
    decode cache in the note). Two rows share one run per loader: ms per patch in the
    steady state (last three quarters of the batches) and over the whole run, start-up
    included (the note gives the time to the first batch). In the quick run the steady rate
    mostly measures draining a filled queue.
    """
    from benchmarks.common import Case, Timing

    patch = volume.scaled(PATCH)

    def sampler():
        import jax

        import jmed

        subject = volume.subject()
        jit_sampler = jax.jit(jmed.LabelSampler(patch, "seg", PROBABILITIES), static_argnums=2)
        out = {"jmed": lambda i: jit_sampler(jax.random.key(i), subject, SAMPLES_PER_VOLUME)}
        try:
            import torchio as tio

            tio_subject = volume.torchio_subject()
            tio_sampler = tio.LabelSampler(patch, "seg", PROBABILITIES)
            out["torchio"] = lambda i: list(tio_sampler(tio_subject, num_patches=SAMPLES_PER_VOLUME))
        except ImportError:
            pass
        try:
            from monai.transforms import RandCropByLabelClassesd

            crop = RandCropByLabelClassesd(
                keys=["t1", "seg"],
                label_key="seg",
                spatial_size=patch,
                ratios=[1, 1, 1],
                num_classes=3,
                num_samples=SAMPLES_PER_VOLUME,
            )
            crop.set_random_state(0)
            data = {"t1": volume.t1[None], "seg": volume.seg[None]}
            out["monai"] = lambda i: crop(data)
        except ImportError:
            pass
        return out

    subjects, epochs = (2, 1) if quick else (6, 8)

    @functools.cache
    def spawned() -> dict:
        """One subprocess run per loader, shared by the steady and the whole-run rows."""
        if min(volume.shape) < PATCH:
            return {"jmed": "skipped (volume smaller than the patch)"}
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            import nibabel as nib

            records = []
            for i in range(subjects):
                t1_path, seg_path = folder / f"t1_{i}.nii.gz", folder / f"seg_{i}.nii.gz"
                nib.save(nib.Nifti1Image(volume.t1 * (1 + 0.01 * i), volume.affine), str(t1_path))
                nib.save(nib.Nifti1Image(volume.seg, volume.affine), str(seg_path))
                records.append({"t1": str(t1_path), "seg": str(seg_path)})
            records_file = folder / "records.json"
            records_file.write_text(json.dumps(records))
            runs = {
                "torchio": _spawn("torchio", records_file, epochs),
                "jmed": _spawn("jmed", records_file, epochs),
            }
            if not quick and runs["jmed"] is not None:
                cache = str(folder / "cache")
                _spawn("jmed", records_file, 1, cache)
                runs["jmed_warm"] = _spawn("jmed", records_file, epochs, cache)
        return {library: "failed" if result is None else result for library, result in runs.items()}

    def steady(runs: int) -> dict:
        results = {}
        for library, result in spawned().items():
            if library == "jmed_warm" or isinstance(result, str):
                results.setdefault(library, result)
                continue
            note = f"{result['patches_per_s']:.1f} patches/s; peak {result['peak_bytes'] / 2**20:.0f} MiB"
            warm = spawned().get("jmed_warm")
            if library == "jmed" and isinstance(warm, dict):
                note += f"; warm decode cache: {warm['patches_per_s']:.1f} patches/s"
            results[library] = Timing(1e3 / max(result["patches_per_s"], 1e-9), 1, None, None, note)
        results.pop("jmed_warm", None)
        return results

    def whole_run(runs: int) -> dict:
        results = {}
        for library, result in spawned().items():
            if library == "jmed_warm" or isinstance(result, str):
                results.setdefault(library, result)
                continue
            note = (
                f"{result['overall_patches_per_s']:.1f} patches/s with {result['first_batch_s']:.1f} s "
                "to the first batch"
            )
            results[library] = Timing(
                1e3 / max(result["overall_patches_per_s"], 1e-9), 1, 1e3 * result["first_batch_s"], None, note
            )
        results.pop("jmed_warm", None)
        return results

    name = f"Queue, {subjects} subjects x {epochs} epoch{'s' if epochs > 1 else ''}, {NUM_WORKERS} workers"
    note = (
        f"{PATCH}^3 label-balanced patches, {SAMPLES_PER_VOLUME}/volume, batch {BATCH_SIZE}, "
        "one subprocess per loader"
    )
    return [
        Case(
            "sampling",
            f"LabelSampler, {SAMPLES_PER_VOLUME} patches of {'x'.join(map(str, patch))}",
            build=sampler,
            unit=f"{SAMPLES_PER_VOLUME} patches",
        ),
        Case(
            "loading",
            f"{name} (steady)",
            measure=steady,
            unit="patch (steady: last 3/4 of the batches)",
            note=note
            + ("; quick: too short for a steady state (the rate is a filled queue drained)" if quick else ""),
        ),
        Case(
            "loading",
            f"{name} (whole run)",
            measure=whole_run,
            unit="patch (whole run: start-up included)",
            note=note,
        ),
    ]


if __name__ == "__main__":
    main()
