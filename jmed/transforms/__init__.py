"""Transforms: ``transform(key, subject) -> subject``; see ``jmed.transforms.base``."""

from jmed.transforms.base import (
    Compose,
    IntensityTransform,
    Lambda,
    OneOf,
    RandomApply,
    SomeOf,
    Transform,
    invert,
    replay,
)
from jmed.transforms.labels import (
    FillHoles,
    KeepLargestComponent,
    LabelTransform,
    OneHot,
    RemapLabels,
    RemoveLabels,
    RemoveSmallObjects,
    SequentialLabels,
)
from jmed.transforms.normalization import (
    Clamp,
    HistogramStandardization,
    Mask,
    RescaleIntensity,
    ZNormalization,
    get_mask,
    load_landmarks,
    save_landmarks,
    train_histogram,
)
from jmed.transforms.preprocessing import (
    CopyAffine,
    Crop,
    CropForeground,
    CropOrPad,
    EnsureShapeMultiple,
    Pad,
    Reorient,
    Resample,
    Resize,
    ToCanonical,
    WindowParams,
)

__all__ = [
    "Compose",
    "IntensityTransform",
    "Lambda",
    "OneOf",
    "RandomApply",
    "SomeOf",
    "Transform",
    "invert",
    "replay",
    "CopyAffine",
    "Crop",
    "CropForeground",
    "CropOrPad",
    "EnsureShapeMultiple",
    "Pad",
    "Reorient",
    "Resample",
    "Resize",
    "ToCanonical",
    "WindowParams",
    "Clamp",
    "HistogramStandardization",
    "Mask",
    "RescaleIntensity",
    "ZNormalization",
    "get_mask",
    "load_landmarks",
    "save_landmarks",
    "train_histogram",
    "FillHoles",
    "KeepLargestComponent",
    "LabelTransform",
    "OneHot",
    "RemapLabels",
    "RemoveLabels",
    "RemoveSmallObjects",
    "SequentialLabels",
]
from jmed.transforms.intensity import (  # noqa: E402
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

__all__ += [
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
from jmed.transforms.mri import RandomGhosting, RandomMotion, RandomSpike  # noqa: E402

__all__ += ["RandomGhosting", "RandomMotion", "RandomSpike"]
from jmed.transforms.presets import (  # noqa: E402
    nnunet_augmentation,
    nnunet_intensity_augmentation,
    torchio_paper_augmentation,
)

__all__ += ["nnunet_augmentation", "nnunet_intensity_augmentation", "torchio_paper_augmentation"]
