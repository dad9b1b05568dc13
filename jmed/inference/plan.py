"""The grid plan: where the windows are, how much each voxel of each window weighs.

Everything here is static (numpy, fixed by shapes and configuration): the padding of the
volume, the window starts (per axis by ``jmed.sampling``'s rule, the one source of grid
positions), and the per-window 1D weights, normalised in advance so that accumulators only
add already-weighted windows.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jmed._checks import int_triple
from jmed.sampling import _axis_starts

MODES = ("crop", "average", "hann", "gaussian")
PADDING_MODES = ("constant", "edge", "reflect")


def _parse_grid(patch_size: Any, overlap: Any) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    patch = int_triple(patch_size, "patch_size", minimum=1)
    over = int_triple(overlap, "overlap", minimum=0)
    for p, o in zip(patch, over):
        if o >= p:
            raise ValueError(
                f"overlap must be smaller than patch_size along every axis, got overlap={over} "
                f"for patch_size={patch}"
            )
    return patch, over


def _axis_weights(length: int, patch: int, positions: np.ndarray, mode: str) -> np.ndarray:
    """Per-window 1D weights along one axis, already divided by their sum over windows.

    Returns ``(len(positions), patch)`` float64; row ``k`` multiplies the window starting
    at ``positions[k]``.
    """
    n = len(positions)
    i = np.arange(patch)
    if mode == "crop":
        # boundary between consecutive windows: the middle of their actual overlap
        bounds = [0]
        for a, b in zip(positions[:-1], positions[1:]):
            bounds.append(int(b) + max(int(a) + patch - int(b), 0) // 2)
        bounds.append(length)
        raw = np.stack(
            [(positions[k] + i >= bounds[k]) & (positions[k] + i < bounds[k + 1]) for k in range(n)]
        )
        raw = raw.astype(np.float64)
    else:
        if mode == "average":
            profile = np.ones(patch)
        elif mode == "hann":
            profile = np.sin(np.pi * (i + 0.5) / patch) ** 2
        else:  # gaussian
            sigma = 0.125 * patch
            profile = np.exp(-0.5 * ((i - (patch - 1) / 2) / sigma) ** 2)
        raw = np.broadcast_to(profile, (n, patch))
    total = np.zeros(length)
    for k in range(n):
        total[positions[k] : positions[k] + patch] += raw[k]
    if np.any(total <= 0):  # cannot happen for a grid from _axis_starts
        raise ValueError("internal error: the grid does not cover the volume")
    return np.stack([raw[k] / total[positions[k] : positions[k] + patch] for k in range(n)])


# --- padding -----------------------------------------------------------------------------


def _pad(data: jax.Array, widths: Sequence[tuple[int, int]], padding_mode: str, value: float) -> jax.Array:
    """Pad the three spatial axes of ``(x, y, z, c)`` data."""
    pad_width = [tuple(w) for w in widths] + [(0, 0)]
    if all(w == (0, 0) for w in pad_width):
        return data
    if padding_mode == "constant":
        return jnp.pad(data, pad_width, mode="constant", constant_values=value)
    return jnp.pad(data, pad_width, mode=padding_mode)


def _padding(shape, patch, over, factor, pad_borders) -> tuple[tuple[int, int], ...]:
    """Padding per axis: borders, enough for one window, a multiple of the factor."""
    widths = []
    for length, p, o, f in zip(shape, patch, over, factor):
        border = -(-(o // 2) // f) * f if pad_borders else 0
        deficit = max(p - length - 2 * border, 0)
        low = border + (deficit // 2) // f * f
        high = border + deficit - (deficit // 2) // f * f
        high += -(low + length + high) % f
        widths.append((low, high))
    return tuple(widths)


def _crop(widths, factor, spatial_shape) -> tuple[tuple[int, int], ...]:
    """``(low, length)`` per axis of the output space that ``finalize`` keeps."""
    return tuple((w[0] // f, -(-length // f)) for w, f, length in zip(widths, factor, spatial_shape))


# --- the plan ------------------------------------------------------------------------------


def _window_starts(padded_shape, patch, overlap, factor) -> list[np.ndarray]:
    """Window starts per axis in output space (the padded shape divided by ``factor``)."""
    return [_axis_starts(s // f, p // f, o // f) for s, p, o, f in zip(padded_shape, patch, overlap, factor)]


def _locations(positions: Sequence[np.ndarray], factor: Sequence[int]) -> np.ndarray:
    """Window starts ``(n, 3)`` in padded input coordinates, first axis slowest."""
    grid = np.stack(np.meshgrid(*positions, indexing="ij"), axis=-1).reshape(-1, 3)
    return grid * np.asarray(factor)


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Everything static about one aggregation: shapes, factor, window starts, weight tables.

    A value (equal fields, equal plan), so programs keyed on a plan are shared by every
    aggregation of the same geometry.
    """

    padded_shape: tuple[int, int, int]
    patch: tuple[int, int, int]
    overlap: tuple[int, int, int]
    factor: tuple[int, int, int]
    mode: str

    @functools.cached_property
    def out_patch(self) -> tuple[int, int, int]:
        return tuple(p // f for p, f in zip(self.patch, self.factor))

    @functools.cached_property
    def out_shape(self) -> tuple[int, int, int]:
        return tuple(s // f for s, f in zip(self.padded_shape, self.factor))

    @functools.cached_property
    def positions(self) -> list[np.ndarray]:
        """Window starts per axis in output space."""
        return _window_starts(self.padded_shape, self.patch, self.overlap, self.factor)

    @functools.cached_property
    def tables(self) -> list[np.ndarray]:
        """Normalised weights per axis, ``(len(positions[axis]), out_patch[axis])`` float32."""
        return [
            _axis_weights(s, p, pos, self.mode).astype(np.float32)
            for s, p, pos in zip(self.out_shape, self.out_patch, self.positions)
        ]

    def locations(self) -> np.ndarray:
        """Window starts in padded input coordinates, ``(n, 3)``."""
        return _locations(self.positions, self.factor)

    def output_starts(self, starts: jax.Array) -> jax.Array:
        """Input-space window starts ``(b, 3)`` to output-space starts."""
        return starts // jnp.asarray(self.factor, starts.dtype)

    def axis_weights(self, out_starts: jax.Array, valid: jax.Array) -> list[jax.Array]:
        """Normalised 1D weights ``[(b, qx), (b, qy), (b, qz)]``; invalid windows get 0."""
        per_axis = []
        for axis in range(3):
            index = jnp.searchsorted(
                jnp.asarray(self.positions[axis]), out_starts[:, axis], method="compare_all"
            )
            index = jnp.clip(index, 0, len(self.positions[axis]) - 1)
            per_axis.append(jnp.asarray(self.tables[axis])[index])
        per_axis[0] = per_axis[0] * valid.astype(jnp.float32)[:, None]
        return per_axis

    def schedule(self, global_batch: int) -> tuple[np.ndarray, np.ndarray]:
        """Window starts ``(total, 3)`` and validity ``(total,)``, padded to whole batches."""
        locations = self.locations()
        n = len(locations)
        total = -(-n // global_batch) * global_batch
        starts = np.zeros((total, 3), np.int32)
        starts[:n] = locations
        valid = np.zeros(total, np.float32)
        valid[:n] = 1.0
        return starts, valid


@functools.lru_cache(maxsize=64)
def _make_plan(padded_shape, patch, over, factor, mode) -> _Plan:
    # one instance per geometry, so its weight tables are computed once
    return _Plan(padded_shape, patch, over, factor, mode)


def _gather(volume: jax.Array, starts: jax.Array, patch: Sequence[int]) -> jax.Array:
    """Windows ``(b, *patch, c)`` starting at ``starts`` ``(b, 3)``.

    One ``dynamic_slice`` per window, stacked: on CPU this is faster than ``vmap`` of
    ``dynamic_slice`` (which lowers to a general XLA gather).
    """
    size = (*patch, volume.shape[-1])
    windows = [
        jax.lax.dynamic_slice(volume, (starts[b, 0], starts[b, 1], starts[b, 2], 0), size)
        for b in range(starts.shape[0])
    ]
    return jnp.stack(windows)


def _check_output(out_shape, batch, patch, num_channels=None) -> tuple[tuple[int, int, int], int]:
    """Downsampling factor and channel count from a prediction's shape."""
    out_shape = tuple(out_shape)
    ok = len(out_shape) == 5 and out_shape[0] == batch
    factor = ()
    if ok:
        for p, q in zip(patch, out_shape[1:4]):
            if q < 1 or p % q:
                ok = False
                break
            factor += (p // q,)
    if not ok:
        raise ValueError(
            f"predict must return (batch, x, y, z, channels) with batch {batch} and a spatial shape "
            f"equal to patch_size {tuple(patch)} or patch_size divided by an integer factor; "
            f"got shape {out_shape}"
        )
    if num_channels is not None and out_shape[-1] != num_channels:
        raise ValueError(f"outputs have {out_shape[-1]} channels, expected {num_channels}")
    return factor, out_shape[-1]


def _output_affine(affine, factor):
    """The affine of the output grid: output voxel ``j`` is the centre of input voxels
    ``[j f, (j + 1) f)``."""
    if all(f == 1 for f in factor):
        return affine
    scale = np.eye(4)
    for axis, f in enumerate(factor):
        scale[axis, axis] = f
        scale[axis, 3] = (f - 1) / 2
    if isinstance(affine, np.ndarray):
        return affine @ scale.astype(affine.dtype)
    affine = jnp.asarray(affine)
    return jnp.matmul(affine, jnp.asarray(scale, affine.dtype), precision=jax.lax.Precision.HIGHEST)
