import jax
import numpy as np
import pytest
from scipy import ndimage

from jmed.ops.interpolation import resample


def _random_matrix(rng):
    angles = rng.uniform(-0.4, 0.4, 3)
    cx, cy, cz = np.cos(angles)
    sx, sy, sz = np.sin(angles)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    m = np.eye(4)
    m[:3, :3] = rx @ ry @ rz @ np.diag(rng.uniform(0.8, 1.2, 3))
    m[:3, 3] = rng.uniform(-2, 2, 3)
    return m


@pytest.mark.parametrize("order", [0, 1])
def test_matches_scipy_affine_transform(order):
    rng = np.random.default_rng(0)
    data = rng.standard_normal((13, 11, 9)).astype(np.float32)
    if order == 0:
        data = rng.integers(0, 5, (13, 11, 9)).astype(np.int32)
    m = _random_matrix(rng)
    out = np.asarray(
        jax.jit(resample, static_argnames=("output_shape", "order"))(
            data[..., None], m, output_shape=(12, 10, 8), order=order
        )
    )[..., 0]
    ref = ndimage.affine_transform(data, m, output_shape=(12, 10, 8), order=order, mode="constant", cval=0)
    if order == 1:
        # scipy's constant mode treats points within the last half-voxel differently;
        # compare where all 8 neighbours are inside
        coords = (
            np.stack(np.meshgrid(*map(np.arange, (12, 10, 8)), indexing="ij"), -1) @ m[:3, :3].T + m[:3, 3]
        )
        inside = np.all((coords >= 0) & (coords <= np.array(data.shape) - 1), -1)
        np.testing.assert_allclose(out[inside], ref[inside], atol=1e-4)
        assert inside.mean() > 0.3
    else:
        coords = (
            np.stack(np.meshgrid(*map(np.arange, (12, 10, 8)), indexing="ij"), -1) @ m[:3, :3].T + m[:3, 3]
        )
        # skip voxels that sit on a rounding tie
        frac = np.abs(coords - np.floor(coords) - 0.5)
        inside = np.all((coords >= 0) & (coords <= np.array(data.shape) - 1), -1)
        ok = np.all(frac > 1e-3, -1) & inside
        assert ok.mean() > 0.3
        np.testing.assert_array_equal(out[ok], ref[ok])
        assert out.dtype == np.int32


def test_identity_is_exact_and_edge_padding():
    data = np.random.default_rng(1).standard_normal((5, 6, 7, 2)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(resample(data, np.eye(4), (5, 6, 7))), data)
    shift = np.eye(4)
    shift[0, 3] = -2  # output voxel i reads input voxel i - 2
    out = np.asarray(resample(data, shift, (5, 6, 7), pad_mode="edge"))
    np.testing.assert_array_equal(out[:2], np.broadcast_to(data[:1], (2, 6, 7, 2)))
    np.testing.assert_array_equal(out[2:], data[:3])
    out = np.asarray(resample(data, shift, (5, 6, 7), pad_value=-7.0))
    np.testing.assert_array_equal(out[:2], -7.0)


def test_displacement_field_shifts():
    data = np.arange(6 * 5 * 4, dtype=np.float32).reshape(6, 5, 4, 1)
    disp = np.zeros((6, 5, 4, 3), np.float32)
    disp[..., 1] = 1.0
    out = np.asarray(resample(data, np.eye(4), (6, 5, 4), displacement=disp, pad_mode="edge"))
    np.testing.assert_array_equal(out[:, :4], data[:, 1:])


def test_bad_arguments():
    data = np.zeros((3, 3, 3, 1))
    with pytest.raises(ValueError, match="order"):
        resample(data, np.eye(4), (3, 3, 3), order=3)
    with pytest.raises(ValueError, match="pad_mode"):
        resample(data, np.eye(4), (3, 3, 3), pad_mode="wrap")
    with pytest.raises(ValueError, match="data must be"):
        resample(np.zeros((3, 3, 3)), np.eye(4), (3, 3, 3))
