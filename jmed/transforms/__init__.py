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
]
