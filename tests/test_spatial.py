import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import make_phantom
from scipy import ndimage

import jmed
from jmed import affine as affine_lib
from jmed.transforms import Compose
from jmed.transforms.spatial import (
    RandomAffine,
    RandomAnisotropy,
    RandomElasticDeformation,
    RandomFlip,
    RandomRot90,
    Spatial,
    affine_mapping,
    invert_mapping,
)


def _subject(shape=(12, 10, 8), affine=None, seed=0):
    return make_phantom(shape, affine, seed=seed)


def _affine_params(scales=(1.0, 1.0, 1.0), degrees=(0.0, 0.0, 0.0), translation=(0.0, 0.0, 0.0)):
    return {
        "scales": jnp.asarray(scales, jnp.float32),
        "degrees": jnp.asarray(degrees, jnp.float32),
        "translation": jnp.asarray(translation, jnp.float32),
    }


def _blob(shape, affine, world_centre, sigma=1.5):
    grid = np.stack(np.meshgrid(*map(np.arange, shape), indexing="ij"), -1).astype(float)
    world = affine_lib.voxel_to_world(affine, grid)
    return np.exp(-np.sum((world - world_centre) ** 2, -1) / (2 * sigma**2)).astype(np.float32)


def _centroid_world(data, affine):
    data = np.asarray(data, float)[..., 0]
    grid = np.stack(np.meshgrid(*map(np.arange, data.shape), indexing="ij"), -1)
    voxel = (grid * data[..., None]).sum((0, 1, 2)) / data.sum()
    return affine_lib.voxel_to_world(affine, voxel)


# -- identity --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "transform",
    [
        RandomFlip(axes=(0, 1, 2), flip_probability=0.0),
        RandomAffine(scales=(1, 1), degrees=0, translation=0),
        RandomElasticDeformation(max_displacement=0),
        Compose(
            [
                RandomFlip(flip_probability=0),
                RandomAffine(scales=0, degrees=0),
                RandomElasticDeformation(max_displacement=0),
            ]
        ),
    ],
    ids=["flip", "affine", "elastic", "compose"],
)
def test_identity_parameters_are_bit_exact(transform, run, key):
    subject = _subject(affine=affine_lib.from_spacing((1.2, 0.9, 2.0), (3, -4, 5), "LPS"))
    out = run(lambda k, s: transform(k, s).without_history(), key, subject)
    for name in subject:
        assert out[name].dtype == subject[name].dtype
        np.testing.assert_array_equal(np.asarray(out[name].data), np.asarray(subject[name].data))
        # (jit stores the affine as float32)
        np.testing.assert_allclose(np.asarray(out[name].affine), np.asarray(subject[name].affine), rtol=1e-6)


def test_identity_parameters_spatial_and_anisotropy():
    subject = _subject(affine=affine_lib.from_spacing((1.2, 0.9, 2.0), (3, -4, 5), "LPS"))
    for transform in (Spatial([RandomAffine(scales=0, degrees=0)]), RandomAnisotropy(downsampling=(1, 1))):
        out = jax.jit(transform)(jax.random.key(0), subject)
        for name in subject:
            np.testing.assert_array_equal(np.asarray(out[name].data), np.asarray(subject[name].data))


# -- references ------------------------------------------------------------------------


@pytest.mark.parametrize("order", [0, 1])
def test_fixed_affine_matches_scipy(order):
    rng = np.random.default_rng(1)
    affine = affine_lib.from_spacing((1.0, 1.5, 2.0), (10, -3, 4), "RAS")
    shape = (13, 11, 9)
    data = rng.standard_normal(shape).astype(np.float32)
    if order == 0:
        data = rng.integers(0, 4, shape).astype(np.uint8)
    image = jmed.Image(data[..., None], affine, kind="intensity" if order else "label")
    params = _affine_params((1.1, 0.9, 1.05), (7.0, -12.0, 20.0), (1.5, -2.0, 0.5))
    transform = RandomAffine(default_pad_value=0.0)
    out = np.asarray(jax.jit(transform.apply)(jmed.Subject(image=image), params)["image"].data)[..., 0]
    matrix = np.asarray(
        affine_mapping(params["scales"], params["degrees"], params["translation"], shape, affine).matrix
    )
    ref = ndimage.affine_transform(data, matrix.astype(float), order=order, mode="constant", cval=0)
    coords = (
        np.stack(np.meshgrid(*map(np.arange, shape), indexing="ij"), -1) @ matrix[:3, :3].T + matrix[:3, 3]
    )
    inside = np.all((coords >= 0) & (coords <= np.array(shape) - 1), -1)
    if order == 0:
        inside &= np.all(np.abs(coords - np.floor(coords) - 0.5) > 1e-3, -1)
        np.testing.assert_array_equal(out[inside], ref[inside])
    else:
        np.testing.assert_allclose(out[inside], ref[inside], atol=1e-4)
    assert inside.mean() > 0.3


