"""Tests for jmed.inference: grid, weighting fixtures, identity, sharding, memory options."""

import contextlib
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_trees_close

import jmed
from jmed import affine as affine_lib
from jmed.inference import (
    GridAggregator,
    GridSampler,
    grid_locations,
    sliding_window_inference,
)

MODES = ("crop", "average", "hann", "gaussian")


def identity(x):
    return x


def window_mean(x):
    """A 'model' whose output for a window is the window's mean, everywhere in the window."""
    return jnp.broadcast_to(x.mean(axis=(1, 2, 3), keepdims=True), x.shape)


def nonlinear(x):
    """Depends on the whole window (so blending matters) and has 2 output channels."""
    mean = x.mean(axis=(1, 2, 3), keepdims=True)
    return jnp.concatenate([x * mean, jnp.sin(x) + mean], axis=-1)


def random_image(shape, seed=0, channels=1, affine=None):
    data = np.random.default_rng(seed).standard_normal((*shape, channels)).astype(np.float32)
    return jmed.Image(data, affine)


# --- grid ------------------------------------------------------------------------------------


def test_grid_locations_rule():
    locations = grid_locations((10, 4, 7), (4, 4, 3), (1, 0, 2))
    # x: stride 3 -> 0, 3, 6 (6 = 10 - 4 ends at the border); y: one window; z: stride 1 -> 0..4
    expected = np.array(list(itertools.product([0, 3, 6], [0], [0, 1, 2, 3, 4])))
    np.testing.assert_array_equal(locations, expected)
    assert locations.dtype.kind == "i"


def test_grid_locations_last_window_ends_at_border():
    locations = grid_locations((11, 9, 96), 4, 2)
    assert locations[:, 0].tolist().count(7) > 0  # 0, 2, 4, 6, 7
    np.testing.assert_array_equal(np.unique(locations[:, 0]), [0, 2, 4, 6, 7])
    np.testing.assert_array_equal(np.unique(locations[:, 1]), [0, 2, 4, 5])
    assert locations[:, 2].max() == 92
    np.testing.assert_array_equal(locations, np.unique(locations, axis=0))


def test_grid_locations_cover_volume():
    shape, patch = (13, 7, 9), (5, 3, 4)
    covered = np.zeros(shape, int)
    for x, y, z in grid_locations(shape, patch, (2, 1, 3)):
        covered[x : x + 5, y : y + 3, z : z + 4] += 1
    assert covered.min() >= 1


# --- hand-computed fixtures --------------------------------------------------------------------
# Volume of 7 voxels along one axis, patch 4, overlap 2: windows start at 0, 2 and 3
# (A = [0, 4), B = [2, 6), C = [3, 7)). The "model" multiplies window A by 1, B by 2, C by 4
# (on a volume of ones).

H = np.sin(3 * np.pi / 8) ** 2  # hann weight of the 2 inner voxels of a 4-voxel window
h = np.sin(np.pi / 8) ** 2  # hann weight of the 2 outer voxels (h + H = 1)
G = np.exp(-0.5)  # gaussian, sigma = 0.5: inner voxels are 0.5 from the centre 1.5
g = np.exp(-4.5)  # outer voxels are 1.5 from the centre

FIXTURES = {
    # crop: boundaries in the middle of each actual overlap: A [0, 3), B [3, 4), C [4, 7)
    "crop": [1, 1, 1, 2, 4, 4, 4],
    "average": [1, 1, 1.5, 7 / 3, 3, 3, 4],
    "hann": [
        1,
        1,
        (H * 1 + h * 2) / (H + h),
        (h * 1 + H * 2 + h * 4) / (h + H + h),
        (H * 2 + H * 4) / (2 * H),
        (h * 2 + H * 4) / (h + H),
        4,
    ],
    "gaussian": [
        1,
        1,
        (G * 1 + g * 2) / (G + g),
        (g * 1 + G * 2 + g * 4) / (g + G + g),
        3,
        (g * 2 + G * 4) / (g + G),
        4,
    ],
}


@pytest.mark.parametrize("axis", [0, 1, 2])
@pytest.mark.parametrize("mode", MODES)
def test_aggregator_fixture(mode, axis):
    shape, patch, overlap = [1, 1, 1], [1, 1, 1], [0, 0, 0]
    shape[axis], patch[axis], overlap[axis] = 7, 4, 2
    image = jmed.ScalarImage(np.ones(shape, np.float32))
    sampler = GridSampler(image, patch, overlap)
    np.testing.assert_array_equal(sampler.locations[:, axis], [0, 2, 3])
    constants = {0: 1.0, 2: 2.0, 3: 4.0}
    aggregator = GridAggregator(sampler, mode=mode)
    for patches, locations in sampler.batches(2):  # batches of 2 and 1
        factors = jnp.asarray([constants[int(loc[axis])] for loc in locations])
        aggregator.add_batch(patches * factors[:, None, None, None, None], locations)
    out = aggregator.get_output()
    np.testing.assert_allclose(np.asarray(out.data).reshape(-1), FIXTURES[mode], rtol=1e-6)
    np.testing.assert_array_equal(out.affine, image.affine)


@pytest.mark.parametrize("mode", MODES)
def test_aggregator_fixture_3d(mode):
    # the same grid along all three axes; window (a, b, c) is multiplied by k(a) k(b) k(c).
    # Weights and constants are separable, so the expected volume is the outer product of
    # the 1D fixture with itself three times.
    image = jmed.ScalarImage(np.ones((7, 7, 7), np.float32))
    sampler = GridSampler(image, 4, 2)
    constants = {0: 1.0, 2: 2.0, 3: 4.0}
    aggregator = GridAggregator(sampler, mode=mode)
    for patches, locations in sampler.batches(9):  # 27 windows
        factors = jnp.asarray([np.prod([constants[int(v)] for v in loc]) for loc in locations])
        aggregator.add_batch(patches * factors[:, None, None, None, None], locations)
    line = np.asarray(FIXTURES[mode])
    expected = line[:, None, None] * line[None, :, None] * line[None, None, :]
    np.testing.assert_allclose(np.asarray(aggregator.get_output().data)[..., 0], expected, rtol=1e-6)


