import contextlib
import functools
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_trees_close, make_phantom

import jmed
import jmed.transforms as T
from jmed.transforms import (
    Compose,
    IntensityTransform,
    Lambda,
    OneOf,
    RandomApply,
    SomeOf,
    Transform,
    invert,
    replay,
    transform_key,
)


class Shift(IntensityTransform):
    """Toy random transform: adds U(0, 1) * scale to intensity images."""

    is_random = True
    invertible = True

    def __init__(self, scale=1.0, **kw):
        super().__init__(**kw)
        self.scale = scale

    def sample(self, key, subject):
        return jax.random.uniform(key, ()) * self.scale

    def apply_image(self, image, params):
        return image.replace(data=image.data + params)

    def inverse(self, subject, params):
        return subject.replace(
            {n: subject[n].replace(data=subject[n].data - params) for n in self.selected(subject)}
        )


def _t1(subject):
    return np.asarray(subject["t1"].data)


def test_shift_three_ways(run, key, phantom):
    out = run(Shift(), key, phantom)
    delta = _t1(out) - phantom["t1"].data
    assert np.ptp(delta) < 1e-4 and 0 < delta.mean() < 1
    np.testing.assert_array_equal(np.asarray(out["seg"].data), phantom["seg"].data)  # labels untouched


def test_same_key_same_output_different_keys_differ(phantom):
    t = Compose([Shift(), OneOf([Shift(10.0), Shift(100.0)]), RandomApply(Shift(1000.0), p=0.5)])
    a = t(jax.random.key(3), phantom)
    b = t(jax.random.key(3), phantom)
    np.testing.assert_array_equal(_t1(a), _t1(b))
    shifts = {
        round(float(_t1(t(jax.random.key(i), phantom))[0, 0, 0, 0] - phantom["t1"].data[0, 0, 0, 0]), -1)
        for i in range(20)
    }
    assert len(shifts) > 4


@pytest.mark.parametrize(
    "make",
    [
        lambda: Compose([Shift(), Shift(2.0)]),
        lambda: OneOf([Shift(10.0), Shift(100.0)], probabilities=[0.3, 0.7]),
        lambda: RandomApply(Shift(), p=0.5),
        lambda: SomeOf([Shift(1.0), Shift(10.0), Shift(100.0)], num_transforms=(1, 2)),
    ],
)
def test_composition_eager_jit_vmap(run, make, phantom):
    t = make()
    for seed in range(3):
        # jit and vmap: run compares with the eager result; eager: the same key again
        out = run(t, jax.random.key(seed), phantom)
        assert_trees_close(out, t(jax.random.key(seed), phantom))


def test_oneof_frequencies_follow_weights(phantom):
    t = OneOf({Shift(0.0): 1.0, Lambda(lambda x: x + 5.0): 3.0})
    small = make_phantom((4, 4, 4))
    f = jax.jit(jax.vmap(lambda k: t(k, small)["t1"].data[0, 0, 0, 0] - small["t1"].data[0, 0, 0, 0]))
    deltas = np.asarray(f(jax.random.split(jax.random.key(0), 2000)))
    assert abs((deltas > 1).mean() - 0.75) < 0.04


def test_random_apply_and_someof_counts():
    small = make_phantom((4, 4, 4))
    never = RandomApply(Shift(), p=0.0)(jax.random.key(0), small)
    np.testing.assert_array_equal(_t1(never), _t1(small))
    t = SomeOf(
        [Lambda(lambda x: x + 1.0), Lambda(lambda x: x + 10.0), Lambda(lambda x: x + 100.0)], num_transforms=2
    )
    deltas = jax.vmap(lambda k: t(k, small)["t1"].data[0, 0, 0, 0])(jax.random.split(jax.random.key(1), 300))
    deltas = np.round(np.asarray(deltas) - small["t1"].data[0, 0, 0, 0]).astype(int)
    assert set(deltas) == {11, 101, 110}


def test_include_exclude_and_kinds():
    s = jmed.Subject(
        a=jmed.ScalarImage(np.zeros((2, 2, 2), np.float32)),
        b=jmed.ScalarImage(np.zeros((2, 2, 2), np.float32)),
        seg=jmed.LabelMap(np.zeros((2, 2, 2), np.int32)),
    )
    out = Lambda(lambda x: x + 1, include=["a"])(s)
    assert float(out["a"].data.max()) == 1 and float(out["b"].data.max()) == 0
    out = Lambda(lambda x: x + 1, exclude="a")(s)
    assert (
        float(out["a"].data.max()) == 0
        and float(out["b"].data.max()) == 1
        and int(out["seg"].data.max()) == 1
    )
    out = Lambda(lambda x: x + 1, kinds="label")(s)
    assert float(out["a"].data.max()) == 0 and int(out["seg"].data.max()) == 1
    with pytest.raises(KeyError, match="'flair' named in include"):
        Lambda(lambda x: x, include="flair")(s)
    with pytest.raises(ValueError, match="not both"):
        Lambda(lambda x: x, include="a", exclude="b")


