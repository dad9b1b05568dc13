"""Plotting for visual quality control (needs the optional ``matplotlib``).

**Display convention.** Images are first reoriented to RAS (exactly, by permuting and
flipping axes; no interpolation), then shown world-aligned with correct aspect ratios from
the voxel spacing, in the *neurological* convention by default: in coronal and axial
views the patient's left is on the left of the picture and their right on the right;
superior is up in sagittal and coronal views, anterior is up in axial views, and
sagittal views show anterior on the right. Pass ``radiological=True`` to mirror the
coronal and axial views (patient's right on the picture's left, as radiologists read
scans). Letters at the panel edges name the world directions. Oblique images are shown
along their closest RAS axes.

Each function returns a ``matplotlib.figure.Figure`` built without ``pyplot`` (no global
state, safe in threads and scripts); notebooks display the returned figure as a PNG,
with or without pyplot. Pass ``output="file.png"`` to save it. ``Image`` and
``Subject`` show themselves in notebooks through ``html_summary``.

The voxel data shown is the image's first channel unless ``channel`` says otherwise.
Intensity windows default to the 0.5th-99.5th percentiles.
"""

from __future__ import annotations

import base64
import functools
import html
import io
import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.typing import ArrayLike

from jmed import affine as affine_lib
from jmed._checks import is_traced
from jmed.image import Image, Subject, unstack

__all__ = ["VIEWS", "html_summary", "plot_batch", "plot_image", "plot_subject", "plot_transform", "to_png"]

#: Orthogonal views: name -> (RAS axis held fixed, horizontal axis, vertical axis).
VIEWS = {"sagittal": (0, 1, 2), "coronal": (1, 0, 2), "axial": (2, 0, 1)}
_LETTERS = (("L", "R"), ("P", "A"), ("I", "S"))  # (negative, positive) end of each RAS axis


@functools.cache
def _figure_class() -> type:
    """matplotlib's ``Figure`` with a PNG display for notebooks (made on first use, so
    that importing jmed does not import matplotlib)."""
    from matplotlib.figure import Figure

    class _NotebookFigure(Figure):
        # a figure made without pyplot has no display in Jupyter unless pyplot's inline
        # backend happens to be active; this one shows itself
        def _repr_png_(self) -> bytes:
            return to_png(self)

    _NotebookFigure.__module__ = __name__
    _NotebookFigure.__qualname__ = "_NotebookFigure"  # found by pickle through __getattr__
    return _NotebookFigure


def __getattr__(name: str) -> Any:
    # unpickling a figure looks its class up here by name
    if name == "_NotebookFigure":
        return _figure_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _figure(figsize):
    try:
        import matplotlib.figure  # noqa: F401 -- checked on every call, not only the first
    except ImportError as err:
        raise ImportError(
            "jmed.plot needs matplotlib, which is not installed; install it with "
            "`pip install matplotlib` (or the jmed[examples] extra)"
        ) from err
    return _figure_class()(figsize=figsize, layout="constrained")


def _ras(image: Image) -> tuple[np.ndarray, np.ndarray]:
    """Image data (x, y, z, c) and affine reoriented to RAS (host numpy)."""
    if not isinstance(image, Image):
        raise TypeError(f"expected a jmed.Image, got {type(image).__name__}")
    if len(image.shape) != 4:
        raise ValueError(
            f"plotting needs a single image (x, y, z, c), got shape {image.shape}; use plot_batch for batches"
        )
    data, affine = affine_lib.reorient(np.asarray(image.data), np.asarray(image.affine), "RAS")
    return np.asarray(data), affine


def _voxel_of(point, affine, shape) -> np.ndarray:
    if point is None:
        return (np.array(shape[:3]) - 1) // 2
    point = np.asarray(point, dtype=float)
    if point.shape != (3,):
        raise ValueError(f"point must be 3 world coordinates in mm, got {point!r}")
    voxel = np.rint(affine_lib.world_to_voxel(affine, point)).astype(int)
    return np.clip(voxel, 0, np.array(shape[:3]) - 1)


def _extent(affine, shape, horizontal, vertical):
    spacing = affine_lib.spacing(affine)
    origin = affine[:3, 3]
    out = []
    for axis in (horizontal, vertical):
        # reoriented to RAS, each data axis runs along (nearly) its world axis
        lo = origin[axis] - spacing[axis] / 2
        out += [lo, lo + spacing[axis] * shape[axis]]
    return out


