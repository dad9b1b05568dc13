"""The loaders: ``Queue`` (patches, TorchIO's queue) and ``VolumeLoader`` (whole volumes),
and their keyword-only option groups."""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import grain
import jax
import numpy as np

from jmed import buckets, compilation
from jmed import patch_reads as _patch_reads
from jmed._checks import is_int
from jmed.data.elements import _CollateTo, _DropNones, _FromWorkers, _SplitPatches, _ToElement
from jmed.data.iterator import LoaderIterator
from jmed.data.load_and_sample import _AugmentAndSample, _Load
from jmed.data.processes import _check_main_guard, _ensure_absl_flags_parsed
from jmed.data.shape_plan import _check_buckets, _plan_shapes, _ShapePlan
from jmed.data.source import SubjectsSource
from jmed.image import Subject
from jmed.sampling import PatchSampler

logger = logging.getLogger(__name__)


def _count(value: Any, name: str, *, minimum: int = 1) -> int:
    """``value`` as an int if it is one (not a bool) and ``>= minimum``, else a ``ValueError``."""
    if not is_int(value) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


class _EpochAndIndex:
    """Position in the repeated, shuffled index stream -> (epoch, subject index)."""

    def __init__(self, num_local: int):
        self.num_local = num_local

    def __call__(self, position: int, index: int) -> tuple[int, int]:
        return position // self.num_local, int(index)


def _shard(num_subjects: int, options: ShardOptions) -> tuple[np.ndarray, int, int]:
    shard_index, shard_count = options.resolve()
    indices = np.arange(num_subjects)[shard_index::shard_count]
    if options.drop_remainder and shard_count > 1:
        per_shard = num_subjects // shard_count
        if per_shard == 0:
            raise ValueError(f"{num_subjects} subjects cannot be split over {shard_count} processes")
        if num_subjects % shard_count:
            logger.warning(
                "%d subjects do not split evenly over %d processes: %d dropped so every process sees %d",
                num_subjects,
                shard_count,
                num_subjects % shard_count,
                per_shard,
            )
        indices = indices[:per_shard]
    return indices, shard_index, shard_count


@dataclasses.dataclass(frozen=True)
class SourceOptions:
    """How subject records become subjects (the arguments of ``SubjectsSource``).

    Give it as ``source_options=`` to a loader instead of the keywords of the same names.

    Attributes:
        label_names: names of the label-map images in the records.
        preprocessing: deterministic jmed transform applied after loading, in workers.
        cache_dir: decode-once cache folder (see ``SubjectsSource``), or ``None``.
        skip_errors: skip (and log) subjects that fail to load or whose images do not
            share a voxel grid, instead of raising.
    """

    label_names: Sequence[str] | str = ()
    preprocessing: Callable | None = None
    cache_dir: str | os.PathLike | None = None
    skip_errors: bool = False

    def __post_init__(self):
        names = self.label_names
        try:
            names = (names,) if isinstance(names, str) else tuple(names)
        except TypeError:
            names = None
        if names is None or not all(isinstance(n, str) for n in names):
            raise TypeError(f"label_names must be a name or a sequence of names, got {self.label_names!r}")
        object.__setattr__(self, "label_names", names)


@dataclasses.dataclass(frozen=True)
class ShardOptions:
    """This process's shard of the subjects, for training over several JAX processes.

    Give it as ``shard_options=`` to a loader instead of the keywords of the same names.

    Attributes:
        shard_index: this process's shard; ``None``: ``jax.process_index()``.
        shard_count: the number of shards; ``None``: ``jax.process_count()``. Subjects
            are dealt round-robin (``subjects[shard_index::shard_count]``).
        drop_remainder: with several shards, drop the last subjects so that every
            process has the same number (processes stay in lockstep); a warning is logged.

    Raises:
        ValueError: a negative ``shard_index``, a ``shard_count`` below 1, or
            ``shard_index >= shard_count``.
    """

    shard_index: int | None = None
    shard_count: int | None = None
    drop_remainder: bool = True

    def __post_init__(self):
        if self.shard_count is not None:
            object.__setattr__(self, "shard_count", _count(self.shard_count, "shard_count"))
        if self.shard_index is not None:
            object.__setattr__(self, "shard_index", _count(self.shard_index, "shard_index", minimum=0))
        object.__setattr__(self, "drop_remainder", bool(self.drop_remainder))

    def resolve(self) -> tuple[int, int]:
        """``(shard_index, shard_count)``, the defaults read from JAX's process layout."""
        index = jax.process_index() if self.shard_index is None else self.shard_index
        count = jax.process_count() if self.shard_count is None else self.shard_count
        if index >= count:
            raise ValueError(f"shard_index must be < shard_count={count}, got {index}")
        return index, count


