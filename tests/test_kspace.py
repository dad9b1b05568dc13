import jax
import numpy as np
import pytest

from jmed.ops import kspace


def _volume(shape=(6, 5, 7, 2), seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def test_frequencies_and_real_fft_roundtrip():
    np.testing.assert_array_equal(kspace.frequencies(5), [0, 1, 2, -2, -1])
    np.testing.assert_array_equal(kspace.frequencies(4), [0, 1, -2, -1])
    x = _volume()
    spec = kspace.rfft3(x)
    np.testing.assert_allclose(spec, np.fft.rfftn(x, axes=(0, 1, 2)), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(kspace.irfft3(spec, x.shape[:3]), x, atol=1e-5)


def test_add_spikes_equals_real_part_of_kspace_addition():
    x = _volume()
    freqs = np.array([[1, -2, 3], [0, 0, 0], [-3, 2, 7], [2, 1, 0]])  # 7 wraps to 0 on z=7
    amps = np.array([30.0, -4.0, 12.0, 0.0])
    spec = np.fft.fftn(x.astype(np.float64), axes=(0, 1, 2))
    for f, a in zip(freqs, amps):
        idx = tuple(int(v) % n for v, n in zip(f, x.shape[:3]))
        spec[idx] += a
    ref = np.real(np.fft.ifftn(spec, axes=(0, 1, 2)))
    out = jax.jit(kspace.add_spikes)(x, freqs, amps)
    np.testing.assert_allclose(out, ref, atol=1e-5)


def test_add_spikes_many_complex_spikes():
    # more spikes than the unrolled loop handles: the matrix-product path
    rng = np.random.default_rng(5)
    x = _volume()
    freqs = rng.integers(-9, 9, (20, 3))
    amps = rng.standard_normal(20) + 1j * rng.standard_normal(20)
    spec = np.fft.fftn(x.astype(np.float64), axes=(0, 1, 2))
    for f, a in zip(freqs, amps):
        spec[tuple(int(v) % n for v, n in zip(f, x.shape[:3]))] += 50 * a
    ref = np.real(np.fft.ifftn(spec, axes=(0, 1, 2)))
    out = jax.jit(kspace.add_spikes)(x, freqs, 50 * amps)
    np.testing.assert_allclose(out, ref, atol=1e-5)


@pytest.mark.parametrize(("channels", "as_list"), [(1, False), (2, True)])
def test_splice_lines_equals_full_3d_splice(channels, as_list):
    # each k-space line (along the axis) taken from the volume ``source`` names
    rng = np.random.default_rng(channels)
    vols = rng.standard_normal((3, 5, 4, 6, channels))
    splice = jax.jit(kspace.splice_lines, static_argnums=2) if as_list else kspace.splice_lines
    for axis in range(3):
        n = vols.shape[axis + 1]
        source = rng.integers(0, 3, n)
        spectra = np.fft.fftn(vols, axes=(1, 2, 3))
        pick = [slice(None)] * 4
        combined = np.zeros_like(spectra[0])
        for k in range(n):
            pick[axis] = k
            combined[tuple(pick)] = spectra[source[k]][tuple(pick)]
        ref = np.fft.ifftn(combined, axes=(0, 1, 2))
        volumes = vols.astype(np.float32)
        out = splice(list(volumes) if as_list else volumes, source, axis)
        assert out.shape == vols.shape[1:] and out.dtype == np.complex64
        np.testing.assert_allclose(out, ref, atol=1e-5)


def test_splice_lines_of_one_volume_is_that_volume():
    x = np.random.default_rng(4).standard_normal((5, 4, 6, 2)).astype(np.float32)
    out = kspace.splice_lines(x[None], np.zeros(4, int), 1)
    assert out.dtype == np.complex64
    np.testing.assert_array_equal(out, x + 0j)


def test_attenuate_planes_rejects_bad_arguments():
    x = np.ones((4, 5, 6, 1), np.float32)
    with pytest.raises(
        ValueError, match=r"freqs and weights must be 1D of the same length, got shapes \(2,\) and \(1,\)"
    ):
        kspace.attenuate_planes(x, [1, 2], [0.5], 0)
    with pytest.raises(ValueError, match="axis must be 0, 1 or 2 \\(a spatial axis\\), got 3"):
        kspace.attenuate_planes(x, [1], [0.5], 3)
    with pytest.raises(ValueError, match=r"data must be \(x, y, z, c\), got shape \(4, 5, 6\)"):
        kspace.attenuate_planes(x[..., 0], [1], [0.5], 0)


def test_splice_lines_rejects_complex_volumes():
    with pytest.raises(TypeError, match="volumes"):
        kspace.splice_lines(np.ones((2, 3, 3, 3, 1), np.complex64), np.zeros(3, int), 0)


def test_attenuate_planes_equals_scaling_kspace_planes():
    rng = np.random.default_rng(3)
    for shape in [(6, 5, 7, 1), (5, 8, 4, 2)]:
        x = rng.standard_normal(shape).astype(np.float32)
        for axis in range(3):
            n = shape[axis]
            freqs = np.array([0, 1, -2, n // 2, 7 * n + 1])  # the last one is 1 again: weight 0
            weights = np.array([0.25, 0.5, 1.0, 0.75, 0.0])
            factor = np.ones(n)
            for f, w in zip(freqs, weights):
                factor[f % n] -= w
                if (-f) % n != f % n:
                    factor[-f % n] -= w
            view = [1, 1, 1, 1]
            view[axis] = n
            spec = np.fft.fftn(x.astype(np.float64), axes=(0, 1, 2)) * factor.reshape(view)
            ref = np.real(np.fft.ifftn(spec, axes=(0, 1, 2)))
            out = jax.jit(kspace.attenuate_planes, static_argnums=3)(x, freqs, weights, axis)
            assert out.shape == x.shape and out.dtype == np.float32
            np.testing.assert_allclose(out, ref, atol=1e-5)


def test_peak_magnitude_for_non_negative_and_signed_volumes():
    x = np.abs(_volume((6, 5, 7, 2), seed=6))
    x[..., 1] *= 3
    for volume in (x, x - 1.5):
        ref = np.abs(np.fft.fftn(volume.astype(np.float64), axes=(0, 1, 2))).max()
        np.testing.assert_allclose(jax.jit(kspace.peak_magnitude)(volume), ref, rtol=1e-5)
    # signed volume whose peak is not at frequency 0
    wave = np.cos(2 * np.pi * np.arange(6) / 6)[:, None, None, None] * np.ones((6, 5, 7, 1))
    np.testing.assert_allclose(kspace.peak_magnitude(wave.astype(np.float32)), 6 * 5 * 7 / 2, rtol=1e-5)
