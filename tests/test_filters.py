import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage as ndi

from jmed.ops.filters import BOUNDARY_MODES, gaussian_blur, gaussian_kernel1d


def _volume(shape=(11, 9, 13, 2), seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _scipy(x, sigma, truncate=4.0, mode="reflect", cval=0.0):
    return np.stack(
        [
            ndi.gaussian_filter(x[..., c].astype(np.float64), sigma, truncate=truncate, mode=mode, cval=cval)
            for c in range(x.shape[-1])
        ],
        -1,
    )


@pytest.mark.parametrize("mode", BOUNDARY_MODES)
def test_matches_scipy_concrete(mode):
    # axis 0: shift-and-add; axis 1: identity; axis 2: radius 16, the banded-matrix path
    # and wider than the axis
    sigma = (1.3, 0.0, 4.0)
    x = _volume((11, 9, 7, 2))
    np.testing.assert_allclose(gaussian_blur(x, sigma, mode=mode), _scipy(x, sigma, mode=mode), atol=1e-5)


def test_constant_cval_and_truncate():
    x = _volume()
    for sigma in [(1.0, 2.0, 0.7), (5.0, 5.0, 5.0)]:
        got = gaussian_blur(x, sigma, mode="constant", cval=1.5, truncate=2.5)
        np.testing.assert_allclose(got, _scipy(x, sigma, 2.5, "constant", 1.5), atol=1e-5)


@pytest.mark.parametrize("max_sigma", [None, 3.0])
def test_traced_sigma_matches_scipy(max_sigma):
    x = _volume()
    f = jax.jit(lambda v, s: gaussian_blur(v, s, max_sigma=max_sigma))
    for sigma in [(0.0, 0.0, 0.0), (0.3, 1.1, 2.9), (1.6, 0.9, 0.12)]:
        np.testing.assert_allclose(f(x, jnp.asarray(sigma)), _scipy(x, sigma), atol=1e-5)


def test_traced_sigma_without_bound_handles_wide_kernels():
    x = _volume()
    f = jax.jit(lambda v, s: gaussian_blur(v, s))
    sigma = (2.0, 6.0, 1.0)  # radius 24 on a 9-voxel axis
    np.testing.assert_allclose(f(x, jnp.asarray(sigma)), _scipy(x, sigma), atol=1e-5)


@pytest.mark.parametrize("mode", BOUNDARY_MODES)
def test_traced_wide_kernels_match_scipy_in_every_mode(mode):
    # radii 14 (the widest compiled width, 24), 30 and 41 (beyond it: the run-time tap
    # loop), 4 and 0
    x = _volume()
    f = jax.jit(lambda v, s: gaussian_blur(v, s, mode=mode, cval=0.7))
    for sigma in [(3.5, 7.5, 0.8), (0.0, 3.4, 10.2)]:
        expected = _scipy(x, sigma, mode=mode, cval=0.7)
        np.testing.assert_allclose(f(x, jnp.asarray(sigma)), expected, atol=1e-5)


def test_vmap_per_sample_wide_sigma():
    x = _volume((8, 7, 6, 1))
    sigmas = jnp.asarray([[8.0, 0.5, 1.0], [0.2, 3.6, 0.0]])  # radius 32: the tap loop
    out = jax.jit(jax.vmap(lambda s: gaussian_blur(x, s)))(sigmas)
    for i in range(2):
        np.testing.assert_allclose(out[i], _scipy(x, np.asarray(sigmas[i])), atol=1e-5)


def test_vmap_per_sample_sigma():
    x = _volume((8, 7, 6, 1))
    sigmas = jnp.asarray([[0.5, 1.0, 0.3], [0.9, 0.0, 0.7]])
    out = jax.vmap(lambda s: gaussian_blur(x, s, max_sigma=1.0))(sigmas)
    for i in range(2):
        np.testing.assert_allclose(out[i], _scipy(x, np.asarray(sigmas[i])), atol=1e-5)


def test_kernel_sums_to_one_and_matches_scipy_taps():
    w = np.asarray(gaussian_kernel1d(1.5, 10))
    assert w.sum() == pytest.approx(1.0, abs=1e-6)
    r = int(4 * 1.5 + 0.5)
    assert np.all(w[: 10 - r] == 0) and np.all(w[10 + r + 1 :] == 0)
    impulse = np.zeros(21)
    impulse[10] = 1
    np.testing.assert_allclose(w, ndi.gaussian_filter1d(impulse, 1.5, mode="constant"), atol=1e-7)


def test_integer_input_and_gradient():
    x = (_volume() * 10).astype(np.int16)
    out = gaussian_blur(x, 1.0)
    assert out.dtype == jnp.float32
    g = jax.grad(lambda v: jnp.sum(gaussian_blur(v, jnp.asarray([1.0, 2.0, 0.5]), max_sigma=2.0) ** 2))(
        jnp.asarray(_volume())
    )
    assert np.all(np.isfinite(g))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(sigma=-1.0), "sigma"),
        (dict(sigma=1.0, mode="bogus"), "mode"),
        (dict(sigma=1.0, truncate=-2), "truncate"),
        (dict(sigma=1.0, max_sigma=-1), "max_sigma"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        gaussian_blur(_volume(), **kwargs)
    with pytest.raises(ValueError, match="data"):
        gaussian_blur(np.zeros((4, 4, 4)), 1.0)
