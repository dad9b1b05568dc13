import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import nibabel as nib
import numpy as np
import pytest
from _loader_helpers import assert_batches_equal as _assert_batches_equal
from _loader_helpers import collect as _collect
from _processes import free_port, run_together
from absl import flags

import jmed
import jmed.data
from jmed.data.load_and_sample import _to_device_layout
from jmed.sampling import LabelSampler, UniformSampler
from jmed.transforms import IntensityTransform

if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()

SHAPE = (10, 9, 8)
NUM_SUBJECTS = 5


class Scale(IntensityTransform):
    """Deterministic: multiply intensities by ``factor``."""

    def __init__(self, factor):
        super().__init__()
        self.factor = factor

    def apply_image(self, image, params):
        return image.replace(data=image.data * self.factor)


class AddNoise(IntensityTransform):
    """Random: add uniform noise in [0, 1) to intensities."""

    is_random = True

    def sample(self, key, subject):
        return jax.random.uniform(key, subject.spatial_shape)[..., None]

    def apply_image(self, image, params):
        return image.replace(data=image.data + params)


def _affine(i):
    return jmed.affine.from_spacing((1.0, 1.5, 2.0), (i, -3.0, 4.0), "LPS")


def _write_subjects(folder, n=NUM_SUBJECTS):
    records = []
    for i in range(n):
        rng = np.random.default_rng(i)
        t1 = rng.standard_normal(SHAPE).astype(np.float32) + 10 * i
        seg = np.zeros(SHAPE, np.uint8)
        seg[3:7, 2:6, 2:5] = 1
        seg[5, 4, 3] = 2
        nib.save(nib.Nifti1Image(t1, _affine(i)), folder / f"t1_{i}.nii.gz")
        nib.save(nib.Nifti1Image(seg, _affine(i)), folder / f"seg_{i}.nii.gz")
        records.append(
            {
                "t1": str(folder / f"t1_{i}.nii.gz"),
                "seg": folder / f"seg_{i}.nii.gz",
                "age": 40 + i,
                "diagnosis": "AD" if i % 2 else "CN",
            }
        )
    return records


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    return _write_subjects(tmp_path_factory.mktemp("subjects"))


# shared instances: the jitted worker function is cached per (augmentation, sampler)
SAMPLER = LabelSampler(4, "seg", {0: 1, 1: 1, 2: 1})
NOISE = AddNoise()


def _queue(records, **kw):
    options = dict(
        sampler=SAMPLER,
        samples_per_volume=3,
        max_length=7,
        batch_size=4,
        seed=7,
        label_names="seg",
        preprocessing=Scale(2.0),
        augmentation=NOISE,
        shard_index=0,
        shard_count=1,
    )
    options.update(kw)
    return jmed.Queue(records, **options)


# --- source ------------------------------------------------------------------------------------


def test_source_loads_preprocesses_and_keeps_metadata(records):
    source = jmed.SubjectsSource(records, label_names="seg", preprocessing=Scale(3.0))
    assert len(source) == NUM_SUBJECTS and source.image_names == ("seg", "t1")
    subject = source[2]
    expected = nib.load(records[2]["t1"]).get_fdata(dtype=np.float32) * 3.0
    np.testing.assert_allclose(np.asarray(subject["t1"].data)[..., 0], expected, rtol=1e-6)
    assert subject["seg"].kind == "label" and subject["seg"].dtype == np.uint8
    np.testing.assert_allclose(subject["t1"].affine, _affine(2))
    assert subject.metadata == {"age": 42, "diagnosis": "CN", "subject_index": 2}
    assert "SubjectsSource(5 subjects" in repr(source)


def test_source_validates_records(records, tmp_path):
    with pytest.raises(ValueError, match="empty"):
        jmed.SubjectsSource([])
    with pytest.raises(ValueError, match="no image path"):
        jmed.SubjectsSource([{"age": 3}])
    with pytest.raises(ValueError, match=r"subjects\[1\] has images"):
        jmed.SubjectsSource([records[0], {"t1": records[1]["t1"]}])
    with pytest.raises(ValueError, match="deterministic"):
        jmed.SubjectsSource(records, preprocessing=AddNoise())
    with pytest.raises(TypeError, match="sequence of records"):
        jmed.SubjectsSource(records[0])


# --- queue: content --------------------------------------------------------------------------


