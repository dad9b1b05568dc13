"""Patch-first reading for the ``Queue``: read only the boxes that patches need.

With ``jmed.Queue(..., patch_reads=True)`` a worker never decodes a whole volume. For each
subject it

1. draws the ``samples_per_volume`` patch locations on the host, from the same key as the
   whole-volume path (``fold_in(fold_in(key(seed), epoch), subject_index)``, split into an
   augmentation key and a sampling key), so locations do not depend on the number of
   workers;
2. reads, for each patch, only its region: the patch plus ``patch_margin`` voxels on each
   side (no margin without augmentation), through a ``RegionReader``;
3. runs the augmentation on each region (its affine moved to the region's first voxel,
   so world coordinates stay right; one key per patch, ``split(augmentation_key, n)``)
   and cuts the patch out of the region's centre.

Spatial augmentations therefore act on the region around each patch, as in nnU-Net's
batchgenerators, not on the whole volume: a rotation turns about the patch's centre, and
content further than ``patch_margin`` voxels from the patch cannot move into it (set the
margin from the largest displacement the augmentation can make). Region voxels outside
the volume are filled with 0 in label maps and with the smallest value read in the
region in intensity images.

Samplers: ``UniformSampler`` gives exactly the locations of the whole-volume path.
``LabelSampler`` keeps its semantics (a class drawn with the given probabilities among
the classes present at eligible centres, then a voxel of that class uniformly, optionally
nnU-Net's ``foreground_fraction``) from a **class index**: per block of ``64^3`` eligible
centres, how many voxels of each label it holds, built once per label file by reading it
block by block (never the whole array). A draw then reads one block of the label map to
find its voxel. The index is stored in ``cache_dir/class-index`` when the Queue has a
``cache_dir`` and the file a content key (a local file or chunked store), else kept in
memory in each worker. The draws are not the same as the
whole-volume path's (they follow the block order), only their distribution is.

Preprocessing needs whole volumes and is refused: preprocess and store the data once
beforehand (e.g. resampled, canonical, as uncompressed ``.nii``).

Region readers: ``open_region(path, kind)`` opens uncompressed NIfTI files (``.nii``)
memory-mapped (``NiftiRegionReader``: a box reads only the pages it touches), and chunked
stores (``.zarr``) and URLs as ``ImageRegionReader`` over the lazy image
``jmed.load(path, kind, lazy=True)``, whose ``read_region`` reads only the chunks a box
touches. Any object with the ``RegionReader`` attributes can stand in (pass an opener
callable as ``patch_reads=``).
"""

from __future__ import annotations

import functools
import hashlib
import io as _io
import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import grain
import jax
import jax.numpy as jnp
import numpy as np

from jmed import _atomic, _checks, compilation, io
from jmed import affine as affine_lib
from jmed.image import AFFINE_TOLERANCE, INTENSITY, LABEL, Image, Subject
from jmed.sampling import LabelSampler, UniformSampler, _uniform_starts

__all__ = [
    "CLASS_INDEX_BLOCK",
    "ClassIndex",
    "ImageRegionReader",
    "NiftiRegionReader",
    "RegionReader",
    "build_class_index",
    "default_margin",
    "open_region",
]

logger = logging.getLogger(__name__)

CLASS_INDEX_BLOCK = 64
"""Edge, in voxels, of the blocks of a class index (and of the label box one draw reads)."""

_INDEX_VERSION = "jmed-class-index-1"
REGION_EXTENSIONS = (".nii",)
STORE_EXTENSIONS = (".zarr",)


@runtime_checkable
class RegionReader(Protocol):
    """A volume whose boxes can be read alone.

    Attributes:
        shape: ``(x, y, z, c)``, channels last.
        dtype: dtype of what ``read`` returns (float32 for intensity images, the label
            dtype of ``jmed.load`` for label maps).
        affine: 4x4 voxel-to-world affine (RAS+ millimetres).

    ``read(start, size)`` returns the voxels of the box ``start .. start + size`` (3 ints
    each, inside the volume) as a numpy array ``(sx, sy, sz, c)``, reading only that box.
    A reader may also have ``cache_key``, a string that changes when its content changes,
    used to store its class index on disk (without it, the index is kept in memory under
    the path the reader was opened from).
    """

    shape: tuple[int, int, int, int]
    dtype: np.dtype
    affine: np.ndarray

    def read(self, start: Sequence[int], size: Sequence[int]) -> np.ndarray: ...


