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
# # Sliding-window inference over a folder of volumes
#
# A trained Flax model segments every volume of a folder: each file is loaded,
# preprocessed, predicted window by window with `jmed.sliding_window_inference`, put back
# on the file's voxel grid and saved as NIfTI, with a quality-control (QC) figure per
# volume. The volumes have different shapes and orientations, as real data do.
#
# It uses synthetic phantoms, so it runs anywhere without downloads.

# %%
import os
import tempfile
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import jmed
import jmed.transforms as T  # noqa: N812
from jmed.plot import plot_subject

# jmed.plot returns matplotlib figures; this shows them under the cells that return them
# %matplotlib inline

# Small sizes when the documentation is tested (JMED_TUTORIAL_SMALL=1).
SMALL = os.environ.get("JMED_TUTORIAL_SMALL", "0") == "1"
SCALE = 1 if SMALL else 2
PATCH = 16
STEPS = 60 if SMALL else 200
NUM_CLASSES = 3  # background (with CSF), grey matter, white matter

# %% [markdown]
# ## A folder of volumes
#
# Three phantoms with different shapes, one of them stored LPS (as DICOM-derived files
# often are), written as `.nii.gz` files. The label maps are kept aside to check the
# predictions.

# %%
work = Path(tempfile.mkdtemp(prefix="jmed-inference-"))
inputs, outputs, truth = work / "inputs", work / "outputs", work / "truth"
for folder in (inputs, outputs, truth):
    folder.mkdir()
shapes = [(24, 28, 24), (28, 24, 20), (20, 24, 28)]
for i, (shape, orientation) in enumerate(zip(shapes, ("RAS", "LPS", "RAS"))):
    shape = tuple(SCALE * n for n in shape)
    phantom = jmed.datasets.phantom(
        10 + i, shape=shape, spacing=(2.0 / SCALE,) * 3, orientation=orientation, num_classes=NUM_CLASSES
    )
    jmed.save(phantom["t1"], inputs / f"case{i}.nii.gz", overwrite=True)
    jmed.save(phantom["seg"], truth / f"case{i}.nii.gz", overwrite=True)
sorted(p.name for p in inputs.iterdir())

# %% [markdown]
# ## A trained model
#
# In practice you restore your trained weights (for example with orbax). Here a tiny
# fully convolutional network is trained for a few steps on another phantom, which is
# enough to show the inference side.

# %%
preprocess = T.Compose(
    [
        T.ToCanonical(),
        T.RescaleIntensity(out_min_max=(0, 1), percentiles=(0.5, 99.5)),
    ]
)


class TinyNet(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(1, 8, (3, 3, 3), rngs=rngs)
        self.conv2 = nnx.Conv(8, 8, (3, 3, 3), rngs=rngs)
        self.head = nnx.Conv(8, NUM_CLASSES, (1, 1, 1), rngs=rngs)

    def __call__(self, x):
        return self.head(nnx.relu(self.conv2(nnx.relu(self.conv1(x)))))


model = TinyNet(nnx.Rngs(0))
optimizer = nnx.Optimizer(model, optax.adam(5e-2), wrt=nnx.Param)
training = preprocess(
    None,
    jmed.datasets.phantom(0, shape=(24 * SCALE,) * 3, spacing=(2.0 / SCALE,) * 3, num_classes=NUM_CLASSES),
)
images = jnp.asarray(training["t1"].data)[None]  # (1, x, y, z, 1)
labels = jnp.asarray(training["seg"].data[..., 0], jnp.int32)[None]


@nnx.jit
def train_step(model, optimizer):
    def loss_fn(model):
        return optax.softmax_cross_entropy_with_integer_labels(model(images), labels).mean()

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss


losses = [float(train_step(model, optimizer)) for _ in range(STEPS)]
print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f}")

# %% [markdown]
# ## Predict every volume
#
# `sliding_window_inference` cuts the volume into overlapping windows of `PATCH` voxels,
# predicts `batch_size` windows per call of the model, blends them with a Hann window and
# returns an `Image` on the input's grid; `argmax=True` returns the label map directly.
# The model is compiled once per window-batch shape, so every volume shape reuses the
# same program.
#
# The prediction is made in the canonical (RAS) orientation of the preprocessing;
# `T.Reorient` puts it back on the file's own voxel grid (exactly, no interpolation), so
# that the output lines up voxel for voxel with its input in any viewer.

# %%
results = []
for path in sorted(inputs.glob("*.nii.gz")):
    image = jmed.load(path)
    ready = preprocess(None, image)
    prediction = jmed.sliding_window_inference(
        model, ready, patch_size=PATCH, overlap=PATCH // 2, batch_size=4, mode="hann", argmax=True
    )
    prediction = T.Reorient(image.orientation)(None, prediction)  # back to the file's grid
    target = outputs / path.name.replace(".nii.gz", "_seg.nii.gz")
    jmed.save(prediction, target, overwrite=True)
    results.append((path, target))
    print(f"{path.name}: {image.shape} {image.orientation} -> {target.name} {prediction.dtype}")

# %% [markdown]
# ## Check: the files, the Dice scores, a QC figure
#
# Each output has the geometry of its input (same shape and affine), so it can be
# checked against the reference segmentation directly.

# %%
for path, target in results:
    image = jmed.load(path)
    predicted = jmed.load(target, kind="label")
    reference = jmed.load(truth / path.name, kind="label")
    assert predicted.shape[:3] == image.shape[:3]
    assert np.allclose(predicted.affine, image.affine)
    dice = jmed.metrics.dice_score(predicted.data, reference.data, num_classes=NUM_CLASSES)
    print(path.name, "Dice per class:", np.round(np.asarray(dice), 2))

# %% [markdown]
# One QC figure per volume, image with the predicted labels overlaid, written next to the
# segmentations; the notebook shows the first.

# %%
figures = []
for path, target in results:
    qc = jmed.Subject(t1=jmed.load(path), prediction=jmed.load(target, kind="label"))
    figure = plot_subject(qc, title=path.name, output=outputs / path.name.replace(".nii.gz", "_qc.png"))
    figures.append(figure)
print(sorted(p.name for p in outputs.iterdir()))
figures[0]

# %% [markdown]
# From the shell, `jmed info` prints the header of an output and `jmed plot` draws the
# same figure:
#
# ```bash
# jmed info outputs/case1_seg.nii.gz --label --stats
# jmed plot inputs/case1.nii.gz --label outputs/case1_seg.nii.gz -o case1.png
# ```