@dataclasses.dataclass(frozen=True)
class BucketOptions:
    """Shape buckets of a ``Queue`` (see ``Queue``'s ``buckets`` and docs/buckets.md).

    Give it as ``bucket_options=`` to a ``Queue`` instead of the keywords of the same
    names.

    Attributes:
        buckets: ``"auto"`` (plan at most ``max_buckets`` shapes from the headers), a
            sequence of bucket shapes, or ``None`` (compile for every shape).
        max_buckets: most buckets ``"auto"`` plans (one compiled program each).

    Raises:
        ValueError: ``buckets`` is none of the above, or ``max_buckets < 1``.
    """

    buckets: str | Sequence[Sequence[int]] | None = "auto"
    max_buckets: int = 4

    def __post_init__(self):
        object.__setattr__(self, "buckets", _check_buckets(self.buckets))
        object.__setattr__(self, "max_buckets", _count(self.max_buckets, "max_buckets"))


@dataclasses.dataclass(frozen=True)
class WorkerOptions:
    """How the loader's worker processes prepare subjects.

    Give it as ``worker_options=`` to a loader instead of the keywords of the same names.

    Attributes:
        worker_buffer_size: subjects each worker prepares ahead.
        compilation_cache_dir: folder where compiled programs are kept (JAX's
            persistent compilation cache, see ``jmed.compilation``) so that a program is
            compiled by one worker once and loaded by the others and by later runs;
            ``"auto"``: ``jmed.compilation.default_cache_dir()``; ``None``: no cache.

    Raises:
        ValueError / TypeError: ``worker_buffer_size < 1``, or a
            ``compilation_cache_dir`` that is not a folder, ``"auto"`` or ``None``.
    """

    worker_buffer_size: int = 2
    compilation_cache_dir: str | os.PathLike | None = "auto"

    def __post_init__(self):
        object.__setattr__(self, "worker_buffer_size", _count(self.worker_buffer_size, "worker_buffer_size"))
        cache = self.compilation_cache_dir
        if cache is not None and not isinstance(cache, (str, os.PathLike)):
            raise TypeError(f"compilation_cache_dir must be a folder, 'auto' or None, got {cache!r}")
        object.__setattr__(self, "compilation_cache_dir", None if cache is None else os.fspath(cache))

    def resolved_cache_dir(self) -> str | None:
        """The compilation cache folder, with ``"auto"`` resolved."""
        if self.compilation_cache_dir == "auto":
            return os.fspath(compilation.default_cache_dir())
        return self.compilation_cache_dir


def _fields(options: Any) -> dict[str, Any]:
    """The fields of a dataclass by name, not copied (unlike ``dataclasses.asdict``)."""
    return {field.name: getattr(options, field.name) for field in dataclasses.fields(options)}


def _values(options: Any) -> list[Any]:
    return list(_fields(options).values())


def _same(value: Any, default: Any) -> bool:
    if value is default:
        return True
    try:
        return type(value) is type(default) and bool(value == default)
    except (TypeError, ValueError):
        return False


def _options(cls: type, given: Any, argument: str, keywords: Mapping[str, Any]) -> Any:
    """The options object ``given`` as ``argument=``, or one built from the loose
    ``keywords`` (each named as the field it sets); both at once is an error unless the
    keywords keep their defaults."""
    if given is None:
        return cls(**keywords)
    if not isinstance(given, cls):
        raise TypeError(f"{argument} must be a jmed.data.{cls.__name__}, got {given!r}")
    defaults = cls()
    changed = sorted(k for k, v in keywords.items() if not _same(v, getattr(defaults, k)))
    if changed:
        raise ValueError(
            f"{', '.join(changed)} given both as keywords and in {argument}={given!r}; give each once"
        )
    return given