def test_single_image_in_image_out():
    img = jmed.ScalarImage(np.ones((2, 3, 4), np.float32))
    out = Shift()(jax.random.key(0), img)
    assert isinstance(out, jmed.Image)
    assert 1 < float(out.data.mean()) < 2


def test_history_replay_and_invert(phantom):
    t = Compose([Shift(), RandomApply(Shift(5.0), p=1.0)])
    out = t(jax.random.key(7), phantom)
    assert len(out.history) == 1 and out.history[0][0] is t
    other = make_phantom(seed=5)
    replayed = replay(other, out.history)
    np.testing.assert_allclose(_t1(replayed) - other["t1"].data, _t1(out) - phantom["t1"].data, atol=1e-5)
    restored = invert(out)
    np.testing.assert_allclose(_t1(restored), phantom["t1"].data, atol=1e-4)
    assert restored.history == ()
    # history survives jit and records batched params under vmap
    jitted = jax.jit(lambda k, s: t(k, s))(jax.random.key(7), phantom)
    np.testing.assert_allclose(_t1(invert(jitted)), phantom["t1"].data, atol=1e-4)


def test_invert_skips_non_invertible_with_warning(phantom):
    out = Lambda(lambda x: x * 2)(phantom)
    with pytest.warns(UserWarning, match="Lambda is not invertible"):
        restored = invert(out)
    # skipped, not undone: the data stays doubled
    np.testing.assert_array_equal(np.asarray(restored["t1"].data), np.asarray(out["t1"].data))
    np.testing.assert_array_equal(np.asarray(out["t1"].data), 2 * np.asarray(phantom["t1"].data))


def test_invert_warn_false_silences_nested_steps(phantom):
    import warnings

    flip = T.RandomFlip(axes=(0,), flip_probability=1.0)
    out = Compose([flip, Lambda(lambda x: x * 2)])(jax.random.key(0), phantom)
    with pytest.warns(UserWarning, match="Lambda is not invertible"):
        invert(out)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        restored = invert(out, warn=False)
    # the flip undone, the doubling skipped
    np.testing.assert_array_equal(np.asarray(restored["t1"].data), 2 * np.asarray(phantom["t1"].data))


def test_deterministic_transforms_need_no_key():
    img = jmed.ScalarImage(np.ones((2, 2, 2), np.float32))
    assert float(Lambda(jnp.negative)(img).data.max()) == -1
    assert float(Lambda(jnp.negative)(None, img).data.max()) == -1


def test_bad_configuration(phantom):
    with pytest.raises(ValueError, match="is random"):
        Shift()(None, phantom)
    with pytest.raises(ValueError, match="p must be a probability"):
        RandomApply(Shift(), p=1.5)
    with pytest.raises(ValueError, match="probabilities must be 2 non-negative"):
        OneOf([Shift(), Shift()], probabilities=[1, -1])
    with pytest.raises(ValueError, match="num_transforms"):
        SomeOf([Shift(), Shift()], num_transforms=3)
    with pytest.raises(TypeError, match="sequence of transforms"):
        Compose(Shift())
    with pytest.raises(ValueError, match="at least one"):
        Compose([])
    with pytest.raises(TypeError, match="jmed transforms"):
        Compose([lambda x: x])
    with pytest.raises(TypeError, match="Subject or jmed.Image"):
        Lambda(jnp.negative)(None, np.zeros((2, 2, 2, 1)))
    with pytest.raises(TypeError, match="not invertible"):
        Transform().inverse(phantom, None)


# --- value semantics -------------------------------------------------------------------

LANDMARKS = np.linspace(0.0, 100.0, T.histogram_percentiles().size)
GRID = ((6, 5, 4), np.diag([1.0, 1.5, 2.0, 1.0]))


def double(x):
    return x * 2


def scale(x, factor=1.0):
    return x * factor


def head_mask(data):
    return data > 10


def pipeline_with_functions():
    """The pipeline whose ``repr`` and key a fresh process must reproduce."""
    return Compose(
        [
            T.RandomFlip(axes=(0, 1)),
            T.RandomAffine(degrees=10),
            Lambda(double, kinds="intensity"),
            Lambda(functools.partial(scale, factor=2.0)),
            Lambda(lambda x: x + 1.0),
            T.ZNormalization(masking_method=head_mask),
            T.HistogramStandardization({"t1": LANDMARKS}),
            RandomApply(T.RandomNoise(std=0.1), p=0.3),
        ]
    )