@pytest.mark.parametrize("mode", MODES)
def test_sliding_window_fixture(mode):
    # the "model" returns each window's mean: windows A, B, C have known different means
    data = np.array([4, 0, 0, 0, 8, 0, 12], np.float32).reshape(7, 1, 1)
    image = jmed.ScalarImage(data)
    means = {0: 1.0, 2: 2.0, 3: 5.0}  # [4, 0, 0, 0], [0, 0, 8, 0], [0, 8, 0, 12]
    expected = {
        "crop": [means[0]] * 3 + [means[2]] + [means[3]] * 3,
        "average": [
            means[0],
            means[0],
            (means[0] + means[2]) / 2,
            (means[0] + means[2] + means[3]) / 3,
            (means[2] + means[3]) / 2,
            (means[2] + means[3]) / 2,
            means[3],
        ],
        "hann": [
            means[0],
            means[0],
            H * means[0] + h * means[2],
            (h * means[0] + H * means[2] + h * means[3]) / (2 * h + H),
            (means[2] + means[3]) / 2,
            h * means[2] + H * means[3],
            means[3],
        ],
        "gaussian": [
            means[0],
            means[0],
            (G * means[0] + g * means[2]) / (G + g),
            (g * means[0] + G * means[2] + g * means[3]) / (2 * g + G),
            (means[2] + means[3]) / 2,
            (g * means[2] + G * means[3]) / (g + G),
            means[3],
        ],
    }[mode]
    out = sliding_window_inference(window_mean, image, (4, 1, 1), overlap=(2, 0, 0), batch_size=2, mode=mode)
    np.testing.assert_allclose(np.asarray(out.data).reshape(-1), expected, rtol=1e-6)


def _reference(predict, data, patch, overlap, mode):
    """Accumulate weighted sums and weights separately, then divide (numpy, no padding)."""
    profiles = []
    for p in patch:
        i = np.arange(p)
        profiles.append(
            {
                "average": np.ones(p),
                "hann": np.sin(np.pi * (i + 0.5) / p) ** 2,
                "gaussian": np.exp(-0.5 * ((i - (p - 1) / 2) / (0.125 * p)) ** 2),
            }[mode]
        )
    window = np.einsum("i,j,k->ijk", *profiles)[..., None]
    total = np.zeros(data.shape[:3] + (1,))
    weighted = None
    for x, y, z in grid_locations(data.shape[:3], patch, overlap):
        region = (slice(x, x + patch[0]), slice(y, y + patch[1]), slice(z, z + patch[2]))
        out = np.asarray(predict(data[region][None]))[0]
        if weighted is None:
            weighted = np.zeros(data.shape[:3] + out.shape[-1:])
        weighted[region] += window * out
        total[region] += window
    return weighted / total


@pytest.mark.parametrize("mode", ["average", "hann", "gaussian"])
def test_matches_numpy_reference(mode):
    image = random_image((11, 8, 9), seed=1)
    patch, overlap = (5, 4, 6), (2, 1, 3)
    out = sliding_window_inference(nonlinear, image, patch, overlap=overlap, batch_size=3, mode=mode)
    expected = _reference(nonlinear, np.asarray(image.data), patch, overlap, mode)
    np.testing.assert_allclose(np.asarray(out.data), expected, rtol=1e-5, atol=1e-6)


# --- identity --------------------------------------------------------------------------------

# patch 4; stride 4 (overlap 0) or 2 (overlap 2). Each shape covers two of the cases.
SHAPES = {
    # odd sizes; (size - patch) not a multiple of the stride along x (overlap 2) and x, y
    # (overlap 0), so the last window overlaps its neighbour by more than the overlap
    "odd_not_divisible_by_stride": (7, 9, 5),
    # even sizes; x smaller than the patch (padded), y fits exactly, z = 10
    "even_smaller_than_patch": (2, 4, 10),
}


@pytest.mark.parametrize("overlap", [0, 2])
@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
@pytest.mark.parametrize("mode", MODES)
def test_identity(mode, shape, overlap):
    image = random_image(shape, seed=2, channels=2)
    out = sliding_window_inference(identity, image, 4, overlap=overlap, batch_size=2, mode=mode)
    assert out.shape == image.shape
    np.testing.assert_allclose(np.asarray(out.data), image.data, atol=1e-6)
    np.testing.assert_array_equal(out.affine, image.affine)


@pytest.mark.parametrize("padding_mode", ["constant", "edge", "reflect"])
def test_identity_pad_borders(padding_mode):
    image = random_image((6, 5, 3), seed=3)
    out = sliding_window_inference(
        identity, image, (4, 4, 4), overlap=2, batch_size=2, mode="hann",
        padding_mode=padding_mode, pad_borders=True,
    )  # fmt: skip
    np.testing.assert_allclose(np.asarray(out.data), image.data, atol=1e-6)


def test_padding_is_seen_by_the_model():
    # a model that returns its input's mean everywhere sees the padding value
    image = jmed.ScalarImage(np.ones((2, 2, 2), np.float32))
    out = sliding_window_inference(window_mean, image, 4, mode="crop", padding_value=3.0)
    np.testing.assert_allclose(np.asarray(out.data), (8 * 1 + 56 * 3) / 64, rtol=1e-6)
    out = sliding_window_inference(window_mean, image, 4, mode="crop", padding_mode="edge")
    np.testing.assert_allclose(np.asarray(out.data), 1.0, rtol=1e-6)


def test_eager_jit_vmap(run):
    image = random_image((6, 7, 5), seed=4)

    def fn(key, image):
        return sliding_window_inference(nonlinear, image, 4, overlap=1, batch_size=2, mode="hann")

    out = run(fn, None, image)
    expected = _reference(nonlinear, np.asarray(image.data), (4, 4, 4), (1, 1, 1), "hann")
    np.testing.assert_allclose(np.asarray(out.data), expected, rtol=1e-5, atol=1e-6)


# --- outputs: channels, downsampling, argmax, dtype, host ------------------------------------------


def test_output_channels_differ():
    image = random_image((7, 6, 5), seed=5)
    out = sliding_window_inference(
        lambda x: jnp.concatenate([x, 2 * x, -x], -1), image, 4, overlap=1, batch_size=2
    )
    x = np.asarray(image.data)
    np.testing.assert_allclose(np.asarray(out.data), np.concatenate([x, 2 * x, -x], -1), atol=1e-6)


