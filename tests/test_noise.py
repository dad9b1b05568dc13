"""jmed.ops.noise: the hash generator against its definition and statistical checks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special, stats

from jmed.ops import noise


def _mix_numpy(x):
    x = x.astype(np.uint64)
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    x ^= x >> 16
    return x


def test_bits_follow_the_documented_formula():
    key = jax.random.key(3)
    shape = (5, 6, 7)
    k0, k1 = (int(w) for w in np.asarray(jax.random.bits(key, (2,), jnp.uint32)))
    i = np.arange(np.prod(shape), dtype=np.uint64)
    expected = _mix_numpy((_mix_numpy(i ^ k0) + k1) & 0xFFFFFFFF).reshape(shape)
    np.testing.assert_array_equal(np.asarray(noise.hash_bits(key, shape)), expected.astype(np.uint32))
    m = (expected >> 9).astype(np.float64)
    normal = np.sqrt(2.0) * special.erfinv((2 * m + 1) / 2**23 - 1)
    np.testing.assert_allclose(np.asarray(noise.normal(key, shape)), normal, rtol=2e-5, atol=2e-6)


def test_bits_are_uniform_and_independent():
    bits = np.asarray(noise.hash_bits(jax.random.key(0), (64, 64, 64)))
    # every byte lane is uniform (chi-square over 256 cells, 2.6e5 draws)
    for shift in (0, 8, 16, 24):
        counts = np.bincount(((bits >> shift) & 0xFF).ravel(), minlength=256)
        assert stats.chisquare(counts).pvalue > 1e-4
    # no correlation between neighbours along any axis, nor between nearby keys
    u = bits.astype(np.float64) / 2**32 - 0.5
    for axis in range(3):
        a = np.moveaxis(u, axis, 0)
        assert abs(np.corrcoef(a[1:].ravel(), a[:-1].ravel())[0, 1]) < 0.01
    other = np.asarray(noise.hash_bits(jax.random.key(1), (64, 64, 64))).astype(np.float64) / 2**32 - 0.5
    assert abs(np.corrcoef(u.ravel(), other.ravel())[0, 1]) < 0.01


def test_normal_distribution():
    x = np.asarray(noise.normal(jax.random.key(7), (100, 100, 100)))
    assert abs(x.mean()) < 3e-3 and abs(x.std() - 1) < 3e-3
    assert stats.kstest(x.ravel()[::7], "norm").pvalue > 1e-3
    assert abs(stats.skew(x.ravel())) < 0.01 and abs(stats.kurtosis(x.ravel())) < 0.02
    tail = np.mean(np.abs(x) > 3)  # 2.70e-3 for N(0, 1); +-5 % is 3 standard errors here
    assert abs(tail / (2 * stats.norm.sf(3)) - 1) < 0.05
    assert np.abs(x).max() < np.sqrt(2) * special.erfinv(1 - 2**-23) + 1e-4  # 23-bit uniforms


def test_same_under_jit_and_vmap():
    keys = jax.random.split(jax.random.key(0), 3)
    eager = [np.asarray(noise.normal(k, (9, 8, 7))) for k in keys]
    batched = np.asarray(jax.jit(jax.vmap(lambda k: noise.normal(k, (9, 8, 7))))(keys))
    for e, b in zip(eager, batched, strict=True):
        np.testing.assert_array_equal(e, b)
    assert not np.array_equal(eager[0], eager[1])
    other = jnp.float64 if jax.config.jax_enable_x64 else jnp.float16
    np.testing.assert_array_equal(
        noise.normal(keys[0], (4, 4), other), np.asarray(noise.normal(keys[0], (4, 4))).astype(other)
    )


@pytest.mark.parametrize(
    ("shape", "dtype", "match"),
    [
        ((2**16, 2**16, 2), jnp.float32, "2\\*\\*32"),
        ((-1, 3), jnp.float32, "non-negative"),
        ((3,), jnp.int32, "dtype"),
    ],
)
def test_bad_input(shape, dtype, match):
    with pytest.raises(ValueError, match=match):
        noise.normal(jax.random.key(0), shape, dtype)
