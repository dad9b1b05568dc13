"""Test-time augmentation: predict on augmented copies, map each prediction back, average.

``predict_with_tta(key, predictor, subject, transform, num_augmentations)`` draws
``num_augmentations`` parameter sets from ``key``, applies ``transform`` with each,
runs ``predictor`` on every augmented subject, inverts the transform on each prediction
(``transform.inverse``) and returns the voxel-wise mean and variance of the predictions
on the original grid. The variance is the aleatoric uncertainty estimate of Wang et al.
(as in ivadomed). The transform must be invertible (spatial transforms are; the elastic
inverse is approximate, see ``jmed.transforms.spatial.invert_mapping``); predictions are
resampled back as intensity images (linear), so probabilities or logits average well.

References:
    Wang, G. et al. (2019). Aleatoric uncertainty estimation with test-time augmentation
    for medical image segmentation with convolutional neural networks. Neurocomputing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from jmed.image import INTENSITY, Image, Subject
from jmed.transforms.base import Transform

__all__ = ["predict_with_tta"]


def predict_with_tta(
    key: Any,
    predictor: Callable[[Subject], Any],
    subject: Subject,
    transform: Transform,
    num_augmentations: int = 8,
    *,
    image_name: str | None = None,
) -> tuple[Image, Image]:
    """Mean and variance of ``predictor`` over ``num_augmentations`` augmented copies.

    Args:
        key: JAX key; copy ``i`` uses ``jax.random.fold_in(key, i)``.
        predictor: maps an augmented ``Subject`` to a prediction on its grid: an
            ``Image`` or an array ``(x, y, z, c)`` (e.g. class probabilities). It is
            called under ``jax.vmap`` over the copies, so it must be vmappable (a JAX
            model call is).
        subject: the input subject.
        transform: an invertible transform (e.g. ``Compose([RandomFlip(), RandomAffine()])``).
        num_augmentations: number of augmented copies (>= 1).
        image_name: the image whose place the prediction takes when it is mapped back
            (so ``include``/``exclude`` of ``transform`` apply to it); by default the
            first intensity image the transform acts on.

    Returns:
        ``(mean, variance)`` as intensity ``Image`` s on ``subject``'s grid.

    Raises:
        TypeError: the transform is not invertible.
        ValueError: ``num_augmentations < 1`` or no suitable image name.
    """
    if not transform.invertible:
        raise TypeError(
            f"test-time augmentation needs an invertible transform, got {type(transform).__name__}"
        )
    if isinstance(num_augmentations, bool) or not isinstance(num_augmentations, int) or num_augmentations < 1:
        raise ValueError(f"num_augmentations must be an integer >= 1, got {num_augmentations!r}")
    if image_name is None:
        names = [n for n in transform.selected(subject) if subject[n].kind == INTENSITY] or list(subject)
        image_name = names[0]
    if image_name not in subject:
        raise ValueError(f"image_name {image_name!r} is not in the subject; images: {list(subject)}")

    def one(k):
        params = transform.sample(k, subject)
        augmented = transform.apply(subject, params)
        prediction = predictor(augmented)
        if not isinstance(prediction, Image):
            prediction = Image(jnp.asarray(prediction), augmented[image_name].affine, kind=INTENSITY)
        else:
            prediction = prediction.replace(kind=INTENSITY)
        try:  # map back the prediction alone when the transform's include/exclude allow it
            back = transform.inverse(Subject({image_name: prediction}), params)[image_name]
        except KeyError:
            back = transform.inverse(augmented.replace({image_name: prediction}), params)[image_name]
        return jnp.asarray(back.data, jnp.float32)

    # one vmapped program over the copies (the predictor must be vmappable, as a model is)
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(num_augmentations))
    stacked = jax.vmap(one)(keys)
    reference = subject[image_name]
    mean = Image(jnp.mean(stacked, axis=0), reference.affine, kind=INTENSITY)
    variance = Image(jnp.var(stacked, axis=0), reference.affine, kind=INTENSITY)
    return mean, variance
