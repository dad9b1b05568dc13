"""File facts that need neither JAX nor the voxels: the readable extensions and the channel
axis of a 4D file. ``jmed.io`` builds on them, and ``jmed info`` uses them without
importing JAX."""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["READ_EXTENSIONS", "WRITE_EXTENSIONS", "channel_axis", "extension"]

WRITE_EXTENSIONS = (".nii", ".nii.gz", ".mgh", ".mgz", ".hdr", ".img")
READ_EXTENSIONS = WRITE_EXTENSIONS + (".mnc",)


def extension(path: Path) -> str:
    """The longest of ``READ_EXTENSIONS`` that ends the file name (case-insensitive), else
    the file's last two suffixes (``"(none)"`` without one)."""
    name = path.name.lower()
    for ext in sorted(READ_EXTENSIONS, key=len, reverse=True):
        if name.endswith(ext):
            return ext
    return "".join(path.suffixes[-2:]) or "(none)"


def channel_axis(img: Any) -> int:
    """Axis of a 4D nibabel image that holds channels/time: the last, except for MINC, whose
    non-spatial dimension (e.g. time) usually comes first."""
    minc_file = getattr(getattr(img, "dataobj", None), "minc_file", None)
    if minc_file is not None and len(img.shape) == 4:
        names = list(getattr(minc_file, "_dim_names", ()))
        spatial = set(getattr(minc_file, "_spatial_dims", ()))
        other = [i for i, n in enumerate(names) if n not in spatial]
        if len(other) == 1:
            return other[0]
    return len(img.shape) - 1
