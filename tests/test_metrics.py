import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from jmed import metrics


def _random_labels(seed, shape, num_classes):
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, num_classes, size=tuple(max(s // 4, 1) for s in shape))
    return np.kron(coarse, np.ones((4, 4, 4), int))[: shape[0], : shape[1], : shape[2]].astype(np.int32)


# --- Dice -----------------------------------------------------------------------------


def test_dice_score_hand_computed():
    pred = np.zeros((4, 1, 1), np.int32)
    target = np.zeros((4, 1, 1), np.int32)
    pred[:, 0, 0] = [0, 1, 1, 1]
    target[:, 0, 0] = [0, 0, 1, 1]
    d = np.asarray(metrics.dice_score(pred, target, num_classes=3))
    # class 0: P={0}, T={0,1}: 2*1/3; class 1: P={1,2,3}, T={2,3}: 2*2/5; class 2 absent
    np.testing.assert_allclose(d[:2], [2 / 3, 4 / 5], rtol=1e-6)
    assert np.isnan(d[2])
    d = np.asarray(metrics.dice_score(pred, target, num_classes=3, ignore_empty=False))
    np.testing.assert_allclose(d, [2 / 3, 4 / 5, 1.0], rtol=1e-6)
    d = np.asarray(metrics.dice_score(pred, target, num_classes=3, include_background=False))
    assert d.shape == (2,)


def test_dice_score_empty_target_nonempty_prediction():
    pred = np.ones((2, 2, 2), np.int32)
    target = np.zeros((2, 2, 2), np.int32)
    assert np.isnan(metrics.dice_score(pred, target, num_classes=2)[1])
    assert float(metrics.dice_score(pred, target, num_classes=2, ignore_empty=False)[1]) == 0.0


def test_dice_score_from_logits_batched_and_channel_axis():
    labels = np.stack([_random_labels(s, (8, 8, 8), 3) for s in range(2)])
    target = np.stack([_random_labels(s + 10, (8, 8, 8), 3) for s in range(2)])
    logits = jax.nn.one_hot(labels, 3) * 5.0
    d_logits = metrics.dice_score(logits, target[..., None])
    d_labels = metrics.dice_score(labels[..., None], target, num_classes=3)
    np.testing.assert_allclose(d_logits, d_labels)
    # numpy reference
    for b in range(2):
        for c in range(3):
            p, t = labels[b] == c, target[b] == c
            np.testing.assert_allclose(d_labels[b, c], 2 * (p & t).sum() / (p.sum() + t.sum()), rtol=1e-6)


def test_dice_jit():
    labels = _random_labels(0, (8, 8, 8), 3)
    target = _random_labels(1, (8, 8, 8), 3)
    fn = functools.partial(metrics.dice_score, num_classes=3)
    np.testing.assert_allclose(jax.jit(fn)(labels, target), fn(labels, target))
    # vmap over a batch gives each item's Dice
    batch = np.stack([labels, target]), np.stack([target, labels])
    per_item = jax.vmap(fn)(*batch)
    np.testing.assert_allclose(per_item[0], fn(labels, target))
    np.testing.assert_allclose(per_item[1], fn(target, labels))
    with pytest.raises(
        ValueError, match=r"\(8, 8, 8\) and target \(8, 8, 7\) must have the same spatial shape"
    ):
        fn(labels, target[:, :, :7])
    with pytest.raises(ValueError, match="num_classes must be a positive integer, got 0"):
        metrics.dice_score(labels, target, num_classes=0)


def test_soft_dice_and_loss_numpy_reference():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((2, 6, 5, 4, 3)).astype(np.float32)
    labels = rng.integers(0, 3, (2, 6, 5, 4)).astype(np.int32)
    p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    t = np.eye(3)[labels]
    inter = (p * t).sum((1, 2, 3))
    denom = p.sum((1, 2, 3)) + t.sum((1, 2, 3))
    expected = (2 * inter + 1e-5) / (denom + 1e-5)
    np.testing.assert_allclose(metrics.soft_dice(p, labels), expected, rtol=1e-5)
    np.testing.assert_allclose(metrics.dice_loss(logits, labels), 1 - expected.mean(), rtol=1e-5)
    np.testing.assert_allclose(
        metrics.dice_loss(logits, labels, include_background=False), 1 - expected[:, 1:].mean(), rtol=1e-5
    )
    batch = (2 * inter.sum(0) + 1e-5) / (denom.sum(0) + 1e-5)
    np.testing.assert_allclose(metrics.soft_dice(p, labels, batch=True), batch, rtol=1e-5)
    squared = (2 * inter + 1e-5) / ((p**2).sum((1, 2, 3)) + t.sum((1, 2, 3)) + 1e-5)
    np.testing.assert_allclose(metrics.soft_dice(p, labels, squared=True), squared, rtol=1e-5)


def test_dice_loss_gradient_is_finite_and_loss_decreases():
    labels = _random_labels(0, (8, 8, 8), 3)
    logits = jnp.zeros((8, 8, 8, 3))
    loss, grad = jax.jit(jax.value_and_grad(metrics.dice_ce_loss))(logits, labels)
    assert np.all(np.isfinite(grad))
    assert float(metrics.dice_ce_loss(logits - 0.5 * grad / jnp.abs(grad).max(), labels)) < float(loss)


def test_cross_entropy_numpy_reference():
    rng = np.random.default_rng(1)
    logits = rng.standard_normal((5, 4, 3, 4)).astype(np.float32)
    labels = rng.integers(0, 4, (5, 4, 3, 1)).astype(np.int32)
    log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    nll = -np.take_along_axis(log_p, labels, -1)[..., 0]
    np.testing.assert_allclose(metrics.cross_entropy(logits, labels), nll.mean(), rtol=1e-5)
    w = np.array([0.1, 1.0, 2.0, 3.0], np.float32)
    wv = w[labels[..., 0]]
    np.testing.assert_allclose(
        metrics.cross_entropy(logits, labels, class_weights=w), (wv * nll).sum() / wv.sum(), rtol=1e-5
    )
    np.testing.assert_allclose(
        metrics.dice_ce_loss(logits, labels, dice_weight=0.5, ce_weight=2.0),
        0.5 * metrics.dice_loss(logits, labels) + 2.0 * nll.mean(),
        rtol=1e-5,
    )


def test_generalized_dice_hand_computed():
    # 1 batch item, 4 voxels, 2 classes, probabilities given directly
    p = np.array([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8], [0.3, 0.7]], np.float32).reshape(4, 1, 1, 2)
    labels = np.array([0, 0, 0, 1]).reshape(4, 1, 1)
    w = np.array([1 / 9, 1.0])
    inter = np.array([0.9 + 0.6 + 0.2, 0.7])
    denom = np.array([2.0 + 3, 2.0 + 1])
    expected = (2 * (w * inter).sum() + 1e-5) / ((w * denom).sum() + 1e-5)
    np.testing.assert_allclose(metrics.generalized_dice_score(p, labels), expected, rtol=1e-5)
    logits = np.log(p)
    np.testing.assert_allclose(metrics.generalized_dice_loss(logits, labels), 1 - expected, rtol=1e-5)
    # an absent class gets the largest weight of the present ones
    labels0 = np.zeros((4, 1, 1), int)
    inter0 = np.array([0.9 + 0.6 + 0.2 + 0.3, 0.0])
    denom0 = np.array([2.0 + 4, 2.0 + 0])
    expected0 = (2 * (inter0 / 16).sum() + 1e-5) / ((denom0 / 16).sum() + 1e-5)
    np.testing.assert_allclose(metrics.generalized_dice_score(p, labels0), expected0, rtol=1e-5)


def test_bad_inputs():
    with pytest.raises(ValueError, match="labels must have shape"):
        metrics.dice_loss(np.zeros((4, 4, 4, 2)), np.zeros((4, 4, 3), int))
    with pytest.raises(TypeError, match="integer label map"):
        metrics.cross_entropy(np.zeros((4, 4, 4, 2)), np.zeros((4, 4, 4)))
    with pytest.raises(ValueError, match="num_classes is required"):
        metrics.dice_score(np.zeros((4, 4, 4), int), np.zeros((4, 4, 4), int))
    with pytest.raises(ValueError, match="spacing"):
        metrics.distance_transform(np.ones((3, 3, 3), bool), spacing=(1, 0, 1))
    with pytest.raises(ValueError, match="percentile"):
        metrics.hausdorff_distance(
            np.zeros((4, 4, 4), int), np.zeros((4, 4, 4), int), num_classes=2, percentile=101
        )


# --- distances --------------------------------------------------------------------------


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (0.7, 2.0, 1.3)])
def test_distance_transform_matches_scipy(spacing):
    rng = np.random.default_rng(0)
    mask = rng.random((9, 11, 7)) < 0.03
    mask[4, 5, 3] = True
    ours = np.asarray(metrics.distance_transform(mask, spacing))
    ref = ndimage.distance_transform_edt(~mask, sampling=spacing)
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)


