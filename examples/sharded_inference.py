"""Sharded sliding-window segmentation of one volume with a small Flax NNX model.

The windows of one volume are split over all devices of a ``jax.sharding.Mesh`` with
``jax.shard_map``; each device predicts its windows and accumulates them, and the partial
volumes are summed with ``psum``. On a CPU-only machine the script emulates 8 devices
(``XLA_FLAGS`` is set before jax is imported, unless you set it yourself); on a GPU or TPU
host it runs unchanged on the real devices.

Run from the repository root::

    PYTHONPATH=. python examples/sharded_inference.py

Needs the ``examples`` extra (``flax``).
"""

import os

# emulate 8 CPU devices when no accelerator is present; ignored by GPU/TPU backends
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

import jmed  # noqa: E402


class TinySegmenter(nnx.Module):
    """Two 3D convolutions: (b, x, y, z, 1) -> (b, x, y, z, num_classes) probabilities."""

    def __init__(self, num_classes: int, *, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(1, 8, kernel_size=(3, 3, 3), rngs=rngs)
        self.conv2 = nnx.Conv(8, num_classes, kernel_size=(1, 1, 1), rngs=rngs)

    def __call__(self, x):
        return jax.nn.softmax(self.conv2(jax.nn.relu(self.conv1(x))), axis=-1)


def phantom(shape=(56, 64, 48)):
    """A smooth synthetic head-like volume (nested ellipsoids plus noise), 1 mm voxels."""
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"), -1)
    radius = np.sqrt((grid**2 / np.array([0.8, 0.9, 0.7]) ** 2).sum(-1))
    data = 100.0 * (radius < 0.9) + 50.0 * (radius < 0.5)
    data += np.random.default_rng(0).normal(0, 5, shape)
    affine = jmed.affine.from_spacing((1.0, 1.0, 1.0), (-28.0, -32.0, -24.0), "RAS")
    return jmed.ScalarImage((data / 100).astype(np.float32), affine)


def main():
    image = phantom()
    model = TinySegmenter(num_classes=3, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)

    devices = jax.devices()
    mesh = jax.make_mesh((len(devices),), ("data",))
    print(f"{len(devices)} {devices[0].platform} devices, mesh axes {dict(mesh.shape)}")
    print(f"input {image}")

    settings = dict(patch_size=32, overlap=16, batch_size=2, mode="hann")

    @jax.jit
    def segment(state, image):
        # the model is rebuilt from its state inside jit, so the weights are arguments,
        # not constants baked into the program
        model = nnx.merge(graphdef, state)
        probabilities = jmed.sliding_window_inference(model, image, mesh=mesh, **settings)
        labels = jnp.argmax(probabilities.data, axis=-1)[..., None].astype(jnp.uint8)
        return probabilities, jmed.LabelMap(labels, image.affine)

    start = time.perf_counter()
    probabilities, labels = jax.block_until_ready(segment(state, image))
    print(
        f"sharded over {len(devices)} devices: first call (compile + run) {time.perf_counter() - start:.2f} s"
    )
    start = time.perf_counter()
    probabilities, labels = jax.block_until_ready(segment(state, image))
    print(f"sharded over {len(devices)} devices: {1000 * (time.perf_counter() - start):.1f} ms")

    # the same inference on one device, without a mesh, gives the same result
    single = jmed.sliding_window_inference(model, image, **settings)
    difference = float(jnp.abs(single.data - probabilities.data).max())
    print(f"max |sharded - single device| = {difference:.2e}")

    # label output with the crop mode accumulates only uint8 labels (memory: 1 byte/voxel)
    crop_labels = jmed.sliding_window_inference(
        model, image, **{**settings, "mode": "crop"}, mesh=mesh, argmax=True
    )
    # accumulation in host memory, for outputs that do not fit the device
    on_host = jmed.sliding_window_inference(model, image, mesh=mesh, output_on_host=True, **settings)
    print(
        f"host accumulation: max difference {np.abs(on_host.data - np.asarray(probabilities.data)).max():.2e}"
    )

    print(f"output {probabilities}")
    counts = np.bincount(np.asarray(labels.data).ravel(), minlength=3)
    print(
        f"voxels per class (hann): {counts.tolist()}; crop mode: {np.bincount(np.asarray(crop_labels.data).ravel(), minlength=3).tolist()}"
    )
    assert probabilities.shape == (*image.spatial_shape, 3)
    assert np.allclose(np.asarray(probabilities.data).sum(-1), 1.0, atol=1e-5)
    assert difference < 1e-5


if __name__ == "__main__":
    main()