# two different configurations of every public transform class: each factory is called
# twice, the two results must be equal values, and unequal to the other factory's
VALUE_CASES = {
    "Clamp": (lambda: T.Clamp(out_min=0.0), lambda: T.Clamp(out_min=1.0)),
    "Compose": (
        lambda: Compose([T.RandomFlip(axes=0), T.RandomAffine(), T.RandomNoise()]),
        lambda: Compose([T.RandomFlip(axes=0), T.RandomAffine(), T.RandomNoise()], fuse=False),
    ),
    "CopyAffine": (lambda: T.CopyAffine("t1"), lambda: T.CopyAffine("seg")),
    "Crop": (lambda: T.Crop(1), lambda: T.Crop((1, 0, 0, 0, 0, 0))),
    "CropForeground": (lambda: T.CropForeground(margin=1), lambda: T.CropForeground(margin=(1, 2, 1))),
    "CropOrPad": (lambda: T.CropOrPad(8), lambda: T.CropOrPad(8, padding_mode="edge")),
    "EnsureShapeMultiple": (
        lambda: T.EnsureShapeMultiple(4),
        lambda: T.EnsureShapeMultiple(4, method="crop"),
    ),
    "FillHoles": (lambda: T.FillHoles(), lambda: T.FillHoles(connectivity=26)),
    "HistogramStandardization": (
        lambda: T.HistogramStandardization(LANDMARKS.copy()),
        lambda: T.HistogramStandardization(LANDMARKS * 2),
    ),
    "KeepLargestComponent": (lambda: T.KeepLargestComponent(), lambda: T.KeepLargestComponent(labels=[1])),
    "Lambda": (lambda: Lambda(double), lambda: Lambda(double, kinds="intensity")),
    "Mask": (lambda: T.Mask("seg"), lambda: T.Mask(("seg", [1, 2]))),
    "OneHot": (lambda: T.OneHot(3), lambda: T.OneHot(3, dtype=jnp.float32)),
    "OneOf": (
        lambda: OneOf([T.RandomNoise(), T.RandomGamma()]),
        lambda: OneOf([T.RandomNoise(), T.RandomGamma()], probabilities=[0.3, 0.7]),
    ),
    "Pad": (lambda: T.Pad(2), lambda: T.Pad(2, padding_mode="reflect")),
    "RandomAffine": (lambda: T.RandomAffine(degrees=5), lambda: T.RandomAffine(degrees=(0, 0, 5))),
    "RandomAnisotropy": (lambda: T.RandomAnisotropy(), lambda: T.RandomAnisotropy(axes=2)),
    "RandomApply": (lambda: RandomApply(T.RandomNoise(), p=0.5), lambda: RandomApply(T.RandomNoise(), p=0.6)),
    "RandomBiasField": (lambda: T.RandomBiasField(), lambda: T.RandomBiasField(order=2)),
    "RandomBlur": (lambda: T.RandomBlur(), lambda: T.RandomBlur(units="voxels")),
    "RandomBrightness": (lambda: T.RandomBrightness(), lambda: T.RandomBrightness(multiplier=0.1)),
    "RandomCoarseDropout": (lambda: T.RandomCoarseDropout(), lambda: T.RandomCoarseDropout(fill_value=1.0)),
    "RandomContrast": (lambda: T.RandomContrast(), lambda: T.RandomContrast(preserve_range=False)),
    "RandomElasticDeformation": (
        lambda: T.RandomElasticDeformation(),
        lambda: T.RandomElasticDeformation(locked_borders=1),
    ),
    "RandomFlip": (lambda: T.RandomFlip(), lambda: T.RandomFlip(axes=1)),
    "RandomGamma": (lambda: T.RandomGamma(), lambda: T.RandomGamma(invert=True)),
    "RandomGhosting": (lambda: T.RandomGhosting(), lambda: T.RandomGhosting(restore=0.02)),
    "RandomLabelsToImage": (
        lambda: T.RandomLabelsToImage("seg"),
        lambda: T.RandomLabelsToImage("seg", mean=[(0.0, 0.1), 0.5]),
    ),
    "RandomMotion": (lambda: T.RandomMotion(), lambda: T.RandomMotion(phase_encoding_axis=0)),
    "RandomNoise": (lambda: T.RandomNoise(), lambda: T.RandomNoise(include="t1")),
    "RandomRot90": (lambda: T.RandomRot90(), lambda: T.RandomRot90(axes=(1, 2))),
    "RandomSpike": (lambda: T.RandomSpike(), lambda: T.RandomSpike(num_spikes=2)),
    "RandomSwap": (lambda: T.RandomSwap(), lambda: T.RandomSwap(num_iterations=10)),
    "RemapLabels": (lambda: T.RemapLabels({1: 2, 2: 1}), lambda: T.RemapLabels({1: 2})),
    "RemoveLabels": (lambda: T.RemoveLabels([2]), lambda: T.RemoveLabels([2], background_label=1)),
    "RemoveSmallObjects": (lambda: T.RemoveSmallObjects(2), lambda: T.RemoveSmallObjects(3)),
    "Reorient": (lambda: T.Reorient("LPS"), lambda: T.Reorient("RAS")),
    "Resample": (lambda: T.Resample(GRID), lambda: T.Resample(GRID, antialias=True)),
    "RescaleIntensity": (lambda: T.RescaleIntensity(), lambda: T.RescaleIntensity(percentiles=(1, 99))),
    "Resize": (lambda: T.Resize(8), lambda: T.Resize(8, image_interpolation="nearest")),
    "SequentialLabels": (lambda: T.SequentialLabels(), lambda: T.SequentialLabels(max_label=5)),
    "SomeOf": (
        lambda: SomeOf([T.RandomNoise(), T.RandomGamma()]),
        lambda: SomeOf([T.RandomNoise(), T.RandomGamma()], num_transforms=1),
    ),
    "Spatial": (
        lambda: T.Spatial([T.RandomFlip(), T.RandomAffine()], output_shape=(8, 8, 8)),
        lambda: T.Spatial([T.RandomFlip(), T.RandomAffine()], output_shape=(8, 8, 8), crop="random"),
    ),
    "ToCanonical": (lambda: T.ToCanonical(), lambda: T.ToCanonical(exclude="seg")),
    "ZNormalization": (
        lambda: T.ZNormalization(masking_method=head_mask),
        lambda: T.ZNormalization(masking_method="seg"),
    ),
}
ABSTRACT_TRANSFORMS = {
    "IntensityTransform",
    "LabelTransform",
    "RandomTransform",
    "SpatialTransform",
    "Transform",
}


