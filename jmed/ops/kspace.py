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
    "attenuate_planes",
    "frequencies",
    "irfft3",
    "peak_magnitude",
    "rfft3",
    "splice_lines",
]

_SPATIAL = (0, 1, 2)
_LOOP_SPIKES = 16  # up to this many spikes one fused elementwise pass beats a matrix product


def frequencies(n: int) -> np.ndarray:
    """Signed integer frequencies of an axis of length ``n`` in FFT order."""
    return np.rint(np.fft.fftfreq(n) * n).astype(np.int32)


def rfft3(data: ArrayLike) -> jax.Array:
    """Half spectrum over the spatial axes of a real ``(x, y, z, c)`` volume."""
    return jnp.fft.rfftn(jnp.asarray(data), axes=_SPATIAL)


def irfft3(spectrum: ArrayLike, spatial_shape: tuple[int, int, int]) -> jax.Array:
    """Inverse of ``rfft3`` (``spatial_shape`` is needed to know the length of ``z``)."""
    return jnp.fft.irfftn(jnp.asarray(spectrum), s=tuple(spatial_shape), axes=_SPATIAL)


def peak_magnitude(data: ArrayLike) -> jax.Array:
    """``max |fftn(data)|`` over the spatial frequencies and channels of ``(x, y, z, c)``.

    For a non-negative volume the peak is the zero frequency, ``|X[f]| <= sum |x| = X[0]``
    (triangle inequality), so it is the largest channel sum and no FFT runs; otherwise a
    real 3D FFT gives it. (Under ``vmap`` both branches run.)
    """
    data = jnp.asarray(data)
    return jax.lax.cond(
        jnp.min(data) >= 0,
        lambda x: jnp.max(jnp.sum(x, axis=_SPATIAL)).astype(jnp.float32),
        lambda x: jnp.max(jnp.abs(rfft3(x))).astype(jnp.float32),
        data,
    )


def add_spikes(data: ArrayLike, freqs: ArrayLike, amplitudes: ArrayLike) -> jax.Array:
    """Real part of the image whose spectrum gains ``amplitudes[s]`` at ``freqs[s]``.

    Equivalent to ``real(ifftn(fftn(data) + spikes))`` with a spike of (real or complex)
    amplitude ``a`` at integer frequency ``f`` per row, computed in image space without
    transforming the volume: ``data + Re(a * exp(2 pi i f . v / N)) / prod(N)`` summed
    over spikes (voxel ``v``), in one pass over the volume (the per-axis phase tables
    come from 1D inverse FFTs of one-hot rows). In the spectrum of the result each spike
    appears as ``a / 2`` at ``f`` and ``conj(a) / 2`` at ``-f`` (the Hermitian pair that
    keeps the image real; both at the same place when ``f == -f``).

    Args:
        data: ``(x, y, z, c)`` real volume.
        freqs: ``(S, 3)`` integer frequencies (any integers; taken modulo the shape).
        amplitudes: ``(S,)`` amplitudes in unnormalised-FFT units (0 disables a spike).
    """
    data = jnp.asarray(data)
    freqs = jnp.asarray(freqs, jnp.int32)
    amplitudes = jnp.asarray(amplitudes).astype(jnp.complex64)
    shape = data.shape[:3]
    cos, sin = [], []
    for axis, n in enumerate(shape):
        # exp(2 pi i f v / n) for v = 0 .. n - 1 is n times the inverse FFT of a one-hot row.
        # Computed so, the table is built once: XLA does not fuse FFTs into their users,
        # while sines and cosines would be fused into the pass below and recomputed for
        # every voxel.
        onehot = jnp.arange(n) == jnp.mod(freqs[:, axis : axis + 1], n)
        table = jnp.fft.ifft(onehot.astype(jnp.complex64), axis=-1) * n
        cos.append(jnp.real(table))
        sin.append(jnp.imag(table))
    # Re(a fx fy fz) = Re(p) Re(fz) - Im(p) Im(fz) with p = a fx fy a small (S, x, y) plane,
    # in real arithmetic; the volume is touched by one fused elementwise pass
    a_re = jnp.real(amplitudes)[:, None] / float(np.prod(shape))
    a_im = jnp.imag(amplitudes)[:, None] / float(np.prod(shape))
    ax_re = a_re * cos[0] - a_im * sin[0]  # (S, x)
    ax_im = a_re * sin[0] + a_im * cos[0]
    real = ax_re[:, :, None] * cos[1][:, None, :] - ax_im[:, :, None] * sin[1][:, None, :]  # (S, x, y)
    imag = ax_re[:, :, None] * sin[1][:, None, :] + ax_im[:, :, None] * cos[1][:, None, :]
    if freqs.shape[0] <= _LOOP_SPIKES:
        wave = jnp.zeros(shape, jnp.float32)
        for s in range(freqs.shape[0]):
            wave = wave + real[s][:, :, None] * cos[2][s] - imag[s][:, :, None] * sin[2][s]
    else:  # many spikes: a matrix product over the 2 S terms
        wave = jnp.einsum(
            "sxy,sz->xyz",
            jnp.concatenate([real, -imag]),
            jnp.concatenate([cos[2], sin[2]]),
            precision=jax.lax.Precision.HIGHEST,
        )
    return data + wave.astype(data.dtype)[..., None]


