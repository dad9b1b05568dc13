"""Sample data and subject lists: synthetic phantoms, MNI152, folders, CSV, BIDS, IXI.

Datasets are described by **records**: plain dicts with one entry per image (a file path)
plus optional per-subject metadata, e.g. ``{"subject_id": "sub-01", "t1": "/data/sub-01_T1w.nii.gz",
"seg": "/data/sub-01_seg.nii.gz", "age": 42}``. Records are cheap to list, shuffle, split and
send to loader worker processes; ``load_subject`` turns one into a ``jmed.Subject``.

Host-side data generation here uses ``numpy.random.default_rng(seed)`` (never the global
numpy RNG), so every dataset is a deterministic function of its seed.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import shutil
import tarfile
import tempfile
import urllib.request
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jmed import affine as affine_lib
from jmed._progress import progress_bar
from jmed.image import KINDS, LabelMap, ScalarImage, Subject
from jmed.io import is_image_path, load
from jmed.transforms import params as _params

__all__ = [
    "IXI_MODALITIES",
    "IXI_URL",
    "MNI152",
    "PHANTOM_LABELS",
    "download_ixi",
    "load_subject",
    "phantom",
    "records_to_subjects",
    "split_records",
    "subjects_from_bids",
    "subjects_from_csv",
    "subjects_from_folder",
]

#: Label values of ``phantom``: 0 background, 1 grey matter, 2 white matter, 3 CSF.
PHANTOM_LABELS = ("background", "GM", "WM", "CSF")

ID = "subject_id"


# --- synthetic phantom ----------------------------------------------------------------------


def _rng(key_or_seed: Any) -> np.random.Generator:
    if isinstance(key_or_seed, (int, np.integer)) and not isinstance(key_or_seed, bool):
        return np.random.default_rng(int(key_or_seed))
    if isinstance(key_or_seed, jax.Array):
        if jax.dtypes.issubdtype(key_or_seed.dtype, jax.dtypes.prng_key):
            bits = jax.random.bits(key_or_seed, (4,), dtype=np.uint32)
        else:  # legacy uint32 key
            bits = jax.random.bits(jax.random.wrap_key_data(key_or_seed), (4,), dtype=np.uint32)
        return np.random.default_rng(np.asarray(bits).tolist())
    raise TypeError(f"key must be an int seed or a jax.random key, got {type(key_or_seed).__name__}")


def _smooth_field(
    rng: np.random.Generator, u: np.ndarray, num_waves: int, max_frequency: float
) -> np.ndarray:
    """A random smooth scalar field on normalised coordinates ``u`` (..., 3), about [-1, 1]."""
    field = np.zeros(u.shape[:-1])
    for _ in range(num_waves):
        direction = rng.standard_normal(3)
        direction /= np.linalg.norm(direction)
        frequency = rng.uniform(0.5, 1.0) * max_frequency
        field += np.cos(np.pi * frequency * (u @ direction) + rng.uniform(0, 2 * np.pi))
    return field / np.sqrt(num_waves / 2)


_WORLD_AXIS = {"R": 0, "L": 0, "A": 1, "P": 1, "S": 2, "I": 2}


def _check_orientation(orientation: str) -> str:
    affine_lib.from_spacing((1, 1, 1), (0, 0, 0), orientation)  # validates the code
    return orientation.upper()


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def phantom(
    key: Any = 0,
    *,
    shape: Sequence[int] = (64, 64, 64),
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    orientation: str = "RAS",
    noise: float = 0.05,
    bias: float = 0.2,
    num_classes: int = 4,
) -> Subject:
    """A synthetic brain-like subject: a T1-like image and a tissue label map.

    The head is an irregular ellipsoid that fills the field of view: an outer CSF shell,
    a folded grey-matter ribbon, a white-matter core and two ventricles (CSF) placed
    left and right of the midline. The anatomy is defined in world (RAS) coordinates
    relative to the field of view, so two phantoms with the same key and field of view
    show the same anatomy whatever their orientation (a phantom made ``"LPS"`` and
    reoriented to RAS equals the one made ``"RAS"``).

    Intensities are T1-like (WM > GM > CSF > background, class means jittered per
    subject), with partial-volume blending at boundaries, a smooth multiplicative bias
    field and Rician noise; they are not clipped. Everything is a deterministic function
    of ``key``.

    Args:
        key: an int seed or a ``jax.random`` key.
        shape: spatial shape ``(x, y, z)``.
        spacing: voxel size in mm.
        orientation: orientation code of the data axes, e.g. ``"RAS"`` or ``"LPS"``.
        noise: standard deviation of the noise relative to the white-matter intensity.
        bias: strength of the bias field (its log varies within about ``±bias``).
        num_classes: 2 (background, brain), 3 (background incl. CSF, GM, WM) or
            4 (background, GM, WM, CSF): see ``PHANTOM_LABELS``.

    Returns:
        ``Subject(t1=float32 intensity image, seg=uint8 label map)`` with the affine for
        ``spacing`` and ``orientation``, centred on the world origin.

    Examples:
        >>> s = phantom(0, shape=(32, 32, 32), spacing=(2, 2, 2))
        >>> s.t1.shape, s.t1.dtype, s.seg.orientation
        ((32, 32, 32, 1), dtype('float32'), 'RAS')
        >>> sorted(set(s.seg.numpy().ravel().tolist()))
        [0, 1, 2, 3]
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"shape must be 3 positive integers, got {shape!r}")
    _params.check_output_size("phantom", shape, channels=4, itemsize=8)  # float64 fields
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != 3 or min(spacing) <= 0:
        raise ValueError(f"spacing must be 3 positive voxel sizes in mm, got {spacing!r}")
    if num_classes not in (2, 3, 4):
        raise ValueError(f"num_classes must be 2, 3 or 4, got {num_classes!r}")
    if noise < 0 or bias < 0:
        raise ValueError(f"noise and bias must be >= 0, got noise={noise!r}, bias={bias!r}")
    rng = _rng(key)
    # build in RAS (so the random draws do not depend on the orientation), then reorient
    world_axis = [_WORLD_AXIS[letter] for letter in _check_orientation(orientation)]
    ras_shape, ras_spacing = [0, 0, 0], [0.0, 0.0, 0.0]
    for data_axis, w in enumerate(world_axis):
        ras_shape[w], ras_spacing[w] = shape[data_axis], spacing[data_axis]
    affine = affine_lib.from_spacing(
        ras_spacing, -(np.array(ras_shape) - 1) / 2 * np.array(ras_spacing), "RAS"
    )
    index = np.stack(np.meshgrid(*[np.arange(n) for n in ras_shape], indexing="ij"), -1)
    world = affine_lib.voxel_to_world(affine, index.astype(np.float64))
    half_fov = np.array(ras_shape) * np.array(ras_spacing) / 2
    u = world / half_fov

    radii = np.array([0.78, 0.88, 0.82]) * rng.uniform(0.95, 1.05, 3)
    shape_field = _smooth_field(rng, u, 6, 1.5)
    r = np.linalg.norm(u / radii, axis=-1) * (1.0 + 0.04 * shape_field)
    folds = _smooth_field(rng, u, 12, 5.0)
    csf_gm = 0.9
    gm_wm = 0.68 + 0.07 * folds
    ventricles = np.zeros(u.shape[:-1])
    for side in (-1.0, 1.0):
        centre = np.array([0.14 * side, 0.05, 0.12])
        v_radii = np.array([0.07, 0.28, 0.12])
        ventricles = np.maximum(
            ventricles, _sigmoid((1.0 - np.linalg.norm((u - centre) / v_radii, axis=-1)) / 0.08)
        )

    # partial volume: soft memberships with a transition about one voxel wide
    width = 0.6 * np.min(np.array(ras_spacing) / half_fov)
    inside_head = _sigmoid((1.0 - r) / width)
    inside_gm = _sigmoid((csf_gm - r) / width)
    inside_wm = _sigmoid((gm_wm - r) / width)
    p_wm = inside_wm * (1 - ventricles)
    p_gm = (inside_gm - inside_wm) * (1 - ventricles)
    p_csf = inside_head - inside_gm + inside_gm * ventricles
    p_bg = 1.0 - inside_head

    means = np.array([0.0, 0.55, 1.0, 0.2]) * rng.uniform(0.93, 1.07, 4)
    texture = 1.0 + 0.03 * _smooth_field(rng, u, 8, 8.0)
    clean = (p_gm * means[1] + p_wm * means[2] + p_csf * means[3]) * texture + p_bg * means[0]
    bias_field = np.exp(bias * np.tanh(_smooth_field(rng, u, 3, 0.6) / 2))
    signal = clean * bias_field
    if noise > 0:
        real = signal + noise * rng.standard_normal(signal.shape)
        imag = noise * rng.standard_normal(signal.shape)
        signal = np.sqrt(real**2 + imag**2)  # magnitude image: Rician noise

    memberships = np.stack([p_bg, p_gm, p_wm, p_csf], -1)
    labels = np.argmax(memberships, -1).astype(np.uint8)
    if num_classes == 3:
        labels[labels == 3] = 0
    elif num_classes == 2:
        labels = ((labels == 1) | (labels == 2)).astype(np.uint8)
    t1, new_affine = affine_lib.reorient(signal.astype(np.float32), affine, orientation)
    seg, _ = affine_lib.reorient(labels, affine, orientation)
    t1, seg = np.ascontiguousarray(t1), np.ascontiguousarray(seg)
    return Subject(t1=ScalarImage(t1, new_affine), seg=LabelMap(seg, new_affine))


