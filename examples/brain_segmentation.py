"""Brain tissue segmentation (grey and white matter) with a small 3D U-Net, end to end.

The main job of jmed in one script:

1. data: the MNI152 2009a template (``jmed.datasets.MNI152()``, bundled with nilearn) or,
   without nilearn or with ``--data synthetic``, synthetic brain phantoms
   (``jmed.datasets.phantom``); subjects are written as NIfTI files and the loader reads
   the paths;
2. loading: deterministic preprocessing in the loader (canonical orientation, resampling
   to 2 mm, intensity rescaling, cropping), random augmentation (flip, small affine,
   gamma, noise) and label-balanced patches through ``jmed.Queue``;
3. training: patch-based, data-parallel training of a Flax NNX U-Net
   (``examples/unet.py``) with optax and the Dice + cross-entropy loss of
   ``jmed.metrics``. Every batch is split over all devices of a mesh
   (``NamedSharding(mesh, P("data"))``), parameters and optimizer state are replicated,
   the train step is one ``jax.jit`` program that donates the old state, and the next
   batches are put on the devices while the current step runs (``examples/data_parallel.py``).
   With the same seed, 1 and 8 devices give the same losses up to float rounding;
4. validation: ``jmed.sliding_window_inference`` with the windows sharded over the same
   mesh, Dice per class (GM, WM) every epoch;
5. output: the prediction saved as NIfTI (``jmed.save``), a PNG overlay (``jmed.plot``) and
   ``history.json`` (the loss of every step, the Dice of every epoch).

What is validated: with MNI152 there is one subject, so the brain is split along the
anterior-posterior axis: training patches come from the posterior half only and the
anterior half is held out for validation. With synthetic data, training and validation
use different phantoms.

Run from the repository root::

    PYTHONPATH=. python examples/brain_segmentation.py              # default, a few minutes
    PYTHONPATH=. python examples/brain_segmentation.py --quick      # a few steps (CI)
    PYTHONPATH=. python examples/brain_segmentation.py --epochs 20 --width 16 --devices 4
    PYTHONPATH=. python examples/brain_segmentation.py --quick --devices 8 --batch-size 8

``--devices N`` emulates N CPU devices; on a GPU or TPU host the script uses the real
devices as they are (the batch size must be a multiple of their number).

Needs the ``examples`` extra (flax, optax, matplotlib) and, for MNI152, nilearn.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from arguments import positive  # noqa: E402 - the examples folder, found through sys.path

CLASS_NAMES = {1: "GM", 2: "WM"}  # label 0: background and CSF
NUM_CLASSES = 3
SPACING = 2.0  # mm: keeps the CPU cost of the default configuration down


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--data",
        choices=("mni152", "synthetic"),
        default=None,
        help="mni152 (default when nilearn is installed) or synthetic phantoms",
    )
    parser.add_argument("--epochs", type=positive(int), default=3)
    parser.add_argument("--steps-per-epoch", type=positive(int), default=20)
    parser.add_argument(
        "--patch-size",
        type=positive(int),
        default=32,
        help="side of the cubic training and inference windows (multiple of 4)",
    )
    parser.add_argument(
        "--batch-size",
        type=positive(int),
        default=None,
        help="patches per step, split over the devices: a multiple of their number (default: 4, --quick 2, "
        "rounded up to a multiple of the devices)",
    )
    parser.add_argument("--width", type=positive(int), default=8, help="U-Net base features")
    parser.add_argument("--learning-rate", type=positive(float), default=3e-3)
    parser.add_argument(
        "--num-workers",
        type=int,
        default=1,
        help="loader worker processes (0: load in the main process; 1 measured faster on 2 cores; "
        "batches are the same for any number)",
    )
    parser.add_argument(
        "--devices",
        type=positive(int),
        default=None,
        help="on CPU, emulate this many devices (training batches and validation windows are split over them)",
    )
    parser.add_argument(
        "--output", type=Path, default=None, help="output folder (default: a new temporary folder)"
    )
    parser.add_argument("--overwrite", action="store_true", help="overwrite existing outputs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--quick", action="store_true", help="tiny configuration: a few steps on small synthetic volumes (CI)"
    )
    args = parser.parse_args(argv)
    if args.devices is not None and args.batch_size is not None and args.batch_size % args.devices:
        parser.error(
            f"--batch-size ({args.batch_size}) must be a multiple of --devices ({args.devices}): "
            "every device takes the same share of the batch"
        )
    if args.patch_size % 4:
        parser.error(f"--patch-size must be a multiple of 4 (the U-Net pools twice), got {args.patch_size}")
    if args.num_workers < 0:
        parser.error(f"--num-workers must be >= 0, got {args.num_workers}")
    if args.quick:
        args.epochs = min(args.epochs, 2)
        args.steps_per_epoch = min(args.steps_per_epoch, 2)
        args.patch_size = min(args.patch_size, 16)
        args.width = min(args.width, 4)
        args.num_workers = 0  # no worker start-up for a few steps
        args.data = args.data or "synthetic"
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    start_time = time.perf_counter()
    output = args.output if args.output is not None else Path(tempfile.mkdtemp(prefix="jmed_brain_"))
    output.mkdir(parents=True, exist_ok=True)
    prediction_path = output / "prediction.nii.gz"
    overlay_path = output / "prediction.png"
    history_path = output / "history.json"
    for path in (prediction_path, overlay_path, history_path):
        if path.exists() and not args.overwrite:
            raise SystemExit(f"error: {path} exists; pass --overwrite or choose another --output")

    if args.devices is not None:
        # must happen before jax is imported; ignored by GPU/TPU backends
        flags = os.environ.get("XLA_FLAGS", "")
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={args.devices}".strip()
    # jax is imported here, after XLA_FLAGS is final
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from flax import nnx

    import jmed
    import jmed.transforms as T  # noqa: N812

    jmed.tune_host_allocator()  # large volumes from the heap, not fresh page mappings (glibc)
    import data_parallel
    from unet import create_unet

    # every device takes an equal share of each batch
    devices = jax.devices()
    mesh = data_parallel.data_mesh(devices)
    if args.batch_size is None:
        base = 2 if args.quick else 4
        args.batch_size = mesh.size * -(-base // mesh.size)
    data_parallel.check_batch_size(args.batch_size, mesh)

    # --- data: subjects as NIfTI records ----------------------------------------------------
    if args.data is None:
        try:
            import nilearn  # noqa: F401

            args.data = "mni152"
        except ImportError:
            print("nilearn is not installed: using synthetic phantoms")
            args.data = "synthetic"
    data_dir = output / "data"
    data_dir.mkdir(exist_ok=True)

    def write(subject, name):
        record = {}
        for image_name in ("t1", "seg"):
            path = data_dir / f"{name}_{image_name}.nii.gz"
            # the inputs are regenerated on every run (another --seed makes other phantoms)
            jmed.save(subject[image_name], path, overwrite=True)
            record[image_name] = str(path)
        return record

    rescale = T.RescaleIntensity(out_min_max=(0, 1), percentiles=(0.5, 99.5))
    if args.data == "mni152":
        record = write(jmed.datasets.MNI152(), "mni152")
        canonical = [T.ToCanonical(), T.Resample(SPACING)]
        # the template is RAS, 197 x 233 x 189 at 1 mm -> 98 x 116 x 94 at 2 mm (Resample
        # floors); split along A (axis 1) at 58, read from the header only
        header = jmed.load(record["t1"], lazy=True)
        ny = int(header.spatial_shape[1] * header.spacing[1] // SPACING)
        half = ny // 2
        train_crop = T.Crop((0, 0, 0, ny - half, 0, 0))  # posterior half
        val_crop = T.Crop((0, 0, half, 0, 0, 0))  # anterior half
        # several copies of the one subject: each copy gets its own augmentation per epoch
        train_records = [dict(record) for _ in range(4)]
        val_record = record
        what = "MNI152: trained on the posterior half, validated on the anterior half"
    else:
        shape = (24, 24, 24) if args.quick else (56, 64, 56)
        spacing = (4.0,) * 3 if args.quick else (SPACING * 1.5,) * 3
        num_train = 2 if args.quick else 4
        records = [
            write(
                jmed.datasets.phantom(args.seed * 1000 + i, shape=shape, spacing=spacing, num_classes=3),
                f"phantom{i}",
            )
            for i in range(num_train + 1)
        ]
        canonical = [T.ToCanonical()]
        train_crop = val_crop = None
        train_records, val_record = records[:num_train], records[num_train]
        what = f"synthetic: trained on {num_train} phantoms, validated on another one"
    patch = args.patch_size

    def preprocessing(crop):
        steps = [*canonical, *([crop] if crop is not None else []), rescale]
        # U-Net input sides must be multiples of 4 (two poolings)
        steps.append(T.EnsureShapeMultiple(4, method="pad"))
        return T.Compose(steps)

    train_pre, val_pre = preprocessing(train_crop), preprocessing(val_crop)
    augmentation = T.Compose(
        [
            T.RandomFlip(axes=0),
            T.RandomAffine(scales=0.05, degrees=5, translation=2),
            T.RandomGamma(log_gamma=(-0.2, 0.2)),
            T.RandomNoise(std=(0.0, 0.03)),
        ]
    )
    total_steps = args.epochs * args.steps_per_epoch
    patches_per_epoch = args.steps_per_epoch * args.batch_size
    samples_per_volume = -(-patches_per_epoch // len(train_records))
    sampler = jmed.LabelSampler(patch, "seg", {0: 1, 1: 1, 2: 1})
    queue = jmed.Queue(
        train_records,
        sampler=sampler,
        samples_per_volume=samples_per_volume,
        max_length=min(4 * samples_per_volume, 64),
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        seed=args.seed,
        preprocessing=train_pre,
        augmentation=augmentation,
        label_names="seg",
        num_epochs=None,
        drop_last=True,
        cache_dir=output / "cache",
    )
    validation = jmed.SubjectsSource([val_record], label_names="seg", preprocessing=val_pre)[0]
    val_t1, val_seg = validation["t1"], validation["seg"]
    if min(val_t1.spatial_shape) < patch:
        raise SystemExit(
            f"error: --patch-size {patch} is larger than the preprocessed volume {val_t1.spatial_shape}; "
            "choose a smaller patch"
        )
    val_labels = jnp.asarray(val_seg.data[..., 0])
    frequencies = np.bincount(np.asarray(val_labels).ravel(), minlength=NUM_CLASSES) / val_labels.size

    # --- model, optimiser, train step -------------------------------------------------------
    model = create_unet(1, NUM_CLASSES, width=args.width, seed=args.seed)
    schedule = optax.cosine_decay_schedule(args.learning_rate, max(total_steps, 1), alpha=0.1)
    optimizer = nnx.Optimizer(model, optax.adamw(schedule, weight_decay=1e-4), wrt=nnx.Param)
    # the train step is a pure function of (weights + optimizer state, batch): the state is
    # replicated on every device of the mesh, the batch is split over them
    graphdef, state = nnx.split((model, optimizer))
    state = data_parallel.replicate(state, mesh)
    train_step = data_parallel.segmentation_train_step(graphdef, mesh)

    model_graphdef = nnx.graphdef(model)
    window = dict(patch_size=patch, overlap=patch // 2, batch_size=2, mode="hann", mesh=mesh)

    @jax.jit
    def segment(model_state, image):
        # the model is rebuilt from its weights inside jit, so new weights do not recompile
        probabilities = jmed.sliding_window_inference(nnx.merge(model_graphdef, model_state), image, **window)
        return jnp.argmax(probabilities.data, axis=-1).astype(jnp.uint8)

    def validate(state):
        trained, _ = nnx.merge(graphdef, state)
        labels = segment(nnx.state(trained), val_t1)
        dice = jmed.metrics.dice_score(labels, val_labels, num_classes=NUM_CLASSES)
        return labels, np.asarray(dice)

    def to_devices(batch):
        # starts the transfer and returns at once; the arrays are split over the mesh
        return data_parallel.to_global((batch["t1"].data, batch["seg"].data), mesh)

    print(f"data: {what}")
    print(f"validation volume {val_t1.spatial_shape} at {val_t1.spacing[0]:g} mm")
    print(
        f"{args.epochs} epochs x {args.steps_per_epoch} steps, batch {args.batch_size} x {patch}^3, "
        f"U-Net width {args.width}, data-parallel on {len(devices)} {devices[0].platform} device(s)"
    )
    print(
        "chance Dice (class frequency in the validation volume): "
        + ", ".join(f"{name} {frequencies[c]:.3f}" for c, name in CLASS_NAMES.items())
    )

    # --- training ---------------------------------------------------------------------------
    history = []
    step_losses = []
    train_times = []
    with iter(queue) as batches:
        # the next batches are loaded and put on the devices while a step runs
        device_batches = data_parallel.prefetch(batches, to_devices, size=2)
        for epoch in range(args.epochs):
            epoch_start = time.perf_counter()
            losses = []
            for _ in range(args.steps_per_epoch):
                images, labels = next(device_batches)
                if not step_losses and not losses:
                    print(data_parallel.describe(images, state), flush=True)
                state, loss = train_step(state, images, labels)
                losses.append(loss)  # not read yet: reading would wait for the step
            losses = [float(x) for x in data_parallel.fetch(losses)]
            train_times.append(time.perf_counter() - epoch_start)
            step_losses += losses
            labels, dice = validate(state)
            history.append(dice)
            print(
                f"epoch {epoch + 1}/{args.epochs}  loss {np.mean(losses):.4f}  "
                + "  ".join(f"Dice {name} {dice[c]:.3f}" for c, name in CLASS_NAMES.items())
                + f"  ({time.perf_counter() - epoch_start:.1f} s)",
                flush=True,
            )

    # --- outputs ----------------------------------------------------------------------------
    prediction = jmed.LabelMap(np.asarray(labels), val_t1.affine)
    jmed.save(prediction, prediction_path, overwrite=args.overwrite)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = jmed.plot.plot_image(
        val_t1, label=prediction, title="prediction (validation volume)", output=overlay_path
    )
    plt.close(fig)

    history_path.write_text(
        json.dumps(
            {
                "devices": len(devices),
                "batch_size": args.batch_size,
                "losses": step_losses,
                "dice": [{name: float(d[c]) for c, name in CLASS_NAMES.items()} for d in history],
            },
            indent=1,
        )
    )
    wall = time.perf_counter() - start_time
    final = history[-1]
    print("summary:")
    print(f"  data           {what}")
    print(
        "  validation Dice "
        + ", ".join(f"{name} {final[c]:.3f} (chance {frequencies[c]:.3f})" for c, name in CLASS_NAMES.items())
    )
    if len(train_times) > 1:
        print(
            f"  train step     {1000 * np.mean(train_times[1:]) / args.steps_per_epoch:.0f} ms (mean after the "
            f"first epoch, whose {args.steps_per_epoch} steps took {train_times[0]:.1f} s with compilation)"
        )
    print(f"  wall time      {wall:.1f} s")
    print(f"  prediction     {prediction_path}")
    print(f"  overlay        {overlay_path}")
    print(f"  history        {history_path}")
    return {
        "dice": {name: float(final[c]) for c, name in CLASS_NAMES.items()},
        "losses": step_losses,
        "wall_time": wall,
        "output": output,
    }


if __name__ == "__main__":
    main()
