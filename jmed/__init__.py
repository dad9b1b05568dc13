"""jmed: 3D medical images for deep learning in JAX.

Load volumes with their physical geometry, preprocess and augment them with pure,
jittable, vmappable functions driven by explicit PRNG keys, sample patches, feed them
through a grain loader and stitch patch-wise predictions back together.
"""

from jmed import affine, buckets, datasets, formats, metrics, ops, patch_reads, plot, transforms
from jmed.data import (
    LoaderIterator,
    Queue,
    SubjectsSource,
    VolumeLoader,
    augment_and_sample,
)
from jmed.image import (
    AFFINE_TOLERANCE,
    INTENSITY,
    KINDS,
    LABEL,
    Image,
    LabelMap,
    ScalarImage,
    Subject,
    stack,
    unstack,
)
from jmed.inference import (
    MODES,
    PADDING_MODES,
    GridAggregator,
    GridSampler,
    sliding_window_inference,
)
from jmed.io import (
    READ_EXTENSIONS,
    WRITE_EXTENSIONS,
    load,
    save,
)
from jmed.runtime import tune_host_allocator
from jmed.sampling import (
    GridPatchSampler,
    LabelSampler,
    PatchSampler,
    UniformSampler,
    WeightedSampler,
    extract_patches,
    grid_locations,
)

__version__ = "0.1.0"

__all__ = [
    "datasets",
    "formats",
    "metrics",
    "plot",
    "AFFINE_TOLERANCE",
    "GridAggregator",
    "GridPatchSampler",
    "GridSampler",
    "INTENSITY",
    "Image",
    "KINDS",
    "LABEL",
    "LabelMap",
    "LabelSampler",
    "LoaderIterator",
    "MODES",
    "PADDING_MODES",
    "PatchSampler",
    "Queue",
    "READ_EXTENSIONS",
    "ScalarImage",
    "Subject",
    "SubjectsSource",
    "UniformSampler",
    "VolumeLoader",
    "WRITE_EXTENSIONS",
    "WeightedSampler",
    "affine",
    "buckets",
    "augment_and_sample",
    "extract_patches",
    "tune_host_allocator",
    "grid_locations",
    "load",
    "ops",
    "patch_reads",
    "save",
    "sliding_window_inference",
    "stack",
    "transforms",
    "unstack",
]
