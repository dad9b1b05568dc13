import glob
import os

import jax
import jax.numpy as jnp
import nibabel as nib
import nibabel.processing
import numpy as np
import pytest
from conftest import make_phantom
from nibabel.testing import data_path

import jmed
from jmed import affine as affine_lib
from jmed.transforms import invert, replay
from jmed.transforms.preprocessing import (
    CopyAffine,
    Crop,
    CropForeground,
    CropOrPad,
    EnsureShapeMultiple,
    Pad,
    Reorient,
    Resample,
    Resize,
    ToCanonical,
)

OBLIQUE = np.array(
    [
        [-1.1, 0.1, 0.05, 12.0],
        [0.08, 0.9, -0.1, -20.0],
        [0.0, 0.12, 2.0, 5.0],
        [0.0, 0.0, 0.0, 1.0],
    ]
)


def _world(affine, index):
    return affine_lib.voxel_to_world(np.asarray(affine, float), np.asarray(index, float))


# --- reorientation -----------------------------------------------------------------------


SHIPPED = [
    f
    for f in sorted(glob.glob(os.path.join(str(data_path), "*.nii*")))
    if not f.endswith(
        ("dconn.nii", "dtseries.nii", "dscalar.nii", "dlabel.nii", "ptseries.nii", "pscalar.nii")
    )
]


@pytest.mark.parametrize("path", SHIPPED, ids=os.path.basename)
def test_to_canonical_matches_nibabel_on_shipped_files(path):
    try:
        nii = nib.load(path)
        nii.affine  # noqa: B018
    except Exception:
        pytest.skip("not a volume")
    expected = nib.as_closest_canonical(nii)
    image = jmed.load(path)
    out = ToCanonical()(image)
    data = np.asarray(expected.dataobj)
    data = data.reshape(*data.shape[:3], -1)
    np.testing.assert_allclose(np.asarray(out.data), data, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(out.affine), expected.affine, atol=1e-5)
    assert out.orientation == "RAS"


@pytest.mark.parametrize("seed", range(6))
def test_to_canonical_matches_nibabel_on_random_orientations(seed):
    rng = np.random.default_rng(seed)
    code = affine_lib.ORIENTATIONS[rng.integers(len(affine_lib.ORIENTATIONS))]
    affine = affine_lib.from_spacing(rng.uniform(0.5, 2, 3), rng.normal(0, 20, 3), code)
    rotation = np.eye(4)
    rotation[:3, :3] = np.linalg.qr(np.eye(3) + 0.1 * rng.normal(size=(3, 3)))[0]
    rotation[:3, :3] *= np.sign(np.diag(rotation[:3, :3]))  # small oblique rotation
    affine = rotation @ affine
    data = rng.normal(size=(4, 5, 6)).astype(np.float32)
    expected = nib.as_closest_canonical(nib.Nifti1Image(data, affine))
    out = ToCanonical()(jmed.ScalarImage(data, affine))
    np.testing.assert_array_equal(np.asarray(out.data)[..., 0], np.asarray(expected.dataobj))
    np.testing.assert_allclose(out.affine, expected.affine, atol=1e-5)


def test_reorient_keeps_world_positions():
    affine = affine_lib.from_spacing((1.0, 2.0, 3.0), (5, 6, 7), "PIR")
    data = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    out = Reorient("LPS")(jmed.ScalarImage(data, affine))
    assert out.orientation == "LPS"
    out_data = np.asarray(out.data)[..., 0]
    for index in np.ndindex(out_data.shape):
        src = np.round(affine_lib.world_to_voxel(affine, _world(out.affine, index))).astype(int)
        assert out_data[index] == data[tuple(src)]


def test_reorient_under_jit_raises_clear_error(phantom):
    with pytest.raises(TypeError, match="Run it in the loader"):
        jax.jit(lambda s: ToCanonical()(s))(phantom)
    with pytest.raises(ValueError, match="orientation"):
        Reorient("RAX")


# --- resampling --------------------------------------------------------------------------


