import gzip
import os

import nibabel as nib
import numpy as np
import pytest
from nibabel.testing import data_path

import jmed
from jmed import affine as A

ROTATED = A.from_spacing((1.5, 2.0, 2.5), origin=(-30.25, 12.5, 7.125), orientation="LPS")
ROTATED[:3, :3] = np.array([[0.96, -0.28, 0], [0.28, 0.96, 0], [0, 0, 1.0]]) @ ROTATED[:3, :3]


def _roundtrip(tmp_path, image, ext):
    path = tmp_path / f"img{ext}"
    jmed.save(image, path)
    return jmed.load(path, kind=image.kind)


@pytest.mark.parametrize("ext", [".nii", ".nii.gz", ".mgh", ".mgz"])
@pytest.mark.parametrize("channels", [1, 3])
def test_roundtrip_float_exact(tmp_path, ext, channels):
    data = np.random.default_rng(0).standard_normal((5, 6, 7, channels)).astype(np.float32)
    back = _roundtrip(tmp_path, jmed.ScalarImage(data, ROTATED), ext)
    assert back.dtype == np.float32 and back.shape == data.shape
    np.testing.assert_array_equal(np.asarray(back.data), data)  # bitwise for float32
    np.testing.assert_allclose(back.affine, ROTATED, atol=1e-5)


@pytest.mark.parametrize("ext", [".nii", ".nii.gz", ".mgz", ".hdr", ".img"])
@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.int32])
def test_roundtrip_labels_exact(tmp_path, ext, dtype):
    data = np.random.default_rng(1).integers(0, 100, (5, 6, 7, 1)).astype(dtype)
    affine = ROTATED
    back = _roundtrip(tmp_path, jmed.LabelMap(data, affine), ext)
    assert back.kind == "label" and np.issubdtype(back.dtype, np.integer)
    np.testing.assert_array_equal(np.asarray(back.data), data)
    np.testing.assert_allclose(back.affine, affine, atol=1e-5)


@pytest.mark.parametrize(
    "name, shape, orientation",
    [
        ("anatomical.nii", (33, 41, 25, 1), "LAS"),
        ("example4d.nii.gz", (128, 96, 24, 2), "LAS"),
        ("example_nifti2.nii.gz", (32, 20, 12, 2), "LAS"),
        ("standard.nii.gz", (4, 5, 7, 1), "RAS"),
        ("test.mgz", (3, 4, 5, 2), "SAR"),
        ("tiny.mnc", (10, 20, 20, 1), "SAR"),
        ("minc1_4d.mnc", (10, 20, 20, 2), "SAR"),
    ],
)
def test_nibabel_shipped_files(name, shape, orientation):
    path = os.path.join(data_path, name)
    img = jmed.load(path)
    ref = nib.load(path)
    assert img.shape == shape
    assert img.orientation == orientation
    np.testing.assert_allclose(img.affine, ref.affine)
    ref_data = np.asarray(ref.get_fdata(dtype=np.float32))
    if name == "minc1_4d.mnc":
        ref_data = np.moveaxis(ref_data, 0, -1)
    np.testing.assert_array_equal(np.asarray(img.data), ref_data.reshape(shape))


def test_header_without_data_file_is_a_clear_error():
    img = jmed.load(os.path.join(data_path, "analyze.hdr"), lazy=True)  # header reads
    assert img.spatial_shape == (91, 109, 91)
    with pytest.raises(ValueError, match="analyze.hdr: cannot read voxel data"):
        _ = img.data


def test_minc2_reads_with_h5py():
    pytest.importorskip("h5py")
    path = os.path.join(data_path, "minc2_4d.mnc")
    img = jmed.load(path)
    assert img.shape == (10, 20, 20, 2)
    reference = nib.load(path)  # time first in the file: jmed moves it to the channels
    np.testing.assert_allclose(np.asarray(img.data), np.moveaxis(np.asarray(reference.dataobj), 0, -1))
    np.testing.assert_allclose(img.affine, reference.affine)


