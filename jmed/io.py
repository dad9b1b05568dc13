"""Reading and writing images through nibabel.

Formats: NIfTI-1/2 (``.nii``, ``.nii.gz``), MGH (``.mgh``, ``.mgz``), Analyze
(``.hdr``/``.img``) read and write; MINC-1/2 (``.mnc``) read only. 4D files become
channels; 2D files become ``(x, y, 1, c)``. Intensity images are read as float32 with the
header's ``scl_slope``/``scl_inter`` applied; label maps keep their integer values (and
their integer dtype; 64-bit and uint32 labels become int32, with a ValueError when a value
does not fit). Voxels are returned in C order and 64-byte aligned (the files' Fortran
order is converted once, while reading), so jitted transforms use them without a copy.

``save`` writes a temporary file beside the target, flushes it and renames it into place
(see ``jmed._atomic``), so a crash never leaves a half-written file and never destroys an
existing one; it refuses to overwrite an existing file unless ``overwrite=True``.

Checked at load, before any voxel is read or memory allocated: the extension, the header
(nibabel), the dimensions (no zero-length or negative axis, at most 4), the affine, and
that the file can hold the voxels the header announces (an uncompressed file must be
long enough; a gzipped one cannot inflate beyond DEFLATE's maximum ratio of 1032:1).
A NIfTI file with neither a qform nor an sform (both codes 0) gets nibabel's fallback
affine (voxel sizes from ``pixdim``, a zero size taken as 1 mm, x flipped, centred on the
volume) with a warning naming the file. RGB files (``RGB24``/``RGBA32``) are read as 3 or
4 intensity channels; as label maps they are refused.
"""

from __future__ import annotations

import gzip
import math
import os
import warnings
import zlib
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from nibabel.volumeutils import apply_read_scaling

from jmed import _atomic, _header
from jmed import affine as affine_lib
from jmed._header import READ_EXTENSIONS, WRITE_EXTENSIONS
from jmed.image import INTENSITY, KINDS, Image, _aligned_empty, _host_layout, _LazyData, check_label_range

try:  # ISA-L inflates gzip about twice as fast as zlib; same format and checks
    from isal import isal_zlib as _inflate

    _INFLATE_ERRORS: tuple[type[Exception], ...] = (zlib.error, _inflate.error)
except ImportError:  # pragma: no cover - isal is a dependency, but optional at run time
    _inflate = zlib
    _INFLATE_ERRORS = (zlib.error,)

__all__ = ["READ_EXTENSIONS", "WRITE_EXTENSIONS", "convert", "is_image_path", "load", "save"]


def is_image_path(value: Any) -> bool:
    """True for a path or URL that ``load`` reads: a name ending in one of
    ``READ_EXTENSIONS`` or in ``.zarr`` (a chunked store). Records of subjects use it to
    tell image paths from other values."""
    if not isinstance(value, (str, os.PathLike)):
        return False
    name = os.fspath(value).lower().rstrip("/")
    return name.endswith(READ_EXTENSIONS) or name.endswith(".zarr")


def _to_channels_last(shape: tuple[int, ...], path: Path) -> tuple[int, ...]:
    if len(shape) == 2:
        return (*shape, 1, 1)
    if len(shape) == 3:
        return (*shape, 1)
    if len(shape) == 4:
        return shape
    raise ValueError(
        f"{path}: image has {len(shape)} dimensions {shape}; jmed reads 2D, 3D and 4D "
        "images (a 4th dimension becomes channels)"
    )


def _label_dtype(dtype: np.dtype) -> np.dtype:
    if dtype in (np.int64, np.uint64, np.uint32):
        return np.dtype(np.int32)
    if np.issubdtype(dtype, np.integer) or dtype == np.bool_:
        return np.dtype(dtype)
    return np.dtype(np.int32)


_INFLATE_CHUNK = 1 << 20