class NiftiRegionReader:
    """A region reader over an uncompressed NIfTI file (``.nii``), memory-mapped.

    Reads through ``jmed.load(path, kind, lazy=True)``'s ``read_region``, so values equal
    ``jmed.load(path, kind)`` in the same box: intensities scaled and converted to float32,
    label maps checked and stored in their label dtype. The file is opened on first use in
    each process, so the reader pickles as a path.

    Raises:
        ValueError: a path that is not an uncompressed NIfTI file, an unreadable header or
            one without voxels, an RGB image, or (on read) non-integer values in a label map.
        FileNotFoundError: a missing file.
    """

    def __init__(self, path: str | os.PathLike, kind: str = INTENSITY):
        if kind not in (INTENSITY, LABEL):
            raise ValueError(f"kind must be {INTENSITY!r} or {LABEL!r}, got {kind!r}")
        self.path = Path(path)
        self.kind = kind
        if not self.path.name.lower().endswith(".nii"):
            raise ValueError(
                f"{self.path}: patch reads need a region-readable file (uncompressed .nii, read "
                "memory-mapped); convert it once, e.g. jmed.save(jmed.load(path), 'x.nii')"
            )
        if not self.path.is_file():
            raise FileNotFoundError(f"no such image file: {self.path}")
        self._lazy = None
        image = self._image()
        if not image._data.reads_regions:
            raise ValueError(
                f"{self.path}: this image cannot be read by region (RGB voxels, or channels not "
                "stored last); store one channel per colour in a 3D or 4D file"
            )
        self.shape = tuple(int(s) for s in image.shape)
        self.affine = np.asarray(image.affine, np.float64)
        self.dtype = np.dtype(image.dtype)
        stat = self.path.stat()
        self.cache_key = f"{self.path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"

    def _image(self):
        if self._lazy is None:
            self._lazy = io.load(self.path, self.kind, lazy=True)
        return self._lazy

    def __getstate__(self):
        return {**self.__dict__, "_lazy": None}

    def read(self, start: Sequence[int], size: Sequence[int]) -> np.ndarray:
        start, size = _box(start, size, self.shape[:3], self.path)
        return self._image().read_region(start, size)

    def __repr__(self) -> str:
        return f"NiftiRegionReader({str(self.path)!r}, kind={self.kind!r})"


def _box(start, size, shape, where) -> tuple[tuple[int, ...], tuple[int, ...]]:
    start = tuple(int(s) for s in start)
    size = tuple(int(s) for s in size)
    if (
        len(start) != 3
        or len(size) != 3
        or any(n < 1 or s < 0 or s + n > d for s, n, d in zip(start, size, shape))
    ):
        raise ValueError(
            f"{where}: the box start={start}, size={size} is not inside the volume {tuple(shape)}"
        )
    return start, size


class ImageRegionReader:
    """A region reader over a lazy ``jmed.Image`` that reads boxes itself, through its
    ``read_region(start, size)`` (e.g. an image of a chunked store, which reads only the
    chunks a box touches).

    Args:
        image: the image; its ``shape`` ``(x, y, z, c)``, ``dtype`` and ``affine`` are
            the reader's.
        cache_key: a string that changes when the content changes (stores the class
            index on disk); ``None``: the index is kept in memory only.
    """

    def __init__(self, image: Any, cache_key: str | None = None):
        if not callable(getattr(image, "read_region", None)):
            raise TypeError(f"image must have a read_region(start, size) method, got {type(image).__name__}")
        self.image = image
        self.shape = tuple(int(s) for s in image.shape)
        self.dtype = np.dtype(image.dtype)
        self.affine = np.asarray(image.affine, np.float64)
        if cache_key is not None:
            self.cache_key = str(cache_key)

    def read(self, start: Sequence[int], size: Sequence[int]) -> np.ndarray:
        start, size = _box(start, size, self.shape[:3], repr(self))
        return np.asarray(self.image.read_region(start, size)).reshape(*size, self.shape[3])

    def __repr__(self) -> str:
        return f"ImageRegionReader({type(self.image).__name__} {self.shape})"