# --- MNI152 ----------------------------------------------------------------------------------


def _nilearn_data_folder() -> Path:
    try:
        import nilearn
    except ImportError as err:
        raise ImportError(
            "MNI152() reads the template files bundled with the 'nilearn' package, which is "
            "not installed; install it with `pip install nilearn` (no download is needed "
            "after that)"
        ) from err
    return Path(nilearn.__file__).parent / "datasets" / "data"


def MNI152() -> Subject:  # noqa: N802 - named like the template
    """The MNI ICBM152 2009a symmetric template as a subject (197 x 233 x 189, 1 mm, RAS).

    Read from the files bundled with ``nilearn`` (nothing is downloaded). Images:
    ``t1`` (float32, values 0-255) and ``seg``, a 3-class label map made from the grey
    and white matter probability maps ``p = value / 255``: 0 (background/CSF) where
    ``max(p_gm, p_wm) < 0.5``, else 1 (GM) or 2 (WM), whichever probability is larger
    (ties go to GM).

    Raises:
        ImportError: ``nilearn`` is not installed.
        FileNotFoundError: the installed ``nilearn`` lacks the template files.

    References:
        Fonov et al., "Unbiased average age-appropriate atlases for pediatric studies",
        NeuroImage 54(1), 2011.
    """
    folder = _nilearn_data_folder()
    paths = {k: folder / f"mni_icbm152_{k}_tal_nlin_sym_09a_converted.nii.gz" for k in ("t1", "gm", "wm")}
    for path in paths.values():
        if not path.exists():
            raise FileNotFoundError(
                f"{path} not found; this nilearn version does not bundle the MNI152 2009a "
                "template (nilearn >= 0.10 does)"
            )
    t1 = load(paths["t1"])
    gm = load(paths["gm"]).numpy()[..., 0] / 255.0
    wm = load(paths["wm"]).numpy()[..., 0] / 255.0
    labels = np.where(np.maximum(gm, wm) < 0.5, 0, np.where(wm > gm, 2, 1)).astype(np.uint8)
    return Subject(t1=t1, seg=LabelMap(labels, t1.affine))


