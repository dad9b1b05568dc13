"""Patch samplers: uniform, weighted, label-balanced, and grid locations for inference.

A random sampler is called as ``sampler(key, subject, num_patches)`` and returns a
``Subject`` with the same image names whose every leaf has a leading patch axis:

- each image's ``data`` is ``(num_patches, px, py, pz, c)`` (channels last);
- each image's ``affine`` is ``(num_patches, 4, 4)``: the source affine with its origin
  moved to the patch's first voxel, so a patch keeps its world position;
- ``metadata["location"]`` is an int32 array ``(num_patches, 6)`` holding
  ``(i0, j0, k0, i1, j1, k1)``: start (inclusive) and stop (exclusive) voxel indices of
  the patch in the source volume, as TorchIO's ``location``;
- numeric metadata of the source subject is repeated along the patch axis; string
  metadata is kept as is. The history is dropped.

``patch_size`` and ``num_patches`` are static: samplers run eagerly, under ``jit`` (pass
``num_patches`` as a static argument or close over it) and under ``vmap`` (one key and
one subject per batch item). Patches always lie inside the volume. A volume smaller than
the patch along some axis raises a ``ValueError`` at trace time: pad it first (e.g. with a
crop-or-pad preprocessing step).

A patch's position is drawn through its *centre* voxel ``start + patch_size // 2`` (as in
TorchIO): probability maps and label maps are read at the centre, and only centres whose
patch fits in the volume are eligible. Drawing from a probability map never loops in
Python: a two-level inverse-CDF draw (a block of voxels, then a voxel within the block)
keeps float32 cumulative sums accurate on volumes of millions of voxels.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from jmed import affine as affine_lib
from jmed._checks import int_triple, is_int
from jmed.image import Image, Subject
from jmed.ops.crop_pad import valid_mask
from jmed.ops.histogram import count_true
from jmed.transforms import _values

__all__ = [
    "GridPatchSampler",
    "LabelSampler",
    "PatchSampler",
    "UniformSampler",
    "WeightedSampler",
    "extract_patches",
    "grid_locations",
]


def _patch_size(value: Any, name: str = "patch_size") -> tuple[int, int, int]:
    return int_triple(value, name, minimum=1)


def _num_patches(value: Any) -> int:
    if not is_int(value) or value < 1:
        raise ValueError(f"num_patches must be a positive int (static), got {value!r}")
    return int(value)


def _check_fits(spatial_shape: Sequence[int], patch_size: Sequence[int]) -> None:
    if any(p > s for p, s in zip(patch_size, spatial_shape)):
        raise ValueError(
            f"patch_size {tuple(patch_size)} is larger than the volume {tuple(spatial_shape)} "
            "along some axis; pad the volume first (e.g. a crop-or-pad preprocessing step)"
        )


def _check_one_grid(subject: Subject, who: str) -> None:
    """Images of different shapes or (concrete) affines cannot share patch locations."""
    if len(subject) < 2:
        return
    try:
        subject.check_consistent()
    except ValueError as err:
        raise ValueError(f"{who} needs the images of a subject on one grid: {err}") from None


def extract_patches(subject: Subject, starts: ArrayLike, patch_size: Sequence[int]) -> Subject:
    """Cut patches starting at ``starts`` ``(n, 3)`` from every image of ``subject``.

    Jittable and vmappable (``starts`` may be traced; ``patch_size`` is static). Returns the
    patch ``Subject`` described in the module docstring.

    Raises:
        ValueError: the images differ in spatial shape, or in affine (compared only when
            the affines are concrete, not under ``jit``).
    """
    patch_size = _patch_size(patch_size)
    _check_one_grid(subject, "extract_patches")
    _check_fits(subject.spatial_shape, patch_size)
    starts = jnp.asarray(starts, jnp.int32)
    n = starts.shape[0]

    def cut(data):
        # gathering 3D patches and adding the channel axis afterwards makes XLA:CPU copy
        # the whole float output once more; gathering channels-last directly does not
        size = (*patch_size, data.shape[-1])
        return jax.vmap(lambda s: jax.lax.dynamic_slice(data, (s[0], s[1], s[2], 0), size))(starts)

    def move(affine):
        affine = jnp.asarray(affine)
        return jax.vmap(lambda s: affine_lib.translate_voxels(affine, s.astype(affine.dtype)))(starts)

    images = {
        name: image.replace(data=cut(jnp.asarray(image.data)), affine=move(image.affine))
        for name, image in subject.items()
    }
    metadata = {}
    for k, v in subject.metadata.items():
        if isinstance(v, (str, bytes, bool)) or v is None:
            metadata[k] = v
        else:
            v = jnp.asarray(v)
            metadata[k] = jnp.broadcast_to(v, (n, *v.shape))
    metadata["location"] = jnp.concatenate([starts, starts + jnp.asarray(patch_size, jnp.int32)], axis=1)
    return Subject(images, metadata=metadata)


class PatchSampler(_values.Value):
    """Base class of random patch samplers.

    Subclasses implement ``starts(key, subject, num_patches) -> (num_patches, 3)`` int32
    start indices; ``__call__`` extracts the patches.

    Samplers are immutable values, as transforms are: attributes are set in ``__init__``
    only, samplers of the same class with equal public attributes compare equal and hash
    alike (so they share one compiled program), and the ``repr`` has no memory address.

    Args:
        patch_size: patch shape in voxels, an int (cube) or three ints.
    """

    def __init__(self, patch_size: int | Sequence[int]):
        self.patch_size = _patch_size(patch_size)

    def starts(self, key: ArrayLike, subject: Subject, num_patches: int) -> jax.Array:
        raise NotImplementedError

    def __call__(self, key: ArrayLike, subject: Subject, num_patches: int) -> Subject:
        """Draw ``num_patches`` patches from ``subject`` (see the module docstring)."""
        if not isinstance(subject, Subject):
            raise TypeError(f"samplers take a jmed.Subject, got {type(subject).__name__}")
        num_patches = _num_patches(num_patches)
        _check_one_grid(subject, type(self).__name__)
        _check_fits(subject.spatial_shape, self.patch_size)
        # one compiled program also when called eagerly (op-by-op dispatch is slow)
        return _sample_jit(self, key, subject, num_patches)

    def _valid_shape(self, subject: Subject) -> Any:
        """Number of valid start positions per axis (traced for a padded subject, whose
        patches stay inside its ``extent``)."""
        extent = subject.extent
        if extent is None:
            return tuple(s - p + 1 for s, p in zip(subject.spatial_shape, self.patch_size))
        return jnp.asarray(extent, jnp.int32) - jnp.asarray(self.patch_size, jnp.int32) + 1

    def _eligible(self, subject: Subject, centres: jax.Array) -> jax.Array:
        """``centres`` (a map cut by ``_crop_to_centres``) with the centres whose patch
        would leave a padded subject's ``extent`` set to 0 / False; unchanged otherwise."""
        if subject.extent is None:
            return centres
        mask = valid_mask(centres.shape, self._valid_shape(subject))[..., 0]
        return jnp.where(mask, centres, jnp.zeros((), centres.dtype))

    def _crop_to_centres(self, volume: jax.Array) -> jax.Array:
        """The part of a ``(x, y, z)`` map whose voxels are valid patch centres; its voxel
        ``v`` is the centre of the patch starting at ``v``."""
        lo = [p // 2 for p in self.patch_size]
        valid = [s - p + 1 for s, p in zip(volume.shape, self.patch_size)]
        return volume[lo[0] : lo[0] + valid[0], lo[1] : lo[1] + valid[1], lo[2] : lo[2] + valid[2]]

    def __repr__(self) -> str:
        fields = ", ".join(
            f"{k}={_values.display(v)}" for k, v in vars(self).items() if not k.startswith("_")
        )
        return f"{type(self).__name__}({fields})"


@functools.partial(jax.jit, static_argnums=(0, 3))
def _sample_jit(sampler: PatchSampler, key: Any, subject: Subject, num_patches: int) -> Subject:
    return extract_patches(subject, sampler.starts(key, subject, num_patches), sampler.patch_size)


def _uniform_starts(u: jax.Array, valid: Sequence[int]) -> jax.Array:
    """Uniform start indices from uniforms ``u`` ``(n, 3)`` in ``[0, 1)``."""
    valid = jnp.asarray(valid, jnp.int32)
    return jnp.minimum(jnp.floor(u * valid).astype(jnp.int32), valid - 1)


class UniformSampler(PatchSampler):
    """Patches at uniformly random positions (every valid start equally likely).

    Examples:
        >>> import jax, numpy as np, jmed
        >>> s = jmed.Subject(t1=jmed.ScalarImage(np.zeros((10, 10, 10), np.float32)))
        >>> patches = jmed.UniformSampler(4)(jax.random.key(0), s, 3)
        >>> patches["t1"].shape, patches.metadata["location"].shape
        ((3, 4, 4, 4, 1), (3, 6))
    """

    def starts(self, key, subject, num_patches):
        # one uniform draw per number: each random primitive adds compile time
        return _uniform_starts(jax.random.uniform(key, (num_patches, 3)), self._valid_shape(subject))


def _block_size(n: int) -> int:
    return int(max(256, 2 ** math.ceil(math.log2(max(math.isqrt(n), 1)))))


def _draw_from_weights(u: jax.Array, weights: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Draw flat indices with probability proportional to ``weights`` (flat, >= 0).

    ``u`` ``(num, 2)`` holds uniforms in ``[0, 1)`` (one for the block, one within it).

    Two levels (block, then voxel in block) keep float32 cumulative sums accurate.
    Returns ``(indices, total)``; when ``total`` is 0 the indices are meaningless.
    """
    n = weights.shape[0]
    size = _block_size(n)
    num_blocks = -(-n // size)
    w = jnp.pad(weights.astype(jnp.float32), (0, num_blocks * size - n)).reshape(num_blocks, size)
    block_cdf = jnp.cumsum(w.sum(axis=1))
    total = block_cdf[-1]
    u_block, u_voxel = u[:, 0], u[:, 1]

    def one(ub, uv):
        r = jnp.minimum(ub * total, jnp.nextafter(total, jnp.float32(0)))
        block = jnp.minimum(
            jnp.searchsorted(block_cdf, r, side="right", method="compare_all"), num_blocks - 1
        )
        row = jax.lax.dynamic_index_in_dim(w, block, axis=0, keepdims=False)
        cdf = jnp.cumsum(row)
        r = jnp.minimum(uv * cdf[-1], jnp.nextafter(cdf[-1], jnp.float32(0)))
        pos = jnp.minimum(jnp.searchsorted(cdf, r, side="right", method="compare_all"), size - 1)
        return block * size + pos

    return jax.vmap(one)(u_block, u_voxel), total


def _unravel(flat: jax.Array, shape: Sequence[int]) -> jax.Array:
    return jnp.stack(jnp.unravel_index(flat, tuple(shape)), axis=-1).astype(jnp.int32)


def _draw_by_class(
    u: jax.Array, classes: jax.Array, class_weights: np.ndarray
) -> tuple[jax.Array, jax.Array]:
    """Draw voxels of a class map ``(x, y, z)`` (values ``0..K-1``, ``-1`` none).

    ``u`` ``(num, 2)`` holds uniforms in ``[0, 1)`` (one for the class, one for the voxel).

    A class is drawn with probability proportional to ``class_weights`` among the classes
    present, then a voxel uniformly among that class's voxels: the ``u``-th voxel is found
    with exact integer counts per block of voxels, then within its block. Returns
    ``(indices (num, 3), ok)``; ``ok`` is False when no weighted class is present.
    """
    num_classes = len(class_weights)
    flat = classes.reshape(-1)
    n = flat.shape[0]
    # blocks of whole rows along the last axis: per-row class counts are plain reductions
    # (faster on CPU than a scatter-add over every voxel), then summed per block
    num_rows = classes.shape[0] * classes.shape[1]
    rows_per_block = max(1, _block_size(n) // max(classes.shape[2], 1))
    size = rows_per_block * classes.shape[2]
    num_blocks = -(-num_rows // rows_per_block)
    # all classes in one pass over the map
    row_counts = jnp.stack(count_true([classes == c for c in range(num_classes)], axes=(2,)), -1)
    row_counts = jnp.pad(
        row_counts.reshape(num_rows, num_classes), ((0, num_blocks * rows_per_block - num_rows), (0, 0))
    )
    block_counts = row_counts.reshape(num_blocks, rows_per_block, num_classes).sum(axis=1)
    counts = block_counts.sum(axis=0)
    q = jnp.where(counts > 0, jnp.asarray(class_weights, jnp.float32), 0.0)
    ok = q.sum() > 0
    class_cdf = jnp.cumsum(q)
    r = u[:, 0] * class_cdf[-1]
    chosen = jnp.minimum(jnp.searchsorted(class_cdf, r, side="right", method="compare_all"), num_classes - 1)
    count = jnp.maximum(counts[chosen], 1)
    ranks = jnp.minimum(jnp.floor(u[:, 1] * count).astype(jnp.int32), count - 1)

    # the u-th voxel of its class: the block by exact counts, then the voxel in the block
    columns = block_counts[:, chosen]  # (num_blocks, num)
    cdf = jnp.cumsum(columns, axis=0)
    block = jnp.minimum(jnp.sum(cdf <= ranks, axis=0), num_blocks - 1)
    before = jnp.take_along_axis(cdf - columns, block[None], axis=0)[0]
    # the rows of the chosen blocks, gathered from the flat class map (padding: -1)
    offsets = block[:, None] * size + jnp.arange(size, dtype=jnp.int32)
    rows = jnp.where(offsets < n, flat[jnp.minimum(offsets, n - 1)], -1)  # (num, size)
    row_cdf = jnp.cumsum((rows == chosen[:, None]).astype(jnp.int32), axis=1)
    pos = jnp.minimum(jnp.sum(row_cdf <= (ranks - before)[:, None], axis=1), size - 1)
    index = block * size + pos
    return _unravel(index, classes.shape), ok


def _image_of(subject: Subject, name: str | None, what: str, label: bool) -> Image:
    if name is None:
        names = subject.names_of_kind("label") if label else list(subject)
        if len(names) != 1:
            raise ValueError(
                f"{what} is None and the subject has {len(names)} candidate images {names}; "
                f"name the image to use with {what}="
            )
        name = names[0]
    if name not in subject:
        raise KeyError(f"{what}={name!r} is not an image of the subject; images: {list(subject)}")
    return subject[name]


class WeightedSampler(PatchSampler):
    """Patches whose centre is drawn with probability proportional to a map.

    Args:
        patch_size: patch shape in voxels.
        probability_map: name of the image in the subject holding non-negative weights
            (first channel used). Weights need not be normalised. Only centres whose
            patch fits are eligible (as TorchIO, the map's borders are ignored).

    If every eligible weight is zero (not checkable under ``jit``), locations are uniform.
    """

    def __init__(self, patch_size: int | Sequence[int], probability_map: str):
        super().__init__(patch_size)
        if not isinstance(probability_map, str):
            raise TypeError(f"probability_map must be an image name, got {probability_map!r}")
        self.probability_map = probability_map

    def _weights(self, subject: Subject) -> jax.Array:
        image = _image_of(subject, self.probability_map, "probability_map", label=False)
        return self._crop_to_centres(jnp.asarray(image.data)[..., 0]).astype(jnp.float32)

    def starts(self, key, subject, num_patches):
        weights = self._eligible(subject, jnp.maximum(self._weights(subject), 0.0))
        u = jax.random.uniform(key, (num_patches, 5))
        flat, total = _draw_from_weights(u[:, :2], weights.reshape(-1))
        fallback = _uniform_starts(u[:, 2:], self._valid_shape(subject))
        return jnp.where(total > 0, _unravel(flat, weights.shape), fallback)


class LabelSampler(PatchSampler):
    """Label-balanced patches (TorchIO's ``LabelSampler``), optionally nnU-Net style.

    Each class ``c`` gets total probability ``p_c / sum(p)``, spread uniformly over the
    eligible centre voxels of that class, so rare classes are oversampled. Classes with no
    eligible voxel are left out and the others renormalised.

    Args:
        patch_size: patch shape in voxels.
        label_name: the label map to read (single channel of integer labels, or one
            channel per class, then ``argmax`` gives the label). ``None``: the subject's
            only label map.
        label_probabilities: ``{label value: weight}``. ``None`` binarises the map
            (``{0: 0, 1: 1}`` on ``label > 0``): centres are uniform over foreground.
        foreground_fraction: nnU-Net's oversampling. When set, the last
            ``ceil(foreground_fraction * num_patches)`` patches are centred on a
            foreground voxel (``label > 0``; class drawn by ``label_probabilities``
            restricted to non-zero labels if given, then a voxel of that class) and the
            other patches are uniformly random.

    If no eligible voxel has a requested class (not checkable under ``jit``), locations
    are uniform.

    Examples:
        >>> import jax, numpy as np, jmed
        >>> seg = np.zeros((20, 20, 20), np.uint8); seg[12, 5, 7] = 1
        >>> s = jmed.Subject(seg=jmed.LabelMap(seg))
        >>> p = jmed.LabelSampler(5)(jax.random.key(0), s, 2)
        >>> p.metadata["location"].tolist()   # centre (12, 5, 7) = start + 5 // 2
        [[10, 3, 5, 15, 8, 10], [10, 3, 5, 15, 8, 10]]
    """

    def __init__(
        self,
        patch_size: int | Sequence[int],
        label_name: str | None = None,
        label_probabilities: Mapping[int, float] | None = None,
        *,
        foreground_fraction: float | None = None,
    ):
        super().__init__(patch_size)
        if label_name is not None and not isinstance(label_name, str):
            raise TypeError(f"label_name must be an image name or None, got {label_name!r}")
        self.label_name = label_name
        if label_probabilities is not None:
            if not isinstance(label_probabilities, Mapping) or not label_probabilities:
                raise ValueError(
                    f"label_probabilities must be a non-empty mapping {{label: weight}}, got {label_probabilities!r}"
                )
            items = []
            for label, weight in label_probabilities.items():
                if isinstance(label, bool) or not isinstance(label, (int, np.integer)):
                    raise ValueError(f"label_probabilities keys must be integer labels, got {label!r}")
                if not (np.isfinite(weight) and weight >= 0):
                    raise ValueError(f"label_probabilities weights must be >= 0, got {label}: {weight!r}")
                items.append((int(label), float(weight)))
            if sum(w for _, w in items) <= 0:
                raise ValueError(
                    f"label_probabilities must have a positive weight, got {label_probabilities!r}"
                )
            label_probabilities = dict(items)
        self.label_probabilities = label_probabilities
        if foreground_fraction is not None:
            f = float(foreground_fraction)
            if not 0.0 <= f <= 1.0:
                raise ValueError(f"foreground_fraction must be in [0, 1], got {foreground_fraction!r}")
            if label_probabilities is not None and not any(
                w > 0 for k, w in label_probabilities.items() if k != 0
            ):
                raise ValueError("foreground_fraction needs a positive weight on a non-zero label")
            foreground_fraction = f
        self.foreground_fraction = foreground_fraction

    def _classes(self, subject: Subject) -> tuple[jax.Array, np.ndarray, np.ndarray]:
        """Class map over eligible centres (-1: no class), class weights, class labels."""
        image = _image_of(subject, self.label_name, "label_name", label=True)
        data = jnp.asarray(image.data)
        labels = data[..., 0] if data.shape[-1] == 1 else jnp.argmax(data, axis=-1)
        labels = self._crop_to_centres(labels)
        if self.label_probabilities is None:
            classes, weights, values = (labels > 0).astype(jnp.int32), np.array([0.0, 1.0]), np.array([0, 1])
        else:
            values = np.array(list(self.label_probabilities), np.int64)
            weights = np.array(list(self.label_probabilities.values()), np.float64)
            classes = jnp.full(labels.shape, -1, jnp.int32)
            for i, v in enumerate(values):
                classes = jnp.where(labels == v, i, classes)
        if subject.extent is not None:
            # centres of patches that would leave the valid region belong to no class
            mask = valid_mask(classes.shape, self._valid_shape(subject))[..., 0]
            classes = jnp.where(mask, classes, -1)
        return classes, weights, values

    def _draw(self, u, classes, class_weights):
        return _draw_by_class(u, classes, class_weights)

    def starts(self, key, subject, num_patches):
        classes, weights, values = self._classes(subject)
        valid = self._valid_shape(subject)
        u = jax.random.uniform(key, (num_patches, 5))
        uniform = _uniform_starts(u[:, 2:], valid)
        if self.foreground_fraction is None:
            starts, ok = self._draw(u[:, :2], classes, weights)
            return jnp.where(ok, starts, uniform)
        num_forced = math.ceil(self.foreground_fraction * num_patches)
        if num_forced == 0:
            return uniform
        fg_weights = np.where(values != 0, weights, 0.0)
        if self.label_probabilities is None:
            fg_weights = np.array([0.0, 1.0])
        forced, ok = self._draw(u[-num_forced:, :2], classes, fg_weights)
        forced = jnp.where(ok, forced, uniform[-num_forced:])
        return jnp.concatenate([uniform[: num_patches - num_forced], forced], axis=0)


def grid_locations(
    spatial_shape: Sequence[int], patch_size: int | Sequence[int], overlap: int | Sequence[int] = 0
) -> np.ndarray:
    """Start indices of a regular grid of patches covering a volume (static numpy).

    Per axis, starts are ``0, stride, 2 * stride, ...`` with ``stride = patch - overlap``,
    kept while ``start + patch <= shape``, plus ``shape - patch`` so the last patch ends at
    the volume's border; the list is sorted and duplicates removed (the first start is
    always 0, the last always ``shape - patch``). The result is every combination of the
    per-axis starts, in C order (first axis slowest), as an int64 array ``(n, 3)``.

    Args:
        spatial_shape: volume shape ``(x, y, z)``.
        patch_size: patch shape, an int or three ints, each ``<= shape`` (pad first).
        overlap: voxels shared by neighbouring patches, an int or three ints,
            ``0 <= overlap < patch``.

    Raises:
        ValueError: a patch larger than the volume, or a bad overlap.

    Examples:
        >>> grid_locations((10, 4, 4), (4, 4, 4), (1, 0, 0))[:, 0].tolist()
        [0, 3, 6]
        >>> grid_locations((9, 4, 4), 4, 0)[:, 0].tolist()
        [0, 4, 5]
    """
    shape = tuple(int(s) for s in spatial_shape)
    if len(shape) != 3:
        raise ValueError(f"spatial_shape must have 3 values, got {spatial_shape!r}")
    patch = _patch_size(patch_size)
    overlap = int_triple(overlap, "overlap", minimum=0)
    if any(o >= p for o, p in zip(overlap, patch)):
        raise ValueError(f"overlap must be 3 ints with 0 <= overlap < patch_size {patch}, got {overlap!r}")
    _check_fits(shape, patch)
    per_axis = [_axis_starts(s, p, o) for s, p, o in zip(shape, patch, overlap)]
    return np.array(list(itertools.product(*per_axis)), dtype=np.int64).reshape(-1, 3)


def _axis_starts(length: int, patch: int, overlap: int) -> np.ndarray:
    """Window starts along one axis (the rule of ``grid_locations``), int64.

    The one source of grid positions: ``jmed.inference`` plans its windows with it.
    ``length >= patch`` and ``0 <= overlap < patch``.
    """
    starts = list(range(0, length - patch + 1, patch - overlap))
    if starts[-1] != length - patch:
        starts.append(length - patch)
    return np.asarray(starts, dtype=np.int64)


class GridPatchSampler(_values.Value):
    """All patches of a regular grid as one patch ``Subject`` (for the loader or a jitted
    loop). ``jmed.GridSampler`` is the TorchIO-style sampler that pairs with
    ``jmed.GridAggregator``. An immutable value, as ``PatchSampler``.

    Args:
        patch_size: patch shape in voxels (an int or three ints).
        overlap: voxels shared by neighbouring patches (see ``grid_locations``).

    ``sampler(subject)`` returns every grid patch as a patch ``Subject`` (see the module
    docstring); ``sampler.locations(spatial_shape)`` gives their ``(n, 6)`` locations.
    Locations are static numpy, so the number of patches is known before tracing.

    Examples:
        >>> import numpy as np, jmed
        >>> s = jmed.Subject(t1=jmed.ScalarImage(np.zeros((8, 8, 6), np.float32)))
        >>> jmed.GridPatchSampler(4, overlap=0)(s)["t1"].shape
        (8, 4, 4, 4, 1)
    """

    def __init__(self, patch_size: int | Sequence[int], overlap: int | Sequence[int] = 0):
        self.patch_size = _patch_size(patch_size)
        grid_locations(self.patch_size, self.patch_size, overlap)  # validates overlap
        self.overlap = overlap

    def locations(self, spatial_shape: Sequence[int]) -> np.ndarray:
        starts = grid_locations(spatial_shape, self.patch_size, self.overlap)
        return np.concatenate([starts, starts + np.array(self.patch_size)], axis=1)

    def __call__(self, subject: Subject) -> Subject:
        _check_one_grid(subject, type(self).__name__)
        starts = grid_locations(subject.spatial_shape, self.patch_size, self.overlap)
        return extract_patches(subject, starts, self.patch_size)

    def __repr__(self) -> str:
        return f"GridPatchSampler(patch_size={self.patch_size}, overlap={self.overlap!r})"
