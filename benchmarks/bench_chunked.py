"""Patches from large CT volumes without reading them whole: ``.nii.gz`` against patch reads.

A synthetic CT-like volume (int16 Hounsfield units: air -1000, lungs -850, fat -100,
soft tissue 40, organs 30-60, contrast-filled aorta 200, bone 700-1200, Gaussian noise of
15 HU) with a label map of 4 organs (liver 1, kidneys 2, spleen 3, aorta 4), written
slab by slab (never whole in memory) under a temporary folder as

- (a) ``.nii.gz`` (gzip level 1): read whole, by jmed's whole-volume Queue and TorchIO;
- (b) uncompressed ``.nii``: read memory-mapped by region, by jmed's patch-first Queue
  (``patch_reads=True``, see ``jmed.patch_reads``);
- (c) NIfTI-Zarr with 64^3 chunks (converted once from (b) by ``jmed.io.convert``): read
  by region (only the chunks a patch touches) by the same patch-first Queue as (b).

Each measurement runs in its own subprocess (peak memories do not mix): 16
label-balanced 64^3 patches (labels 0-4 equally likely; ``LabelSampler``, no
augmentation) from one volume, 3 epochs (the subject read again each epoch, as a Queue
does). Rows: time to the first 16 patches in a fresh process (reading, compilation, for
(b) building the class index), the time per further 16 patches, and the peak resident
memory of the process (``VmHWM``) with its value right after the imports. For (b)
a second process finds the class index in its ``cache_dir``.

Queue over several volumes: ``--volumes`` (default 8) such volumes as ``.nii``, the
patch-first Queue with 2 workers, 16 patches per volume, batches of 16: patches/s and the
peak resident memory of each process (main and workers, polled with psutil), next to the
bytes of one volume (CT + labels) and to the same Queue reading whole volumes.

    PYTHONPATH=. python benchmarks/bench_chunked.py [--size 512] [--volumes 8] [--folder DIR]
        [--json FILE]

Files of 512^3 take 256 MiB (CT) + 128 MiB (labels) each uncompressed: the folder is
deleted afterwards.
"""

from __future__ import annotations

import argparse
import functools
import gzip
import json
import os
import resource
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
PATCH = 64
NUM_PATCHES = 16
EPOCHS = 3
PROBABILITIES = {0: 1, 1: 1, 2: 1, 3: 1, 4: 1}
SLAB = 16  # slices generated and written at a time

# --- the synthetic CT ----------------------------------------------------------------------------


def _ellipsoid(x, y, z, centre, radii):
    return ((x - centre[0]) / radii[0]) ** 2 + ((y - centre[1]) / radii[1]) ** 2 + (
        (z - centre[2]) / radii[2]
    ) ** 2 < 1


