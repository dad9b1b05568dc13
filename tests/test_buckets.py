"""Shape buckets: planning, padding, and padded volumes giving the unpadded results.

Transforms' own padded-vs-unpadded cases live in ``test_buckets_transforms.py``; here the
kernels, the spatial transforms, the samplers, preprocessing kernels and the loader.
"""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import make_phantom

import jmed
from jmed import buckets
from jmed import transforms as T
from jmed.ops.interpolation import pad_value_for, resample

OBLIQUE = np.array(
    [[0.0, -1.2, 0.1, 30.0], [0.9, 0.0, 0.1, -20.0], [0.0, 0.05, 1.5, 5.0], [0.0, 0.0, 0.0, 1.0]]
)


# --- planning --------------------------------------------------------------------------------


def test_plan_buckets_hand_computed():
    # two clusters: one bucket each, rounded up to multiples of 8
    shapes = [(100, 100, 100), (101, 99, 100), (200, 210, 190), (198, 205, 190)]
    assert buckets.plan_buckets(shapes) == [(104, 104, 104), (200, 216, 192)]
    # one bucket when asked
    assert buckets.plan_buckets(shapes, max_buckets=1) == [(200, 216, 192)]
    # near-equal shapes: a second bucket saves little, so one
    assert buckets.plan_buckets([(100, 100, 100), (96, 100, 100)], min_gain=0.25) == [(104, 104, 104)]
    # a 2D slice keeps its axis of size 1
    assert buckets.plan_buckets([(50, 60, 1)], multiple=16) == [(64, 64, 1)]
    # every shape fits its bucket
    rng = np.random.default_rng(0)
    many = [tuple(int(v) for v in rng.integers(60, 200, 3)) for _ in range(50)]
    planned = buckets.plan_buckets(many, max_buckets=4, min_gain=0.0)
    assert 1 <= len(planned) <= 4
    assert all(buckets.bucket_for(s, planned) is not None for s in many)
    total = sum(np.prod(buckets.bucket_for(s, planned)) for s in many)
    single = len(many) * np.prod(buckets.plan_buckets(many, max_buckets=1)[0])
    assert total < single


def test_bucket_for_smallest_holding_bucket():
    choices = [(96, 96, 96), (128, 128, 96), (64, 200, 64)]
    assert buckets.bucket_for((90, 100, 80), choices) == (128, 128, 96)
    assert buckets.bucket_for((60, 60, 60), choices) == (64, 200, 64)  # fewest voxels
    assert buckets.bucket_for((60, 60, 70), choices) == (96, 96, 96)
    assert buckets.bucket_for((200, 10, 10), choices) is None


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(shapes=[]), "at least one shape"),
        (dict(shapes=[(10, 10)]), "shapes\\[0\\] must be 3 positive ints"),
        (dict(shapes=[(10, 0, 10)]), "shapes\\[0\\]"),
        (dict(shapes=[(10, 10, 10)], max_buckets=0), "max_buckets"),
        (dict(shapes=[(10, 10, 10)], multiple=0), "multiple"),
        (dict(shapes=[(10, 10, 10)], min_gain=2), "min_gain"),
    ],
)
def test_plan_buckets_bad_input(kwargs, message):
    with pytest.raises(ValueError, match=message):
        buckets.plan_buckets(**kwargs)


def test_pad_subject_and_crop_back():
    s = make_phantom((11, 9, 7), OBLIQUE)
    p = buckets.pad_subject(s, (16, 12, 8))
    assert p.spatial_shape == (16, 12, 8)
    np.testing.assert_array_equal(np.asarray(p.extent), [11, 9, 7])
    np.testing.assert_array_equal(p["t1"].affine, s["t1"].affine)
    t1 = np.asarray(s["t1"].data)
    # intensity padded with its minimum, labels with 0; the valid part is the original
    np.testing.assert_array_equal(np.asarray(p["t1"].data)[11:], t1.min())
    np.testing.assert_array_equal(np.asarray(p["seg"].data)[:, 9:], 0)
    back = buckets.crop_to_extent(p)
    for name in s:
        np.testing.assert_array_equal(np.asarray(back[name].data), np.asarray(s[name].data))
        assert back[name].extent is None
    with pytest.raises(ValueError, match="does not fit in the bucket"):
        buckets.pad_subject(s, (10, 12, 8))
    with pytest.raises(ValueError, match="already has an extent"):
        buckets.pad_subject(p, (16, 12, 8))
    with pytest.raises(ValueError, match="extent must be 3 integers"):
        jmed.Image(np.zeros((4, 4, 4, 1)), extent=[5, 4, 4])