def _smooth_volume(shape, seed=0):
    grid = np.meshgrid(*[np.linspace(0, 1, n) for n in shape], indexing="ij")
    rng = np.random.default_rng(seed)
    return (
        100 + 50 * np.sin(3 * grid[0] + 1) * np.cos(2 * grid[1]) + 30 * grid[2] + rng.normal(size=shape)
    ).astype(np.float32)


def _inside_fov(in_shape, in_affine, out_shape, out_affine):
    matrix = np.linalg.solve(in_affine, out_affine)
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in out_shape], indexing="ij"), -1)
    coords = idx @ matrix[:3, :3].T + matrix[:3, 3]
    return np.all((coords >= 0) & (coords <= np.asarray(in_shape) - 1), -1)


def _assert_matches_nibabel(image, out):
    data = np.asarray(image.data)[..., 0]
    nii = nib.Nifti1Image(data, np.asarray(image.affine))
    expected = nibabel.processing.resample_from_to(nii, (out.spatial_shape, np.asarray(out.affine)), order=1)
    expected = np.asarray(expected.dataobj)
    inside = _inside_fov(
        image.spatial_shape, np.asarray(image.affine), out.spatial_shape, np.asarray(out.affine)
    )
    assert inside.mean() > 0.5
    error = np.abs(np.asarray(out.data)[..., 0] - expected)[inside]
    assert error.max() <= 1e-4 * np.abs(expected).max()


@pytest.mark.parametrize("spacing", [1.5, (0.7, 2.0, 1.3)])
def test_resample_to_spacing_matches_nibabel(spacing):
    image = jmed.ScalarImage(_smooth_volume((20, 18, 16)), OBLIQUE)
    out = Resample(spacing)(image)
    np.testing.assert_allclose(out.spacing, np.broadcast_to(spacing, 3), rtol=1e-9)
    np.testing.assert_allclose(affine_lib.direction(out.affine), affine_lib.direction(OBLIQUE), atol=1e-9)
    expected_shape = np.floor(np.array((20, 18, 16)) * affine_lib.spacing(OBLIQUE) / spacing + 1e-6)
    assert out.spatial_shape == tuple(expected_shape.astype(int))
    # the centre of the field of view stays in place
    np.testing.assert_allclose(
        _world(out.affine, (np.array(out.spatial_shape) - 1) / 2),
        _world(OBLIQUE, (np.array((20, 18, 16)) - 1) / 2),
    )
    _assert_matches_nibabel(image, out)


def test_resample_to_reference_matches_nibabel_and_scipy():
    scipy_ndimage = pytest.importorskip("scipy.ndimage")
    image = jmed.ScalarImage(_smooth_volume((20, 18, 16)), OBLIQUE)
    ref_affine = affine_lib.from_spacing((1.3, 1.1, 1.7), (-5.0, -15.0, 8.0), "RAS")
    reference = jmed.ScalarImage(np.zeros((14, 15, 13), np.float32), ref_affine)
    out = Resample(reference)(image)
    assert out.spatial_shape == (14, 15, 13)
    np.testing.assert_array_equal(out.affine, ref_affine)
    _assert_matches_nibabel(image, out)
    matrix = np.linalg.solve(OBLIQUE, ref_affine)
    expected = scipy_ndimage.affine_transform(
        np.asarray(image.data)[..., 0], matrix, output_shape=(14, 15, 13), order=1
    )
    inside = _inside_fov((20, 18, 16), OBLIQUE, (14, 15, 13), ref_affine)
    err = np.abs(np.asarray(out.data)[..., 0] - expected)[inside]
    assert err.max() <= 1e-4 * np.abs(expected).max()