def test_distance_transform_batched_and_empty():
    masks = np.zeros((2, 5, 5, 5), bool)
    masks[0, 2, 2, 2] = True
    out = np.asarray(metrics.distance_transform(masks))
    np.testing.assert_allclose(out[0], ndimage.distance_transform_edt(~masks[0]), rtol=1e-6)
    assert np.all(np.isinf(out[1]))


def _reference_surface_distances(pred, target, spacing):
    """scipy reference: surfaces by erosion (border outside), distances by EDT."""

    def surface(m):
        return m & ~ndimage.binary_erosion(m, border_value=0)

    sp, st = surface(pred), surface(target)
    d_pt = ndimage.distance_transform_edt(~st, sampling=spacing)[sp]
    d_tp = ndimage.distance_transform_edt(~sp, sampling=spacing)[st]
    return d_pt, d_tp


def _blob(center, radii, shape):
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
    return (((grid - np.array(center)) / np.array(radii)) ** 2).sum(-1) <= 1


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (1.5, 0.8, 2.5)])
def test_hausdorff_and_asd_match_scipy_reference(spacing):
    shape = (20, 18, 16)
    target = np.zeros(shape, np.int32)
    pred = np.zeros(shape, np.int32)
    target[_blob((10, 9, 8), (6, 5, 4), shape)] = 1
    target[_blob((6, 6, 6), (2, 2, 2), shape)] = 2
    pred[_blob((11, 8, 8), (5, 6, 4), shape)] = 1
    pred[_blob((7, 6, 5), (2, 3, 2), shape)] = 2
    pred[15:17, 2:4, 12:14] = 2  # a distant false positive: the tail that HD95 ignores
    hd95 = np.asarray(metrics.hausdorff_distance(pred, target, spacing=spacing, num_classes=3))
    hd100 = np.asarray(
        metrics.hausdorff_distance(pred, target, spacing=spacing, num_classes=3, percentile=100)
    )
    assd = np.asarray(metrics.average_surface_distance(pred, target, spacing=spacing, num_classes=3))
    asd = np.asarray(
        metrics.average_surface_distance(pred, target, spacing=spacing, num_classes=3, symmetric=False)
    )
    assert hd95.shape == (2,)
    for i, c in enumerate((1, 2)):
        d_pt, d_tp = _reference_surface_distances(pred == c, target == c, spacing)
        np.testing.assert_allclose(hd95[i], max(np.percentile(d_pt, 95), np.percentile(d_tp, 95)), rtol=1e-5)
        np.testing.assert_allclose(hd100[i], max(d_pt.max(), d_tp.max()), rtol=1e-5)
        np.testing.assert_allclose(assd[i], np.concatenate([d_pt, d_tp]).mean(), rtol=1e-5)
        np.testing.assert_allclose(asd[i], d_pt.mean(), rtol=1e-5)
    assert hd100[1] > hd95[1]


