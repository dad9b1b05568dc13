"""Data-parallel training pieces shared by the examples (one process or many).

- ``start_distributed``: ``jax.distributed.initialize()`` when several processes are
  present (explicit arguments, ``JAX_*`` variables, SLURM, Open MPI, multi-host TPU);
- ``data_mesh``: a 1D mesh ``("data",)`` of every device of every process;
- ``replicate``: parameters and optimizer state, replicated on every device of the mesh;
- ``to_global``: host batches (this process's part of the global batch) as global arrays
  sharded ``P("data")`` over the mesh;
- ``prefetch``: batches put on the devices ahead of use, so that the transfer of the next
  batch and the host work that produces it overlap the running step;
- ``to_local_mesh``: replicated values moved to a mesh of this process's devices (for
  per-process work such as sliding-window validation of the process's own volumes);
- ``fetch``: replicated device values (losses) as numpy, in any number of processes.

The mesh's axis is ``Auto``: XLA propagates the batch sharding through the model, the
loss and the gradients (the gradient all-reduce is inserted by the compiler), so the
train step is written as for one device, and with the same seed its losses equal the
single-device ones up to float rounding (tested).
"""

from __future__ import annotations

import collections
import itertools
import os
from collections.abc import Iterable, Iterator
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P  # noqa: N817

AXIS = "data"


def several_processes_requested(
    coordinator_address: str | None = None, num_processes: int | None = None
) -> bool:
    """Whether this process is one of several: arguments, ``JAX_*`` variables or a launcher.

    Recognised: ``num_processes > 1`` or a ``coordinator_address``; the variables
    ``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES``; SLURM (``SLURM_NTASKS`` > 1),
    Open MPI (``OMPI_COMM_WORLD_SIZE`` > 1) and multi-host Cloud TPU
    (``TPU_WORKER_HOSTNAMES`` naming several hosts, or ``MEGASCALE_COORDINATOR_ADDRESS``).
    """
    if coordinator_address or (num_processes or 1) > 1:
        return True
    env = os.environ
    if env.get("JAX_COORDINATOR_ADDRESS") or int(env.get("JAX_NUM_PROCESSES", "1") or 1) > 1:
        return True
    for name in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
        if int(env.get(name, "1") or 1) > 1:
            return True
    return "," in env.get("TPU_WORKER_HOSTNAMES", "") or bool(env.get("MEGASCALE_COORDINATOR_ADDRESS"))


def start_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> bool:
    """Call ``jax.distributed.initialize`` when several processes are present; whether it did.

    Arguments left ``None`` come from ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``
    and ``JAX_PROCESS_ID`` when set, else from JAX's cluster detection (SLURM, Open MPI,
    Cloud TPU, Kubernetes). Must run before anything touches the devices.
    """
    if not several_processes_requested(coordinator_address, num_processes):
        return False
    env = os.environ
    if num_processes is None and env.get("JAX_NUM_PROCESSES"):
        num_processes = int(env["JAX_NUM_PROCESSES"])
    if process_id is None and env.get("JAX_PROCESS_ID"):
        process_id = int(env["JAX_PROCESS_ID"])
    jax.distributed.initialize(coordinator_address, num_processes=num_processes, process_id=process_id)
    return True


def data_mesh(devices: Iterable[jax.Device] | None = None) -> jax.sharding.Mesh:
    """A 1D mesh with axis ``"data"`` over ``devices`` (default: every device of every process)."""
    devices = list(jax.devices() if devices is None else devices)
    return jax.make_mesh((len(devices),), (AXIS,), axis_types=(jax.sharding.AxisType.Auto,), devices=devices)


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
    """Leading (batch) axis split over the mesh, the rest whole."""
    return NamedSharding(mesh, P(AXIS))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def check_batch_size(global_batch: int, mesh: jax.sharding.Mesh, what: str = "--batch-size") -> None:
    """Raise ``SystemExit`` with a clear message unless the batch splits evenly over the mesh."""
    devices, processes = mesh.size, jax.process_count()
    if global_batch % devices:
        raise SystemExit(
            f"error: {what} {global_batch} must be a multiple of the {devices} devices the batch is "
            f"split over; choose {what} {devices * max(1, -(-global_batch // devices))}"
        )
    if global_batch % processes:
        raise SystemExit(f"error: {what} {global_batch} must be a multiple of the {processes} processes")