def test_scaling_applied_and_labels_keep_integers(tmp_path):
    data = np.arange(60, dtype=np.int16).reshape(3, 4, 5)
    nii = nib.Nifti1Image(data, np.eye(4))
    nii.header.set_slope_inter(2.0, 10.0)
    path = tmp_path / "scaled.nii"
    nib.save(nii, path)
    img = jmed.load(path)
    np.testing.assert_allclose(np.asarray(img.data)[..., 0], data * 2.0 + 10.0)
    labels = jmed.load(path, kind="label")
    np.testing.assert_array_equal(np.asarray(labels.data)[..., 0], data * 2 + 10)
    assert np.issubdtype(labels.dtype, np.integer)


def test_2d_file_becomes_single_slice(tmp_path):
    path = tmp_path / "slice.nii.gz"
    data = np.arange(42, dtype=np.float32).reshape(6, 7)
    nib.save(nib.Nifti1Image(data, np.diag([2.0, 3.0, 4.0, 1.0])), path)
    image = jmed.load(path)
    assert image.shape == (6, 7, 1, 1)
    np.testing.assert_array_equal(np.asarray(image.data)[..., 0, 0], data)
    np.testing.assert_array_equal(image.affine, np.diag([2.0, 3.0, 4.0, 1.0]))


def test_lazy_load_reads_header_only(tmp_path):
    path = tmp_path / "lazy.nii.gz"
    data = np.random.default_rng(2).standard_normal((8, 9, 10)).astype(np.float32)
    nib.save(nib.Nifti1Image(data, ROTATED), path)
    img = jmed.load(path, lazy=True)
    assert not img.is_loaded
    assert img.spatial_shape == (8, 9, 10) and img.orientation == "LPS"
    assert not img.is_loaded
    np.testing.assert_array_equal(np.asarray(img.data)[..., 0], data)
    assert img.is_loaded


def test_save_is_atomic_and_refuses_overwrite(tmp_path):
    path = tmp_path / "out.nii.gz"
    first = jmed.ScalarImage(np.ones((3, 3, 3), np.float32))
    jmed.save(first, path)
    before = path.read_bytes()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        jmed.save(jmed.ScalarImage(np.zeros((3, 3, 3), np.float32)), path)
    assert path.read_bytes() == before
    jmed.save(jmed.ScalarImage(np.zeros((3, 3, 3), np.float32)), path, overwrite=True)
    assert float(np.asarray(jmed.load(path).data).max()) == 0.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.nii.gz"]  # no temp files left


def test_failed_write_keeps_existing_file(tmp_path, monkeypatch):
    path = tmp_path / "keep.nii"
    jmed.save(jmed.ScalarImage(np.ones((3, 3, 3), np.float32)), path)
    before = path.read_bytes()

    def broken_save(img, filename):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(nib, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        jmed.save(jmed.ScalarImage(np.zeros((3, 3, 3), np.float32)), path, overwrite=True)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.nii"]


def _gzip_members(path, raw, cut):
    """``raw`` written as two gzip members split at ``cut``, then zero padding."""
    path.write_bytes(gzip.compress(raw[:cut]) + gzip.compress(raw[cut:]) + b"\0" * 16)


def test_gzipped_nifti_matches_nibabel_scaled_multimember_and_padded(tmp_path):
    rng = np.random.default_rng(3)
    data = rng.integers(-500, 500, (9, 8, 7), dtype=np.int16)
    img = nib.Nifti1Image(data, ROTATED)
    img.header.set_slope_inter(0.5, -3.0)
    plain = tmp_path / "scaled.nii"
    nib.save(img, plain)
    single = tmp_path / "scaled.nii.gz"
    nib.save(img, single)
    multi = tmp_path / "multi.nii.gz"
    _gzip_members(multi, plain.read_bytes(), 200)  # splits the header
    expected = nib.load(plain).get_fdata(dtype=np.float32)
    np.testing.assert_array_equal(expected, data * np.float32(0.5) - np.float32(3.0))
    for path in (single, multi):
        loaded = jmed.load(path)
        assert loaded.dtype == np.float32
        np.testing.assert_array_equal(np.asarray(loaded.data)[..., 0], expected)
        np.testing.assert_allclose(loaded.affine, ROTATED, atol=1e-5)
    labels = rng.integers(0, 4, (9, 8, 7), dtype=np.uint8)
    nib.save(nib.Nifti1Image(labels, np.eye(4)), plain)
    _gzip_members(multi, plain.read_bytes(), 1000)  # splits the voxels
    label = jmed.load(multi, kind="label")
    assert label.dtype == np.uint8
    np.testing.assert_array_equal(np.asarray(label.data)[..., 0], labels)


def test_gzipped_nifti2_and_corrupt_checksum(tmp_path):
    data = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
    path = tmp_path / "two.nii.gz"
    nib.save(nib.Nifti2Image(data, np.eye(4)), path)
    np.testing.assert_array_equal(np.asarray(jmed.load(path).data)[..., 0], data)
    # flip a byte of the CRC-32 in the gzip trailer: the data inflate but must not be used
    raw = bytearray(path.read_bytes())
    raw[-8] ^= 0xFF
    bad = tmp_path / "badcrc.nii.gz"
    bad.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="badcrc.nii.gz"):
        _ = jmed.load(bad).data
    # a well-formed gzip stream that holds fewer voxels than the header declares
    plain = tmp_path / "two.nii"
    nib.save(nib.Nifti2Image(data, np.eye(4)), plain)
    short = tmp_path / "short.nii.gz"
    short.write_bytes(gzip.compress(plain.read_bytes()[:-40]))
    with pytest.raises(ValueError, match=r"short.nii.gz.*holds 440 bytes of voxel data, the header says 480"):
        _ = jmed.load(short).data


