# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Coming from TorchIO
#
# This notebook walks through a TorchIO session in jmed: load a subject, preprocess it,
# augment it, look at it, undo the augmentation, and feed a patch `Queue` into a Flax
# train step. It uses synthetic phantoms written to a temporary folder, so it runs
# anywhere without downloads.
#
# What changes, in one breath: data are channels-last `(x, y, z, c)`; every random
# transform takes an explicit JAX key, `transform(key, subject)` (same key, same result);
# transforms are pure functions, so they compile with `jax.jit` and batch with
# `jax.vmap`. See [docs/torchio.md](../torchio.md) for the full table of differences.

# %%
import os
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import jmed
import jmed.transforms as T  # noqa: N812 - the usual short name, like torchio.transforms as tio

# Small sizes when the documentation is tested (JMED_TUTORIAL_SMALL=1); try 1 for real sizes.
SMALL = os.environ.get("JMED_TUTORIAL_SMALL", "0") == "1"
SHAPE = (32, 32, 32) if SMALL else (64, 64, 64)
PATCH = 16 if SMALL else 32
STEPS = 3 if SMALL else 50

# %% [markdown]
# ## Some files to start from
#
# `jmed.datasets.phantom` makes a brain-like subject (a T1-like image and a tissue label
# map). We write three of them as NIfTI files, as your data would be on disk.

# %%
folder = Path(tempfile.mkdtemp(prefix="jmed-tutorial-"))
records = []
for i in range(3):
    phantom = jmed.datasets.phantom(i, shape=SHAPE, spacing=(1.5, 1.5, 1.5), num_classes=4)
    record = {"subject_id": f"sub-{i}"}
    for name in ("t1", "seg"):
        path = folder / f"sub-{i}_{name}.nii.gz"
        jmed.save(phantom[name], path, overwrite=True)
        record[name] = str(path)
    records.append(record)
records[0]

# %% [markdown]
# ## Load
#
# | TorchIO | jmed |
# |---|---|
# | `tio.ScalarImage(path)` | `jmed.load(path)` (intensity, float32) |
# | `tio.LabelMap(path)` | `jmed.load(path, kind="label")` (integers kept) |
# | `tio.Subject(t1=..., seg=...)` | `jmed.Subject(t1=..., seg=...)` |
# | `image.data` `(c, x, y, z)` torch | `image.data` `(x, y, z, c)` numpy/JAX |
#
# Images are read when loaded (`lazy=True` reads only the header).

# %%
subject = jmed.Subject(
    t1=jmed.load(records[0]["t1"]),
    seg=jmed.load(records[0]["seg"], kind="label"),
)
t1 = subject["t1"]
print(t1.shape, t1.dtype, t1.spacing, t1.orientation)
print(subject["seg"].dtype, np.unique(np.asarray(subject["seg"].data)))

# %% [markdown]
# ## Preprocess
#
# Deterministic transforms are called without a key. `RescaleIntensity` takes its
# arguments by keyword (`out_min_max=(0, 1)`, not TorchIO's positional `(0, 1)`).

# %%
preprocess = T.Compose(
    [
        T.ToCanonical(),
        T.Resample(2.0),  # mm
        T.RescaleIntensity(out_min_max=(0, 1), percentiles=(0.5, 99.5)),
        T.EnsureShapeMultiple(4, method="pad"),
    ]
)
preprocessed = preprocess(None, subject)
print(preprocessed["t1"].spatial_shape, preprocessed["t1"].spacing)

# %% [markdown]
# ## Augment
#
# Every random transform takes a key first. The same key gives the same result, in a
# notebook, in a loader worker, or under `jax.jit`.

# %%
augment = T.Compose(
    [
        T.RandomFlip(axes=("LR",), flip_probability=0.5),
        T.RandomAffine(scales=0.1, degrees=15, translation=3),
        T.RandomBiasField(coefficients=0.3),
        T.RandomNoise(std=(0, 0.05)),
    ]
)
key = jax.random.key(0)
augmented = augment(key, preprocessed)
again = jax.jit(augment)(key, preprocessed)  # one compiled XLA program
print(np.abs(np.asarray(augmented["t1"].data) - np.asarray(again["t1"].data)).max())

