"""Chunked and remote volumes: NIfTI-Zarr, OME-Zarr and zarr arrays, read by region.

``jmed.load`` hands any path or URL ending in ``.zarr`` (and any fsspec URL) to ``load``
here. The image it returns is lazy: its header (shape, dtype, affine) is read at once, its
voxels on use, and ``Image.read_region`` reads only the chunks a box touches. Paths may be
local folders or fsspec URLs (``https://``, ``http://``, ``s3://``, ``gs://``,
``memory://``, ...). Everything here needs the optional extra ``pip install "jmed[zarr]"``
(zarr, fsspec, aiohttp; ``s3fs``/``gcsfs`` for those schemes); ``import jmed`` imports
none of it.

Formats read:

* **NIfTI-Zarr** (``.nii.zarr``, NIfTI-Zarr specification 1.0 release candidate 1): an
  OME-Zarr multiscale image group whose ``nifti`` array holds the binary NIfTI-1 or
  NIfTI-2 header of the finest level. The header gives the affine (sform, else qform, as
  nibabel chooses) and the intensity scaling (``scl_slope``/``scl_inter``, applied to
  intensity images as ``jmed.load`` applies it to ``.nii`` files). Arrays are stored
  ``[t, c,] z, y, x`` (C order), i.e. NIfTI's ``x, y, z[, t, c]`` in Fortran order; the
  non-spatial axes become channels (``t`` major). The header must agree with the
  full-resolution array's shape (else a ValueError naming the store). The affine of a
  coarser level is the header's affine composed with the levels' OME scales and
  translations, as the specification's reference reader computes it.
* **OME-Zarr** multiscale images without a NIfTI header (OME-NGFF 0.4 with zarr v2 or 0.5
  with zarr v3): the affine is the diagonal of the ``scale`` and the ``translation`` of
  the level (and of the whole pyramid), in millimetres (``micrometer``/``meter`` units are
  converted). OME-Zarr has no orientation: array axes ``x, y, z`` are taken as world axes
  R, A, S.
* **zarr arrays** in jmed's own layout ``(x, y, z)`` or ``(x, y, z, c)`` with a 4x4
  ``affine`` attribute (identity, with a warning, when it is missing).

``save`` (``jmed.save`` of a path ending in ``.nii.zarr`` or ``.zarr``) writes NIfTI-Zarr
with zarr v3 and OME-NGFF 0.5 (or zarr v2 and OME-NGFF 0.4 with ``zarr_format=2``): a
NIfTI-1 header, chunks of 64 voxels per axis by default (all channels in one chunk),
blosc-zstd compression, and a pyramid of 2x coarser levels (intensities averaged over each
2x2x2 block, label maps by the most frequent label of the block, ties to the smaller
label; an axis of one voxel is not halved). A label map also gets a per-chunk class index
(array ``jmed_label_counts``, see ``chunk_class_index``). Writing streams slab by slab
from the source (a lazy image is read by region, never whole) into a temporary store
beside the target that is renamed into place once complete; an existing store is
replaced only with ``overwrite=True``. ``ChunkedWriter`` writes a store region by region
(e.g. an on-disk inference accumulator) and commits it the same way.
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import io as _bytes
import math
import os
import shutil
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import nibabel as nib
import numpy as np

from jmed import _atomic, _checks
from jmed import affine as affine_lib
from jmed import io as _io
from jmed._progress import progress_bar
from jmed.image import INTENSITY, KINDS, LABEL, Image, _host_layout, _LazyData, _read_box

__all__ = [
    "INSTALL_HINT",
    "ChunkClassIndex",
    "ChunkedWriter",
    "chunk_class_index",
    "convert",
    "load",
    "num_levels",
    "pyramid_level",
    "save",
]

INSTALL_HINT = 'pip install "jmed[zarr]"'
NIFTI_KEY = "nifti"
INDEX_KEY = "jmed_label_counts"
DEFAULT_CHUNKS = 64
MAX_LEVELS = 5
_UNITS_MM = {"millimeter": 1.0, "micrometer": 1e-3, "nanometer": 1e-6, "centimeter": 10.0, "meter": 1e3}
_WRITABLE = tuple(
    np.dtype(d) for d in (np.uint8, np.int8, np.int16, np.uint16, np.int32, np.uint32, np.float32, np.float64)
)


# -- opening -----------------------------------------------------------------------------


def _import_zarr() -> Any:
    try:
        import zarr
    except ImportError as err:
        raise ImportError(f"chunked volumes (.zarr stores, URLs) need zarr: {INSTALL_HINT}") from err
    return zarr


def _is_url(text: str) -> bool:
    return "://" in text and not text.startswith("file://")


def _text(path: Any) -> str:
    if isinstance(path, os.PathLike):
        path = os.fspath(path)
    if not isinstance(path, str):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    return path[len("file://") :] if path.startswith("file://") else path


def _store(text: str, *, read_only: bool) -> Any:
    zarr = _import_zarr()
    if _is_url(text):
        try:
            import fsspec  # noqa: F401 - checked here for a clear message

            return zarr.storage.FsspecStore.from_url(text, read_only=read_only)
        except ImportError as err:
            raise ImportError(
                f"reading {text} needs fsspec and its protocol's package ({err}): {INSTALL_HINT}"
            ) from err
    return zarr.storage.LocalStore(text, read_only=read_only)


def _open(text: str) -> Any:
    zarr = _import_zarr()
    if not _is_url(text):
        if not Path(text).exists():
            raise FileNotFoundError(f"no such chunked store: {text}")
        if not Path(text).is_dir():
            raise ValueError(f"{text}: a zarr store is a folder, this is a file")
    try:
        return zarr.open(store=_store(text, read_only=True), mode="r")
    except ImportError:
        raise
    except FileNotFoundError as err:
        raise FileNotFoundError(f"no zarr store at {text} ({err})") from err
    except Exception as err:  # zarr and the file systems raise many types for bad stores
        raise ValueError(f"{text}: cannot open the zarr store ({type(err).__name__}: {err})") from err


def _nifti_header(raw: bytes, text: str) -> Any:
    if len(raw) < 348:
        raise ValueError(f"{text}: the 'nifti' array holds {len(raw)} bytes, a NIfTI header has 348 or 540")
    size_le, size_be = int.from_bytes(raw[:4], "little"), int.from_bytes(raw[:4], "big")
    klass = nib.Nifti2Header if 540 in (size_le, size_be) else nib.Nifti1Header
    try:
        return klass.from_fileobj(_bytes.BytesIO(raw), check=False)
    except Exception as err:
        raise ValueError(f"{text}: cannot read the NIfTI header ({type(err).__name__}: {err})") from err


def _transform_matrix(transforms: Sequence[dict], spatial: list[int], unit_mm: float) -> np.ndarray:
    """The 4x4 (x, y, z) matrix of OME ``scale``/``translation`` transforms (applied in order)."""
    matrix = np.eye(4)
    for t in transforms or ():
        step = np.eye(4)
        if t.get("type") == "scale":
            values = [float(v) for v in t["scale"]]
            for j, a in enumerate(reversed(spatial)):
                step[j, j] = values[a] * unit_mm
        elif t.get("type") == "translation":
            values = [float(v) for v in t["translation"]]
            for j, a in enumerate(reversed(spatial)):
                step[j, 3] = values[a] * unit_mm
        matrix = step @ matrix
    return matrix


@dataclasses.dataclass
class _Level:
    array: Any
    spatial: list[int | None]  # array axis of x, y, z (None: absent, one voxel)
    other: list[int]  # non-spatial array axes, merged into channels
    shape: tuple[int, int, int, int]  # (x, y, z, c)
    affine: np.ndarray


class ChunkedVolume:
    """An opened chunked store: its pyramid levels, their shapes and affines, the header's
    scaling, and a stored chunk class index if any. Made by ``load``; reachable from a lazy
    image as ``image._data.source.volume``."""

    def __init__(self, text: str, node: Any):
        zarr = _import_zarr()
        self.path = text
        self.slope_inter: tuple[float, float] | None = None
        self.header = None
        self.index = None
        self.fallback_affine = False
        if isinstance(node, zarr.Array):
            self.levels = [self._plain_level(node)]
            self.format = "zarr"
            return
        attrs = dict(node.attrs)
        ome = attrs.get("ome") if isinstance(attrs.get("ome"), dict) else attrs
        multiscales = ome.get("multiscales")
        if not multiscales:
            raise ValueError(
                f"{text}: a zarr group without OME-Zarr 'multiscales' metadata; jmed reads NIfTI-Zarr, "
                "OME-Zarr images and zarr arrays with an 'affine' attribute"
            )
        scales = multiscales[0]
        axes = [a if isinstance(a, dict) else {"name": a} for a in scales.get("axes", [])]
        datasets = scales.get("datasets") or []
        if not datasets:
            raise ValueError(f"{text}: OME-Zarr 'multiscales' lists no datasets")
        arrays = []
        for d in datasets:
            try:
                arrays.append(node[d["path"]])
            except Exception as err:
                raise ValueError(
                    f"{text}: pyramid level {d.get('path')!r} is missing or unreadable ({err})"
                ) from err
        ndim = arrays[0].ndim
        if not axes:
            axes = [{"name": n} for n in ("t", "c", "z", "y", "x")[5 - ndim :]]
        if len(axes) != ndim:
            raise ValueError(f"{text}: {len(axes)} axes in the metadata for a {ndim}-dimensional array")
        spatial_axes = [
            i
            for i, a in enumerate(axes)
            if a.get("type") == "space" or (a.get("type") is None and a["name"] in "xyz")
        ]
        if not 2 <= len(spatial_axes) <= 3:
            raise ValueError(f"{text}: {len(spatial_axes)} spatial axes; jmed reads 2D and 3D images")
        other = [i for i in range(ndim) if i not in spatial_axes]
        spatial: list[int | None] = list(reversed(spatial_axes)) + [None] * (3 - len(spatial_axes))
        unit = axes[spatial_axes[-1]].get("unit") or "millimeter"
        unit_mm = _UNITS_MM.get(unit, 1.0)
        whole = scales.get("coordinateTransformations") or []
        physical = [
            _transform_matrix(d.get("coordinateTransformations"), spatial_axes, unit_mm) for d in datasets
        ]
        self.format = "ome-zarr"
        affines = [_transform_matrix(whole, spatial_axes, unit_mm) @ m for m in physical]
        draft = attrs.get(NIFTI_KEY)
        if NIFTI_KEY in node or (isinstance(draft, dict) and "base64" in draft):
            self.format = "nifti-zarr"
            try:
                if NIFTI_KEY in node:
                    raw = np.asarray(node[NIFTI_KEY][...]).tobytes()
                else:  # drafts before 1.0 kept the header base64-encoded in the group's attributes
                    raw = base64.b64decode(draft["base64"])
            except Exception as err:
                raise ValueError(
                    f"{text}: cannot read the NIfTI header ({type(err).__name__}: {err})"
                ) from err
            header = _nifti_header(raw, text)
            self.header = header
            header_affine = np.asarray(header.get_best_affine(), dtype=np.float64)
            if int(header["qform_code"]) == 0 == int(header["sform_code"]):
                self.fallback_affine = True
            base = np.linalg.inv(physical[0])
            affines = [header_affine @ base @ m for m in physical]
            slope, inter = header.get_slope_inter()
            if slope is not None and (slope, inter) != (1.0, 0.0):
                self.slope_inter = (float(slope), 0.0 if inter is None else float(inter))
        self.levels = []
        for k, (array, affine) in enumerate(zip(arrays, affines)):
            if array.ndim != ndim:
                raise ValueError(f"{text}: pyramid level {k} has {array.ndim} dimensions, level 0 has {ndim}")
            shape = tuple(1 if a is None else int(array.shape[a]) for a in spatial)
            channels = math.prod(int(array.shape[a]) for a in other)
            check = affine_lib.check_affine(affine, name=f"affine of level {k} of {text}")
            self.levels.append(_Level(array, spatial, other, (*shape, channels), check))
        if self.header is not None:
            self._check_header(text)
        if INDEX_KEY in node:
            self.index = node[INDEX_KEY]

    def _plain_level(self, array: Any) -> _Level:
        if array.ndim not in (3, 4):
            raise ValueError(
                f"{self.path}: a zarr array of shape {tuple(array.shape)}; jmed reads (x, y, z) or (x, y, z, c) arrays"
            )
        affine = array.attrs.get("affine")
        if affine is None:
            warnings.warn(
                f"{self.path}: the zarr array has no 'affine' attribute; using the identity (1 mm voxels)",
                UserWarning,
                stacklevel=4,
            )
            affine = np.eye(4)
        affine = affine_lib.check_affine(np.asarray(affine, dtype=np.float64), name=f"affine of {self.path}")
        shape = tuple(int(s) for s in array.shape[:3])
        channels = int(array.shape[3]) if array.ndim == 4 else 1
        other = [3] if array.ndim == 4 else []
        return _Level(array, [0, 1, 2], other, (*shape, channels), affine)

    def _check_header(self, text: str) -> None:
        dims = tuple(int(d) for d in self.header.get_data_shape())
        level = self.levels[0]
        spatial = dims[:3] + (1,) * (3 - len(dims[:3]))
        channels = math.prod(dims[3:]) if len(dims) > 3 else 1
        if spatial != level.shape[:3] or channels != level.shape[3]:
            raise ValueError(
                f"{text}: the NIfTI header and the array disagree: header dimensions {dims}, full-resolution "
                f"array {tuple(level.array.shape)} (x, y, z, channels {level.shape}); the store is damaged"
            )

    # -- reading -------------------------------------------------------------------------
    def dtype(self, kind: str) -> np.dtype:
        raw = np.dtype(self.levels[0].array.dtype)
        if kind == INTENSITY:
            return np.dtype(np.float32)
        return _io._label_dtype(raw)

    def read_raw(self, level: int, start: Sequence[int], stop: Sequence[int]) -> np.ndarray:
        """Stored voxels ``[start, stop)`` (x, y, z within the level) as ``(x, y, z, c)``."""
        lv = self.levels[level]
        index: list[Any] = [slice(None)] * lv.array.ndim
        for j, a in enumerate(lv.spatial):
            if a is not None:
                index[a] = slice(int(start[j]), int(stop[j]))
        try:
            block = np.asarray(lv.array[tuple(index)])
        except Exception as err:  # codecs and stores raise many types for damaged chunks
            raise ValueError(
                f"{self.path}: cannot read the chunks of level {level} for voxels {tuple(start)}..{tuple(stop)} "
                f"(missing, truncated or corrupt chunk: {type(err).__name__}: {err})"
            ) from err
        order = [a for a in lv.spatial if a is not None] + lv.other
        block = np.transpose(block, order)
        size = tuple(int(b) - int(a) for a, b in zip(start, stop))
        return block.reshape(*size, lv.shape[3])

    def read(self, level: int, kind: str, start: Sequence[int], stop: Sequence[int]) -> np.ndarray:
        """Voxels ``[start, stop)`` as ``jmed.load`` returns them for ``kind``."""
        raw = self.read_raw(level, start, stop)
        if self.slope_inter is not None:
            raw = _io._scaled(
                SimpleNamespace(slope=np.asarray(self.slope_inter[0]), inter=np.asarray(self.slope_inter[1])),
                raw,
                np.dtype(np.float32) if kind == INTENSITY else None,
            )
        if kind == INTENSITY:
            data = raw.astype(np.float32, copy=False)
        else:
            data = _io._label_voxels(raw, self.path)
        return _host_layout(np.ascontiguousarray(data))

    def image(self, level: int, kind: str) -> Image:
        if not (_checks.is_int(level) and 0 <= level < len(self.levels)):
            raise ValueError(
                f"level must be an int in [0, {len(self.levels) - 1}] for {self.path}, got {level!r}"
            )
        lv = self.levels[level]
        # partials of methods (not closures), so a lazy image pickles (the store reopens)
        load_all = functools.partial(self.read, level, kind, (0, 0, 0), lv.shape[:3])
        region = functools.partial(self.read, level, kind)
        holder = _LazyData(
            lv.shape, self.dtype(kind), load_all, region=region, source=LevelSource(self, level)
        )
        return Image(holder, lv.affine, kind=kind)

    def __reduce__(self) -> tuple:
        return _reopen, (self.path,)


def _reopen(text: str) -> ChunkedVolume:
    return ChunkedVolume(text, _open(text))


@dataclasses.dataclass(frozen=True)
class LevelSource:
    """Where a lazy image's voxels come from: one level of an opened chunked store."""

    volume: ChunkedVolume
    level: int


