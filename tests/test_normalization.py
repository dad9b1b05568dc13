import jax
import numpy as np
import pytest
from conftest import make_phantom

import jmed
from jmed.transforms.normalization import (
    Clamp,
    HistogramStandardization,
    Mask,
    RescaleIntensity,
    ZNormalization,
    get_mask,
    histogram_percentiles,
    load_landmarks,
    save_landmarks,
    train_histogram,
)


@pytest.fixture
def subject():
    return make_phantom((12, 10, 8))


def _t1(s):
    return np.asarray(s.t1.data, np.float64)


# --- masking -----------------------------------------------------------------------------


def test_get_mask_variants(subject):
    seg = np.asarray(subject.seg.data)
    assert get_mask(subject, None, subject.t1) is None
    np.testing.assert_array_equal(get_mask(subject, "seg", subject.t1), seg != 0)
    np.testing.assert_array_equal(get_mask(subject, ("seg", [2]), subject.t1), seg == 2)
    np.testing.assert_array_equal(get_mask(subject, lambda x: x > 50, subject.t1), _t1(subject) > 50)
    other = subject.replace({"small": jmed.LabelMap(np.ones((3, 3, 3), np.uint8))})
    with pytest.raises(ValueError, match="resample them to the same space"):
        get_mask(other, "small", subject.t1)
    with pytest.raises(KeyError, match="missing"):
        get_mask(subject, "missing", subject.t1)


# --- rescale -----------------------------------------------------------------------------


def _check_rescale(subject, out, masking_method):
    x = _t1(subject)
    sel = x if masking_method is None else x[get_mask(subject, masking_method, subject.t1)]
    lo, hi = np.percentile(sel, [2.5, 97.0])
    expected = (np.clip(x, lo, hi) - lo) / (hi - lo) * 3.0 - 1.0
    np.testing.assert_allclose(_t1(out), expected, atol=3e-6)
    np.testing.assert_array_equal(out.seg.data, subject.seg.data)  # label maps pass through


def test_rescale_percentiles_match_numpy(run, subject):
    t = RescaleIntensity(out_min_max=(-1.0, 2.0), percentiles=(2.5, 97.0), masking_method="seg")
    _check_rescale(subject, run(lambda k, s: t(s), None, subject), "seg")


@pytest.mark.parametrize("masking_method", [None, ("seg", (1,)), lambda x: x > 30])
def test_rescale_masking_methods_eager_and_jit(subject, masking_method):
    t = RescaleIntensity(out_min_max=(-1.0, 2.0), percentiles=(2.5, 97.0), masking_method=masking_method)
    _check_rescale(subject, t(subject), masking_method)
    _check_rescale(subject, jax.jit(lambda s: t(s))(subject), masking_method)


def test_rescale_in_min_max_and_defaults(subject):
    out = RescaleIntensity(in_min_max=(0.0, 100.0), out_min_max=(0, 10))(subject)
    np.testing.assert_allclose(_t1(out), _t1(subject) / 10.0, rtol=1e-5, atol=1e-5)
    default = RescaleIntensity()(subject)
    assert _t1(default).min() == 0.0 and _t1(default).max() == pytest.approx(1.0)


def test_rescale_bad_input(subject):
    for bad in [(-1, 99), (1, 101), (99, 1), (50, 50)]:
        with pytest.raises(ValueError, match="percentiles"):
            RescaleIntensity(percentiles=bad)
    with pytest.raises(ValueError, match="out_min_max"):
        RescaleIntensity(out_min_max=(1, 0))
    with pytest.raises(ValueError, match="masking_method"):
        RescaleIntensity(masking_method=3)
    empty = subject.replace({"seg": jmed.LabelMap(np.zeros((12, 10, 8), np.uint8))})
    with pytest.raises(ValueError, match="empty mask"):
        RescaleIntensity(masking_method="seg")(empty)
    const = jmed.ScalarImage(np.full((4, 4, 4), 3.0, np.float32))
    with pytest.raises(ValueError, match="constant range"):
        RescaleIntensity()(const)
    # under jit a constant image cannot raise: no NaN, out_min everywhere
    out = jax.jit(lambda s: RescaleIntensity(out_min_max=(0.0, 1.0))(s))(const)
    np.testing.assert_array_equal(out.data, 0.0)