def test_resample_keeps_bright_point_world_position():
    affine = affine_lib.from_spacing((1.0, 1.0, 1.0), (3.0, -4.0, 10.0), "LAS")
    centre = np.array([13.3, 17.0, 11.6])
    idx = np.stack(np.meshgrid(*[np.arange(31)] * 3, indexing="ij"), -1)
    data = (1000 * np.exp(-((idx - centre) ** 2).sum(-1) / (2 * 1.5**2))).astype(np.float32)
    image = jmed.ScalarImage(data, affine)
    point = _world(affine, centre)
    for spacing in (0.5, 2.0, (0.8, 1.7, 1.2)):
        out = Resample(spacing)(image)
        values = np.asarray(out.data)[..., 0]
        found = affine_lib.world_to_voxel(np.asarray(out.affine), point)
        peak = np.unravel_index(np.argmax(values), out.spatial_shape)
        assert np.all(np.abs(found - np.asarray(peak)) <= 0.5 + 1e-6)
        out_idx = np.stack(np.meshgrid(*[np.arange(n) for n in values.shape], indexing="ij"), -1)
        com = (out_idx * values[..., None]).sum((0, 1, 2)) / values.sum()
        assert np.all(np.abs(com - found) <= 0.5)


def test_resample_labels_nearest_keeps_dtype_and_values(phantom):
    out = Resample(2.0)(phantom)
    assert out.seg.dtype == phantom.seg.dtype
    assert set(np.unique(np.asarray(out.seg.data))) <= set(np.unique(np.asarray(phantom.seg.data)))
    assert out.t1.spatial_shape == out.seg.spatial_shape == (12, 10, 8)
    np.testing.assert_array_equal(out.t1.affine, out.seg.affine)


def test_resample_to_subject_image_and_file(tmp_path, phantom):
    small = jmed.ScalarImage(np.zeros((6, 5, 4), np.float32), affine_lib.from_spacing((3, 3, 3)))
    subject = phantom.replace({"ref": small})
    out = Resample("ref")(subject)
    assert out.t1.spatial_shape == (6, 5, 4)
    path = tmp_path / "ref.nii.gz"
    jmed.save(small, path)
    out2 = Resample(str(path))(phantom)
    np.testing.assert_allclose(out2.t1.data, out.t1.data, atol=1e-5)
    with pytest.raises(ValueError, match="neither an image of the subject"):
        Resample("missing")(phantom)


def test_resample_fixed_grid_under_jit_and_vmap(run, phantom):
    target = ((12, 10, 8), affine_lib.from_spacing((2.0, 2.0, 2.0), (1.0, 0.5, 0.5)))
    eager = Resample(target)(phantom)
    out = run(lambda k, s, transform=Resample(target): transform(s), None, phantom)
    np.testing.assert_allclose(out.t1.data, eager.t1.data, atol=1e-4)
    np.testing.assert_array_equal(out.seg.data, eager.seg.data)


def test_resample_to_spacing_under_jit_raises_clear_error(phantom):
    with pytest.raises(TypeError, match="Resample to a spacing needs concrete values.*fixed grid"):
        jax.jit(lambda s: Resample(1.5)(s))(phantom)


@pytest.mark.parametrize("bad", [0, -1.0, (1.0, 0.0, 1.0), (1.0, -2.0, 1.0), float("nan")])
def test_resample_rejects_bad_spacing(bad):
    with pytest.raises(ValueError, match="spacing must be positive"):
        Resample(bad)


def test_resample_rejects_bad_targets():
    with pytest.raises(ValueError, match="target"):
        Resample(((10, 10, 10), np.eye(3)))
    with pytest.raises(ValueError, match="positive"):
        Resample(((10, 0, 10), np.eye(4)))
    with pytest.raises(ValueError, match="singular"):
        Resample(((10, 10, 10), np.zeros((4, 4))))
    with pytest.raises(ValueError, match="image_interpolation"):
        Resample(1.0, image_interpolation="cubic")


def test_resize_matches_field_of_view(run, phantom):
    out = run(lambda k, s, transform=Resize((12, 40, 8)): transform(s), None, phantom)
    assert out.t1.spatial_shape == (12, 40, 8)
    in_affine = np.asarray(phantom.t1.affine)
    # outer corners of the field of view stay in place
    for corner_in, corner_out in [((-0.5,) * 3, (-0.5,) * 3), ((23.5, 19.5, 15.5), (11.5, 39.5, 7.5))]:
        np.testing.assert_allclose(_world(out.t1.affine, corner_out), _world(in_affine, corner_in), atol=1e-5)
    np.testing.assert_allclose(out.t1.spacing, [2.0, 0.5, 2.0], atol=1e-6)
    # agrees with nibabel inside the field of view
    _assert_matches_nibabel(phantom.t1, jax.tree.map(np.asarray, Resize((12, 40, 8))(phantom.t1)))


