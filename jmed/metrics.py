"""Segmentation metrics and losses.

Array contract (channels last, as everywhere in jmed):

- ``logits`` / ``probabilities``: float arrays ``(..., x, y, z, num_classes)``; ``...`` are
  any batch axes.
- ``labels``: integer label maps ``(..., x, y, z)`` or ``(..., x, y, z, 1)``. For
  functions that also take a float prediction, the label map's rank relative to the
  prediction tells which form it is. Functions that take two integer label maps treat a
  trailing axis of size 1 as the channel axis (jmed's ``LabelMap`` data layout).
- Metrics return one value per class and per batch item, shape ``(..., num_classes)``
  (or ``num_classes - 1`` with ``include_background=False``, which drops class 0); losses
  return a scalar (the mean over batch items and classes).

**Empty classes.** A class absent from the *target* has no defined Dice. With
``ignore_empty=True`` (the default, as MONAI's ``DiceMetric``) its score is ``nan``
whatever the prediction, so ``jnp.nanmean`` averages over the classes present. With
``ignore_empty=False`` it scores ``1.0`` when the prediction is empty too and ``0.0``
otherwise. The soft losses add ``smooth`` to numerator and denominator instead, so a class
absent from both prediction and target contributes a loss of 0.

**Surface distances** (``hausdorff_distance``, ``average_surface_distance``) are in
millimetres, computed from the voxel ``spacing``. A class absent from both prediction and
target gives ``nan``; absent from exactly one of them gives ``inf``. The surface of a mask
is the set of its voxels with at least one of their 6 face neighbours outside the mask
(voxels on the array border count as surface; an axis of length 1 has no neighbours, so a
2D slice ``(x, y, 1)`` has its in-plane contour as surface). Distances come from an exact
Euclidean distance transform (the ``edt`` package) on the bounding box of each class's
prediction and target. These functions run on the host, on concrete arrays: they raise
``TypeError`` when traced (under ``jit``, ``vmap`` or ``grad``). Dice, the losses and
``one_hot`` are jittable.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import edt
import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from jmed._checks import is_int, is_traced
from jmed.ops.histogram import count_true

__all__ = [
    "average_surface_distance",
    "cross_entropy",
    "dice_ce_loss",
    "dice_loss",
    "dice_score",
    "distance_transform",
    "generalized_dice_loss",
    "generalized_dice_score",
    "hausdorff_distance",
    "one_hot",
    "soft_dice",
    "surface_distances",
]

_SPATIAL = (-4, -3, -2)  # spatial axes of a channels-last (..., x, y, z, c) array


def _is_integer(x: jax.Array) -> bool:
    return jnp.issubdtype(x.dtype, jnp.integer) or x.dtype == jnp.bool_


def _check_num_classes(num_classes, name: str = "num_classes") -> int:
    if not is_int(num_classes) or num_classes < 1:
        raise ValueError(f"{name} must be a positive integer, got {num_classes!r}")
    return int(num_classes)


def _labels_like(labels: ArrayLike, scores: jax.Array, name: str = "labels") -> jax.Array:
    """Integer labels shaped ``scores.shape[:-1]`` (drops a trailing channel axis of 1)."""
    labels = jnp.asarray(labels)
    if not _is_integer(labels):
        raise TypeError(f"{name} must be an integer label map, got dtype {labels.dtype}")
    if labels.ndim == scores.ndim and labels.shape[-1] == 1:
        labels = labels[..., 0]
    if labels.shape != scores.shape[:-1]:
        raise ValueError(
            f"{name} must have shape {scores.shape[:-1]} or {(*scores.shape[:-1], 1)} to match "
            f"the prediction {scores.shape} (channels last), got {labels.shape}"
        )
    return labels.astype(jnp.int32)


def _squeeze_channel(labels: ArrayLike, name: str) -> jax.Array:
    labels = jnp.asarray(labels)
    if labels.ndim >= 4 and labels.shape[-1] == 1:
        labels = labels[..., 0]
    if labels.ndim < 3:
        raise ValueError(f"{name} must have at least 3 spatial dimensions, got shape {labels.shape}")
    return labels


def _scores(prediction: ArrayLike, name: str = "logits") -> jax.Array:
    prediction = jnp.asarray(prediction)
    if _is_integer(prediction):
        raise TypeError(
            f"{name} must be floating point (..., x, y, z, num_classes), got dtype {prediction.dtype}"
        )
    if prediction.ndim < 4:
        raise ValueError(f"{name} must have shape (..., x, y, z, num_classes), got {prediction.shape}")
    return prediction


def one_hot(labels: ArrayLike, num_classes: int, *, dtype=jnp.float32) -> jax.Array:
    """One-hot encode an integer label map ``(..., x, y, z[, 1])`` to ``(..., x, y, z, C)``.

    Labels outside ``[0, num_classes)`` give all-zero vectors.

    Examples:
        >>> import jax.numpy as jnp
        >>> one_hot(jnp.array([[[0, 2]]]), 3)[0, 0].tolist()
        [[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]
    """
    num_classes = _check_num_classes(num_classes)
    labels = _squeeze_channel(labels, "labels")
    return jax.nn.one_hot(labels, num_classes, dtype=dtype)


def _drop_background(values: jax.Array, include_background: bool) -> jax.Array:
    return values if include_background else values[..., 1:]


def _hard_one_hot(prediction: ArrayLike, num_classes: int | None, name: str) -> jax.Array:
    prediction = jnp.asarray(prediction)
    if _is_integer(prediction):
        if num_classes is None:
            raise ValueError(f"num_classes is required when {name} is an integer label map")
        return one_hot(prediction, _check_num_classes(num_classes), dtype=jnp.bool_)
    prediction = _scores(prediction, name)
    if num_classes is not None and num_classes != prediction.shape[-1]:
        raise ValueError(
            f"num_classes={num_classes} does not match the last axis of {name} {prediction.shape}"
        )
    return jax.nn.one_hot(jnp.argmax(prediction, -1), prediction.shape[-1], dtype=jnp.bool_)


def _one_hot_pair(prediction, target, num_classes):
    """Boolean one-hot maps ``(..., x, y, z, C)`` of a hard prediction and its target."""
    pred = _hard_one_hot(prediction, num_classes, "prediction")
    tgt = jax.nn.one_hot(_squeeze_channel(target, "target"), pred.shape[-1], dtype=jnp.bool_)
    if tgt.shape != pred.shape:
        raise ValueError(
            f"prediction {pred.shape[:-1]} and target {tgt.shape[:-1]} must have the same spatial shape"
        )
    return pred, tgt


@functools.partial(jax.jit, static_argnums=2)
def _overlap_counts(prediction, target, num_classes):
    """Per-class ``|P ∩ T|``, ``|P|`` and ``|T|`` over the spatial axes (float32 ``(..., C)``).

    One compiled variadic reduction reads each voxel once, instead of one sum over a
    materialised one-hot map per quantity.
    """
    pred, tgt = _one_hot_pair(prediction, target, num_classes)
    sums = count_true([pred & tgt, pred, tgt], axes=tuple(a % pred.ndim for a in _SPATIAL))
    return tuple(x.astype(jnp.float32) for x in sums)


def dice_score(
    prediction: ArrayLike,
    target: ArrayLike,
    *,
    num_classes: int | None = None,
    include_background: bool = True,
    ignore_empty: bool = True,
) -> jax.Array:
    """Hard Dice coefficient per class, ``2 |P ∩ T| / (|P| + |T|)``.

    Args:
        prediction: integer label map ``(..., x, y, z[, 1])``, or logits/probabilities
            ``(..., x, y, z, C)`` (their argmax over the last axis is used).
        target: integer label map ``(..., x, y, z[, 1])``.
        num_classes: number of classes ``C``; required when ``prediction`` is a label map.
        include_background: keep class 0 in the output.
        ignore_empty: see the module docstring (``nan`` for classes absent from the target).

    Returns:
        ``(..., C)`` (or ``C - 1``) Dice values in ``[0, 1]`` (or ``nan``).

    Examples:
        >>> import jax.numpy as jnp
        >>> p = jnp.array([[[0, 1, 1, 1]]]); t = jnp.array([[[0, 0, 1, 1]]])
        >>> [round(float(d), 3) for d in dice_score(p, t, num_classes=3)]  # class 2 absent
        [0.667, 0.8, nan]
    """
    if num_classes is not None:
        _check_num_classes(num_classes)
    intersection, p_sum, t_sum = _overlap_counts(prediction, target, num_classes)
    denominator = p_sum + t_sum
    dice = 2 * intersection / jnp.where(denominator > 0, denominator, 1.0)
    if ignore_empty:
        dice = jnp.where(t_sum > 0, dice, jnp.nan)
    else:
        dice = jnp.where(denominator > 0, dice, 1.0)
    return _drop_background(dice, include_background)


def soft_dice(
    probabilities: ArrayLike,
    labels: ArrayLike,
    *,
    smooth: float = 1e-5,
    squared: bool = False,
    batch: bool = False,
    include_background: bool = True,
) -> jax.Array:
    """Soft Dice per class, ``(2 Σ p t + smooth) / (Σ p + Σ t + smooth)``.

    Args:
        probabilities: ``(..., x, y, z, C)`` (e.g. ``jax.nn.softmax(logits)``).
        labels: integer label map ``(..., x, y, z[, 1])``.
        smooth: added to numerator and denominator (a class absent from both scores 1).
        squared: use ``Σ p² + Σ t²`` in the denominator (V-Net's variant).
        batch: sum over the batch axes too ("batch Dice", one value per class).
        include_background: keep class 0.

    Returns:
        ``(..., C)`` soft Dice values, or ``(C,)`` with ``batch=True``.
    """
    probabilities = _scores(probabilities, "probabilities")
    labels = _labels_like(labels, probabilities)
    target = jax.nn.one_hot(labels, probabilities.shape[-1], dtype=probabilities.dtype)
    axes = tuple(range(probabilities.ndim - 1)) if batch else _SPATIAL
    intersection = jnp.sum(probabilities * target, axes)
    if squared:
        denominator = jnp.sum(probabilities**2, axes) + jnp.sum(target**2, axes)
    else:
        denominator = jnp.sum(probabilities, axes) + jnp.sum(target, axes)
    dice = (2 * intersection + smooth) / (denominator + smooth)
    return _drop_background(dice, include_background)


def dice_loss(
    logits: ArrayLike,
    labels: ArrayLike,
    *,
    softmax: bool = True,
    smooth: float = 1e-5,
    squared: bool = False,
    batch: bool = False,
    include_background: bool = True,
) -> jax.Array:
    """Soft Dice loss ``1 - mean(soft_dice)`` (mean over batch items and classes).

    Args:
        logits: ``(..., x, y, z, C)`` scores; with ``softmax=False`` they must already be
            probabilities.
        labels: integer label map ``(..., x, y, z[, 1])``.
        softmax: apply a softmax over the last axis first.
        smooth, squared, batch, include_background: see ``soft_dice``.

    References:
        Milletari, Navab and Ahmadi, "V-Net: Fully convolutional neural networks for
        volumetric medical image segmentation", 3DV 2016.
    """
    logits = _scores(logits)
    probabilities = jax.nn.softmax(logits, -1) if softmax else logits
    dice = soft_dice(
        probabilities,
        labels,
        smooth=smooth,
        squared=squared,
        batch=batch,
        include_background=include_background,
    )
    return 1.0 - jnp.mean(dice)


def generalized_dice_score(
    probabilities: ArrayLike,
    labels: ArrayLike,
    *,
    smooth: float = 1e-5,
    include_background: bool = True,
) -> jax.Array:
    """Generalised Dice, per batch item: ``2 Σ_c w_c Σ p t / Σ_c w_c (Σ p + Σ t)``.

    Class weights are ``w_c = 1 / (Σ t_c)²`` (inverse squared volume of the class in the
    target). A class absent from the target would get an infinite weight; it gets the
    largest weight of the classes present instead (0 if none is present).

    Returns:
        ``(...)`` one value per batch item.

    References:
        Sudre et al., "Generalised Dice overlap as a deep learning loss function for highly
        unbalanced segmentations", DLMIA 2017.
    """
    probabilities = _scores(probabilities, "probabilities")
    labels = _labels_like(labels, probabilities)
    target = jax.nn.one_hot(labels, probabilities.shape[-1], dtype=probabilities.dtype)
    target = _drop_background(target, include_background)
    probabilities = _drop_background(probabilities, include_background)
    intersection = jnp.sum(probabilities * target, _SPATIAL)
    denominator = jnp.sum(probabilities, _SPATIAL) + jnp.sum(target, _SPATIAL)
    volume = jnp.sum(target, _SPATIAL)
    present = volume > 0
    weights = jnp.where(present, 1.0 / jnp.where(present, volume, 1.0) ** 2, 0.0)
    largest = jnp.max(weights, -1, keepdims=True)
    weights = jnp.where(present, weights, largest)
    numerator = 2 * jnp.sum(weights * intersection, -1)
    return (numerator + smooth) / (jnp.sum(weights * denominator, -1) + smooth)


def generalized_dice_loss(
    logits: ArrayLike,
    labels: ArrayLike,
    *,
    softmax: bool = True,
    smooth: float = 1e-5,
    include_background: bool = True,
) -> jax.Array:
    """``1 - mean(generalized_dice_score)`` over batch items (softmax first by default)."""
    logits = _scores(logits)
    probabilities = jax.nn.softmax(logits, -1) if softmax else logits
    score = generalized_dice_score(
        probabilities, labels, smooth=smooth, include_background=include_background
    )
    return 1.0 - jnp.mean(score)


def cross_entropy(
    logits: ArrayLike,
    labels: ArrayLike,
    *,
    class_weights: ArrayLike | None = None,
) -> jax.Array:
    """Softmax cross-entropy averaged over voxels (and batch items).

    With ``class_weights`` ``(C,)`` each voxel's loss is weighted by the weight of its
    target class and the sum is divided by the sum of those weights (PyTorch's convention).
    """
    logits = _scores(logits)
    labels = _labels_like(labels, logits)
    log_p = jax.nn.log_softmax(logits, -1)
    nll = -jnp.take_along_axis(log_p, labels[..., None], -1)[..., 0]
    if class_weights is None:
        return jnp.mean(nll)
    class_weights = jnp.asarray(class_weights, log_p.dtype)
    if class_weights.shape != (logits.shape[-1],):
        raise ValueError(f"class_weights must have shape ({logits.shape[-1]},), got {class_weights.shape}")
    w = class_weights[labels]
    return jnp.sum(w * nll) / jnp.sum(w)


def dice_ce_loss(
    logits: ArrayLike,
    labels: ArrayLike,
    *,
    dice_weight: float = 1.0,
    ce_weight: float = 1.0,
    smooth: float = 1e-5,
    batch: bool = False,
    include_background: bool = True,
    class_weights: ArrayLike | None = None,
) -> jax.Array:
    """``dice_weight * dice_loss + ce_weight * cross_entropy`` (the nnU-Net default loss).

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> labels = jnp.zeros((2, 4, 4, 4), jnp.int32).at[:, 1:3, 1:3, 1:3].set(1)
        >>> perfect = 20.0 * jax.nn.one_hot(labels, 2) - 10.0
        >>> float(dice_ce_loss(perfect, labels)) < 1e-3
        True
    """
    dice = dice_loss(logits, labels, smooth=smooth, batch=batch, include_background=include_background)
    ce = cross_entropy(logits, labels, class_weights=class_weights)
    return dice_weight * dice + ce_weight * ce


# --- surface distances -------------------------------------------------------------------


def _check_spacing(spacing) -> tuple[float, float, float]:
    try:
        values = tuple(float(s) for s in spacing)
    except TypeError:
        values = (float(spacing),) * 3
    if len(values) != 3 or not all(v > 0 for v in values):
        raise ValueError(f"spacing must be 3 positive voxel sizes in mm, got {spacing!r}")
    return values


def _host_bool(x: ArrayLike, name: str, function: str) -> np.ndarray:
    """``x`` as a numpy boolean array; refuses tracers (surface distances run on the host)."""
    if is_traced(x):
        raise TypeError(
            f"{function} computes exact distance transforms on the host and cannot be traced "
            f"(jit, vmap, grad): call it on concrete arrays, got a traced {name}"
        )
    return np.asarray(x).astype(bool, copy=False)


def _edt(mask: np.ndarray, spacing: tuple[float, float, float]) -> np.ndarray:
    """Distance (mm, float32) from each voxel of a 3D array to the nearest ``True`` voxel."""
    if not mask.any():
        return np.full(mask.shape, np.inf, np.float32)
    return edt.edt(~mask, anisotropy=spacing, black_border=False).astype(np.float32, copy=False)


def distance_transform(mask: ArrayLike, spacing: Sequence[float] | float = (1.0, 1.0, 1.0)) -> jax.Array:
    """Exact Euclidean distance (mm) from each voxel to the nearest ``True`` voxel of ``mask``.

    ``mask`` is ``(..., x, y, z)`` boolean; the last three axes are spatial, leading axes
    are independent masks. This is ``scipy.ndimage.distance_transform_edt(~mask,
    sampling=spacing)`` in float32; a mask with no ``True`` voxel gives ``inf`` everywhere.
    Computed on the host (``edt``), so ``mask`` must be concrete.

    Raises:
        ValueError: ``mask`` with fewer than 3 dimensions, or a bad ``spacing``.
        TypeError: a traced ``mask`` (under ``jit``, ``vmap`` or ``grad``).

    Examples:
        >>> import numpy as np
        >>> m = np.zeros((1, 4, 1), bool); m[0, 0, 0] = True
        >>> distance_transform(m, spacing=(1.0, 2.0, 1.0))[0, :, 0].tolist()
        [0.0, 2.0, 4.0, 6.0]
    """
    mask = _host_bool(mask, "mask", "distance_transform")
    if mask.ndim < 3:
        raise ValueError(f"mask must have at least 3 dimensions (x, y, z), got shape {mask.shape}")
    spacing = _check_spacing(spacing)
    flat = mask.reshape(-1, *mask.shape[-3:])
    out = np.stack([_edt(m, spacing) for m in flat]) if len(flat) else np.zeros(flat.shape, np.float32)
    return jnp.asarray(out.reshape(mask.shape))


def _surface_axes(shape: Sequence[int]) -> tuple[int, ...]:
    """Spatial axes along which a mask has a surface: those longer than one voxel.

    A volume one voxel thick, ``(x, y, 1)``, is a 2D image: its surface is its in-plane
    contour, not all of its voxels.
    """
    return tuple(axis for axis, n in enumerate(shape[-3:]) if n > 1)


def _surface(mask: np.ndarray, axes: tuple[int, ...]) -> np.ndarray:
    """Voxels of a 3D ``mask`` with a face neighbour outside it along ``axes``.

    Voxels on the array border count as surface (the outside is background).
    """
    padded = np.pad(mask, [(1, 1) if a in axes else (0, 0) for a in range(3)])
    interior = padded.copy()
    for axis in axes:
        # the padding makes the wrapped-around neighbour background
        interior &= np.roll(padded, 1, axis) & np.roll(padded, -1, axis)
    inner = tuple(slice(1, -1) if a in axes else slice(None) for a in range(3))
    return mask & ~interior[inner]


def surface_distances(
    prediction_mask: ArrayLike,
    target_mask: ArrayLike,
    spacing: Sequence[float] | float = (1.0, 1.0, 1.0),
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Distances between the surfaces of two boolean masks ``(..., x, y, z)``.

    The surface of a mask is the set of its voxels with a face neighbour outside it (the
    array border counts as outside); along an axis of length 1 there is no neighbour, so
    a 2D slice ``(x, y, 1)`` has its in-plane contour as surface. Computed on the host.

    Returns:
        ``(d_pred, pred_surface, d_target, target_surface)``: ``d_pred`` is, at every
        voxel, the distance (mm) to the nearest *target* surface voxel, to be read where
        ``pred_surface`` is True; ``d_target`` likewise to the prediction's surface.

    Raises:
        ValueError: masks of different shapes or with fewer than 3 dimensions.
        TypeError: traced masks.
    """
    pred = _host_bool(prediction_mask, "prediction_mask", "surface_distances")
    tgt = _host_bool(target_mask, "target_mask", "surface_distances")
    if pred.shape != tgt.shape:
        raise ValueError(f"masks have different shapes: {pred.shape} vs {tgt.shape}")
    if pred.ndim < 3:
        raise ValueError(f"masks must have at least 3 dimensions (x, y, z), got shape {pred.shape}")
    axes = _surface_axes(pred.shape)
    flat_p = pred.reshape(-1, *pred.shape[-3:])
    flat_t = tgt.reshape(-1, *tgt.shape[-3:])
    s_pred = np.stack([_surface(m, axes) for m in flat_p]).reshape(pred.shape)
    s_tgt = np.stack([_surface(m, axes) for m in flat_t]).reshape(tgt.shape)
    d_pred = distance_transform(s_tgt, spacing)
    d_tgt = distance_transform(s_pred, spacing)
    return d_pred, jnp.asarray(s_pred), d_tgt, jnp.asarray(s_tgt)


def _host_label_pair(prediction, target, num_classes) -> tuple[np.ndarray, np.ndarray, int]:
    """Hard prediction and target as numpy label maps ``(..., x, y, z)``, and ``C``.

    The host twin of ``_one_hot_pair`` (same checks and messages), without one-hot maps.
    """
    prediction = np.asarray(prediction)
    if np.issubdtype(prediction.dtype, np.integer) or prediction.dtype == np.bool_:
        if num_classes is None:
            raise ValueError("num_classes is required when prediction is an integer label map")
        num_classes = _check_num_classes(num_classes)
        pred = _squeeze_host(prediction, "prediction")
    else:
        if prediction.ndim < 4:
            raise ValueError(
                f"prediction must have shape (..., x, y, z, num_classes), got {prediction.shape}"
            )
        if num_classes is not None and num_classes != prediction.shape[-1]:
            raise ValueError(
                f"num_classes={num_classes} does not match the last axis of prediction {prediction.shape}"
            )
        num_classes = prediction.shape[-1]
        pred = np.argmax(prediction, -1)
    tgt = _squeeze_host(np.asarray(target), "target")
    if tgt.shape != pred.shape:
        raise ValueError(f"prediction {pred.shape} and target {tgt.shape} must have the same spatial shape")
    return pred, tgt, num_classes


def _squeeze_host(labels: np.ndarray, name: str) -> np.ndarray:
    if labels.ndim >= 4 and labels.shape[-1] == 1:
        labels = labels[..., 0]
    if labels.ndim < 3:
        raise ValueError(f"{name} must have at least 3 spatial dimensions, got shape {labels.shape}")
    return labels


def _pair_distances(pred: np.ndarray, tgt: np.ndarray, spacing, axes) -> tuple[np.ndarray, np.ndarray]:
    """Distances from the prediction's surface voxels to the target's surface, and back.

    Both masks must be non-empty. Surfaces and the distances between them lie in the
    bounding box of the two masks, so the work is done on that box. Exact: a mask voxel on
    the box edge has background (or the array border) beyond it, which ``_surface``'s
    padding reproduces.
    """
    union = pred | tgt
    box = []
    for axis in range(3):
        hits = np.flatnonzero(union.any(axis=tuple(a for a in range(3) if a != axis)))
        box.append(slice(int(hits[0]), int(hits[-1]) + 1))
    box = tuple(box)
    s_pred = _surface(pred[box], axes)
    s_tgt = _surface(tgt[box], axes)
    return _edt(s_tgt, spacing)[s_pred], _edt(s_pred, spacing)[s_tgt]


def _surface_metric(
    prediction, target, num_classes, include_background, function, *, spacing, percentile, symmetric
):
    if is_traced(prediction, target):
        raise TypeError(
            f"{function} computes exact distance transforms on the host and cannot be traced "
            "(jit, vmap, grad): call it on concrete arrays"
        )
    pred, tgt, num_classes = _host_label_pair(prediction, target, num_classes)
    classes = range(0 if include_background else 1, num_classes)
    axes = _surface_axes(pred.shape)
    flat_pred = pred.reshape(-1, *pred.shape[-3:])
    flat_tgt = tgt.reshape(-1, *tgt.shape[-3:])
    out = np.empty((len(flat_pred), len(classes)), np.float32)
    for i, (p_labels, t_labels) in enumerate(zip(flat_pred, flat_tgt)):
        for j, c in enumerate(classes):
            p, t = p_labels == c, t_labels == c
            has_p, has_t = p.any(), t.any()
            if not (has_p and has_t):
                out[i, j] = np.inf if has_p or has_t else np.nan
                continue
            d_pt, d_tp = _pair_distances(p, t, spacing, axes)
            d_pt, d_tp = d_pt.astype(np.float64), d_tp.astype(np.float64)
            if percentile is not None:
                out[i, j] = max(np.percentile(d_pt, percentile), np.percentile(d_tp, percentile))
            elif symmetric:
                out[i, j] = (d_pt.sum() + d_tp.sum()) / (d_pt.size + d_tp.size)
            else:
                out[i, j] = d_pt.mean()
    return jnp.asarray(out.reshape(*pred.shape[:-3], len(classes)))


def hausdorff_distance(
    prediction: ArrayLike,
    target: ArrayLike,
    *,
    spacing: Sequence[float] | float = (1.0, 1.0, 1.0),
    percentile: float = 95.0,
    num_classes: int | None = None,
    include_background: bool = False,
) -> jax.Array:
    """Percentile Hausdorff distance (mm) per class, HD95 by default.

    For each class, the ``percentile`` of the distances from the prediction's surface
    voxels to the target's surface, and of those from the target's surface to the
    prediction's; the larger of the two. ``percentile=100`` is the classical Hausdorff
    distance. Percentiles interpolate linearly (``numpy.percentile``'s default).

    Runs on the host: each class is computed on the bounding box of its prediction and
    target (exact, and fast for small structures).

    Args:
        prediction: integer label map ``(..., x, y, z[, 1])`` or scores ``(..., x, y, z, C)``.
        target: integer label map ``(..., x, y, z[, 1])``.
        spacing: voxel size in mm (e.g. ``image.spacing``); must be concrete.
        percentile: in ``[0, 100]``.
        num_classes: required when ``prediction`` is a label map.
        include_background: also score class 0 (off by default).

    Returns:
        ``(..., C)`` (or ``C - 1``); ``nan``/``inf`` for empty classes (module docstring).

    Raises:
        ValueError: a bad ``spacing`` or ``percentile``, or mismatched shapes.
        TypeError: traced inputs (under ``jit``, ``vmap`` or ``grad``).

    Examples:
        >>> import numpy as np
        >>> p = np.zeros((1, 8, 1), int); t = np.zeros((1, 8, 1), int)
        >>> p[0, 1, 0] = 1; t[0, 4, 0] = 1
        >>> hausdorff_distance(p, t, spacing=(1.0, 2.0, 1.0), num_classes=2).tolist()
        [6.0]
    """
    if not 0 <= percentile <= 100:
        raise ValueError(f"percentile must be in [0, 100], got {percentile!r}")
    return _surface_metric(
        prediction,
        target,
        num_classes,
        include_background,
        "hausdorff_distance",
        spacing=_check_spacing(spacing),
        percentile=float(percentile),
        symmetric=True,
    )


def average_surface_distance(
    prediction: ArrayLike,
    target: ArrayLike,
    *,
    spacing: Sequence[float] | float = (1.0, 1.0, 1.0),
    symmetric: bool = True,
    num_classes: int | None = None,
    include_background: bool = False,
) -> jax.Array:
    """Average surface distance (mm) per class.

    With ``symmetric=True`` (default, often called ASSD) the mean over the distances from
    every prediction surface voxel to the target surface and from every target surface
    voxel to the prediction surface; with ``symmetric=False`` only the former.
    Arguments, cropping and empty-class rules as ``hausdorff_distance``.
    """
    return _surface_metric(
        prediction,
        target,
        num_classes,
        include_background,
        "average_surface_distance",
        spacing=_check_spacing(spacing),
        percentile=None,
        symmetric=bool(symmetric),
    )
