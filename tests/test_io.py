import gzip
import os

import jax
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


# --- malformed headers, unusual dtypes ------------------------------------------------------


def _raw_header(shape, dtype=np.uint8):
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(dtype)
    header["vox_offset"] = 352
    header.set_sform(np.eye(4), code=1)
    return header.binaryblock + b"\0" * 4


def test_huge_dims_in_a_small_file_raise_naming_file_and_dims(tmp_path):
    raw = _raw_header((30000, 30000, 30000)) + b"\0" * 32
    plain, packed = tmp_path / "huge.nii", tmp_path / "huge.nii.gz"
    plain.write_bytes(raw)
    packed.write_bytes(gzip.compress(raw))
    for path in (plain, packed):
        image = jmed.load(path, lazy=True)  # the header alone is fine
        assert image.shape == (30000, 30000, 30000, 1)
        with pytest.raises(ValueError, match=rf"{path.name}.*\(30000, 30000, 30000\)"):
            jmed.load(path)


def test_truncated_uncompressed_file_names_the_sizes(tmp_path):
    path = tmp_path / "cut.nii"
    nib.save(nib.Nifti1Image(np.ones((8, 8, 8), np.float32), np.eye(4)), path)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ValueError, match=r"cut\.nii.*\(8, 8, 8\).*truncated"):
        jmed.load(path)


def test_negative_or_zero_dims_raise_naming_the_file(tmp_path):
    raw = bytearray(_raw_header((4, 4, 4)))
    raw[42:44] = np.int16(-5).tobytes()  # dim[1]
    path = tmp_path / "negative.nii"
    path.write_bytes(bytes(raw) + b"\0" * 64)
    with pytest.raises(ValueError, match=r"negative\.nii.*-5"):
        jmed.load(path)
    zero = tmp_path / "zero.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 0, 4), np.float32), np.eye(4)), zero)
    with pytest.raises(ValueError, match=r"zero\.nii\.gz.*\(4, 0, 4\)"):
        jmed.load(zero)


def test_zero_length_axis_is_not_saved(tmp_path):
    path = tmp_path / "empty.nii.gz"
    with pytest.raises(ValueError, match=r"empty\.nii\.gz.*zero-length"):
        jmed.save(jmed.Image(np.zeros((4, 0, 4, 1), np.float32), np.eye(4)), path)
    assert list(tmp_path.iterdir()) == []


def _codes_zero(path, pixdim):
    image = nib.Nifti1Image(np.arange(64, dtype=np.float32).reshape(4, 4, 4), None)
    header = image.header
    header["qform_code"] = header["sform_code"] = 0
    for field in ("srow_x", "srow_y", "srow_z", "quatern_b", "quatern_c", "quatern_d"):
        header[field] = 0
    for field in ("qoffset_x", "qoffset_y", "qoffset_z"):
        header[field] = 0
    header["pixdim"][1:4] = pixdim
    image.update_header = lambda: None  # keep the zero matrices as they are
    nib.save(image, path)


@pytest.mark.parametrize("pixdim,spacing", [(0.0, 1.0), (2.0, 2.0)])
def test_affine_without_codes_warns_naming_the_file(tmp_path, pixdim, spacing):
    path = tmp_path / "nocodes.nii"
    _codes_zero(path, pixdim)
    with pytest.warns(
        UserWarning,
        match=rf"nocodes\.nii.*neither a qform nor an sform.*\({spacing}, {spacing}, {spacing}\) mm",
    ):
        image = jmed.load(path)
    np.testing.assert_allclose(np.asarray(image.affine), nib.load(path).affine)  # nibabel's fallback
    np.testing.assert_allclose(image.spacing, [spacing] * 3)


def test_file_with_codes_does_not_warn(tmp_path, recwarn):
    path = tmp_path / "codes.nii"
    jmed.save(jmed.ScalarImage(np.ones((3, 3, 3), np.float32)), path)
    jmed.load(path)
    assert not [w for w in recwarn if "qform" in str(w.message)]