def test_resize_rejects_zero_shape():
    with pytest.raises(ValueError, match="target_shape must be positive"):
        Resize((10, 0, 10))


# --- crop and pad ------------------------------------------------------------------------


def _assert_world_preserved(before, after, start):
    """Every output voxel inside the input shows the input voxel at the same world point."""
    a_in, a_out = np.asarray(before.affine, float), np.asarray(after.affine, float)
    data_in, data_out = np.asarray(before.data), np.asarray(after.data)
    index = np.stack(np.meshgrid(*[np.arange(n) for n in after.spatial_shape], indexing="ij"), -1)
    src = index + np.asarray(start)
    inside = np.all((src >= 0) & (src < np.asarray(before.spatial_shape)), -1)
    assert inside.any()
    np.testing.assert_allclose(_world(a_out, index[inside]), _world(a_in, src[inside]), atol=1e-4)
    np.testing.assert_array_equal(data_out[inside], data_in[tuple(src[inside].T)])


def test_crop_keeps_world_coordinates(run):
    phantom = make_phantom((10, 9, 8), OBLIQUE)
    out = run(lambda k, s, transform=Crop((1, 2, 0, 3, 2, 1)): transform(s), None, phantom)
    assert out.t1.spatial_shape == (7, 6, 5)
    _assert_world_preserved(phantom.t1, out.t1, np.array([1, 0, 2]))
    _assert_world_preserved(phantom.seg, out.seg, np.array([1, 0, 2]))


@pytest.mark.parametrize("mode", ["constant", 7.5, "edge", "reflect", "mean"])
def test_pad_keeps_world_coordinates_and_modes(run, mode):
    phantom = make_phantom((10, 9, 8), OBLIQUE)
    out = run(lambda k, s, transform=Pad((2, 1, 0), padding_mode=mode): transform(s), None, phantom)
    assert out.t1.spatial_shape == (14, 11, 8)
    _assert_world_preserved(phantom.t1, out.t1, np.array([-2, -1, 0]))
    t1 = np.asarray(phantom.t1.data)
    corner = np.asarray(out.t1.data)[0, 0, 0, 0]
    expected = {
        "constant": 0.0,
        7.5: 7.5,
        "edge": t1[0, 0, 0, 0],
        "reflect": t1[2, 1, 0, 0],
        "mean": t1.mean(),
    }
    np.testing.assert_allclose(corner, expected[mode], rtol=1e-5)
    seg = np.asarray(phantom.seg.data)
    expected_seg = {"edge": seg[0, 0, 0, 0], "reflect": seg[2, 1, 0, 0]}.get(mode, 0)
    assert np.asarray(out.seg.data)[0, 0, 0, 0] == expected_seg


def test_pad_inverse_is_crop_and_crop_inverse_pads_zeros(phantom):
    padded = Pad((1, 2, 3, 0, 2, 1), padding_mode="edge")(phantom)
    restored = invert(padded)
    for name in phantom:
        np.testing.assert_array_equal(restored[name].data, phantom[name].data)
        np.testing.assert_allclose(restored[name].affine, phantom[name].affine, atol=1e-12)
    cropped = Crop(2)(phantom)
    back = invert(cropped)
    assert back.spatial_shape == phantom.spatial_shape
    np.testing.assert_array_equal(
        np.asarray(back.t1.data)[2:-2, 2:-2, 2:-2], np.asarray(phantom.t1.data)[2:-2, 2:-2, 2:-2]
    )
    assert np.all(np.asarray(back.t1.data)[:2] == 0)