@pytest.mark.parametrize("dtype, kind", [(np.float32, "intensity"), (np.uint8, "label"), (np.int16, "label")])
def test_gzipped_voxels_are_aligned_for_jax(tmp_path, dtype, kind):
    # voxels read as stored (no conversion) in the file's order are the inflated buffer
    # itself, 64-byte aligned: XLA:CPU uses such host buffers in place and copies
    # unaligned ones; load() converts them to C order, again aligned
    path = tmp_path / "aligned.nii.gz"
    values = np.arange(7 * 5 * 3).reshape(7, 5, 3).astype(dtype)
    nib.save(nib.Nifti1Image(values, np.eye(4)), path)
    as_stored = jmed.io._load(path, kind, file_order=True).data
    assert as_stored.dtype == dtype and as_stored.ctypes.data % 64 == 0 and as_stored.flags.f_contiguous
    np.testing.assert_array_equal(as_stored[..., 0], values)
    for lazy in (False, True):
        data = jmed.load(path, kind=kind, lazy=lazy).data
        assert data.dtype == dtype and data.ctypes.data % 64 == 0 and data.flags.c_contiguous
        np.testing.assert_array_equal(data[..., 0], values)


@pytest.mark.parametrize("name", ["scaled.nii", "scaled.nii.gz"])
def test_loaded_voxels_are_c_ordered_float32_as_nibabel_reads_them(tmp_path, name):
    rng = np.random.default_rng(3)
    nifti = nib.Nifti1Image(rng.uniform(-5, 5, (6, 7, 8, 2)), np.eye(4))
    nifti.set_data_dtype(np.int16)  # scaled: scl_slope and scl_inter not 1 and 0
    nib.save(nifti, tmp_path / name)
    expected = nib.load(tmp_path / name).get_fdata(dtype=np.float32)
    image = jmed.load(tmp_path / name)
    assert image.dtype == np.float32 and image.data.flags.c_contiguous and image.data.ctypes.data % 64 == 0
    np.testing.assert_array_equal(image.data, expected)


