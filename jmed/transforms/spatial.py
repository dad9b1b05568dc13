"""Spatial transforms: flips, affine, elastic, anisotropy, 90-degree rotations, fusion.

Every spatial transform describes a *mapping* (``SpatialMapping``) from output voxel
indices to input voxel coordinates: a 4x4 matrix plus, optionally, a displacement field.
Consecutive spatial transforms compose their mappings into one (``compose_mappings``) and
the images are resampled once (``jmed.ops.interpolation.resample``): ``Spatial`` does it
explicitly, and ``Compose`` fuses runs of consecutive spatial transforms automatically.

World semantics (TorchIO v1): the grid stays and the content moves. Rotations and
scalings are about the image centre in world space (or the world origin with
``center="origin"``), translations are in world mm (RAS+: a translation of +5 along the
first world axis moves the content 5 mm towards patient right, whatever the data
orientation), elastic displacements are in world mm. The output affine equals the input
affine, except in ``Spatial`` with an output grid (crop / new spacing), whose affine is
updated so that world positions hold.

Composition rule: with mappings ``m_k(p) = A_k p + D_k d_k(p)``, the chain "first ``m1``
then ``m2``" pulls ``out(p) = in(m1(m2(p)))``. The matrices are multiplied exactly. A
displacement field of the *later* transform is carried through the earlier matrices
(``A1 D2 d2``, no resampling); a field of an *earlier* transform is evaluated at the
points mapped by the later one by trilinear interpolation of the (smooth) field. An
elastic deformation that comes last in a chain is evaluated directly on the output grid
(separable B-spline), so the usual "affine then elastic" costs no extra resampling.

Every matrix product of the geometry (matrices, composition, B-spline fields) requests
full float32 precision (``jax.lax.Precision.HIGHEST``): the default of TPUs (bfloat16
operands) or GPUs (TF32) would move voxel coordinates by tenths of a voxel.

Identity parameters give bit-exact identity mappings (``I + L^-1 (B - I) L`` is formed so
that ``B = I`` gives exactly ``I``), hence the input back bit for bit, also under ``jit``.

Params differ from TorchIO in that they are arrays drawn from a JAX key (see
``jmed.transforms.base``).
"""

from __future__ import annotations

import numbers
import warnings
from collections.abc import Sequence
from typing import Any, ClassVar, NamedTuple, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from jmed import affine as affine_lib
from jmed.image import Image, Subject
from jmed.ops import bspline
from jmed.ops.interpolation import PAD_VALUE_RULES, pad_value_for, resample
from jmed.transforms import params as _params
from jmed.transforms.base import Params, PRNGKey, RandomTransform, Transform, _choose, _split
from jmed.transforms.params import (
    AxesLike,
    FloatTripleLike,
    ImageNames,
    IntTripleLike,
    PerAxisRangeLike,
    RangeLike,
)

__all__ = [
    "OutputGrid",
    "RandomAffine",
    "RandomAnisotropy",
    "RandomElasticDeformation",
    "RandomFlip",
    "RandomRot90",
    "Spatial",
    "SpatialMapping",
    "SpatialTransform",
    "affine_mapping",
    "compose_mappings",
    "invert_mapping",
]

P = TypeVar("P")

IMAGE_INTERPOLATIONS = ("linear", "nearest")
LABEL_INTERPOLATIONS = ("nearest", "partial_volume")


class SpatialMapping(NamedTuple):
    """Output voxel ``p`` -> input voxel ``matrix @ p + displacement_matrix @ displacement[p]``.

    ``displacement`` is ``None`` for affine mappings, else an ``(*output_shape, 3)`` array
    or a lazily evaluated ``jmed.ops.bspline.SeparableField``; ``displacement_matrix`` ``None``
    means the identity. ``output_shape`` is static; ``output_affine`` is the affine of the
    output grid.
    """

    matrix: jax.Array
    displacement: jax.Array | None
    displacement_matrix: jax.Array | None
    output_shape: tuple[int, int, int]
    output_affine: Any


class OutputGrid(NamedTuple):
    """An axis-aligned output grid: output voxel ``q`` sits at input voxel ``scale * q + offset``."""

    shape: tuple[int, int, int]
    scale: jax.Array
    offset: jax.Array

    def matrix(self) -> jax.Array:
        m = jnp.diag(jnp.concatenate([jnp.asarray(self.scale, jnp.float32), jnp.ones(1, jnp.float32)]))
        return m.at[:3, 3].set(jnp.asarray(self.offset, jnp.float32))


def _valid_shape(shape, extent) -> jax.Array:
    """Float32 ``(3,)`` valid voxels per axis: ``extent`` when given, else ``shape``."""
    return jnp.asarray(shape if extent is None else extent, jnp.float32)


def _as_f32(affine):
    return jnp.asarray(affine, jnp.float32)


def _mm(a, b):
    """``a @ b`` at full float32 precision on every platform (see the module doc)."""
    return jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)


def _matrix(linear, translation):
    m = jnp.eye(4, dtype=jnp.float32)
    return m.at[:3, :3].set(linear).at[:3, 3].set(translation)


def _with_grid(mapping: SpatialMapping, grid: OutputGrid | None) -> SpatialMapping:
    if grid is None:
        return mapping
    g = grid.matrix()
    return compose_mappings(
        mapping, SpatialMapping(g, None, None, grid.shape, _mm(_as_f32(mapping.output_affine), g))
    )


def _on_grid(transform: Any, mapping: SpatialMapping, grid: OutputGrid) -> SpatialMapping:
    """``mapping`` if it samples ``grid`` (its output shape is the grid's), else a TypeError
    naming the transform that ignored the grid."""
    if tuple(mapping.output_shape) != tuple(grid.shape):
        raise TypeError(
            f"{type(transform).__name__}.mapping_on_grid returned a mapping with output shape "
            f"{tuple(mapping.output_shape)} for an output grid of shape {tuple(grid.shape)}: it "
            "must sample the grid (or leave mapping_on_grid to the base class)"
        )
    return mapping


def _dense(field):
    return field.dense() if isinstance(field, bspline.SeparableField) else field


