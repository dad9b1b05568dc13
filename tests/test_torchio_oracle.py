"""TorchIO as an oracle: jmed's deterministic operations give TorchIO 1.2's results.

TorchIO (with a CPU build of torch) comes with the ``oracle`` extra; ``.ci/run`` installs
it and sets ``JMED_REQUIRE_ORACLE=1``, so that these tests fail there instead of being
skipped when TorchIO is missing. Volumes have odd, distinct sizes and anisotropic,
oblique or non-RAS headers; values are compared inside the field of view where
interpolation at the border differs by design (SimpleITK extrapolates half a voxel).
"""

from __future__ import annotations

import os

import jax
import numpy as np
import pytest

import jmed
from jmed import affine as affine_lib
from jmed import transforms as T

if os.environ.get("JMED_REQUIRE_ORACLE"):
    import torch
    import torchio as tio
else:
    torch = pytest.importorskip("torch")
    tio = pytest.importorskip("torchio")


def _affine(spacing=(1.2, 0.9, 1.5), orientation="RAS", degrees=0.0, origin=(-20.0, 14.0, 6.0)):
    affine = affine_lib.from_spacing(spacing, origin=origin, orientation=orientation)
    c, s = np.cos(np.deg2rad(degrees)), np.sin(np.deg2rad(degrees))
    affine[:3, :3] = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]]) @ affine[:3, :3]
    return affine


def _smooth(shape, seed=0):
    """A smooth positive volume (trilinear interpolation of it is well conditioned)."""
    grids = np.meshgrid(*[np.linspace(0, 1, n) for n in shape], indexing="ij")
    rng = np.random.default_rng(seed)
    f = sum(
        np.sin(2 * np.pi * (a * g + b))
        for g, a, b in zip(grids, rng.uniform(0.5, 1.5, 3), rng.uniform(0, 1, 3))
    )
    return (50.0 + 20.0 * f).astype(np.float32)


def _labels(data):
    return np.digitize(data, np.percentile(data, [40, 70])).astype(np.uint8)


def _pair(shape=(23, 19, 17), affine=None, seed=0):
    affine = _affine() if affine is None else affine
    t1 = _smooth(shape, seed)
    seg = _labels(t1)
    ours = jmed.Subject(t1=jmed.ScalarImage(t1, affine), seg=jmed.LabelMap(seg, affine))
    theirs = tio.Subject(
        t1=tio.ScalarImage(tensor=torch.from_numpy(t1[None].copy()), affine=affine),
        seg=tio.LabelMap(tensor=torch.from_numpy(seg[None].astype(np.int16)), affine=affine),
    )
    return ours, theirs


def _data(image) -> np.ndarray:
    if isinstance(image, jmed.Image):
        return np.asarray(image.data)[..., 0]
    return image.data.numpy()[0]


def _inside(shape, margin=1):
    mask = np.zeros(shape, bool)
    mask[margin : shape[0] - margin, margin : shape[1] - margin, margin : shape[2] - margin] = True
    return mask


@pytest.mark.parametrize("orientation", ["LPS", "PIR", "ASL"])
def test_to_canonical(orientation):
    ours, theirs = _pair(affine=_affine(orientation=orientation))
    a, b = T.ToCanonical()(ours), tio.ToCanonical()(theirs)
    for name in ("t1", "seg"):
        np.testing.assert_array_equal(_data(a[name]), _data(b[name]))
        np.testing.assert_allclose(np.asarray(a[name].affine), b[name].affine, atol=1e-5)


@pytest.mark.parametrize("target", ["LPS", "PIR", "RAS"])
def test_reorient(target):
    ours, theirs = _pair(affine=_affine(orientation="ASL"))
    a, b = T.Reorient(target)(ours), tio.ToOrientation(target)(theirs)
    for name in ("t1", "seg"):
        assert a[name].orientation == target
        np.testing.assert_array_equal(_data(a[name]), _data(b[name]))
        np.testing.assert_allclose(np.asarray(a[name].affine), b[name].affine, atol=1e-5)


