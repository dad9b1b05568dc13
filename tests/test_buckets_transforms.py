"""Padding-aware transforms: on a volume padded to a bucket shape (``Image.extent``), the
valid voxels come out as from the unpadded volume.

Every case compares ``crop_to_extent(jit(t)(key, padded))`` with ``jit(t)(key, unpadded)``
for several keys (the padding as ``pad_subject`` fills it, and filled with unrelated
values, which a padding-aware transform must not read), under ``vmap`` over two padded
subjects of different extents in one bucket, and at a size of >= 90 voxels on an axis.
``test_every_transform_is_classified`` makes each public transform class either a
padding-aware one with a case here or a listed exception with its reason.
"""

from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import make_phantom

import jmed
import jmed.transforms as T
from jmed.buckets import crop_to_extent, is_padding_aware, pad_subject

# (spatial shape, bucket) of the main case and of the second subject of the vmap batch
SHAPE, BUCKET = (41, 37, 29), (48, 48, 40)
OTHER = (33, 30, 25)
LARGE_SHAPE, LARGE_BUCKET = (95, 21, 17), (104, 24, 24)
# RandomRot90 turns axes 0 and 1: their valid sizes must be equal
SQUARE, SQUARE_OTHER = (37, 37, 29), (30, 30, 25)
KEYS = (0, 1, 2)


def _oblique_affine(spacing=(1.2, 0.9, 2.0)) -> np.ndarray:
    a, b = np.deg2rad(17.0), np.deg2rad(-9.0)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    affine = np.eye(4)
    affine[:3, :3] = rz @ rx @ np.diag(spacing)
    affine[:3, 3] = (-30.0, 12.5, 7.0)
    return affine


def _subject(shape, seed=0):
    return make_phantom(shape, _oblique_affine(), seed=seed)


def _speckled(subject):
    """Labels 1 in scattered single voxels and small blocks (components of many sizes),
    holes of background inside the labels, and a box of label 1 open only at the high
    faces, whose inside is a hole if the padding closes it (for the component transforms)."""
    rng = np.random.default_rng(7)
    seg = np.array(subject["seg"].data)
    spots = rng.random(seg.shape) < 0.01
    seg[spots & (seg == 0)] = 1
    seg[spots & (seg == 2)] = 0
    seg[2:5, 3:6, 1:3] = 2
    x, y, z = seg.shape[:3]
    seg[x - 6 :, y - 6 :, z - 6 :] = 0
    seg[x - 6, y - 6 :, z - 6 :] = 1
    seg[x - 6 :, y - 6, z - 6 :] = 1
    seg[x - 6 :, y - 6 :, z - 6] = 1
    return subject.replace({"seg": subject["seg"].replace(data=seg)})


def _no_background(subject):
    """Labels ``1..3`` only: a padding of 0 would add a label absent from the valid voxels."""
    seg = subject["seg"]
    return subject.replace({"seg": seg.replace(data=np.asarray(seg.data) + 1)})


LANDMARKS = np.linspace(0.0, 100.0, 11)

# name -> (factory, tolerance, prepare, shapes, tolerance under vmap): tolerance None means
# bitwise equality, else (rtol, atol as a fraction of the largest |value| of the unpadded
# result)
ROUNDING = (1e-5, 1e-6)
# resampling at coordinates computed along another path (a spline over the extent): a
# coordinate that differs by rounding moves a linear interpolation by slope * 1e-6
GEOMETRY = (1e-4, 1e-5)
# RandomAnisotropy's interpolation rounds differently under vmap (its axis switch becomes a
# select), unpadded volumes too: 1 ulp of the largest value
VMAP_INTERPOLATION = (1e-5, 4e-6)


def _case(factory, tol=None, prepare=None, shapes=(SHAPE, OTHER, BUCKET), vmap_tol="same"):
    return factory, tol, prepare, shapes, tol if vmap_tol == "same" else vmap_tol