def test_surface_distance_hand_computed_and_empty_classes():
    pred = np.zeros((3, 8, 3), np.int32)
    target = np.zeros((3, 8, 3), np.int32)
    pred[1, 1, 1] = 1
    target[1, 4, 1] = 1
    pred[0, 0, 0] = 2  # class 2 only in the prediction; class 3 in neither
    hd = np.asarray(
        metrics.hausdorff_distance(pred, target, spacing=(1, 2, 1), num_classes=4, percentile=100)
    )
    np.testing.assert_allclose(hd[0], 6.0)  # 3 voxels along y at 2 mm
    assert np.isinf(hd[1]) and np.isnan(hd[2])
    asd = np.asarray(metrics.average_surface_distance(pred, target, spacing=(1, 2, 1), num_classes=4))
    np.testing.assert_allclose(asd[0], 6.0)
    assert np.isinf(asd[1]) and np.isnan(asd[2])


def test_surface_distances_batch_and_traced_inputs_refused():
    target = np.stack([_random_labels(s, (12, 12, 8), 2) for s in range(2)])
    pred = np.stack([_random_labels(s + 5, (12, 12, 8), 2) for s in range(2)])
    fn = functools.partial(metrics.hausdorff_distance, spacing=(1.0, 1.2, 2.0), num_classes=2)
    batched = np.asarray(fn(pred, target))
    assert batched.shape == (2, 1)
    for b in range(2):
        np.testing.assert_allclose(batched[b], fn(pred[b], target[b]), rtol=1e-6)
        d_pt, d_tp = _reference_surface_distances(pred[b] == 1, target[b] == 1, (1.0, 1.2, 2.0))
        np.testing.assert_allclose(
            batched[b, 0], max(np.percentile(d_pt, 95), np.percentile(d_tp, 95)), rtol=1e-5
        )
    # exact distance transforms run on the host: traced inputs get a clear error
    for call in (fn, functools.partial(metrics.average_surface_distance, num_classes=2)):
        with pytest.raises(TypeError, match="cannot be traced"):
            jax.jit(call)(pred, target)
        with pytest.raises(TypeError, match="cannot be traced"):
            jax.vmap(call)(pred, target)
    with pytest.raises(TypeError, match="distance_transform .* traced mask"):
        jax.jit(metrics.distance_transform)(pred == 1)


