"""Shared pieces of the benchmarks: the test volume, the timing rule and the case record.

Every benchmark module exposes ``cases(quick, data) -> list[Case]``; ``benchmarks.run``
collects them, times them with ``measure`` and writes the tables. A case either builds
callables per library (``build``: timed here, the same way for every library) or
measures itself (``measure``: for throughput runs that spawn processes).

Timing rule: the first call is timed on its own (for jmed it includes tracing and XLA
compilation: compile time = first call - median), then the median of ``runs`` further
calls is reported. Outputs are waited for (``jax.block_until_ready``) inside the timing.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MNI_SHAPE = (197, 233, 189)
T1_NAME = "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
LIBRARIES = ("jmed", "torchio", "monai")


def run_child(
    command: list[str], *, what: str, env: dict | None = None, timeout: float = 1800
) -> tuple[dict | None, subprocess.CompletedProcess]:
    """Run a benchmark's measuring child process (with ``PYTHONPATH`` at the repository).

    Returns the JSON of its ``RESULT {...}`` line (``None`` when it has none: the child's
    output is printed to stderr, naming ``what``) and the finished process.
    """
    env = {**os.environ, "PYTHONPATH": str(ROOT)} if env is None else env
    out = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout)
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:]), out
    print(f"{what} failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}", file=sys.stderr)
    return None, out


def default_data_dir() -> Path | None:
    """``$JMED_BENCH_DATA``, else ``../shared/data/mni152`` (or ``../../shared/...``) from the repository root."""
    env = os.environ.get("JMED_BENCH_DATA")
    candidates = [Path(env)] if env else []
    # ../shared from the repository root; one level further up for worktrees in a subfolder
    candidates += [ROOT.parent / "shared" / "data" / "mni152", ROOT.parents[1] / "shared" / "data" / "mni152"]
    return next((c for c in candidates if (c / T1_NAME).exists()), None)


def num_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def set_torch_threads() -> int | None:
    """Give torch (TorchIO, MONAI) one thread per available core; return the count."""
    try:
        import torch
    except ImportError:
        return None
    torch.set_num_threads(num_cores())
    return torch.get_num_threads()


def add_allocator_option(parser) -> None:
    parser.add_argument(
        "--system-allocator",
        action="store_true",
        help="keep glibc's default malloc thresholds (no jmed.tune_host_allocator())",
    )


def apply_allocator(system_allocator: bool) -> str:
    """``jmed.tune_host_allocator()`` unless ``system_allocator``; the setting in words."""
    if not system_allocator:
        import jmed

        if jmed.tune_host_allocator():
            return "jmed.tune_host_allocator() (large blocks from the heap; applies to all libraries)"
    return "glibc defaults"


@dataclass
class Volume:
    """The benchmark subject: a T1 (x, y, z) float32, a 3-class label map and the affine."""

    t1: np.ndarray
    seg: np.ndarray
    affine: np.ndarray
    source: str
    folder: Path | None = None
    _landmarks: np.ndarray | None = field(default=None, repr=False)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.t1.shape)

    @property
    def is_mni_size(self) -> bool:
        return self.shape == MNI_SHAPE

    def landmarks(self) -> np.ndarray:
        """Histogram-standardization landmarks trained on this T1 (cached)."""
        if self._landmarks is None:
            from jmed.transforms import train_histogram

            self._landmarks = train_histogram([self.t1[..., None]])
        return self._landmarks

    def torchio_landmarks(self) -> np.ndarray:
        """TorchIO's own landmarks for this T1 (its layout differs from jmed's), cached."""
        if getattr(self, "_tio_landmarks", None) is None:
            import tempfile

            import nibabel as nib
            import torchio as tio

            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "t1.nii.gz"
                nib.save(nib.Nifti1Image(self.t1, self.affine), str(path))
                self._tio_landmarks = tio.HistogramStandardization.train([path])
        return self._tio_landmarks

    def subject(self, device: bool = True):
        """A jmed Subject (t1, seg), on the default device unless ``device=False``."""
        import jax

        import jmed

        subject = jmed.Subject(
            t1=jmed.ScalarImage(self.t1, self.affine), seg=jmed.LabelMap(self.seg, self.affine)
        )
        return jax.device_put(subject) if device else subject

    def torchio_subject(self):
        import torch
        import torchio as tio

        return tio.Subject(
            t1=tio.ScalarImage(tensor=torch.from_numpy(self.t1[None].copy()), affine=self.affine),
            seg=tio.LabelMap(tensor=torch.from_numpy(self.seg[None].astype(np.int16)), affine=self.affine),
        )

    def scaled(self, size: int | tuple[int, int, int]) -> tuple[int, int, int]:
        """``size`` (given for the MNI-size volume) shrunk to fit this volume."""
        size = (size,) * 3 if isinstance(size, int) else tuple(size)
        if self.is_mni_size:
            return size
        return tuple(max(2, min(s, n // 2 if s >= n else s)) for s, n in zip(size, self.shape))


def load_volume(data_dir: Path | str | None = None, shape: tuple[int, int, int] | None = None) -> Volume:
    """The MNI152 T1 and a GM/WM label map from ``data_dir``, else a synthetic volume.

    ``shape`` forces a synthetic volume of that shape (for smoke runs). Labels: 0
    background, 1 grey matter, 2 white matter.
    """
    import nibabel as nib

    folder = Path(data_dir) if data_dir is not None else None
    if shape is None and folder is not None and (folder / T1_NAME).exists():
        t1_img = nib.load(str(folder / T1_NAME))
        t1 = np.asarray(t1_img.dataobj, np.float32)
        gm, wm = (
            np.asarray(nib.load(str(folder / T1_NAME.replace("_t1_", f"_{k}_"))).dataobj, np.float32)
            for k in ("gm", "wm")
        )
        gm, wm = gm / max(gm.max(), 1e-6), wm / max(wm.max(), 1e-6)
        seg = np.where(np.maximum(gm, wm) < 0.5, 0, np.where(wm > gm, 2, 1)).astype(np.uint8)
        return Volume(t1, seg, np.asarray(t1_img.affine, np.float64), f"MNI152 2009a ({folder.name})", folder)
    shape = tuple(shape or MNI_SHAPE)
    rng = np.random.default_rng(0)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"), -1)
    radius = np.linalg.norm(grid / np.array([0.8, 0.9, 0.7]), axis=-1)
    seg = np.where(radius < 0.5, 2, np.where(radius < 0.8, 1, 0)).astype(np.uint8)
    t1 = (seg * 50 + 20 * np.cos(6 * grid[..., 0]) * (seg > 0) + 5 * rng.standard_normal(shape)).astype(
        np.float32
    )
    t1 = np.maximum(t1, 0)
    affine = np.eye(4)
    affine[:3, 3] = -(np.array(shape) - 1) / 2
    return Volume(t1, seg, affine, "synthetic " + "x".join(map(str, shape)))


@dataclass
class Timing:
    """One library's result for one case (milliseconds per ``unit``)."""

    median_ms: float
    runs: int
    first_ms: float | None = None
    compile_s: float | None = None
    note: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {
            "median_ms": self.median_ms,
            "runs": self.runs,
            "first_ms": self.first_ms,
            "compile_s": self.compile_s,
            "note": self.note,
        }


