import nibabel as nib
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jmed import affine as A


def _rotation(angles):
    cx, cy, cz = np.cos(angles)
    sx, sy, sz = np.sin(angles)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rx @ ry @ rz


@st.composite
def affines(draw):
    angles = draw(st.lists(st.floats(-np.pi, np.pi), min_size=3, max_size=3))
    zooms = draw(st.lists(st.floats(0.2, 5.0), min_size=3, max_size=3))
    perm = draw(st.permutations([0, 1, 2]))
    flips = draw(st.lists(st.sampled_from([-1.0, 1.0]), min_size=3, max_size=3))
    shift = draw(st.lists(st.floats(-200, 200), min_size=3, max_size=3))
    a = np.eye(4)
    a[:3, :3] = _rotation(np.array(angles))[:, perm] * np.array(zooms) * np.array(flips)
    a[:3, 3] = shift
    return a


@settings(max_examples=60, deadline=None)
@given(affines())
def test_orientation_matches_nibabel(a):
    assert A.orientation(a) == "".join(nib.aff2axcodes(a))


@settings(max_examples=30, deadline=None)
@given(affines(), st.lists(st.floats(-50, 50), min_size=3, max_size=3))
def test_voxel_world_roundtrip(a, point):
    p = np.array(point)
    w = A.voxel_to_world(a, p)
    np.testing.assert_allclose(w, a[:3, :3] @ p + a[:3, 3])
    np.testing.assert_allclose(A.world_to_voxel(a, w), p, atol=1e-8)


def test_spacing_origin_direction():
    a = A.from_spacing((2.0, 3.0, 4.0), origin=(1, 2, 3), orientation="LPS")
    np.testing.assert_allclose(A.spacing(a), [2, 3, 4])
    np.testing.assert_allclose(A.origin(a), [1, 2, 3])
    np.testing.assert_allclose(A.direction(a), np.diag([-1, -1, 1]))
    assert A.orientation(a) == "LPS"
    assert "".join(nib.aff2axcodes(a)) == "LPS"


def test_there_are_48_orientations():
    assert len(set(A.ORIENTATIONS)) == 48
    for code in A.ORIENTATIONS:
        assert A.orientation(A.from_spacing(orientation=code)) == code


@pytest.mark.parametrize("code", A.ORIENTATIONS)
def test_reorient_roundtrip_exact(code):
    rng = np.random.default_rng(0)
    data = rng.standard_normal((4, 5, 6, 2))
    base = A.from_spacing((1.5, 2.0, 2.5), origin=(-10, 5, 3), orientation="PSL")
    base[:3, :3] = _rotation(np.array([0.1, -0.05, 0.2])) @ base[:3, :3]
    out, out_affine = A.reorient(data, base, code)
    assert A.orientation(out_affine) == code
    # every voxel keeps its world position
    idx = np.argwhere(np.ones(out.shape[:3], bool))
    src_idx = np.rint(A.world_to_voxel(base, A.voxel_to_world(out_affine, idx))).astype(int)
    np.testing.assert_array_equal(out[tuple(idx.T)], data[tuple(src_idx.T)])
    back, back_affine = A.reorient(out, out_affine, "PSL")
    np.testing.assert_array_equal(back, data)
    np.testing.assert_allclose(back_affine, base, atol=1e-12)


@pytest.mark.parametrize("code", ["LAS", "PIR", "SRA", "RAS", "ILP"])
def test_reorient_matches_nibabel_canonical(code):
    rng = np.random.default_rng(1)
    data = rng.standard_normal((3, 4, 5)).astype(np.float32)
    a = A.from_spacing((1.0, 2.0, 3.0), origin=(4, 5, 6), orientation=code)
    canonical = nib.as_closest_canonical(nib.Nifti1Image(data, a))
    out, out_affine = A.reorient(data[..., None], a, "RAS")
    np.testing.assert_array_equal(out[..., 0], np.asarray(canonical.dataobj))
    np.testing.assert_allclose(out_affine, canonical.affine, atol=1e-5)


def test_translate_voxels_moves_origin():
    a = A.from_spacing((2.0, 1.0, 3.0), origin=(10, 20, 30), orientation="LPS")
    cropped = A.translate_voxels(a, (1, 2, 3))
    np.testing.assert_allclose(A.voxel_to_world(cropped, [0, 0, 0]), A.voxel_to_world(a, [1, 2, 3]))