# --- z-normalisation ---------------------------------------------------------------------


@pytest.mark.parametrize("masking_method", [None, "seg", lambda x: x > 60])
def test_znormalization_mean_zero_std_one_in_mask(run, subject, masking_method):
    t = ZNormalization(masking_method=masking_method)
    out = run(lambda k, s: t(s), None, subject)
    mask = get_mask(subject, masking_method, subject.t1)
    values = _t1(out) if mask is None else _t1(out)[np.broadcast_to(mask, out.t1.shape)]
    assert abs(values.mean()) < 1e-5
    assert values.std() == pytest.approx(1.0, abs=1e-5)
    x = _t1(subject)
    sel = x if mask is None else x[np.broadcast_to(mask, x.shape)]
    np.testing.assert_allclose(_t1(out), (x - sel.mean()) / sel.std(), atol=1e-4)


def test_znormalization_errors_not_nan():
    const = jmed.ScalarImage(np.full((4, 4, 4), 7.0, np.float32))
    with pytest.raises(ValueError, match="standard deviation .* is zero"):
        ZNormalization()(const)
    out = jax.jit(lambda s: ZNormalization()(s))(const)
    np.testing.assert_array_equal(out.data, 0.0)
    subject = make_phantom((6, 6, 6)).replace({"seg": jmed.LabelMap(np.zeros((6, 6, 6), np.uint8))})
    with pytest.raises(ValueError, match="empty mask"):
        ZNormalization(masking_method="seg")(subject)
    out = jax.jit(lambda s: ZNormalization(masking_method="seg")(s))(subject)
    assert np.all(np.isfinite(out.t1.data))


# --- clamp and mask ----------------------------------------------------------------------


def test_clamp(run, subject):
    t = Clamp(out_min=0.0, out_max=100.0)
    out = run(lambda k, s: t(s), None, subject)
    np.testing.assert_allclose(_t1(out), np.clip(_t1(subject), 0, 100))
    np.testing.assert_allclose(_t1(Clamp(out_max=5.0)(subject)), np.minimum(_t1(subject), 5.0))
    with pytest.raises(ValueError, match="out_min must be <= out_max"):
        Clamp(out_min=2.0, out_max=1.0)


def test_mask(run, subject):
    t = Mask(("seg", [2]), outside_value=-5.0)
    out = run(lambda k, s: t(s), None, subject)
    seg = np.asarray(subject.seg.data)
    np.testing.assert_allclose(_t1(out), np.where(seg == 2, _t1(subject), -5.0))
    with pytest.raises(ValueError, match="masking_method"):
        Mask(None)


# --- histogram standardisation -----------------------------------------------------------


def _training_images(num=3):
    rng = np.random.default_rng(0)
    images = []
    for i in range(num):
        # 7 * 11 * 13 = 1001 voxels: every integer percentile falls on a voxel value
        x = rng.gamma(2.0 + i, 10.0 * (i + 1), size=(7, 11, 13)).astype(np.float32) + 5 * i
        images.append(jmed.ScalarImage(x))
    return images


def test_histogram_percentiles():
    np.testing.assert_array_equal(histogram_percentiles(), [1, 10, 20, 30, 40, 50, 60, 70, 80, 90, 99])
    np.testing.assert_array_equal(histogram_percentiles((2, 98), "quartiles"), [2, 25, 50, 75, 98])
    with pytest.raises(ValueError, match="strictly inside"):
        histogram_percentiles((20, 80), "deciles")
    with pytest.raises(ValueError, match="cutoff"):
        histogram_percentiles((99, 1))


def test_train_histogram_matches_definition():
    images = _training_images()
    landmarks = train_histogram(images, output_range=(0, 100))
    p = histogram_percentiles()
    mapped = []
    for im in images:
        v = np.percentile(np.asarray(im.data, np.float64), p)
        mapped.append((v - v[0]) / (v[-1] - v[0]) * 100)
    np.testing.assert_allclose(landmarks, np.mean(mapped, 0), rtol=1e-6)
    assert landmarks[0] == 0 and landmarks[-1] == pytest.approx(100)


