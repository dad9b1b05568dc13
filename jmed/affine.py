"""Pure geometry on 4x4 affines (voxel index -> world millimetres, RAS+).

The convention is NIfTI's: ``world = A @ [i, j, k, 1]`` where ``(i, j, k)`` index the
first three axes of the data and world axes point towards patient Right, Anterior and
Superior. Functions accept numpy or JAX arrays; those that work under ``jit`` say so.
Functions that decide shapes or permutations (orientation, reorientation) need concrete
values and use float64 numpy. Matrix products on JAX arrays request full float32
precision (``jax.lax.Precision.HIGHEST``) whatever the platform's default.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from jmed._checks import is_traced

__all__ = [
    "AXIS_LABELS",
    "ORIENTATIONS",
    "check_affine",
    "compose",
    "direction",
    "from_spacing",
    "invert",
    "orientation",
    "orientation_transform",
    "origin",
    "reorient",
    "reorient_affine",
    "spacing",
    "translate_voxels",
    "voxel_to_world",
    "world_to_voxel",
]

# For each world axis, the letter of its positive and of its negative direction.
AXIS_LABELS = (("R", "L"), ("A", "P"), ("S", "I"))
_LETTER_TO_AXIS = {
    letter: (axis, 1 if i == 0 else -1)
    for axis, pair in enumerate(AXIS_LABELS)
    for i, letter in enumerate(pair)
}

#: All 48 orientation codes: every assignment of world axes to the three voxel axes,
#: with either sign.
ORIENTATIONS = tuple(
    "".join(AXIS_LABELS[axis][sign] for axis, sign in zip(perm, signs))
    for perm in itertools.permutations(range(3))
    for signs in itertools.product((0, 1), repeat=3)
)


# below this determinant of the direction cosines (unit columns) an affine's axes are
# treated as parallel: 1e-6 is an angle of about 1e-6 rad between two axes, far below
# any real acquisition and far above float64 rounding
_SINGULAR_DETERMINANT = 1e-6


def _nib_orientations():
    """``nibabel.orientations``, imported on first use: importing nibabel imports its
    optional readers too (pydicom when installed), which ``import jmed`` stays free of."""
    from nibabel import orientations

    return orientations


def _xp(*arrays):
    return jnp if any(isinstance(a, jax.Array) for a in arrays) else np


def _matmul(xp, a, b):
    """``a @ b``; on JAX arrays at full float32 precision (the default multiplies
    bfloat16-rounded operands on TPUs, TF32 ones on GPUs: world positions some 100 mm
    from the origin would be off by tenths of a millimetre)."""
    if xp is np:
        return a @ b
    return jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)


def spacing(affine: ArrayLike) -> np.ndarray | jax.Array:
    """Voxel size in mm along each data axis (norms of the affine's columns). Jittable."""
    xp = _xp(affine)
    a = xp.asarray(affine)
    return xp.sqrt(xp.sum(a[..., :3, :3] ** 2, axis=-2))


def origin(affine: ArrayLike) -> np.ndarray | jax.Array:
    """World position (mm) of voxel (0, 0, 0). Jittable."""
    xp = _xp(affine)
    return xp.asarray(affine)[..., :3, 3]


def direction(affine: ArrayLike) -> np.ndarray | jax.Array:
    """Direction cosines: the 3x3 linear part with unit columns. Jittable."""
    xp = _xp(affine)
    a = xp.asarray(affine)
    return a[..., :3, :3] / spacing(a)[..., None, :]


def from_spacing(
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    origin: Sequence[float] = (0.0, 0.0, 0.0),
    orientation: str = "RAS",
) -> np.ndarray:
    """An axis-aligned affine with the given spacing, origin and orientation code."""
    codes = _parse_orientation(orientation, "orientation")
    a = np.eye(4)
    a[:3, :3] = 0.0
    for data_axis, (world_axis, sign) in enumerate(codes):
        a[int(world_axis), data_axis] = sign * float(spacing[data_axis])
    a[:3, 3] = np.asarray(origin, dtype=float)
    return a


def check_affine(affine: ArrayLike, name: str = "affine") -> np.ndarray:
    """Validate a concrete affine: shape (4, 4), finite, invertible linear part.

    Returns it as float64 numpy. Raises ``ValueError`` naming ``name`` otherwise.
    """
    a = np.asarray(affine, dtype=np.float64)
    if a.shape != (4, 4):
        raise ValueError(f"{name} must have shape (4, 4), got {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} must be finite, got non-finite values:\n{a}")
    sp = np.sqrt((a[:3, :3] ** 2).sum(0))
    if np.any(sp == 0) or abs(np.linalg.det(a[:3, :3] / sp)) < _SINGULAR_DETERMINANT:
        raise ValueError(f"{name} is singular (its 3x3 part is not invertible):\n{a}")
    return a


def voxel_to_world(affine: ArrayLike, points: ArrayLike) -> np.ndarray | jax.Array:
    """Map voxel indices ``(..., 3)`` to world mm ``(..., 3)``. Jittable."""
    xp = _xp(affine, points)
    a = xp.asarray(affine)
    p = xp.asarray(points)
    return _matmul(xp, p, a[:3, :3].T) + a[:3, 3]


def world_to_voxel(affine: ArrayLike, points: ArrayLike) -> np.ndarray | jax.Array:
    """Map world mm ``(..., 3)`` to (fractional) voxel indices ``(..., 3)``. Jittable."""
    xp = _xp(affine, points)
    a = xp.asarray(affine)
    p = xp.asarray(points)
    inv = np.linalg.inv(a[:3, :3]) if xp is np else invert(a[:3, :3])
    return _matmul(xp, p - a[:3, 3], inv.T)


def _invert_3x3(m: jax.Array) -> jax.Array:
    # signed cofactors of a 3x3 matrix in cyclic form: c[i][j] pairs rows i+1, i+2 with
    # columns j+1, j+2 (indices mod 3)
    def entry(i, j):
        return m[..., i % 3, j % 3]

    cof = [
        [
            entry(i + 1, j + 1) * entry(i + 2, j + 2) - entry(i + 1, j + 2) * entry(i + 2, j + 1)
            for j in range(3)
        ]
        for i in range(3)
    ]
    det = m[..., 0, 0] * cof[0][0] + m[..., 0, 1] * cof[0][1] + m[..., 0, 2] * cof[0][2]
    adjugate = jnp.stack([jnp.stack([cof[j][i] for j in range(3)], -1) for i in range(3)], -2)
    return adjugate / det[..., None, None]


def invert(matrix: ArrayLike) -> jax.Array:
    """Inverse of a 3x3 matrix, or of a 4x4 affine (last row ``0 0 0 1``), in closed form.

    Jittable and vmappable (leading batch axes allowed). Elementwise arithmetic only (the
    adjugate over the determinant; an affine's translation as ``-L^-1 t``): no pivoting
    gathers, which have no sharding rule for a batch sharded over an explicit mesh axis,
    and no matrix products, whose float32 precision would depend on the platform. The
    rounding differs from an LU-based ``jnp.linalg.inv`` by a few float32 ulps for
    well-conditioned matrices (voxel spacings and rotations); identity gives identity
    exactly.

    Args:
        matrix: ``(..., 3, 3)`` or ``(..., 4, 4)``; integers are inverted in float32.

    Returns:
        the inverse, same shape, float dtype.

    Raises:
        ValueError: a shape other than ``(..., 3, 3)`` or ``(..., 4, 4)``.

    Examples:
        >>> import numpy as np
        >>> a = from_spacing((2.0, 1.0, 0.5), (10.0, -4.0, 3.0), "LPS")
        >>> np.allclose(np.asarray(invert(a)) @ a, np.eye(4), atol=1e-6)
        True
    """
    m = jnp.asarray(matrix)
    if m.ndim < 2 or m.shape[-2:] not in ((3, 3), (4, 4)):
        raise ValueError(f"matrix must have shape (..., 3, 3) or (..., 4, 4), got {m.shape}")
    if not jnp.issubdtype(m.dtype, jnp.inexact):
        m = m.astype(jnp.float32)
    if m.shape[-1] == 3:
        return _invert_3x3(m)
    linear = _invert_3x3(m[..., :3, :3])
    translation = -jnp.sum(linear * m[..., None, :3, 3], axis=-1)
    top = jnp.concatenate([linear, translation[..., None]], axis=-1)
    # an affine's last row (0 0 0 1) is its inverse's too
    return jnp.concatenate([top, m[..., 3:, :]], axis=-2)


def compose(*affines: ArrayLike) -> np.ndarray | jax.Array:
    """Matrix product ``affines[0] @ affines[1] @ ...`` (the last is applied first)."""
    xp = _xp(*affines)
    out = xp.asarray(affines[0])
    for a in affines[1:]:
        out = _matmul(xp, out, xp.asarray(a))
    return out


def translate_voxels(affine: ArrayLike, offset: ArrayLike) -> np.ndarray | jax.Array:
    """Affine of a grid whose voxel 0 is voxel ``offset`` of ``affine``'s grid.

    Cropping ``start`` voxels uses ``offset = start``; padding uses ``-pad``. Jittable.
    """
    xp = _xp(affine, offset)
    a = xp.asarray(affine)
    off = xp.asarray(offset, dtype=a.dtype)
    new_origin = _matmul(xp, a[:3, :3], off) + a[:3, 3]
    if xp is np:
        out = a.copy()
        out[:3, 3] = new_origin
        return out
    return a.at[:3, 3].set(new_origin)


# --- orientation -----------------------------------------------------------------------


def orientation(affine: ArrayLike) -> str:
    """Orientation code such as ``'RAS'`` or ``'LPS'``, equal to ``nibabel.aff2axcodes``.

    Letter ``i`` names the world direction that data axis ``i`` increases towards.
    Needs a concrete affine (raises ``TypeError`` under ``jit``).
    """
    if is_traced(affine):
        raise TypeError(
            "orientation() needs a concrete affine, got a traced value; compute it "
            "outside jit (orientation decides permutations, which fix output shapes)"
        )
    codes = _nib_orientations().aff2axcodes(np.asarray(affine, dtype=np.float64))
    if None in codes:
        raise ValueError(f"affine has a degenerate axis, no orientation:\n{affine}")
    return "".join(codes)


def _parse_orientation(code: str, name: str) -> np.ndarray:
    """nibabel's orientation array ``(3, 2)`` (world axis, +-1 per data axis) of a code."""
    if not isinstance(code, str) or len(code) != 3:
        raise ValueError(f"{name} must be a 3-letter code like 'RAS' or 'LPS', got {code!r}")
    parsed = []
    for letter in code.upper():
        if letter not in _LETTER_TO_AXIS:
            raise ValueError(f"{name} {code!r} has unknown letter {letter!r}; allowed: R/L, A/P, S/I")
        parsed.append(_LETTER_TO_AXIS[letter][0])
    if sorted(parsed) != [0, 1, 2]:
        raise ValueError(f"{name} {code!r} must name each of R/L, A/P and S/I exactly once")
    return _nib_orientations().axcodes2ornt(code.upper())


def orientation_transform(current: str, target: str) -> tuple[tuple[int, int, int], tuple[bool, bool, bool]]:
    """Permutation and flips that take data in ``current`` orientation to ``target``.

    Returns ``(perm, flips)``: new data is ``transpose(data, perm)`` then flipped along
    every output axis ``i`` with ``flips[i]``. This is ``nibabel.orientations.ornt_transform``
    written as a transpose followed by flips.
    """
    ornt = _nib_orientations().ornt_transform(
        _parse_orientation(current, "current orientation"), _parse_orientation(target, "target orientation")
    )
    return _perm_flips(ornt)


def _perm_flips(ornt: np.ndarray) -> tuple[tuple[int, int, int], tuple[bool, bool, bool]]:
    # nibabel flips input axis i, then moves it to output axis ornt[i, 0]
    perm, flips = [0, 0, 0], [False, False, False]
    for in_axis, (out_axis, sign) in enumerate(ornt):
        perm[int(out_axis)] = in_axis
        flips[int(out_axis)] = bool(sign < 0)
    return tuple(perm), tuple(flips)


def _ornt(perm: Sequence[int], flips: Sequence[bool]) -> np.ndarray:
    ornt = np.empty((3, 2))
    for out_axis, (in_axis, flip) in enumerate(zip(perm, flips)):
        ornt[in_axis] = (out_axis, -1.0 if flip else 1.0)
    return ornt


def reorient_affine(
    affine: ArrayLike, spatial_shape: Sequence[int], perm: Sequence[int], flips: Sequence[bool]
) -> np.ndarray:
    """Affine of data that was transposed by ``perm`` then flipped by ``flips``.

    Every voxel keeps its world position (``affine @ nibabel.orientations.inv_ornt_aff``).
    ``spatial_shape`` is the shape before.
    """
    a = np.asarray(affine, dtype=np.float64)
    return a @ _nib_orientations().inv_ornt_aff(_ornt(perm, flips), tuple(spatial_shape[:3]))


def reorient(
    data: ArrayLike, affine: ArrayLike, target: str = "RAS"
) -> tuple[np.ndarray | jax.Array, np.ndarray]:
    """Permute and flip channels-last ``data`` ``(x, y, z, ...)`` to orientation ``target``.

    Exact (no interpolation); the returned affine keeps every voxel's world position.
    On numpy data this equals ``nibabel.orientations.apply_orientation``; JAX arrays stay
    JAX arrays.
    """
    current = orientation(affine)
    perm, flips = orientation_transform(current, target)
    xp = _xp(data)
    arr = xp.asarray(data)
    shape = arr.shape[:3]
    rest = tuple(range(3, arr.ndim))
    out = xp.transpose(arr, tuple(perm) + rest)
    flip_axes = tuple(i for i, f in enumerate(flips) if f)
    if flip_axes:
        out = xp.flip(out, axis=flip_axes)
    return out, reorient_affine(affine, shape, perm, flips)
