import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage as ndi
from conftest import make_phantom

import jmed
from jmed.transforms.intensity import (
    RandomBiasField,
    RandomBlur,
    RandomBrightness,
    RandomCoarseDropout,
    RandomContrast,
    RandomGamma,
    RandomLabelsToImage,
    RandomNoise,
    RandomSwap,
)

SMALL = (12, 10, 8)

FACTORIES = {
    "noise": lambda: RandomNoise(std=(0.5, 1.0)),
    "rician": lambda: RandomNoise(std=(0.5, 1.0), rician=True),
    "blur": lambda: RandomBlur(std=(0.5, 1.5)),
    "blur_voxels": lambda: RandomBlur(std=(0.5, 1.0), units="voxels"),
    "gamma": lambda: RandomGamma(),
    "gamma_nnunet": lambda: RandomGamma(gamma=(0.7, 1.5), invert=True, retain_stats=True),
    "brightness": lambda: RandomBrightness(),
    "contrast": lambda: RandomContrast(contrast=(0.5, 0.9)),
    "bias": lambda: RandomBiasField(),
    "swap": lambda: RandomSwap(patch_size=3, num_iterations=5),
    "dropout": lambda: RandomCoarseDropout(num_holes=2, hole_size=(3, 2, 4), fill_value=-1.0),
    "labels": lambda: RandomLabelsToImage("seg", num_labels=3),
}


def _phantom():
    return make_phantom(SMALL, np.diag([1.0, 1.5, 2.0, 1.0]))


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_eager_jit_vmap_and_labels_untouched(name, run, key):
    subject = _phantom()
    out = run(FACTORIES[name](), key, subject)
    np.testing.assert_array_equal(out["seg"].data, subject["seg"].data)
    target = "image_from_labels" if name == "labels" else "t1"
    data = np.asarray(out[target].data)
    assert data.shape == subject["t1"].shape and np.all(np.isfinite(data))
    if name != "labels":
        assert not np.allclose(data, subject["t1"].data)


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_same_key_same_output_and_finite_gradient(name, key):
    t = FACTORIES[name]()
    subject = _phantom()
    a, b = t(key, subject), t(key, subject)
    c = t(jax.random.key(1), subject)
    target = "image_from_labels" if name == "labels" else "t1"
    np.testing.assert_array_equal(a[target].data, b[target].data)
    assert not np.array_equal(a[target].data, c[target].data)
    if name == "labels":
        return
    params = t.sample(key, subject)

    def loss(data):
        s = subject.replace({"t1": subject["t1"].replace(data=data)})
        return jnp.sum(t.apply(s, params)["t1"].data ** 2)

    grad = jax.grad(loss)(jnp.asarray(subject["t1"].data))
    assert np.all(np.isfinite(grad)) and np.any(grad != 0)


# -- noise --------------------------------------------------------------------------------
def test_noise_std_and_mean_match_drawn_values(key):
    t = RandomNoise(mean=(2.0, 3.0), std=(0.2, 0.9))
    image = jmed.ScalarImage(np.zeros((100, 100, 100), np.float32))
    params = t.sample(key, jmed.Subject(t1=image))
    out = np.asarray(t.apply(jmed.Subject(t1=image), params)["t1"].data)
    assert 0.2 <= float(params["std"]) <= 0.9 and 2.0 <= float(params["mean"]) <= 3.0
    assert abs(out.std() / float(params["std"]) - 1) < 0.02
    assert abs(out.mean() - float(params["mean"])) < 0.01


def test_rician_noise_is_non_negative_and_has_rician_mean(key):
    image = jmed.ScalarImage(np.full((60, 60, 60), -0.0, np.float32))
    t = RandomNoise(std=(1.0, 1.0), rician=True)
    out = np.asarray(t(key, image).data)
    assert out.min() >= 0
    # zero signal: Rayleigh distribution, mean sigma * sqrt(pi / 2)
    assert abs(out.mean() - np.sqrt(np.pi / 2)) < 0.02


def test_noise_differs_between_images(key):
    s = jmed.Subject(
        a=jmed.ScalarImage(np.zeros(SMALL, np.float32)), b=jmed.ScalarImage(np.zeros(SMALL, np.float32))
    )
    out = RandomNoise(std=(1.0, 1.0))(key, s)
    assert not np.allclose(out["a"].data, out["b"].data)


# -- blur ---------------------------------------------------------------------------------
@pytest.mark.parametrize("jit", [False, True])
def test_blur_matches_scipy_in_mm(jit):
    spacing = np.array([1.0, 2.0, 0.5])
    subject = make_phantom(SMALL, np.diag([*spacing, 1.0]))
    t = RandomBlur(std=2.0)
    params = {"std": jnp.asarray([1.0, 2.0, 0.75])}
    apply = jax.jit(t.apply) if jit else t.apply
    out = np.asarray(apply(subject, params)["t1"].data[..., 0])
    ref = ndi.gaussian_filter(
        np.asarray(subject["t1"].data[..., 0], np.float64), [1.0, 1.0, 1.5], mode="reflect"
    )
    np.testing.assert_allclose(out, ref, atol=1e-5 * np.abs(ref).max())
    voxels = RandomBlur(std=2.0, units="voxels")
    out = np.asarray((jax.jit(voxels.apply) if jit else voxels.apply)(subject, params)["t1"].data[..., 0])
    ref = ndi.gaussian_filter(
        np.asarray(subject["t1"].data[..., 0], np.float64), [1.0, 2.0, 0.75], mode="reflect"
    )
    np.testing.assert_allclose(out, ref, atol=1e-5 * np.abs(ref).max())


