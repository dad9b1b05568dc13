import contextlib
import math
import pickle

import jax
import numpy as np
import pytest
from conftest import make_phantom
from scipy import stats

import jmed
from jmed import affine as affine_lib
from jmed.sampling import GridPatchSampler, LabelSampler, UniformSampler, WeightedSampler, grid_locations
from jmed.transforms import transform_key

OBLIQUE = np.array(
    [
        [0.0, -1.2, 0.3, 10.0],
        [0.9, 0.0, 0.0, -20.0],
        [0.2, 0.1, 2.5, 5.0],
        [0.0, 0.0, 0.0, 1.0],
    ]
)


def _starts(patches):
    return np.asarray(patches.metadata["location"])[:, :3]


def _centres(patches, patch_size):
    return _starts(patches) + np.asarray(patch_size) // 2


# --- uniform --------------------------------------------------------------------------------


def test_uniform_locations_are_uniform():
    shape, patch = (6, 5, 4), (3, 3, 2)
    subject = jmed.Subject(t1=jmed.ScalarImage(np.zeros(shape, np.float32)))
    num = 10_000
    patches = jax.jit(UniformSampler(patch), static_argnums=2)(jax.random.key(3), subject, num)
    starts = _starts(patches)
    valid = np.array(shape) - np.array(patch) + 1
    assert starts.min() == 0 and np.all(starts.max(0) == valid - 1)
    cells = np.ravel_multi_index(starts.T, valid)
    counts = np.bincount(cells, minlength=valid.prod())
    assert counts.shape == (36,)
    assert stats.chisquare(counts).pvalue > 1e-3
    # each axis marginal is uniform too
    for axis in range(3):
        marginal = np.bincount(starts[:, axis], minlength=valid[axis])
        assert stats.chisquare(marginal).pvalue > 1e-3


def test_uniform_eager_jit_vmap(run, key):
    subject = make_phantom((12, 10, 9), OBLIQUE)
    out = run(lambda k, s: UniformSampler((5, 4, 3))(k, s, 4), key, subject)
    assert out["t1"].shape == (4, 5, 4, 3, 1)
    assert out["seg"].shape == (4, 5, 4, 3, 1)
    assert out["seg"].kind == "label"


# --- geometry and values of patches ------------------------------------------------------------


@pytest.mark.parametrize(
    "sampler",
    [UniformSampler((5, 4, 3)), LabelSampler((5, 4, 3), "seg", {0: 1, 1: 1, 2: 1}), WeightedSampler(4, "t1")],
)
def test_patch_values_and_affines_match_source(sampler, key):
    subject = make_phantom((14, 12, 10), OBLIQUE, seed=2)
    if isinstance(sampler, WeightedSampler):
        subject = subject.replace({"t1": subject["t1"].replace(data=np.abs(np.asarray(subject["t1"].data)))})
    patches = sampler(key, subject, 6)
    size = np.array(sampler.patch_size)
    locations = np.asarray(patches.metadata["location"])
    assert locations.dtype == np.int32 and locations.shape == (6, 6)
    np.testing.assert_array_equal(locations[:, 3:] - locations[:, :3], np.broadcast_to(size, (6, 3)))
    assert np.all(locations[:, :3] >= 0) and np.all(locations[:, 3:] <= np.array(subject.spatial_shape))
    for name in subject:
        source = np.asarray(subject[name].data)
        for i, (x0, y0, z0, x1, y1, z1) in enumerate(locations):
            np.testing.assert_array_equal(np.asarray(patches[name].data[i]), source[x0:x1, y0:y1, z0:z1])
            patch_affine = np.asarray(patches[name].affine[i], float)
            # voxel (0, 0, 0) of the patch is source voxel (x0, y0, z0), in world mm
            expected = affine_lib.voxel_to_world(OBLIQUE, np.array([x0, y0, z0], float))
            np.testing.assert_allclose(
                affine_lib.voxel_to_world(patch_affine, np.zeros(3)), expected, atol=1e-4
            )
            # and any other voxel keeps its world position too
            np.testing.assert_allclose(
                affine_lib.voxel_to_world(patch_affine, np.array([1.0, 2.0, 3.0])),
                affine_lib.voxel_to_world(OBLIQUE, np.array([x0 + 1.0, y0 + 2.0, z0 + 3.0])),
                atol=1e-4,
            )


def test_metadata_repeated_per_patch(key):
    subject = make_phantom((10, 10, 10))
    subject = subject.replace(metadata={"age": 54.0, "diagnosis": "AD"})
    patches = UniformSampler(4)(key, subject, 3)
    np.testing.assert_array_equal(np.asarray(patches.metadata["age"]), [54.0, 54.0, 54.0])
    assert patches.metadata["diagnosis"] == "AD"
    assert patches.history == ()