def _pool2(x):
    b, nx, ny, nz, c = x.shape
    return x.reshape(b, nx // 2, 2, ny // 2, 2, nz // 2, 2, c).mean(axis=(2, 4, 6))


@pytest.mark.parametrize("mode", ["crop", "hann"])
def test_downsampling_model(mode):
    affine = affine_lib.from_spacing((1.0, 2.0, 0.5), (10.0, -4.0, 3.0), "LPS")
    image = random_image((9, 8, 6), seed=6, affine=affine)  # 9 is odd: padded to 10
    out = sliding_window_inference(_pool2, image, 4, overlap=2, batch_size=2, mode=mode)
    padded = np.pad(np.asarray(image.data), ((0, 1), (0, 0), (0, 0), (0, 0)))
    expected = _pool2(padded[None])[0]
    assert out.shape == (5, 4, 3, 1)
    np.testing.assert_allclose(np.asarray(out.data), expected, atol=1e-6)
    # output voxel j sits at the centre of input voxels [2 j, 2 j + 1]
    corners = affine_lib.voxel_to_world(image.affine, np.array([[0, 0, 0], [1, 1, 1]]))
    centre = affine_lib.voxel_to_world(np.asarray(out.affine), np.array([[0, 0, 0]]))
    np.testing.assert_allclose(centre[0], corners.mean(0), atol=1e-9)
    np.testing.assert_allclose(np.asarray(out.spacing), 2 * np.asarray(image.spacing))


@pytest.mark.parametrize("mode", ["crop", "gaussian"])
def test_argmax(mode):
    image = random_image((7, 6, 5), seed=7)

    def logits(x):
        return jnp.concatenate([x, -x, 0.5 * jnp.ones_like(x)], -1)

    out = sliding_window_inference(logits, image, 4, overlap=2, batch_size=3, mode=mode, argmax=True)
    x = np.asarray(image.data)
    expected = np.argmax(np.concatenate([x, -x, 0.5 * np.ones_like(x)], -1), -1)[..., None]
    assert out.is_label and out.dtype == np.uint8
    np.testing.assert_array_equal(np.asarray(out.data), expected)


def test_argmax_crop_equals_argmax_of_crop():
    image = random_image((9, 7, 6), seed=8)
    probs = sliding_window_inference(nonlinear, image, 4, overlap=2, batch_size=2, mode="crop")
    labels = sliding_window_inference(nonlinear, image, 4, overlap=2, batch_size=2, mode="crop", argmax=True)
    np.testing.assert_array_equal(np.asarray(labels.data)[..., 0], np.argmax(np.asarray(probs.data), -1))


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_low_precision_accumulation(dtype):
    image = random_image((9, 7, 6), seed=9)
    out = sliding_window_inference(
        identity, image, 4, overlap=2, batch_size=2, mode="gaussian", accumulation_dtype=dtype
    )
    assert out.dtype == dtype
    tolerance = 1e-2 if dtype == jnp.float16 else 4e-2
    np.testing.assert_allclose(np.asarray(out.data, np.float32), image.data, atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize("argmax", [False, True])
def test_output_on_host(argmax):
    image = random_image((9, 7, 6), seed=10)
    kwargs = dict(overlap=2, batch_size=3, mode="crop" if argmax else "hann", argmax=argmax)
    device = sliding_window_inference(nonlinear, image, 4, **kwargs)
    host = sliding_window_inference(nonlinear, image, 4, output_on_host=True, **kwargs)
    assert isinstance(host.data, np.ndarray)
    assert host.kind == device.kind and host.dtype == device.dtype
    np.testing.assert_allclose(host.data, np.asarray(device.data), atol=1e-6)


def test_inside_user_jit_with_traced_parameters():
    # how a Flax NNX model is used: parameters are traced arguments of the user's jit
    image = random_image((7, 6, 5), seed=11)
    mesh = jax.make_mesh((2,), ("data",), devices=jax.devices()[:2])

    @jax.jit
    def infer(scale, image):
        return sliding_window_inference(lambda x: scale * x, image, 4, overlap=2, batch_size=2, mesh=mesh)

    out = infer(jnp.float32(3.0), image)
    np.testing.assert_allclose(np.asarray(out.data), 3 * image.data, atol=1e-5)


def test_jit_over_parameters_only_does_not_cache_tracers():
    image = random_image((6, 5, 4), seed=16)  # concrete, closed over

    @jax.jit
    def infer(scale):
        return sliding_window_inference(lambda x: scale * x, image, 4, overlap=1).data

    for scale in (2.0, 5.0):
        np.testing.assert_allclose(np.asarray(infer(jnp.float32(scale))), scale * image.data, atol=1e-5)


def test_model_object_weights_are_not_stale():
    class Scaled:  # a mutable "model", like a Flax NNX module
        def __init__(self, scale):
            self.scale = jnp.float32(scale)

        def __call__(self, x):
            return self.scale * x

    image = random_image((6, 5, 4), seed=17)
    model = Scaled(2.0)
    first = sliding_window_inference(model, image, 4, overlap=1)
    model.scale = jnp.float32(7.0)  # "training" changed the weights
    second = sliding_window_inference(model, image, 4, overlap=1)
    np.testing.assert_allclose(np.asarray(first.data), 2 * image.data, atol=1e-5)
    np.testing.assert_allclose(np.asarray(second.data), 7 * image.data, atol=1e-5)


# --- compilation: the model is compiled once per window-batch shape ---------------------------------

MODEL_PROGRAM = "predict_windows"  # the name of jmed's program that predicts a batch of windows


@contextlib.contextmanager
def jax_programs():
    """Names of the functions JAX traces and lowers to XLA programs inside the block.

    Read from JAX's monitoring events (a program lowered is a program compiled, or read
    from the persistent compilation cache when one is configured).
    """
    seen = {"traced": [], "lowered": []}
    events = {
        "/jax/core/compile/jaxpr_trace_duration": "traced",
        "/jax/core/compile/jaxpr_to_mlir_module_duration": "lowered",
    }

    def listener(event, duration, **kwargs):
        if event in events:
            seen[events[event]].append(str(kwargs.get("fun_name", "")))

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield seen
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def model_programs(seen, kind):
    return sum(MODEL_PROGRAM in name for name in seen[kind])


def tiny_unet(seed=0, classes=2):
    """A U-Net-like NNX model small enough for CPU tests (a new class, so a new graph, per call)."""
    nnx = pytest.importorskip("flax.nnx")

    class TinyUNet(nnx.Module):
        def __init__(self, rngs):
            self.down = nnx.Conv(1, 4, (3, 3, 3), rngs=rngs)
            self.bottom = nnx.Conv(4, 4, (3, 3, 3), rngs=rngs)
            self.up = nnx.ConvTranspose(4, 4, (2, 2, 2), strides=(2, 2, 2), rngs=rngs)
            self.head = nnx.Conv(8, classes, (1, 1, 1), rngs=rngs)

        def __call__(self, x):
            skip = nnx.relu(self.down(x))
            low = nnx.relu(self.bottom(nnx.max_pool(skip, (2, 2, 2), strides=(2, 2, 2))))
            return self.head(jnp.concatenate([self.up(low), skip], axis=-1))

    return TinyUNet(nnx.Rngs(seed))


VOLUME_SHAPES = [(9, 8, 10), (12, 8, 8), (8, 11, 9), (10, 10, 10), (13, 9, 8), (8, 8, 15)]
BLENDING = ["hann", "gaussian", "average"]


def test_nnx_model_compiled_once_over_volume_shapes():
    model = tiny_unet()
    images = [random_image(shape, seed=30 + i) for i, shape in enumerate(VOLUME_SHAPES)]
    outputs = []
    with jax_programs() as seen:
        for i, image in enumerate(images):
            mode = BLENDING[i % 3]
            outputs.append(sliding_window_inference(model, image, 8, overlap=4, batch_size=2, mode=mode))
    assert model_programs(seen, "traced") == 1, seen["traced"]
    assert model_programs(seen, "lowered") == 1, seen["lowered"]
    assert len(seen["lowered"]) > 6  # the per-volume programs are seen by the listener too
    for i, (image, out) in enumerate(zip(images, outputs)):
        expected = _reference(model, np.asarray(image.data), (8, 8, 8), (4, 4, 4), BLENDING[i % 3])
        assert out.shape == (*image.spatial_shape, 2)
        np.testing.assert_allclose(np.asarray(out.data), expected, rtol=1e-5, atol=1e-5)


def test_nnx_new_weights_are_used_without_recompiling():
    nnx = pytest.importorskip("flax.nnx")
    model = tiny_unet(seed=1)
    image = random_image((10, 9, 8), seed=40)
    kwargs = dict(overlap=4, batch_size=2, mode="gaussian")
    first = sliding_window_inference(model, image, 8, **kwargs)
    with jax_programs() as seen:
        # a "training step": nnx.update with a new state whose head bias is 1 larger; the
        # weights of every window sum to 1, so every output voxel grows by exactly 1
        state = nnx.state(model)
        state["head"]["bias"] = jax.tree.map(lambda b: b + 1.0, state["head"]["bias"])
        nnx.update(model, state)
        second = sliding_window_inference(model, image, 8, **kwargs)
        # a new model object of the same graph, with other weights
        graphdef, state = nnx.split(model)
        other = nnx.merge(graphdef, jax.tree.map(lambda w: -0.5 * w, state))
        third = sliding_window_inference(other, image, 8, **kwargs)
    assert model_programs(seen, "lowered") == 0, seen["lowered"]
    # a fresh lambda around the model (a closure over the module) per call: one new program
    with jax_programs() as seen:
        for _ in range(2):
            fourth = sliding_window_inference(lambda x: jax.nn.softmax(model(x)), image, 8, **kwargs)
    assert model_programs(seen, "lowered") == 1, seen["lowered"]
    np.testing.assert_allclose(np.asarray(second.data), np.asarray(first.data) + 1, rtol=1e-5, atol=1e-5)
    data = np.asarray(image.data)
    expected = _reference(other, data, (8, 8, 8), (4, 4, 4), "gaussian")
    np.testing.assert_allclose(np.asarray(third.data), expected, rtol=1e-5, atol=1e-5)
    assert np.abs(np.asarray(third.data) - np.asarray(second.data)).max() > 0.1
    # softmax of a blend is not a blend of softmaxes: compare with the reference of the lambda
    expected = _reference(lambda x: jax.nn.softmax(model(x)), data, (8, 8, 8), (4, 4, 4), "gaussian")
    np.testing.assert_allclose(np.asarray(fourth.data), expected, rtol=1e-5, atol=1e-6)


def test_nnx_model_sharded_and_on_host():
    model = tiny_unet(seed=2, classes=3)
    image = random_image((12, 9, 10), seed=41)
    kwargs = dict(overlap=4, batch_size=2, mode="hann")
    single = sliding_window_inference(model, image, 8, **kwargs)
    expected = _reference(model, np.asarray(image.data), (8, 8, 8), (4, 4, 4), "hann")
    np.testing.assert_allclose(np.asarray(single.data), expected, rtol=1e-5, atol=1e-5)
    mesh = jax.make_mesh((4,), ("data",), devices=jax.devices()[:4])
    with jax_programs() as seen:
        sharded = sliding_window_inference(model, image, 8, mesh=mesh, **kwargs)
        host = sliding_window_inference(model, image, 8, mesh=mesh, output_on_host=True, **kwargs)
    assert model_programs(seen, "lowered") == 1, seen["lowered"]  # one sharded program for both
    np.testing.assert_allclose(np.asarray(sharded.data), np.asarray(single.data), atol=1e-6, rtol=0)
    np.testing.assert_allclose(host.data, np.asarray(single.data), atol=1e-6, rtol=0)
    labels = sliding_window_inference(model, image, 8, overlap=4, batch_size=2, mode="crop", argmax=True)
    probabilities = sliding_window_inference(model, image, 8, overlap=4, batch_size=2, mode="crop")
    np.testing.assert_array_equal(
        np.asarray(labels.data)[..., 0], np.argmax(np.asarray(probabilities.data), -1)
    )


def test_fresh_lambda_per_call_reads_its_own_closure():
    image = random_image((7, 6, 5), seed=42)
    with jax_programs() as seen:
        for scale in (2.0, 3.0):  # an array closed over: one program, the array is an argument
            weight = jnp.float32(scale)
            out = sliding_window_inference(lambda x: weight * x, image, 4, overlap=2)  # noqa: B023
            np.testing.assert_allclose(np.asarray(out.data), scale * image.data, rtol=1e-6)
    assert model_programs(seen, "lowered") == 1, seen["lowered"]
    for scale in (2.0, 3.0, 2.0):  # a Python number closed over is part of the program
        out = sliding_window_inference(lambda x: scale * x, image, 4, overlap=2)  # noqa: B023
        np.testing.assert_allclose(np.asarray(out.data), scale * image.data, rtol=1e-6)


def test_closure_rebound_is_not_stale():
    image = random_image((7, 6, 5), seed=43)
    scale = 2.0

    def predict(x):  # the same function object, its closure cell changes between calls
        return scale * x

    first = sliding_window_inference(predict, image, 4, overlap=2)
    scale = 5.0
    second = sliding_window_inference(predict, image, 4, overlap=2)
    np.testing.assert_allclose(np.asarray(first.data), 2 * image.data, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(second.data), 5 * image.data, rtol=1e-6)

    class Scaled:  # an object jmed cannot see into: compiled for each call
        def __init__(self, scale):
            self.scale = scale

        def __call__(self, x):
            return self.scale * x

    holder = Scaled(2.0)
    first = sliding_window_inference(lambda x: holder(x), image, 4, overlap=2)
    holder.scale = 7.0
    second = sliding_window_inference(lambda x: holder(x), image, 4, overlap=2)
    np.testing.assert_allclose(np.asarray(first.data), 2 * image.data, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(second.data), 7 * image.data, rtol=1e-6)


def test_flax_is_not_imported():
    # Flax is optional: a model can only be an NNX module once the caller imported flax.nnx
    import os
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "import sys, numpy as np, jmed\n"
        "image = jmed.ScalarImage(np.ones((5, 5, 5), np.float32))\n"
        "out = jmed.sliding_window_inference(lambda x: 2 * x, image, 4, overlap=2)\n"
        "assert float(out.data.mean()) == 2.0\n"
        "print('flax' in sys.modules)\n"
    )
    root = str(Path(__file__).resolve().parents[1])  # this checkout's jmed
    env = {**os.environ, "PYTHONPATH": root}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=root, env=env
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def test_model_description_round_trip():
    # what a program is keyed on, and the arrays passed to it
    from jmed.inference.model import _build, _split

    weight = jnp.arange(3.0)
    table = np.array([1.0, 2.0])

    def inner(x, *, bias=weight):
        return x * table[0] + bias

    def closure(*values):
        def predict(x):
            scale, shift, flag, zero, name, nothing, items, mapping, dtype = values
            out = inner(x) * scale + shift * flag + zero + len(name) + (nothing is None)
            return (out + items[0] + mapping["k"][0]).astype(dtype)

        return predict

    described = [
        functools.partial(inner, bias=weight),
        closure(2, 1.5, True, -0.0, "a", None, [weight], {"k": (weight,)}, jnp.float16),
    ]
    for function in described:
        arrays = []
        description = _split(function, arrays)
        hash(description)
        rebuilt = _build(description, iter(arrays))
        assert_trees_close(rebuilt(jnp.ones(3)), function(jnp.ones(3)))
    # equal but distinct values give distinct descriptions
    keys = {_split(lambda x: v * x, []) for v in (1, 1.0, True, 0.0, -0.0, np.float32(1))}  # noqa: B023
    assert len(keys) == 6

    # the same code (a fresh function from the same source) with other arrays: the same
    # description, the arrays differ
    def make(weight):
        return lambda x: weight * x

    first, second = [], []
    assert _split(make(weight), first) == _split(make(2 * weight), second)
    np.testing.assert_array_equal(second[0], 2 * first[0])


def test_public_signatures():
    import inspect

    signature = inspect.signature(sliding_window_inference)
    positional = [p.name for p in signature.parameters.values() if p.kind == p.POSITIONAL_OR_KEYWORD]
    assert positional == ["predict", "image", "patch_size"]
    assert all(p.kind == p.KEYWORD_ONLY for p in signature.parameters.values() if p.name not in positional)
    for name in ("sliding_window_inference", "GridSampler", "GridAggregator"):
        assert getattr(jmed, name) is getattr(jmed.inference, name)
        assert name in jmed.__all__ and name in jmed.inference.__all__
    assert jmed.grid_locations is jmed.sampling.grid_locations is jmed.inference.grid_locations


# --- the grid plan: one source of window positions -----------------------------------------------


@pytest.mark.parametrize(
    "shape, patch, overlap, factor",
    [
        ((9, 7, 6), (4, 4, 4), (2, 2, 2), (1, 1, 1)),
        ((13, 8, 96), (5, 3, 8), (2, 0, 3), (1, 1, 1)),
        ((12, 8, 16), (4, 8, 8), (2, 4, 4), (2, 2, 4)),
    ],
)
def test_plan_windows_are_grid_locations(shape, patch, overlap, factor):
    from jmed.inference.plan import _Plan

    plan = _Plan(shape, patch, overlap, factor, "hann")
    out = [s // f for s, f in zip(shape, factor)]
    q = [p // f for p, f in zip(patch, factor)]
    o = [v // f for v, f in zip(overlap, factor)]
    np.testing.assert_array_equal(plan.locations(), grid_locations(out, q, o) * np.asarray(factor))
    # a value: equal configurations are equal plans and key the same programs
    assert (
        plan == _Plan(shape, patch, overlap, factor, "hann") != _Plan(shape, patch, overlap, factor, "crop")
    )
    assert hash(plan) == hash(_Plan(shape, patch, overlap, factor, "hann"))
    sampler = GridSampler(random_image(shape), patch, overlap, downsampling=factor)
    np.testing.assert_array_equal(sampler.locations, plan.locations())


# --- accumulators ----------------------------------------------------------------------------------


def _spec(**changes):
    from jmed.inference import OutputSpec

    fields = dict(
        shape=(4, 4, 4),
        channels=2,
        dtype=np.dtype(np.float32),
        crop=((1, 3), (0, 4), (0, 2)),
        argmax=False,
        label_dtype=np.dtype(np.uint8),
        affine=np.diag([2.0, 1.0, 1.0, 1.0]),
        kind=jmed.INTENSITY,
    )
    return OutputSpec(**{**fields, **changes})


@pytest.mark.parametrize("argmax", [False, True])
@pytest.mark.parametrize("kind", ["device", "device-mesh", "host"])
def test_accumulator_hand_computed(kind, argmax):
    from jmed.inference import Accumulator, DeviceAccumulator, HostAccumulator

    spec = _spec(argmax=argmax, kind=jmed.LABEL if argmax else jmed.INTENSITY)
    if kind == "host":
        accumulator = HostAccumulator(spec)
    else:  # with a mesh: one block of rows per device, summed by finalize
        mesh = jax.make_mesh((2,), ("data",), devices=jax.devices()[:2]) if kind == "device-mesh" else None
        accumulator = DeviceAccumulator(spec, mesh=mesh)
    assert isinstance(accumulator, Accumulator)
    values = np.zeros((2, 2, 2, 2, 2), np.float32)
    values[0, ..., 0] = 1.0  # window A at (0, 0, 0): channel 0
    values[1, ..., 1] = 3.0  # window B at (1, 1, 1): channel 1
    accumulator.aggregate(values, np.array([[0, 0, 0], [1, 1, 1]]))
    expected = np.zeros((4, 4, 4, 2), np.float32)
    expected[0:2, 0:2, 0:2, 0] += 1.0
    expected[1:3, 1:3, 1:3, 1] += 3.0
    expected = expected[1:4, 0:4, 0:2]
    if argmax:
        expected = np.argmax(expected, -1)[..., None].astype(np.uint8)
    out = accumulator.finalize()
    assert isinstance(out, jmed.Image) and out.kind == spec.kind
    assert out.dtype == expected.dtype
    np.testing.assert_array_equal(np.asarray(out.data), expected)
    np.testing.assert_array_equal(np.asarray(out.affine), spec.affine)
    assert isinstance(out.data, np.ndarray) == (kind == "host")


class MemmapAccumulator:
    """An accumulator on disk (a numpy memmap), written against the public protocol only."""

    def __init__(self, spec, path):
        self.spec = spec
        self.windows = []
        self.data = np.memmap(path, dtype=spec.dtype, mode="w+", shape=(*spec.shape, spec.channels))

    def aggregate(self, values, starts):
        values, starts = np.asarray(values), np.asarray(starts)
        qx, qy, qz = values.shape[1:4]
        for (x, y, z), value in zip(starts, values):
            self.windows.append((int(x), int(y), int(z)))
            self.data[x : x + qx, y : y + qy, z : z + qz] += value

    def finalize(self):
        out = np.array(self.data[tuple(slice(lo, lo + n) for lo, n in self.spec.crop)])
        if self.spec.argmax:
            out = np.argmax(out, axis=-1)[..., None].astype(self.spec.label_dtype)
        return jmed.Image(out, self.spec.affine, kind=self.spec.kind)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(mode="hann"),
        dict(mode="gaussian", argmax=True),
        dict(mode="crop", argmax=True),
        dict(mode="average", accumulation_dtype=jnp.bfloat16),
        dict(mode="hann", mesh=2),
    ],
    ids=["hann", "gaussian-argmax", "crop-labels", "bfloat16", "mesh"],
)
def test_accumulator_factory_equals_host(tmp_path, kwargs):
    kwargs = dict(kwargs)
    if "mesh" in kwargs:
        kwargs["mesh"] = jax.make_mesh((2,), ("data",), devices=jax.devices()[:2])
    image = random_image((9, 7, 6), seed=50)
    made = []

    def factory(spec):
        made.append(MemmapAccumulator(spec, tmp_path / f"acc{len(made)}.dat"))
        return made[-1]

    host = sliding_window_inference(
        nonlinear, image, 4, overlap=2, batch_size=3, accumulator="host", **kwargs
    )
    disk = sliding_window_inference(
        nonlinear, image, 4, overlap=2, batch_size=3, accumulator=factory, **kwargs
    )
    device = sliding_window_inference(nonlinear, image, 4, overlap=2, batch_size=3, **kwargs)
    assert len(made) == 1
    spec = made[0].spec
    assert spec.shape == (9, 7, 6) and spec.crop == ((0, 9), (0, 7), (0, 6))
    assert spec.kind == host.kind and disk.kind == host.kind
    # every window of the grid exactly once, no dummy windows of the last batch
    assert sorted(made[0].windows) == sorted(map(tuple, grid_locations((9, 7, 6), 4, 2).tolist()))
    assert disk.dtype == host.dtype == device.dtype
    np.testing.assert_array_equal(np.asarray(disk.data), host.data)
    np.testing.assert_array_equal(np.asarray(disk.affine), np.asarray(host.affine))
    tolerance = 0 if kwargs.get("argmax") else 1e-6
    np.testing.assert_allclose(
        np.asarray(host.data, np.float32), np.asarray(device.data, np.float32), atol=tolerance
    )


@pytest.mark.parametrize("name", ["DeviceAccumulator", "HostAccumulator"])
def test_builtin_accumulators_as_factories(name):
    image = random_image((7, 6, 5), seed=57)
    kwargs = dict(overlap=2, batch_size=3, mode="crop", argmax=True)
    factory = getattr(jmed.inference, name)
    out = sliding_window_inference(nonlinear, image, 4, accumulator=factory, **kwargs)
    expected = sliding_window_inference(nonlinear, image, 4, **kwargs)
    assert out.kind == jmed.LABEL and out.dtype == np.uint8
    np.testing.assert_array_equal(np.asarray(out.data), np.asarray(expected.data))


def test_accumulator_factory_downsampling(tmp_path):
    affine = affine_lib.from_spacing((1.0, 2.0, 0.5), (10.0, -4.0, 3.0), "LPS")
    image = random_image((9, 8, 6), seed=51, affine=affine)
    made = []

    def factory(spec):
        made.append(MemmapAccumulator(spec, tmp_path / "acc.dat"))
        return made[-1]

    host = sliding_window_inference(_pool2, image, 4, overlap=2, batch_size=2, output_on_host=True)
    disk = sliding_window_inference(_pool2, image, 4, overlap=2, batch_size=2, accumulator=factory)
    assert made[0].spec.shape == (5, 4, 3)  # 9 padded to 10, halved
    np.testing.assert_array_equal(np.asarray(disk.data), host.data)
    np.testing.assert_allclose(np.asarray(disk.affine), np.asarray(host.affine))


def test_accumulator_argument_errors():
    image = random_image((5, 5, 5))
    with pytest.raises(ValueError, match=r"accumulator must be one of \('device', 'host'\), got 'disk'"):
        sliding_window_inference(identity, image, 4, accumulator="disk")
    with pytest.raises(TypeError, match="accumulator must be one of .* or a callable factory"):
        sliding_window_inference(identity, image, 4, accumulator=3)
    with pytest.raises(TypeError, match="accumulator factory must return an object with aggregate"):
        sliding_window_inference(identity, image, 4, accumulator=lambda spec: object())
    with pytest.raises(ValueError, match="output_on_host=True means accumulator='host'"):
        sliding_window_inference(identity, image, 4, accumulator=lambda spec: None, output_on_host=True)
    with pytest.raises(TypeError, match="progress must be True or False, got 'yes'"):
        sliding_window_inference(identity, image, 4, progress="yes")
    for kwargs, match in [
        (dict(output_on_host=True), "output_on_host=True cannot run under jax.jit"),
        (dict(accumulator="host"), "accumulator='host' cannot run under jax.jit"),
        (dict(progress=True), "progress=True cannot run under jax.jit"),
    ]:
        with pytest.raises(ValueError, match=match):
            jax.jit(lambda data: sliding_window_inference(identity, jmed.Image(data), 4, **kwargs).data)(  # noqa: B023
                image.data
            )
    with pytest.raises(TypeError, match="spec must be an OutputSpec"):
        jmed.inference.DeviceAccumulator((4, 4, 4))


def test_traced_parameters_without_jit_use_one_program():
    # under grad the image is concrete but predict closes over a tracer: the loop is traced
    image = random_image((6, 5, 4), seed=52)

    def loss(scale):
        return sliding_window_inference(lambda x: scale * x, image, 4, overlap=1).data.sum()

    np.testing.assert_allclose(jax.grad(loss)(jnp.float32(2.0)), image.data.sum(), rtol=1e-5)


def test_aggregator_output_twice_and_more_windows():
    image = random_image((6, 6, 6), seed=53)
    sampler = GridSampler(image, 4, 2)
    aggregator = GridAggregator(sampler, mode="average")
    batches = list(sampler.batches(4))
    aggregator.add_batch(*batches[0])
    first = np.asarray(aggregator.get_output().data)
    np.testing.assert_array_equal(np.asarray(aggregator.get_output().data), first)
    for patches, locations in batches[1:]:
        aggregator.add_batch(patches, locations)
    np.testing.assert_allclose(np.asarray(aggregator.get_output().data), image.data, atol=1e-6)


# --- progress ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("accumulator", ["device", "host"])
def test_progress_bar(capfd, accumulator):
    image = random_image((9, 7, 6), seed=54)
    kwargs = dict(overlap=2, batch_size=4, mode="gaussian", accumulator=accumulator)
    quiet = sliding_window_inference(nonlinear, image, 4, **kwargs)
    assert capfd.readouterr().err == ""
    with jax_programs() as seen:
        shown = sliding_window_inference(nonlinear, image, 4, progress=True, **kwargs)
    assert seen["lowered"] == [], seen["lowered"]  # the bar compiles nothing
    err = capfd.readouterr().err
    total = len(grid_locations((9, 7, 6), 4, 2))  # 4 * 3 * 2 windows in 6 batches
    assert "sliding window" in err and f"{total}/{total}" in err, err
    np.testing.assert_array_equal(np.asarray(shown.data), np.asarray(quiet.data))


def test_progress_bar_device_accumulator_reads_nothing_back(capfd, monkeypatch):
    image = random_image((9, 7, 6), seed=55)
    data = jax.device_put(image.data)
    sliding_window_inference(nonlinear, image.replace(data=data), 4, overlap=2, batch_size=4)  # compile
    # advancing the bar per dispatched batch needs no value from the device: count every
    # read of a device array's value in the inference modules (np.asarray / np.array of a jax
    # array, and .item()/int()/float()/tolist() through _value); a transfer guard does not
    # fire on CPU
    import types

    import jmed._progress
    from jmed.inference import accumulators, grid, plan, sliding_window

    reads = []

    def counted(convert):
        def read(x, *args, **kwargs):
            if isinstance(x, jax.Array):
                reads.append(convert.__name__)
            return convert(x, *args, **kwargs)

        return read

    counting_numpy = types.SimpleNamespace(**{k: getattr(np, k) for k in dir(np) if not k.startswith("__")})
    counting_numpy.asarray, counting_numpy.array = counted(np.asarray), counted(np.array)
    for module in (accumulators, grid, plan, sliding_window, jmed._progress):
        if hasattr(module, "np"):
            monkeypatch.setattr(module, "np", counting_numpy)
    array_type = type(jnp.zeros(1))
    value = array_type._value

    def counted_value(self):
        reads.append("_value")
        return value.fget(self)

    monkeypatch.setattr(array_type, "_value", property(counted_value))
    sliding_window.np.asarray(jnp.ones(2)), int(jnp.ones(1)[0])  # the counters work
    assert reads == ["asarray", "_value"], reads
    reads.clear()
    out = sliding_window_inference(
        nonlinear, image.replace(data=data), 4, overlap=2, batch_size=4, progress=True
    )
    assert not reads, reads
    monkeypatch.undo()
    total = len(grid_locations((9, 7, 6), 4, 2))
    assert f"{total}/{total}" in capfd.readouterr().err
    expected = sliding_window_inference(nonlinear, image, 4, overlap=2, batch_size=4)
    np.testing.assert_array_equal(np.asarray(out.data), np.asarray(expected.data))


def test_grid_sampler_progress(capfd):
    image = random_image((6, 5, 7), seed=56)
    sampler = GridSampler(image, 4, 2)
    quiet = [np.asarray(p) for p, _ in sampler.batches(4)]
    assert capfd.readouterr().err == ""
    shown = [np.asarray(p) for p, _ in sampler.batches(4, progress=True)]
    err = capfd.readouterr().err
    assert f"{len(sampler)}/{len(sampler)}" in err, err
    for a, b in zip(quiet, shown):
        np.testing.assert_array_equal(a, b)
    assert sum(len(p) for p, _ in sampler.batches(4, drop_remainder=True)) == len(sampler) // 4 * 4


# --- sharding ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_devices", [1, 2, 4, 8])
def test_sharded_equals_single_device(num_devices):
    image = random_image((8, 7, 6), seed=12)
    kwargs = dict(overlap=2, batch_size=2, mode="hann")
    single = sliding_window_inference(nonlinear, image, 4, **kwargs)
    mesh = jax.make_mesh((num_devices,), ("data",), devices=jax.devices()[:num_devices])
    sharded = sliding_window_inference(nonlinear, image, 4, mesh=mesh, **kwargs)
    np.testing.assert_allclose(np.asarray(sharded.data), np.asarray(single.data), atol=1e-6, rtol=0)
    if num_devices == 8:
        host = sliding_window_inference(nonlinear, image, 4, mesh=mesh, output_on_host=True, **kwargs)
        np.testing.assert_allclose(host.data, np.asarray(single.data), atol=1e-6, rtol=0)


def test_sharded_2d_mesh_named_axis():
    image = random_image((10, 9, 7), seed=13)
    single = sliding_window_inference(nonlinear, image, 4, overlap=2, batch_size=2, mode="crop", argmax=True)
    mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))
    for axis_name in ("model", ("data", "model")):
        sharded = sliding_window_inference(
            nonlinear,
            image,
            4,
            overlap=2,
            batch_size=2,
            mode="crop",
            argmax=True,
            mesh=mesh,
            axis_name=axis_name,
        )
        np.testing.assert_array_equal(np.asarray(sharded.data), np.asarray(single.data))