# --- kernels ---------------------------------------------------------------------------------


def _oblique_matrix():
    m = np.eye(4)
    m[:3, :3] = [[0.9, 0.1, 0.0], [-0.1, 0.95, 0.05], [0.02, 0.0, 1.1]]
    m[:3, 3] = [1.0, -0.5, 0.7]
    return m


@pytest.mark.parametrize("order", [0, 1, "partial_volume"])
@pytest.mark.parametrize("pad_mode", ["constant", "edge"])
def test_resample_with_extent_equals_resampling_the_valid_part(order, pad_mode):
    rng = np.random.default_rng(0)
    data = rng.random((93, 11, 9, 2)).astype(np.float32)
    if order == "partial_volume":
        data = rng.integers(0, 4, (93, 11, 9, 2)).astype(np.int32)
    padded = buckets.pad_array(data, (96, 16, 12), 7)
    matrix = _oblique_matrix()

    def run(x, extent=None):
        return resample(x, matrix, (93, 11, 9), order=order, pad_mode=pad_mode, pad_value=-1, extent=extent)

    expected = jax.jit(run)(data)
    actual = jax.jit(run)(padded, np.array([93, 11, 9], np.int32))
    np.testing.assert_array_equal(np.asarray(actual), np.asarray(expected))
    assert actual.dtype == expected.dtype


@pytest.mark.parametrize("rule", ["minimum", "mean", "otsu"])
def test_pad_value_rules_read_the_valid_part(rule):
    rng = np.random.default_rng(1)
    data = rng.random((13, 11, 9, 2)).astype(np.float32) * 10
    padded = buckets.pad_array(data, (16, 16, 12), -50.0)
    expected = pad_value_for(data, rule)
    actual = jax.jit(lambda x, e: pad_value_for(x, rule, e))(padded, np.array([13, 11, 9]))
    np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), rtol=1e-5)
    if rule == "minimum":
        np.testing.assert_allclose(np.asarray(actual), data.reshape(-1, 2).min(0))
    if rule == "mean":
        border = np.ones((13, 11, 9), bool)
        border[1:-1, 1:-1, 1:-1] = False
        np.testing.assert_allclose(np.asarray(actual), data[border].mean(0), rtol=1e-5)


def test_noise_of_a_padded_array_equals_the_unpadded_noise():
    key = jax.random.key(3)
    expected = jmed.ops.noise.normal(key, (13, 11, 9, 2))
    padded = jax.jit(lambda k, e: jmed.ops.noise.normal(k, (16, 16, 12, 2), extent=e))(
        key, np.array([13, 11, 9])
    )
    np.testing.assert_array_equal(np.asarray(padded)[:13, :11, :9], np.asarray(expected))


# --- transforms and samplers -----------------------------------------------------------------

EXACT = {"flip", "flip-anatomical", "affine", "affine-otsu-pv", "affine-edge", "noise"}
SPATIAL = {
    "flip": T.RandomFlip(axes=(0, 1, 2), flip_probability=0.7),
    "flip-anatomical": T.RandomFlip(axes=("LR", "AP"), flip_probability=0.7),
    "affine": T.RandomAffine(scales=0.2, degrees=20, translation=5),
    "affine-otsu-pv": T.RandomAffine(default_pad_value="otsu", label_interpolation="partial_volume"),
    "affine-edge": T.RandomAffine(degrees=15, default_pad_value="edge"),
    "elastic": T.RandomElasticDeformation(max_displacement=5),
    "flip-elastic-affine": T.Compose(
        [
            T.RandomFlip(axes=(0, 1, 2)),
            T.RandomElasticDeformation(max_displacement=4),
            T.RandomAffine(degrees=15),
        ]
    ),
    "affine-elastic": T.Compose([T.RandomAffine(degrees=15), T.RandomElasticDeformation(max_displacement=4)]),
    "noise": T.RandomNoise(std=2.0),
}


