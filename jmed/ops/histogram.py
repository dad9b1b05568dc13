"""Exact percentiles of (masked) volumes, fast on CPU and jittable.

Definition (numpy's default ``method="linear"``, Hyndman & Fan type 7): with the ``n``
selected values sorted as ``v[0] <= ... <= v[n - 1]`` and ``h = (n - 1) * q / 100``,

    ``percentile(q) = v[floor(h)] + (h - floor(h)) * (v[floor(h) + 1] - v[floor(h)])``

so ``q = 0`` is the minimum and ``q = 100`` the maximum. Only two order statistics per
percentile are needed, never a full sort (a sort of 10^7 voxels takes over a second with
XLA on CPU):

* concrete arrays (eager, in the loader) use ``numpy.partition`` (introselect, O(n));
* traced arrays (under ``jit``) use an exact radix selection on the float32 bit
  patterns: a 65536-bin histogram of the upper 16 bits finds the bin of each wanted rank,
  and a second histogram of the lower 16 bits, restricted to those bins, finds the exact
  value. Two passes over the data, no sort, exact for every float32 value.

NaNs are not supported (they count as larger than +inf in the traced path; numpy returns
NaN).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

__all__ = ["check_percentiles", "order_statistics", "percentile"]

_BINS = 1 << 16


def check_percentiles(q: float | Sequence[float], name: str = "percentiles") -> np.ndarray:
    """Validate percentiles: finite numbers in ``[0, 100]``; returns a float64 array."""
    arr = np.asarray(q, dtype=np.float64) if not isinstance(q, bool) else None
    if arr is None or arr.ndim > 1 or not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must be a number or a sequence of numbers in [0, 100], got {q!r}")
    if np.any(arr < 0) or np.any(arr > 100):
        raise ValueError(f"{name} must lie in [0, 100], got {q!r}")
    return arr


def _is_traced(*xs) -> bool:
    return any(isinstance(x, jax.core.Tracer) for x in xs)


def _lerp(a, b, t):
    # numpy's formula (stable at both ends, exact where a == b)
    diff = b - a
    out = np.where(t >= 0.5, b - diff * (1 - t), a + diff * t)
    return np.where(a == b, a, out)


def _percentile_host(x: np.ndarray, q: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    values = np.asarray(x).reshape(-1)
    if mask is not None:
        values = values[np.asarray(mask).reshape(-1).astype(bool)]
    n = values.size
    if n == 0:
        raise ValueError("cannot compute percentiles of an empty selection (the mask selects no voxel)")
    h = (n - 1) * (q / 100.0)
    lo = np.floor(h).astype(np.int64)
    hi = np.minimum(lo + 1, n - 1)
    part = np.partition(values, np.unique(np.concatenate([lo, hi])))
    a = part[lo].astype(np.float64)
    b = part[hi].astype(np.float64)
    return _lerp(a, b, h - lo)


# --- traced path -------------------------------------------------------------------------


def _to_key(x: jax.Array) -> jax.Array:
    """Monotone map float32 -> uint32 (order of keys = order of values)."""
    bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    negative = (bits >> 31) == 1
    return jnp.where(negative, ~bits, bits | jnp.uint32(0x80000000))


def _from_key(key: jax.Array) -> jax.Array:
    positive = (key >> 31) == 1
    bits = jnp.where(positive, key & jnp.uint32(0x7FFFFFFF), ~key)
    return jax.lax.bitcast_convert_type(bits, jnp.float32)


def _cumsum_bins(hist: jax.Array) -> jax.Array:
    """Inclusive cumulative sum over the last axis (65536 bins) with two small matmuls.

    XLA's cumsum over 65536 entries compiles slowly on CPU; a 256 x 256 block split with an
    integer triangular matrix product gives the same counts exactly.
    """
    lead = hist.shape[:-1]
    blocks = hist.reshape(*lead, 256, 256)
    upper = jnp.triu(jnp.ones((256, 256), jnp.int32))
    within = jnp.matmul(blocks, upper)
    totals = within[..., -1]
    before = jnp.matmul(totals, upper) - totals
    return (within + before[..., None]).reshape(hist.shape)


def order_statistics(x: ArrayLike, ranks: ArrayLike, *, mask: ArrayLike | None = None) -> jax.Array:
    """The ``ranks``-th smallest (0-based) of the (masked) values of ``x``. Jittable, exact.

    Values are compared as float32. ``ranks`` (1D, int) may be traced; ranks outside
    ``[0, n - 1]`` are clipped. With an empty selection the result is meaningless (0).
    Meant for a few ranks: the second pass holds a 65536-bin histogram per rank.
    """
    keys = _to_key(jnp.asarray(x).reshape(-1))
    ranks = jnp.asarray(ranks, jnp.int32).reshape(-1)
    num = ranks.shape[0]
    if mask is None:
        valid = None
        n = keys.shape[0]
    else:
        valid = jnp.asarray(mask).reshape(-1).astype(bool)
        n = jnp.sum(valid, dtype=jnp.int32)
    ranks = jnp.clip(ranks, 0, jnp.maximum(n - 1, 0))
    top = (keys >> 16).astype(jnp.int32)
    low = (keys & jnp.uint32(0xFFFF)).astype(jnp.int32)
    dump = _BINS
    index = top if valid is None else jnp.where(valid, top, dump)
    hist = jnp.zeros(_BINS + 1, jnp.int32).at[index].add(1, mode="promise_in_bounds")[:_BINS]
    cum = _cumsum_bins(hist)
    # first bin whose cumulative count exceeds the rank (a reduction: cheaper to compile
    # than searchsorted)
    bins = jnp.sum(cum[None, :] <= ranks[:, None], axis=1, dtype=jnp.int32)
    within = ranks - (cum[bins] - hist[bins])
    # second pass: one histogram row per distinct wanted bin (queries sharing a bin share
    # its row: the first of the sorted bins equal to it); other voxels go to a dump bin
    sorted_bins = jnp.sort(bins)
    first = jnp.sum(sorted_bins[None, :] < bins[:, None], axis=1, dtype=jnp.int32)
    slot = jnp.minimum(jnp.sum(sorted_bins[None, :] < top[:, None], axis=1, dtype=jnp.int32), num - 1)
    hit = sorted_bins[slot] == top
    if valid is not None:
        hit &= valid
    index2 = jnp.where(hit, slot * _BINS + low, num * _BINS)
    hist2 = jnp.zeros(num * _BINS + 1, jnp.int32).at[index2].add(1, mode="promise_in_bounds")
    rows = hist2[: num * _BINS].reshape(num, _BINS)[first]
    cum2 = _cumsum_bins(rows)
    lows = jnp.sum(cum2 <= within[:, None], axis=1, dtype=jnp.int32).astype(jnp.uint32)
    key = (bins.astype(jnp.uint32) << 16) | lows
    return _from_key(key)


def _split_bits(value: float, bits: int, parts: int) -> list[float]:
    """Split a float64 into float32 pieces of at most ``bits`` significant bits each."""
    out = []
    rest = float(value)
    for i in range(parts):
        if rest == 0.0 or i == parts - 1:
            piece = float(np.float32(rest))
        else:
            exponent = math.frexp(rest)[1]
            scale = 2.0 ** (bits - exponent)
            piece = math.floor(rest * scale) / scale
        out.append(piece)
        rest -= piece
    return out


def _position(m: jax.Array, fraction: float) -> tuple[jax.Array, jax.Array]:
    """``floor`` and fractional part of ``m * fraction`` (``m`` int32, possibly traced).

    float32 cannot hold ``m * fraction`` for ``m`` ~ 10^7 with its fractional part, so both
    factors are split into pieces whose pairwise products are exact in float32; integer and
    fractional parts are summed separately.
    """
    m = jnp.asarray(m, jnp.int32)
    m_parts = [(m >> s) & 0x7FF for s in (22, 11, 0)]
    m_parts = [(p << s).astype(jnp.float32) for p, s in zip(m_parts, (22, 11, 0))]
    f_parts = _split_bits(fraction, 12, 3)
    whole = jnp.int32(0)
    frac = jnp.float32(0.0)
    for mp in m_parts:
        for fp in f_parts:
            t = mp * jnp.float32(fp)
            t_int = jnp.floor(t)
            whole = whole + t_int.astype(jnp.int32)
            frac = frac + (t - t_int)
    carry = jnp.floor(frac)
    return whole + carry.astype(jnp.int32), frac - carry


def _percentile_traced(x, q: np.ndarray, mask) -> jax.Array:
    if mask is None:
        n = jnp.int32(np.size(x))
    else:
        n = jnp.sum(jnp.asarray(mask).astype(bool), dtype=jnp.int32)
    m = jnp.maximum(n - 1, 0)
    positions = [_position(m, float(f)) for f in q / 100.0]
    lo = jnp.stack([p[0] for p in positions])
    t = jnp.stack([p[1] for p in positions])
    hi = jnp.minimum(lo + 1, m)
    stats = order_statistics(x, jnp.concatenate([lo, hi]), mask=mask)
    a, b = stats[: q.size], stats[q.size :]
    diff = b - a
    out = jnp.where(t >= 0.5, b - diff * (1 - t), a + diff * t)
    return jnp.where(a == b, a, out)


def percentile(x: ArrayLike, q: float | Sequence[float], *, mask: ArrayLike | None = None):
    """Percentiles ``q`` (in ``[0, 100]``) of ``x``, or of ``x[mask]``; see module docstring.

    Args:
        x: any array (all of it is used; reduce channels yourself if needed).
        q: a number or a sequence of numbers (static).
        mask: optional boolean array of ``x``'s shape (or broadcastable to it).

    Returns:
        float64 numpy values for concrete inputs, a float32 ``jax.Array`` under ``jit``;
        shape of ``q``.

    Raises:
        ValueError: percentiles outside ``[0, 100]``; an empty mask (concrete inputs only:
            under ``jit`` an empty selection gives 0).

    Examples:
        >>> import numpy as np
        >>> x = np.arange(11.0)
        >>> float(percentile(x, 25)), percentile(x, [0, 95]).tolist()
        (2.5, [0.0, 9.5])
    """
    scalar = isinstance(q, numbers.Number)
    qa = check_percentiles(q, "q").reshape(-1)
    if mask is not None:
        mask = (
            jnp.broadcast_to(mask, jnp.shape(x))
            if _is_traced(mask, x)
            else np.broadcast_to(mask, np.shape(x))
        )
    if _is_traced(x, mask):
        out = _percentile_traced(jnp.asarray(x), qa, mask)
    else:
        out = _percentile_host(np.asarray(x), qa, mask)
    return out[0] if scalar else out
