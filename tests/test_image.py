import subprocess
import sys
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import nibabel as nib
import numpy as np
import pytest

import jmed
import jmed.transforms as T
from jmed import affine as A


def _subject(affine=None):
    rng = np.random.default_rng(0)
    return jmed.Subject(
        t1=jmed.ScalarImage(rng.standard_normal((4, 5, 6)).astype(np.float32), affine),
        seg=jmed.LabelMap(rng.integers(0, 3, (4, 5, 6)).astype(np.uint8), affine),
        metadata={"age": 42.0, "site": "A"},
    )


def test_image_properties():
    a = A.from_spacing((2.0, 1.0, 3.0), origin=(1, 2, 3), orientation="LPS")
    img = jmed.ScalarImage(np.zeros((4, 5, 6, 2), np.float32), a)
    assert img.shape == (4, 5, 6, 2)
    assert img.spatial_shape == (4, 5, 6)
    assert img.num_channels == 2
    np.testing.assert_allclose(img.spacing, [2, 1, 3])
    np.testing.assert_allclose(img.origin, [1, 2, 3])
    assert img.orientation == "LPS"
    assert img.kind == "intensity" and not img.is_label
    lbl = jmed.LabelMap(np.zeros((4, 5, 6), np.int16))
    assert lbl.shape == (4, 5, 6, 1) and lbl.is_label and lbl.dtype == np.int16


def test_subject_under_jit_vmap_tree_map():
    s = _subject(A.from_spacing((1.0, 2.0, 3.0)))
    doubled = jax.jit(lambda s: jax.tree.map(lambda x: x * 2, s))(s)
    assert isinstance(doubled, jmed.Subject) and doubled["seg"].kind == "label"
    np.testing.assert_allclose(doubled["t1"].data, 2 * s["t1"].data, rtol=1e-6)
    np.testing.assert_allclose(doubled.metadata["age"], 84.0)
    assert doubled.metadata["site"] == "A"  # static metadata passes through
    plus_one = s.replace({"t1": s["t1"].replace(data=s["t1"].data + 1)})
    batch = jmed.stack([s, plus_one])
    assert batch["t1"].data.shape == (2, 4, 5, 6, 1)
    assert batch["t1"].affine.shape == (2, 4, 4)
    means = jax.vmap(lambda s: jnp.mean(s["t1"].data) + s["t1"].spacing[1])(batch)
    np.testing.assert_allclose(means, [s["t1"].data.mean() + 2, s["t1"].data.mean() + 3], rtol=1e-5)
    items = jmed.unstack(batch)
    np.testing.assert_array_equal(items[0]["seg"].data, s["seg"].data)


def test_subject_mapping_and_attribute_access():
    s = _subject()
    assert sorted(s) == ["seg", "t1"] and len(s) == 2
    assert s.t1 is s["t1"]
    assert s.names_of_kind("label") == ["seg"]
    with pytest.raises(KeyError, match="no image named 'flair'"):
        s["flair"]


def test_consistency_tolerates_float_noise_and_rejects_mismatch():
    a = A.from_spacing((1.0, 1.0, 1.0))
    noisy = a + 1e-5
    noisy[3] = [0, 0, 0, 1]
    s = jmed.Subject(
        t1=jmed.ScalarImage(np.zeros((4, 5, 6)), a), seg=jmed.LabelMap(np.zeros((4, 5, 6), np.uint8), noisy)
    )
    s.check_consistent()
    shifted = a.copy()
    shifted[0, 3] = 0.5
    bad = jmed.Subject(
        t1=jmed.ScalarImage(np.zeros((4, 5, 6)), a), seg=jmed.LabelMap(np.zeros((4, 5, 6), np.uint8), shifted)
    )
    with pytest.raises(ValueError, match="'seg' and 't1'|'t1' and 'seg'"):
        bad.check_consistent()
    wrong_shape = jmed.Subject(
        t1=jmed.ScalarImage(np.zeros((4, 5, 6))), seg=jmed.LabelMap(np.zeros((4, 5, 7), np.uint8))
    )
    with pytest.raises(ValueError, match=r"spatial shapes: \(4, 5, 7\) vs \(4, 5, 6\)"):
        wrong_shape.check_consistent()