def test_rotation_90_about_centre_is_rot90():
    data = np.random.default_rng(2).standard_normal((9, 9, 9)).astype(np.float32)
    affine = affine_lib.from_spacing((1, 1, 1), (-4, 2, 7), "RAS")
    image = jmed.ScalarImage(data, affine)
    out = jax.jit(RandomAffine().apply)(jmed.Subject(image=image), _affine_params(degrees=(0, 0, 90)))[
        "image"
    ]
    # +90 degrees about S (right-handed) takes R to A: out[i, j] = in[j, n - 1 - i]
    np.testing.assert_allclose(np.asarray(out.data)[..., 0], np.rot90(data, 1, axes=(0, 1)), atol=1e-4)


# -- world semantics -------------------------------------------------------------------


@pytest.mark.parametrize("orientation", ["RAS", "LPS", "PIR"])
def test_point_moves_where_the_matrix_sends_it(orientation):
    shape = (20, 18, 16)
    affine = affine_lib.from_spacing((1.0, 1.25, 1.5), (5, -7, 3), orientation)
    centre = affine_lib.voxel_to_world(affine, (np.array(shape) - 1) / 2)
    point = centre + np.array([3.0, -2.0, 1.5])
    image = jmed.ScalarImage(_blob(shape, affine, point), affine)
    scales, degrees, translation = (
        np.array([1.1, 0.95, 1.0]),
        np.array([10.0, -5.0, 15.0]),
        np.array([2.0, 1.0, -1.5]),
    )
    transform = RandomAffine(default_pad_value=0.0)
    out = jax.jit(transform.apply)(jmed.Subject(image=image), _affine_params(scales, degrees, translation))[
        "image"
    ]
    # the content moves by x -> R S (x - c) + c + t
    a, b, c = np.deg2rad(degrees)
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    expected = rz @ ry @ rx @ np.diag(scales) @ (point - centre) + centre + translation
    moved = _centroid_world(out.data, out.affine)
    assert np.all(np.abs(moved - expected) < 0.5 * np.asarray(affine_lib.spacing(affine)))
    np.testing.assert_array_equal(np.asarray(out.affine), affine)


@pytest.mark.parametrize("orientation", ["RAS", "LPS"])
def test_translation_moves_towards_patient_right(orientation):
    shape = (24, 16, 16)
    affine = affine_lib.from_spacing((1.0, 1.0, 1.0), (0, 0, 0), orientation)
    point = affine_lib.voxel_to_world(affine, (np.array(shape) - 1) / 2)
    image = jmed.ScalarImage(_blob(shape, affine, point), affine)
    transform = RandomAffine(scales=0, degrees=0, translation=(5, 5, 0, 0, 0, 0), default_pad_value=0.0)
    out = transform(jax.random.key(0), image)
    moved = _centroid_world(out.data, out.affine) - point
    np.testing.assert_allclose(moved, [5.0, 0.0, 0.0], atol=0.05)


def test_rotation_about_origin():
    shape = (16, 16, 16)
    affine = affine_lib.from_spacing((1, 1, 1), (-8, -6, -8), "RAS")
    point = np.array([2.0, 1.0, 0.0])
    image = jmed.ScalarImage(_blob(shape, affine, point), affine)
    out = jax.jit(RandomAffine(center="origin", default_pad_value=0.0).apply)(
        jmed.Subject(image=image), _affine_params(degrees=(0, 0, 90))
    )["image"]
    np.testing.assert_allclose(_centroid_world(out.data, out.affine), [-1.0, 2.0, 0.0], atol=0.1)


def test_flip_anatomical_axes_follow_the_affine():
    subject = _subject(affine=affine_lib.from_spacing((1, 1, 1), (0, 0, 0), "PIR"))  # LR is data axis 2
    flip = RandomFlip(axes="LR", flip_probability=1.0)
    out = flip(jax.random.key(0), subject)
    np.testing.assert_array_equal(np.asarray(out.t1.data), np.asarray(subject.t1.data)[:, :, ::-1])
    flip = RandomFlip(axes=("Anterior", 0), flip_probability=1.0)
    out = jax.jit(flip)(jax.random.key(0), subject)  # traced affine: still resolved
    np.testing.assert_array_equal(np.asarray(out.seg.data), np.asarray(subject.seg.data)[::-1])