def test_crop_or_pad_round_trip_when_only_padding(phantom):
    out = CropOrPad((29, 24, 21), padding_mode="reflect")(phantom)
    assert out.spatial_shape == (29, 24, 21)
    _assert_world_preserved(phantom.t1, out.t1, np.array([-3, -2, -3]))
    restored = invert(out)
    for name in phantom:
        np.testing.assert_array_equal(restored[name].data, phantom[name].data)
        np.testing.assert_allclose(restored[name].affine, phantom[name].affine, atol=1e-12)
    # cropping back with CropOrPad to the original shape restores the data exactly too
    again = CropOrPad(phantom.spatial_shape)(out)
    np.testing.assert_array_equal(again.t1.data, phantom.t1.data)


def test_crop_or_pad_mixed_under_jit_and_vmap(run, phantom):
    out = run(lambda k, s, transform=CropOrPad((20, 25, 13)): transform(s), None, phantom)
    assert out.spatial_shape == (20, 25, 13)
    _assert_world_preserved(phantom.t1, out.t1, np.array([2, -3, 2]))
    inv = run(lambda k, s, transform=CropOrPad((20, 25, 13)): invert(transform(s)), None, phantom)
    np.testing.assert_array_equal(
        np.asarray(inv.t1.data)[2:22, :, 2:15], np.asarray(phantom.t1.data)[2:22, :, 2:15]
    )


def test_crop_or_pad_centred_on_mask(run):
    data = np.zeros((20, 16, 12), np.float32)
    mask = np.zeros((20, 16, 12), np.uint8)
    mask[2:7, 10:16, 3:6] = 1  # bounding box centre (4, 12.5, 4)
    data[4, 12, 4] = 5.0
    subject = jmed.Subject(t1=jmed.ScalarImage(data, OBLIQUE), mask=jmed.LabelMap(mask, OBLIQUE))
    out = run(lambda k, s, transform=CropOrPad((5, 6, 3), mask_name="mask"): transform(s), None, subject)
    assert out.spatial_shape == (5, 6, 3)
    np.testing.assert_array_equal(np.asarray(out.mask.data)[..., 0], 1)  # box fits the mask exactly
    assert np.asarray(out.t1.data)[2, 2, 1, 0] == 5.0
    _assert_world_preserved(subject.t1, out.t1, np.array([2, 10, 3]))
    # a window larger than the image around an off-centre mask pads
    big = CropOrPad((10, 10, 10), mask_name="mask")(subject)
    start = np.asarray(big.history[-1][1].start)
    np.testing.assert_array_equal(start, [-1, 8, -1])
    _assert_world_preserved(subject.t1, big.t1, start)
    # an empty mask falls back to the volume centre
    empty = subject.replace({"mask": jmed.LabelMap(np.zeros_like(mask), OBLIQUE)})
    centred = CropOrPad((10, 10, 10), mask_name="mask")(empty)
    np.testing.assert_array_equal(centred.history[-1][1].start, [5, 3, 1])


def test_replay_applies_the_same_window(phantom):
    other = make_phantom(seed=3)
    out = CropOrPad((20, 22, 10), mask_name="seg")(phantom)
    replayed = replay(other, out.history)
    np.testing.assert_array_equal(replayed.t1.data, CropOrPad((20, 22, 10), mask_name="seg")(other).t1.data)


def test_ensure_shape_multiple(run, phantom):
    out = run(lambda k, s, transform=EnsureShapeMultiple(16): transform(s), None, phantom)
    assert out.spatial_shape == (32, 32, 16)
    np.testing.assert_array_equal(np.asarray(out.t1.data)[4:28, 6:26], phantom.t1.data)
    cropped = EnsureShapeMultiple((5, 7, 3), method="crop")(phantom)
    assert cropped.spatial_shape == (20, 14, 15)
    with pytest.raises(ValueError, match="method"):
        EnsureShapeMultiple(8, method="both")


