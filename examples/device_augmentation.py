"""Augmentation on the accelerator, fused with the train step (the device pipeline).

Whole preprocessed volumes of one shape go to the device; inside one jitted train step,
``jmed.augment_and_sample`` runs ``vmap`` of a ``Compose`` of random transforms (flip,
affine, gamma, noise) over the batch, draws label-balanced patches from every augmented
volume, and the U-Net (``examples/unet.py``) takes an optax step on them. The host only
hands over the volumes; there is no CPU augmentation at all.

The volumes here are synthetic brain phantoms (``jmed.datasets.phantom``) stacked into
one batch with ``jmed.stack``; with files, ``jmed.VolumeLoader`` yields the same batches.
Compilation time is printed separately from the time per step.

Run from the repository root::

    PYTHONPATH=. python examples/device_augmentation.py            # small default
    PYTHONPATH=. python examples/device_augmentation.py --quick    # CI
    PYTHONPATH=. python examples/device_augmentation.py --volume-size 96 --batch-size 4 --patch-size 64

Needs the ``examples`` extra (flax, optax).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--volume-size", type=_positive_int, default=48, help="side of the cubic volumes")
    parser.add_argument("--batch-size", type=_positive_int, default=2, help="volumes per step")
    parser.add_argument("--patches-per-volume", type=_positive_int, default=2)
    parser.add_argument("--patch-size", type=_positive_int, default=32, help="multiple of 4")
    parser.add_argument("--width", type=_positive_int, default=8, help="U-Net base features")
    parser.add_argument("--steps", type=_positive_int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="tiny configuration (CI)")
    args = parser.parse_args(argv)
    if args.quick:
        args.volume_size = min(args.volume_size, 24)
        args.patch_size = min(args.patch_size, 16)
        args.width = min(args.width, 4)
        args.steps = min(args.steps, 3)
        args.patches_per_volume = 1
    if args.patch_size % 4:
        parser.error(f"--patch-size must be a multiple of 4 (the U-Net pools twice), got {args.patch_size}")
    if args.patch_size > args.volume_size:
        parser.error(f"--patch-size ({args.patch_size}) must not exceed --volume-size ({args.volume_size})")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    import jax
    import numpy as np
    import optax
    from flax import nnx

    import jmed
    import jmed.transforms as T  # noqa: N812

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from unet import UNet3D

    num_classes = 3
    shape = (args.volume_size,) * 3
    subjects = []
    for i in range(args.batch_size):
        s = jmed.datasets.phantom(
            args.seed * 1000 + i, shape=shape, spacing=(2.0,) * 3, num_classes=num_classes
        )
        subjects.append(
            T.RescaleIntensity(out_min_max=(0, 1), percentiles=(0.5, 99.5))(None, s).without_history()
        )
    volumes = jax.device_put(jmed.stack(subjects))

    augmentation = T.Compose(
        [
            T.RandomFlip(axes=0),
            T.RandomAffine(scales=0.1, degrees=10, translation=4),
            T.RandomGamma(log_gamma=(-0.3, 0.3)),
            T.RandomNoise(std=(0.0, 0.05)),
        ]
    )
    sampler = jmed.LabelSampler(args.patch_size, "seg", {0: 1, 1: 1, 2: 1})
    model = nnx.jit(lambda: UNet3D(1, num_classes, width=args.width, rngs=nnx.Rngs(params=args.seed)))()
    optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)

    @nnx.jit
    def train_step(model, optimizer, key, volumes):
        patches = jmed.augment_and_sample(
            key, volumes, sampler=sampler, num_patches=args.patches_per_volume, augmentation=augmentation
        )
        images, labels = patches["t1"].data, patches["seg"].data[..., 0]

        def loss_fn(model):
            return jmed.metrics.dice_ce_loss(model(images), labels)

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    key = jax.random.key(args.seed)
    device = jax.devices()[0]
    print(
        f"{args.batch_size} volumes of {shape} on {device.platform}; per step: augment + "
        f"{args.patches_per_volume} patch(es) of {args.patch_size}^3 per volume + U-Net (width {args.width}) step"
    )
    start = time.perf_counter()
    # the first step compiles the whole program: augmentation, sampling and the model step
    loss = float(train_step(model, optimizer, jax.random.fold_in(key, 0), volumes))
    compile_time = time.perf_counter() - start
    print(f"step 1/{args.steps}  loss {loss:.4f}  first call (compile + run): {compile_time:.2f} s")

    times, losses = [], [loss]
    for step in range(1, args.steps):
        start = time.perf_counter()
        loss = float(train_step(model, optimizer, jax.random.fold_in(key, step), volumes))
        times.append(time.perf_counter() - start)
        losses.append(loss)
        print(f"step {step + 1}/{args.steps}  loss {loss:.4f}  {1000 * times[-1]:.0f} ms", flush=True)
    per_step = float(np.median(times)) if times else float("nan")
    print(
        f"summary: first call (compile + run) {compile_time:.2f} s, then {1000 * per_step:.0f} ms per step "
        f"(median of {len(times)})"
    )
    return {"compile_time": compile_time, "step_time": per_step, "losses": losses}


if __name__ == "__main__":
    main()
