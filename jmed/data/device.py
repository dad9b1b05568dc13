"""Device pipeline: augment a batch of volumes and sample patches inside a jitted step."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

from jmed.image import Subject
from jmed.sampling import PatchSampler

__all__ = ["augment_and_sample"]


def _sharded_like(keys: jax.Array, leaf: Any) -> jax.Array:
    """``keys`` split over the devices along their first axis as ``leaf``'s first axis is,
    when that axis is sharded over an explicit mesh axis: ``vmap`` needs the batch axes
    of its inputs sharded alike there (the keys split from one key are replicated)."""
    sharding = getattr(jax.typeof(leaf), "sharding", None)
    spec = getattr(sharding, "spec", None)
    if not spec or spec[0] is None:
        return keys
    return jax.sharding.reshard(
        keys, jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(spec[0]))
    )


def augment_and_sample(
    key: jax.Array,
    batch: Subject,
    *,
    sampler: PatchSampler,
    num_patches: int,
    augmentation: Callable | None = None,
) -> Subject:
    """Augment a batch of volumes and draw patches from each, on the accelerator.

    ``vmap(augmentation)`` then ``vmap(sampler)`` with one key per volume (split from
    ``key``), flattened to ``batch_size * num_patches`` patches: patch ``j`` of volume
    ``i`` is item ``i * num_patches + j``. Jittable (``sampler``, ``num_patches`` and
    ``augmentation`` are static configuration: close over them or use ``partial``).
    Only numeric metadata may be present (drop strings before ``jit``). A batch sharded
    along its first axis over a device mesh (``Auto`` or ``Explicit`` axes) stays sharded:
    each device augments its volumes and samples their patches, with the same result as
    on one device.

    Args:
        key: a JAX key.
        batch: batched ``Subject`` (leading batch axis), e.g. from ``VolumeLoader``.
        sampler: a jmed patch sampler.
        num_patches: patches per volume (static).
        augmentation: random jmed transform, or None.

    Returns:
        a patch ``Subject`` with leading axis ``batch_size * num_patches``; its metadata
        holds ``location`` ``(b * n, 6)`` and the batch's numeric metadata repeated per
        patch.
    """
    if not isinstance(sampler, PatchSampler):
        raise TypeError(f"sampler must be a jmed patch sampler, got {sampler!r}")
    first = jax.tree.leaves(batch)[0]
    batch_size = first.shape[0]
    keys = _sharded_like(jax.random.split(key, batch_size), first)

    def one(k, subject):
        k_aug, k_sample = jax.random.split(k)
        if augmentation is not None:
            subject = augmentation(k_aug, subject)
        return sampler(k_sample, subject.without_history(), num_patches)

    patches = jax.vmap(one)(keys, batch)
    return jax.tree.map(lambda x: x.reshape(batch_size * num_patches, *x.shape[2:]), patches)
