"""Pull-resampling of channels-last volumes driven by an output -> input voxel mapping.

``out[p] = data(matrix @ p + displacement_matrix @ displacement[p])`` for every output
voxel index ``p``, where ``matrix`` is a 4x4 affine from output voxel indices to
(fractional) input voxel indices and ``displacement`` an optional ``(X, Y, Z, 3)`` field
(in input voxels, or in any unit that ``displacement_matrix`` (3x3) maps to input voxels,
e.g. millimetres). Arrays only (no ``Image``); all functions are jittable, vmappable and
differentiable in ``data``.

Interpolation (``order``):

- ``0`` / ``"nearest"``: nearest neighbour; keeps the dtype (the default for labels).
- ``1`` / ``"linear"``: trilinear; float output.
- ``"partial_volume"``: for label maps. For each output voxel the 8 trilinear neighbours
  vote with their trilinear weights and the label with the largest summed weight wins
  (ties go to the first neighbour in ``(0,0,0), (0,0,1), ... (1,1,1)`` order). The cost is
  8 x 8 comparisons per voxel whatever the number of classes (no one-hot channels). Keeps
  the dtype; output labels are always input labels (or ``pad_value``).

Samples outside the input are padded: ``"constant"`` uses ``pad_value`` for every
neighbour outside the input (so between the border voxel and the outside, linear
interpolation blends towards ``pad_value``), ``"edge"`` repeats the border voxels.
``pad_value_for`` computes TorchIO's ``default_pad_value`` rules (``"minimum"``,
``"mean"`` and ``"otsu"`` of the border voxels) from the data.

Exactness: coordinates are computed as ``m[d, 0] * i + m[d, 1] * j + m[d, 2] * k + m[d, 3]``
so an identity matrix (with zero displacement) gives exact integer coordinates, weights
exactly 1 and 0, and the input back bit for bit, also under ``jit``.

Same result eagerly and under ``jit``: XLA does not compute a coordinate once. It
recomputes it in every fusion that needs it (each of the 8 gathers computes its own
index; the weights are computed where the corners are summed, and again wherever a later
operation reads the output without it being written to memory, e.g. the next resampling
in the same program), and the compiler may contract a product and a sum into one fused
multiply-add in one fusion and not in another, so two evaluations of one coordinate can
differ in the last bit. Two guards keep the result independent of that:

- Products of a matrix entry and a voxel index are exact: the entry is split into two
  halves of 12 significant bits (``_exact_parts``), each of whose products with an index
  below 4096 is exact, so a fused multiply-add rounds the same way as a multiply then an
  add. Affine coordinates are bit-identical wherever they are computed (and equal the
  eager ones), which also keeps nearest-neighbour indices consistent.
- Trilinear interpolation finds, per axis, the two neighbours ``floor(c)`` and
  ``floor(c) + 1`` as the even and the odd one of them (``2 floor(c / 2 + 1/2)`` and
  ``2 floor(c / 2) + 1``), with the usual weights ``1 - f`` and ``f``,
  ``f = c - floor(c)``. The even index jumps only at odd coordinates, where its weight is
  0, and the odd one only at even coordinates, so where a coordinate lies within
  rounding of an integer, the gathers and the weights may see different neighbours and
  the result still moves by no more than that rounding. With ``floor`` for the gathers
  and ``c - floor(c)`` for the weights, they could disagree by a whole voxel: the
  neighbour's value instead of the voxel's (up to 0.3 on [0, 1] data after a motion
  artefact). This covers what the split products do not: displacement fields, and
  matrices computed in the same program.

Memory: an affine-only mapping never builds a ``(3, X, Y, Z)`` grid; each coordinate is
an outer sum of three 1D ramps that XLA fuses into the gathers. Linear interpolation is
8 scalar gathers on the flattened volume fused with the weight arithmetic. All arrays
keep the trailing channel axis, so the loop writes the output in its final layout. The
formulations compared for this choice: docs/performance.md.
"""

from __future__ import annotations

import itertools
import numbers

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jmed._checks import check_choice
from jmed.ops.bspline import SeparableField
from jmed.ops.crop_pad import valid_mask

__all__ = ["INTERPOLATIONS", "PAD_MODES", "PAD_VALUE_RULES", "pad_value_for", "resample"]

PAD_MODES = ("constant", "edge")
INTERPOLATIONS = ("nearest", "linear", "partial_volume")
PAD_VALUE_RULES = ("minimum", "mean", "otsu")

