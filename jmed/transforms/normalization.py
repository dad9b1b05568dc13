"""Intensity normalisation: rescaling, z-scoring, clamping, masking, histogram standardisation.

These transforms act on intensity images only (label maps pass through). Output data is
float32. Statistics are taken over all channels of an image together (as TorchIO), and,
with a ``masking_method``, only over the voxels the mask selects.

``masking_method`` (the same in every transform here; see ``get_mask``):

* ``None``: all voxels;
* ``"name"``: the nonzero voxels of the subject's image ``name`` (typically a label map);
* ``("name", labels)``: the voxels of image ``name`` whose value is in ``labels``;
* a callable ``f(data) -> bool array`` applied to the image's own data ``(x, y, z, c)``
  (e.g. ``lambda x: x > 0``).

On a volume padded to a bucket shape (``Image.extent``, see ``jmed.buckets``) the
statistics are taken over its valid voxels only (and the mask's), so every transform here
is padding-aware: the valid voxels come out as from the unpadded volume. A callable
``masking_method`` then sees the padded data; it must act voxel by voxel for this to
hold.

Statistics from concrete data (eager, in the loader) are validated: an empty mask or a
degenerate range raises ``ValueError``. Under ``jit`` values are traced and cannot raise;
each transform documents what it returns then (never NaN).
"""

from __future__ import annotations

import json
import numbers
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from jmed.image import Image, Subject
from jmed.ops import histogram
from jmed.ops.crop_pad import valid_mask
from jmed.transforms import params as _params
from jmed.transforms.base import IntensityTransform, Params
from jmed.transforms.params import ImageNames

__all__ = [
    "Clamp",
    "HistogramStandardization",
    "Mask",
    "RescaleIntensity",
    "ZNormalization",
    "get_mask",
    "histogram_percentiles",
    "load_landmarks",
    "save_landmarks",
    "train_histogram",
]

MaskingMethod = None | str | tuple | Callable[[jax.Array], jax.Array]


def _check_masking_method(method: Any, name: str = "masking_method", *, allow_none: bool = True) -> Any:
    if method is None and allow_none:
        return None
    if isinstance(method, str) or callable(method):
        return method
    if (
        isinstance(method, tuple)
        and len(method) == 2
        and isinstance(method[0], str)
        and (isinstance(method[1], Sequence) or isinstance(method[1], numbers.Integral))
    ):
        labels = (method[1],) if isinstance(method[1], numbers.Integral) else tuple(method[1])
        if not labels or not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in labels):
            raise ValueError(f"{name} labels must be integers, got {method[1]!r}")
        return (method[0], labels)
    allowed = "None, " if allow_none else ""
    raise ValueError(
        f"{name} must be {allowed}an image name, (image name, labels) or a callable data -> mask, got {method!r}"
    )


def get_mask(subject: Subject, masking_method: MaskingMethod, image: Image) -> jax.Array | np.ndarray | None:
    """Boolean mask ``(x, y, z, 1)`` of the voxels of ``image`` selected by ``masking_method``.

    Args:
        subject: the subject ``image`` belongs to (to look up mask images by name).
        masking_method: see the module docstring.
        image: the image whose voxels are selected.

    Returns:
        ``None`` for ``masking_method=None`` (all voxels: cheaper than an all-True array),
        else a boolean array broadcastable to ``image.data``. A mask image with several
        channels selects a voxel if any channel does.

    Raises:
        KeyError: no image of that name in the subject.
        ValueError: the mask image's spatial shape differs from ``image``'s.
    """
    if masking_method is None:
        return None
    labels = None
    if isinstance(masking_method, tuple):
        masking_method, labels = masking_method
    if callable(masking_method) and not isinstance(masking_method, str):
        mask = masking_method(image.data)
        xp = jnp if _params.is_traced(mask) or isinstance(mask, jax.Array) else np
        mask = xp.asarray(mask).astype(bool)
        if mask.ndim == 3:
            mask = mask[..., None]
        if mask.shape[:3] != image.spatial_shape:
            raise ValueError(f"masking function returned shape {mask.shape}, image is {image.shape}")
        return xp.any(mask, axis=-1, keepdims=True) if mask.shape[-1] != image.num_channels else mask
    mask_image = subject[masking_method]
    if mask_image.spatial_shape != image.spatial_shape:
        raise ValueError(
            f"mask image {masking_method!r} has spatial shape {mask_image.spatial_shape}, but the "
            f"image to normalise has {image.spatial_shape}: resample them to the same space first"
        )
    data = mask_image.data
    xp = jnp if _params.is_traced(data) or isinstance(data, jax.Array) else np
    data = xp.asarray(data)
    mask = data != 0 if labels is None else xp.isin(data, xp.asarray(labels))
    return xp.any(mask, axis=-1, keepdims=True)