@pytest.mark.parametrize(
    ("spacing", "header"),
    [(1.0, _affine()), ((2.0, 1.3, 0.8), _affine(orientation="LPS")), (1.1, _affine(degrees=17.0))],
    ids=["iso", "anisotropic-LPS", "oblique"],
)
def test_resample_to_spacing(spacing, header):
    ours, theirs = _pair((31, 27, 21), header)
    a, b = T.Resample(spacing)(ours), tio.Resample(spacing)(theirs)
    for name in ("t1", "seg"):
        assert a[name].spatial_shape == b[name].spatial_shape
        np.testing.assert_allclose(np.asarray(a[name].affine), b[name].affine, atol=1e-4)
    inside = _inside(a.spatial_shape)
    np.testing.assert_allclose(_data(a.t1)[inside], _data(b.t1)[inside], rtol=1e-4, atol=1e-3)
    # nearest neighbour: equal except at exact half-voxel ties (rounding decides them)
    matrix = np.linalg.solve(header, np.asarray(a.seg.affine))
    grid = np.stack(np.meshgrid(*map(np.arange, a.spatial_shape), indexing="ij"), -1)
    coords = grid @ matrix[:3, :3].T + matrix[:3, 3]
    untied = inside & np.all(np.abs(coords - np.floor(coords) - 0.5) > 1e-3, -1)
    assert untied.mean() > 0.3
    np.testing.assert_array_equal(_data(a.seg)[untied], _data(b.seg)[untied])