# --- GridSampler / GridAggregator ------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_aggregator_matches_sliding_window(mode):
    image = random_image((9, 7, 10), seed=14)
    sampler = GridSampler(image, (4, 5, 4), (2, 2, 1))
    aggregator = GridAggregator(sampler, mode=mode)
    assert len(sampler) == 24
    for patches, locations in sampler.batches(6):
        # TorchIO layout: (start, end) per axis
        aggregator.add_batch(nonlinear(patches), np.concatenate([locations, locations + (4, 5, 4)], 1))
    expected = sliding_window_inference(
        nonlinear, image, (4, 5, 4), overlap=(2, 2, 1), batch_size=4, mode=mode
    )
    assert_trees_close(aggregator.get_output(), expected, atol=1e-6)


def test_sampler_patches():
    image = random_image((6, 5, 7), seed=15)
    sampler = GridSampler(image, 4, 1, padding_mode="edge")
    assert len(sampler) == len(grid_locations((6, 5, 7), 4, 1))
    x, y, z = sampler.locations[3]
    np.testing.assert_array_equal(
        np.asarray(sampler[3]), np.asarray(image.data)[x : x + 4, y : y + 4, z : z + 4]
    )
    small = GridSampler(image, 8, 2, padding_mode="edge")  # padded to 8 along every axis
    assert small.padded.shape == (8, 8, 8, 1) and len(small) == 1