def _inflate_range(filename: str, offset: int, nbytes: int) -> np.ndarray:
    """Bytes ``[offset, offset + nbytes)`` of the inflated gzip file, in aligned memory.

    Inflates in one pass (every member, checking each member's CRC and length, trailing
    zero padding allowed, as ``gzip`` does), copying each 1 MiB piece while it is still
    in cache.
    """
    with open(filename, "rb") as f:
        pending = f.read()
    out = _aligned_empty((nbytes,), np.uint8)
    end = offset + nbytes
    position = 0  # in the inflated stream
    inflater = _inflate.decompressobj(31)
    while True:
        piece = inflater.decompress(pending, _INFLATE_CHUNK)
        pending = inflater.unconsumed_tail
        lo, hi = max(position, offset), min(position + len(piece), end)
        if hi > lo:
            out[lo - offset : hi - offset] = np.frombuffer(piece, np.uint8, hi - lo, lo - position)
        position += len(piece)
        if inflater.eof:
            rest = inflater.unused_data
            if not rest.strip(b"\0"):
                break
            inflater, pending = _inflate.decompressobj(31), rest
        elif not piece and not pending:
            raise EOFError("compressed file ended before the end-of-stream marker was reached")
    if position < end:
        raise EOFError(
            f"file holds {max(position - offset, 0)} bytes of voxel data, the header says {nbytes}"
        )
    return out


def _scaled(proxy: Any, unscaled: np.ndarray, dtype: np.dtype | None) -> np.ndarray:
    """``unscaled`` voxels with the header's slope and intercept applied, cast to ``dtype``,
    exactly as ``np.asarray(proxy, dtype)`` computes them for nibabel's ``ArrayProxy``."""
    slope, inter = np.asanyarray(proxy.slope), np.asanyarray(proxy.inter)
    use = slope.dtype if dtype is None else dtype
    if np.can_cast(slope, use):
        slope = slope.astype(use)
    if np.can_cast(inter, use):
        inter = inter.astype(use)
    scaled = apply_read_scaling(unscaled, slope, inter)
    if dtype is not None:
        scaled = scaled.astype(np.promote_types(scaled.dtype, dtype), copy=False).astype(dtype, copy=False)
    return scaled


def _voxels(img: Any, dtype: np.dtype | None) -> np.ndarray:
    """The image's voxels, scaled, as ``np.asarray(img.dataobj, dtype)``.

    A gzipped single-file NIfTI is inflated in one pass (nibabel inflates through
    ``gzip.GzipFile`` in small chunks with a separate CRC pass: about 3x slower) straight
    into 64-byte aligned memory, so unscaled voxels reach ``jit`` without another copy.
    """
    proxy = img.dataobj
    filename = img.file_map["image"].filename if "image" in img.file_map else None
    if (
        type(img) in (nib.Nifti1Image, nib.Nifti2Image)
        and isinstance(proxy, nib.arrayproxy.ArrayProxy)
        and filename is not None
        and str(filename).lower().endswith(".gz")
    ):
        shape, voxel_type = tuple(proxy.shape), np.dtype(proxy.dtype)
        raw = _inflate_range(str(filename), int(proxy.offset), math.prod(shape) * voxel_type.itemsize)
        unscaled = raw.view(voxel_type).reshape(shape, order=proxy.order)
        return _scaled(proxy, unscaled, dtype)
    return np.asanyarray(proxy, dtype=dtype)


# DEFLATE never inflates more than 1032 bytes per compressed byte
_MAX_INFLATE_RATIO = 1032


def _check_file_holds_voxels(img: Any, path: Path) -> None:
    """Refuse a header that announces more voxel bytes than its file can hold (a crafted
    or damaged header would otherwise make the reader allocate terabytes)."""
    holder = img.file_map.get("image")
    filename = getattr(holder, "filename", None) if holder is not None else None
    proxy = img.dataobj
    if filename is None or not isinstance(proxy, nib.arrayproxy.ArrayProxy) or not os.path.isfile(filename):
        return
    shape = tuple(int(s) for s in img.shape)
    nbytes = math.prod(shape) * np.dtype(img.get_data_dtype()).itemsize
    offset = int(getattr(proxy, "offset", 0) or 0)
    size = os.path.getsize(filename)
    if str(filename).lower().endswith((".gz", ".mgz")):
        if nbytes > (size + 1) * _MAX_INFLATE_RATIO:
            raise ValueError(
                f"{path}: the header announces dimensions {shape} ({nbytes} bytes of voxels), more "
                f"than a {size}-byte compressed file can hold; the header is damaged"
            )
    elif offset + nbytes > size:
        raise ValueError(
            f"{path}: the header announces dimensions {shape} ({nbytes} bytes of voxels from byte "
            f"{offset}), but the file has {size} bytes: truncated file or damaged header"
        )


def _rgb_channels(raw: np.ndarray) -> np.ndarray:
    """A structured RGB(A) array as float32 channels on a new last axis."""
    return np.stack([raw[name].astype(np.float32) for name in raw.dtype.names], axis=-1)