CASES = {
    # spatial
    "RandomFlip": _case(lambda: T.RandomFlip(axes=(0, 1, 2), flip_probability=0.5)),
    "RandomRot90": _case(lambda: T.RandomRot90(axes=(0, 1)), ROUNDING, shapes=(SQUARE, SQUARE_OTHER, BUCKET)),
    "RandomAffine": _case(lambda: T.RandomAffine(scales=0.1, degrees=15, translation=3), ROUNDING),
    "RandomElasticDeformation": _case(
        lambda: T.RandomElasticDeformation(num_control_points=6, max_displacement=4.0), GEOMETRY
    ),
    "RandomAnisotropy": _case(lambda: T.RandomAnisotropy(downsampling=(1.5, 5)), vmap_tol=VMAP_INTERPOLATION),
    # generic intensity
    "RandomNoise": _case(lambda: T.RandomNoise(std=(0.5, 2.0))),
    "RandomNoise-rician": _case(lambda: T.RandomNoise(std=(0.5, 2.0), rician=True)),
    "RandomBlur": _case(lambda: T.RandomBlur(std=(0.5, 3.0)), ROUNDING),
    "RandomBlur-voxels-constant": _case(
        lambda: T.RandomBlur(std=(0.2, 2.5), units="voxels", mode="constant"), ROUNDING
    ),
    "RandomBlur-nearest": _case(lambda: T.RandomBlur(std=(0.5, 3.0), mode="nearest"), ROUNDING),
    "RandomBlur-mirror": _case(lambda: T.RandomBlur(std=(0.5, 3.0), mode="mirror"), ROUNDING),
    "RandomBlur-wrap": _case(lambda: T.RandomBlur(std=(0.5, 3.0), mode="wrap"), ROUNDING),
    "RandomGamma": _case(lambda: T.RandomGamma()),
    "RandomGamma-rescale": _case(lambda: T.RandomGamma(rescale=True)),
    "RandomGamma-nnunet": _case(
        lambda: T.RandomGamma(gamma=(0.7, 1.5), invert=True, retain_stats=True), ROUNDING
    ),
    "RandomBrightness": _case(lambda: T.RandomBrightness()),
    "RandomContrast": _case(lambda: T.RandomContrast(contrast=(0.5, 1.5)), ROUNDING),
    "RandomBiasField": _case(lambda: T.RandomBiasField(coefficients=0.5, order=3), ROUNDING),
    "RandomSwap": _case(lambda: T.RandomSwap(patch_size=(7, 5, 4), num_iterations=12)),
    "RandomCoarseDropout": _case(
        lambda: T.RandomCoarseDropout(num_holes=3, hole_size=(9, 6, 5), fill_value=-1)
    ),
    "RandomLabelsToImage": _case(lambda: T.RandomLabelsToImage("seg", num_labels=3)),
    "RandomLabelsToImage-background": _case(
        lambda: T.RandomLabelsToImage("seg", num_labels=3, ignore_background=True, image_key="t1")
    ),
    # normalisation
    "RescaleIntensity": _case(lambda: T.RescaleIntensity(out_min_max=(-1, 1), percentiles=(0.5, 99.5))),
    "RescaleIntensity-masked": _case(lambda: T.RescaleIntensity(percentiles=(2, 98), masking_method="seg")),
    "RescaleIntensity-fixed": _case(lambda: T.RescaleIntensity(in_min_max=(-50.0, 250.0))),
    "ZNormalization": _case(lambda: T.ZNormalization(), ROUNDING),
    "ZNormalization-masked": _case(lambda: T.ZNormalization(masking_method=("seg", (1, 2))), ROUNDING),
    "Clamp": _case(lambda: T.Clamp(out_min=0.0, out_max=150.0)),
    "Mask": _case(lambda: T.Mask("seg", outside_value=-5.0)),
    "HistogramStandardization": _case(lambda: T.HistogramStandardization(LANDMARKS)),
    "HistogramStandardization-masked": _case(
        lambda: T.HistogramStandardization(LANDMARKS, masking_method="seg", cutoff=(0.0, 100.0))
    ),
    # labels
    "OneHot": _case(lambda: T.OneHot(3)),
    "RemapLabels": _case(lambda: T.RemapLabels({1: 2, 2: 1})),
    "RemoveLabels": _case(lambda: T.RemoveLabels(2)),
    "SequentialLabels": _case(lambda: T.SequentialLabels(), prepare=_no_background),
    "KeepLargestComponent": _case(lambda: T.KeepLargestComponent(), prepare=_speckled),
    "RemoveSmallObjects": _case(lambda: T.RemoveSmallObjects(5), prepare=_speckled),
    "FillHoles": _case(lambda: T.FillHoles(), prepare=_speckled),
    # compositions of padding-aware transforms
    "Compose": _case(
        lambda: T.Compose([T.RandomFlip(axes=(0, 1, 2)), T.RandomAffine(degrees=10), T.RandomNoise(std=1.0)]),
        ROUNDING,
    ),
    "OneOf": _case(lambda: T.OneOf([T.RandomGamma(), T.RandomBlur(std=(0.5, 2.0))]), ROUNDING),
    "RandomApply": _case(lambda: T.RandomApply(T.RandomBiasField(), p=0.5), ROUNDING),
    "SomeOf": _case(
        lambda: T.SomeOf(
            [T.RandomContrast(), T.RandomSwap(patch_size=5), T.RescaleIntensity()], num_transforms=2
        ),
        ROUNDING,
    ),
}