def _check_mapping(value: Any, name: str) -> None:
    if not isinstance(value, SpatialMapping):
        raise TypeError(f"{name} must be a SpatialMapping, got {type(value).__name__}")


def compose_mappings(
    first: SpatialMapping, second: SpatialMapping, *, extent: ArrayLike | None = None
) -> SpatialMapping:
    """The mapping of "``first`` then ``second``": ``p -> first(second(p))``.

    ``second`` maps its output grid to ``first``'s output grid; the result maps
    ``second``'s output grid to ``first``'s input grid (see module doc for fields).
    ``extent``: valid voxels of ``first``'s output grid when it is padded (see
    ``jmed.buckets``): ``first``'s displacement field is clamped at its border there.
    """
    _check_mapping(first, "first")
    _check_mapping(second, "second")
    a1, a2 = first.matrix, second.matrix
    matrix = _mm(a1, a2)
    shape, affine = second.output_shape, second.output_affine
    if first.displacement is None:
        if second.displacement is None:
            return SpatialMapping(matrix, None, None, shape, affine)
        d2 = jnp.eye(3) if second.displacement_matrix is None else second.displacement_matrix
        return SpatialMapping(matrix, second.displacement, _mm(a1[:3, :3], d2), shape, affine)
    # the earlier field, evaluated (trilinear, edge) where the later mapping sends each voxel
    moved = resample(
        _dense(first.displacement),
        a2,
        shape,
        order=1,
        displacement=second.displacement,
        displacement_matrix=second.displacement_matrix,
        pad_mode="edge",
        extent=extent,
    )
    if second.displacement is None:
        return SpatialMapping(matrix, moved, first.displacement_matrix, shape, affine)
    d1 = jnp.eye(3) if first.displacement_matrix is None else first.displacement_matrix
    d2 = jnp.eye(3) if second.displacement_matrix is None else second.displacement_matrix
    field = _mm(_dense(second.displacement), _mm(a1[:3, :3], d2).T) + _mm(moved, d1.T)
    return SpatialMapping(matrix, field, None, shape, affine)


# fixed-point steps of invert_mapping: each multiplies the error by about the field's
# Lipschitz constant (< 1 for the non-folding fields RandomElasticDeformation makes)
INVERSE_ITERATIONS = 12


def invert_mapping(mapping: SpatialMapping, iterations: int = INVERSE_ITERATIONS) -> SpatialMapping:
    """Inverse of a mapping whose output grid equals its input grid.

    Affine mappings are inverted exactly (matrix inverse). With a displacement field the
    inverse is approximate: ``n(q) = A^-1 q + e(q)`` with ``e`` found by the fixed-point
    iteration ``e <- -A^-1 D d(A^-1 q + e)`` (converges for the non-folding fields that
    ``RandomElasticDeformation`` warns about otherwise); the error is that of trilinear
    sampling of the field plus the iteration residual.
    """
    _check_mapping(mapping, "mapping")
    inv = affine_lib.invert(mapping.matrix)
    if mapping.displacement is None:
        return mapping._replace(matrix=inv)
    d = jnp.eye(3) if mapping.displacement_matrix is None else mapping.displacement_matrix
    to_voxels = -_mm(inv[:3, :3], d)
    field = _dense(mapping.displacement)
    shape = mapping.output_shape

    def step(_, e):
        f = resample(field, inv, shape, order=1, displacement=e, pad_mode="edge")
        return _mm(f, to_voxels.T)

    e = jax.lax.fori_loop(0, iterations, step, jnp.zeros((*shape, 3), jnp.float32))
    return SpatialMapping(inv, e, None, shape, mapping.output_affine)


def _check_pad_value(value):
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return _params.finite_number(value, "default_pad_value")
    if value == "edge" or value in PAD_VALUE_RULES:
        return value
    raise ValueError(f"default_pad_value must be a number, 'edge' or one of {PAD_VALUE_RULES}, got {value!r}")


def _check_pad_label(value):
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    raise ValueError(f"default_pad_label must be an integer label, got {value!r}")


