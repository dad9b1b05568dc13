"""Ready-made augmentation pipelines composed from jmed transforms.

Each function returns a ``Compose``; call it as any transform, ``pipeline(key, subject)``.
"""

from __future__ import annotations

from collections.abc import Sequence

from jmed.transforms.base import Compose, RandomApply, Transform
from jmed.transforms.intensity import (
    RandomBiasField,
    RandomBlur,
    RandomBrightness,
    RandomContrast,
    RandomGamma,
    RandomNoise,
)
from jmed.transforms.mri import RandomMotion
from jmed.transforms.normalization import HistogramStandardization, RescaleIntensity, ZNormalization
from jmed.transforms.preprocessing import CropOrPad, Resample, ToCanonical
from jmed.transforms.spatial import RandomAffine, RandomAnisotropy, RandomElasticDeformation, RandomFlip

__all__ = ["nnunet_augmentation", "nnunet_intensity_augmentation", "torchio_paper_augmentation"]


def _noise_blur_brightness_contrast() -> list[Transform]:
    return [
        # nnU-Net draws "noise_variance" (0, 0.1) but uses it as the std
        RandomApply(RandomNoise(std=(0.0, 0.1)), p=0.1),
        RandomApply(RandomBlur(std=(0.5, 1.0), units="voxels"), p=0.2),
        RandomApply(RandomBrightness(multiplier=(0.75, 1.25)), p=0.15),
        RandomApply(RandomContrast(contrast=(0.75, 1.25), preserve_range=True), p=0.15),
    ]


def _gammas() -> list[Transform]:
    return [
        RandomApply(RandomGamma(gamma=(0.7, 1.5), invert=True, retain_stats=True), p=0.1),
        RandomApply(RandomGamma(gamma=(0.7, 1.5), retain_stats=True), p=0.3),
    ]


def nnunet_intensity_augmentation() -> Compose:
    """The intensity part of nnU-Net's default 3D augmentation (no resampling).

    Gaussian noise (p 0.1), Gaussian blur (p 0.2), multiplicative brightness (p 0.15),
    contrast (p 0.15), inverted gamma (p 0.1) and gamma (p 0.3), with nnU-Net's ranges.
    Jittable and vmappable.
    """
    return Compose(_noise_blur_brightness_contrast() + _gammas())


def nnunet_augmentation(*, axes: Sequence[int] = (0, 1, 2)) -> Compose:
    """nnU-Net's default 3D training augmentation, from jmed transforms.

    In order: rotation (±30° per axis, p 0.2) and isotropic scaling (0.7–1.4, p 0.2),
    noise (p 0.1), blur (p 0.2), brightness (p 0.15), contrast (p 0.15), simulated low
    resolution (p 0.25), inverted gamma (p 0.1), gamma (p 0.3) and mirroring (p 0.5 per
    axis in ``axes``).

    Differences from nnU-Net: rotation and scaling are separate ``RandomAffine`` steps;
    low resolution uses ``RandomAnisotropy`` (one random axis, downsampling 1–2) where
    nnU-Net zooms all axes by 0.5–1. The patch crop that nnU-Net's
    spatial transform performs is left to the patch sampler.
    """
    return Compose(
        [
            RandomApply(RandomAffine(scales=0.0, degrees=30.0), p=0.2),
            RandomApply(RandomAffine(scales=(0.7, 1.4), degrees=0.0, isotropic=True), p=0.2),
            *_noise_blur_brightness_contrast(),
            RandomApply(RandomAnisotropy(axes=(0, 1, 2), downsampling=(1.0, 2.0)), p=0.25),
            *_gammas(),
            RandomFlip(axes=tuple(axes), flip_probability=0.5),
        ]
    )


def torchio_paper_augmentation(
    *,
    landmarks=None,
    spacing: float | Sequence[float] | None = None,
    target_shape: Sequence[int] | None = None,
) -> Compose:
    """The training pipeline of the TorchIO paper's example (Pérez-García et al. 2021).

    In the paper's order: intensity rescaling, ``RandomMotion``,
    ``HistogramStandardization`` (when ``landmarks`` are given), ``RandomBiasField``,
    ``ZNormalization``, ``RandomNoise``, ``ToCanonical``, ``Resample`` (when ``spacing``
    is given), ``CropOrPad`` (when ``target_shape`` is given), ``RandomFlip`` (first
    axis), ``RandomAffine`` and ``RandomElasticDeformation``, each with its TorchIO
    defaults. ``ToCanonical``/``Resample``/``CropOrPad`` change shapes from header values,
    so the whole pipeline runs where values are concrete (in the loader), not under
    ``jit``.

    References:
        Pérez-García et al., "TorchIO: a Python library for efficient loading,
        preprocessing, augmentation and patch-based sampling of medical images in deep
        learning", CMPB 2021.
    """
    steps: list[Transform] = [RescaleIntensity(), RandomMotion()]
    if landmarks is not None:
        steps.append(HistogramStandardization(landmarks))
    steps += [
        RandomBiasField(),
        ZNormalization(),
        RandomNoise(),
        ToCanonical(),
    ]
    if spacing is not None:
        steps.append(Resample(spacing))
    if target_shape is not None:
        steps.append(CropOrPad(tuple(target_shape)))
    steps += [RandomFlip(axes=(0,)), RandomAffine(), RandomElasticDeformation()]
    return Compose(steps)