def _compare(actual, expected, name):
    for image in expected:
        a, e = np.asarray(actual[image].data), np.asarray(expected[image].data)
        assert a.dtype == e.dtype, (name, image)
        if name in EXACT or expected[image].is_label:
            # exact: the same coordinates and values as unpadded
            np.testing.assert_array_equal(a, e, err_msg=f"{name} {image}")
        else:
            # the B-spline weights of a traced extent round differently in the last bit
            off = np.abs(a.astype(float) - e) > 2e-3
            assert not off.any(), (name, image, int(off.sum()))


def test_unfused_affine_then_elastic_on_a_padded_volume_under_jit():
    # the elastic resampling reads the affine's output, recomputed inside its own fusions;
    # these keys differed from eager at 2-6 voxels by up to 21 (on [0, 300] data) when the
    # gathers and the weights of a recomputed coordinate disagreed on its neighbours
    # (see jmed.ops.interpolation)
    transform = T.Compose([T.RandomAffine(degrees=15), T.RandomElasticDeformation()], fuse=False)
    s = make_phantom((41, 37, 29), OBLIQUE)
    p = buckets.pad_subject(s, (48, 48, 40))
    for seed in (1, 14, 16):
        key = jax.random.key(seed)
        expected = transform(key, s)
        actual = buckets.crop_to_extent(jax.jit(transform)(key, p))
        np.testing.assert_allclose(np.asarray(actual["t1"].data), np.asarray(expected["t1"].data), atol=2e-3)


@pytest.mark.parametrize("name", sorted(SPATIAL))
def test_padded_transforms_equal_unpadded(name):
    transform = SPATIAL[name]
    assert buckets.is_padding_aware(transform)
    s = make_phantom((41, 37, 29), OBLIQUE)
    p = buckets.pad_subject(s, (48, 48, 40))
    for seed in range(3):
        key = jax.random.key(seed)
        expected = jax.jit(transform)(key, s)
        actual = jax.jit(transform)(key, p)
        np.testing.assert_array_equal(np.asarray(actual.extent), [41, 37, 29])
        _compare(buckets.crop_to_extent(actual), expected, name)


def test_padded_transforms_under_vmap_with_different_extents():
    # one bucket, two subjects of different shapes (one axis >= 90 voxels)
    transform = SPATIAL["flip-elastic-affine"]
    shapes = [(91, 33, 27), (84, 40, 31)]
    subjects = [make_phantom(shape, OBLIQUE, seed=i) for i, shape in enumerate(shapes)]
    batch = jmed.stack([buckets.pad_subject(s, (96, 40, 32)) for s in subjects])
    keys = jnp.stack([jax.random.key(5), jax.random.key(6)])
    out = jax.jit(jax.vmap(transform))(keys, batch)
    for i, (s, item) in enumerate(zip(subjects, jmed.unstack(out))):
        expected = jax.jit(transform)(keys[i], s)
        _compare(buckets.crop_to_extent(item), expected, "elastic")


SAMPLERS = {
    "uniform": jmed.UniformSampler((9, 7, 5)),
    "label": jmed.LabelSampler((9, 7, 5), "seg", {0: 1, 1: 2, 2: 3}),
    "foreground": jmed.LabelSampler(9, "seg"),
    "nnunet": jmed.LabelSampler(9, "seg", foreground_fraction=0.5),
}


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_padded_samplers_draw_the_unpadded_patches(name):
    sampler = SAMPLERS[name]
    s = make_phantom((41, 37, 29))
    p = buckets.pad_subject(s, (48, 48, 40))
    for seed in range(4):
        key = jax.random.key(seed)
        expected, actual = sampler(key, s, 16), sampler(key, p, 16)
        np.testing.assert_array_equal(actual.metadata["location"], expected.metadata["location"])
        for image in s:
            np.testing.assert_array_equal(np.asarray(actual[image].data), np.asarray(expected[image].data))
            np.testing.assert_array_equal(
                np.asarray(actual[image].affine), np.asarray(expected[image].affine)
            )


def test_weighted_sampler_stays_inside_the_extent():
    # the draw follows the same distribution; the padded map's blocks differ, so the
    # voxel drawn for a key may differ: check the support instead
    s = make_phantom((41, 37, 29))
    weights = np.zeros((41, 37, 29), np.float32)
    weights[30:, 30:, 20:] = 1.0  # only near the far corner of the valid region
    s = s.replace({"w": jmed.ScalarImage(weights)})
    p = buckets.pad_subject(s, (48, 48, 40))
    sampler = jmed.WeightedSampler((9, 7, 5), "w")
    location = np.asarray(sampler(jax.random.key(0), p, 64).metadata["location"])
    centres = location[:, :3] + np.array([9, 7, 5]) // 2
    assert (location[:, 3:] <= [41, 37, 29]).all()
    assert (centres >= [30, 30, 20]).all()