# --- weighted -----------------------------------------------------------------------------------


def test_weighted_single_voxel_gives_one_location(run, key):
    shape, patch = (10, 8, 9), (4, 3, 5)
    weights = np.zeros(shape, np.float32)
    weights[7, 3, 5] = 0.25
    # a voxel whose patch would leave the volume is not an eligible centre
    weights[0, 0, 0] = 100.0
    subject = jmed.Subject(
        t1=jmed.ScalarImage(np.ones(shape, np.float32)), sampling=jmed.ScalarImage(weights)
    )
    out = run(lambda k, s: WeightedSampler(patch, "sampling")(k, s, 16), key, subject)
    expected_start = np.array([7, 3, 5]) - np.array(patch) // 2
    np.testing.assert_array_equal(_starts(out), np.broadcast_to(expected_start, (16, 3)))


def test_weighted_follows_map_on_large_volume():
    # two eligible voxels with weights 1 and 3 among ~1e5 zeros: frequencies 1/4, 3/4
    shape = (50, 60, 40)
    weights = np.zeros(shape, np.float32)
    weights[10, 10, 10] = 1.0
    weights[40, 50, 30] = 3.0
    subject = jmed.Subject(p=jmed.ScalarImage(weights))
    patches = WeightedSampler(6, "p")(jax.random.key(1), subject, 4000)
    centres = _centres(patches, (6, 6, 6))
    first = np.all(centres == [10, 10, 10], axis=1)
    second = np.all(centres == [40, 50, 30], axis=1)
    assert np.all(first | second)
    assert abs(first.mean() - 0.25) < 0.03


# --- label ---------------------------------------------------------------------------------------


def _label_volume():
    shape = (30, 28, 26)
    seg = np.zeros(shape, np.uint8)
    seg[5:25, 5:23, 5:21] = 1  # large
    seg[12:16, 12:15, 10:13] = 2  # small
    seg[20, 20, 15] = 3  # a single voxel
    seg[25:28, 2:5, 2:5] = 4  # not requested
    return seg