# --- errors ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(patch_size=4, overlap=4), "overlap must be smaller than patch_size"),
        (dict(patch_size=(4, 0, 4)), "patch_size values must be >= 1"),
        (dict(patch_size=(4, 4)), "patch_size must be an int or 3 ints"),
        (dict(patch_size=4, overlap=-1), "overlap values must be >= 0"),
        (dict(patch_size=4, batch_size=0), "batch_size must be an integer >= 1"),
        (dict(patch_size=4, mode="max"), "mode must be one of"),
        (dict(patch_size=4, padding_mode="wrap"), "padding_mode must be one of"),
    ],
)
def test_bad_configuration(kwargs, match):
    image = random_image((5, 5, 5))
    with pytest.raises(ValueError, match=match):
        sliding_window_inference(identity, image, **kwargs)


def test_bad_mesh_axis():
    mesh = jax.make_mesh((2,), ("data",), devices=jax.devices()[:2])
    with pytest.raises(ValueError, match=r"axis_name 'batch' is not an axis of the mesh.*\('data',\)"):
        sliding_window_inference(identity, random_image((5, 5, 5)), 4, mesh=mesh, axis_name="batch")
    with pytest.raises(TypeError, match="mesh must be a jax.sharding.Mesh"):
        sliding_window_inference(identity, random_image((5, 5, 5)), 4, mesh="data")