def test_every_transform_has_a_value_case():
    names = {n for n in T.__all__ if isinstance(getattr(T, n), type) and issubclass(getattr(T, n), Transform)}
    assert names - ABSTRACT_TRANSFORMS == set(VALUE_CASES)


def assert_same_value(a, b):
    assert a is not b
    assert a == b and not a != b
    assert hash(a) == hash(b)
    assert repr(a) == repr(b)
    assert transform_key(a) == transform_key(b)


@pytest.mark.parametrize("name", sorted(VALUE_CASES))
def test_equal_configurations_are_equal_values(name):
    make_a, make_b = VALUE_CASES[name]
    a, b = make_a(), make_b()
    assert type(a).__name__ == name
    assert_same_value(a, make_a())
    assert_same_value(b, make_b())
    assert a != b and not a == b
    assert transform_key(a) != transform_key(b)
    assert len({a, make_a(), b, make_b()}) == 2
    assert "0x" not in repr(a) + repr(b)


def test_presets_are_equal_values():
    assert_same_value(T.nnunet_augmentation(), T.nnunet_augmentation())
    assert_same_value(T.nnunet_intensity_augmentation(), T.nnunet_intensity_augmentation())
    paper = functools.partial(T.torchio_paper_augmentation, landmarks=LANDMARKS, target_shape=(8, 8, 8))
    assert_same_value(paper(), paper())
    assert T.nnunet_augmentation() != T.nnunet_augmentation(axes=(0, 1))
    assert paper() != paper(spacing=1.0)
    # fused spatial runs (private, derived) are values too
    stages = [s for s, _, _ in T.nnunet_augmentation()._stages if s is not None]
    stages += [s for s, _, _ in paper()._stages if s is not None]
    assert stages
    for fused in stages:
        assert fused == type(fused)(fused.transforms) and hash(fused) == hash(type(fused)(fused.transforms))


def test_values_of_different_types_or_numbers_differ():
    # same public attributes, other class: different behaviour
    assert T.RandomBrightness() != T.RandomContrast()
    assert T.IntensityTransform() != T.Transform() and T.Transform() == T.Transform()
    # weakly typed Python ints and floats (and numpy scalars) trace to different programs
    assert Lambda(functools.partial(scale, factor=2)) != Lambda(functools.partial(scale, factor=2.0))
    assert Lambda(functools.partial(scale, factor=np.float32(2))) != Lambda(
        functools.partial(scale, factor=2.0)
    )
    assert Lambda(functools.partial(scale, factor=True)) != Lambda(functools.partial(scale, factor=1))
    assert Lambda(functools.partial(scale, factor=np.float64(2))) != Lambda(
        functools.partial(scale, factor=2.0)
    )
    nan = functools.partial(scale, factor=float("nan"))
    assert Lambda(nan) == Lambda(functools.partial(scale, factor=float("nan")))
    # a child whose configuration differs makes the parents differ
    assert Compose([T.RandomNoise(std=0.1)]) != Compose([T.RandomNoise(std=0.2)])
    # list and tuple configurations are the same configuration
    assert T.RandomAnisotropy(axes=[0, 1]) == T.RandomAnisotropy(axes=(0, 1))
    # arrays count by value, dtype and shape
    h = T.HistogramStandardization(LANDMARKS)
    assert h == T.HistogramStandardization(LANDMARKS.astype(np.float64).copy())
    assert h != T.HistogramStandardization(LANDMARKS + 1e-9)
    assert make_lambda(np.ones(3)) != make_lambda(np.ones(3, np.float32))
    assert make_lambda(np.ones(3)) != make_lambda(np.ones((3, 1)))


