import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jmed.ops import crop_pad


@pytest.fixture
def volume():
    return np.random.default_rng(0).normal(size=(5, 6, 7, 2)).astype(np.float32)


@pytest.mark.parametrize("mode", ["constant", "edge", "reflect", "symmetric", "wrap"])
def test_pad_matches_numpy(volume, mode):
    widths = np.array([[1, 2], [0, 3], [4, 1]])
    expected = np.pad(volume, [*widths.tolist(), (0, 0)], mode=mode)
    np.testing.assert_array_equal(crop_pad.pad(volume, widths, mode=mode), expected)
    np.testing.assert_array_equal(jax.jit(lambda x: crop_pad.pad(x, widths, mode=mode))(volume), expected)


@pytest.mark.parametrize(("mode", "stat"), [("mean", np.mean), ("min", np.min), ("maximum", np.max)])
def test_pad_with_volume_statistic(volume, mode, stat):
    out = np.asarray(crop_pad.pad(volume, 2, mode=mode))
    assert out.shape == (9, 10, 11, 2)
    for c in range(2):
        np.testing.assert_allclose(out[0, 0, 0, c], stat(volume[..., c]), rtol=1e-6)
        np.testing.assert_allclose(out[-1, 3, 4, c], stat(volume[..., c]), rtol=1e-6)
    np.testing.assert_array_equal(out[2:-2, 2:-2, 2:-2], volume)


def test_pad_constant_value_per_channel(volume):
    out = np.asarray(crop_pad.pad(volume, (1, 0, 0), mode="constant", value=[3.0, -1.0]))
    np.testing.assert_array_equal(out[0, ..., 0], 3.0)
    np.testing.assert_array_equal(out[0, ..., 1], -1.0)


def test_crop(volume):
    out = crop_pad.crop(volume, [[1, 0], [2, 3], [0, 6]])
    np.testing.assert_array_equal(out, volume[1:, 2:3, 0:1])
    with pytest.raises(ValueError, match="leaves nothing"):
        crop_pad.crop(volume, [[3, 2], [0, 0], [0, 0]])


def _reference_window(x, start, size, mode):
    margin = 12
    padded = np.pad(x, [(margin, margin)] * 3 + [(0, 0)], mode=mode)
    sl = tuple(slice(s + margin, s + margin + n) for s, n in zip(start, size))
    return padded[sl]


@pytest.mark.parametrize("mode", ["constant", "edge", "reflect", "symmetric", "wrap"])
@pytest.mark.parametrize("start", [(0, 0, 0), (-2, 1, 3), (3, -4, -1), (4, 5, 6)])
def test_window_eager_and_traced_match_numpy(volume, mode, start):
    size = (4, 7, 3)
    expected = _reference_window(volume, start, size, mode)
    np.testing.assert_array_equal(crop_pad.window(volume, np.array(start), size, mode=mode), expected)
    traced = jax.jit(lambda s: crop_pad.window(volume, s, size, mode=mode))(jnp.array(start))
    np.testing.assert_array_equal(traced, expected)


def test_window_far_outside_is_padding(volume):
    out = jax.jit(lambda s: crop_pad.window(volume, s, (2, 2, 2), mode="constant", value=5.0))(
        jnp.array([-30, 0, 0])
    )
    np.testing.assert_array_equal(out, 5.0)
    np.testing.assert_array_equal(
        crop_pad.window(volume, np.array([40, 0, 0]), (2, 2, 2), mode="constant", value=5.0), 5.0
    )


def test_crop_or_pad_bounds_extra_voxel_at_start():
    np.testing.assert_array_equal(crop_pad.crop_or_pad_bounds((10, 10, 10), (7, 13, 10)), [2, -2, 0])
    np.testing.assert_array_equal(crop_pad.crop_or_pad_bounds((9, 9, 9), (8, 10, 9)), [1, -1, 0])


def test_bad_mode(volume):
    with pytest.raises(ValueError, match="mode must be one of"):
        crop_pad.pad(volume, 1, mode="circular")
    with pytest.raises(ValueError, match="widths must be >= 0"):
        crop_pad.pad(volume, -1)
