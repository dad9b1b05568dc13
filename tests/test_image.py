import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jmed
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
    with pytest.raises(ValueError, match="3 .* or 4"):
        jmed.ScalarImage(np.zeros((4, 5)))
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