def test_queue_patches_match_preprocessed_volumes(records):
    queue = _queue(records, augmentation=None, num_epochs=2, batch_size=5)
    source = jmed.SubjectsSource(records, label_names="seg", preprocessing=Scale(2.0))
    volumes = [source[i] for i in range(NUM_SUBJECTS)]
    batches = _collect(iter(queue))
    assert len(batches) == len(queue) == 6  # 2 epochs * 5 subjects * 3 patches / 5
    seen = []
    for batch in batches:
        assert batch["t1"].data.shape == (5, 4, 4, 4, 1) and batch["t1"].data.dtype == np.float32
        assert batch["seg"].kind == "label"
        meta = batch.metadata
        assert meta["location"].shape == (5, 6) and meta["location"].dtype == np.int32
        assert meta["diagnosis"].tolist() == ["AD" if i % 2 else "CN" for i in meta["subject_index"]]
        np.testing.assert_array_equal(meta["age"], 40 + meta["subject_index"])
        for j in range(5):
            index = int(meta["subject_index"][j])
            seen.append(index)
            x0, y0, z0, x1, y1, z1 = meta["location"][j]
            for name in ("t1", "seg"):
                volume = np.asarray(volumes[index][name].data)
                np.testing.assert_array_equal(batch[name].data[j], volume[x0:x1, y0:y1, z0:z1])
            expected_origin = jmed.affine.voxel_to_world(_affine(index), np.array([x0, y0, z0], float))
            np.testing.assert_allclose(batch["t1"].affine[j][:3, 3], expected_origin, atol=1e-4)
    # each subject contributes samples_per_volume patches per epoch
    for epoch in range(2):
        counts = np.bincount(seen[epoch * 15 : (epoch + 1) * 15], minlength=NUM_SUBJECTS)
        assert counts.tolist() == [3] * NUM_SUBJECTS or epoch == 0
    np.testing.assert_array_equal(np.bincount(seen, minlength=NUM_SUBJECTS), [6] * NUM_SUBJECTS)


def test_queue_hands_fortran_ordered_volumes_to_jit_transposed(records):
    # without preprocessing, NIfTI voxels stay in the file's (Fortran) order
    data = jmed.SubjectsSource(records, label_names="seg")[1]["t1"].data
    assert data.flags.f_contiguous and not data.flags.c_contiguous
    handed, transposed = _to_device_layout(data)
    assert transposed and handed.shape == data.shape[::-1] and np.shares_memory(handed, data)
    c_order = np.ascontiguousarray(data)
    handed, transposed = _to_device_layout(c_order)
    assert not transposed and handed is c_order
    # the same batches as from C-ordered in-memory subjects, with an augmentation too
    in_memory = [
        jmed.Subject(
            t1=jmed.ScalarImage(
                np.ascontiguousarray(nib.load(r["t1"]).get_fdata(dtype=np.float32)), _affine(i)
            ),
            seg=jmed.LabelMap(np.ascontiguousarray(np.asanyarray(nib.load(r["seg"]).dataobj)), _affine(i)),
        )
        for i, r in enumerate(records)
    ]
    runs = {}
    for augmentation in (None, NOISE):
        from_files = _collect(iter(_queue(records, preprocessing=None, augmentation=augmentation)))
        from_memory = _collect(iter(_queue(in_memory, preprocessing=None, augmentation=augmentation)))
        assert len(from_files) == len(from_memory) == 4
        for a, b in zip(from_files, from_memory):
            for name in ("t1", "seg"):
                np.testing.assert_array_equal(a[name].data, b[name].data)
                np.testing.assert_array_equal(a[name].affine, b[name].affine)
            np.testing.assert_array_equal(a.metadata["location"], b.metadata["location"])
        runs[augmentation] = from_files
    # without augmentation the patches are the file's voxels, exactly
    volumes = {
        name: [np.asanyarray(nib.load(r[name]).get_fdata(dtype=np.float32)) for r in records]
        for name in ("t1", "seg")
    }
    for batch in runs[None]:
        for j, index in enumerate(batch.metadata["subject_index"]):
            x0, y0, z0, x1, y1, z1 = batch.metadata["location"][j]
            for name in ("t1", "seg"):
                expected = volumes[name][index][x0:x1, y0:y1, z0:z1]
                np.testing.assert_array_equal(batch[name].data[j][..., 0], expected)