# public transforms that are not padding-aware, and what they do on a padded volume
NOT_PADDING_AWARE = {
    "RandomMotion": "k-space: acts on the padded field of view (see test_kspace_sees_the_padded_field_of_view)",
    "RandomGhosting": "k-space: acts on the padded field of view (see test_kspace_sees_the_padded_field_of_view)",
    "RandomSpike": "k-space: acts on the padded field of view (see test_kspace_sees_the_padded_field_of_view)",
    "Lambda": "runs a user function, which decides",
    "Reorient": "preprocessing: changes the grid from header values; runs before padding",
    "ToCanonical": "preprocessing: changes the grid from header values; runs before padding",
    "Resample": "preprocessing: changes the grid from header values; runs before padding",
    "Resize": "preprocessing: changes the shape; runs before padding",
    "Crop": "preprocessing: changes the shape; runs before padding",
    "Pad": "preprocessing: changes the shape; runs before padding",
    "CropOrPad": "preprocessing: changes the shape; runs before padding",
    "EnsureShapeMultiple": "preprocessing: changes the shape; runs before padding",
    "CropForeground": "preprocessing: changes the shape from the data; runs before padding",
    "CopyAffine": "preprocessing: copies a header; runs before padding",
    # its flag is inherited from SpatialTransform, but it raises on a padded volume
    "Spatial": "changes the output grid: raises ValueError on a padded volume",
}
# host-only (connected components): eager calls, they refuse jit and vmap
EAGER_ONLY = {"KeepLargestComponent", "RemoveSmallObjects", "FillHoles"}
# abstract bases: not used as transforms themselves
BASES = {"Transform", "IntensityTransform", "LabelTransform", "RandomTransform", "SpatialTransform"}


def _case_class(name: str) -> str:
    return name.split("-")[0]


def _compiled(name, transform):
    """``jax.jit(transform)``, or the transform itself for the eager-only ones."""
    return transform if _case_class(name) in EAGER_ONLY else jax.jit(transform)


def _garbage_padding(padded, seed):
    """``padded`` with its padding replaced by unrelated values of the image's range
    (label maps: random labels for an odd ``seed``, all 1 for an even one)."""
    rng = np.random.default_rng(seed)
    images = {}
    for name, image in padded.items():
        data = np.array(image.data)
        ex, ey, ez = (int(v) for v in image.extent)
        inside = np.zeros(data.shape[:3], bool)
        inside[:ex, :ey, :ez] = True
        if image.is_label:
            noise = rng.integers(0, 3, data.shape) if seed % 2 else np.ones(data.shape)
            noise = noise.astype(data.dtype)
        else:
            lo, hi = float(data.min()), float(data.max())
            noise = rng.uniform(lo - (hi - lo), hi + (hi - lo), data.shape).astype(data.dtype)
        data[~inside] = noise[~inside]
        images[name] = image.replace(data=data)
    return padded.replace(images)


def _assert_valid_equal(actual, expected, tol, what):
    assert set(actual) == set(expected), what
    for name in expected:
        a, e = actual[name], expected[name]
        assert a.extent is None, (what, name)
        assert a.kind == e.kind, (what, name)
        assert a.data.dtype == e.data.dtype, (what, name, a.data.dtype, e.data.dtype)
        assert a.data.shape == e.data.shape, (what, name, a.data.shape, e.data.shape)
        np.testing.assert_allclose(np.asarray(a.affine), np.asarray(e.affine), rtol=0, atol=1e-5)
        a_data, e_data = np.asarray(a.data), np.asarray(e.data)
        if tol is None or not np.issubdtype(e_data.dtype, np.floating):
            np.testing.assert_array_equal(a_data, e_data, err_msg=f"{what}: {name}")
        else:
            rtol, atol = tol
            scale = max(float(np.max(np.abs(e_data))), 1.0)
            np.testing.assert_allclose(
                a_data, e_data, rtol=rtol, atol=atol * scale, err_msg=f"{what}: {name}"
            )