def load(path: str | os.PathLike, kind: str = INTENSITY, *, level: int = 0) -> Image:
    """A lazy ``Image`` of a chunked store (see the module docstring for formats).

    Args:
        path: store folder or fsspec URL.
        kind: ``"intensity"`` (float32, the NIfTI header's scaling applied) or ``"label"``
            (integers kept).
        level: pyramid level (0: full resolution; see ``num_levels``).

    Raises:
        ImportError: zarr (or fsspec for a URL) is missing; it says ``pip install "jmed[zarr]"``.
        FileNotFoundError: no store at ``path``.
        ValueError: not a store jmed reads, header and array disagree, an unusable
            affine, an unknown ``kind`` or ``level`` (each naming the path).
    """
    _checks.check_choice(kind, "kind", KINDS)
    text = _text(path)
    if _is_url(text) and not text.rstrip("/").lower().endswith(".zarr"):
        if level != 0:
            raise ValueError(f"level must be 0 for a single-resolution file, got {level!r}")
        return _load_remote_file(text, kind)
    volume = ChunkedVolume(text, _open(text))
    if volume.fallback_affine:
        warnings.warn(
            f"{text}: the NIfTI header has neither a qform nor an sform (both codes 0); using nibabel's "
            "fallback affine; the orientation is unknown",
            UserWarning,
            stacklevel=3,
        )
    return volume.image(level, kind)