# -- gamma --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs", [{}, {"rescale": True}, {"invert": True, "retain_stats": True}, {"retain_stats": True}]
)
def test_gamma_one_is_identity(kwargs):
    subject = _phantom()
    out = RandomGamma(**kwargs).apply(subject, {"gamma": jnp.float32(1.0)})
    x = np.asarray(subject["t1"].data)
    np.testing.assert_allclose(out["t1"].data, x, atol=1e-5 * np.abs(x).max())


def test_gamma_values_against_numpy():
    subject = _phantom()
    x = np.asarray(subject["t1"].data, np.float64)
    g = 0.8
    out = RandomGamma().apply(subject, {"gamma": jnp.float32(g)})["t1"].data
    np.testing.assert_allclose(out, np.sign(x) * np.abs(x) ** g, rtol=1e-5, atol=1e-4)
    # nnU-Net: invert, min-max rescale, power, retain stats, invert back
    out = RandomGamma(invert=True, retain_stats=True).apply(subject, {"gamma": jnp.float32(g)})["t1"].data
    y = -x
    mean, std = y.mean(), y.std()
    lo, width = y.min(), y.max() - y.min() + 1e-7
    z = ((y - lo) / width) ** g * width + lo
    z = (z - z.mean()) / (z.std() + 1e-8) * std + mean
    np.testing.assert_allclose(out, -z, rtol=1e-4, atol=1e-3)


def test_gamma_nnunet_sampling_range(key):
    t = RandomGamma(gamma=(0.7, 1.5))
    gammas = np.array([float(t.sample(k, None)["gamma"]) for k in jax.random.split(key, 32)])
    assert gammas.min() >= 0.7 and gammas.max() <= 1.5
    assert 4 < (gammas < 1).sum() < 28
    logs = np.array(
        [float(RandomGamma(log_gamma=0.3).sample(k, None)["gamma"]) for k in jax.random.split(key, 6)]
    )
    assert np.all((np.log(logs) >= -0.3 - 1e-6) & (np.log(logs) <= 0.3 + 1e-6))


# -- brightness / contrast ----------------------------------------------------------------
def test_brightness_and_contrast_against_numpy():
    subject = _phantom()
    x = np.asarray(subject["t1"].data, np.float64)
    out = RandomBrightness().apply(subject, {"multiplier": jnp.float32(1.2)})["t1"].data
    np.testing.assert_allclose(out, x * 1.2, rtol=1e-6)
    for preserve in (True, False):
        out = RandomContrast(preserve_range=preserve).apply(subject, {"factor": jnp.float32(1.5)})["t1"].data
        ref = (x - x.mean()) * 1.5 + x.mean()
        if preserve:
            ref = np.clip(ref, x.min(), x.max())
        np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-3)


# -- bias field ---------------------------------------------------------------------------
def test_bias_field_zero_is_identity_and_inverse_restores(key):
    subject = _phantom()
    t = RandomBiasField(coefficients=0.5, order=3)
    zero = {"coefficients": jnp.zeros(20)}
    np.testing.assert_allclose(t.apply(subject, zero)["t1"].data, subject["t1"].data, atol=1e-5)
    out = t(key, subject)
    back = jmed.transforms.invert(out)
    x = np.asarray(subject["t1"].data)
    np.testing.assert_allclose(back["t1"].data, x, atol=1e-5 * np.abs(x).max())
    assert not np.allclose(out["t1"].data, x)


def test_bias_field_against_direct_polynomial(key):
    t = RandomBiasField(coefficients=0.3, order=2)
    subject = _phantom()
    params = t.sample(key, subject)
    field = np.asarray(t.apply(subject, params)["t1"].data) / np.asarray(subject["t1"].data)
    grid = np.meshgrid(*[np.linspace(-1, 1, n) for n in SMALL], indexing="ij")
    terms = [(i, j, k) for i, j, k in itertools.product(range(3), repeat=3) if i + j + k <= 2]
    assert len(terms) == params["coefficients"].shape[0] == 10
    poly = sum(
        c * grid[0] ** i * grid[1] ** j * grid[2] ** k
        for c, (i, j, k) in zip(np.asarray(params["coefficients"]), terms)
    )
    np.testing.assert_allclose(field[..., 0], np.exp(poly), rtol=1e-4)


