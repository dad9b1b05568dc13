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
]
