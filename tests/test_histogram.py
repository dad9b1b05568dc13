import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from jmed.ops import histogram

QS = [0, 0.5, 1, 2.5, 33.3, 50, 66.6667, 99, 99.5, 100]


def _cases():
    rng = np.random.default_rng(0)
    for trial in range(6):
        n = int(rng.integers(1, 3000))
        x = rng.normal(size=n).astype(np.float32) * 10 ** rng.uniform(-3, 3)
        if trial % 2 == 0:
            x = np.round(x)  # many ties
        if trial % 3 == 0:
            x[: n // 2] = 0.0  # background
        x[::7] *= -1
        mask = rng.random(n) < 0.6
        mask[0] = True
        yield x.astype(np.float32), mask


@pytest.mark.parametrize(("x", "mask"), list(_cases()))
def test_percentile_equals_numpy_linear(x, mask):
    expected = np.percentile(x.astype(np.float64), QS, method="linear")
    np.testing.assert_allclose(histogram.percentile(x, QS), expected, rtol=1e-6, atol=1e-6 * np.abs(x).max())
    expected_masked = np.percentile(x[mask].astype(np.float64), QS)
    np.testing.assert_allclose(histogram.percentile(x, QS, mask=mask), expected_masked, rtol=1e-6)


def _padded(x, mask):
    """``x`` and ``mask`` in arrays of one size (3000), the padding left out by the mask."""
    values = np.zeros(3000, np.float32)
    values[: x.size] = x
    selection = np.zeros(3000, bool)
    selection[: x.size] = mask
    return values, selection


def test_traced_percentile_equals_numpy():
    # one shape for every case, so each jitted function compiles once
    masked = jax.jit(lambda a, m: histogram.percentile(a, QS, mask=m))
    full = jax.jit(lambda a: histogram.percentile(a, QS))
    for x, mask in _cases():
        values, selection = _padded(x, mask)
        expected = np.percentile(x[mask].astype(np.float64), QS)
        np.testing.assert_allclose(
            masked(values, selection), expected, rtol=1e-6, atol=1e-6 * np.abs(x).max()
        )
        expected = np.percentile(values.astype(np.float64), QS)
        np.testing.assert_allclose(full(values), expected, rtol=1e-6, atol=1e-6 * np.abs(x).max())


def test_order_statistics_exact_for_every_float():
    rng = np.random.default_rng(1)
    x = np.concatenate(
        [rng.normal(size=500).astype(np.float32) * 1e-30, rng.normal(size=500).astype(np.float32) * 1e30]
    )
    x = np.concatenate([x, [np.float32(-0.0), np.float32(0.0), np.inf, -np.inf]]).astype(np.float32)
    ranks = np.concatenate([np.arange(0, x.size, 97), [1, 500, 501, x.size - 2, x.size - 1]])
    out = jax.jit(histogram.order_statistics)(x, ranks)
    np.testing.assert_array_equal(out, np.sort(x)[ranks])


def test_rank_position_for_large_counts():
    # h = m * q / 100 with its fraction, beyond what float32 holds
    for m in (8_676_187, 16_777_215, 123_456_789):
        for q in (0.5, 33.3, 99.5):
            k, frac = jax.jit(lambda m, q=q: histogram._position(m, q / 100))(m)
            h = m * q / 100
            assert abs((int(k) - np.floor(h)) + float(frac) - (h - np.floor(h))) < 1e-6


def test_percentile_scalar_and_doc_example():
    assert histogram.percentile(np.arange(11.0), 25) == 2.5
    assert histogram.percentile(np.array([3.0]), 50) == 3.0


def test_percentile_bad_input():
    x = np.arange(10.0)
    for bad in (-1, 101, [10, 200], float("nan")):
        with pytest.raises(ValueError, match=r"\[0, 100\]"):
            histogram.percentile(x, bad)
    with pytest.raises(ValueError, match="empty"):
        histogram.percentile(x, 50, mask=np.zeros(10, bool))


# --- the host selection (eager calls) -----------------------------------------------------


def _ranks_of(n, qs):
    h = (n - 1) * np.asarray(qs, float) / 100
    lo = np.floor(h).astype(np.int64)
    return np.concatenate([lo, np.minimum(lo + 1, n - 1), [0, n - 1]])


def _adversarial(n, dtype):
    """Inputs that stress the two-stage selection: ties at or across bracket ends,
    samples that miss (periodic data at the sample stride), extremes."""
    rng = np.random.default_rng(n)
    finfo = np.finfo(dtype)
    yield np.full(n, 3.25)  # all equal
    yield np.where(np.arange(n) % 2 == 0, -1.0, 2.0)  # two values
    yield np.where(rng.random(n) < 0.78, 0.0, rng.gamma(2.0, 30.0, n))  # a background of zeros
    yield np.round(rng.normal(0, 3, n))  # ties everywhere
    yield np.sort(rng.normal(size=n))[::-1]
    yield np.tile([5.0, -5.0, 0.0, 0.0], n)[:n]  # periodic
    yield np.where(np.arange(n) % 64 == 32, 1.0, rng.normal(10, 1, n))  # aliasing the sample
    extreme = rng.choice(
        [finfo.max, -finfo.max, np.inf, -np.inf, finfo.tiny, -finfo.smallest_subnormal, 0.0], n
    )
    yield extreme
    values = rng.normal(size=n)
    values[: n // 3] = -np.inf
    values[-n // 3 :] = np.inf
    yield values


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_host_order_statistics_exact_on_adversarial_inputs(dtype, monkeypatch):
    # a tiny sample forces the two-stage path (brackets, tied ends, misses) on small
    # arrays, and small chunks the sweeps over several chunks
    monkeypatch.setattr(histogram, "_CHUNK", 97)
    for n in (1, 2, 3, 5, 700, 4099):
        for x in _adversarial(n, dtype):
            x = np.asarray(x, dtype)[:n]
            ranks = _ranks_of(x.size, [0, 0.5, 1, 10, 33.3, 50, 77.9, 78, 78.1, 90, 99, 99.5, 100])
            for sample_size, margin in ((8, None), (64, None), (64, 1), (256, 3)):
                out = histogram._order_statistics_host(x, ranks, sample_size=sample_size, margin=margin)
                assert out.dtype == x.dtype
                np.testing.assert_array_equal(out, np.sort(x)[ranks])


@settings(max_examples=150, deadline=None)
@given(
    x=hnp.arrays(
        st.sampled_from([np.float32, np.float64]),
        st.integers(1, 400),
        elements=st.one_of(
            st.sampled_from([0.0, 1.0, -1.0, 2.5]), st.floats(-1e6, 1e6, width=32, allow_subnormal=True)
        ),
    ),
    qs=st.lists(st.floats(0, 100), min_size=1, max_size=12),
    sample_size=st.sampled_from([2, 5, 16]),
    margin=st.sampled_from([None, 0, 1, 2]),
)
def test_host_order_statistics_property(x, qs, sample_size, margin):
    ranks = _ranks_of(x.size, qs)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(histogram, "_CHUNK", 61)
        out = histogram._order_statistics_host(x, ranks, sample_size=sample_size, margin=margin)
    np.testing.assert_array_equal(out, np.sort(x)[ranks])


def test_percentile_large_volume_two_stage_equals_numpy():
    # big enough for the default sample (the path real volumes take): background, ties
    rng = np.random.default_rng(3)
    n = 300_007
    x = np.where(rng.random(n) < 0.7, 0.0, np.round(rng.gamma(2.0, 40.0, n))).astype(np.float32)
    x[rng.integers(0, n, 50)] = rng.normal(1e4, 1e3, 50)  # a few outliers
    qs = [0.5, 1, 10, 50, 69.9, 70, 80, 99, 99.5, 100]
    np.testing.assert_array_equal(histogram.percentile(x, qs), np.percentile(x.astype(np.float64), qs))
    smooth = rng.normal(size=n).astype(np.float32)
    np.testing.assert_array_equal(
        histogram.percentile(smooth, qs), np.percentile(smooth.astype(np.float64), qs)
    )


def test_percentile_fortran_order_and_masks():
    rng = np.random.default_rng(4)
    x = np.asfortranarray(rng.normal(size=(6, 7, 8)))
    mask = rng.random((6, 7, 8)) < 0.3
    expected = np.percentile(x[mask], [5, 60])
    for layout in (np.ascontiguousarray, np.asfortranarray):  # same and mixed memory orders
        for m in (mask, layout(mask)):
            np.testing.assert_allclose(histogram.percentile(layout(x), [5, 60], mask=m), expected)
    one = np.zeros_like(mask)
    one[2, 3, 4] = True
    assert histogram.percentile(x, [0, 50, 100], mask=one).tolist() == [x[2, 3, 4]] * 3


def test_traced_percentile_edge_cases():
    qs = [0, 0.5, 50, 99.5, 100]
    f = jax.jit(lambda a, m: histogram.percentile(a, qs, mask=m))
    rng = np.random.default_rng(5)
    x = rng.normal(size=257).astype(np.float32)
    one = np.zeros(257, bool)
    one[100] = True
    np.testing.assert_array_equal(f(x, one), [x[100]] * 5)
    np.testing.assert_array_equal(f(np.full(257, 2.5, np.float32), np.ones(257, bool)), [2.5] * 5)
    two = np.where(np.arange(257) < 200, 1.0, 7.0).astype(np.float32)
    np.testing.assert_allclose(f(two, np.ones(257, bool)), np.percentile(two, qs), rtol=1e-6)
    np.testing.assert_array_equal(f(x, np.zeros(257, bool)), [0.0] * 5)  # empty: 0, not NaN
    ints = np.arange(257, dtype=np.int32)[::-1]
    np.testing.assert_allclose(jax.jit(lambda a: histogram.percentile(a, qs))(ints), np.percentile(ints, qs))
    # the same program under vmap (one selection per item)
    batch = rng.normal(size=(3, 257)).astype(np.float32)
    out = jax.jit(jax.vmap(lambda a: histogram.percentile(a, qs, mask=one | (a > 0))))(batch)
    expected = [np.percentile(b[one | (b > 0)], qs) for b in batch]
    np.testing.assert_allclose(out, expected, rtol=1e-6)
    # no gradient flows through the selected values (as for a sort-free selection)
    grad = jax.grad(lambda a: histogram.percentile(a, 50) + a.sum())(x)
    np.testing.assert_array_equal(grad, np.ones_like(x))


def _odd_volumes():
    """Odd-sized volumes (so the median falls on a value) with ties, a background,
    negative values, integers; and masks."""
    rng = np.random.default_rng(21)
    shape = (13, 11, 9)
    ties = np.round(rng.normal(0, 4, shape)).astype(np.float32)
    background = np.where(rng.random(shape) < 0.6, 0.0, rng.gamma(2.0, 30.0, shape)).astype(np.float32)
    negative = -np.abs(rng.normal(0, 1e3, shape)).astype(np.float32)
    negative[::3] = -0.0
    small_ints = rng.integers(-50, 50, shape).astype(np.int16)
    # beyond float32's exact integers: compared as integers, not rounded to float32 first
    large_ints = (rng.integers(-3, 3, shape) * (1 << 28) + rng.integers(0, 5, shape)).astype(np.int32)
    unsigned = rng.integers(0, 4, shape).astype(np.uint8)
    mask = rng.random(shape) < 0.5
    mask[0, 0, 0] = True
    odd = mask.copy()
    if odd.sum() % 2 == 0:
        odd[0, 0, 1] = not odd[0, 0, 1]
    for x in (ties, background, negative, small_ints, large_ints, unsigned):
        yield x, None
        yield x, odd


# percentiles on a whole rank for 13 * 11 * 9 = 1287 values (h = 1286 q / 100) and for
# odd masked counts n (50: the median; 0, 100: the extremes); others interpolate
ON_RANKS = [0, 50, 100]
BETWEEN = [0.5, 1, 2.5, 33.3, 66.6667, 99, 99.5]


def test_traced_percentile_equals_numpy_on_odd_volumes():
    f = jax.jit(lambda a, m: histogram.percentile(a, ON_RANKS + BETWEEN, mask=m))
    g = jax.jit(lambda a: histogram.percentile(a, ON_RANKS + BETWEEN))
    for x, mask in _odd_volumes():
        out = g(x) if mask is None else f(x, mask)
        values = (x if mask is None else x[mask]).astype(np.float64)
        assert values.size % 2 == 1
        expected = np.percentile(values, ON_RANKS + BETWEEN)
        k = len(ON_RANKS)
        # on a rank: the order statistic itself, exactly (in float32, the result dtype)
        np.testing.assert_array_equal(out[:k], expected[:k].astype(np.float32), err_msg=str(x.dtype))
        scale = max(np.abs(values).max(), 1.0)
        np.testing.assert_allclose(out[k:], expected[k:], rtol=2e-7, atol=2e-7 * scale, err_msg=str(x.dtype))


def test_traced_order_statistics_exact_for_integers():
    rng = np.random.default_rng(8)
    x = (rng.integers(-(1 << 30), 1 << 30, 1001) | 1).astype(np.int32)  # odd: not float32-exact
    x[:10] = [np.iinfo(np.int32).min, np.iinfo(np.int32).max, 0, -1, 1, 0, 0, 7, 7, 7]
    ranks = np.array([0, 1, 2, 500, 998, 999, 1000])
    out = jax.jit(histogram.order_statistics)(x, ranks)
    assert out.dtype == np.int32
    np.testing.assert_array_equal(out, np.sort(x)[ranks])
    u = rng.integers(0, 1 << 32, 1001, dtype=np.uint64).astype(np.uint32)
    u[:3] = [0, np.iinfo(np.uint32).max, np.iinfo(np.uint32).max]
    out = jax.jit(histogram.order_statistics)(u, ranks)
    assert out.dtype == np.uint32
    np.testing.assert_array_equal(out, np.sort(u)[ranks])


def test_traced_percentile_under_vmap_and_shard_map():
    """One selection per item under vmap, and the same under shard_map(vmap) over 8
    devices: no host callback, so no "branches must have equal output types"."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    qs = [0, 0.5, 50, 99.5, 100]
    rng = np.random.default_rng(9)
    batch = np.round(rng.normal(0, 5, (8, 13, 11, 9))).astype(np.float32)
    masks = rng.random(batch.shape) < 0.5
    masks[:, 0, 0, 0] = True
    expected = np.stack([np.percentile(b[m], qs) for b, m in zip(batch, masks)])
    per_item = jax.vmap(lambda a, m: histogram.percentile(a, qs, mask=m))
    np.testing.assert_allclose(jax.jit(per_item)(batch, masks), expected, rtol=2e-7, atol=1e-6)
    for axis_type in (jax.sharding.AxisType.Explicit, jax.sharding.AxisType.Auto):
        mesh = jax.make_mesh((8,), ("data",), axis_types=(axis_type,))
        sharded = jax.jit(
            jax.shard_map(per_item, mesh=mesh, in_specs=(P("data"), P("data")), out_specs=P("data"))
        )
        placed = [jax.device_put(a, NamedSharding(mesh, P("data"))) for a in (batch, masks)]
        out = sharded(*placed)
        np.testing.assert_allclose(out, expected, rtol=2e-7, atol=1e-6)


def test_traced_percentile_has_no_host_callback_and_exports():
    qs = [1, 99]
    f = jax.jit(lambda a, m: histogram.percentile(a, qs, mask=m))
    x = np.random.default_rng(10).normal(size=(9, 7, 5)).astype(np.float32)
    mask = x > -0.5
    text = str(jax.make_jaxpr(f)(x, mask))
    for name in ("callback", "platform_index", "cond["):
        assert name not in text, name
    exported = jax.export.export(f, platforms=("cpu", "cuda", "tpu"))(x, mask)
    restored = jax.export.deserialize(exported.serialize())
    np.testing.assert_array_equal(restored.call(x, mask), f(x, mask))


def test_traced_percentile_keeps_a_sharded_batch_in_place():
    """Under an automatic mesh, jit(vmap) of the selection partitions with the batch:
    no collective gathers the batch onto one device."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    batch = np.random.default_rng(12).normal(size=(8, 9, 7, 5)).astype(np.float32)
    placed = jax.device_put(batch, NamedSharding(mesh, P("data")))
    f = jax.jit(jax.vmap(lambda a: histogram.percentile(a, [2, 98])))
    hlo = f.lower(placed).compile().as_text()
    assert "all-gather" not in hlo and "all-to-all" not in hlo
    expected = np.stack([np.percentile(b, [2, 98]) for b in batch])
    np.testing.assert_allclose(f(placed), expected, rtol=2e-7, atol=1e-6)


def test_count_true_matches_numpy_in_one_pass_under_jit_and_vmap():
    labels = np.random.default_rng(5).integers(0, 4, (3, 7, 6, 5))
    masks = [labels == c for c in range(4)]
    expected = [m.sum(axis=(1, 3)) for m in masks]
    for counts in (
        histogram.count_true(masks, axes=(1, 3)),
        jax.jit(lambda ms: histogram.count_true(ms, axes=(1, 3)))(masks),
    ):
        assert [c.dtype for c in counts] == [np.int32] * 4
        for c, e in zip(counts, expected):
            np.testing.assert_array_equal(c, e)
    per_item = jax.vmap(lambda ms: histogram.count_true(ms, axes=(0, 2)))(masks)
    for c, e in zip(per_item, expected):
        np.testing.assert_array_equal(c, e)
