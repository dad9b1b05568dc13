"""Patch-based (sliding-window) inference: grid sampling and aggregation.

A volume too large for the model is cut into a static grid of overlapping windows
(``patch_size``, ``overlap``), the windows are predicted in batches of static size, each
prediction is weighted, and the weighted predictions are added into one output volume.
The model's prediction of one batch of windows is its own jitted program, compiled once
per window-batch shape and shared by all volume shapes; cutting the windows, weighting
and adding them are small programs compiled per volume shape (the last batch is filled
with dummy windows of weight zero). Under the caller's ``jax.jit`` the whole loop
(gather -> predict -> weight -> scatter-add) is traced into one program instead, a
``lax.scan`` over batches. Given a ``jax.sharding.Mesh``, the batches are split over the
devices of the chosen mesh axes with ``jax.shard_map``; every device accumulates the
windows it predicted into its own copy of the output and the copies are summed with
``psum``.

The package is split by concern: ``plan`` (the static grid: padding, window starts
shared with ``jmed.sampling.grid_locations``, normalised weights), ``accumulators``
(where weighted windows are added up: ``DeviceAccumulator``, ``HostAccumulator`` or any
``Accumulator``, built from an ``OutputSpec``), ``on_disk`` (``ChunkedAccumulator``, into a
NIfTI-Zarr store), ``model`` (how ``predict`` is compiled
once and shared), ``sliding_window`` (the driver) and ``grid`` (TorchIO's
``GridSampler``/``GridAggregator`` pair).

Array contract: image data are ``(x, y, z, c)`` (channels last); ``predict`` maps a batch
``(b, px, py, pz, c_in)`` to ``(b, px // f, py // f, pz // f, c_out)`` where the
downsampling factor ``f`` (per axis, >= 1, inferred from the output shape) divides the
patch size and the overlap. Outputs are not clipped.

Weighting modes (``mode``):

- ``"crop"``: every output voxel is taken from exactly one window, the one whose centre
  region contains it (half the overlap is cropped from each inner side of a window; windows
  at the border of the volume keep their outer side). Where the last window along an axis
  overlaps its neighbour by more than ``overlap`` (volume size not a multiple of the
  stride), the boundary is the middle of the actual overlap.
- ``"average"``: uniform weights; overlapping predictions are averaged.
- ``"hann"``: separable window ``w(i) = sin^2(pi (i + 1/2) / p)`` per axis, i.e. the Hann
  window sampled at voxel centres. Unlike the textbook Hann window it is never zero (its
  smallest value is ``sin^2(pi / (2 p))``, 2.7e-4 for ``p = 96``), so voxels covered by a
  single window edge (volume borders) keep that window's prediction and the identity
  model returns its input everywhere. No floor is needed.
- ``"gaussian"``: separable Gaussian, ``sigma = 0.125 * p`` per axis (as MONAI), centred on
  the window centre ``(p - 1) / 2`` (symmetric for even ``p`` too). Strictly positive.

Normalisation is done before accumulation: the weights and the grid are separable, so the
sum of weights over all windows is an outer product of three 1D profiles, known from the
static grid. Each window is multiplied by ``w / sum(w)`` and the accumulator holds the
final output directly: there is no separate weight volume (half the memory of
accumulate-then-divide), no final division, and a float16/bfloat16 accumulator cannot
underflow to 0/0 at volume corners.
"""

from jmed.inference.accumulators import Accumulator, DeviceAccumulator, HostAccumulator, OutputSpec
from jmed.inference.grid import GridAggregator, GridSampler
from jmed.inference.on_disk import ChunkedAccumulator
from jmed.inference.plan import MODES, PADDING_MODES
from jmed.inference.sliding_window import sliding_window_inference
from jmed.sampling import grid_locations as grid_locations  # the rule every grid follows

__all__ = [
    "ChunkedAccumulator",
    "MODES",
    "PADDING_MODES",
    "Accumulator",
    "DeviceAccumulator",
    "GridAggregator",
    "GridSampler",
    "HostAccumulator",
    "OutputSpec",
    "sliding_window_inference",
]