def _lines_last(data: jax.Array, axis: int) -> tuple[jax.Array, tuple[int, ...]]:
    """``(x, y, z, c)`` -> ``(c, a, b, n)`` with spatial ``axis`` last (a free reshape when
    ``c == 1`` and ``axis == 2``: XLA's FFTs act on the trailing axis) and the inverse
    permutation."""
    perm = (3, *(a for a in _SPATIAL if a != axis), axis)
    return jnp.transpose(data, perm), tuple(int(i) for i in np.argsort(perm))


def attenuate_planes(data: ArrayLike, freqs: ArrayLike, weights: ArrayLike, axis: int) -> jax.Array:
    """``real(ifftn(fftn(data) * factor))`` where ``factor`` is ``1 - weights[k]`` on the
    k-space planes with frequency ``freqs[k]`` or ``-freqs[k]`` along ``axis`` and 1
    elsewhere.

    Scaling planes of constant frequency along one axis commutes with the Fourier
    transform along the other two, and few planes change, so this is computed without
    FFTs: for each listed frequency ``f`` the projection of every line along ``axis`` on
    ``cos(2 pi f v / n)`` and ``sin(2 pi f v / n)`` (two matrix products with a
    ``(n, 2 K)`` basis), i.e. ``data - sum_k w_k / n * sum_{+-f_k} X[f] e^{2 pi i f v / n}``.
    The cost is ``O(K n)`` per line whatever ``n`` (FFTs of prime lengths, such as the
    197 and 233 voxels of MNI152, are slow).

    Args:
        data: ``(x, y, z, c)`` real volume.
        freqs: ``(K,)`` integer frequencies; ``f`` and ``-f`` denote the same pair of
            planes (a pair listed twice gets the sum of its weights).
        weights: ``(K,)`` real attenuations (0 leaves the planes unchanged, 1 removes them,
            negative values amplify them).
        axis: spatial axis (0, 1 or 2).
    """
    data = jnp.asarray(data)
    if data.ndim != 4:
        raise ValueError(f"data must be (x, y, z, c), got shape {data.shape}")
    if isinstance(axis, bool) or axis not in _SPATIAL:
        raise ValueError(f"axis must be 0, 1 or 2 (a spatial axis), got {axis!r}")
    if jnp.shape(freqs) != jnp.shape(weights) or len(jnp.shape(freqs)) != 1:
        raise ValueError(
            f"freqs and weights must be 1D of the same length, got shapes {jnp.shape(freqs)} and "
            f"{jnp.shape(weights)}"
        )
    n = data.shape[axis]
    dtype = data.dtype if jnp.issubdtype(data.dtype, jnp.floating) else jnp.float32
    freqs = jnp.mod(jnp.asarray(freqs, jnp.int32), n)
    v = jnp.arange(n, dtype=jnp.int32)
    # exact integer phase modulo n keeps float32 accuracy for any frequency
    angle = (2 * np.pi / n) * jnp.mod(v[:, None] * freqs[None, :], n).astype(jnp.float32)
    basis = jnp.concatenate([jnp.cos(angle), jnp.sin(angle)], axis=1).astype(dtype)  # (n, 2K)
    # a plane pair (f, -f) counts twice, a self-paired plane (f == -f mod n) once
    scale = jnp.where(jnp.mod(2 * freqs, n) == 0, 1.0, 2.0) / n
    scale = jnp.tile(jnp.asarray(weights, jnp.float32) * scale, 2).astype(dtype)
    x = data[..., 0] if data.shape[3] == 1 else data  # a trailing unit axis slows the products
    letters = "xyzc"[: x.ndim]
    lines = letters[axis]
    coeffs_spec = letters.replace(lines, "k")
    # full float32 products whatever the default of the platform the program runs on
    # (bfloat16 passes on TPUs, TF32 on GPUs would lose the 1e-5 accuracy)
    precision = jax.lax.Precision.HIGHEST
    coeffs = jnp.einsum(f"{letters},{lines}k->{coeffs_spec}", x, basis, precision=precision) * scale.reshape(
        [-1 if a == axis else 1 for a in range(x.ndim)]
    )
    out = x.astype(dtype) - jnp.einsum(
        f"{coeffs_spec},{lines}k->{letters}", coeffs, basis, precision=precision
    )
    return out[..., None] if data.shape[3] == 1 else out