def _window(data: np.ndarray, vmin, vmax) -> tuple[float, float]:
    finite = data[np.isfinite(data)]
    if finite.size == 0:
        return 0.0, 1.0
    lo = float(np.percentile(finite, 0.5)) if vmin is None else float(vmin)
    hi = float(np.percentile(finite, 99.5)) if vmax is None else float(vmax)
    return lo, hi if hi > lo else lo + 1.0


def _label_cmap(num_labels: int):
    from matplotlib.colors import ListedColormap

    base = [
        (0.90, 0.10, 0.10),
        (0.10, 0.60, 0.95),
        (0.10, 0.80, 0.20),
        (0.95, 0.75, 0.05),
        (0.75, 0.20, 0.85),
        (0.05, 0.80, 0.80),
        (0.95, 0.45, 0.05),
        (0.55, 0.35, 0.15),
    ]
    return ListedColormap([base[i % len(base)] for i in range(max(num_labels, 1))])


def _draw(
    ax,
    data,
    affine,
    voxel,
    view,
    *,
    labels=None,
    window=(0.0, 1.0),
    cmap="gray",
    alpha=0.4,
    radiological=False,
    max_label=None,
    letters=True,
):
    fixed, horizontal, vertical = VIEWS[view]
    sl = np.take(data, voxel[fixed], axis=fixed)  # remaining axes in increasing order
    # after removing `fixed`, horizontal/vertical keep their relative order: transpose so
    # rows are the vertical axis
    image = sl.T if horizontal < vertical else sl
    extent = _extent(affine, data.shape, horizontal, vertical)
    ax.imshow(
        image,
        cmap=cmap,
        vmin=window[0],
        vmax=window[1],
        origin="lower",
        extent=extent,
        interpolation="nearest",
    )
    if labels is not None:
        lab = np.take(labels, voxel[fixed], axis=fixed)
        lab = lab.T if horizontal < vertical else lab
        top = int(max_label if max_label is not None else max(int(lab.max()), 1))
        masked = np.ma.masked_where(lab <= 0, lab)
        ax.imshow(
            masked,
            cmap=_label_cmap(top),
            vmin=0.5,
            vmax=top + 0.5,
            alpha=alpha,
            origin="lower",
            extent=extent,
            interpolation="nearest",
        )
    ax.set_aspect("equal")
    if radiological and view != "sagittal":
        ax.invert_xaxis()
    ax.set_axis_off()
    if letters:
        left, right = _LETTERS[horizontal]
        if ax.xaxis_inverted():
            left, right = right, left
        bottom, top_letter = _LETTERS[vertical]
        style = {"color": "yellow", "fontsize": 8, "transform": ax.transAxes}
        ax.text(0.01, 0.5, left, ha="left", va="center", **style)
        ax.text(0.99, 0.5, right, ha="right", va="center", **style)
        ax.text(0.5, 0.01, bottom, ha="center", va="bottom", **style)
        ax.text(0.5, 0.99, top_letter, ha="center", va="top", **style)


def _save(fig, output):
    if output is not None:
        from jmed import _atomic

        # the format follows the target's extension (the temporary file has the same name)
        with _atomic.atomic_path(output) as tmp:
            fig.savefig(os.fspath(tmp), dpi=fig.dpi)
    return fig


def _as_subject(data: Subject | Image) -> Subject:
    if isinstance(data, Subject):
        return data
    if isinstance(data, Image):
        return Subject(image=data)
    raise TypeError(f"expected a jmed.Subject or jmed.Image, got {type(data).__name__}")


def _rows(subject: Subject, images, overlay):
    intensity = subject.names_of_kind("intensity") if images is None else list(images)
    for name in intensity:
        subject[name]  # raises a KeyError naming the available images
    if overlay is None:
        overlays = subject.names_of_kind("label")
    elif overlay is False:
        overlays = []
    else:
        overlays = [overlay] if isinstance(overlay, str) else list(overlay)
    if len(overlays) > 1:
        raise ValueError(f"overlay at most one label map, got {overlays}")
    if not intensity:  # only label maps: show them as images
        intensity, overlays = overlays, []
    return intensity, (overlays[0] if overlays else None)