class SpatialTransform(Transform[P]):
    """Base class: a transform described by a ``SpatialMapping``.

    Subclasses implement ``mapping(params, shape, affine, *, extent=None)``: their own
    mapping, whose output grid is the input grid (the grid stays, the content moves).
    Output grids (``Spatial(output_shape=..., output_spacing=...)``) are the base class's
    business: ``mapping_on_grid`` composes the mapping with the grid, and its result is
    checked to have the grid's shape. A subclass that can evaluate its mapping directly
    at the grid's points more cheaply (``RandomElasticDeformation`` evaluates its spline
    there) overrides ``mapping_on_grid`` too. ``apply``
    resamples every selected image once; intensity images with ``image_interpolation``
    and ``default_pad_value`` (a number, ``"minimum"``, ``"mean"``, ``"otsu"`` or
    ``"edge"``), label maps with ``label_interpolation`` (``"nearest"`` or
    ``"partial_volume"``) and ``default_pad_label``. All selected images must share the
    spatial grid (the mapping is computed once, from the first of them).

    ``lossless`` transforms (flips, 90-degree rotations) map voxels to voxels exactly and
    are resampled by nearest neighbour (exact, one gather).
    """

    fusable: ClassVar[bool] = True
    lossless: ClassVar[bool] = False
    invertible = True
    padding_aware: ClassVar[bool] = True

    def __init__(
        self,
        *,
        image_interpolation: str = "linear",
        label_interpolation: str = "nearest",
        default_pad_value: float | str = "minimum",
        default_pad_label: int = 0,
        include: ImageNames = None,
        exclude: ImageNames = None,
    ):
        super().__init__(include=include, exclude=exclude)
        self.image_interpolation = _params.check_choice(
            image_interpolation, "image_interpolation", IMAGE_INTERPOLATIONS
        )
        self.label_interpolation = _params.check_choice(
            label_interpolation, "label_interpolation", LABEL_INTERPOLATIONS
        )
        self.default_pad_value = _check_pad_value(default_pad_value)
        self.default_pad_label = _check_pad_label(default_pad_label)

    def mapping(
        self, params: P, shape: tuple[int, int, int], affine: ArrayLike, *, extent: ArrayLike | None = None
    ) -> SpatialMapping:
        """This transform's own mapping for ``params`` on a grid of static ``shape`` and
        ``affine`` (output grid = input grid).

        ``extent`` (valid voxels per axis, possibly traced) is given for a padded volume
        (see ``jmed.buckets``): geometry (centres, flips, elastic grids) then follows the
        valid region, as if the volume had shape ``extent``.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement mapping(params, shape, affine)")

    def mapping_on_grid(
        self,
        params: P,
        shape: tuple[int, int, int],
        affine: ArrayLike,
        grid: OutputGrid,
        *,
        extent: ArrayLike | None = None,
    ) -> SpatialMapping:
        """The mapping sampled on the output ``grid``: by default ``mapping`` composed with
        the grid's axis-aligned matrix (output voxel ``q`` pulls input voxel
        ``mapping(scale * q + offset)``). Callers use ``grid_mapping``, which checks the
        result."""
        return _with_grid(self.mapping(params, shape, affine, extent=extent), grid)

    def grid_mapping(
        self,
        params: P,
        shape: tuple[int, int, int],
        affine: ArrayLike,
        grid: OutputGrid | None,
        *,
        extent: ArrayLike | None = None,
    ) -> SpatialMapping:
        """``mapping`` (``grid`` None) or ``mapping_on_grid``, checked: the result's
        output shape is the grid's.

        Raises:
            TypeError: a subclass returned a mapping of another shape (one that ignores
                the grid), naming the subclass.
        """
        if grid is None:
            return self.mapping(params, shape, affine, extent=extent)
        return _on_grid(self, self.mapping_on_grid(params, shape, affine, grid, extent=extent), grid)

    # -- application -------------------------------------------------------------------
    def _reference(self, subject: Subject) -> tuple[list[str], Image]:
        names = self.selected(subject)
        if not names:
            return names, None
        shapes = {subject[n].spatial_shape for n in names}
        if len(shapes) > 1:
            detail = ", ".join(f"{n}: {subject[n].spatial_shape}" for n in names)
            raise ValueError(f"{type(self).__name__} needs images on one grid, got shapes {detail}")
        try:  # affines are compared where concrete (eagerly, in the loader), not under jit
            Subject({n: subject[n] for n in names}).check_consistent()
        except ValueError as err:
            raise ValueError(f"{type(self).__name__} needs images on one grid: {err}") from None
        return names, subject[names[0]]

    def _resample(self, subject: Subject, names, mapping: SpatialMapping) -> Subject:
        out = {}
        for name in names:
            image = subject[name]
            _params.check_output_size(
                type(self).__name__,
                mapping.output_shape,
                channels=image.shape[-1],
                itemsize=max(4, np.dtype(image.dtype).itemsize),
            )
            out[name] = image.replace(data=self._resample_data(image, mapping), affine=mapping.output_affine)
        return subject.replace(out)

    def _resample_data(self, image: Image, m: SpatialMapping) -> jax.Array:
        kw = dict(displacement=m.displacement, displacement_matrix=m.displacement_matrix, extent=image.extent)
        if image.is_label:
            order = 0 if self.lossless else self.label_interpolation
            pad_mode, pad = "constant", self.default_pad_label
        else:
            order = 0 if self.lossless else self.image_interpolation
            pad_mode = "edge" if self.default_pad_value == "edge" else "constant"
            pad = (
                0.0 if pad_mode == "edge" else pad_value_for(image.data, self.default_pad_value, image.extent)
            )
        return resample(
            image.data, m.matrix, m.output_shape, order=order, pad_mode=pad_mode, pad_value=pad, **kw
        )

    def apply(self, subject: Subject, params: Params) -> Subject:
        names, ref = self._reference(subject)
        if ref is None:
            return subject
        mapping = self.mapping(params, ref.spatial_shape, ref.affine, extent=ref.extent)
        return self._resample(subject, names, mapping)

    def inverse(self, subject: Subject, params: Params) -> Subject:
        names, ref = self._reference(subject)
        if ref is None:
            return subject
        forward = self.mapping(params, ref.spatial_shape, ref.affine, extent=ref.extent)
        if forward.output_shape != ref.spatial_shape:
            raise TypeError(
                f"{type(self).__name__} changes the grid ({ref.spatial_shape} -> {forward.output_shape}); "
                "its inverse is not defined on the output"
            )
        return self._resample(subject, names, invert_mapping(forward))

    @classmethod
    def fuse(cls, transforms: Sequence[SpatialTransform]) -> Spatial:
        """One transform applying ``transforms`` with one resampling; its params are the
        tuple of the children's params (used by ``Compose``)."""
        return _FusedChain(transforms)


# --- flips and 90-degree rotations ------------------------------------------------------

_ANATOMICAL = {"L": 0, "R": 0, "A": 1, "P": 1, "S": 2, "I": 2}


def _parse_flip_axes(axes) -> tuple[int | str, ...]:
    items = (axes,) if isinstance(axes, (str, numbers.Integral)) else tuple(axes)
    out = []
    for a in items:
        if isinstance(a, str):
            if not a or a[0].upper() not in _ANATOMICAL:
                raise ValueError(
                    f"axes must be 0, 1, 2 or anatomical names such as 'LR', 'AP', 'IS', 'Left', got {a!r}"
                )
            out.append(a[0].upper())
        elif isinstance(a, numbers.Integral) and not isinstance(a, bool) and 0 <= a < 3:
            out.append(int(a))
        else:
            raise ValueError(f"axes must be 0, 1, 2 or anatomical names, got {axes!r}")
    if not out:
        raise ValueError("axes must name at least one axis")
    return tuple(out)