def test_rgb_becomes_three_channels_and_is_refused_as_labels(tmp_path):
    rgb = np.zeros((4, 3, 2), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    rgb["R"], rgb["G"], rgb["B"] = 1, np.arange(3)[None, :, None], 200
    for name in ("rgb.nii", "rgb.nii.gz"):
        path = tmp_path / name
        nib.save(nib.Nifti1Image(rgb, np.eye(4)), path)
        image = jmed.load(path)
        assert image.shape == (4, 3, 2, 3)
        expected = np.stack([rgb["R"], rgb["G"], rgb["B"]], -1).astype(np.float32)
        np.testing.assert_array_equal(image.numpy(), expected)
        with pytest.raises(ValueError, match=rf"{name}.*RGB.*label"):
            jmed.load(path, kind="label")


@pytest.mark.parametrize("ext", [".nii.gz", ".mgz"])
def test_float16_and_int64_are_saved_in_a_dtype_that_holds_them(tmp_path, ext, monkeypatch):
    half = jmed.Image(np.linspace(0, 4, 64, dtype=np.float16).reshape(4, 4, 4, 1), np.eye(4))
    back = _roundtrip(tmp_path, half, ext)
    np.testing.assert_array_equal(back.numpy(), half.numpy().astype(np.float32))
    # the writer's own cast, for data the Image constructor would already have narrowed
    from jmed import io

    wide = np.arange(64, dtype=np.int64).reshape(4, 4, 4) * 1000
    assert io._storable(wide, tmp_path / f"x{ext}").dtype == np.int32
    with pytest.raises(ValueError, match=rf"big{ext.replace('.', '[.]')}.*does not fit in int32"):
        io._storable(wide * 2**40, tmp_path / f"big{ext}")


def test_unwritable_dtype_raises_naming_the_path(tmp_path, monkeypatch):
    def refuse(img, filename):
        raise nib.spatialimages.HeaderDataError('data dtype "complex64" not supported')

    monkeypatch.setattr(nib, "save", refuse)
    with pytest.raises(ValueError, match=r"odd\.nii\.gz.*complex64"):
        jmed.save(jmed.ScalarImage(np.ones((3, 3, 3), np.float32)), tmp_path / "odd.nii.gz")
    assert list(tmp_path.iterdir()) == []


def test_save_into_a_file_or_missing_folder_names_it(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match=r"file"):
        jmed.save(jmed.ScalarImage(np.ones((3, 3, 3), np.float32)), tmp_path / "file" / "out.nii.gz")
    with pytest.raises(FileNotFoundError, match=r"missing"):
        jmed.save(jmed.ScalarImage(np.ones((3, 3, 3), np.float32)), tmp_path / "missing" / "out.nii.gz")


# --- writers: one atomic path, faults, stale temporaries --------------------------------------

WRITERS = {
    "save": (
        "out.nii.gz",
        "jmed.save(jmed.ScalarImage(np.full((6, 6, 6), {v}, np.float32)), {path!r}, overwrite=True)",
    ),
    "landmarks-npy": ("lm.npy", "jmed.transforms.save_landmarks(np.arange(13.0) * {v}, {path!r})"),
    "landmarks-json": ("lm.json", "jmed.transforms.save_landmarks(np.arange(13.0) * {v}, {path!r})"),
    "plot": (
        "view.png",
        "jmed.plot.plot_image(jmed.ScalarImage(np.full((6, 6, 6), {v}, np.float32)), output={path!r})",
    ),
}


def _write_with(writer, path, value):
    import jmed.plot  # noqa: F401 - the plot writer's module

    exec(WRITERS[writer][1].format(v=value, path=str(path)), {"jmed": jmed, "np": np})


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".jmed-"))


@pytest.mark.parametrize("writer", list(WRITERS))
def test_write_error_keeps_the_old_file(tmp_path, monkeypatch, writer):
    if writer == "plot":
        pytest.importorskip("matplotlib")
    path = tmp_path / WRITERS[writer][0]
    _write_with(writer, path, 1)
    before = path.read_bytes()
    from jmed import _atomic

    def fail(tmp):  # the content is written, the flush to disk fails (EIO, full disk)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(_atomic, "_fsync_file", fail)
    with pytest.raises(OSError, match="No space"):
        _write_with(writer, path, 2)
    assert path.read_bytes() == before
    assert _leftovers(tmp_path) == []


def test_landmarks_serializer_failing_midway_keeps_the_old_file(tmp_path, monkeypatch):
    import json

    path = tmp_path / "lm.json"
    jmed.transforms.save_landmarks(np.arange(13.0), path)
    before = path.read_bytes()

    def half_dump(record, f, **kw):
        f.write('{"landmarks": [0.0, 1.')
        raise OSError(27, "File too large")

    monkeypatch.setattr(json, "dump", half_dump)
    with pytest.raises(OSError, match="File too large"):
        jmed.transforms.save_landmarks(np.arange(13.0) * 2, path)
    assert path.read_bytes() == before
    assert _leftovers(tmp_path) == []


_KILLED_WRITER = """
import sys, time, numpy as np, jmed, jmed.transforms, jmed.plot
from jmed import _atomic
def hang(tmp):
    print("written", flush=True)
    time.sleep(600)
_atomic._fsync_file = hang
{call}
"""


