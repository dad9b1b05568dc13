"""jmed: 3D medical images for deep learning in JAX.

Load volumes with their physical geometry, preprocess and augment them with pure,
jittable, vmappable functions driven by explicit PRNG keys, sample patches, feed them
through a grain loader and stitch patch-wise predictions back together.

``import jmed`` is cheap: the names below are imported on first use (PEP 562), so a
command-line tool or a worker process pays for JAX only when it touches something that
needs it. ``from jmed import Image`` and ``jmed.Image`` work as usual.
"""

from __future__ import annotations

import importlib
import sys
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> module that defines it (imported on first access)
_LAZY_NAMES = {
    "LoaderIterator": "jmed.data",
    "Queue": "jmed.data",
    "SubjectsSource": "jmed.data",
    "VolumeLoader": "jmed.data",
    "augment_and_sample": "jmed.data",
    "WorkerOptions": "jmed.data",
    "SourceOptions": "jmed.data",
    "ShardOptions": "jmed.data",
    "BucketOptions": "jmed.data",
    "AFFINE_TOLERANCE": "jmed.image",
    "INTENSITY": "jmed.image",
    "KINDS": "jmed.image",
    "LABEL": "jmed.image",
    "Image": "jmed.image",
    "LabelMap": "jmed.image",
    "ScalarImage": "jmed.image",
    "Subject": "jmed.image",
    "stack": "jmed.image",
    "unstack": "jmed.image",
    "MODES": "jmed.inference",
    "PADDING_MODES": "jmed.inference",
    "GridAggregator": "jmed.inference",
    "GridSampler": "jmed.inference",
    "sliding_window_inference": "jmed.inference",
    "OutputSpec": "jmed.inference",
    "HostAccumulator": "jmed.inference",
    "DeviceAccumulator": "jmed.inference",
    "ChunkedAccumulator": "jmed.inference",
    "Accumulator": "jmed.inference",
    "READ_EXTENSIONS": "jmed.io",
    "WRITE_EXTENSIONS": "jmed.io",
    "load": "jmed.io",
    "save": "jmed.io",
    "tune_host_allocator": "jmed.runtime",
    "GridPatchSampler": "jmed.sampling",
    "LabelSampler": "jmed.sampling",
    "PatchSampler": "jmed.sampling",
    "UniformSampler": "jmed.sampling",
    "WeightedSampler": "jmed.sampling",
    "extract_patches": "jmed.sampling",
    "grid_locations": "jmed.sampling",
}

if TYPE_CHECKING:  # static analysers and IDEs see the eager imports
    from jmed import affine, buckets, datasets, formats, metrics, ops, patch_reads, plot, transforms
    from jmed.data import (
        BucketOptions,
        LoaderIterator,
        Queue,
        ShardOptions,
        SourceOptions,
        SubjectsSource,
        VolumeLoader,
        WorkerOptions,
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
        Accumulator,
        ChunkedAccumulator,
        DeviceAccumulator,
        GridAggregator,
        GridSampler,
        HostAccumulator,
        OutputSpec,
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

__all__ = [
    "Accumulator",
    "BucketOptions",
    "ChunkedAccumulator",
    "DeviceAccumulator",
    "HostAccumulator",
    "OutputSpec",
    "ShardOptions",
    "SourceOptions",
    "WorkerOptions",
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


def __getattr__(name: str) -> Any:
    module_name = _LAZY_NAMES.get(name)
    if module_name is not None:
        value = getattr(importlib.import_module(module_name), name)
    elif not name.startswith("__"):
        try:
            value = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as err:
            if err.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    if "jax" in sys.modules and "jmed.compilation" not in sys.modules:
        # JAX is in use now: log its slow compilations (see jmed.compilation)
        importlib.import_module("jmed.compilation")
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
