import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from jmed.ops.interpolation import _exact_parts, _neighbours, _times_index, pad_value_for, resample

# one compilation per case instead of op-by-op dispatch (keeps the suite fast)
jresample = jax.jit(resample, static_argnames=("output_shape", "order", "pad_mode"))


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
    np.testing.assert_array_equal(np.asarray(jresample(data, np.eye(4), (5, 6, 7))), data)
    shift = np.eye(4)
    shift[0, 3] = -2  # output voxel i reads input voxel i - 2
    out = np.asarray(jresample(data, shift, (5, 6, 7), pad_mode="edge"))
    np.testing.assert_array_equal(out[:2], np.broadcast_to(data[:1], (2, 6, 7, 2)))
    np.testing.assert_array_equal(out[2:], data[:3])
    out = np.asarray(jresample(data, shift, (5, 6, 7), pad_value=-7.0))
    np.testing.assert_array_equal(out[:2], -7.0)


def test_displacement_field_shifts():
    data = np.arange(6 * 5 * 4, dtype=np.float32).reshape(6, 5, 4, 1)
    disp = np.zeros((6, 5, 4, 3), np.float32)
    disp[..., 1] = 1.0
    out = np.asarray(jresample(data, np.eye(4), (6, 5, 4), displacement=disp, pad_mode="edge"))
    np.testing.assert_array_equal(out[:, :4], data[:, 1:])


def test_bad_arguments():
    data = np.zeros((3, 3, 3, 1))
    with pytest.raises(ValueError, match="order"):
        resample(data, np.eye(4), (3, 3, 3), order=3)
    with pytest.raises(ValueError, match="pad_mode"):
        resample(data, np.eye(4), (3, 3, 3), pad_mode="wrap")
    with pytest.raises(ValueError, match="data must be"):
        resample(np.zeros((3, 3, 3)), np.eye(4), (3, 3, 3))


def _rotation_matrix(angle, scale, centre, shift=(0.0, 0.0, 0.0)):
    c, s = np.cos(angle), np.sin(angle)
    lin = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) * scale
    m = np.eye(4)
    m[:3, :3] = lin
    m[:3, 3] = np.asarray(centre) - lin @ np.asarray(centre) + np.asarray(shift)
    return m


def test_identity_is_exact_for_every_order():
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 7, (6, 5, 4, 1)).astype(np.uint8)
    for order in (0, "partial_volume"):
        out = jax.jit(resample, static_argnames=("output_shape", "order"))(
            labels, np.eye(4), (6, 5, 4), order=order
        )
        assert out.dtype == np.uint8
        np.testing.assert_array_equal(np.asarray(out), labels)


def test_partial_volume_keeps_labels_and_beats_nearest():
    # a sphere sampled on a coarse grid, resampled by a rotation + zoom: compare with the
    # continuous sphere at the output positions
    n = 24
    grid = np.stack(np.meshgrid(*[np.arange(n)] * 3, indexing="ij"), -1).astype(float)
    centre = np.array([11.7, 11.2, 11.4])
    labels = (np.linalg.norm(grid - centre, axis=-1) < 7.3).astype(np.uint8) * 3
    m = _rotation_matrix(0.5, 0.6, centre)
    coords = grid @ m[:3, :3].T + m[:3, 3]
    truth = (np.linalg.norm(coords - centre, axis=-1) < 7.3) * 3
    errors = {}
    for order in (0, "partial_volume"):
        out = np.asarray(jresample(labels[..., None], m, (n, n, n), order=order))[..., 0]
        assert out.dtype == np.uint8
        assert set(np.unique(out)) <= {0, 3}
        errors[order] = int((out != truth).sum())
    assert errors["partial_volume"] < 0.8 * errors[0], errors


def test_partial_volume_majority_by_weight():
    # 2 voxels along x: labels 5 and 9; sampling at 0.3 -> 5 wins, at 0.7 -> 9 wins
    data = np.array([5, 9], np.int32).reshape(2, 1, 1, 1)
    for offset, expected in ((0.3, 5), (0.7, 9)):
        m = np.eye(4)
        m[0, 3] = offset
        out = jresample(data, m, (1, 1, 1), order="partial_volume", pad_mode="edge")
        assert int(out[0, 0, 0, 0]) == expected
    # three labels: the pair of equal labels outweighs the single largest weight
    data = np.array([1, 2, 1], np.int32).reshape(3, 1, 1, 1)
    m = np.eye(4)
    m[0, 0] = 0.0
    m[0, 3] = 0.45  # x = 0.45: weights 0.55 (label 1), 0.45 (label 2)
    assert int(jresample(data, m, (1, 1, 1), order="partial_volume")[0, 0, 0, 0]) == 1


def test_partial_volume_many_classes():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 50, (9, 8, 7, 1)).astype(np.int16)
    m = _rotation_matrix(0.3, 1.1, (4, 3.5, 3))
    out = np.asarray(jresample(labels, m, (9, 8, 7), order="partial_volume", pad_value=-1))
    assert out.dtype == np.int16
    assert set(np.unique(out)) <= set(np.unique(labels)) | {-1}