@pytest.mark.parametrize("writer", list(WRITERS))
def test_killed_writer_leaves_old_file_and_next_write_sweeps_its_temporary(tmp_path, writer):
    import signal
    import subprocess
    import sys
    import time

    if writer == "plot":
        pytest.importorskip("matplotlib")
    path = tmp_path / WRITERS[writer][0]
    _write_with(writer, path, 1)
    before = path.read_bytes()
    call = WRITERS[writer][1].format(v=2, path=str(path))
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILLED_WRITER.format(call=call)], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert proc.stdout.readline().strip() == "written"  # inside the write, before the rename
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    assert path.read_bytes() == before
    (left,) = _leftovers(tmp_path)
    assert list((tmp_path / left).iterdir())  # the half-finished temporary is there
    old = time.time() - 120
    os.utime(tmp_path / left, (old, old))
    _write_with(writer, tmp_path / ("again" + path.name), 3)
    assert _leftovers(tmp_path) == []


def test_only_stale_temporaries_of_dead_writers_on_this_host_are_removed(tmp_path):
    import subprocess
    import time

    from jmed import _atomic

    dead = subprocess.Popen(["true"])
    dead.wait()
    host = _atomic._host()
    names = {
        "dead-old": f".jmed-{host}-{dead.pid}-abc",
        "dead-new": f".jmed-{host}-{dead.pid}-def",
        "alive-old": f".jmed-{host}-{os.getpid()}-ghi",
        "other-host": f".jmed-otherhost-{dead.pid}-jkl",
        "legacy": ".jmed-x1y2z3",
        "not-ours": ".cache-1-2-3",
    }
    old = time.time() - 3600
    for key, name in names.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "tmp.nii.gz").write_bytes(b"x" * 100)
        if key != "dead-new":
            os.utime(tmp_path / name, (old, old))
    jmed.save(jmed.ScalarImage(np.ones((3, 3, 3), np.float32)), tmp_path / "new.nii.gz")
    left = {p.name for p in tmp_path.iterdir()}
    assert names["dead-old"] not in left
    assert {names[k] for k in names if k != "dead-old"} | {"new.nii.gz"} == left


def test_reading_lazy_data_does_not_change_the_image(tmp_path):
    path = tmp_path / "lazy.nii.gz"
    data = np.random.default_rng(5).standard_normal((6, 7, 8)).astype(np.float32)
    nib.save(nib.Nifti1Image(data, ROTATED), path)
    image = jmed.load(path, lazy=True)
    holder = image._data
    twin = image.replace(affine=np.asarray(image.affine))
    first = image.data
    assert image._data is holder  # the image is not rewritten by the read
    assert twin.is_loaded and twin.data is first  # images sharing the holder share the read
    np.testing.assert_array_equal(np.asarray(first)[..., 0], data)
    leaves = jax.tree.leaves(image)
    np.testing.assert_array_equal(leaves[0], first)
    np.testing.assert_array_equal(image.read_region((4, 5, 6), (3, 3, 3))[:2, :2, :2, 0], data[4:6, 5:7, 6:8])


@pytest.mark.parametrize("kind", ["intensity", "label"])
def test_region_of_a_memory_mapped_nifti_matches_nibabel(tmp_path, kind):
    raw = np.random.default_rng(6).integers(-50, 50, (12, 13, 14)).astype(np.int16)
    img = nib.Nifti1Image(raw, ROTATED)
    if kind == "intensity":
        img.header.set_slope_inter(0.25, 3.0)
    path = tmp_path / "mm.nii"
    nib.save(img, path)
    reference = np.asarray(nib.load(path).dataobj, dtype=np.float32 if kind == "intensity" else None)
    image = jmed.load(path, kind=kind, lazy=True)
    assert image._data.reads_regions
    box = image.read_region((-2, 3, 10), (5, 4, 6))
    want = np.zeros((5, 4, 6), reference.dtype)
    want[2:, :, :4] = reference[:3, 3:7, 10:]
    np.testing.assert_array_equal(box[..., 0], want)
    assert box.dtype == (np.float32 if kind == "intensity" else np.int16)
    assert box.flags.c_contiguous
    assert not image.is_loaded  # the region was read alone
    np.testing.assert_array_equal(np.asarray(image.data)[..., 0], reference)
    full = jmed.load(path, kind=kind)
    np.testing.assert_array_equal(full.read_region((0, 0, 0), (12, 13, 14)), np.asarray(full.data))


def test_region_of_a_truncated_file_names_it(tmp_path):
    path = tmp_path / "short.nii"
    nib.save(nib.Nifti1Image(np.zeros((10, 10, 10), np.float32), np.eye(4)), path)
    with open(path, "r+b") as f:
        f.truncate(2000)
    image = jmed.load(path, lazy=True)
    with pytest.raises(ValueError, match="short.nii"):
        image.read_region((0, 0, 0), 2)
