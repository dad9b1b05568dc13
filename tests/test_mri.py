import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage as ndi
from conftest import make_phantom

import jmed
from jmed.transforms.mri import RandomGhosting, RandomMotion, RandomSpike, rigid_voxel_matrix

SHAPE = (12, 10, 8)
AFFINE = np.array([[1.0, 0, 0, -5], [0, 1.5, 0, 3], [0, 0, 2.0, 1], [0, 0, 0, 1]])


def _phantom(positive=True):
    s = make_phantom(SHAPE, AFFINE)
    if positive:
        s = s.replace({"t1": s["t1"].replace(data=jnp.abs(s["t1"].data) + 1.0)})
    return s


FACTORIES = {
    "motion": lambda: RandomMotion(degrees=10, translation=5, num_transforms=2),
    "ghosting": lambda: RandomGhosting(num_ghosts=(2, 4)),
    "spike": lambda: RandomSpike(num_spikes=(1, 3), intensity=(0.5, 1)),
}


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_eager_jit_vmap_and_labels_untouched(name, run, key):
    subject = _phantom()
    out = run(FACTORIES[name](), key, subject, atol=1e-4)
    np.testing.assert_array_equal(out["seg"].data, subject["seg"].data)
    data = np.asarray(out["t1"].data)
    assert data.shape == subject["t1"].shape and np.all(np.isfinite(data))
    assert not np.allclose(data, subject["t1"].data)


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_same_key_and_gradient(name, key):
    t = FACTORIES[name]()
    subject = _phantom()
    np.testing.assert_array_equal(t(key, subject)["t1"].data, t(key, subject)["t1"].data)
    params = t.sample(key, subject)

    def loss(data):
        return jnp.sum(
            t.apply(subject.replace({"t1": subject["t1"].replace(data=data)}), params)["t1"].data ** 2
        )

    grad = jax.grad(loss)(jnp.asarray(subject["t1"].data))
    assert np.all(np.isfinite(grad)) and np.any(grad != 0)


def test_identities(key):
    subject = _phantom()
    x = np.asarray(subject["t1"].data)
    tol = 1e-5 * np.abs(x).max()
    motion = RandomMotion(num_transforms=3)
    params = motion.sample(key, subject)
    zero = {**params, "degrees": jnp.zeros((3, 3)), "translation": jnp.zeros((3, 3))}
    np.testing.assert_allclose(motion.apply(subject, zero)["t1"].data, x, atol=tol)
    ghost = RandomGhosting()
    params = {**ghost.sample(key, subject), "intensity": jnp.float32(0.0)}
    np.testing.assert_allclose(ghost.apply(subject, params)["t1"].data, x, atol=tol)
    params = {**ghost.sample(key, subject), "num_ghosts": jnp.int32(0)}
    np.testing.assert_allclose(ghost.apply(subject, params)["t1"].data, x, atol=tol)
    spike = RandomSpike(num_spikes=(1, 2))
    params = spike.sample(key, subject)
    params = {**params, "intensity": jnp.zeros_like(params["intensity"])}
    np.testing.assert_allclose(spike.apply(subject, params)["t1"].data, x, atol=tol)


# -- spikes ----------------------------------------------------------------------------------
def test_spike_energy_sits_at_sampled_frequency(key):
    subject = _phantom()
    t = RandomSpike(num_spikes=(2, 2), intensity=(1.0, 3.0))
    params = t.sample(key, subject)
    x = np.asarray(subject["t1"].data[..., 0], np.float64)
    out = np.asarray(t.apply(subject, params)["t1"].data[..., 0], np.float64)
    diff = np.fft.fftn(out) - np.fft.fftn(x)
    peak = np.abs(np.fft.fftn(x)).max()
    r = float(params["intensity"][0])
    expected = np.zeros(SHAPE, complex)
    for pos in np.asarray(params["positions"]):
        f = np.floor(pos * np.array(SHAPE)).astype(int) - np.array(SHAPE) // 2
        expected[tuple(f % SHAPE)] += r * peak / 2
        expected[tuple(-f % SHAPE)] += r * peak / 2
    np.testing.assert_allclose(diff, expected, atol=1e-4 * peak)
    assert np.abs(diff).max() > 0.4 * peak


