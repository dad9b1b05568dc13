"""Crop and pad channels-last volumes ``(x, y, z, c)`` along their three spatial axes.

Arrays only (no ``Image``). Everything here is jittable: output shapes depend only on
static arguments (ints), never on array values. ``window`` is the common primitive: it
reads a box of static size ``size`` whose first voxel is input voxel ``start`` (which may
be negative or run past the end: those voxels are padded). With concrete ``start`` it is a
static pad followed by a static slice; with a traced ``start`` (e.g. centred on a mask's
bounding box under ``jit``) it pads by ``size`` on every side and uses
``lax.dynamic_slice``.

Padding modes:

* ``"constant"``: ``value`` (scalar or one per channel).
* ``"edge"``, ``"reflect"``, ``"symmetric"``, ``"wrap"``: as ``numpy.pad``.
* ``"mean"``, ``"minimum"``, ``"maximum"`` (aliases ``"min"``, ``"max"``): a constant equal
  to that statistic of the whole volume, per channel. Unlike ``numpy.pad``'s modes of the
  same names, which use a statistic of each 1D row, this gives one background value.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from jmed._checks import check_choice, is_traced

__all__ = [
    "PAD_MODES",
    "check_pad_mode",
    "crop",
    "crop_or_pad_bounds",
    "pad",
    "valid_mask",
    "window",
]

_NUMPY_MODES = ("constant", "edge", "reflect", "symmetric", "wrap")
_STAT_MODES = {"mean": "mean", "minimum": "minimum", "maximum": "maximum", "min": "minimum", "max": "maximum"}
#: Accepted padding modes (see module docstring).
PAD_MODES = _NUMPY_MODES + tuple(_STAT_MODES)


def check_pad_mode(mode: str, name: str = "padding_mode") -> str:
    """Return the canonical name of padding ``mode`` or raise ``ValueError`` naming ``name``."""
    check_choice(mode, name, PAD_MODES)
    return _STAT_MODES.get(mode, mode)


def _as_bounds(bounds: ArrayLike, name: str) -> np.ndarray:
    b = np.asarray(bounds)
    if b.shape == ():
        b = np.full((3, 2), b)
    elif b.shape == (3,):
        b = np.stack([b, b], -1)
    elif b.shape == (6,):
        b = b.reshape(3, 2)
    if b.shape != (3, 2) or not np.issubdtype(b.dtype, np.integer) and not np.all(b == np.round(b)):
        raise ValueError(f"{name} must be an int, 3 ints, 6 ints or a (3, 2) array of ints, got {bounds!r}")
    b = b.astype(int)
    if np.any(b < 0):
        raise ValueError(f"{name} must be >= 0, got {b.ravel().tolist()}")
    return b


def _xp(data):
    # numpy in, numpy out: eager loader code then runs without compiling small XLA ops
    return np if isinstance(data, np.ndarray) else jnp


def _fill_value(data, mode: str, value: ArrayLike):
    xp = _xp(data)
    channels = data.shape[-1]
    if mode == "mean":
        fill = xp.mean(data, axis=(0, 1, 2), dtype=np.float32).astype(data.dtype)
    elif mode == "minimum":
        fill = xp.min(data, axis=(0, 1, 2))
    elif mode == "maximum":
        fill = xp.max(data, axis=(0, 1, 2))
    else:
        fill = xp.asarray(value).astype(data.dtype)
    return xp.broadcast_to(fill, (channels,))


def _asarray(data):
    return data if isinstance(data, (np.ndarray, jax.Array)) else jnp.asarray(data)


def pad(data: ArrayLike, widths: ArrayLike, *, mode: str = "constant", value: ArrayLike = 0) -> jax.Array:
    """Pad the spatial axes of ``data`` ``(x, y, z, c)``.

    Args:
        data: channels-last volume.
        widths: static padding: an int, 3 ints (same before and after) or ``(3, 2)``
            ``(before, after)`` per axis.
        mode: see the module docstring.
        value: fill for ``"constant"`` (scalar or per channel).

    Returns:
        The padded array, same dtype (numpy for numpy input).
    """
    mode = check_pad_mode(mode, "mode")
    data = _asarray(data)
    xp = _xp(data)
    w = _as_bounds(widths, "widths")
    if not w.any():
        return data
    if mode in ("edge", "reflect", "symmetric", "wrap"):
        return xp.pad(data, [*map(tuple, w.tolist()), (0, 0)], mode=mode)
    fill = _fill_value(data, mode, value)
    out_shape = tuple(int(n + a + b) for n, (a, b) in zip(data.shape[:3], w)) + data.shape[3:]
    region = tuple(slice(int(a), int(a + n)) for n, (a, _) in zip(data.shape[:3], w))
    if xp is np:
        out = np.empty(out_shape, data.dtype)
        out[...] = fill
        out[region] = data
        return out
    return jnp.broadcast_to(fill, out_shape).at[region].set(data)


def crop(data: ArrayLike, bounds: ArrayLike) -> jax.Array:
    """Remove ``bounds`` ``(3, 2)`` voxels ``(before, after)`` from each spatial axis.

    ``bounds`` is static (an int, 3 ints or ``(3, 2)`` ints, as ``pad``'s ``widths``).
    """
    data = _asarray(data)
    b = _as_bounds(bounds, "bounds")
    shape = data.shape[:3]
    if np.any(b.sum(1) >= np.asarray(shape)):
        raise ValueError(f"cropping {b.tolist()} from spatial shape {shape} leaves nothing")
    return data[tuple(slice(int(lo), int(n - hi)) for n, (lo, hi) in zip(shape, b))]


def window(
    data: ArrayLike,
    start: ArrayLike,
    size: Sequence[int],
    *,
    mode: str = "constant",
    value: ArrayLike = 0,
) -> jax.Array:
    """Box of spatial ``size`` whose voxel 0 is input voxel ``start`` (padded outside).

    ``out[i] = padded(data)[start + i]`` for ``i`` in the box, where ``padded`` extends
    ``data`` by ``mode`` (see the module docstring). ``start`` (3 ints) may be negative;
    it may be traced (jittable), ``size`` must be static.
    """
    mode = check_pad_mode(mode, "mode")
    data = _asarray(data)
    shape = np.asarray(data.shape[:3])
    size = tuple(int(s) for s in size)
    if len(size) != 3 or min(size) < 1:
        raise ValueError(f"size must be 3 positive ints, got {size}")
    if not is_traced(start, data) and isinstance(data, jax.Array):
        if isinstance(value, (int, float)):
            # a concrete device array: one compiled program (cached per shapes, start and
            # mode) instead of a chain of eager slicing and padding ops
            start = tuple(int(v) for v in np.asarray(start).reshape(3))
            return _window_jit(data, start, size, mode, value)
    if not is_traced(start):
        s = np.asarray(start).astype(int).reshape(3)
        end = s + np.asarray(size)
        before = np.maximum(-s, 0)
        after = np.maximum(end - shape, 0)
        if not before.any() and not after.any():
            return data[tuple(slice(int(a), int(a + n)) for a, n in zip(s, size))]
        if mode in ("edge", "reflect", "symmetric", "wrap"):
            # these modes depend on voxels outside the box: pad the whole volume first
            padded = pad(data, np.stack([before, after], -1), mode=mode, value=value)
            return padded[tuple(slice(int(a + b), int(a + b + n)) for a, b, n in zip(s, before, size))]
        fill = _fill_value(data, mode, value)
        lo = np.maximum(s, 0)
        hi = np.minimum(end, shape)
        if np.any(hi <= lo):
            return _xp(data).broadcast_to(fill, (*size, data.shape[3])).copy()
        inner = data[tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))]
        return pad(inner, np.stack([lo - s, end - hi], -1), mode="constant", value=fill)
    start = jnp.asarray(start, jnp.int32).reshape(3)
    margin = np.asarray(size)
    padded = pad(data, np.stack([margin, margin], -1), mode=mode, value=value)
    # clip explicitly: dynamic_slice would wrap negative indices. Boxes further outside
    # than ``size`` are so moved next to the volume, where the padding is the same for
    # constant/edge/statistic modes.
    idx = [jnp.clip(start[d] + int(margin[d]), 0, int(shape[d] + margin[d])) for d in range(3)]
    idx.append(jnp.int32(0))
    return jax.lax.dynamic_slice(padded, idx, (*size, data.shape[3]))


@jax.jit(static_argnums=(1, 2, 3, 4))
def _window_jit(data, start, size, mode, value):
    return window(data, np.asarray(start), size, mode=mode, value=value)


def crop_or_pad_bounds(shape: Sequence[int], target_shape: Sequence[int]) -> np.ndarray:
    """Start voxel (3 ints) of a ``target_shape`` box centred in ``shape``.

    Where the difference is odd, the extra voxel is cropped from (or padded at) the start:
    cropping ``d`` voxels removes ``ceil(d / 2)`` before and ``floor(d / 2)`` after, and
    padding ``d`` adds ``ceil(d / 2)`` before, as TorchIO's ``CropOrPad``.
    """
    diff = np.asarray(shape, int) - np.asarray(target_shape, int)
    return np.where(diff >= 0, -((-diff) // 2), diff // 2)


def valid_mask(spatial_shape: Sequence[int], extent: ArrayLike) -> jax.Array:
    """Boolean ``(x, y, z, 1)`` mask of the voxels at indices below ``extent`` ``(3,)``
    (jittable; ``extent`` may be traced): the valid part of a volume padded at the high
    end of each axis.

    Examples:
        >>> int(valid_mask((4, 3, 2), [2, 3, 1]).sum())
        6
    """
    extent = jnp.asarray(extent, jnp.int32)
    mask = None
    for axis, n in enumerate(spatial_shape):
        shape = [1, 1, 1, 1]
        shape[axis] = int(n)
        inside = (jnp.arange(int(n), dtype=jnp.int32) < extent[axis]).reshape(shape)
        mask = inside if mask is None else mask & inside
    return mask
