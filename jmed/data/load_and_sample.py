"""The per-subject work of the loader's workers: load and preprocess (``_Load``), then
augment the whole volume and cut its patches in one jitted program (``_AugmentAndSample``).

Both are grain maps that run in the worker processes (or in the main process with
``num_workers=0``) and must pickle.
"""

from __future__ import annotations

import functools
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np

from jmed import buckets, compilation, runtime
from jmed.data.elements import _element
from jmed.data.shape_plan import _ShapePlan
from jmed.data.source import SubjectsSource
from jmed.image import Image, Subject


class _Load(grain.transforms.Map):
    """subject index -> loaded, preprocessed element (runs in the workers).

    With a shape plan, preprocessing kernels run on its kernel buckets and the subject is
    padded to its volume bucket (``Image.extent`` set); see ``_ShapePlan``.
    """

    def __init__(
        self,
        source: SubjectsSource,
        plan: _ShapePlan | None = None,
        patch_size: tuple[int, int, int] | None = None,
        compilation_cache_dir: str | None = None,
    ):
        self.source = source
        self.plan = plan
        self.patch_size = patch_size
        self.compilation_cache_dir = compilation_cache_dir
        # workers follow the allocator setting of the process that built the loader
        self.allocator_threshold = runtime.applied_threshold()

    def map(self, tagged):
        if self.allocator_threshold is not None and runtime.applied_threshold() is None:
            runtime.tune_host_allocator(self.allocator_threshold)
        if self.compilation_cache_dir is not None:
            compilation.use_compilation_cache(self.compilation_cache_dir)
        _, index = tagged
        if self.plan is None:
            subject = self.source[index]
        else:
            with buckets.kernel_buckets(self.plan.kernel_buckets):
                subject = self.source[index]
            if subject is not None:
                subject = self._to_bucket(index, subject)
        return None if subject is None else (tagged, subject)

    def _to_bucket(self, index: int, subject: Subject) -> Subject | None:
        try:
            shape = subject.spatial_shape
            if self.patch_size is not None and any(p > s for p, s in zip(self.patch_size, shape)):
                raise ValueError(
                    f"its shape after preprocessing {shape} is smaller than the patch {self.patch_size}; "
                    "pad it in preprocessing (e.g. CropOrPad or EnsureShapeMultiple)"
                )
            bucket = self.plan.bucket(shape)
            if bucket is None:
                raise ValueError(
                    f"its shape after preprocessing {shape} fits none of the shape buckets "
                    f"{list(self.plan.volume_buckets)} planned from the headers; the preprocessing "
                    "gave another shape than predicted: pass buckets= explicitly, or buckets=None"
                )
            return buckets.pad_subject(subject, bucket)
        except ValueError as err:
            message = f"subject {self.source.describe(index)}: {err}"
            return self.source._bad_subject(message, ValueError(message), None)


def _to_device_layout(data: Any) -> tuple[Any, bool]:
    """``data`` as handed to ``jit``, and whether it is handed over transposed.

    A Fortran-ordered ``(x, y, z, c)`` array (as NIfTI files store voxels) is passed as
    its C-ordered transpose ``(c, z, y, x)``, a view: XLA transposes it back inside the
    program, fused with what reads it, instead of JAX copying it to C order on the host
    (about 3x slower for a 197x233x189 volume).
    """
    data = np.asarray(data)
    transposed = data.ndim > 1 and data.flags.f_contiguous and not data.flags.c_contiguous
    return (data.T if transposed else data), transposed


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4))
def _augment_and_sample_one(
    augmentation, sampler, num_patches, layout, seed, epoch, index, data, affines, extents
):
    """``layout``: ``(name, kind, transposed)`` per image (see ``_to_device_layout``);
    ``extents``: each image's valid shape when padded to a bucket (else ``None``).

    The key is derived inside the program: eager key operations would each compile a
    small program in every worker at start-up. An augmentation that is not
    padding-aware sees a padded volume as a whole (its padding is background); the
    sampler always keeps patches inside the valid region.
    """
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), epoch), index)
    subject = Subject(
        {
            name: Image.tree_unflatten(
                kind, (jnp.transpose(data[name]) if transposed else data[name], affines[name], extents[name])
            )
            for name, kind, transposed in layout
        }
    )
    k_aug, k_sample = jax.random.split(key)
    if augmentation is not None:
        if buckets.is_padding_aware(augmentation):
            subject = augmentation(k_aug, subject)
        else:
            plain = subject.replace({n: im.replace(extent=None) for n, im in subject.items()})
            out = augmentation(k_aug, plain)
            subject = out.replace({n: out[n].replace(extent=extents.get(n)) for n in out})
    patches = sampler(k_sample, subject.without_history(), num_patches)
    return (
        {n: patches[n].data for n in patches},
        {n: patches[n].affine for n in patches},
        patches.metadata["location"],
    )


class _AugmentAndSample(grain.transforms.Map):
    """(tag, subject) -> element of ``num_patches`` stacked patches (runs in the workers).

    The key is ``fold_in(fold_in(key(seed), epoch), subject_index)``, independent of
    worker count, shard and position in the shuffled order.
    """

    def __init__(self, augmentation, sampler, num_patches: int, seed: int):
        self.augmentation = augmentation
        self.sampler = sampler
        self.num_patches = num_patches
        self.seed = seed

    def map(self, item):
        if item is None:
            return None
        (epoch, index), subject = item
        # metadata stays out of jit (strings would recompile); compiled once per
        # (augmentation, sampler, num_patches, layout, volume shape) and process
        layout, data, affines, extents = [], {}, {}, {}
        for name, image in subject.items():
            data[name], transposed = _to_device_layout(image.data)
            affines[name] = image.affine
            extents[name] = image.extent
            layout.append((name, image.kind, transposed))
        static = (self.augmentation, self.sampler, self.num_patches, tuple(layout), self.seed)
        dynamic = (np.uint32(epoch), np.uint32(index), data, affines, extents)
        program = compilation.compile_once(
            _augment_and_sample_one, static, dynamic, name="the augmentation and sampling"
        )
        data, affine, location = program(*dynamic)
        return _element(
            subject,
            {n: np.asarray(v) for n, v in data.items()},
            {n: np.asarray(v) for n, v in affine.items()},
            location=np.asarray(location),
        )
