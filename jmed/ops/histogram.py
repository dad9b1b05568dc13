"""Exact percentiles of (masked) volumes: on the host, and jittable on every platform.

Definition (numpy's default ``method="linear"``, Hyndman & Fan type 7): with the ``n``
selected values sorted as ``v[0] <= ... <= v[n - 1]`` and ``h = (n - 1) * q / 100``,

    ``percentile(q) = v[floor(h)] + (h - floor(h)) * (v[floor(h) + 1] - v[floor(h)])``

so ``q = 0`` is the minimum and ``q = 100`` the maximum. Only two order statistics per
percentile are needed, never a full sort (a sort of 10^7 voxels takes over a second with
XLA on CPU). Two algorithms select them, both exact:

* concrete arrays (eager calls, the loader's preprocessing): a two-stage selection in
  numpy. A strided sample, sorted, brackets each wanted rank; one sweep counts the values
  below and inside every bracket, a second gathers only the values inside them (a few
  percent) for a partition. Ties are settled from the counts (a background of zeros is
  never gathered); a bracket the counts show to miss its rank falls back to
  ``numpy.partition`` over all values (introselect, O(n)).
* traced arrays (``jit``, ``vmap``, ``shard_map``, ``jax.export``; the same program on CPU,
  GPU and TPU): a selection by counting on the bit patterns, made order-preserving
  (float32 values, and integers of up to 32 bits, exactly; other dtypes as float32).
  Each wanted rank keeps an interval of keys that holds it; every pass counts the keys
  below three thresholds per rank and finds the smallest and largest key inside each
  interval, all in one reduction over the data, and keeps the part that holds the rank.
  A sorted strided sample places the first thresholds; interpolated guesses (and the
  midpoint) the next. About 7 to 9 passes for float32 volumes, one for a rank inside a
  block of ties (a background of zeros), no sort of the data, no scatter, no host
  callback: it batches under ``vmap``, partitions with the batch over a device mesh and
  exports for every platform.

Under ``jit`` the order statistics are exact and the interpolation between them is
computed in float32 (numpy's formula), so a percentile that falls on a value (``h``
whole, e.g. the median of an odd count) equals numpy's exactly and the others agree to
float32 rounding. NaNs are not supported: with NaNs in the selection the result is
unspecified (numpy returns NaN).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from jmed._checks import is_traced

__all__ = ["check_percentiles", "count_true", "order_statistics", "percentile"]

# host selection: below this many values a plain introselect; above, the two-stage
# selection with a sample of n / _SAMPLE_FRACTION values, at most _SAMPLE_SIZE
_DIRECT_SIZE = 1 << 15
_SAMPLE_SIZE = 1 << 16
_SAMPLE_FRACTION = 16
# values per pass of the chunked host scans (bounds their temporary boolean buffers)
_CHUNK = 1 << 18
# host bracket half-width around a rank's sample position, in units of sqrt(sample size)
# (a rank's position in the sample has a standard deviation of at most sqrt(size) / 2, so
# this is 3.5 standard deviations: a missed bracket, which costs a second pass, is rare)
_MARGIN = 1.75
# device bracket around a rank's expected sample position: this many binomial standard
# deviations, plus a few positions for ranks at the ends of the sample
_DEVICE_MARGIN_SD = 3.5
_DEVICE_MARGIN_POSITIONS = 2.0


def check_percentiles(q: float | Sequence[float], name: str = "percentiles") -> np.ndarray:
    """Validate percentiles: finite numbers in ``[0, 100]``; returns a float64 array."""
    arr = np.asarray(q, dtype=np.float64) if not isinstance(q, bool) else None
    if arr is None or arr.ndim > 1 or not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must be a number or a sequence of numbers in [0, 100], got {q!r}")
    if np.any(arr < 0) or np.any(arr > 100):
        raise ValueError(f"{name} must lie in [0, 100], got {q!r}")
    return arr


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
    involution); other dtypes unchanged. Integer keys also sort faster than floats
    (docs/performance.md)."""
    signed = _SIGNED.get(values.dtype)
    if signed is None:
        return values
    bits = values.view(signed)
    return bits ^ ((bits >> (bits.itemsize * 8 - 1)) & np.iinfo(signed).max)


def _from_int_keys(keys: np.ndarray, dtype: np.dtype) -> np.ndarray:
    return keys if keys.dtype == dtype else _int_keys(keys.view(dtype)).view(dtype)


