"""Spatial preprocessing: reorient, resample, resize, crop and pad.

Every transform here updates the affine so that each output voxel keeps (or takes) its
world position: cropping and padding translate the origin, reorienting permutes and flips
the axes of the affine, resampling writes the affine of the new grid.

Two groups, by what decides the output shape:

* **Static shape** (jittable and vmappable): ``Crop``, ``Pad``, ``CropOrPad`` (also when
  centred on a mask: the offset is data-dependent, the shape is not), ``Resize``,
  ``EnsureShapeMultiple``, ``CopyAffine`` and ``Resample`` to a fixed grid (a reference
  ``Image``, a subject image or ``(spatial_shape, affine)``).
* **Shape from header or voxel values** (run them in the loader, before batching):
  ``ToCanonical``/``Reorient``, ``Resample`` to a spacing and ``CropForeground``. Called
  with traced values (under ``jit``/``vmap``) they raise ``TypeError`` saying so.

Crop, pad and crop-or-pad transforms are invertible: their params are a
``WindowParams`` (start voxel of the output box in the input, and the input shape), and
``inverse`` pads back with zeros what was cropped and crops what was padded.
"""

from __future__ import annotations

import json
import numbers
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from jmed import affine as affine_lib
from jmed import buckets
from jmed.image import LABEL, Image, Subject
from jmed.ops import crop_pad
from jmed.ops.filters import gaussian_blur
from jmed.ops.interpolation import resample as _resample
from jmed.transforms import params as _params
from jmed.transforms.base import Params, PRNGKey, Transform
from jmed.transforms.params import ImageNames

__all__ = [
    "CopyAffine",
    "Crop",
    "CropForeground",
    "CropOrPad",
    "EnsureShapeMultiple",
    "Pad",
    "Reorient",
    "Resample",
    "Resize",
    "ToCanonical",
    "WindowParams",
]

# a voxel-to-voxel matrix this close to the identity samples the input voxels themselves:
# 1e-9 is far below float32's resolution of voxel coordinates (6e-5 at 1000)
_SAME_GRID_ATOL = 1e-9

# tolerance of a voxel count computed from float32 header spacings (see _grid_for_spacing)
_SHAPE_RATIO_RTOL = 1e-5
_SHAPE_RATIO_ATOL = 1e-6

INTERPOLATIONS = {"nearest": 0, "linear": 1, "partial_volume": "partial_volume"}

# One compiled kernel per (input shape, output shape, order, padding): eager calls with
# concrete values reuse it.
_resample_jit = jax.jit(_resample, static_argnames=("output_shape", "order", "pad_mode"))


def _resample_eager(data, matrix, shape, order, pad_value):
    """``_resample_jit``, run on shape buckets when concrete values meet an active
    ``jmed.buckets.kernel_buckets`` context: the input is padded and marked with its
    extent, the output computed on a bucket and cropped on the host, so subjects of many
    shapes share a few compiled kernels (same values as on the exact shapes)."""
    in_shape = tuple(int(n) for n in data.shape[:3])
    buckets.note_kernel_shapes(in_shape, shape)
    if _params.is_traced(data) or _params.is_traced(matrix):
        return _resample_jit(data, matrix, output_shape=shape, order=order, pad_value=pad_value)
    in_bucket, out_bucket = buckets.kernel_bucket(in_shape), buckets.kernel_bucket(shape)
    if in_bucket is None or out_bucket is None:
        return _resample_jit(data, matrix, output_shape=shape, order=order, pad_value=pad_value)
    padded = buckets.pad_array(np.asarray(data), in_bucket, 0)
    out = _resample_jit(
        padded,
        matrix,
        output_shape=out_bucket,
        order=order,
        pad_value=pad_value,
        extent=np.asarray(in_shape, np.int32),
    )
    x, y, z = shape
    return np.asarray(out)[:x, :y, :z]


def _traced_solve(affine: Any, other: Any) -> jax.Array:
    # a closed-form inverse: LU pivoting has no sharding rule for a batch sharded over
    # an explicit mesh axis
    return jnp.matmul(affine_lib.invert(affine), jnp.asarray(other), precision=jax.lax.Precision.HIGHEST)


