"""Fast Gaussian noise fields: a keyed counter hash instead of ``jax.random``'s Threefry.

Adding noise to a volume needs one random number per voxel. ``jax.random.normal`` draws
them with Threefry-2x32 (20 rounds), which on a CPU costs more than the rest of an
intensity pipeline (docs/performance.md). Here the voxel with flat (C-order) index ``i`` gets the 32 bits

    ``h(i) = mix(mix(i XOR k0) + k1)``

where ``k0, k1`` are two 32-bit words drawn from the key with ``jax.random.bits`` and
``mix`` is the ``lowbias32`` integer finaliser (xorshift-multiply, full avalanche). The
top 23 bits give a uniform ``v`` on the symmetric grid ``(2m + 1) / 2**23 - 1`` and the
normal value is ``sqrt(2) * erfinv(v)`` (exactly symmetric, tails to about 5.3 σ, as
for ``jax.random.normal``). The bits pass the usual checks used in the tests (uniform
histogram, no correlation between neighbours along any axis, none between keys), which
is what augmentation noise needs; they are not a cryptographic or a ``jax.random``
stream, and two keys that share ``k1`` give fields that are permutations of each other
(probability 2^-32 for keys from ``jax.random``).

Everything is elementwise in the voxel index, so the field is the same under ``jit`` and
``vmap`` (per-sample keys) as eagerly, and costs a few milliseconds plus the ``erfinv``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["hash_bits", "normal"]

_MAX_SIZE = 2**32


def _mix(x: jax.Array) -> jax.Array:
    x = x ^ (x >> 16)
    x = x * np.uint32(0x7FEB352D)
    x = x ^ (x >> 15)
    x = x * np.uint32(0x846CA68B)
    return x ^ (x >> 16)


def _flat_index(shape: tuple[int, ...], extent: jax.Array | None = None) -> jax.Array:
    index = jnp.zeros(shape, jnp.uint32)
    if extent is None:
        stride = 1
        for axis in reversed(range(len(shape))):
            index = index + jax.lax.broadcasted_iota(jnp.uint32, shape, axis) * np.uint32(stride)
            stride *= shape[axis]
        return index
    # the flat index within the leading ``len(extent)`` axes of sizes ``extent`` (a volume
    # padded beyond them): the valid voxels get the values of the unpadded volume
    sizes = [jnp.asarray(extent[a], jnp.uint32) for a in range(extent.shape[0])]
    sizes += [np.uint32(n) for n in shape[extent.shape[0] :]]
    stride = np.uint32(1)
    for axis in reversed(range(len(shape))):
        index = index + jax.lax.broadcasted_iota(jnp.uint32, shape, axis) * stride
        stride = stride * sizes[axis]
    return index


def _check_shape(shape) -> tuple[int, ...]:
    shape = tuple(int(s) for s in shape)
    if any(s < 0 for s in shape):
        raise ValueError(f"shape must have non-negative sizes, got {shape}")
    if math.prod(shape) > _MAX_SIZE:
        raise ValueError(f"shape {shape} has more than 2**32 elements (the counter is 32-bit)")
    return shape


def _check_extent(extent, shape) -> jax.Array | None:
    if extent is None:
        return None
    extent = jnp.asarray(extent, jnp.int32)
    if extent.ndim != 1 or extent.shape[0] > len(shape):
        raise ValueError(
            f"extent must have at most {len(shape)} values (one per leading axis), got {extent.shape}"
        )
    return extent


def hash_bits(key: jax.Array, shape, *, extent=None) -> jax.Array:
    """Random ``uint32`` bits of ``shape`` from ``key`` (see the module docstring).

    ``extent`` (possibly traced) gives the valid sizes of the leading axes of an array
    padded beyond them: its valid elements then get the bits of an unpadded array.
    """
    shape = _check_shape(shape)
    k = jax.random.bits(key, (2,), jnp.uint32)
    return _mix(_mix(_flat_index(shape, _check_extent(extent, shape)) ^ k[0]) + k[1])


def normal(key: jax.Array, shape, dtype=jnp.float32, *, extent=None) -> jax.Array:
    """Standard normal values of ``shape`` from ``key``; computed in float32, cast to ``dtype``.

    ``extent``: as for ``hash_bits``.

    Example:
        >>> import jax
        >>> x = normal(jax.random.key(0), (64, 64, 64))
        >>> abs(float(x.mean())) < 0.01, abs(float(x.std()) - 1) < 0.01
        (True, True)
    """
    dtype = jnp.dtype(dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"dtype must be a floating type, got {dtype}")
    m = (hash_bits(key, shape, extent=extent) >> 9).astype(jnp.float32)  # 0 .. 2**23 - 1, exact
    v = (m * 2.0 + 1.0) * np.float32(2.0**-23) - 1.0  # symmetric grid in (-1, 1), exact
    return (np.float32(math.sqrt(2.0)) * jax.lax.erf_inv(v)).astype(dtype)
