"""Label-map transforms: one-hot encoding, remapping and connected-component clean-up.

These act on label maps only (intensity images pass through). ``OneHot``,
``RemapLabels``, ``RemoveLabels`` and ``SequentialLabels`` (for ``uint8``/``uint16`` maps)
are jittable. The connected-component transforms (``KeepLargestComponent``,
``FillHoles``, ``RemoveSmallObjects``) are post-processing: they run eagerly on the host
with ``jmed.ops.labels`` (in the loader's ``preprocessing=``, or on a prediction) and
raise ``TypeError`` when traced (``jax.jit``, ``jax.vmap``, ``jax.export``, a jitted
augmentation). A host callback would tie the compiled program to the host: it could not
be sharded, exported or run on an accelerator without a round trip per volume.

Multi-channel label maps are processed channel by channel. Unless ``labels`` is given,
the component transforms treat every nonzero label separately.

Every transform here is padding-aware (exact): on a label map padded to a bucket shape
(``Image.extent``, see ``jmed.buckets``) the valid voxels come out as from the unpadded
map. ``SequentialLabels`` counts the labels present in the valid voxels only; the
component transforms set the padding to 0 (background) first, so that components and
holes end at the extent whatever the padding holds.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jmed import buckets
from jmed.image import LABEL, Image, Subject
from jmed.ops import labels as label_ops
from jmed.ops.crop_pad import valid_mask
from jmed.transforms import params as _params
from jmed.transforms.base import Params, Transform
from jmed.transforms.params import ImageNames

__all__ = [
    "FillHoles",
    "KeepLargestComponent",
    "LabelTransform",
    "OneHot",
    "RemapLabels",
    "RemoveLabels",
    "RemoveSmallObjects",
    "SequentialLabels",
]


def _check_labels(labels: Any, name: str = "labels") -> tuple[int, ...] | None:
    if labels is None:
        return None
    if _params.is_int(labels):
        labels = (labels,)
    try:
        out = tuple(labels)
    except TypeError:
        raise ValueError(f"{name} must be an int or a sequence of ints, got {labels!r}") from None
    if not out or not all(_params.is_int(v) for v in out):
        raise ValueError(f"{name} must be an int or a non-empty sequence of ints, got {labels!r}")
    return tuple(int(v) for v in out)


class LabelTransform(Transform):
    """A transform that acts on label maps only (intensity images pass through)."""

    kinds = (LABEL,)


def _concrete_extent(image) -> tuple[int, int, int] | None:
    extent = image.extent
    if extent is None or _params.is_traced(extent):
        return None
    return tuple(int(v) for v in np.asarray(extent))


# --- encoding and remapping --------------------------------------------------------------


class OneHot(LabelTransform):
    """One channel per class: ``(x, y, z, 1)`` integer labels -> ``(x, y, z, num_classes)``.

    Args:
        num_classes: number of classes (labels ``0 .. num_classes - 1``). ``None`` (or
            ``-1``, TorchIO's spelling) infers it from the labels, as TorchIO does: the
            largest label of the map plus one. Inference needs concrete labels (eager, in
            the loader); under ``jit``/``vmap`` pass ``num_classes``.
        dtype: output dtype (``uint8`` by default; cast to float for losses).

    Jittable with ``num_classes`` given. Eagerly, labels outside ``[0, num_classes)``
    raise ``ValueError``; under ``jit`` they give all-zero voxels. On a padded map only the
    valid voxels are checked (and counted when inferring).

    Raises:
        TypeError: ``num_classes`` is not given and the labels are traced.
    """

    padding_aware = True

    def __init__(
        self,
        num_classes: int | None = None,
        *,
        dtype: Any = jnp.uint8,
        include: ImageNames = None,
        exclude: ImageNames = None,
    ):
        super().__init__(include=include, exclude=exclude)
        if num_classes is not None and not (_params.is_int(num_classes) and num_classes == -1):
            if not _params.is_int(num_classes) or num_classes < 1:
                raise ValueError(f"num_classes must be an int >= 1 or None (infer), got {num_classes!r}")
            num_classes = int(num_classes)
        else:
            num_classes = None
        self.num_classes = num_classes
        self.dtype = jnp.dtype(dtype)

    def apply_image(self, image: Image, params: Params) -> Image:
        if image.num_channels != 1:
            raise ValueError(f"OneHot needs a single-channel label map, got {image.num_channels} channels")
        data = image.data
        num_classes = self.num_classes
        if _params.is_traced(data):
            if num_classes is None:
                raise TypeError(
                    "OneHot() infers the number of classes from the label values, which are traced "
                    "here (inside jit/vmap): pass num_classes, e.g. OneHot(num_classes=4)"
                )
        else:
            values = np.asarray(data)
            extent = _concrete_extent(image)
            if extent is not None:
                values = values[: extent[0], : extent[1], : extent[2]]
            if num_classes is None:
                if values.size and values.min() < 0:
                    raise ValueError(f"OneHot: labels must be >= 0, got a minimum of {values.min()}")
                num_classes = int(values.max()) + 1 if values.size else 1
            if values.size and (values.min() < 0 or values.max() >= num_classes):
                raise ValueError(
                    f"OneHot(num_classes={num_classes}): labels must be in [0, {num_classes}), "
                    f"got values in [{values.min()}, {values.max()}]"
                )
        out = jax.nn.one_hot(jnp.asarray(data)[..., 0], num_classes, dtype=self.dtype)
        return image.replace(data=out)


class RemapLabels(LabelTransform):
    """Replace labels according to ``mapping`` (``{old: new}``, applied simultaneously).

    Labels not in the mapping are kept. Jittable. Invertible when the mapping is
    one-to-one (and no new label collides with a kept one).
    """

    padding_aware = True

    def __init__(self, mapping: Mapping[int, int], *, include: ImageNames = None, exclude: ImageNames = None):
        super().__init__(include=include, exclude=exclude)
        if not isinstance(mapping, Mapping) or not all(
            _params.is_int(k) and _params.is_int(v) for k, v in mapping.items()
        ):
            raise ValueError(f"mapping must be a dict of int labels to int labels, got {mapping!r}")
        self.mapping = {int(k): int(v) for k, v in mapping.items()}
        new = list(self.mapping.values())
        kept_collision = set(new) - set(self.mapping)
        self.invertible = len(set(new)) == len(new) and not kept_collision

    def _remap(self, subject, mapping):
        out = {}
        for name in self.selected(subject):
            image = subject[name]
            data = jnp.asarray(image.data)
            result = data
            for old, new in mapping.items():
                result = jnp.where(data == old, jnp.asarray(new, data.dtype), result)
            out[name] = image.replace(data=result)
        return subject.replace(out)

    def apply(self, subject: Subject, params: Params) -> Subject:
        return self._remap(subject, self.mapping)

    def inverse(self, subject: Subject, params: Params) -> Subject:
        if not self.invertible:
            raise TypeError(f"RemapLabels({self.mapping}) is not one-to-one, so not invertible")
        return self._remap(subject, {v: k for k, v in self.mapping.items()})


class RemoveLabels(RemapLabels):
    """Set ``labels`` to ``background_label`` (0 by default). Jittable, not invertible."""

    def __init__(
        self,
        labels: int | Sequence[int],
        background_label: int = 0,
        *,
        include: ImageNames = None,
        exclude: ImageNames = None,
    ):
        labels = _check_labels(labels)
        if not _params.is_int(background_label):
            raise ValueError(f"background_label must be an int, got {background_label!r}")
        super().__init__({label: int(background_label) for label in labels}, include=include, exclude=exclude)
        self.labels = labels
        self.invertible = False


class SequentialLabels(LabelTransform):
    """Renumber the labels present as ``0, 1, ..., n - 1``, keeping their order.

    The smallest label present becomes 0 (so background 0 stays 0). Eager on any integer
    map; under ``jit`` (present labels unknown at trace time) it needs a ``uint8`` or
    ``uint16`` map, or ``max_label`` (labels must then lie in ``[0, max_label]``). On a
    padded map only the labels present in the valid voxels count (the padded voxels of the
    output hold unspecified values).
    """

    padding_aware = True

    def __init__(
        self, *, max_label: int | None = None, include: ImageNames = None, exclude: ImageNames = None
    ):
        super().__init__(include=include, exclude=exclude)
        if max_label is not None and (not _params.is_int(max_label) or max_label < 0):
            raise ValueError(f"max_label must be a non-negative int or None, got {max_label!r}")
        self.max_label = max_label

    def apply_image(self, image: Image, params: Params) -> Image:
        data = image.data
        if not _params.is_traced(data) and not _params.is_traced(image.extent):
            values = np.asarray(data)
            extent = _concrete_extent(image)
            if extent is None:
                unique, inverse = np.unique(values, return_inverse=True)
                return image.replace(data=inverse.reshape(values.shape).astype(values.dtype))
            unique = np.unique(values[: extent[0], : extent[1], : extent[2]])
            rank = np.clip(np.searchsorted(unique, values, side="right") - 1, 0, None)
            return image.replace(data=rank.astype(values.dtype))
        if self.max_label is not None:
            size = self.max_label + 1
        elif data.dtype in (jnp.uint8, jnp.uint16):
            size = int(jnp.iinfo(data.dtype).max) + 1
        else:
            raise TypeError(
                f"SequentialLabels under jit needs a uint8/uint16 label map or max_label=..., got dtype "
                f"{data.dtype}; or run it eagerly in the loader"
            )
        index = jnp.clip(jnp.asarray(data).astype(jnp.int32), 0, size - 1)
        if image.extent is None:
            present = jnp.zeros(size, bool).at[index.reshape(-1)].set(True)
        else:
            # padding voxels go to a slot past the end, which is dropped
            valid = valid_mask(image.spatial_shape, image.extent)
            slots = jnp.where(valid, index, size).reshape(-1)
            present = jnp.zeros(size + 1, bool).at[slots].set(True)[:size]
        lookup = (jnp.cumsum(present) - 1).astype(data.dtype)
        return image.replace(data=lookup[index])


# --- connected components ----------------------------------------------------------------


class _ComponentTransform(LabelTransform):
    def __init__(
        self,
        *,
        labels: int | Sequence[int] | None = None,
        connectivity: int = 6,
        include: ImageNames = None,
        exclude: ImageNames = None,
    ):
        super().__init__(include=include, exclude=exclude)
        self.labels = _check_labels(labels)
        self.connectivity = label_ops.check_connectivity(connectivity)

    def process(self, volume: np.ndarray) -> np.ndarray:
        """One channel ``(x, y, z)`` -> cleaned channel (same dtype)."""
        raise NotImplementedError

    def _labels_in(self, volume: np.ndarray) -> list[int]:
        if self.labels is not None:
            return list(self.labels)
        small = volume.dtype.kind in "iub" and volume.size and volume.min() >= 0 and volume.max() < 1 << 20
        if small:
            # counting is much cheaper than np.unique's sort for small non-negative labels
            present = np.flatnonzero(np.bincount(volume.reshape(-1).astype(np.int64, copy=False)))
        else:
            present = np.unique(volume)
        return [int(v) for v in present if v != 0]

    def _host(self, data: np.ndarray) -> np.ndarray:
        out = np.array(data, copy=True)
        for c in range(data.shape[-1]):
            out[..., c] = self.process(data[..., c])
        return out

    padding_aware = True

    def apply_image(self, image: Image, params: Params) -> Image:
        data = image.data
        if _params.is_traced(data) or _params.is_traced(image.extent):
            if buckets.is_predicting_shapes():
                return image  # the output has the input's shape and dtype
            raise TypeError(
                f"{type(self).__name__} computes connected components on the host and cannot be "
                "traced (jax.jit, jax.vmap, jax.export, or a jitted augmentation): call it eagerly, "
                "outside jit/vmap, on concrete arrays, e.g. in the loader's preprocessing= or on a "
                "prediction after inference"
            )
        data = np.asarray(data)
        extent = _concrete_extent(image)
        if extent is not None:
            # components must end at the extent: the padding becomes background
            data = data.copy()
            data[extent[0] :] = 0
            data[:, extent[1] :] = 0
            data[:, :, extent[2] :] = 0
        return image.replace(data=self._host(data))


class KeepLargestComponent(_ComponentTransform):
    """Keep, for each label, only its largest connected component (others -> 0).

    Args:
        labels: labels to process (others untouched); all nonzero labels by default.
        connectivity: 6 (faces, as TorchIO/SimpleITK's default), 18 (faces and edges) or 26.

    Eager only: computed on the host from concrete arrays (the loader's
    ``preprocessing=``, a prediction after inference). Traced (``jax.jit``, ``jax.vmap``,
    ``jax.export``, the loader's jitted ``augmentation=``) it raises ``TypeError``.

    Examples:
        >>> import numpy as np, jmed
        >>> seg = np.zeros((6, 1, 1), np.uint8); seg[[0, 2, 3, 5]] = 1
        >>> KeepLargestComponent()(jmed.LabelMap(seg)).data[:, 0, 0, 0].tolist()
        [0, 0, 1, 1, 0, 0]
    """

    def process(self, volume):
        out = volume.copy()
        for label in self._labels_in(volume):
            mask = volume == label
            out[mask & ~label_ops.keep_largest(mask, connectivity=self.connectivity)] = 0
        return out


class RemoveSmallObjects(_ComponentTransform):
    """Remove (set to 0) connected components of fewer than ``min_size`` voxels, per label.

    Args:
        min_size: smallest component kept, in voxels.
        labels, connectivity: as ``KeepLargestComponent``.

    Eager only: computed on the host from concrete arrays (the loader's
    ``preprocessing=``, a prediction after inference). Traced (``jax.jit``, ``jax.vmap``,
    ``jax.export``, the loader's jitted ``augmentation=``) it raises ``TypeError``.
    """

    def __init__(
        self,
        min_size: int,
        *,
        labels: int | Sequence[int] | None = None,
        connectivity: int = 6,
        include: ImageNames = None,
        exclude: ImageNames = None,
    ):
        super().__init__(labels=labels, connectivity=connectivity, include=include, exclude=exclude)
        if not _params.is_int(min_size) or min_size < 1:
            raise ValueError(f"min_size must be an int >= 1, got {min_size!r}")
        self.min_size = int(min_size)

    def process(self, volume):
        out = volume.copy()
        for label in self._labels_in(volume):
            components, num = label_ops.connected_components(volume == label, connectivity=self.connectivity)
            if num == 0:
                continue
            small = np.concatenate([[False], label_ops.component_sizes(components, num) < self.min_size])
            out[small[components]] = 0
        return out


class FillHoles(_ComponentTransform):
    """Fill holes of each label: enclosed background regions become that label.

    A hole of label ``l`` is a connected component (``connectivity``) of voxels other
    than ``l`` that does not touch the volume's border and holds only background (0):
    regions containing another label are left alone.

    Args:
        labels, connectivity: as ``KeepLargestComponent`` (connectivity of the holes).

    Eager only: computed on the host from concrete arrays (the loader's
    ``preprocessing=``, a prediction after inference). Traced (``jax.jit``, ``jax.vmap``,
    ``jax.export``, the loader's jitted ``augmentation=``) it raises ``TypeError``.
    """

    def process(self, volume):
        out = volume.copy()
        background = volume == 0
        for label in self._labels_in(volume):
            mask = volume == label
            filled = label_ops.fill_holes(mask, connectivity=self.connectivity, fillable=background | mask)
            out[filled & ~mask] = label
        return out