def test_crop_foreground(phantom):
    out = CropForeground(mask_name="seg", margin=1)(phantom)
    seg = np.asarray(phantom.seg.data)[..., 0]
    nz = np.nonzero(seg)
    lo = np.maximum(np.array([n.min() for n in nz]) - 1, 0)
    hi = np.minimum(np.array([n.max() for n in nz]) + 2, seg.shape)
    assert out.spatial_shape == tuple(hi - lo)
    _assert_world_preserved(phantom.seg, out.seg, lo)
    assert np.asarray(out.seg.data).sum() == seg.sum()
    # by threshold on the intensity image
    thr = CropForeground(threshold=150.0)(phantom)
    t1 = np.asarray(phantom.t1.data)[..., 0]
    nz = np.nonzero(t1 > 150.0)
    assert thr.spatial_shape == tuple(int(n.max() - n.min() + 1) for n in nz)
    restored = invert(out)
    np.testing.assert_array_equal(restored.seg.data, phantom.seg.data)
    with pytest.raises(ValueError, match="empty foreground"):
        CropForeground(threshold=1e9)(phantom)
    with pytest.raises(TypeError, match="CropOrPad"):
        jax.jit(lambda s: CropForeground(mask_name="seg")(s))(phantom)


def test_copy_affine(run, phantom):
    other_affine = affine_lib.from_spacing((2.0, 2.0, 2.0), (1.0, 2.0, 3.0))
    subject = phantom.replace({"seg": phantom.seg.replace(affine=other_affine)})
    out = run(lambda k, s, transform=CopyAffine("t1"): transform(s), None, subject)
    np.testing.assert_allclose(out.seg.affine, phantom.t1.affine)
    np.testing.assert_array_equal(out.seg.data, phantom.seg.data)
    bad = phantom.replace({"seg": jmed.LabelMap(np.zeros((3, 3, 3), np.uint8))})
    with pytest.raises(ValueError, match="not the same voxel grid"):
        CopyAffine("t1")(bad)


def test_crop_pad_bad_input(phantom):
    with pytest.raises(ValueError, match="target_shape must be positive"):
        CropOrPad((10, 0, 10))
    with pytest.raises(ValueError, match="padding_mode must be one of"):
        Pad(2, padding_mode="circular")
    with pytest.raises(ValueError, match="cropping must be non-negative"):
        Crop(-1)
    with pytest.raises(ValueError, match="padding must be 1, 3 or 6"):
        Pad((1, 2))
    with pytest.raises(ValueError, match="leaves nothing"):
        Crop(12)(phantom)


def test_traced_data_pad_in_vmapped_pipeline():
    subject = make_phantom((8, 8, 8))
    batch = jmed.stack([subject, subject])
    out = jax.vmap(lambda s: Pad(1, padding_mode="maximum")(s))(batch)
    assert out.t1.data.shape == (2, 10, 10, 10, 1)
    np.testing.assert_allclose(out.t1.data[0, 0, 0, 0, 0], jnp.max(subject.t1.data), rtol=1e-6)


def test_resample_antialias_matches_blur_then_resample():
    scipy_ndimage = pytest.importorskip("scipy.ndimage")
    rng = np.random.default_rng(0)
    data = rng.normal(size=(24, 20, 16)).astype(np.float32)
    affine = affine_lib.from_spacing((1.0, 1.0, 2.0))
    image = jmed.ScalarImage(data, affine)
    out = Resample((3.0, 1.0, 2.0), antialias=True)(image)
    # downsampling by 3 along x only: sigma^2 = (3^2 - 1) / (8 ln 2) voxels
    sigma = np.sqrt(8 / (8 * np.log(2)))
    blurred = scipy_ndimage.gaussian_filter1d(data, sigma, axis=0, mode="nearest")
    expected = Resample((3.0, 1.0, 2.0))(jmed.ScalarImage(blurred, affine))
    np.testing.assert_allclose(out.data, expected.data, atol=1e-4)
    plain = Resample((3.0, 1.0, 2.0))(image)
    assert np.asarray(out.data).std() < np.asarray(plain.data).std()  # noise is smoothed
    # labels are not smoothed; upsampling is not smoothed
    seg = jmed.LabelMap((data > 0).astype(np.uint8), affine)
    np.testing.assert_array_equal(Resample(3.0, antialias=True)(seg).data, Resample(3.0)(seg).data)
    np.testing.assert_array_equal(Resample(0.5, antialias=True)(image).data, Resample(0.5)(image).data)


