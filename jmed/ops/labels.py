"""Connected components of 3D binary masks, on the host (numpy, no scipy).

The labelling is run-based and vectorised (no per-voxel Python loop):

1. each maximal run of foreground voxels along the last axis gets an id (a cumulative
   sum over run starts);
2. runs in neighbouring rows that touch (for 6-connectivity: share a face; for
   26-connectivity: also an edge or a corner) are joined by an edge, found with shifted
   boolean arrays (one edge per touching stretch, not per voxel);
3. a union-find over runs with vectorised hooking (``numpy.minimum.at``) and pointer
   jumping merges the runs into components;
4. components are numbered ``1..n`` in the raster order of their first voxel, as
   ``scipy.ndimage.label``.

Work is restricted to the bounding box of the foreground. All functions take and return
numpy arrays of shape ``(x, y, z)``.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

__all__ = ["CONNECTIVITIES", "component_sizes", "connected_components", "fill_holes", "keep_largest"]

CONNECTIVITIES = (6, 26)


def check_connectivity(connectivity: int, name: str = "connectivity") -> int:
    if connectivity not in CONNECTIVITIES:
        raise ValueError(f"{name} must be 6 (faces) or 26 (faces, edges and corners), got {connectivity!r}")
    return int(connectivity)


def _row_offsets(connectivity: int) -> list[tuple[int, int]]:
    """Offsets (dx, dy) from a row to the neighbouring rows that come later in raster order."""
    if connectivity == 6:
        return [(1, 0), (0, 1)]
    return [(0, 1), (1, -1), (1, 0), (1, 1)]


def _find_roots(parent: np.ndarray) -> np.ndarray:
    while True:
        grand = parent[parent]
        if np.array_equal(grand, parent):
            return parent
        parent = grand


def _union(num: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Root (smallest member id) of every node of the graph with edges ``(a, b)``.

    Each round hooks the larger root of every edge onto the smaller one, then compresses
    paths fully; every root with an edge hooks or is hooked, so the number of components
    with edges at least halves per round.
    """
    parent = np.arange(num, dtype=np.int32)
    lo, hi = np.minimum(a, b), np.maximum(a, b)
    while True:
        keep = lo != hi
        if not keep.any():
            break
        lo, hi = lo[keep], hi[keep]
        np.minimum.at(parent, hi, lo)
        parent = _find_roots(parent)
        lo, hi = parent[lo], parent[hi]
        lo, hi = np.minimum(lo, hi), np.maximum(lo, hi)
    return parent


def connected_components(mask: ArrayLike, *, connectivity: int = 6) -> tuple[np.ndarray, int]:
    """Label the connected components of a 3D boolean mask.

    Args:
        mask: ``(x, y, z)`` array; nonzero voxels are foreground.
        connectivity: 6 (neighbours share a face) or 26 (also an edge or a corner).

    Returns:
        ``(labels, n)``: int32 labels (0 background, components ``1..n`` numbered in
        raster order of their first voxel, as ``scipy.ndimage.label``) and their count.

    Examples:
        >>> m = np.zeros((3, 3, 3), bool); m[0, 0, 0] = m[1, 1, 1] = True
        >>> connected_components(m)[1], connected_components(m, connectivity=26)[1]
        (2, 1)
    """
    check_connectivity(connectivity)
    full = np.asarray(mask)
    if full.ndim != 3:
        raise ValueError(f"mask must be 3D (x, y, z), got shape {full.shape}")
    full = full.astype(bool, copy=False)
    labels_full = np.zeros(full.shape, np.int32)
    if not full.any():
        return labels_full, 0
    # bounding box of the foreground
    box = []
    for axis in range(3):
        profile = np.flatnonzero(full.any(axis=tuple(a for a in range(3) if a != axis)))
        box.append(slice(int(profile[0]), int(profile[-1]) + 1))
    box = tuple(box)
    # a zero border makes every neighbour index valid and stops runs at the box edges
    m = np.pad(full[box], 1)
    flat = m.reshape(-1)
    sy, sx = m.shape[2], m.shape[1] * m.shape[2]
    fg = np.flatnonzero(flat)
    prev = flat[fg - 1]
    # 1. runs along z, numbered in raster order
    is_start = ~prev
    run_of_fg = np.cumsum(is_start, dtype=np.int32) - 1
    num_runs = int(run_of_fg[-1]) + 1
    run_flat = np.empty(flat.size, np.int32)  # read only at foreground voxels
    run_flat[fg] = run_of_fg
    starts = fg[is_start]
    ends = fg[~flat[fg + 1]]
    run_ids = np.arange(num_runs, dtype=np.int32)
    # 2. edges between touching runs of neighbouring rows
    edges_a, edges_b = [], []
    for dx, dy in _row_offsets(connectivity):
        offset = dx * sx + dy * sy
        nb = fg + offset
        touch = flat[nb]
        # consecutive touching voxels join the same two runs: keep the first of each stretch
        keep = touch & ~(prev & flat[nb - 1])
        edges_a.append(run_of_fg[keep])
        edges_b.append(run_flat[nb[keep]])
        if connectivity == 26:
            # diagonal contacts along z not covered by a face contact happen only past the
            # end or before the start of a run
            for base, dz in ((ends, 1), (starts, -1)):
                nb = base + offset + dz
                touch = flat[nb]
                edges_a.append(run_ids[touch])
                edges_b.append(run_flat[nb[touch]])
    a = np.concatenate(edges_a)
    b = np.concatenate(edges_b)
    # 3. union-find over runs
    roots = _union(num_runs, a, b)
    # 4. number components in raster order of their first run
    is_root = roots == run_ids
    component = np.cumsum(is_root, dtype=np.int32)[roots]
    labels_p = np.zeros(flat.size, np.int32)
    labels_p[fg] = component[run_of_fg]
    labels_full[box] = labels_p.reshape(m.shape)[1:-1, 1:-1, 1:-1]
    return labels_full, int(np.count_nonzero(is_root))


def component_sizes(labels: np.ndarray, num: int) -> np.ndarray:
    """Voxel count of components ``1..num`` (index 0 is component 1)."""
    return np.bincount(labels.reshape(-1), minlength=num + 1)[1:]


def keep_largest(mask: ArrayLike, *, connectivity: int = 6) -> np.ndarray:
    """Boolean mask of the largest component (the first in raster order on ties)."""
    labels, num = connected_components(mask, connectivity=connectivity)
    if num <= 1:
        return labels > 0
    return labels == int(np.argmax(component_sizes(labels, num))) + 1


def fill_holes(mask: ArrayLike, *, connectivity: int = 6, fillable: ArrayLike | None = None) -> np.ndarray:
    """Fill the holes of a mask: background components that do not touch the border.

    Args:
        mask: ``(x, y, z)`` foreground.
        connectivity: connectivity of the background components.
        fillable: optional boolean array; a hole is filled only if all its voxels are
            fillable (e.g. unlabelled), else it is left alone.

    Returns:
        The mask with its holes filled.
    """
    mask = np.asarray(mask).astype(bool)
    labels, num = connected_components(~mask, connectivity=connectivity)
    if num == 0:
        return mask
    touching = np.zeros(num + 1, bool)
    for axis in range(3):
        for index in (0, -1):
            touching[np.take(labels, index, axis=axis).reshape(-1)] = True
    fill = ~touching
    fill[0] = False
    if fillable is not None:
        blocked = np.bincount(labels[~np.asarray(fillable, bool)].reshape(-1), minlength=num + 1) > 0
        fill &= ~blocked
    return mask | fill[labels]