def test_bounding_box_crop_equals_full_volume_reference():
    # each class is computed on its bounding box; structures touching the array border
    # and small ones far from it must give the full-volume result
    shape = (30, 26, 20)
    target = np.zeros(shape, np.int32)
    pred = np.zeros(shape, np.int32)
    target[_blob((5, 5, 4), (3, 4, 3), shape)] = 1  # small structure
    pred[_blob((6, 5, 4), (3, 3, 3), shape)] = 1
    target[25:30, 20:26, 15:20] = 2  # touching the array border
    pred[24:30, 21:26, 14:20] = 2
    spacing = (1.2, 0.9, 2.0)
    hd = np.asarray(metrics.hausdorff_distance(pred, target, spacing=spacing, num_classes=3))
    assd = np.asarray(metrics.average_surface_distance(pred, target, spacing=spacing, num_classes=3))
    for i, c in enumerate((1, 2)):
        d_pt, d_tp = _reference_surface_distances(pred == c, target == c, spacing)
        np.testing.assert_allclose(hd[i], max(np.percentile(d_pt, 95), np.percentile(d_tp, 95)), rtol=1e-5)
        np.testing.assert_allclose(assd[i], np.concatenate([d_pt, d_tp]).mean(), rtol=1e-5)
    assert np.all(np.isfinite(hd)) and np.all(hd > 0)


