"""Readable histories and their replay (jmed.transforms.history)."""

import re

import jax
import numpy as np
import pytest

import jmed
import jmed.transforms as T
from jmed.image import _DescribedTransform
from jmed.transforms.history import HistoryStep, ReplayHistory, describe_history, format_history


def _steps(subject):
    return [(s.name, s.values, s.depth, s.applied) for s in describe_history(subject)]


def _recorded(transform, subject, key=None):
    """``subject`` with the history entry that ``transform(key, subject)`` records (the
    params its ``sample`` draws), without applying it."""
    key = jax.random.key(0) if key is None else key
    return subject.replace(history=((transform, transform.sample(key, subject)),))


def _only(subject) -> HistoryStep:
    (step,) = describe_history(subject)
    return step


def test_affine_parameters_are_the_fixed_values_passed(phantom, key):
    # 6 values: one fixed (low, high) range per axis, so the draw is known
    t = T.RandomAffine(
        scales=(1.1, 1.1, 0.9, 0.9, 1, 1), degrees=(5, 5, -3, -3, 10, 10), translation=(2, 2, -4, -4, 0, 0)
    )
    out = t(key, phantom)
    step = _only(out)
    assert step.name == "RandomAffine" and step.depth == 0 and step.applied
    np.testing.assert_allclose(step.values["scales"], [1.1, 0.9, 1.0], rtol=1e-6)
    np.testing.assert_allclose(step.values["degrees"], [5, -3, 10], rtol=1e-6)
    np.testing.assert_allclose(step.values["translation_mm"], [2, -4, 0], atol=1e-6)
    assert format_history(out) == (
        "RandomAffine(scales=(1.100, 0.900, 1.000), degrees=(5.00, -3.00, 10.00), "
        "translation_mm=(2.00, -4.00, 0.00))"
    )
    assert out.history_summary() == format_history(out) == format_history(out.history)


def test_each_family_names_its_parameters_in_physical_units(phantom):
    flip = _only(_recorded(T.RandomFlip(axes=(0, 2), flip_probability=1.0), phantom))
    assert flip.values == {"axes": (0, 2)}
    assert _only(_recorded(T.RandomFlip(axes=(0, 1), flip_probability=0.0), phantom)).values == {"axes": ()}

    noise = _recorded(T.RandomNoise(mean=(0.1, 0.1), std=(0.2, 0.2)), phantom)
    assert set(_only(noise).values) == {"mean", "std"}  # the seed is not shown
    np.testing.assert_allclose(
        [_only(noise).values["mean"], _only(noise).values["std"]], [0.1, 0.2], rtol=1e-6
    )
    assert format_history(noise) == "RandomNoise(mean=0.1, std=0.2)"

    blur = _recorded(T.RandomBlur(std=(1.5, 1.5)), phantom)
    assert format_history(blur) == "RandomBlur(std_mm=(1.50, 1.50, 1.50))"
    voxels = _recorded(T.RandomBlur(std=(0.5, 0.5), units="voxels"), phantom)
    assert format_history(voxels) == "RandomBlur(std_voxels=(0.5, 0.5, 0.5))"

    motion = _recorded(T.RandomMotion(degrees=(3, 3), translation=(4, 4), num_transforms=1), phantom)
    values = _only(motion).values
    np.testing.assert_allclose(values["degrees"], [[3, 3, 3]], rtol=1e-6)
    np.testing.assert_allclose(values["translation_mm"], [[4, 4, 4]], rtol=1e-6)
    assert format_history(motion).startswith(
        "RandomMotion(degrees=((3.00, 3.00, 3.00),), translation_mm=((4.00, 4.00, 4.00),), times=("
    )

    elastic = T.RandomElasticDeformation(
        num_control_points=5, max_displacement=(1.0, 2.0, 3.0), locked_borders=1
    )
    out = _recorded(elastic, phantom)
    values = _only(out).values
    field = np.asarray(out.history[0][1])  # (5, 5, 5, 3) control displacements in mm
    np.testing.assert_allclose(values["max_displacement_mm"], np.abs(field).reshape(-1, 3).max(0))
    assert np.all(values["max_displacement_mm"] <= [1.0, 2.0, 3.0]) and np.all(
        values["max_displacement_mm"] > 0
    )
    assert values["control_points"] == (5, 5, 5)

    cube = jmed.Subject(t1=jmed.ScalarImage(np.zeros((6, 6, 6), np.float32)))
    rot = _recorded(T.RandomRot90(axes=(0, 1)), cube)
    k = int(rot.history[0][1])
    assert format_history(rot) == f"RandomRot90(axes=(0, 1), degrees={90 * k})"

    gamma = _recorded(T.RandomGamma(log_gamma=(0.2, 0.2)), phantom)
    np.testing.assert_allclose(_only(gamma).values["gamma"], np.exp(0.2), rtol=1e-6)
    assert format_history(gamma) == f"RandomGamma(gamma={np.exp(0.2):.3f})"

    bias = _recorded(T.RandomBiasField(order=3), phantom)
    coefficients = np.asarray(bias.history[0][1]["coefficients"])
    assert coefficients.size == 20  # summarised: more than 12 values
    match = re.fullmatch(
        r"RandomBiasField\(order=3, coefficients=<20 values in \[(\S+), (\S+)\]>\)", format_history(bias)
    )
    assert match, format_history(bias)
    np.testing.assert_allclose(
        [float(match[1]), float(match[2])], [coefficients.min(), coefficients.max()], rtol=1e-3
    )
    assert -0.5 <= coefficients.min() < coefficients.max() <= 0.5