def _masked(x: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``x[mask]`` (same shapes; the order does not matter): a compress over the memory
    order when both share it, which beats boolean indexing for scattered masks."""
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
        sample_size = min(_SAMPLE_SIZE, n // _SAMPLE_FRACTION)
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


_SIGN = 0x80000000


def _to_key(x: jax.Array) -> jax.Array:
    """Monotone map float32 -> uint32 (order of keys = order of values)."""
    bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    negative = (bits >> 31) == 1
    return jnp.where(negative, ~bits, bits | jnp.uint32(_SIGN))


def _from_key(key: jax.Array) -> jax.Array:
    positive = (key >> 31) == 1
    bits = jnp.where(positive, key & jnp.uint32(0x7FFFFFFF), ~key)
    return jax.lax.bitcast_convert_type(bits, jnp.float32)


def _keys(x: jax.Array):
    """``(keys, decode)``: uint32 keys in the order of the values of ``x`` and the map
    back to values. Integers of up to 32 bits are keyed exactly (and decoded to their
    dtype); every other dtype is compared as float32."""
    dtype = x.dtype
    if jnp.issubdtype(dtype, jnp.unsignedinteger) and dtype.itemsize <= 4:
        return x.astype(jnp.uint32), lambda key: key.astype(dtype)
    if jnp.issubdtype(dtype, jnp.signedinteger) and dtype.itemsize <= 4:
        # flipping the sign bit orders two's complement integers as unsigned ones
        bits = jax.lax.bitcast_convert_type(x.astype(jnp.int32), jnp.uint32) ^ jnp.uint32(_SIGN)
        return bits, lambda key: jax.lax.bitcast_convert_type(key ^ jnp.uint32(_SIGN), jnp.int32).astype(
            dtype
        )
    return _to_key(x), _from_key


_TOP = 0xFFFFFFFF
# traced selection: a sorted strided sample of this many keys places the first thresholds
_DEVICE_SAMPLE = 1 << 12
# traced selection: after the first pass, thresholds bracket an interpolated guess at
# this fraction of the interval on either side
_WINDOW = 64


def _sweep(keys: jax.Array, valid, thresholds: jax.Array, low: jax.Array, high: jax.Array):
    """One pass over the keys, as one variadic reduction: ``#(keys < t)`` for every
    threshold ``t`` (``(ranks, k)``), and the smallest and the largest key inside each
    rank's interval ``[low, high]`` (valid keys only)."""
    num, k = thresholds.shape
    terms, inits, ops = [], [], []
    for r in range(num):
        for i in range(k):
            below = keys < thresholds[r, i]
            terms.append((below if valid is None else below & valid).astype(jnp.int32))
            inits.append(jnp.int32(0))
            ops.append(jnp.add)
    inside = [(keys >= low[r]) & (keys <= high[r]) for r in range(num)]
    if valid is not None:
        inside = [m & valid for m in inside]
    for r in range(num):
        terms.append(jnp.where(inside[r], keys, jnp.uint32(_TOP)))
        inits.append(jnp.uint32(_TOP))
        ops.append(jnp.minimum)
    for r in range(num):
        terms.append(jnp.where(inside[r], keys, jnp.uint32(0)))
        inits.append(jnp.uint32(0))
        ops.append(jnp.maximum)
    out = jax.lax.reduce(
        terms, inits, lambda a, b: [op(u, v) for op, u, v in zip(ops, a, b)], tuple(range(keys.ndim))
    )
    counts = jnp.stack(out[: num * k]).reshape(num, k)
    return counts, jnp.stack(out[num * k : num * k + num]), jnp.stack(out[num * k + num :])


def _take(values: jax.Array, index: jax.Array) -> jax.Array:
    return jnp.take_along_axis(values, index[:, None], axis=1)[:, 0]


def _narrow(state, thresholds, ranks, keys, valid):
    """One pass: shrink each rank's key interval ``[low, high]`` to the part between the
    thresholds that holds it (a threshold ``t`` with ``#(keys < t) <= rank`` is at most
    the wanted key; one with more is above it), then to the keys present in it. ``state``
    also carries ``#(keys < low)`` and ``#(keys <= high)``; no key lies between ``low``
    and the smallest key inside, so snapping to the keys present keeps both counts."""
    low, high, below_low, upto_high = state
    counts, smallest, largest = _sweep(keys, valid, thresholds, low, high)
    k = thresholds.shape[1]
    # thresholds are sorted, so the ones at or below the wanted key come first
    j = jnp.sum(counts <= ranks[:, None], axis=1, dtype=jnp.int32)
    raise_low = j > 0
    at = jnp.maximum(j - 1, 0)
    low = jnp.where(raise_low, _take(thresholds, at), low)
    below_low = jnp.where(raise_low, _take(counts, at), below_low)
    lower_high = j < k
    at = jnp.minimum(j, k - 1)
    high = jnp.where(lower_high, _take(thresholds, at) - jnp.uint32(1), high)
    upto_high = jnp.where(lower_high, _take(counts, at), upto_high)
    return jnp.maximum(low, smallest), jnp.minimum(high, largest), below_low, upto_high


def _select_keys(keys: jax.Array, valid, n: jax.Array, ranks: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The ``ranks``-th smallest (valid) keys, exactly, and how many keys are ``<=`` each.

    ``keys`` outside the selection must hold ``_TOP`` (see ``_masked_keys``); ``valid``
    (or ``None``) only places the sample.

    Each rank keeps an interval of keys known to hold it; every pass counts, in one sweep,
    the keys below a few thresholds inside each interval, keeps the part between the
    thresholds that holds the rank and shrinks it to the smallest and largest key present
    (found in the same sweep). The first thresholds come from a sorted strided sample
    (around where the rank falls in it, and just above that sample value, which settles
    a rank inside a block of ties at once); later ones bracket a guess interpolated from
    the counts at both ends, with the midpoint as a safeguard, until the interval holds a
    single key. The result never depends on the sample or the guesses, only the number
    of passes does (about 7 to 9 for float32 volumes; 1 for a rank inside a block of ties).
    """
    flat = keys.reshape(-1)
    size = flat.shape[0]
    stride = max(size // _DEVICE_SAMPLE, 1)
    sample = flat[stride // 2 :: stride]
    if valid is None:
        in_sample = jnp.float32(sample.shape[0])
    else:
        chosen = valid.reshape(-1)[stride // 2 :: stride]
        sample = jnp.where(chosen, sample, jnp.uint32(_TOP))  # left out: sorted last
        in_sample = jnp.sum(chosen, dtype=jnp.int32).astype(jnp.float32)
    sample = jnp.sort(sample)
    # a rank's position in the sample varies by a binomial standard deviation: thresholds
    # _DEVICE_MARGIN_SD of those (and _DEVICE_MARGIN_POSITIONS) on either side, and at the
    # expected position
    p = (ranks.astype(jnp.float32) + 0.5) / jnp.maximum(n, 1).astype(jnp.float32)
    position = p * in_sample
    margin = _DEVICE_MARGIN_POSITIONS + _DEVICE_MARGIN_SD * jnp.sqrt(in_sample * p * (1 - p))
    at = jnp.stack([position - margin, position, position + margin], axis=1)
    at = jnp.clip(jnp.round(at), 0, sample.shape[0] - 1).astype(jnp.int32)
    first, middle, last = sample[at[:, 0]], sample[at[:, 1]], sample[at[:, 2]]
    step = jnp.uint32(1)
    thresholds = jnp.stack(
        [first, middle, jnp.maximum(middle, middle + step), jnp.maximum(last, last + step)], axis=1
    )
    num = ranks.shape[0]
    state = (
        jnp.zeros(num, jnp.uint32),
        jnp.full(num, _TOP, jnp.uint32),
        jnp.zeros(num, jnp.int32),
        jnp.broadcast_to(jnp.asarray(n, jnp.int32), (num,)),
    )
    state = _narrow(state, thresholds, ranks, keys, None)

    def unresolved(state):
        return jnp.any(state[0] < state[1])

    def split(state):
        low, high, below_low, upto_high = state
        width = jnp.where(high > low, high - low, jnp.uint32(0))
        # guess the key by linear interpolation of the counts at both ends (values are
        # locally near uniform inside a narrow interval) and bracket the guess tightly;
        # the midpoint at least halves the interval when the guess is off
        span = jnp.maximum(upto_high - below_low, 1).astype(jnp.float32)
        fraction = jnp.clip((ranks - below_low).astype(jnp.float32) + 0.5, 0.0, span) / span
        extent = width.astype(jnp.float32)
        guess = fraction * extent
        window = extent * (1.0 / _WINDOW)
        # at most the largest float32 below 2**32: its conversion stays in range
        upper = jnp.minimum(extent, np.float32(4294967040.0))

        def key_at(offset):
            offset = jnp.clip(offset, 1.0, upper).astype(jnp.uint32)
            return low + jnp.minimum(offset, width)

        below, above = key_at(guess - window), key_at(guess + window)
        midpoint = low + (width - width // 2)
        thresholds = jnp.sort(jnp.stack([below, midpoint, above], axis=1), axis=1)
        return _narrow(state, thresholds, ranks, keys, None)

    low, _, _, upto = jax.lax.while_loop(unresolved, split, state)
    return low, upto


def _next_above(keys: jax.Array, valid, below: jax.Array) -> jax.Array:
    """For each key of ``below``, the smallest (valid) key above it (``_TOP`` if none):
    one pass, one variadic reduction."""
    top = jnp.uint32(_TOP)
    terms = []
    for i in range(below.shape[0]):
        above = keys > below[i]
        terms.append(jnp.where(above if valid is None else above & valid, keys, top))
    out = jax.lax.reduce(
        terms,
        [top] * len(terms),
        lambda a, b: [jnp.minimum(u, v) for u, v in zip(a, b)],
        tuple(range(keys.ndim)),
    )
    return jnp.stack(out)


def _masked_keys(keys: jax.Array, valid) -> jax.Array:
    """Keys outside the selection set to ``_TOP``: never below a threshold (every
    threshold is at most ``_TOP``), so each pass counts the selection alone without
    reading the mask again. A selected key equal to ``_TOP`` (a float NaN, or the largest
    uint32) is then counted by no threshold either, which leaves the ranks of all the
    others unchanged; a rank among those keys resolves to ``_TOP`` as it should."""
    return keys if valid is None else jnp.where(valid, keys, jnp.uint32(_TOP))


def order_statistics(x: ArrayLike, ranks: ArrayLike, *, mask: ArrayLike | None = None) -> jax.Array:
    """The ``ranks``-th smallest (0-based) of the (masked) values of ``x``. Jittable, exact.

    Integers of up to 32 bits are compared exactly and returned in their dtype; other
    values are compared and returned as float32. ``ranks`` (1D, int) may be traced;
    ranks outside ``[0, n - 1]`` are clipped. With an empty selection the result is
    unspecified. Meant for a few ranks: each pass over the values compares them with
    three thresholds per rank (about 7 to 9 passes for float32 volumes).
    """
    keys, decode = _keys(jnp.asarray(x))
    ranks = jnp.asarray(ranks, jnp.int32).reshape(-1)
    if mask is None:
        valid = None
        n = jnp.int32(keys.size)
    else:
        valid = jnp.broadcast_to(jnp.asarray(mask), keys.shape).astype(bool)
        n = jnp.sum(valid, dtype=jnp.int32)
    ranks = jnp.clip(ranks, 0, jnp.maximum(n - 1, 0))
    return decode(_select_keys(_masked_keys(keys, valid), valid, n, ranks)[0])


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


def _percentile_device(x: jax.Array, q: np.ndarray, mask) -> jax.Array:
    """Percentiles of traced values (see the module docstring), float32."""
    # the percentiles carry no gradient (a selection of values by their bit patterns)
    keys, decode = _keys(jax.lax.stop_gradient(x))
    if mask is None:
        valid = None
        n = jnp.int32(keys.size)
    else:
        valid = jnp.asarray(mask).astype(bool)
        n = jnp.sum(valid, dtype=jnp.int32)
    m = jnp.maximum(n - 1, 0)
    positions = [_position(m, float(f)) for f in q / 100.0]
    lo = jnp.stack([p[0] for p in positions])
    t = jnp.stack([p[1] for p in positions])
    hi = jnp.minimum(lo + 1, m)
    keys = _masked_keys(keys, valid)
    low_key, upto = _select_keys(keys, valid, n, lo)
    # the next order statistic: the same value unless the lower one ends at its rank (a
    # key above it exists then; the _TOP of left-out keys is never below it)
    high_key = jnp.where(hi < upto, low_key, _next_above(keys, None, low_key))
    a = decode(low_key).astype(jnp.float32)
    b = decode(high_key).astype(jnp.float32)
    diff = b - a
    out = jnp.where(t >= 0.5, b - diff * (1 - t), a + diff * t)
    # an empty selection gives 0 (not NaN, which would spread through a normalisation)
    return jnp.where(n > 0, jnp.where(a == b, a, out), 0.0)


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
            jnp.broadcast_to(mask, jnp.shape(x)) if is_traced(mask, x) else np.broadcast_to(mask, np.shape(x))
        )
    if is_traced(x, mask):
        out = _percentile_device(jnp.asarray(x), qa, mask)
    else:
        out = _percentile_host(np.asarray(x), qa, mask)
    return out[0] if scalar else out


def count_true(masks: Sequence[ArrayLike], axes: Sequence[int]) -> list[jax.Array]:
    """Counts of ``True`` in each of several same-shaped boolean ``masks`` over ``axes``.

    One variadic reduction: a single pass over the voxels (one reduction per mask would
    read them once per mask). Jittable and vmappable; returns int32 arrays with ``axes``
    removed.

    Examples:
        >>> import jax.numpy as jnp
        >>> labels = jnp.array([[0, 1, 1], [2, 1, 0]])
        >>> [c.tolist() for c in count_true([labels == 1, labels == 0], axes=(1,))]
        [[2, 1], [1, 1]]
    """
    terms = [jnp.asarray(m).astype(jnp.int32) for m in masks]
    zeros = [jnp.int32(0)] * len(terms)
    return list(jax.lax.reduce(terms, zeros, lambda a, b: [x + y for x, y in zip(a, b)], tuple(axes)))