def test_histogram_standardization_maps_landmarks_exactly(run):
    images = _training_images()
    landmarks = train_histogram(images, quantiles="quartiles", cutoff=(2, 98))
    t = HistogramStandardization(landmarks, quantiles="quartiles", cutoff=(2, 98))
    for image in images:
        out = run(lambda k, s: t(s), None, jmed.Subject(t1=image))
        values = np.asarray(out.t1.data, np.float64)
        np.testing.assert_allclose(np.percentile(values, t.percentiles), landmarks, rtol=1e-5, atol=1e-4)
        # monotonic: the order of voxels is kept
        order = np.argsort(np.asarray(image.data).ravel(), kind="stable")
        assert np.all(np.diff(values.ravel()[order]) >= -1e-5)


def test_histogram_standardization_masks_and_progress(tmp_path, capsys):
    images = _training_images(2)
    arrays = [np.asarray(im.data) for im in images]
    masks = [a > 20 for a in arrays]
    landmarks = train_histogram(arrays, masks=masks, progress=True)
    err = capsys.readouterr().err
    assert "train_histogram" in err and "2/2" in err and "100%" in err  # a tqdm bar
    same = train_histogram(images, masks=lambda x: x > 20)
    assert capsys.readouterr().err == ""
    np.testing.assert_array_equal(landmarks, same)
    subject = jmed.Subject(t1=images[0], brain=jmed.LabelMap(masks[0]))
    out = HistogramStandardization(landmarks, masking_method="brain")(subject)
    x = np.asarray(images[0].data, np.float64)
    v = np.percentile(x[masks[0]], histogram_percentiles())
    # independent reference: interpolate through (v, landmarks), end segments extended
    expected = np.interp(x, v, landmarks)
    low_slope = (landmarks[1] - landmarks[0]) / (v[1] - v[0])
    high_slope = (landmarks[-1] - landmarks[-2]) / (v[-1] - v[-2])
    expected = np.where(x < v[0], landmarks[0] + (x - v[0]) * low_slope, expected)
    expected = np.where(x > v[-1], landmarks[-1] + (x - v[-1]) * high_slope, expected)
    assert (x < v[0]).any() and (x > v[-1]).any()
    np.testing.assert_allclose(np.asarray(out.t1.data), expected, rtol=1e-5, atol=1e-4)


def test_landmarks_save_load(tmp_path):
    images = _training_images(2)
    path = tmp_path / "landmarks.json"
    landmarks = train_histogram(images, output_path=path)
    loaded, percentiles = load_landmarks(path)
    np.testing.assert_allclose(loaded, landmarks)
    np.testing.assert_array_equal(percentiles, histogram_percentiles())
    save_landmarks(landmarks, tmp_path / "l.npy")
    a = HistogramStandardization(str(tmp_path / "l.npy"))(images[0])
    b = HistogramStandardization({"image": path})(images[0])
    np.testing.assert_allclose(a.data, b.data)
    with pytest.raises(ValueError, match="trained for percentiles"):
        HistogramStandardization(path, quantiles="quartiles")
    with pytest.raises(ValueError, match=".npy or .json"):
        save_landmarks(landmarks, tmp_path / "l.txt")


def test_histogram_standardization_bad_input():
    with pytest.raises(ValueError, match="expected 11 landmarks"):
        HistogramStandardization(np.linspace(0, 100, 5))
    with pytest.raises(ValueError, match="non-decreasing"):
        HistogramStandardization(np.linspace(100, 0, 11))
    with pytest.raises(ValueError, match="one per image"):
        train_histogram(_training_images(2), masks=[None])
    with pytest.raises(ValueError, match="at least one image"):
        train_histogram([])
    with pytest.raises(ValueError, match="empty"):
        train_histogram([np.ones((3, 3, 3))], masks=[np.zeros((3, 3, 3))])


def _torchio_rule(x, xp, fp, epsilon=1e-5):
    """TorchIO's mapping written with numpy's digitize (bins of the inner knots)."""
    xp, fp, x = (np.asarray(a, np.float64) for a in (xp, fp, x))
    width = np.diff(xp)
    slope = np.diff(fp) / np.where(width < epsilon, np.inf, width)
    intercept = fp[:-1] - slope * xp[:-1]
    segment = np.digitize(x, xp[1:-1], right=False)
    return slope[segment] * x + intercept[segment]


