"""Pull-resampling of channels-last volumes driven by an output -> input voxel mapping.

``out[p] = data(matrix @ p + displacement[p])`` for every output voxel index ``p``, where
``matrix`` is a 4x4 affine from output voxel indices to (fractional) input voxel indices
and ``displacement`` an optional ``(X, Y, Z, 3)`` field in input voxels. Arrays only (no
``Image``); all functions are jittable and differentiable in ``data``.

Samples outside the input are padded: ``"constant"`` uses ``pad_value`` for every
neighbour outside the input (so between the border voxel and the outside, linear
interpolation blends towards ``pad_value``), ``"edge"`` repeats the border voxels.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

__all__ = ["PAD_MODES", "resample"]

PAD_MODES = ("constant", "edge")


def _coordinates(matrix: jax.Array, output_shape: tuple[int, int, int], displacement) -> list[jax.Array]:
    # Broadcast one axis at a time: XLA fuses these into the gather, so no (3, X, Y, Z)
    # grid is built up front for affine-only mappings.
    axes = [jnp.arange(n, dtype=jnp.float32) for n in output_shape]
    i = axes[0][:, None, None]
    j = axes[1][None, :, None]
    k = axes[2][None, None, :]
    coords = [matrix[d, 0] * i + matrix[d, 1] * j + matrix[d, 2] * k + matrix[d, 3] for d in range(3)]
    if displacement is not None:
        coords = [c + displacement[..., d] for d, c in enumerate(coords)]
    return [jnp.broadcast_to(c, output_shape) for c in coords]


def resample(
    data: ArrayLike,
    matrix: ArrayLike,
    output_shape: tuple[int, int, int],
    *,
    order: int = 1,
    displacement: ArrayLike | None = None,
    pad_mode: str = "constant",
    pad_value: ArrayLike = 0.0,
) -> jax.Array:
    """Resample ``data`` ``(x, y, z, c)`` on an output grid of ``output_shape``.

    Args:
        data: input volume, channels last.
        matrix: 4x4 output-voxel -> input-voxel affine.
        output_shape: static spatial shape of the output.
        order: 0 (nearest; keeps dtype, for labels) or 1 (trilinear; float output).
        displacement: optional ``(*output_shape, 3)`` offsets in input voxels, added after
            ``matrix``.
        pad_mode: ``"constant"`` or ``"edge"``.
        pad_value: value outside the input for ``"constant"`` (scalar or per channel).

    Returns:
        Array of shape ``(*output_shape, c)``.
    """
    if order not in (0, 1):
        raise ValueError(f"order must be 0 (nearest) or 1 (linear), got {order!r}")
    if pad_mode not in PAD_MODES:
        raise ValueError(f"pad_mode must be one of {PAD_MODES}, got {pad_mode!r}")
    data = jnp.asarray(data)
    if data.ndim != 4:
        raise ValueError(f"data must be (x, y, z, c), got shape {data.shape}")
    output_shape = tuple(int(n) for n in output_shape)
    matrix = jnp.asarray(matrix, jnp.float32)
    if displacement is not None:
        displacement = jnp.asarray(displacement, jnp.float32)
        if displacement.shape != (*output_shape, 3):
            raise ValueError(f"displacement must have shape {(*output_shape, 3)}, got {displacement.shape}")
    in_shape = data.shape[:3]
    channels = data.shape[3]
    flat = data.reshape(-1, channels)
    strides = (in_shape[1] * in_shape[2], in_shape[2], 1)
    coords = _coordinates(matrix, output_shape, displacement)

    def gather(idx):
        inside = jnp.ones(output_shape, bool)
        flat_index = jnp.zeros(output_shape, jnp.int32)
        for d in range(3):
            inside &= (idx[d] >= 0) & (idx[d] <= in_shape[d] - 1)
            clipped = jnp.clip(idx[d], 0, in_shape[d] - 1)
            flat_index += clipped * strides[d]
        values = jnp.take(flat, flat_index.reshape(-1), axis=0).reshape(*output_shape, channels)
        return values, inside

    if order == 0:
        idx = [jnp.floor(c + 0.5).astype(jnp.int32) for c in coords]
        values, inside = gather(idx)
        if pad_mode == "constant":
            pad = jnp.broadcast_to(jnp.asarray(pad_value, data.dtype), (channels,))
            values = jnp.where(inside[..., None], values, pad)
        return values

    out_dtype = data.dtype if jnp.issubdtype(data.dtype, jnp.floating) else jnp.float32
    lower = [jnp.floor(c) for c in coords]
    frac = [c - f for c, f in zip(coords, lower)]
    lower = [f.astype(jnp.int32) for f in lower]
    total = jnp.zeros((*output_shape, channels), out_dtype)
    inside_weight = jnp.zeros(output_shape, out_dtype)
    for corner in itertools.product((0, 1), repeat=3):
        idx = [lo + c for lo, c in zip(lower, corner)]
        weight = jnp.ones(output_shape, out_dtype)
        for d, c in enumerate(corner):
            weight = weight * (frac[d] if c else 1.0 - frac[d])
        values, inside = gather(idx)
        if pad_mode == "constant":
            weight = jnp.where(inside, weight, 0.0)
            inside_weight = inside_weight + weight
        total = total + weight[..., None] * values.astype(out_dtype)
    if pad_mode == "constant":
        pad = jnp.broadcast_to(jnp.asarray(pad_value, out_dtype), (channels,))
        total = total + (1.0 - inside_weight)[..., None] * pad
    return total
