"""Separable Gaussian filtering of channels-last volumes.

Array contract: ``data`` is ``(x, y, z, c)``; each channel is filtered along the three
spatial axes; the output is floating point (integer input becomes ``float32``) and keeps
the shape. Semantics follow ``scipy.ndimage.gaussian_filter`` per channel: the kernel
``exp(-t**2 / (2 sigma**2))`` is truncated at radius ``int(truncate * sigma + 0.5)``
voxels and normalised to sum 1; an axis with that radius 0 (``sigma`` 0) is left as is.
Boundary modes use scipy's names: ``"reflect"`` (``d c b a | a b c d | d c b a``),
``"mirror"`` (``d c b | a b c d | c b a``), ``"nearest"``, ``"wrap"`` and
``"constant"`` (``cval`` outside).

``sigma`` may be traced (under ``jit`` / ``vmap``). The kernel width then is not known
when tracing. Each axis runs a sequence of two-way ``lax.switch`` es, one per compiled
width (the radii ``_BUCKETS`` below the bound given by ``max_sigma``, then the bound
itself; without a bound ``_UNBOUNDED_RADIUS_LENGTHS`` times the axis length), each
either the identity or that filter: exactly one of them filters, the one whose width
covers scipy's radius for the actual ``sigma``. Beyond radius ``_MAX_SHIFT_RADIUS`` the
filter is a loop over the taps that radius needs (a run-time trip count, one folded
gather per tap). Every variant zeroes the taps beyond scipy's radius, so the result is
exact for any ``sigma`` within the bound. Under ``vmap`` with per-sample ``sigma`` all
variants run (a ``switch`` on a batched index is a select).

Each filter pads a materialised copy of the axis, adds mirrored taps before weighting
them, and stays behind its branch, so XLA does not fuse the three axes into one loop.
With a concrete ``sigma`` (eager, one compiled program per axis) shift-and-add runs up
to radius ``_MAX_SHIFT_RADIUS`` and a banded matrix product, whose cost does not depend
on the radius, beyond. Why these choices, with measurements: docs/performance.md.
"""

from __future__ import annotations

import functools
import numbers

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from jmed._checks import check_choice, is_traced

__all__ = ["BOUNDARY_MODES", "gaussian_blur", "gaussian_kernel1d"]

BOUNDARY_MODES = ("reflect", "mirror", "nearest", "wrap", "constant")

# scipy mode -> jnp.pad mode
_PAD_MODES = {
    "reflect": "symmetric",
    "mirror": "reflect",
    "nearest": "edge",
    "wrap": "wrap",
    "constant": "constant",
}
# largest radius filtered by shift-and-add; wider kernels use the banded matrix product
_MAX_SHIFT_RADIUS = 24
# kernel radii compiled for a traced sigma (wider ones: a run-time loop over the taps)
_BUCKETS = (4, 12, 24)
# without max_sigma, the widest radius compiled for a traced sigma, in axis lengths:
# a bound is needed for the loop's trip count, and the mirrored or wrapped kernel of a
# sigma twice the axis length (at truncate 4) spans every voxel many times over
_UNBOUNDED_RADIUS_LENGTHS = 8


def _scipy_radius(sigma, truncate: float):
    return jnp.floor(truncate * sigma + 0.5).astype(jnp.int32)


def gaussian_kernel1d(sigma: ArrayLike, radius: int, *, truncate: float = 4.0) -> jax.Array:
    """Normalised Gaussian taps at offsets ``-radius..radius``.

    Taps beyond scipy's radius ``int(truncate * sigma + 0.5)`` are zero, so a static
    ``radius`` larger than needed gives the same filter. ``sigma`` 0 gives a unit impulse.
    """
    sigma = jnp.asarray(sigma, jnp.float32)
    t = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
    safe = jnp.where(sigma > 0, sigma, 1.0)
    inside = jnp.abs(t) <= _scipy_radius(sigma, truncate)
    w = jnp.where(inside, jnp.exp(-0.5 * (t / safe) ** 2), 0.0)
    w = jnp.where(sigma > 0, w, (t == 0).astype(jnp.float32))
    return w / jnp.sum(w)