def _is_store(path: str | os.PathLike) -> bool:
    """A chunked store or a remote URL (``io.load`` reads it through ``jmed.chunked``)."""
    return io._is_chunked(path)


def _check_region_readable(path: str | os.PathLike) -> None:
    if not (Path(path).name.lower().endswith(REGION_EXTENSIONS) or _is_store(path)):
        raise ValueError(
            f"{path}: patch reads need region-readable files ({', '.join(REGION_EXTENSIONS + STORE_EXTENSIONS)} "
            "or URLs); convert the dataset once (e.g. .nii.gz to uncompressed .nii) or pass patch_reads=False"
        )


def open_region(path: str | os.PathLike, kind: str) -> RegionReader:
    """The region reader of an image file (the default opener of ``patch_reads=True``):
    ``NiftiRegionReader`` for ``.nii``; for chunked stores (``.zarr``) and URLs, an
    ``ImageRegionReader`` over ``jmed.load(path, kind, lazy=True)``.

    Raises:
        ValueError: a file format that cannot be read by region (e.g. ``.nii.gz``, whose
            voxels are compressed as one stream), naming the path and the formats allowed.
    """
    _check_region_readable(path)
    if os.fspath(path).startswith("file://"):
        path = os.fspath(path)[len("file://") :]
    if _is_store(path):
        return ImageRegionReader(io.load(path, kind, lazy=True), cache_key=_store_key(path))
    return NiftiRegionReader(path, kind)


def _store_key(path: str | os.PathLike) -> str | None:
    """A content key of a local chunked store: a digest of the name, size and change time
    of every file in it (a chunk rewritten in place changes it too); None for a URL, whose
    class index is then kept in memory only."""
    text = os.fspath(path)
    if text.startswith("file://"):
        text = text[len("file://") :]
    elif "://" in text:
        return None
    root = Path(text).resolve()
    if not root.is_dir():
        raise ValueError(f"{path}: a chunked store is a folder; this is not one")
    digest = hashlib.sha256(str(root).encode())
    for folder, names, files in sorted(os.walk(root)):
        names.sort()
        for name in sorted(files):
            stat = os.stat(os.path.join(folder, name))
            digest.update(
                f"{os.path.relpath(folder, root)}/{name}:{stat.st_size}:{stat.st_mtime_ns}\n".encode()
            )
    return f"{root}:{digest.hexdigest()[:24]}"


# --- class index -------------------------------------------------------------------------------