def test_piecewise_linear_map_with_tied_percentiles():
    from jmed.transforms.normalization import _piecewise_linear

    xp = np.array([0.0, 1.0, 1.0, 3.0, 7.0], np.float32)  # a tie at 1
    fp = np.array([0.0, 10.0, 20.0, 40.0, 50.0], np.float32)
    x = np.array([-2.0, 0.5, 1.0, 1.5, 3.0, 5.0, 9.0], np.float32)
    expected = [-20.0, 5.0, 20.0, 25.0, 40.0, 45.0, 55.0]  # 1 maps to the last tied landmark
    np.testing.assert_allclose(_torchio_rule(x, xp, fp), expected, atol=1e-9)
    np.testing.assert_allclose(_piecewise_linear(x, xp, fp), expected, rtol=1e-6, atol=1e-5)
    # ties at both ends: flat below the first tie and from the last tie on
    xp = np.array([2.0, 2.0, 4.0, 4.0], np.float32)
    fp = np.array([0.0, 10.0, 30.0, 50.0], np.float32)
    x = np.array([1.0, 2.0, 3.0, 4.0, 5.0], np.float32)
    np.testing.assert_allclose(_torchio_rule(x, xp, fp), [0.0, 10.0, 20.0, 30.0, 30.0], atol=1e-9)
    np.testing.assert_allclose(_piecewise_linear(x, xp, fp), [0.0, 10.0, 20.0, 30.0, 30.0], atol=1e-6)
    # percentiles closer than 1e-5 are tied too; random knots with many ties
    rng = np.random.default_rng(0)
    for _ in range(20):
        xp = np.sort(rng.choice([0.0, 0.0, 1.0, 2.5, 2.500004, 3.0, 8.0], 11)).astype(np.float32)
        fp = np.sort(rng.uniform(0, 100, 11)).astype(np.float32)
        x = np.concatenate([xp, rng.uniform(-2, 10, 50)]).astype(np.float32)
        np.testing.assert_allclose(
            _piecewise_linear(x, xp, fp), _torchio_rule(x, xp, fp), rtol=1e-5, atol=1e-3
        )


def test_histogram_standardization_background_ties_follow_torchio(run):
    # a background of zeros fills the lowest percentiles (1 to 30): zero maps to the
    # landmark of the 30th percentile, as in TorchIO
    rng = np.random.default_rng(3)
    data = np.zeros((31, 29, 27), np.float32)
    data[:, :, 9:] = rng.gamma(4.0, 20.0, (31, 29, 18)).astype(np.float32)
    landmarks = np.linspace(0.0, 100.0, 11)
    t = HistogramStandardization(landmarks)
    out = run(lambda k, s: t(s), None, jmed.Subject(t1=jmed.ScalarImage(data)))
    p = np.percentile(data.astype(np.float64), t.percentiles)
    assert (p[:4] == 0).all() and p[4] > 0
    expected = _torchio_rule(data, p, landmarks)
    np.testing.assert_allclose(np.asarray(out.t1.data)[..., 0], expected, rtol=1e-5, atol=1e-3)
    assert np.asarray(out.t1.data)[0, 0, 0, 0] == pytest.approx(landmarks[3])


def test_histogram_standardization_accepts_torchio_landmarks(tmp_path):
    # TorchIO trains 13 landmarks (1, 10, 20, 25, 30, ..., 75, 80, 90, 99) and applies the
    # 11 that are not quartiles
    images = _training_images(2)
    landmarks13 = np.linspace(0.0, 100.0, 13) ** 1.1
    eleven = np.delete(landmarks13, [3, 9])
    expected = HistogramStandardization(eleven)(images[0]).data
    np.testing.assert_array_equal(HistogramStandardization(landmarks13)(images[0]).data, expected)
    (tmp_path / "t1.txt").write_text("image " + " ".join(map(str, landmarks13)))
    np.testing.assert_array_equal(
        HistogramStandardization(str(tmp_path / "t1.txt"))(images[0]).data, expected
    )
    with pytest.raises(ValueError, match="expected 11 landmarks"):
        HistogramStandardization(np.linspace(0, 100, 12))