def test_bad_images():
    with pytest.raises(ValueError, match="4 dimensions"):
        jmed.Image(np.zeros((4, 5, 6)))
    with pytest.raises(ValueError, match="2 .*, 3 .* or 4"):
        jmed.ScalarImage(np.zeros((4, 5, 6, 1, 1)))
    with pytest.raises(ValueError, match="kind must be one of"):
        jmed.Image(np.zeros((4, 5, 6, 1)), kind="mask")
    with pytest.raises(ValueError, match="singular"):
        jmed.ScalarImage(np.zeros((2, 2, 2)), np.zeros((4, 4)))
    nan_affine = np.eye(4)
    nan_affine[1, 3] = np.inf
    with pytest.raises(ValueError, match="finite"):
        jmed.ScalarImage(np.zeros((2, 2, 2)), nan_affine)
    with pytest.raises(TypeError, match="must be a jmed.Image"):
        jmed.Subject(t1=np.zeros((2, 2, 2)))
    with pytest.raises(ValueError, match="at least one"):
        jmed.Subject()


def test_orientation_under_jit_is_a_clear_error():
    img = jmed.ScalarImage(np.zeros((2, 2, 2)))
    with pytest.raises(TypeError, match="concrete affine"):
        jax.jit(lambda im: jnp.zeros(()) + len(im.orientation))(img)


def _aligned_float32(shape, offset=0):
    """A C-ordered float32 array starting ``offset`` bytes past a 64-byte boundary."""
    raw = np.zeros(int(np.prod(shape)) * 4 + 128, np.uint8)
    start = -raw.ctypes.data % 64 + offset
    return raw[start : start + int(np.prod(shape)) * 4].view(np.float32).reshape(shape)


def _jax_layout(data):
    return data.flags.c_contiguous and data.ctypes.data % 64 == 0


def test_nibabel_arrays_are_stored_in_jax_layout_once(tmp_path):
    # what nibabel hands over: get_fdata() is float64 in Fortran order, dataobj the
    # stored integers in Fortran order; values off the float32 grid show the rounding
    rng = np.random.default_rng(0)
    nifti = nib.Nifti1Image(rng.uniform(-30, 30, (5, 6, 7)), np.diag([2.0, 2.0, 2.0, 1.0]))
    nifti.set_data_dtype(np.int16)  # nibabel picks scl_slope/scl_inter to fit int16
    path = tmp_path / "t1.nii.gz"
    nib.save(nifti, path)
    loaded = nib.load(path)
    fdata = loaded.get_fdata()
    raw = loaded.dataobj.get_unscaled()
    stored = np.array(raw)
    assert fdata.dtype == np.float64 and fdata.flags.f_contiguous and not fdata.flags.c_contiguous
    assert raw.dtype == np.int16 and raw.flags.f_contiguous and not raw.flags.c_contiguous
    assert not np.array_equal(fdata, fdata.astype(np.float32))

    image = jmed.ScalarImage(fdata, loaded.affine)
    assert image.dtype == np.float32 and image.shape == (5, 6, 7, 1) and _jax_layout(image.data)
    np.testing.assert_array_equal(image.data[..., 0], fdata.astype(np.float32))
    # the same values JAX gives the float64 array on every call (it narrows to float32)
    np.testing.assert_array_equal(image.data, np.asarray(jax.device_put(fdata[..., None])))
    np.testing.assert_array_equal(image.affine, loaded.affine)

    labels = jmed.LabelMap(raw, loaded.affine)
    assert labels.dtype == np.int16 and _jax_layout(labels.data)
    np.testing.assert_array_equal(labels.data[..., 0], stored)
    wide = jmed.LabelMap(np.asfortranarray(stored.astype(np.int64)))
    assert wide.dtype == np.int32 and _jax_layout(wide.data)
    np.testing.assert_array_equal(wide.data[..., 0], stored)
    small = jmed.LabelMap(np.asfortranarray(stored.astype(np.uint8) % 4))
    assert small.dtype == np.uint8 and _jax_layout(small.data)
    np.testing.assert_array_equal(small.data[..., 0], stored.astype(np.uint8) % 4)

    # a strided view of a larger volume, channels last (x, y, z, c)
    volume = rng.standard_normal((8, 9, 10, 2)).astype(np.float32)
    view = volume[1:6, ::2, 2:9]
    assert not view.flags.c_contiguous
    sliced = jmed.Image(view)
    assert (
        sliced.dtype == np.float32 and _jax_layout(sliced.data) and not np.shares_memory(sliced.data, volume)
    )
    np.testing.assert_array_equal(sliced.data, view)