# --- preprocessing kernels -------------------------------------------------------------------


def test_eager_resample_on_kernel_buckets_equals_exact():
    s = make_phantom((41, 37, 29), OBLIQUE)
    pre = T.Compose([T.ToCanonical(), T.Resample(1.1)])
    expected = pre(s)
    with buckets.recording_kernel_shapes() as recorded:
        pre(s)
    assert recorded and all(len(k) == 2 for k in recorded)
    with buckets.kernel_buckets([(64, 64, 64)]):
        actual = pre(s)
    for name in s:
        a, e = np.asarray(actual[name].data), np.asarray(expected[name].data)
        assert a.shape == e.shape and a.dtype == e.dtype
        np.testing.assert_allclose(a, e, rtol=1e-6, atol=1e-4)
        np.testing.assert_array_equal(actual[name].affine, expected[name].affine)


# --- the loader ------------------------------------------------------------------------------


def _write_subjects(folder, shapes):
    records = []
    for i, shape in enumerate(shapes):
        affine = np.diag([1.0 + 0.1 * i, 0.9, 1.2, 1.0])
        if i % 2:
            affine[0, 0] *= -1  # another orientation
        s = make_phantom(shape, affine, seed=i)
        t1, seg = os.path.join(folder, f"t1_{i}.nii.gz"), os.path.join(folder, f"seg_{i}.nii.gz")
        jmed.save(s["t1"], t1)
        jmed.save(s["seg"], seg)
        records.append({"t1": t1, "seg": seg})
    return records


class _Compilations:
    def __init__(self):
        self.count = 0
        jax.monitoring.register_event_duration_secs_listener(self)

    def __call__(self, event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            self.count += 1


_COMPILATIONS = None


def _compilations():
    global _COMPILATIONS
    if _COMPILATIONS is None:
        _COMPILATIONS = _Compilations()
    return _COMPILATIONS


def test_queue_buckets_give_the_unbucketed_patches_with_fewer_compilations(tmp_path):
    shapes = [(40 + 3 * i, 44 - 2 * i, 36 + i) for i in range(6)]
    records = _write_subjects(tmp_path, shapes)
    pre = T.Compose([T.ToCanonical(), T.Resample(1.1)])
    aug = T.Compose(
        [
            T.RandomFlip(),
            T.RandomAffine(degrees=10),
            T.RandomElasticDeformation(max_displacement=3),
            T.RandomNoise(),
        ]
    )
    counter = _compilations()
    batches, counts = {}, {}
    for mode in ("auto", None):
        start = counter.count
        queue = jmed.Queue(
            records,
            jmed.LabelSampler(16, "seg"),
            4,
            8,
            batch_size=4,
            label_names="seg",
            preprocessing=pre,
            augmentation=aug,
            buckets=mode,
            max_buckets=2,
            compilation_cache_dir=None,
            seed=1,
        )
        batches[mode] = list(queue)
        counts[mode] = counter.count - start
        if mode == "auto":
            plan = queue.shape_plan
            assert 1 <= len(plan.volume_buckets) <= 2
    # 6 shapes: the unbucketed loader compiles augmentation and resampling per shape
    assert counts["auto"] <= 2 + 2 * 2 * 2
    assert counts[None] >= 6 + 6
    assert counts["auto"] < counts[None]
    assert len(batches["auto"]) == len(batches[None]) == 6
    for a, b in zip(batches["auto"], batches[None]):
        np.testing.assert_array_equal(a.metadata["location"], b.metadata["location"])
        np.testing.assert_array_equal(a.metadata["subject_index"], b.metadata["subject_index"])
        np.testing.assert_array_equal(a["seg"].data, b["seg"].data)
        np.testing.assert_allclose(a["t1"].data, b["t1"].data, rtol=0, atol=2e-3)
        assert a["t1"].data.shape == (4, 16, 16, 16, 1)


def test_queue_names_the_subject_whose_shape_does_not_fit(tmp_path):
    records = _write_subjects(tmp_path, [(20, 20, 20), (12, 20, 20)])
    sampler = jmed.UniformSampler(16)
    queue = jmed.Queue(records, sampler, 2, 2, compilation_cache_dir=None, label_names="seg")
    with pytest.raises(
        ValueError, match=r"subject 1 \(seg: .*seg_1.nii.gz, t1: .*t1_1.nii.gz\).*smaller than the patch"
    ):
        list(queue)
    queue = jmed.Queue(
        records,
        jmed.UniformSampler(8),
        2,
        2,
        compilation_cache_dir=None,
        buckets=[(16, 20, 20)],
        label_names="seg",
    )
    with pytest.raises(ValueError, match=r"subject 0 \(.*t1_0.nii.gz\).*fits none of the shape buckets"):
        list(queue)
    skipping = jmed.Queue(
        records,
        sampler,
        2,
        2,
        compilation_cache_dir=None,
        skip_errors=True,
        label_names="seg",
        shuffle_subjects=False,
    )
    batches = list(skipping)
    assert [int(b.metadata["subject_index"][0]) for b in batches] == [0, 0]  # 2 patches of subject 0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(buckets="some"), "buckets must be 'auto', None or a sequence of shapes"),
        (dict(buckets=[(10, 10)]), r"buckets\[0\] must be 3 positive ints"),
        (dict(max_buckets=0), "max_buckets must be an int >= 1"),
        (dict(compilation_cache_dir=3), "compilation_cache_dir must be a folder"),
    ],
)
def test_queue_bucket_options_are_checked(tmp_path, kwargs, message):
    records = _write_subjects(tmp_path, [(20, 20, 20)])
    with pytest.raises((ValueError, TypeError), match=message):
        jmed.Queue(records, jmed.UniformSampler(8), 2, 2, **kwargs)


