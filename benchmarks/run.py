"""Run every jmed benchmark and write the tables (JSON and Markdown).

Usage::

    python -m benchmarks.run [--quick] [--data DIR] [--output DIR] [--only NAME ...]
                             [--synthetic-shape X Y Z] [--runs N]

jmed runs on JAX's default device (a GPU when there is one, reported in the header);
TorchIO and MONAI run on the CPU with ``torch.set_num_threads`` set to the number of
available cores. Times are medians of ``--runs`` calls after a first call (jmed's first
call includes compilation, reported separately as compile time). Ratios are
anchor time / jmed time (> 1: jmed is faster).

``--data``: folder with the MNI152 2009a NIfTI files (default ``$JMED_BENCH_DATA``, else
``../shared/data/mni152`` relative to the repository root); without it a synthetic
197x233x189 volume is used. ``--only`` keeps cases whose group or name contains one of
the given strings (case-insensitive). ``--quick``: 3 runs instead of 7, slow anchors
skipped or timed once (the table says which), smaller configurations where stated.

The process starts with ``jmed.tune_host_allocator()`` (glibc serves large blocks from
the heap instead of fresh page mappings; see ``jmed/runtime.py``). It applies to every
library in the process, TorchIO and MONAI included; ``--system-allocator`` leaves
glibc's defaults, under which every new 35 MB volume costs 10-15 ms of page faults.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import platform
import sys
import time
import warnings
from pathlib import Path

from benchmarks.common import (
    LIBRARIES,
    Case,
    Timing,
    add_allocator_option,
    apply_allocator,
    default_data_dir,
    load_volume,
    num_cores,
    set_torch_threads,
)

MODULES = (
    "bench_preprocessing",
    "bench_spatial",
    "bench_intensity",
    "bench_pipeline",
    "bench_loader",
    "bench_heterogeneous",
    "bench_chunked",
    "bench_device",
    "bench_inference",
    "bench_metrics",
)
COLUMNS = (
    "group",
    "case",
    "unit",
    "jmed ms",
    "compile s",
    "runs",
    "TorchIO ms",
    "TorchIO/jmed",
    "MONAI ms",
    "MONAI/jmed",
    "note",
)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(name: str) -> str | None:
    try:
        return importlib.import_module(name).__version__
    except Exception:
        return None


def machine_description(torch_threads: int | None) -> dict:
    import jax

    device = jax.devices()[0]
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": _cpu_model(),
        "cores_available": num_cores(),
        "load_average": [round(x, 2) for x in load] if load else None,
        "jax_device": f"{device.platform} ({getattr(device, 'device_kind', '')})",
        "jax_device_count": jax.device_count(),
        "torch_threads": torch_threads,
        "python": platform.python_version(),
        "versions": {name: _version(name) for name in ("jax", "numpy", "torch", "torchio", "monai")},
    }


def _selected(case: Case, only: list[str] | None) -> bool:
    if not only:
        return True
    text = f"{case.group} {case.name}".lower()
    return any(o.lower() in text for o in only)


def _cell(result) -> dict:
    if isinstance(result, Timing):
        return result.as_dict()
    return {"median_ms": None, "note": result or "no equivalent / not installed"}


def _row(case: Case, results: dict) -> dict:
    row = {"group": case.group, "case": case.name, "unit": case.unit, "note": case.note}
    for library in LIBRARIES:
        row[library] = _cell(results.get(library))
    ours = row["jmed"]["median_ms"]
    for library in ("torchio", "monai"):
        theirs = row[library]["median_ms"]
        row[f"{library}_over_jmed"] = theirs / ours if theirs and ours else None
    return row


def _fmt(value, digits=1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}" if value < 1e5 else f"{value:.3g}"
    return str(value)


def markdown(meta: dict, rows: list[dict]) -> str:
    versions = ", ".join(f"{k} {v}" for k, v in meta["versions"].items() if v)
    lines = [
        f"# jmed benchmarks{' (--quick)' if meta['quick'] else ''}",
        "",
        f"- suite: {'quick (--quick)' if meta['quick'] else 'full'}; date: {meta['date']}",
        f"- machine: {meta['cpu']}, {meta['cores_available']} cores available, "
        f"load average {meta['load_average']} at the start (shared machine: timings are noisy)",
        f"- jmed device: {meta['jax_device']} x {meta['jax_device_count']}; TorchIO/MONAI on CPU with "
        f"torch.set_num_threads({meta['torch_threads']})",
        f"- volume: {meta['volume']}",
        f"- host allocator: {meta.get('allocator', 'glibc defaults')}",
        f"- median of {meta['runs']} runs after a first call; jmed's compile time = first call - median; "
        "ratios = anchor / jmed (> 1: jmed faster)",
        f"- {versions}",
        f"- total wall time {meta['wall_s']:.0f} s",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "|".join("---" for _ in COLUMNS) + "|",
    ]
    for row in rows:
        notes = [row["note"]] if row["note"] else []
        for library in LIBRARIES:
            note = row[library].get("note")
            if note and (row[library]["median_ms"] is not None or library == "jmed"):
                notes.append(f"{library}: {note}")
            elif row[library]["median_ms"] is None and note and "no equivalent" not in note:
                notes.append(f"{library}: {note}")
        runs = row["jmed"].get("runs")
        cells = [
            row["group"],
            row["case"],
            row["unit"],
            _fmt(row["jmed"]["median_ms"]),
            _fmt(row["jmed"].get("compile_s"), 2),
            _fmt(runs),
            _fmt(row["torchio"]["median_ms"]),
            _fmt(row["torchio_over_jmed"], 2),
            _fmt(row["monai"]["median_ms"]),
            _fmt(row["monai_over_jmed"], 2),
            "; ".join(notes),
        ]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer runs, slow anchors skipped (under 5 min)")
    parser.add_argument(
        "--data", type=Path, default=None, help="MNI152 folder (default: $JMED_BENCH_DATA or ../shared)"
    )
    parser.add_argument("--output", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--only", nargs="+", help="run only cases whose group or name contains one of these")
    parser.add_argument("--synthetic-shape", type=int, nargs=3, help="use a synthetic volume of this shape")
    parser.add_argument("--runs", type=int, default=None, help="timed runs per case (default 7, --quick 3)")
    parser.add_argument("--name", default=None, help="file stem of the outputs (default 'full' or 'quick')")
    add_allocator_option(parser)
    parser.add_argument(
        "--update-readme",
        type=Path,
        nargs="?",
        const=Path(__file__).resolve().parents[1] / "README.md",
        help="replace the table between the benchmark markers of this README (default: the project's)",
    )
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    runs = args.runs or (3 if args.quick else 7)
    started = time.perf_counter()
    allocator = apply_allocator(args.system_allocator)

    torch_threads = set_torch_threads()
    data_dir = args.data if args.data is not None else default_data_dir()
    volume = load_volume(data_dir, tuple(args.synthetic_shape) if args.synthetic_shape else None)
    meta = machine_description(torch_threads)
    meta.update(
        quick=args.quick, runs=runs, allocator=allocator, volume=f"{volume.source}, shape {volume.shape}"
    )
    print(
        f"{meta['date']}: {meta['cpu']}, {meta['cores_available']} cores, load {meta['load_average']}; "
        f"jmed on {meta['jax_device']}; torch threads {torch_threads}; volume {meta['volume']}",
        flush=True,
    )

    rows = []
    for module_name in MODULES:
        module = importlib.import_module(f"benchmarks.{module_name}")
        for case in module.cases(args.quick, volume):
            if not _selected(case, args.only):
                continue
            start = time.perf_counter()
            try:
                results = _run(case, runs, args.quick)
            except Exception as error:  # one failing case must not lose the others
                results = {"jmed": f"failed: {type(error).__name__}: {str(error)[:120]}"}
            row = _row(case, results)
            rows.append(row)
            print(
                f"[{time.perf_counter() - started:6.0f} s] {case.group}/{case.name}: jmed "
                f"{_fmt(row['jmed']['median_ms'])} ms, TorchIO {_fmt(row['torchio']['median_ms'])}, "
                f"MONAI {_fmt(row['monai']['median_ms'])} ({time.perf_counter() - start:.0f} s)",
                flush=True,
            )

    meta["wall_s"] = time.perf_counter() - started
    args.output.mkdir(parents=True, exist_ok=True)
    stem = args.name or ("quick" if args.quick else "full")
    (args.output / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    table = markdown(meta, rows)
    (args.output / f"{stem}.md").write_text(table)
    print()
    print(table)
    print(f"written: {args.output / (stem + '.json')}, {args.output / (stem + '.md')}")
    if args.update_readme is not None:
        update_readme(args.update_readme, table)
        print(f"updated: {args.update_readme}")
    return {"meta": meta, "rows": rows}


README_START = "<!-- benchmarks:start (generated by python -m benchmarks.run --update-readme) -->"
README_END = "<!-- benchmarks:end -->"


def update_readme(path: Path, table: str) -> None:
    """Put ``table`` between the benchmark markers of ``path`` (written atomically)."""
    text = path.read_text()
    if README_START not in text or README_END not in text:
        raise ValueError(f"{path}: no benchmark markers ({README_START!r} ... {README_END!r})")
    head, rest = text.split(README_START, 1)
    _, tail = rest.split(README_END, 1)
    # the README gives its own heading: keep the table's description and rows only
    table = "\n".join(line for line in table.strip().splitlines() if not line.startswith("# "))
    new = f"{head}{README_START}\n{table.strip()}\n{README_END}{tail}"
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(new)
    os.replace(tmp, path)


def _run(case: Case, runs: int, quick: bool) -> dict:
    from benchmarks.common import run_case

    return run_case(case, runs, quick, budget_s=3.0 if quick else None)


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
