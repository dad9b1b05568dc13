"""Augmentation on the accelerator, fused with a data-parallel train step (the device pipeline).

``jmed.VolumeLoader`` reads whole preprocessed volumes of one shape (NIfTI files,
intensities rescaled in the loader) and batches them; the batches are split over all
devices of a mesh (``NamedSharding(mesh, P("data"))``) and put on the devices ahead of
use. Inside one jitted train step, ``jmed.augment_and_sample`` runs ``vmap`` of a
``Compose`` of random transforms (flip, affine, gamma, noise) over the batch, draws
label-balanced patches from every augmented volume, and the U-Net
(``examples/unet.py``) takes an optax step on them; every device augments and trains on
its own share of the batch, the gradients are reduced by XLA, and the weights and
optimizer state (replicated, donated to the step) stay on the devices. The host only
hands over the volumes; there is no CPU augmentation at all.

With the same seed, 1 and 8 devices give the same losses up to float rounding: the key
of each volume depends only on the step and the volume's place in the batch.
Compilation time is printed separately from the time per step.

Run from the repository root::

    PYTHONPATH=. python examples/device_augmentation.py            # small default
    PYTHONPATH=. python examples/device_augmentation.py --quick    # CI
    PYTHONPATH=. python examples/device_augmentation.py --quick --devices 8 --batch-size 8
    PYTHONPATH=. python examples/device_augmentation.py --volume-size 96 --batch-size 4 --patch-size 64

``--devices N`` emulates N CPU devices; GPU and TPU hosts use their real devices.
Needs the ``examples`` extra (flax, optax).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from arguments import check_unet_patches, positive  # noqa: E402 - the examples folder, found through sys.path


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--volume-size", type=positive(int), default=48, help="side of the cubic volumes")
    parser.add_argument(
        "--batch-size",
        type=positive(int),
        default=None,
        help="volumes per step, split over the devices: a multiple of their number "
        "(default 2, rounded up to a multiple of the devices)",
    )
    parser.add_argument(
        "--subjects", type=positive(int), default=None, help="volumes on disk (default 2 batches)"
    )
    parser.add_argument("--patches-per-volume", type=positive(int), default=2)
    parser.add_argument("--patch-size", type=positive(int), default=32, help="multiple of 4")
    parser.add_argument("--width", type=positive(int), default=8, help="U-Net base features")
    parser.add_argument("--steps", type=positive(int), default=10)
    parser.add_argument(
        "--num-workers", type=int, default=0, help="loader worker processes (0: main process)"
    )
    parser.add_argument(
        "--devices", type=positive(int), default=None, help="on CPU, emulate this many devices (XLA_FLAGS)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="tiny configuration (CI)")
    args = parser.parse_args(argv)
    if args.quick:
        args.volume_size = min(args.volume_size, 24)
        args.patch_size = min(args.patch_size, 16)
        args.width = min(args.width, 4)
        args.steps = min(args.steps, 3)
        args.patches_per_volume = 1
    check_unet_patches(parser, args)
    if args.devices is not None and args.batch_size is not None and args.batch_size % args.devices:
        parser.error(
            f"--batch-size ({args.batch_size}) must be a multiple of --devices ({args.devices}): "
            "every device takes the same share of the batch"
        )
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.devices is not None:
        # must happen before jax is imported; ignored by GPU/TPU backends
        flags = os.environ.get("XLA_FLAGS", "")
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={args.devices}".strip()
    import data_parallel
    import jax
    import numpy as np
    import optax
    from flax import nnx
    from unet import create_unet

    import jmed
    import jmed.transforms as T  # noqa: N812

    devices = jax.devices()
    mesh = data_parallel.data_mesh(devices)
    if args.batch_size is None:
        args.batch_size = mesh.size * -(-2 // mesh.size)
    data_parallel.check_batch_size(args.batch_size, mesh)
    num_subjects = args.subjects or 2 * args.batch_size

    # --- data: NIfTI files read by a VolumeLoader --------------------------------------------
    num_classes = 3
    shape = (args.volume_size,) * 3
    folder = Path(tempfile.mkdtemp(prefix="jmed_device_"))
    records = []
    for i in range(num_subjects):
        subject = jmed.datasets.phantom(
            args.seed * 1000 + i, shape=shape, spacing=(2.0,) * 3, num_classes=num_classes
        )
        record = {}
        for name in ("t1", "seg"):
            record[name] = str(folder / f"phantom{i}_{name}.nii.gz")
            jmed.save(subject[name], record[name], overwrite=True)
        records.append(record)
    loader = jmed.VolumeLoader(
        records,
        batch_size=args.batch_size // jax.process_count(),  # this process's share of the batch
        num_workers=args.num_workers,
        seed=args.seed,
        preprocessing=T.RescaleIntensity(out_min_max=(0, 1), percentiles=(0.5, 99.5)),
        label_names="seg",
        num_epochs=None,
    )

    augmentation = T.Compose(
        [
            T.RandomFlip(axes=0),
            T.RandomAffine(scales=0.1, degrees=10, translation=4),
            T.RandomGamma(log_gamma=(-0.3, 0.3)),
            T.RandomNoise(std=(0.0, 0.05)),
        ]
    )
    sampler = jmed.LabelSampler(args.patch_size, "seg", {0: 1, 1: 1, 2: 1})

    # --- model and the data-parallel train step --------------------------------------------------
    model = create_unet(1, num_classes, width=args.width, seed=args.seed)
    optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)
    graphdef, state = nnx.split((model, optimizer))
    state = data_parallel.replicate(state, mesh)
    replicated, split = data_parallel.replicated(mesh), data_parallel.batch_sharding(mesh)

    @partial(
        jax.jit,
        in_shardings=(replicated, replicated, split),
        out_shardings=(replicated, replicated),
        donate_argnums=0,
    )
    def train_step(state, step, volumes):
        model, optimizer = nnx.merge(graphdef, state)
        # one key per step; augment_and_sample gives every volume its own key from it
        key = jax.random.fold_in(jax.random.key(args.seed), step)
        patches = jmed.augment_and_sample(
            key, volumes, sampler=sampler, num_patches=args.patches_per_volume, augmentation=augmentation
        )
        images, labels = patches["t1"].data, patches["seg"].data[..., 0]

        def loss_fn(model):
            return jmed.metrics.dice_ce_loss(model(images), labels)

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return nnx.state((model, optimizer)), loss

    def to_devices(batch):
        # images only: the loader's metadata (subject indices) stays on the host
        volumes = jmed.Subject({name: batch[name] for name in batch})
        return data_parallel.to_global(volumes, mesh)

    print(
        f"{args.batch_size} volumes of {shape} per step, data-parallel on {len(devices)} {devices[0].platform} "
        f"device(s); per step: augment + {args.patches_per_volume} patch(es) of {args.patch_size}^3 per volume "
        f"+ U-Net (width {args.width}) step"
    )
    losses, times = [], []
    try:
        _train(args, loader, train_step, state, to_devices, losses, times)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    compile_time, steady = times[0], times[1:]
    per_step = float(np.median(steady)) if steady else float("nan")
    print(
        f"summary: first call (compile + run) {compile_time:.2f} s, then {1000 * per_step:.0f} ms per step "
        f"(median of {len(steady)})"
    )
    return {"compile_time": compile_time, "step_time": per_step, "losses": losses, "devices": len(devices)}


def _train(args, loader, train_step, state, to_devices, losses, times) -> None:
    """Run the steps; append each step's loss and seconds to ``losses`` and ``times``."""
    import data_parallel
    import numpy as np

    with iter(loader) as batches:
        device_batches = data_parallel.prefetch(batches, to_devices, size=2)
        start = time.perf_counter()
        pending = None
        for step in range(args.steps):
            volumes = next(device_batches)
            if step == 0:
                print(data_parallel.describe(volumes["t1"].data, state), flush=True)
            state, loss = train_step(state, np.uint32(step), volumes)
            # the loss of the previous step is read once this step is queued, so the
            # devices are never left waiting for the host
            if pending is not None:
                losses.append(float(data_parallel.fetch(pending)))
                times.append(time.perf_counter() - start)
                start = time.perf_counter()
                _report(len(losses), args.steps, losses[-1], times)
            pending = loss
        losses.append(float(data_parallel.fetch(pending)))
        times.append(time.perf_counter() - start)
        _report(len(losses), args.steps, losses[-1], times)


def _report(step: int, steps: int, loss: float, times: list) -> None:
    when = f"first call (compile + run): {times[0]:.2f} s" if step == 1 else f"{1000 * times[-1]:.0f} ms"
    print(f"step {step}/{steps}  loss {loss:.8g}  {when}", flush=True)


if __name__ == "__main__":
    main()
