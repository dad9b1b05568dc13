"""Exact percentiles of (masked) volumes, fast on CPU and jittable.

Definition (numpy's default ``method="linear"``, Hyndman & Fan type 7): with the ``n``
selected values sorted as ``v[0] <= ... <= v[n - 1]`` and ``h = (n - 1) * q / 100``,

    ``percentile(q) = v[floor(h)] + (h - floor(h)) * (v[floor(h) + 1] - v[floor(h)])``

so ``q = 0`` is the minimum and ``q = 100`` the maximum. Only two order statistics per
percentile are needed, never a full sort (a sort of 10^7 voxels takes over a second with
XLA on CPU):

* on the host (concrete arrays, in the loader) and in programs compiled for CPU (under
  ``jit``, through a callback that reads the buffers in place): an exact two-stage
  selection in numpy. A strided sample, sorted, brackets each wanted rank; one sweep
  counts the values below and inside every bracket, a second gathers only the values
  inside them (a few percent) for a partition. Ties are settled from the counts (a background
  of zeros is never gathered); a bracket the counts show to miss its rank falls back to
  ``numpy.partition`` over all values (introselect, O(n)).
* programs compiled for accelerators use an exact radix selection on the float32 bit
  patterns: a 65536-bin histogram of the upper 16 bits finds the bin of each wanted rank,
  and a second histogram of the lower 16 bits, restricted to those bins, finds the exact
  value. Two passes over the data, no sort, exact for every float32 value (XLA:CPU runs
  these scatter-based histograms serially, hence the callback there).

NaNs are not supported: with NaNs in the selection the result is unspecified (numpy
returns NaN).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

try:
    from jax.experimental.buffer_callback import buffer_callback as _buffer_callback
except ImportError:  # a jax without it: the radix selection on every platform
    _buffer_callback = None

__all__ = ["check_percentiles", "count_true", "order_statistics", "percentile"]

_BINS = 1 << 16
# host selection: below this many values a plain introselect; above, the two-stage
# selection with a sample of n / 16 values, at most _SAMPLE_SIZE
_DIRECT_SIZE = 1 << 15
_SAMPLE_SIZE = 1 << 16
_CHUNK = 1 << 18
_MARGIN = 1.75


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


def _ravel(x: np.ndarray) -> np.ndarray:
    # memory order: no copy for C- or Fortran-ordered volumes (the order does not matter)
    return np.ravel(x, order="K")


_SIGNED = {np.dtype(np.float32): np.int32, np.dtype(np.float64): np.int64}


def _int_keys(values: np.ndarray) -> np.ndarray:
    """Float32/64 bit patterns as signed integers in the order of the values (an
    involution); other dtypes unchanged. Sorting integers is also faster than sorting
    floats in the threads XLA runs callbacks on (several times, with many ties)."""
    signed = _SIGNED.get(values.dtype)
    if signed is None:
        return values
    bits = values.view(signed)
    return bits ^ ((bits >> (bits.itemsize * 8 - 1)) & np.iinfo(signed).max)


def _from_int_keys(keys: np.ndarray, dtype: np.dtype) -> np.ndarray:
    return keys if keys.dtype == dtype else _int_keys(keys.view(dtype)).view(dtype)


def _masked(x: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``x[mask]`` (same shapes; the order does not matter): a compress over the memory
    order when both share it (boolean indexing is several times slower for scattered
    masks)."""
    for a, m in ((x, mask), (x.T, mask.T)):
        if a.flags.c_contiguous and m.flags.c_contiguous:
            return np.compress(m.reshape(-1), a.reshape(-1))
    return x[mask]


def _select(values: np.ndarray, ranks: np.ndarray) -> np.ndarray:
    """``np.sort(values)[ranks]`` by introselect (``ranks`` in ``[0, values.size - 1]``)."""
    keys = _int_keys(values)
    return _from_int_keys(np.partition(keys, np.unique(ranks))[ranks], values.dtype)


def _chunks(values: np.ndarray):
    # cache-sized pieces: a comparison over a chunk runs from cache, into a reused buffer
    for start in range(0, values.size, _CHUNK):
        yield values[start : start + _CHUNK]


def _count(values: np.ndarray, thresholds: list, counts: dict) -> None:
    """Add to ``counts`` the number of values with ``op(value, threshold)`` for each
    ``(op, threshold)`` not counted yet: one sweep over the values for all of them."""
    todo = list(dict.fromkeys(t for t in thresholds if t not in counts))
    if not todo:
        return
    totals = [0] * len(todo)
    buffer = np.empty(min(_CHUNK, values.size), bool)
    for chunk in _chunks(values):
        b = buffer[: chunk.size]
        for i, (op, threshold) in enumerate(todo):
            op(chunk, threshold, out=b)
            totals[i] += int(np.count_nonzero(b))
    counts.update(zip(todo, totals))