def test_resample_partial_volume_labels(phantom):
    out = Resample(2.0, label_interpolation="partial_volume")(phantom)
    assert out.seg.dtype == phantom.seg.dtype
    assert set(np.unique(np.asarray(out.seg.data))) <= {0, 1, 2}


def _oblique_affine():
    affine = affine_lib.from_spacing((0.9375, 1.2, 2.5), origin=(-30.3, 12.7, 7.1), orientation="LPS")
    affine[:3, :3] = np.array([[0.96, -0.28, 0], [0.28, 0.96, 0], [0, 0, 1.0]]) @ affine[:3, :3]
    # solve(A, A) may not be exactly the identity (it depends on the LAPACK build): the
    # shortcut must allow for rounding
    return affine


@pytest.mark.parametrize("oblique", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, np.int16])
def test_resample_to_the_same_grid_equals_the_kernel(dtype, oblique, monkeypatch):
    # the same-grid shortcut returns what the interpolation kernel returns, bit for bit
    from jmed.transforms import preprocessing

    kernel = preprocessing._resample_jit
    rng = np.random.default_rng(0)
    if oblique:
        affine = _oblique_affine()
    else:
        affine = affine_lib.from_spacing((1.0, 1.0, 1.0), origin=(-5.0, 3.0, 2.0))
    t1 = jmed.ScalarImage((rng.random((9, 8, 7)) * 100).astype(dtype), affine)
    seg = jmed.LabelMap(rng.integers(0, 3, (9, 8, 7)).astype(np.uint8), affine)
    monkeypatch.setattr(preprocessing, "_resample_jit", None)  # the shortcut must not call it
    subject = jmed.Subject(t1=t1, seg=seg)
    out = Resample(((9, 8, 7), affine))(subject)
    if not oblique:  # the spacing route reaches the same grid
        for name in ("t1", "seg"):
            np.testing.assert_array_equal(Resample(1.0)(subject)[name].data, out[name].data)
    for name, source, order in (("t1", t1, 1), ("seg", seg, 0)):
        expected = kernel(source.data, np.eye(4), output_shape=(9, 8, 7), order=order, pad_value=0.0)
        assert out[name].data.dtype == expected.dtype
        np.testing.assert_array_equal(np.asarray(out[name].data), np.asarray(expected))
        np.testing.assert_array_equal(out[name].affine, affine)


@pytest.mark.parametrize("angle", [0.0, 7.0, 33.0, 61.0])
@pytest.mark.parametrize("orientation", ["RAS", "LPS", "PIR"])
def test_resample_shape_is_exact_on_float32_oblique_headers(angle, orientation):
    # 35 x 1.2 = 42, 40 x 1.3 = 52, 25 x 3.0 = 75 mm: at 1 mm the grid has exactly
    # (42, 52, 75) voxels, whatever rounding the float32 header brings to the spacing
    affine = affine_lib.from_spacing((1.2, 1.3, 3.0), origin=(-20.1, 3.3, 8.7), orientation=orientation)
    c, s = np.cos(np.deg2rad(angle)), np.sin(np.deg2rad(angle))
    tilt = np.array([[1.0, 0, 0], [0, c, -s], [0, s, c]]) @ np.array([[c, 0, s], [0, 1.0, 0], [-s, 0, c]])
    affine[:3, :3] = tilt @ affine[:3, :3]
    affine = affine.astype(np.float32).astype(np.float64)  # as read from a NIfTI sform
    image = jmed.ScalarImage(np.zeros((35, 40, 25), np.float32), affine)
    out = Resample(1.0)(image)
    assert out.spatial_shape == (42, 52, 75)
    np.testing.assert_allclose(affine_lib.spacing(np.asarray(out.affine)), 1.0, atol=1e-6)


def test_resample_shape_rounds_down_a_true_fraction():
    # 10 voxels of 1.25 mm at 1 mm: 12.5 -> 12 (the extent is never exceeded)
    image = jmed.ScalarImage(np.zeros((10, 10, 10), np.float32), affine_lib.from_spacing((1.25, 0.9999, 1.0)))
    assert Resample(1.0)(image).spatial_shape == (12, 9, 10)
