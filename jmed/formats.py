"""More file formats: DICOM series (``pydicom``) and NRRD (``pynrrd``), both optional.

Both formats usually describe geometry in LPS+ (DICOM always; NRRD says so in its
``space`` field). jmed's affines are RAS+, so the readers negate the first two world
axes: a voxel keeps its physical position, only the sign convention of the coordinates
changes. The voxel axes are kept as stored (no reorientation): a DICOM series becomes
``(column, row, slice)``, i.e. ``x`` runs along a row of the picture, ``y`` down the
columns and ``z`` across slices in the order of their position along the slice normal.

Intensity images are float32 (DICOM ``RescaleSlope``/``RescaleIntercept`` applied); label
maps keep their integer values.

``read_image`` dispatches on the path: a folder or ``.dcm`` file is a DICOM series,
``.nrrd``/``.nhdr`` is NRRD, anything else goes to ``jmed.load`` (nibabel).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jmed import affine as affine_lib
from jmed.image import INTENSITY, KINDS, Image
from jmed.io import _label_dtype, load

__all__ = ["LPS_TO_RAS", "load_dicom", "load_nrrd", "read_image"]

#: Multiplying an LPS+ affine on the left by this gives the RAS+ affine.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")


def _finish(data: np.ndarray, affine: np.ndarray, kind: str, path: Path) -> Image:
    if kind == INTENSITY:
        data = data.astype(np.float32, copy=False)
    else:
        if not np.issubdtype(data.dtype, np.integer):
            rounded = np.rint(data)
            if not np.allclose(data, rounded, atol=1e-3):
                raise ValueError(f"{path}: label map has non-integer values; load it with kind='intensity'")
            data = rounded
        data = data.astype(_label_dtype(data.dtype), copy=False)
    affine = affine_lib.check_affine(affine, name=f"affine of {path}")
    return Image(data, affine, kind=kind)  # the constructor makes it C-ordered and aligned


# --- NRRD ----------------------------------------------------------------------------------------

_NRRD_SPACES = {
    "right-anterior-superior": (1, 1, 1),
    "ras": (1, 1, 1),
    "left-anterior-superior": (-1, 1, 1),
    "las": (-1, 1, 1),
    "left-posterior-superior": (-1, -1, 1),
    "lps": (-1, -1, 1),
    "scanner-xyz": (-1, -1, 1),  # DICOM's patient coordinates
    "3d-right-handed": (-1, -1, 1),  # as ITK reads it
}
_NRRD_DOMAIN = ("domain", "space", "time")


def load_nrrd(path: str | os.PathLike, kind: str = INTENSITY) -> Image:
    """Read a ``.nrrd`` (or detached ``.nhdr``) file into an ``Image``.

    Geometry comes from ``space``, ``space directions`` and ``space origin``; LPS (and
    LAS) spaces are converted to RAS. A file with only ``spacings`` gets an axis-aligned
    LPS affine (as ITK reads it). A non-spatial axis (``kinds`` such as ``vector``,
    ``list``, ``RGB-color``) becomes the channel axis.

    Raises:
        ImportError: ``pynrrd`` is not installed.
        FileNotFoundError: no such file.
        ValueError: unreadable file, more than 3 spatial axes, unsupported ``space``.
    """
    try:
        import nrrd
    except ImportError as err:
        raise ImportError(
            "reading NRRD needs pynrrd: `pip install pynrrd` (or the jmed[formats] extra)"
        ) from err
    _check_kind(kind)
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such NRRD file: {path}")
    try:
        data, header = nrrd.read(str(path))
    except Exception as err:  # pynrrd raises NRRDError and others for bad files
        raise ValueError(f"{path}: cannot read NRRD ({type(err).__name__}: {err})") from err
    ndim = data.ndim
    kinds = [str(k).lower() for k in header.get("kinds", ["domain"] * ndim)]
    spatial = [i for i, k in enumerate(kinds) if k in _NRRD_DOMAIN]
    channel_axes = [i for i in range(ndim) if i not in spatial]
    if len(spatial) > 3 or len(channel_axes) > 1:
        raise ValueError(f"{path}: jmed reads up to 3 spatial axes and 1 channel axis, got kinds {kinds}")
    data = np.moveaxis(data, spatial + channel_axes, range(ndim))
    while data.ndim - len(channel_axes) < 3:  # 2D: add singleton spatial axes
        data = np.expand_dims(data, len(spatial))
        spatial.append(-1)
    if not channel_axes:
        data = data[..., None]

    space = str(header.get("space", "left-posterior-superior")).lower()
    if space not in _NRRD_SPACES:
        raise ValueError(f"{path}: unsupported NRRD space {space!r}; supported: {sorted(_NRRD_SPACES)}")
    signs = np.array(_NRRD_SPACES[space], dtype=float)
    linear = np.eye(3)
    directions = header.get("space directions")
    if directions is not None:
        rows = [np.asarray(directions[i], dtype=float) for i in spatial if i >= 0]
        for axis, row in enumerate(rows):
            if row.shape != (3,) or not np.all(np.isfinite(row)):
                raise ValueError(f"{path}: space direction of spatial axis {axis} is {row!r}; need 3 numbers")
            linear[:, axis] = row
    elif "spacings" in header:
        spacings = np.asarray(header["spacings"], dtype=float)
        for axis, i in enumerate(spatial):
            if i >= 0 and np.isfinite(spacings[i]):
                linear[axis, axis] = spacings[i]
    origin = np.asarray(header.get("space origin", np.zeros(3)), dtype=float)
    if origin.shape != (3,):
        raise ValueError(f"{path}: space origin must have 3 values, got {origin!r}")
    affine = np.eye(4)
    affine[:3, :3] = signs[:, None] * linear
    affine[:3, 3] = signs * origin
    return _finish(data, affine, kind, path)


# --- DICOM --------------------------------------------------------------------------------------


def _dicom_files(source: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    if isinstance(source, (str, os.PathLike)):
        source = Path(source)
        if source.is_dir():
            files = sorted(p for p in source.iterdir() if p.is_file() and not p.name.startswith("."))
        elif source.is_file():
            files = [source]
        else:
            raise FileNotFoundError(f"no such DICOM file or folder: {source}")
    else:
        files = [Path(p) for p in source]
        for p in files:
            if not p.is_file():
                raise FileNotFoundError(f"no such DICOM file: {p}")
    if not files:
        raise FileNotFoundError(f"{source}: folder has no files")
    return files


def load_dicom(
    source: str | os.PathLike | Sequence[str | os.PathLike],
    kind: str = INTENSITY,
    *,
    series_uid: str | None = None,
    spacing_tolerance: float = 1e-2,
) -> Image:
    """Read a DICOM series (a folder, one file of the series, or a list of files).

    Slices are sorted by their position along the slice normal (the cross product of the
    ``ImageOrientationPatient`` row and column directions), not by file name or
    ``InstanceNumber``. The affine comes from ``ImagePositionPatient``,
    ``ImageOrientationPatient`` and ``PixelSpacing`` (LPS), converted to RAS; the slice
    step is the distance between consecutive slice positions (``SpacingBetweenSlices`` or
    ``SliceThickness`` for a single slice).

    Args:
        source: folder holding the series, a single file, or a list of files. When
            ``source`` is one file, the other files of its series in the same folder are
            read too.
        kind: ``"intensity"`` (float32, rescale applied) or ``"label"``.
        series_uid: which series to read when the folder holds several.
        spacing_tolerance: maximum deviation (mm) of slice gaps from uniform.

    Raises:
        ImportError: ``pydicom`` is not installed.
        FileNotFoundError: no files.
        ValueError: no readable image slices, several series without ``series_uid``,
            slices with different sizes/orientations, duplicate or non-uniform slice
            positions, multi-frame files.
    """
    try:
        import pydicom
    except ImportError as err:
        raise ImportError(
            "reading DICOM needs pydicom: `pip install pydicom` (or the jmed[formats] extra)"
        ) from err
    _check_kind(kind)
    single_file = isinstance(source, (str, os.PathLike)) and Path(source).is_file()
    files = _dicom_files(Path(source).parent if single_file else source)
    if single_file and series_uid is None:
        try:
            series_uid = str(pydicom.dcmread(str(source), stop_before_pixels=True).SeriesInstanceUID)
        except Exception as err:
            raise ValueError(f"{source}: not a readable DICOM file ({type(err).__name__}: {err})") from err
    where = Path(source) if isinstance(source, (str, os.PathLike)) else files[0].parent

    headers: dict[str, list[tuple[Path, Any]]] = {}
    for path in files:
        try:
            ds = pydicom.dcmread(str(path), stop_before_pixels=True)
        except Exception:  # not DICOM (DICOMDIR, notes, ...): skip
            continue
        if "PixelData" not in ds and not hasattr(ds, "Rows"):
            continue
        if not hasattr(ds, "ImagePositionPatient") or not hasattr(ds, "ImageOrientationPatient"):
            continue
        headers.setdefault(str(getattr(ds, "SeriesInstanceUID", "")), []).append((path, ds))
    if not headers:
        raise ValueError(f"{where}: no DICOM image slices with position and orientation found")
    if series_uid is None:
        if len(headers) > 1:
            listing = ", ".join(f"{uid} ({len(v)} slices)" for uid, v in headers.items())
            raise ValueError(f"{where} holds several series; choose one with series_uid=: {listing}")
        series_uid = next(iter(headers))
    if series_uid not in headers:
        raise ValueError(f"{where}: no series {series_uid!r}; series found: {sorted(headers)}")
    slices = headers[series_uid]

    first = slices[0][1]
    if int(getattr(first, "NumberOfFrames", 1) or 1) > 1:
        raise ValueError(f"{slices[0][0]}: multi-frame DICOM is not supported; convert it to NIfTI first")
    iop = np.asarray(first.ImageOrientationPatient, dtype=float)
    row_dir, col_dir = iop[:3], iop[3:]
    normal = np.cross(row_dir, col_dir)
    for path, ds in slices:
        if (ds.Rows, ds.Columns) != (first.Rows, first.Columns):
            raise ValueError(
                f"{path}: slice size {(ds.Rows, ds.Columns)} differs from {(first.Rows, first.Columns)}"
            )
        if not np.allclose(np.asarray(ds.ImageOrientationPatient, float), iop, atol=1e-4):
            raise ValueError(f"{path}: ImageOrientationPatient differs from the other slices of the series")
    positions = np.array([np.asarray(ds.ImagePositionPatient, float) for _, ds in slices])
    order = np.argsort(positions @ normal, kind="stable")
    slices = [slices[i] for i in order]
    positions = positions[order]
    distances = positions @ normal
    if len(slices) > 1:
        gaps = np.diff(distances)
        if np.any(gaps < 1e-6):
            dup = [str(slices[i][0]) for i in np.nonzero(gaps < 1e-6)[0][:2]]
            raise ValueError(
                f"{where}: several slices at the same position (e.g. {dup}); is this a multi-echo series?"
            )
        if np.ptp(gaps) > spacing_tolerance:
            raise ValueError(
                f"{where}: slice gaps are not uniform (from {gaps.min():.4g} to {gaps.max():.4g} mm); "
                "jmed needs a regular grid"
            )
        step = (positions[-1] - positions[0]) / (len(slices) - 1)
    else:
        thickness = float(
            getattr(first, "SpacingBetweenSlices", 0) or getattr(first, "SliceThickness", 1) or 1
        )
        step = normal * thickness

    row_spacing, col_spacing = (float(v) for v in first.PixelSpacing)
    affine_lps = np.eye(4)
    affine_lps[:3, 0] = row_dir * col_spacing  # x: along a row (increasing column index)
    affine_lps[:3, 1] = col_dir * row_spacing  # y: down a column (increasing row index)
    affine_lps[:3, 2] = step
    affine_lps[:3, 3] = positions[0]

    volume = []
    for path, _ in slices:
        ds = pydicom.dcmread(str(path))
        try:
            pixels = ds.pixel_array
        except Exception as err:
            raise ValueError(f"{path}: cannot decode pixel data ({type(err).__name__}: {err})") from err
        if pixels.ndim != 2:
            raise ValueError(f"{path}: expected a 2D grayscale slice, got pixel array shape {pixels.shape}")
        if kind == INTENSITY:
            slope = float(getattr(ds, "RescaleSlope", 1) or 1)
            intercept = float(getattr(ds, "RescaleIntercept", 0) or 0)
            pixels = pixels.astype(np.float32) * np.float32(slope) + np.float32(intercept)
        volume.append(pixels.T)
    data = np.stack(volume, axis=-1)[..., None]
    return _finish(data, LPS_TO_RAS @ affine_lps, kind, where)


def read_image(path: str | os.PathLike, kind: str = INTENSITY) -> Image:
    """Read any supported image: DICOM folder/file, NRRD, or what ``jmed.load`` reads."""
    path = Path(path)
    name = path.name.lower()
    if path.is_dir() or name.endswith(".dcm"):
        return load_dicom(path, kind)
    if name.endswith((".nrrd", ".nhdr")):
        return load_nrrd(path, kind)
    return load(path, kind)