def _fold_index(k, n, mode: str, xp=np):
    """Input index used for (possibly outside) position ``k`` under ``mode``; -1 = outside.

    ``xp`` is ``numpy`` (static indices) or ``jax.numpy`` (indices computed at run time);
    with ``jax.numpy`` the axis length ``n`` may be traced (the extent of a padded axis).
    """
    if not isinstance(n, (int, np.integer)):
        return _fold_index_traced(k, n, mode)
    if mode == "reflect":
        m = xp.mod(k, 2 * n)
        return xp.where(m < n, m, 2 * n - 1 - m)
    if mode == "mirror":
        if n == 1:
            return xp.zeros_like(k)
        m = xp.mod(k, 2 * n - 2)
        return xp.where(m < n, m, 2 * n - 2 - m)
    if mode == "nearest":
        return xp.clip(k, 0, n - 1)
    if mode == "wrap":
        return xp.mod(k, n)
    return xp.where((k >= 0) & (k < n), k, -1)


def _fold_index_traced(k, n, mode: str):
    """``_fold_index`` for a traced length ``n`` (>= 1)."""
    n = jnp.asarray(n, jnp.int32)
    if mode == "reflect":
        m = jnp.mod(k, 2 * n)
        return jnp.where(m < n, m, 2 * n - 1 - m)
    if mode == "mirror":
        period = jnp.maximum(2 * n - 2, 1)
        m = jnp.mod(k, period)
        return jnp.where(n == 1, 0, jnp.where(m < n, m, 2 * n - 2 - m))
    if mode == "nearest":
        return jnp.clip(k, 0, n - 1)
    if mode == "wrap":
        return jnp.mod(k, n)
    return jnp.where((k >= 0) & (k < n), k, -1)


def _padded_within(x: jax.Array, radius: int, axis: int, mode: str, cval, size) -> jax.Array:
    """``x`` extended by ``radius`` on both sides of ``axis`` as if the axis ended at
    ``size`` (traced): positions ``-radius .. size + radius - 1`` hold the boundary
    rule's values for ``x[:size]``, so the valid part of a padded volume is filtered as
    the unpadded volume is (positions beyond hold the padding, read by padded outputs
    only). Only the two ``radius``-wide margins are gathered."""
    pad = [(0, 0)] * x.ndim
    pad[axis] = (radius, radius)
    p = jnp.pad(x, pad)
    shape = [1] * x.ndim
    shape[axis] = radius
    offsets = jnp.arange(radius, dtype=jnp.int32)
    for start, positions in ((0, offsets - radius), (size + radius, size + offsets)):
        index = _fold_index(positions, size, mode, xp=jnp)
        margin = jnp.take(x, jnp.maximum(index, 0), axis=axis)
        if mode == "constant":
            margin = jnp.where((index >= 0).reshape(shape), margin, jnp.asarray(cval, x.dtype))
        p = jax.lax.dynamic_update_slice_in_dim(p, margin, start, axis=axis)
    return jax.lax.optimization_barrier(p)


def _shift_add(x: jax.Array, w: jax.Array, radius: int, axis: int, mode: str, cval, size=None) -> jax.Array:
    n = x.shape[axis]
    if size is not None:
        p = _padded_within(x, radius, axis, mode, cval, size)
    elif radius < n or mode == "constant":
        pad = [(0, 0)] * x.ndim
        pad[axis] = (radius, radius)
        kw = {"constant_values": cval} if mode == "constant" else {}
        # materialised: fused into the taps, the padding would be evaluated again per
        # tap and element
        p = jax.lax.optimization_barrier(jnp.pad(x, pad, mode=_PAD_MODES[mode], **kw))
    else:  # wider than the axis: fold indices explicitly
        p = jnp.take(x, jnp.asarray(_fold_index(np.arange(-radius, n + radius), n, mode)), axis=axis)
    # the taps are symmetric: add the two mirrored slices, then weight (half the products)
    out = w[radius] * x
    for t in range(radius):
        pair = jax.lax.slice_in_dim(p, t, t + n, axis=axis) + jax.lax.slice_in_dim(
            p, 2 * radius - t, 2 * radius - t + n, axis=axis
        )
        out = out + w[t] * pair
    return out


