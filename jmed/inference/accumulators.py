"""Accumulators: where weighted window predictions are added up, and how they end.

An accumulator is built for one output from an ``OutputSpec`` and has two methods (as
MONAI's ``Merger``): ``aggregate(values, starts)`` adds a batch of windows that are
already weighted (the weights of the grid plan are normalised in advance, so the sum
*is* the output: there is no weight volume and no division), and ``finalize()`` crops the
padding away, takes the argmax over channels if asked, and returns the ``Image``.

``DeviceAccumulator`` keeps the output in device memory (split in blocks of rows over a
mesh, summed at the end), ``HostAccumulator`` in numpy memory for outputs that do not fit
the device; any object with the two methods (e.g. one writing chunks to disk) can be
plugged into ``sliding_window_inference`` through a factory ``factory(spec)``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from jmed.image import INTENSITY, LABEL, Image
from jmed.inference._mesh import _batch_spec, _mesh_axes, _shard_map
from jmed.inference.plan import _gather, _Plan

__all__ = ["Accumulator", "DeviceAccumulator", "HostAccumulator", "OutputSpec"]


@dataclasses.dataclass(frozen=True)
class OutputSpec:
    """What an accumulator holds and what its ``finalize`` returns.

    Attributes:
        shape: the accumulator's spatial shape (output space, padding included).
        channels: channels accumulated (1 when only labels are accumulated, in ``"crop"``
            mode with ``argmax``).
        dtype: accumulation dtype.
        crop: ``(low, length)`` per spatial axis kept by ``finalize``.
        argmax: ``finalize`` takes the argmax over channels.
        label_dtype: dtype of that argmax.
        affine: 4x4 affine of the finalized output.
        kind: ``jmed.LABEL`` or ``jmed.INTENSITY``, the kind of the output.
    """

    shape: tuple[int, int, int]
    channels: int
    dtype: np.dtype
    crop: tuple[tuple[int, int], ...]
    argmax: bool
    label_dtype: np.dtype
    affine: np.ndarray
    kind: str


@runtime_checkable
class Accumulator(Protocol):
    """Adds weighted windows into one output volume; ``finalize`` returns the output.

    ``aggregate(values, starts)``: ``values`` ``(b, qx, qy, qz, channels)`` are weighted
    window predictions (numpy or jax arrays), ``starts`` ``(b, 3)`` integer window starts
    in the accumulator's grid (output space, padding included). Windows may come in any
    order and overlap; they are added.

    ``finalize()``: the output ``Image`` (see ``OutputSpec``), after every window was added.
    """

    def aggregate(self, values: ArrayLike, starts: ArrayLike) -> None: ...

    def finalize(self) -> Image: ...


def _label_dtype(num_channels: int) -> np.dtype:
    return np.dtype(np.uint8 if num_channels <= 256 else np.int32)


def _finish(acc, crop, argmax, label_dtype, xp):
    """Crop the padding away (output space) and take the argmax if asked."""
    out = acc[tuple(slice(low, low + length) for low, length in crop)]
    if argmax:
        out = xp.argmax(out, axis=-1)[..., None].astype(label_dtype)
    return out


# --- weighting and adding windows, shared by every device program ------------------------------


def _outer(wx, wy, wz):
    return wx[..., :, None, None] * wy[..., None, :, None] * wz[..., None, None, :]


def _weighted(outputs, wx, wy, wz, dtype, label_only: bool):
    """Predictions ``(..., qx, qy, qz, c)`` times the separable weights ``wx, wy, wz``.

    With ``label_only`` (crop mode) every voxel has exactly one window with weight 1, so the
    windows' argmax labels, zero where the weight is zero, add up exactly.
    """
    w = _outer(wx, wy, wz)
    if label_only:
        labels = jnp.argmax(outputs, axis=-1).astype(dtype)
        return jnp.where(w > 0, labels, 0)[..., None]
    return (outputs.astype(jnp.float32) * w[..., None]).astype(dtype)


def _add_windows(acc, window, starts, count: int):
    """Add ``window(b)`` at ``starts[b]`` for ``b < count`` (in place under jit).

    Window by window (the batch is static and small, so the loop is unrolled), so that the
    weight, the multiplication and the addition fuse into one pass over the window and no
    weighted copy of the batch is materialised.
    """
    for b in range(count):
        value = window(b)
        index = (starts[b, 0], starts[b, 1], starts[b, 2], 0)
        current = jax.lax.dynamic_slice(acc, index, value.shape)
        acc = jax.lax.dynamic_update_slice(acc, current + value, index)
    return acc


def _weigh(plan: _Plan, outputs, starts, valid, dtype, label_only: bool):
    """Output-space starts and weighted predictions (or labels) for one batch."""
    out_starts = plan.output_starts(starts)
    return out_starts, _weighted(outputs, *plan.axis_weights(out_starts, valid), dtype, label_only)


def _accumulate_batch(plan: _Plan, acc, outputs, starts, valid, label_only: bool):
    """Weight each predicted window and add it into ``acc``."""
    out_starts = plan.output_starts(starts)
    wx, wy, wz = plan.axis_weights(out_starts, valid)

    def window(b):
        return _weighted(outputs[b], wx[b], wy[b], wz[b], acc.dtype, label_only)

    return _add_windows(acc, window, out_starts, outputs.shape[0])


def _add_weighted(acc, values, starts):
    """Add already-weighted windows ``values`` at output-space ``starts``."""
    return _add_windows(acc, lambda b: values[b].astype(acc.dtype), starts, values.shape[0])


# --- the device programs -----------------------------------------------------------------------
# Outside a trace, the programs around the model (cut windows, weight and add them, crop)
# depend on the volume shape and are compiled per shape; they are cached on the plan.


class _WindowPrograms(NamedTuple):
    cut: Any  # (padded volume, starts) -> windows
    add: Any  # (accumulator, outputs, starts, valid) -> accumulator (donated)
    weigh: Any  # (outputs, starts, valid) -> (output-space starts, weighted outputs)


@functools.lru_cache(maxsize=32)
def _window_programs(plan: _Plan, dtype, label_only: bool, mesh, axes) -> _WindowPrograms:
    def cut_windows(volume, starts):
        return _gather(volume, starts, plan.patch)

    def add_windows(acc, outputs, starts, valid):
        return _accumulate_batch(plan, acc, outputs, starts, valid, label_only)

    def weigh_windows(outputs, starts, valid):
        return _weigh(plan, outputs, starts, valid, dtype, label_only)

    if mesh is None:
        return _WindowPrograms(
            jax.jit(cut_windows), jax.jit(add_windows, donate_argnums=0), jax.jit(weigh_windows)
        )
    spec = jax.sharding.PartitionSpec
    batch_spec = _batch_spec(axes)

    def mapped(fn, in_specs, **kwargs):
        return jax.jit(_shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=batch_spec), **kwargs)

    return _WindowPrograms(
        mapped(cut_windows, (spec(), batch_spec)),
        mapped(add_windows, (batch_spec,) * 4, donate_argnums=0),
        mapped(weigh_windows, (batch_spec,) * 3),
    )


@functools.lru_cache(maxsize=32)
def _add_weighted_program(mesh, axes):
    if mesh is None:
        return jax.jit(_add_weighted, donate_argnums=0)
    batch_spec = _batch_spec(axes)
    mapped = _shard_map(_add_weighted, mesh=mesh, in_specs=(batch_spec,) * 3, out_specs=batch_spec)
    return jax.jit(mapped, donate_argnums=0)


@functools.lru_cache(maxsize=32)
def _finish_program(crop, argmax, label_dtype, mesh, axes, acc_shape, last: bool):
    def finish(acc):
        return _finish(acc, crop, argmax, label_dtype, jnp)

    if mesh is None:
        # the last use and nothing cropped: the output is the accumulator itself, not a copy
        whole = last and not argmax and all(c == (0, n) for c, n in zip(crop, acc_shape))
        return jax.jit(finish, donate_argnums=0 if whole else ())
    spec = jax.sharding.PartitionSpec

    def total(acc):  # one block of rows per device -> their sum on every device
        return jax.lax.psum(acc, axes)

    mapped = _shard_map(total, mesh=mesh, in_specs=_batch_spec(axes), out_specs=spec())
    return jax.jit(lambda acc: finish(mapped(acc)))


# --- the accumulators --------------------------------------------------------------------------


class DeviceAccumulator:
    """Accumulates in device memory (the default of ``sliding_window_inference``).

    Without a mesh the output is one array, updated in place (donated). With a mesh, every
    device adds the windows it holds into its own block of rows of a
    ``(devices * x, y, z, c)`` array; ``finalize`` sums the blocks (``psum``). Then
    ``aggregate`` takes batches split over the mesh axes (a multiple of their device
    count).

    Args:
        spec: the output (see ``OutputSpec``).
        mesh: a ``jax.sharding.Mesh`` or ``None``.
        axis_name: mesh axis (or axes) the windows are split over; default all.
    """

    def __init__(self, spec: OutputSpec, *, mesh: jax.sharding.Mesh | None = None, axis_name: Any = None):
        if not isinstance(spec, OutputSpec):
            raise TypeError(f"spec must be an OutputSpec, got {type(spec).__name__}")
        self.spec = spec
        axes, num_devices = (None, 1) if mesh is None else _mesh_axes(mesh, axis_name)
        if num_devices == 1:
            mesh, axes = None, None
        self._mesh, self._axes = mesh, axes
        shape = (*spec.shape, spec.channels)
        if mesh is None:
            self._acc = jnp.zeros(shape, spec.dtype)
        else:
            rows = (num_devices * shape[0], *shape[1:])
            split = jax.sharding.NamedSharding(mesh, _batch_spec(axes))
            self._acc = _zeros_program(rows, np.dtype(spec.dtype), split)()

    def aggregate(self, values: ArrayLike, starts: ArrayLike) -> None:
        """Add weighted windows ``(b, qx, qy, qz, channels)`` at output-space ``starts`` ``(b, 3)``."""
        program = _add_weighted_program(self._mesh, self._axes)
        starts = (
            np.asarray(starts, np.int32) if isinstance(starts, np.ndarray) else jnp.asarray(starts, jnp.int32)
        )
        if self._mesh is not None:  # where shard_map expects them (explicit-axis meshes too)
            split = jax.sharding.NamedSharding(self._mesh, _batch_spec(self._axes))
            values, starts = jax.device_put((values, starts), split)
        self._acc = program(self._acc, values, starts)

    def _add_predictions(self, plan: _Plan, outputs, starts, valid, label_only: bool) -> None:
        """Weight predicted windows and add them in one program (no weighted copy)."""
        add = _window_programs(plan, np.dtype(self.spec.dtype), label_only, self._mesh, self._axes).add
        self._acc = add(self._acc, outputs, starts, valid)

    def _finalize_data(self, *, last: bool = False) -> jax.Array:
        """The output data; with ``last`` the accumulator may become the output (donated)."""
        spec = self.spec
        program = _finish_program(
            spec.crop,
            spec.argmax,
            np.dtype(spec.label_dtype),
            self._mesh,
            self._axes,
            tuple(spec.shape),
            last,
        )
        out = program(self._acc)
        if last:
            self._acc = None
        return out

    def finalize(self) -> Image:
        """The output ``Image`` of the windows added so far (more may be added after)."""
        if self._acc is None:
            raise ValueError("this accumulator's output was already taken")
        return Image(self._finalize_data(), self.spec.affine, kind=self.spec.kind)


@functools.lru_cache(maxsize=32)
def _zeros_program(shape, dtype, sharding):
    return jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)


class HostAccumulator:
    """Accumulates in host (numpy) memory, for outputs that do not fit the device.

    ``finalize`` returns numpy data.

    Args:
        spec: the output (see ``OutputSpec``).
    """

    def __init__(self, spec: OutputSpec):
        if not isinstance(spec, OutputSpec):
            raise TypeError(f"spec must be an OutputSpec, got {type(spec).__name__}")
        self.spec = spec
        self._acc = np.zeros((*spec.shape, spec.channels), spec.dtype)

    def aggregate(self, values: ArrayLike, starts: ArrayLike) -> None:
        """Add weighted windows ``(b, qx, qy, qz, channels)`` at output-space ``starts`` ``(b, 3)``."""
        starts = np.asarray(starts)
        values = np.asarray(values)
        qx, qy, qz = values.shape[1:4]
        for (x, y, z), value in zip(starts, values):
            self._acc[x : x + qx, y : y + qy, z : z + qz] += value

    def _finalize_data(self) -> np.ndarray:
        spec = self.spec
        return _finish(self._acc, spec.crop, spec.argmax, spec.label_dtype, np)

    def finalize(self) -> Image:
        """The output ``Image`` with numpy data."""
        return Image(self._finalize_data(), self.spec.affine, kind=self.spec.kind)


ACCUMULATORS = ("device", "host")


def _output_spec(*, plan: _Plan, channels, dtype, crop, argmax, affine, label_only: bool) -> OutputSpec:
    """The ``OutputSpec`` of an aggregation over ``plan`` of a ``channels``-channel model."""
    return OutputSpec(
        shape=tuple(plan.out_shape),
        channels=1 if label_only else channels,
        dtype=np.dtype(_label_dtype(channels) if label_only else dtype),
        crop=tuple(crop),
        argmax=bool(argmax and not label_only),
        label_dtype=_label_dtype(channels),
        affine=np.asarray(affine),
        kind=LABEL if argmax else INTENSITY,
    )
