"""Separable cubic B-spline upsampling of a coarse control grid to a dense field.

A control grid of ``n`` points per axis (``n >= 4``) spans an axis of ``size`` voxels as
a uniform cubic B-spline with ``n - 3`` spans: voxel ``i`` sits at spline parameter
``u = i * (n - 3) / (size - 1)`` and its value is ``sum_j c[j] * B3(u - j + 1)``, so the
first and last control points lie one control spacing outside the voxel centres (as in
ITK's ``BSplineTransformInitializer``, which TorchIO's elastic deformation uses). The
weights depend only on shapes, so they are numpy constants (an axis of size 1 sits at
the middle of the control grid); the upsampling is three small
matrix products (separable), never a per-voxel 64-tap evaluation. The products request
full float32 precision: the field is a displacement in millimetres, and the default
precision of TPUs (bfloat16 passes) or GPUs (TF32) would move voxels by a visible fraction.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

__all__ = [
    "SeparableField",
    "bspline_weights",
    "bspline_weights_at",
    "control_spacing",
    "separable_field",
    "upsample",
    "upsample_separable",
]

_HIGHEST = jax.lax.Precision.HIGHEST


def _cubic_bspline(t: np.ndarray) -> np.ndarray:
    t = np.abs(t)
    return np.where(t < 1, (4 - 6 * t**2 + 3 * t**3) / 6, np.where(t < 2, (2 - t) ** 3 / 6, 0.0))


@functools.lru_cache(maxsize=64)
def _weights(size: int, num_points: int) -> np.ndarray:
    if size == 1:  # a flat axis (2D image) sits mid-grid: the field is constant along it
        u = np.array([(num_points - 3) / 2])
    else:
        u = np.arange(size) * (num_points - 3) / (size - 1)
    j = np.arange(num_points)
    return _cubic_bspline(u[:, None] - (j[None, :] - 1)).astype(np.float32)


def bspline_weights(size: int, num_points: int) -> np.ndarray:
    """Matrix ``(size, num_points)`` of cubic B-spline weights (rows sum to 1).

    Raises:
        ValueError: ``num_points < 4`` or ``size < 1``.
    """
    if int(num_points) < 4:
        raise ValueError(f"num_points must be >= 4 for a cubic B-spline, got {num_points}")
    if int(size) < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    return _weights(int(size), int(num_points))


def control_spacing(shape, num_points) -> np.ndarray:
    """Distance between control points in voxels per axis: ``(size - 1) / (n - 3)``."""
    return np.array([max(s - 1, 1) / (n - 3) for s, n in zip(shape, num_points)], float)


def upsample(control: ArrayLike, output_shape: tuple[int, int, int]) -> jax.Array:
    """Evaluate a control grid ``(n0, n1, n2, c)`` on a dense ``(*output_shape, c)`` grid.

    Jittable and differentiable in ``control``; exactly zero where ``control`` is zero.
    """
    control = jnp.asarray(control)
    if control.ndim != 4:
        raise ValueError(f"control must be (n0, n1, n2, c), got shape {control.shape}")
    weights = tuple(bspline_weights(s, n) for s, n in zip(output_shape, control.shape[:3]))
    return upsample_separable(control, weights)


def bspline_weights_at(
    positions: ArrayLike, size: int, num_points: int, *, extent: ArrayLike | None = None
) -> jax.Array:
    """Weights ``(len(positions), num_points)`` at fractional voxel ``positions`` of an
    axis of ``size`` voxels (jittable; positions may be traced). Beyond the control grid
    the weights fall to zero. ``extent`` (possibly traced) replaces ``size`` as the
    number of voxels the grid spans, for an axis padded beyond its valid voxels."""
    positions = jnp.asarray(positions, jnp.float32)
    if extent is not None:
        n = jnp.asarray(extent, jnp.float32)
        span = jnp.where(n > 1, (num_points - 3) / jnp.maximum(n - 1.0, 1.0), 0.0)
        u = positions * span + jnp.where(n > 1, 0.0, (num_points - 3) / 2)
    elif size == 1:
        u = positions + (num_points - 3) / 2
    else:
        u = positions * ((num_points - 3) / (size - 1))
    t = jnp.abs(u[:, None] - (jnp.arange(num_points, dtype=jnp.float32)[None, :] - 1.0))
    inner = (4.0 - 6.0 * t**2 + 3.0 * t**3) / 6.0
    outer = jnp.clip(2.0 - t, 0.0, None) ** 3 / 6.0
    return jnp.where(t < 1.0, inner, outer)


def upsample_separable(control: ArrayLike, weights: tuple[ArrayLike, ArrayLike, ArrayLike]) -> jax.Array:
    """``sum_abc wx[i, a] wy[j, b] wz[k, c] control[a, b, c, :]`` as three matrix products."""
    wx, wy, wz = (jnp.asarray(w) for w in weights)
    out = jnp.einsum("ia,abcd->ibcd", wx, control, precision=_HIGHEST)
    out = jnp.einsum("jb,ibcd->ijcd", wy, out, precision=_HIGHEST)
    return jnp.einsum("kc,ijcd->ijkd", wz, out, precision=_HIGHEST)


class SeparableField(NamedTuple):
    """A dense field ``(X, Y, Z, c)`` kept as ``partial (X, Y, n, c)`` and ``weights (Z, n)``.

    ``field[i, j, k] = sum_n weights[k, n] * partial[i, j, n]``. Consumers that evaluate
    the field voxel by voxel (``jmed.ops.interpolation.resample``) fuse this last
    contraction into their own loop, so the dense field is never written to memory.
    """

    partial: jax.Array
    weights: jax.Array

    @property
    def shape(self) -> tuple[int, ...]:
        x, y, _, c = self.partial.shape
        return (x, y, self.weights.shape[0], c)

    def component(self, d: int) -> jax.Array:
        """Channel ``d`` of the field, ``(X, Y, Z)``, as an elementwise expression."""
        part = self.partial[..., d]
        total = None
        for n in range(self.weights.shape[1]):
            term = part[:, :, n, None] * self.weights[None, None, :, n]
            total = term if total is None else total + term
        return total

    def dense(self) -> jax.Array:
        return jnp.einsum("kn,ijnc->ijkc", self.weights, self.partial, precision=_HIGHEST)

    def transform_vectors(self, matrix: ArrayLike) -> SeparableField:
        """The field of ``matrix @ v`` for each vector ``v`` (linear, so applied to ``partial``)."""
        matrix = jnp.asarray(matrix, self.partial.dtype)
        return self._replace(partial=jnp.matmul(self.partial, matrix.T, precision=_HIGHEST))


def separable_field(control: ArrayLike, weights: tuple[ArrayLike, ArrayLike, ArrayLike]) -> SeparableField:
    """Like ``upsample_separable`` but leaves the last (largest) contraction lazy."""
    wx, wy, wz = (jnp.asarray(w, jnp.float32) for w in weights)
    out = jnp.einsum("ia,abcd->ibcd", wx, jnp.asarray(control, jnp.float32), precision=_HIGHEST)
    out = jnp.einsum("jb,ibcd->ijcd", wy, out, precision=_HIGHEST)
    return SeparableField(out, wz)