def test_queue_patch_keys_follow_the_documented_formula(records):
    # subject i of epoch e: key fold_in(fold_in(key(seed), e), i), split into
    # (augmentation, sampler) keys
    queue = _queue(records, num_epochs=2, batch_size=3, shuffle_patches=False, augmentation=None)
    source = jmed.SubjectsSource(records, label_names="seg", preprocessing=Scale(2.0))
    batches = _collect(iter(queue))
    indices = np.concatenate([b.metadata["subject_index"] for b in batches])
    locations = np.concatenate([b.metadata["location"] for b in batches])
    for position in (0, 4, 7):  # epochs 0 and 1
        epoch, index = divmod(position, NUM_SUBJECTS)
        index = int(indices[3 * position])
        key = jax.random.fold_in(jax.random.fold_in(jax.random.key(7), epoch), index)
        starts = SAMPLER.starts(jax.random.split(key)[1], source[index], 3)
        np.testing.assert_array_equal(locations[3 * position : 3 * position + 3, :3], starts)


def test_queue_per_epoch_counts_without_window_shuffle(records):
    queue = _queue(records, num_epochs=2, batch_size=3, shuffle_patches=False)
    batches = _collect(iter(queue))
    indices = np.concatenate([b.metadata["subject_index"] for b in batches])
    for epoch in range(2):
        part = indices[epoch * 15 : (epoch + 1) * 15]
        assert np.bincount(part, minlength=NUM_SUBJECTS).tolist() == [3] * NUM_SUBJECTS
        # whole subjects arrive together, in the shuffled subject order
        assert all(len(set(part[k : k + 3])) == 1 for k in range(0, 15, 3))
    assert indices[:15].tolist() != indices[15:].tolist()  # reshuffled each epoch


def test_queue_is_deterministic_and_restorable(records):
    first = _collect(iter(_queue(records)))
    second = _collect(iter(_queue(records)))
    _assert_batches_equal(first, second)
    other = _collect(iter(_queue(records, seed=8)))
    assert not np.array_equal(first[0]["t1"].data, other[0]["t1"].data)
    # save mid-epoch (inside a shuffle window), restore in a fresh iterator
    iterator = iter(_queue(records))
    _collect(iterator, limit=2)
    state = json.loads(json.dumps(iterator.get_state()))  # a checkpoint can be stored as JSON
    rest = _collect(iterator)
    restored = iter(_queue(records))
    restored.set_state(state)
    _assert_batches_equal(_collect(restored), rest)
    _assert_batches_equal(first[2:], rest)


def test_queue_same_batches_for_0_1_2_workers(records):
    reference = _collect(iter(_queue(records, num_workers=0)))
    assert len(reference) == 4
    _assert_batches_equal(_collect(iter(_queue(records, num_workers=1))), reference)
    _assert_batches_equal(_collect(iter(_queue(records, num_workers=2))), reference)


def test_worker_error_names_the_file(records, tmp_path):
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"not a nifti file")
    bad = [*records[:2], {**records[2], "t1": str(broken)}]
    queue = _queue(bad, num_workers=1, shuffle_subjects=False)
    with pytest.raises(RuntimeError, match="broken.nii.gz"):
        _collect(iter(queue))
    missing = [{**records[0], "seg": str(tmp_path / "missing_seg.nii.gz")}]
    with pytest.raises(RuntimeError, match="missing_seg.nii.gz"):
        _collect(iter(_queue(missing)))


def test_skip_errors_logs_and_skips(records, tmp_path, caplog):
    bad = [*records[:2], {**records[2], "t1": str(tmp_path / "gone.nii.gz")}]
    with caplog.at_level(logging.WARNING, logger="jmed.data"):
        batches = _collect(iter(_queue(bad, skip_errors=True, batch_size=1)))
    assert len(batches) == 6  # 2 subjects * 3 patches
    assert {int(b.metadata["subject_index"][0]) for b in batches} == {0, 1}
    assert any("gone.nii.gz" in r.getMessage() and "skip" in r.getMessage() for r in caplog.records)


# --- cache ---------------------------------------------------------------------------------------


