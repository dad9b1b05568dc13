import jax
import numpy as np
import pytest

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


def test_traced_percentile_equals_numpy():
    # one shape for every case, so each jitted function compiles once
    masked = jax.jit(lambda a, m: histogram.percentile(a, QS, mask=m))
    full = jax.jit(lambda a: histogram.percentile(a, QS))
    for x, mask in _cases():
        values = np.zeros(3000, np.float32)
        values[: x.size] = x
        selection = np.zeros(3000, bool)
        selection[: x.size] = mask
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