def test_arrays_already_in_jax_layout_are_not_copied():
    data = _aligned_float32((4, 5, 6))
    data[...] = np.arange(120).reshape(4, 5, 6)
    image = jmed.ScalarImage(data)
    assert np.shares_memory(image.data, data)
    assert jmed.Image(image.data).data is image.data
    labels = np.zeros((4, 5, 6, 1), np.uint8)
    if _jax_layout(labels):  # numpy's allocator may or may not align to 64 bytes
        assert jmed.LabelMap(labels).data is labels
    # C order but off the 64-byte grid: copied once, into aligned memory
    shifted = _aligned_float32((4, 5, 6), offset=16)
    shifted[...] = data
    moved = jmed.ScalarImage(shifted)
    assert _jax_layout(moved.data) and not np.shares_memory(moved.data, shifted)
    np.testing.assert_array_equal(moved.data[..., 0], data)


def test_jax_arrays_traced_and_lazy_data_are_kept():
    data = jnp.arange(24.0).reshape(2, 3, 4, 1)
    assert jmed.Image(data).data is data
    out = jax.jit(lambda d: jmed.ScalarImage(d).data * 2)(np.asfortranarray(np.ones((2, 3, 4))))
    np.testing.assert_array_equal(out, np.full((2, 3, 4, 1), 2.0))
    values = np.arange(60, dtype=np.float64).reshape(3, 4, 5)
    restored = jmed.unstack(jmed.stack([jmed.ScalarImage(values)] * 2))
    np.testing.assert_array_equal(restored[1].data[..., 0], values)


def test_float64_is_kept_when_jax_computes_in_64_bits():
    values = np.asfortranarray(np.random.default_rng(1).standard_normal((3, 4, 5)))
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    try:
        image = jmed.ScalarImage(values)
    finally:
        jax.config.update("jax_enable_x64", previous)
    assert image.dtype == np.float64 and _jax_layout(image.data)
    np.testing.assert_array_equal(image.data[..., 0], values)


# --- TorchIO-style conveniences and reprs ------------------------------------------------


def _lazy_subject(tmp_path):
    """A subject of two lazily loaded files, with the voxels nibabel reads from them."""
    rng = np.random.default_rng(3)
    affine = A.from_spacing((2.0, 1.0, 3.0), origin=(10, -20, 5), orientation="LPS")
    t1 = rng.standard_normal((6, 5, 4)).astype(np.float32)
    seg = rng.integers(0, 3, (6, 5, 4)).astype(np.uint8)
    nib.save(nib.Nifti1Image(t1, affine), tmp_path / "t1.nii.gz")
    nib.save(nib.Nifti1Image(seg, affine), tmp_path / "seg.nii.gz")
    subject = jmed.Subject(
        t1=jmed.load(tmp_path / "t1.nii.gz", lazy=True),
        seg=jmed.load(tmp_path / "seg.nii.gz", kind="label", lazy=True),
    )
    reference = {name: np.asarray(nib.load(tmp_path / f"{name}.nii.gz").dataobj) for name in ("t1", "seg")}
    return subject, reference


