"""Connected components of 3D binary masks, on the host.

Labelling is ``cc3d.connected_components`` (connected-components-3d), run on the bounding
box of the foreground. Components are numbered ``1..n`` in the C raster order of their first
voxel, exactly as ``scipy.ndimage.label`` numbers them with the same connectivity. All
functions take and return numpy arrays of shape ``(x, y, z)``; they run where values are
concrete (in the loader's preprocessing, or on a prediction), not under ``jit``.
"""

from __future__ import annotations

import cc3d
import numpy as np
from numpy.typing import ArrayLike

from jmed._checks import check_choice

__all__ = ["CONNECTIVITIES", "component_sizes", "connected_components", "fill_holes", "keep_largest"]

# neighbours sharing a face (6), also an edge (18), also a corner (26)
CONNECTIVITIES = (6, 18, 26)


def check_connectivity(connectivity: int, name: str = "connectivity") -> int:
    """``connectivity`` as an int if it is 6, 18 or 26.

    Raises:
        ValueError: naming ``name``, the value and the allowed values.
    """
    if isinstance(connectivity, bool):
        connectivity = None  # True == 1 is not a connectivity
    check_choice(connectivity, name, CONNECTIVITIES)
    return int(connectivity)


def _foreground_box(mask: np.ndarray) -> tuple[slice, ...]:
    box = []
    for axis in range(3):
        profile = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
        box.append(slice(int(profile[0]), int(profile[-1]) + 1))
    return tuple(box)


def connected_components(mask: ArrayLike, *, connectivity: int = 6) -> tuple[np.ndarray, int]:
    """Label the connected components of a 3D boolean mask.

    Args:
        mask: ``(x, y, z)`` array; nonzero voxels are foreground.
        connectivity: 6 (neighbours share a face), 18 (also an edge) or 26 (also a corner).

    Returns:
        ``(labels, n)``: int32 labels (0 background, components ``1..n`` numbered in
        raster order of their first voxel, as ``scipy.ndimage.label``) and their count.

    Raises:
        ValueError: a connectivity other than 6, 18 or 26, or a mask that is not 3D.

    Examples:
        >>> m = np.zeros((3, 3, 3), bool); m[0, 0, 0] = m[1, 1, 1] = True
        >>> connected_components(m)[1], connected_components(m, connectivity=26)[1]
        (2, 1)
    """
    connectivity = check_connectivity(connectivity)
    full = np.asarray(mask)
    if full.ndim != 3:
        raise ValueError(f"mask must be 3D (x, y, z), got shape {full.shape}")
    full = full.astype(bool, copy=False)
    labels_full = np.zeros(full.shape, np.int32)
    if not full.any():
        return labels_full, 0
    box = _foreground_box(full)
    # cc3d numbers components in the raster order of its input's memory layout: C order
    # gives scipy's numbering
    labels, num = cc3d.connected_components(
        np.ascontiguousarray(full[box]), connectivity=connectivity, return_N=True
    )
    labels_full[box] = labels
    return labels_full, int(num)


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
        connectivity: connectivity of the background components (6, 18 or 26).
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