def _load_remote_file(text: str, kind: str) -> Image:
    """A lazy image of a remote NIfTI file: ``.nii`` read by byte ranges (a region reads
    only its bytes), ``.nii.gz`` streamed and inflated whole on first use."""
    name = text.split("?")[0].lower()
    if not name.endswith((".nii", ".nii.gz")):
        raise ValueError(
            f"{text}: remote files are read as NIfTI (.nii, .nii.gz) or chunked stores (.zarr); "
            "convert other formats first"
        )
    compressed = name.endswith(".gz")
    try:
        import fsspec

        opened = fsspec.open(text, "rb", compression="gzip" if compressed else None).open()
    except ImportError as err:
        raise ImportError(
            f"reading {text} needs fsspec and its protocol's package ({err}): {INSTALL_HINT}"
        ) from err
    except FileNotFoundError as err:
        raise FileNotFoundError(f"no such image file: {text}") from err
    except Exception as err:  # file systems raise many types
        raise ValueError(f"{text}: cannot open the file ({type(err).__name__}: {err})") from err
    try:
        head = opened.read(4)
        opened.seek(0)
        sizes = (int.from_bytes(head, "little"), int.from_bytes(head, "big"))
        klass = nib.Nifti2Image if 540 in sizes else nib.Nifti1Image
        img = klass.from_file_map(klass.make_file_map({"image": opened, "header": opened}))
    except Exception as err:  # nibabel raises many types for bad headers
        raise ValueError(f"{text}: cannot read image header ({type(err).__name__}: {err})") from err
    return _io._from_nibabel(img, text, kind, lazy=True, file_order=False, compressed=compressed)


