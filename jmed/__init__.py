"""jmed: 3D medical images for deep learning in JAX.

Load volumes with their physical geometry, preprocess and augment them with pure,
jittable, vmappable functions driven by explicit PRNG keys, sample patches, feed them
through a grain loader and stitch patch-wise predictions back together.
"""

from jmed import affine, datasets, formats, metrics, plot, transforms
from jmed.image import (
    AFFINE_TOLERANCE,
    INTENSITY,
    LABEL,
    Image,
    LabelMap,
    ScalarImage,
    Subject,
    stack,
    unstack,
)
from jmed.io import load, save

__version__ = "0.1.0"

__all__ = [
    "AFFINE_TOLERANCE",
    "INTENSITY",
    "LABEL",
    "Image",
    "LabelMap",
    "ScalarImage",
    "Subject",
    "affine",
    "datasets",
    "formats",
    "load",
    "metrics",
    "plot",
    "save",
    "stack",
    "transforms",
    "unstack",
]