@pytest.mark.parametrize(
    "predict",
    [
        lambda x: x[:, :3],  # 3 does not divide 4
        lambda x: x[0],  # no batch axis
        lambda x: jnp.concatenate([x, x], axis=1),  # larger than the patch
    ],
)
def test_predict_wrong_shape(predict):
    with pytest.raises(ValueError, match=r"predict must return \(batch, x, y, z, channels\).*got shape"):
        sliding_window_inference(predict, random_image((5, 5, 5)), 4, batch_size=2)


def test_bad_types():
    with pytest.raises(TypeError, match="image must be a jmed.Image"):
        sliding_window_inference(identity, np.zeros((5, 5, 5, 1)), 4)
    with pytest.raises(TypeError, match="accumulation_dtype must be a floating dtype"):
        sliding_window_inference(identity, random_image((5, 5, 5)), 4, accumulation_dtype=jnp.int32)
    with pytest.raises(ValueError, match=r"patch_size \(4, 4, 4\) is larger than the volume \(3, 5, 5\)"):
        grid_locations((3, 5, 5), 4)


def test_aggregator_errors():
    sampler = GridSampler(random_image((6, 6, 6)), 4, 2)
    aggregator = GridAggregator(sampler)
    with pytest.raises(ValueError, match="no batch has been added"):
        aggregator.get_output()
    patches, locations = next(sampler.batches(2))
    with pytest.raises(ValueError, match="locations must have shape"):
        aggregator.add_batch(patches, locations[:1])
    with pytest.raises(ValueError, match="locations must be window starts of the sampler's grid"):
        aggregator.add_batch(patches, locations + 1)
    with pytest.raises(ValueError, match="expected"):
        aggregator.add_batch(patches[:, :2, :2, :2], locations)
    with pytest.raises(ValueError, match="must be divisible by downsampling"):
        GridSampler(random_image((6, 6, 6)), 4, 1, downsampling=2)