def test_spike_count_is_masked(key):
    t = RandomSpike(num_spikes=(0, 4))
    counts = [int(np.sum(t.sample(k, _phantom())["active"])) for k in jax.random.split(key, 12)]
    assert min(counts) >= 0 and max(counts) <= 4 and len(set(counts)) > 1


# -- ghosting ----------------------------------------------------------------------------
@pytest.mark.parametrize("axis, ghosts, restore", [(0, 3, None), (1, 2, 0.5), (2, 4, None)])
def test_ghosting_spectrum_has_the_expected_period(axis, ghosts, restore):
    subject = _phantom()
    t = RandomGhosting(axes=(axis,), restore=restore)
    s = 0.7
    params = {"num_ghosts": jnp.int32(ghosts), "axis": jnp.int32(axis), "intensity": jnp.float32(s)}
    x = np.asarray(subject["t1"].data[..., 0], np.float64)
    out = np.asarray(t.apply(subject, params)["t1"].data[..., 0], np.float64)
    ratio = np.fft.fftn(out) / np.fft.fftn(x)
    n = SHAPE[axis]
    f = np.rint(np.fft.fftfreq(n) * n).astype(int)
    keep = np.abs(f) <= (0 if restore is None else np.floor(restore * n / 2))
    expected_1d = np.where((f % ghosts == 0) & ~keep, 1 - s, 1.0)
    view = [1, 1, 1]
    view[axis] = n
    np.testing.assert_allclose(ratio, np.broadcast_to(expected_1d.reshape(view), SHAPE), atol=1e-4)
    assert np.any(expected_1d != 1)


def _numpy_ghosting(x, ghosts, axis, s, restore):
    n = x.shape[axis]
    f = np.abs(np.rint(np.fft.fftfreq(n) * n).astype(int))
    keep = f <= (0 if restore is None else np.floor(restore * n / 2))
    comb = (ghosts > 0) & (f % max(ghosts, 1) == 0) & ~keep
    view = [1, 1, 1]
    view[axis] = n
    return np.real(np.fft.ifftn(np.fft.fftn(x) * (1 - s * comb).reshape(view)))


@pytest.mark.parametrize("restore", [None, 0.3])
def test_ghosting_matches_fft_reference_for_sampled_and_given_counts(restore, key):
    x = np.random.default_rng(4).standard_normal((20, 18, 15)).astype(np.float32)
    subject = jmed.Subject(t1=jmed.ScalarImage(x))
    t = RandomGhosting(num_ghosts=(3, 5), restore=restore)
    apply = jax.jit(lambda p: t.apply(subject, p)["t1"].data[..., 0])
    cases = [t.sample(k, subject) for k in jax.random.split(key, 4)]
    # counts below the sampled range (1, 2) and 0 take the general path
    cases += [
        {"num_ghosts": jnp.int32(g), "axis": jnp.int32(a), "intensity": jnp.float32(0.6)}
        for g, a in [(1, 0), (2, 1), (0, 2)]
    ]
    for p in cases:
        ghosts, axis, s = int(p["num_ghosts"]), int(p["axis"]), float(p["intensity"])
        ref = _numpy_ghosting(x.astype(np.float64), ghosts, axis, s, restore)
        np.testing.assert_allclose(apply(p), ref, atol=1e-4)


def test_ghosting_image_space_period():
    # a single bright voxel: ghosts appear at shifts of N / n along the axis
    data = np.zeros((12, 6, 6, 1), np.float32)
    data[2, 3, 3] = 100.0
    t = RandomGhosting(axes=(0,))
    out = t.apply(
        jmed.Subject(t1=jmed.ScalarImage(data[..., 0])),
        {"num_ghosts": jnp.int32(3), "axis": jnp.int32(0), "intensity": jnp.float32(1.0)},
    )
    line = np.asarray(out["t1"].data)[:, 3, 3, 0]
    ghost_rows = np.array([2, 6, 10])
    others = np.setdiff1d(np.arange(12), ghost_rows)
    assert np.all(np.abs(line[ghost_rows] - line[others].mean()) > 1.0)
    np.testing.assert_allclose(line[ghost_rows[1:]], line[ghost_rows[1]], rtol=1e-4)