class ClassIndex:
    """Label counts per block of the eligible patch centres of a label map.

    Centre ``v`` (in ``origin + v`` volume voxels, ``origin = patch_size // 2``) is the
    centre of the patch starting at voxel ``v``; centres range over ``shape`` =
    ``volume - patch_size + 1`` per axis, cut into blocks of ``block`` voxels per axis in C
    order. ``counts[b, k]`` is the number of centres of block ``b`` whose label is
    ``labels[k]`` (the first channel, or the argmax of several channels).
    """

    def __init__(self, origin, shape, block: int, labels: np.ndarray, counts: np.ndarray):
        self.origin = tuple(int(v) for v in origin)
        self.shape = tuple(int(v) for v in shape)
        self.block = int(block)
        self.labels = np.asarray(labels)
        self.counts = np.asarray(counts, np.int64)
        grid = self.grid
        if self.counts.shape != (math.prod(grid), len(self.labels)):
            raise ValueError(f"class index counts {self.counts.shape} do not fit {grid} blocks")

    @property
    def grid(self) -> tuple[int, int, int]:
        return tuple(-(-s // self.block) for s in self.shape)

    def block_box(self, b: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Start (in centre coordinates) and size of block ``b``."""
        corner = np.unravel_index(int(b), self.grid)
        start = tuple(int(c) * self.block for c in corner)
        size = tuple(min(self.block, s - o) for s, o in zip(self.shape, start))
        return start, size


def _labels_of(data: np.ndarray) -> np.ndarray:
    return data[..., 0] if data.shape[-1] == 1 else np.argmax(data, axis=-1)


def build_class_index(
    reader: RegionReader, patch_size: Sequence[int], block: int = CLASS_INDEX_BLOCK
) -> ClassIndex:
    """Stream a label map block by block (one block in memory at a time) into its
    ``ClassIndex`` for patches of ``patch_size``."""
    patch_size = tuple(int(p) for p in patch_size)
    origin = tuple(p // 2 for p in patch_size)
    shape = tuple(s - p + 1 for s, p in zip(reader.shape[:3], patch_size))
    if any(s < 1 for s in shape):
        raise ValueError(f"patch_size {patch_size} is larger than the volume {tuple(reader.shape[:3])}")
    grid = tuple(-(-s // block) for s in shape)
    found: dict[int, np.ndarray] = {}
    num_blocks = math.prod(grid)
    empty = ClassIndex(origin, shape, block, np.zeros(0, np.int64), np.zeros((num_blocks, 0)))
    for b in range(num_blocks):
        start, size = empty.block_box(b)
        labels = _labels_of(reader.read(tuple(o + s for o, s in zip(origin, start)), size))
        values, counts = np.unique(labels, return_counts=True)
        for v, c in zip(values.tolist(), counts.tolist()):
            if v not in found:
                found[v] = np.zeros(num_blocks, np.int64)
            found[v][b] = c
    labels = np.array(sorted(found), np.int64)
    counts = np.stack([found[v] for v in labels.tolist()], axis=1) if found else np.zeros((num_blocks, 0))
    return ClassIndex(origin, shape, block, labels, counts)


# class indexes built in this process: {(cache_key, patch_size, block): ClassIndex}
_INDEXES: dict[tuple, ClassIndex] = {}


def _class_index(
    reader: RegionReader, source_path: str, patch_size, block: int, cache_dir: str | None
) -> ClassIndex:
    reader_key = getattr(reader, "cache_key", None)
    # without a content key the index is kept in memory only, under the path it was opened from
    key = (reader_key or f"path:{source_path}", tuple(patch_size), block)
    if key in _INDEXES:
        return _INDEXES[key]
    path = None
    if reader_key is not None and cache_dir is not None:
        digest = hashlib.sha256(f"{_INDEX_VERSION}\n{key}".encode()).hexdigest()[:40]
        path = Path(cache_dir) / "class-index" / f"{digest}.npz"
        index = _read_index(path, key)
        if index is not None:
            _INDEXES[key] = index
            return index
    index = build_class_index(reader, patch_size, block)
    if path is not None:
        _write_index(path, key, index)
    _INDEXES[key] = index
    return index


def _read_index(path: Path, key: tuple) -> ClassIndex | None:
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as stored:
            if str(stored["key"]) != repr(key):
                raise ValueError("it was written for another file")
            return ClassIndex(
                stored["origin"], stored["shape"], int(stored["block"]), stored["labels"], stored["counts"]
            )
    except (OSError, ValueError, KeyError) as err:
        logger.warning("invalid class index %s (%s); building it again", path, err)
        return None


def _write_index(path: Path, key: tuple, index: ClassIndex) -> None:
    def payload() -> bytes:
        buffer = _io.BytesIO()
        np.savez(
            buffer,
            key=np.array(repr(key)),
            origin=np.array(index.origin),
            shape=np.array(index.shape),
            block=np.array(index.block),
            labels=index.labels,
            counts=index.counts,
        )
        return buffer.getvalue()

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _atomic.write_bytes(path, payload)
    except OSError as err:
        # the index only saves time: it is rebuilt in memory
        logger.warning("cannot store the class index %s (%s); keeping it in memory", path, err)


def _class_columns(index: ClassIndex, sampler: LabelSampler) -> tuple[np.ndarray, Callable, np.ndarray]:
    """Per-block counts of the sampler's classes ``(num_blocks, K)``, a function mapping a
    label array to class ids (-1: none), and the class weights (as ``LabelSampler``)."""
    if sampler.label_probabilities is None:
        positive = index.labels > 0
        columns = np.stack([index.counts[:, ~positive].sum(1), index.counts[:, positive].sum(1)], axis=1)
        return columns, lambda labels: (labels > 0).astype(np.int64), np.array([0.0, 1.0])
    values = np.array(list(sampler.label_probabilities), np.int64)
    weights = np.array(list(sampler.label_probabilities.values()), np.float64)
    columns = np.zeros((index.counts.shape[0], len(values)), np.int64)
    for k, v in enumerate(values.tolist()):
        match = np.flatnonzero(index.labels == v)
        if match.size:
            columns[:, k] = index.counts[:, match[0]]

    def classes(labels):
        out = np.full(labels.shape, -1, np.int64)
        for k, v in enumerate(values.tolist()):
            out[labels == v] = k
        return out

    return columns, classes, weights


def _draw_by_class(u: np.ndarray, index: ClassIndex, reader: RegionReader, columns, classes, weights):
    """Starts ``(n, 3)`` and whether a weighted class is present; ``u`` ``(n, 2)``."""
    totals = columns.sum(axis=0)
    q = np.where(totals > 0, weights, 0.0)
    if q.sum() <= 0:
        return np.zeros((len(u), 3), np.int64), False
    cdf = np.cumsum(q)
    starts = []
    for u_class, u_voxel in np.asarray(u, np.float64):
        chosen = min(int(np.searchsorted(cdf, u_class * cdf[-1], side="right")), len(q) - 1)
        count = int(totals[chosen])
        rank = min(int(u_voxel * count), count - 1)
        block_cdf = np.cumsum(columns[:, chosen])
        b = int(np.searchsorted(block_cdf, rank, side="right"))
        rank -= int(block_cdf[b] - columns[b, chosen])
        start, size = index.block_box(b)
        labels = _labels_of(reader.read(tuple(o + s for o, s in zip(index.origin, start)), size))
        flat = np.flatnonzero(classes(labels).reshape(-1) == chosen)
        if rank >= flat.size:
            raise ValueError(
                f"the class index of {reader!r} does not match its voxels (block {b}); the file "
                "changed while in use, or its cached class index is stale"
            )
        voxel = np.unravel_index(int(flat[rank]), size)
        starts.append([s + int(v) for s, v in zip(start, voxel)])
    return np.array(starts, np.int64), True


# --- worker side ---------------------------------------------------------------------------------


def default_margin(patch_size: Sequence[int], augmentation: Any) -> tuple[int, int, int]:
    """The default ``patch_margin``: none without augmentation, else a quarter of the
    patch per axis (at least 1 voxel)."""
    if augmentation is None:
        return (0, 0, 0)
    return tuple(max(1, int(p) // 4) for p in patch_size)


def check_margin(value: Any, patch_size, augmentation) -> tuple[int, int, int]:
    """``patch_margin`` of the Queue as 3 ints >= 0 (``None``: ``default_margin``)."""
    if value is None:
        return default_margin(patch_size, augmentation)
    return _checks.int_triple(value, "patch_margin", minimum=0)


def check_queue(queue) -> None:
    """Refuse Queue settings the patch-first path cannot honour (named in the error)."""
    source = queue.source
    if source.preprocessing is not None:
        raise ValueError(
            f"preprocessing={source.preprocessing!r} needs whole volumes and cannot run with "
            "patch_reads; preprocess the dataset once beforehand and store it region-readable "
            "(e.g. uncompressed .nii), or pass patch_reads=False"
        )
    if not isinstance(queue.sampler, (UniformSampler, LabelSampler)):
        raise ValueError(
            f"sampler={queue.sampler!r} is not supported with patch_reads (UniformSampler and "
            "LabelSampler are); pass patch_reads=False"
        )
    for i, record in enumerate(source.records):
        if isinstance(record, Subject):
            raise TypeError(f"subjects[{i}] is a loaded jmed.Subject; patch_reads needs file paths")
    if queue.patch_reads is not True and not callable(queue.patch_reads):
        raise TypeError(
            f"patch_reads must be True, False or an opener callable (path, kind), got {queue.patch_reads!r}"
        )
    if queue.patch_reads is True:
        # fail early on a format that cannot be read by region (names only: a missing or
        # damaged file is reported, or skipped with skip_errors, when its subject is read)
        for record in source.records:
            for name in source.image_names:
                _check_region_readable(record[name])


class OpenRegions(grain.transforms.Map):
    """(epoch, index) -> ((epoch, index), readers, metadata, paths), in the workers: headers only."""

    def __init__(
        self, source, opener: Callable[[str, str], RegionReader], patch_size, compilation_cache_dir=None
    ):
        self.source = source
        self.opener = opener
        self.patch_size = tuple(patch_size)
        self.compilation_cache_dir = compilation_cache_dir

    def map(self, tagged):
        if self.compilation_cache_dir is not None:
            compilation.use_compilation_cache(self.compilation_cache_dir)
        _, index = tagged
        record = self.source.records[index]
        try:
            readers = {
                name: self.opener(record[name], self.source.kind_of(name)) for name in self.source.image_names
            }
            _check_readers(readers, self.patch_size)
        except Exception as err:
            message = (
                f"cannot read patches of subject {self.source.describe(index)}: {type(err).__name__}: {err}"
            )
            error = ValueError(message) if isinstance(err, ValueError) else RuntimeError(message)
            return self.source._bad_subject(message, error, err)
        metadata = {k: v for k, v in record.items() if k not in self.source.image_names}
        metadata["subject_index"] = index
        paths = {name: str(record[name]) for name in self.source.image_names}
        return tagged, readers, metadata, paths


def _check_readers(readers: Mapping[str, RegionReader], patch_size) -> None:
    shapes = {name: tuple(r.shape[:3]) for name, r in readers.items()}
    first = next(iter(readers))
    for name, reader in readers.items():
        difference = float(np.max(np.abs(np.asarray(reader.affine) - np.asarray(readers[first].affine))))
        if shapes[name] != shapes[first] or difference > AFFINE_TOLERANCE:
            raise ValueError(
                f"its images do not share a voxel grid: {name} {shapes[name]} vs {first} {shapes[first]}, "
                f"affines differing by up to {difference:.3g} mm (allowed {AFFINE_TOLERANCE}); "
                "resample them onto one grid before storing them"
            )
    if any(p > s for p, s in zip(patch_size, shapes[first])):
        raise ValueError(f"its shape {shapes[first]} is smaller than the patch {tuple(patch_size)}")


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _draws(num_patches, width, seed, epoch, index, valid):
    """The sampling key's uniforms ``(n, width)`` and the uniform starts from their last 3
    columns, as ``UniformSampler`` / ``LabelSampler`` draw them."""
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), epoch), index)
    u = jax.random.uniform(jax.random.split(key)[1], (num_patches, width))
    return u, _uniform_starts(u[:, -3:], valid)


@jax.jit
def _move(affine, starts):
    return jax.vmap(lambda s: affine_lib.translate_voxels(affine, s.astype(affine.dtype)))(starts)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4))
def _augment_regions(augmentation, layout, margin, patch_size, seed, epoch, index, data, affines):
    """Augment each region ``(n, rx, ry, rz, c)`` with its own key and cut the patch at
    its centre; ``affines`` are the regions' (one per image, ``(n, 4, 4)``)."""
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), epoch), index)
    num = next(iter(data.values())).shape[0]
    keys = jax.random.split(jax.random.split(key)[0], num)

    def one(k, d, a):
        region = Subject(
            {name: Image.tree_unflatten(kind, (d[name], a[name], None)) for name, kind in layout}
        )
        out = augmentation(k, region)
        box = tuple(slice(m, m + p) for m, p in zip(margin, patch_size))
        return (
            {n: out[n].data[box] for n in out},
            {
                n: affine_lib.translate_voxels(out[n].affine, jnp.asarray(margin, out[n].affine.dtype))
                for n in out
            },
        )

    return jax.vmap(one)(keys, data, affines)