def _label_voxels(raw: np.ndarray, source: str) -> np.ndarray:
    """Voxels read for a label map as integers (see the module docstring): floats must hold
    finite integer values; values must fit the label dtype. ``source`` names the file."""
    target = _label_dtype(raw.dtype)
    if not np.issubdtype(raw.dtype, np.integer) and raw.dtype != np.bool_:
        finite = np.isfinite(raw)
        if not finite.all():
            raise ValueError(
                f"{source}: label map has non-finite values (e.g. {raw[~finite].flat[0]}); "
                "load it with kind='intensity'"
            )
        rounded = np.rint(raw)
        off = np.abs(raw - rounded) > 1e-3
        if off.any():
            raise ValueError(
                f"{source}: label map has non-integer values (e.g. {raw[off].flat[0]}); "
                "load it with kind='intensity'"
            )
        info = np.iinfo(target)
        if rounded.size and (rounded.min() < info.min or rounded.max() > info.max):
            bad = rounded.min() if rounded.min() < info.min else rounded.max()
            raise ValueError(
                f"{source}: label value {bad:g} does not fit in {target.name} (allowed "
                f"{info.min}..{info.max}); renumber the labels"
            )
        raw = rounded
    else:
        check_label_range(raw, target, source)
    return raw.astype(target, copy=False)


def _read_data(
    img: Any, path: Path, kind: str, shape: tuple[int, ...], channel_axis: int, file_order: bool
) -> np.ndarray:
    _check_file_holds_voxels(img, path)
    try:
        if np.dtype(img.get_data_dtype()).names:
            data = _rgb_channels(np.asarray(_voxels(img, None)))
            data = data.reshape(shape)
            return data if file_order else _host_layout(data)
        if kind == INTENSITY:
            data = np.asarray(_voxels(img, np.dtype(np.float32)))
        else:
            data = _label_voxels(_voxels(img, None), str(path))
    except (EOFError, OSError, gzip.BadGzipFile, *_INFLATE_ERRORS) as err:
        raise ValueError(
            f"{path}: cannot read voxel data (missing, truncated or corrupt file) ({err})"
        ) from err
    if data.ndim == 4 and channel_axis != 3:
        data = np.moveaxis(data, channel_axis, -1)
    data = data.reshape(shape)
    return data if file_order else _host_layout(data)


_COMPRESSED_SUFFIXES = (".gz", ".mgz", ".bz2", ".zst")


def _region_reader(
    img: Any, path: Any, kind: str, shape: tuple[int, ...], channel_axis: int, compressed: bool | None = None
) -> Any:
    """A function ``(start, stop) -> voxels`` reading one box of an uncompressed file through
    a memory map (only the pages the box touches; for an open remote file, only the byte
    ranges), or None for files it cannot serve (compressed, RGB, MINC): those are read whole."""
    proxy = img.dataobj
    if not isinstance(proxy, nib.arrayproxy.ArrayProxy) or np.dtype(proxy.dtype).names:
        return None
    source = proxy.file_like
    if compressed is None:
        compressed = not isinstance(source, str) or source.lower().endswith(_COMPRESSED_SUFFIXES)
    if compressed or channel_axis != len(proxy.shape) - 1:
        return None
    file_shape = tuple(int(s) for s in proxy.shape)
    # the same bytes without the header's scaling, which is applied below as load() applies it
    raw_proxy = nib.arrayproxy.ArrayProxy(
        source, (file_shape, np.dtype(proxy.dtype), int(proxy.offset), 1.0, 0.0), order=proxy.order
    )

    def read(start: tuple[int, ...], stop: tuple[int, ...]) -> np.ndarray:
        spatial = tuple(slice(a, b) for a, b in zip(start, stop))
        index = spatial[: len(file_shape)] if len(file_shape) <= 3 else (*spatial, slice(None))
        size = tuple(b - a for a, b in zip(start, stop))
        _check_file_holds_voxels(img, path)
        try:
            if isinstance(source, str):
                # a mapping per read, released at once: only the pages of the box are read,
                # and they do not stay resident (nibabel's own slicing issues one read call
                # per contiguous run of voxels: 4096 for a 64^3 box)
                mapped = np.memmap(
                    source,
                    dtype=proxy.dtype,
                    mode="r",
                    offset=proxy.offset,
                    shape=file_shape,
                    order=proxy.order,
                )
                unscaled = np.array(mapped[index])
                del mapped
            else:
                unscaled = np.asarray(raw_proxy[index])
            if kind == INTENSITY:
                data = _scaled(proxy, unscaled, np.dtype(np.float32))
            else:
                trivial = float(np.asarray(proxy.slope)) == 1 and float(np.asarray(proxy.inter)) == 0
                data = unscaled if trivial else _scaled(proxy, unscaled, None)
                data = _label_voxels(data, str(path))
        except (EOFError, OSError, ValueError) as err:
            if isinstance(err, ValueError) and str(err).startswith(str(path)):
                raise
            raise ValueError(f"{path}: cannot read voxel data ({err})") from err
        return _host_layout(np.asarray(data).reshape(*size, shape[3]))

    return read


