"""Shared test scaffolding.

``run`` runs a case three ways (eager, under ``jax.jit``, under ``jax.vmap`` over a batch
of 2 with per-sample keys ``key`` and ``fold_in(key, 1)``). In vmap mode it also checks
that each batch item equals the eager result for its own key, then returns the first item
(the one for ``key``); in jit mode it checks the jitted result against the eager one. A
test written once thus checks eager = jit = vmap-per-sample, values and dtypes.
"""

import os
import tempfile

# emulate 8 CPU devices for sharding tests; must happen before jax initialises
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# loaders keep compiled programs in a folder of this test run, not in the user's cache
os.environ.setdefault("JMED_COMPILATION_CACHE", tempfile.mkdtemp(prefix="jmed-xla-"))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import jmed  # noqa: E402


def _assert_arrays_close(a, e, atol, rtol, what="leaf"):
    a, e = np.asarray(a), np.asarray(e)
    assert a.shape == e.shape, f"{what}: shapes differ: {a.shape} vs {e.shape}"
    assert a.dtype == e.dtype, f"{what}: dtypes differ: {a.dtype} vs {e.dtype}"
    if np.issubdtype(a.dtype, np.integer) or a.dtype == bool:
        np.testing.assert_array_equal(a, e, err_msg=what)
    else:
        np.testing.assert_allclose(a, e, atol=atol, rtol=rtol, err_msg=what)


def assert_trees_close(actual, expected, atol=1e-5, rtol=1e-5):
    """Equal structure, shapes and dtypes; values within tolerance (integers exactly).

    An image's affine is float64 on the host and float32 inside a trace (JAX without x64):
    affines are compared by value only; image data, extents and every other leaf by dtype
    too.
    """
    is_image = lambda x: isinstance(x, jmed.Image)
    a_leaves, a_tree = jax.tree.flatten(actual, is_leaf=is_image)
    e_leaves, e_tree = jax.tree.flatten(expected, is_leaf=is_image)
    assert a_tree == e_tree, f"structures differ: {a_tree} vs {e_tree}"
    for i, (a, e) in enumerate(zip(a_leaves, e_leaves)):
        if not is_image(a):
            _assert_arrays_close(a, e, atol, rtol, f"leaf {i}")
            continue
        assert a.kind == e.kind, (a.kind, e.kind)
        _assert_arrays_close(a.data, e.data, atol, rtol, f"image {i} data")
        np.testing.assert_allclose(
            np.asarray(a.affine, np.float64), np.asarray(e.affine, np.float64), atol=1e-5
        )
        assert (a.extent is None) == (e.extent is None), "extents differ"
        if a.extent is not None:
            np.testing.assert_array_equal(np.asarray(a.extent), np.asarray(e.extent))


class Runner:
    def __init__(self, mode):
        self.mode = mode

    def __call__(self, fn, key, data, *, atol=1e-5, rtol=1e-5):
        if self.mode == "eager":
            return fn(key, data)
        if self.mode == "jit":
            out = jax.jit(fn)(key, data)
            assert_trees_close(out, fn(key, data), atol=atol, rtol=rtol)
            return out
        batch = jmed.stack([data, data])
        if key is None:
            out = jax.vmap(fn, in_axes=(None, 0))(None, batch)
            keys = [None, None]
        else:
            keys = jax.numpy.stack([key, jax.random.fold_in(key, 1)])
            out = jax.vmap(fn)(keys, batch)
        first, second = jmed.unstack(out)
        assert_trees_close(second, fn(keys[1], data), atol=atol, rtol=rtol)
        assert_trees_close(first, fn(keys[0], data), atol=atol, rtol=rtol)
        return first

    def __repr__(self):
        return self.mode


@pytest.fixture(params=["eager", "jit", "vmap"])
def run(request):
    """Run ``fn(key, data)`` eager, jitted, or vmapped (see module docstring)."""
    return Runner(request.param)


@pytest.fixture
def key():
    return jax.random.key(0)


def make_phantom(shape=(24, 20, 16), affine=None, *, seed=0, num_labels=3):
    """A smooth random intensity image and a label map of nested ellipsoids."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"), -1)
    radius = np.sqrt((grid**2 / np.array([0.8, 0.7, 0.9]) ** 2).sum(-1))
    labels = np.zeros(shape, np.uint8)
    for i in range(1, num_labels):
        labels[radius < 1.0 - (i - 1) * 0.8 / max(num_labels - 1, 1)] = i
    intensity = (labels * 100.0 + 20 * rng.standard_normal(shape) + 10 * grid[..., 0]).astype(np.float32)
    return jmed.Subject(t1=jmed.ScalarImage(intensity, affine), seg=jmed.LabelMap(labels, affine))


@pytest.fixture
def phantom():
    return make_phantom()