def _read_padded(reader: RegionReader, start, size, kind: str) -> np.ndarray:
    shape = reader.shape[:3]
    lo = [max(s, 0) for s in start]
    hi = [min(s + n, d) for s, n, d in zip(start, size, shape)]
    if lo == list(start) and hi == [s + n for s, n in zip(start, size)]:
        return reader.read(start, size)
    inner = reader.read(lo, [h - low for h, low in zip(hi, lo)])
    fill = 0 if kind == LABEL else inner.min()
    out = np.full((*size, reader.shape[3]), fill, reader.dtype)
    out[tuple(slice(low - s, h - s) for low, h, s in zip(lo, hi, start))] = inner
    return out


class ReadAugmentAndSample(grain.transforms.Map):
    """((epoch, index), readers, metadata, paths) -> element of ``num_patches`` stacked patches,
    the same element as the whole-volume path's (see ``jmed.data``)."""

    def __init__(self, source, augmentation, sampler, num_patches: int, seed: int, margin):
        self.source = source
        self.augmentation = augmentation
        self.sampler = sampler
        self.num_patches = num_patches
        self.seed = seed
        self.margin = tuple(margin)
        self.cache_dir = source.cache_dir
        self.kinds = {name: source.kind_of(name) for name in source.image_names}

    def starts(self, epoch: int, index: int, readers, paths) -> np.ndarray:
        sampler, n = self.sampler, self.num_patches
        shape = next(iter(readers.values())).shape[:3]
        valid = np.array([s - p + 1 for s, p in zip(shape, sampler.patch_size)], np.int32)
        width = 3 if isinstance(sampler, UniformSampler) else 5
        u, uniform = _draws(n, width, self.seed, np.uint32(epoch), np.uint32(index), valid)
        u, uniform = np.asarray(u), np.asarray(uniform, np.int64)
        if isinstance(sampler, UniformSampler):
            return uniform
        name = sampler.label_name
        if name is None:
            labels = [k for k, kind in self.kinds.items() if kind == LABEL]
            if len(labels) != 1:
                raise ValueError(f"label_name is None and the subject has {len(labels)} label maps {labels}")
            name = labels[0]
        reader = readers[name]
        index_ = _class_index(reader, paths[name], sampler.patch_size, CLASS_INDEX_BLOCK, self.cache_dir)
        columns, classes, weights = _class_columns(index_, sampler)
        if sampler.foreground_fraction is None:
            drawn, ok = _draw_by_class(u[:, :2], index_, reader, columns, classes, weights)
            return drawn if ok else uniform
        forced_n = math.ceil(sampler.foreground_fraction * n)
        if forced_n == 0:
            return uniform
        fg = (
            np.array([0.0, 1.0])
            if sampler.label_probabilities is None
            else np.where(np.array(list(sampler.label_probabilities)) != 0, weights, 0.0)
        )
        forced, ok = _draw_by_class(u[-forced_n:, :2], index_, reader, columns, classes, fg)
        forced = forced if ok else uniform[-forced_n:]
        return np.concatenate([uniform[: n - forced_n], forced], axis=0)

    def map(self, item):
        if item is None:
            return None
        try:
            return self._patches(*item)
        except Exception as err:
            (_, index), source = item[0], self.source
            message = f"cannot read patches of subject {source.describe(index)}: {type(err).__name__}: {err}"
            error = ValueError(message) if isinstance(err, ValueError) else RuntimeError(message)
            return source._bad_subject(message, error, err)

    def _patches(self, tagged, readers, metadata, paths):
        epoch, index = tagged
        starts = self.starts(epoch, index, readers, paths)
        patch = np.array(self.sampler.patch_size)
        # the margin is room for the augmentation; without one the patch alone is read
        margin = np.array(self.margin if self.augmentation is not None else (0, 0, 0))
        data, affines = {}, {}
        for name, reader in readers.items():
            regions = [_read_padded(reader, s - margin, patch + 2 * margin, self.kinds[name]) for s in starts]
            data[name] = np.stack(regions)
            affines[name] = reader.affine
        if self.augmentation is None:
            affine = {n: np.asarray(_move(a, starts.astype(np.int32))) for n, a in affines.items()}
        else:
            layout = tuple((name, self.kinds[name]) for name in readers)
            region_affines = {
                n: np.asarray(_move(a, (starts - margin).astype(np.int32))) for n, a in affines.items()
            }
            out, affine = _augment_regions(
                self.augmentation,
                layout,
                self.margin,
                self.sampler.patch_size,
                self.seed,
                np.uint32(epoch),
                np.uint32(index),
                data,
                region_affines,
            )
            data = {n: np.asarray(v) for n, v in out.items()}
            affine = {n: np.asarray(v) for n, v in affine.items()}
        location = np.concatenate([starts, starts + patch], axis=1).astype(np.int32)
        return {
            "data": data,
            "affine": affine,
            "kind": {n: self.kinds[n] for n in readers},
            "location": location,
            "metadata": {k: (np.asarray(v) if _numeric(v) else v) for k, v in metadata.items()},
        }


