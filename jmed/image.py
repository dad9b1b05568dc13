"""Data model: ``Image`` and ``Subject`` pytrees.

An ``Image`` holds ``data`` with layout ``(x, y, z, c)`` (channels last) and a 4x4
``affine`` (voxel index -> world mm, RAS+). Its ``kind`` (``"intensity"`` or ``"label"``)
is static pytree metadata: it decides interpolation and which transforms apply, and it
never becomes a traced value.

A ``Subject`` maps names to ``Image`` s, may carry metadata, and records the history of
transforms applied to it. Both are pytrees, so they pass through ``jax.jit``,
``jax.vmap`` and ``jax.tree.map``. A batch is the same pytree with a leading axis on every
leaf (``data`` ``(b, x, y, z, c)``, ``affine`` ``(b, 4, 4)``).

Both are registered for ``jax.export`` serialization (as ``"jmed.Image"`` and
``"jmed.Subject"``), so a function of them exports, serialises and reloads in another
process (see "Ahead-of-time compiled augmentation" in the docs). A ``Subject``'s static
metadata travels as it is; the transforms of its history travel as their ``repr`` (the
same in every process): a reloaded history holds stand-ins that print and compare like
the original transforms but cannot be applied, replayed or inverted.
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import numpy as np
from jax.typing import ArrayLike

from jmed import _checks
from jmed import affine as affine_lib
from jmed import compilation as _compilation  # noqa: F401  (slow compilations are logged from the first image on)

__all__ = [
    "AFFINE_TOLERANCE",
    "INTENSITY",
    "KINDS",
    "LABEL",
    "Image",
    "LabelMap",
    "ScalarImage",
    "Subject",
    "stack",
    "unstack",
]

INTENSITY = "intensity"
LABEL = "label"
KINDS = (INTENSITY, LABEL)

#: Default absolute tolerance (mm, per affine entry) under which two affines count as the
#: same space. Headers written by different tools differ by float32 rounding (~1e-5 mm);
#: 1e-3 mm is far below any voxel size yet above that noise.
AFFINE_TOLERANCE = 1e-3


def _is_concrete(x: Any) -> bool:
    return not isinstance(x, jax.core.Tracer)


# XLA:CPU uses a host buffer in place when it is C-contiguous, 64-byte aligned and of the
# dtype it computes with; any other numpy array is copied (and cast) on every call to a
# jitted function, which for a Fortran-ordered MNI-size volume costs more than most
# transforms themselves
_ALIGNMENT = 64
# what JAX narrows 64-bit numpy values to while jax_enable_x64 is off
_NARROWED = {
    np.dtype(np.float64): np.dtype(np.float32),
    np.dtype(np.int64): np.dtype(np.int32),
    np.dtype(np.uint64): np.dtype(np.uint32),
    np.dtype(np.complex128): np.dtype(np.complex64),
}


def _aligned_empty(shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """An uninitialised C-ordered array whose data start on a 64-byte boundary."""
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    raw = np.empty(nbytes + _ALIGNMENT, np.uint8)
    start = -raw.ctypes.data % _ALIGNMENT
    return raw[start : start + nbytes].view(dtype).reshape(shape)


def _host_layout(data: Any) -> Any:
    """Numpy ``data`` as JAX uses it without a copy: C order, 64-byte aligned, and 64-bit
    types narrowed to 32 bits as JAX does while ``jax_enable_x64`` is off (values rounded
    or wrapped exactly as JAX would on every call). One copy at most; an array already in
    that layout is returned as is. Anything but a numpy array (JAX arrays, tracers) is
    returned unchanged.
    """
    if not isinstance(data, np.ndarray) or data.dtype.kind not in "biufc":
        return data
    dtype = data.dtype
    if not jax.config.jax_enable_x64:
        dtype = _NARROWED.get(dtype, dtype)
    if dtype == data.dtype and data.flags.c_contiguous and data.ctypes.data % _ALIGNMENT == 0:
        return data
    out = _aligned_empty(data.shape, dtype)
    np.copyto(out, data, casting="unsafe")
    return out


def check_label_range(data: np.ndarray, dtype: Any, source: str = "label map") -> None:
    """Raise when integer label values do not fit ``dtype`` (they would wrap silently).

    ``source`` names the file or argument in the message.
    """
    dtype = np.dtype(dtype)
    if data.size == 0 or not np.issubdtype(data.dtype, np.integer) or data.dtype == dtype:
        return
    info = np.iinfo(dtype)
    low, high = data.min(), data.max()
    if low < info.min or high > info.max:
        bad = low if low < info.min else high
        raise ValueError(
            f"{source}: label value {int(bad)} does not fit in {dtype.name} (the widest integer JAX "
            f"uses without jax_enable_x64; allowed {info.min}..{info.max}); renumber the labels "
            "(e.g. with numpy.unique(..., return_inverse=True)) or enable x64"
        )


class _LazyData:
    """Voxel data read on use; the header (shape, dtype) is known without reading.

    ``load()`` reads the whole array once and keeps it in this holder, so every ``Image``
    sharing the holder sees the same value and no ``Image`` changes when it is read.
    ``read(start, stop)`` reads the box ``[start, stop)`` (inside the volume) through
    ``region`` when the source can read regions (chunked stores, memory-mapped files),
    without keeping anything; otherwise it slices the loaded array. ``source`` is the
    opened store or file the data come from (for pyramid levels and chunk indexes).
    """

    def __init__(
        self,
        shape: tuple[int, ...],
        dtype: np.dtype,
        load: Callable[[], Any],
        *,
        region: Callable[[tuple[int, ...], tuple[int, ...]], np.ndarray] | None = None,
        source: Any = None,
    ):
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)
        self._load = load
        self._region = region
        self.source = source
        self._array = None
        self._lock = threading.Lock()

    @property
    def loaded(self) -> bool:
        """True once ``load`` has read the whole array."""
        return self._array is not None

    @property
    def reads_regions(self) -> bool:
        """True when a region is read without reading the whole array."""
        return self._region is not None

    def load(self) -> Any:
        """The whole array, read on the first call and kept."""
        if self._array is None:
            with self._lock:
                if self._array is None:
                    self._array = self._load()
        return self._array

    def read_all(self) -> Any:
        """The whole array, without keeping it here (the kept one if already loaded)."""
        return self._array if self._array is not None else self._load()

    def read(self, start: tuple[int, ...], stop: tuple[int, ...]) -> np.ndarray:
        """Voxels ``[start, stop)`` of the three spatial axes (within the volume), all channels."""
        if self._array is None and self._region is not None:
            return np.asarray(self._region(tuple(start), tuple(stop)))
        index = tuple(slice(a, b) for a, b in zip(start, stop))
        return np.asarray(self.load()[index])

    def __getstate__(self) -> dict:
        state = {name: value for name, value in self.__dict__.items() if name != "_lock"}
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()


def _read_box(
    read: Callable[[tuple[int, ...], tuple[int, ...]], np.ndarray],
    shape: tuple[int, ...],
    dtype: np.dtype,
    start: tuple[int, int, int],
    size: tuple[int, int, int],
    fill: float,
) -> np.ndarray:
    """The box ``[start, start + size)`` of a ``shape`` ``(x, y, z, c)`` volume, reading only
    its part inside the volume through ``read(lo, hi)`` and filling the rest with ``fill``."""
    spatial = shape[:3]
    lo = tuple(min(max(s, 0), n) for s, n in zip(start, spatial))
    hi = tuple(min(max(s + z, 0), n) for s, z, n in zip(start, size, spatial))
    inside = all(b > a for a, b in zip(lo, hi))
    if inside and lo == tuple(start) and tuple(b - a for a, b in zip(lo, hi)) == tuple(size):
        return np.ascontiguousarray(read(lo, hi))
    out = np.full((*size, shape[3]), fill, dtype=dtype)
    if inside:
        part = read(lo, hi)
        where = tuple(slice(a - s, b - s) for a, b, s in zip(lo, hi, start))
        out[where] = part
    return out


@jax.tree_util.register_pytree_node_class
class Image:
    """A 3D (multi-channel) image with its physical geometry.

    Args:
        data: array of shape ``(x, y, z, c)``; use ``c = 1`` for a single channel and
            ``z = 1`` for a 2D image.
        affine: 4x4 voxel-to-world matrix (mm, RAS+). Defaults to the identity (1 mm
            voxels, origin at 0).
        kind: ``"intensity"`` or ``"label"``.
        extent: optional number of valid voxels per spatial axis, ``(3,)`` int32 (may be
            a traced value). Voxels at indices ``>= extent`` are padding that
            padding-aware transforms and samplers ignore: a volume padded to a shared
            *bucket* shape gives the same result there as the unpadded volume, with one
            compiled program for every volume of that bucket (see ``jmed.buckets``).
            ``None`` (the default): every voxel is valid.

    Numpy ``data`` is stored in the layout that jitted functions use without copying it:
    C order, 64-byte aligned, and, while ``jax_enable_x64`` is off, 64-bit types narrowed
    to 32 bits as JAX itself narrows them (``float64`` rounded to ``float32``, ``int64``
    and ``uint64`` wrapped to ``int32`` and ``uint32``). A Fortran-ordered array (what
    nibabel's ``get_fdata()`` and ``dataobj`` give) or a strided view is copied once
    here instead of on every transform call; an array already in that layout is kept,
    not copied. Other dtypes are kept (``uint8`` stays ``uint8``; ``jmed.load`` returns
    intensities as ``float32``). JAX arrays and traced values are stored as given.

    Raises:
        ValueError: wrong data rank, unknown kind, or a bad affine (wrong shape,
            non-finite, singular), or an extent that is not 3 values within the shape.
    """

    __slots__ = ("_data", "affine", "extent", "kind")

    def __init__(
        self,
        data: ArrayLike,
        affine: ArrayLike | None = None,
        *,
        kind: str = INTENSITY,
        extent: ArrayLike | None = None,
    ):
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if not isinstance(data, _LazyData):
            if not hasattr(data, "ndim"):
                data = np.asarray(data)
            if data.ndim != 4:
                raise ValueError(
                    f"data must have 4 dimensions (x, y, z, c), got shape {tuple(data.shape)}; "
                    "use ScalarImage/LabelMap to add a channel axis to 3D data"
                )
            if kind == LABEL and isinstance(data, np.ndarray):
                if data.dtype.kind in "fc" and not np.isfinite(data).all():
                    raise ValueError("label map data has non-finite values (NaN or inf); labels are numbers")
                if not jax.config.jax_enable_x64:
                    check_label_range(data, _NARROWED.get(data.dtype, data.dtype), "label map data")
            data = _host_layout(data)
        if affine is None:
            affine = np.eye(4)
        elif _is_concrete(affine):
            affine = affine_lib.check_affine(affine)
        elif tuple(affine.shape) != (4, 4):
            raise ValueError(f"affine must have shape (4, 4), got {tuple(affine.shape)}")
        self._data = data
        self.affine = affine
        self.extent = _check_extent(extent, tuple(data.shape[-4:-1]))
        self.kind = kind

    # -- pytree ------------------------------------------------------------------------
    def tree_flatten(self):
        return (self.data, self.affine, self.extent), self.kind

    @classmethod
    def tree_unflatten(cls, kind, children):
        obj = object.__new__(cls)
        obj._data, obj.affine = children[0], children[1]
        obj.extent = children[2] if len(children) > 2 else None
        obj.kind = kind
        return obj

    @classmethod
    def from_2d(cls, data: ArrayLike, affine: ArrayLike | None = None, *, kind: str = INTENSITY) -> Image:
        """A 2D image from ``(H, W)`` or ``(H, W, C)`` data (channels last), stored as
        ``(H, W, 1, C)``: one slice, which spatial transforms treat as TorchIO does 2D
        images (no out-of-plane rotation, scaling or displacement).

        Raises:
            ValueError: data that are not 2D or 3D.
        """
        if not hasattr(data, "ndim"):
            data = np.asarray(data)
        if data.ndim == 2:
            data = data[:, :, None, None]
        elif data.ndim == 3:
            data = data[:, :, None, :]
        else:
            raise ValueError(f"from_2d takes (H, W) or (H, W, C) data, got shape {tuple(data.shape)}")
        return cls(data, affine, kind=kind)

    @property
    def is_2d(self) -> bool:
        """One voxel along the third spatial axis (a single slice)."""
        return self.spatial_shape[2] == 1

    # -- data --------------------------------------------------------------------------
    @property
    def data(self):
        """Voxel array ``(x, y, z, c)``.

        A lazily loaded image reads its voxels on the first access and keeps them in its
        lazy holder (shared by the images made from it with ``replace``); the image itself
        does not change, so reading its data never changes its value or its pytree.
        """
        if isinstance(self._data, _LazyData):
            return self._data.load()
        return self._data

    @property
    def is_loaded(self) -> bool:
        """False while a lazily loaded image has not read all its voxels yet (reading a
        region with ``read_region`` does not load them)."""
        return not isinstance(self._data, _LazyData) or self._data.loaded

    def read_region(self, start: Any, size: Any, *, fill: float = 0) -> np.ndarray:
        """The voxels of one box, as a numpy array ``(sx, sy, sz, c)``.

        A lazily loaded image from a chunked store (NIfTI-Zarr, OME-Zarr, zarr) reads only
        the chunks the box touches, and one from an uncompressed memory-mapped file
        (``.nii``, ``.mgh``, ``.img``) only the bytes it needs; neither loads the whole
        image (``is_loaded`` stays False). Other lazy images (compressed files) are loaded
        whole first. Loaded images are sliced.

        Voxels of the box outside the volume are ``fill`` (the box may lie partly or
        wholly outside); the result always has the requested size.

        Args:
            start: first voxel of the box, an int (all axes) or 3 ints; may be negative.
            size: voxels per axis, an int or 3 ints, each at least 1.
            fill: value of the voxels outside the volume.

        Returns:
            numpy array of shape ``(*size, channels)`` and the image's dtype.

        Raises:
            ValueError: ``start`` or ``size`` not 3 integers, a size below 1.
            TypeError: the data are traced (inside ``jit``): slice them instead.
        """
        start = _checks.int_triple(start, "start", minimum=-(2**62))
        size = _checks.int_triple(size, "size", minimum=1)
        data = self._data
        if isinstance(data, _LazyData):
            return _read_box(data.read, data.shape, data.dtype, start, size, fill)
        if not _is_concrete(data):
            raise TypeError("read_region() needs concrete data; inside jit slice image.data instead")
        shape = tuple(int(s) for s in data.shape)
        if len(shape) != 4:
            raise ValueError(f"read_region() reads one image (x, y, z, c), got data of shape {shape}")

        def read(lo, hi):
            return np.asarray(data[tuple(slice(a, b) for a, b in zip(lo, hi))])

        return _read_box(read, shape, np.dtype(data.dtype), start, size, fill)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self._data.shape)

    @property
    def spatial_shape(self) -> tuple[int, int, int]:
        return tuple(self._data.shape[-4:-1])

    @property
    def valid_shape(self) -> Any:
        """Valid voxels per spatial axis: ``extent`` if set, else ``spatial_shape``."""
        return self.spatial_shape if self.extent is None else self.extent

    @property
    def num_channels(self) -> int:
        return int(self._data.shape[-1])

    @property
    def dtype(self):
        return self._data.dtype

    @property
    def is_label(self) -> bool:
        return self.kind == LABEL

    # -- geometry ----------------------------------------------------------------------
    @property
    def spacing(self):
        """Voxel size in mm per data axis."""
        return affine_lib.spacing(self.affine)

    @property
    def origin(self):
        """World position (mm) of voxel (0, 0, 0)."""
        return affine_lib.origin(self.affine)

    @property
    def direction(self):
        return affine_lib.direction(self.affine)

    @property
    def orientation(self) -> str:
        """Orientation code (``'RAS'``, ``'LPS'``, ...) as ``nibabel.aff2axcodes``."""
        return affine_lib.orientation(self.affine)

    # -- helpers -----------------------------------------------------------------------
    def replace(self, **changes) -> Image:
        """A copy with ``data``, ``affine``, ``kind`` and/or ``extent`` replaced (no validation)."""
        obj = object.__new__(type(self))
        obj._data = changes.pop("data", self._data)
        obj.affine = changes.pop("affine", self.affine)
        obj.extent = changes.pop("extent", self.extent)
        obj.kind = changes.pop("kind", self.kind)
        if changes:
            raise TypeError(f"replace() got unexpected fields {sorted(changes)}")
        return obj

    def numpy(self) -> np.ndarray:
        return np.asarray(self.data)

    # -- TorchIO-style conveniences ----------------------------------------------------
    def load(self) -> Image:
        """A copy with the voxels read (TorchIO's ``load``); this image is left as it is.

        An image that is already loaded is returned as it is (images are values).
        """
        if self.is_loaded:
            return self
        # read without keeping the array in the holder this image shares with its copies
        return self.replace(data=self._data.read_all())

    def plot(self, **kwargs: Any):
        """Orthogonal slices of this image: ``jmed.plot.plot_image(self, **kwargs)``.

        Keyword arguments are those of ``jmed.plot.plot_image`` (``label=`` a label map
        to overlay, ``point=``, ``views=``, ``radiological=``, ``output=``...). Returns the
        matplotlib ``Figure`` (needs matplotlib).
        """
        from jmed import plot

        return plot.plot_image(self, **kwargs)

    def _repr_html_(self) -> str | None:
        # Jupyter's rich display: geometry as text and orthogonal slices as a PNG
        from jmed import plot

        return plot.html_summary(self)

    def __repr__(self) -> str:
        # header values only: a lazily loaded image is not read here
        geo = ""
        affine = self.affine
        if _is_concrete(affine) and getattr(affine, "shape", None) == (4, 4):
            try:
                spacing = np.round(np.asarray(self.spacing, float), 3).tolist()
                origin = (np.round(np.asarray(self.origin, float), 2) + 0.0).tolist()  # no -0.0
                geo = f", spacing={tuple(spacing)}, orientation={self.orientation}, origin={tuple(origin)}"
            except ValueError:
                pass
        shape = getattr(self._data, "shape", None)
        dtype = getattr(self._data, "dtype", None)
        extent = ""
        if self.extent is not None and _is_concrete(self.extent):
            extent = f", extent={tuple(int(v) for v in np.asarray(self.extent))}"
        lazy = "" if self.is_loaded else ", loaded=False"
        return f"{type(self).__name__}(kind={self.kind!r}, shape={shape}, dtype={dtype}{extent}{geo}{lazy})"


def _check_extent(extent: Any, spatial_shape: tuple[int, ...]) -> Any:
    if extent is None:
        return None
    if not _is_concrete(extent):
        if tuple(extent.shape) != (3,):
            raise ValueError(f"extent must have shape (3,), got {tuple(extent.shape)}")
        return extent
    values = np.asarray(extent)
    if (
        values.shape != (3,)
        or not np.issubdtype(values.dtype, np.integer)
        or np.any(values < 1)
        or np.any(values > np.asarray(spatial_shape))
    ):
        raise ValueError(
            f"extent must be 3 integers in [1, spatial shape {tuple(spatial_shape)}], got {extent!r}"
        )
    return values.astype(np.int32)


def _with_channel(data: ArrayLike, name: str) -> Any:
    if not hasattr(data, "ndim"):
        data = np.asarray(data)
    if data.ndim == 2:  # one 2D slice: (H, W) -> (H, W, 1, 1)
        return data[:, :, None, None]
    if data.ndim == 3:
        return data[..., None]
    if data.ndim != 4:
        raise ValueError(
            f"{name} data must have 2 (x, y), 3 (x, y, z) or 4 (x, y, z, c) dimensions, got shape "
            f"{tuple(data.shape)}; for 2D data with channels use Image.from_2d"
        )
    return data


def ScalarImage(data: ArrayLike, affine: ArrayLike | None = None) -> Image:
    """An intensity ``Image``; 3D data gets a channel axis and 2D ``(H, W)`` data becomes one
    slice ``(H, W, 1, 1)`` (numpy data laid out as ``Image`` describes: C order, aligned,
    ``float64`` as ``float32`` unless x64 is on). ``(H, W, C)`` data: ``Image.from_2d``."""
    return Image(_with_channel(data, "ScalarImage"), affine, kind=INTENSITY)


def LabelMap(data: ArrayLike, affine: ArrayLike | None = None) -> Image:
    """A label-map ``Image`` (integer labels); 3D data gets a channel axis and 2D ``(H, W)``
    data becomes one slice (numpy data laid out as ``Image`` describes: C order, aligned,
    integer values kept)."""
    return Image(_with_channel(data, "LabelMap"), affine, kind=LABEL)


def _is_static(value: Any) -> bool:
    return value is None or isinstance(value, (str, bytes, bool))


@jax.tree_util.register_pytree_node_class
class Subject(Mapping):
    """A mapping of names to ``Image`` s, itself a pytree.

    Args:
        images: a mapping of names to images, and/or images as keyword arguments.
        metadata: per-subject values (age, diagnosis, ...). Strings, booleans and
            ``None`` are static; numbers and arrays are pytree leaves (batched by ``vmap``).
        history: ``(transform, params)`` pairs recorded by transforms; see
            ``jmed.transforms.replay`` and ``jmed.transforms.invert``.

    Examples:
        >>> import numpy as np, jmed
        >>> s = jmed.Subject(t1=jmed.ScalarImage(np.zeros((4, 5, 6))),
        ...                  seg=jmed.LabelMap(np.zeros((4, 5, 6), np.uint8)))
        >>> sorted(s), s.spatial_shape
        (['seg', 't1'], (4, 5, 6))
    """

    __slots__ = ("_images", "metadata", "history")

    def __init__(
        self,
        images: Mapping[str, Image] | None = None,
        /,
        *,
        metadata: Mapping[str, Any] | None = None,
        history: tuple = (),
        **named_images: Image,
    ):
        merged = dict(images or {})
        for name in named_images:
            if name in merged:
                raise ValueError(f"image name {name!r} given twice")
        merged.update(named_images)
        if not merged:
            raise ValueError("a Subject needs at least one Image")
        for name, image in merged.items():
            if not isinstance(name, str):
                raise TypeError(f"image names must be strings, got {name!r}")
            if not isinstance(image, Image):
                raise TypeError(f"Subject image {name!r} must be a jmed.Image, got {type(image).__name__}")
        self._images = dict(sorted(merged.items()))
        self.metadata = dict(metadata or {})
        self.history = tuple(history)

    # -- mapping -----------------------------------------------------------------------
    def __getitem__(self, name: str) -> Image:
        try:
            return self._images[name]
        except KeyError:
            raise KeyError(f"no image named {name!r} in subject; images: {list(self._images)}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._images)

    def __len__(self) -> int:
        return len(self._images)

    def __getattr__(self, name: str) -> Image:
        # attribute access to images, like TorchIO (subject.t1)
        if name.startswith("_") or name in Subject.__slots__:
            raise AttributeError(name)
        try:
            return self._images[name]
        except KeyError:
            raise AttributeError(f"Subject has no image or attribute {name!r}") from None

    # -- pytree ------------------------------------------------------------------------
    def tree_flatten(self):
        names = tuple(self._images)
        meta_static = tuple((k, v) for k, v in self.metadata.items() if _is_static(v))
        meta_dynamic = {k: v for k, v in self.metadata.items() if not _is_static(v)}
        transforms = tuple(t for t, _ in self.history)
        params = tuple(p for _, p in self.history)
        children = (tuple(self._images.values()), meta_dynamic, params)
        return children, (names, meta_static, transforms)

    @classmethod
    def tree_unflatten(cls, aux, children):
        names, meta_static, transforms = aux
        images, meta_dynamic, params = children
        obj = object.__new__(cls)
        obj._images = dict(zip(names, images))
        obj.metadata = {**dict(meta_static), **meta_dynamic}
        obj.history = tuple(zip(transforms, params))
        return obj

    # -- helpers -----------------------------------------------------------------------
    @property
    def images(self) -> dict[str, Image]:
        return dict(self._images)

    def replace(self, images: Mapping[str, Image] | None = None, **fields) -> Subject:
        """A copy with some images replaced (others kept) and/or metadata/history."""
        obj = object.__new__(Subject)
        obj._images = dict(sorted({**self._images, **(images or {})}.items()))
        obj.metadata = dict(fields.pop("metadata", self.metadata))
        obj.history = tuple(fields.pop("history", self.history))
        if fields:
            raise TypeError(f"replace() got unexpected fields {sorted(fields)}")
        return obj

    def without_history(self) -> Subject:
        return self.replace(history=())

    def names_of_kind(self, kind: str) -> list[str]:
        return [n for n, im in self._images.items() if im.kind == kind]

    @property
    def spatial_shape(self) -> tuple[int, int, int]:
        """Spatial shape shared by all images (raises if they differ)."""
        shapes = {im.spatial_shape for im in self._images.values()}
        if len(shapes) > 1:
            detail = ", ".join(f"{n}: {im.spatial_shape}" for n, im in self._images.items())
            raise ValueError(f"images in subject have different spatial shapes ({detail})")
        return shapes.pop()

    @property
    def extent(self) -> Any:
        """Valid voxels per axis shared by the images (see ``Image``); ``None`` if unpadded."""
        for image in self._images.values():
            if image.extent is not None:
                return image.extent
        return None

    def check_consistent(self, tolerance: float = AFFINE_TOLERANCE) -> None:
        """Check that all images share spatial shape and (within ``tolerance``) affine.

        Affines are compared entry by entry with absolute tolerance ``tolerance`` (mm for
        the translation column, mm per voxel step for the 3x3 part). Traced affines
        (inside ``jit``) are not compared.

        Raises:
            ValueError: naming the two images that disagree and how.
        """
        items = list(self._images.items())
        first_name, first = items[0]
        for name, image in items[1:]:
            if image.spatial_shape != first.spatial_shape:
                raise ValueError(
                    f"images {first_name!r} and {name!r} have different spatial shapes: "
                    f"{first.spatial_shape} vs {image.spatial_shape}"
                )
            if _is_concrete(first.affine) and _is_concrete(image.affine):
                a, b = np.asarray(first.affine), np.asarray(image.affine)
                if a.shape == b.shape and not np.allclose(a, b, rtol=0, atol=tolerance):
                    diff = float(np.max(np.abs(a - b)))
                    raise ValueError(
                        f"images {first_name!r} and {name!r} have different affines "
                        f"(max difference {diff:.3g} > tolerance {tolerance:g}):\n{a}\nvs\n{b}"
                    )

    # -- TorchIO-style conveniences ----------------------------------------------------
    def load(self) -> Subject:
        """A copy with the voxels of every image read (TorchIO's ``load``).

        Subjects are values: this subject is left as it is (its lazily loaded images stay
        unread); the copy shares its metadata and history.
        """
        return self.replace({name: image.load() for name, image in self._images.items()})

    def add_image(self, image: Image, name: str) -> Subject:
        """A new subject with ``image`` added under ``name`` (replacing an image of that name).

        Subjects are values: unlike TorchIO's ``add_image`` this subject is not changed;
        use the returned one (``subject = subject.add_image(mask, "mask")``).

        Raises:
            TypeError: ``image`` is not a ``jmed.Image`` or ``name`` not a string.
        """
        if not isinstance(image, Image):
            raise TypeError(f"image must be a jmed.Image, got {type(image).__name__}")
        if not isinstance(name, str) or not name:
            raise TypeError(f"name must be a non-empty string, got {name!r}")
        return self.replace({name: image})

    def plot(self, **kwargs: Any):
        """Orthogonal slices of every intensity image with the label map overlaid:
        ``jmed.plot.plot_subject(self, **kwargs)``.

        Keyword arguments are those of ``jmed.plot.plot_subject`` (``images=``,
        ``overlay=``, ``point=``, ``views=``, ``radiological=``, ``output=``...). Returns
        the matplotlib ``Figure`` (needs matplotlib).
        """
        from jmed import plot

        return plot.plot_subject(self, **kwargs)

    def get_composed_history(self):
        """One deterministic transform that replays this subject's history with the same
        params (TorchIO's ``get_composed_history``): a
        ``jmed.transforms.history.ReplayHistory``.

        Applied to the subject the history was recorded on, it reproduces this subject;
        applied to another subject, it repeats the same augmentation.

        Raises:
            TypeError: a history restored from a serialized ``jax.export`` program (only
                descriptions of its transforms are kept).
            ValueError: a batch of subjects (its params hold one value per item): replay
                one item, ``jmed.unstack(batch)[i].get_composed_history()``.
        """
        from jmed.transforms.history import ReplayHistory

        batched = [name for name, image in self.items() if image.data.ndim > 4]
        if batched and self.history:
            raise ValueError(
                f"get_composed_history needs one subject, got a batch (image {batched[0]!r} has "
                f"shape {tuple(self[batched[0]].shape)}); use jmed.unstack(batch)[i].get_composed_history()"
            )
        return ReplayHistory(self.history)

    def apply_inverse_transform(self, *, warn: bool = True) -> Subject:
        """Undo the invertible steps of the history, last first: ``jmed.transforms.invert``.

        Non-invertible steps (intensity changes), also inside a ``Compose``, are skipped,
        with a warning unless ``warn=False``. Returns a new subject with an empty history.
        """
        from jmed.transforms.base import invert

        return invert(self, warn=warn)

    def history_summary(self) -> str:
        """The history as text, one line per transform with its sampled parameters in
        degrees and millimetres: ``jmed.transforms.history.format_history(self)``.
        ``subject.history`` itself stays data (``(transform, params)`` pairs)."""
        from jmed.transforms.history import format_history

        return format_history(self)

    def _repr_html_(self) -> str | None:
        # Jupyter's rich display: a table of the images' geometry and orthogonal slices
        from jmed import plot

        return plot.html_summary(self)

    def __repr__(self) -> str:
        inner = ", ".join(f"{n}={im!r}" for n, im in self._images.items())
        extra = f", metadata={self.metadata}" if self.metadata else ""
        if self.history:
            names = ", ".join(_transform_name(t) for t, _ in self.history)
            extra += f", history=[{names}]"
        return f"Subject({inner}{extra})"


def _transform_name(transform: Any) -> str:
    if isinstance(transform, _DescribedTransform):
        return transform.description.split("(", 1)[0]
    return type(transform).__name__


# --- jax.export serialization -----------------------------------------------------------


class _DescribedTransform:
    """A transform of a ``Subject``'s history after ``jax.export`` deserialization: only
    its ``repr`` is known. It prints as the original and compares equal to it (so an
    exported function accepts subjects with that history), but cannot be applied."""

    __slots__ = ("description",)

    def __init__(self, description: str):
        self.description = description

    def __repr__(self) -> str:
        return self.description

    def __eq__(self, other: object) -> bool:
        if isinstance(other, _DescribedTransform):
            return other.description == self.description
        return repr(other) == self.description

    def __hash__(self) -> int:
        return hash(self.description)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name == "description":  # copy, pickle; an unset slot
            raise AttributeError(name)
        raise AttributeError(
            f"{self.description} was restored from a serialized jax.export program, which keeps only "
            f"its description; it has no attribute {name!r} (rebuild the transform to apply, replay or "
            "invert it)"
        )


def _static_to_json(value: Any) -> Any:
    if isinstance(value, bytes):
        return {"bytes": value.hex()}
    return value  # str, bool or None


def _static_from_json(value: Any) -> Any:
    if isinstance(value, dict):
        return bytes.fromhex(value["bytes"])
    return value


def _serialize_subject_aux(aux: tuple) -> bytes:
    names, meta_static, transforms = aux
    return json.dumps(
        {
            "names": list(names),
            "metadata": [[k, _static_to_json(v)] for k, v in meta_static],
            "history": [repr(t) for t in transforms],
        }
    ).encode()


def _deserialize_subject_aux(data: bytes) -> tuple:
    aux = json.loads(data.decode())
    return (
        tuple(aux["names"]),
        tuple((k, _static_from_json(v)) for k, v in aux["metadata"]),
        tuple(_DescribedTransform(text) for text in aux["history"]),
    )


jax.export.register_pytree_node_serialization(
    Image,
    serialized_name="jmed.Image",
    serialize_auxdata=lambda kind: kind.encode(),
    deserialize_auxdata=lambda data: data.decode(),
)
jax.export.register_pytree_node_serialization(
    Subject,
    serialized_name="jmed.Subject",
    serialize_auxdata=_serialize_subject_aux,
    deserialize_auxdata=_deserialize_subject_aux,
)


def stack(items: list[Any]) -> Any:
    """Stack Images or Subjects of one structure into a batch (leading axis on every leaf).

    Raises ``ValueError`` if the items differ in structure (names, kinds) or shapes.
    """
    items = list(items)
    if not items:
        raise ValueError("stack() needs at least one item")
    structure = jax.tree.structure(items[0])
    for i, item in enumerate(items[1:], 1):
        if jax.tree.structure(item) != structure:
            raise ValueError(f"item {i} has a different structure from item 0; cannot stack")
    try:
        return jax.tree.map(lambda *leaves: jax.numpy.stack(leaves), *items)
    except (TypeError, ValueError) as err:
        raise ValueError(f"cannot stack items with different shapes: {err}") from err


def unstack(batch: Any) -> list[Any]:
    """Split a batch (as made by ``stack``) into a list of items."""
    leaves, structure = jax.tree.flatten(batch)
    n = leaves[0].shape[0]
    return [jax.tree.unflatten(structure, [leaf[i] for leaf in leaves]) for i in range(n)]