def test_label_sampler_class_frequencies():
    seg = _label_volume()
    subject = jmed.Subject(seg=jmed.LabelMap(seg), t1=jmed.ScalarImage(seg.astype(np.float32)))
    probabilities = {0: 2, 1: 1, 2: 3, 3: 2}
    patch = (4, 5, 6)
    num = 4000
    sampler = LabelSampler(patch, "seg", probabilities)
    patches = jax.jit(sampler, static_argnums=2)(jax.random.key(0), subject, num)
    centres = _centres(patches, patch)
    labels = seg[tuple(centres.T)]
    total = sum(probabilities.values())
    for label, weight in probabilities.items():
        assert abs(np.mean(labels == label) - weight / total) < 0.03, (label, np.mean(labels == label))
    assert not np.any(labels == 4)
    # the patch's centre voxel in the extracted label patch has the same label
    centre_in_patch = np.asarray(patches["seg"].data)[:, patch[0] // 2, patch[1] // 2, patch[2] // 2, 0]
    np.testing.assert_array_equal(centre_in_patch, labels)
    # within a class, voxels are uniform: class 2 has 36 voxels
    class2 = centres[labels == 2]
    cells = np.ravel_multi_index((class2 - [12, 12, 10]).T, (4, 3, 3))
    assert stats.chisquare(np.bincount(cells, minlength=36)).pvalue > 1e-3


def test_label_sampler_absent_class_is_renormalised():
    seg = _label_volume()
    subject = jmed.Subject(seg=jmed.LabelMap(seg))
    patches = LabelSampler(3, label_probabilities={1: 1, 2: 1, 7: 5})(jax.random.key(2), subject, 2000)
    labels = seg[tuple(_centres(patches, (3, 3, 3)).T)]
    assert set(np.unique(labels)) == {1, 2}
    assert abs(np.mean(labels == 2) - 0.5) < 0.03


def test_label_sampler_default_binarises(run, key):
    seg = _label_volume()
    subject = jmed.Subject(seg=jmed.LabelMap(seg))
    out = run(lambda k, s: LabelSampler(4)(k, s, 64), key, subject)
    labels = seg[tuple(_centres(out, (4, 4, 4)).T)]
    assert np.all(labels > 0)


def test_label_sampler_one_hot_channels():
    seg = _label_volume()
    one_hot = (seg[..., None] == np.arange(5)).astype(np.float32)
    subject = jmed.Subject(seg=jmed.Image(one_hot, kind="label"))
    patches = LabelSampler(3, label_probabilities={3: 1})(jax.random.key(0), subject, 5)
    np.testing.assert_array_equal(_centres(patches, (3, 3, 3)), np.broadcast_to([20, 20, 15], (5, 3)))


def test_label_sampler_foreground_fraction():
    seg = np.zeros((40, 40, 40), np.uint8)
    seg[30:32, 30:32, 30:32] = 1  # tiny foreground: uniform patches almost never centre on it
    subject = jmed.Subject(seg=jmed.LabelMap(seg))
    sampler = LabelSampler(8, foreground_fraction=0.33)
    num = 12
    patches = jax.jit(jax.vmap(lambda k: sampler(k, subject, num)))(jax.random.split(jax.random.key(0), 50))
    centres = np.asarray(patches.metadata["location"])[..., :3] + 4
    labels = seg[tuple(np.moveaxis(centres, -1, 0))]
    forced = math.ceil(0.33 * num)
    assert np.all(labels[:, num - forced :] == 1)
    assert labels[:, : num - forced].mean() < 0.05


def test_sampler_errors(key):
    subject = make_phantom((10, 10, 10))
    with pytest.raises(ValueError, match="pad"):
        UniformSampler((11, 4, 4))(key, subject, 2)
    with pytest.raises(ValueError, match="patch_size"):
        UniformSampler((4, 4))
    with pytest.raises(ValueError, match="patch_size"):
        UniformSampler(0)
    with pytest.raises(ValueError, match="num_patches"):
        UniformSampler(4)(key, subject, 0)
    with pytest.raises(ValueError, match="label_probabilities"):
        LabelSampler(4, label_probabilities={1: -1.0})
    with pytest.raises(ValueError, match="label_probabilities"):
        LabelSampler(4, label_probabilities={0: 0.0})
    with pytest.raises(ValueError, match="foreground_fraction"):
        LabelSampler(4, foreground_fraction=1.5)
    with pytest.raises(KeyError, match="missing"):
        LabelSampler(4, "missing")(key, subject, 2)
    with pytest.raises(TypeError, match="Subject"):
        UniformSampler(4)(key, subject["t1"], 2)


# --- grid -----------------------------------------------------------------------------------------


def test_grid_locations_fixtures():
    np.testing.assert_array_equal(grid_locations((10, 4, 4), (4, 4, 4), (1, 0, 0))[:, 0], [0, 3, 6])
    np.testing.assert_array_equal(grid_locations((9, 4, 4), 4, 0)[:, 0], [0, 4, 5])
    np.testing.assert_array_equal(grid_locations((8, 4, 4), 4, 2)[:, 0], [0, 2, 4])
    np.testing.assert_array_equal(grid_locations((4, 4, 4), 4, 0), [[0, 0, 0]])
    locations = grid_locations((7, 6, 5), (3, 4, 5), (1, 2, 0))
    # per axis: x 0,2,4 ; y 0,2 ; z 0, in C order
    expected = [[x, y, 0] for x in (0, 2, 4) for y in (0, 2)]
    np.testing.assert_array_equal(locations, expected)


@pytest.mark.parametrize("shape,patch,overlap", [((17, 9, 12), (5, 4, 12), (2, 1, 0)), ((30, 8, 7), 7, 3)])
def test_grid_covers_volume(shape, patch, overlap):
    locations = grid_locations(shape, patch, overlap)
    patch = np.broadcast_to(patch, 3)
    covered = np.zeros(shape, bool)
    for start in locations:
        covered[tuple(slice(s, s + p) for s, p in zip(start, patch))] = True
    assert covered.all()
    assert np.all(locations.min(0) == 0)
    np.testing.assert_array_equal(locations.max(0), np.array(shape) - patch)
    for axis in range(3):
        starts = np.unique(locations[:, axis])
        stride = patch[axis] - np.broadcast_to(overlap, 3)[axis]
        assert np.all(np.diff(starts)[:-1] == stride)
        assert 0 < np.diff(starts)[-1] <= stride if len(starts) > 1 else True


def test_grid_sampler_patches(key):
    subject = make_phantom((9, 8, 6), OBLIQUE)
    sampler = GridPatchSampler((4, 4, 3), overlap=(1, 0, 0))
    patches = sampler(subject)
    locations = sampler.locations(subject.spatial_shape)
    np.testing.assert_array_equal(np.asarray(patches.metadata["location"]), locations)
    source = np.asarray(subject["t1"].data)
    for i, (x0, y0, z0, x1, y1, z1) in enumerate(locations):
        np.testing.assert_array_equal(np.asarray(patches["t1"].data[i]), source[x0:x1, y0:y1, z0:z1])


def test_grid_errors():
    with pytest.raises(ValueError, match="overlap"):
        grid_locations((10, 10, 10), 4, 4)
    with pytest.raises(ValueError, match="overlap"):
        GridPatchSampler(4, overlap=-1)
    with pytest.raises(ValueError, match="pad"):
        grid_locations((3, 10, 10), 4, 0)
    # int-or-3-ints arguments are read as everywhere else in jmed (jmed._checks)
    for patch, match in [
        ((4, 4), r"patch_size must be an int or 3 ints, got \(4, 4\)"),
        (4.0, "patch_size must be an int or 3 ints, got 4.0"),
        (True, "patch_size must be an int or 3 ints, got True"),
        ((4, 0, 4), r"patch_size values must be >= 1, got \(4, 0, 4\)"),
    ]:
        with pytest.raises(ValueError, match=match):
            grid_locations((10, 10, 10), patch)
    with pytest.raises(ValueError, match=r"overlap values must be >= 0, got \(1, -1, 0\)"):
        grid_locations((10, 10, 10), 4, (1, -1, 0))
    with pytest.raises(ValueError, match="overlap must be an int or 3 ints, got 1.5"):
        GridPatchSampler(4, overlap=1.5)
    np.testing.assert_array_equal(
        grid_locations(np.array([9, 4, 4]), np.int64(4), [np.int32(1), 0, 0])[:, 0], [0, 3, 5]
    )


# --- samplers are values ------------------------------------------------------------------

SAMPLER_CASES = [
    (lambda: UniformSampler(4), lambda: UniformSampler((4, 4, 5))),
    (lambda: WeightedSampler(4, "t1"), lambda: WeightedSampler(4, "seg")),
    (lambda: LabelSampler(4, "seg", {0: 1, 1: 2}), lambda: LabelSampler(4, "seg", {1: 2, 0: 1})),
    (lambda: LabelSampler(4, foreground_fraction=0.5), lambda: LabelSampler(4, foreground_fraction=0.25)),
    (lambda: GridPatchSampler(4, overlap=(1, 1, 1)), lambda: GridPatchSampler(4, overlap=(1, 1, 2))),
]


@pytest.mark.parametrize("case", range(len(SAMPLER_CASES)))
def test_equal_samplers_are_equal_values(case):
    make_a, make_b = SAMPLER_CASES[case]
    a, a2, b = make_a(), make_a(), make_b()
    assert a is not a2 and a == a2 and hash(a) == hash(a2) and repr(a) == repr(a2)
    assert transform_key(a) == transform_key(a2) != transform_key(b)
    assert a != b and len({a, a2, b}) == 2
    assert "0x" not in repr(a)
    assert pickle.loads(pickle.dumps(a)) == a
    # the same numbers as a list or a tuple are the same configuration
    assert GridPatchSampler(4, overlap=[1, 1, 1]) == GridPatchSampler(4, overlap=(1, 1, 1))
    assert UniformSampler(4) == UniformSampler((4, 4, 4)) != UniformSampler(5)


def test_samplers_are_immutable():
    sampler = LabelSampler(4, "seg", {0: 1, 1: 2})
    for name in ("patch_size", "label_probabilities", "new"):
        with pytest.raises(AttributeError, match="LabelSampler is immutable"):
            setattr(sampler, name, None)
    with pytest.raises(AttributeError, match="immutable"):
        del sampler.label_name
    with pytest.raises(AttributeError, match="GridPatchSampler is immutable"):
        GridPatchSampler(4).overlap = 1
    assert sampler.patch_size == (4, 4, 4) and sampler.label_probabilities == {0: 1.0, 1: 2.0}


@contextlib.contextmanager
def _count_compiles(function_name):
    """Counts XLA compilations of ``jit(function_name)`` (JAX's monitoring events)."""
    names, counter = [], []

    def listener(event, duration, **kwargs):
        if event.endswith("backend_compile_duration"):
            names.append(str(kwargs.get("fun_name", function_name)))

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield counter
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
        counter.append(sum(function_name in n for n in names))


def test_equal_samplers_share_one_compiled_program():
    subject = make_phantom((12, 10, 9))
    key = jax.random.key(3)
    with _count_compiles("_sample_jit") as first:
        expected = LabelSampler(4, "seg", {0: 1, 1: 2, 2: 3})(key, subject, 3)
    with _count_compiles("_sample_jit") as again:
        out = LabelSampler(4, "seg", {0: 1, 1: 2, 2: 3})(key, subject, 3)
    with _count_compiles("_sample_jit") as other:
        LabelSampler(4, "seg", {0: 1, 1: 2, 2: 4})(key, subject, 3)
    assert (first[0], again[0], other[0]) == (1, 0, 1)
    np.testing.assert_array_equal(
        np.asarray(out.metadata["location"]), np.asarray(expected.metadata["location"])
    )