def test_resample_to_reference():
    ours, theirs = _pair((25, 21, 19), _affine(degrees=9.0))
    reference = _affine(spacing=(1.4, 1.1, 1.3), orientation="LPS", origin=(-8.0, 24.0, 4.0))
    shape = (15, 17, 13)
    a = T.Resample((shape, reference))(ours)
    ref_image = tio.ScalarImage(tensor=torch.zeros((1, *shape)), affine=reference)
    b = tio.Resample(ref_image)(theirs)
    assert a.spatial_shape == b.spatial_shape == shape
    np.testing.assert_allclose(np.asarray(a.t1.affine), b.t1.affine, atol=1e-5)
    # compare where the output voxel maps well inside the input grid
    points = affine_lib.voxel_to_world(
        reference, np.stack(np.meshgrid(*map(np.arange, shape), indexing="ij"), -1)
    )
    coords = affine_lib.world_to_voxel(_affine(degrees=9.0), points)
    inside = np.all((coords >= 0.5) & (coords <= np.array((25, 21, 19)) - 1.5), -1)
    assert inside.mean() > 0.15
    np.testing.assert_allclose(_data(a.t1)[inside], _data(b.t1)[inside], rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("target", [(21, 25, 11), (30, 12, 17), (23, 19, 17)])
def test_crop_or_pad(target):
    ours, theirs = _pair()
    a, b = T.CropOrPad(target)(ours), tio.CropOrPad(target)(theirs)
    for name in ("t1", "seg"):
        np.testing.assert_array_equal(_data(a[name]), _data(b[name]))
        np.testing.assert_allclose(np.asarray(a[name].affine), b[name].affine, atol=1e-5)


@pytest.mark.parametrize(("out", "percentiles"), [((0.0, 1.0), (0.5, 99.5)), ((-1.0, 1.0), (0.0, 100.0))])
def test_rescale_intensity(out, percentiles):
    ours, theirs = _pair()
    a = T.RescaleIntensity(out_min_max=out, percentiles=percentiles)(ours)
    b = tio.RescaleIntensity(out_min_max=out, percentiles=percentiles)(theirs)
    np.testing.assert_allclose(_data(a.t1), _data(b.t1), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(_data(a.seg), _data(b.seg))


def test_z_normalization_differs_by_the_documented_std_factor():
    ours, theirs = _pair()
    a, b = T.ZNormalization()(ours), tio.ZNormalization()(theirs)
    n = _data(ours.t1).size
    # jmed divides by the population std, TorchIO by the unbiased one (docs/torchio.md)
    np.testing.assert_allclose(_data(a.t1), _data(b.t1) * np.sqrt(n / (n - 1)), rtol=1e-4, atol=1e-5)


def test_histogram_standardization_with_torchio_landmarks(tmp_path):
    paths = []
    for seed in range(3):
        data = _smooth((21, 19, 17), seed) * (1.0 + 0.3 * seed)
        data[:, :, :5] = 0.0  # a background that ties the lowest percentiles
        path = tmp_path / f"t1_{seed}.nii.gz"
        jmed.save(jmed.ScalarImage(data, _affine()), path)
        paths.append(path)
    landmarks = tio.HistogramStandardization.train(paths)
    assert landmarks.shape == (13,)
    image = jmed.load(paths[1])
    a = T.HistogramStandardization(landmarks)(jmed.Subject(t1=image))
    b = tio.HistogramStandardization({"t1": landmarks})(tio.Subject(t1=tio.ScalarImage(paths[1])))
    np.testing.assert_allclose(_data(a.t1), _data(b.t1), rtol=1e-4, atol=1e-3)
    assert (np.asarray(image.data) == 0).mean() > 0.25  # the tie rule was exercised


def _both_affines(ours, theirs, scales, degrees, translation, affine):
    """jmed's RandomAffine and TorchIO's Affine with the same parameters, and the input
    voxel each output voxel pulls (jmed's mapping)."""
    params = {
        "scales": np.asarray(scales, np.float32),
        "degrees": np.asarray(degrees, np.float32),
        "translation": np.asarray(translation, np.float32),
    }
    a = T.RandomAffine(default_pad_value=0.0).apply(ours, params)
    b = tio.Affine(scales, degrees, translation, default_pad_value=0.0)(theirs)
    matrix = np.asarray(T.RandomAffine().mapping(params, ours.spatial_shape, affine).matrix)
    grid = np.stack(np.meshgrid(*map(np.arange, ours.spatial_shape), indexing="ij"), -1)
    return a, b, grid @ matrix[:3, :3].T + matrix[:3, 3]


@pytest.mark.parametrize(
    ("scales", "degrees", "translation"),
    [
        ((1.0, 1.0, 1.0), (0.0, 0.0, 25.0), (0.0, 0.0, 0.0)),
        ((1.15, 0.9, 1.05), (0.0, 0.0, 0.0), (3.0, -2.0, 1.5)),
        ((1.1, 0.95, 1.2), (12.0, -20.0, 17.0), (2.5, 1.0, -3.0)),
        ((1.0, 1.0, 1.0), (30.0, 25.0, -40.0), (0.0, 0.0, 0.0)),
    ],
    ids=["rotation", "scale-translation", "combined", "three-rotations"],
)
@pytest.mark.parametrize("header", ["LPS", "oblique"])
def test_affine_with_fixed_parameters(scales, degrees, translation, header):
    affine = _affine(orientation="LPS") if header == "LPS" else _affine(degrees=14.0)
    ours, theirs = _pair((29, 25, 23), affine)
    a, b, coords = _both_affines(ours, theirs, scales, degrees, translation, affine)
    # compare where the pulled input position lies inside the input grid
    inside = np.all((coords >= 0.5) & (coords <= np.array(ours.spatial_shape) - 1.5), -1)
    assert inside.mean() > 0.3
    np.testing.assert_allclose(_data(a.t1)[inside], _data(b.t1)[inside], rtol=1e-4, atol=2e-3)
    untied = inside & np.all(np.abs(coords - np.floor(coords) - 0.5) > 1e-3, -1)
    np.testing.assert_array_equal(_data(a.seg)[untied], _data(b.seg)[untied])


@pytest.mark.parametrize("axes", [(0,), (1, 2), (0, 1, 2)])
def test_flip(axes):
    ours, theirs = _pair(affine=_affine(orientation="PIR"))
    a = T.RandomFlip(axes=axes, flip_probability=1.0)(jax.random.key(0), ours)
    b = tio.Flip(axes=axes)(theirs)
    for name in ("t1", "seg"):
        np.testing.assert_array_equal(_data(a[name]), _data(b[name]))
        np.testing.assert_allclose(np.asarray(a[name].affine), b[name].affine, atol=1e-6)


@pytest.mark.parametrize(("mode", "shape"), [("average", (23, 19, 17)), ("crop", (20, 20, 18))])
def test_grid_sampler_and_aggregator(mode, shape):
    # average: an odd volume whose last windows are shifted back to the border, as TorchIO
    # does; crop: a regular grid (with a shifted last window jmed splits the larger
    # overlap in the middle where TorchIO lets the later window overwrite, docs/inference.md)
    ours, theirs = _pair(shape)
    patch, overlap = (8, 8, 6), (2, 4, 2)
    sampler = jmed.GridSampler(ours.t1, patch, overlap)
    reference = tio.inference.GridSampler(tio.Subject(t1=theirs.t1), patch, overlap)
    theirs_locations = sorted(
        tuple(int(v) for v in reference[i][tio.LOCATION][:3]) for i in range(len(reference))
    )
    assert sorted(map(tuple, np.asarray(sampler.locations).tolist())) == theirs_locations
    for i in range(len(reference)):
        start = tuple(int(v) for v in reference[i][tio.LOCATION][:3])
        j = [tuple(loc) for loc in np.asarray(sampler.locations).tolist()].index(start)
        np.testing.assert_array_equal(np.asarray(sampler[j])[..., 0], reference[i]["t1"].data.numpy()[0])

    def model(x):  # a position-dependent output, so that overlaps matter
        return x * x.mean(axis=(1, 2, 3), keepdims=True)

    aggregator = jmed.GridAggregator(sampler, mode=mode)
    for patches, locations in sampler.batches(4):
        aggregator.add_batch(model(np.asarray(patches)), locations)
    expected_aggregator = tio.inference.GridAggregator(reference, overlap_mode=mode)
    for i in range(len(reference)):
        data = reference[i]["t1"].data[None]
        expected_aggregator.add_batch(
            data * data.mean(dim=(2, 3, 4), keepdim=True), reference[i][tio.LOCATION][None]
        )
    expected = expected_aggregator.get_output_tensor().numpy()[0]
    np.testing.assert_allclose(
        np.asarray(aggregator.get_output().data)[..., 0], expected, rtol=1e-5, atol=1e-4
    )


def test_affine_on_a_2d_image():
    # TorchIO treats an image with one slice as 2D: no out-of-plane rotation or scaling
    data = _smooth((37, 33, 1))
    ours = jmed.Subject(t1=jmed.ScalarImage(data[..., 0]))
    theirs = tio.Subject(t1=tio.ScalarImage(tensor=torch.from_numpy(data[None].copy())))
    scales, degrees, translation = (1.1, 0.9, 1.3), (20.0, -15.0, 25.0), (2.0, -1.0, 0.0)
    a, b, coords = _both_affines(ours, theirs, scales, degrees, translation, np.eye(4))
    np.testing.assert_allclose(coords[..., 2], 0.0, atol=1e-6)  # stays in the slice
    inside = np.all((coords[..., :2] >= 0.5) & (coords[..., :2] <= np.array(data.shape[:2]) - 1.5), -1)
    assert inside.mean() > 0.5
    np.testing.assert_allclose(_data(a.t1)[inside], _data(b.t1)[inside], rtol=1e-4, atol=2e-3)
