"""A small 3D U-Net in Flax NNX, channels last: ``(b, x, y, z, c) -> (b, x, y, z, classes)``.

Two poolings, so patch sides must be multiples of 4. Group normalisation keeps it
independent of the batch size (patch batches are small).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class ConvBlock(nnx.Module):
    """Two 3x3x3 convolutions, each followed by group normalisation and ReLU."""

    def __init__(self, in_channels: int, out_channels: int, *, rngs: nnx.Rngs):
        groups = min(4, out_channels)
        self.conv1 = nnx.Conv(in_channels, out_channels, (3, 3, 3), rngs=rngs)
        self.norm1 = nnx.GroupNorm(out_channels, num_groups=groups, rngs=rngs)
        self.conv2 = nnx.Conv(out_channels, out_channels, (3, 3, 3), rngs=rngs)
        self.norm2 = nnx.GroupNorm(out_channels, num_groups=groups, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = nnx.relu(self.norm1(self.conv1(x)))
        return nnx.relu(self.norm2(self.conv2(x)))


class UNet3D(nnx.Module):
    """U-Net with two resolution levels below the input and ``width`` base features."""

    def __init__(self, in_channels: int, num_classes: int, *, width: int = 8, rngs: nnx.Rngs):
        w = width
        self.enc1 = ConvBlock(in_channels, w, rngs=rngs)
        self.enc2 = ConvBlock(w, 2 * w, rngs=rngs)
        self.bottom = ConvBlock(2 * w, 4 * w, rngs=rngs)
        self.up2 = nnx.ConvTranspose(4 * w, 2 * w, (2, 2, 2), strides=(2, 2, 2), rngs=rngs)
        self.dec2 = ConvBlock(4 * w, 2 * w, rngs=rngs)
        self.up1 = nnx.ConvTranspose(2 * w, w, (2, 2, 2), strides=(2, 2, 2), rngs=rngs)
        self.dec1 = ConvBlock(2 * w, w, rngs=rngs)
        self.head = nnx.Conv(w, num_classes, (1, 1, 1), rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        def pool(t):
            return nnx.max_pool(t, (2, 2, 2), strides=(2, 2, 2))

        e1 = self.enc1(x)
        e2 = self.enc2(pool(e1))
        b = self.bottom(pool(e2))
        d2 = self.dec2(jnp.concatenate([self.up2(b), e2], axis=-1))
        d1 = self.dec1(jnp.concatenate([self.up1(d2), e1], axis=-1))
        return self.head(d1)


def create_unet(in_channels: int, num_classes: int, *, width: int = 8, seed: int = 0) -> UNet3D:
    """A ``UNet3D`` with weights drawn from ``seed``, initialised in one jitted program.

    One compilation for all the weights instead of one per weight shape. On CPU the
    program is compiled without LLVM optimisations: XLA:CPU spends seconds optimising
    the random-number code for the 5D convolution kernels, for a program that runs once
    (the weights differ from the optimised build's by float rounding, about 1e-7).
    """

    def build() -> UNet3D:
        return UNet3D(in_channels, num_classes, width=width, rngs=nnx.Rngs(params=seed))

    options = {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else None
    state = jax.jit(lambda: nnx.state(build())).lower().compile(options)()
    return nnx.merge(nnx.graphdef(nnx.eval_shape(build)), state)