def _broadcast_mask(mask, data):
    if mask is None:
        return None
    xp = jnp if _params.is_traced(mask, data) or isinstance(mask, jax.Array) else np
    return xp.broadcast_to(mask, data.shape)


def _with_extent(mask, image: Image):
    """``mask`` (or all voxels, for ``None``) restricted to the valid voxels of a padded
    ``image``, broadcast to its data; unchanged (``None`` stays ``None``) when unpadded."""
    if image.extent is None:
        return mask
    valid = valid_mask(image.spatial_shape, image.extent)
    if mask is not None:
        valid = valid & jnp.asarray(mask)
    return jnp.broadcast_to(valid, image.data.shape)


def _check_nonempty(mask, what: str) -> None:
    if mask is not None and not _params.is_traced(mask) and not np.any(np.asarray(mask)):
        raise ValueError(f"{what}: the mask selects no voxel (empty mask); cannot compute statistics")


# --- rescale -----------------------------------------------------------------------------


@jax.jit
def _rescale(data, in_lo, in_hi, out_lo, out_hi, clip):
    x = data.astype(jnp.float32)
    x = jnp.where(clip, jnp.clip(x, in_lo, in_hi), x)
    span = in_hi - in_lo
    scale = jnp.where(span != 0, (out_hi - out_lo) / jnp.where(span != 0, span, 1.0), 0.0)
    return (x - in_lo) * scale + out_lo