def _volume_of(image: Image, what: str) -> LevelSource:
    if not isinstance(image, Image):
        raise TypeError(f"{what}() takes a jmed.Image, got {type(image).__name__}")
    source = getattr(image._data, "source", None)
    if not isinstance(source, LevelSource):
        raise ValueError(f"{what}() needs an image loaded from a chunked store (.zarr); this one is not")
    return source


def num_levels(image: Image) -> int:
    """Number of pyramid levels of an image loaded from a chunked store.

    Raises:
        ValueError: the image does not come from a chunked store.
    """
    return len(_volume_of(image, "num_levels").volume.levels)


def pyramid_level(image: Image, level: int) -> Image:
    """Pyramid level ``level`` (0: full resolution) of an image loaded from a chunked store,
    as a lazy image with its own affine (the same world space, coarser voxels).

    Raises:
        ValueError: the image does not come from a chunked store, or no such level.
    """
    source = _volume_of(image, "pyramid_level")
    return source.volume.image(level, image.kind)


# -- per-chunk class index ---------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ChunkClassIndex:
    """Which labels occur in which chunk of a label map, and how often.

    Attributes:
        shape: spatial shape of the full-resolution label map.
        chunk_shape: voxels per chunk and axis (full resolution); chunk ``(i, j, k)``
            covers voxels ``[i, j, k] * chunk_shape`` up to the next chunk (clipped to
            ``shape``).
        labels: ``(K,)`` label values present, sorted.
        counts: ``(gx, gy, gz, K)`` int64 voxels of each label in each chunk (estimates
            when ``exact`` is False).
        exact: counted on the full-resolution voxels; False when estimated from a pyramid
            level (each coarse voxel counts for the full-resolution voxels it covers; a
            structure smaller than a coarse voxel may be missed).
    """

    shape: tuple[int, int, int]
    chunk_shape: tuple[int, int, int]
    labels: np.ndarray
    counts: np.ndarray
    exact: bool

    @property
    def grid(self) -> tuple[int, int, int]:
        """Chunks per axis."""
        return tuple(int(g) for g in self.counts.shape[:3])

    def chunks_with(self, label: int) -> np.ndarray:
        """``(n, 3)`` indices of the chunks holding ``label`` (empty when it is absent)."""
        where = np.flatnonzero(self.labels == label)
        if where.size == 0:
            return np.zeros((0, 3), np.int64)
        return np.argwhere(self.counts[..., where[0]] > 0)

    def box(self, chunk: Sequence[int]) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
        """``(start, size)`` in full-resolution voxels of chunk ``chunk``."""
        start = tuple(int(c) * s for c, s in zip(chunk, self.chunk_shape))
        size = tuple(min(s, n - a) for s, n, a in zip(self.chunk_shape, self.shape, start))
        return start, size  # type: ignore[return-value]


def _chunk_boxes(
    shape: Sequence[int], chunks: Sequence[int]
) -> Iterator[tuple[tuple[int, ...], tuple[int, ...]]]:
    grid = [math.ceil(n / c) for n, c in zip(shape, chunks)]
    for i in range(grid[0]):
        for j in range(grid[1]):
            for k in range(grid[2]):
                start = (i * chunks[0], j * chunks[1], k * chunks[2])
                stop = tuple(min(a + c, n) for a, c, n in zip(start, chunks, shape))
                yield start, stop