def _gather(values: np.ndarray, brackets: list) -> list:
    """For each ``(below, upto)`` (``(op, threshold)``; threshold ``None``: no bound;
    ``below`` selects a subset of ``upto``): the values in ``upto`` and not in ``below``.
    One sweep over the values for all brackets."""
    pieces = [[] for _ in brackets]
    first = np.empty(min(_CHUNK, values.size), bool)
    second = np.empty_like(first)
    for chunk in _chunks(values):
        low, keep = first[: chunk.size], second[: chunk.size]
        for piece, ((below_op, lo), (upto_op, hi)) in zip(pieces, brackets):
            if lo is None and hi is None:
                piece.append(chunk)
                continue
            if lo is not None:
                below_op(chunk, lo, out=low)
            if hi is None:
                np.logical_not(low, out=keep)
            else:
                upto_op(chunk, hi, out=keep)
                if lo is not None:
                    np.logical_xor(keep, low, out=keep)
            piece.append(np.compress(keep, chunk))
    return [np.concatenate(piece) for piece in pieces]


def _order_statistics_host(
    values: np.ndarray, ranks: np.ndarray, *, sample_size: int | None = None, margin: int | None = None
) -> np.ndarray:
    """``np.sort(values)[ranks]`` for a 1D array, exact, in a few passes over ``values``.

    Two stages: a strided sample of ``sample_size`` values, sorted, gives for each wanted
    rank a bracket ``[lo, hi]`` of values that holds it with a margin (both ends are
    sample values). One sweep counts the values below ``lo`` and up to ``hi`` (of every
    bracket, a cache-sized chunk at a time); when these counts prove that the rank lies
    inside, only the values in the bracket (about ``3.5 / sqrt(sample_size)`` of the
    data) are gathered, in a second sweep, and partitioned. Ties are
    handled from the counts alone: a bracket with ``lo == hi`` gathers nothing, and a
    bracket holding too many values (a large tied block at one of its ends, e.g. the zeros
    of a background) is split into its tied ends and its open interior. A rank the counts
    do not place inside its bracket (an unlucky sample) gets a four times wider bracket,
    then selection over all values, so the result is exact in every case; only the time
    varies. ``margin`` (in sample positions) overrides the default width of the brackets.
    """
    n = values.size
    ranks = np.asarray(ranks, np.int64)
    if sample_size is None:
        if n < _DIRECT_SIZE:
            return _select(values, ranks)
        sample_size = min(_SAMPLE_SIZE, n // 16)
    elif n <= 2 * sample_size:
        return _select(values, ranks)
    stride = n // sample_size
    sample = _from_int_keys(np.sort(_int_keys(values[stride // 2 :: stride])), values.dtype)
    if margin is None:
        # the sample position of a rank deviates from r * s / n by a binomial standard
        # deviation of at most sqrt(s) / 2 (less for a stratified sample of a smooth
        # image): 3.5 of those on each side
        margin = int(_MARGIN * math.sqrt(sample.size)) + 4
    counts: dict = {}
    found: dict = {}
    pending = np.unique(ranks)
    for width in (margin, 4 * margin):
        pending = _bracket_select(values, sample, stride, pending, width, counts, found)
        if not pending.size:
            break
    if pending.size:
        found.update(zip(pending.tolist(), _select(values, pending)))
    out = np.empty(ranks.shape, values.dtype)
    for i, r in enumerate(ranks.tolist()):
        out[i] = found[r]
    return out


def _bracket_select(values, sample, stride: int, wanted: np.ndarray, margin: int, counts: dict, found: dict):
    """One round of the two-stage selection (see ``_order_statistics_host``): fills
    ``found`` (rank -> value) and returns the ranks whose bracket missed them. ``counts``
    caches the counts of ``(op, threshold)`` across rounds."""
    n = values.size
    s = sample.size
    position = wanted * (s / n)
    first = np.floor(position).astype(np.int64) - margin
    last = np.ceil(position).astype(np.int64) + margin
    # groups of consecutive ranks whose brackets overlap (in values): one bracket each;
    # brackets that only share an end (a tied value) stay apart and share its counts
    groups = []
    for r, a, b in zip(wanted.tolist(), first.tolist(), last.tolist()):
        lo = None if a < 0 else sample[a]
        hi = None if b >= s else sample[b]
        previous = groups[-1] if groups else None
        if previous is not None and (lo is None or previous[2] is None or lo < previous[2]):
            previous[0].append(r)
            previous[2] = hi
            previous[4] = b
        else:
            groups.append([[r], lo, hi, a, b])

    def below(op, threshold, default):
        return default if threshold is None else counts[(op, threshold)]

    _count(
        values,
        [
            (op, t)
            for _, lo, hi, _, _ in groups
            for op, t in ((np.less, lo), (np.less_equal, hi))
            if t is not None
        ],
        counts,
    )
    missed = []
    requests = []  # (ranks, rank of the first gathered value, below, up to)
    split = []
    for group_ranks, lo, hi, a, b in groups:
        rs = np.asarray(group_ranks, np.int64)
        n_lt_lo = below(np.less, lo, 0)
        n_le_hi = below(np.less_equal, hi, n)
        if rs[0] < n_lt_lo or rs[-1] >= n_le_hi:
            missed += group_ranks
        elif lo is not None and hi is not None and lo == hi:
            found.update(dict.fromkeys(group_ranks, lo))
        elif n_le_hi - n_lt_lo <= 4 * (min(b, s) - max(a, 0) + 1) * stride:
            # about (b - a) * stride values, as expected: gather them
            requests.append((rs, n_lt_lo, (np.less, lo), (np.less_equal, hi)))
        else:
            # far more values than expected (a large tied block at an end): the tied
            # ends are counted, only the open interior is gathered
            split.append((rs, lo, hi))
    _count(
        values,
        [(op, t) for _, lo, hi in split for op, t in ((np.less_equal, lo), (np.less, hi)) if t is not None],
        counts,
    )
    for rs, lo, hi in split:
        n_le_lo = below(np.less_equal, lo, 0)
        n_lt_hi = below(np.less, hi, n)
        low_tie = rs < n_le_lo
        high_tie = rs >= n_lt_hi
        found.update(dict.fromkeys(rs[low_tie].tolist(), lo))
        found.update(dict.fromkeys(rs[high_tie].tolist(), hi))
        interior = rs[~low_tie & ~high_tie]
        if interior.size:
            requests.append((interior, n_le_lo, (np.less_equal, lo), (np.less, hi)))
    gathered = _gather(values, [(lower, upper) for _, _, lower, upper in requests])
    for (rs, offset, _, _), inside in zip(requests, gathered):
        found.update(zip(rs.tolist(), _select(inside, rs - offset)))
    return np.asarray(missed, np.int64)


def _percentile_host(x: np.ndarray, q: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    x = np.asarray(x)
    if mask is None:
        values = _ravel(x)
    else:
        values = _masked(x, np.asarray(mask).astype(bool, copy=False))
    if values.size == 0:
        raise ValueError("cannot compute percentiles of an empty selection (the mask selects no voxel)")
    return _percentile_values(values, q)


def _percentile_values(values: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Percentiles (float64) of a non-empty 1D array."""
    n = values.size
    h = (n - 1) * (q / 100.0)
    lo = np.floor(h).astype(np.int64)
    hi = np.minimum(lo + 1, n - 1)
    stats = _order_statistics_host(values, np.concatenate([lo, hi])).astype(np.float64)
    return _lerp(stats[: q.size], stats[q.size :], h - lo)


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
    ``[0, n - 1]`` are clipped. With an empty selection the result is unspecified (NaN).
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


def _percentile_radix(x, q: np.ndarray, mask) -> jax.Array:
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
    # an empty selection gives 0, as the host selection does (its order statistics are NaN)
    return jnp.where(n > 0, jnp.where(a == b, a, out), 0.0)


def _percentile_callback(x, q: np.ndarray, mask) -> jax.Array:
    """The host selection called from the compiled program: on CPU the buffers are host
    memory, read in place (no copy), and numpy's selection and counting passes are far
    faster than XLA:CPU's scatter-based histograms."""

    def host(ctx, out, values, *selection):
        values = np.asarray(values)
        values = _ravel(values) if not selection else _masked(values, np.asarray(selection[0]))
        result = np.asarray(out)
        if values.size == 0:
            result[...] = 0  # empty selection: documented as 0 under jit
        else:
            result[...] = _percentile_values(values, q)

    args = (x,) if mask is None else (x, mask.astype(bool))
    out_type = jax.ShapeDtypeStruct((q.size,), jnp.float32)
    return _buffer_callback(host, out_type, vmap_method="sequential")(*args)


def _percentile_traced(x: jax.Array, q: np.ndarray, mask) -> jax.Array:
    # the percentiles carry no gradient (as a selection of values by their bit patterns)
    x = jax.lax.stop_gradient(x)
    if not (jnp.issubdtype(x.dtype, jnp.integer) or x.dtype in (jnp.float32, jnp.float64)):
        x = x.astype(jnp.float32)
    if _buffer_callback is None:
        return _percentile_radix(x, q, mask)
    return jax.lax.platform_dependent(
        x,
        mask,
        cpu=lambda x, mask: _percentile_callback(x, q, mask),
        default=lambda x, mask: _percentile_radix(x, q, mask),
    )


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


def count_true(masks: Sequence[ArrayLike], axes: Sequence[int]) -> list[jax.Array]:
    """Counts of ``True`` in each of several same-shaped boolean ``masks`` over ``axes``.

    One variadic reduction: a single pass over the voxels, where one reduction per mask
    reads them once per mask and runs about 10x slower on XLA:CPU. Jittable and
    vmappable; returns int32 arrays with ``axes`` removed.

    Examples:
        >>> import jax.numpy as jnp
        >>> labels = jnp.array([[0, 1, 1], [2, 1, 0]])
        >>> [c.tolist() for c in count_true([labels == 1, labels == 0], axes=(1,))]
        [[2, 1], [1, 1]]
    """
    terms = [jnp.asarray(m).astype(jnp.int32) for m in masks]
    zeros = [jnp.int32(0)] * len(terms)
    return list(jax.lax.reduce(terms, zeros, lambda a, b: [x + y for x, y in zip(a, b)], tuple(axes)))