def test_deterministic_steps_show_their_configuration(phantom):
    out = T.RescaleIntensity(out_min_max=(0, 1))(phantom)
    assert _only(out).values is None
    assert format_history(out) == repr(T.RescaleIntensity(out_min_max=(0, 1)))
    crop = T.CropOrPad((20, 22, 16))(phantom)  # phantom is (24, 20, 16)
    step = _only(crop)
    np.testing.assert_array_equal(step.values["start"], [2, -1, 0])
    assert (
        format_history(crop)
        == "CropOrPad(start=(2, -1, 0), input_shape=(24, 20, 16), output_shape=(20, 22, 16))"
    )


def test_compositions_unfold_and_mark_what_was_left_out(phantom, key):
    t = T.Compose(
        [
            T.RandomFlip(axes=0, flip_probability=1.0),
            T.RandomApply(T.RandomGamma(), p=0.0),
            T.RandomApply(T.RandomNoise(std=(0.3, 0.3)), p=1.0),
            T.OneOf([T.RandomBlur(), T.RandomBrightness(multiplier=(1.5, 1.5))], probabilities=[0, 1]),
            T.SomeOf([T.RandomGamma(log_gamma=(0, 0)), T.RandomContrast()], num_transforms=2),
        ]
    )
    out = t(key, phantom)
    names = [(name, depth, applied) for name, _, depth, applied in _steps(out)]
    assert names == [
        ("RandomFlip", 0, True),
        ("RandomApply", 0, True),
        ("RandomGamma", 1, False),
        ("RandomApply", 0, True),
        ("RandomNoise", 1, True),
        ("OneOf", 0, True),
        ("RandomBlur", 1, False),
        ("RandomBrightness", 1, True),
        ("SomeOf", 0, True),
        ("RandomGamma", 1, True),
        ("RandomContrast", 1, True),
    ]
    text = format_history(out).splitlines()
    assert text[1:3] == ["RandomApply(p=0, applied=False)", "  RandomGamma: not applied"]
    assert text[4] == "  RandomNoise(mean=0, std=0.3)"
    assert text[5:8] == [
        "OneOf(chosen=1)",
        "  RandomBlur: not applied",
        "  RandomBrightness(multiplier=1.500)",
    ]
    assert text[8:10] == ["SomeOf(applied=(0, 1))", "  RandomGamma(gamma=1.000)"]


def test_batched_history_is_shown_per_item(phantom):
    keys = jax.random.split(jax.random.key(1), 2)
    batch = jmed.stack([phantom, phantom])
    t = T.RandomAffine(scales=0, degrees=(0, 0, 0, 0, -20, 20))
    params = jax.vmap(t.sample, in_axes=(0, None))(keys, phantom)  # what vmap(t) records
    out = batch.replace(history=((t, params),))
    (step,) = describe_history(out)
    degrees = np.asarray(step.values["degrees"])
    assert degrees.shape == (2, 3)
    expected = np.asarray(out.history[0][1]["degrees"])
    line = format_history(out)
    assert f"degrees=((0.00, 0.00, {expected[0, 2]:.2f}), (0.00, 0.00, {expected[1, 2]:.2f}))" in line
    items = jmed.unstack(out)  # each item carries its own params
    np.testing.assert_allclose(_only(items[1]).values["degrees"], expected[1])