def make_lambda(factor):
    return Lambda(lambda x: x * factor)


def test_functions_count_by_code_closure_and_defaults():
    assert Lambda(lambda x: x * 2) == Lambda(lambda x: x * 2)
    assert Lambda(lambda x: x * 2) != Lambda(lambda x: x * 3)  # constants
    assert Lambda(lambda x: jnp.sin(x)) != Lambda(lambda x: jnp.cos(x))  # names
    assert make_lambda(2.0) == make_lambda(2.0)
    assert make_lambda(2.0) != make_lambda(3.0)  # closure values
    assert make_lambda(np.ones(3)) == make_lambda(np.ones(3))
    assert make_lambda(T.RandomNoise()) == make_lambda(T.RandomNoise())  # closures over transforms

    def with_default(x, k=2.0):
        return x * k

    def with_other_default(x, k=3.0):
        return x * k

    assert Lambda(with_default) != Lambda(with_other_default)
    assert Lambda(functools.partial(scale, factor=2.0)) == Lambda(functools.partial(scale, factor=2.0))
    assert Lambda(functools.partial(scale, factor=2.0)) != Lambda(functools.partial(scale, factor=3.0))
    # library functions count by their importable name
    assert "jax.numpy.negative" in repr(Lambda(jnp.negative))
    assert Lambda(jnp.negative) == Lambda(jnp.negative) != Lambda(np.negative)


class Handle:
    """A plain object: its repr shows a memory address, nothing tells its state apart."""


def closure_over_handle():
    handle = Handle()
    return Lambda(lambda x: x if handle else -x)


def test_unstable_closure_is_equal_only_to_itself_and_refused_as_a_key():
    a, b = closure_over_handle(), closure_over_handle()
    assert a == a and hash(a) == hash(a)
    assert a != b
    assert "0x" not in repr(a) and "not stable" in repr(a)
    with pytest.raises(
        ValueError, match=r"Lambda cannot key a cache: Lambda\.function\[closure 'handle'\] is a Handle"
    ):
        transform_key(a)
    with pytest.raises(ValueError, match=r"Compose\.transforms\[1\]\.function\[closure 'handle'\]"):
        transform_key(Compose([T.RandomNoise(), a]))
    # the object's identity still works within the process (equality, jit)
    assert Compose([a]) == Compose([a]) != Compose([b])


def test_transform_key_of_functions_and_none():
    assert transform_key(None) == "None"
    assert transform_key(double) == transform_key(double)
    assert transform_key(double) != transform_key(scale)
    assert transform_key(Lambda(double)) != transform_key(Lambda(scale))


def test_repr_and_key_are_the_same_in_a_fresh_process():
    pipeline = pipeline_with_functions()
    here = Path(__file__).resolve().parent
    script = (
        "import importlib, json, sys\n"
        f"sys.path[:0] = [{str(here)!r}, {str(here.parent)!r}]\n"
        f"module = importlib.import_module({__name__!r})\n"
        "from jmed.transforms import transform_key\n"
        "p = module.pipeline_with_functions()\n"
        "print(json.dumps([repr(p), transform_key(p)]))\n"
    )
    # another hash seed: string hashes, and so set orders, differ from this process
    env = {**os.environ, "PYTHONHASHSEED": "12345", "JAX_PLATFORMS": "cpu"}
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True, timeout=300
    )
    child_repr, child_key = json.loads(out.stdout.strip().splitlines()[-1])
    assert child_repr == repr(pipeline)
    assert child_key == transform_key(pipeline)
    assert "0x" not in repr(pipeline)
    assert "test_base.double #" in repr(
        pipeline
    ) and "test_base.pipeline_with_functions.<locals>.<lambda> #" in repr(pipeline)


def test_values_are_immutable():
    shift, compose, lam = Shift(2.0), Compose([Shift(), T.RandomNoise()]), Lambda(double)
    for value, name in [(shift, "scale"), (compose, "transforms"), (compose, "_stages"), (lam, "function")]:
        before = getattr(value, name)
        with pytest.raises(AttributeError, match="immutable"):
            setattr(value, name, None)
        with pytest.raises(AttributeError, match="immutable"):
            delattr(value, name)
        assert getattr(value, name) is before
    with pytest.raises(AttributeError, match="immutable"):
        shift.new_attribute = 1
    # subclasses set their own attributes in __init__, before and after the base's
    assert shift.scale == 2.0 and compose.is_random and lam.kinds == ("intensity", "label")