def _prepared(name, shape, seed=0):
    prepare = CASES[name][2]
    subject = _subject(shape, seed)
    return prepare(subject) if prepare is not None else subject


@pytest.mark.parametrize("name", list(CASES))
def test_padded_equals_unpadded(name):
    factory, tol, _, (shape, _, bucket), _ = CASES[name]
    transform = factory()
    assert is_padding_aware(transform)
    subject = _prepared(name, shape)
    padded = pad_subject(subject, bucket)
    fn = _compiled(name, transform)
    for k in KEYS:
        key = jax.random.key(k)
        expected = fn(key, subject)
        source = padded if k == 0 else _garbage_padding(padded, k)
        out = fn(key, source)
        assert out.spatial_shape == bucket
        _assert_valid_equal(crop_to_extent(out), expected, tol, f"{name} key {k}")


@pytest.mark.parametrize("name", [n for n in CASES if "-" not in n])  # one case per class
def test_padded_under_vmap(name):
    factory, _, _, (shape, other, bucket), tol = CASES[name]
    transform = factory()
    subjects = [_prepared(name, shape, 0), _prepared(name, other, 1)]
    batch = jmed.stack([pad_subject(s, bucket) for s in subjects])
    keys = jnp.stack([jax.random.key(3), jax.random.key(4)])
    if name in EAGER_ONLY:
        with pytest.raises(TypeError, match="eagerly"):
            jax.vmap(transform)(keys, batch)
        outs = [transform(k, item) for k, item in zip(keys, jmed.unstack(batch))]
    else:
        outs = jmed.unstack(jax.jit(jax.vmap(transform))(keys, batch))
    fn = _compiled(name, transform)
    for i, (out, subject) in enumerate(zip(outs, subjects)):
        expected = fn(keys[i], subject)
        _assert_valid_equal(crop_to_extent(out), expected, tol, f"{name} item {i}")


LARGE = [
    "RandomAffine",
    "RandomElasticDeformation",
    "RandomAnisotropy",
    "RandomNoise",
    "RandomBlur",
    "RandomGamma-nnunet",
    "RandomContrast",
    "RandomBiasField",
    "RandomSwap",
    "RandomCoarseDropout",
    "RescaleIntensity",
    "ZNormalization",
    "HistogramStandardization",
    "SequentialLabels",
    "KeepLargestComponent",
]


@pytest.mark.parametrize("name", LARGE)
def test_padded_equals_unpadded_large(name):
    factory, tol = CASES[name][:2]
    transform = factory()
    subject = _prepared(name, LARGE_SHAPE)
    padded = _garbage_padding(pad_subject(subject, LARGE_BUCKET), 5)
    key = jax.random.key(11)
    fn = _compiled(name, transform)
    expected = fn(key, subject)
    _assert_valid_equal(crop_to_extent(fn(key, padded)), expected, tol, name)


def test_blur_tap_loop_at_the_extent():
    """Kernels wider than radius 24 (the run-time tap loop, and the banded product for a
    concrete sigma) fold at the extent too; compared with scipy on the unpadded volume."""
    import scipy.ndimage

    from jmed.ops.filters import gaussian_blur

    rng = np.random.default_rng(0)
    data = rng.random((95, 11, 9, 1)).astype(np.float32)
    padded = np.full((104, 16, 16, 1), 7.0, np.float32)
    padded[:95, :11, :9] = data
    extent = np.array([95, 11, 9], np.int32)
    sigma = np.array([7.5, 1.0, 0.6], np.float32)
    for mode in ("reflect", "mirror", "nearest", "wrap", "constant"):
        ref = scipy.ndimage.gaussian_filter(data[..., 0].astype(np.float64), sigma, mode=mode, cval=0.5)
        traced = jax.jit(
            lambda x, s, e, mode=mode: gaussian_blur(x, s, mode=mode, cval=0.5, max_sigma=8.0, extent=e)
        )(padded, sigma, extent)
        eager = gaussian_blur(padded, sigma, mode=mode, cval=0.5, extent=extent)
        for out in (traced, eager):
            np.testing.assert_allclose(np.asarray(out)[:95, :11, :9, 0], ref, atol=2e-6, err_msg=mode)


