"""2D images: one slice ``(H, W, 1, C)``, transformed in plane as TorchIO does."""

import warnings

import jax
import numpy as np
import pytest
from scipy import ndimage

import jmed
from jmed import transforms as T


def _square(size=41, half=8):
    data = np.zeros((size, size), np.float32)
    c = size // 2
    data[c - half : c + half + 1, c - half : c + half + 1] = 1.0
    return data


def test_2d_arrays_become_one_slice():
    image = jmed.ScalarImage(np.ones((5, 4), np.float32))
    assert image.shape == (5, 4, 1, 1) and image.is_2d
    seg = jmed.LabelMap(np.ones((5, 4), np.uint8))
    assert seg.shape == (5, 4, 1, 1) and seg.kind == "label"
    rgb = jmed.Image.from_2d(np.arange(60, dtype=np.float32).reshape(5, 4, 3))
    assert rgb.shape == (5, 4, 1, 3)
    np.testing.assert_array_equal(np.asarray(rgb.data)[:, :, 0, 2], np.arange(60).reshape(5, 4, 3)[..., 2])
    assert jmed.Image.from_2d(np.ones((5, 4)), kind="label").kind == "label"
    assert not jmed.ScalarImage(np.ones((5, 4, 3))).is_2d  # 3D data stay 3D
    with pytest.raises(
        ValueError, match=r"from_2d takes \(H, W\) or \(H, W, C\) data, got shape \(2, 2, 2, 2\)"
    ):
        jmed.Image.from_2d(np.ones((2, 2, 2, 2)))
    with pytest.raises(ValueError, match="2 \\(x, y\\), 3 \\(x, y, z\\) or 4"):
        jmed.ScalarImage(np.ones(5))


@pytest.mark.parametrize("mode", ["eager", "jit"])
def test_affine_on_a_2d_image_stays_in_plane(mode):
    # out-of-plane rotations, the S scale and the S translation are ignored, as in
    # TorchIO: a square rotated in plane keeps all its mass
    data = _square()
    subject = jmed.Subject(t1=jmed.ScalarImage(data))
    params = {
        "scales": np.array([1.0, 1.0, 1.7], np.float32),
        "degrees": np.array([40.0, -35.0, 30.0], np.float32),
        "translation": np.array([0.0, 0.0, 3.0], np.float32),
    }
    apply = T.RandomAffine(default_pad_value=0.0).apply
    out = (jax.jit(apply) if mode == "jit" else apply)(subject, params)
    result = np.asarray(out.t1.data)[:, :, 0, 0]
    assert result.sum() == pytest.approx(data.sum(), rel=0.02)
    # reference: scipy rotating the slice by 30 degrees about its centre (content moves
    # by +30 degrees from R towards A: the pull is the inverse rotation)
    angle = np.deg2rad(30.0)
    pull = np.array([[np.cos(angle), np.sin(angle)], [-np.sin(angle), np.cos(angle)]])
    centre = (np.array(data.shape) - 1) / 2
    expected = ndimage.affine_transform(data, pull, offset=centre - pull @ centre, order=1)
    np.testing.assert_allclose(result, expected, atol=1e-4)


def test_random_transforms_on_a_2d_image_warn_about_nothing():
    rng = np.random.default_rng(0)
    data = rng.random((47, 39)).astype(np.float32)
    subject = jmed.Subject(t1=jmed.ScalarImage(data), seg=jmed.LabelMap((data > 0.5).astype(np.uint8)))
    pipeline = T.Compose(
        [
            T.RandomFlip(axes=(0, 1)),
            T.RandomAffine(scales=0.1, degrees=15, translation=2),
            T.RandomElasticDeformation(num_control_points=5, max_displacement=3.0),
            T.RandomNoise(),
            T.RandomBlur(),
            T.RandomGamma(),
            T.RandomBiasField(),
        ]
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = pipeline(jax.random.key(3), subject)
    assert out.t1.shape == (47, 39, 1, 1)
    assert set(np.unique(np.asarray(out.seg.data))) <= {0, 1}


def test_elastic_on_a_2d_image_moves_only_in_plane():
    # a field that is constant along the slice normal: the slice samples itself only
    # (a displacement along S would pull the pad value in)
    data = np.ones((31, 29), np.float32)
    subject = jmed.Subject(t1=jmed.ScalarImage(data))
    t = T.RandomElasticDeformation(num_control_points=5, max_displacement=(2.0, 2.0, 5.0), locked_borders=0)
    out = t.apply(subject, t.sample(jax.random.key(1), subject))
    interior = np.asarray(out.t1.data)[3:-3, 3:-3, 0, 0]
    np.testing.assert_allclose(interior, 1.0, atol=1e-6)


def test_plots_of_a_2d_image(tmp_path):
    pytest.importorskip("matplotlib")
    from jmed import plot

    data = _square(33)
    subject = jmed.Subject(t1=jmed.ScalarImage(data), seg=jmed.LabelMap((data > 0).astype(np.uint8)))
    fig = plot.plot_subject(subject, output=tmp_path / "two_d.png")
    assert len(fig.axes) == 1  # one view: the slice
    shown = fig.axes[0].images[0].get_array()
    assert shown.shape[0] * shown.shape[1] == data.size
    assert (tmp_path / "two_d.png").stat().st_size > 1000