def test_pickled_values_are_equal_and_recompute_their_hash():
    # pickle takes module-level functions only
    local = pipeline_with_functions()
    pipeline = Compose(
        [
            t
            for t in local.transforms
            if getattr(t, "function", None) is None or t.function != local[4].function
        ]
    )
    assert len(pipeline) == len(local) - 1
    hash(pipeline)
    state = pipeline.__getstate__()
    assert not [k for k in state if k.startswith("_value") or k == "_constructing"]
    copy = pickle.loads(pickle.dumps(pipeline))
    assert_same_value(copy, pipeline)
    with pytest.raises(AttributeError, match="immutable"):
        copy.fuse = False


@contextlib.contextmanager
def count_compiles(function_name):
    """Counts XLA compilations of ``jit(function_name)`` (JAX's monitoring events)."""
    names = []

    def listener(event, duration, **kwargs):
        if event.endswith("backend_compile_duration"):
            names.append(str(kwargs.get("fun_name", function_name)))

    jax.monitoring.register_event_duration_secs_listener(listener)
    counter = []
    try:
        yield counter
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
        counter.append(sum(function_name in n for n in names))


def test_equal_pipelines_share_one_compiled_program(phantom):
    @functools.partial(jax.jit, static_argnums=0)
    def augment_values(transform, key, subject):
        return transform(key, subject)["t1"].data

    def pipeline(std):
        return Compose(
            [T.RandomFlip(axes=(0, 1)), Lambda(double), RandomApply(T.RandomNoise(std=std), p=0.5)]
        )

    key = jax.random.key(0)
    with count_compiles("augment_values") as first:
        expected = augment_values(pipeline(0.1), key, phantom)
    with count_compiles("augment_values") as again:
        out = augment_values(pipeline(0.1), key, phantom)
    with count_compiles("augment_values") as other:
        augment_values(pipeline(0.2), key, phantom)
    assert (first[0], again[0], other[0]) == (1, 0, 1)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(expected))


def test_history_replay_and_invert_with_values(phantom):
    t = Compose([T.RandomFlip(axes=(0, 1, 2), flip_probability=1.0), Shift()])
    out = t(jax.random.key(1), phantom)
    ((recorded, params),) = out.history
    assert recorded == t and hash(recorded) == hash(t)
    replayed = replay(phantom, out.history)
    np.testing.assert_array_equal(np.asarray(replayed["t1"].data), np.asarray(out["t1"].data))
    back = invert(out)
    np.testing.assert_allclose(np.asarray(back["t1"].data), phantom["t1"].data, atol=1e-4)
    # equal transforms give equal pytree structures (the history is static)
    other = Compose([T.RandomFlip(axes=(0, 1, 2), flip_probability=1.0), Shift()])(jax.random.key(2), phantom)
    assert jax.tree.structure(out) == jax.tree.structure(other)


def test_random_apply_dtype_is_the_same_eager_and_under_jit():
    # one promotion rule: the output dtype is the promotion of the alternatives' dtypes,
    # whether or not the transform is drawn, eagerly and under jit
    from jmed import transforms as T

    image = jmed.ScalarImage(np.arange(60, dtype=np.uint8).reshape(5, 4, 3))
    subject = jmed.Subject(t1=image)
    never, always = T.RandomApply(T.RandomNoise(), p=0.0), T.RandomApply(T.RandomNoise(), p=1.0)
    for t in (never, always):
        eager = t(jax.random.key(0), subject)
        jitted = jax.jit(t)(jax.random.key(0), subject)
        assert eager.t1.data.dtype == jitted.t1.data.dtype == np.float32
        np.testing.assert_allclose(np.asarray(eager.t1.data), np.asarray(jitted.t1.data), atol=1e-5)
        np.testing.assert_allclose(np.asarray(eager.t1.affine), image.affine)
    np.testing.assert_array_equal(np.asarray(never(jax.random.key(0), subject).t1.data), image.data)


# -- the typed protocol ------------------------------------------------------------------


def _volume(shape=(10, 10, 10), seed=0):
    data = np.random.default_rng(seed).normal(size=shape).astype(np.float32)
    return jmed.Subject(t1=jmed.ScalarImage(data), seg=jmed.LabelMap((data > 0).astype(np.uint8)))


class VoxelShift(T.SpatialTransform):
    """Pulls input voxel ``p + (1, 0, 0)``: implements its own mapping only."""

    def mapping(self, params, shape, affine, *, extent=None):
        matrix = jnp.eye(4, dtype=jnp.float32).at[0, 3].set(1.0)
        return T.SpatialMapping(matrix, None, None, tuple(shape), affine)


class IgnoresGrid(VoxelShift):
    """Overrides mapping_on_grid and (wrongly) ignores the grid."""

    def mapping_on_grid(self, params, shape, affine, grid, *, extent=None):
        return self.mapping(params, shape, affine, extent=extent)