def test_surface_distances_full_volume_matches_scipy():
    pred = np.zeros((2, 10, 9, 8), bool)
    target = np.zeros((2, 10, 9, 8), bool)
    pred[0, 2:7, 1:6, 0:5] = True  # touches the border along z
    target[0, 3:9, 2:8, 1:6] = True
    pred[1, 4, 4, 4] = True  # target 1 empty: distances to it are inf
    spacing = (0.8, 1.0, 1.7)
    d_pred, s_pred, d_tgt, s_tgt = (np.asarray(x) for x in metrics.surface_distances(pred, target, spacing))
    d_pt, d_tp = _reference_surface_distances(pred[0], target[0], spacing)
    np.testing.assert_allclose(d_pred[0][s_pred[0]], d_pt, rtol=1e-5)
    np.testing.assert_allclose(d_tgt[0][s_tgt[0]], d_tp, rtol=1e-5)
    assert s_pred[1].sum() == 1 and not s_tgt[1].any() and np.all(np.isinf(d_pred[1]))
    with pytest.raises(ValueError, match="different shapes"):
        metrics.surface_distances(pred, target[..., :7])


def test_surface_distance_2d_slice_uses_the_in_plane_contour():
    # a 2D image is one slice (x, y, 1): its surface is the contour of each region
    pred = np.zeros((9, 9, 1), np.int32)
    target = np.zeros((9, 9, 1), np.int32)
    target[2:7, 2:7] = 1  # 5x5 square: 16 contour pixels, 9 inside
    pred[2:7, 3:8] = 1  # the same square one pixel further along y
    hd100 = float(metrics.hausdorff_distance(pred, target, num_classes=2, percentile=100)[0])
    # hand-computed: every contour pixel of either square lies on, or one pixel along y
    # from, the other square's contour
    assert hd100 == 1.0
    _, s_pred, _, s_tgt = metrics.surface_distances(pred == 1, target == 1)
    assert int(np.asarray(s_tgt).sum()) == 16 and int(np.asarray(s_pred).sum()) == 16
    # spacing along the missing axis plays no part; along y it scales the distances
    hd_y = metrics.hausdorff_distance(pred, target, num_classes=2, percentile=100, spacing=(1.0, 2.5, 7.0))
    np.testing.assert_allclose(hd_y, [2.5])
    d_pt, d_tp = _reference_surface_distances_2d(pred[..., 0] == 1, target[..., 0] == 1, (1.0, 2.5))
    assd = metrics.average_surface_distance(pred, target, num_classes=2, spacing=(1.0, 2.5, 7.0))
    np.testing.assert_allclose(assd, [np.concatenate([d_pt, d_tp]).mean()], rtol=1e-6)


def _reference_surface_distances_2d(pred, target, spacing):
    def surface(m):
        return m & ~ndimage.binary_erosion(m, border_value=0)

    sp, st = surface(pred), surface(target)
    return (
        ndimage.distance_transform_edt(~st, sampling=spacing)[sp],
        ndimage.distance_transform_edt(~sp, sampling=spacing)[st],
    )


def _monai_onehot(labels, num_classes):
    torch = pytest.importorskip("torch")
    onehot = torch.nn.functional.one_hot(torch.from_numpy(labels).long(), num_classes)
    return onehot.movedim(-1, 0)[None]


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (0.7, 1.8, 1.2)])
def test_surface_metrics_match_monai(spacing):
    monai_metrics = pytest.importorskip("monai.metrics")
    shape = (24, 20, 18)
    target = np.zeros(shape, np.int32)
    pred = np.zeros(shape, np.int32)
    target[_blob((12, 10, 9), (7, 6, 5), shape)] = 1
    target[_blob((5, 5, 5), (3, 3, 2), shape)] = 2
    target[20:24, 0:5, 12:18] = 3  # at the array border
    pred[_blob((13, 9, 9), (6, 7, 5), shape)] = 1
    pred[_blob((6, 5, 4), (3, 2, 3), shape)] = 2
    pred[19:24, 0:4, 13:18] = 3
    pred[1:3, 16:18, 1:3] = 2  # a distant false positive
    p_t, t_t = _monai_onehot(pred, 4), _monai_onehot(target, 4)
    for percentile in (95, 100):
        ours = np.asarray(
            metrics.hausdorff_distance(pred, target, spacing=spacing, num_classes=4, percentile=percentile)
        )
        theirs = monai_metrics.compute_hausdorff_distance(p_t, t_t, percentile=percentile, spacing=spacing)
        np.testing.assert_allclose(ours, theirs.numpy()[0], rtol=1e-5)
    for symmetric in (True, False):
        ours = np.asarray(
            metrics.average_surface_distance(
                pred, target, spacing=spacing, num_classes=4, symmetric=symmetric
            )
        )
        theirs = monai_metrics.compute_average_surface_distance(
            p_t, t_t, symmetric=symmetric, spacing=spacing
        )
        np.testing.assert_allclose(ours, theirs.numpy()[0], rtol=1e-5)


