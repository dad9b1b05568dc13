"""Every transform, and the device pipeline, on a batch sharded over 8 devices.

Each transform of ``test_properties.CASES`` runs as ``vmap(t)(keys, batch)`` on a batch
of 8 subjects (float32 ``t1``, uint8 ``seg``, each with its own affine) in four ways:

* ``reference``: ``jit(vmap(t))`` on one device, unsharded, run on one sample at a time;
* ``auto``: ``jit(vmap(t))`` with keys and batch put ``NamedSharding(mesh, P("data"))``
  on a mesh of 8 devices with an ``Auto`` axis;
* ``explicit``: the same on an ``Explicit`` axis (the default of ``jax.make_mesh``),
  inside ``jax.set_mesh``;
* ``shard_map_auto`` and ``shard_map_explicit``: ``shard_map(vmap(t), in_specs=P("data"),
  out_specs=P("data"))`` on either mesh.

Results (images, affines and recorded params) must equal the reference bit for bit:
every sample is computed independently, so sharding the batch changes nowhere which
operations run on a sample's values. The reference runs one sample at a time because
that is what each device holds: XLA:CPU may sum a float32 reduction in another order
for a batch of 8 than for a batch of 1 (``ZNormalization`` and ``RandomContrast`` then
differ in the last bit), which is not an effect of sharding. It is compiled, not run
op by op, because the sharded programs are compiled too (eager ``vmap`` against a loop
over samples is checked by each module's own tests).

Sharded programs keep the batch where it is: the compiled ``auto`` and ``explicit``
programs hold no collective (except those listed in ``COMMUNICATES``, with the reason),
and the voxels output by the ``explicit`` program are typed sharded over ``data``.
Transforms that cannot run on traced values are listed in ``REFUSALS`` and
``EAGER_OR_TRACEABLE`` and must refuse with their documented error in every mode; none
is skipped.
"""

from __future__ import annotations

import functools
import re

import jax
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P
from test_properties import ABSTRACT, CASES, ORIENTATIONS, make_transform

import jmed
import jmed.transforms as T
from jmed.affine import from_spacing

NUM_DEVICES = 8
SHAPE = (17, 15, 13)
# RandomRot90 in the (0, 1) plane needs equal extents there (else it refuses)
SQUARE_SHAPE = (15, 15, 13)

pytestmark = pytest.mark.skipif(
    jax.device_count() < NUM_DEVICES, reason=f"needs {NUM_DEVICES} devices (tests/conftest.py emulates them)"
)

# Transforms that refuse traced values, with the error they must raise under jit/vmap.
# The output shape of these follows from header or voxel values (DESIGN: run them in the
# loader before batching).
REFUSALS = {
    "CropForeground": (TypeError, "needs concrete values"),
    "Reorient": (TypeError, "needs concrete values"),
    "ToCanonical": (TypeError, "needs concrete values"),
}
# Connected-component label post-processing either runs on device under jit (then it
# must match like every other transform) or refuses traced values with an error that
# says to call it eagerly; both are allowed, the same in every mode.
EAGER_OR_TRACEABLE = {
    "FillHoles": "eager",
    "KeepLargestComponent": "eager",
    "RemoveSmallObjects": "eager",
}
NAMES = sorted(n for n in CASES if n not in ABSTRACT)
MODES = ("auto", "explicit", "shard_map_auto", "shard_map_explicit")
COLLECTIVES = re.compile(
    r"= (\S+) (all-gather|all-reduce|all-to-all|collective-permute|reduce-scatter)(?:-start)?\("
)
# Programs that communicate across devices although every sample is independent. Their
# results are still compared; only the "no collective" check is left out, for the reason
# given.
COMMUNICATES = {
    "RandomMotion": "XLA's SPMD partitioner does not split FFTs along batch axes: it all-gathers "
    "the batch, transforms all of it on every device and keeps its slice (shard_map avoids it)",
    "RandomSpike": "FFTs, as RandomMotion",
}

try:  # jax >= 0.6
    _shard_map = jax.shard_map
except AttributeError:  # pragma: no cover - older jax
    from jax.experimental.shard_map import shard_map as _shard_map


def _set_mesh(mesh):
    if hasattr(jax, "set_mesh"):
        return jax.set_mesh(mesh)
    return jax.sharding.use_mesh(mesh)  # pragma: no cover - jax before set_mesh


def make_batch(shape, *, seed=0):
    """8 subjects of one shape, each with its own spacing, origin and orientation."""
    rng = np.random.default_rng(seed)
    subjects = []
    for i in range(NUM_DEVICES):
        affine = from_spacing(
            rng.choice([0.8, 1.0, 1.5], size=3).tolist(),
            rng.integers(-20, 20, size=3).tolist(),
            ORIENTATIONS[(7 * i) % len(ORIENTATIONS)],
        )
        intensity = rng.normal(50.0, 20.0, (*shape, 1)).astype(np.float32)
        labels = rng.integers(0, 3, (*shape, 1)).astype(np.uint8)
        subjects.append(
            jmed.Subject(
                t1=jmed.Image(intensity, affine, kind="intensity"),
                seg=jmed.Image(labels, affine, kind="label"),
            )
        )
    return subjects


