"""``SubjectsSource``: a grain random-access source of subjects loaded lazily from paths."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from jmed import _progress, buckets, io
from jmed.data.cache import _Cache
from jmed.image import INTENSITY, LABEL, Image, Subject

__all__ = ["SubjectsSource"]

logger = logging.getLogger(__name__)


def _check_deterministic(preprocessing: Any) -> Any:
    if preprocessing is None:
        return None
    if not callable(preprocessing):
        raise TypeError(f"preprocessing must be a jmed transform, got {preprocessing!r}")
    if getattr(preprocessing, "is_random", False):
        raise ValueError(
            f"preprocessing must be deterministic, got random {type(preprocessing).__name__}; "
            "put random transforms in augmentation="
        )
    return preprocessing


def _check_one_grid(subject: Subject) -> None:
    """Raise a ``ValueError`` unless the subject's images share one voxel grid: the same
    spatial shape and affines equal within ``jmed.AFFINE_TOLERANCE`` (1e-3 mm, entry by
    entry). Images holding the same world content on different grids (a label map
    stored flipped with a matching affine) fail too, as in TorchIO's samplers: augmenting
    and cutting patches voxel by voxel would misalign them."""
    try:
        subject.check_consistent()
    except ValueError as err:
        raise ValueError(
            f"its images do not share a voxel grid after preprocessing ({err}); resample them "
            "onto one reference grid in preprocessing, e.g. "
            "Compose([ToCanonical(), Resample(target=<name of the reference image>)])"
        ) from None


class SubjectsSource:
    """A grain random-access data source of subjects, loaded lazily from paths.

    Args:
        subjects: a sequence of records, one per subject: a mapping whose values are
            image paths (``str`` / ``PathLike`` with a readable extension, see
            ``jmed.io``) or metadata (age, diagnosis, ...). Loaded ``Subject`` s are also
            accepted (they are pickled to the workers; prefer paths for large data).
        label_names: names of the images that are label maps (others are intensity).
        preprocessing: a deterministic jmed transform applied after loading (in the
            worker), called as ``preprocessing(None, subject)``.
        cache_dir: optional folder for the decode-once cache: each preprocessed volume
            is stored uncompressed and read memory-mapped; the key covers the files'
            content and ``jmed.transforms.transform_key(preprocessing)``, so a changed file or configuration
            misses. Transforms must have a faithful ``repr`` (the default one lists
            their attributes). Entries are checked when read (geometry, shape, dtype,
            a CRC-32 of the voxels once per process) and a damaged one is deleted with a
            warning and rebuilt. If the folder cannot be written (full disk, no write
            permission) a warning is logged once and subjects are used uncached.
        skip_errors: if True a subject that fails to load, or whose images do not
            share a voxel grid after preprocessing (same spatial shape, affines within
            ``jmed.AFFINE_TOLERANCE`` = 1e-3 mm), is logged and skipped (``source[i]``
            returns ``None``); by default the error is raised naming the subject and its
            files (``RuntimeError`` for a file that cannot be read, ``ValueError`` for
            images on different grids).

    ``source[i]`` returns the loaded, preprocessed ``Subject``; its metadata holds the
    record's non-image values and ``subject_index = i``. The source holds only paths and
    pickles cheaply.

    Raises:
        ValueError: empty ``subjects``, a record without images, or records with
            different image names.
    """

    def __init__(
        self,
        subjects: Sequence[Mapping[str, Any] | Subject],
        *,
        label_names: Sequence[str] | str = (),
        preprocessing: Callable | None = None,
        cache_dir: str | os.PathLike | None = None,
        skip_errors: bool = False,
    ):
        if isinstance(subjects, (str, bytes, Mapping)) or not isinstance(subjects, Sequence):
            raise TypeError(
                f"subjects must be a sequence of records (mappings), got {type(subjects).__name__}"
            )
        if not subjects:
            raise ValueError("subjects is empty; give at least one subject record")
        self.label_names = (label_names,) if isinstance(label_names, str) else tuple(label_names)
        records: list[Any] = []
        names = None
        for i, record in enumerate(subjects):
            if isinstance(record, Subject):
                record_names = tuple(record)
            elif isinstance(record, Mapping):
                record_names = tuple(sorted(k for k, v in record.items() if io.is_image_path(v)))
                record = {k: (os.fspath(v) if io.is_image_path(v) else v) for k, v in record.items()}
            else:
                raise TypeError(
                    f"subjects[{i}] must be a mapping or a jmed.Subject, got {type(record).__name__}"
                )
            if not record_names:
                raise ValueError(
                    f"subjects[{i}] has no image path (values ending in {', '.join(io.READ_EXTENSIONS)} or .zarr): {record!r}"
                )
            if names is None:
                names = record_names
            elif record_names != tuple(sorted(names)):
                raise ValueError(
                    f"subjects[{i}] has images {list(record_names)}, subjects[0] has {list(names)}"
                )
            records.append(record)
        self.records = records
        self.image_names = tuple(sorted(names))
        self.preprocessing = _check_deterministic(preprocessing)
        self.cache_dir = None if cache_dir is None else os.fspath(cache_dir)
        self.skip_errors = bool(skip_errors)

    def __len__(self) -> int:
        return len(self.records)

    def kind_of(self, name: str) -> str:
        return LABEL if name in self.label_names else INTENSITY

    def __getitem__(self, index: int) -> Subject | None:
        index = int(index)
        try:
            subject = self._load(index)
        except Exception as err:
            message = f"cannot load subject {self.describe(index)}: {type(err).__name__}: {err}"
            return self._bad_subject(message, RuntimeError(message), err)
        try:
            _check_one_grid(subject)
        except ValueError as err:
            message = f"subject {self.describe(index)}: {err}"
            return self._bad_subject(message, ValueError(message), None)
        return subject

    def _bad_subject(self, message: str, error: Exception, cause: BaseException | None) -> None:
        """Skip the subject with a warning (``skip_errors``) or raise ``error``."""
        if self.skip_errors:
            logger.warning("%s (skipped: skip_errors=True)", message)
            return None
        raise error from cause

    def _load(self, index: int) -> Subject:
        record = self.records[index]
        if isinstance(record, Subject):
            subject = record.without_history()
            subject = subject.replace(metadata={**subject.metadata, "subject_index": index})
            return self._preprocess(subject)
        paths = {name: record[name] for name in self.image_names}
        metadata = {k: v for k, v in record.items() if k not in paths}
        metadata["subject_index"] = index
        kinds = {name: (path, self.kind_of(name)) for name, path in paths.items()}
        image_kinds = {name: kind for name, (_, kind) in kinds.items()}
        if self.cache_dir is not None:
            from jmed.transforms import transform_key

            cache = _Cache(self.cache_dir, transform_key(self.preprocessing))
            entry = cache.entry(kinds)
            images = cache.read(entry, image_kinds)
            if images is not None:
                return Subject(images, metadata=metadata)
        # in the file's order (see _preprocess): cheaper than C order for one jitted call
        images = {name: io._load(path, kind, file_order=True) for name, (path, kind) in kinds.items()}
        subject = self._preprocess(Subject(images, metadata=metadata))
        if self.cache_dir is not None:
            try:
                cache.write(entry, {name: subject[name] for name in subject})
            except OSError as err:
                # the cache only saves time: a full or read-only disk must not stop training
                cache.warn_once(f"entry {entry} of subject {index}", err)
            else:
                images = cache.read(entry, image_kinds)
                if images is not None:
                    subject = subject.replace(images)
        return subject

    def _preprocess(self, subject: Subject) -> Subject:
        # NIfTI data arrive in Fortran order and stay so: the Queue hands them to its
        # jitted sampler transposed (no copy), and a worker sending whole volumes copies
        # them to C order once, on the way into shared memory
        if self.preprocessing is None:
            images = {n: im.replace(affine=np.asarray(im.affine)) for n, im in subject.items()}
            return Subject(images, metadata=subject.metadata)
        out = self.preprocessing(None, subject)
        images = {
            n: im.replace(data=np.asarray(im.data), affine=np.asarray(im.affine)) for n, im in out.items()
        }
        return Subject(images, metadata=out.metadata)

    def build_cache(
        self, indices: Sequence[int] | None = None, *, progress: bool = False
    ) -> list[dict[str, tuple[int, ...]] | None]:
        """Decode and preprocess subjects into the cache folder ahead of training.

        Loads each subject as ``source[i]`` does (hits are only checked, misses decoded,
        preprocessed and stored), so that a loader's workers later read every subject
        memory-mapped from the cache.

        Args:
            indices: the subjects to cache (default: all).
            progress: show a progress bar on stderr, one step per subject.

        Returns:
            per subject, its images' shapes after preprocessing (``{name: shape}``), or
            ``None`` for a subject skipped with ``skip_errors=True``.

        Raises:
            ValueError: the source has no ``cache_dir``.
            RuntimeError / ValueError: a subject cannot be loaded (see ``__getitem__``).
        """
        if self.cache_dir is None:
            raise ValueError("build_cache needs a source with a cache_dir, got cache_dir=None")
        if not isinstance(progress, bool):
            raise TypeError(f"progress must be True or False, got {progress!r}")
        indices = range(len(self)) if indices is None else [int(i) for i in indices]
        shapes: list[dict[str, tuple[int, ...]] | None] = []
        for index in _progress.track(indices, progress, desc="caching subjects", unit="subject"):
            subject = self[index]
            shapes.append(
                None if subject is None else {name: tuple(im.shape) for name, im in subject.items()}
            )
        return shapes

    def describe(self, index: int) -> str:
        """``"3 (t1: path, seg: path)"``: a subject's index and its files, for messages."""
        record = self.records[index]
        if isinstance(record, Subject):
            return f"{index} (in memory)"
        files = ", ".join(f"{name}: {record[name]}" for name in self.image_names)
        return f"{index} ({files})"

    def predicted_shape(self, index: int) -> tuple[tuple[int, int, int], list]:
        """The spatial shape of subject ``index`` after preprocessing, from the headers
        alone (no voxel is read), and the ``(input, output)`` shapes of the resampling
        kernels its preprocessing runs.

        Raises:
            ValueError: the shape cannot be known without the voxels (data-dependent
                preprocessing such as ``CropForeground``), or the images disagree.
        """
        record = self.records[index]
        if isinstance(record, Subject):
            headers = dict(record.items())
        else:
            try:
                headers = {
                    name: io.load(record[name], kind=self.kind_of(name), lazy=True)
                    for name in self.image_names
                }
            except Exception as err:
                raise _UnreadableHeader(f"subject {self.describe(index)}: {err}") from err
        layout = {name: (image.kind, np.asarray(image.affine)) for name, image in headers.items()}
        abstract = {name: jax.ShapeDtypeStruct(image.shape, image.dtype) for name, image in headers.items()}

        def run(data):
            subject = Subject(
                {name: Image(data[name], affine, kind=kind) for name, (kind, affine) in layout.items()}
            )
            if self.preprocessing is not None:
                subject = self.preprocessing(None, subject)
            return {name: image.data for name, image in subject.items()}

        try:
            with buckets.recording_kernel_shapes() as kernels, buckets.predicting_shapes():
                shapes = jax.eval_shape(run, abstract)
        except Exception as err:
            raise ValueError(
                f"cannot predict the shape of subject {self.describe(index)} after preprocessing "
                f"from its headers ({type(err).__name__}: {err})"
            ) from err
        spatial = {tuple(int(n) for n in out.shape[:3]) for out in shapes.values()}
        if len(spatial) > 1:
            raise ValueError(
                f"the images of subject {self.describe(index)} have different shapes after "
                f"preprocessing: {sorted(spatial)}"
            )
        return spatial.pop(), kernels

    def __repr__(self) -> str:
        return (
            f"SubjectsSource({len(self)} subjects, images={list(self.image_names)}, "
            f"label_names={list(self.label_names)}, preprocessing={self.preprocessing!r}, "
            f"cache_dir={self.cache_dir!r})"
        )


class _UnreadableHeader(Exception):
    """A header the plan cannot read; the worker reports the subject when it loads it."""