def _banded(x: jax.Array, w: jax.Array, radius: int, axis: int, mode: str, cval, size=None) -> jax.Array:
    n = x.shape[axis]
    rows = np.repeat(np.arange(n), 2 * radius + 1)
    taps = jnp.tile(w, n)
    if size is not None:
        return _banded_within(x, taps, rows, radius, axis, mode, cval, size)
    cols = _fold_index(np.arange(n)[:, None] + np.arange(-radius, radius + 1)[None, :], n, mode).ravel()
    keep = cols >= 0
    matrix = jnp.zeros((n, n), x.dtype).at[rows[keep], cols[keep]].add(taps[np.flatnonzero(keep)])
    out = jnp.moveaxis(jnp.tensordot(matrix, x, axes=([1], [axis]), precision="highest"), 0, axis)
    if mode == "constant" and not (isinstance(cval, numbers.Real) and cval == 0):
        # weight that falls outside the volume, times cval
        outside = jnp.zeros((n,), x.dtype).at[rows[~keep]].add(taps[np.flatnonzero(~keep)])
        shape = [1] * x.ndim
        shape[axis] = n
        out = out + cval * outside.reshape(shape)
    return out


def _banded_within(x, taps, rows, radius: int, axis: int, mode: str, cval, size) -> jax.Array:
    """``_banded`` with the boundary rule applied at ``size`` (traced) along ``axis``."""
    n = x.shape[axis]
    offsets = jnp.arange(-radius, radius + 1, dtype=jnp.int32)
    cols = _fold_index(jnp.arange(n, dtype=jnp.int32)[:, None] + offsets[None, :], size, mode, xp=jnp).ravel()
    keep = cols >= 0
    matrix = jnp.zeros((n, n), x.dtype).at[rows, jnp.maximum(cols, 0)].add(jnp.where(keep, taps, 0.0))
    out = jnp.moveaxis(jnp.tensordot(matrix, x, axes=([1], [axis]), precision="highest"), 0, axis)
    if mode == "constant" and not (isinstance(cval, numbers.Real) and cval == 0):
        outside = jnp.zeros((n,), x.dtype).at[rows].add(jnp.where(keep, 0.0, taps))
        shape = [1] * x.ndim
        shape[axis] = n
        out = out + cval * outside.reshape(shape)
    return out


# jitted so that eager calls compile once per configuration instead of dispatching
# every slice separately
@functools.partial(jax.jit, static_argnames=("radius", "axis", "mode", "truncate", "cval"))
def _filter_static(x, sigma, radius: int, axis: int, mode: str, truncate: float, cval, size=None):
    if radius == 0:
        return x
    w = gaussian_kernel1d(sigma, radius, truncate=truncate).astype(x.dtype)
    if radius <= _MAX_SHIFT_RADIUS:
        return _shift_add(x, w, radius, axis, mode, cval, size)
    return _banded(x, w, radius, axis, mode, cval, size)


def _tap_loop(x, sigma, limit: int, axis: int, mode: str, truncate: float, cval, size=None):
    """The filter of radius up to ``limit`` as a loop over the taps scipy's radius for
    ``sigma`` needs (a run-time trip count): one folded gather along ``axis`` per tap.
    ``size``: the axis ends there for the boundary rule (a padded axis; may be traced)."""
    n = x.shape[axis]
    radius = jnp.minimum(_scipy_radius(sigma, truncate), limit)
    w = gaussian_kernel1d(sigma, limit, truncate=truncate).astype(x.dtype)
    positions = jnp.arange(n)
    length = n if size is None else size

    def body(t, acc):
        index = _fold_index(positions + t, length, mode, xp=jnp)
        values = jnp.take(x, jnp.maximum(index, 0), axis=axis)
        if mode == "constant":
            shape = [1] * x.ndim
            shape[axis] = n
            values = jnp.where((index >= 0).reshape(shape), values, jnp.asarray(cval, x.dtype))
        return acc + w[t + limit] * values

    return jax.lax.fori_loop(-radius, radius + 1, body, jnp.zeros_like(x))