def test_rot90_matches_numpy(run, key):
    subject = _subject((10, 7, 10))
    transform = RandomRot90(axes=(0, 2))
    out = run(lambda k, s: transform(k, s), key, subject)
    k = int(out.history[-1][1])
    np.testing.assert_array_equal(
        np.asarray(out.seg.data), np.rot90(np.asarray(subject.seg.data), k, axes=(0, 2))
    )
    with pytest.raises(ValueError, match="equal sizes"):
        RandomRot90(axes=(0, 1))(key, subject)


# -- fusion ----------------------------------------------------------------------------


def _smooth(points):
    x, y, z = points[..., 0], points[..., 1], points[..., 2]
    return np.sin(0.45 * x) * np.cos(0.35 * y) + 0.5 * np.sin(0.3 * z + 0.2 * x)


def test_fused_chain_matches_geometry_with_less_error():
    shape = (20, 18, 16)
    affine = affine_lib.from_spacing((1.0, 1.0, 1.0), (0, 0, 0), "RAS")
    grid = np.stack(np.meshgrid(*map(np.arange, shape), indexing="ij"), -1).astype(float)
    image = jmed.ScalarImage(_smooth(grid).astype(np.float32), affine)
    subject = jmed.Subject(t1=image)
    chain = [
        RandomFlip(axes=0, flip_probability=1.0),
        RandomAffine(scales=0.1, degrees=15, translation=2, default_pad_value="edge"),
        RandomElasticDeformation(num_control_points=5, max_displacement=1.5, default_pad_value="edge"),
    ]
    key = jax.random.key(3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fused, params = jax.jit(Compose(chain).sample_and_apply)(key, subject)
        unfused, params_unfused = jax.jit(Compose(chain, fuse=False).sample_and_apply)(key, subject)
    assert all(
        np.array_equal(np.asarray(a), np.asarray(b))
        for a, b in zip(*map(jax.tree.leaves, (params, params_unfused)))
    )
    # truth: push the output grid through each step's point map (last step first)
    points = grid.copy()
    for t, p in reversed(list(zip(chain, params))):
        m = t.mapping(p, shape, affine)
        moved = points @ np.asarray(m.matrix)[:3, :3].T + np.asarray(m.matrix)[:3, 3]
        if m.displacement is not None:
            field = np.asarray(m.displacement.dense()) @ np.asarray(m.displacement_matrix).T
            moved = moved + np.stack(
                [
                    ndimage.map_coordinates(field[..., d], points.reshape(-1, 3).T, order=3, mode="nearest")
                    for d in range(3)
                ],
                -1,
            ).reshape(moved.shape)
        points = moved
    truth = _smooth(np.clip(points, 0, np.array(shape) - 1))
    inner = (slice(3, -3),) * 3
    err_fused = np.abs(np.asarray(fused.t1.data)[..., 0] - truth)[inner].mean()
    err_unfused = np.abs(np.asarray(unfused.t1.data)[..., 0] - truth)[inner].mean()
    assert err_fused < 0.8 * err_unfused, (err_fused, err_unfused)
    assert err_fused < 0.03


def test_spatial_crop_after_rotation_has_no_padding_and_keeps_world():
    shape = (24, 24, 12)
    affine = affine_lib.from_spacing((1.0, 1.0, 2.0), (-10, 5, 3), "LPS")
    data = np.random.default_rng(4).uniform(1, 2, shape).astype(np.float32)
    subject = jmed.Subject(t1=jmed.ScalarImage(data, affine))
    transform = Spatial([RandomAffine(scales=0, degrees=(0, 0, 0, 0, 30, 30))], output_shape=(12, 12, 6))
    out = transform(jax.random.key(0), subject)
    assert out.t1.spatial_shape == (12, 12, 6)
    assert np.all(np.asarray(out.t1.data) >= 1.0)  # no padding (pad would be the minimum < 1 blend)
    # the centre of the crop is the image centre in world space (within half a voxel)
    centre_in = affine_lib.voxel_to_world(affine, (np.array(shape) - 1) / 2)
    centre_out = affine_lib.voxel_to_world(np.asarray(out.t1.affine), (np.array((12, 12, 6)) - 1) / 2)
    assert np.all(np.abs(centre_in - centre_out) <= 0.5 * np.array([1, 1, 2]) + 1e-6)
    # identity chain + crop equals slicing, exactly
    crop = Spatial([RandomFlip(flip_probability=0.0)], output_shape=(12, 12, 6))(jax.random.key(1), subject)
    np.testing.assert_array_equal(np.asarray(crop.t1.data)[..., 0], data[6:18, 6:18, 3:9])
    np.testing.assert_allclose(
        np.asarray(crop.t1.affine), affine_lib.translate_voxels(affine, (6, 6, 3)), atol=1e-5
    )


def test_spatial_random_crop_and_spacing(run, key):
    subject = _subject((16, 14, 12))
    transform = Spatial([RandomAffine()], output_shape=(8, 8, 8), crop="random")
    out = run(lambda k, s: transform(k, s).without_history(), key, subject, atol=1e-4)
    assert out.t1.spatial_shape == (8, 8, 8)
    resampled = Spatial(output_spacing=2.0)(subject)
    assert resampled.t1.spatial_shape == (8, 7, 6)
    np.testing.assert_allclose(np.asarray(resampled.t1.spacing), 2.0, atol=1e-6)
    # world position of the output grid centre equals the input's
    c_in = affine_lib.voxel_to_world(subject.t1.affine, (np.array((16, 14, 12)) - 1) / 2)
    c_out = affine_lib.voxel_to_world(np.asarray(resampled.t1.affine), (np.array((8, 7, 6)) - 1) / 2)
    np.testing.assert_allclose(c_in, c_out, atol=1e-5)


# -- labels ----------------------------------------------------------------------------


@pytest.mark.parametrize("label_interpolation", ["nearest", "partial_volume"])
def test_labels_keep_values_and_dtype(label_interpolation, run, key):
    subject = _subject()
    transform = Compose(
        [
            RandomAffine(degrees=20, label_interpolation=label_interpolation),
            RandomElasticDeformation(
                num_control_points=5, max_displacement=1.0, label_interpolation=label_interpolation
            ),
        ]
    )
    out = run(lambda k, s: transform(k, s).without_history(), key, subject, atol=1e-4)
    assert out.seg.dtype == np.uint8
    assert set(np.unique(np.asarray(out.seg.data))) <= set(np.unique(np.asarray(subject.seg.data)))


# -- inverse ---------------------------------------------------------------------------


def test_affine_inverse_restores_affine_and_data():
    shape = (20, 20, 20)
    affine = affine_lib.from_spacing((1.0, 1.0, 1.0), (2, 3, 4), "LPS")
    grid = np.stack(np.meshgrid(*map(np.arange, shape), indexing="ij"), -1).astype(float)
    subject = jmed.Subject(t1=jmed.ScalarImage(_smooth(grid).astype(np.float32), affine))
    transform = RandomAffine(scales=0.1, degrees=10, translation=1)
    out, params = jax.jit(transform.sample_and_apply)(jax.random.key(5), subject)
    back = jax.jit(transform.inverse)(out, params)
    np.testing.assert_array_equal(np.asarray(back.t1.affine), affine)
    err = np.abs(np.asarray(back.t1.data) - np.asarray(subject.t1.data))[4:-4, 4:-4, 4:-4]
    assert err.mean() < 0.02 and err.max() < 0.1
    inv = jmed.transforms.invert(transform(jax.random.key(5), subject))
    np.testing.assert_allclose(np.asarray(inv.t1.data), np.asarray(back.t1.data), atol=1e-4)


def test_elastic_inverse_is_better_than_negation():
    shape = (20, 20, 20)
    affine = affine_lib.from_spacing((1.0, 1.2, 0.8), (0, 0, 0), "LPS")
    transform = RandomElasticDeformation(num_control_points=5, max_displacement=3.0, locked_borders=1)
    subject = _subject(shape, affine)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        params = transform.sample(jax.random.key(6), subject)
    forward = transform.mapping(params, shape, affine)
    field = np.asarray(forward.displacement.dense()) @ np.asarray(forward.displacement_matrix).T  # voxels

    def pull(points):  # forward mapping m(x) = x + v(x) at fractional points
        flat = points.reshape(-1, 3).T
        v = np.stack(
            [ndimage.map_coordinates(field[..., d], flat, order=1, mode="nearest") for d in range(3)], -1
        )
        return points + v.reshape(points.shape)

    grid = np.stack(np.meshgrid(*map(np.arange, shape), indexing="ij"), -1).astype(float)
    inverse = invert_mapping(forward)
    inv_points = grid @ np.asarray(inverse.matrix)[:3, :3].T + np.asarray(inverse.matrix)[:3, 3]
    inv_points = inv_points + np.asarray(inverse.displacement)
    err = np.linalg.norm(pull(inv_points) - grid, axis=-1).max()
    err_negated = np.linalg.norm(pull(grid - field) - grid, axis=-1).max()
    assert np.abs(field).max() > 1.0
    assert err < 0.05 and err < 0.1 * err_negated, (err, err_negated)
    # and on images: the inverse brings the data back within interpolation error
    out = jax.jit(transform.apply)(subject, params)
    back = jax.jit(transform.inverse)(out, params)
    assert np.mean(np.asarray(back.seg.data) != np.asarray(subject.seg.data)) < 0.05


def test_spatial_inverse():
    subject = _subject((10, 10, 8))
    cropping = Spatial([RandomFlip()], output_shape=(6, 6, 6))
    out, params = cropping.sample_and_apply(jax.random.key(0), subject)
    assert not cropping.invertible
    with pytest.raises(TypeError, match="changes the grid"):
        cropping.inverse(out, params)
    fused = Spatial([RandomFlip(axes=(0, 1)), RandomRot90(axes=(0, 1))])
    out, params = jax.jit(fused.sample_and_apply)(jax.random.key(1), subject)
    back = jax.jit(fused.inverse)(out, params)
    np.testing.assert_array_equal(np.asarray(back.seg.data), np.asarray(subject.seg.data))


def test_flip_and_rot90_inverse_exact():
    subject = _subject((10, 10, 8))
    for transform in (RandomFlip(axes=(0, 1, 2), flip_probability=1.0), RandomRot90(axes=(0, 1))):
        out, params = jax.jit(transform.sample_and_apply)(jax.random.key(7), subject)
        back = jax.jit(transform.inverse)(out, params)
        for name in subject:
            np.testing.assert_array_equal(np.asarray(back[name].data), np.asarray(subject[name].data))


# -- jax properties --------------------------------------------------------------------


@pytest.mark.parametrize(
    "transform",
    [
        RandomAffine(label_interpolation="partial_volume"),
        RandomElasticDeformation(num_control_points=5, max_displacement=1.0),
        Compose(
            [
                RandomFlip(axes=(0, 1)),
                RandomAffine(degrees=20),
                RandomElasticDeformation(max_displacement=1.0),
            ]
        ),
        RandomAnisotropy(),
    ],
    ids=["affine", "elastic", "fused", "anisotropy"],
)
def test_eager_jit_vmap_and_same_key(transform, run, key):
    subject = _subject()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = run(lambda k, s: transform(k, s).without_history(), key, subject, atol=1e-4)
        again = transform(key, subject)
        other = transform(jax.random.fold_in(key, 9), subject)
    np.testing.assert_allclose(np.asarray(out.t1.data), np.asarray(again.t1.data), rtol=1e-5, atol=1e-4)
    assert not np.array_equal(np.asarray(again.t1.data), np.asarray(other.t1.data))


def test_gradients_wrt_image_are_finite():
    subject = _subject()
    transform = Compose(
        [RandomAffine(), RandomElasticDeformation(num_control_points=5, max_displacement=1.0)]
    )

    def loss(data):
        s = subject.replace({"t1": subject.t1.replace(data=data)})
        return jnp.sum(transform(jax.random.key(0), s).t1.data ** 2)

    grad = np.asarray(jax.grad(loss)(jnp.asarray(subject.t1.data)))
    assert np.all(np.isfinite(grad)) and np.abs(grad).sum() > 0


def test_anisotropy_simulates_thick_slices():
    data = np.arange(20, dtype=np.float32)[:, None, None] * np.ones((20, 3, 3), np.float32)
    image = jmed.ScalarImage(data)
    out = RandomAnisotropy(axes=0).apply_image(image, {"axis": jnp.asarray(0), "factor": jnp.asarray(4.0)})
    line = np.asarray(out.data)[:, 0, 0, 0]
    # samples at 0, 4, 8, 12, 16 kept, linear in between, edge beyond 16
    np.testing.assert_allclose(line[::4], [0, 4, 8, 12, 16])
    np.testing.assert_allclose(line[:17], np.arange(17), atol=1e-5)  # linear data is reproduced
    np.testing.assert_allclose(line[17:], 16)
    wiggly = jmed.ScalarImage(np.sin(np.arange(20.0))[:, None, None] * np.ones((20, 3, 3), np.float32))
    out = RandomAnisotropy(axes=0).apply_image(wiggly, {"axis": jnp.asarray(0), "factor": jnp.asarray(3.0)})
    np.testing.assert_allclose(np.asarray(out.data)[::3, 0, 0, 0], np.sin(np.arange(0, 20, 3.0)), atol=1e-6)


# -- bad parameters --------------------------------------------------------------------


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: RandomAffine(scales=(-0.5, 1.0)), "scales"),
        (lambda: RandomAffine(scales=1.5), "scales"),
        (lambda: RandomAffine(degrees=(10, -10)), "degrees"),
        (lambda: RandomAffine(center="corner"), "center"),
        (lambda: RandomAffine(default_pad_value="median"), "default_pad_value"),
        (lambda: RandomAffine(isotropic=True, scales=(0.1, 0.2, 0.3)), "isotropic"),
        (lambda: RandomAffine(label_interpolation="linear"), "label_interpolation"),
        (lambda: RandomElasticDeformation(num_control_points=3), "num_control_points"),
        (lambda: RandomElasticDeformation(num_control_points=4, locked_borders=2), "locked_borders"),
        (lambda: RandomElasticDeformation(locked_borders=3), "locked_borders"),
        (lambda: RandomElasticDeformation(max_displacement=-1), "max_displacement"),
        (lambda: RandomFlip(axes="XY"), "axes"),
        (lambda: RandomFlip(flip_probability=2), "flip_probability"),
        (lambda: RandomAnisotropy(downsampling=(0.5, 2)), "downsampling"),
        (lambda: Spatial(output_spacing=0), "output_spacing"),
    ],
)
def test_bad_parameters(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_elastic_on_2d_image_stays_in_plane():
    x, y = np.meshgrid(np.arange(16) - 7.5, np.arange(12) - 5.5, indexing="ij")
    disc = (x**2 + y**2 < 20).astype(np.uint8)[..., None]
    subject = jmed.Subject(t1=jmed.ScalarImage(disc.astype(np.float32) * 10), seg=jmed.LabelMap(disc))
    transform = RandomElasticDeformation(
        num_control_points=6, max_displacement=2.0, locked_borders=1, default_pad_value="edge"
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = jax.jit(transform)(jax.random.key(0), subject)
    assert out.t1.spatial_shape == (16, 12, 1)
    assert set(np.unique(np.asarray(out.seg.data))) <= {0, 1}
    assert not np.array_equal(np.asarray(out.t1.data), np.asarray(subject.t1.data))
    # mid-image labels are not lost to padding (nothing moved out of the single slice)
    assert np.asarray(out.seg.data)[7:9, 5:7].min() > 0 and np.asarray(out.t1.data)[7:9, 5:7].min() > 9


def test_elastic_folding_warning():
    subject = _subject((16, 16, 16))
    with pytest.warns(RuntimeWarning, match="fold"):
        RandomElasticDeformation(num_control_points=7, max_displacement=5)(jax.random.key(0), subject)


def test_compose_fuses_runs_of_spatial_transforms_only():
    from jmed.transforms.base import Lambda, _fused_stages

    flip, affine, elastic = RandomFlip(), RandomAffine(), RandomElasticDeformation(max_displacement=1.0)
    scale = Lambda(lambda x: x * 2, kinds="intensity")
    stages = _fused_stages((flip, affine, scale, elastic))
    assert [(fused is not None, start, stop) for fused, start, stop in stages] == [
        (True, 0, 2),
        (False, 2, 3),
        (False, 3, 4),
    ]
    only_t1 = RandomAffine(include="t1")
    stages = _fused_stages((flip, only_t1, elastic))
    assert [fused is None for fused, _, _ in stages] == [True, True, True]
    # replaying the recorded params gives the same output
    subject = _subject()
    transform = Compose([flip, affine, scale, elastic])
    out = jax.jit(transform)(jax.random.key(4), subject)
    replayed = jax.jit(lambda s: jmed.transforms.replay(s, out.history))(subject)
    np.testing.assert_allclose(np.asarray(replayed.t1.data), np.asarray(out.t1.data), rtol=1e-5, atol=1e-3)