def _pair(value: Any, name: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a (min, max) pair of numbers, got {value!r}") from None
    if not (np.isfinite(lo) and np.isfinite(hi)) or lo >= hi:
        raise ValueError(f"{name} must be finite with min < max, got {value!r}")
    return lo, hi


class RescaleIntensity(IntensityTransform):
    """Map intensities linearly to ``out_min_max``.

    Padding-aware (exact): on a padded volume the percentiles are those of its valid
    (masked) voxels, equal to ``numpy.percentile`` of the unpadded volume's.

    Args:
        out_min_max: output range; a number ``m`` means ``(-m, m)``.
        percentiles: ``(low, high)`` in ``[0, 100]``: the input range is the interval
            between these percentiles of the (masked) intensities, exact as
            ``numpy.percentile(..., method="linear")`` (see ``jmed.ops.histogram``);
            intensities outside it are clipped, so the output lies in ``out_min_max``.
        in_min_max: fixed input range instead of percentiles (no clipping then: values
            outside map outside ``out_min_max``).
        masking_method: voxels the percentiles are computed over (see module docstring);
            all voxels are rescaled.

    Raises:
        ValueError: bad configuration; (eager) an empty mask, or an input range of zero
            width (a constant image). Under ``jit`` a zero-width range gives
            ``out_min_max[0]`` everywhere and an empty mask gives an arbitrary range.

    Examples:
        >>> import numpy as np, jmed
        >>> image = jmed.ScalarImage(np.arange(101.0).reshape(101, 1, 1))
        >>> out = RescaleIntensity(out_min_max=(0, 1), percentiles=(10, 90))(image)
        >>> np.asarray(out.data)[[0, 10, 50, 90, 100], 0, 0, 0].tolist()
        [0.0, 0.0, 0.5, 1.0, 1.0]
    """

    padding_aware = True

    def __init__(
        self,
        out_min_max: float | tuple[float, float] = (0.0, 1.0),
        percentiles: tuple[float, float] = (0.0, 100.0),
        masking_method: MaskingMethod = None,
        in_min_max: tuple[float, float] | None = None,
        *,
        include: ImageNames = None,
        exclude: ImageNames = None,
    ):
        super().__init__(include=include, exclude=exclude)
        if isinstance(out_min_max, numbers.Real):
            out_min_max = (-float(out_min_max), float(out_min_max))
        self.out_min_max = _pair(out_min_max, "out_min_max")
        p = histogram.check_percentiles(percentiles, "percentiles")
        if p.shape != (2,) or p[0] >= p[1]:
            raise ValueError(f"percentiles must be (low, high) with low < high, got {percentiles!r}")
        self.percentiles = tuple(float(v) for v in p)
        self.in_min_max = None if in_min_max is None else _pair(in_min_max, "in_min_max")
        self.masking_method = _check_masking_method(masking_method)

    def apply(self, subject: Subject, params: Any) -> Subject:
        out = {}
        for name in self.selected(subject):
            image = subject[name]
            data = image.data
            if self.in_min_max is not None:
                lo, hi = self.in_min_max
                clip = False
            else:
                mask = _broadcast_mask(get_mask(subject, self.masking_method, image), data)
                mask = _with_extent(mask, image)
                _check_nonempty(mask, f"RescaleIntensity of {name!r}")
                lo, hi = histogram.percentile(data, self.percentiles, mask=mask)
                clip = True
                if not _params.is_traced(lo, hi) and lo == hi:
                    raise ValueError(
                        f"RescaleIntensity of {name!r}: percentiles {self.percentiles} of the "
                        f"intensities are equal ({lo}); cannot rescale a constant range"
                    )
            new = _rescale(data, lo, hi, *self.out_min_max, clip)
            out[name] = image.replace(data=new)
        return subject.replace(out)


# --- z-normalisation ---------------------------------------------------------------------


@jax.jit
def _znormalise(data, mask):
    """One XLA program: masked mean and (population) std, then the guarded division."""
    x = data.astype(jnp.float32)
    if mask is None:
        mean = jnp.mean(x)
        var = jnp.mean(jnp.square(x - mean))
    else:
        n = jnp.maximum(jnp.sum(mask, dtype=jnp.float32), 1.0)
        mean = jnp.sum(jnp.where(mask, x, 0.0)) / n
        var = jnp.sum(jnp.where(mask, jnp.square(x - mean), 0.0)) / n
    std = jnp.sqrt(var)
    ok = std > 0
    out = jnp.where(ok, (x - mean) / jnp.where(ok, std, 1.0), 0.0)
    return out, std


class ZNormalization(IntensityTransform):
    """Subtract the mean and divide by the standard deviation of the (masked) intensities.

    The standard deviation is the population one (``ddof=0``, as ``numpy.std``), so the
    selected voxels have mean 0 and std 1 afterwards (TorchIO divides by the unbiased
    estimate). All voxels are transformed. Padding-aware: on a padded volume the mean and
    std are those of its valid (masked) voxels (up to float rounding: a masked sum
    replaces the mean's reduction).

    Args:
        masking_method: see the module docstring.

    Raises:
        ValueError: (eager) an empty mask or a zero standard deviation. Under ``jit`` these
            cannot raise: the output is then all zeros (guarded division, never NaN).
    """

    padding_aware = True

    def __init__(
        self, masking_method: MaskingMethod = None, *, include: ImageNames = None, exclude: ImageNames = None
    ):
        super().__init__(include=include, exclude=exclude)
        self.masking_method = _check_masking_method(masking_method)

    def apply(self, subject: Subject, params: Any) -> Subject:
        out = {}
        for name in self.selected(subject):
            image = subject[name]
            mask = get_mask(subject, self.masking_method, image)
            if mask is not None:
                mask = _broadcast_mask(mask, image.data)
            mask = _with_extent(mask, image)
            _check_nonempty(mask, f"ZNormalization of {name!r}")
            new, std = _znormalise(image.data, mask)
            if not _params.is_traced(std) and not float(std) > 0:
                raise ValueError(
                    f"ZNormalization of {name!r}: standard deviation of the selected intensities "
                    "is zero (constant image or mask region); cannot normalise"
                )
            out[name] = image.replace(data=new)
        return subject.replace(out)


# --- clamp and mask ----------------------------------------------------------------------


class Clamp(IntensityTransform):
    """Clip intensities to ``[out_min, out_max]`` (either may be ``None``: no bound).

    Padding-aware (pointwise)."""

    padding_aware = True

    def __init__(
        self,
        out_min: float | None = None,
        out_max: float | None = None,
        *,
        include: ImageNames = None,
        exclude: ImageNames = None,
    ):
        super().__init__(include=include, exclude=exclude)
        for value, name in ((out_min, "out_min"), (out_max, "out_max")):
            if value is not None and (not isinstance(value, numbers.Real) or not np.isfinite(value)):
                raise ValueError(f"{name} must be a finite number or None, got {value!r}")
        if out_min is not None and out_max is not None and out_min > out_max:
            raise ValueError(f"out_min must be <= out_max, got {out_min} > {out_max}")
        self.out_min = out_min
        self.out_max = out_max

    def apply_image(self, image: Image, params: Params) -> Image:
        return image.replace(data=jnp.clip(jnp.asarray(image.data, jnp.float32), self.out_min, self.out_max))


class Mask(IntensityTransform):
    """Set intensities outside a mask to ``outside_value``.

    Padding-aware (pointwise).

    Args:
        masking_method: required (see module docstring).
        outside_value: value given to voxels outside the mask.
    """

    padding_aware = True

    def __init__(
        self,
        masking_method: MaskingMethod,
        outside_value: float = 0.0,
        *,
        include: ImageNames = None,
        exclude: ImageNames = None,
    ):
        super().__init__(include=include, exclude=exclude)
        self.masking_method = _check_masking_method(masking_method, allow_none=False)
        self.outside_value = _params.finite_number(outside_value, "outside_value")

    def apply(self, subject: Subject, params: Params) -> Subject:
        out = {}
        for name in self.selected(subject):
            image = subject[name]
            mask = get_mask(subject, self.masking_method, image)
            data = jnp.asarray(image.data, jnp.float32)
            out[name] = image.replace(data=jnp.where(mask, data, self.outside_value))
        return subject.replace(out)


# --- histogram standardisation -----------------------------------------------------------

_QUANTILES = {
    "deciles": tuple(range(10, 100, 10)),
    "quartiles": (25, 50, 75),
}
# TorchIO treats percentiles closer than this (in intensity units) as tied
_TIE_EPSILON = 1e-5


def _torchio_percentiles(cutoff: np.ndarray) -> np.ndarray:
    """The 13 percentiles of TorchIO's landmarks: the cutoffs, quartiles and deciles."""
    return np.unique(np.concatenate([cutoff, _QUANTILES["quartiles"], _QUANTILES["deciles"]]).astype(float))


def histogram_percentiles(
    cutoff: tuple[float, float] = (1.0, 99.0), quantiles: Any = "deciles"
) -> np.ndarray:
    """Percentiles used as landmarks: ``cutoff[0]``, the ``quantiles``, ``cutoff[1]``.

    ``quantiles`` is ``"deciles"`` (10, 20, ..., 90), ``"quartiles"`` (25, 50, 75) or a
    sequence of percentiles; all must lie strictly inside ``cutoff``.
    """
    c = histogram.check_percentiles(cutoff, "cutoff")
    if c.shape != (2,) or c[0] >= c[1]:
        raise ValueError(f"cutoff must be (low, high) percentiles with low < high, got {cutoff!r}")
    if isinstance(quantiles, str):
        if quantiles not in _QUANTILES:
            raise ValueError(
                f"quantiles must be one of {tuple(_QUANTILES)} or percentiles, got {quantiles!r}"
            )
        inner = np.asarray(_QUANTILES[quantiles], float)
    else:
        inner = np.sort(histogram.check_percentiles(quantiles, "quantiles"))
    if np.any(inner <= c[0]) or np.any(inner >= c[1]) or np.any(np.diff(inner) <= 0):
        raise ValueError(
            f"quantiles {inner.tolist()} must be distinct and strictly inside cutoff {c.tolist()}"
        )
    return np.concatenate([c[:1], inner, c[1:]])


def _as_array(item: Any, what: str) -> np.ndarray:
    if isinstance(item, Image):
        return np.asarray(item.data)
    if isinstance(item, (str, os.PathLike)):
        from jmed.io import load

        return np.asarray(load(item).data)
    arr = np.asarray(item)
    if arr.ndim not in (3, 4):
        raise ValueError(f"{what} must be 3D or 4D, got shape {arr.shape}")
    return arr if arr.ndim == 4 else arr[..., None]


def train_histogram(
    images: Sequence[Any],
    *,
    cutoff: tuple[float, float] = (1.0, 99.0),
    quantiles: Any = "deciles",
    output_range: tuple[float, float] = (0.0, 100.0),
    masks: Sequence[Any] | Callable[[np.ndarray], np.ndarray] | None = None,
    progress: bool = False,
    output_path: str | os.PathLike | None = None,
) -> np.ndarray:
    """Learn the standard histogram landmarks of Nyúl & Udupa from training images.

    For each image, the percentiles ``histogram_percentiles(cutoff, quantiles)`` of its
    (masked) intensities are mapped linearly so that the cutoff percentiles land on
    ``output_range``; the landmarks are the mean of these mapped percentiles.

    Args:
        images: ``Image`` s, arrays ``(x, y, z[, c])`` or paths to image files.
        cutoff: lowest and highest percentile (percent, in ``[0, 100]``; TorchIO's
            ``percentiles_cutoff`` is in fractions).
        quantiles: ``"deciles"``, ``"quartiles"`` or a sequence of percentiles.
        output_range: standard scale of the cutoff landmarks.
        masks: optional: one mask per image (``Image``, array or path; nonzero voxels are
            used), or a callable ``f(data) -> bool array``.
        progress: show a progress bar (one step per image) on stderr.
        output_path: optionally save the landmarks there (``.npy`` or ``.json``; see
            ``save_landmarks``).

    Returns:
        float64 landmarks, one per percentile, non-decreasing.

    References:
        Nyúl, Udupa and Zhang, "New variants of a method of MRI scale standardization",
        IEEE TMI 19(2), 2000.
    """
    percentiles = histogram_percentiles(cutoff, quantiles)
    s1, s2 = _pair(output_range, "output_range")
    images = list(images)
    if not images:
        raise ValueError("train_histogram needs at least one image")
    if masks is not None and not callable(masks):
        masks = list(masks)
        if len(masks) != len(images):
            raise ValueError(f"masks must be one per image: got {len(masks)} masks for {len(images)} images")
    from jmed._progress import track

    mapped = []
    for i, item in enumerate(track(images, progress, desc="train_histogram", unit="image")):
        data = _as_array(item, f"images[{i}]")
        if masks is None:
            mask = None
        elif callable(masks):
            mask = np.asarray(masks(data), bool)
        else:
            mask = _as_array(masks[i], f"masks[{i}]") != 0
        if mask is not None:
            mask = np.broadcast_to(mask if mask.ndim == 4 else mask.reshape(*mask.shape[:3], -1), data.shape)
            if not mask.any():
                raise ValueError(f"train_histogram: mask of image {i} is empty")
        p = histogram.percentile(data, percentiles, mask=mask)
        if p[-1] <= p[0]:
            raise ValueError(
                f"train_histogram: image {i} has equal cutoff percentiles ({p[0]}); it cannot be standardised"
            )
        mapped.append(s1 + (p - p[0]) / (p[-1] - p[0]) * (s2 - s1))
    landmarks = np.mean(mapped, axis=0)
    if output_path is not None:
        save_landmarks(landmarks, output_path, percentiles=percentiles)
    return landmarks


def save_landmarks(
    landmarks: ArrayLike, path: str | os.PathLike, *, percentiles: ArrayLike | None = None
) -> None:
    """Save landmarks to ``.npy`` (the array) or ``.json`` (``{"landmarks", "percentiles"}``).

    The file is written atomically (a temporary file beside it, renamed into place): a
    failed write leaves an existing file intact.
    """
    from jmed import _atomic

    path = os.fspath(path)
    values = np.asarray(landmarks, np.float64)
    if path.endswith(".npy"):
        with _atomic.atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.save(f, values)
    elif path.endswith(".json"):
        record = {"landmarks": values.tolist()}
        if percentiles is not None:
            record["percentiles"] = np.asarray(percentiles, float).tolist()
        with _atomic.atomic_path(path) as tmp, open(tmp, "w") as f:
            json.dump(record, f, indent=1)
    else:
        raise ValueError(f"landmarks path must end with .npy or .json, got {path!r}")


def load_landmarks(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray | None]:
    """Load ``(landmarks, percentiles)`` saved by ``save_landmarks`` (percentiles may be None)."""
    path = os.fspath(path)
    try:
        if path.endswith(".npy"):
            return np.load(path).astype(np.float64), None
        if path.endswith(".txt"):  # TorchIO's text format: a name, then the values
            with open(path) as f:
                words = f.read().split()
            return np.asarray(
                words[1:] if words and not _is_numeric_word(words[0]) else words, np.float64
            ), None
        if path.endswith(".json"):
            with open(path) as f:
                record = json.load(f)
            p = record.get("percentiles")
            return np.asarray(record["landmarks"], np.float64), None if p is None else np.asarray(p, float)
    except (OSError, ValueError, KeyError) as err:
        raise ValueError(f"cannot read landmarks from {path!r}: {err}") from err
    raise ValueError(f"landmarks path must end with .npy, .json or .txt, got {path!r}")


def _is_numeric_word(word: str) -> bool:
    try:
        float(word)
    except ValueError:
        return False
    return True


@jax.jit
def _piecewise_linear(data, xp, fp, epsilon: float = _TIE_EPSILON):
    """Map ``data`` through the piecewise-linear function through ``(xp, fp)``.

    TorchIO's rule (``torchio.transforms.HistogramStandardization``): segment ``k`` runs
    from knot ``k`` to knot ``k + 1``; a value belongs to the segment of the last inner knot
    at or below it (the first segment below the second knot, the last segment above the
    second-to-last knot, both extended beyond the end knots). A segment narrower than
    ``epsilon`` (tied percentiles, e.g. a background of zeros) is flat at its first
    landmark, so a value equal to tied knots maps to the last of their landmarks. Written
    as a chain of selects, elementwise, so XLA fuses it into one pass without gathers.
    """
    x = data.astype(jnp.float32)
    width = xp[1:] - xp[:-1]
    flat = width < epsilon
    slope = jnp.where(flat, 0.0, (fp[1:] - fp[:-1]) / jnp.where(flat, 1.0, width))
    out = fp[0] + slope[0] * (x - xp[0])
    for k in range(1, xp.shape[0] - 1):
        out = jnp.where(x >= xp[k], fp[k] + slope[k] * (x - xp[k]), out)
    return out


class HistogramStandardization(IntensityTransform):
    """Nyúl–Udupa histogram standardisation with landmarks from ``train_histogram``.

    Each image's percentiles (same ``cutoff``/``quantiles`` as in training, over the
    masked voxels) are mapped piecewise-linearly onto the landmarks; intensities below the
    first or above the last percentile follow the end segments. Ties follow TorchIO: a
    value equal to tied percentiles (a background of zeros filling the lowest percentiles)
    maps to the last of their landmarks, and segments between percentiles closer than
    1e-5 are flat. Jittable (percentiles use the exact traced selection of
    ``jmed.ops.histogram`` under ``jit``).

    Padding-aware (exact): on a padded volume the percentiles are those of its valid
    (masked) voxels.

    Args:
        landmarks: an array of landmarks, a ``.npy``/``.json``/``.txt`` path, or a mapping
            from image names to either (images not in it pass through). TorchIO's 13
            landmarks (cutoffs, quartiles and deciles) are accepted: those of this
            transform's percentiles are used, as TorchIO does.
        cutoff, quantiles: as ``train_histogram``; the number of landmarks must match.
        masking_method: see the module docstring.

    Raises:
        ValueError: landmarks of the wrong length, decreasing landmarks, percentiles in a
            ``.json`` file that differ from ``cutoff``/``quantiles``.

    References:
        Nyúl, Udupa and Zhang, "New variants of a method of MRI scale standardization",
        IEEE TMI 19(2), 2000.
    """

    padding_aware = True

    def __init__(
        self,
        landmarks: Any,
        masking_method: MaskingMethod = None,
        *,
        cutoff: tuple[float, float] = (1.0, 99.0),
        quantiles: Any = "deciles",
        include: ImageNames = None,
        exclude: ImageNames = None,
    ):
        super().__init__(include=include, exclude=exclude)
        self.percentiles = histogram_percentiles(cutoff, quantiles)
        self.cutoff = tuple(cutoff)
        self.quantiles = quantiles
        self.masking_method = _check_masking_method(masking_method)
        if isinstance(landmarks, dict):
            self.landmarks = {str(k): self._load(v, str(k)) for k, v in landmarks.items()}
        else:
            self.landmarks = self._load(landmarks, "landmarks")

    def _load(self, value: Any, name: str) -> np.ndarray:
        percentiles = None
        if isinstance(value, (str, os.PathLike)):
            value, percentiles = load_landmarks(value)
        values = np.asarray(value, np.float64)
        if percentiles is not None and (
            percentiles.shape != self.percentiles.shape or not np.allclose(percentiles, self.percentiles)
        ):
            raise ValueError(
                f"{name}: landmarks were trained for percentiles {percentiles.tolist()}, this "
                f"transform uses {self.percentiles.tolist()}"
            )
        k = self.percentiles.size
        torchio = _torchio_percentiles(self.percentiles[[0, -1]])
        if (
            values.shape == torchio.shape
            and values.shape != (k,)
            and np.isin(self.percentiles, torchio).all()
        ):
            # landmarks trained by TorchIO (cutoffs, quartiles and deciles): keep those of
            # this transform's percentiles, as TorchIO does when it applies them
            values = values[np.isin(torchio, self.percentiles)]
        if values.shape != (k,):
            raise ValueError(
                f"{name}: expected {k} landmarks for percentiles {self.percentiles.tolist()}, got "
                f"shape {values.shape}; train with the same cutoff/quantiles"
            )
        if not np.all(np.isfinite(values)) or np.any(np.diff(values) < 0):
            raise ValueError(f"{name} must be finite and non-decreasing, got {values.tolist()}")
        return values

    def apply(self, subject: Subject, params: Params) -> Subject:
        out = {}
        for name in self.selected(subject):
            if isinstance(self.landmarks, dict):
                if name not in self.landmarks:
                    continue
                landmarks = self.landmarks[name]
            else:
                landmarks = self.landmarks
            image = subject[name]
            mask = _broadcast_mask(get_mask(subject, self.masking_method, image), image.data)
            mask = _with_extent(mask, image)
            _check_nonempty(mask, f"HistogramStandardization of {name!r}")
            p = histogram.percentile(image.data, self.percentiles, mask=mask)
            new = _piecewise_linear(
                image.data, jnp.asarray(p, jnp.float32), jnp.asarray(landmarks, jnp.float32)
            )
            out[name] = image.replace(data=new)
        return subject.replace(out)