def test_load_returns_a_loaded_copy_and_leaves_the_original(tmp_path):
    subject, reference = _lazy_subject(tmp_path)
    assert not subject.t1.is_loaded and not subject.seg.is_loaded
    loaded = subject.load()
    assert loaded is not subject and loaded.t1.is_loaded and loaded.seg.is_loaded
    assert not subject.t1.is_loaded and not subject.seg.is_loaded  # subjects are values
    for name in ("t1", "seg"):
        np.testing.assert_array_equal(np.asarray(loaded[name].data)[..., 0], reference[name])
        np.testing.assert_array_equal(loaded[name].affine, subject[name].affine)
        assert loaded[name].kind == subject[name].kind
    image = subject.t1.load()
    assert image.is_loaded and not subject.t1.is_loaded
    np.testing.assert_array_equal(np.asarray(image.data)[..., 0], reference["t1"])
    assert image.load() is image  # nothing left to read
    with_meta = jmed.Subject(t1=subject.t1, metadata={"age": 40.0, "site": "B"}).load()
    assert with_meta.metadata == {"age": 40.0, "site": "B"}


def test_add_image_returns_a_new_subject():
    s = _subject()
    mask = jmed.LabelMap(np.ones((4, 5, 6), np.uint8))
    bigger = s.add_image(mask, "mask")
    assert sorted(bigger) == ["mask", "seg", "t1"] and bigger.mask is mask
    assert sorted(s) == ["seg", "t1"]  # the original is unchanged
    assert bigger.metadata == s.metadata and bigger.t1 is s.t1
    replaced = s.add_image(mask, "seg")
    assert replaced.seg is mask and s.seg is not mask
    with pytest.raises(TypeError, match="image must be a jmed.Image, got ndarray"):
        s.add_image(np.zeros((4, 5, 6)), "x")
    with pytest.raises(TypeError, match="name must be a non-empty string, got 3"):
        s.add_image(mask, 3)


def test_apply_inverse_transform_is_invert():
    s = _subject(A.from_spacing((1.0, 2.0, 3.0)))
    out = T.RandomFlip(axes=(0, 2), flip_probability=1.0)(jax.random.key(0), s)
    assert not np.array_equal(np.asarray(out.t1.data), s.t1.data)
    back = out.apply_inverse_transform()
    assert back.history == ()
    for name in ("t1", "seg"):  # flips are exact: the inverse restores every voxel
        np.testing.assert_array_equal(np.asarray(back[name].data), s[name].data)
    for noise in (T.RandomNoise(), T.Compose([T.RandomFlip(), T.RandomNoise()])):
        noisy = noise(jax.random.key(0), s)
        with pytest.warns(UserWarning, match="RandomNoise is not invertible"):
            noisy.apply_inverse_transform()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            noisy.apply_inverse_transform(warn=False)


def test_reprs_name_shape_spacing_orientation_without_reading(tmp_path):
    subject, _ = _lazy_subject(tmp_path)
    text = repr(subject.t1)
    assert text == (
        "Image(kind='intensity', shape=(6, 5, 4, 1), dtype=float32, spacing=(2.0, 1.0, 3.0), "
        "orientation=LPS, origin=(10.0, -20.0, 5.0), loaded=False)"
    )
    assert "kind='label'" in repr(subject) and "dtype=uint8" in repr(subject)
    assert not subject.t1.is_loaded and not subject.seg.is_loaded
    loaded = subject.load()
    assert "loaded=False" not in repr(loaded.t1)
    out = T.RandomFlip()(jax.random.key(0), loaded)
    assert repr(out).endswith(", history=[RandomFlip])")


def test_import_and_repr_do_not_import_matplotlib():
    code = (
        "import sys, numpy as np, jmed\n"
        "s = jmed.Subject(t1=jmed.ScalarImage(np.zeros((3, 3, 3), np.float32)))\n"
        "repr(s); repr(s.t1); s.history_summary()\n"
        "assert 'matplotlib' not in sys.modules, 'matplotlib imported'\n"
    )
    root = Path(__file__).resolve().parent.parent
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=root
    )
    assert result.returncode == 0, result.stderr