# -- swap / dropout ----------------------------------------------------------------------
def test_swap_against_numpy(key):
    t = RandomSwap(patch_size=(3, 4, 2), num_iterations=7)
    subject = _phantom()
    params = t.sample(key, subject)
    ref = np.array(subject["t1"].data)
    for first, second in np.asarray(params["locations"]):
        s1 = tuple(slice(a, a + p) for a, p in zip(first, (3, 4, 2)))
        s2 = tuple(slice(a, a + p) for a, p in zip(second, (3, 4, 2)))
        p1, p2 = ref[s1].copy(), ref[s2].copy()
        ref[s1] = p2
        ref[s2] = p1
    np.testing.assert_array_equal(t.apply(subject, params)["t1"].data, ref)
    assert np.all(np.asarray(params["locations"]) <= np.array(SMALL) - np.array([3, 4, 2]))
    none = RandomSwap(num_iterations=0, patch_size=2)
    np.testing.assert_array_equal(none(key, subject)["t1"].data, subject["t1"].data)


def test_coarse_dropout_against_numpy(key):
    t = RandomCoarseDropout(num_holes=3, hole_size=(2, 3, 4), fill_value=7.0)
    subject = _phantom()
    params = t.sample(key, subject)
    ref = np.array(subject["t1"].data)
    for c in np.asarray(params["corners"]):
        ref[c[0] : c[0] + 2, c[1] : c[1] + 3, c[2] : c[2] + 4] = 7.0
    np.testing.assert_array_equal(t.apply(subject, params)["t1"].data, ref)


# -- labels to image ---------------------------------------------------------------------
def test_labels_to_image_per_label_values(key):
    subject = _phantom()
    t = RandomLabelsToImage("seg", num_labels=3, mean=[(0, 0), (5, 6), (10, 10)], std=[0, 0, 0])
    out = t(key, subject)
    img, seg = np.asarray(out["image_from_labels"].data), np.asarray(subject["seg"].data)
    params = out.history[-1][1]
    np.testing.assert_allclose(img, np.asarray(params["mean"])[seg], atol=1e-6)
    assert 5 <= float(params["mean"][1]) <= 6
    np.testing.assert_array_equal(out["image_from_labels"].affine, subject["seg"].affine)
    assert out["image_from_labels"].kind == jmed.INTENSITY


def test_labels_to_image_noise_onehot_and_background(key):
    subject = _phantom()
    seg = np.asarray(subject["seg"].data[..., 0])
    t = RandomLabelsToImage("seg", num_labels=3, default_std=(0.5, 0.5))
    params = t.sample(key, subject)
    single = np.asarray(t.apply(subject, params)["image_from_labels"].data)
    resid = single[..., 0] - np.asarray(params["mean"])[seg]
    assert abs(resid.std() - 0.5) < 0.05
    onehot = jmed.Subject(seg=jmed.Image(np.eye(3, dtype=np.float32)[seg], kind="label"))
    multi = RandomLabelsToImage("seg").apply(onehot, params)["image_from_labels"].data
    np.testing.assert_allclose(multi, single, atol=1e-5)
    keep = RandomLabelsToImage("seg", num_labels=3, ignore_background=True, image_key="t1")
    out = np.asarray(keep.apply(subject, params)["t1"].data)
    np.testing.assert_array_equal(out[seg == 0], np.asarray(subject["t1"].data)[seg == 0])
    np.testing.assert_allclose(out[seg > 0], single[seg > 0], atol=1e-6)


# -- errors -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "factory, match",
    [
        (lambda: RandomNoise(std=-1), "std"),
        (lambda: RandomNoise(std=(0.5, 0.1)), "std"),
        (lambda: RandomNoise(mean=(1, 0)), "mean"),
        (lambda: RandomBlur(std=-1), "std"),
        (lambda: RandomBlur(std=(1, 2, 3, 4)), "std"),
        (lambda: RandomBlur(mode="wrapz"), "mode"),
        (lambda: RandomBlur(units="cm"), "units"),
        (lambda: RandomGamma(log_gamma=(0.3, -0.3)), "log_gamma"),
        (lambda: RandomGamma(gamma=(0, 1.5)), "gamma"),
        (lambda: RandomBrightness(multiplier=(1.2, 1.1)), "multiplier"),
        (lambda: RandomContrast(contrast=(-1, 1)), "contrast"),
        (lambda: RandomBiasField(order=-1), "order"),
        (lambda: RandomBiasField(coefficients=(1, 0)), "coefficients"),
        (lambda: RandomSwap(patch_size=0), "patch_size"),
        (lambda: RandomSwap(num_iterations=-1), "num_iterations"),
        (lambda: RandomCoarseDropout(hole_size=(1, 2)), "hole_size"),
        (lambda: RandomLabelsToImage("seg", num_labels=2, mean=[0, 1, 2]), "mean"),
        (lambda: RandomLabelsToImage("seg", default_std=-1), "default_std"),
    ],
)
def test_bad_parameters(factory, match):
    with pytest.raises(ValueError, match=match):
        factory()


def test_bad_parameters_at_sample_time(key):
    with pytest.raises(ValueError, match="patch_size"):
        RandomSwap(patch_size=50)(key, _phantom())
    with pytest.raises(ValueError, match="num_labels"):
        RandomLabelsToImage("seg")(key, _phantom())
    with pytest.raises(KeyError, match="nope"):
        RandomLabelsToImage("nope", num_labels=2)(key, _phantom())