# %% [markdown]
# ## Look at it
#
# `subject.plot()` (TorchIO's spelling, over `jmed.plot.plot_subject`) draws orthogonal
# slices in world orientation (letters at the borders), with the label map overlaid. It
# returns a matplotlib figure, which a notebook shows; `output="file.png"` saves it. A
# `Subject` or `Image` left as the last value of a cell shows its geometry and slices.

# %%
from jmed.plot import plot_transform  # noqa: E402 - needs matplotlib

# jmed.plot returns matplotlib figures; this shows them under the cells that return them
# %matplotlib inline

augmented.plot(title="augmented")

# %%
plot_transform(key, augment, preprocessed, num_samples=3)

# %% [markdown]
# ## History and inverse
#
# Each transform appends `(transform, params)` to `subject.history`: the parameters it
# drew, as arrays (a `Compose` records one entry, with one set of parameters per
# step). `history_summary()` prints them in degrees and millimetres;
# `get_composed_history()` is a transform that replays them on another subject.
# `apply_inverse_transform()` (TorchIO's name, over `T.invert`) undoes the invertible
# steps (spatial ones), last first, and skips the others (intensity changes, and here
# the preprocessing), with a warning unless `warn=False`.

# %%
print(augmented.history_summary())

# %%
restored = augmented.apply_inverse_transform(warn=False)
print("affine restored:", np.allclose(restored["t1"].affine, preprocessed["t1"].affine, atol=1e-4))
print("shape restored:", restored["t1"].shape == preprocessed["t1"].shape)
restored.plot(title="augmentation undone")

# %% [markdown]
# ## A patch queue into a Flax train step
#
# `jmed.Queue` is TorchIO's `Queue`, built on grain: it loads, preprocesses, augments
# and samples patches, then shuffles and batches them. Batches are `Subject`s with a
# leading batch axis, channels last, ready for `flax.nnx.Conv`.
#
# **Workers are processes started with `spawn`.** With `num_workers > 0` they import the
# main module, so a script must keep its work under `if __name__ == "__main__":`. In a
# notebook there is no main module to import: use `num_workers=0` (loading in the
# notebook's process), as here, or move the loader into a script.

# %%
sampler = jmed.LabelSampler(PATCH, "seg", {0: 1, 1: 1, 2: 1, 3: 1})
queue = jmed.Queue(
    records,
    sampler=sampler,
    samples_per_volume=4,
    max_length=16,
    batch_size=4,
    num_workers=0,  # in a notebook; in a script under `if __name__ == "__main__":`, use more
    seed=0,
    preprocessing=preprocess,
    augmentation=augment,
    label_names="seg",
    num_epochs=None,  # repeat forever; we take STEPS batches
    drop_last=True,
)
batch = next(iter(queue))
print(batch["t1"].data.shape, batch["seg"].data.shape, batch.metadata["subject_id"])

# %% [markdown]
# A tiny segmentation network in Flax NNX and an optax train step. The batch's arrays
# go straight into `jax.jit`.

# %%
import optax  # noqa: E402
from flax import nnx  # noqa: E402

NUM_CLASSES = 4


class TinyNet(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(1, 8, (3, 3, 3), rngs=rngs)
        self.conv2 = nnx.Conv(8, 8, (3, 3, 3), rngs=rngs)
        self.head = nnx.Conv(8, NUM_CLASSES, (1, 1, 1), rngs=rngs)

    def __call__(self, x):
        return self.head(nnx.relu(self.conv2(nnx.relu(self.conv1(x)))))


model = TinyNet(nnx.Rngs(0))
optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)


@nnx.jit
def train_step(model, optimizer, images, labels):
    def loss_fn(model):
        logits = model(images)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels[..., 0]).mean()

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss


losses = []
for _, batch in zip(range(STEPS), queue):
    images = jnp.asarray(batch["t1"].data)
    labels = jnp.asarray(batch["seg"].data, jnp.int32)
    losses.append(float(train_step(model, optimizer, images, labels)))
print([round(loss, 3) for loss in losses])

# %% [markdown]
# ## Where next
#
# - [Sliding-window inference over a folder](sliding_window_inference.ipynb): predict
#   whole volumes with the trained model, save NIfTI files and a QC figure.
# - [Loading data for training](../loader.md): workers, caches, shape buckets, the
#   device pipeline (augmentation inside the train step).
# - The `jmed` command: `jmed info file.nii.gz`, `jmed transform in.nii.gz out.nii.gz
#   RandomAffine --kwargs "degrees=10"`, `jmed transform --list`.
