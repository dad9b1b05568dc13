"""Generic intensity augmentation: noise, blur, gamma, brightness, contrast, bias field,
patch swapping, coarse dropout and label-to-image synthesis.

All transforms here keep the shape, so they are jittable and vmappable with per-sample
parameters; they act on intensity images only (label maps pass through). Outputs are
floating point (integer input becomes ``float32``) and are not clipped unless stated.

Parameter ranges follow ``jmed.transforms.params`` (a scalar ``d`` means
``U(-d, d)`` around the natural centre, a pair ``(a, b)`` means ``U(a, b)``), except
standard deviations, where a scalar ``d`` means ``U(0, d)`` as in TorchIO.

Unlike TorchIO, random noise is not stored voxel by voxel in the parameters: the params
hold a ``seed`` (two ``uint32``) and the noise is regenerated from it, so histories
stay small.

Examples:
    >>> import jax, numpy as np, jmed
    >>> subject = jmed.Subject(t1=jmed.ScalarImage(np.ones((8, 8, 8), np.float32)))
    >>> augment = jmed.transforms.Compose(
    ...     [jmed.transforms.RandomBiasField(coefficients=0.3), jmed.transforms.RandomNoise(std=0.1)]
    ... )
    >>> out = jax.jit(augment)(jax.random.key(0), subject)
    >>> out["t1"].shape
    (8, 8, 8, 1)
    >>> field = jmed.transforms.RandomBiasField()
    >>> biased = field(jax.random.key(1), subject)
    >>> restored = jmed.transforms.invert(biased)
    >>> bool(np.allclose(restored["t1"].data, 1.0, atol=1e-5))
    True
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jmed import affine as affine_lib
from jmed.image import INTENSITY, LABEL, Image, Subject
from jmed.ops import noise as noise_ops
from jmed.ops.crop_pad import valid_mask
from jmed.ops.filters import gaussian_blur
from jmed.transforms import params as _params
from jmed.transforms.base import IntensityTransform, Params, PRNGKey, RandomTransform
from jmed.transforms.params import ImageNames, IntTripleLike, PerAxisRangeLike, RangeLike

__all__ = [
    "RandomBiasField",
    "RandomBlur",
    "RandomBrightness",
    "RandomCoarseDropout",
    "RandomContrast",
    "RandomGamma",
    "RandomLabelsToImage",
    "RandomNoise",
    "RandomSwap",
]


# -- helpers ---------------------------------------------------------------------------
def _nnunet_factor(key, low: float, high: float) -> jax.Array:
    """nnU-Net's draw for factors around 1: with probability 1/2 ``U(low, 1)`` (if
    ``low < 1``), else ``U(max(low, 1), high)``."""
    k_side, k_value = jax.random.split(key)
    below = _params.uniform(k_value, low, min(1.0, high))
    above = _params.uniform(k_value, max(low, 1.0), high)
    if low >= 1.0:
        return above
    if high <= 1.0:
        return below
    return jnp.where(jax.random.bernoulli(k_side, 0.5), below, above)


def _valid(image: Image) -> jax.Array | None:
    """Mask ``(x, y, z, 1)`` of the valid voxels of a padded image, ``None`` if unpadded."""
    return None if image.extent is None else valid_mask(image.spatial_shape, image.extent)


def _channel_min_max(x: jax.Array, mask: jax.Array | None):
    """Per-channel minimum and maximum (of the valid voxels when ``mask`` is given)."""
    if mask is None:
        return jnp.min(x, axis=(0, 1, 2)), jnp.max(x, axis=(0, 1, 2))
    return (
        jnp.min(jnp.where(mask, x, jnp.inf), axis=(0, 1, 2)),
        jnp.max(jnp.where(mask, x, -jnp.inf), axis=(0, 1, 2)),
    )


def _channel_mean(x: jax.Array, mask: jax.Array | None) -> jax.Array:
    if mask is None:
        return jnp.mean(x, axis=(0, 1, 2))
    count = jnp.sum(mask, dtype=jnp.float32)
    return (jnp.sum(jnp.where(mask, x, 0.0), axis=(0, 1, 2), dtype=jnp.float32) / count).astype(x.dtype)


def _extent_high(subject: Subject, size, name: str) -> jax.Array:
    """Exclusive upper bound ``(3,)`` of the corners of a box of ``size`` inside the valid
    region of ``subject`` (its spatial shape, or its extent when padded)."""
    shape = subject.spatial_shape
    _check_fits(size, shape, name)
    extent = subject.extent
    if extent is None:
        return jnp.asarray([n - p + 1 for n, p in zip(shape, size)], jnp.int32)
    if not _params.is_traced(extent):
        _check_fits(size, tuple(int(v) for v in np.asarray(extent)), name)
    # a traced extent smaller than the box cannot raise: the corner is then 0
    return jnp.maximum(jnp.asarray(extent, jnp.int32) - jnp.asarray(size, jnp.int32) + 1, 1)


def _seed(key) -> jax.Array:
    return jax.random.bits(key, (2,), jnp.uint32)


def _key_from_seed(seed: jax.Array, index: int = 0):
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(0), seed[0]), seed[1])
    return jax.random.fold_in(key, index)


class _PerImageKeyMixin:
    """Apply ``_apply_data(data, params, key, extent)`` to each selected image with its own key."""

    def apply(self, subject: Subject, params: Params) -> Subject:
        names = self.selected(subject)
        out = {}
        for i, name in enumerate(names):
            image = subject[name]
            key = _key_from_seed(params["seed"], i)
            out[name] = image.replace(
                data=self._apply_data(_params.as_floating(image.data), params, key, image.extent)
            )
        return subject.replace(out)


# -- noise -----------------------------------------------------------------------------
class RandomNoise(_PerImageKeyMixin, IntensityTransform, RandomTransform):
    """Add Gaussian (or Rician) noise.

    Args:
        mean: mean ``μ`` of the noise: ``d`` -> ``U(-d, d)``, ``(a, b)`` -> ``U(a, b)``.
        std: standard deviation ``σ``: ``d`` -> ``U(0, d)``, ``(a, b)`` -> ``U(a, b)``.
        rician: if True, ``sqrt((x + n1)**2 + n2**2)`` with ``n1, n2 ~ N(μ, σ)``
            (magnitude of complex Gaussian noise; non-negative output), else ``x + n1``.

    The noise values come from ``jmed.ops.noise.normal`` (a keyed counter hash, not
    ``jax.random.normal``: see docs/performance.md), so a key gives other noise values
    than ``jax.random.normal`` would.

    Params: ``{"mean", "std", "seed"}``; each selected image gets independent noise.

    Raises:
        ValueError: negative or empty ranges.
    """

    sample_reads_subject = False
    padding_aware = True

    def __init__(
        self,
        mean: RangeLike = 0.0,
        std: RangeLike = (0.0, 0.25),
        *,
        rician: bool = False,
        include: ImageNames = None,
        exclude: ImageNames = None,
    ):
        super().__init__(include=include, exclude=exclude)
        self.mean = _params.parse_range(mean, "mean")
        self.std = _params.parse_nonnegative_range(std, "std")
        self.rician = bool(rician)

    def sample(self, key: PRNGKey | None, subject: Subject) -> Params:
        k_mean, k_std, k_noise = jax.random.split(key, 3)
        return {
            "mean": _params.uniform(k_mean, *self.mean),
            "std": _params.uniform(k_std, *self.std),
            "seed": _seed(k_noise),
        }

    def _apply_data(self, x, params, key, extent=None):
        if not self.rician:
            noise = noise_ops.normal(key, x.shape, x.dtype, extent=extent)
            return x + (noise * params["std"] + params["mean"])
        k1, k2 = jax.random.split(key)
        n1 = noise_ops.normal(k1, x.shape, x.dtype, extent=extent) * params["std"] + params["mean"]
        n2 = noise_ops.normal(k2, x.shape, x.dtype, extent=extent) * params["std"] + params["mean"]
        return jnp.sqrt((x + n1) ** 2 + n2**2)


# -- blur ------------------------------------------------------------------------------
class RandomBlur(IntensityTransform, RandomTransform):
    """Separable Gaussian blur with a random standard deviation per axis, in mm.

    Args:
        std: ``σ_i`` in mm: ``d`` -> ``U(0, d)`` per axis, ``(a, b)`` -> ``U(a, b)``,
            3 values (one ``d`` per axis) or 6 values (``a_i, b_i`` per axis).
        truncate: kernel half-width in standard deviations.
        mode: boundary mode (``scipy.ndimage`` names, see ``jmed.ops.filters``).
        units: ``"mm"`` (TorchIO) or ``"voxels"`` (nnU-Net: the std is used as the
            sigma in voxels, whatever the spacing).

    With ``units="mm"`` the std is divided by the image spacing (from its affine) to get
    voxels, so an
    anisotropic image is blurred by the same physical amount along each axis. The result
    equals ``scipy.ndimage.gaussian_filter`` with that sigma. When the affine is traced
    (under ``jit`` / ``vmap``) the kernel width is chosen at run time among a few
    compiled widths (see ``jmed.ops.filters.gaussian_blur``); with ``units="voxels"``
    the bound comes from ``std`` and fewer widths are compiled.

    Padding-aware: on a padded volume (``Image.extent``) the boundary rule acts at the
    extent (``jmed.ops.filters.gaussian_blur``'s ``extent``), so the valid voxels equal
    the blur of the unpadded volume up to float rounding.

    Params: ``{"std": (3,)}`` in ``units``.
    """

    sample_reads_subject = False
    padding_aware = True

    def __init__(
        self,
        std: PerAxisRangeLike = (0.0, 2.0),
        *,
        truncate: float = 4.0,
        mode: str = "reflect",
        units: str = "mm",
        include: ImageNames = None,
        exclude: ImageNames = None,
    ):
        super().__init__(include=include, exclude=exclude)
        self.units = _params.check_choice(units, "units", ("mm", "voxels"))
        self.std = _params.parse_nonnegative_range_per_axis(std, "std")
        if not _params.is_number(truncate) or not truncate >= 0 or not np.isfinite(truncate):
            raise ValueError(f"truncate must be a finite number >= 0, got {truncate!r}")
        self.truncate = float(truncate)
        self.mode = mode
        gaussian_blur(np.zeros((1, 1, 1, 1), np.float32), 0.0, mode=mode)  # validates mode

    def sample(self, key: PRNGKey | None, subject: Subject) -> Params:
        return {"std": _params.uniform(key, self.std[:, 0], self.std[:, 1], (3,))}

    def apply_image(self, image: Image, params: Params) -> Image:
        if self.units == "voxels":
            data = gaussian_blur(
                image.data,
                params["std"],
                truncate=self.truncate,
                mode=self.mode,
                max_sigma=self.std[:, 1],
                extent=image.extent,
            )
            return image.replace(data=data)
        spacing = affine_lib.spacing(image.affine)
        max_sigma = None
        if not _params.is_traced(spacing):
            max_sigma = self.std[:, 1] / np.asarray(spacing, dtype=float)
        sigma = params["std"] / jnp.asarray(spacing, jnp.float32)
        data = gaussian_blur(
            image.data,
            sigma,
            truncate=self.truncate,
            mode=self.mode,
            max_sigma=max_sigma,
            extent=image.extent,
        )
        return image.replace(data=data)


# -- gamma -----------------------------------------------------------------------------
# nnU-Net's (batchgenerators') guards against a constant channel in its gamma transform:
# added to the intensity range before dividing, and to the std when restoring statistics
_NNUNET_RANGE_EPSILON = 1e-7
_NNUNET_STD_EPSILON = 1e-8


def _safe_power(base: jax.Array, exponent: jax.Array) -> jax.Array:
    """``base ** exponent`` for ``base >= 0`` with a finite gradient at 0.

    Computed as ``exp(exponent * log(base))`` rather than with XLA's general ``pow``
    (which also handles negative bases and integer exponents; slower, see
    docs/performance.md).
    """
    positive = base > 0
    return jnp.where(positive, jnp.exp(exponent * jnp.log(jnp.where(positive, base, 1.0))), 0.0)


def _channel_stats(x: jax.Array, mask: jax.Array | None = None):
    if mask is None:
        return jnp.mean(x, axis=(0, 1, 2)), jnp.std(x, axis=(0, 1, 2))
    mean = _channel_mean(x, mask)
    return mean, jnp.sqrt(_channel_mean(jnp.square(x - mean), mask))


class RandomGamma(IntensityTransform, RandomTransform):
    """Gamma correction ``x -> x ** γ``.

    Args:
        log_gamma: ``log γ``: ``d`` -> ``U(-d, d)``, ``(a, b)`` -> ``U(a, b)`` (TorchIO).
        gamma: alternatively a ``(low, high)`` range of ``γ`` drawn as nnU-Net does
            (with probability 1/2 from ``U(low, 1)``, else from ``U(1, high)``); overrides
            ``log_gamma``.
        invert: negate the image before and after (nnU-Net's ``invert_image``); implies
            ``rescale``.
        retain_stats: restore each channel's mean and std afterwards (nnU-Net).
        rescale: min–max scale each channel to ``[0, 1]``, apply ``γ`` and scale back
            (nnU-Net). Without it negative values keep their sign:
            ``sign(x) * |x| ** γ`` (TorchIO).

    Padding-aware: the statistics of ``rescale`` and ``retain_stats`` are taken over the
    valid voxels of a padded volume (the mean and std of ``retain_stats`` then differ
    from the unpadded ones by float rounding).

    Params: ``{"gamma": ()}``.
    """

    sample_reads_subject = False
    padding_aware = True

    def __init__(
        self,
        log_gamma: RangeLike = (-0.3, 0.3),
        *,
        gamma: tuple[float, float] | None = None,
        invert: bool = False,
        retain_stats: bool = False,
        rescale: bool = False,
        include: ImageNames = None,
        exclude: ImageNames = None,
    ):
        super().__init__(include=include, exclude=exclude)
        self.log_gamma = _params.parse_range(log_gamma, "log_gamma")
        self.gamma = None
        if gamma is not None:
            if _params.is_number(gamma):
                raise ValueError(f"gamma must be a (low, high) pair, got {gamma!r}")
            self.gamma = _params.parse_range(gamma, "gamma")
            if self.gamma[0] <= 0:
                raise ValueError(f"gamma values must be > 0, got {gamma!r}")
        self.invert = bool(invert)
        self.retain_stats = bool(retain_stats)
        self.rescale = bool(rescale) or self.invert

    def sample(self, key: PRNGKey | None, subject: Subject) -> Params:
        if self.gamma is not None:
            return {"gamma": _nnunet_factor(key, *self.gamma)}
        return {"gamma": jnp.exp(_params.uniform(key, *self.log_gamma))}

    def apply_image(self, image: Image, params: Params) -> Image:
        x = _params.as_floating(image.data)
        gamma = jnp.asarray(params["gamma"], x.dtype)
        if self.invert:
            x = -x
        mask = _valid(image)
        if self.retain_stats:
            mean, std = _channel_stats(x, mask)
        if self.rescale:
            low, high = _channel_min_max(x, mask)
            width = high - low + _NNUNET_RANGE_EPSILON
            y = _safe_power(jnp.clip((x - low) / width, 0.0, None), gamma) * width + low
        else:
            y = jnp.sign(x) * _safe_power(jnp.abs(x), gamma)
        if self.retain_stats:
            y_mean, y_std = _channel_stats(y, mask)
            y = (y - y_mean) / (y_std + _NNUNET_STD_EPSILON) * std + mean
        if self.invert:
            y = -y
        return image.replace(data=y)


# -- brightness / contrast ---------------------------------------------------------------
class RandomBrightness(IntensityTransform, RandomTransform):
    """Multiply intensities by a random factor (nnU-Net's multiplicative brightness).

    Args:
        multiplier: factor range: ``d`` -> ``U(1 - d, 1 + d)``, ``(a, b)`` -> ``U(a, b)``.

    Params: ``{"multiplier": ()}``. Padding-aware (pointwise).
    """

    sample_reads_subject = False
    padding_aware = True

    def __init__(
        self, *, multiplier: RangeLike = (0.75, 1.25), include: ImageNames = None, exclude: ImageNames = None
    ):
        super().__init__(include=include, exclude=exclude)
        self.multiplier = _params.parse_range(multiplier, "multiplier", centre=1.0, min_value=0.0)

    def sample(self, key: PRNGKey | None, subject: Subject) -> Params:
        return {"multiplier": _params.uniform(key, *self.multiplier)}

    def apply_image(self, image: Image, params: Params) -> Image:
        x = _params.as_floating(image.data)
        return image.replace(data=x * jnp.asarray(params["multiplier"], x.dtype))


class RandomContrast(IntensityTransform, RandomTransform):
    """Scale each channel about its mean: ``(x - mean) * f + mean`` (nnU-Net).

    Args:
        contrast: factor range ``(a, b)`` (or ``d`` -> ``(1 - d, 1 + d)``), drawn as nnU-Net
            does: with probability 1/2 from ``U(a, 1)``, else from ``U(1, b)``.
        preserve_range: clip the result to each channel's original ``[min, max]``.

    Padding-aware: the mean, minimum and maximum are those of the valid voxels of a
    padded volume (the mean up to float rounding).

    Params: ``{"factor": ()}``.
    """

    sample_reads_subject = False
    padding_aware = True

    def __init__(
        self,
        *,
        contrast: RangeLike = (0.75, 1.25),
        preserve_range: bool = True,
        include: ImageNames = None,
        exclude: ImageNames = None,
    ):
        super().__init__(include=include, exclude=exclude)
        self.contrast = _params.parse_range(contrast, "contrast", centre=1.0, min_value=0.0)
        self.preserve_range = bool(preserve_range)

    def sample(self, key: PRNGKey | None, subject: Subject) -> Params:
        return {"factor": _nnunet_factor(key, *self.contrast)}

    def apply_image(self, image: Image, params: Params) -> Image:
        x = _params.as_floating(image.data)
        mask = _valid(image)
        mean = _channel_mean(x, mask)
        y = (x - mean) * jnp.asarray(params["factor"], x.dtype) + mean
        if self.preserve_range:
            y = jnp.clip(y, *_channel_min_max(x, mask))
        return image.replace(data=y)


# -- bias field ------------------------------------------------------------------------
def _monomials(order: int) -> list[tuple[int, int, int]]:
    return [(i, j, k) for i, j, k in itertools.product(range(order + 1), repeat=3) if i + j + k <= order]


def _coordinates_within(n: int, size: jax.Array) -> jax.Array:
    """``linspace(-1, 1, size)`` (``size`` traced, ``<= n``) continued over ``n`` values,
    with ``jnp.linspace``'s arithmetic so that the first ``size`` values are the same."""
    size = jnp.asarray(size, jnp.int32)
    i = jnp.arange(n, dtype=jnp.float32)
    div = jnp.maximum(size - 1, 1).astype(jnp.float32)
    step = i / div
    coords = -1.0 * (1.0 - step) + 1.0 * step
    coords = jnp.where(jnp.arange(n) == size - 1, 1.0, coords)
    # one valid voxel along the axis: coordinate 0 (the constant term only)
    return jnp.where(size > 1, coords, 0.0)


def bias_field(
    coefficients: jax.Array, shape: tuple[int, int, int], order: int, extent: jax.Array | None = None
) -> jax.Array:
    """``exp(sum_c a_c x^i y^j z^k)`` on ``linspace(-1, 1)`` coordinates, shape ``(*shape, 1)``.

    ``coefficients`` follow the order of monomials with ``i + j + k <= order``
    enumerated by ``itertools.product`` (``i`` slowest). ``extent`` (``(3,)``, possibly
    traced): the coordinates run from -1 to 1 over the valid voxels of a padded volume
    (and continue beyond them).
    """
    terms = _monomials(order)
    dense = jnp.zeros((order + 1,) * 3, jnp.float32).at[tuple(np.array(terms).T)].set(coefficients)
    if extent is None:
        powers = [
            jnp.linspace(-1.0, 1.0, n, dtype=jnp.float32)[:, None] ** jnp.arange(order + 1, dtype=jnp.float32)
            if n > 1
            else jnp.zeros((1, order + 1), jnp.float32).at[:, 0].set(1.0)
            for n in shape
        ]
    else:
        powers = [
            _coordinates_within(n, extent[d])[:, None] ** jnp.arange(order + 1, dtype=jnp.float32)
            if n > 1
            else jnp.zeros((1, order + 1), jnp.float32).at[:, 0].set(1.0)
            for d, n in enumerate(shape)
        ]
    # full float32 products: the platform default (bfloat16 operands on TPUs) would round
    # powers and coefficients to 8 significant bits (up to 0.4 % per term)
    highest = jax.lax.Precision.HIGHEST
    t = jnp.einsum("ijk,zk->ijz", dense, powers[2], precision=highest)
    t = jnp.einsum("ijz,yj->iyz", t, powers[1], precision=highest)
    poly = jnp.einsum("iyz,xi->xyz", t, powers[0], precision=highest)
    return jnp.exp(poly)[..., None]


class RandomBiasField(IntensityTransform, RandomTransform):
    """Multiply by a smooth multiplicative field, the exponential of a polynomial.

    The field is ``exp(sum a_ijk x^i y^j z^k)`` over the monomials with
    ``i + j + k <= order``, with ``x, y, z`` the voxel coordinates normalised to
    ``[-1, 1]`` along each axis and ``a_ijk ~ U(low, high)``. On a padded volume
    (``Image.extent``) the coordinates span the valid voxels, so they get the field of the
    unpadded volume (padding-aware, up to float rounding).

    Args:
        coefficients: coefficient range: ``d`` -> ``U(-d, d)``, ``(a, b)`` -> ``U(a, b)``.
        order: polynomial degree (>= 0).

    Params: ``{"coefficients": (num_monomials,)}``. Invertible: the inverse divides by
    the same field.

    References:
        Van Leemput et al., "Automated model-based bias field correction of MR images of
        the brain", IEEE TMI 1999; NiftyNet; TorchIO.
    """

    sample_reads_subject = False
    invertible = True
    padding_aware = True

    def __init__(
        self,
        coefficients: RangeLike = 0.5,
        order: int = 3,
        *,
        include: ImageNames = None,
        exclude: ImageNames = None,
    ):
        super().__init__(include=include, exclude=exclude)
        self.coefficients = _params.parse_range(coefficients, "coefficients")
        self.order = _params.as_positive_int(order, "order", minimum=0)

    def sample(self, key: PRNGKey | None, subject: Subject) -> Params:
        n = len(_monomials(self.order))
        return {"coefficients": _params.uniform(key, *self.coefficients, (n,))}

    def _field(self, image, params):
        return bias_field(params["coefficients"], image.spatial_shape, self.order, image.extent)

    def apply_image(self, image: Image, params: Params) -> Image:
        x = _params.as_floating(image.data)
        return image.replace(data=x * self._field(image, params).astype(x.dtype))

    def inverse_image(self, image: Image, params: Params) -> Image:
        x = _params.as_floating(image.data)
        return image.replace(data=x / self._field(image, params).astype(x.dtype))


# -- patch swapping ----------------------------------------------------------------------
def _check_fits(size, shape, name):
    if any(p > n for p, n in zip(size, shape)):
        raise ValueError(f"{name} {size} is larger than the image spatial shape {tuple(shape)}")


class RandomSwap(IntensityTransform, RandomTransform):
    """Swap pairs of random patches, ``num_iterations`` times in sequence.

    Args:
        patch_size: patch size in voxels (int or 3 ints).
        num_iterations: number of swaps.

    Params: ``{"locations": (num_iterations, 2, 3) int32}``, the corners of both patches
    of each swap (drawn from the subject's spatial shape, or from its valid voxels when
    padded: padding-aware, exact).

    References:
        Chen et al., "Self-supervised learning for medical image analysis using image
        context restoration", MedIA 2019.
    """

    padding_aware = True

    def __init__(
        self,
        patch_size: IntTripleLike = 15,
        num_iterations: int = 100,
        *,
        include: ImageNames = None,
        exclude: ImageNames = None,
    ):
        super().__init__(include=include, exclude=exclude)
        self.patch_size = _params.int_triple(patch_size, "patch_size")
        self.num_iterations = _params.as_positive_int(num_iterations, "num_iterations", minimum=0)

    def sample(self, key: PRNGKey | None, subject: Subject) -> Params:
        high = _extent_high(subject, self.patch_size, "patch_size")
        return {"locations": jax.random.randint(key, (self.num_iterations, 2, 3), 0, high, jnp.int32)}

    def apply_image(self, image: Image, params: Params) -> Image:
        _check_fits(self.patch_size, image.spatial_shape, "patch_size")
        x = _params.as_floating(image.data)
        size = (*self.patch_size, x.shape[-1])
        locations = params["locations"]
        n = self.num_iterations
        if n == 0:
            return image.replace(data=x)
        zero = jnp.zeros((), jnp.int32)

        def read(x, i):
            i = jnp.minimum(i, n - 1)
            start1, start2 = (*locations[i, 0], zero), (*locations[i, 1], zero)
            return jax.lax.dynamic_slice(x, start1, size), jax.lax.dynamic_slice(x, start2, size)

        # The patches of swap i + 1 are read at the end of step i, from the updated
        # volume: reading them at the start of a step makes XLA keep the old volume
        # alive and copy the whole volume at every step (see docs/performance.md).
        def swap(i, carry):
            x, patch1, patch2 = carry
            x = jax.lax.dynamic_update_slice(x, patch2, (*locations[i, 0], zero))
            x = jax.lax.dynamic_update_slice(x, patch1, (*locations[i, 1], zero))
            return (x, *read(x, i + 1))

        out = jax.lax.fori_loop(0, n, swap, (x, *read(x, 0)))[0]
        return image.replace(data=out)


# -- coarse dropout ----------------------------------------------------------------------
class RandomCoarseDropout(IntensityTransform, RandomTransform):
    """Fill random boxes with a constant value.

    Args:
        num_holes: number of boxes (int).
        hole_size: box size in voxels (int or 3 ints), fixed.
        fill_value: value written into the boxes.

    Params: ``{"corners": (num_holes, 3) int32}``, inside the valid voxels of a padded
    subject (padding-aware, exact).
    """

    padding_aware = True

    def __init__(
        self,
        *,
        num_holes: int = 1,
        hole_size: IntTripleLike = 8,
        fill_value: float = 0.0,
        include: ImageNames = None,
        exclude: ImageNames = None,
    ):
        super().__init__(include=include, exclude=exclude)
        self.num_holes = _params.as_positive_int(num_holes, "num_holes", minimum=0)
        self.hole_size = _params.int_triple(hole_size, "hole_size")
        self.fill_value = _params.finite_number(fill_value, "fill_value")

    def sample(self, key: PRNGKey | None, subject: Subject) -> Params:
        high = _extent_high(subject, self.hole_size, "hole_size")
        return {"corners": jax.random.randint(key, (self.num_holes, 3), 0, high, jnp.int32)}

    def apply_image(self, image: Image, params: Params) -> Image:
        x = _params.as_floating(image.data)
        masks = []
        for axis, n in enumerate(image.spatial_shape):
            idx = jnp.arange(n)[None, :]
            start = params["corners"][:, axis : axis + 1]
            masks.append((idx >= start) & (idx < start + self.hole_size[axis]))  # (holes, n)
        inside = jnp.any(
            masks[0][:, :, None, None] & masks[1][:, None, :, None] & masks[2][:, None, None, :], 0
        )
        return image.replace(data=jnp.where(inside[..., None], jnp.asarray(self.fill_value, x.dtype), x))


# -- labels to image ---------------------------------------------------------------------
class RandomLabelsToImage(RandomTransform):
    """Synthesise an intensity image from a label map (SynthSeg-style Gaussian mixture).

    Each label ``l`` gets a mean ``μ_l`` and a std ``σ_l`` drawn from its range; each
    voxel becomes ``μ_l + σ_l * n`` with ``n ~ N(0, 1)`` i.i.d. per voxel. A label map
    with one channel holds integer labels ``0 .. num_labels - 1``; one with several
    channels holds per-label probabilities (one-hot or soft; channel ``l`` is label
    ``l``) and the voxel value is the probability-weighted sum.

    Args:
        label_key: name of the label map in the subject.
        num_labels: number of labels of a single-channel label map (static; needed
            because label values are not known under ``jit``). Ignored for multi-channel
            maps, where it is the channel count.
        mean: per-label mean ranges (a sequence of ``num_labels`` numbers or pairs);
            ``default_mean`` for all labels if None.
        std: per-label std ranges, as ``mean``; ``default_std`` if None.
        default_mean: mean range of labels without their own.
        default_std: std range of labels without their own.
        ignore_background: leave label-0 voxels unchanged: they keep the values of an
            existing image named ``image_key``, else 0.
        image_key: name of the synthesised intensity image (added or replaced).

    Params: ``{"mean": (L,), "std": (L,), "seed"}``. Padding-aware: the noise of a padded
    label map is that of the unpadded one on its valid voxels (exact).

    References:
        Billot et al., "SynthSeg: Segmentation of brain MRI scans of any contrast and
        resolution without retraining", MedIA 2023.
    """

    padding_aware = True
    kinds = (LABEL,)

    def __init__(
        self,
        label_key: str,
        *,
        num_labels: int | None = None,
        mean: Sequence[Any] | None = None,
        std: Sequence[Any] | None = None,
        default_mean: RangeLike = (0.1, 0.9),
        default_std: RangeLike = (0.01, 0.1),
        ignore_background: bool = False,
        image_key: str = "image_from_labels",
    ):
        super().__init__()
        if not isinstance(label_key, str) or not isinstance(image_key, str):
            raise TypeError(f"label_key and image_key must be strings, got {label_key!r}, {image_key!r}")
        self.label_key = label_key
        self.image_key = image_key
        self.num_labels = None if num_labels is None else _params.as_positive_int(num_labels, "num_labels")
        self.default_mean = _params.parse_range(default_mean, "default_mean")
        self.default_std = _params.parse_nonnegative_range(default_std, "default_std")
        self.mean = (
            None if mean is None else [_params.parse_range(m, f"mean[{i}]") for i, m in enumerate(mean)]
        )
        self.std = (
            None
            if std is None
            else [_params.parse_nonnegative_range(s, f"std[{i}]") for i, s in enumerate(std)]
        )
        for name, ranges in (("mean", self.mean), ("std", self.std)):
            if ranges is not None and self.num_labels is not None and len(ranges) != self.num_labels:
                raise ValueError(f"{name} must have num_labels={self.num_labels} entries, got {len(ranges)}")
        self.ignore_background = bool(ignore_background)

    def _count(self, label: Image) -> int:
        if label.num_channels > 1:
            return label.num_channels
        if self.num_labels is None:
            raise ValueError("num_labels is required for a single-channel label map")
        return self.num_labels

    def _ranges(self, own, default, count, name):
        if own is None:
            return np.array([default] * count, dtype=np.float32)
        if len(own) != count:
            raise ValueError(f"{name} has {len(own)} entries but the label map has {count} labels")
        return np.array(own, dtype=np.float32)

    def sample(self, key: PRNGKey | None, subject: Subject) -> Params:
        if self.label_key not in subject:
            raise KeyError(f"label_key {self.label_key!r} is not in the subject; images: {list(subject)}")
        count = self._count(subject[self.label_key])
        means = self._ranges(self.mean, self.default_mean, count, "mean")
        stds = self._ranges(self.std, self.default_std, count, "std")
        k_mean, k_std, k_noise = jax.random.split(key, 3)
        return {
            "mean": _params.uniform(k_mean, means[:, 0], means[:, 1], (count,)),
            "std": _params.uniform(k_std, stds[:, 0], stds[:, 1], (count,)),
            "seed": _seed(k_noise),
        }

    def apply(self, subject: Subject, params: Params) -> Subject:
        label = subject[self.label_key]
        count = self._count(label)
        noise = noise_ops.normal(
            _key_from_seed(params["seed"]), (*label.spatial_shape, 1), extent=label.extent
        )
        if label.num_channels == 1:
            index = jnp.clip(label.data.astype(jnp.int32), 0, count - 1)
            values = params["mean"][index] + params["std"][index] * noise
        else:
            probs = _params.as_floating(label.data).astype(jnp.float32)
            per_label = params["mean"] + params["std"] * noise
            values = jnp.sum(probs * per_label, -1, keepdims=True)
        if self.ignore_background:
            old = (
                _params.as_floating(subject[self.image_key].data)
                if self.image_key in subject
                else jnp.zeros_like(values)
            )
            if label.num_channels == 1:
                values = jnp.where(index == 0, old, values)
            else:
                values = values + probs[..., :1] * (old - per_label[..., :1])
        image = label.replace(data=values, kind=INTENSITY)
        return subject.replace({self.image_key: image})