def load(path: str | os.PathLike, kind: str = INTENSITY, *, lazy: bool = False, level: int = 0) -> Image:
    """Read an image file into an ``Image`` (voxels in C order, see the module docstring).

    Chunked stores (a path or URL ending in ``.zarr``: NIfTI-Zarr ``.nii.zarr``, OME-Zarr,
    plain zarr arrays) and fsspec URLs (``https://``, ``s3://``, ``memory://``, ...) are
    read by ``jmed.chunked.load`` (it needs ``pip install "jmed[zarr]"``), always lazily:
    see ``jmed.chunked``.

    Args:
        path: file, store or URL to read (see the module docstring for formats).
        kind: ``"intensity"`` (float32, scaling applied) or ``"label"`` (integers kept).
        lazy: read only the header now; voxels are read on first access to ``.data``, and
            ``Image.read_region`` reads a box alone from chunked stores and uncompressed
            (memory-mapped) files.
        level: pyramid level of a chunked store (0: full resolution); other files have
            level 0 only.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        IsADirectoryError: ``path`` is a directory.
        ValueError: unsupported extension, corrupt file, more than 4 dimensions,
            unusable affine, unknown ``kind``.

    Examples:
        >>> import os, jmed
        >>> from nibabel.testing import data_path
        >>> img = jmed.load(os.path.join(data_path, "anatomical.nii"))
        >>> img.shape, img.orientation
        ((33, 41, 25, 1), 'LAS')
    """
    return _load(path, kind, lazy=lazy, file_order=False, level=level)


def _is_chunked(path: Any) -> bool:
    """True for a zarr store (a name ending in ``.zarr``) or any URL with a scheme."""
    text = os.fspath(path) if isinstance(path, os.PathLike) else path
    if not isinstance(text, str):
        return False
    if text.startswith("file://"):
        text = text[len("file://") :]
    return text.rstrip("/").lower().endswith(".zarr") or "://" in text