def test_surface_metrics_match_monai_2d():
    monai_metrics = pytest.importorskip("monai.metrics")
    rng = np.random.default_rng(3)
    target = (ndimage.gaussian_filter(rng.normal(size=(40, 36)), 3) > 0).astype(np.int32)
    pred = (ndimage.gaussian_filter(rng.normal(size=(40, 36)), 3) > 0.02).astype(np.int32)
    spacing = (0.9, 1.4)
    p_t, t_t = _monai_onehot(pred, 2), _monai_onehot(target, 2)
    hd = metrics.hausdorff_distance(
        pred[..., None], target[..., None], spacing=(*spacing, 3.0), num_classes=2
    )
    np.testing.assert_allclose(
        hd,
        monai_metrics.compute_hausdorff_distance(p_t, t_t, percentile=95, spacing=spacing).numpy()[0],
        rtol=1e-5,
    )
    assd = metrics.average_surface_distance(
        pred[..., None], target[..., None], spacing=(*spacing, 3.0), num_classes=2
    )
    np.testing.assert_allclose(
        assd,
        monai_metrics.compute_average_surface_distance(p_t, t_t, symmetric=True, spacing=spacing).numpy()[0],
        rtol=1e-5,
    )


def test_surface_metrics_from_scores_and_bad_inputs():
    target = _random_labels(0, (12, 10, 8), 3)
    pred = _random_labels(4, (12, 10, 8), 3)
    logits = np.asarray(jax.nn.one_hot(pred, 3)) * 4.0 - 1.0
    for fn in (metrics.hausdorff_distance, metrics.average_surface_distance):
        from_labels = np.asarray(fn(pred[..., None], target, num_classes=3, include_background=True))
        np.testing.assert_array_equal(fn(logits, target[..., None], include_background=True), from_labels)
        assert from_labels.shape == (3,) and np.all(np.isfinite(from_labels))
        with pytest.raises(ValueError, match="num_classes is required"):
            fn(pred, target)
        with pytest.raises(ValueError, match="must have the same spatial shape"):
            fn(pred, target[:, :, :7], num_classes=3)
        with pytest.raises(ValueError, match="num_classes=2 does not match"):
            fn(logits, target, num_classes=2)


def test_metric_errors_name_target_and_take_numpy_integers():
    prediction = np.zeros((4, 4, 4, 1), np.int32)
    with pytest.raises(ValueError, match="target"):
        metrics.dice_score(prediction, np.zeros((4, 4), np.int32), num_classes=2)
    with pytest.raises(ValueError, match="target"):
        metrics.hausdorff_distance(prediction, np.zeros((4, 4), np.int32), num_classes=2)
    target = np.zeros((4, 4, 4, 1), np.int32)
    target[1:3, 1:3, 1:3] = 1
    a = np.asarray(metrics.dice_score(target, target, num_classes=np.int64(2)))
    np.testing.assert_allclose(a, np.asarray(metrics.dice_score(target, target, num_classes=2)))