def plot_subject(
    subject: Subject | Image,
    *,
    point: ArrayLike | None = None,
    images: Sequence[str] | None = None,
    overlay: str | bool | None = None,
    views: Sequence[str] | None = None,
    channel: int = 0,
    radiological: bool = False,
    vmin: float | None = None,
    vmax: float | None = None,
    alpha: float = 0.4,
    title: str | None = None,
    figsize: tuple[float, float] | None = None,
    output: str | os.PathLike | None = None,
):
    """Orthogonal slices through ``point`` of every intensity image, labels overlaid.

    Args:
        subject: a ``Subject`` or a single ``Image``.
        point: world coordinates (mm) the slices go through; default: the image centre.
        images: names of the images to show, one row each (default: all intensity images,
            or the label maps if there are none).
        overlay: name of the label map drawn over every row (default: the subject's only
            label map, if any); ``False`` for none.
        views: any of ``"sagittal"``, ``"coronal"``, ``"axial"``, one column each
            (default: all three; for 2D images, the view of their plane only).
        channel: channel of multi-channel images to show.
        radiological: mirror coronal/axial views (see the module docstring).
        vmin, vmax: intensity window (default: 0.5th and 99.5th percentiles, per image).
        alpha: opacity of the label overlay.
        title: figure title.
        figsize: inches (default: 3 per panel).
        output: file to save the figure to (format from the extension).

    Returns:
        The ``matplotlib.figure.Figure`` (one axes per panel, rows x views).

    Examples:
        >>> import jmed
        >>> fig = plot_subject(jmed.datasets.phantom(0, shape=(32, 32, 32)))
        >>> len(fig.axes)
        3
    """
    subject = _as_subject(subject)
    rows, overlay_name = _rows(subject, images, overlay)
    if views is None:
        views = list(VIEWS)
        ras_shape = _ras(subject[rows[0]])[0].shape[:3] if rows else ()
        if 1 in ras_shape:  # a 2D image: only views whose plane has more than one voxel each way
            views = [
                v for v, axes in VIEWS.items() if ras_shape[axes[1]] > 1 and ras_shape[axes[2]] > 1
            ] or views
    views = list(views)
    for view in views:
        if view not in VIEWS:
            raise ValueError(f"views must be among {tuple(VIEWS)}, got {view!r}")
    labels = None
    if overlay_name is not None:
        labels, _ = _ras(subject[overlay_name])
        labels = labels[..., 0]
    fig = _figure(figsize or (3 * len(views), 3 * len(rows)))
    axes = fig.subplots(len(rows), len(views), squeeze=False)
    for r, name in enumerate(rows):
        data, affine = _ras(subject[name])
        if not 0 <= channel < data.shape[-1]:
            raise ValueError(f"channel must be in [0, {data.shape[-1]}) for image {name!r}, got {channel}")
        data = data[..., channel]
        voxel = _voxel_of(point, affine, data.shape)
        is_label = subject[name].is_label
        window = (0.0, max(float(data.max()), 1.0)) if is_label else _window(data, vmin, vmax)
        for c, view in enumerate(views):
            _draw(
                axes[r, c],
                data,
                affine,
                voxel,
                view,
                labels=labels if labels is not None and labels.shape == data.shape else None,
                window=window,
                cmap="nipy_spectral" if is_label else "gray",
                alpha=alpha,
                radiological=radiological,
            )
            axes[r, c].set_title(f"{name} {view}", fontsize=9)
    if title:
        fig.suptitle(title)
    return _save(fig, output)


def plot_image(image: Image, *, label: Image | None = None, **kwargs: Any):
    """``plot_subject`` for a single ``Image``, optionally with a label map overlaid.

    Other keyword arguments are those of ``plot_subject``.
    """
    if label is None:
        return plot_subject(Subject(image=image), **kwargs)
    if not isinstance(label, Image):
        raise TypeError(f"label must be a jmed.Image, got {type(label).__name__}")
    return plot_subject(Subject(image=image, label=label.replace(kind="label")), overlay="label", **kwargs)


def _items(batch) -> list[Subject]:
    if isinstance(batch, (list, tuple)):
        return [_as_subject(b) for b in batch]
    subject = _as_subject(batch)
    first = next(iter(subject.values()))
    if len(first.shape) == 5:
        return unstack(subject)
    if len(first.shape) == 4:
        return [subject]
    raise ValueError(f"expected a batch with data (b, x, y, z, c), got shape {first.shape}")


