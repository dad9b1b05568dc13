import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import make_phantom

import jmed
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
        run(t, jax.random.key(seed), phantom)  # run checks eager == per-sample vmap


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