def test_empty_and_bad_histories(phantom):
    assert format_history(phantom) == "" and describe_history(phantom) == []
    with pytest.raises(TypeError, match="an Image has no history"):
        format_history(phantom.t1)
    with pytest.raises(TypeError, match=r"history\[0\] must be a \(transform, params\) pair"):
        format_history([T.RandomFlip()])


def _flip_affine_noise_rescale():
    return T.Compose(
        [
            T.RandomFlip(axes=(0, 1)),
            T.RandomAffine(scales=0.1, degrees=15, translation=3),
            T.RandomNoise(std=0.2),
            T.RescaleIntensity(out_min_max=(0, 1)),
        ]
    )


def _assert_subjects_equal(a, b):
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].kind == b[name].kind
        np.testing.assert_array_equal(np.asarray(a[name].data), np.asarray(b[name].data))
        np.testing.assert_array_equal(np.asarray(a[name].affine), np.asarray(b[name].affine))


def test_composed_history_reproduces_the_transformed_subject_exactly(phantom):
    out = _flip_affine_noise_rescale()(jax.random.key(7), phantom)
    out = T.RandomGamma()(jax.random.key(8), out)  # a second entry in the history
    replay = out.get_composed_history()
    assert isinstance(replay, ReplayHistory) and not replay.is_random
    again = replay(phantom)
    _assert_subjects_equal(again, out)
    # the history lists the recorded steps, as the original does
    assert len(again.history) == 2 and [t for t, _ in again.history] == [t for t, _ in out.history]
    assert format_history(again) == format_history(out)
    # a key is accepted (and ignored), under jit too
    _assert_subjects_equal(replay(jax.random.key(0), phantom), out)
    jitted = jax.jit(lambda s: replay(s))(phantom)
    np.testing.assert_allclose(np.asarray(jitted.t1.data), np.asarray(out.t1.data), atol=1e-5)
    # on another subject: the same augmentation as jmed.transforms.replay
    other = phantom.replace({"t1": phantom.t1.replace(data=phantom.t1.data * 2.0)})
    _assert_subjects_equal(replay(other), T.replay(other, out.history))


def test_replay_is_a_value(phantom):
    out = _flip_affine_noise_rescale()(jax.random.key(7), phantom)
    a, b = out.get_composed_history(), ReplayHistory(out.history)
    assert a == b and hash(a) == hash(b) and repr(a) == repr(b) and "0x" not in repr(a)
    other = _flip_affine_noise_rescale()(jax.random.key(9), phantom).get_composed_history()
    assert a != other and a.params_digest != other.params_digest
    _assert_subjects_equal(ReplayHistory(())(phantom), phantom)


def test_replay_inverse_and_apply_inverse_transform(phantom):
    t = T.Compose([T.RandomFlip(axes=(0, 1, 2), flip_probability=1.0), T.RandomBiasField()])
    out = t(jax.random.key(3), phantom)
    back = out.apply_inverse_transform()
    assert back.history == ()
    np.testing.assert_allclose(np.asarray(back.t1.data), phantom.t1.data, rtol=1e-5, atol=1e-3)
    np.testing.assert_array_equal(np.asarray(back.seg.data), phantom.seg.data)
    replay = out.get_composed_history()
    inverted = replay.inverse(out.without_history(), replay.sample(None, out))
    _assert_subjects_equal(inverted, back)
    with pytest.warns(UserWarning, match="RandomNoise is not invertible"):
        T.RandomNoise()(jax.random.key(0), phantom).apply_inverse_transform()


def test_replay_refuses_a_history_restored_from_export(phantom):
    out = T.RandomFlip()(jax.random.key(0), phantom)
    restored = out.replace(history=((_DescribedTransform(repr(out.history[0][0])), out.history[0][1]),))
    assert format_history(restored).startswith("RandomFlip(")
    with pytest.raises(TypeError, match="not a jmed transform"):
        restored.get_composed_history()


def test_composed_history_of_a_batch_is_refused_and_items_replay():
    subject = jmed.datasets.phantom(0, shape=(8, 8, 8))
    batch = jmed.stack([subject, subject])
    flip = T.RandomFlip(axes=(0,))
    out = jax.vmap(flip)(jax.random.split(jax.random.key(0), 2), batch)
    with pytest.raises(ValueError, match=r"a batch .*unstack"):
        out.get_composed_history()
    for item, original in zip(jmed.unstack(out), jmed.unstack(batch)):
        replayed = item.get_composed_history()(None, original)
        np.testing.assert_array_equal(np.asarray(replayed["t1"].data), np.asarray(item["t1"].data))