def test_cache_decodes_once_and_invalidates(records, tmp_path, monkeypatch):
    folder = tmp_path / "data"
    folder.mkdir()
    local = _write_subjects(folder, n=2)
    cache = tmp_path / "cache"
    loads, hashes = [], []
    real_load, real_hash = jmed.io._load, jmed.data.cache._hash_file
    monkeypatch.setattr(
        # voxel reads; the Queue's shape plan reads headers only (lazy loads)
        jmed.io,
        "_load",
        lambda path, *a, **kw: (kw.get("lazy") or loads.append(Path(path).name), real_load(path, *a, **kw))[
            1
        ],
    )
    monkeypatch.setattr(
        jmed.data.cache, "_hash_file", lambda path: hashes.append(path.name) or real_hash(path)
    )

    def run(preprocessing=Scale(2.0)):
        loads.clear()
        hashes.clear()
        return _collect(iter(_queue(local, cache_dir=cache, preprocessing=preprocessing, num_epochs=1)))

    uncached = _collect(iter(_queue(local, num_epochs=1)))
    first = run()
    assert sorted(loads) == ["seg_0.nii.gz", "seg_1.nii.gz", "t1_0.nii.gz", "t1_1.nii.gz"]
    _assert_batches_equal(first, uncached)
    second = run()
    assert loads == [] and hashes == []  # no image file read at all
    _assert_batches_equal(second, first)
    entries = [p for p in cache.iterdir() if p.name != "files"]
    assert len(entries) == 2 and not any(p.name.startswith((".tmp", ".jmed-")) for p in cache.iterdir())
    assert all((p / "t1.npy").exists() and (p / "geometry.json").exists() for p in entries)
    # a changed preprocessing misses
    run(Scale(5.0))
    assert len(loads) == 4
    # a changed file misses for that subject only
    data = np.full(SHAPE, 3.0, np.float32)
    nib.save(nib.Nifti1Image(data, _affine(1)), folder / "t1_1.nii.gz")
    os.utime(folder / "t1_1.nii.gz", ns=(1, 1))
    changed = run()
    assert sorted(loads) == ["seg_1.nii.gz", "t1_1.nii.gz"]
    for batch in changed:
        for index, patch in zip(batch.metadata["subject_index"], batch["t1"].data):
            if index == 1:  # new content: 3 * 2 + noise in [0, 1)
                assert np.all((patch >= 6.0) & (patch < 7.0))


def halve(data):
    return data / 2


class _Handle:
    """An object without a canonical form (its repr shows a memory address)."""


def _load_cached(records, cache, preprocessing):
    source = jmed.SubjectsSource(records, label_names="seg", preprocessing=preprocessing, cache_dir=cache)
    return [source[i] for i in range(len(source))]


def test_cache_hits_in_a_new_process_with_a_lambda_preprocessing(tmp_path, monkeypatch):
    folder = tmp_path / "data"
    folder.mkdir()
    local = _write_subjects(folder, n=2)
    cache = tmp_path / "cache"
    here = Path(__file__).resolve().parent
    # the first run, in a fresh interpreter (its function objects live at other addresses)
    script = textwrap.dedent(
        f"""
        import importlib, json, sys
        sys.path[:0] = [{str(here)!r}, {str(here.parent)!r}]
        import jmed.transforms as T
        module = importlib.import_module({__name__!r})
        module._load_cached(json.loads(sys.argv[1]), sys.argv[2],
                            T.Compose([T.Lambda(module.halve, kinds="intensity"), T.Clamp(out_max=50.0)]))
        """
    )
    plain = json.dumps([{k: str(v) for k, v in r.items() if k in ("t1", "seg")} for r in local])
    env = {**os.environ, "PYTHONHASHSEED": "4321", "JAX_PLATFORMS": "cpu"}
    subprocess.run([sys.executable, "-c", script, plain, str(cache)], check=True, env=env, timeout=300)
    assert len([p for p in cache.iterdir() if p.name != "files"]) == 2
    loads = []
    real_load = jmed.io._load
    monkeypatch.setattr(
        jmed.io,
        "_load",
        lambda path, *a, **kw: (kw.get("lazy") or loads.append(path), real_load(path, *a, **kw))[1],
    )
    records = [{k: str(v) for k, v in r.items() if k in ("t1", "seg")} for r in local]
    preprocessing = jmed.transforms.Compose(
        [jmed.transforms.Lambda(halve, kinds="intensity"), jmed.transforms.Clamp(out_max=50.0)]
    )
    cached = _load_cached(records, cache, preprocessing)
    assert loads == []  # every subject read from the entries the other process wrote
    for record, subject in zip(records, cached):
        t1 = np.asarray(nib.load(record["t1"]).dataobj, np.float32)
        np.testing.assert_allclose(
            np.asarray(subject["t1"].data)[..., 0], np.minimum(t1 / 2, 50.0), rtol=1e-6
        )
    # another function body is another entry
    _load_cached(records, cache, jmed.transforms.Lambda(lambda x: x / 3, kinds="intensity"))
    assert len(loads) == 4


