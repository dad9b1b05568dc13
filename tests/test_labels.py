import numpy as np
import pytest

from jmed.ops import labels

ndimage = pytest.importorskip("scipy.ndimage")

STRUCTURES = {6: None, 18: ndimage.generate_binary_structure(3, 2), 26: np.ones((3, 3, 3), bool)}


def _random_masks():
    rng = np.random.default_rng(0)
    for _ in range(12):
        shape = tuple(int(n) for n in rng.integers(1, 16, 3))
        yield rng.random(shape) < rng.uniform(0.1, 0.7)


@pytest.mark.parametrize("connectivity", [6, 18, 26])
def test_connected_components_equals_scipy_on_random_masks(connectivity):
    for mask in _random_masks():
        out, num = labels.connected_components(mask, connectivity=connectivity)
        expected, expected_num = ndimage.label(mask, STRUCTURES[connectivity])
        assert num == expected_num
        np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize("connectivity", [6, 18, 26])
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
    with pytest.raises(ValueError, match=r"connectivity must be one of \(6, 18, 26\), got 8"):
        labels.connected_components(mask, connectivity=8)
    with pytest.raises(ValueError, match="connectivity"):
        labels.connected_components(mask, connectivity=True)
    with pytest.raises(ValueError, match=r"mask must be 3D"):
        labels.connected_components(mask[0])


def test_hand_built_fixture_18_connectivity():
    mask = np.zeros((4, 4, 4), bool)
    mask[0, 0, 0] = mask[0, 1, 1] = True  # share an edge
    mask[2, 2, 2] = mask[3, 3, 3] = True  # share a corner only
    out, num = labels.connected_components(mask, connectivity=18)
    assert num == 3
    assert out[0, 0, 0] == out[0, 1, 1] == 1 and out[2, 2, 2] == 2 and out[3, 3, 3] == 3
    assert out.dtype == np.int32 and out.shape == mask.shape


@pytest.mark.parametrize("connectivity", [6, 18, 26])
def test_fill_holes_and_keep_largest_match_scipy(connectivity):
    rng = np.random.default_rng(0)
    field = ndimage.gaussian_filter(rng.normal(size=(24, 20, 18)), 1.5)
    mask = field > -0.1
    structure = STRUCTURES[connectivity]
    background, num = ndimage.label(~mask, structure)
    border = np.zeros(mask.shape, bool)
    border[[0, -1]] = border[:, [0, -1]] = border[:, :, [0, -1]] = True
    open_components = np.unique(background[border & ~mask])
    expected = mask | ((background > 0) & ~np.isin(background, open_components))
    assert num > len(open_components)  # the fixture has holes to fill
    np.testing.assert_array_equal(labels.fill_holes(mask, connectivity=connectivity), expected)
    fg, num = ndimage.label(mask, structure)
    sizes = np.bincount(fg.ravel())[1:]
    np.testing.assert_array_equal(
        labels.keep_largest(mask, connectivity=connectivity), fg == np.argmax(sizes) + 1
    )