def test_bad_affines_and_codes():
    with pytest.raises(ValueError, match="shape"):
        A.check_affine(np.eye(3))
    bad = np.eye(4)
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="finite"):
        A.check_affine(bad)
    singular = np.eye(4)
    singular[:3, 0] = singular[:3, 1]
    with pytest.raises(ValueError, match="singular"):
        A.check_affine(singular)
    with pytest.raises(ValueError, match="unknown letter"):
        A.orientation_transform("RAX", "RAS")
    with pytest.raises(ValueError, match="exactly once"):
        A.orientation_transform("RRS", "RAS")


@settings(max_examples=25, deadline=None)
@given(affines())
def test_invert_matches_numpy(a):
    """Closed-form float32 inverse against numpy's float64 LU inverse. Rounding the input
    to float32 alone moves the inverse by about ``cond * 6e-8`` (relative); allowed: 1e-6."""
    import jax.numpy as jnp

    expected = np.linalg.inv(a)
    tol = 1e-6 * np.linalg.cond(a[:3, :3]) * np.linalg.norm(expected[:3, :3])
    got = np.asarray(A.invert(jnp.asarray(a, jnp.float32)), np.float64)
    assert np.linalg.norm(got[:3, :3] - expected[:3, :3]) <= tol
    assert np.linalg.norm(got[:3, 3] - expected[:3, 3]) <= tol * (1 + np.linalg.norm(a[:3, 3]))
    np.testing.assert_array_equal(got[3], [0, 0, 0, 1])
    linear = np.asarray(A.invert(jnp.asarray(a[:3, :3], jnp.float32)), np.float64)
    assert np.linalg.norm(linear - expected[:3, :3]) <= tol


def test_invert_batches_and_keeps_identity_exact():
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(0)
    stack = np.stack(
        [A.from_spacing(rng.uniform(0.5, 3, 3), rng.uniform(-50, 50, 3), c) for c in A.ORIENTATIONS[:6]]
    )
    batched = np.asarray(A.invert(jnp.asarray(stack, jnp.float32)))
    for item, one in zip(stack, batched):
        np.testing.assert_array_equal(one, np.asarray(A.invert(jnp.asarray(item, jnp.float32))))
        np.testing.assert_allclose(one, np.linalg.inv(item), atol=1e-5)
    np.testing.assert_array_equal(np.asarray(jax.jit(A.invert)(jnp.eye(4))), np.eye(4))
    np.testing.assert_array_equal(np.asarray(A.invert(np.eye(3, dtype=np.int32))), np.eye(3))
    with pytest.raises(ValueError, match=r"\(\.\.\., 3, 3\) or \(\.\.\., 4, 4\), got \(4, 3\)"):
        A.invert(np.zeros((4, 3)))


@settings(max_examples=40, deadline=None)
@given(affines(), st.sampled_from(A.ORIENTATIONS))
def test_reorient_matches_nibabel_on_oblique_and_flipped_affines(a, target):
    from nibabel import orientations as ornts

    data = np.arange(2 * 3 * 4 * 2, dtype=np.float32).reshape(2, 3, 4, 2)
    ornt = ornts.ornt_transform(ornts.io_orientation(a), ornts.axcodes2ornt(target))
    out, out_affine = A.reorient(data, a, target)
    np.testing.assert_array_equal(out, ornts.apply_orientation(data, ornt))
    np.testing.assert_allclose(out_affine, a @ ornts.inv_ornt_aff(ornt, data.shape[:3]), atol=1e-9)
    assert A.orientation(out_affine) == target == "".join(nib.aff2axcodes(out_affine))
    perm, flips = A.orientation_transform(A.orientation(a), target)
    assert sorted(perm) == [0, 1, 2] and len(flips) == 3


def test_orientation_refuses_degenerate_and_traced_affines():
    import jax

    flat = np.diag([1.0, 1.0, 0.0, 1.0])
    with pytest.raises(ValueError, match="degenerate axis"):
        A.orientation(flat)
    with pytest.raises(TypeError, match="concrete affine"):
        jax.jit(A.orientation)(np.eye(4))
