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
"""

from __future__ import annotations

import ast
import atexit
import functools
import gc
import hashlib
import json
import logging
import math
import os
import shutil
import sys
import weakref
import zlib
from collections.abc import Callable, Mapping, Sequence
from multiprocessing import shared_memory
from pathlib import Path
from typing import Any, NamedTuple

import grain
import jax
import jax.numpy as jnp
import numpy as np

from jmed import _atomic, buckets, compilation, io, runtime
from jmed import patch_reads as _patch_reads
from jmed.image import INTENSITY, LABEL, Image, Subject
from jmed.sampling import PatchSampler

__all__ = [
    "LoaderIterator",
    "Queue",
    "SubjectsSource",
    "VolumeLoader",
    "augment_and_sample",
]

logger = logging.getLogger(__name__)

_CACHE_VERSION = "jmed-cache-2"


def _ensure_absl_flags_parsed() -> None:
    """grain's worker processes read absl flags; with recent jaxlib they must be parsed."""
    try:
        from absl import flags
    except ImportError:  # pragma: no cover - absl ships with grain
        return
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _is_image_path(value: Any) -> bool:
    if not isinstance(value, (str, os.PathLike)):
        return False
    name = os.fspath(value).lower()
    return any(name.endswith(ext) for ext in io.READ_EXTENSIONS)


def _positive_int(value: Any, name: str, *, allow_zero: bool = False) -> int:
    low = 0 if allow_zero else 1
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return int(value)


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


# --- decode-once cache -------------------------------------------------------------------


def _hash_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _content_crc(data: np.ndarray) -> int:
    """CRC-32 of an array's bytes in memory order."""
    if data.flags.c_contiguous:
        flat = data
    elif data.flags.f_contiguous:
        flat = data.T
    else:
        flat = np.ascontiguousarray(data)
    if flat.size == 0:
        return 0
    return zlib.crc32(memoryview(flat.reshape(-1)).cast("B"))