def _numeric(value: Any) -> bool:
    return not isinstance(value, (str, bytes)) and value is not None


def max_memory(queue) -> int:
    """``Queue.get_max_memory`` for the patch-first path: the patch window and a batch in
    the main process and, per worker, ``worker_buffer_size + 1`` subjects' regions (read
    and augmented) and patches plus one class-index block. Headers of the first subject
    only; array data only."""
    source = queue.source
    opener = open_region if queue.patch_reads is True else queue.patch_reads
    record = source.records[int(queue.indices[0])]
    patch = math.prod(queue.sampler.patch_size)
    region = math.prod(p + 2 * m for p, m in zip(queue.sampler.patch_size, queue.patch_margin))
    patch_bytes = region_bytes = block_bytes = 0
    for name in source.image_names:
        reader = opener(record[name], source.kind_of(name))
        voxel = reader.shape[3] * max(
            np.dtype(reader.dtype).itemsize, 4 if queue.augmentation is not None else 1
        )
        patch_bytes += patch * voxel
        region_bytes += region * voxel * (2 if queue.augmentation is not None else 1)
        if source.kind_of(name) == LABEL:
            block_bytes = max(
                block_bytes, CLASS_INDEX_BLOCK**3 * reader.shape[3] * np.dtype(reader.dtype).itemsize
            )
    n = queue.samples_per_volume
    main = patch_bytes * (queue.max_length + queue.batch_size) + n * patch_bytes
    per_subject = n * (region_bytes + patch_bytes) + block_bytes
    return int(main + max(queue.num_workers, 1) * (queue.worker_buffer_size + 1) * per_subject)


def worker_maps(queue) -> tuple[grain.transforms.Map, grain.transforms.Map]:
    """The two worker maps of a patch-first ``Queue``: open the subject's readers, then
    read, augment and cut its patches."""
    opener = open_region if queue.patch_reads is True else queue.patch_reads
    source = queue.source
    return (
        OpenRegions(source, opener, queue.sampler.patch_size, queue.compilation_cache_dir),
        ReadAugmentAndSample(
            source,
            queue.augmentation,
            queue.sampler,
            queue.samples_per_volume,
            queue.seed,
            queue.patch_margin,
        ),
    )