class RandomFlip(SpatialTransform, RandomTransform):
    """Flip along each of ``axes`` with probability ``flip_probability`` (independently).

    Args:
        axes: data axes (ints) and/or anatomical names (``"LR"``, ``"AP"``, ``"IS"``,
            ``"Left"``, ``"Posterior"``...: the first letter picks the world axis); a name
            is resolved through the affine to the data axis closest to that world axis
            (jittable: works with traced affines).
        flip_probability: per-axis probability.

    Params: ``(3,)`` booleans, one per data axis. The grid stays; the content is mirrored
    about the image centre. Exact (nearest neighbour on integer coordinates).
    """

    lossless = True

    def __init__(
        self,
        axes: AxesLike = 0,
        flip_probability: float = 0.5,
        *,
        include: ImageNames = None,
        exclude: ImageNames = None,
    ):
        super().__init__(include=include, exclude=exclude)
        self.axes = _parse_flip_axes(axes)
        self.flip_probability = _params.check_probability(flip_probability, "flip_probability")

    @property
    def sample_reads_subject(self) -> bool:  # type: ignore[override]
        return any(isinstance(a, str) for a in self.axes)  # anatomical names read the affine

    def sample(self, key: PRNGKey | None, subject: Subject) -> Params:
        draws = jax.random.bernoulli(key, self.flip_probability, (len(self.axes),))
        _, ref = self._reference(subject)
        direction = jnp.abs(_as_f32(ref.affine)[:3, :3]) if ref is not None else jnp.eye(3)
        flips = jnp.zeros(3, bool)
        for draw, axis in zip(draws, self.axes):
            if isinstance(axis, str):
                axis = jnp.argmax(direction[_ANATOMICAL[axis]])
            flips = flips | ((jnp.arange(3) == axis) & draw)
        return flips

    def mapping(
        self,
        params: Params,
        shape: tuple[int, int, int],
        affine: ArrayLike,
        *,
        extent: ArrayLike | None = None,
    ) -> SpatialMapping:
        sign = jnp.where(params, -1.0, 1.0)
        offset = jnp.where(params, _valid_shape(shape, extent) - 1.0, 0.0)
        return SpatialMapping(_matrix(jnp.diag(sign), offset), None, None, tuple(shape), affine)


class RandomRot90(SpatialTransform, RandomTransform):
    """Rotate by ``k * 90`` degrees in the plane of data ``axes``, ``k`` uniform in 0..3.

    Lossless (voxels are permuted, never interpolated), like ``numpy.rot90(data, k,
    axes)``. Both axes must have the same size so the shape is static (raises
    ``ValueError`` otherwise). Params: ``k`` (int array). The grid stays.
    """

    sample_reads_subject = False
    lossless = True

    def __init__(
        self, *, axes: tuple[int, int] = (0, 1), include: ImageNames = None, exclude: ImageNames = None
    ):
        super().__init__(include=include, exclude=exclude)
        axes = tuple(axes) if not isinstance(axes, numbers.Integral) else (axes,)
        if (
            len(axes) != 2
            or len(set(axes)) != 2
            or not all(isinstance(a, numbers.Integral) and 0 <= a < 3 for a in axes)
        ):
            raise ValueError(f"axes must be two different data axes in 0..2, got {axes!r}")
        self.axes = tuple(int(a) for a in axes)

    def sample(self, key: PRNGKey | None, subject: Subject) -> Params:
        return jax.random.randint(key, (), 0, 4)

    def mapping(
        self,
        params: Params,
        shape: tuple[int, int, int],
        affine: ArrayLike,
        *,
        extent: ArrayLike | None = None,
    ) -> SpatialMapping:
        a, b = self.axes
        if shape[a] != shape[b]:
            raise ValueError(f"RandomRot90 axes {self.axes} must have equal sizes, got shape {tuple(shape)}")
        # a padded volume turns within its valid region (whose two sizes must then be
        # equal, as the sizes of an unpadded volume must be)
        n = _valid_shape(shape, extent)[a] - 1.0
        mats = []
        for k in range(4):
            m = jnp.eye(4, dtype=jnp.float32)
            for _ in range(k):
                # one quarter turn: out[.., i, .., j, ..] = in[.., j, .., n - i, ..]
                step = np.eye(4, dtype=np.float32)
                step[a, a], step[a, b], step[b, a], step[b, b] = 0, 1, -1, 0
                step = jnp.asarray(step).at[b, 3].set(n)
                m = _mm(m, step)
            mats.append(m)
        matrix = _choose(params, mats)
        return SpatialMapping(matrix, None, None, tuple(shape), affine)


# --- affine -----------------------------------------------------------------------------


def _rotation(degrees: jax.Array, order: str = "zxy") -> jax.Array:
    """The product of the rotations about the world R, A and S axes (``x``, ``y``,
    ``z``) by ``degrees``, leftmost letter of ``order`` leftmost: ``"zxy"`` is
    ``Rz @ Rx @ Ry``.

    ``"zxy"`` is the order of SimpleITK's ``Euler3DTransform`` (TorchIO's rotation): about
    A first, then R, then S. TorchIO builds it in LPS with the R and A angles negated,
    which is this same matrix in RAS. ``RandomMotion`` uses ``"zyx"``.
    """
    radians = jnp.deg2rad(jnp.asarray(degrees))
    a, b, c = radians[0], radians[1], radians[2]
    one, zero = jnp.ones_like(a), jnp.zeros_like(a)
    ca, sa, cb, sb, cc, sc = jnp.cos(a), jnp.sin(a), jnp.cos(b), jnp.sin(b), jnp.cos(c), jnp.sin(c)
    elementary = {
        "x": jnp.array([[one, zero, zero], [zero, ca, -sa], [zero, sa, ca]]),
        "y": jnp.array([[cb, zero, sb], [zero, one, zero], [-sb, zero, cb]]),
        "z": jnp.array([[cc, -sc, zero], [sc, cc, zero], [zero, zero, one]]),
    }
    first, second, third = (elementary[axis] for axis in order)
    return _mm(_mm(first, second), third)