def _load(
    path: str | os.PathLike, kind: str, *, lazy: bool = False, file_order: bool, level: int = 0
) -> Image:
    """``load``; with ``file_order``, voxels stay in the file's order (Fortran for NIfTI),
    for a caller that hands them to ``jit`` once, transposed (see ``jmed.data``)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if _is_chunked(path):
        from jmed import chunked

        return chunked.load(path, kind, level=level)
    if not (level == 0 and not isinstance(level, bool)):
        raise ValueError(
            f"level must be 0 for a single-resolution file, got {level!r}; pyramid levels are in .zarr stores"
        )
    if isinstance(path, str) and path.startswith("file://"):
        path = path[len("file://") :]
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory; load() needs an image file")
    if not path.exists():
        raise FileNotFoundError(f"no such image file: {path}")
    ext = _header.extension(path)
    if ext not in READ_EXTENSIONS:
        raise ValueError(f"{path}: unsupported extension {ext!r}; readable: {', '.join(READ_EXTENSIONS)}")
    try:
        img = nib.load(str(path))
    except Exception as err:  # nibabel raises many types for bad headers
        raise ValueError(f"{path}: cannot read image header ({type(err).__name__}: {err})") from err
    return _from_nibabel(img, path, kind, lazy=lazy, file_order=file_order)


def _from_nibabel(
    img: Any, path: Any, kind: str, *, lazy: bool, file_order: bool, compressed: bool | None = None
) -> Image:
    """An ``Image`` of an opened nibabel image (a file, or a file object of a remote file:
    ``path`` names it in messages; ``compressed`` says whether it can be read by region)."""
    try:
        file_affine = img.affine
    except Exception as err:
        raise ValueError(f"{path}: cannot compute the affine ({err})") from err
    if file_affine is None:
        raise ValueError(f"{path}: file has no affine")
    affine = affine_lib.check_affine(file_affine, name=f"affine of {path}")
    header = img.header
    if isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)) and int(header["qform_code"]) == 0 == int(
        header["sform_code"]
    ):
        spacing = tuple(round(float(s), 6) for s in affine_lib.spacing(affine))
        warnings.warn(
            f"{path}: the header has neither a qform nor an sform (both codes 0); using "
            f"nibabel's fallback affine: voxel sizes {spacing} mm from pixdim (a zero size is "
            "taken as 1 mm), x flipped (LAS), centred on the volume; the orientation is unknown",
            UserWarning,
            stacklevel=3,
        )
    file_shape = [int(s) for s in img.shape]
    if any(s <= 0 for s in file_shape):
        raise ValueError(
            f"{path}: the header has dimensions {tuple(file_shape)}; every axis needs at least one voxel"
        )
    channel_axis = _header.channel_axis(img)
    if len(file_shape) == 4:
        file_shape.append(file_shape.pop(channel_axis))
    shape = _to_channels_last(tuple(file_shape), path)
    file_dtype = np.dtype(img.get_data_dtype())
    if file_dtype.names:
        if kind != INTENSITY:
            raise ValueError(
                f"{path}: RGB images ({file_dtype.names}) cannot be read as a label map; "
                "load them with kind='intensity' (one channel per colour)"
            )
        if shape[3] != 1:
            raise ValueError(f"{path}: a 4D RGB image {tuple(file_shape)} is not supported")
        shape = (*shape[:3], len(file_dtype.names))
    dtype = np.float32 if kind == INTENSITY else _label_dtype(file_dtype)

    def read() -> np.ndarray:
        return _read_data(img, path, kind, shape, channel_axis, file_order)

    image = Image(_LazyData(shape, dtype, read), affine, kind=kind)
    if not lazy:
        # stored as read: no layout change for file_order
        return image.replace(data=read())
    region = _region_reader(img, path, kind, shape, channel_axis, compressed)
    return image.replace(data=_LazyData(shape, dtype, read, region=region, source=path))


def _storable(data: np.ndarray, path: Path) -> np.ndarray:
    """``data`` in a dtype every writer holds: 64-bit integers narrowed to int32 when their
    values fit (else a ValueError), float16/float64 as float32, booleans as uint8."""
    if data.dtype in (np.float64, np.float16):
        return data.astype(np.float32)
    if data.dtype == np.bool_:
        return data.astype(np.uint8)
    if data.dtype in (np.int64, np.uint64):
        info = np.iinfo(np.int32)
        if data.size and (data.min() < info.min or data.max() > info.max):
            bad = data.min() if data.min() < info.min else data.max()
            raise ValueError(
                f"{path}: value {bad} of a {data.dtype.name} image does not fit in int32 "
                f"({info.min}..{info.max}); file formats hold at most 32-bit integers here"
            )
        return data.astype(np.int32)
    if not (np.issubdtype(data.dtype, np.integer) or data.dtype == np.float32):
        raise ValueError(f"{path}: cannot write voxels of dtype {data.dtype.name}")
    return data


def _nibabel_image(image: Image, ext: str, path: Path) -> Any:
    data = np.asarray(image.data)
    if data.shape[-1] == 1:
        data = data[..., 0]
    data = _storable(data, path)
    affine = np.asarray(image.affine, dtype=np.float64)
    if ext in (".nii", ".nii.gz"):
        out = nib.Nifti1Image(data, affine)
        out.set_qform(affine, code=1)
        out.set_sform(affine, code=1)
        out.header.set_xyzt_units("mm")
    elif ext in (".mgh", ".mgz"):
        if data.dtype not in (np.uint8, np.int16, np.int32, np.float32):
            data = data.astype(np.float32 if image.kind == INTENSITY else np.int32)
        out = nib.MGHImage(data, affine)
    else:
        out = nib.Spm2AnalyzeImage(data, affine)
    return out


def save(
    image: Image,
    path: str | os.PathLike,
    *,
    overwrite: bool = False,
    chunks: Any = None,
    levels: int | None = None,
) -> Path:
    """Write ``image`` to ``path`` atomically; returns the path written.

    The format follows the extension (``.nii``, ``.nii.gz``, ``.mgh``, ``.mgz``,
    ``.hdr``/``.img``, and ``.nii.zarr``/``.zarr`` for NIfTI-Zarr, written by
    ``jmed.chunked.save`` with ``chunks`` voxels per chunk (default 64) and ``levels``
    pyramid levels; it needs ``pip install "jmed[zarr]"``). Single-channel images are
    written as 3D, others as 4D. Analyze is
    written in its SPM2 flavour: the affine goes to a ``.mat`` file beside the header
    (an affine that does not survive the write raises ``ValueError``, nothing written).

    Voxels are stored as they are, except: 64-bit integers as int32 (a ValueError naming
    the path when a value does not fit), float16 and float64 as float32, booleans as uint8.

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is False.
        FileNotFoundError / NotADirectoryError: the folder of ``path`` is missing or a file.
        ValueError: unsupported extension, a zero-length axis, values the file cannot hold,
            or an affine the format cannot hold.
        OSError: the write failed (disk full, file too large, no permission), naming
            ``path``; an existing file at ``path`` is left intact.
    """
    if not isinstance(image, Image):
        raise TypeError(f"save() takes a jmed.Image, got {type(image).__name__}")
    if _is_chunked(path):
        from jmed import chunked

        return chunked.save(
            image,
            path,
            chunks=chunked.DEFAULT_CHUNKS if chunks is None else chunks,
            levels=levels,
            overwrite=overwrite,
        )
    if chunks is not None or levels is not None:
        raise ValueError(f"chunks and levels apply to chunked stores (.nii.zarr), not to {path}")
    path = Path(path)
    ext = _header.extension(path)
    if ext not in WRITE_EXTENSIONS:
        raise ValueError(f"{path}: cannot write extension {ext!r}; writable: {', '.join(WRITE_EXTENSIONS)}")
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory; save() needs a file path")
    targets = [path]
    if ext in (".hdr", ".img"):
        targets = [path.with_suffix(".hdr"), path.with_suffix(".img"), path.with_suffix(".mat")]
    if not overwrite:
        for target in targets:
            if target.exists():
                raise FileExistsError(f"{target} exists; pass overwrite=True to replace it")
    if not path.parent.exists():
        raise FileNotFoundError(f"folder {path.parent} does not exist")
    if not path.parent.is_dir():
        raise NotADirectoryError(f"{path.parent} is not a folder; cannot write {path}")
    if 0 in tuple(image.shape):
        raise ValueError(f"{path}: cannot write an image with a zero-length axis, shape {tuple(image.shape)}")
    nib_image = _nibabel_image(image, ext, path)
    tmp_dir = _atomic.temporary_folder(path.parent)
    try:
        tmp_path = Path(tmp_dir) / ("tmp" + (".hdr" if ext in (".hdr", ".img") else ext))
        try:
            nib.save(nib_image, str(tmp_path))
        except OSError as err:
            raise OSError(err.errno, f"cannot write {path}: {err.strerror or err}") from err
        except Exception as err:  # nibabel raises many types for data it cannot store
            raise ValueError(f"{path}: cannot write this image ({type(err).__name__}: {err})") from err
        if ext in (".hdr", ".img"):
            written = nib.load(str(tmp_path)).affine
            if not np.allclose(written, np.asarray(image.affine), atol=1e-4):
                raise ValueError(
                    f"{path}: the Analyze format cannot hold this affine:\n{np.asarray(image.affine)}\n"
                    "save it as .nii or .nii.gz instead"
                )
        # data file first, header last: a reader never sees a header without its data
        for target in reversed(targets):
            source = tmp_path.with_suffix(target.suffix) if len(targets) > 1 else tmp_path
            if source.exists():
                _atomic._fsync_file(source)
                os.replace(source, target)
        _atomic._fsync_dir(path.parent)
    finally:
        for leftover in Path(tmp_dir).iterdir():
            leftover.unlink()
        os.rmdir(tmp_dir)
    return path


def convert(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    kind: str = INTENSITY,
    chunks: Any = 64,
    levels: int | None = None,
    overwrite: bool = False,
    progress: bool = False,
) -> Path:
    """Convert ``src`` to the format of ``dst`` (e.g. ``.nii.gz`` to ``.nii.zarr``) once, so
    that patches are later read chunk by chunk; returns the path written.

    See ``jmed.chunked.convert``: a NIfTI source keeps its stored dtype and scaling and is
    streamed slab by slab into the store (with ``progress``, a progress bar);
    ``chunks`` and ``levels`` set the store's chunk shape and pyramid levels. Writing a
    chunked store needs ``pip install "jmed[zarr]"``.

    Raises:
        FileExistsError: ``dst`` exists and ``overwrite`` is False.
        FileNotFoundError: ``src`` does not exist.
        ValueError: unreadable ``src`` or unwritable ``dst`` (naming the path).
    """
    from jmed import chunked

    return chunked.convert(
        src, dst, kind=kind, chunks=chunks, levels=levels, overwrite=overwrite, progress=progress
    )