@dataclass
class Case:
    """One row of the tables.

    ``build()`` returns ``{library: fn(i) or None}``; ``fn(i)`` runs the operation once
    (``i`` numbers the call, use it to vary the key). ``measure(runs)`` instead returns
    ``{library: Timing}`` for cases that time themselves. ``quick_skip`` names libraries
    not run under ``--quick`` (slow anchors), which the table says.
    """

    group: str
    name: str
    build: Callable[[], dict[str, Callable[[int], Any] | None]] | None = None
    measure: Callable[[int], dict[str, Timing | None]] | None = None
    unit: str = "call"
    note: str = ""
    quick_skip: tuple[str, ...] = ()


def block(value: Any) -> Any:
    import jax

    return jax.block_until_ready(value)


def measure(
    fn: Callable[[int], Any], runs: int, *, compiled: bool = False, budget_s: float | None = None
) -> Timing:
    """Time ``fn``: first call alone, then the median of ``runs`` calls.

    ``compiled``: the first call includes compilation (jmed); report it as compile time.
    ``budget_s``: if the first call alone took longer, stop there and report it as a
    single run (used under ``--quick`` for slow anchors; the row says so).
    """
    start = time.perf_counter()
    block(fn(0))
    first = time.perf_counter() - start
    if budget_s is not None and not compiled and first > budget_s:
        return Timing(1e3 * first, 1, 1e3 * first, None, "1 run (slow, --quick)")
    times = []
    for i in range(runs):
        start = time.perf_counter()
        block(fn(i + 1))
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    return Timing(1e3 * median, runs, 1e3 * first, max(first - median, 0.0) if compiled else None)


def run_case(
    case: Case, runs: int, quick: bool, budget_s: float | None = None
) -> dict[str, Timing | None | str]:
    """Time every library of ``case``; an anchor that raises is reported as ``n/a``."""
    if case.measure is not None:
        results = case.measure(runs)
        if quick:
            for library in case.quick_skip:
                results[library] = "skipped (--quick)"
        return results
    fns = case.build()
    results: dict[str, Timing | None | str] = {}
    for library in LIBRARIES:
        fn = fns.get(library)
        if fn is None:
            results[library] = None
        elif quick and library in case.quick_skip:
            results[library] = "skipped (--quick)"
        elif library == "jmed":
            results[library] = measure(fn, runs, compiled=True)
        else:
            try:
                results[library] = measure(fn, runs, budget_s=budget_s)
            except Exception as error:  # an anchor's optional dependency, or no equivalent mode
                results[library] = f"n/a ({type(error).__name__}: {str(error)[:40]})"
    return results


def print_rows(title: str, rows: list[tuple[Case, dict]]) -> None:
    """A plain-text table for the scripts run alone."""
    print(f"\n{title}")
    header = f"{'case':42s} {'jmed ms':>9s} {'compile s':>9s} {'TorchIO ms':>11s} {'x':>6s} {'MONAI ms':>9s} {'x':>6s}"
    print(header)
    print("-" * len(header))
    for case, results in rows:
        ours = results.get("jmed")
        line = f"{case.name[:42]:42s} "
        line += f"{ours.median_ms:9.1f} " if isinstance(ours, Timing) else f"{'-':>9s} "
        line += (
            f"{ours.compile_s:9.2f}"
            if isinstance(ours, Timing) and ours.compile_s is not None
            else f"{'-':>9s}"
        )
        for library in ("torchio", "monai"):
            other = results.get(library)
            if isinstance(other, Timing):
                ratio = other.median_ms / ours.median_ms if isinstance(ours, Timing) else float("nan")
                line += f" {other.median_ms:{11 if library == 'torchio' else 9}.1f} {ratio:6.2f}"
            else:
                line += f" {'-':>{11 if library == 'torchio' else 9}s} {'':6s}"
        print(line + (f"  {case.unit}" if case.unit != "call" else ""), flush=True)
