import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import make_phantom

from jmed.transforms import Compose, tta
from jmed.transforms.base import Lambda
from jmed.transforms.spatial import RandomAffine, RandomFlip


def test_equivariant_predictor_gives_input_back_with_small_variance():
    subject = make_phantom((14, 12, 10))
    grid = np.stack(np.meshgrid(*map(np.arange, (14, 12, 10)), indexing="ij"), -1)
    smooth = (np.sin(0.4 * grid[..., 0]) + np.cos(0.3 * grid[..., 1] + 0.2 * grid[..., 2]))[..., None]
    subject = subject.replace({"t1": subject.t1.replace(data=jnp.asarray(smooth, jnp.float32))})
    transform = Compose(
        [RandomFlip(axes=(0, 1)), RandomAffine(scales=0.05, degrees=5, default_pad_value="edge")]
    )
    # an identity "model" is equivariant: the mean is the input, the variance interpolation noise
    mean, variance = tta.predict_with_tta(jax.random.key(0), lambda s: s.t1.data, subject, transform, 4)
    data = np.asarray(subject.t1.data)
    inner = (slice(3, -3),) * 3
    assert mean.spatial_shape == subject.spatial_shape
    np.testing.assert_array_equal(np.asarray(mean.affine), np.asarray(subject.t1.affine))
    rel = np.abs(np.asarray(mean.data) - data)[inner].mean() / np.abs(data).mean()
    assert rel < 0.05
    assert float(jnp.mean(variance.data)) < 0.05
    # a flip-only TTA with an identity model is exact (up to the averaging's rounding)
    mean, variance = tta.predict_with_tta(
        jax.random.key(1), lambda s: s.t1.data, subject, RandomFlip(axes=(0, 1, 2)), 3
    )
    np.testing.assert_allclose(np.asarray(mean.data), data, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(variance.data), 0.0, atol=1e-10)


def test_variance_detects_non_equivariant_predictor():
    subject = make_phantom((12, 10, 8))

    # a "model" that looks at one fixed corner: its output changes with the flip
    def predictor(s):
        return jnp.broadcast_to(s.t1.data[:1, :1, :1], s.t1.data.shape)

    mean, variance = tta.predict_with_tta(
        jax.random.key(2), predictor, subject, RandomFlip(axes=(0, 1, 2)), 6
    )
    assert float(jnp.max(variance.data)) > 0
    # independent reference: each copy by hand (sample, apply, predict, invert), then numpy
    transform = RandomFlip(axes=(0, 1, 2))
    copies = []
    for i in range(6):
        params = transform.sample(jax.random.fold_in(jax.random.key(2), i), subject)
        augmented = transform.apply(subject, params)
        predicted = augmented.t1.replace(data=predictor(augmented))
        copies.append(np.asarray(transform.inverse(augmented.replace({"t1": predicted}), params).t1.data))
    np.testing.assert_allclose(np.asarray(mean.data), np.mean(copies, axis=0), rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(np.asarray(variance.data), np.var(copies, axis=0), rtol=1e-5, atol=1e-4)


def test_bad_arguments():
    subject = make_phantom((6, 6, 6))
    with pytest.raises(TypeError, match="invertible"):
        tta.predict_with_tta(jax.random.key(0), lambda s: s.t1.data, subject, Lambda(lambda x: x), 2)
    with pytest.raises(ValueError, match="num_augmentations"):
        tta.predict_with_tta(jax.random.key(0), lambda s: s.t1.data, subject, RandomFlip(), 0)