# --- optional comparison with TorchIO ----------------------------------------------------------------


@pytest.mark.parametrize("mode", ["average", "crop"])
def test_matches_torchio_aggregator(mode):
    torch = pytest.importorskip("torch")
    tio = pytest.importorskip("torchio")
    # a regular grid (every stride equal) where both libraries define crop the same way
    image = random_image((10, 8, 6), seed=18)
    patch, overlap = (4, 4, 4), (2, 2, 2)
    tensor = torch.from_numpy(np.moveaxis(np.asarray(image.data), -1, 0).copy())
    sampler = tio.inference.GridSampler(tio.Subject(t1=tio.ScalarImage(tensor=tensor)), patch, overlap)
    aggregator = tio.inference.GridAggregator(sampler, overlap_mode=mode)
    for index in range(len(sampler)):
        patch_subject = sampler[index]
        data = patch_subject["t1"][tio.DATA][None]
        mean = data.mean(dim=(2, 3, 4), keepdim=True)
        aggregator.add_batch(data * mean, patch_subject[tio.LOCATION][None])
    expected = np.moveaxis(aggregator.get_output_tensor().numpy(), 0, -1)

    def predict(x):
        return x * x.mean(axis=(1, 2, 3), keepdims=True)

    out = sliding_window_inference(predict, image, patch, overlap=overlap, batch_size=4, mode=mode)
    np.testing.assert_allclose(np.asarray(out.data), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(mode="hann"),
        dict(mode="gaussian", argmax=True),
        dict(mode="crop", argmax=True),
        dict(mode="average", pad_borders=True),
    ],
    ids=["hann", "gaussian-argmax", "crop-labels", "padded"],
)
def test_chunked_accumulator_writes_the_host_output(tmp_path, kwargs):
    pytest.importorskip("zarr")
    image = random_image((11, 9, 7), seed=61)
    path = tmp_path / "out.nii.zarr"
    factory = jmed.ChunkedAccumulator.at(path, chunks=(4, 5, 3))
    host = sliding_window_inference(
        nonlinear, image, 4, overlap=2, batch_size=3, accumulator="host", **kwargs
    )
    disk = sliding_window_inference(
        nonlinear, image, 4, overlap=2, batch_size=3, accumulator=factory, **kwargs
    )
    assert not disk.is_loaded and disk.kind == host.kind
    np.testing.assert_array_equal(np.asarray(disk.data), np.asarray(host.data))
    np.testing.assert_allclose(np.asarray(disk.affine), np.asarray(host.affine), atol=1e-6)
    reread = jmed.load(path, kind=host.kind)
    np.testing.assert_array_equal(np.asarray(reread.data), np.asarray(host.data))
    # only the store is left beside it: no scratch or temporary folders
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.nii.zarr"]