def _scan_counts(read: Any, shape: Sequence[int], chunks: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Exact per-chunk label counts, reading one chunk at a time through ``read(start, stop)``."""
    grid = tuple(math.ceil(n / c) for n, c in zip(shape, chunks))
    found: dict[tuple[int, ...], tuple[np.ndarray, np.ndarray]] = {}
    for start, stop in _chunk_boxes(shape, chunks):
        values, counts = np.unique(np.asarray(read(start, stop)), return_counts=True)
        found[tuple(a // c for a, c in zip(start, chunks))] = (values, counts)
    labels = np.unique(np.concatenate([v for v, _ in found.values()]))
    table = np.zeros((*grid, labels.size), np.int64)
    for chunk, (values, counts) in found.items():
        table[chunk][np.searchsorted(labels, values)] = counts
    return labels, table


def _counts_from_level(
    volume: ChunkedVolume, level: int, chunks: Sequence[int]
) -> tuple[np.ndarray, np.ndarray]:
    """Per-chunk label counts estimated from a whole (small) pyramid level."""
    lv, full = volume.levels[level], volume.levels[0]
    coarse = volume.read(level, LABEL, (0, 0, 0), lv.shape[:3])
    factors = [max(1, round(a / b)) for a, b in zip(full.shape[:3], lv.shape[:3])]
    grid = tuple(math.ceil(n / c) for n, c in zip(full.shape[:3], chunks))
    labels, inverse = np.unique(coarse, return_inverse=True)
    inverse = inverse.reshape(coarse.shape)
    flat = np.zeros(coarse.shape[:3], np.int64)
    weight = np.ones(coarse.shape[:3], np.int64)
    for axis in range(3):
        first = np.arange(lv.shape[axis]) * factors[axis]
        index = np.minimum(first // chunks[axis], grid[axis] - 1)
        # full-resolution voxels each coarse voxel covers (fewer at the volume's far edge)
        covered = np.clip(full.shape[axis] - first, 1, factors[axis])
        shape = [1, 1, 1]
        shape[axis] = -1
        flat = flat * grid[axis] + index.reshape(shape)
        weight = weight * covered.reshape(shape)
    keys = (flat[..., None] * labels.size + inverse).ravel()
    weights = np.broadcast_to(weight[..., None], inverse.shape).ravel()
    table = np.bincount(keys, weights=weights, minlength=math.prod(grid) * labels.size)
    return labels, np.rint(table).astype(np.int64).reshape(*grid, labels.size)


def chunk_class_index(
    image: Image, *, chunks: int | Sequence[int] | None = None, level: int | None = None
) -> ChunkClassIndex:
    """The per-chunk class index of a label map, without reading the map whole at once.

    A label map written by jmed as NIfTI-Zarr stores its exact index; it is returned as is
    when ``chunks`` and ``level`` are left out. Otherwise, with ``level``, the index is
    estimated from that (small) pyramid level of a chunked store; without it, the label
    map is read one chunk at a time (by region when the image is lazy) and counted exactly.

    Args:
        image: a label map (lazy or loaded).
        chunks: chunk shape of the index (int or 3 ints); defaults to the store's chunks
            (chunked stores) or 64.
        level: estimate from this pyramid level of a chunked store.

    Raises:
        ValueError: not a label map, ``level`` given for an image that is not from a
            chunked store, or bad ``chunks``/``level``.
    """
    if not isinstance(image, Image):
        raise TypeError(f"chunk_class_index() takes a jmed.Image, got {type(image).__name__}")
    if image.kind != LABEL:
        raise ValueError(f"chunk_class_index() needs a label map, got an image of kind {image.kind!r}")
    source = getattr(image._data, "source", None)
    volume = source.volume if isinstance(source, LevelSource) and source.level == 0 else None
    if chunks is None:
        if volume is not None:
            array = volume.levels[0].array
            chunks = tuple(int(array.chunks[a]) if a is not None else 1 for a in volume.levels[0].spatial)
        else:
            chunks = DEFAULT_CHUNKS
        if volume is not None and volume.index is not None and level is None:
            stored = volume.index
            return ChunkClassIndex(
                tuple(volume.levels[0].shape[:3]),
                tuple(int(c) for c in stored.attrs["chunk_shape"]),
                np.asarray(stored.attrs["labels"]),
                np.asarray(stored[...], dtype=np.int64),
                True,
            )
    chunks = tuple(min(c, n) for c, n in zip(_checks.int_triple(chunks, "chunks"), image.spatial_shape))
    if level is not None:
        if volume is None:
            raise ValueError("level= needs a label map loaded (at level 0) from a chunked store")
        if not (_checks.is_int(level) and 0 <= level < len(volume.levels)):
            raise ValueError(f"level must be an int in [0, {len(volume.levels) - 1}], got {level!r}")
        labels, counts = _counts_from_level(volume, level, chunks)
        return ChunkClassIndex(tuple(image.spatial_shape), chunks, labels, counts, level == 0)
    labels, counts = _scan_counts(
        lambda start, stop: image.read_region(start, tuple(b - a for a, b in zip(start, stop))),
        image.spatial_shape,
        chunks,
    )
    return ChunkClassIndex(tuple(image.spatial_shape), chunks, labels, counts, True)


# -- writing -----------------------------------------------------------------------------


def _downsample(block: np.ndarray, steps: Sequence[int], kind: str) -> np.ndarray:
    """Halve ``block`` ``(x, y, z, c)`` along the axes whose step is 2: the mean of each
    block of voxels (intensities) or its most frequent value, ties to the smaller (labels).
    Blocks cut by the volume's edge use the voxels they have."""
    pads = [(0, (-n) % s) for n, s in zip(block.shape[:3], steps)] + [(0, 0)]
    values = np.pad(block, pads)
    valid = np.pad(np.ones(block.shape[:3], bool), pads[:3])
    out_shape = tuple(n // s for n, s in zip(values.shape[:3], steps))
    split = (out_shape[0], steps[0], out_shape[1], steps[1], out_shape[2], steps[2])
    values = values.reshape(*split, block.shape[3]).transpose(0, 2, 4, 6, 1, 3, 5)
    values = values.reshape(*out_shape, block.shape[3], -1)
    valid = valid.reshape(split).transpose(0, 2, 4, 1, 3, 5).reshape(*out_shape, 1, -1)
    if kind == INTENSITY:
        total = np.where(valid, values, 0).sum(axis=-1, dtype=np.float64)
        mean = total / valid.sum(axis=-1)
        if np.issubdtype(block.dtype, np.integer):
            mean = np.rint(mean)
        return mean.astype(block.dtype)
    same = (values[..., :, None] == values[..., None, :]) & valid[..., None, :]
    counts = np.where(valid, same.sum(axis=-1), -1)
    best = counts == counts.max(axis=-1, keepdims=True)
    wide = values.astype(np.float64) if block.dtype.kind == "f" else values.astype(np.int64)
    highest = np.inf if block.dtype.kind == "f" else np.iinfo(np.int64).max
    return np.where(best, wide, highest).min(axis=-1).astype(block.dtype)


def _level_plan(shape: Sequence[int], chunks: Sequence[int], levels: int | None) -> list[tuple[int, ...]]:
    """Per-level halving steps (1 or 2 per axis): levels until the largest axis fits a chunk
    (at most ``MAX_LEVELS``), or ``levels`` levels in all."""
    steps, current = [], list(shape)
    while True:
        if levels is not None and len(steps) + 1 >= levels:
            break
        if levels is None and (len(steps) + 1 >= MAX_LEVELS or all(n <= c for n, c in zip(current, chunks))):
            break
        step = tuple(2 if n > 1 else 1 for n in current)
        if step == (1, 1, 1):
            break
        steps.append(step)
        current = [math.ceil(n / s) for n, s in zip(current, step)]
    return steps


def _storable_dtype(dtype: Any, path: str) -> np.dtype:
    dtype = np.dtype(dtype)
    if dtype == np.bool_:
        return np.dtype(np.uint8)
    if dtype == np.float16:
        return np.dtype(np.float32)
    if dtype in (np.int64, np.uint64):
        return np.dtype(np.int32)
    if dtype not in _WRITABLE:
        raise ValueError(
            f"{path}: cannot write voxels of dtype {dtype.name}; NIfTI-Zarr holds "
            f"{', '.join(d.name for d in _WRITABLE)}"
        )
    return dtype


def _target(path: Any, overwrite: bool) -> Path:
    text = _text(path)
    if _is_url(text):
        raise ValueError(
            f"{text}: jmed writes chunked stores to local folders only (a remote store cannot be "
            "replaced atomically); write locally, then copy it (e.g. with fsspec's put)"
        )
    target = Path(text)
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} exists; pass overwrite=True to replace it")
    if not target.parent.exists():
        raise FileNotFoundError(f"folder {target.parent} does not exist")
    if not target.parent.is_dir():
        raise NotADirectoryError(f"{target.parent} is not a folder; cannot write {target}")
    return target


class ChunkedWriter:
    """Writes a NIfTI-Zarr store region by region, then commits it atomically.

    The store is built in a temporary folder beside ``path``; ``commit`` adds the coarser
    pyramid levels (and, for a label map, the chunk class index), then renames it into
    place. Until then nothing exists at ``path``; ``abort`` (or an error inside a ``with``
    block) removes the temporary store. Regions never written read as 0.

    Args:
        path: the ``.nii.zarr`` (or ``.zarr``) folder to create (local).
        shape: ``(x, y, z)`` or ``(x, y, z, c)``.
        dtype: stored dtype (uint8, int8, int16, uint16, int32, uint32, float32, float64).
        affine: 4x4 voxel-to-world matrix.
        kind: ``"intensity"`` or ``"label"`` (decides how the pyramid is downsampled and
            whether a chunk class index is written).
        chunks: voxels per chunk, an int or 3 ints (clipped to the shape).
        levels: number of pyramid levels, including full resolution (default: halve
            until the largest axis fits one chunk, at most 5 levels).
        overwrite: replace an existing store at ``path`` on commit.
        zarr_format: 3 (OME-NGFF 0.5, the default) or 2 (OME-NGFF 0.4).
        scaling: ``(slope, intercept)`` written to the header (``scl_slope``,
            ``scl_inter``), applied by readers to intensity images.

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is False.
        ValueError: bad shape, dtype, chunks, levels, a URL ``path``.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        shape: Sequence[int],
        dtype: Any,
        affine: Any,
        *,
        kind: str = INTENSITY,
        chunks: int | Sequence[int] = DEFAULT_CHUNKS,
        levels: int | None = None,
        overwrite: bool = False,
        zarr_format: int = 3,
        scaling: tuple[float, float] | None = None,
    ):
        zarr = _import_zarr()
        _checks.check_choice(kind, "kind", KINDS)
        _checks.check_choice(zarr_format, "zarr_format", (2, 3))
        self.path = _target(path, overwrite)
        if not (
            isinstance(shape, Sequence)
            and len(shape) in (3, 4)
            and all(_checks.is_int(s) and s >= 1 for s in shape)
        ):
            raise ValueError(f"shape must be 3 or 4 positive ints (x, y, z[, c]), got {shape!r}")
        self.shape = (*(int(s) for s in shape[:3]), int(shape[3]) if len(shape) == 4 else 1)
        self.dtype = _storable_dtype(dtype, str(self.path))
        if self.dtype != np.dtype(dtype):
            raise ValueError(
                f"{self.path}: dtype {np.dtype(dtype).name} is not stored as is; use {self.dtype.name}"
            )
        self.affine = affine_lib.check_affine(np.asarray(affine, dtype=np.float64), name="affine")
        self.kind = kind
        self.chunks = tuple(min(c, n) for c, n in zip(_checks.int_triple(chunks, "chunks"), self.shape[:3]))
        if levels is not None and not (_checks.is_int(levels) and levels >= 1):
            raise ValueError(f"levels must be None or an int >= 1, got {levels!r}")
        self.steps = _level_plan(self.shape[:3], self.chunks, levels)
        self.overwrite = overwrite
        self.zarr_format = zarr_format
        self._work = _atomic.temporary_folder(self.path.parent)
        self._tmp = self._work / self.path.name
        self._done = False
        try:
            self._group = zarr.create_group(
                store=zarr.storage.LocalStore(str(self._tmp)), zarr_format=zarr_format
            )
            header = _header_bytes(self.shape, self.dtype, self.affine, scaling)
            nifti = self._group.create_array(
                NIFTI_KEY,
                shape=(len(header),),
                chunks=(len(header),),
                dtype="uint8",
                compressors=None,
                **self._keys(),
            )
            nifti[...] = np.frombuffer(header, np.uint8)
            self._arrays = [self._create_level("0", self.shape)]
        except BaseException:
            shutil.rmtree(self._work, ignore_errors=True)
            raise

    # -- layout --------------------------------------------------------------------------
    @property
    def _axes(self) -> list[str]:
        return ["z", "y", "x"] if self.shape[3] == 1 else ["t", "c", "z", "y", "x"]

    def _keys(self) -> dict:
        if self.zarr_format == 2:
            return {"chunk_key_encoding": {"name": "v2", "separator": "/"}}
        return {}

    def _create_level(self, name: str, shape: Sequence[int]) -> Any:
        zarr = _import_zarr()
        spatial = tuple(int(n) for n in reversed(shape[:3]))
        chunks = tuple(min(c, n) for c, n in zip(reversed(self.chunks), spatial))
        if self.shape[3] > 1:
            spatial, chunks = (1, self.shape[3], *spatial), (1, self.shape[3], *chunks)
        if self.zarr_format == 3:
            codec = zarr.codecs.BloscCodec(cname="zstd", clevel=5, shuffle="shuffle")
            extra = {"dimension_names": self._axes}
        else:
            import numcodecs

            codec = numcodecs.Blosc(cname="zstd", clevel=5, shuffle=numcodecs.Blosc.SHUFFLE)
            extra = self._keys()
        return self._group.create_array(
            name, shape=spatial, chunks=chunks, dtype=self.dtype, compressors=codec, fill_value=0, **extra
        )

    def _index(self, start: Sequence[int], stop: Sequence[int]) -> tuple:
        spatial = tuple(slice(int(a), int(b)) for a, b in zip(reversed(start), reversed(stop)))
        return (slice(None), slice(None), *spatial) if self.shape[3] > 1 else spatial

    def _level_shape(self, level: int) -> tuple[int, ...]:
        shape = list(self.shape[:3])
        for step in self.steps[:level]:
            shape = [math.ceil(n / s) for n, s in zip(shape, step)]
        return (*shape, self.shape[3])

    def _write(self, array: Any, start: Sequence[int], values: np.ndarray) -> None:
        stop = tuple(a + n for a, n in zip(start, values.shape[:3]))
        block = np.transpose(values, (2, 1, 0, 3))
        if self.shape[3] > 1:
            block = np.moveaxis(block, 3, 0)[None]
        else:
            block = block[..., 0]
        array[self._index(start, stop)] = block

    def _read(self, array: Any, start: Sequence[int], stop: Sequence[int]) -> np.ndarray:
        block = np.asarray(array[self._index(start, stop)])
        if self.shape[3] > 1:
            return np.moveaxis(block[0], 0, 3).transpose(2, 1, 0, 3)
        return block.transpose(2, 1, 0)[..., None]

    # -- public --------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._done:
            raise ValueError(f"the writer of {self.path} is closed (committed or aborted)")

    def write_region(self, start: Sequence[int], values: Any) -> None:
        """Write ``values`` ``(sx, sy, sz[, c])`` at voxel ``start`` (3 ints, inside the volume).

        Raises:
            ValueError: a box outside the volume, wrong channels, values that change when
                cast to the stored dtype's range (integers out of range).
        """
        self._check_open()
        values = np.asarray(values)
        if values.ndim == 3:
            values = values[..., None]
        start = _checks.int_triple(start, "start", minimum=0)
        if values.ndim != 4 or values.shape[3] != self.shape[3]:
            raise ValueError(
                f"values must be (sx, sy, sz[, c]) with c = {self.shape[3]}, got shape {tuple(values.shape)}"
            )
        if any(a + n > s for a, n, s in zip(start, values.shape[:3], self.shape[:3])):
            raise ValueError(
                f"region at {start} of size {tuple(values.shape[:3])} leaves the volume {self.shape[:3]}"
            )
        if np.issubdtype(self.dtype, np.integer) and values.dtype != self.dtype and values.size:
            info = np.iinfo(self.dtype)
            low, high = values.min(), values.max()
            if low < info.min or high > info.max:
                raise ValueError(
                    f"{self.path}: value {low if low < info.min else high} does not fit in "
                    f"{self.dtype.name} (allowed {info.min}..{info.max})"
                )
        self._write(self._arrays[0], start, values.astype(self.dtype, copy=False))

    def read_region(self, start: Sequence[int], size: Sequence[int]) -> np.ndarray:
        """What was written in the box (unwritten voxels and those outside the volume: 0),
        as stored ``(sx, sy, sz, c)``."""
        self._check_open()
        start = _checks.int_triple(start, "start", minimum=-(2**62))
        size = _checks.int_triple(size, "size", minimum=1)
        return _read_box(
            lambda lo, hi: self._read(self._arrays[0], lo, hi), self.shape, self.dtype, start, size, 0
        )

    def commit(self, *, progress: bool = False) -> Path:
        """Add the pyramid (and chunk class index), then move the store to ``path``.

        Raises:
            FileExistsError: something appeared at ``path`` meanwhile and ``overwrite`` is False.
            OSError: the move failed, naming ``path`` (an existing store is left intact).
        """
        self._check_open()
        try:
            total = sum(
                math.prod(math.ceil(n / c) for n, c in zip(self._level_shape(k + 1)[:3], self.chunks))
                for k in range(len(self.steps))
            )
            with progress_bar(
                progress, total=total or None, desc=f"pyramid {self.path.name}", unit="chunk"
            ) as bar:
                for k, step in enumerate(self.steps):
                    shape = self._level_shape(k + 1)
                    array = self._create_level(str(k + 1), shape)
                    below = self._arrays[k]
                    below_shape = self._level_shape(k)
                    for start, stop in _chunk_boxes(shape[:3], self.chunks):
                        lo = tuple(a * s for a, s in zip(start, step))
                        hi = tuple(min(b * s, n) for b, s, n in zip(stop, step, below_shape[:3]))
                        self._write(array, start, _downsample(self._read(below, lo, hi), step, self.kind))
                        bar.update(1)
                    self._arrays.append(array)
            if self.kind == LABEL:
                labels, counts = _scan_counts(
                    lambda lo, hi: self._read(self._arrays[0], lo, hi), self.shape[:3], self.chunks
                )
                index = self._group.create_array(
                    INDEX_KEY, shape=counts.shape, chunks=counts.shape, dtype="int64", **self._keys()
                )
                index[...] = counts
                index.attrs.update(
                    {
                        "labels": labels.tolist(),
                        "chunk_shape": list(self.chunks),
                        "description": "voxels of each label (last axis) in each chunk (x, y, z) of level 0",
                    }
                )
            self._group.attrs.update(self._ome_attributes())
            self._move_into_place()
        finally:
            self._done = True
            shutil.rmtree(self._work, ignore_errors=True)
        return self.path

    def abort(self) -> None:
        """Discard the store being written (nothing changes at ``path``)."""
        self._done = True
        shutil.rmtree(self._work, ignore_errors=True)

    def __enter__(self) -> ChunkedWriter:
        return self

    def __exit__(self, kind: Any, error: Any, trace: Any) -> None:
        if self._done:
            return
        if error is None:
            self.commit()
        else:
            self.abort()

    def _ome_attributes(self) -> dict:
        spacing = np.asarray(affine_lib.spacing(self.affine), dtype=np.float64)
        datasets = []
        factors = np.ones(3)
        for k in range(len(self.steps) + 1):
            if k:
                factors = factors * np.asarray(self.steps[k - 1])
            scale = list(reversed((spacing * factors).tolist()))
            shift = list(reversed((spacing * (factors - 1) / 2).tolist()))
            if self.shape[3] > 1:
                scale, shift = [1.0, 1.0, *scale], [0.0, 0.0, *shift]
            datasets.append(
                {
                    "path": str(k),
                    "coordinateTransformations": [
                        {"type": "scale", "scale": scale},
                        {"type": "translation", "translation": shift},
                    ],
                }
            )
        units = {"t": {"type": "time", "unit": "second"}, "c": {"type": "channel"}}
        axes = [{"name": a, **units.get(a, {"type": "space", "unit": "millimeter"})} for a in self._axes]
        method = "mean of 2x2x2 blocks" if self.kind == INTENSITY else "most frequent label of 2x2x2 blocks"
        multiscale = {
            "name": self.path.name,
            "axes": axes,
            "datasets": datasets,
            "type": "mean" if self.kind == INTENSITY else "mode",
            "metadata": {"method": method, "kind": self.kind, "writer": "jmed"},
        }
        if self.zarr_format == 2:
            return {"multiscales": [{"version": "0.4", **multiscale}]}
        return {"ome": {"version": "0.5", "multiscales": [multiscale]}}

    def _move_into_place(self) -> None:
        target = self.path
        old = None
        if target.exists() or target.is_symlink():
            if not self.overwrite:
                raise FileExistsError(f"{target} exists; pass overwrite=True to replace it")
            # the old store moves aside first (a folder cannot be replaced in one rename)
            old = self._work / (target.name + ".old")
            os.replace(target, old)
        try:
            os.replace(self._tmp, target)
        except OSError as err:
            if old is not None:
                os.replace(old, target)
            raise OSError(err.errno, f"cannot write {target}: {err.strerror or err}") from err
        _atomic._fsync_dir(target.parent)


def _header_bytes(
    shape: Sequence[int], dtype: np.dtype, affine: np.ndarray, scaling: tuple[float, float] | None
) -> bytes:
    header = nib.Nifti1Header()
    dims = tuple(shape[:3]) if shape[3] == 1 else (*shape[:3], 1, shape[3])
    header.set_data_shape(dims)
    header.set_data_dtype(dtype)
    header.set_qform(affine, code=1)
    header.set_sform(affine, code=1)
    header.set_xyzt_units("mm", "sec")
    if shape[3] > 1:
        header.set_intent("vector")
    if scaling is not None:
        header.set_slope_inter(*scaling)
    return header.binaryblock


def _slabs(shape: Sequence[int], depth: int) -> Iterator[tuple[int, int]]:
    for z in range(0, shape[2], depth):
        yield z, min(z + depth, shape[2])


def save(
    image: Image,
    path: str | os.PathLike,
    *,
    chunks: int | Sequence[int] = DEFAULT_CHUNKS,
    levels: int | None = None,
    overwrite: bool = False,
    zarr_format: int = 3,
    progress: bool = False,
) -> Path:
    """Write ``image`` as a NIfTI-Zarr store (see the module docstring); returns the path.

    The voxels are streamed one slab of chunks at a time (a lazy image is read by region,
    so a memory-mapped or chunked source is never read whole). Voxels are stored as they
    are, except: 64-bit integers as int32 (a ValueError when a value does not fit),
    float16 as float32, booleans as uint8.

    Args:
        image: the image to write.
        path: the store folder to create (local).
        chunks: voxels per chunk, an int or 3 ints.
        levels: pyramid levels including full resolution (see ``ChunkedWriter``).
        overwrite: replace an existing store.
        zarr_format: 3 (default) or 2.
        progress: show a progress bar.

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is False.
        ValueError: see ``ChunkedWriter``.
    """
    if not isinstance(image, Image):
        raise TypeError(f"save() takes a jmed.Image, got {type(image).__name__}")
    shape = tuple(int(s) for s in image.shape)
    if len(shape) != 4:
        raise ValueError(f"{path}: save() writes one image (x, y, z, c), got shape {shape}")
    if 0 in shape:
        raise ValueError(f"{path}: cannot write an image with a zero-length axis, shape {shape}")
    dtype = _storable_dtype(image.dtype, _text(path))
    writer = ChunkedWriter(
        path,
        shape,
        dtype,
        np.asarray(image.affine),
        kind=image.kind,
        chunks=chunks,
        levels=levels,
        overwrite=overwrite,
        zarr_format=zarr_format,
    )
    return _write_slabs(
        writer,
        lambda z0, z1: image.read_region((0, 0, z0), (shape[0], shape[1], z1 - z0)),
        progress,
        f"write {writer.path.name}",
    )


def _write_slabs(writer: ChunkedWriter, read_slab: Any, progress: bool, desc: str) -> Path:
    """Fill ``writer`` one slab of chunks along z at a time from ``read_slab(z0, z1)``, then
    commit it; returns the path written."""
    with writer:
        slabs = list(_slabs(writer.shape, writer.chunks[2]))
        with progress_bar(progress, total=len(slabs), desc=desc, unit="slab") as bar:
            for z0, z1 in slabs:
                writer.write_region((0, 0, z0), read_slab(z0, z1))
                bar.update(1)
        writer.commit(progress=progress)
    return writer.path


def _raw_nifti_source(src: Path, kind: str) -> Any:
    """The unscaled voxels of a NIfTI file (memory-mapped or inflated as read) with its
    scaling, when they can be stored as they are; else None."""
    if not str(src).lower().endswith((".nii", ".nii.gz")):
        return None
    img = nib.load(str(src))
    proxy = img.dataobj
    if not isinstance(proxy, nib.arrayproxy.ArrayProxy) or not 3 <= len(proxy.shape) <= 4:
        return None
    dtype = np.dtype(proxy.dtype).newbyteorder("=")
    if dtype.names or dtype not in _WRITABLE or (kind == LABEL and dtype.kind == "f"):
        return None
    slope, inter = float(np.asarray(proxy.slope)), float(np.asarray(proxy.inter))
    if kind == LABEL and (slope, inter) != (1.0, 0.0):
        return None
    filename = img.file_map["image"].filename
    # one file kept open: slabs are read in file order, so a .nii.gz is inflated in one
    # forward pass instead of from its start again for every slab
    raw = nib.arrayproxy.ArrayProxy(
        filename,
        (tuple(proxy.shape), np.dtype(proxy.dtype), int(proxy.offset), 1.0, 0.0),
        order=proxy.order,
        keep_file_open=True,
    )
    scaling = None if (slope, inter) == (1.0, 0.0) else (slope, inter)
    return raw, dtype, scaling


def convert(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    kind: str = INTENSITY,
    chunks: int | Sequence[int] = DEFAULT_CHUNKS,
    levels: int | None = None,
    overwrite: bool = False,
    zarr_format: int = 3,
    progress: bool = False,
) -> Path:
    """Convert an image file to another format, e.g. ``.nii.gz`` to ``.nii.zarr``.

    To a chunked store (``dst`` ending in ``.zarr``): a NIfTI source keeps its stored
    dtype and its scaling (``scl_slope``/``scl_inter`` go to the new header), so reading
    the store gives exactly what ``jmed.load`` gives for the source; its voxels are read
    one slab of chunks at a time (memory-mapped ``.nii``, or inflated in one pass for
    ``.nii.gz``), never whole. Other sources are read as ``jmed.load(src, kind)`` would
    read them (by region when they can be). To any other format: the source is read
    whole and written with ``jmed.save``.

    Args:
        src: file, store or URL to read.
        dst: file or store to write.
        kind: ``"intensity"`` or ``"label"`` (label maps get a mode pyramid and a chunk
            class index).
        chunks, levels, zarr_format: the store's layout (see ``ChunkedWriter``).
        overwrite: replace an existing ``dst``.
        progress: show a progress bar.

    Returns:
        The path written.
    """
    _checks.check_choice(kind, "kind", KINDS)
    src_text, dst_text = _text(src), _text(dst)
    if not _io._is_chunked(dst_text):
        return _io.save(_io.load(src_text, kind), dst_text, overwrite=overwrite)
    image = _io.load(src_text, kind, lazy=True)  # its errors name the file
    raw = None if _io._is_chunked(src_text) else _raw_nifti_source(Path(src_text), kind)
    if raw is None:
        return save(
            image,
            dst_text,
            chunks=chunks,
            levels=levels,
            overwrite=overwrite,
            zarr_format=zarr_format,
            progress=progress,
        )
    proxy, dtype, scaling = raw
    shape = tuple(int(s) for s in image.shape)
    writer = ChunkedWriter(
        dst_text,
        shape,
        dtype,
        np.asarray(image.affine),
        kind=kind,
        chunks=chunks,
        levels=levels,
        overwrite=overwrite,
        zarr_format=zarr_format,
        scaling=scaling,
    )

    def read_slab(z0: int, z1: int) -> np.ndarray:
        index = (slice(None), slice(None), slice(z0, z1))
        block = np.asarray(proxy[index if len(proxy.shape) == 3 else (*index, slice(None))])
        return block.astype(dtype, copy=False)

    return _write_slabs(writer, read_slab, progress, f"convert {Path(src_text).name}")