def affine_mapping(
    scales: ArrayLike,
    degrees: ArrayLike,
    translation: ArrayLike,
    shape: tuple[int, int, int],
    affine: ArrayLike,
    center: str = "image",
    *,
    extent: ArrayLike | None = None,
) -> SpatialMapping:
    """Mapping of TorchIO's world transform ``x -> S R (x - c) + c + S t`` (content moves by it).

    ``R = Rz Rx Ry`` (degrees about the world axes, SimpleITK's Euler order),
    ``S = diag(scales)``, ``t`` in mm (scaled with the content, as in TorchIO), ``c`` the
    image centre (world; of the valid region ``extent`` when given) or the origin. The
    output pulls ``in(B (y - c - S t) + c)`` with ``B = R^T S^-1``; in voxels
    ``p_in = p + L^-1 (B - I) L p + L^-1 ((B - I)(o - c) - R^T t)`` where ``affine = [L o]``.

    A 2D image (one voxel along the third axis) gets no out-of-plane change, as in
    TorchIO: the S scale is 1 and the R and A rotations and the S translation are 0.
    """
    _params.check_choice(center, "center", ("image", "origin"))
    a = _as_f32(affine)
    lin, origin = a[:3, :3], a[:3, 3]
    scales = jnp.asarray(scales, jnp.float32)
    degrees = jnp.asarray(degrees, jnp.float32)
    translation = jnp.asarray(translation, jnp.float32)
    if len(shape) == 3 and shape[2] == 1:
        in_plane = jnp.array([1.0, 1.0, 0.0], jnp.float32)
        scales = scales * in_plane + (1.0 - in_plane)
        degrees = degrees * (1.0 - in_plane)
        translation = translation * in_plane
    rotation = _rotation(degrees)
    b = rotation.T / scales[None, :]
    delta = b - jnp.eye(3)
    if center == "image":
        c = _mm(lin, (_valid_shape(shape, extent) - 1.0) / 2.0) + origin
    else:
        c = jnp.zeros(3)
    lin_inv = affine_lib.invert(lin)
    matrix_lin = jnp.eye(3) + _mm(_mm(lin_inv, delta), lin)
    translation = _mm(lin_inv, _mm(delta, origin - c) - _mm(rotation.T, translation))
    return SpatialMapping(_matrix(matrix_lin, translation), None, None, tuple(shape), affine)


class RandomAffine(SpatialTransform, RandomTransform):
    """Random scaling, rotation and translation in world space, as TorchIO 1.2.

    For the same parameters the world map is TorchIO's: ``x -> S R (x - c) + c + S t``
    with ``R = Rz Rx Ry`` (see ``affine_mapping``).

    Args:
        scales: scale factors: ``d`` -> ``U(1 - d, 1 + d)``; ``(a, b)`` -> ``U(a, b)``; 3 or
            6 values per axis. Factors > 1 enlarge the content. Must stay > 0.
        degrees: rotation angles about the world R, A, S axes: ``d`` -> ``U(-d, d)``, or
            ranges as for ``scales``; applied about A, then R, then S.
        translation: mm along the world R, A, S axes, same rule (scaled with the content).
        isotropic: one scale factor for all axes (``scales`` must be one range).
        center: ``"image"`` (rotate/scale about the image centre) or ``"origin"`` (the
            world origin).
        default_pad_value: a number, ``"minimum"``, ``"mean"``, ``"otsu"`` or ``"edge"``.
        image_interpolation: ``"linear"`` or ``"nearest"``.
        label_interpolation: ``"nearest"`` or ``"partial_volume"``.
        default_pad_label: label used outside the input.

    Params: ``{"scales": (3,), "degrees": (3,), "translation": (3,)}``. The grid stays.

    Raises:
        ValueError: non-positive scales, reversed ranges, unknown options.
    """

    sample_reads_subject = False

    def __init__(
        self,
        scales: PerAxisRangeLike = 0.1,
        degrees: PerAxisRangeLike = 10,
        translation: PerAxisRangeLike = 0,
        isotropic: bool = False,
        center: str = "image",
        default_pad_value: float | str = "minimum",
        default_pad_label: int = 0,
        image_interpolation: str = "linear",
        label_interpolation: str = "nearest",
        *,
        include: ImageNames = None,
        exclude: ImageNames = None,
    ):
        super().__init__(
            image_interpolation=image_interpolation,
            label_interpolation=label_interpolation,
            default_pad_value=default_pad_value,
            default_pad_label=default_pad_label,
            include=include,
            exclude=exclude,
        )
        self.scales = _params.parse_range_per_axis(scales, "scales", centre=1.0)
        if np.any(self.scales <= 0):
            raise ValueError(f"scales must give factors > 0, got {scales!r} (ranges {self.scales.tolist()})")
        self.degrees = _params.parse_range_per_axis(degrees, "degrees")
        self.translation = _params.parse_range_per_axis(translation, "translation")
        if isotropic and not np.all(self.scales == self.scales[0]):
            raise ValueError(f"isotropic=True needs a single scales range, got {scales!r}")
        self.isotropic = bool(isotropic)
        self.center = _params.check_choice(center, "center", ("image", "origin"))

    def sample(self, key: PRNGKey | None, subject: Subject) -> Params:
        ranges = jnp.asarray(np.stack([self.scales, self.degrees, self.translation]), jnp.float32)
        u = jax.random.uniform(key, (3, 3))
        values = ranges[..., 0] + u * (ranges[..., 1] - ranges[..., 0])
        scales = jnp.broadcast_to(values[0, 0], (3,)) if self.isotropic else values[0]
        return {"scales": scales, "degrees": values[1], "translation": values[2]}

    def mapping(
        self,
        params: Params,
        shape: tuple[int, int, int],
        affine: ArrayLike,
        *,
        extent: ArrayLike | None = None,
    ) -> SpatialMapping:
        return affine_mapping(
            params["scales"],
            params["degrees"],
            params["translation"],
            shape,
            affine,
            self.center,
            extent=extent,
        )


# --- elastic ----------------------------------------------------------------------------


