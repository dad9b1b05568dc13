"""Data-parallel segmentation training for GPUs, TPUs and several hosts.

The same script runs on one CPU, on 8 emulated CPU devices (CI), on a GPU or TPU host
and on a TPU pod or GPU cluster with one process per host:

1. processes: ``jax.distributed.initialize()`` is called when several processes are
   present (``--coordinator-address`` / ``--num-processes`` / ``--process-id``, the
   ``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID`` variables, or
   a launcher JAX recognises: SLURM, Open MPI, multi-host Cloud TPU); see
   docs/multihost.md;
2. data: every process writes the same synthetic brain phantoms (deterministic from
   ``--seed``, so no shared file system is needed); ``jmed.Queue`` deals the training
   subjects to the processes (``subjects[process_index::process_count]``) and yields
   each process's share of the global batch, augmented and sampled in its workers;
3. training: the global batch is split over every device of every process
   (``NamedSharding(mesh, P("data"))``, built with
   ``jax.make_array_from_process_local_data``), parameters and optimizer state are
   replicated, the train step donates the old state, batches are put on the devices
   ahead of use; the program is compiled ahead of time and its memory per device is
   printed (as XLA reports it for the backend in use);
4. validation: each process predicts its own validation volumes with
   ``jmed.sliding_window_inference`` sharded over its local devices; Dice per class is
   averaged over processes.

Run from the repository root::

    PYTHONPATH=. python examples/tpu_training.py                 # default, for an accelerator
    PYTHONPATH=. python examples/tpu_training.py --quick         # a few steps, small volumes (CI)
    XLA_FLAGS=--xla_force_host_platform_device_count=8 PYTHONPATH=. python examples/tpu_training.py --quick
    PYTHONPATH=. python examples/tpu_training.py --dry-run       # compile, print memory per device, stop

Two processes on one machine (4 emulated CPU devices each)::

    XLA_FLAGS=--xla_force_host_platform_device_count=4 PYTHONPATH=. python examples/tpu_training.py \\
        --quick --coordinator-address 127.0.0.1:12345 --num-processes 2 --process-id 0 &
    XLA_FLAGS=--xla_force_host_platform_device_count=4 PYTHONPATH=. python examples/tpu_training.py \\
        --quick --coordinator-address 127.0.0.1:12345 --num-processes 2 --process-id 1

Needs the ``examples`` extra (flax, optax).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from arguments import check_unet_patches, positive  # noqa: E402 - the examples folder, found through sys.path

CLASS_NAMES = {1: "GM", 2: "WM"}
NUM_CLASSES = 3
SPACING = 2.0


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=positive(int), default=5)
    parser.add_argument("--steps-per-epoch", type=positive(int), default=50)
    parser.add_argument(
        "--batch-per-device", type=positive(int), default=2, help="patches per device and step"
    )
    parser.add_argument(
        "--patch-size", type=positive(int), default=64, help="cubic patch side, multiple of 4"
    )
    parser.add_argument("--width", type=positive(int), default=16, help="U-Net base features")
    parser.add_argument("--volume-size", type=positive(int), default=96, help="side of the cubic phantoms")
    parser.add_argument(
        "--subjects", type=positive(int), default=16, help="training phantoms (all processes)"
    )
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument("--num-workers", type=int, default=2, help="loader worker processes per host")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--output", type=Path, default=None, help="where history.json goes (default: not written)"
    )
    parser.add_argument(
        "--coordinator-address", default=None, help="host:port of process 0 (several processes)"
    )
    parser.add_argument("--num-processes", type=positive(int), default=None)
    parser.add_argument("--process-id", type=int, default=None)
    parser.add_argument(
        "--dry-run", action="store_true", help="compile the train and validation programs, print memory, stop"
    )
    parser.add_argument(
        "--quick", action="store_true", help="tiny configuration: a few steps on small volumes (CI)"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.epochs = min(args.epochs, 2)
        args.steps_per_epoch = min(args.steps_per_epoch, 2)
        args.batch_per_device = 1
        args.patch_size = min(args.patch_size, 16)
        args.width = min(args.width, 4)
        args.volume_size = min(args.volume_size, 24)
        args.subjects = min(args.subjects, 2)
        args.num_workers = 0
    check_unet_patches(parser, args)
    if args.process_id is not None and args.process_id < 0:
        parser.error(f"--process-id must be >= 0, got {args.process_id}")
    return args


def memory_report(name: str, compiled, *, verbose: bool = True) -> dict | None:
    """Bytes per device of a compiled program as XLA reports them (``None`` if it does not);
    printed when ``verbose``."""
    try:
        analysis = compiled.memory_analysis()
    except Exception:  # some backends do not implement it
        analysis = None
    if analysis is None:
        if verbose:
            print(f"memory per device, {name}: not reported by this backend")
        return None
    report = {
        "arguments": analysis.argument_size_in_bytes,
        "outputs": analysis.output_size_in_bytes,
        "aliased": analysis.alias_size_in_bytes,
        "temporaries": analysis.temp_size_in_bytes,
        "code": analysis.generated_code_size_in_bytes,
    }
    # donated arguments are reused for outputs (aliased): count them once
    report["total"] = report["arguments"] + report["outputs"] - report["aliased"] + report["temporaries"]
    mib = {k: v / 2**20 for k, v in report.items()}
    if verbose:
        print(
            f"memory per device, {name}: {mib['total']:.1f} MiB (arguments {mib['arguments']:.1f}, "
            f"outputs {mib['outputs']:.1f}, of which donated {mib['aliased']:.1f}, "
            f"temporaries {mib['temporaries']:.1f})",
            flush=True,
        )
    return report


def main(argv=None) -> dict:
    args = parse_args(argv)
    import data_parallel

    # before anything touches the devices
    distributed = data_parallel.start_distributed(
        args.coordinator_address, args.num_processes, args.process_id
    )

    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from flax import nnx
    from jax.experimental import multihost_utils
    from unet import create_unet

    import jmed
    import jmed.transforms as T  # noqa: N812

    process, processes = jax.process_index(), jax.process_count()
    mesh = data_parallel.data_mesh()  # every device of every process
    local_mesh = data_parallel.data_mesh(jax.local_devices())  # this process's devices
    global_batch = args.batch_per_device * mesh.size
    local_batch = global_batch // processes
    patch = args.patch_size
    if process == 0:
        print(
            f"{processes} process(es){' (jax.distributed)' if distributed else ''}, {mesh.size} "
            f"{jax.devices()[0].platform} device(s) ({jax.local_device_count()} per process); "
            f"global batch {global_batch} x {patch}^3 ({args.batch_per_device} per device), "
            f"U-Net width {args.width}",
            flush=True,
        )

    # --- data: the same phantoms written by every process, subjects dealt by the Queue --------
    folder = Path(tempfile.mkdtemp(prefix=f"jmed_tpu_{process}_"))
    shape = (args.volume_size,) * 3
    num_train = max(args.subjects, processes)

    def write(i):
        subject = jmed.datasets.phantom(
            args.seed * 1000 + i, shape=shape, spacing=(SPACING,) * 3, num_classes=NUM_CLASSES
        )
        record = {}
        for name in ("t1", "seg"):
            record[name] = str(folder / f"phantom{i}_{name}.nii.gz")
            jmed.save(subject[name], record[name], overwrite=True)
        return record

    rescale = T.RescaleIntensity(out_min_max=(0, 1), percentiles=(0.5, 99.5))
    train_records = [write(i) for i in range(num_train)]
    # one validation phantom per process: each process validates its own
    val_record = write(num_train + process)
    queue = jmed.Queue(
        train_records,
        sampler=jmed.LabelSampler(patch, "seg", {0: 1, 1: 1, 2: 1}),
        samples_per_volume=max(1, -(-local_batch * args.steps_per_epoch // max(1, num_train // processes))),
        max_length=4 * local_batch,
        batch_size=local_batch,  # this process's share of the global batch
        num_workers=args.num_workers,
        seed=args.seed,
        preprocessing=rescale,
        augmentation=T.Compose(
            [
                T.RandomFlip(axes=0),
                T.RandomAffine(scales=0.05, degrees=5, translation=2),
                T.RandomGamma(log_gamma=(-0.2, 0.2)),
                T.RandomNoise(std=(0.0, 0.03)),
            ]
        ),
        label_names="seg",
        num_epochs=None,
        drop_last=True,
    )
    validation = jmed.SubjectsSource([val_record], label_names="seg", preprocessing=rescale)[0]
    val_t1 = validation["t1"]
    val_labels = np.asarray(validation["seg"].data[..., 0])

    # --- model, optimizer, the data-parallel train step ------------------------------------------
    model = create_unet(1, NUM_CLASSES, width=args.width, seed=args.seed)
    total_steps = args.epochs * args.steps_per_epoch
    schedule = optax.cosine_decay_schedule(args.learning_rate, max(total_steps, 1), alpha=0.1)
    optimizer = nnx.Optimizer(model, optax.adamw(schedule, weight_decay=1e-4), wrt=nnx.Param)
    graphdef, state = nnx.split((model, optimizer))
    model_graphdef = nnx.graphdef(model)
    state = data_parallel.replicate(state, mesh)
    train_step = data_parallel.segmentation_train_step(graphdef, mesh)

    window = dict(patch_size=patch, overlap=patch // 2, batch_size=args.batch_per_device, mode="hann")

    @jax.jit
    def segment(model_state, image):
        model = nnx.merge(model_graphdef, model_state)
        probabilities = jmed.sliding_window_inference(model, image, mesh=local_mesh, **window)
        return jnp.argmax(probabilities.data, axis=-1).astype(jnp.uint8)

    # compiled ahead of time: the memory per device is known before the first step
    batch_shape = (global_batch, patch, patch, patch, 1)
    compiled_step = train_step.lower(
        state,
        jax.ShapeDtypeStruct(batch_shape, jnp.float32, sharding=data_parallel.batch_sharding(mesh)),
        jax.ShapeDtypeStruct(batch_shape, jnp.uint8, sharding=data_parallel.batch_sharding(mesh)),
    ).compile()
    memory = {"train_step": memory_report("train step", compiled_step, verbose=process == 0)}
    model_state = nnx.state(nnx.merge(graphdef, state)[0])
    compiled_segment = segment.lower(data_parallel.to_local_mesh(model_state, local_mesh), val_t1).compile()
    memory["validation"] = memory_report(
        f"validation of a {shape} volume", compiled_segment, verbose=process == 0
    )
    param_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
    if process == 0:
        print(
            f"parameters: {param_bytes / 2**20:.2f} MiB; parameters + optimizer state: "
            f"{state_bytes / 2**20:.2f} MiB (replicated on every device)",
            flush=True,
        )
    if args.dry_run:
        shutil.rmtree(folder, ignore_errors=True)
        return {"memory": memory, "parameter_bytes": param_bytes, "state_bytes": state_bytes}

    def to_devices(batch):
        return data_parallel.to_global((batch["t1"].data, batch["seg"].data), mesh)

    def validate(state):
        model_state = nnx.state(nnx.merge(graphdef, state)[0])
        labels = compiled_segment(data_parallel.to_local_mesh(model_state, local_mesh), val_t1)
        dice = np.asarray(jmed.metrics.dice_score(labels, val_labels, num_classes=NUM_CLASSES))
        # every process validated its own volume: average over processes
        return multihost_utils.process_allgather(dice).reshape(processes, -1).mean(0)

    history = {"losses": [], "dice": []}
    start = time.perf_counter()
    try:
        with iter(queue) as batches:
            device_batches = data_parallel.prefetch(batches, to_devices, size=2)
            for epoch in range(args.epochs):
                epoch_start = time.perf_counter()
                losses = []
                for _ in range(args.steps_per_epoch):
                    images, labels = next(device_batches)
                    if process == 0 and not history["losses"] and not losses:
                        print(data_parallel.describe(images, state), flush=True)
                    state, loss = compiled_step(state, images, labels)
                    losses.append(loss)
                losses = [float(x) for x in data_parallel.fetch(losses)]
                train_time = time.perf_counter() - epoch_start
                dice = validate(state)
                history["losses"] += losses
                history["dice"].append({name: float(dice[c]) for c, name in CLASS_NAMES.items()})
                if process == 0:
                    print(
                        f"epoch {epoch + 1}/{args.epochs}  loss {np.mean(losses):.6f}  "
                        + "  ".join(f"Dice {name} {dice[c]:.3f}" for c, name in CLASS_NAMES.items())
                        + f"  ({1000 * train_time / args.steps_per_epoch:.0f} ms per step)",
                        flush=True,
                    )
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    wall = time.perf_counter() - start
    print(f"process {process}: losses {json.dumps(history['losses'])}", flush=True)
    if process == 0:
        print(f"summary: {total_steps} steps, training and validation {wall:.1f} s")
    if args.output is not None and process == 0:
        args.output.mkdir(parents=True, exist_ok=True)
        (args.output / "history.json").write_text(json.dumps({**history, "memory": memory}, indent=1))
    if distributed:
        jax.distributed.shutdown()
    return {**history, "memory": memory, "wall_time": wall}


if __name__ == "__main__":
    main()
