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
from jmed.transforms.spatial import (
    RandomAffine,
    RandomAnisotropy,
    RandomElasticDeformation,
    RandomFlip,
    RandomRot90,
    Spatial,
    SpatialTransform,
)
from jmed.transforms.tta import predict_with_tta

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
    "RandomAffine",
    "RandomAnisotropy",
    "RandomElasticDeformation",
    "RandomFlip",
    "RandomRot90",
    "Spatial",
    "SpatialTransform",
    "predict_with_tta",
]