class RandomElasticDeformation(SpatialTransform, RandomTransform):
    """Dense elastic deformation from random displacements on a coarse control grid.

    Displacements (world mm, ``U(-max_displacement, max_displacement)`` per control
    point and axis) live on a ``num_control_points`` grid spanning the image (cubic
    B-spline, see ``jmed.ops.bspline``) and are upsampled separably to the output grid.
    ``locked_borders`` outer layers of control points are fixed at zero on all three
    axes (1: the outermost layer, 2: also the next one, so the border of the image barely
    moves). A warning is given when ``max_displacement`` exceeds half the control-point
    spacing (the deformation may fold); it needs a concrete affine and is skipped under
    ``jit``.

    Params: ``(n0, n1, n2, 3)`` control displacements in mm. The grid stays. On 2D
    images (a data axis of size 1) nothing moves along that axis.

    Raises:
        ValueError: fewer than 4 control points, negative displacement, ``locked_borders``
            not in 0..2 or locking every control point.
    """

    sample_reads_subject = False

    def __init__(
        self,
        num_control_points: IntTripleLike = 7,
        max_displacement: FloatTripleLike = 7.5,
        locked_borders: int = 2,
        image_interpolation: str = "linear",
        label_interpolation: str = "nearest",
        *,
        default_pad_value: float | str = "minimum",
        default_pad_label: int = 0,
        include: ImageNames = None,
        exclude: ImageNames = None,
    ):
        super().__init__(
            image_interpolation=image_interpolation,
            label_interpolation=label_interpolation,
            default_pad_value=default_pad_value,
            default_pad_label=default_pad_label,
            include=include,
            exclude=exclude,
        )
        self.num_control_points = _params.int_triple(num_control_points, "num_control_points")
        if min(self.num_control_points) < 4:
            raise ValueError(f"num_control_points must be >= 4 per axis, got {num_control_points!r}")
        self.max_displacement = _params.float_triple(max_displacement, "max_displacement")
        if min(self.max_displacement) < 0:
            raise ValueError(f"max_displacement must be >= 0, got {max_displacement!r}")
        if locked_borders not in (0, 1, 2) or isinstance(locked_borders, bool):
            raise ValueError(f"locked_borders must be 0, 1 or 2, got {locked_borders!r}")
        if min(self.num_control_points) - 2 * locked_borders < 1:
            raise ValueError(
                f"locked_borders={locked_borders} locks every control point of a grid of "
                f"{self.num_control_points}; use more control points or fewer locked borders"
            )
        self.locked_borders = int(locked_borders)
        mask = np.zeros(self.num_control_points, np.float32)
        lb = self.locked_borders
        mask[lb : mask.shape[0] - lb, lb : mask.shape[1] - lb, lb : mask.shape[2] - lb] = 1.0
        self._mask = mask

    def _check_folding(self, subject):
        _, ref = self._reference(subject)
        if ref is None or _params.is_traced(ref.affine):
            return
        shape = ref.spatial_shape
        if ref.extent is not None:
            if _params.is_traced(ref.extent):
                return
            shape = tuple(int(v) for v in np.asarray(ref.extent))
        spacing_mm = bspline.control_spacing(shape, self.num_control_points) * np.asarray(ref.spacing, float)
        # an axis of one voxel (a 2D image) gets no displacement: nothing can fold there
        spacing_mm = np.where(np.asarray(shape) == 1, np.inf, spacing_mm)
        if np.any(np.asarray(self.max_displacement) > spacing_mm / 2):
            warnings.warn(
                f"max_displacement {self.max_displacement} mm exceeds half the control-point "
                f"spacing {tuple(float(s) for s in np.round(spacing_mm, 2))} mm: the deformation may fold",
                RuntimeWarning,
                stacklevel=4,  # past sample and its key check
            )

    def sample(self, key: PRNGKey | None, subject: Subject) -> Params:
        self._check_folding(subject)
        u = jax.random.uniform(key, (*self.num_control_points, 3), minval=-1.0, maxval=1.0)
        return u * jnp.asarray(self.max_displacement, jnp.float32) * self._mask[..., None]

    @staticmethod
    def _to_voxels(shape, affine) -> jax.Array:
        to_voxels = affine_lib.invert(_as_f32(affine)[:3, :3])
        # 2D images (an axis of size 1): no displacement out of the slice
        flat_axes = np.array([n == 1 for n in shape])
        if flat_axes.any():
            to_voxels = jnp.where(flat_axes[:, None], 0.0, to_voxels)
        return to_voxels

    def mapping(
        self,
        params: Params,
        shape: tuple[int, int, int],
        affine: ArrayLike,
        *,
        extent: ArrayLike | None = None,
    ) -> SpatialMapping:
        to_voxels = self._to_voxels(shape, affine)
        if extent is not None:
            # the control grid spans the valid region; its spline continues over the padding
            weights = tuple(
                bspline.bspline_weights_at(jnp.arange(s, dtype=jnp.float32), s, n, extent=extent[d])
                for d, (s, n) in enumerate(zip(shape, self.num_control_points))
            )
            field = bspline.separable_field(params, weights)
            return SpatialMapping(jnp.eye(4, dtype=jnp.float32), field, to_voxels, tuple(shape), affine)
        weights = tuple(bspline.bspline_weights(s, n) for s, n in zip(shape, self.num_control_points))
        field = bspline.separable_field(params, weights)
        return SpatialMapping(jnp.eye(4, dtype=jnp.float32), field, to_voxels, tuple(shape), affine)

    def mapping_on_grid(
        self,
        params: Params,
        shape: tuple[int, int, int],
        affine: ArrayLike,
        grid: OutputGrid,
        *,
        extent: ArrayLike | None = None,
    ) -> SpatialMapping:
        # evaluate the spline directly at the output grid's positions (still separable)
        to_voxels = self._to_voxels(shape, affine)
        weights = tuple(
            bspline.bspline_weights_at(
                grid.scale[d] * jnp.arange(grid.shape[d]) + grid.offset[d], shape[d], n
            )
            for d, n in enumerate(self.num_control_points)
        )
        field = bspline.separable_field(params, weights)
        g = grid.matrix()
        return SpatialMapping(g, field, to_voxels, tuple(grid.shape), _mm(_as_f32(affine), g))


# --- fusion -----------------------------------------------------------------------------