def _seal(payload: Any) -> str:
    """A short checksum of a JSON value: an edited memo or geometry file no longer matches."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


class _CacheEntryInvalid(Exception):
    pass


# entries whose voxel checksums were verified in this process: (path, size, mtime_ns) of
# each data file; the check runs once per entry and process, not on every read
_VERIFIED: set[tuple[str, int, int]] = set()


class _Cache:
    """Preprocessed volumes stored as ``.npy`` (read memory-mapped), one folder per entry.

    An entry's key hashes the content of every image file (SHA-256), the image names and
    kinds, and ``transform_key(preprocessing)`` (a stable description). File digests are
    memoised by (path, size, modification time), in sealed memo files (an edited or
    copied memo is detected and the file hashed again), so a hit reads no voxels of the
    image files. An entry's ``geometry.json`` records per image the kind, affine, shape,
    dtype and a CRC-32 of the voxels, and is sealed by a checksum. Reading an entry checks
    its geometry file, the names and kinds expected, each ``.npy`` header against the
    recorded shape and dtype and, once per process, the voxels against their CRC; an
    entry that fails is deleted with a warning naming it and rebuilt. Entries are written
    to a temporary folder and renamed into place, so a partial entry is never read.
    Writing is best effort: with a read-only or full cache folder a warning is logged
    (once per folder and process) and subjects are used uncached.
    """

    _warned: set[str] = set()

    def __init__(self, folder: str | os.PathLike, config: str):
        self.folder = Path(folder)
        self.config = config

    def warn_once(self, what: str, err: OSError) -> None:
        if str(self.folder) not in _Cache._warned:
            _Cache._warned.add(str(self.folder))
            logger.warning(
                "cannot write to the cache folder %s (%s: %s); continuing without caching",
                self.folder,
                what,
                err,
            )

    def _digest(self, path: Path) -> str:
        stat = path.stat()
        resolved = str(path.resolve())
        memo = self.folder / "files" / (hashlib.sha256(os.fsencode(resolved)).hexdigest() + ".json")
        signature = {"path": resolved, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
        if memo.exists():
            try:
                stored = json.loads(memo.read_text())
                record = {k: stored[k] for k in ("path", "size", "mtime_ns", "sha256")}
                if stored["seal"] != _seal(record):
                    logger.warning("cache memo %s was altered; hashing %s again", memo, resolved)
                elif {k: record[k] for k in signature} == signature:
                    return record["sha256"]
            except (OSError, ValueError, KeyError, TypeError):
                pass
        digest = _hash_file(path)
        record = {**signature, "sha256": digest}
        try:
            memo.parent.mkdir(parents=True, exist_ok=True)
            _atomic.write_text(memo, json.dumps({**record, "seal": _seal(record)}))
        except OSError as err:
            self.warn_once(f"memo {memo}", err)
        return digest

    def entry(self, images: Mapping[str, tuple[str, str]]) -> Path:
        parts = [_CACHE_VERSION, self.config]
        for name, (path, kind) in sorted(images.items()):
            parts.append(f"{name}:{kind}:{self._digest(Path(path))}")
        key = hashlib.sha256("\n".join(parts).encode()).hexdigest()[:40]
        return self.folder / key

    @staticmethod
    def read(entry: Path, kinds: Mapping[str, str]) -> dict[str, Image] | None:
        """The entry's images, ``None`` if absent; an invalid entry is deleted (warning)."""
        geometry = entry / "geometry.json"
        if not geometry.exists():
            return None
        try:
            return _Cache._read_checked(entry, kinds)
        except (_CacheEntryInvalid, OSError, ValueError, KeyError, TypeError) as err:
            logger.warning("invalid cache entry %s (%s); deleting it and rebuilding", entry, err)
            shutil.rmtree(entry, ignore_errors=True)
            return None

    @staticmethod
    def _read_checked(entry: Path, kinds: Mapping[str, str]) -> dict[str, Image]:
        info = json.loads((entry / "geometry.json").read_text())
        if not isinstance(info, dict) or info.get("seal") != _seal(info.get("images")):
            raise _CacheEntryInvalid("geometry.json does not match its checksum")
        items = info["images"]
        if {name: item["kind"] for name, item in items.items()} != dict(kinds):
            raise _CacheEntryInvalid(
                f"it holds images {sorted(items)} of kinds "
                f"{[items[n]['kind'] for n in sorted(items)]}, expected {dict(sorted(kinds.items()))}"
            )
        images, checks = {}, []
        for name, item in items.items():
            path = entry / f"{name}.npy"
            data = np.load(path, mmap_mode="r")
            if list(data.shape) != item["shape"] or str(data.dtype) != item["dtype"]:
                raise _CacheEntryInvalid(
                    f"{path.name} holds {data.dtype} {data.shape}, recorded "
                    f"{item['dtype']} {tuple(item['shape'])}"
                )
            stat = path.stat()
            checks.append(((str(path), stat.st_size, stat.st_mtime_ns), name, data, item["crc32"]))
            images[name] = Image(data, np.array(item["affine"]), kind=item["kind"])
        for signature, name, data, crc in checks:
            if signature in _VERIFIED:
                continue
            if _content_crc(data) != crc:
                raise _CacheEntryInvalid(f"the voxels of {name}.npy do not match their checksum")
            _VERIFIED.add(signature)
        return images

    def write(self, entry: Path, images: Mapping[str, Image]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        # a private folder of the shared atomic writer (temporaries of dead writers swept)
        tmp = _atomic.temporary_folder(self.folder)
        try:
            items = {}
            for name, image in images.items():
                data = np.asarray(image.data)
                np.save(tmp / f"{name}.npy", data)
                items[name] = {
                    "affine": np.asarray(image.affine, float).tolist(),
                    "kind": image.kind,
                    "shape": list(data.shape),
                    "dtype": str(data.dtype),
                    "crc32": _content_crc(data),
                }
            # geometry.json last: its presence marks a complete entry
            (tmp / "geometry.json").write_text(json.dumps({"images": items, "seal": _seal(items)}))
            try:
                os.rename(tmp, entry)
                # just written from these arrays: no need to verify their checksums on read
                for name in items:
                    stat = (entry / f"{name}.npy").stat()
                    _VERIFIED.add((str(entry / f"{name}.npy"), stat.st_size, stat.st_mtime_ns))
            except OSError:
                if (entry / "geometry.json").exists():  # a concurrent writer's complete entry
                    return
                if not entry.is_dir():
                    raise
                # an incomplete entry (no geometry.json) is never read; replace it, or
                # every later run would fail to store this subject
                shutil.rmtree(entry, ignore_errors=True)
                try:
                    os.rename(tmp, entry)
                except OSError:
                    if not (entry / "geometry.json").exists():
                        raise
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)


