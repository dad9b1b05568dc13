"""Benchmark segmentation metrics: jmed vs MONAI, and the host kernels under them.

Target: the 3-class MNI152 label map (background, GM, WM; 197x233x189 at 1 mm) built as
``jmed.datasets.MNI152`` does, from ``--data`` (default ``../shared/data/mni152`` relative
to the repository root) or, when absent, a synthetic phantom of the same shape.
Prediction: the target shifted by 2 voxels along x and 1 along z (a realistic error).

Rows: Dice, HD95 and ASSD against MONAI; the exact Euclidean distance transform of the
grey-matter mask (``jmed.metrics.distance_transform`` against
``scipy.ndimage.distance_transform_edt`` and the ``edt`` package); connected components
of the grey-matter mask (``jmed.ops.labels.connected_components`` and ``keep_largest``
against ``scipy.ndimage.label`` and ``cc3d``). Prints the median wall time of
``--repeats`` runs after one warm-up (compile time separately for jmed) and the values,
so agreement is visible.

    python benchmarks/bench_metrics.py [--data DIR] [--repeats 5] [--shape 197 233 189]
        [--only dice hd95 assd edt components]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import jax
import numpy as np

import jmed
from jmed import metrics

ROOT = Path(__file__).resolve().parent.parent


def _labels(data_dir: Path, shape):
    files = {k: data_dir / f"mni_icbm152_{k}_tal_nlin_sym_09a_converted.nii.gz" for k in ("gm", "wm")}
    if shape is None and all(f.exists() for f in files.values()):
        gm = jmed.load(files["gm"]).numpy()[..., 0] / 255
        wm = jmed.load(files["wm"]).numpy()[..., 0] / 255
        labels = np.where(np.maximum(gm, wm) < 0.5, 0, np.where(wm > gm, 2, 1)).astype(np.int32)
        return labels, "MNI152"
    shape = tuple(shape or (197, 233, 189))
    labels = jmed.datasets.phantom(0, shape=shape, num_classes=3).seg.numpy()[..., 0].astype(np.int32)
    return labels, f"phantom {shape}"


def _time(fn, repeats):
    start = time.perf_counter()
    out = fn()
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return first, statistics.median(times), out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "mni152")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--shape", type=int, nargs=3, default=None, help="use a phantom of this shape")
    parser.add_argument(
        "--only", nargs="+", default=list(_ROWS), choices=_ROWS, help="rows to run (default: all)"
    )
    args = parser.parse_args(argv)
    target, source = _labels(args.data, args.shape)
    prediction = np.roll(target, (2, 0, 1), axis=(0, 1, 2))
    spacing = (1.0, 1.0, 1.0)
    print(f"data: {source}, shape {target.shape}, device {jax.devices()[0].platform}, repeats {args.repeats}")

    pred_j, tgt_j = jax.device_put(prediction), jax.device_put(target)
    jobs = {
        "dice": lambda: metrics.dice_score(pred_j, tgt_j, num_classes=3, include_background=False),
        "hd95": lambda: metrics.hausdorff_distance(pred_j, tgt_j, spacing=spacing, num_classes=3),
        "assd": lambda: metrics.average_surface_distance(pred_j, tgt_j, spacing=spacing, num_classes=3),
    }
    rows = []
    for name, fn in jobs.items():
        if name not in args.only:
            continue
        first, median, value = _time(lambda fn=fn: jax.block_until_ready(fn()), args.repeats)
        rows.append([name, "jmed", first - median, median, np.asarray(value)])
    rows += _kernel_rows(target == 1, spacing, args.repeats, args.only)

    try:
        import torch
        from monai.metrics import (
            compute_average_surface_distance,
            compute_dice,
            compute_hausdorff_distance,
        )

        def onehot(x):
            return torch.nn.functional.one_hot(torch.from_numpy(x).long(), 3).permute(3, 0, 1, 2)[None]

        p_t, t_t = onehot(prediction), onehot(target)
        monai_jobs = {
            "dice": lambda: compute_dice(p_t, t_t, include_background=False),
            "hd95": lambda: compute_hausdorff_distance(p_t, t_t, percentile=95, spacing=spacing),
            "assd": lambda: compute_average_surface_distance(p_t, t_t, symmetric=True, spacing=spacing),
        }
        for name, fn in monai_jobs.items():
            if name not in args.only:
                continue
            _, median, value = _time(fn, args.repeats)
            rows.append([name, "monai", None, median, np.asarray(value).ravel()])
    except ImportError:
        print("MONAI not installed: jmed only")

    print(
        f"{'row':<16} {'library':<7} {'compile s':>10} {'median s':>10} {'vs jmed':>8}  "
        "values (metrics: GM, WM; edt: sum of distances; components: count, largest)"
    )
    jmed_time = {r[0]: r[3] for r in rows if r[1] == "jmed"}
    for name, lib, compile_s, median, value in sorted(rows, key=lambda r: (r[0], r[1] != "jmed")):
        ratio = median / jmed_time[name]
        compile_text = f"{compile_s:10.3f}" if compile_s is not None else f"{'-':>10}"
        values = ", ".join(f"{v:.4f}" for v in np.ravel(value))
        print(f"{name:<16} {lib:<7} {compile_text} {median:10.4f} {ratio:7.2f}x  {values}")


_ROWS = ("dice", "hd95", "assd", "edt", "components")


def _kernel_rows(mask: np.ndarray, spacing, repeats: int, only) -> list:
    """Distance transform and connected components of one mask: jmed, scipy, edt, cc3d."""
    import cc3d
    import edt
    from scipy import ndimage

    from jmed.ops import labels as label_ops

    rows = []
    if "edt" in only:
        jobs = {
            "jmed": lambda: np.asarray(metrics.distance_transform(mask, spacing)),
            "scipy": lambda: ndimage.distance_transform_edt(~mask, sampling=spacing),
            "edt": lambda: edt.edt(~mask, anisotropy=spacing, black_border=False),
        }
        for lib, fn in jobs.items():
            _, median, value = _time(fn, repeats)
            rows.append(["edt (GM mask)", lib, None, median, np.asarray([value.sum()])])
    if "components" in only:
        structure = np.ones((3, 3, 3), bool)

        def summary(labels, num):
            return np.asarray([num, np.bincount(labels.ravel())[1:].max()])

        for connectivity, scipy_structure in ((6, None), (26, structure)):
            name = f"components {connectivity}"
            jobs = {
                "jmed": lambda c=connectivity: summary(*label_ops.connected_components(mask, connectivity=c)),
                "scipy": lambda s=scipy_structure: summary(*ndimage.label(mask, s)),
                "cc3d": lambda c=connectivity: summary(
                    *cc3d.connected_components(mask, connectivity=c, return_N=True)
                ),
            }
            for lib, fn in jobs.items():
                _, median, value = _time(fn, repeats)
                rows.append([name, lib, None, median, value])
        _, median, value = _time(lambda: label_ops.keep_largest(mask), repeats)
        rows.append(["keep largest 6", "jmed", None, median, np.asarray([value.sum()])])
    return rows


def cases(quick: bool, volume) -> list:
    """Metric rows for ``benchmarks.run``: target = the label map, prediction = it shifted."""
    from benchmarks.common import Case

    target = volume.seg.astype(np.int32)
    prediction = np.roll(target, (2, 0, 1), axis=(0, 1, 2))
    spacing = (1.0, 1.0, 1.0)

    def build(name):
        def fns():
            pred_j, tgt_j = jax.device_put(prediction), jax.device_put(target)
            ours = {
                "dice": lambda: metrics.dice_score(pred_j, tgt_j, num_classes=3, include_background=False),
                "hd95": lambda: metrics.hausdorff_distance(pred_j, tgt_j, spacing=spacing, num_classes=3),
                "assd": lambda: metrics.average_surface_distance(
                    pred_j, tgt_j, spacing=spacing, num_classes=3
                ),
            }[name]
            out = {"jmed": lambda i: ours()}
            try:
                import torch
                from monai.metrics import (
                    compute_average_surface_distance,
                    compute_dice,
                    compute_hausdorff_distance,
                )

                def onehot(x):
                    return torch.nn.functional.one_hot(torch.from_numpy(x).long(), 3).permute(3, 0, 1, 2)[
                        None
                    ]

                p_t, t_t = onehot(prediction), onehot(target)
                theirs = {
                    "dice": lambda: compute_dice(p_t, t_t, include_background=False),
                    "hd95": lambda: compute_hausdorff_distance(p_t, t_t, percentile=95, spacing=spacing),
                    "assd": lambda: compute_average_surface_distance(
                        p_t, t_t, symmetric=True, spacing=spacing
                    ),
                }[name]
                out["monai"] = lambda i: theirs()
            except ImportError:
                pass
            return out

        return fns

    names = ("dice",) if quick else ("dice", "hd95", "assd")
    return [
        Case(
            "metrics",
            f"{name} (3 classes)",
            build=build(name),
            unit="volume",
            note="prediction = target shifted",
        )
        for name in names
    ]


if __name__ == "__main__":
    main()