def test_spatial_base_applies_the_output_grid():
    subject = _volume()
    out = T.Spatial([VoxelShift()], output_shape=(4, 4, 4))(subject)
    assert out["t1"].spatial_shape == (4, 4, 4)
    # centred crop: offset floor((9 - 3) / 2) = 3 per axis, then the shift along axis 0
    expected = np.asarray(subject["t1"].data)[4:8, 3:7, 3:7]
    np.testing.assert_allclose(np.asarray(out["t1"].data), expected, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(out["seg"].data), np.asarray(subject["seg"].data)[4:8, 3:7, 3:7])
    # the output affine keeps world positions: output voxel 0 sits at input voxel (3, 3, 3)
    np.testing.assert_allclose(np.asarray(out["t1"].affine)[:3, 3], [3.0, 3.0, 3.0], atol=1e-6)


def test_a_mapping_that_ignores_the_grid_is_refused():
    with pytest.raises(TypeError, match=r"IgnoresGrid.mapping_on_grid .* output shape \(10, 10, 10\)"):
        T.Spatial([IgnoresGrid()], output_shape=(4, 4, 4))(_volume())


def test_elastic_on_a_grid_equals_elastic_then_crop():
    """RandomElasticDeformation evaluates its spline on the grid itself: same values as
    the full-size result cropped to the grid."""
    subject = _volume((12, 12, 12))
    elastic = T.RandomElasticDeformation(num_control_points=5, max_displacement=1.0)
    key = jax.random.key(3)
    params = elastic.sample(key, subject)
    full = elastic.apply(subject, params)
    cropped = T.Spatial([elastic], output_shape=(6, 6, 6)).apply(subject, ((params,), jnp.zeros(3)))
    np.testing.assert_allclose(
        np.asarray(cropped["t1"].data), np.asarray(full["t1"].data)[3:9, 3:9, 3:9], atol=1e-5
    )


class ForgotIsRandom(IntensityTransform):
    def sample(self, key, subject):
        return jax.random.uniform(key)

    def apply_image(self, image, params):
        return image.replace(data=image.data + params)


def test_missing_key_errors_name_the_transform():
    subject = _volume()
    with pytest.raises(T.MissingKeyError, match="RandomNoise is random and needs a JAX key"):
        T.RandomNoise().sample(None, subject)
    with pytest.raises(T.MissingKeyError, match="ForgotIsRandom.is_random is False"):
        ForgotIsRandom()(subject)
    # inside a composition the message still names the child
    with pytest.raises(T.MissingKeyError, match="ForgotIsRandom"):
        Compose([T.Clamp(), ForgotIsRandom()])(subject)
    with pytest.raises(T.MissingKeyError, match="RandomGamma: key must be a JAX key"):
        T.RandomGamma().sample(0, subject)
    with pytest.raises(ValueError, match="RandomNoise is random"):
        T.RandomNoise()(subject)
    assert isinstance(T.RandomNoise(), T.RandomTransform) and not isinstance(T.Clamp(), T.RandomTransform)


class Scale(T.RandomTransform, IntensityTransform):
    """Multiplies intensities by a factor in [1, 2): invertible image by image."""

    def sample(self, key, subject):
        return jax.random.uniform(key, minval=1.0, maxval=2.0)

    def apply_image(self, image, params):
        return image.replace(data=image.data * params)

    def inverse_image(self, image, params):
        return image.replace(data=image.data / params)


def test_inverse_image_makes_a_transform_invertible():
    assert Scale.invertible and Scale.is_random and not T.RandomNoise.invertible
    subject = _volume()
    out = Scale()(jax.random.key(0), subject)
    factor = float(out.history[-1][1])
    np.testing.assert_allclose(out["t1"].data, np.asarray(subject["t1"].data) * factor, rtol=1e-6)
    np.testing.assert_array_equal(out["seg"].data, subject["seg"].data)  # labels pass through
    np.testing.assert_allclose(invert(out)["t1"].data, subject["t1"].data, rtol=1e-6, atol=1e-6)
    # RandomBiasField's inverse comes from its inverse_image
    biased = T.RandomBiasField(0.5)(jax.random.key(1), subject)
    np.testing.assert_allclose(invert(biased)["t1"].data, subject["t1"].data, rtol=1e-5, atol=1e-5)
    with pytest.raises(TypeError, match="RandomNoise is not invertible"):
        T.RandomNoise().inverse(subject, None)


def test_compose_sample_samples_without_applying():
    calls = []

    def record(x):
        calls.append(1)
        return x

    augment = Compose([Lambda(record), T.RandomAffine(), T.RandomNoise(), T.RandomGamma()])
    subject = _volume()
    key = jax.random.key(5)
    params = augment.sample(key, subject)
    assert calls == []  # no child reads the subject in sample: nothing is applied
    out = augment(key, subject)
    assert_trees_close(params, out.history[-1][1], rtol=0, atol=0)