def replicate(tree: Any, mesh: jax.sharding.Mesh) -> Any:
    """Every array leaf of ``tree`` on every device of ``mesh`` (identical in every process)."""
    sharding = replicated(mesh)
    if jax.process_count() == 1:
        return jax.device_put(tree, sharding)

    def one(x):
        # each process holds the same values (same seed): build the global array from them
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(one, tree)


def to_global(tree: Any, mesh: jax.sharding.Mesh) -> Any:
    """This process's batch (numpy leaves, leading batch axis) as global arrays split over ``mesh``.

    With one process this is ``jax.device_put`` with the batch sharding; with several,
    each process contributes its rows (``jax.make_array_from_process_local_data``) and
    the global batch is their concatenation in process order.
    """
    sharding = batch_sharding(mesh)
    if jax.process_count() == 1:
        return jax.device_put(tree, sharding)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), tree)


def prefetch(batches: Iterable[Any], put, size: int = 2) -> Iterator[Any]:
    """Yield ``put(batch)`` for each batch, keeping ``size`` batches transferred ahead.

    ``put`` starts an asynchronous transfer (``jax.device_put`` returns at once), so while
    the consumer's step runs, the next batches are already on their way to the devices
    and the host is producing the one after. ``size`` >= 1.
    """
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    iterator = iter(batches)
    queue = collections.deque(put(batch) for batch in itertools.islice(iterator, size))
    while queue:
        yield queue.popleft()
        for batch in itertools.islice(iterator, 1):
            queue.append(put(batch))


def to_local_mesh(tree: Any, local_mesh: jax.sharding.Mesh) -> Any:
    """Replicated global arrays, replicated on ``local_mesh`` (this process's devices) instead.

    For per-process work such as sliding-window validation of the process's own volumes;
    each process copies from its own replica, so nothing crosses hosts.
    """
    sharding = replicated(local_mesh)
    return jax.tree.map(
        lambda x: jax.device_put(x.addressable_data(0), sharding) if isinstance(x, jax.Array) else x, tree
    )


def describe(batch: jax.Array, state: Any) -> str:
    """Where a batch and the training state live, in words (printed once by the examples)."""
    shards = batch.sharding.shard_shape(batch.shape)[0]
    leaves = [x for x in jax.tree.leaves(state) if isinstance(x, jax.Array)]
    replicas = {len(x.sharding.device_set) for x in leaves if x.sharding.is_fully_replicated}
    placement = (
        f"replicated on {replicas.pop()} device(s)"
        if len(replicas) == 1 and all(x.sharding.is_fully_replicated for x in leaves)
        else "not replicated"
    )
    return (
        f"batch of {batch.shape[0]} split over {len(batch.sharding.device_set)} device(s), {shards} each; "
        f"parameters and optimizer state {placement}"
    )


def fetch(values: Any) -> Any:
    """Replicated device values (e.g. the losses) as numpy, in any number of processes."""
    return jax.tree.map(
        lambda x: np.asarray(x.addressable_data(0)) if isinstance(x, jax.Array) else x, values
    )


def segmentation_train_step(graphdef: Any, mesh: jax.sharding.Mesh):
    """The data-parallel train step of the segmentation examples.

    ``step(state, images, labels) -> (state, loss)`` with ``state`` the ``nnx.state`` of
    ``(model, optimizer)`` (``graphdef`` from ``nnx.split``) replicated over ``mesh``, the
    batch split over it, Dice + cross-entropy loss. The old state is donated: its buffers
    hold the new one (no second copy of the weights).
    """
    from flax import nnx

    import jmed

    def loss_fn(model, images, labels):
        return jmed.metrics.dice_ce_loss(model(images), labels[..., 0])

    split, whole = batch_sharding(mesh), replicated(mesh)

    def train_step(state, images, labels):
        model, optimizer = nnx.merge(graphdef, state)
        loss, grads = nnx.value_and_grad(loss_fn)(model, images, labels)
        optimizer.update(model, grads)
        return nnx.state((model, optimizer)), loss

    return jax.jit(
        train_step, in_shardings=(whole, split, split), out_shardings=(whole, whole), donate_argnums=0
    )