def _check_spatial(transforms, name) -> tuple[SpatialTransform, ...]:
    out = tuple(transforms)
    for t in out:
        if not isinstance(t, SpatialTransform):
            raise TypeError(f"{name} takes spatial transforms (mappings), got {type(t).__name__}")
    return out


class _FusedChain(SpatialTransform):
    """Consecutive spatial transforms applied with one resampling.

    Interpolation and padding settings come from the first child that is not lossless
    (all lossless: exact nearest neighbour). Params: tuple of the children's params.
    """

    def __init__(self, transforms, **settings):
        self.transforms = _check_spatial(transforms, type(self).__name__)
        source = next((t for t in self.transforms if not t.lossless), None)
        defaults = {}
        if source is not None:
            defaults = dict(
                image_interpolation=source.image_interpolation,
                label_interpolation=source.label_interpolation,
                default_pad_value=source.default_pad_value,
                default_pad_label=source.default_pad_label,
            )
        if self.transforms:
            defaults.update(include=self.transforms[0].include, exclude=self.transforms[0].exclude)
        defaults.update({k: v for k, v in settings.items() if v is not None})
        super().__init__(**defaults)
        self.is_random = any(t.is_random for t in self.transforms)
        self.invertible = all(t.invertible for t in self.transforms)
        self.lossless = source is None

    @property
    def sample_reads_subject(self) -> bool:  # type: ignore[override]
        return any(t.sample_reads_subject for t in self.transforms)

    def sample(self, key: PRNGKey | None, subject: Subject) -> Params:
        keys = _split(key, len(self.transforms))
        return tuple(t.sample(k, subject) for t, k in zip(self.transforms, keys))

    def mapping(
        self,
        params: Params,
        shape: tuple[int, int, int],
        affine: ArrayLike,
        *,
        extent: ArrayLike | None = None,
    ) -> SpatialMapping:
        return self._chain(params, shape, affine, None, extent)

    def mapping_on_grid(
        self,
        params: Params,
        shape: tuple[int, int, int],
        affine: ArrayLike,
        grid: OutputGrid,
        *,
        extent: ArrayLike | None = None,
    ) -> SpatialMapping:
        return self._chain(params, shape, affine, grid, extent)

    def _chain(self, params, shape, affine, grid, extent):
        maps = []
        for i, (t, p) in enumerate(zip(self.transforms, params)):
            last = i == len(self.transforms) - 1
            m = t.grid_mapping(p, shape, affine, grid if last else None, extent=extent)
            shape, affine = m.output_shape, m.output_affine
            maps.append(m)
        if not maps:
            return _with_grid(
                SpatialMapping(jnp.eye(4, dtype=jnp.float32), None, None, tuple(shape), affine), grid
            )
        total = maps[-1]
        for m in reversed(maps[:-1]):
            # every intermediate grid is the input grid (only the last step may change it)
            total = compose_mappings(m, total, extent=extent)
        return total


class Spatial(_FusedChain):
    """Fused spatial augmentation: ``transforms`` then an output grid, one resampling.

    Composes the children's mappings (flips, affine, elastic, rotations, ...) and an
    axis-aligned output grid (new ``output_spacing`` and/or ``output_shape``) into one
    mapping, then interpolates each image once. With an output grid smaller than the
    input, this is nnU-Net's "rotate a larger region, then crop" for free: voxels come
    from the full input, so there is no padding wherever the rotated crop stays inside.

    Args:
        transforms: spatial transforms, applied in order.
        output_shape: static output shape; defaults to the input shape (or the input
            extent at ``output_spacing``, which then needs a concrete affine).
        output_spacing: output voxel size (mm) along each data axis; default: input's.
        crop: ``"center"`` (output centred on the input) or ``"random"`` (an integer
            offset drawn uniformly so that the output lies inside the input where it fits).
        image_interpolation, label_interpolation, default_pad_value, default_pad_label:
            as ``SpatialTransform``; default: taken from the first non-lossless child.

    Params: ``(children_params, offset)`` with ``offset`` ``(3,)`` the output grid's
    origin in input voxels. The output affine keeps world positions.
    """

    padding_aware = False  # its output grid is planned from the static input shape

    def __init__(
        self,
        transforms: Sequence[SpatialTransform] = (),
        *,
        output_shape: Sequence[int] | None = None,
        output_spacing: Sequence[float] | float | None = None,
        crop: str = "center",
        image_interpolation: str | None = None,
        label_interpolation: str | None = None,
        default_pad_value: float | str | None = None,
        default_pad_label: int | None = None,
        include: ImageNames = None,
        exclude: ImageNames = None,
    ):
        super().__init__(
            transforms,
            image_interpolation=image_interpolation,
            label_interpolation=label_interpolation,
            default_pad_value=default_pad_value,
            default_pad_label=default_pad_label,
            include=include,
            exclude=exclude,
        )
        if output_shape is not None:
            output_shape = _params.int_triple(output_shape, "output_shape")
            _params.check_output_size("Spatial", output_shape)
        self.output_shape = output_shape
        if output_spacing is not None:
            output_spacing = _params.float_triple(output_spacing, "output_spacing")
            if min(output_spacing) <= 0:
                raise ValueError(f"output_spacing must be > 0, got {output_spacing!r}")
        self.output_spacing = output_spacing
        self.crop = _params.check_choice(crop, "crop", ("center", "random"))
        self.is_random = self.is_random or crop == "random"
        self.lossless = self.lossless and output_spacing is None
        self._changes_grid = output_shape is not None or output_spacing is not None
        self.invertible = self.invertible and not self._changes_grid

    def inverse(self, subject: Subject, params: Params) -> Subject:
        if self._changes_grid:
            raise TypeError(
                "Spatial with output_shape/output_spacing changes the grid: its inverse would need "
                "the input grid; invert the children on the input instead"
            )
        return super().inverse(subject, params)

    def _grid(self, shape, affine, offset_fraction):
        spacing_in = jnp.sqrt(jnp.sum(_as_f32(affine)[:3, :3] ** 2, axis=0))
        if self.output_spacing is None:
            scale = jnp.ones(3, jnp.float32)
        else:
            scale = jnp.asarray(self.output_spacing, jnp.float32) / spacing_in
        out_shape = self.output_shape
        if out_shape is None:
            if self.output_spacing is None:
                out_shape = tuple(shape)
            else:
                if _params.is_traced(affine):
                    raise ValueError(
                        "Spatial(output_spacing=...) without output_shape needs a concrete affine"
                    )
                extent = np.asarray(shape) * np.asarray(
                    jnp.sqrt(jnp.sum(jnp.asarray(affine)[:3, :3] ** 2, 0))
                )
                out_shape = tuple(int(max(1, round(e / s))) for e, s in zip(extent, self.output_spacing))
        n_in = jnp.asarray(shape, jnp.float32) - 1.0
        n_out = jnp.asarray(out_shape, jnp.float32) - 1.0
        room = n_in - scale * n_out
        centred = room / 2.0
        if self.crop == "center" or offset_fraction is None:
            # whole voxels when the spacing is kept, so crops stay exact
            offset = centred if self.output_spacing is not None else jnp.floor(centred)
        else:
            offset = jnp.where(room >= 0, jnp.floor(offset_fraction * (jnp.floor(room) + 1.0)), centred)
        return OutputGrid(tuple(out_shape), scale, offset)

    def sample(self, key: PRNGKey | None, subject: Subject) -> Params:
        k_children, k_crop = _split(key, 2)
        children = super().sample(k_children, subject)
        fraction = jax.random.uniform(k_crop, (3,)) if self.crop == "random" else jnp.zeros(3)
        return children, fraction

    def mapping(
        self,
        params: Params,
        shape: tuple[int, int, int],
        affine: ArrayLike,
        *,
        extent: ArrayLike | None = None,
    ) -> SpatialMapping:
        if extent is not None:
            raise ValueError(
                "Spatial changes the output grid and does not take padded volumes (an extent); "
                "use it on unpadded volumes, or RandomFlip/RandomAffine/RandomElasticDeformation"
            )
        children, fraction = params
        own = self._grid(shape, affine, fraction)
        if own.shape == tuple(shape) and self.output_spacing is None:
            return self._chain(children, shape, affine, None, None)
        return _on_grid(self, self._chain(children, shape, affine, own, None), own)

    def mapping_on_grid(
        self,
        params: Params,
        shape: tuple[int, int, int],
        affine: ArrayLike,
        grid: OutputGrid,
        *,
        extent: ArrayLike | None = None,
    ) -> SpatialMapping:
        raise ValueError("Spatial with its own output grid cannot take another grid")

    def __repr__(self):
        return f"Spatial({list(self.transforms)!r}, output_shape={self.output_shape}, output_spacing={self.output_spacing})"