def test_chunked_accumulator_refuses_to_overwrite(tmp_path):
    pytest.importorskip("zarr")
    image = random_image((6, 6, 5), seed=62)
    path = tmp_path / "out.nii.zarr"
    sliding_window_inference(nonlinear, image, 4, accumulator=jmed.ChunkedAccumulator.at(path))
    with pytest.raises(FileExistsError, match="out.nii.zarr"):
        sliding_window_inference(nonlinear, image, 4, accumulator=jmed.ChunkedAccumulator.at(path))
    out = sliding_window_inference(
        nonlinear, image, 4, accumulator=jmed.ChunkedAccumulator.at(path, overwrite=True)
    )
    expected = sliding_window_inference(nonlinear, image, 4, accumulator="host")
    np.testing.assert_array_equal(np.asarray(out.data), np.asarray(expected.data))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.nii.zarr"]


def test_chunked_accumulator_stores_16_bit_floats_as_float32(tmp_path):
    pytest.importorskip("zarr")
    image = random_image((11, 9, 7), seed=63)
    kwargs = dict(overlap=2, batch_size=3, mode="average", accumulation_dtype=jnp.bfloat16)
    disk = sliding_window_inference(
        nonlinear, image, 4, accumulator=jmed.ChunkedAccumulator.at(tmp_path / "o.nii.zarr"), **kwargs
    )
    exact = sliding_window_inference(nonlinear, image, 4, overlap=2, batch_size=3, mode="average")
    assert disk.dtype == np.float32
    # bfloat16 windows summed in float32: within bfloat16's rounding of the exact average
    np.testing.assert_allclose(np.asarray(disk.data), np.asarray(exact.data), rtol=2**-7, atol=2**-7)
    labels = sliding_window_inference(
        nonlinear,
        image,
        4,
        argmax=True,
        accumulator=jmed.ChunkedAccumulator.at(tmp_path / "s.nii.zarr"),
        **kwargs,
    )
    host = sliding_window_inference(nonlinear, image, 4, argmax=True, accumulator="host", **kwargs)
    assert (np.asarray(labels.data) == np.asarray(host.data)).mean() > 0.99