# settings every loader passes to ``_Loader._setup`` as they are
_SHARED_SETTINGS = (
    "batch_size",
    "num_workers",
    "seed",
    "num_epochs",
    "shuffle_subjects",
    "drop_last",
    "as_jax",
    "progress",
)


def _setup_arguments(arguments: Mapping[str, Any]) -> dict[str, Any]:
    """The keyword arguments of ``_Loader._setup`` from a loader constructor's ``locals()``:
    the shared settings, and the option groups from the objects given or from the loose
    keywords."""
    out = {name: arguments[name] for name in _SHARED_SETTINGS}
    for argument, cls in (
        ("source_options", SourceOptions),
        ("shard_options", ShardOptions),
        ("worker_options", WorkerOptions),
    ):
        names = [field.name for field in dataclasses.fields(cls)]
        out[argument] = _options(
            cls, arguments[argument], argument, {name: arguments[name] for name in names}
        )
    return out


def _as_source(subjects: Any, options: SourceOptions) -> SubjectsSource:
    if isinstance(subjects, SubjectsSource):
        if any(not _same(v, d) for v, d in zip(_values(options), _values(SourceOptions()))):
            raise ValueError(
                "give label_names/preprocessing/cache_dir/skip_errors to the SubjectsSource, not here"
            )
        return subjects
    return SubjectsSource(subjects, **_fields(options))


def _pretty_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError  # unreachable