# --- anisotropy -------------------------------------------------------------------------


class RandomAnisotropy(RandomTransform):
    """Simulate thick slices along one axis, then return to the original grid.

    An axis is drawn from ``axes`` and a factor ``f ~ U(downsampling)``: the volume is
    sampled (nearest neighbour) every ``f`` voxels along that axis and interpolated back
    linearly (label maps: nearest on both steps), as TorchIO's ``RandomAnisotropy``
    (nearest downsampling, no anti-aliasing blur). Shapes are static: the low-resolution
    grid is implicit (2 gathers along one axis). Not a spatial mapping, so it is never
    fused and runs as its own step.

    Padding-aware (exact): on a padded volume (``Image.extent``) the low-resolution grid
    spans the valid voxels along the axis, as for the unpadded volume.

    Params: ``{"axis": int, "factor": float}``.
    """

    sample_reads_subject = False
    padding_aware = True

    def __init__(
        self,
        axes: AxesLike = (0, 1, 2),
        downsampling: RangeLike = (1.5, 5),
        *,
        include: ImageNames = None,
        exclude: ImageNames = None,
    ):
        super().__init__(include=include, exclude=exclude)
        self.axes = _params.as_axes(axes, "axes")
        self.downsampling = _params.parse_range(downsampling, "downsampling", min_value=1.0)

    def sample(self, key: PRNGKey | None, subject: Subject) -> Params:
        k_axis, k_factor = _split(key, 2)
        axis = _choose(jax.random.randint(k_axis, (), 0, len(self.axes)), np.asarray(self.axes, np.int32))
        lo, hi = self.downsampling
        return {"axis": axis, "factor": jax.random.uniform(k_factor, (), minval=lo, maxval=hi)}

    def apply_image(self, image: Image, params: Params) -> Image:
        data = image.data
        extent = image.extent
        branches = [
            lambda d, a=a: self._along(
                d, a, params["factor"], image.is_label, None if extent is None else extent[a]
            )
            for a in range(3)
        ]
        out = jax.lax.switch(jnp.asarray(params["axis"], jnp.int32), branches, data)
        return image.replace(data=out)

    @staticmethod
    def _along(data, axis, factor, is_label, size=None):
        n = data.shape[axis]
        # ``size``: valid voxels along the axis of a padded volume (traced)
        valid = n if size is None else jnp.asarray(size, jnp.int32)
        last = jnp.floor((valid - 1) / factor)  # index of the last low-resolution sample
        x = jnp.arange(n, dtype=jnp.float32)
        u = jnp.clip(x / factor, 0.0, last)

        def source(k):  # original voxel nearest to low-resolution sample k
            return jnp.clip(jnp.floor(k * factor + 0.5), 0, valid - 1).astype(jnp.int32)

        if is_label:
            return jnp.take(data, source(jnp.floor(u + 0.5)), axis=axis)
        k0 = jnp.floor(u)
        w = u - k0
        lo = jnp.take(data, source(k0), axis=axis).astype(jnp.float32)
        hi = jnp.take(data, source(jnp.minimum(k0 + 1.0, last)), axis=axis).astype(jnp.float32)
        shape = [1, 1, 1, 1]
        shape[axis] = n
        w = w.reshape(shape)
        out = lo * (1.0 - w) + hi * w
        return out.astype(data.dtype) if jnp.issubdtype(data.dtype, jnp.floating) else out

    def __repr__(self):
        return f"RandomAnisotropy(axes={self.axes}, downsampling={self.downsampling})"