_ORDER_NAMES = {0: "nearest", 1: "linear", "nearest": "nearest", "linear": "linear"}
_ORDER_NAMES["partial_volume"] = "partial_volume"


def _interpolation(order) -> str:
    try:
        return _ORDER_NAMES[order]
    except (KeyError, TypeError):
        raise ValueError(
            f"order must be 0 (nearest), 1 (linear), 'nearest', 'linear' or 'partial_volume', got {order!r}"
        ) from None


def _exact_parts(x: jax.Array, bits: int) -> list[jax.Array]:
    """float32 ``x`` as parts that sum to it exactly, each with at most ``bits``
    significant bits (the leading ones by masking the mantissa, then the remainders)."""
    mask = jnp.int32(~((1 << (24 - bits)) - 1))
    parts = []
    rest = x
    for _ in range(-(-24 // bits) - 1):
        high = jax.lax.bitcast_convert_type(jax.lax.bitcast_convert_type(rest, jnp.int32) & mask, jnp.float32)
        parts.append(high)
        rest = rest - high  # exact: the low bits of ``rest``
    return [*parts, rest]


def _times_index(value: jax.Array, index: jax.Array, size: int) -> jax.Array:
    """``value * index`` for integer-valued ``index`` in ``[0, size)``, as a sum of exact
    products (see module doc): the same bits whether or not the compiler fuses it with an
    addition. For ``size <= 4096`` the result equals the rounded product ``value * index``."""
    bits = 24 - max(1, (size - 1).bit_length())
    total = None
    for part in _exact_parts(value, bits):
        term = part * index
        total = term if total is None else total + term
    return total


def _neighbours(c: jax.Array):
    """The two linear-interpolation neighbours of coordinate ``c`` along one axis.

    Returns ``(even, odd)`` indices (int32), their weights and whether each is the upper
    one. ``{even, odd} == {floor(c), floor(c) + 1}``; weights ``1 - f`` for ``floor(c)``,
    ``f = c - floor(c)`` for the other. Halving is exact, so the indices are the same
    wherever they are computed from the same ``c``; from a ``c`` off by rounding, an index
    can only differ where its weight is within that rounding of 0 (see module doc).
    """
    even = 2.0 * jnp.floor(0.5 * c + 0.5)  # odd c -> c + 1
    odd = 2.0 * jnp.floor(0.5 * c) + 1.0
    frac = c - jnp.minimum(even, odd)
    even_first = even < odd
    indices = (even.astype(jnp.int32), odd.astype(jnp.int32))
    weights = (jnp.where(even_first, 1.0 - frac, frac), jnp.where(even_first, frac, 1.0 - frac))
    return indices, weights, (~even_first, even_first)


def _coordinates(matrix, output_shape, displacement, displacement_matrix) -> list[jax.Array]:
    # One coordinate per axis as an outer sum of 1D ramps; broadcasting happens inside the
    # fusions that consume them, so no (3, X, Y, Z) grid is built for affine mappings.
    # Shapes (X, Y, Z, 1): channels-last like the output (see ``resample``).
    axes = [jnp.arange(n, dtype=jnp.float32) for n in output_shape]
    i = axes[0][:, None, None, None]
    j = axes[1][None, :, None, None]
    k = axes[2][None, None, :, None]
    coords = [
        _times_index(matrix[d, 0], i, output_shape[0])
        + _times_index(matrix[d, 1], j, output_shape[1])
        + _times_index(matrix[d, 2], k, output_shape[2])
        + matrix[d, 3]
        for d in range(3)
    ]
    if isinstance(displacement, SeparableField):
        if displacement_matrix is not None:
            displacement = displacement.transform_vectors(displacement_matrix)
        coords = [c + displacement.component(d)[..., None] for d, c in enumerate(coords)]
    elif displacement is not None:
        if displacement_matrix is None:
            offsets = [displacement[..., d, None] for d in range(3)]
        else:
            offsets = [
                sum(displacement_matrix[d, e] * displacement[..., e, None] for e in range(3))
                for d in range(3)
            ]
        coords = [c + o for c, o in zip(coords, offsets)]
    return coords


def _gather(flat: jax.Array, index: jax.Array, output_shape) -> jax.Array:
    # ``index`` is (X, Y, Z, 1). Everything stays channels-last: computed in 3D and given
    # its channel axis at the end, the output would be copied once more by XLA:CPU
    if flat.ndim == 1:
        return jnp.take(flat, index, mode="clip")
    return jnp.take(flat, index.reshape(-1), axis=0, mode="clip").reshape(*output_shape, flat.shape[1])


def resample(
    data: ArrayLike,
    matrix: ArrayLike,
    output_shape: tuple[int, int, int],
    *,
    order: int | str = 1,
    displacement: ArrayLike | None = None,
    pad_mode: str = "constant",
    pad_value: ArrayLike = 0.0,
    displacement_matrix: ArrayLike | None = None,
    extent: ArrayLike | None = None,
) -> jax.Array:
    """Resample ``data`` ``(x, y, z, c)`` on an output grid of ``output_shape``.

    Args:
        data: input volume, channels last.
        matrix: 4x4 output-voxel -> input-voxel affine.
        output_shape: static spatial shape of the output.
        order: ``0``/``"nearest"`` (keeps dtype, for labels), ``1``/``"linear"``
            (trilinear; float output) or ``"partial_volume"`` (labels; see module doc).
        displacement: optional ``(*output_shape, 3)`` offsets added after ``matrix``, in
            input voxels unless ``displacement_matrix`` is given.
        pad_mode: ``"constant"`` or ``"edge"``.
        pad_value: value outside the input for ``"constant"`` (scalar or per channel);
            see ``pad_value_for`` for TorchIO's rules.
        displacement_matrix: optional 3x3 matrix mapping ``displacement`` vectors to input
            voxels (e.g. the inverse of the input's 3x3 affine for a field in mm).
        extent: optional ``(3,)`` int number of valid input voxels per axis (may be
            traced): input voxels at indices ``>= extent`` are padding and count as
            outside the input, so the result equals resampling ``data[:ex, :ey, :ez]``.

    Returns:
        Array of shape ``(*output_shape, c)``.

    Raises:
        ValueError: unknown ``order`` or ``pad_mode``, wrong ``data`` rank or
            ``displacement`` shape.
    """
    mode = _interpolation(order)
    check_choice(pad_mode, "pad_mode", PAD_MODES)
    data = jnp.asarray(data)
    if data.ndim != 4:
        raise ValueError(f"data must be (x, y, z, c), got shape {data.shape}")
    output_shape = tuple(int(n) for n in output_shape)
    matrix = jnp.asarray(matrix, jnp.float32)
    if matrix.shape != (4, 4):
        raise ValueError(f"matrix must have shape (4, 4), got {matrix.shape}")
    if displacement is not None:
        if not isinstance(displacement, SeparableField):
            displacement = jnp.asarray(displacement, jnp.float32)
        if tuple(displacement.shape) != (*output_shape, 3):
            raise ValueError(f"displacement must have shape {(*output_shape, 3)}, got {displacement.shape}")
        if displacement_matrix is not None:
            displacement_matrix = jnp.asarray(displacement_matrix, jnp.float32)
            if displacement_matrix.shape != (3, 3):
                raise ValueError(
                    f"displacement_matrix must have shape (3, 3), got {displacement_matrix.shape}"
                )
    in_shape = data.shape[:3]
    channels = data.shape[3]
    flat = data.reshape(-1) if channels == 1 else data.reshape(-1, channels)
    strides = (in_shape[1] * in_shape[2], in_shape[2], 1)
    coords = _coordinates(matrix, output_shape, displacement, displacement_matrix)
    if extent is None:
        last = [n - 1 for n in in_shape]
    else:
        extent = jnp.asarray(extent, jnp.int32)
        if extent.shape != (3,):
            raise ValueError(f"extent must have shape (3,), got {extent.shape}")
        last = [extent[d] - 1 for d in range(3)]
    if pad_mode == "edge":
        coords = [jnp.clip(c, 0.0, jnp.asarray(n, jnp.float32)) for c, n in zip(coords, last)]

    def locate(idx):
        inside = True
        flat_index = 0
        for d in range(3):
            inside = inside & (idx[d] >= 0) & (idx[d] <= last[d])
            flat_index = flat_index + jnp.clip(idx[d], 0, last[d]) * strides[d]
        return flat_index, inside

    def pad_as(dtype):
        return jnp.broadcast_to(jnp.asarray(pad_value).astype(dtype), (channels,))

    if mode == "nearest":
        idx = [jnp.floor(c + 0.5).astype(jnp.int32) for c in coords]
        flat_index, inside = locate(idx)
        values = _gather(flat, flat_index, output_shape)
        if pad_mode == "constant":
            values = jnp.where(inside, values, pad_as(data.dtype))
        return values

    slots, weights, upper = zip(*(_neighbours(c) for c in coords))
    corners = []
    inside_weight = 0.0
    for corner in itertools.product((0, 1), repeat=3):
        flat_index, inside = locate([slots[d][s] for d, s in enumerate(corner)])
        weight = weights[0][corner[0]] * weights[1][corner[1]]
        weight = weight * weights[2][corner[2]]
        if pad_mode == "constant":
            weight = jnp.where(inside, weight, 0.0)
            inside_weight = inside_weight + weight
        corners.append((_gather(flat, flat_index, output_shape), weight))
    missing = 1.0 - inside_weight if pad_mode == "constant" else None

    if mode == "partial_volume":
        # rank of each corner in (lower, upper) order per axis, for the documented tie rule
        ranks = [
            sum(upper[d][s].astype(jnp.int32) << (2 - d) for d, s in enumerate(corner))
            for corner in itertools.product((0, 1), repeat=3)
        ]
        return _partial_volume(corners, missing, pad_as(data.dtype), ranks)

    out_dtype = data.dtype if jnp.issubdtype(data.dtype, jnp.floating) else jnp.float32
    total = None
    for values, weight in corners:
        term = weight.astype(out_dtype) * values.astype(out_dtype)
        total = term if total is None else total + term
    if missing is not None:
        missing = missing.astype(out_dtype)
        # keep the in-bounds result untouched (bit-exact identity) where nothing is missing
        total = jnp.where(missing > 0, total + missing * pad_as(out_dtype), total)
    return total


def _partial_volume(corners, missing, pad, ranks):
    """Label with the largest summed trilinear weight among the 8 neighbours (and pad);
    ties go to the lowest ``ranks`` (the pad ranks last)."""
    candidates = [values for values, _ in corners]
    weights = [w for _, w in corners]
    ranks = list(ranks)
    if missing is not None:
        candidates.append(jnp.broadcast_to(pad, candidates[0].shape))
        weights.append(missing)
        ranks.append(jnp.int32(len(corners)))
    best_label = best_score = best_rank = None
    for a, label in enumerate(candidates):
        score = weights[a]
        for b, other in enumerate(candidates):
            if b != a:
                score = score + jnp.where(other == label, weights[b], 0.0)
        if best_label is None:
            best_label, best_score, best_rank = label, score, ranks[a]
        else:
            better = (score > best_score) | ((score == best_score) & (ranks[a] < best_rank))
            best_label = jnp.where(better, label, best_label)
            best_score = jnp.where(better, score, best_score)
            best_rank = jnp.where(better, ranks[a], best_rank)
    return best_label


def _border_values(data: jax.Array) -> jax.Array:
    """Voxels on the 6 faces of ``data`` ``(x, y, z, c)`` as ``(n, c)``, each once."""
    c = data.shape[-1]
    inner_x = data[1:-1] if data.shape[0] > 2 else data[:0]
    inner_xy = inner_x[:, 1:-1] if data.shape[1] > 2 else inner_x[:, :0]
    faces = [data[:1], data[-1:] if data.shape[0] > 1 else data[:0], inner_x[:, :1]]
    faces += [inner_x[:, -1:] if data.shape[1] > 1 else inner_x[:, :0], inner_xy[:, :, :1]]
    faces += [inner_xy[:, :, -1:] if data.shape[2] > 1 else inner_xy[:, :, :0]]
    return jnp.concatenate([f.reshape(-1, c) for f in faces])


def _border_values_within(data: jax.Array, extent: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Voxels on the 6 faces of ``data[:ex, :ey, :ez]`` as ``(n, c)`` values and ``(n,)``
    weights (1 for a border voxel of the valid region, counted once; 0 otherwise)."""
    c = data.shape[-1]
    ext = jnp.asarray(extent, jnp.int32)
    ranges = [jnp.arange(n, dtype=jnp.int32) for n in data.shape[:3]]
    valid = [r < e for r, e in zip(ranges, (ext[0], ext[1], ext[2]))]
    inner = [v & (r > 0) & (r < e - 1) for v, r, e in zip(valid, ranges, (ext[0], ext[1], ext[2]))]
    values, weights = [], []
    for axis in range(3):
        # the faces at 0 and ext - 1 along ``axis``; earlier axes' faces already hold the
        # edges, so the other axes run over inner voxels of earlier axes only
        others = [inner[a] if a < axis else valid[a] for a in range(3) if a != axis]
        mask2d = others[0][:, None] & others[1][None, :]
        for index, keep in ((0, True), (ext[axis] - 1, ext[axis] > 1)):
            face = jax.lax.dynamic_index_in_dim(data, index, axis=axis, keepdims=False)
            values.append(face.reshape(-1, c))
            weights.append((mask2d & keep).reshape(-1))
    return jnp.concatenate(values), jnp.concatenate(weights).astype(jnp.float32)


def _otsu_threshold(values: jax.Array, bins: int = 256, weights: jax.Array | None = None) -> jax.Array:
    """Otsu's threshold of 1D ``values`` (optionally weighted 0/1) from a ``bins``-bin
    histogram (jittable)."""
    if weights is None:
        lo, hi = jnp.min(values), jnp.max(values)
        counts = 1.0
    else:
        keep = weights > 0
        lo = jnp.min(jnp.where(keep, values, jnp.inf))
        hi = jnp.max(jnp.where(keep, values, -jnp.inf))
        counts = weights
    width = jnp.where(hi > lo, (hi - lo) / bins, 1.0)
    index = jnp.clip(((values - lo) / width).astype(jnp.int32), 0, bins - 1)
    hist = jnp.zeros(bins, jnp.float32).at[index].add(counts)
    centres = lo + (jnp.arange(bins, dtype=jnp.float32) + 0.5) * width
    w0 = jnp.cumsum(hist)
    w1 = w0[-1] - w0
    s0 = jnp.cumsum(hist * centres)
    m0 = s0 / jnp.maximum(w0, 1e-12)
    m1 = (s0[-1] - s0) / jnp.maximum(w1, 1e-12)
    between = w0 * w1 * (m0 - m1) ** 2
    return lo + (jnp.argmax(between) + 1.0) * width


def pad_value_for(data: ArrayLike, rule: str | float, extent: ArrayLike | None = None) -> jax.Array:
    """Per-channel padding value ``(c,)`` for ``data`` ``(x, y, z, c)`` (jittable).

    Args:
        data: the input volume.
        rule: a number, ``"minimum"`` (the image minimum), ``"mean"`` (mean of the
            border voxels) or ``"otsu"`` (mean of the border voxels below the Otsu
            threshold of the border voxels, i.e. the background), as TorchIO's
            ``default_pad_value``.
        extent: optional valid voxels per axis (see ``resample``): the rule reads
            ``data[:ex, :ey, :ez]`` only.

    Raises:
        ValueError: unknown rule.
    """
    data = jnp.asarray(data)
    channels = data.shape[-1]
    if isinstance(rule, numbers.Real) and not isinstance(rule, bool):
        return jnp.full((channels,), rule, jnp.result_type(data.dtype, jnp.float32))
    if rule not in PAD_VALUE_RULES:
        raise ValueError(f"pad value must be a number or one of {PAD_VALUE_RULES}, got {rule!r}")
    if extent is None:
        if rule == "minimum":
            return _kept_apart(jnp.min(data.reshape(-1, channels), axis=0).astype(jnp.float32))
        border, weights = _border_values(data).astype(jnp.float32), None
    else:
        if rule == "minimum":
            mask = valid_mask(data.shape[:3], extent)
            inside = jnp.where(mask, data.astype(jnp.float32), jnp.inf)
            return _kept_apart(jnp.min(inside.reshape(-1, channels), axis=0))
        border, weights = _border_values_within(data, extent)
        border = border.astype(jnp.float32)
    if rule == "mean":
        if weights is None:
            return _kept_apart(jnp.mean(border, axis=0))
        total = jnp.matmul(weights, border, precision=jax.lax.Precision.HIGHEST)
        return _kept_apart(total / jnp.maximum(jnp.sum(weights), 1.0))

    def background_mean(values):
        w = jnp.ones(values.shape, jnp.float32) if weights is None else weights
        threshold = _otsu_threshold(values, weights=weights)
        below = (values < threshold) & (w > 0)
        mean_below = jnp.sum(jnp.where(below, values, 0.0)) / jnp.maximum(jnp.sum(below), 1)
        if weights is None:
            mean_all = jnp.mean(values)
        else:
            mean_all = jnp.sum(values * w) / jnp.maximum(jnp.sum(w), 1.0)
        return jnp.where(jnp.any(below), mean_below, mean_all)

    return _kept_apart(jax.vmap(background_mean, in_axes=1)(border))


def _kept_apart(value: jax.Array) -> jax.Array:
    """``value`` (float32) unchanged, as an operation XLA:CPU's reduction fusion stops at.

    XLA:CPU may fuse a reduction with the elementwise work that consumes its result,
    which splits the resampling loop that uses the pad value into materialised pieces
    (docs/performance.md). Rounding float32 to float32's own precision is the identity
    and keeps them apart.
    """
    return jax.lax.reduce_precision(value, exponent_bits=8, mantissa_bits=23)