def test_cache_refuses_a_preprocessing_without_a_stable_key(tmp_path):
    local = _write_subjects(tmp_path, n=1)
    handle = _Handle()
    preprocessing = jmed.transforms.Lambda(lambda x: x * 2 if handle else x)
    with pytest.raises(
        RuntimeError, match=r"Lambda cannot key a cache: Lambda\.function\[closure 'handle'\]"
    ):
        _load_cached(local, tmp_path / "cache", preprocessing)
    assert not (tmp_path / "cache").exists()
    # without a cache the same preprocessing runs
    source = jmed.SubjectsSource(local, label_names="seg", preprocessing=preprocessing)
    np.testing.assert_allclose(
        np.asarray(source[0]["t1"].data)[..., 0], 2 * np.asarray(nib.load(local[0]["t1"]).dataobj), rtol=1e-6
    )


def test_equal_loader_configurations_share_one_worker_program(records):
    # the worker's jitted augment-and-sample takes augmentation and sampler as static
    # arguments: separately built equal configurations must not compile it again
    subject = jmed.SubjectsSource(records[:1], label_names="seg")[0]
    names = []

    def listener(event, duration, **kwargs):
        if event.endswith("backend_compile_duration"):
            names.append(str(kwargs.get("fun_name", "_augment_and_sample_one")))

    def run(std):
        augmentation = jmed.transforms.Compose(
            [jmed.transforms.RandomFlip(axes=(0, 1)), jmed.transforms.RandomNoise(std=std)]
        )
        sampler = LabelSampler(4, "seg", {0: 1, 1: 1, 2: 1})
        names.clear()
        out = jmed.data.load_and_sample._AugmentAndSample(augmentation, sampler, 2, seed=3).map(
            ((0, 0), subject)
        )
        return out, sum("_augment_and_sample_one" in n for n in names)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        first, compiled_first = run(0.1)
        again, compiled_again = run(0.1)
        _, compiled_other = run(0.2)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert (compiled_first, compiled_again, compiled_other) == (1, 0, 1)
    np.testing.assert_array_equal(again["data"]["t1"], first["data"]["t1"])
    np.testing.assert_array_equal(again["location"], first["location"])


# --- sharding ----------------------------------------------------------------------------------


def test_shards_are_disjoint(records, caplog):
    seen = []
    for index in range(2):
        with caplog.at_level(logging.WARNING, logger="jmed.data"):
            queue = _queue(records, shard_index=index, shard_count=2, batch_size=3)
        batches = _collect(iter(queue))
        seen.append({int(i) for b in batches for i in b.metadata["subject_index"]})
    assert seen[0].isdisjoint(seen[1])
    assert len(seen[0]) == len(seen[1]) == 2  # 5 subjects, 1 dropped so shards are equal
    assert any("dropped" in r.getMessage() for r in caplog.records)
    keep_all = _queue(records, shard_index=0, shard_count=2, drop_remainder=False)
    assert len(keep_all.indices) == 3


_DISTRIBUTED = textwrap.dedent(
    """
    import json, sys
    import jax
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    process_id, port, records = int(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3])
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=process_id,
                               initialization_timeout=60)
    import numpy as np
    from jax.experimental import multihost_utils
    from jax.sharding import Mesh, NamedSharding, PartitionSpec
    import jmed
    queue = jmed.Queue(records, jmed.UniformSampler(4), samples_per_volume=2, max_length=4,
                       batch_size=2, seed=3, label_names="seg", drop_last=True)
    assert (queue.shard_index, queue.shard_count) == (process_id, 2)
    mesh = Mesh(np.array(jax.devices()), ("batch",))
    sharding = NamedSharding(mesh, PartitionSpec("batch"))
    seen, shapes = [], []
    with queue.__iter__() as it:
        for batch in it:
            seen.extend(int(i) for i in batch.metadata["subject_index"])
            data = jax.make_array_from_process_local_data(sharding, batch["t1"].data)
            shapes.append(list(data.shape))
            local = np.concatenate([np.asarray(s.data) for s in data.addressable_shards])
            assert np.array_equal(local, batch["t1"].data)
            total = float(jax.jit(lambda x: x.sum())(data))
            both = multihost_utils.process_allgather(np.float32(batch["t1"].data.sum()))
            assert np.isclose(total, both.sum(), rtol=1e-4), (total, both)
    print("RESULT", json.dumps({"seen": sorted(set(seen)), "shapes": shapes}), flush=True)
    jax.distributed.shutdown()
    """
)


