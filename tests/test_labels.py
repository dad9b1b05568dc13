import numpy as np
import pytest

from jmed.ops import labels

ndimage = pytest.importorskip("scipy.ndimage")

STRUCTURES = {6: None, 26: np.ones((3, 3, 3), bool)}


def _random_masks():
    rng = np.random.default_rng(0)
    for _ in range(12):
        shape = tuple(int(n) for n in rng.integers(1, 16, 3))
        yield rng.random(shape) < rng.uniform(0.1, 0.7)


@pytest.mark.parametrize("connectivity", [6, 26])
def test_connected_components_equals_scipy_on_random_masks(connectivity):
    for mask in _random_masks():
        out, num = labels.connected_components(mask, connectivity=connectivity)
        expected, expected_num = ndimage.label(mask, STRUCTURES[connectivity])
        assert num == expected_num
        np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize("connectivity", [6, 26])
def test_connected_components_equals_scipy_on_smooth_blobs(connectivity):
    rng = np.random.default_rng(1)
    field = ndimage.gaussian_filter(rng.normal(size=(40, 36, 30)), 2.0)
    for threshold in (0.0, 0.05, 0.1):
        mask = field > threshold
        out, num = labels.connected_components(mask, connectivity=connectivity)
        expected, expected_num = ndimage.label(mask, STRUCTURES[connectivity])
        assert num == expected_num > 1
        np.testing.assert_array_equal(out, expected)


def test_hand_built_fixtures():
    mask = np.zeros((5, 5, 5), bool)
    mask[0, 0, 0] = mask[1, 1, 1] = True  # touch by a corner only
    mask[3, 3, 3] = mask[3, 4, 3] = True  # share a face
    out6, n6 = labels.connected_components(mask, connectivity=6)
    out26, n26 = labels.connected_components(mask, connectivity=26)
    assert (n6, n26) == (3, 2)
    assert out6[0, 0, 0] == 1 and out6[1, 1, 1] == 2 and out6[3, 3, 3] == out6[3, 4, 3] == 3
    assert out26[0, 0, 0] == out26[1, 1, 1] == 1
    assert labels.connected_components(np.zeros((3, 3, 3)))[1] == 0
    # a spiral: many merges along one long path
    spiral = np.zeros((1, 9, 9), bool)
    spiral[0, 0, :] = spiral[0, :, 8] = spiral[0, 8, :] = spiral[0, 2:, 0] = spiral[0, 2, :7] = True
    spiral[0, 2:7, 6] = spiral[0, 6, 2:7] = spiral[0, 4:7, 2] = True
    assert labels.connected_components(spiral, connectivity=6)[1] == ndimage.label(spiral)[1]


def test_keep_largest_and_fill_holes():
    mask = np.zeros((10, 10, 10), bool)
    mask[1:6, 1:6, 1:6] = True  # 125 voxels
    mask[7:9, 7:9, 7:9] = True  # 8 voxels
    np.testing.assert_array_equal(labels.keep_largest(mask), mask & (np.arange(10) < 6)[:, None, None])
    hollow = mask.copy()
    hollow[2:5, 2:5, 2:5] = False
    hollow[0:3, 3, 3] = False  # a channel to the border: that cavity is not a hole
    filled = labels.fill_holes(hollow)
    np.testing.assert_array_equal(filled, hollow)
    hollow = mask.copy()
    hollow[2:5, 2:5, 2:5] = False  # closed cavity
    np.testing.assert_array_equal(labels.fill_holes(hollow), mask)
    with pytest.raises(ValueError, match="connectivity"):
        labels.connected_components(mask, connectivity=8)
