import jax
import numpy as np
import pytest
from scipy.interpolate import BSpline

from jmed.ops import bspline


def test_weights_match_scipy_basis_and_partition_unity():
    w = bspline.bspline_weights(11, 6)
    assert w.shape == (11, 6)
    np.testing.assert_allclose(w.sum(1), 1.0, atol=1e-6)
    basis = BSpline.basis_element(np.arange(-2.0, 3.0), extrapolate=False)
    u = np.arange(11) * 3 / 10
    for j in range(6):
        ref = np.nan_to_num(basis(u - (j - 1)))
        np.testing.assert_allclose(w[:, j], ref, atol=1e-6)
    traced = jax.jit(lambda p: bspline.bspline_weights_at(p, 11, 6))(np.arange(11.0))
    np.testing.assert_allclose(np.asarray(traced), w, atol=1e-6)


def test_upsample_reproduces_linear_functions_and_zero():
    n = (5, 6, 7)
    control = np.zeros((*n, 2), np.float32)
    a = np.arange(n[0], dtype=np.float32) - 1  # c_j = j - 1 reproduces u exactly
    control[..., 0] = a[:, None, None]
    control[..., 1] = 2.0
    shape = (9, 8, 10)
    out = np.asarray(bspline.upsample(control, shape))
    u = np.arange(9) * (n[0] - 3) / 8
    np.testing.assert_allclose(out[..., 0], np.broadcast_to(u[:, None, None], shape), atol=1e-5)
    np.testing.assert_allclose(out[..., 1], 2.0, atol=1e-5)
    zero = np.asarray(bspline.upsample(np.zeros((*n, 3), np.float32), shape))
    assert np.all(zero == 0)


def test_separable_field_equals_dense():
    rng = np.random.default_rng(0)
    control = rng.standard_normal((4, 5, 6, 3)).astype(np.float32)
    shape = (7, 6, 9)
    weights = tuple(bspline.bspline_weights(s, c) for s, c in zip(shape, control.shape[:3]))
    field = bspline.separable_field(control, weights)
    dense = np.asarray(bspline.upsample(control, shape))
    assert field.shape == dense.shape
    np.testing.assert_allclose(np.asarray(field.dense()), dense, atol=1e-5)
    for d in range(3):
        np.testing.assert_allclose(np.asarray(field.component(d)), dense[..., d], atol=1e-5)
    m = rng.standard_normal((3, 3))
    np.testing.assert_allclose(np.asarray(field.transform_vectors(m).dense()), dense @ m.T, atol=1e-4)


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_points"):
        bspline.bspline_weights(10, 3)
    with pytest.raises(ValueError, match="control"):
        bspline.upsample(np.zeros((4, 4, 4)), (5, 5, 5))
