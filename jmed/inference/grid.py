"""TorchIO's ``GridSampler`` and ``GridAggregator``, for inference loops written by hand.

They share the grid plan and the device accumulator of ``sliding_window_inference``, so a
hand-written loop gives the same output.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from jmed._checks import check_choice, int_triple
from jmed._progress import progress_bar
from jmed.image import Image
from jmed.inference.accumulators import DeviceAccumulator, _output_spec
from jmed.inference.plan import (
    MODES,
    PADDING_MODES,
    _check_output,
    _crop,
    _gather,
    _locations,
    _make_plan,
    _output_affine,
    _pad,
    _padding,
    _parse_grid,
    _window_starts,
)
from jmed.inference.sliding_window import _as_image, _check_batch_size, _check_dtype

__all__ = ["GridAggregator", "GridSampler"]


class GridSampler:
    """The windows of a grid over one image, for loops written by hand.

    TorchIO's ``GridSampler`` under the same name: it pads the image (when it is smaller
    than the patch, or by ``overlap // 2`` on each side with ``pad_borders``), and yields
    patches with their locations. Locations are window starts ``(x, y, z)`` in the
    coordinates of the *padded* image (TorchIO also stores the ends; ``GridAggregator``
    accepts either form). Pass the sampler to ``GridAggregator``.

    Args:
        image: the ``Image`` to cut.
        patch_size: window size, an integer or 3 integers.
        overlap: voxels shared by neighbouring windows, ``0 <= overlap < patch_size``.
        padding_mode: ``"constant"``, ``"edge"`` or ``"reflect"``.
        padding_value: value of constant padding.
        pad_borders: pad ``overlap // 2`` voxels on each side (see
            ``sliding_window_inference``).
        downsampling: integer (or 3) factor by which the model's outputs are smaller than
            its inputs; the padded shape, patch size and overlap must be multiples of it.

    Examples:
        >>> import numpy as np, jmed
        >>> image = jmed.ScalarImage(np.ones((6, 5, 7), np.float32))
        >>> sampler = GridSampler(image, 4, overlap=2)
        >>> aggregator = GridAggregator(sampler, mode="average")
        >>> for patches, locations in sampler.batches(4):
        ...     aggregator.add_batch(patches * 3, locations)
        >>> float(aggregator.get_output().data.mean())
        3.0
    """

    def __init__(
        self,
        image: Image,
        patch_size: Any,
        overlap: Any = 0,
        *,
        padding_mode: str = "constant",
        padding_value: float = 0.0,
        pad_borders: bool = False,
        downsampling: Any = 1,
    ):
        self.image = _as_image(image)
        self.patch_size, self.overlap = _parse_grid(patch_size, overlap)
        self.padding_mode = check_choice(padding_mode, "padding_mode", PADDING_MODES)
        self.factor = int_triple(downsampling, "downsampling", minimum=1)
        for name, values in (("patch_size", self.patch_size), ("overlap", self.overlap)):
            if any(v % f for v, f in zip(values, self.factor)):
                raise ValueError(f"{name} {values} must be divisible by downsampling {self.factor}")
        self.padding = _padding(
            self.image.spatial_shape, self.patch_size, self.overlap, self.factor, pad_borders
        )
        self.padded = _pad(jnp.asarray(self.image.data), self.padding, self.padding_mode, padding_value)
        shape = tuple(self.padded.shape[:3])
        self.locations = _locations(
            _window_starts(shape, self.patch_size, self.overlap, self.factor), self.factor
        )

    def __len__(self) -> int:
        return len(self.locations)

    def __getitem__(self, index: int) -> jax.Array:
        """Patch ``index``, ``(px, py, pz, c)``."""
        return _gather(self.padded, jnp.asarray(self.locations[index : index + 1]), self.patch_size)[0]

    def batches(
        self, batch_size: int, *, drop_remainder: bool = False, progress: bool = False
    ) -> Iterator[tuple[jax.Array, np.ndarray]]:
        """Yield ``(patches (b, px, py, pz, c), locations (b, 3))``; the last batch may be smaller.

        Args:
            batch_size: windows per batch.
            drop_remainder: skip a last, smaller batch.
            progress: show a progress bar of the windows on stderr.
        """
        batch_size = _check_batch_size(batch_size)
        gather = _gather_program(self.patch_size)
        total = len(self) - len(self) % batch_size if drop_remainder else len(self)
        with progress_bar(progress, total=total, desc="grid windows", unit="window") as bar:
            for begin in range(0, total, batch_size):
                locations = self.locations[begin : begin + batch_size]
                yield gather(self.padded, jnp.asarray(locations, jnp.int32)), locations
                bar.update(len(locations))


class GridAggregator:
    """Accumulate predictions of a ``GridSampler``'s windows into one volume.

    TorchIO's ``GridAggregator`` under the same name (``add_batch(outputs, locations)``,
    ``get_output()``), with the kernels of ``sliding_window_inference``: weights are
    normalised in advance, so windows can be added in any order and the accumulator holds
    the output (the partial output until every window has been added).

    Args:
        sampler: the ``GridSampler`` whose windows are predicted.
        mode: ``"crop"``, ``"average"``, ``"hann"`` or ``"gaussian"``.
        accumulation_dtype: floating dtype of the accumulator.
        argmax: return the argmax over channels as a label map (with ``mode="crop"`` only
            labels are accumulated).
    """

    def __init__(
        self,
        sampler: GridSampler,
        *,
        mode: str = "hann",
        accumulation_dtype: Any = jnp.float32,
        argmax: bool = False,
    ):
        if not isinstance(sampler, GridSampler):
            raise TypeError(f"sampler must be a GridSampler, got {type(sampler).__name__}")
        self.sampler = sampler
        self.mode = check_choice(mode, "mode", MODES)
        self.accumulation_dtype = _check_dtype(accumulation_dtype)
        self.argmax = bool(argmax)
        self.plan = _make_plan(
            tuple(sampler.padded.shape[:3]), sampler.patch_size, sampler.overlap, sampler.factor, self.mode
        )
        self._accumulator = None
        self._channels = None

    def add_batch(self, outputs: ArrayLike, locations: ArrayLike) -> None:
        """Add predicted windows.

        Args:
            outputs: ``(b, px // f, py // f, pz // f, c_out)`` predictions.
            locations: ``(b, 3)`` window starts from the sampler (or ``(b, 6)`` starts and
                ends, TorchIO's layout).
        """
        outputs = jnp.asarray(outputs)
        locations = np.asarray(locations)
        if locations.ndim != 2 or locations.shape[1] not in (3, 6) or len(locations) != outputs.shape[0]:
            raise ValueError(
                f"locations must have shape (batch, 3) or (batch, 6) with batch {outputs.shape[0]}, "
                f"got {locations.shape}"
            )
        factor, channels = _check_output(
            outputs.shape, outputs.shape[0], self.sampler.patch_size, self._channels
        )
        if factor != self.sampler.factor:
            raise ValueError(
                f"outputs have spatial shape {outputs.shape[1:4]}, expected "
                f"{self.plan.out_patch} (patch_size {self.sampler.patch_size} / downsampling {self.sampler.factor})"
            )
        starts = locations[:, :3].astype(np.int64)
        for axis in range(3):
            allowed = self.plan.positions[axis] * self.sampler.factor[axis]
            if not np.isin(starts[:, axis], allowed).all():
                raise ValueError(
                    f"locations must be window starts of the sampler's grid; along axis {axis} "
                    f"got {sorted(set(starts[:, axis].tolist()))}, allowed {allowed.tolist()}"
                )
        label_only = self.argmax and self.mode == "crop"
        if self._accumulator is None:
            self._channels = channels
            spec = _output_spec(
                plan=self.plan,
                channels=channels,
                dtype=self.accumulation_dtype,
                crop=_crop(self.sampler.padding, self.sampler.factor, self.sampler.image.spatial_shape),
                argmax=self.argmax,
                affine=_output_affine(self.sampler.image.affine, self.sampler.factor),
                label_only=label_only,
            )
            self._accumulator = DeviceAccumulator(spec)
        valid = np.ones(len(starts), np.float32)
        self._accumulator._add_predictions(
            self.plan, outputs, jnp.asarray(starts, jnp.int32), valid, label_only
        )

    def get_output(self) -> Image:
        """The aggregated ``Image`` (padding cropped, the sampler image's affine)."""
        if self._accumulator is None:
            raise ValueError("no batch has been added; call add_batch first")
        return self._accumulator.finalize()


@functools.lru_cache(maxsize=32)
def _gather_program(patch: tuple[int, int, int]):
    """The jitted window cut for ``patch``, shared by every ``batches`` call."""
    return jax.jit(functools.partial(_gather, patch=patch))