def test_two_processes_see_disjoint_subjects(records, tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(_DISTRIBUTED)
    port = free_port()
    plain = [{k: str(v) if isinstance(v, Path) else v for k, v in r.items()} for r in records]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(jmed.__file__).parent.parent), env.get("PYTHONPATH", "")])
    outputs = run_together(
        [[sys.executable, script, str(i), str(port), json.dumps(plain)] for i in range(2)],
        env=env,
        timeout=150,
    )
    results = [
        json.loads(next(line[7:] for line in out.splitlines() if line.startswith("RESULT ")))
        for out in outputs
    ]
    seen = [set(r["seen"]) for r in results]
    assert seen[0].isdisjoint(seen[1]) and len(seen[0]) == len(seen[1]) == 2
    assert results[0]["shapes"] == results[1]["shapes"] == [[4, 4, 4, 4, 1]] * 2


# --- device pipeline -------------------------------------------------------------------------


def test_volume_loader_and_device_sampling(records):
    loader = jmed.VolumeLoader(
        records,
        batch_size=2,
        seed=1,
        label_names="seg",
        preprocessing=Scale(2.0),
        shard_index=0,
        shard_count=1,
    )
    batches = _collect(iter(loader))
    assert len(batches) == 2  # 5 subjects, drop_last
    batch = batches[0]
    assert batch["t1"].data.shape == (2, *SHAPE, 1) and batch["t1"].affine.shape == (2, 4, 4)
    numeric = batch.replace(metadata={k: v for k, v in batch.metadata.items() if v.dtype.kind in "biuf"})
    sampler = UniformSampler((4, 3, 5))

    @jax.jit
    def step(key, batch):
        return jmed.augment_and_sample(key, batch, sampler=sampler, num_patches=3)

    patches = step(jax.random.key(0), numeric)
    assert patches["t1"].data.shape == (6, 4, 3, 5, 1)
    locations = np.asarray(patches.metadata["location"])
    for i in range(6):
        x0, y0, z0, x1, y1, z1 = locations[i]
        volume = batch["t1"].data[i // 3]
        np.testing.assert_array_equal(np.asarray(patches["t1"].data[i]), volume[x0:x1, y0:y1, z0:z1])
    np.testing.assert_array_equal(
        np.asarray(patches.metadata["subject_index"]), np.repeat(batch.metadata["subject_index"], 3)
    )
    # augmentation draws from its own key: the same key gives the same locations, plus noise
    augmented = jax.jit(
        lambda k, b: jmed.augment_and_sample(k, b, sampler=sampler, num_patches=3, augmentation=NOISE)
    )(jax.random.key(0), numeric)
    np.testing.assert_array_equal(np.asarray(augmented.metadata["location"]), locations)
    noise = np.asarray(augmented["t1"].data) - np.asarray(patches["t1"].data)
    assert np.all((noise > -1e-5) & (noise < 1 + 1e-5)) and noise.std() > 0.1
    np.testing.assert_array_equal(np.asarray(augmented["seg"].data), np.asarray(patches["seg"].data))


def test_volume_loader_rejects_different_shapes(records, tmp_path):
    odd = tmp_path / "odd.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((5, 5, 5), np.float32), np.eye(4)), odd)
    loader = jmed.VolumeLoader(
        [{"t1": records[0]["t1"]}, {"t1": str(odd)}],
        batch_size=2,
        shuffle_subjects=False,
        shard_index=0,
        shard_count=1,
    )
    with pytest.raises(ValueError, match="shapes differ"):
        _collect(iter(loader))


# --- configuration -------------------------------------------------------------------------------


def test_memory_estimate(records):
    queue = _queue(records, max_length=10, batch_size=4, num_workers=2, worker_buffer_size=1)
    volume = np.prod(SHAPE) * (4 + 1)  # float32 t1 + uint8 seg
    patch = 64 * (4 + 1)
    per_subject = 3 * patch
    expected = patch * (10 + 4) + per_subject + 2 * 2 * (2 * volume + per_subject)
    assert queue.get_max_memory() == expected
    assert queue.get_max_memory_pretty().endswith("KiB")


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(samples_per_volume=0), "samples_per_volume"),
        (dict(max_length=-1), "max_length"),
        (dict(batch_size=0), "batch_size"),
        (dict(num_workers=-1), "num_workers"),
        (dict(shard_index=2, shard_count=2), "shard_index"),
        (dict(num_epochs=0), "num_epochs"),
        (dict(sampler=None), "sampler"),
        (dict(seed=1.5), "seed"),
        (dict(preprocessing=AddNoise()), "deterministic"),
    ],
)
def test_queue_configuration_errors(records, change, match):
    with pytest.raises((ValueError, TypeError), match=match):
        _queue(records, **change)