# --- source --------------------------------------------------------------------------------


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
                record_names = tuple(sorted(k for k, v in record.items() if _is_image_path(v)))
                record = {k: (os.fspath(v) if _is_image_path(v) else v) for k, v in record.items()}
            else:
                raise TypeError(
                    f"subjects[{i}] must be a mapping or a jmed.Subject, got {type(record).__name__}"
                )
            if not record_names:
                raise ValueError(
                    f"subjects[{i}] has no image path (values ending in {', '.join(io.READ_EXTENSIONS)}): {record!r}"
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
        if self.cache_dir is not None:
            from jmed.transforms import transform_key

            cache = _Cache(self.cache_dir, transform_key(self.preprocessing))
            entry = cache.entry(kinds)
            images = cache.read(entry, {name: kind for name, (_, kind) in kinds.items()})
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
                images = cache.read(entry, {name: kind for name, (_, kind) in kinds.items()})
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


# --- shape buckets -------------------------------------------------------------------------


class _UnreadableHeader(Exception):
    """A header the plan cannot read; the worker reports the subject when it loads it."""


class _ShapePlan(NamedTuple):
    """Shape buckets of a loader: ``volume_buckets`` for the subjects after preprocessing
    (the compiled augmentation and sampling), ``kernel_buckets`` for the resampling
    kernels inside preprocessing; ``multiple``: with no bucket planned for a shape
    (``volume_buckets`` empty), pad each axis up to a multiple of it."""

    volume_buckets: tuple[tuple[int, int, int], ...]
    kernel_buckets: tuple[tuple[int, int, int], ...]
    multiple: int

    def bucket(self, shape: tuple[int, int, int]) -> tuple[int, int, int] | None:
        if not self.volume_buckets:
            return tuple(1 if n == 1 else -(-n // self.multiple) * self.multiple for n in shape)
        return buckets.bucket_for(shape, self.volume_buckets)


def _plan_shapes(source: SubjectsSource, indices: Sequence[int], buckets_arg, max_buckets: int) -> _ShapePlan:
    """The shape plan of a loader (main process; headers only)."""
    if buckets_arg != "auto":
        return _ShapePlan(tuple(buckets_arg), (), 32)
    volumes, kernels = [], []
    for index in indices:
        try:
            shape, recorded = source.predicted_shape(int(index))
        except _UnreadableHeader as err:
            logger.debug("left out of the shape plan: %s", err)
            continue
        except ValueError as err:
            logger.warning(
                "%s; padding every volume to multiples of 32 voxels per axis instead of planned buckets",
                err,
            )
            return _ShapePlan((), (), 32)
        volumes.append(shape)
        kernels.extend(recorded)
    if not volumes:
        return _ShapePlan((), (), 32)
    volume_buckets = tuple(buckets.plan_buckets(volumes, max_buckets=max_buckets))
    kernel_buckets: tuple = ()
    if kernels:
        inputs = buckets.plan_buckets([k[0] for k in kernels], max_buckets=2, min_gain=0.3)
        outputs = buckets.plan_buckets([k[1] for k in kernels], max_buckets=2, min_gain=0.3)
        kernel_buckets = tuple(dict.fromkeys(inputs + outputs))
    logger.info(
        "%d subject shapes -> volume buckets %s, resampling kernel buckets %s",
        len(set(volumes)),
        list(volume_buckets),
        list(kernel_buckets),
    )
    return _ShapePlan(volume_buckets, kernel_buckets, 32)


def _check_buckets(value: Any) -> Any:
    if value is None or (isinstance(value, str) and value == "auto"):
        return value
    if isinstance(value, str) or not isinstance(value, Sequence) or not value:
        raise ValueError(f"buckets must be 'auto', None or a sequence of shapes, got {value!r}")
    out = []
    for i, shape in enumerate(value):
        try:
            shape = tuple(int(n) for n in shape)
        except (TypeError, ValueError):
            shape = ()
        if len(shape) != 3 or min(shape) < 1:
            raise ValueError(f"buckets[{i}] must be 3 positive ints, got {value[i]!r}")
        out.append(shape)
    return tuple(out)


# --- elements exchanged between pipeline stages --------------------------------------------


def _numeric(value: Any) -> bool:
    return not isinstance(value, (str, bytes)) and value is not None


def _subject_to_element(subject: Subject) -> dict:
    """A plain dict of numpy arrays and strings (cheap to pickle between processes)."""
    return {
        # C order: grain passes C-contiguous arrays through shared memory, others by pickling
        "data": {n: np.ascontiguousarray(im.data) for n, im in subject.items()},
        "affine": {n: np.asarray(im.affine) for n, im in subject.items()},
        "kind": {n: im.kind for n, im in subject.items()},
        "metadata": {k: (np.asarray(v) if _numeric(v) else v) for k, v in subject.metadata.items()},
    }


def _collate(elements: Sequence[dict]) -> Subject:
    """Stack elements into a batched ``Subject`` (leading axis on every leaf)."""
    first = elements[0]
    images = {}
    for name, kind in first["kind"].items():
        shapes = {e["data"][name].shape for e in elements}
        if len(shapes) > 1:
            raise ValueError(
                f"cannot batch image {name!r}: shapes differ {sorted(shapes)}; make shapes equal in "
                "preprocessing (e.g. crop or pad to a fixed shape)"
            )
        data = np.stack([e["data"][name] for e in elements])
        affine = np.stack([e["affine"][name] for e in elements])
        images[name] = Image.tree_unflatten(kind, (data, affine))
    metadata = {}
    for key in first["metadata"]:
        values = [e["metadata"].get(key) for e in elements]
        if all(_numeric(v) for v in values):
            metadata[key] = np.stack([np.asarray(v) for v in values])
        else:
            metadata[key] = np.array([str(v) for v in values])
    return Subject(images, metadata=metadata)


class _CollateTo:
    def __init__(self, as_jax: bool):
        self.as_jax = as_jax

    def __call__(self, elements: Sequence[dict]) -> Subject:
        batch = _collate(elements)
        if self.as_jax:
            batch = jax.tree.map(lambda x: jnp.asarray(x) if x.dtype.kind in "biuf" else x, batch)
        return batch


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
            if self.source.skip_errors:
                logger.warning("%s (skipped: skip_errors=True)", message)
                return None
            raise ValueError(message) from None


class _EpochAndIndex:
    """Position in the repeated, shuffled index stream -> (epoch, subject index)."""

    def __init__(self, num_local: int):
        self.num_local = num_local

    def __call__(self, position: int, index: int) -> tuple[int, int]:
        return position // self.num_local, int(index)


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
        return {
            "data": {n: np.asarray(v) for n, v in data.items()},
            "affine": {n: np.asarray(v) for n, v in affine.items()},
            "kind": {n: im.kind for n, im in subject.items()},
            "location": np.asarray(location),
            "metadata": {k: (np.asarray(v) if _numeric(v) else v) for k, v in subject.metadata.items()},
        }


class _ToElement(grain.transforms.Map):
    def map(self, item):
        return None if item is None else _subject_to_element(item[1])


class _SplitPatches(grain.experimental.FlatMapTransform):
    """One element of ``n`` stacked patches -> ``n`` single-patch elements."""

    def __init__(self, max_fan_out: int):
        self.max_fan_out = max_fan_out

    def flat_map(self, element):
        if element is None:
            return []
        n = element["location"].shape[0]
        return [
            {
                "data": {k: v[i] for k, v in element["data"].items()},
                "affine": {k: v[i] for k, v in element["affine"].items()},
                "kind": element["kind"],
                "metadata": {**element["metadata"], "location": element["location"][i]},
            }
            for i in range(n)
        ]


class _DropNones(grain.experimental.FlatMapTransform):
    max_fan_out = 1

    def flat_map(self, element):
        return [] if element is None else [element]


class _FromWorkers(grain.transforms.Map):
    """Main process, on each element from the workers: count it (so that an error can
    name the subjects in flight), and unlink its shared memory at once.

    grain's workers hand arrays over in shared-memory blocks that the main process
    unlinks when the array is garbage collected, from a background thread; blocks still
    pending at exit were reported as leaked by Python's resource tracker. Unlinking
    right away frees the name (the mapping stays valid until the array is dropped), and
    the later collection only closes the mapping.
    """

    def __init__(self):
        self.received = 0

    def map(self, element):
        self.received += 1
        _unlink_shared(element)
        return element


def _unlink_shared(node: Any) -> None:
    if isinstance(node, dict):
        for value in node.values():
            _unlink_shared(value)
    elif isinstance(node, (list, tuple)):
        for value in node:
            _unlink_shared(value)
    elif isinstance(node, np.ndarray) and getattr(node, "_unlink_on_del", False):
        shm = getattr(node, "shm", None)
        if isinstance(shm, shared_memory.SharedMemory):
            try:
                shm.unlink()
            except FileNotFoundError:
                pass
            node._unlink_on_del = False


# --- iterator state independent of the worker count ---------------------------------------
#
# The batches do not depend on num_workers; only grain's state of the stage that hands the
# workers' elements to the main process does: with 0 workers ``{"next_index": n}``, with N
# workers an interleave of N slices (worker w computes elements w, w + N, ...) that the
# main process reads in turn. Both reduce to n, the number of elements received, which is
# what a saved state keeps; restoring rebuilds the stage's state for the new worker count.


def _received(node: Any) -> int | None:
    """Elements received from the workers, if ``node`` is the state of that stage."""
    if not isinstance(node, dict):
        return None
    if set(node) == {"next_index"} and isinstance(node["next_index"], int):
        return node["next_index"]
    if "iterators_in_use_states" in node and "next_index_in_cycle" in node:
        states = node["iterators_in_use_states"]
        if not all(isinstance(s, dict) and set(s) == {"next_index"} for s in states):
            return None
        total = sum(s["next_index"] for s in states)
        if node != {**node, **_stream_state(total, len(states))} and not any(node.get("exhausted", ())):
            return None  # not the round-robin layout assumed above
        return total
    return None


def _stream_state(received: int, num_workers: int) -> dict:
    if num_workers == 0:
        return {"next_index": received}
    per_worker = [received // num_workers + (w < received % num_workers) for w in range(num_workers)]
    return {
        "next_index_in_cycle": received % num_workers,
        "next_index_in_datasets": num_workers,
        "iterators_in_use_indices": list(range(num_workers)),
        "iterators_in_use_states": [{"next_index": n} for n in per_worker],
        "exhausted": [0] * num_workers,
        "future_states": {},
    }


def _map_stream_state(state: Any, convert: Callable[[int], Any]) -> tuple[Any, int] | None:
    """``state`` with the workers' stage replaced by ``convert(received)``, and ``received``;
    ``None`` if that stage is not found exactly once."""
    found = []

    def walk(node):
        received = _received(node)
        if received is not None:
            found.append(received)
            return convert(received)
        if isinstance(node, dict):
            return {k: walk(v) for k, v in node.items()}
        return node

    out = walk(state)
    return (out, found[0]) if len(found) == 1 else None


_STATE_FORMAT = "jmed-loader-state-1"
_RECEIVED = "subjects_received"


def _is_received_marker(node: Any) -> bool:
    return isinstance(node, dict) and set(node) == {_RECEIVED}


def _guard_message() -> str:
    return (
        "this script starts a jmed loader with worker processes at import time. Workers are "
        "spawned and import the main script again, so put the script's work under "
        '`if __name__ == "__main__":` (or pass num_workers=0)'
    )


def _check_main_guard() -> None:
    """Raise before spawning workers from a script that would start them again in each worker.

    A spawned worker imports the main script; code that is not under
    ``if __name__ == "__main__":`` runs again there and would start workers of its own
    (Python then fails in every worker with a long traceback). Detected in the main
    process from the script's source, and in a worker while it imports the script.
    """
    import multiprocessing

    if getattr(multiprocessing.current_process(), "_inheriting", False):
        raise RuntimeError(_guard_message())
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if main is None or path is None or not str(path).endswith(".py"):
        return  # interactive session, notebook, -c: nothing is imported again
    frame = sys._getframe(1)
    line = None
    while frame is not None:
        if frame.f_globals is main.__dict__ and frame.f_code.co_name == "<module>":
            line = frame.f_lineno
        frame = frame.f_back
    if line is None:
        return  # called from a function that the script's main block called
    try:
        tree = ast.parse(Path(path).read_text())
    except (OSError, SyntaxError, ValueError):
        return
    compares = [n for n in ast.walk(tree) if isinstance(n, ast.Compare) and _compares_main(n)]
    if any(not isinstance(n.ops[0], (ast.Eq, ast.Is)) for n in compares):
        return  # a guard of another form (`if __name__ != "__main__": exit()`): trust it
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and node.body and any(n in compares for n in ast.walk(node.test)):
            if node.body[0].lineno <= line <= (node.body[-1].end_lineno or node.lineno):
                return
    raise RuntimeError(_guard_message())


def _compares_main(test: ast.Compare) -> bool:
    """Whether ``test`` compares ``__name__`` with ``"__main__"``."""
    if len(test.ops) != 1:
        return False
    sides = [test.left, test.comparators[0]]
    names = [s for s in sides if isinstance(s, ast.Name) and s.id == "__name__"]
    consts = [s for s in sides if isinstance(s, ast.Constant) and s.value == "__main__"]
    return bool(names) and bool(consts)


def _shard(num_subjects: int, shard_index: int | None, shard_count: int | None, drop_remainder: bool):
    if shard_index is None:
        shard_index = jax.process_index()
    if shard_count is None:
        shard_count = jax.process_count()
    shard_count = _positive_int(shard_count, "shard_count")
    shard_index = _positive_int(shard_index, "shard_index", allow_zero=True)
    if shard_index >= shard_count:
        raise ValueError(f"shard_index must be < shard_count={shard_count}, got {shard_index}")
    indices = np.arange(num_subjects)[shard_index::shard_count]
    if drop_remainder and shard_count > 1:
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


def _subject_stream(
    source: SubjectsSource,
    indices: np.ndarray,
    *,
    shuffle: bool,
    seed: int,
    num_epochs: int | None,
    load: _Load,
) -> grain.MapDataset:
    ds = grain.MapDataset.source(np.asarray(indices))
    if shuffle:
        ds = ds.shuffle(seed=seed)
    ds = ds.repeat(num_epochs)
    ds = ds.map_with_index(_EpochAndIndex(len(indices)))
    return ds.map(load)


def _as_source(subjects, label_names, preprocessing, cache_dir, skip_errors) -> SubjectsSource:
    if isinstance(subjects, SubjectsSource):
        if label_names or preprocessing is not None or cache_dir is not None or skip_errors:
            raise ValueError(
                "give label_names/preprocessing/cache_dir/skip_errors to the SubjectsSource, not here"
            )
        return subjects
    return SubjectsSource(
        subjects,
        label_names=label_names,
        preprocessing=preprocessing,
        cache_dir=cache_dir,
        skip_errors=skip_errors,
    )


def _pretty_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError  # unreachable


class _Loader:
    """Shared configuration of ``Queue`` and ``VolumeLoader``."""

    def _setup(self, subjects, batch_size, num_workers, seed, num_epochs, shuffle_subjects, kw):
        self.source = _as_source(
            subjects, kw["label_names"], kw["preprocessing"], kw["cache_dir"], kw["skip_errors"]
        )
        self.batch_size = _positive_int(batch_size, "batch_size")
        self.num_workers = _positive_int(num_workers, "num_workers", allow_zero=True)
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise TypeError(f"seed must be an int, got {seed!r}")
        self.seed = int(seed)
        if num_epochs is not None:
            num_epochs = _positive_int(num_epochs, "num_epochs")
        self.num_epochs = num_epochs
        self.shuffle_subjects = bool(shuffle_subjects)
        self.indices, self.shard_index, self.shard_count = _shard(
            len(self.source), kw["shard_index"], kw["shard_count"], kw["drop_remainder"]
        )
        self.drop_last = bool(kw["drop_last"])
        self.as_jax = bool(kw["as_jax"])
        self.worker_buffer_size = _positive_int(kw["worker_buffer_size"], "worker_buffer_size")
        cache = kw["compilation_cache_dir"]
        if cache == "auto":
            cache = compilation.default_cache_dir()
        elif cache is not None and not isinstance(cache, (str, os.PathLike)):
            raise TypeError(f"compilation_cache_dir must be a folder, 'auto' or None, got {cache!r}")
        self.compilation_cache_dir = None if cache is None else os.fspath(cache)

    def _read_options(self) -> grain.ReadOptions:
        return grain.ReadOptions(num_threads=1, prefetch_buffer_size=self.worker_buffer_size)

    def _worker_stream(self, transform: grain.transforms.Map, load: _Load | None = None) -> grain.IterDataset:
        """Subjects of this process's shard, loaded and mapped by ``transform`` in the workers."""
        ds = _subject_stream(
            self.source,
            self.indices,
            shuffle=self.shuffle_subjects,
            seed=self.seed,
            num_epochs=self.num_epochs,
            load=load or _Load(self.source, compilation_cache_dir=self.compilation_cache_dir),
        )
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

    def _subject_at(self, position: int) -> int | None:
        """The subject index of element ``position`` of the workers' stream."""
        ds = grain.MapDataset.source(np.asarray(self.indices))
        if self.shuffle_subjects:
            ds = ds.shuffle(seed=self.seed)
        ds = ds.repeat(self.num_epochs)
        if position >= len(ds):
            return None
        return int(ds[position])

    def _in_flight(self, received: int) -> list[int]:
        """Subjects the worker that delivers element ``received`` may have been processing:
        that element and the ones it prepares ahead (every ``num_workers``-th)."""
        step = max(self.num_workers, 1)
        positions = [received + k * step for k in range(self.worker_buffer_size + 1)]
        subjects = [self._subject_at(p) for p in positions]
        return list(dict.fromkeys(s for s in subjects if s is not None))


def _wait_for_shared_memory_release(timeout: float = 5.0) -> None:
    """Wait until grain has closed and unlinked the shared memory of the arrays collected
    so far (it does so from one background thread, in order)."""
    try:
        from grain._src.python.ipc.shared_memory_array import SharedMemoryArray
    except ImportError:  # another grain layout: nothing known to wait for
        return
    pool = getattr(SharedMemoryArray, "_del_thread_pool", None)
    if pool is not None:
        try:
            pool.apply_async(int).wait(timeout)
        except (ValueError, RuntimeError):  # the pool is already shut down
            pass


# iterators not yet closed: closed at exit, while the interpreter is intact, so that the
# workers' shared-memory blocks are unlinked and the arrays mapping them released
_OPEN_ITERATORS: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _close_open_iterators() -> None:
    for iterator in list(_OPEN_ITERATORS):
        try:
            iterator._close(keep_state=False)
        except Exception:  # exiting anyway
            pass


class LoaderIterator:
    """Iterator over batches: grain's iterator, closed (workers stopped) when exhausted.

    Workers start when the iterator is created, so their start-up overlaps with whatever
    the caller does before asking for the first batch. ``get_state()`` returns a small
    JSON-compatible dict; ``set_state(state)`` on a fresh iterator of an identically
    configured loader continues exactly from that point, whatever the number of workers
    of either (the batches do not depend on it). Call ``close()`` (or use it as a context
    manager) to stop workers early.

    A worker process that dies (killed by the OS, typically for lack of memory) raises a
    ``RuntimeError`` naming the subjects it may have been processing.
    """

    def __init__(self, iterator: grain.DatasetIterator, loader: _Loader | None = None, counter=None):
        self._iterator = iterator
        self._loader = loader
        self._counter = counter
        # start every worker now, as PyTorch's DataLoader does, so that their start-up
        # (imports, compilation) overlaps with the caller's; grain alone would start each
        # worker only once the previous one has delivered its first element
        self._iterator.start_prefetch()
        self._final_state = None
        _OPEN_ITERATORS.add(self)

    def __iter__(self) -> LoaderIterator:
        return self

    def __next__(self) -> Subject:
        if self._iterator is None:
            raise StopIteration
        try:
            return next(self._iterator)
        except StopIteration:
            self.close()
            raise
        except RuntimeError as err:
            if "terminated unexpectedly" not in str(err) or self._loader is None or self._counter is None:
                raise
            self._close(keep_state=False)
            raise RuntimeError(self._worker_died_message(err)) from err

    def _worker_died_message(self, err: Exception) -> str:
        loader = self._loader
        received = self._counter.received
        subjects = loader._in_flight(received)
        described = "; ".join(loader.source.describe(i) for i in subjects) or "none (end of the stream)"
        return (
            f"a loader worker process died ({err}) while preparing element {received} of the "
            f"subject stream; it was processing one of the subjects {described}. A worker "
            "killed by the operating system (exit code -9, SIGKILL) has usually run out of "
            "memory: lower num_workers or worker_buffer_size, preprocess to smaller volumes, "
            "check loader.get_max_memory_pretty() against the memory limit, and see the kernel "
            "log (dmesg) for the out-of-memory killer; with another exit code, the worker's own "
            "error is printed above"
        )

    def get_state(self) -> dict:
        """The position, as a JSON-compatible dict that any worker count can restore."""
        if self._iterator is None:
            if self._final_state is None:
                raise RuntimeError("this iterator was closed after an error; it has no state to save")
            return self._final_state
        return self._portable_state(self._iterator.get_state())

    def _portable_state(self, state: dict) -> dict:
        mapped = _map_stream_state(state, lambda received: {_RECEIVED: received})
        num_workers = None if self._loader is None else self._loader.num_workers
        if mapped is None:  # a grain state layout this version does not know: keep it as is
            return {"format": _STATE_FORMAT, "num_workers": num_workers, "pipeline": state}
        return {"format": _STATE_FORMAT, "num_workers": num_workers, "pipeline": mapped[0]}

    def set_state(self, state: dict) -> None:
        """Continue from ``state`` (from ``get_state``, saved with any worker count).

        Raises:
            ValueError: ``state`` is not a loader state, or it was saved in a layout that
                only a loader with the same number of workers can restore and the
                counts differ.
        """
        if not isinstance(state, dict):
            raise ValueError(f"state must be a dict from get_state(), got {type(state).__name__}")
        if self._iterator is None:
            raise RuntimeError("this iterator is closed; call set_state on a new iter(loader)")
        num_workers = None if self._loader is None else self._loader.num_workers
        if state.get("format") == _STATE_FORMAT:
            pipeline = state["pipeline"]
            saved_workers = state.get("num_workers")
        else:  # a raw grain state (saved by earlier versions)
            pipeline, saved_workers = state, None
        received = []

        def restore(node):
            if _is_received_marker(node):
                received.append(int(node[_RECEIVED]))
                return _stream_state(received[-1], num_workers or 0)
            if isinstance(node, dict):
                return {k: restore(v) for k, v in node.items()}
            return node

        grain_state = restore(pipeline)
        if not received:
            mapped = _map_stream_state(pipeline, lambda n: _stream_state(n, num_workers or 0))
            if mapped is not None:
                grain_state, position = mapped
                received.append(position)
            elif saved_workers is not None and num_workers is not None and saved_workers != num_workers:
                raise ValueError(
                    f"this state was saved by a loader with num_workers={saved_workers} in a layout "
                    f"that only num_workers={saved_workers} can restore; this loader has "
                    f"num_workers={num_workers}"
                )
        self._iterator.set_state(grain_state)
        if received and self._counter is not None:
            self._counter.received = received[0]

    def close(self) -> None:
        """Stop the workers and release the data held for batches not yet delivered;
        ``get_state()`` still returns the position reached."""
        self._close(keep_state=True)

    def _close(self, keep_state: bool) -> None:
        iterator, self._iterator = self._iterator, None
        if iterator is None:
            return
        if keep_state:
            try:
                self._final_state = self._portable_state(iterator.get_state())
            except Exception:  # a broken pipeline has no position to keep
                self._final_state = None
        _OPEN_ITERATORS.discard(self)
        iterator.close()
        # grain's iterators hold arrays received ahead from the workers in reference
        # cycles: collect them now (not at interpreter shutdown, where their finaliser
        # fails) and let grain finish unlinking their shared memory
        del iterator
        gc.collect()
        _wait_for_shared_memory_release()

    def __enter__(self) -> LoaderIterator:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


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
        patch_reads: patch-first reading (see ``jmed.patch_reads``): workers read only
            each patch's region (patch plus ``patch_margin``) from region-readable files
            (uncompressed ``.nii``, memory-mapped), never a whole volume; label-balanced
            locations come from a per-block class index of the label map (stored under
            ``cache_dir`` when given). Off by default, because spatial augmentations then
            act on the region around each patch, not on the whole volume. ``True`` uses
            ``jmed.patch_reads.open_region``; a callable ``opener(path, kind)`` returning a
            ``jmed.patch_reads.RegionReader`` replaces it. Needs ``UniformSampler`` or
            ``LabelSampler`` and no ``preprocessing``; ``buckets`` do not apply.
        patch_margin: voxels read around each patch on each side for the augmentation
            (an int or 3 ints); ``None``: 0 without augmentation, else a quarter of the
            patch per axis. Only with ``patch_reads``.

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
        patch_reads: bool | Callable = False,
        patch_margin: int | Sequence[int] | None = None,
    ):
        if not callable(sampler) or not hasattr(sampler, "patch_size"):
            raise TypeError(f"sampler must be a jmed patch sampler, got {sampler!r}")
        if augmentation is not None and not callable(augmentation):
            raise TypeError(f"augmentation must be a jmed transform, got {augmentation!r}")
        self.sampler = sampler
        self.augmentation = augmentation
        self.samples_per_volume = _positive_int(samples_per_volume, "samples_per_volume")
        self.max_length = _positive_int(max_length, "max_length")
        self.shuffle_patches = bool(shuffle_patches)
        self.buckets = _check_buckets(buckets)
        self.max_buckets = _positive_int(max_buckets, "max_buckets")
        self._plan = None
        self._setup(
            subjects,
            batch_size,
            num_workers,
            seed,
            num_epochs,
            shuffle_subjects,
            dict(
                label_names=label_names,
                preprocessing=preprocessing,
                cache_dir=cache_dir,
                skip_errors=skip_errors,
                shard_index=shard_index,
                shard_count=shard_count,
                drop_remainder=drop_remainder,
                drop_last=drop_last,
                as_jax=as_jax,
                worker_buffer_size=worker_buffer_size,
                compilation_cache_dir=compilation_cache_dir,
            ),
        )
        # --- patch-first hook (jmed.patch_reads): configuration ---
        self.patch_reads = patch_reads
        self.patch_margin = None
        if patch_reads is not False:
            _patch_reads.check_queue(self)
            self.patch_margin = _patch_reads.check_margin(patch_margin, sampler.patch_size, augmentation)
        elif patch_margin is not None:
            raise ValueError(f"patch_margin={patch_margin!r} needs patch_reads=True")
        # --- end of the patch-first hook ---

    @property
    def dataset(self) -> grain.IterDataset:
        """The grain pipeline (an ``IterDataset`` of batches)."""
        if self.patch_reads is not False:
            # --- patch-first hook (jmed.patch_reads): the worker maps read regions only ---
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
            self._plan = _plan_shapes(self.source, range(len(self.source)), self.buckets, self.max_buckets)
        return self._plan

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
            # patch-first hook (jmed.patch_reads): regions, not volumes, from headers only
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

    Args: as ``Queue`` (without sampler, patch, window and bucket options);
    ``drop_last`` defaults to True so every batch has the same shape.

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
    ):
        self._setup(
            subjects,
            batch_size,
            num_workers,
            seed,
            num_epochs,
            shuffle_subjects,
            dict(
                label_names=label_names,
                preprocessing=preprocessing,
                cache_dir=cache_dir,
                skip_errors=skip_errors,
                shard_index=shard_index,
                shard_count=shard_count,
                drop_remainder=drop_remainder,
                drop_last=drop_last,
                as_jax=as_jax,
                worker_buffer_size=worker_buffer_size,
                compilation_cache_dir=compilation_cache_dir,
            ),
        )

    @property
    def dataset(self) -> grain.IterDataset:
        it = self._worker_stream(_ToElement())
        return self._batched(grain.experimental.FlatMapIterDataset(it, _DropNones()))

    def __repr__(self) -> str:
        return (
            f"VolumeLoader(subjects={len(self.source)}, batch_size={self.batch_size}, "
            f"num_workers={self.num_workers}, seed={self.seed})"
        )


def _sharded_like(keys: jax.Array, leaf: Any) -> jax.Array:
    """``keys`` split over the devices along their first axis as ``leaf``'s first axis is,
    when that axis is sharded over an explicit mesh axis: ``vmap`` needs the batch axes
    of its inputs sharded alike there (the keys split from one key are replicated)."""
    sharding = getattr(jax.typeof(leaf), "sharding", None)
    spec = getattr(sharding, "spec", None)
    if not spec or spec[0] is None:
        return keys
    return jax.sharding.reshard(
        keys, jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(spec[0]))
    )


def augment_and_sample(
    key: jax.Array,
    batch: Subject,
    *,
    sampler: PatchSampler,
    num_patches: int,
    augmentation: Callable | None = None,
) -> Subject:
    """Augment a batch of volumes and draw patches from each, on the accelerator.

    ``vmap(augmentation)`` then ``vmap(sampler)`` with one key per volume (split from
    ``key``), flattened to ``batch_size * num_patches`` patches: patch ``j`` of volume
    ``i`` is item ``i * num_patches + j``. Jittable (``sampler``, ``num_patches`` and
    ``augmentation`` are static configuration: close over them or use ``partial``).
    Only numeric metadata may be present (drop strings before ``jit``). A batch sharded
    along its first axis over a device mesh (``Auto`` or ``Explicit`` axes) stays sharded:
    each device augments its volumes and samples their patches, with the same result as
    on one device.

    Args:
        key: a JAX key.
        batch: batched ``Subject`` (leading batch axis), e.g. from ``VolumeLoader``.
        sampler: a jmed patch sampler.
        num_patches: patches per volume (static).
        augmentation: random jmed transform, or None.

    Returns:
        a patch ``Subject`` with leading axis ``batch_size * num_patches``; its metadata
        holds ``location`` ``(b * n, 6)`` and the batch's numeric metadata repeated per
        patch.
    """
    if not isinstance(sampler, PatchSampler):
        raise TypeError(f"sampler must be a jmed patch sampler, got {sampler!r}")
    first = jax.tree.leaves(batch)[0]
    batch_size = first.shape[0]
    keys = _sharded_like(jax.random.split(key, batch_size), first)

    def one(k, subject):
        k_aug, k_sample = jax.random.split(k)
        if augmentation is not None:
            subject = augmentation(k_aug, subject)
        return sampler(k_sample, subject.without_history(), num_patches)

    patches = jax.vmap(one)(keys, batch)
    return jax.tree.map(lambda x: x.reshape(batch_size * num_patches, *x.shape[2:]), patches)