def test_multichannel_and_displacement_matrix():
    rng = np.random.default_rng(4)
    data = rng.standard_normal((7, 6, 5, 3)).astype(np.float32)
    m = _rotation_matrix(0.2, 1.0, (3, 2.5, 2))
    out = np.asarray(jresample(data, m, (7, 6, 5)))
    for c in range(3):
        single = np.asarray(jresample(data[..., c : c + 1], m, (7, 6, 5)))[..., 0]
        np.testing.assert_allclose(out[..., c], single, atol=1e-6)
    # a displacement in mm with 2 mm voxels along y: 2 mm -> 1 voxel
    disp = np.zeros((7, 6, 5, 3), np.float32)
    disp[..., 1] = 2.0
    to_voxels = np.diag([1.0, 0.5, 1.0])
    out = np.asarray(jresample(data, np.eye(4), (7, 6, 5), displacement=disp, displacement_matrix=to_voxels))
    np.testing.assert_allclose(out[:, :5], data[:, 1:], atol=1e-6)


def test_pad_value_rules():
    rng = np.random.default_rng(5)
    data = rng.uniform(10, 20, (6, 7, 8, 2)).astype(np.float32)
    data[2:4, 2:5, 2:6] += 100.0  # bright interior
    border = np.ones(data.shape[:3], bool)
    border[1:-1, 1:-1, 1:-1] = False
    np.testing.assert_allclose(
        np.asarray(jax.jit(pad_value_for, static_argnums=1)(data, "minimum")), data.reshape(-1, 2).min(0)
    )
    np.testing.assert_allclose(
        np.asarray(jax.jit(pad_value_for, static_argnums=1)(data, "mean")), data[border].mean(0), rtol=1e-5
    )
    np.testing.assert_allclose(np.asarray(pad_value_for(data, 3.5)), [3.5, 3.5])
    # otsu on a bimodal border: the mean of the dark mode
    data[0, :3] = 1000.0
    otsu = np.asarray(jax.jit(pad_value_for, static_argnums=1)(data, "otsu"))
    dark = data[border & (data[..., 0] < 500)]
    np.testing.assert_allclose(otsu, dark.mean(0), rtol=1e-3)
    with pytest.raises(ValueError, match="pad value"):
        pad_value_for(data, "median")


def test_gradient_wrt_data_is_finite():
    data = np.random.default_rng(6).standard_normal((5, 5, 5, 1)).astype(np.float32)
    m = _rotation_matrix(0.4, 1.2, (2, 2, 2))
    grad = jax.jit(jax.grad(lambda d: resample(d, m, (5, 5, 5)).sum()))(data)
    assert np.all(np.isfinite(np.asarray(grad))) and np.abs(np.asarray(grad)).sum() > 0


# --- the same result wherever XLA recomputes a coordinate -------------------------------------


@pytest.mark.parametrize("size", [2, 95, 4096, 5000, 70000])
def test_products_with_an_index_are_exact(size):
    # a fused multiply-add rounds like a multiply then an add only if the product is exact
    rng = np.random.default_rng(size)
    values = np.concatenate([rng.normal(0, 3, 50), [1.0, -0.1, 1 / 3, 2.0**-30, 7e5]]).astype(np.float32)
    index = np.unique(np.r_[0, 1, size - 1, rng.integers(0, size, 50)]).astype(np.float32)
    bits = 24 - max(1, (size - 1).bit_length())
    for value in values:
        parts = [np.float32(p) for p in _exact_parts(jnp.float32(value), bits)]
        assert sum(float(p) for p in parts) == float(value)
        for p in parts:
            assert float(p * index.max()) == float(p) * float(index.max())  # exact in float32
            mantissa, _ = np.frexp(np.float64(p))
            assert float(mantissa * 2.0**bits) == int(mantissa * 2.0**bits)  # <= bits significant bits
        got = np.asarray(_times_index(jnp.float32(value), jnp.asarray(index), size))
        if size <= 4096:
            np.testing.assert_array_equal(got, value * index)  # the rounded product
        else:
            np.testing.assert_allclose(got, np.float64(value) * index, rtol=2e-7, atol=0)


def test_neighbours_are_robust_to_a_coordinate_off_by_rounding():
    # the indices computed from one evaluation of a coordinate and the weights from another
    # that differs in the last bits (what XLA's fusions can do) still interpolate to within
    # that difference; with floor(c) for the indices and c - floor(c) for the weights, a
    # coordinate at an integer can take the neighbour's value
    grid = np.arange(-3.0, 40.0)
    data = (grid**2 / 7.0).astype(np.float32)
    step = float(np.abs(np.diff(data)).max())
    worst_floor = 0.0
    for point in np.array([0.0, 1.0, 2.0, 7.0, 8.0, 30.0, 31.0, 0.5, 11.5, 17.25], np.float32):
        near = [point]
        for direction in (-np.inf, np.inf):
            c = point
            for _ in range(3):
                c = np.nextafter(c, np.float32(direction))
                near.append(c)
        for c_index in near:
            for c_weight in near:
                indices, _, _ = _neighbours(jnp.float32(c_index))
                _, weights, _ = _neighbours(jnp.float32(c_weight))
                value = sum(float(w) * float(data[int(i) + 3]) for i, w in zip(indices, weights))
                exact = np.interp(np.float64(c_weight), grid, data.astype(np.float64))
                bound = 2 * step * abs(float(c_index) - float(c_weight)) + 1e-5 * abs(exact) + 1e-6
                assert abs(value - exact) <= bound, (point, c_index, c_weight, value, exact)
                lo, f = int(np.floor(c_index)), float(c_weight - np.floor(c_weight))
                worst_floor = max(worst_floor, abs((1 - f) * data[lo + 3] + f * data[lo + 4] - exact))
        lo, hi = sorted(int(i) for i in _neighbours(jnp.float32(point))[0])
        assert (lo, hi) == (np.floor(point), np.floor(point) + 1)
    assert worst_floor > 1.0  # the floor formulation fails this test