def splice_lines(volumes, source: ArrayLike, axis: int) -> jax.Array:
    """Complex image whose k-space takes each line along ``axis`` from one of ``volumes``.

    ``volumes`` is a ``(T, x, y, z, c)`` real array or a sequence of ``T`` real
    ``(x, y, z, c)`` arrays; ``source`` ``(n,)`` gives, for each frequency along ``axis``
    in FFT order, the index of the volume whose k-space supplies every sample with that
    frequency. The result equals ``ifftn(sum_t M_t * fftn(v_t))`` (``M_t`` the planes
    taken from volume ``t``).

    How it is computed: splicing whole planes of constant frequency along ``axis``
    commutes with the Fourier transform along the other two axes, so only 1D transforms
    along ``axis`` are needed. The volumes are real, so their half spectra ``R_t`` (real
    FFTs) hold everything: the spliced spectrum ``C`` has ``C[g] = R_{s(g)}[g]`` and
    ``conj(C[-g]) = R_{s(-g)}[g]``. Its Hermitian part ``(C[g] + conj(C[-g])) / 2`` is
    the half spectrum of the real part of the result, and ``-i`` times its
    anti-Hermitian part ``(C[g] - conj(C[-g])) / 2`` that of the imaginary part: two
    inverse real FFTs, no complex volume transform. Only the ``T - 1`` differences
    ``v_t - v_0`` are transformed (``C = F(v_0) + sum_t M_t F(v_t - v_0)``), and ``v_0``
    is added back in image space.
    """
    if isinstance(volumes, (list, tuple)):
        volumes = [jnp.asarray(v) for v in volumes]
    else:
        volumes = list(jnp.asarray(volumes))
    dtype = jnp.result_type(*volumes)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"volumes must be real floating point, got {dtype}")
    n = volumes[0].shape[axis]
    base, inverse = _lines_last(volumes[0].astype(dtype), axis)
    # only the differences to volume 0 are transformed: C = F(v_0) + sum_t M_t F(v_t - v_0)
    spectra = [jnp.fft.rfft(_lines_last(v.astype(dtype), axis)[0] - base, axis=-1) for v in volumes[1:]]
    source = jnp.asarray(source, jnp.int32)
    half = n // 2 + 1
    ahead = source[:half]  # s(g) for g = 0 .. n // 2
    behind = source[(-np.arange(half)) % n]  # s(-g)
    if not spectra:
        return jax.lax.complex(volumes[0].astype(dtype), jnp.zeros_like(volumes[0], dtype))
    a = b = jnp.zeros_like(spectra[0])
    for t, spectrum in enumerate(spectra, start=1):
        a = jnp.where(ahead == t, spectrum, a)
        b = jnp.where(behind == t, spectrum, b)
    real = base + jnp.fft.irfft((a + b) * 0.5, n=n, axis=-1)
    imag = jnp.fft.irfft((a - b) * (-0.5j), n=n, axis=-1)
    return jnp.transpose(jax.lax.complex(real, imag), inverse)
