"""Property sweep over every public transform in ``jmed.transforms.__all__``.

Random small subjects (shapes with 1-voxel axes, 2D images as ``(x, y, 1)``, any of the
48 axis-aligned orientations, random spacings, multi-channel float32 intensity images,
uint8/int16/int32 label maps) go through each transform eagerly. Checked: no crash, finite
output from finite input, the shape/affine contract of the transform's family, and that
label-preserving transforms keep labels within the input label set.

Runs eagerly (a compile per random shape under ``jit`` would dominate the time); the
eager/jit/vmap agreement is checked by each module's own tests. Hypothesis profiles: ``ci``
(default, few examples) and ``thorough`` (select with ``JMED_HYPOTHESIS_PROFILE``).
"""

import itertools
import os

import jax
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import jmed
import jmed.transforms as T
from jmed.affine import from_spacing, translate_voxels

settings.register_profile(
    "ci",
    max_examples=4,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "thorough",
    max_examples=60,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
PROFILE = settings.get_profile(os.environ.get("JMED_HYPOTHESIS_PROFILE", "ci"))

ORIENTATIONS = [
    "".join(p[i][s] for i, s in zip(perm, signs))
    for perm in itertools.permutations(range(3))
    for signs in itertools.product((0, 1), repeat=3)
    for p in [(("L", "R"), ("P", "A"), ("I", "S"))]
]
LANDMARKS = np.linspace(0.0, 100.0, T.histogram_percentiles().size)

# family of the shape/affine contract:
#   same    -- shape and affine of every image unchanged
#   spatial -- spatial augmentation: shape and affine unchanged (values move)
#   window  -- crop/pad/reorient: each output voxel centre that lies on an input voxel
#              centre keeps the input's value there (world positions kept)
#   grid    -- output on a new grid covering the same field of view centre
#   new     -- adds an image (RandomLabelsToImage)
# label: "keep" (labels within input set), "remap" (a deterministic relabelling), "onehot"
CASES = {
    "Clamp": (lambda s: T.Clamp(out_min=-1.0, out_max=50.0), "same", "keep"),
    "Compose": (lambda s: T.Compose([T.RandomFlip(axes=(0, 1)), T.RandomNoise()]), "spatial", "keep"),
    "CopyAffine": (lambda s: T.CopyAffine("t1"), "same", "keep"),
    "Crop": (lambda s: T.Crop([v for n in s for v in ((n - 1) // 2, 0)]), "window", "keep"),
    "CropForeground": (lambda s: T.CropForeground(mask_name="seg", margin=1), "window", "keep"),
    "CropOrPad": (lambda s: T.CropOrPad((max(1, s[0] - 1), s[1] + 2, s[2])), "window", "keep"),
    "EnsureShapeMultiple": (lambda s: T.EnsureShapeMultiple(4), "window", "keep"),
    "FillHoles": (lambda s: T.FillHoles(), "same", "keep"),
    "HistogramStandardization": (lambda s: T.HistogramStandardization(LANDMARKS), "same", "keep"),
    "IntensityTransform": None,
    "KeepLargestComponent": (lambda s: T.KeepLargestComponent(), "same", "keep"),
    "LabelTransform": None,
    "Lambda": (lambda s: T.Lambda(lambda x: x * 2, kinds=("intensity",)), "same", "keep"),
    "Mask": (lambda s: T.Mask("seg"), "same", "keep"),
    "OneHot": (lambda s: T.OneHot(4), "same", "onehot"),
    "OneOf": (lambda s: T.OneOf([T.RandomBrightness(), T.RandomFlip(axes=2)]), "spatial", "keep"),
    "Pad": (lambda s: T.Pad((1, 0, 2, 1, 0, 1), padding_mode="edge"), "window", "keep"),
    "RandomAffine": (lambda s: T.RandomAffine(scales=0.2, degrees=30, translation=2), "spatial", "keep"),
    "RandomAnisotropy": (lambda s: T.RandomAnisotropy(downsampling=(1.5, 3)), "spatial", "keep"),
    "RandomApply": (lambda s: T.RandomApply(T.RandomGamma(), p=0.5), "same", "keep"),
    "RandomBiasField": (lambda s: T.RandomBiasField(), "same", "keep"),
    "RandomBlur": (lambda s: T.RandomBlur(), "same", "keep"),
    "RandomBrightness": (lambda s: T.RandomBrightness(), "same", "keep"),
    "RandomCoarseDropout": (lambda s: T.RandomCoarseDropout(num_holes=2, hole_size=1), "same", "keep"),
    "RandomContrast": (lambda s: T.RandomContrast(), "same", "keep"),
    "RandomElasticDeformation": (
        lambda s: T.RandomElasticDeformation(num_control_points=5, max_displacement=2.0),
        "spatial",
        "keep",
    ),
    "RandomFlip": (lambda s: T.RandomFlip(axes=(0, 1, 2)), "spatial", "keep"),
    "RandomGamma": (lambda s: T.RandomGamma(), "same", "keep"),
    "RandomGhosting": (lambda s: T.RandomGhosting(), "same", "keep"),
    "RandomLabelsToImage": (lambda s: T.RandomLabelsToImage("seg", num_labels=3), "new", "keep"),
    "RandomMotion": (lambda s: T.RandomMotion(), "same", "keep"),
    "RandomNoise": (lambda s: T.RandomNoise(), "same", "keep"),
    "RandomRot90": (lambda s: T.RandomRot90(axes=(0, 1)), "rot90", "keep"),
    "RandomSpike": (lambda s: T.RandomSpike(), "same", "keep"),
    "RandomSwap": (lambda s: T.RandomSwap(patch_size=1, num_iterations=3), "same", "keep"),
    "RandomTransform": None,
    "RemapLabels": (lambda s: T.RemapLabels({1: 2, 2: 1}), "same", "remap"),
    "RemoveLabels": (lambda s: T.RemoveLabels([2]), "same", "remap"),
    "RemoveSmallObjects": (lambda s: T.RemoveSmallObjects(2), "same", "keep"),
    "Reorient": (lambda s: T.Reorient("LPS"), "window", "keep"),
    "Resample": (lambda s: None, "window", "keep"),  # built from the subject, see below
    "RescaleIntensity": (lambda s: T.RescaleIntensity(percentiles=(1, 99)), "same", "keep"),
    "Resize": (lambda s: T.Resize((3, s[1], max(1, s[2] // 2))), "grid", "keep"),
    "SequentialLabels": (lambda s: T.SequentialLabels(), "same", "remap"),
    "SomeOf": (lambda s: T.SomeOf([T.RandomNoise(), T.RandomGamma(), T.Clamp(out_min=0.0)]), "same", "keep"),
    "Spatial": (lambda s: T.Spatial([T.RandomFlip(axes=1), T.RandomAffine(degrees=5)]), "spatial", "keep"),
    "SpatialTransform": None,
    "ToCanonical": (lambda s: T.ToCanonical(), "window", "keep"),
    "Transform": None,
    "ZNormalization": (lambda s: T.ZNormalization(), "same", "keep"),
}
# documented refusals: (condition on the subject, expected ValueError message)
REFUSALS = {
    "RandomRot90": (lambda subj: subj.spatial_shape[0] != subj.spatial_shape[1], "equal sizes"),
    "RescaleIntensity": (lambda subj: np.prod(subj.spatial_shape) == 1, "constant range"),
    "ZNormalization": (lambda subj: np.prod(subj.spatial_shape) == 1, "standard deviation"),
}
# abstract bases: they define the protocol and transform nothing by themselves
ABSTRACT = {name for name, case in CASES.items() if case is None}


def transform_names():
    return sorted(
        name
        for name in T.__all__
        if isinstance(getattr(T, name), type) and issubclass(getattr(T, name), T.Transform)
    )


def test_every_transform_has_a_property_case():
    """Every transform exported by jmed.transforms is discovered here and must have a case."""
    assert {"RandomAffine", "Compose"} <= set(transform_names())  # the check below can fail
    missing = sorted(set(transform_names()) - set(CASES))
    assert not missing, (
        f"exported transforms without a property case: {missing}. Add to CASES in "
        "tests/test_properties.py an entry 'Name': (lambda shape: T.Name(...), family, labels) "
        "with family one of same/spatial/window/grid/new/rot90 and labels one of "
        "keep/remap/onehot (or None for an abstract base class)"
    )
    stale = sorted(set(CASES) - set(transform_names()))
    assert not stale, f"CASES names that are not public transforms (remove them): {stale}"


@st.composite
def subjects(draw):
    sizes = st.integers(1, 6)
    two_d = draw(st.booleans())
    shape = (draw(sizes), draw(sizes), 1 if two_d else draw(sizes))
    spacing = [draw(st.sampled_from([0.5, 1.0, 1.5, 3.0])) for _ in range(3)]
    origin = [draw(st.integers(-20, 20)) for _ in range(3)]
    orientation = draw(st.sampled_from(ORIENTATIONS))
    affine = from_spacing(spacing, origin, orientation)
    channels = draw(st.integers(1, 2))
    label_dtype = draw(st.sampled_from([np.uint8, np.int16, np.int32]))
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    intensity = rng.normal(50.0, 20.0, shape + (channels,)).astype(np.float32)
    labels = rng.integers(0, 3, shape + (1,)).astype(label_dtype)
    labels.flat[-1] = 1  # some foreground (CropForeground, Mask)
    return jmed.Subject(
        t1=jmed.Image(intensity, affine, kind="intensity"),
        seg=jmed.Image(labels, affine, kind="label"),
    )


def make_transform(name, subject):
    if name == "Resample":
        # a grid shifted by whole voxels: every kept voxel centre is an input voxel centre
        shape = subject.spatial_shape
        target_affine = translate_voxels(np.asarray(subject["t1"].affine), (1, -1, 0))
        return T.Resample((tuple(max(1, n - 1) for n in shape), target_affine))
    return CASES[name][0](subject.spatial_shape)


def check_finite(out):
    for name, image in out.items():
        data = np.asarray(image.data)
        assert data.shape[-1] >= 1
        if np.issubdtype(data.dtype, np.floating):
            assert np.isfinite(data).all(), f"{name}: non-finite output"
        assert np.isfinite(np.asarray(image.affine)).all(), f"{name}: non-finite affine"


def check_window(before, after):
    """Every output voxel centre that falls on an input voxel centre holds its value."""
    a_in = np.asarray(before.affine, np.float64)
    a_out = np.asarray(after.affine, np.float64)
    m = np.linalg.solve(a_in, a_out)
    assert np.allclose(m, np.round(m), atol=1e-4), f"grids not aligned on voxel centres:\n{m}"
    m = np.round(m).astype(int)
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in after.spatial_shape], indexing="ij"), -1)
    src = idx @ m[:3, :3].T + m[:3, 3]
    inside = np.all((src >= 0) & (src < np.array(before.spatial_shape)), axis=-1)
    d_in, d_out = np.asarray(before.data), np.asarray(after.data)
    s = src[inside]
    np.testing.assert_allclose(d_out[inside], d_in[s[:, 0], s[:, 1], s[:, 2]], rtol=1e-5, atol=1e-4)


def check_labels(before, after, mode, transform):
    old = set(np.unique(np.asarray(before.data)).tolist())
    new = set(np.unique(np.asarray(after.data)).tolist())
    if mode == "keep":
        # 0 is the documented fill label of padding / resampling outside the field of view
        assert new <= old | {0}, f"labels {new - old} not in input set {old}"
        assert after.data.dtype == before.data.dtype, (after.data.dtype, before.data.dtype)
    elif mode == "onehot":
        assert after.num_channels == transform.num_classes
        assert new <= {0, 1}
        np.testing.assert_array_equal(np.asarray(after.data).sum(-1), 1)
    else:
        assert all(isinstance(v, int) for v in new)
        assert len(new) <= len(old)


@pytest.mark.parametrize("name", [n for n in sorted(CASES) if n not in ABSTRACT])
@settings(PROFILE)
@given(subject=subjects(), seed=st.integers(0, 2**31 - 1))
def test_transform_properties(name, subject, seed):
    _, family, label_mode = CASES[name]
    transform = make_transform(name, subject)
    key = jax.random.key(seed) if transform.is_random else None
    if name in REFUSALS and REFUSALS[name][0](subject):
        with pytest.raises(ValueError, match=REFUSALS[name][1]):
            transform(key, subject)
        return
    out = transform(key, subject)
    check_finite(out)
    if family == "new":
        assert set(out) == set(subject) | {transform.image_key}
        generated = out[transform.image_key]
        assert generated.spatial_shape == subject.spatial_shape
        np.testing.assert_allclose(generated.affine, subject["seg"].affine, atol=1e-6)
    else:
        assert set(out) == set(subject)
    for image_name in subject:
        before, after = subject[image_name], out[image_name]
        assert after.kind == before.kind
        if family in ("same", "spatial", "new"):
            assert after.spatial_shape == before.spatial_shape, (before.shape, after.shape)
            np.testing.assert_allclose(after.affine, before.affine, atol=1e-6)
            if label_mode != "onehot" or not before.is_label:
                assert after.num_channels == before.num_channels
        elif family == "rot90":
            # a rotation by k*90 degrees in the (0, 1) plane swaps those extents or not
            assert sorted(after.spatial_shape[:2]) == sorted(before.spatial_shape[:2])
            assert after.spatial_shape[2] == before.spatial_shape[2]
            np.testing.assert_allclose(after.affine, before.affine, atol=1e-6)
        elif family == "window":
            check_window(before, after)
        elif family == "grid":
            a_in, a_out = np.asarray(before.affine), np.asarray(after.affine)
            centre_in = a_in[:3, :3] @ ((np.array(before.spatial_shape) - 1) / 2) + a_in[:3, 3]
            centre_out = a_out[:3, :3] @ ((np.array(after.spatial_shape) - 1) / 2) + a_out[:3, 3]
            np.testing.assert_allclose(centre_out, centre_in, atol=1e-4)
        if before.is_label:
            check_labels(before, after, label_mode, transform)