def test_unpredictable_preprocessing_falls_back_to_multiples_of_32(tmp_path, caplog):
    records = _write_subjects(tmp_path, [(20, 21, 22), (23, 20, 20)])
    pre = T.CropForeground(mask_name="seg")
    queue = jmed.Queue(
        records,
        jmed.UniformSampler(4),
        2,
        2,
        preprocessing=pre,
        label_names="seg",
        compilation_cache_dir=None,
    )
    plan = queue.shape_plan
    assert plan.volume_buckets == () and plan.bucket((20, 33, 1)) == (32, 64, 1)
    assert "cannot predict the shape of subject 0" in caplog.text
    assert len(list(queue)) == 4  # 2 subjects x 2 patches, batches of 1


_SECOND_RUN = textwrap.dedent(
    """
    import sys, jax, numpy as np, jmed
    from jmed import transforms as T
    # backend_compile_duration is also reported for programs loaded from the cache
    events = {"compiled": 0}
    def listen(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            events["compiled"] += 1
    def hit(event, **kwargs):
        if event == "/jax/compilation_cache/cache_hits":
            events["compiled"] -= 1
    jax.monitoring.register_event_duration_secs_listener(listen)
    jax.monitoring.register_event_listener(hit)
    records = [{"t1": p, "seg": q} for p, q in zip(sys.argv[2::2], sys.argv[3::2])]
    queue = jmed.Queue(records, jmed.LabelSampler(8, "seg"), 2, 2, label_names="seg",
                       augmentation=T.Compose([T.RandomFlip(), T.RandomAffine()]),
                       compilation_cache_dir=sys.argv[1])
    batches = list(queue)
    print(events["compiled"], float(np.asarray(batches[0]["t1"].data).sum()))
    """
)


def test_compiled_programs_are_reused_by_a_second_run(tmp_path):
    records = _write_subjects(tmp_path, [(20, 21, 22), (23, 20, 20)])
    args = [sys.executable, "-c", _SECOND_RUN, str(tmp_path / "xla")]
    for record in records:
        args += [record["t1"], record["seg"]]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    first = subprocess.run(args, capture_output=True, text=True, env=env, check=True).stdout.split()
    second = subprocess.run(args, capture_output=True, text=True, env=env, check=True).stdout.split()
    assert int(first[0]) >= 1
    assert int(second[0]) == 0, second  # every program came from the cache
    assert first[1] == second[1]
    assert any(name.endswith(".lock") for name in os.listdir(tmp_path / "xla" / "locks"))