def _require_concrete(value: Any, transform: str, why: str, instead: str) -> None:
    if _params.is_traced(value):
        raise TypeError(
            f"{transform} needs concrete values, got a traced array (inside jit/vmap): {why}. "
            f"Run it in the loader before batching{instead}."
        )


def _as_bounds(value: Any, name: str) -> np.ndarray:
    """1, 3 or 6 non-negative ints -> (3, 2) ``(before, after)`` per axis."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        value = (value,)
    try:
        v = [int(x) for x in value if float(x) == int(x)]
        ok = len(v) == len(value) and len(v) in (1, 3, 6)
    except (TypeError, ValueError, OverflowError):
        ok = False
    if not ok:
        raise ValueError(f"{name} must be 1, 3 or 6 non-negative ints, got {value!r}")
    if min(v) < 0:
        raise ValueError(f"{name} must be non-negative, got {value!r}")
    if len(v) == 1:
        v = v * 6
    elif len(v) == 3:
        v = [x for x in v for _ in range(2)]
    return np.asarray(v, int).reshape(3, 2)


def _parse_padding_mode(mode: Any) -> tuple[str, float]:
    if isinstance(mode, numbers.Real) and not isinstance(mode, bool):
        return "constant", _params.finite_number(mode, "padding_mode")
    return crop_pad.check_pad_mode(mode, "padding_mode"), 0.0


def _interpolation(value: str, name: str) -> int:
    return INTERPOLATIONS[_params.check_choice(value, name, tuple(INTERPOLATIONS))]


# --- reorientation -----------------------------------------------------------------------


class Reorient(Transform):
    """Permute and flip the voxel axes to ``orientation`` (exact, no interpolation).

    Args:
        orientation: 3-letter code (``"RAS"``, ``"LPS"``, ...): letter ``i`` is the world
            direction data axis ``i`` increases towards.

    Needs a concrete affine (the permutation decides the output shape).
    """

    def __init__(self, orientation: str, *, include: ImageNames = None, exclude: ImageNames = None):
        super().__init__(include=include, exclude=exclude)
        affine_lib._parse_orientation(orientation, "orientation")
        self.orientation = orientation.upper()

    def apply_image(self, image: Image, params: Any) -> Image:
        _require_concrete(
            image.affine,
            type(self).__name__,
            "the axis permutation depends on the affine's values and decides the output shape",
            "",
        )
        data, affine = affine_lib.reorient(image.data, image.affine, self.orientation)
        return image.replace(data=data, affine=affine)


class ToCanonical(Reorient):
    """Reorient to RAS+ (closest canonical orientation), as ``nibabel.as_closest_canonical``."""

    def __init__(self, *, include: ImageNames = None, exclude: ImageNames = None):
        super().__init__("RAS", include=include, exclude=exclude)


# --- resampling --------------------------------------------------------------------------


def _grid_for_spacing(shape: Sequence[int], affine: np.ndarray, spacing: np.ndarray):
    """Grid with ``spacing`` covering the same extent, same direction and centre."""
    affine = np.asarray(affine, np.float64)
    old_spacing = affine_lib.spacing(affine)
    shape = np.asarray(shape)
    # floor keeps the new extent within the old one (no extrapolation at the borders); the
    # spacing read from a float32 header is off by a few parts in 10^7, so a ratio within
    # _SHAPE_RATIO_RTOL of the next integer is that integer (52 voxels stay 52, not 51)
    ratio = shape * old_spacing / spacing
    new_shape = np.floor(ratio + np.maximum(_SHAPE_RATIO_ATOL, _SHAPE_RATIO_RTOL * ratio)).astype(int)
    new_shape = np.maximum(np.where(shape == 1, 1, new_shape), 1)
    rotation = affine[:3, :3] / old_spacing
    centre = affine[:3, :3] @ ((shape - 1) / 2) + affine[:3, 3]
    out = np.eye(4)
    out[:3, :3] = rotation * spacing
    out[:3, 3] = centre - out[:3, :3] @ ((new_shape - 1) / 2)
    return tuple(int(n) for n in new_shape), out


def _antialias_sigmas(in_affine, out_affine):
    """Gaussian sigmas (input voxels) before downsampling, per input axis.

    Cardoso et al., MICCAI 2015: variance ``(k^2 - 1) / (2 sqrt(2 ln 2))^2`` where ``k`` is
    the downsampling factor (no smoothing where ``k <= 1``). ``k`` compares the output
    spacing along each input axis's direction: the length of one output voxel step
    projected on the input grid.
    """
    if _params.is_traced(in_affine) or _params.is_traced(out_affine):
        xp, matrix = jnp, _traced_solve(in_affine, out_affine)[:3, :3]
    else:
        xp, matrix = np, np.linalg.solve(np.asarray(in_affine), np.asarray(out_affine))[:3, :3]
    # input voxels covered per output voxel along each input axis
    k = xp.max(xp.abs(matrix), axis=1)
    variance = (k**2 - 1) / (2 * np.sqrt(2 * np.log(2))) ** 2
    return xp.sqrt(xp.maximum(variance, 0.0))


def _header_grid(path: str) -> tuple[tuple | None, Exception | None]:
    """``((spatial_shape, affine), None)`` from the header of the image file at ``path``
    (voxels are not read), or ``(None, error)`` when it cannot be read: a name that is
    also a file may still be meant as an image of the subject."""
    from jmed.io import load

    try:
        ref = load(path, lazy=True)
        return (ref.spatial_shape, np.asarray(ref.affine, np.float64)), None
    except (OSError, ValueError, TypeError) as err:
        return None, err


class Resample(Transform):
    """Resample images onto a new voxel grid (linear for intensities, nearest for labels).

    Args:
        target: where to resample to:

            * a positive number: isotropic spacing in mm;
            * 3 positive numbers: spacing per data axis in mm;
            * an ``Image``: its grid (spatial shape and affine);
            * a string: the name of an image of the subject, else a path to an image
              file whose header gives the grid (read once, when the transform is built:
              applying it reads no file);
            * ``(spatial_shape, affine)``: an explicit grid.

            With a spacing, the new grid keeps the direction and the centre of the field
            of view, and has ``floor(shape * old_spacing / spacing)`` voxels per axis (so
            it extends no further than the old one, as TorchIO).
        image_interpolation: ``"linear"`` or ``"nearest"`` for intensity images.
        label_interpolation: ``"nearest"``, ``"partial_volume"`` (most-voted label among
            the trilinear neighbours, see ``jmed.ops.interpolation``) or ``"linear"``
            (float partial volumes) for label maps.
        pad_value: value of output voxels outside the input's field of view.
        antialias: smooth intensity images with a Gaussian before downsampling, with the
            sigma of Cardoso et al. (MICCAI 2015) along each axis that is downsampled
            (as TorchIO's ``antialias``). Label maps are never smoothed.

    A spacing target needs concrete affines (the output shape follows from them): run it
    in the loader. Grid targets work under ``jit``, also with traced affines.
    """

    def __init__(
        self,
        target: Any = 1,
        image_interpolation: str = "linear",
        label_interpolation: str = "nearest",
        *,
        pad_value: float = 0.0,
        antialias: bool = False,
        include: ImageNames = None,
        exclude: ImageNames = None,
    ):
        super().__init__(include=include, exclude=exclude)
        self.image_order = _interpolation(image_interpolation, "image_interpolation")
        self.label_order = _interpolation(label_interpolation, "label_interpolation")
        self.antialias = bool(antialias)
        self.pad_value = _params.finite_number(pad_value, "pad_value")
        self.target = target
        self._spacing = None
        self._grid = None
        self._name = None
        self._file_grid = None
        self._file_error = None
        if isinstance(target, numbers.Real) and not isinstance(target, bool):
            self._spacing = np.full(3, float(target))
        elif isinstance(target, Image):
            # keep the grid only, not the reference's voxels
            self._grid = (target.spatial_shape, target.affine)
            self.target = self._grid
        elif isinstance(target, (str, os.PathLike)):
            self._name = os.fspath(target)
            if os.path.isfile(self._name):
                self._file_grid, self._file_error = _header_grid(self._name)
        elif isinstance(target, Sequence) and len(target) == 3:
            try:
                self._spacing = np.asarray([float(s) for s in target])
            except (TypeError, ValueError):
                raise ValueError(f"target as 3 spacings must be numbers, got {target!r}") from None
        elif isinstance(target, Sequence) and len(target) == 2:
            shape = _params.int_triple(target[0], "target spatial_shape")
            affine = target[1]
            if tuple(np.shape(affine)) != (4, 4):
                raise ValueError(f"target affine must have shape (4, 4), got {np.shape(affine)}")
            if not _params.is_traced(affine):
                affine = affine_lib.check_affine(affine, "target affine")
            self._grid = (shape, affine)
        else:
            raise ValueError(
                "target must be a spacing (a number or 3 numbers, mm), an Image, an image name, "
                f"a file path or (spatial_shape, affine), got {target!r}"
            )
        if self._spacing is not None and (
            not np.all(np.isfinite(self._spacing)) or np.any(self._spacing <= 0)
        ):
            raise ValueError(f"target spacing must be positive and finite, got {target!r}")

    def _target_grid(self, subject: Subject):
        if self._grid is not None:
            return self._grid
        if self._name is not None:
            if self._name in subject:
                ref = subject[self._name]
                return ref.spatial_shape, ref.affine
            if self._file_grid is not None:
                return self._file_grid
            if self._file_error is not None:
                error = self._file_error
                raise ValueError(
                    f"Resample target {self._name!r}: {type(error).__name__}: {error}"
                ) from error
            raise ValueError(
                f"target {self._name!r} is neither an image of the subject ({list(subject)}) "
                "nor a file that existed when the transform was built"
            )
        return None

    def apply(self, subject: Subject, params: Any) -> Subject:
        grid = self._target_grid(subject)
        out = {}
        for name in self.selected(subject):
            image = subject[name]
            if grid is None:
                _require_concrete(
                    image.affine,
                    "Resample to a spacing",
                    "the output shape depends on the affine's values",
                    ", or resample to a fixed grid under jit: "
                    "Resample((spatial_shape, affine)) or Resample(reference_image)",
                )
                shape, out_affine = _grid_for_spacing(image.spatial_shape, image.affine, self._spacing)
            else:
                shape, out_affine = grid
            _params.check_output_size(
                "Resample",
                shape,
                channels=image.shape[-1],
                itemsize=max(4, np.dtype(image.dtype).itemsize),
            )
            out[name] = self._resample_image(image, tuple(shape), out_affine)
        return subject.replace(out)

    def _resample_image(self, image: Image, shape, out_affine) -> Image:
        order = self.label_order if image.kind == LABEL else self.image_order
        if _params.is_traced(image.affine) or _params.is_traced(out_affine):
            matrix = _traced_solve(image.affine, out_affine)
        else:
            matrix = np.linalg.solve(np.asarray(image.affine, np.float64), np.asarray(out_affine, np.float64))
        data = image.data
        if (
            isinstance(matrix, np.ndarray)
            and shape == image.spatial_shape
            and np.allclose(matrix, np.eye(4), rtol=0, atol=_SAME_GRID_ATOL)
        ):
            # the same grid (up to the rounding of the solve): every output voxel samples
            # its input voxel, and the kernel would return the data unchanged (linear
            # output is floating point)
            data = jnp.asarray(data)
            if order != 0 and order != "partial_volume" and not jnp.issubdtype(data.dtype, jnp.floating):
                data = data.astype(jnp.float32)
            return image.replace(data=data, affine=out_affine)
        if self.antialias and image.kind != LABEL:
            sigmas = _antialias_sigmas(image.affine, out_affine)
            if _params.is_traced(sigmas) or np.any(sigmas > 0):
                data = gaussian_blur(data, sigmas, mode="nearest")
        data = _resample_eager(data, matrix, shape, order, self.pad_value)
        return image.replace(data=data, affine=out_affine)


class Resize(Transform):
    """Resample to ``target_shape`` voxels covering the same field of view.

    The outer edges of the first and last voxels stay in place: output voxel ``p`` samples
    input voxel ``(p + 0.5) * n_in / n_out - 0.5``, and the spacing scales by
    ``n_in / n_out``. Jittable (the output shape is static).

    Args:
        target_shape: an int or 3 ints.
        image_interpolation / label_interpolation: as ``Resample``.
    """

    def __init__(
        self,
        target_shape: int | Sequence[int],
        image_interpolation: str = "linear",
        label_interpolation: str = "nearest",
        *,
        include: ImageNames = None,
        exclude: ImageNames = None,
    ):
        super().__init__(include=include, exclude=exclude)
        self.target_shape = _params.int_triple(target_shape, "target_shape")
        _params.check_output_size("Resize", self.target_shape)
        self.image_order = _interpolation(image_interpolation, "image_interpolation")
        self.label_order = _interpolation(label_interpolation, "label_interpolation")

    def apply_image(self, image: Image, params: Any) -> Image:
        _params.check_output_size(
            "Resize",
            self.target_shape,
            channels=image.shape[-1],
            itemsize=max(4, np.dtype(image.dtype).itemsize),
        )
        scale = np.asarray(image.spatial_shape, float) / np.asarray(self.target_shape, float)
        matrix = np.eye(4)
        matrix[:3, :3] = np.diag(scale)
        matrix[:3, 3] = 0.5 * scale - 0.5
        order = self.label_order if image.kind == LABEL else self.image_order
        data = _resample_jit(image.data, matrix, output_shape=self.target_shape, order=order, pad_mode="edge")
        if _params.is_traced(image.affine):
            affine = jnp.matmul(image.affine, jnp.asarray(matrix), precision=jax.lax.Precision.HIGHEST)
        else:
            affine = np.asarray(image.affine) @ matrix
        return image.replace(data=data, affine=affine)


# --- crop and pad ------------------------------------------------------------------------


@jax.tree_util.register_pytree_node_class
class WindowParams:
    """Params of crop/pad transforms: output voxel 0 is input voxel ``start``.

    ``start`` (3 ints, negative where padded) is a pytree leaf; ``input_shape`` (the
    spatial shape before) and ``output_shape`` are static, so ``replay`` and ``inverse``
    know the shapes.
    """

    __slots__ = ("input_shape", "output_shape", "start")

    def __init__(self, start: ArrayLike, input_shape: Sequence[int], output_shape: Sequence[int]):
        # int32 eagerly as under jit (JAX's default integer), so both give the same params
        self.start = start.astype(jnp.int32) if _params.is_traced(start) else np.asarray(start, np.int32)
        self.input_shape = tuple(int(n) for n in input_shape)
        self.output_shape = tuple(int(n) for n in output_shape)

    def tree_flatten(self):
        return (self.start,), (self.input_shape, self.output_shape)

    @classmethod
    def tree_unflatten(cls, shapes, children):
        obj = object.__new__(cls)
        obj.start = children[0]
        obj.input_shape, obj.output_shape = shapes
        return obj

    def __repr__(self) -> str:
        return (
            f"WindowParams(start={self.start}, input_shape={self.input_shape}, "
            f"output_shape={self.output_shape})"
        )


# shapes as JSON: the params of a crop or pad in a history serialise with jax.export
jax.export.register_pytree_node_serialization(
    WindowParams,
    serialized_name="jmed.WindowParams",
    serialize_auxdata=lambda shapes: json.dumps(shapes).encode(),
    deserialize_auxdata=lambda data: tuple(tuple(shape) for shape in json.loads(data.decode())),
)


class _Window(Transform):
    """Extract a box of static shape at a start voxel (pads where it leaves the input)."""

    invertible = True

    def __init__(
        self, *, padding_mode: Any = "constant", include: ImageNames = None, exclude: ImageNames = None
    ):
        super().__init__(include=include, exclude=exclude)
        self.padding_mode = padding_mode
        self._mode, self._value = _parse_padding_mode(padding_mode)

    def output_shape(self, shape: tuple[int, int, int]) -> tuple[int, int, int]:
        raise NotImplementedError

    def window_start(self, subject: Subject, shape: tuple[int, int, int]) -> ArrayLike:
        raise NotImplementedError

    def sample(self, key: Any, subject: Subject) -> WindowParams:
        shape = _selected_shape(self, subject)
        size = self.output_shape(shape)
        return WindowParams(self.window_start(subject, shape), shape, size)

    def apply(self, subject: Subject, params: WindowParams) -> Subject:
        for n in self.selected(subject):
            _params.check_output_size(
                type(self).__name__,
                params.output_shape,
                channels=subject[n].shape[-1],
                itemsize=np.dtype(subject[n].dtype).itemsize,
            )
        return subject.replace(
            {
                n: _apply_window(subject[n], params.start, params.output_shape, self._mode, self._value)
                for n in self.selected(subject)
            }
        )

    def inverse(self, subject: Subject, params: WindowParams) -> Subject:
        start = -np.asarray(params.start) if not _params.is_traced(params.start) else -params.start
        return subject.replace(
            {
                n: _apply_window(subject[n], start, params.input_shape, "constant", 0.0)
                for n in self.selected(subject)
            }
        )


def _selected_shape(transform: Transform, subject: Subject) -> tuple[int, int, int]:
    shapes = {subject[n].spatial_shape for n in transform.selected(subject)}
    if len(shapes) > 1:
        raise ValueError(
            f"{type(transform).__name__} needs the selected images to share a spatial shape, "
            f"got {sorted(shapes)}"
        )
    return shapes.pop() if shapes else subject.spatial_shape


def _apply_window(image: Image, start: ArrayLike, size, mode: str, value: float) -> Image:
    if image.kind == LABEL and mode in ("constant", "mean", "minimum", "maximum"):
        # fill values and statistics are intensities: label maps get background
        mode, value = "constant", 0.0
    data = crop_pad.window(image.data, start, size, mode=mode, value=value)
    return image.replace(data=data, affine=affine_lib.translate_voxels(image.affine, start))


class Crop(_Window):
    """Remove voxels from the borders.

    Args:
        cropping: 1 int (all borders), 3 ints (both borders of each axis) or 6 ints
            ``(x0, x1, y0, y1, z0, z1)``, as TorchIO.

    Jittable. Inverse: ``Pad`` with zeros.
    """

    def __init__(
        self, cropping: int | Sequence[int], *, include: ImageNames = None, exclude: ImageNames = None
    ):
        super().__init__(include=include, exclude=exclude)
        self.cropping = _as_bounds(cropping, "cropping")

    def output_shape(self, shape: tuple[int, int, int]):
        out = tuple(int(n) for n in np.asarray(shape) - self.cropping.sum(1))
        if min(out) < 1:
            raise ValueError(f"cropping {self.cropping.ravel().tolist()} leaves nothing of shape {shape}")
        return out

    def window_start(self, subject: Subject, shape: tuple[int, int, int]):
        self.output_shape(shape)
        return self.cropping[:, 0].copy()


class Pad(_Window):
    """Add voxels at the borders.

    Args:
        padding: 1, 3 or 6 ints, as ``Crop``'s ``cropping``.
        padding_mode: a number (constant fill), ``"constant"`` (0), ``"edge"``,
            ``"reflect"``, ``"symmetric"``, ``"wrap"``, or ``"mean"``/``"minimum"``/
            ``"maximum"`` of the volume (per channel). Fill values and statistics are
            for intensity images: label maps are padded with 0 in those modes.

    Jittable. Inverse: ``Crop``.
    """

    def __init__(
        self,
        padding: int | Sequence[int],
        padding_mode: str | float = "constant",
        *,
        include: ImageNames = None,
        exclude: ImageNames = None,
    ):
        super().__init__(padding_mode=padding_mode, include=include, exclude=exclude)
        self.padding = _as_bounds(padding, "padding")

    def output_shape(self, shape: tuple[int, int, int]):
        return tuple(int(n) for n in np.asarray(shape) + self.padding.sum(1))

    def window_start(self, subject: Subject, shape: tuple[int, int, int]):
        return -self.padding[:, 0]


def _bounding_box(mask: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """First and last index along each axis of nonzero voxels of a (x, y, z, c) mask."""
    lo, hi = [], []
    any_voxel = None
    for axis in range(3):
        other = tuple(a for a in range(4) if a != axis)
        profile = jnp.any(mask, axis=other)
        n = profile.shape[0]
        lo.append(jnp.argmax(profile))
        hi.append(n - 1 - jnp.argmax(profile[::-1]))
        any_voxel = jnp.any(profile)
    return jnp.stack(lo), jnp.stack(hi), any_voxel


@jax.jit(static_argnums=(1, 2))
def _mask_window_start(mask, target_shape, centred):
    lo, hi, found = _bounding_box(mask != 0)
    start = (lo + hi + 1 - jnp.asarray(target_shape)) // 2
    return jnp.where(found, start, jnp.asarray(centred))


class CropOrPad(_Window):
    """Crop and/or pad to ``target_shape``, centred on the volume or on a mask.

    Args:
        target_shape: an int or 3 ints.
        mask_name: name of an image whose nonzero voxels' bounding box is centred in the
            output (its centre rounded down where it falls between voxels). If the mask
            is empty the volume centre is used.
        padding_mode: as ``Pad``.

    Without a mask, an odd difference crops (or pads) the extra voxel at the start, as
    TorchIO. Jittable in both cases (the output shape is static; the mask only moves the
    box, with ``lax.dynamic_slice``).

    Examples:
        >>> import numpy as np, jmed
        >>> image = jmed.ScalarImage(np.ones((10, 7, 4), np.float32))
        >>> out = CropOrPad((8, 8, 8))(image)
        >>> out.spatial_shape, out.origin.tolist()
        ((8, 8, 8), [1.0, -1.0, -2.0])
    """

    def __init__(
        self,
        target_shape: int | Sequence[int],
        padding_mode: str | float = "constant",
        mask_name: str | None = None,
        *,
        include: ImageNames = None,
        exclude: ImageNames = None,
    ):
        super().__init__(padding_mode=padding_mode, include=include, exclude=exclude)
        self.target_shape = _params.int_triple(target_shape, "target_shape")
        _params.check_output_size("CropOrPad", self.target_shape)
        if mask_name is not None and not isinstance(mask_name, str):
            raise TypeError(f"mask_name must be an image name, got {mask_name!r}")
        self.mask_name = mask_name

    def output_shape(self, shape: tuple[int, int, int]):
        return self.target_shape

    def window_start(self, subject: Subject, shape: tuple[int, int, int]):
        centred = crop_pad.crop_or_pad_bounds(shape, self.target_shape)
        if self.mask_name is None:
            return centred
        mask = subject[self.mask_name]
        if mask.spatial_shape != tuple(shape):
            raise ValueError(
                f"mask {self.mask_name!r} has spatial shape {mask.spatial_shape}, the images {shape}"
            )
        start = _mask_window_start(mask.data, self.target_shape, tuple(int(v) for v in centred))
        if not _params.is_traced(start):
            start = np.asarray(start)
        return start


class EnsureShapeMultiple(_Window):
    """Pad (or crop) so that each spatial size is a multiple of ``target_multiple``.

    Args:
        target_multiple: an int or 3 ints (e.g. ``2 ** levels`` of a U-Net).
        method: ``"pad"`` (up to the next multiple) or ``"crop"`` (down, at least one
            multiple).
        padding_mode: as ``Pad``.

    Centred as ``CropOrPad``. Jittable (depends only on the input shape).
    """

    def __init__(
        self,
        target_multiple: int | Sequence[int],
        *,
        method: str = "pad",
        padding_mode: Any = "constant",
        include: ImageNames = None,
        exclude: ImageNames = None,
    ):
        super().__init__(padding_mode=padding_mode, include=include, exclude=exclude)
        self.target_multiple = _params.int_triple(target_multiple, "target_multiple")
        self.method = _params.check_choice(method, "method", ("pad", "crop"))

    def output_shape(self, shape: tuple[int, int, int]):
        m = np.asarray(self.target_multiple)
        n = np.asarray(shape)
        count = -(-n // m) if self.method == "pad" else np.maximum(n // m, 1)
        return tuple(int(v) for v in count * m)

    def window_start(self, subject: Subject, shape: tuple[int, int, int]):
        return crop_pad.crop_or_pad_bounds(shape, self.output_shape(shape))


class CropForeground(_Window):
    """Crop to the bounding box of the foreground, plus a margin.

    Args:
        mask_name: image whose voxels ``> threshold`` (any channel) are foreground. By
            default, the first intensity image of the subject (in name order).
        threshold: foreground is ``data > threshold``.
        margin: voxels kept around the box (an int or 3 ints); the box is clipped to
            the volume.

    The output shape depends on voxel values, so it needs concrete data (run it in the
    loader). Raises ``ValueError`` if there is no foreground.
    """

    def __init__(
        self,
        *,
        mask_name: str | None = None,
        threshold: float = 0.0,
        margin: int | Sequence[int] = 0,
        include: ImageNames = None,
        exclude: ImageNames = None,
    ):
        super().__init__(include=include, exclude=exclude)
        self.mask_name = mask_name
        self.threshold = _params.finite_number(threshold, "threshold")
        margin = (margin,) * 3 if isinstance(margin, numbers.Integral) else tuple(margin)
        if len(margin) != 3 or any(
            not isinstance(m, numbers.Integral) or isinstance(m, bool) or m < 0 for m in margin
        ):
            raise ValueError(f"margin must be a non-negative int or 3 of them, got {margin!r}")
        self.margin = np.asarray(margin, int)

    def sample(self, key: PRNGKey | None, subject: Subject) -> Params:
        shape = _selected_shape(self, subject)
        name = self.mask_name
        if name is None:
            names = subject.names_of_kind("intensity")
            if not names:
                raise ValueError("CropForeground without mask_name needs an intensity image in the subject")
            name = names[0]
        mask_image = subject[name]
        _require_concrete(
            mask_image.data,
            "CropForeground",
            "the output shape is the size of the foreground's bounding box",
            ", or use CropOrPad(target_shape, mask_name=...) under jit",
        )
        if mask_image.spatial_shape != shape:
            raise ValueError(
                f"mask {name!r} has spatial shape {mask_image.spatial_shape}, the images {shape}"
            )
        mask = np.asarray(mask_image.data) > self.threshold
        if not mask.any():
            raise ValueError(
                f"CropForeground: image {name!r} has no voxel > {self.threshold} (empty foreground)"
            )
        lo, hi, _ = (np.asarray(v) for v in _bounding_box(mask))
        start = np.maximum(lo - self.margin, 0)
        stop = np.minimum(hi + 1 + self.margin, np.asarray(shape))
        return WindowParams(start, shape, stop - start)


class CopyAffine(Transform):
    """Give every selected image the affine of image ``target``.

    Use it when headers disagree by rounding (or by mistake) but the voxels are known to
    be aligned. Jittable.

    Raises:
        ValueError: if an image's spatial shape differs from the target's (not the same
            voxel grid, so copying the affine would be wrong).
    """

    def __init__(self, target: str, *, include: ImageNames = None, exclude: ImageNames = None):
        super().__init__(include=include, exclude=exclude)
        if not isinstance(target, str):
            raise TypeError(f"target must be the name of an image, got {target!r}")
        self.target = target

    def apply(self, subject: Subject, params: Params) -> Subject:
        ref = subject[self.target]
        out = {}
        for name in self.selected(subject):
            if subject[name].spatial_shape != ref.spatial_shape:
                raise ValueError(
                    f"CopyAffine: image {name!r} has spatial shape {subject[name].spatial_shape}, "
                    f"target {self.target!r} has {ref.spatial_shape}; they are not the same voxel grid"
                )
            out[name] = subject[name].replace(affine=ref.affine)
        return subject.replace(out)
