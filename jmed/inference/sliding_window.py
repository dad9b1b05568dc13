"""The driver of sliding-window inference: pad, cut, predict, weight, accumulate, finish.

Outside a trace, the model is its own program (``jmed.inference.model``), compiled once
per window-batch shape and shared by every volume; the cheap programs around it (pad,
cut windows, weight and add, crop) depend on the volume shape and are compiled per shape.
Under a trace the whole loop becomes one ``lax.scan`` in the caller's program.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jmed._checks import check_choice, is_int, is_traced
from jmed._progress import progress_bar
from jmed.image import INTENSITY, LABEL, Image
from jmed.inference._mesh import _batch_spec, _mesh_axes, _placed, _shard_map, _varying
from jmed.inference.accumulators import (
    ACCUMULATORS,
    Accumulator,
    DeviceAccumulator,
    HostAccumulator,
    OutputSpec,
    _accumulate_batch,
    _finish,
    _label_dtype,
    _output_spec,
    _window_programs,
)
from jmed.inference.model import _model
from jmed.inference.plan import (
    MODES,
    PADDING_MODES,
    _check_output,
    _crop,
    _gather,
    _make_plan,
    _output_affine,
    _pad,
    _padding,
    _parse_grid,
    _Plan,
)

__all__ = ["sliding_window_inference"]


def _check_batch_size(batch_size: Any) -> int:
    if not is_int(batch_size) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    return int(batch_size)


def _check_dtype(dtype: Any) -> np.dtype:
    try:
        dtype = jnp.dtype(dtype)
    except TypeError as error:
        raise TypeError(f"accumulation_dtype must be a floating dtype, got {dtype!r}") from error
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"accumulation_dtype must be a floating dtype, got {dtype!r}")
    return dtype


def _as_image(image: Any) -> Image:
    if isinstance(image, Image):
        return image
    raise TypeError(f"image must be a jmed.Image, got {type(image).__name__}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Config:
    """The static configuration of one inference (hashable: it keys compiled programs)."""

    plan: _Plan
    widths: tuple[tuple[int, int], ...]  # padding of the input, per spatial axis
    padding_mode: str
    padding_value: float
    crop: tuple[tuple[int, int], ...]  # (low, length) kept of the output space
    final_argmax: bool  # argmax over the accumulated channels at the end
    batch: int  # windows per call of the model, per device
    dtype: np.dtype  # accumulation dtype (the label dtype when label_only)
    label_only: bool  # crop mode with argmax: only labels are accumulated
    channels: int  # channels of the model's output
    label_dtype: np.dtype
    mesh: jax.sharding.Mesh | None
    axes: tuple[str, ...] | None
    num_devices: int

    @property
    def global_batch(self) -> int:
        return self.batch * self.num_devices

    @property
    def acc_shape(self) -> tuple[int, ...]:
        return (*self.plan.out_shape, 1 if self.label_only else self.channels)


# --- under a trace: one program --------------------------------------------------------------


def _device_program(predict, config: _Config):
    """``data -> output`` as one program (pad, scan over batches split over the mesh, crop).

    Used under a trace (inside the caller's ``jax.jit`` or ``vmap``), where everything
    becomes one program anyway.
    """
    plan, mesh, axes = config.plan, config.mesh, config.axes
    starts, valid = plan.schedule(config.global_batch)
    # (n_batches, batch, ...); with a mesh, device k takes a contiguous run of batches
    starts = starts.reshape(-1, config.batch, 3)
    valid = valid.reshape(-1, config.batch)

    def local_accumulate(volume, starts, valid):
        def body(acc, xs):
            s, v = xs
            outputs = predict(_gather(volume, s, plan.patch))
            return _accumulate_batch(plan, acc, outputs, s, v, config.label_only), None

        acc = jnp.zeros(config.acc_shape, config.dtype)
        if mesh is not None:  # each device's partial sum differs: mark the carry as varying
            acc = _varying(acc, axes)
        acc, _ = jax.lax.scan(body, acc, (starts, valid))
        return acc

    if mesh is not None:
        spec = jax.sharding.PartitionSpec
        batch_spec = _batch_spec(axes)

        def sharded(volume, starts, valid):
            return jax.lax.psum(local_accumulate(volume, starts, valid), axes)

        mapped = _shard_map(sharded, mesh=mesh, in_specs=(spec(), batch_spec, batch_spec), out_specs=spec())
        accumulate = _placed(mapped, mesh, batch_spec)
    else:
        accumulate = local_accumulate

    def run(data):
        padded = _pad(data, config.widths, config.padding_mode, config.padding_value)
        acc = accumulate(padded, jnp.asarray(starts), jnp.asarray(valid))
        return _finish(acc, config.crop, config.final_argmax, config.label_dtype, jnp)

    return run


# --- outside a trace: the model's program, and small programs per volume shape -----------------


@functools.lru_cache(maxsize=32)
def _pad_program(widths, padding_mode, padding_value):
    return jax.jit(functools.partial(_pad, widths=widths, padding_mode=padding_mode, value=padding_value))


def _run_eager(predict_windows, arrays, data, config: _Config, accumulator, progress: bool):
    """Pad, then per batch: cut the windows, predict them, weight and add them; finalize."""
    plan, mesh, axes = config.plan, config.mesh, config.axes
    global_batch = config.global_batch
    programs = _window_programs(plan, np.dtype(config.dtype), config.label_only, mesh, axes)
    if any(w != (0, 0) for w in config.widths):
        padded = _pad_program(config.widths, config.padding_mode, config.padding_value)(data)
    else:  # on the device once, not at every cut
        padded = data if isinstance(data, jax.Array) else jax.device_put(data)
    starts, valid = plan.schedule(global_batch)
    num_windows = int(valid.sum())
    starts = np.split(starts, len(starts) // global_batch)
    valid = np.split(valid, len(valid) // global_batch)
    # without a mesh the numpy batches are passed as they are: jit's own transfer is faster
    if mesh is not None:
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        split = jax.sharding.NamedSharding(mesh, _batch_spec(axes))
        padded, arrays = jax.device_put((padded, arrays), replicated)
        starts, valid = jax.device_put((starts, valid), split)

    with progress_bar(progress, total=num_windows, desc="sliding window", unit="window") as bar:
        device = isinstance(accumulator, DeviceAccumulator)
        if device and (accumulator._mesh, accumulator._axes) == (mesh, axes):
            # weighted and added in one program: no weighted copy of the batch
            for i, (s, v) in enumerate(zip(starts, valid)):
                outputs = predict_windows(arrays, programs.cut(padded, s))
                accumulator._add_predictions(plan, outputs, s, v, config.label_only)
                bar.update(min(global_batch, num_windows - i * global_batch))
            return accumulator._finalize_data(last=True)

        # Other accumulators keep the output outside the device: they get numpy windows, and
        # the next batch is dispatched before the previous one is copied to the host, so the
        # device predicts while the host adds.
        def hand_over(pending):
            (out_starts, values), count = pending
            out_starts, values = np.asarray(out_starts)[:count], np.asarray(values)[:count]
            accumulator.aggregate(values, out_starts)
            bar.update(count)

        pending = None
        for i, (s, v) in enumerate(zip(starts, valid)):
            outputs = predict_windows(arrays, programs.cut(padded, s))
            result = programs.weigh(outputs, s, v)
            if pending is not None:
                hand_over(pending)
            # the last batch's dummy windows are not handed over
            pending = result, min(global_batch, num_windows - i * global_batch)
        if pending is not None:
            hand_over(pending)
    if isinstance(accumulator, HostAccumulator):
        return accumulator._finalize_data()
    return accumulator.finalize()


# --- public API ------------------------------------------------------------------------------


def _under_trace(*values) -> bool:
    """True when ``values`` are traced or a staging trace (``jit``, ...) is active: then
    ``predict`` may close over tracers, and a program built here must not be cached (it
    would leak them into later calls)."""
    if is_traced(*values):
        return True
    # Under a staging trace (jit, export, eval_shape) a primitive applied to a constant
    # gives a tracer; at the top level stop_gradient returns its input without any
    # device computation.
    return is_traced(jax.lax.stop_gradient(np.float32(0)))


def _make_accumulator(accumulator, output_on_host: bool):
    """The accumulator's kind: ``"device"``, ``"host"`` or a factory."""
    if isinstance(accumulator, str):
        check_choice(accumulator, "accumulator", ACCUMULATORS)
        if output_on_host:
            return "host"
        return accumulator
    if not callable(accumulator):
        raise TypeError(
            f"accumulator must be one of {ACCUMULATORS} or a callable factory(spec) -> Accumulator, "
            f"got {type(accumulator).__name__}"
        )
    if output_on_host:
        raise ValueError("output_on_host=True means accumulator='host'; do not pass both with a factory")
    return accumulator


def sliding_window_inference(
    predict: Callable[[jax.Array], jax.Array],
    image: Image,
    patch_size: Any,
    *,
    overlap: Any = 0,
    batch_size: int = 1,
    mode: str = "hann",
    padding_mode: str = "constant",
    padding_value: float = 0.0,
    pad_borders: bool = False,
    mesh: jax.sharding.Mesh | None = None,
    axis_name: str | Sequence[str] | None = None,
    accumulation_dtype: Any = jnp.float32,
    argmax: bool = False,
    output_on_host: bool = False,
    accumulator: str | Callable[[OutputSpec], Accumulator] = "device",
    progress: bool = False,
) -> Image:
    """Predict a whole volume window by window and stitch the predictions together.

    The volume is padded if needed, cut into the static grid of ``grid_locations``,
    predicted ``batch_size`` windows at a time, weighted according to ``mode`` (see
    ``jmed.inference``) and accumulated.

    Compilation: the model is compiled once per window-batch shape
    ``(batch_size, *patch_size, c_in)`` and dtype, and that program is shared by every
    volume shape; only the cheap programs around it (pad, cut, weight and add, crop) are
    compiled per volume shape. The model program is cached on a description of
    ``predict`` whose arrays are arguments, not constants:

    - a Flax NNX module: its graph definition (``nnx.split``); its state is an argument,
      so new weights (after a training step, ``nnx.update``, or another module of the
      same graph) reuse the program;
    - a function: its code, globals and the values it closes over (and its defaults,
      ``functools.partial`` arguments, bound ``self``). Closed-over jax arrays and NNX
      modules are arguments; Python numbers, strings, numpy arrays and other immutable
      values are part of the description (a new value compiles a new program); a fresh
      ``lambda`` per call from the same source reuses the program; a rebound closure
      variable is read afresh at every call. Globals are read when the program is first
      traced, as with ``jax.jit``;
    - other registered pytrees: their structure, their arrays as arguments;
      ``jax.jit``-wrapped functions: their identity.

    Anything else (an instance of an arbitrary class, or a function closing over one)
    may change without notice, so its program is compiled for that call only.

    Under a trace (inside the caller's ``jax.jit`` or ``vmap``) the whole loop is traced
    into the caller's program instead (one ``lax.scan`` over batches), so
    ``predict`` may close over traced values; only the device accumulator can be traced,
    and no progress bar is shown there.

    Args:
        predict: jittable function from a batch ``(batch_size, px, py, pz, c_in)`` to
            ``(batch_size, px // f, py // f, pz // f, c_out)``, e.g. a Flax NNX model. The
            downsampling factor ``f`` (per axis) must divide the patch size and overlap.
        image: the input ``Image`` ``(x, y, z, c_in)``.
        patch_size: window size, an integer or 3 integers.
        overlap: voxels shared by neighbouring windows, ``0 <= overlap < patch_size``.
        batch_size: windows per call of ``predict`` (per device when sharded).
        mode: ``"crop"``, ``"average"``, ``"hann"`` or ``"gaussian"``.
        padding_mode: ``"constant"`` (with ``padding_value``), ``"edge"`` or ``"reflect"``,
            used where the volume is smaller than the patch and for ``pad_borders``.
        padding_value: value of constant padding.
        pad_borders: also pad ``overlap // 2`` voxels on each side, so that border voxels
            are predicted with context (TorchIO's ``GridSampler`` with a padding mode).
        mesh: a ``jax.sharding.Mesh``; windows are split over the devices of
            ``axis_name`` with ``jax.shard_map`` and the partial outputs summed with
            ``psum``. ``None`` runs on the default device.
        axis_name: mesh axis (or axes) to split windows over; default all mesh axes.
        accumulation_dtype: floating dtype of the accumulator (``float32``; ``float16`` or
            ``bfloat16`` halve its memory). Weights are computed in float32.
        argmax: return a label map (``argmax`` over output channels). With ``mode="crop"``
            every voxel comes from one window, so only labels are accumulated (one uint8
            channel instead of ``c_out`` float channels). The other modes blend
            probabilities, and the argmax of a blend is not a function of the windows'
            argmaxes, so they accumulate all channels and take the argmax at the end.
        output_on_host: the same as ``accumulator="host"``.
        accumulator: where the weighted windows are added up: ``"device"`` (device
            memory, ``DeviceAccumulator``), ``"host"`` (numpy memory, for outputs that do
            not fit the device; predicting and weighting stay on the device(s); returns
            numpy data; ``HostAccumulator``), or a factory ``factory(spec)`` that takes an
            ``OutputSpec`` and returns an ``Accumulator`` (e.g. one that writes chunks to
            disk); the result is then the ``Image`` its ``finalize`` returns. The factory's
            accumulator receives the weighted windows of each batch as numpy arrays, with
            their starts in its (output-space, padded) grid.
        progress: show a progress bar of the windows on stderr (``jmed``'s tqdm bar). With
            the device accumulator it advances as batches are dispatched, so it adds no
            synchronisation with the device.

    Returns:
        An ``Image`` with the input's affine (scaled by the downsampling factor, see
        below), spatial shape ``ceil(shape / f)``, ``c_out`` channels (1 with ``argmax``),
        kind ``"label"`` with ``argmax`` else ``"intensity"``. With a factor ``f > 1``
        output voxel ``j`` covers input voxels ``[j f, (j + 1) f)`` and the affine places
        it at their centre.

    Raises:
        ValueError: bad ``patch_size``/``overlap``/``batch_size``/``mode``/
            ``padding_mode``/``accumulator``, a mesh without ``axis_name``, ``predict``
            returning a wrong shape, or a host or custom accumulator (or a progress bar)
            under a trace.
        TypeError: ``image`` not an ``Image``, a bad ``mesh``, ``accumulation_dtype`` or
            ``progress``, or a factory that does not return an ``Accumulator``.

    Examples:
        >>> import numpy as np, jmed
        >>> image = jmed.ScalarImage(np.arange(6 * 5 * 7, dtype=np.float32).reshape(6, 5, 7))
        >>> out = sliding_window_inference(lambda x: 2 * x, image, 4, overlap=2, batch_size=3)
        >>> bool(np.allclose(out.data, 2 * image.data))
        True
    """
    image = _as_image(image)
    patch, over = _parse_grid(patch_size, overlap)
    batch = _check_batch_size(batch_size)
    check_choice(mode, "mode", MODES)
    check_choice(padding_mode, "padding_mode", PADDING_MODES)
    acc_dtype = _check_dtype(accumulation_dtype)
    accumulator = _make_accumulator(accumulator, output_on_host)
    if not isinstance(progress, bool):
        raise TypeError(f"progress must be True or False, got {progress!r}")
    axes, num_devices = (None, 1) if mesh is None else _mesh_axes(mesh, axis_name)
    if num_devices == 1:  # nothing to split; skip the (copying) psum
        mesh, axes = None, None

    data = image.data
    traced = _under_trace(data)
    if not traced:
        model, arrays = _model(predict)
        traced = is_traced(*jax.tree.leaves(arrays))  # e.g. under grad, closed-over tracers
    if traced and accumulator != "device":
        what = "output_on_host=True" if output_on_host else f"accumulator={accumulator!r}"
        raise ValueError(f"{what} cannot run under jax.jit (it accumulates outside the program)")
    if traced and progress:
        raise ValueError("progress=True cannot run under jax.jit (the loop is part of the program)")
    in_channels = data.shape[-1]
    probe = jax.ShapeDtypeStruct((batch, *patch, in_channels), data.dtype)
    if traced:
        out_shape = jax.eval_shape(predict, probe).shape
    else:
        out = jax.eval_shape(model(None, None, False), arrays, probe)
        out_shape = out.shape
        donate = out.shape == probe.shape and out.dtype == probe.dtype
    factor, out_channels = _check_output(out_shape, batch, patch)
    for name, values in (("patch_size", patch), ("overlap", over)):
        if any(v % f for v, f in zip(values, factor)):
            raise ValueError(
                f"{name} {values} must be divisible by the downsampling factor {factor} of predict"
            )

    widths = _padding(image.spatial_shape, patch, over, factor, pad_borders)
    padded_shape = tuple(s + lo + hi for s, (lo, hi) in zip(image.spatial_shape, widths))
    plan = _make_plan(padded_shape, patch, over, factor, mode)
    label_only = argmax and mode == "crop"
    crop = _crop(widths, factor, image.spatial_shape)
    config = _Config(
        plan=plan,
        widths=widths,
        padding_mode=padding_mode,
        padding_value=float(padding_value),
        crop=crop,
        final_argmax=argmax and not label_only,
        batch=batch,
        dtype=_label_dtype(out_channels) if label_only else acc_dtype,
        label_only=label_only,
        channels=out_channels,
        label_dtype=_label_dtype(out_channels),
        mesh=mesh,
        axes=axes,
        num_devices=num_devices,
    )
    affine = _output_affine(image.affine, factor)
    kind = LABEL if argmax else INTENSITY
    if traced:  # one program, part of the caller's
        out = jax.jit(_device_program(predict, config))(data)
        return image.replace(data=out, affine=affine, kind=kind)

    spec = _output_spec(
        plan=plan,
        channels=out_channels,
        dtype=acc_dtype,
        crop=crop,
        argmax=argmax,
        affine=affine,
        label_only=label_only,
    )
    if accumulator == "device":
        target = DeviceAccumulator(spec, mesh=mesh, axis_name=axes)
    elif accumulator == "host":
        target = HostAccumulator(spec)
    else:
        target = accumulator(spec)
        if not isinstance(target, Accumulator):
            raise TypeError(
                "accumulator factory must return an object with aggregate(values, starts) and "
                f"finalize(), got {type(target).__name__}"
            )
    out = _run_eager(model(mesh, axes, donate), arrays, data, config, target, progress)
    if isinstance(out, Image):  # a custom accumulator's own output
        return out
    return image.replace(data=out, affine=affine, kind=kind)