# --- option groups, checkpointing with orbax, progress --------------------------------------------


def test_option_groups_equal_the_loose_keywords(records, tmp_path):
    loose = _queue(
        records,
        label_names="seg",
        cache_dir=tmp_path / "cache",
        drop_remainder=False,
        buckets=[(10, 9, 8)],
        max_buckets=2,
        worker_buffer_size=1,
        compilation_cache_dir=None,
    )
    grouped = _queue(
        records,
        label_names=(),
        preprocessing=None,
        shard_index=None,
        shard_count=None,
        source_options=jmed.data.SourceOptions(
            label_names=["seg"], preprocessing=loose.source.preprocessing, cache_dir=tmp_path / "cache"
        ),
        shard_options=jmed.data.ShardOptions(shard_index=0, shard_count=1, drop_remainder=False),
        bucket_options=jmed.data.BucketOptions(buckets=[[10, 9, 8]], max_buckets=2),
        worker_options=jmed.data.WorkerOptions(worker_buffer_size=1, compilation_cache_dir=None),
    )
    for name in ("source_options", "shard_options", "bucket_options", "worker_options"):
        assert getattr(grouped, name) == getattr(loose, name), name
    assert loose.bucket_options == jmed.data.BucketOptions(buckets=((10, 9, 8),), max_buckets=2)
    assert (grouped.buckets, grouped.max_buckets, grouped.worker_buffer_size) == ((((10, 9, 8),)), 2, 1)
    assert (grouped.shard_index, grouped.shard_count, grouped.compilation_cache_dir) == (0, 1, None)
    assert repr(grouped) == repr(loose)
    _assert_batches_equal(_collect(iter(grouped)), _collect(iter(loose)))
    volumes = dict(label_names="seg", preprocessing=Scale(2.0), shard_index=0, shard_count=1, batch_size=2)
    by_keywords = jmed.VolumeLoader(records, **volumes, worker_buffer_size=3)
    by_group = jmed.VolumeLoader(
        records, **volumes, worker_options=jmed.data.WorkerOptions(worker_buffer_size=3)
    )
    assert by_group.worker_options == by_keywords.worker_options
    _assert_batches_equal(_collect(iter(by_group)), _collect(iter(by_keywords)))