class _Loader:
    """Shared configuration of ``Queue`` and ``VolumeLoader``."""

    def _setup(
        self,
        subjects: Any,
        *,
        batch_size: Any,
        num_workers: Any,
        seed: Any,
        num_epochs: Any,
        shuffle_subjects: Any,
        drop_last: Any,
        as_jax: Any,
        source_options: SourceOptions,
        shard_options: ShardOptions,
        worker_options: WorkerOptions,
        progress: Any,
    ) -> None:
        self.source_options = source_options
        self.shard_options = shard_options
        self.worker_options = worker_options
        self.source = _as_source(subjects, source_options)
        self.batch_size = _count(batch_size, "batch_size")
        self.num_workers = _count(num_workers, "num_workers", minimum=0)
        if not is_int(seed):
            raise TypeError(f"seed must be an int, got {seed!r}")
        self.seed = int(seed)
        if num_epochs is not None:
            num_epochs = _count(num_epochs, "num_epochs")
        self.num_epochs = num_epochs
        self.shuffle_subjects = bool(shuffle_subjects)
        self.indices, self.shard_index, self.shard_count = _shard(len(self.source), shard_options)
        self.drop_last = bool(drop_last)
        self.as_jax = bool(as_jax)
        self.worker_buffer_size = worker_options.worker_buffer_size
        self.compilation_cache_dir = worker_options.resolved_cache_dir()
        if not isinstance(progress, bool):
            raise TypeError(f"progress must be True or False, got {progress!r}")
        self.progress = progress

    def _read_options(self) -> grain.ReadOptions:
        return grain.ReadOptions(num_threads=1, prefetch_buffer_size=self.worker_buffer_size)

    def _index_stream(self) -> grain.MapDataset:
        """The subject indices of this process's shard, shuffled per epoch, repeated."""
        ds = grain.MapDataset.source(np.asarray(self.indices))
        if self.shuffle_subjects:
            ds = ds.shuffle(seed=self.seed)
        return ds.repeat(self.num_epochs)

    def _worker_stream(self, transform: grain.transforms.Map, load: _Load | None = None) -> grain.IterDataset:
        """Subjects of this process's shard, loaded and mapped by ``transform`` in the workers."""
        load = load or _Load(self.source, compilation_cache_dir=self.compilation_cache_dir)
        ds = self._index_stream().map_with_index(_EpochAndIndex(len(self.indices))).map(load)
        return self._prefetch(ds.map(transform).to_iter_dataset(self._read_options(), allow_nones=True))

    def _batched(self, it: grain.IterDataset) -> grain.IterDataset:
        return it.batch(self.batch_size, drop_remainder=self.drop_last, batch_fn=_CollateTo(self.as_jax))

    def _prefetch(self, ds: grain.IterDataset) -> grain.IterDataset:
        if self.num_workers == 0:
            self._from_workers = _FromWorkers()
            return ds.map(self._from_workers)
        _check_main_guard()
        _ensure_absl_flags_parsed()
        ds = ds.mp_prefetch(
            grain.MultiprocessingOptions(
                num_workers=self.num_workers, per_worker_buffer_size=self.worker_buffer_size
            )
        )
        self._from_workers = _FromWorkers()
        return ds.map(self._from_workers)

    def __iter__(self) -> LoaderIterator:
        """A fresh iterator from the start; its workers start now. Supports ``get_state`` /
        ``set_state`` (restore right after creating it: work already under way is dropped)."""
        dataset = self.dataset
        return LoaderIterator(iter(dataset), self, self._from_workers)

    def _patches_per_subject(self) -> int:
        return 1

    def _elements_for_first_batch(self) -> int:
        return self.batch_size

    def _subjects_for_first_batch(self) -> int:
        """How many subjects the workers prepare before the first batch (an estimate for
        the start-up progress bar: skipped subjects are not foreseen)."""
        per_subject = self._patches_per_subject()
        needed = -(-self._elements_for_first_batch() // per_subject)
        if self.num_epochs is not None:
            needed = min(needed, len(self.indices) * self.num_epochs)
        return max(needed, 1)

    def _subject_at(self, position: int) -> int | None:
        """The subject index of element ``position`` of the workers' stream."""
        ds = self._index_stream()
        return int(ds[position]) if position < len(ds) else None

    def _in_flight(self, received: int) -> list[int]:
        """Subjects the worker that delivers element ``received`` may have been processing:
        that element and the ones it prepares ahead (every ``num_workers``-th)."""
        step = max(self.num_workers, 1)
        positions = [received + k * step for k in range(self.worker_buffer_size + 1)]
        subjects = [self._subject_at(p) for p in positions]
        return list(dict.fromkeys(s for s in subjects if s is not None))


class Queue(_Loader):
    """Patch queue for training (TorchIO's ``Queue``) built on grain.

    Args:
        subjects: subject records (see ``SubjectsSource``) or a ``SubjectsSource``.
        sampler: a jmed patch sampler (``UniformSampler``, ``WeightedSampler``,
            ``LabelSampler``, or any ``PatchSampler``).
        samples_per_volume: patches extracted from each subject per epoch.
        max_length: window of patches shuffled together (TorchIO's queue length). grain
            fills a window, shuffles it and emits it whole, so patches of up to
            ``ceil(max_length / samples_per_volume) + 1`` subjects mix in a batch.
        batch_size: patches per batch.
        num_workers: worker processes loading, preprocessing, augmenting and sampling
            (0: in the main process). Batches do not depend on it.
        seed: seed of every random choice (subject order, augmentation, patches, window
            shuffle).
        preprocessing: deterministic jmed transform, applied after loading, in workers.
        augmentation: random jmed transform ``augmentation(key, subject)``, applied to
            the whole volume before sampling, in workers (jitted; one compilation per
            shape bucket, shared by the workers through ``compilation_cache_dir``).
        label_names: names of label-map images in the records.
        num_epochs: passes over the subjects (``None``: repeat forever). Subjects are
            reshuffled each epoch.
        shuffle_subjects: shuffle the subject order each epoch.
        shuffle_patches: shuffle patches within windows of ``max_length``.
        buckets: shape buckets, so that workers compile a few programs whatever the
            number of distinct subject shapes. ``"auto"`` (default): at most
            ``max_buckets`` bucket shapes planned from every subject's header and the
            preprocessing (its output shapes are predicted without reading voxels); each
            subject is padded to the smallest bucket that holds it and carries its true
            shape as ``Image.extent``; the resampling kernels of the preprocessing run on
            buckets too. A sequence of shapes: those buckets. ``None``: every shape is
            compiled for (the behaviour before buckets). With a padding-aware
            augmentation (``jmed.buckets.is_padding_aware``) the patches equal those of
            ``buckets=None`` within float rounding; see docs/buckets.md for the others.
        max_buckets: most buckets ``"auto"`` plans (one compiled program each).
        drop_last: drop the last, incomplete batch (keeps shapes static for ``jit``).
        cache_dir: decode-once cache folder (see ``SubjectsSource``).
        skip_errors: skip (and log) subjects that fail to load, or whose images do not
            share a voxel grid after preprocessing, instead of raising.
        shard_index, shard_count: this process's shard of the subjects; default
            ``jax.process_index()`` and ``jax.process_count()``. Subjects are dealt
            round-robin (``subjects[shard_index::shard_count]``).
        drop_remainder: with several shards, drop the last subjects so every process
            has the same number (processes stay in lockstep); a warning is logged.
        as_jax: yield JAX arrays instead of numpy (numeric leaves).
        worker_buffer_size: subjects each worker prepares ahead.
        compilation_cache_dir: folder where compiled programs are kept (JAX's
            persistent compilation cache, see ``jmed.compilation``), so that a program is
            compiled by one worker once and loaded by the others and by later runs.
            ``"auto"`` (default): ``jmed.compilation.default_cache_dir()``
            (``~/.cache/jmed/xla``); ``None``: no cache. It is turned on in the worker
            processes (and in this process with ``num_workers=0``).
        source_options: ``SourceOptions``, in place of ``label_names``,
            ``preprocessing``, ``cache_dir`` and ``skip_errors``.
        shard_options: ``ShardOptions``, in place of ``shard_index``, ``shard_count``
            and ``drop_remainder``.
        bucket_options: ``BucketOptions``, in place of ``buckets`` and ``max_buckets``.
        worker_options: ``WorkerOptions``, in place of ``worker_buffer_size`` and
            ``compilation_cache_dir``.
        progress: show progress bars on stderr while the loader starts: the shape
            planning (one header read per subject) and, for each new iterator, the
            subjects prepared until the first batch is ready (worker start-up and
            compilation included). Batches do not depend on it.
        patch_reads: patch-first reading (see ``jmed.patch_reads``): workers read only
            each patch's region (patch plus ``patch_margin``) from region-readable files
            (uncompressed ``.nii``, memory-mapped; chunked NIfTI-Zarr and zarr stores,
            local or remote), never a whole volume; label-balanced locations come from a
            per-block class index of the label map (stored under ``cache_dir`` when
            given). Off by default, because spatial augmentations then act on the region
            around each patch, not on the whole volume. ``True`` uses
            ``jmed.patch_reads.open_region``; a callable ``opener(path, kind)`` returning a
            ``jmed.patch_reads.RegionReader`` replaces it. Needs ``UniformSampler`` or
            ``LabelSampler`` and no ``preprocessing``; ``buckets`` do not apply.
        patch_margin: voxels read around each patch on each side for the augmentation
            (an int or 3 ints); ``None``: 0 without augmentation, else a quarter of the
            patch per axis. Only with ``patch_reads``.

    An option group and the loose keywords it replaces are two spellings of one
    configuration: ``Queue(..., shard_options=ShardOptions(shard_count=2))`` equals
    ``Queue(..., shard_count=2)``; giving a field both ways (a keyword away from its
    default) raises a ``ValueError``.

    Iterating yields batched ``Subject`` s (see the module docstring). Each
    ``iter(queue)`` starts again at epoch 0.

    Raises:
        ValueError / TypeError: bad configuration, naming the argument.
    """

    def __init__(
        self,
        subjects: Sequence[Mapping[str, Any] | Subject] | SubjectsSource,
        sampler: PatchSampler,
        samples_per_volume: int,
        max_length: int,
        batch_size: int = 1,
        num_workers: int = 0,
        seed: int = 0,
        *,
        preprocessing: Callable | None = None,
        augmentation: Callable | None = None,
        label_names: Sequence[str] | str = (),
        num_epochs: int | None = 1,
        shuffle_subjects: bool = True,
        shuffle_patches: bool = True,
        buckets: str | Sequence[Sequence[int]] | None = "auto",
        max_buckets: int = 4,
        drop_last: bool = False,
        cache_dir: str | os.PathLike | None = None,
        skip_errors: bool = False,
        shard_index: int | None = None,
        shard_count: int | None = None,
        drop_remainder: bool = True,
        as_jax: bool = False,
        worker_buffer_size: int = 2,
        compilation_cache_dir: str | os.PathLike | None = "auto",
        source_options: SourceOptions | None = None,
        shard_options: ShardOptions | None = None,
        bucket_options: BucketOptions | None = None,
        worker_options: WorkerOptions | None = None,
        progress: bool = False,
        patch_reads: bool | Callable = False,
        patch_margin: int | Sequence[int] | None = None,
    ):
        if not callable(sampler) or not hasattr(sampler, "patch_size"):
            raise TypeError(f"sampler must be a jmed patch sampler, got {sampler!r}")
        if augmentation is not None and not callable(augmentation):
            raise TypeError(f"augmentation must be a jmed transform, got {augmentation!r}")
        self.sampler = sampler
        self.augmentation = augmentation
        self.samples_per_volume = _count(samples_per_volume, "samples_per_volume")
        self.max_length = _count(max_length, "max_length")
        self.shuffle_patches = bool(shuffle_patches)
        self.bucket_options = _options(
            BucketOptions, bucket_options, "bucket_options", dict(buckets=buckets, max_buckets=max_buckets)
        )
        self.buckets = self.bucket_options.buckets
        self.max_buckets = self.bucket_options.max_buckets
        self._plan = None
        self._setup(subjects, **_setup_arguments(locals()))
        self.patch_reads = patch_reads
        self.patch_margin = None
        if patch_reads is not False:
            _patch_reads.check_queue(self)
            self.patch_margin = _patch_reads.check_margin(patch_margin, sampler.patch_size, augmentation)
        elif patch_margin is not None:
            raise ValueError(f"patch_margin={patch_margin!r} needs patch_reads=True")

    @property
    def dataset(self) -> grain.IterDataset:
        """The grain pipeline (an ``IterDataset`` of batches)."""
        if self.patch_reads is not False:
            # patch-first: the workers read each patch's region only
            open_regions, read_and_sample = _patch_reads.worker_maps(self)
            it = self._worker_stream(read_and_sample, open_regions)
        else:
            load = _Load(
                self.source,
                self.shape_plan,
                self.sampler.patch_size,
                compilation_cache_dir=self.compilation_cache_dir,
            )
            it = self._worker_stream(
                _AugmentAndSample(self.augmentation, self.sampler, self.samples_per_volume, self.seed), load
            )
        # flatten and shuffle in the main process, so the order is the same for any worker count
        it = grain.experimental.FlatMapIterDataset(it, _SplitPatches(self.samples_per_volume))
        if self.shuffle_patches and self.max_length > 1:
            it = grain.experimental.WindowShuffleIterDataset(it, window_size=self.max_length, seed=self.seed)
        return self._batched(it)

    @property
    def shape_plan(self) -> _ShapePlan | None:
        """The shape buckets (``None`` with ``buckets=None``), planned once from the headers
        of every subject (all shards, so every process compiles the same programs)."""
        if self.buckets is None:
            return None
        if self._plan is None:
            if not buckets.is_padding_aware(self.augmentation):
                logger.warning(
                    "the augmentation %r is not padding-aware (see docs/buckets.md): on subjects "
                    "padded to a shape bucket it runs on the padded volume as a whole (background "
                    "padding, a larger field of view); pass buckets=None for exact per-shape "
                    "processing (one compilation per shape)",
                    self.augmentation,
                )
            self._plan = _plan_shapes(
                self.source, range(len(self.source)), self.buckets, self.max_buckets, progress=self.progress
            )
        return self._plan

    def _patches_per_subject(self) -> int:
        return self.samples_per_volume

    def _elements_for_first_batch(self) -> int:
        # grain's window shuffle fills its whole window before emitting anything
        window = self.max_length if self.shuffle_patches and self.max_length > 1 else 1
        return -(-self.batch_size // window) * window

    @property
    def num_patches_per_epoch(self) -> int:
        """Patches this process delivers per epoch (before any skipped subject)."""
        return len(self.indices) * self.samples_per_volume

    def __len__(self) -> int:
        """Batches per pass over ``num_epochs`` (raises if repeating forever)."""
        if self.num_epochs is None:
            raise TypeError("a Queue with num_epochs=None has no length")
        total = self.num_patches_per_epoch * self.num_epochs
        return total // self.batch_size if self.drop_last else -(-total // self.batch_size)

    def get_max_memory(self, subject: Subject | None = None) -> int:
        """Estimated peak bytes held by the pipeline (like TorchIO's ``get_max_memory``).

        Counts the patch window and a batch in the main process, and per worker (at
        least one) ``worker_buffer_size + 1`` volumes (input and augmented copy) and
        their patches. Array data only: each process's interpreter and JAX runtime
        (a few hundred MiB) come on top. Volume sizes come from ``subject`` or from loading the first
        subject (with preprocessing). With ``patch_reads`` and no ``subject``: the regions read
        per patch instead of volumes (see ``jmed.patch_reads.max_memory``), from headers only.
        """
        if self.patch_reads is not False and subject is None:
            return _patch_reads.max_memory(self)
        if subject is None:
            subject = self.source[int(self.indices[0])]
            if subject is None:
                raise ValueError("the first subject could not be loaded; pass subject=")
        volume = sum(np.asarray(im.data).nbytes for im in subject.values())
        patch = 0
        for im in subject.values():
            itemsize = np.dtype(im.dtype).itemsize
            patch += math.prod(self.sampler.patch_size) * im.num_channels * itemsize
        per_subject_patches = patch * self.samples_per_volume
        main = patch * (self.max_length + self.batch_size) + per_subject_patches
        workers = (
            max(self.num_workers, 1) * (self.worker_buffer_size + 1) * (2 * volume + per_subject_patches)
        )
        return int(main + workers)

    def get_max_memory_pretty(self, subject: Subject | None = None) -> str:
        return _pretty_bytes(self.get_max_memory(subject))

    def __repr__(self) -> str:
        return (
            f"Queue(subjects={len(self.source)}, sampler={self.sampler!r}, "
            f"samples_per_volume={self.samples_per_volume}, max_length={self.max_length}, "
            f"batch_size={self.batch_size}, num_workers={self.num_workers}, seed={self.seed})"
        )


class VolumeLoader(_Loader):
    """Batches of whole preprocessed volumes, for the device pipeline.

    Volumes are loaded and preprocessed in workers and batched in subject order
    (shuffled per epoch). All volumes must have the same shape after preprocessing
    (crop or pad to a fixed shape), otherwise batching raises a ``ValueError``. Pair it
    with ``augment_and_sample`` inside the jitted train step.

    Args: as ``Queue`` (without sampler, patch, window and bucket options; ``progress``
    shows the subjects prepared until the first batch); ``drop_last`` defaults to True
    so every batch has the same shape.

    Examples:
        A train step, with a fixed-shape loader::

            loader = jmed.VolumeLoader(records, batch_size=2, label_names="seg",
                                       preprocessing=crop_or_pad, num_workers=2)

            @jax.jit
            def train_step(state, key, batch):
                patches = jmed.augment_and_sample(
                    key, batch, sampler=sampler, num_patches=8, augmentation=augment)
                ...  # patches["t1"].data: (2 * 8, px, py, pz, c)
    """

    def __init__(
        self,
        subjects: Sequence[Mapping[str, Any] | Subject] | SubjectsSource,
        batch_size: int = 1,
        num_workers: int = 0,
        seed: int = 0,
        *,
        preprocessing: Callable | None = None,
        label_names: Sequence[str] | str = (),
        num_epochs: int | None = 1,
        shuffle_subjects: bool = True,
        drop_last: bool = True,
        cache_dir: str | os.PathLike | None = None,
        skip_errors: bool = False,
        shard_index: int | None = None,
        shard_count: int | None = None,
        drop_remainder: bool = True,
        as_jax: bool = False,
        worker_buffer_size: int = 2,
        compilation_cache_dir: str | os.PathLike | None = "auto",
        source_options: SourceOptions | None = None,
        shard_options: ShardOptions | None = None,
        worker_options: WorkerOptions | None = None,
        progress: bool = False,
    ):
        self._setup(subjects, **_setup_arguments(locals()))

    @property
    def dataset(self) -> grain.IterDataset:
        it = self._worker_stream(_ToElement())
        return self._batched(grain.experimental.FlatMapIterDataset(it, _DropNones()))

    def __repr__(self) -> str:
        return (
            f"VolumeLoader(subjects={len(self.source)}, batch_size={self.batch_size}, "
            f"num_workers={self.num_workers}, seed={self.seed})"
        )