@functools.cache
def batch_of(shape):
    subjects = make_batch(shape)
    keys = jax.random.split(jax.random.key(42), NUM_DEVICES)
    return subjects, keys, jmed.stack(subjects)


@functools.cache
def meshes():
    devices = jax.devices()[:NUM_DEVICES]
    return {
        "auto": jax.make_mesh((NUM_DEVICES,), ("data",), axis_types=(AxisType.Auto,), devices=devices),
        "explicit": jax.make_mesh(
            (NUM_DEVICES,), ("data",), axis_types=(AxisType.Explicit,), devices=devices
        ),
    }


def shard(tree, mesh):
    return jax.device_put(tree, NamedSharding(mesh, P("data")))


def assert_equal_trees(actual, expected, what):
    a_leaves, a_tree = jax.tree.flatten(actual)
    e_leaves, e_tree = jax.tree.flatten(expected)
    assert a_tree == e_tree, f"{what}: structures differ: {a_tree} vs {e_tree}"
    for i, (a, e) in enumerate(zip(a_leaves, e_leaves)):
        a, e = np.asarray(a), np.asarray(e)
        assert a.dtype == e.dtype, f"{what}: leaf {i} dtype {a.dtype} != {e.dtype}"
        np.testing.assert_array_equal(a, e, err_msg=f"{what}: leaf {i} of {e_tree}")


def check_sharded_outputs(out, what):
    """The voxels of an Explicit-mesh program's output are typed sharded over the batch.

    (Affines and recorded params that do not depend on the sample, such as a target grid
    or a crop window, are broadcast constants: replicated, not sharded.)"""
    for name, image in out.items():
        spec = image.data.sharding.spec
        assert len(spec) >= 1 and spec[0] == "data", f"{what}: {name} has sharding {spec}"


def check_no_collectives(compiled, what):
    """No data moves between devices. A boolean all-reduce is allowed: a while loop whose
    trip count differs per sample runs under ``vmap`` until every sample is done, and the
    devices agree on that once per iteration."""
    found = sorted(
        {
            f"{m.group(2)} {m.group(1)}"
            for m in COLLECTIVES.finditer(compiled.as_text())
            if m.group(1) != "pred[]"
        }
    )
    assert not found, f"{what}: the sharded program communicates across devices: {found}"


def run_mode(fn, keys, batch, mode, *, communicates=False):
    """``vmap(fn)(keys, batch)`` with the batch axis sharded as ``mode`` says."""
    mapped = jax.vmap(fn)
    if mode == "reference":
        # one program, run on one sample at a time: the part of the batch each device holds
        program = jax.jit(mapped)
        parts = [
            program(keys[i : i + 1], jax.tree.map(lambda x, i=i: x[i : i + 1], batch))
            for i in range(NUM_DEVICES)
        ]
        return jax.tree.map(lambda *xs: np.concatenate(xs), *parts)
    if mode.startswith("shard_map_"):
        mesh = meshes()[mode.removeprefix("shard_map_")]
        args = shard((keys, batch), mesh)
        with _set_mesh(mesh):
            return jax.jit(_shard_map(mapped, mesh=mesh, in_specs=P("data"), out_specs=P("data")))(*args)
    mesh = meshes()[mode]
    args = shard((keys, batch), mesh)
    with _set_mesh(mesh):
        compiled = jax.jit(mapped).lower(*args).compile()
    if not communicates:
        check_no_collectives(compiled, mode)
    out = compiled(*args)
    if mode == "explicit":
        check_sharded_outputs(out, mode)
    return out


def transform_for(name):
    shape = SQUARE_SHAPE if name == "RandomRot90" else SHAPE
    subjects, keys, batch = batch_of(shape)
    return make_transform(name, subjects[0]), keys, batch


@functools.cache
def reference(name):
    """The unsharded result, or the exception it raised."""
    transform, keys, batch = transform_for(name)
    try:
        return jax.block_until_ready(run_mode(transform, keys, batch, "reference"))
    except Exception as err:  # noqa: BLE001 - compared with the sharded runs below
        return err


def expected_refusal(name):
    if name in REFUSALS:
        return REFUSALS[name]
    if name in EAGER_OR_TRACEABLE:
        ref = reference(name)
        if isinstance(ref, Exception):
            return (TypeError, ValueError), EAGER_OR_TRACEABLE[name]
    return None