# --- records ----------------------------------------------------------------------------------


def _wildcard_regex(pattern: str) -> re.Pattern:
    """Regex for a glob pattern with a capture group per ``*`` / ``?`` (``**`` matches folders)."""
    out, i = [], 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
            continue
        if c == "*":
            out.append("([^/]*)")
        elif c == "?":
            out.append("([^/])")
        elif c == "[":
            end = pattern.find("]", i)
            if end < 0:
                out.append(re.escape(c))
            else:
                out.append("[" + pattern[i + 1 : end].replace("!", "^", 1) + "]")
                i = end
        else:
            out.append(re.escape(c))
        i += 1
    return re.compile("".join(out) + r"\Z")


def _id_from_match(match: re.Match) -> str:
    parts: list[str] = []
    for group in match.groups():
        if group and group not in parts:
            parts.append(group)
    return "_".join(parts)


def subjects_from_folder(
    root: str | os.PathLike,
    pattern: Mapping[str, str],
    *,
    subject_id: Callable[[str, Path], str] | None = None,
    on_missing: str = "error",
) -> list[dict[str, Any]]:
    """Records from files under ``root`` matched by one glob pattern per image.

    The subject id of a file is the text its wildcards matched: with
    ``{"t1": "*_T1w.nii.gz", "seg": "*_seg.nii.gz"}``, ``sub-01_T1w.nii.gz`` and
    ``sub-01_seg.nii.gz`` form subject ``"sub-01"``; with ``"*/t1.nii.gz"`` the id is the
    folder name. A wildcard that repeats an earlier match (``sub-*/anat/sub-*_T1w.nii.gz``)
    counts once; several different matches are joined with ``_``. Pass ``subject_id(name,
    relative_path) -> str`` to decide otherwise.

    Args:
        root: folder to search.
        pattern: image name -> glob pattern relative to ``root`` (``**`` spans folders).
        subject_id: optional function giving the id of a file.
        on_missing: ``"error"`` (default) or ``"skip"`` (with a warning) for subjects that
            lack one of the images.

    Returns:
        Records ``{"subject_id": ..., name: absolute path, ...}`` sorted by id.

    Raises:
        FileNotFoundError: ``root`` does not exist, or a pattern matches nothing.
        ValueError: two files of one image name give the same id, or (with
            ``on_missing="error"``) a subject lacks an image.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"root folder {root} does not exist or is not a folder")
    if not isinstance(pattern, Mapping) or not pattern:
        raise TypeError(f"pattern must be a non-empty mapping of image name -> glob, got {pattern!r}")
    if on_missing not in ("error", "skip"):
        raise ValueError(f"on_missing must be 'error' or 'skip', got {on_missing!r}")
    found: dict[str, dict[str, Path]] = {}
    for name, glob in pattern.items():
        regex = _wildcard_regex(glob)
        files = sorted(p for p in root.glob(glob) if p.is_file())
        if not files:
            raise FileNotFoundError(f"no file under {root} matches pattern {glob!r} (image {name!r})")
        for path in files:
            relative = path.relative_to(root).as_posix()
            if subject_id is not None:
                sid = subject_id(name, Path(relative))
            else:
                match = regex.match(relative)
                sid = _id_from_match(match) if match else path.name
            if not sid:
                raise ValueError(f"pattern {glob!r} has no wildcard, so {relative} gives no subject id")
            previous = found.setdefault(sid, {}).get(name)
            if previous is not None:
                raise ValueError(
                    f"duplicate subject id {sid!r} for image {name!r}: {previous} and {path}; make the "
                    "pattern more specific or pass subject_id="
                )
            found[sid][name] = path.resolve()
    return _complete_records(found, list(pattern), on_missing, f"under {root}")


def _complete_records(found, names, on_missing, where) -> list[dict[str, Any]]:
    records, incomplete = [], []
    for sid in sorted(found):
        missing = [n for n in names if n not in found[sid]]
        if missing:
            incomplete.append(f"{sid} (missing {', '.join(missing)})")
            continue
        records.append({ID: sid, **{n: str(found[sid][n]) for n in names}})
    if incomplete:
        message = f"{len(incomplete)} subject(s) {where} lack images: {'; '.join(incomplete[:10])}"
        if on_missing == "error":
            raise ValueError(message + "; pass on_missing='skip' to leave them out")
        warnings.warn(message + "; skipped", stacklevel=3)
    return records


def _parse_value(text: str) -> Any:
    text = text.strip()
    if text == "" or text.lower() in ("n/a", "na", "nan"):
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def subjects_from_csv(
    path: str | os.PathLike,
    *,
    image_columns: Sequence[str] | None = None,
    id_column: str = ID,
    root: str | os.PathLike | None = None,
    delimiter: str | None = None,
    check_files: bool = True,
) -> list[dict[str, Any]]:
    """Records from a CSV (or TSV) file: one row per subject.

    Image columns hold file paths, absolute or relative to ``root`` (default: the CSV's
    folder); other columns are metadata, with numbers parsed as ``int``/``float`` and
    empty or ``n/a`` cells as ``None``.

    Args:
        path: the table.
        image_columns: columns holding image paths; by default, the columns whose every
            non-empty value ends in an image extension (``.nii.gz``, ``.mgz``, ...).
        id_column: column with the subject ids (copied to ``"subject_id"``).
        root: folder that relative paths are relative to.
        delimiter: by default ``\\t`` for ``.tsv`` files, else ``,``.
        check_files: raise if an image file does not exist.

    Raises:
        FileNotFoundError: the table or (with ``check_files``) an image is missing.
        ValueError: no id column, duplicate ids, unknown image columns, empty cells in
            image columns.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such table: {path}")
    root = Path(root) if root is not None else path.parent
    if delimiter is None:
        delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f, delimiter=delimiter))
    if not rows:
        return []
    columns = list(rows[0])
    if id_column not in columns:
        raise ValueError(f"{path}: no id column {id_column!r}; columns: {columns}")
    if image_columns is None:
        image_columns = [
            c
            for c in columns
            if c != id_column and any(r[c] for r in rows) and all(is_image_path(r[c]) for r in rows if r[c])
        ]
        if not image_columns:
            raise ValueError(f"{path}: no column holds image paths; pass image_columns=")
    unknown = [c for c in image_columns if c not in columns]
    if unknown:
        raise ValueError(f"{path}: image_columns {unknown} not in the table; columns: {columns}")
    records, seen = [], {}
    for line, row in enumerate(rows, start=2):
        sid = row[id_column].strip()
        if not sid:
            raise ValueError(f"{path}, line {line}: empty subject id")
        if sid in seen:
            raise ValueError(f"{path}: duplicate subject id {sid!r} on lines {seen[sid]} and {line}")
        seen[sid] = line
        record: dict[str, Any] = {ID: sid}
        for column in columns:
            if column == id_column:
                continue
            value = (row[column] or "").strip()
            if column in image_columns:
                if not value:
                    raise ValueError(f"{path}, line {line}: subject {sid!r} has no path in column {column!r}")
                file = Path(value) if Path(value).is_absolute() else root / value
                if check_files and not file.is_file():
                    raise FileNotFoundError(
                        f"{path}, line {line}: subject {sid!r}, column {column!r}: no file {file}"
                    )
                record[column] = str(file.resolve() if file.exists() else file)
            else:
                record[column] = _parse_value(value)
        records.append(record)
    return records