@pytest.mark.parametrize("fuse", [True, False])
def test_compose_sample_follows_earlier_outputs(fuse):
    """Params that depend on earlier outputs (a swap after a crop) equal those recorded by
    the call, and the call is unchanged by sampling (bit-identical to applying the
    sampled params)."""
    augment = Compose(
        [T.RandomFlip(("LR",)), T.RandomAffine(), T.CropOrPad((6, 7, 8)), T.RandomSwap(2, 5)], fuse=fuse
    )
    subject = _volume()
    key = jax.random.key(7)
    params = augment.sample(key, subject)
    out = augment(key, subject)
    assert_trees_close(params, out.history[-1][1], rtol=0, atol=0)
    assert int(np.max(np.asarray(params[3]["locations"])[..., 0])) <= 6 - 2  # drawn in the cropped shape
    again = augment.apply(subject, params)
    np.testing.assert_array_equal(np.asarray(again["t1"].data), np.asarray(out["t1"].data))


def test_resample_reads_a_reference_file_once(tmp_path):
    subject = _volume()
    reference = jmed.ScalarImage(np.zeros((5, 6, 7), np.float32), jmed.affine.from_spacing((2.0, 1.5, 1.0)))
    path = tmp_path / "ref.nii.gz"
    jmed.save(reference, path)
    from_file = T.Resample(str(path))
    path.unlink()  # applying reads no file
    out = from_file(subject)
    expected = T.Resample(reference)(subject)
    assert out["t1"].spatial_shape == (5, 6, 7)
    np.testing.assert_allclose(np.asarray(out["t1"].affine), np.asarray(reference.affine), atol=1e-6)
    np.testing.assert_array_equal(np.asarray(out["t1"].data), np.asarray(expected["t1"].data))
    assert from_file == T.Resample(str(path))  # the public target stays the path
    with pytest.raises(ValueError, match="neither an image of the subject"):
        T.Resample(str(tmp_path / "missing.nii.gz"))(subject)


def test_one_hot_infers_num_classes_eagerly_only():
    labels = np.array([0, 2, 1, 2], np.uint8).reshape(4, 1, 1)
    subject = jmed.Subject(seg=jmed.LabelMap(labels))
    out = T.OneHot()(subject)
    np.testing.assert_array_equal(
        np.asarray(out["seg"].data)[:, 0, 0], np.eye(3, dtype=np.uint8)[[0, 2, 1, 2]]
    )
    with pytest.raises(TypeError, match="pass num_classes"):
        jax.jit(lambda s: T.OneHot()(s))(subject)
    jitted = jax.jit(lambda s: T.OneHot(3)(s))(subject)
    np.testing.assert_array_equal(np.asarray(jitted["seg"].data), np.asarray(out["seg"].data))


def test_params_module_is_the_one_home_of_parsing():
    from jmed.transforms import params

    assert not (Path(T.__file__).parent / "_params.py").exists()
    assert params.parse_range(0.1, "scales", centre=1.0) == (0.9, 1.1)
    assert params.parse_nonnegative_range(2, "std") == (0.0, 2.0)
    assert params.parse_count_range(3, "num_spikes") == (0, 3)
    assert params.int_triple(4, "patch_size") == (4, 4, 4)
    assert params.float_triple((1, 2, 3), "max_displacement") == (1.0, 2.0, 3.0)
    with pytest.raises(ValueError, match=r"patch_size must be positive .* got \(4, 0, 4\)"):
        params.int_triple((4, 0, 4), "patch_size")
    with pytest.raises(ValueError, match=r"crop must be one of \('center', 'random'\), got 'middle'"):
        T.Spatial([], crop="middle")
    draws = np.asarray(params.uniform(jax.random.key(0), 2.0, 3.0, (1000,)))
    assert draws.dtype == np.float32 and draws.min() >= 2.0 and draws.max() < 3.0
    np.testing.assert_allclose(
        draws, np.asarray(jax.random.uniform(jax.random.key(0), (1000,), minval=2.0, maxval=3.0))
    )
    # no module of jmed.transforms keeps its own copy of these helpers
    source = "".join(p.read_text() for p in Path(T.__file__).parent.glob("*.py"))
    for name in (
        "def _as_size3",
        "def _as_shape",
        "def _per_axis",
        "def _check_choice",
        "def _uniform(",
        "def _float(",
        "def _is_number(",
        "def _is_traced(",
        "def _std_range",
        "def _count_range",
    ):
        assert name not in source, f"{name} is back in jmed.transforms; use jmed.transforms.params"
    assert source.count("def _rotation(") == 1


def test_one_of_with_different_output_shapes_under_jit_names_them():
    subject = jmed.datasets.phantom(0, shape=(8, 8, 8))
    choice = T.OneOf([T.RandomFlip(axes=(0,)), T.Resize(4)])
    with pytest.raises(ValueError, match=r"same shapes under jit .*\(8, 8, 8, 1\).*\(4, 4, 4, 1\)"):
        jax.jit(choice)(jax.random.key(0), subject)
    # eagerly each draw keeps the shape of its alternative
    shapes = {choice(jax.random.key(k), subject)["t1"].shape for k in range(8)}
    assert shapes == {(8, 8, 8, 1), (4, 4, 4, 1)}
