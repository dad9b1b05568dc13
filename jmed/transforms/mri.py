"""MRI k-space artifacts: motion, ghosting and spikes.

The transforms keep the shape, are jittable and vmappable with per-sample parameters and
act on intensity images only. k-space conventions are those of ``jmed.ops.kspace``
(unnormalised FFT over the three spatial axes, integer frequencies ``fftfreq(n) * n``).
Ghosting and spikes keep images real (their k-space changes are Hermitian-symmetric),
so they use real FFTs or none at all; motion returns the magnitude of a complex image.
Changes that only involve one axis (motion's line splicing, ghosting's comb) are computed
along that axis only.
Outputs are floating point and not clipped.

None of these transforms is padding-aware (``Image.extent``, see ``jmed.buckets``): a
Fourier transform over a volume padded to a bucket shape covers a larger field of view,
which is physically another acquisition, and restricting it to the valid region would
need a transform of a run-time size. On a padded volume they ignore the extent and act on
the padded volume as an ordinary image (whose padding holds the background, as
``jmed.buckets.pad_subject`` fills it): the result equals that of the same transform on
the padded volume without an extent.

Examples:
    >>> import jax, numpy as np, jmed
    >>> image = jmed.ScalarImage(np.random.default_rng(0).random((16, 16, 12), np.float32))
    >>> moved = jmed.transforms.RandomMotion(num_transforms=2)(jax.random.key(0), image)
    >>> ghosts = jmed.transforms.RandomGhosting(intensity=0.0)(jax.random.key(0), image)
    >>> bool(np.allclose(ghosts.data, image.data, atol=1e-5))
    True
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from jmed import affine as affine_lib
from jmed.image import Image, Subject
from jmed.ops import kspace
from jmed.ops.interpolation import resample
from jmed.transforms import params as _params
from jmed.transforms.base import IntensityTransform, Params, PRNGKey, RandomTransform, _choose
from jmed.transforms.params import AxesLike, CountRangeLike, ImageNames, PerAxisRangeLike, RangeLike
from jmed.transforms.spatial import _mm, _rotation

__all__ = ["RandomGhosting", "RandomMotion", "RandomSpike"]


# -- motion ------------------------------------------------------------------------------
def rigid_voxel_matrix(
    affine: ArrayLike, spatial_shape: Sequence[int], degrees: ArrayLike, translation: ArrayLike
) -> jax.Array:
    """Output-voxel -> input-voxel 4x4 matrix of a rigid motion in world space.

    The world map is ``p -> R (p - c) + c + t`` with ``R`` from ``degrees`` (about the
    world axes), ``t`` = ``translation`` in mm and ``c`` the world position of the volume
    centre.
    """
    affine = jnp.asarray(affine, jnp.float32)
    centre = _mm(affine, jnp.append(jnp.asarray((np.array(spatial_shape) - 1) / 2.0, jnp.float32), 1.0))
    rot = _rotation(degrees, "zyx")
    world = jnp.eye(4, dtype=jnp.float32)
    world = world.at[:3, :3].set(rot)
    world = world.at[:3, 3].set(centre[:3] - _mm(rot, centre[:3]) + translation)
    return _mm(_mm(affine_lib.invert(affine), world), affine)


class RandomMotion(IntensityTransform, RandomTransform):
    """Simulate rigid head motion during a (3D, Cartesian) acquisition.

    The image is resampled under ``num_transforms`` random rigid motions; k-space is then
    filled line by line along the phase-encoding axis, each segment of lines from the
    image in the pose the head had while those lines were acquired, and the output is
    the magnitude of the inverse Fourier transform.

    Phase-encoding convention: ``phase_encoding_axis`` (default 2, the last spatial
    axis) is acquired in linear order from the most negative to the most positive
    frequency; the readout and the other encoding direction are instantaneous. The
    ``num_transforms`` sorted times ``t_i ~ U(0, 1)`` split the ``n`` lines at positions
    ``floor(t_i * n)`` into ``num_transforms + 1`` segments. The segment that contains
    frequency 0 keeps the original pose (so the output stays aligned with the input);
    the other segments take the sampled motions in order. Hence every k-space plane of
    constant phase-encoding frequency equals, to rounding, the same plane of one moved
    copy of the image, and nothing else changes: along the readout and the other axis
    no mixing happens beyond what the motion itself does.

    Cost: one trilinear resampling per motion, then real 1D FFTs along the
    phase-encoding axis only (see ``jmed.ops.kspace.splice_lines``).

    Args:
        degrees: rotation range in degrees per world axis: ``d`` -> ``U(-d, d)``,
            ``(a, b)`` -> ``U(a, b)``, or 3 / 6 values per axis.
        translation: translation range in mm, as ``degrees``.
        num_transforms: number of motions (>= 1).
        phase_encoding_axis: data axis along which k-space lines are acquired in time.
        magnitude: return ``|image|`` (physical magnitude images; a non-negative input
            is unchanged without motion). ``False`` returns the real part instead, which
            keeps negative intensities (e.g. after z-normalisation).
        pad_mode: how motion brings in voxels from outside: ``"edge"`` or ``"constant"`` 0.

    Params: ``{"degrees": (N, 3), "translation": (N, 3), "times": (N,)}``.

    Not padding-aware: on a padded volume the motions turn about the centre of the padded
    grid, bring in the padding, and the k-space lines are those of the padded field of
    view along the phase-encoding axis (as for an ordinary image of the bucket shape).

    References:
        Shaw et al., "MRI k-space motion artefact augmentation: model robustness and task-
        specific uncertainty", MIDL 2019.
    """

    sample_reads_subject = False

    def __init__(
        self,
        degrees: PerAxisRangeLike = 10.0,
        translation: PerAxisRangeLike = 10.0,
        num_transforms: int = 2,
        *,
        phase_encoding_axis: int = 2,
        magnitude: bool = True,
        pad_mode: str = "edge",
        include: ImageNames = None,
        exclude: ImageNames = None,
    ):
        super().__init__(include=include, exclude=exclude)
        self.degrees = _params.parse_range_per_axis(degrees, "degrees")
        self.translation = _params.parse_range_per_axis(translation, "translation")
        self.num_transforms = _params.as_positive_int(num_transforms, "num_transforms")
        if isinstance(phase_encoding_axis, bool) or not isinstance(phase_encoding_axis, numbers.Integral):
            raise ValueError(f"phase_encoding_axis must be one int in [0, 2], got {phase_encoding_axis!r}")
        self.phase_encoding_axis = _params.as_axes(phase_encoding_axis, "phase_encoding_axis")[0]
        _params.check_choice(pad_mode, "pad_mode", ("edge", "constant"))
        self.magnitude = bool(magnitude)
        self.pad_mode = pad_mode

    def sample(self, key: PRNGKey | None, subject: Subject) -> Params:
        n = self.num_transforms
        k_deg, k_tr, k_time = jax.random.split(key, 3)
        return {
            "degrees": _params.uniform(k_deg, self.degrees[:, 0], self.degrees[:, 1], (n, 3)),
            "translation": _params.uniform(k_tr, self.translation[:, 0], self.translation[:, 1], (n, 3)),
            "times": jnp.sort(jax.random.uniform(k_time, (n,))),
        }

    def line_sources(self, times: jax.Array, n: int) -> jax.Array:
        """For each phase-encoding frequency (FFT order), which volume supplies it:
        0 = the original pose, ``1 + i`` = motion ``i``."""
        position = jnp.arange(n)  # acquisition order: frequency position - n // 2
        boundaries = jnp.floor(times * n).astype(jnp.int32)
        segment = jnp.sum(position[:, None] >= boundaries[None, :], axis=1)
        centre = segment[n // 2]
        source = jnp.where(segment == centre, 0, 1 + jnp.where(segment < centre, segment, segment - 1))
        return jnp.fft.ifftshift(source)  # acquisition order -> FFT order

    def apply_image(self, image: Image, params: Params) -> Image:
        x = _params.as_floating(image.data)
        shape = image.spatial_shape
        moved = [
            resample(x, rigid_voxel_matrix(image.affine, shape, d, t), shape, order=1, pad_mode=self.pad_mode)
            for d, t in zip(params["degrees"], params["translation"])
        ]
        volumes = [x] + [m.astype(x.dtype) for m in moved]
        source = self.line_sources(params["times"], shape[self.phase_encoding_axis])
        spliced = kspace.splice_lines(volumes, source, self.phase_encoding_axis)
        out = jnp.abs(spliced) if self.magnitude else jnp.real(spliced)
        return image.replace(data=out.astype(x.dtype))


# -- ghosting ----------------------------------------------------------------------------
class RandomGhosting(IntensityTransform, RandomTransform):
    """Ghosting along one axis: every ``n``-th k-space plane is attenuated.

    The planes with integer frequency ``f`` along the chosen axis such that
    ``f mod n == 0`` are multiplied by ``1 - s``, except those restored around the
    centre. Attenuating a comb of period ``n`` in k-space subtracts ``s`` times the mean
    of ``n`` copies of the image shifted by multiples of ``N / n`` voxels: ``n`` ghosts at
    spacing ``N / n``. The comb is symmetric about frequency 0 (unlike TorchIO's, which
    starts at the edge of the shifted spectrum and keeps the real part), so the output
    is real. No FFT is needed: the attenuated planes (``~N / (2 n)`` pairs; room for
    ``N / 4`` is kept so that any count shares one program) are projected out of the
    lines along the axis with their cosines and sines
    (``jmed.ops.kspace.attenuate_planes``); for ``n == 1`` the complement, the restored
    planes, is used instead.

    Args:
        num_ghosts: ``n``: ``d`` -> integer ``U{0..d}``, ``(a, b)`` -> ``U{a..b}``;
            0 disables.
        axes: candidate axes; one is chosen uniformly.
        intensity: ``s``: ``d`` -> ``U(0, d)``, ``(a, b)`` -> ``U(a, b)``; 0 disables.
        restore: fraction of k-space around the centre left untouched along the axis
            (planes with ``|f| <= restore * N / 2``); None restores only ``f == 0``.

    Params: ``{"num_ghosts": int32, "axis": int32, "intensity": float}``.

    Not padding-aware: on a padded volume the comb is that of the padded axis length
    ``N``, so the ghosts lie ``N / n`` voxels apart and wrap around the padded field of view
    (as for an ordinary image of the bucket shape).
    """

    sample_reads_subject = False

    def __init__(
        self,
        num_ghosts: CountRangeLike = (4, 10),
        axes: AxesLike = (0, 1, 2),
        intensity: RangeLike = (0.5, 1.0),
        restore: float | None = None,
        *,
        include: ImageNames = None,
        exclude: ImageNames = None,
    ):
        super().__init__(include=include, exclude=exclude)
        self.num_ghosts = _params.parse_count_range(num_ghosts, "num_ghosts")
        self.axes = _params.as_axes(axes, "axes")
        if not self.axes:
            raise ValueError("axes must name at least one axis, got an empty sequence")
        self.intensity = _params.parse_nonnegative_range(intensity, "intensity")
        if restore is not None and (not _params.is_number(restore) or not 0 <= restore <= 1):
            raise ValueError(f"restore must be None or a number in [0, 1], got {restore!r}")
        self.restore = None if restore is None else float(restore)

    def sample(self, key: PRNGKey | None, subject: Subject) -> Params:
        k_n, k_axis, k_s = jax.random.split(key, 3)
        return {
            "num_ghosts": jax.random.randint(k_n, (), self.num_ghosts[0], self.num_ghosts[1] + 1, jnp.int32),
            "axis": _choose(
                jax.random.randint(k_axis, (), 0, len(self.axes)), np.asarray(self.axes, np.int32)
            ),
            "intensity": _params.uniform(k_s, *self.intensity),
        }

    def _attenuate(self, x, axis: int, params) -> jax.Array:
        """Attenuate the comb planes along one (static) axis."""
        n = x.shape[axis]
        limit = 0 if self.restore is None else int(np.floor(self.restore * n / 2))
        ghosts, intensity = params["num_ghosts"], params["intensity"]
        # n_g >= 2: at most (N // 2) // 2 comb planes 0 < f = n_g k <= N // 2 (the first list);
        # n_g == 1: every plane but the restored ones, i.e. (1 - s) x plus s times the
        # restored planes |f| <= limit (added back through negative weights, second list).
        # One call for both: no branch, so vmap computes nothing twice.
        comb = jnp.maximum(ghosts, 1) * jnp.arange(1, max((n // 2) // 2, 1) + 1, dtype=jnp.int32)
        active = (ghosts > 1) & (comb <= n // 2) & (comb > limit)
        every = ghosts == 1
        freqs = jnp.concatenate([comb, jnp.arange(limit + 1, dtype=jnp.int32)])
        weights = jnp.concatenate(
            [jnp.where(active, intensity, 0.0), jnp.full((limit + 1,), jnp.where(every, -intensity, 0.0))]
        )
        out = kspace.attenuate_planes(x, freqs, weights, axis)
        return out - jnp.where(every, intensity, 0.0).astype(out.dtype) * x

    def apply_image(self, image: Image, params: Params) -> Image:
        x = _params.as_floating(image.data)
        if len(self.axes) == 1:
            out = jnp.where(params["axis"] == self.axes[0], self._attenuate(x, self.axes[0], params), x)
            return image.replace(data=out.astype(x.dtype))
        branches = [lambda x, axis=axis: self._attenuate(x, axis, params) for axis in self.axes]
        branches.append(lambda x: x)  # an axis that is not a candidate: unchanged
        match = params["axis"] == jnp.asarray(self.axes, jnp.int32)
        index = jnp.where(jnp.any(match), jnp.argmax(match), len(self.axes))
        out = jax.lax.switch(index, branches, x)
        return image.replace(data=out.astype(x.dtype))


# -- spikes ------------------------------------------------------------------------------
class RandomSpike(IntensityTransform, RandomTransform):
    """Herringbone artifact: spikes in k-space.

    Each spike adds ``r * max|k-space|`` at a random frequency (positions uniform over
    k-space). As in TorchIO the output is the real part of the inverse transform, so in
    the spectrum of the result the spike shows as ``r * max / 2`` at ``f`` and at ``-f``.
    No FFT is needed to apply it (see ``jmed.ops.kspace.add_spikes``); the maximum is
    the sum of the image when it is non-negative, else the peak of one forward real FFT
    (``jmed.ops.kspace.peak_magnitude``).

    Args:
        num_spikes: ``d`` -> integer ``U{0..d}``, ``(a, b)`` -> ``U{a..b}``. The params
            always hold ``high`` spikes (static shapes) and mask the unused ones.
        intensity: ratio ``r``: ``d`` -> ``U(-d, d)``, ``(a, b)`` -> ``U(a, b)``.

    Params: ``{"positions": (high, 3) in [0, 1), "intensity": (high,), "active": (high,) bool}``;
    spike ``s`` sits at frequency ``floor(position * N) - N // 2`` per axis.

    Not padding-aware: on a padded volume ``N`` is the padded shape (the spike's stripes
    have the period of the padded field of view) and the peak magnitude includes the
    padding (as for an ordinary image of the bucket shape).
    """

    sample_reads_subject = False

    def __init__(
        self,
        num_spikes: CountRangeLike = 1,
        intensity: RangeLike = (1.0, 3.0),
        *,
        include: ImageNames = None,
        exclude: ImageNames = None,
    ):
        super().__init__(include=include, exclude=exclude)
        self.num_spikes = _params.parse_count_range(num_spikes, "num_spikes")
        self.intensity = _params.parse_range(intensity, "intensity")

    def sample(self, key: PRNGKey | None, subject: Subject) -> Params:
        high = self.num_spikes[1]
        k_n, k_pos, k_r = jax.random.split(key, 3)
        count = jax.random.randint(k_n, (), self.num_spikes[0], high + 1)
        return {
            "positions": jax.random.uniform(k_pos, (high, 3)),
            # one ratio per transform call as in TorchIO, repeated for static shapes
            "intensity": jnp.full((high,), _params.uniform(k_r, *self.intensity)),
            "active": jnp.arange(high) < count,
        }

    @staticmethod
    def spike_frequencies(positions, shape) -> jax.Array:
        n = jnp.asarray(shape, jnp.int32)
        return jnp.floor(positions * n).astype(jnp.int32) - n // 2

    def apply_image(self, image: Image, params: Params) -> Image:
        x = _params.as_floating(image.data)
        if params["positions"].shape[0] == 0:
            return image.replace(data=x)
        peak = kspace.peak_magnitude(x)
        amplitudes = jnp.where(params["active"], params["intensity"] * peak, 0.0)
        freqs = self.spike_frequencies(params["positions"], image.spatial_shape)
        return image.replace(data=kspace.add_spikes(x, freqs, amplitudes).astype(x.dtype))