# -- motion ------------------------------------------------------------------------------
def test_motion_line_sources_follow_the_documented_convention(key):
    t = RandomMotion(num_transforms=3)
    times = jnp.asarray([0.1, 0.3, 0.8])
    source = np.fft.fftshift(np.asarray(t.line_sources(times, 10)))  # acquisition order
    # boundaries at 1, 3, 8; frequency 0 (position 5) is in segment 2 -> original pose
    np.testing.assert_array_equal(source, [1, 2, 2, 0, 0, 0, 0, 0, 3, 3])


def _numpy_motion(x, affine, params, t, part=np.abs):
    vols = [x]
    for d, tr in zip(np.asarray(params["degrees"]), np.asarray(params["translation"])):
        m = np.asarray(rigid_voxel_matrix(affine, x.shape, d, tr), np.float64)
        vols.append(ndi.affine_transform(x, m[:3, :3], m[:3, 3], order=1, mode="nearest"))
    n = x.shape[t.phase_encoding_axis]
    bounds = np.floor(np.asarray(params["times"]) * n).astype(int)
    segment = (np.arange(n)[:, None] >= bounds[None]).sum(1)
    centre = segment[n // 2]
    order = [centre] + [s for s in range(len(bounds) + 1) if s != centre]
    spectra = [np.fft.fftshift(np.fft.fftn(v)) for v in vols]
    out = np.zeros_like(spectra[0])
    for position in range(n):
        index = [slice(None)] * 3
        index[t.phase_encoding_axis] = position
        out[tuple(index)] = spectra[order.index(segment[position])][tuple(index)]
    return part(np.fft.ifftn(np.fft.ifftshift(out)))


@pytest.mark.parametrize("axis", [0, 2])
def test_motion_matches_full_kspace_reference(axis, key):
    subject = _phantom()
    t = RandomMotion(degrees=8, translation=4, num_transforms=2, phase_encoding_axis=axis)
    params = t.sample(key, subject)
    x = np.asarray(subject["t1"].data[..., 0], np.float64)
    out = np.asarray(jax.jit(t.apply)(subject, params)["t1"].data[..., 0])
    ref = _numpy_motion(x, AFFINE, params, t)
    np.testing.assert_allclose(out, ref, atol=1e-4 * np.abs(x).max())
    assert np.abs(out - x).max() > 1.0


def test_motion_real_part_matches_reference_along_axis_1(key):
    subject = _phantom(positive=False)
    t = RandomMotion(degrees=8, translation=4, num_transforms=3, phase_encoding_axis=1, magnitude=False)
    params = t.sample(key, subject)
    x = np.asarray(subject["t1"].data[..., 0], np.float64)
    out = np.asarray(jax.jit(t.apply)(subject, params)["t1"].data[..., 0])
    ref = _numpy_motion(x, AFFINE, params, t, part=np.real)
    np.testing.assert_allclose(out, ref, atol=1e-4 * np.abs(x).max())
    assert np.abs(out - x).max() > 0.1 * np.abs(x).max()


def test_motion_real_part_option_keeps_sign(key):
    subject = _phantom(positive=False)
    t = RandomMotion(magnitude=False)
    params = t.sample(key, subject)
    zero = {**params, "degrees": jnp.zeros((2, 3)), "translation": jnp.zeros((2, 3))}
    np.testing.assert_allclose(t.apply(subject, zero)["t1"].data, subject["t1"].data, atol=1e-3)


@pytest.mark.parametrize(
    "factory, match",
    [
        (lambda: RandomGhosting(num_ghosts=-1), "num_ghosts"),
        (lambda: RandomGhosting(num_ghosts=(5, 2)), "num_ghosts"),
        (lambda: RandomGhosting(axes=(0, 3)), "axes"),
        (lambda: RandomGhosting(axes=()), "axes"),
        (lambda: RandomGhosting(intensity=-0.5), "intensity"),
        (lambda: RandomGhosting(restore=1.5), "restore"),
        (lambda: RandomSpike(num_spikes=-2), "num_spikes"),
        (lambda: RandomSpike(intensity=(3, 1)), "intensity"),
        (lambda: RandomMotion(num_transforms=0), "num_transforms"),
        (lambda: RandomMotion(degrees=-1), "degrees"),
        (lambda: RandomMotion(phase_encoding_axis=3), "phase_encoding_axis"),
        (lambda: RandomMotion(pad_mode="wrap"), "pad_mode"),
    ],
)
def test_bad_parameters(factory, match):
    with pytest.raises(ValueError, match=match):
        factory()