_BIDS_ENTITY = re.compile(r"([a-zA-Z0-9]+)-([a-zA-Z0-9]+)")


def _bids_entities(filename: str) -> tuple[dict[str, str], str]:
    stem = filename.split(".")[0]
    parts = stem.split("_")
    entities = {}
    for part in parts[:-1]:
        m = _BIDS_ENTITY.fullmatch(part)
        if m:
            entities[m.group(1)] = m.group(2)
    return entities, parts[-1]


def _sidecar(path: Path) -> dict[str, Any]:
    sidecar = path.parent / (path.name.split(".")[0] + ".json")
    if not sidecar.exists():
        return {}
    try:
        data = json.loads(sidecar.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{sidecar}: invalid JSON sidecar ({err})") from err
    return {k: v for k, v in data.items() if isinstance(v, (str, int, float, bool)) or v is None}


def subjects_from_bids(
    root: str | os.PathLike,
    images: Mapping[str, str] = {"t1": "T1w"},  # noqa: B006 - read only
    *,
    datatype: str = "anat",
    entities: Mapping[str, str] | None = None,
    derivatives: Mapping[str, str] | None = None,
    on_missing: str = "error",
) -> list[dict[str, Any]]:
    """Records from a BIDS dataset (``sub-*/[ses-*/]anat/*_T1w.nii.gz``).

    One record per subject (or per subject and session). It holds ``subject_id``
    (``"sub-01"`` or ``"sub-01_ses-1"``), ``participant_id`` (``"sub-01"``; group by it
    when splitting so that sessions stay together), ``session`` (or ``None``), one path per
    entry of ``images``, the scalar fields of each image's JSON sidecar as
    ``"<name>.<Field>"`` (e.g. ``"t1.RepetitionTime"``), and the columns of
    ``participants.tsv`` (numbers parsed, ``n/a`` as ``None``).

    Args:
        root: the dataset folder.
        images: record key -> BIDS suffix (``{"t1": "T1w", "t2": "T2w"}``).
        datatype: BIDS datatype folder.
        entities: keep only files with these entity values (``{"acq": "mprage"}``);
            needed when a subject has several runs or acquisitions of one suffix.
        derivatives: record key -> glob relative to ``root`` with ``{subject}`` and
            ``{session}`` placeholders, for images outside the raw layout (e.g.
            ``{"seg": "derivatives/manual/{subject}/anat/{subject}*_dseg.nii.gz"}``).
        on_missing: ``"error"`` or ``"skip"`` for subjects lacking an image.

    Raises:
        FileNotFoundError: ``root`` is not a folder or has no ``sub-*`` folders.
        ValueError: several files for one image of one subject, missing images (with
            ``on_missing="error"``), a bad ``participants.tsv``.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"BIDS root {root} does not exist or is not a folder")
    if on_missing not in ("error", "skip"):
        raise ValueError(f"on_missing must be 'error' or 'skip', got {on_missing!r}")
    subjects = sorted(p for p in root.glob("sub-*") if p.is_dir())
    if not subjects:
        raise FileNotFoundError(f"{root} has no sub-* folders; is it a BIDS dataset?")
    entities = dict(entities or {})
    participants: dict[str, dict[str, Any]] = {}
    table = root / "participants.tsv"
    if table.exists():
        for record in subjects_from_csv(
            table, image_columns=[], id_column="participant_id", check_files=False
        ):
            participants[record.pop(ID)] = record
    found: dict[str, dict[str, Any]] = {}
    for subject in subjects:
        sessions = sorted(p for p in subject.glob("ses-*") if p.is_dir()) or [None]
        for session in sessions:
            folder = (session or subject) / datatype
            sid = subject.name if session is None else f"{subject.name}_{session.name}"
            entry: dict[str, Any] = {}
            files = sorted(folder.glob("*")) if folder.is_dir() else []
            for name, suffix in images.items():
                matches = []
                for path in files:
                    if not is_image_path(path):
                        continue
                    ents, file_suffix = _bids_entities(path.name)
                    if file_suffix == suffix and all(ents.get(k) == v for k, v in entities.items()):
                        matches.append(path)
                if len(matches) > 1:
                    raise ValueError(
                        f"{sid}: several {suffix} images ({', '.join(p.name for p in matches)}); "
                        "choose one with entities={'acq': ..., 'run': ...}"
                    )
                if matches:
                    entry[name] = matches[0].resolve()
                    for key, value in _sidecar(matches[0]).items():
                        entry[f"{name}.{key}"] = value
            for name, glob in (derivatives or {}).items():
                ses = session.name if session is not None else ""
                matches = sorted(root.glob(glob.format(subject=subject.name, session=ses)))
                if len(matches) > 1:
                    raise ValueError(f"{sid}: several files match {glob!r} for {name!r}: {matches}")
                if matches:
                    entry[name] = matches[0].resolve()
            found[sid] = entry
    names = list(images) + list(derivatives or {})
    complete = _complete_records(
        {k: {n: v for n, v in e.items() if n in names} for k, e in found.items()},
        names,
        on_missing,
        f"in {root}",
    )
    records = []
    for record in complete:
        sid = record[ID]
        participant, _, session = sid.partition("_")
        extra = {k: v for k, v in found[sid].items() if k not in names}
        records.append(
            {
                **record,
                "participant_id": participant,
                "session": session or None,
                **extra,
                **participants.get(participant, {}),
            }
        )
    return records


def load_subject(
    record: Mapping[str, Any],
    kinds: Mapping[str, str],
    *,
    metadata: Sequence[str] = (),
    lazy: bool = False,
    check: bool = True,
) -> Subject:
    """Load the images of one record into a ``jmed.Subject``.

    Args:
        record: a dict of image paths and metadata.
        kinds: image name -> ``"intensity"`` or ``"label"``; only these images are loaded
            (e.g. ``{"t1": "intensity", "seg": "label"}``).
        metadata: record keys to copy into ``subject.metadata``. Only numbers, booleans
            and ``None`` should be batched: strings are static pytree metadata, so
            subjects with different strings cannot be stacked.
        lazy: read headers only (voxels on first access).
        check: check that the images share shape and affine.

    Raises:
        KeyError: a name in ``kinds`` or ``metadata`` is not in the record.
        ValueError: unknown kind, inconsistent images (message names the subject).
    """
    sid = record.get(ID, "<no subject_id>")
    images = {}
    for name, kind in kinds.items():
        if kind not in KINDS:
            raise ValueError(f"kinds[{name!r}] must be one of {KINDS}, got {kind!r}")
        if name not in record:
            raise KeyError(f"subject {sid!r} has no image {name!r}; record keys: {sorted(record)}")
        try:
            images[name] = load(record[name], kind, lazy=lazy)
        except FileNotFoundError as err:
            raise FileNotFoundError(f"subject {sid!r}, image {name!r}: {err}") from err
    meta = {}
    for key in metadata:
        if key not in record:
            raise KeyError(f"subject {sid!r} has no metadata {key!r}; record keys: {sorted(record)}")
        meta[key] = record[key]
    subject = Subject(images, metadata=meta)
    if check:
        try:
            subject.check_consistent()
        except ValueError as err:
            raise ValueError(f"subject {sid!r}: {err}") from err
    return subject


def records_to_subjects(
    records: Iterable[Mapping[str, Any]],
    kinds: Mapping[str, str],
    *,
    metadata: Sequence[str] = (),
    lazy: bool = True,
    check: bool = True,
) -> list[Subject]:
    """``load_subject`` for every record (lazy by default: headers now, voxels on use).

    Raises:
        ValueError: duplicate subject ids, or as ``load_subject``.
    """
    records = list(records)
    _check_unique_ids(records)
    return [load_subject(r, kinds, metadata=metadata, lazy=lazy, check=check) for r in records]


def _check_unique_ids(records: Sequence[Mapping[str, Any]]) -> None:
    seen = set()
    for record in records:
        sid = record.get(ID)
        if sid is not None and sid in seen:
            raise ValueError(f"duplicate subject id {sid!r} in records")
        seen.add(sid)


def split_records(
    records: Sequence[Mapping[str, Any]],
    *,
    validation: float = 0.2,
    seed: int = 0,
    stratify: str | None = None,
    group: str | None = None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Split records into training and validation lists, deterministically for ``seed``.

    Args:
        records: the records.
        validation: fraction of subjects (or groups) for validation, in ``(0, 1)``.
        seed: the split is a function of ``seed`` and the records only.
        stratify: metadata key; each of its values gets the validation fraction of its
            subjects (rounded), so class proportions match in both lists.
        group: metadata key (e.g. ``"participant_id"`` or ``"site"``); records with the
            same value always land in the same list. With ``stratify`` too, the stratum
            must be constant within a group.

    Returns:
        ``(train, validation)``, each in the input order.

    Raises:
        ValueError: bad fraction, missing keys, duplicate ids, a stratum that varies
            within a group.
    """
    records = [dict(r) for r in records]
    if not 0 < validation < 1:
        raise ValueError(f"validation must be a fraction in (0, 1), got {validation!r}")
    _check_unique_ids(records)
    for key, name in ((stratify, "stratify"), (group, "group")):
        if key is not None:
            missing = [r.get(ID, i) for i, r in enumerate(records) if key not in r]
            if missing:
                raise ValueError(f"{name}={key!r}: records {missing[:5]} lack that key")
    units: dict[Any, list[int]] = {}
    for i, r in enumerate(records):
        units.setdefault(r[group] if group is not None else i, []).append(i)
    strata: dict[Any, list[Any]] = {}
    for unit, members in units.items():
        values = {repr(records[i][stratify]) for i in members} if stratify else {None}
        if len(values) > 1:
            raise ValueError(
                f"{stratify!r} differs within group {unit!r} ({sorted(values)}); cannot stratify"
            )
        strata.setdefault(values.pop(), []).append(unit)
    rng = np.random.default_rng(seed)
    chosen: set[int] = set()
    for stratum in sorted(strata, key=repr):
        unit_list = strata[stratum]
        order = rng.permutation(len(unit_list))
        n_val = int(np.floor(validation * len(unit_list) + 0.5))
        for j in order[:n_val]:
            chosen.update(units[unit_list[j]])
    train = [r for i, r in enumerate(records) if i not in chosen]
    val = [r for i, r in enumerate(records) if i in chosen]
    return train, val


# --- IXI ------------------------------------------------------------------------------------

#: Where the IXI archives are served (one tar per modality: ``IXI-T1.tar``, ...), over
#: https; pass ``url=`` for a mirror.
IXI_URL = "https://biomedic.doc.ic.ac.uk/brain-development/downloads/IXI/"
IXI_MODALITIES = ("T1", "T2", "PD", "MRA", "DTI")
#: md5 of each published archive ``IXI-<modality>.tar`` (the values TorchIO's ``IXI``
#: dataset checks), verified by ``download_ixi`` unless other checksums are given.
IXI_MD5 = {
    "T1": "34901a0593b41dd19c1a1f746eac2d58",
    "T2": "e3140d78730ecdd32ba92da48c0a9aaa",
    "PD": "88ecd9d1fa33cb4a2278183b42ffd749",
    "MRA": "29be7d2fee3998f978a55a9bdaf3407e",
    "DTI": "636573825b1c8b9e8c78f1877df3ee66",
}


def _download(url: str, target: Path, timeout: float, progress: bool = False) -> str:
    """Stream ``url`` to ``target`` (with a progress bar in bytes if ``progress``); returns
    the md5 of what was written."""
    digest = hashlib.md5()
    with urllib.request.urlopen(url, timeout=timeout) as response, open(target, "wb") as f:
        expected = response.headers.get("Content-Length")
        size = 0
        total = int(expected) if expected is not None and expected.isdigit() else None
        with progress_bar(progress, total=total, desc=target.name, unit="B", unit_scale=True) as bar:
            while chunk := response.read(1 << 20):
                f.write(chunk)
                digest.update(chunk)
                size += len(chunk)
                bar.update(len(chunk))
    if expected is not None and int(expected) != size:
        raise OSError(f"download of {url} is incomplete: {size} of {expected} bytes")
    return digest.hexdigest()


def _safe_extract(archive: Path, destination: Path) -> None:
    with tarfile.open(archive) as tar:
        members = tar.getmembers()
        for member in members:
            name = Path(member.name)
            if name.is_absolute() or ".." in name.parts or not (member.isfile() or member.isdir()):
                raise ValueError(f"{archive}: refusing unsafe archive member {member.name!r}")
        if hasattr(tarfile, "data_filter"):  # Python >= 3.11.4: also blocks links and devices
            tar.extractall(destination, members=members, filter="data")
        else:
            tar.extractall(destination, members=members)


def download_ixi(
    root: str | os.PathLike,
    modalities: Sequence[str] = ("T1",),
    *,
    url: str = IXI_URL,
    checksums: Mapping[str, str] | None = None,
    timeout: float = 60.0,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Download and extract the IXI dataset (about 600 healthy subjects' MRIs).

    Each modality's archive ``<url>IXI-<modality>.tar`` is downloaded with ``urllib`` into a
    temporary folder inside ``root``, checked (complete, the md5 of the published archive,
    a readable tar), extracted there and renamed into place as
    ``root/IXI-<modality>/`` in one step, so an interrupted download never leaves a
    partial folder. A modality whose folder exists is not downloaded again.

    Args:
        root: folder to hold the data (created if missing).
        modalities: any of ``IXI_MODALITIES``.
        url: base URL of the archives (ending in ``/``); https by default.
        checksums: modality -> md5 hex digest of its archive; default ``IXI_MD5`` (the
            published archives). A modality missing from ``checksums`` (e.g. ``{}``, for
            a mirror serving other archives) is downloaded with a warning that it was not
            verified.
        timeout: seconds to wait for the server.
        progress: show a progress bar (bytes) on stderr for each archive downloaded.

    Returns:
        Records ``{"subject_id": "IXI002-Guys-0828", "t1": path, ...}`` (keys are the
        lower-case modalities) for the subjects that have every requested modality;
        others are skipped with a warning (IXI lacks some images).

    Raises:
        ValueError: unknown modality, checksum mismatch, unsafe archive.
        OSError: download failure (``urllib.error.URLError``) or incomplete download.
    """
    modalities = [modalities] if isinstance(modalities, str) else list(modalities)
    unknown = [m for m in modalities if m not in IXI_MODALITIES]
    if unknown or not modalities:
        raise ValueError(f"modalities must be a non-empty subset of {IXI_MODALITIES}, got {modalities!r}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    if checksums is None:
        checksums = IXI_MD5
    checksums = {str(k): str(v).lower() for k, v in dict(checksums).items()}
    bad = [m for m, v in checksums.items() if not re.fullmatch(r"[0-9a-f]{32}", v)]
    if bad:
        raise ValueError(
            f"checksums must be md5 hex digests (32 hex digits), got {bad[0]}: {checksums[bad[0]]!r}"
        )
    for modality in modalities:
        final = root / f"IXI-{modality}"
        if final.is_dir():
            continue
        work = Path(tempfile.mkdtemp(prefix=f".IXI-{modality}-", dir=root))
        try:
            archive = work / f"IXI-{modality}.tar"
            archive_url = f"{url}IXI-{modality}.tar"
            md5 = _download(archive_url, archive, timeout, progress)
            if modality not in checksums:
                warnings.warn(
                    f"{archive_url} was not verified: no md5 for {modality} in checksums (md5 {md5})",
                    UserWarning,
                    stacklevel=2,
                )
            elif md5 != checksums[modality]:
                raise ValueError(
                    f"checksum mismatch for {archive_url}: md5 {md5}, expected {checksums[modality]}"
                )
            try:
                extracted = work / "extracted"
                extracted.mkdir()
                _safe_extract(archive, extracted)
            except tarfile.TarError as err:
                raise ValueError(f"{archive_url} is not a valid tar archive ({err})") from err
            os.replace(extracted, final)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    found: dict[str, dict[str, Path]] = {}
    suffix = re.compile(r"-(" + "|".join(IXI_MODALITIES) + r")\.nii(\.gz)?\Z")
    for modality in modalities:
        for path in sorted((root / f"IXI-{modality}").rglob(f"*-{modality}.nii*")):
            match = suffix.search(path.name)
            if match and match.group(1) == modality:
                found.setdefault(path.name[: match.start()], {})[modality.lower()] = path.resolve()
    return _complete_records(found, [m.lower() for m in modalities], "skip", f"in {root}")
