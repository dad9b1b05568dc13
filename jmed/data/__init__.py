"""Loading for training: a grain source of subjects, the patch ``Queue`` and whole-volume batches.

Two pipelines:

**CPU-loader pipeline** (``Queue``, TorchIO's ``SubjectsDataset`` + ``Queue``)::

    subject indices -> shuffle per epoch -> shard over JAX processes
      -> load + deterministic preprocessing      (worker processes)
      -> augment + extract samples_per_volume patches, one key per (epoch, subject)
      -> flatten -> window shuffle of max_length patches -> batch  (main process)

**Device pipeline** (``VolumeLoader`` + ``augment_and_sample``): the loader yields
fixed-shape preprocessed volumes; inside the jitted train step,
``augment_and_sample(key, batch, ...)`` runs ``vmap(augmentation)`` then ``vmap(sampler)``
on the accelerator.

Determinism: the patches of subject ``i`` in epoch ``e`` depend only on
``fold_in(fold_in(key(seed), e), i)``, the order of subjects on ``seed`` and ``e``, and
the window shuffle on ``seed``. Workers process whole subjects and their outputs are
interleaved in subject order, so batches are bit-identical for any ``num_workers``.
Iterators are grain ``DatasetIterator`` s: ``get_state()`` / ``set_state()`` restore a
position mid-epoch exactly, also into a loader with another number of workers.

Every subject is checked, after preprocessing, to hold its images on one voxel grid
(shape, and affines within ``jmed.AFFINE_TOLERANCE``); a subject that fails raises a
``ValueError`` naming it and its files (or is skipped with ``skip_errors=True``).

Batches are ``Subject`` s with a leading batch axis on every leaf: image data
``(b, x, y, z, c)`` (channels last), affines ``(b, 4, 4)``, ``metadata["location"]``
``(b, 6)`` int32 (patch start and stop voxel indices, see ``jmed.sampling``),
``metadata["subject_index"]`` ``(b,)`` (position of the subject in the ``subjects`` list)
and every record metadata value stacked (numbers as numeric arrays, strings as a numpy
string array: drop those before passing the batch to ``jax.jit``).

Worker processes are spawned: sources and transforms must pickle (they hold paths,
not open files; use module-level functions, not lambdas).

Layout: ``source`` (``SubjectsSource``) and ``cache`` (the decode-once store) turn
records into subjects; ``shape_plan`` plans shape buckets from the headers;
``load_and_sample`` holds the workers' per-subject work (load and preprocess, then augment
and cut patches); ``elements`` the values passed between stages and batching; ``loaders``
the ``Queue`` and ``VolumeLoader`` and their option groups; ``iterator`` and ``state`` the
checkpointable ``LoaderIterator``; ``device`` the device pipeline's
``augment_and_sample``.
"""

from jmed.data.device import augment_and_sample
from jmed.data.iterator import LoaderIterator

# the workers' load stage, at the path where the rest of the package has used it
from jmed.data.load_and_sample import _Load  # noqa: F401
from jmed.data.loaders import (
    BucketOptions,
    Queue,
    ShardOptions,
    SourceOptions,
    VolumeLoader,
    WorkerOptions,
)
from jmed.data.source import SubjectsSource

__all__ = [
    "BucketOptions",
    "LoaderIterator",
    "Queue",
    "ShardOptions",
    "SourceOptions",
    "SubjectsSource",
    "VolumeLoader",
    "WorkerOptions",
    "augment_and_sample",
]