def test_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.nii"):
        jmed.load(tmp_path / "missing.nii")
    with pytest.raises(IsADirectoryError, match=str(tmp_path)):
        jmed.load(tmp_path)
    txt = tmp_path / "notes.txt"
    txt.write_text("hello")
    with pytest.raises(ValueError, match="unsupported extension '.txt'"):
        jmed.load(txt)
    # truncated .nii.gz
    good = tmp_path / "good.nii.gz"
    nib.save(
        nib.Nifti1Image(np.random.default_rng(0).random((20, 20, 20)).astype(np.float32), np.eye(4)), good
    )
    truncated = tmp_path / "truncated.nii.gz"
    truncated.write_bytes(good.read_bytes()[:-2000])
    with pytest.raises(ValueError, match="truncated.nii.gz"):
        _ = jmed.load(truncated).data
    garbage = tmp_path / "garbage.nii.gz"
    garbage.write_bytes(gzip.compress(b"not a nifti header at all" * 20))
    with pytest.raises(ValueError, match="garbage.nii.gz"):
        jmed.load(garbage)
    five_d = tmp_path / "five.nii"
    nib.save(nib.Nifti1Image(np.zeros((2, 3, 4, 2, 2), np.float32), np.eye(4)), five_d)
    with pytest.raises(ValueError, match="5 dimensions"):
        jmed.load(five_d)
    singular = tmp_path / "singular.nii"
    img = nib.Nifti1Image(np.zeros((2, 3, 4), np.float32), np.eye(4))
    img.set_sform(np.diag([1.0, 0.0, 1.0, 1.0]), code=1)
    nib.save(img, singular)
    with pytest.raises(ValueError, match="singular"):
        jmed.load(singular)
    with pytest.raises(ValueError, match="kind must be one of"):
        jmed.load(good, kind="segmentation")
    with pytest.raises(ValueError, match="cannot write extension '.mnc'"):
        jmed.save(jmed.ScalarImage(np.zeros((2, 2, 2))), tmp_path / "x.mnc")
    with pytest.raises(ValueError, match="non-integer"):
        _ = jmed.load(good, kind="label").data


@pytest.mark.parametrize(
    ("values", "dtype", "message"),
    [
        ([0, 1, 4_000_000_000], np.uint32, "4000000000 does not fit"),
        ([0, 2**40 + 1], np.uint64, "1099511627777 does not fit"),
        ([0, -(2**35)], np.int64, "-34359738368 does not fit"),
        ([0.0, 1e300], np.float64, "does not fit"),
        ([0.0, np.nan, 2.0], np.float32, "non-finite values"),
        ([0.0, 1.5], np.float32, "non-integer values"),
    ],
)
def test_label_values_that_do_not_fit_raise_naming_the_file(tmp_path, values, dtype, message):
    data = np.zeros((4, 3, 2), dtype)
    data.flat[: len(values)] = np.asarray(values, dtype)
    path = tmp_path / "seg.nii.gz"
    nib.save(nib.Nifti1Image(data, np.eye(4), dtype=dtype), path)
    with pytest.raises(ValueError, match=message) as info:
        np.asarray(jmed.load(path, kind="label").data)
    assert "seg.nii.gz" in str(info.value)


@pytest.mark.parametrize("dtype", [np.uint32, np.uint64, np.int64, np.float64])
def test_label_values_that_fit_keep_their_values(tmp_path, dtype):
    data = np.zeros((4, 3, 2), dtype)
    data.flat[:4] = np.asarray([0, 7, 2**31 - 1, 1000], dtype)
    path = tmp_path / "seg.nii.gz"
    nib.save(nib.Nifti1Image(data, np.eye(4), dtype=dtype), path)
    loaded = np.asarray(jmed.load(path, kind="label").data)[..., 0]
    assert loaded.dtype == np.int32
    np.testing.assert_array_equal(loaded, data.astype(np.int64))


def test_label_map_data_that_would_wrap_raises():
    with pytest.raises(ValueError, match="label map data: label value 4000000000 does not fit in int32"):
        jmed.LabelMap(np.full((2, 2, 2), 4_000_000_000, np.int64))
    with pytest.raises(ValueError, match="1099511627777 does not fit in uint32"):
        jmed.LabelMap(np.full((2, 2, 2), 2**40 + 1, np.uint64))
    kept = jmed.LabelMap(np.full((2, 2, 2), 2**31 - 1, np.int64))
    assert int(np.asarray(kept.data).max()) == 2**31 - 1
    with pytest.raises(ValueError, match="non-finite"):
        jmed.LabelMap(np.array([[[0.0, np.nan]]], np.float32))