def test_sequential_labels_ignores_labels_of_the_padding():
    """The padding (0) is not a label of the valid voxels: not renumbered as one."""
    subject = _no_background(_subject(SHAPE))
    padded = pad_subject(subject, BUCKET)
    out = crop_to_extent(jax.jit(T.SequentialLabels())(padded))
    assert set(np.unique(np.asarray(out["seg"].data)).tolist()) == {0, 1, 2}
    eager = crop_to_extent(T.SequentialLabels()(padded))
    np.testing.assert_array_equal(np.asarray(eager["seg"].data), np.asarray(out["seg"].data))


def test_eager_padded_equals_unpadded():
    """Concrete extents (eager calls, as in the loader's preprocessing) take the same
    paths: statistics and host selections over the valid voxels."""
    subject = _speckled(_subject(SHAPE))
    padded = _garbage_padding(pad_subject(subject, BUCKET), 3)
    for name in (
        "RescaleIntensity",
        "HistogramStandardization",
        "KeepLargestComponent",
        "OneHot",
        "FillHoles",
    ):
        transform = CASES[name][0]()
        _assert_valid_equal(crop_to_extent(transform(padded)), transform(subject), None, name)


def test_random_swap_rejects_a_patch_larger_than_the_extent():
    padded = pad_subject(_subject((10, 37, 29)), BUCKET)
    with pytest.raises(ValueError, match="patch_size"):
        T.RandomSwap(patch_size=(12, 4, 4))(jax.random.key(0), padded)


KSPACE = {
    "RandomMotion": lambda: T.RandomMotion(degrees=10, translation=5, num_transforms=2),
    "RandomGhosting": lambda: T.RandomGhosting(num_ghosts=(2, 4), intensity=(0.5, 1.0)),
    "RandomSpike": lambda: T.RandomSpike(num_spikes=(1, 2), intensity=(0.5, 1.0)),
}


@pytest.mark.parametrize("name", list(KSPACE))
def test_kspace_sees_the_padded_field_of_view(name):
    """Not padding-aware: the result is that of the padded volume (background padding, as
    ``pad_subject`` fills it) as an ordinary image, a larger field of view; its valid
    voxels differ from the unpadded result."""
    transform = KSPACE[name]()
    assert not is_padding_aware(transform)
    subject = _subject(SHAPE)
    padded = pad_subject(subject, BUCKET)
    ordinary = padded.replace({n: im.replace(extent=None) for n, im in padded.items()})
    fn = jax.jit(transform)
    key = jax.random.key(1)
    out, plain = fn(key, padded), fn(key, ordinary)
    np.testing.assert_array_equal(np.asarray(out["t1"].data), np.asarray(plain["t1"].data))
    unpadded = np.asarray(fn(key, subject)["t1"].data)
    valid = np.asarray(crop_to_extent(out)["t1"].data)
    assert not np.allclose(valid, unpadded, rtol=1e-3, atol=1e-3)


def test_spatial_rejects_padded_volumes():
    padded = pad_subject(_subject(SHAPE), BUCKET)
    with pytest.raises(ValueError, match="extent"):
        T.Spatial([T.RandomAffine()], output_shape=(32, 32, 24))(jax.random.key(0), padded)


def test_every_transform_is_classified():
    """Each public transform is padding-aware with a case here, or listed as not padding-
    aware with its reason; a new transform must be put in one of the two."""
    covered = {_case_class(name) for name in CASES}
    problems = []
    for name in T.__all__:
        cls = getattr(T, name)
        if not (inspect.isclass(cls) and issubclass(cls, T.Transform)) or name in BASES:
            continue
        if name in NOT_PADDING_AWARE:
            if cls.padding_aware:
                problems.append(f"{name} is listed as not padding-aware but declares padding_aware = True")
        elif not cls.padding_aware:
            problems.append(
                f"{name} is not padding-aware: make it respect Image.extent (padding_aware = True, with a "
                "case in CASES) or list it in NOT_PADDING_AWARE with what it does on a padded volume"
            )
        elif name not in covered:
            problems.append(f"{name} declares padding_aware = True but has no case in CASES")
    for name in set(NOT_PADDING_AWARE) | covered:
        if name not in T.__all__:
            problems.append(f"{name} is classified here but is not a public transform")
    assert not problems, "\n".join(problems)