def ct_slab(size: int, z0: int, z1: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Slices ``z0:z1`` of the CT volume (int16 HU) and its label map (uint8)."""
    axis = np.linspace(-1, 1, size, dtype=np.float32)
    x, y, z = np.meshgrid(axis, axis, axis[z0:z1], indexing="ij")
    body = (x / 0.85) ** 2 + (y / 0.65) ** 2
    hu = np.full(x.shape, -1000, np.float32)
    hu[body < 1] = -100  # subcutaneous fat
    hu[body < 0.8] = 40  # soft tissue
    lungs = _ellipsoid(np.abs(x), y, z, (0.35, 0.05, 0.5), (0.25, 0.35, 0.45))
    hu[lungs] = -850
    ribs = (body > 0.62) & (body < 0.7) & (z > -0.1) & (np.cos(40 * z) > 0.6)
    spine = (x**2 + (y + 0.42) ** 2 < 0.09**2) & (np.cos(30 * z) > -0.7)
    bone = ribs | spine
    hu[bone] = 700 + 500 * np.abs(np.sin(7 * x[bone] + 3 * y[bone]))
    labels = np.zeros(x.shape, np.uint8)
    organs = [
        (1, 60, _ellipsoid(x, y, z, (-0.3, 0.1, -0.2), (0.3, 0.25, 0.25))),  # liver
        (2, 30, _ellipsoid(np.abs(x), y, z, (0.35, -0.3, -0.4), (0.09, 0.12, 0.15))),  # kidneys
        (3, 50, _ellipsoid(x, y, z, (0.4, 0.1, -0.1), (0.12, 0.15, 0.12))),  # spleen
        (4, 200, ((x - 0.08) ** 2 + (y + 0.25) ** 2 < 0.05**2) & (z < 0.6)),  # aorta
    ]
    for label, value, mask in organs:
        hu[mask] = value
        labels[mask] = label
    rng = np.random.default_rng([seed, z0])
    hu += rng.normal(0, 15, hu.shape).astype(np.float32)
    return np.clip(np.rint(hu), -1024, 3071).astype(np.int16), labels


def _affine(size: int) -> np.ndarray:
    spacing = 400.0 / size  # a 400 mm field of view
    affine = np.diag([spacing, spacing, spacing, 1.0])
    affine[:3, 3] = -200.0
    return affine


def _header(size: int, dtype) -> bytes:
    import nibabel as nib

    header = nib.Nifti1Header()
    header.set_data_shape((size,) * 3)
    header.set_data_dtype(dtype)
    header.set_sform(_affine(size), 1)
    header.set_qform(_affine(size), 1)
    header.set_xyzt_units("mm")
    header["vox_offset"] = 352
    return header.binaryblock + b"\0" * 4


def write_ct(folder: Path, stem: str, size: int, seed: int, storages=("nii", "nii.gz")) -> dict:
    """Write the CT and its labels in each storage, slab by slab; returns the paths
    ``{storage: {"ct": path, "seg": path}}``."""
    paths = {s: {k: folder / f"{stem}_{k}.{s}" for k in ("ct", "seg")} for s in storages}
    files = {}
    for storage, pair in paths.items():
        for key, path in pair.items():
            f = gzip.open(path, "wb", compresslevel=1) if storage == "nii.gz" else open(path, "wb")
            f.write(_header(size, np.int16 if key == "ct" else np.uint8))
            files[storage, key] = f
    try:
        for z0 in range(0, size, SLAB):
            ct, seg = ct_slab(size, z0, min(z0 + SLAB, size), seed)
            # NIfTI stores x fastest: a slab of slices is contiguous in the file
            blocks = {"ct": ct.tobytes(order="F"), "seg": seg.tobytes(order="F")}
            for (_, key), f in files.items():
                f.write(blocks[key])
    finally:
        for f in files.values():
            f.close()
    return {s: {k: str(p) for k, p in pair.items()} for s, pair in paths.items()}


def write_zarr(folder: Path, stem: str, size: int, seed: int) -> dict:
    """(c): the ``.nii`` files of ``write_ct`` converted once to NIfTI-Zarr with 64^3 chunks
    (``jmed.io.convert``, slab by slab)."""
    sys.path.insert(0, str(ROOT))
    import jmed

    out = {}
    for key, kind in (("ct", "intensity"), ("seg", "label")):
        source = folder / f"{stem}_{key}.nii"
        out[key] = str(jmed.io.convert(source, folder / f"{stem}_{key}.nii.zarr", kind=kind, chunks=64))
    return out


# more storages read by region: name -> (writer(folder, stem, size, seed) -> {"ct", "seg"} paths,
# opener "module:function" for Queue(patch_reads=opener), or None when patch_reads=True opens
# the format itself); each measured by _child_jmed exactly as (b)
STORAGES: dict[str, tuple] = {"nii.zarr": (write_zarr, None)}


# --- children (one per measurement) ------------------------------------------------------------------


def _maxrss() -> int:
    """Peak resident memory of this process's address space (``VmHWM``); ``ru_maxrss``
    would also count the parent's peak, which Linux carries over ``fork`` and ``exec``."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return 1024 * int(line.split()[1])
    except OSError:
        pass
    return 1024 * resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _child_jmed(paths: dict, patch_reads: bool, cache_dir: str | None, opener: str | None = None) -> dict:
    sys.path.insert(0, str(ROOT))
    import importlib

    import jmed

    if opener is not None:
        module, name = opener.split(":")
        opener = getattr(importlib.import_module(module), name)

    baseline = _maxrss()
    start = time.perf_counter()
    queue = jmed.Queue(
        [{"ct": paths["ct"], "seg": paths["seg"]}],
        jmed.LabelSampler(PATCH, "seg", PROBABILITIES),
        samples_per_volume=NUM_PATCHES,
        max_length=NUM_PATCHES,
        batch_size=NUM_PATCHES,
        num_workers=0,
        label_names="seg",
        num_epochs=EPOCHS,
        shard_index=0,
        shard_count=1,
        compilation_cache_dir=None,
        cache_dir=cache_dir,
        patch_reads=(opener or True) if patch_reads else False,
    )
    arrivals, centres = [], []
    with iter(queue) as it:
        for batch in it:
            arrivals.append(time.perf_counter() - start)
            locations = np.asarray(batch.metadata["location"])
            centres += (locations[:, :3] + PATCH // 2).tolist()
    return {"arrivals_s": arrivals, "peak_bytes": _maxrss(), "baseline_bytes": baseline, "centres": centres}


def _child_torchio(paths: dict) -> dict:
    import torch
    import torchio as tio

    torch.set_num_threads(max(len(os.sched_getaffinity(0)), 1))
    baseline = _maxrss()
    start = time.perf_counter()
    sampler = tio.LabelSampler(PATCH, "seg", PROBABILITIES)
    arrivals, centres = [], []
    for _ in range(EPOCHS):
        subject = tio.Subject(ct=tio.ScalarImage(paths["ct"]), seg=tio.LabelMap(paths["seg"]))
        patches = list(sampler(subject, num_patches=NUM_PATCHES))
        arrivals.append(time.perf_counter() - start)
        centres += [(np.asarray(p[tio.LOCATION][:3]) + PATCH // 2).tolist() for p in patches]
    return {"arrivals_s": arrivals, "peak_bytes": _maxrss(), "baseline_bytes": baseline, "centres": centres}


class _PeakPerProcess:
    """Peak resident memory of this process and of each of its children (psutil)."""

    def __init__(self):
        import psutil

        self._process = psutil.Process()
        self.peaks: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self):
        while not self._stop.is_set():
            for p in [self._process, *self._process.children(recursive=True)]:
                try:
                    if p.pid not in self.peaks and "resource_tracker" in " ".join(p.cmdline()):
                        continue  # multiprocessing's bookkeeping process, not a worker
                    self.peaks[p.pid] = max(self.peaks.get(p.pid, 0), p.memory_info().rss)
                except Exception:
                    pass
            time.sleep(0.02)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def _child_queue(records: list[dict], cache_dir: str, workers: int, patch_reads: bool) -> dict:
    sys.path.insert(0, str(ROOT))
    import jmed

    queue = jmed.Queue(
        records,
        jmed.LabelSampler(PATCH, "seg", PROBABILITIES),
        samples_per_volume=NUM_PATCHES,
        max_length=4 * NUM_PATCHES,
        batch_size=NUM_PATCHES,
        num_workers=workers,
        label_names="seg",
        num_epochs=1,
        shard_index=0,
        shard_count=1,
        cache_dir=cache_dir if patch_reads else None,
        patch_reads=patch_reads,
    )
    start = time.perf_counter()
    patches = 0
    with _PeakPerProcess() as memory:
        with iter(queue) as it:
            for batch in it:
                patches += batch["ct"].data.shape[0]
    seconds = time.perf_counter() - start
    main = memory.peaks.pop(os.getpid(), 0)
    return {
        "seconds": seconds,
        "patches": patches,
        "main_peak_bytes": main,
        "worker_peak_bytes": list(memory.peaks.values()),
    }


def _child(args) -> None:
    spec = json.loads(args.spec)
    if spec["kind"] == "torchio":
        result = _child_torchio(spec["paths"])
    elif spec["kind"] == "queue":
        result = _child_queue(spec["records"], spec["cache_dir"], spec["workers"], spec["patch_reads"])
    else:
        result = _child_jmed(
            spec["paths"], spec["kind"] == "jmed-patch", spec.get("cache_dir"), spec.get("opener")
        )
    print("RESULT " + json.dumps(result), flush=True)


def _spawn(spec: dict) -> dict | None:
    from benchmarks.common import run_child

    command = [sys.executable, __file__, "--child", json.dumps(spec)]
    return run_child(command, what=spec["kind"], timeout=3600)[0]


# --- the runs ----------------------------------------------------------------------------------------


def _label_fractions(centres: list, seg_path: str) -> list[float]:
    """Fraction of patch centres on each label 0-4 (read back from the label file)."""
    import nibabel as nib

    seg = nib.load(seg_path, mmap=True).dataobj
    labels = [int(seg[x, y, z]) for x, y, z in centres]
    return (np.bincount(labels, minlength=5)[:5] / max(len(labels), 1)).round(3).tolist()


def run(size: int, volumes: int, folder: Path, workers: int = 2) -> dict:
    """Write the volumes under ``folder`` and run every measurement in its own process."""
    written = write_ct(folder, "ct0", size, 0)
    for name, (writer, _) in STORAGES.items():
        written[name] = writer(folder, "ct0", size, 0)
    results = {"size": size, "volume_bytes": 3 * size**3}
    results["jmed (a) .nii.gz, whole volume"] = _spawn({"kind": "jmed-whole", "paths": written["nii.gz"]})
    results["TorchIO (a) .nii.gz"] = _spawn({"kind": "torchio", "paths": written["nii.gz"]})
    cache = str(folder / "index-cache")
    results["jmed (b) .nii, patch reads"] = _spawn(
        {"kind": "jmed-patch", "paths": written["nii"], "cache_dir": cache}
    )
    results["jmed (b) .nii, patch reads, class index cached"] = _spawn(
        {"kind": "jmed-patch", "paths": written["nii"], "cache_dir": cache}
    )
    for name, (_, opener) in STORAGES.items():
        results[f"jmed ({name}), patch reads"] = _spawn(
            {
                "kind": "jmed-patch",
                "paths": written[name],
                "cache_dir": str(folder / f"cache-{name}"),
                "opener": opener,
            }
        )
    for result in results.values():
        if isinstance(result, dict) and "centres" in result:
            result["label_fractions"] = _label_fractions(result.pop("centres"), written["nii"]["seg"])
    records = [{"ct": written["nii"]["ct"], "seg": written["nii"]["seg"]}]
    for i in range(1, volumes):
        paths = write_ct(folder, f"ct{i}", size, i, storages=("nii",))["nii"]
        records.append({"ct": paths["ct"], "seg": paths["seg"]})
    for patch_reads in (True, False):
        how = "patch reads" if patch_reads else "whole volumes (contrast)"
        results[f"Queue, {volumes} volumes .nii, {how}, {workers} workers"] = _spawn(
            {
                "kind": "queue",
                "records": records,
                "cache_dir": str(folder / "queue-cache"),
                "workers": workers,
                "patch_reads": patch_reads,
            }
        )
    return results


def _summary(result: dict) -> tuple[float, float]:
    arrivals = result["arrivals_s"]
    return arrivals[0], (arrivals[-1] - arrivals[0]) / max(len(arrivals) - 1, 1)


def print_table(results: dict) -> None:
    mib = 2**20
    size = results["size"]
    print(f"\n{NUM_PATCHES} label-balanced {PATCH}^3 patches from a {size}^3 int16 CT (+ uint8 labels)")
    print(
        f"{'case':50s} {'first s':>8s} {'next s':>8s} {'peak MiB':>9s} {'at start':>9s}  label fractions 0-4"
    )
    for name, result in results.items():
        if not isinstance(result, dict) or "arrivals_s" not in result:
            continue
        first, following = _summary(result)
        print(
            f"{name:50s} {first:8.2f} {following:8.2f} {result['peak_bytes'] / mib:9.0f} "
            f"{result['baseline_bytes'] / mib:9.0f}  {result['label_fractions']}"
        )
    for name, result in results.items():
        if isinstance(result, dict) and "worker_peak_bytes" in result:
            print(
                f"\n{name}: {result['patches'] / result['seconds']:.1f} patches/s; peak MiB per process: main "
                f"{result['main_peak_bytes'] / mib:.0f}, workers "
                f"{[round(b / mib) for b in result['worker_peak_bytes']]}; one volume (CT + labels) "
                f"{results['volume_bytes'] / mib:.0f} MiB"
            )


def cases(quick: bool, volume) -> list:
    """Rows for ``benchmarks.run``: a 512^3 CT (``--quick``: 128^3, 2 volumes in the Queue)."""
    from benchmarks.common import Case, Timing

    size, volumes = (128, 2) if quick else (512, 8)

    @functools.cache
    def measured() -> dict:
        folder = Path(tempfile.mkdtemp(prefix="jmed-chunked-"))
        try:
            return run(size, volumes, folder)
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def cell(result, note_extra: str = "") -> Timing | str:
        if not isinstance(result, dict):
            return "failed"
        first, following = _summary(result)
        note = (
            f"peak {result['peak_bytes'] / 2**20:.0f} MiB ({result['baseline_bytes'] / 2**20:.0f} after imports); "
            f"next {NUM_PATCHES} patches {1e3 * following:.0f} ms{note_extra}"
        )
        return Timing(1e3 * first, 1, 1e3 * first, None, note)

    def gz(runs: int) -> dict:
        r = measured()
        return {"jmed": cell(r["jmed (a) .nii.gz, whole volume"]), "torchio": cell(r["TorchIO (a) .nii.gz"])}

    def nii(runs: int) -> dict:
        r = measured()
        cached = r["jmed (b) .nii, patch reads, class index cached"]
        extra = ""
        if isinstance(cached, dict):
            extra = f"; class index cached: first {1e3 * _summary(cached)[0]:.0f} ms"
        return {
            "jmed": cell(r["jmed (b) .nii, patch reads"], extra),
            "torchio": cell(r["TorchIO (a) .nii.gz"]),
        }

    def zarr(runs: int) -> dict:
        r = measured()
        return {
            "jmed": cell(r["jmed (nii.zarr), patch reads"]),
            "torchio": cell(r["TorchIO (a) .nii.gz"]),
        }

    def queue(runs: int) -> dict:
        r = measured()
        result = next((v for k, v in r.items() if k.startswith("Queue") and "patch reads" in k), None)
        whole = next((v for k, v in r.items() if k.startswith("Queue") and "whole" in k), None)
        if not isinstance(result, dict):
            return {"jmed": "failed"}

        def peaks(x):
            return f"main {x['main_peak_bytes'] / 2**20:.0f}, workers {[round(b / 2**20) for b in x['worker_peak_bytes']]}"

        note = f"peak MiB per process: {peaks(result)}; one volume {r['volume_bytes'] / 2**20:.0f} MiB"
        if isinstance(whole, dict):
            note += f"; whole-volume Queue on the same files: {peaks(whole)}"
        return {"jmed": Timing(1e3 * result["seconds"] / max(result["patches"], 1), 1, None, None, note)}

    what = f"{NUM_PATCHES} label-balanced {PATCH}^3 patches, {size}^3 CT"
    note = "fresh process per case; ms to the first 16 patches (reading, compiling, class index); TorchIO on .nii.gz"
    return [
        Case("chunked", f"{what}, .nii.gz (a)", measure=gz, unit=f"first {NUM_PATCHES} patches", note=note),
        Case(
            "chunked",
            f"{what}, .nii patch reads (b)",
            measure=nii,
            unit=f"first {NUM_PATCHES} patches",
            note=note,
        ),
        Case(
            "chunked",
            f"{what}, NIfTI-Zarr 64^3 chunks (c)",
            measure=zarr,
            unit=f"first {NUM_PATCHES} patches",
            note=note,
        ),
        Case(
            "chunked",
            f"Queue, {volumes} CT volumes {size}^3, patch reads, 2 workers",
            measure=queue,
            unit="patch (whole run)",
            note="label-balanced 64^3, 16 per volume, batch 16",
        ),
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512, help="edge of the cubic volume (voxels)")
    parser.add_argument("--volumes", type=int, default=8, help="volumes in the Queue run")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--folder", type=Path, default=None, help="where to write the volumes (default: /tmp)"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        args.spec = args.child
        _child(args)
        return
    folder = Path(tempfile.mkdtemp(prefix="jmed-chunked-", dir=args.folder))
    try:
        start = time.perf_counter()
        results = run(args.size, args.volumes, folder, args.workers)
        results["wall_s"] = time.perf_counter() - start
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    print_table(results)
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