def gaussian_blur(
    data: ArrayLike,
    sigma: ArrayLike,
    *,
    truncate: float = 4.0,
    mode: str = "reflect",
    cval: float = 0.0,
    max_sigma: ArrayLike | None = None,
    extent: ArrayLike | None = None,
) -> jax.Array:
    """Separable Gaussian blur of ``data`` ``(x, y, z, c)`` with ``sigma`` in voxels.

    Args:
        data: channels-last volume.
        sigma: standard deviation in voxels, a scalar or one per spatial axis; may be
            traced.
        truncate: kernel half-width in standard deviations (scipy's rule).
        mode: boundary handling, one of ``BOUNDARY_MODES`` (scipy names).
        cval: value outside the volume for ``mode="constant"``.
        max_sigma: static upper bound on ``sigma`` (scalar or per axis), used only when
            ``sigma`` is traced to limit the compiled kernel widths.
        extent: optional ``(3,)`` valid voxels per axis of a volume padded at the high
            end (may be traced; see ``jmed.buckets``): the boundary rule then acts at
            the extent, so ``out[:ex, :ey, :ez]`` equals the blur of
            ``data[:ex, :ey, :ez]`` and the padding's content does not matter (the
            padded voxels of the output hold unspecified values).

    Returns:
        The blurred volume (floating dtype, same shape).

    Raises:
        ValueError: wrong ``data`` rank, unknown ``mode``, negative ``sigma`` /
            ``truncate`` / ``max_sigma``.

    Examples:
        >>> import numpy as np, scipy.ndimage
        >>> x = np.random.default_rng(0).random((8, 9, 10, 1)).astype(np.float32)
        >>> y = gaussian_blur(x, (1.0, 0.5, 2.0))
        >>> ref = scipy.ndimage.gaussian_filter(x[..., 0], (1.0, 0.5, 2.0), mode="reflect")
        >>> bool(np.allclose(y[..., 0], ref, atol=1e-5))
        True
    """
    data = jnp.asarray(data)
    if data.ndim != 4:
        raise ValueError(f"data must be (x, y, z, c), got shape {data.shape}")
    check_choice(mode, "mode", BOUNDARY_MODES)
    if not isinstance(truncate, numbers.Real) or truncate < 0:
        raise ValueError(f"truncate must be a number >= 0, got {truncate!r}")
    if not jnp.issubdtype(data.dtype, jnp.floating):
        data = data.astype(jnp.float32)
    sigma_arr = jnp.broadcast_to(jnp.asarray(sigma, jnp.float32), (3,))
    concrete = not is_traced(sigma_arr)
    if concrete:
        s = np.asarray(sigma_arr, dtype=float)
        if np.any(s < 0) or not np.all(np.isfinite(s)):
            raise ValueError(f"sigma must be finite and >= 0, got {sigma!r}")
    bounds = None
    if max_sigma is not None:
        bounds = np.broadcast_to(np.asarray(max_sigma, dtype=float), (3,))
        if np.any(bounds < 0) or not np.all(np.isfinite(bounds)):
            raise ValueError(f"max_sigma must be finite and >= 0, got {max_sigma!r}")
    if extent is not None:
        extent = jnp.asarray(extent, jnp.int32)
        if extent.shape != (3,):
            raise ValueError(f"extent must have shape (3,), got {extent.shape}")
    out = data
    for axis in range(3):
        n = data.shape[axis]
        size = None if extent is None else extent[axis]
        if concrete:
            radius = int(truncate * float(s[axis]) + 0.5)
            out = _filter_static(out, sigma_arr[axis], radius, axis, mode, float(truncate), float(cval), size)
            continue
        limit = int(truncate * bounds[axis] + 0.5) if bounds is not None else _UNBOUNDED_RADIUS_LENGTHS * n
        sig = sigma_arr[axis] if bounds is None else jnp.minimum(sigma_arr[axis], bounds[axis])
        needed = jnp.minimum(_scipy_radius(sig, truncate), limit)
        low = 0
        for radius in [b for b in _BUCKETS if b < limit] + ([limit] if limit > 0 else []):
            if radius <= _MAX_SHIFT_RADIUS:
                wide = functools.partial(
                    _filter_static,
                    radius=radius,
                    axis=axis,
                    mode=mode,
                    truncate=float(truncate),
                    cval=float(cval),
                    size=size,
                )
            else:
                wide = functools.partial(
                    _tap_loop,
                    limit=radius,
                    axis=axis,
                    mode=mode,
                    truncate=float(truncate),
                    cval=float(cval),
                    size=size,
                )
            use = ((needed > low) & (needed <= radius)).astype(jnp.int32)
            out = jax.lax.switch(use, [lambda x, sg: x, wide], out, sig)
            low = radius
    return out
