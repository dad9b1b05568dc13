"""Splitting window batches over the devices of a ``jax.sharding.Mesh``."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

try:  # jax >= 0.6 exports shard_map at the top level
    _shard_map = jax.shard_map
except AttributeError:  # pragma: no cover - older jax
    from jax.experimental import shard_map as _legacy

    _shard_map = _legacy.shard_map


def _mesh_axes(mesh: Any, axis_name: Any) -> tuple[tuple[str, ...], int]:
    """The mesh axes to split windows over and their number of devices."""
    if not isinstance(mesh, jax.sharding.Mesh):
        raise TypeError(f"mesh must be a jax.sharding.Mesh or None, got {type(mesh).__name__}")
    if axis_name is None:
        names = tuple(mesh.axis_names)
    else:
        names = (axis_name,) if isinstance(axis_name, str) else tuple(axis_name)
    missing = [n for n in names if n not in mesh.shape]
    if missing or not names:
        raise ValueError(
            f"axis_name {axis_name!r} is not an axis of the mesh; the mesh has axes {tuple(mesh.axis_names)}"
        )
    return names, int(np.prod([mesh.shape[n] for n in names]))


def _batch_spec(axes):
    return jax.sharding.PartitionSpec(axes if len(axes) > 1 else axes[0])


def _placed(mapped, mesh, batch_spec):
    """Put the inputs where ``shard_map`` expects them (needed for explicit-axis meshes)."""
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    split = jax.sharding.NamedSharding(mesh, batch_spec)

    def run(volume, starts, valid):
        volume = jax.device_put(volume, replicated)
        return mapped(volume, jax.device_put(starts, split), jax.device_put(valid, split))

    return run


def _varying(x, axes):
    if hasattr(jax.lax, "pcast"):
        return jax.lax.pcast(x, axes, to="varying")
    if hasattr(jax.lax, "pvary"):  # pragma: no cover - older jax
        return jax.lax.pvary(x, axes)
    return x  # pragma: no cover - jax without varying-manual-axes checks