@pytest.mark.parametrize(
    "kw,error,match",
    [
        (dict(shard_count=2, shard_options=jmed.data.ShardOptions(shard_count=2)), ValueError, "shard_count"),
        (dict(max_buckets=2, bucket_options=jmed.data.BucketOptions()), ValueError, "max_buckets.*both"),
        (
            dict(shard_options=dict(shard_count=1)),
            TypeError,
            "shard_options must be a jmed.data.ShardOptions",
        ),
    ],
)
def test_option_groups_refuse_a_field_given_twice(records, kw, error, match):
    with pytest.raises(error, match=match):
        _queue(records, **{"shard_index": None, "shard_count": None, **kw})


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: jmed.data.ShardOptions(shard_index=-1), "shard_index must be an int >= 0, got -1"),
        (lambda: jmed.data.ShardOptions(shard_count=0), "shard_count must be an int >= 1, got 0"),
        (lambda: jmed.data.BucketOptions(max_buckets=0), "max_buckets must be an int >= 1"),
        (lambda: jmed.data.BucketOptions(buckets=[(1, 2)]), r"buckets\[0\] must be 3 positive ints"),
        (lambda: jmed.data.WorkerOptions(worker_buffer_size=True), "worker_buffer_size must be an int"),
        (lambda: jmed.data.WorkerOptions(compilation_cache_dir=3), "compilation_cache_dir must be a folder"),
    ],
)
def test_option_groups_validate_their_fields(make, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make()


def test_orbax_checkpoints_model_and_loader_together(records, tmp_path):
    """Model state and loader position saved by one orbax checkpoint, resumed bit-identically
    (in a loader with another number of workers)."""
    ocp = pytest.importorskip("orbax.checkpoint")
    optax = pytest.importorskip("optax")
    nn = pytest.importorskip("flax.linen")
    import grain

    model = nn.Dense(1)
    tx = optax.adam(1e-2)

    @jax.jit
    def train_step(state, t1, seg):
        def loss(params):
            prediction = model.apply(params, t1.reshape(t1.shape[0], -1))
            return ((prediction[:, 0] - seg.reshape(seg.shape[0], -1).mean(axis=1)) ** 2).mean()

        grads = jax.grad(loss)(state["params"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        return {"params": optax.apply_updates(state["params"], updates), "opt_state": opt_state}

    def run(state, iterator, steps):
        for _ in range(steps):
            batch = next(iterator)
            state = train_step(state, batch["t1"].data, batch["seg"].data.astype(np.float32))
        return state

    params = model.init(jax.random.key(0), np.zeros((1, 64), np.float32))
    state = {"params": params, "opt_state": tx.init(params)}
    iterator = iter(_queue(records, batch_size=2, num_workers=0))
    assert isinstance(iterator, grain.DatasetIterator)
    state = run(state, iterator, 3)
    with ocp.CheckpointManager(tmp_path / "checkpoints") as manager:
        manager.save(
            3,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), loader=grain.checkpoint.CheckpointSave(iterator)
            ),
        )
        manager.wait_until_finished()
    expected_batches = _collect(iterator, limit=3)
    expected_state = run(state, iter(expected_batches), 3)
    iterator.close()

    fresh = iter(_queue(records, batch_size=2, num_workers=1))
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    with ocp.CheckpointManager(tmp_path / "checkpoints") as manager:
        assert manager.latest_step() == 3
        restored = manager.restore(
            3,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), loader=grain.checkpoint.CheckpointRestore(fresh)
            ),
        )
    assert restored.loader is fresh
    for a, b in zip(jax.tree.leaves(restored.state), jax.tree.leaves(state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    resumed_batches = _collect(fresh, limit=3)
    _assert_batches_equal(resumed_batches, expected_batches)
    resumed_state = run(restored.state, iter(resumed_batches), 3)
    fresh.close()
    for a, b in zip(jax.tree.leaves(resumed_state), jax.tree.leaves(expected_state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_cache_building_progress(records, tmp_path, capfd):
    quiet = jmed.SubjectsSource(records, label_names="seg", cache_dir=tmp_path / "a")
    assert quiet.build_cache(progress=False) == [{"seg": SHAPE + (1,), "t1": SHAPE + (1,)}] * NUM_SUBJECTS
    assert capfd.readouterr().err == ""
    loud = jmed.SubjectsSource(records, label_names="seg", cache_dir=tmp_path / "b")
    assert loud.build_cache([3, 1], progress=True) == [{"seg": SHAPE + (1,), "t1": SHAPE + (1,)}] * 2
    err = capfd.readouterr().err
    assert "caching subjects" in err and "2/2" in err
    assert len(list((tmp_path / "b").glob("*/geometry.json"))) == 2
    # the cache it built is the one a loader reads
    for i in range(NUM_SUBJECTS):
        np.testing.assert_array_equal(quiet[i]["t1"].data, loud[i]["t1"].data)
    with pytest.raises(ValueError, match="cache_dir"):
        jmed.SubjectsSource(records).build_cache()
    with pytest.raises(TypeError, match="progress"):
        quiet.build_cache(progress="yes")


def test_queue_start_up_progress(records, capfd):
    quiet = _collect(iter(_queue(records, progress=False)))
    assert "planning" not in capfd.readouterr().err
    loud_queue = _queue(records, progress=True)
    loud = _collect(iter(loud_queue))
    err = capfd.readouterr().err
    assert "planning shape buckets: 100%" in err and f"{NUM_SUBJECTS}/{NUM_SUBJECTS}" in err
    # the window of 7 patches needs 3 subjects of 3 patches before the first batch
    assert loud_queue._subjects_for_first_batch() == 3
    assert "first batch (0 workers)" in err and "3/3" in err
    _assert_batches_equal(loud, quiet)
    with pytest.raises(TypeError, match="progress"):
        _queue(records, progress=1)