def plot_batch(
    batch: Subject | Image | Sequence[Subject | Image],
    *,
    image: str | None = None,
    overlay: str | bool | None = None,
    view: str = "axial",
    max_items: int = 32,
    ncols: int | None = None,
    channel: int = 0,
    radiological: bool = False,
    vmin: float | None = None,
    vmax: float | None = None,
    alpha: float = 0.4,
    title: str | None = None,
    figsize: tuple[float, float] | None = None,
    output: str | os.PathLike | None = None,
):
    """A grid with the central ``view`` slice of each item of a batch (e.g. patches).

    Other arguments are as in ``plot_subject``; one intensity window is shared by all panels.

    Args:
        batch: a stacked ``Subject``/``Image`` (leading batch axis, as ``jmed.stack``
            makes) or a list of them.
        image: intensity image to show (default: the first intensity image).
        overlay: label map to overlay (default: the only label map, if any; ``False``: none).
        view: ``"sagittal"``, ``"coronal"`` or ``"axial"``.
        max_items: show at most this many items.
        ncols: grid columns (default: about square).

    Returns:
        The figure; its first ``min(len(batch), max_items)`` axes are the panels.
    """
    if view not in VIEWS:
        raise ValueError(f"view must be one of {tuple(VIEWS)}, got {view!r}")
    items = _items(batch)[:max_items]
    if not items:
        raise ValueError("batch is empty")
    names, overlay_name = _rows(items[0], None if image is None else [image], overlay)
    name = names[0]
    volumes = [_ras(item[name]) for item in items]
    datas = [v[0][..., channel] for v in volumes]
    window = _window(np.concatenate([d.ravel() for d in datas]), vmin, vmax)
    if items[0][name].is_label:
        window = (0.0, max(max(float(d.max()) for d in datas), 1.0))
    n = len(items)
    ncols = ncols or int(np.ceil(np.sqrt(n)))
    nrows = int(np.ceil(n / ncols))
    fig = _figure(figsize or (2.2 * ncols, 2.2 * nrows))
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    max_label = None
    if overlay_name is not None:
        max_label = max(int(np.max(np.asarray(item[overlay_name].data))) for item in items)
    for i, (item, data, (_, affine)) in enumerate(zip(items, datas, volumes)):
        labels = _ras(item[overlay_name])[0][..., 0] if overlay_name is not None else None
        _draw(
            axes[i],
            data,
            affine,
            _voxel_of(None, affine, data.shape),
            view,
            labels=labels,
            window=window,
            cmap="nipy_spectral" if item[name].is_label else "gray",
            alpha=alpha,
            radiological=radiological,
            max_label=max_label,
            letters=False,
        )
        axes[i].set_title(str(i), fontsize=8)
    for ax in axes[n:]:
        fig.delaxes(ax)
    if title:
        fig.suptitle(title)
    return _save(fig, output)


def plot_transform(
    key,
    transform,
    subject: Subject | Image,
    *,
    num_samples: int = 3,
    image: str | None = None,
    overlay: str | bool | None = None,
    views: Sequence[str] = ("sagittal", "coronal", "axial"),
    radiological: bool = False,
    title: str | None = None,
    figsize: tuple[float, float] | None = None,
    output: str | os.PathLike | None = None,
):
    """Before/after view of a transform, for visual QC of augmentation.

    The first row shows ``subject``; each further row shows ``transform(k, subject)`` for
    one of ``num_samples`` keys split from ``key`` (a deterministic transform is shown
    once). Slices go through each row's own image centre; every row uses the original
    image's intensity window, so intensity changes are visible. Other arguments are as in
    ``plot_subject``.

    Args:
        key: ``jax.random`` key (``None`` for deterministic transforms).
        transform: any jmed transform ``transform(key, subject) -> subject``.
        subject: a ``Subject`` or an ``Image``.
        num_samples: number of random draws to show.
        image, overlay: which intensity image to show and which label map to overlay.

    Returns:
        The figure, ``(1 + num_samples) x len(views)`` panels.
    """
    subject = _as_subject(subject)
    if getattr(transform, "is_random", True) and key is not None:
        keys = list(jax.random.split(key, num_samples))
    else:
        keys = [key]
    outputs = [subject] + [_as_subject(transform(k, subject)) for k in keys]
    names, overlay_name = _rows(subject, None if image is None else [image], overlay)
    name = names[0]
    base, _ = _ras(subject[name])
    window = _window(base[..., 0], None, None)
    views = list(views)
    fig = _figure(figsize or (3 * len(views), 3 * len(outputs)))
    axes = fig.subplots(len(outputs), len(views), squeeze=False)
    for r, out in enumerate(outputs):
        data, affine = _ras(out[name])
        labels = _ras(out[overlay_name])[0][..., 0] if overlay_name is not None else None
        voxel = _voxel_of(None, affine, data.shape)
        for c, view in enumerate(views):
            _draw(
                axes[r, c],
                data[..., 0],
                affine,
                voxel,
                view,
                labels=labels,
                window=window,
                radiological=radiological,
            )
            axes[r, c].set_title(("original" if r == 0 else f"sample {r}") + f" {view}", fontsize=9)
    if title:
        fig.suptitle(title)
    return _save(fig, output)


