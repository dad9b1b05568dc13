"""Shape buckets: a few compiled programs for volumes of many shapes.

XLA compiles one program per input shape, and nearly every subject of a real dataset has
its own shape. Here volumes are padded on the host to one of a few *bucket* shapes,
chosen from the shapes of the whole dataset (read from the headers), and carry their true
shape as ``Image.extent``, a traced value. Padding-aware transforms and samplers (see
``is_padding_aware``) respect the extent: rotation centres, flips, elastic grids, noise
fields and out-of-field values are those of the unpadded volume, patches lie inside it,
so the valid voxels come out as they would without padding, and one program serves every
volume of a bucket.

Padding goes at the high end of each axis, so the affine is unchanged: voxel ``(i, j, k)``
of the padded volume is voxel ``(i, j, k)`` of the original.

- ``plan_buckets(shapes)`` picks at most ``max_buckets`` shapes covering ``shapes``,
  adding a bucket only while it saves a good share of the padded voxels.
- ``bucket_for(shape, buckets)`` is the smallest bucket that holds ``shape``.
- ``pad_subject(subject, shape)`` pads every image (host, numpy) and sets its extent;
  ``crop_to_extent`` undoes it.
- ``valid_mask(spatial_shape, extent)`` is the (jittable) mask of valid voxels.
- ``kernel_buckets(buckets)`` is a context in which eager resampling kernels (``Resample``)
  run on bucket shapes too (input padded, output cropped on the host), so that
  preprocessing subjects of many shapes also compiles a bounded number of programs.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from jmed._checks import int_triple
from jmed.image import Image, Subject
from jmed.ops.crop_pad import valid_mask

__all__ = [
    "bucket_for",
    "crop_to_extent",
    "is_padding_aware",
    "kernel_buckets",
    "pad_subject",
    "plan_buckets",
    "valid_mask",
]

Shape = tuple[int, int, int]


def _as_shape(value: Any, name: str) -> Shape:
    """A spatial shape: 3 positive ints (one int means a cube)."""
    try:
        return int_triple(value, name)
    except ValueError:
        raise ValueError(f"{name} must be 3 positive ints, got {value!r}") from None


def _round_up(shape: np.ndarray, multiple: int) -> np.ndarray:
    return -(-shape // multiple) * multiple


def plan_buckets(
    shapes: Sequence[Sequence[int]],
    *,
    max_buckets: int = 4,
    multiple: int = 8,
    min_gain: float = 0.25,
) -> list[Shape]:
    """At most ``max_buckets`` bucket shapes covering every shape in ``shapes``.

    Shapes are sorted by volume and split into consecutive groups; a group's bucket is the
    elementwise maximum of its shapes rounded up to a multiple of ``multiple`` (an axis
    of size 1, a 2D slice, stays 1). The split minimises the total number of padded voxels
    over the dataset (each shape counted as often as it occurs). One more bucket is
    added only while it removes at least ``min_gain`` of the remaining voxels, since each
    bucket costs one compilation per program.

    Args:
        shapes: spatial shapes, one per volume (repeats count).
        max_buckets: most buckets returned (>= 1).
        multiple: bucket sizes are multiples of this (>= 1).
        min_gain: fraction of the padded voxels that one more bucket must save (0..1).

    Returns:
        bucket shapes, smallest volume first.

    Raises:
        ValueError: no shapes, a bad shape, or bad options.

    Examples:
        >>> plan_buckets([(100, 100, 100), (101, 99, 100), (200, 210, 190)])
        [(104, 104, 104), (200, 216, 192)]
        >>> plan_buckets([(100, 100, 100), (104, 104, 100)], max_buckets=1)
        [(104, 104, 104)]
    """
    if isinstance(max_buckets, bool) or not isinstance(max_buckets, (int, np.integer)) or max_buckets < 1:
        raise ValueError(f"max_buckets must be an int >= 1, got {max_buckets!r}")
    if isinstance(multiple, bool) or not isinstance(multiple, (int, np.integer)) or multiple < 1:
        raise ValueError(f"multiple must be an int >= 1, got {multiple!r}")
    if not 0.0 <= float(min_gain) <= 1.0:
        raise ValueError(f"min_gain must be in [0, 1], got {min_gain!r}")
    items = [_as_shape(s, f"shapes[{i}]") for i, s in enumerate(shapes)]
    if not items:
        raise ValueError("plan_buckets needs at least one shape")
    unique, counts = np.unique(np.array(items, np.int64), axis=0, return_counts=True)
    order = np.argsort(np.prod(unique, axis=1), kind="stable")
    unique, counts = unique[order], counts[order]
    n = len(unique)

    def rounded(shape: np.ndarray) -> np.ndarray:
        return np.where(shape == 1, 1, _round_up(shape, multiple))

    # cost[i, j]: padded voxels of one bucket holding shapes i..j
    cost = np.full((n, n), np.inf)
    for i in range(n):
        running = np.maximum.accumulate(unique[i:], axis=0)
        volume = np.prod(rounded(running), axis=1).astype(float)
        cost[i, i:] = volume * np.cumsum(counts[i:])
    # best[k][j]: least cost of shapes 0..j in k + 1 buckets; cut[k][j]: start of the last
    best = [cost[0].copy()]
    cuts = [np.zeros(n, np.int64)]
    for _ in range(1, min(max_buckets, n)):
        prev = best[-1]
        cur, cut = cost[0].copy(), np.zeros(n, np.int64)
        for j in range(1, n):
            options = prev[:j] + cost[1 : j + 1, j]
            s = int(np.argmin(options))
            if options[s] < cur[j]:
                cur[j], cut[j] = options[s], s + 1
        best.append(cur)
        cuts.append(cut)
    k = 0
    while k + 1 < len(best) and best[k + 1][-1] <= (1.0 - float(min_gain)) * best[k][-1]:
        k += 1
    buckets, j = [], n - 1
    for level in range(k, -1, -1):
        start = int(cuts[level][j]) if level > 0 else 0
        buckets.append(tuple(int(v) for v in rounded(unique[start : j + 1].max(axis=0))))
        j = start - 1
    return sorted(set(buckets), key=lambda b: (math.prod(b), b))


def bucket_for(shape: Sequence[int], buckets: Sequence[Sequence[int]]) -> Shape | None:
    """The smallest (by volume) bucket at least as large as ``shape`` on every axis, or
    ``None`` if no bucket holds it.

    Examples:
        >>> bucket_for((90, 100, 80), [(96, 96, 96), (128, 128, 96)])
        (128, 128, 96)
    """
    shape = _as_shape(shape, "shape")
    fits = [tuple(int(v) for v in b) for b in buckets if all(s <= int(v) for s, v in zip(shape, b))]
    return min(fits, key=lambda b: (math.prod(b), b)) if fits else None


def _fill_value(image: Image, data: np.ndarray) -> np.ndarray:
    if image.is_label or data.size == 0:
        return np.zeros((), data.dtype)
    # the background of an intensity image: what an out-of-field voxel most plausibly holds
    return data.reshape(-1, data.shape[-1]).min(axis=0)


def pad_array(data: np.ndarray, shape: Sequence[int], fill: Any) -> np.ndarray:
    """``data`` ``(x, y, z, c)`` padded at the high end of each spatial axis to ``shape``
    with ``fill`` (scalar or per channel), as a new C-ordered numpy array."""
    data = np.asarray(data)
    out = np.empty((*shape, data.shape[-1]), data.dtype)
    x, y, z = data.shape[:3]
    out[:x, :y, :z] = data
    fill = np.asarray(fill, data.dtype)
    out[x:] = fill
    out[:x, y:] = fill
    out[:x, :y, z:] = fill
    return out


def pad_subject(subject: Subject, shape: Sequence[int]) -> Subject:
    """Every image of ``subject`` padded (host, numpy) at the high end to ``shape``, with
    ``extent`` set to its unpadded spatial shape; the affines are unchanged.

    Intensity images are padded with their minimum (per channel), label maps with 0, so
    that transforms which ignore the extent see a background-padded volume.

    Raises:
        ValueError: an image larger than ``shape``, or already padded.
    """
    shape = _as_shape(shape, "shape")
    images = {}
    for name, image in subject.items():
        if image.extent is not None:
            raise ValueError(f"image {name!r} already has an extent; crop_to_extent it first")
        spatial = image.spatial_shape
        if any(s > b for s, b in zip(spatial, shape)):
            raise ValueError(f"image {name!r} of spatial shape {spatial} does not fit in the bucket {shape}")
        data = np.asarray(image.data)
        if spatial == shape:
            padded = data
        else:
            padded = pad_array(data, shape, _fill_value(image, data))
        images[name] = image.replace(data=padded, extent=np.asarray(spatial, np.int32))
    return subject.replace(images)


def crop_to_extent(subject: Subject | Image) -> Subject | Image:
    """The valid part of every image (concrete extents only); the extent is removed."""
    if isinstance(subject, Image):
        if subject.extent is None:
            return subject
        x, y, z = (int(v) for v in np.asarray(subject.extent))
        return subject.replace(data=subject.data[:x, :y, :z], extent=None)
    return subject.replace({name: crop_to_extent(image) for name, image in subject.items()})


def is_padding_aware(transform: Any) -> bool:
    """Whether ``transform`` gives, on the valid voxels of a padded volume, what it gives
    on the unpadded volume (its class, or every child of a composition, says so with
    ``padding_aware = True``). ``None`` (no transform) is padding-aware."""
    if transform is None:
        return True
    children = getattr(transform, "transforms", None)
    if children is not None and not isinstance(transform, type):
        own = getattr(type(transform), "padding_aware", False)
        return own and all(is_padding_aware(t) for t in children)
    child = getattr(transform, "transform", None)
    if child is not None:
        return getattr(type(transform), "padding_aware", False) and is_padding_aware(child)
    return bool(getattr(transform, "padding_aware", False))


# --- eager kernels on bucket shapes ------------------------------------------------------

_KERNEL_BUCKETS: contextvars.ContextVar[tuple[Shape, ...] | None] = contextvars.ContextVar(
    "jmed_kernel_buckets", default=None
)


@contextlib.contextmanager
def kernel_buckets(buckets: Sequence[Sequence[int]] | None) -> Iterator[None]:
    """Within this context, eager resampling kernels run on the smallest of ``buckets``
    that holds their input and output shapes (shapes no bucket holds run as they are).
    The loader sets it around preprocessing; results are the same as without it."""
    value = None if buckets is None else tuple(_as_shape(b, "buckets[i]") for b in buckets)
    token = _KERNEL_BUCKETS.set(value)
    try:
        yield
    finally:
        _KERNEL_BUCKETS.reset(token)


def kernel_bucket(shape: Sequence[int]) -> Shape | None:
    """The active kernel bucket for ``shape`` (see ``kernel_buckets``), or ``None``."""
    buckets = _KERNEL_BUCKETS.get()
    if not buckets:
        return None
    return bucket_for(shape, buckets)


_PREDICTING: contextvars.ContextVar[bool] = contextvars.ContextVar("jmed_predicting_shapes", default=False)


@contextlib.contextmanager
def predicting_shapes() -> Iterator[None]:
    """Within this context, traced calls only predict output shapes (the loader's
    ``jax.eval_shape`` of its preprocessing, from the headers): host-only transforms that
    keep the shape (connected-component clean-up) pass their input through instead of
    refusing the traced values."""
    token = _PREDICTING.set(True)
    try:
        yield
    finally:
        _PREDICTING.reset(token)


def is_predicting_shapes() -> bool:
    """Whether ``predicting_shapes`` is active."""
    return _PREDICTING.get()


_RECORDED: contextvars.ContextVar[list | None] = contextvars.ContextVar("jmed_kernel_shapes", default=None)


@contextlib.contextmanager
def recording_kernel_shapes() -> Iterator[list[tuple[Shape, Shape]]]:
    """Collect the ``(input, output)`` spatial shapes of the eager resampling kernels run
    (or traced, e.g. under ``jax.eval_shape``) within this context: what
    ``kernel_buckets`` should cover."""
    shapes: list[tuple[Shape, Shape]] = []
    token = _RECORDED.set(shapes)
    try:
        yield shapes
    finally:
        _RECORDED.reset(token)


def note_kernel_shapes(input_shape: Sequence[int], output_shape: Sequence[int]) -> None:
    """Record a kernel's shapes when ``recording_kernel_shapes`` is active."""
    recorded = _RECORDED.get()
    if recorded is not None:
        recorded.append((tuple(int(v) for v in input_shape), tuple(int(v) for v in output_shape)))