def test_listed_exceptions_are_transforms_of_the_sweep():
    assert set(REFUSALS) | set(EAGER_OR_TRACEABLE) | set(COMMUNICATES) <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_reference_runs_or_refuses_as_documented(name):
    """The unsharded program runs, or refuses with the documented error."""
    ref = reference(name)
    refusal = expected_refusal(name)
    if refusal is None:
        if isinstance(ref, Exception):
            raise ref
        return
    errors, pattern = refusal
    assert isinstance(ref, errors), f"{name}: expected {errors}, got {ref!r}"
    assert re.search(pattern, str(ref), re.IGNORECASE), f"{name}: message {str(ref)!r} lacks {pattern!r}"


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", NAMES)
def test_sharded_batch_equals_unsharded(name, mode):
    transform, keys, batch = transform_for(name)
    refusal = expected_refusal(name)
    if refusal is not None:
        errors, pattern = refusal
        with pytest.raises(errors, match=re.compile(pattern, re.IGNORECASE)):
            run_mode(transform, keys, batch, mode)
        return
    ref = reference(name)
    if isinstance(ref, Exception):
        pytest.fail(f"{name}: the unsharded reference fails: {ref!r}")
    out = run_mode(transform, keys, batch, mode, communicates=name in COMMUNICATES)
    assert_equal_trees(out, ref, f"{name} ({mode})")


# --- the device pipeline: augment_and_sample with label-balanced patches ------------------

PATCH = (7, 7, 5)
NUM_PATCHES = 3
LABEL_WEIGHTS = {0: 1, 1: 2, 2: 2}
PIPELINE_KEY = 7


def pipeline():
    # flip, affine and elastic fuse into one resampling
    augmentation = T.Compose(
        [
            T.RandomFlip(axes=(0, 1, 2)),
            T.RandomAffine(scales=0.1, degrees=10, translation=2),
            T.RandomElasticDeformation(num_control_points=5, max_displacement=2.0),
        ]
    )
    sampler = jmed.LabelSampler(PATCH, "seg", LABEL_WEIGHTS)
    return functools.partial(
        jmed.augment_and_sample, sampler=sampler, num_patches=NUM_PATCHES, augmentation=augmentation
    )


@functools.cache
def pipeline_reference(per_volume):
    """Unsharded: the whole batch with one key (``per_volume=False``), or each volume alone
    with its own key, as each device holds it under ``shard_map``."""
    subjects, keys, batch = batch_of(SHAPE)
    program = jax.jit(pipeline())
    if not per_volume:
        return jax.block_until_ready(program(jax.random.key(PIPELINE_KEY), batch))
    alone = [program(keys[i], jmed.stack([subjects[i]])) for i in range(NUM_DEVICES)]
    return jax.tree.map(lambda *xs: np.concatenate(xs), *alone)


def test_pipeline_reference_is_patches_of_labels():
    """Guards the comparisons below: patches of the requested size inside the volume, label
    patches holding labels of the input."""
    ref = pipeline_reference(False)
    locations = np.asarray(ref.metadata["location"])
    assert locations.shape == (NUM_DEVICES * NUM_PATCHES, 6)
    np.testing.assert_array_equal(
        locations[:, 3:] - locations[:, :3], np.broadcast_to(PATCH, (len(locations), 3))
    )
    assert np.all(locations[:, :3] >= 0) and np.all(locations[:, 3:] <= SHAPE)
    seg = np.asarray(ref["seg"].data)
    assert seg.shape == (NUM_DEVICES * NUM_PATCHES, *PATCH, 1)
    assert set(np.unique(seg).tolist()) <= set(LABEL_WEIGHTS)


@pytest.mark.parametrize("mode", ["auto", "explicit"])
def test_augment_and_sample_of_a_sharded_batch_under_jit(mode):
    """The documented use: one key, the batch sharded over the devices; equal to the same
    program on one device, and no data moves between devices."""
    _, _, batch = batch_of(SHAPE)
    mesh = meshes()[mode]
    args = (jax.random.key(PIPELINE_KEY), shard(batch, mesh))
    with _set_mesh(mesh):
        compiled = jax.jit(pipeline()).lower(*args).compile()
        check_no_collectives(compiled, mode)
        out = compiled(*args)
    if mode == "explicit":
        check_sharded_outputs(out, mode)
    assert_equal_trees(out, pipeline_reference(False), f"augment_and_sample ({mode})")


def test_augment_and_sample_under_shard_map():
    """Each device runs ``augment_and_sample`` on its volume with its key; equal to each
    volume alone."""
    _, keys, batch = batch_of(SHAPE)
    mesh = meshes()["explicit"]
    args = shard((keys, batch), mesh)

    def local(k, b):
        return pipeline()(k[0], b)

    with _set_mesh(mesh):
        out = jax.jit(_shard_map(local, mesh=mesh, in_specs=P("data"), out_specs=P("data")))(*args)
    assert_equal_trees(out, pipeline_reference(True), "augment_and_sample (shard_map)")
