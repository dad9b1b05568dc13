"""k-space helpers for channels-last volumes ``(x, y, z, c)``.

Conventions: k-space is the unnormalised discrete Fourier transform over the three
spatial axes (``jnp.fft`` / ``numpy.fft`` sign and scaling: forward unscaled, inverse
divided by the voxel count), in FFT order (frequency 0 first) unless stated. Integer
frequencies along an axis of length ``n`` are ``fftfreq(n) * n``: ``0, 1, ..., -1``.
Real FFTs (``rfftn``) are used wherever the result is real-valued: a half spectrum with
``z // 2 + 1`` planes along the last spatial axis.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

__all__ = [
    "add_spikes",
    "frequencies",
    "irfft3",
    "rfft3",
    "splice_lines",
]

_SPATIAL = (0, 1, 2)


def frequencies(n: int) -> np.ndarray:
    """Signed integer frequencies of an axis of length ``n`` in FFT order."""
    return np.rint(np.fft.fftfreq(n) * n).astype(np.int32)


def rfft3(data: ArrayLike) -> jax.Array:
    """Half spectrum over the spatial axes of a real ``(x, y, z, c)`` volume."""
    return jnp.fft.rfftn(jnp.asarray(data), axes=_SPATIAL)


def irfft3(spectrum: ArrayLike, spatial_shape: tuple[int, int, int]) -> jax.Array:
    """Inverse of ``rfft3`` (``spatial_shape`` is needed to know the length of ``z``)."""
    return jnp.fft.irfftn(jnp.asarray(spectrum), s=tuple(spatial_shape), axes=_SPATIAL)


def add_spikes(data: ArrayLike, freqs: ArrayLike, amplitudes: ArrayLike) -> jax.Array:
    """Real part of the image whose spectrum gains ``amplitudes[s]`` at ``freqs[s]``.

    Equivalent to ``real(ifftn(fftn(data) + spikes))`` with a spike of (real or complex)
    amplitude ``a`` at integer frequency ``f`` per row, computed in image space without
    FFTs: ``data + Re(a * exp(2 pi i f . v / N)) / prod(N)`` summed over spikes (voxel
    ``v``). In the spectrum of the result each spike appears as ``a / 2`` at ``f`` and
    ``conj(a) / 2`` at ``-f`` (the Hermitian pair that keeps the image real; both at the
    same place when ``f == -f``).

    Args:
        data: ``(x, y, z, c)`` real volume.
        freqs: ``(S, 3)`` integer frequencies (any integers; taken modulo the shape).
        amplitudes: ``(S,)`` amplitudes in unnormalised-FFT units (0 disables a spike).
    """
    data = jnp.asarray(data)
    freqs = jnp.asarray(freqs, jnp.int32)
    amplitudes = jnp.asarray(amplitudes).astype(jnp.complex64)
    shape = data.shape[:3]
    factors = []
    for axis, n in enumerate(shape):
        v = jnp.arange(n, dtype=jnp.int32)
        # exact integer phase modulo n keeps float32 accuracy for any frequency
        turns = jnp.mod(freqs[:, axis : axis + 1] * v[None, :], n).astype(jnp.float32) / n
        factors.append(jnp.exp(2j * jnp.pi * turns.astype(jnp.complex64)))
    wave = jnp.einsum("s,sx,sy,sz->xyz", amplitudes, *factors)
    return data + (jnp.real(wave) / float(np.prod(shape))).astype(data.dtype)[..., None]


def splice_lines(volumes: ArrayLike, source: ArrayLike, axis: int) -> jax.Array:
    """Complex image whose k-space takes each line along ``axis`` from one of ``volumes``.

    ``volumes`` is ``(T, x, y, z, c)``; ``source`` ``(n,)`` gives, for each frequency
    along ``axis`` in FFT order, the index of the volume whose k-space supplies every
    sample with that frequency. The other two axes are not transformed: splicing whole
    planes of constant frequency along ``axis`` commutes with the Fourier transform along
    them, so ``ifftn(sum_t M_t * fftn(v_t)) == ifft(sum_t M_t * fft(v_t, axis), axis)``.
    """
    volumes = jnp.asarray(volumes)
    spectra = jnp.fft.fft(volumes, axis=axis + 1)
    n = volumes.shape[axis + 1]
    onehot = (jnp.asarray(source)[None, :] == jnp.arange(volumes.shape[0])[:, None]).astype(
        spectra.real.dtype
    )
    shape = [volumes.shape[0]] + [1] * 4
    shape[axis + 1] = n
    combined = jnp.sum(spectra * onehot.reshape(shape), axis=0)
    return jnp.fft.ifft(combined, axis=axis)