# --- notebook display ---------------------------------------------------------------------


def to_png(fig, *, dpi: float | None = None) -> bytes:
    """The figure as PNG bytes (``dpi``: the figure's own by default)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi or fig.dpi)
    return buffer.getvalue()


def _geometry(image: Image) -> dict[str, str]:
    """Header values of ``image`` as text (never reads lazily loaded voxels)."""
    row = {"kind": image.kind, "shape": str(tuple(image.shape)), "dtype": str(image.dtype)}
    affine = image.affine
    row["spacing (mm)"] = row["orientation"] = row["origin (mm)"] = "?"
    if not is_traced(affine) and np.shape(affine) == (4, 4):
        affine = np.asarray(affine, float)
        try:
            row["spacing (mm)"] = str(tuple((np.round(affine_lib.spacing(affine), 3) + 0.0).tolist()))
            row["orientation"] = affine_lib.orientation(affine)
            row["origin (mm)"] = str(tuple((np.round(affine[:3, 3], 2) + 0.0).tolist()))
        except ValueError:
            pass
    elif np.ndim(affine) > 2:
        row["spacing (mm)"] = row["orientation"] = row["origin (mm)"] = "(batch)"
    return row


def _drawable(subject: Subject) -> str | None:
    """Why ``subject`` cannot be drawn (None when it can)."""
    for name, image in subject.items():
        if len(image.shape) != 4:
            return f"{name!r} is a batch of shape {tuple(image.shape)}"
        if image.is_loaded and is_traced(image.data):
            return f"{name!r} holds traced values"
        if is_traced(image.affine):
            return f"{name!r} has a traced affine"
    return None


def html_summary(data: Subject | Image, *, slices: bool = True, dpi: float = 72) -> str:
    """HTML describing an image or subject, as notebooks display them.

    A table with each image's kind, shape, dtype, spacing, orientation and origin, the
    subject's metadata and history (``format_history``), then, with ``slices``,
    orthogonal slices of every image (``plot_subject``) as an embedded PNG. Drawing
    reads the voxels of a lazily loaded image into a copy (the image itself stays
    unread); batches, traced values, or a missing matplotlib give the table alone, with
    a note saying why.

    Args:
        data: a ``Subject`` or an ``Image``.
        slices: draw the slices.
        dpi: resolution of the PNG.
    """
    subject = _as_subject(data)
    rows = [(name if isinstance(data, Subject) else "", _geometry(image)) for name, image in subject.items()]
    columns = list(rows[0][1])
    head = "".join(
        f"<th>{html.escape(c)}</th>" for c in (["name"] if isinstance(data, Subject) else []) + columns
    )
    body = ""
    for name, row in rows:
        cells = ([name] if isinstance(data, Subject) else []) + [row[c] for c in columns]
        body += "<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in cells) + "</tr>"
    title = type(data).__name__
    parts = [f'<div class="jmed-repr"><strong>{html.escape(title)}</strong>']
    parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
    if isinstance(data, Subject):
        if data.metadata:
            metadata = ", ".join(f"{k}={v!r}" for k, v in data.metadata.items())
            parts.append(f"<p>metadata: {html.escape(metadata)}</p>")
        if data.history:
            parts.append(f"<p>history:</p><pre>{html.escape(data.history_summary())}</pre>")
    if slices:
        reason = _drawable(subject)
        if reason is None:
            try:
                fig = plot_subject(subject.load())
                png = base64.b64encode(to_png(fig, dpi=dpi)).decode("ascii")
                parts.append(f'<img src="data:image/png;base64,{png}" alt="orthogonal slices"/>')
            except ImportError:
                reason = "matplotlib is not installed"
            except (TypeError, ValueError) as err:
                reason = str(err)
        if reason is not None:
            parts.append(f"<p><em>slices not shown: {html.escape(reason)}</em></p>")
    parts.append("</div>")
    return "".join(parts)
