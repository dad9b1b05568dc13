import json
import math
import os
from pathlib import Path

import jax.numpy as jnp
import nibabel as nib
import numpy as np
import pytest
from _loader_helpers import assert_batches_equal as _assert_batches_equal
from _loader_helpers import collect as _collect
from absl import flags

import jmed
import jmed.io
import jmed.patch_reads as patch_reads
from jmed.patch_reads import NiftiRegionReader, build_class_index
from jmed.sampling import LabelSampler, UniformSampler
from jmed.transforms import IntensityTransform, RandomFlip

if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()

SHAPE = (24, 20, 18)
PATCH = 6
NUM_SUBJECTS = 4
# class-2 voxels: three eligible centres, one too close to the border to be a centre
CLASS_2 = [(4, 4, 4), (12, 15, 9), (20, 5, 13)]
CLASS_2_INELIGIBLE = (1, 10, 10)


def _affine(i):
    return jmed.affine.from_spacing((1.0, 1.5, 2.0), (i, -3.0, 4.0), "LPS")


def _write_subjects(folder, n=NUM_SUBJECTS, suffix=".nii"):
    records = []
    for i in range(n):
        rng = np.random.default_rng(i)
        t1 = (rng.standard_normal(SHAPE) * 100 + 10 * i).astype(np.int16)
        seg = np.zeros(SHAPE, np.uint8)
        seg[6 + i : 14 + i, 4:12, 5:11] = 1
        for v in [*CLASS_2, CLASS_2_INELIGIBLE]:
            seg[v] = 2
        nib.save(nib.Nifti1Image(t1, _affine(i)), folder / f"t1_{i}{suffix}")
        nib.save(nib.Nifti1Image(seg, _affine(i)), folder / f"seg_{i}{suffix}")
        records.append(
            {"t1": str(folder / f"t1_{i}{suffix}"), "seg": folder / f"seg_{i}{suffix}", "age": 40 + i}
        )
    return records


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    return _write_subjects(tmp_path_factory.mktemp("nii"))


@pytest.fixture(scope="module")
def volumes(records):
    """Fully loaded arrays (numpy reference), by subject and image name."""
    return [
        {
            "t1": nib.load(r["t1"]).get_fdata(dtype=np.float32),
            "seg": np.asanyarray(nib.load(r["seg"]).dataobj),
        }
        for r in records
    ]


@pytest.fixture(autouse=True)
def _fresh_class_indexes(monkeypatch):
    monkeypatch.setattr(patch_reads, "_INDEXES", {})


SAMPLER = LabelSampler(PATCH, "seg", {0: 1, 1: 2, 2: 1})
FLIP = RandomFlip(axes=(0,), flip_probability=1.0)


def _queue(records, **kw):
    options = dict(
        sampler=SAMPLER,
        samples_per_volume=3,
        max_length=7,
        batch_size=4,
        seed=5,
        label_names="seg",
        shard_index=0,
        shard_count=1,
        patch_reads=True,
    )
    options.update(kw)
    return jmed.Queue(records, **options)


# BOXES records every region read through the watched readers: (file name, start, size)
BOXES: list = []


class _Watched:
    """A region reader that records each box read and refuses any whole read."""

    def __init__(self, reader):
        self._reader = reader
        self.shape, self.dtype, self.affine = reader.shape, reader.dtype, reader.affine
        self.cache_key = reader.cache_key
        self.name = reader.path.name

    def read(self, start, size):
        BOXES.append((self.name, tuple(int(s) for s in start), tuple(int(s) for s in size)))
        return self._reader.read(start, size)

    @property
    def data(self):
        raise AssertionError(f"the whole array of {self.name} was read")

    def __array__(self, *args, **kwargs):
        raise AssertionError(f"the whole array of {self.name} was converted")


def _watched_opener(path, kind):
    return _Watched(patch_reads.open_region(path, kind))


@pytest.fixture
def no_whole_reads(monkeypatch):
    """Whole-volume decoding raises (reading headers lazily does not); BOXES starts empty."""
    BOXES.clear()

    def refuse(*args, **kwargs):
        raise AssertionError("a whole volume was decoded")

    monkeypatch.setattr(jmed.io, "_read_data", refuse)
    monkeypatch.setattr(nib.Nifti1Image, "get_fdata", refuse)


# --- region reader and class index ----------------------------------------------------------


def test_nifti_region_reader_matches_jmed_load(records, volumes):
    reader = NiftiRegionReader(records[1]["t1"])
    assert reader.shape == (*SHAPE, 1) and reader.dtype == np.float32
    np.testing.assert_array_equal(reader.affine, jmed.load(records[1]["t1"]).affine)
    box = reader.read((3, 2, 1), (5, 7, 4))
    assert box.shape == (5, 7, 4, 1) and box.dtype == np.float32
    np.testing.assert_array_equal(box[..., 0], volumes[1]["t1"][3:8, 2:9, 1:5])
    labels = NiftiRegionReader(records[1]["seg"], "label")
    assert labels.dtype == np.uint8
    np.testing.assert_array_equal(labels.read((0, 0, 0), SHAPE)[..., 0], volumes[1]["seg"])
    with pytest.raises(ValueError, match=r"not inside the volume"):
        reader.read((20, 0, 0), (5, 1, 1))


def test_nifti_region_reader_applies_the_header_scaling(tmp_path):
    path = tmp_path / "scaled.nii"
    image = nib.Nifti1Image(np.arange(5 * 6 * 7, dtype=np.int16).reshape(5, 6, 7), np.eye(4))
    image.header.set_slope_inter(0.3, -7.0)
    nib.save(image, path)
    expected = np.asarray(jmed.load(path).data)[1:4, 2:6, 0:5]
    assert not np.array_equal(expected, np.arange(5 * 6 * 7).reshape(5, 6, 7, 1)[1:4, 2:6, 0:5])
    np.testing.assert_array_equal(NiftiRegionReader(path).read((1, 2, 0), (3, 4, 5)), expected)


class _BoxImage:
    """A lazy image stand-in that reads boxes through ``read_region`` and refuses ``data``."""

    def __init__(self, path, kind):
        self._reader = NiftiRegionReader(path, kind)
        self.shape, self.dtype, self.affine = self._reader.shape, self._reader.dtype, self._reader.affine
        self.boxes = []

    def read_region(self, start, size):
        self.boxes.append((tuple(start), tuple(size)))
        return self._reader.read(start, size)

    @property
    def data(self):
        raise AssertionError("the whole array was read")


def _box_image_opener(path, kind):
    return patch_reads.ImageRegionReader(_BoxImage(path, kind), cache_key=f"box:{path}")


def test_image_region_reader_adapts_read_region(records, volumes):
    image = _BoxImage(records[0]["seg"], "label")
    reader = patch_reads.ImageRegionReader(image)
    assert isinstance(reader, patch_reads.RegionReader) and not hasattr(reader, "cache_key")
    np.testing.assert_array_equal(
        reader.read((2, 3, 4), (5, 6, 7))[..., 0], volumes[0]["seg"][2:7, 3:9, 4:11]
    )
    assert image.boxes == [((2, 3, 4), (5, 6, 7))]
    with pytest.raises(TypeError, match="read_region"):
        patch_reads.ImageRegionReader(np.zeros((2, 2, 2, 1)))
    # the Queue over such readers gives the patches of the .nii readers
    _assert_batches_equal(
        _collect(iter(_queue(records, patch_reads=_box_image_opener))), _collect(iter(_queue(records)))
    )


def test_open_region_refuses_compressed_files_naming_them(tmp_path):
    path = tmp_path / "t1.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4)), path)
    with pytest.raises(ValueError, match=r"t1\.nii\.gz.*region-readable"):
        patch_reads.open_region(path, "intensity")


def test_class_index_counts_equal_numpy_per_block(records, volumes):
    block = 5
    index = build_class_index(NiftiRegionReader(records[2]["seg"], "label"), (PATCH,) * 3, block)
    valid = [s - PATCH + 1 for s in SHAPE]
    centres = volumes[2]["seg"][3 : 3 + valid[0], 3 : 3 + valid[1], 3 : 3 + valid[2]]
    assert index.origin == (3, 3, 3) and index.shape == tuple(valid)
    assert index.labels.tolist() == [0, 1, 2]
    grid = [math.ceil(v / block) for v in valid]
    expected = np.zeros((math.prod(grid), 3), np.int64)
    for b, (i, j, k) in enumerate(np.ndindex(*grid)):
        part = centres[i * block : (i + 1) * block, j * block : (j + 1) * block, k * block : (k + 1) * block]
        expected[b] = [(part == v).sum() for v in (0, 1, 2)]
    np.testing.assert_array_equal(index.counts, expected)
    # the ineligible class-2 voxel is not counted
    assert index.counts[:, 2].sum() == len(CLASS_2)


def test_class_draws_cover_each_voxel_of_the_class_once(records, volumes):
    # u = (class, (r + 0.5) / count) for r < count: the r-th voxel of the class, each once
    reader = NiftiRegionReader(records[3]["seg"], "label")
    index = build_class_index(reader, (PATCH,) * 3, 5)
    columns, classes, weights = patch_reads._class_columns(index, SAMPLER)
    valid = [s - PATCH + 1 for s in SHAPE]
    centres = volumes[3]["seg"][3 : 3 + valid[0], 3 : 3 + valid[1], 3 : 3 + valid[2]]
    for label, u_class in ((1, 0.5), (2, 0.9), (0, 0.1)):
        expected = {tuple(v) for v in np.argwhere(centres == label).tolist()}
        count = len(expected)
        u = np.stack([np.full(count, u_class), (np.arange(count) + 0.5) / count], axis=1)
        starts, ok = patch_reads._draw_by_class(u, index, reader, columns, classes, weights)
        assert ok
        assert {tuple(v) for v in starts.tolist()} == expected and len(starts) == count


# --- Queue: values and reads -----------------------------------------------------------------


def test_uniform_patch_reads_equal_the_whole_volume_queue(records):
    options = dict(sampler=UniformSampler(PATCH), num_epochs=2)
    whole = _collect(iter(_queue(records, patch_reads=False, **options)))
    first = _collect(iter(_queue(records, **options)))
    assert len(first) == 6
    _assert_batches_equal(first, whole)


def test_margin_without_augmentation_reads_the_patch_alone(records):
    options = dict(sampler=UniformSampler(PATCH), num_epochs=1)
    plain = _collect(iter(_queue(records, **options)))
    wide = _collect(iter(_queue(records, patch_margin=2, **options)))
    assert wide[0]["t1"].data.shape[1:4] == (PATCH,) * 3
    _assert_batches_equal(wide, plain)


def test_file_urls_of_nifti_files_are_read_as_files(records):
    reader = patch_reads.open_region("file://" + str(records[0]["seg"]), "label")
    assert isinstance(reader, NiftiRegionReader)
    expected = np.asanyarray(nib.load(records[0]["seg"]).dataobj)[2:8, 3:9, 4:10]
    np.testing.assert_array_equal(reader.read((2, 3, 4), (6, 6, 6))[..., 0], expected)


@pytest.mark.parametrize("augmentation", [None, FLIP], ids=["none", "flip"])
def test_patch_reads_never_read_a_whole_volume(records, volumes, no_whole_reads, monkeypatch, augmentation):
    monkeypatch.setattr(patch_reads, "CLASS_INDEX_BLOCK", 5)
    margin = 0 if augmentation is None else PATCH // 4  # the default margin
    queue = _queue(
        records, patch_reads=_watched_opener, augmentation=augmentation, num_epochs=2, samples_per_volume=4
    )
    assert queue.patch_margin == (margin,) * 3
    batches = _collect(iter(queue))
    assert len(batches) == 8  # 2 epochs * 4 subjects * 4 patches / 4
    region = PATCH + 2 * margin
    assert BOXES, "no region was read through the opener"
    for name, start, size in BOXES:
        assert all(s <= region for s in size) or all(s <= 5 for s in size), (name, start, size)
        assert math.prod(size) < math.prod(SHAPE) / 8
    # each patch equals the box cut from the fully loaded volume (flipped by the augmentation)
    for batch in batches:
        for j, index in enumerate(batch.metadata["subject_index"]):
            x0, y0, z0, x1, y1, z1 = batch.metadata["location"][j]
            assert (x1 - x0, y1 - y0, z1 - z0) == (PATCH,) * 3
            for name in ("t1", "seg"):
                expected = volumes[index][name][x0:x1, y0:y1, z0:z1]
                if augmentation is not None:
                    expected = expected[::-1]
                got = batch[name].data[j][..., 0]
                assert got.dtype == (np.float32 if name == "t1" else np.uint8)
                np.testing.assert_array_equal(got, expected)
            origin = jmed.affine.voxel_to_world(_affine(index), np.array([x0, y0, z0], float))
            np.testing.assert_allclose(batch["t1"].affine[j][:3, 3], origin, atol=1e-4)


class WorldX(IntensityTransform):
    """Random in name only: writes each voxel's world x coordinate (from its affine)."""

    is_random = True

    def apply_image(self, image, params):
        shape = image.spatial_shape
        grid = jnp.stack(jnp.meshgrid(*[jnp.arange(s, dtype=jnp.float32) for s in shape], indexing="ij"), -1)
        world = grid @ jnp.asarray(image.affine[:3, :3]).T + jnp.asarray(image.affine[:3, 3])
        return image.replace(data=world[..., :1])


def test_augmentation_sees_regions_in_world_coordinates(records):
    queue = _queue(records, augmentation=WorldX(), patch_margin=3, shuffle_patches=False)
    for batch in _collect(iter(queue)):
        for j, index in enumerate(batch.metadata["subject_index"]):
            start = batch.metadata["location"][j][:3]
            grid = np.stack(np.meshgrid(*[np.arange(PATCH)] * 3, indexing="ij"), -1) + start
            world = jmed.affine.voxel_to_world(_affine(index), grid.reshape(-1, 3).astype(float))
            np.testing.assert_allclose(batch["t1"].data[j].reshape(-1), world[:, 0], atol=1e-3)


def test_regions_outside_the_volume_are_padded(records):
    reader = NiftiRegionReader(records[0]["t1"])
    region = patch_reads._read_padded(reader, (-2, 0, 15), (6, 4, 6), "intensity")
    inner = reader.read((0, 0, 15), (4, 4, 3))
    np.testing.assert_array_equal(region[2:, :, :3], inner)
    assert np.all(region[:2] == inner.min()) and np.all(region[:, :, 3:] == inner.min())
    labels = NiftiRegionReader(records[0]["seg"], "label")
    assert np.all(patch_reads._read_padded(labels, (-2, 0, 0), (6, 4, 4), "label")[:2] == 0)


# --- Queue: label balance --------------------------------------------------------------------


def _centre_labels(batches, volumes):
    labels, centres = [], []
    for batch in batches:
        for j, index in enumerate(batch.metadata["subject_index"]):
            c = batch.metadata["location"][j][:3] + PATCH // 2
            labels.append(int(volumes[index]["seg"][tuple(c)]))
            centres.append((int(index), tuple(int(v) for v in c)))
    return np.array(labels), centres


def test_label_balanced_frequencies_match_the_probabilities(records, volumes, monkeypatch):
    monkeypatch.setattr(patch_reads, "CLASS_INDEX_BLOCK", 7)
    queue = _queue(records, samples_per_volume=150, batch_size=50, max_length=1)
    labels, centres = _centre_labels(_collect(iter(queue)), volumes)
    assert len(labels) == 600
    frequencies = np.bincount(labels, minlength=3) / len(labels)
    # binomial standard deviation <= 0.021 at n = 600
    np.testing.assert_allclose(frequencies, [0.25, 0.5, 0.25], atol=0.07)
    # within class 2, each eligible voxel drawn (uniform over the class), never the ineligible one
    drawn = {c for (_, c), lab in zip(centres, labels) if lab == 2}
    assert drawn == set(CLASS_2)
    per_voxel = np.array([sum(1 for (_, c) in centres if c == v) for v in CLASS_2])
    assert per_voxel.min() > 0.15 * per_voxel.sum()


def test_label_sampler_variants(records, volumes, monkeypatch):
    monkeypatch.setattr(patch_reads, "CLASS_INDEX_BLOCK", 8)
    binary = _queue(records, sampler=LabelSampler(PATCH, "seg"), samples_per_volume=20, batch_size=20)
    labels, _ = _centre_labels(_collect(iter(binary)), volumes)
    assert np.all(labels > 0)
    nnunet = LabelSampler(PATCH, "seg", foreground_fraction=0.5)
    queue = _queue(records, sampler=nnunet, samples_per_volume=4, batch_size=4, shuffle_patches=False)
    for batch in _collect(iter(queue)):
        labels, _ = _centre_labels([batch], volumes)
        assert np.all(labels[2:] > 0)  # the last ceil(0.5 * 4) patches are foreground


def test_class_index_is_stored_in_the_cache_folder(records, tmp_path, monkeypatch):
    first = _collect(iter(_queue(records, cache_dir=tmp_path)))
    stored = list((tmp_path / "class-index").glob("*.npz"))
    assert len(stored) == NUM_SUBJECTS
    monkeypatch.setattr(patch_reads, "_INDEXES", {})

    def refuse(*args, **kwargs):
        raise AssertionError("the class index was built again")

    monkeypatch.setattr(patch_reads, "build_class_index", refuse)
    _assert_batches_equal(_collect(iter(_queue(records, cache_dir=tmp_path))), first)
    # a damaged stored index is rebuilt (with a warning)
    stored[0].write_bytes(b"not an index")
    monkeypatch.undo()
    monkeypatch.setattr(patch_reads, "_INDEXES", {})
    _assert_batches_equal(_collect(iter(_queue(records, cache_dir=tmp_path))), first)


class _NoKey:
    """A region reader without ``cache_key`` (e.g. a minimal adapter)."""

    def __init__(self, reader):
        self._reader = reader
        self.shape, self.dtype, self.affine = reader.shape, reader.dtype, reader.affine

    def read(self, start, size):
        return self._reader.read(start, size)


def _opener_without_key(path, kind):
    return _NoKey(patch_reads.open_region(path, kind))


def test_readers_without_cache_key_build_each_index_once(records, tmp_path, monkeypatch):
    built = []
    real = patch_reads.build_class_index
    monkeypatch.setattr(
        patch_reads, "build_class_index", lambda reader, *a: built.append(reader) or real(reader, *a)
    )
    reference = _collect(iter(_queue(records, num_epochs=2)))
    batches = _collect(
        iter(_queue(records, num_epochs=2, patch_reads=_opener_without_key, cache_dir=tmp_path))
    )
    _assert_batches_equal(batches, reference)
    assert len(built) == 2 * NUM_SUBJECTS  # once per label file and opener, whatever the epochs
    assert not (tmp_path / "class-index").exists()  # no content key: nothing stored on disk


# --- Queue: determinism and resumption ------------------------------------------------------------


def test_patch_reads_same_batches_for_0_1_2_workers(records):
    options = dict(augmentation=RandomFlip(axes=(0, 1)), compilation_cache_dir=None)
    reference = _collect(iter(_queue(records, num_workers=0, **options)))
    assert len(reference) == 3
    _assert_batches_equal(_collect(iter(_queue(records, num_workers=1, **options))), reference)
    _assert_batches_equal(_collect(iter(_queue(records, num_workers=2, **options))), reference)


def test_patch_reads_are_deterministic_and_restorable(records):
    options = dict(augmentation=FLIP, num_epochs=2)
    first = _collect(iter(_queue(records, **options)))
    _assert_batches_equal(_collect(iter(_queue(records, **options))), first)
    other = _collect(iter(_queue(records, seed=6, **options)))
    assert not np.array_equal(first[0].metadata["location"], other[0].metadata["location"])
    iterator = iter(_queue(records, **options))
    _collect(iterator, limit=2)
    state = json.loads(json.dumps(iterator.get_state()))
    rest = _collect(iterator)
    restored = iter(_queue(records, **options))
    restored.set_state(state)
    _assert_batches_equal(_collect(restored), rest)
    _assert_batches_equal(first[2:], rest)


def test_max_memory_counts_regions_not_volumes(records, no_whole_reads):
    queue = _queue(records)
    patch = PATCH**3 * (4 + 1)  # float32 t1 + uint8 seg
    block = 64**3 * 1  # one class-index block of the uint8 label map
    per_subject = 3 * (patch + patch) + block  # 3 regions (no margin) and their patches
    expected = patch * (7 + 4) + 3 * patch + 1 * (2 + 1) * per_subject
    assert queue.get_max_memory() == expected
    flipped = _queue(records, augmentation=FLIP, patch_margin=1, num_workers=2)
    region = 8**3 * (4 + 4) * 2  # read and augmented, at least 4 bytes per voxel
    per_subject = 3 * (region + PATCH**3 * 8) + block
    assert flipped.get_max_memory() == PATCH**3 * 8 * (7 + 4 + 3) + 2 * 3 * per_subject


def test_a_truncated_file_names_the_subject_or_is_skipped(records, tmp_path, caplog):
    broken = _write_subjects(tmp_path, n=2)
    path = tmp_path / "t1_1.nii"
    path.write_bytes(path.read_bytes()[:1000])  # header intact, voxels cut
    with pytest.raises((RuntimeError, ValueError), match=r"subject 1 .*t1_1\.nii"):
        _collect(iter(_queue(broken, shuffle_subjects=False)))
    batches = _collect(iter(_queue(broken, skip_errors=True, batch_size=1)))
    assert {int(b.metadata["subject_index"][0]) for b in batches} == {0}
    # a missing file of the first subject is skipped too, not refused when the Queue is built
    missing = [{**broken[0], "seg": str(tmp_path / "gone.nii")}, broken[0]]
    batches = _collect(iter(_queue(missing, skip_errors=True, batch_size=1)))
    assert {int(b.metadata["subject_index"][0]) for b in batches} == {1}
    assert any("t1_1.nii" in r.getMessage() and "skip" in r.getMessage() for r in caplog.records)


# --- configuration errors ---------------------------------------------------------------------------


def test_patch_reads_refuse_what_needs_whole_volumes(records, tmp_path):
    with pytest.raises(ValueError, match=r"preprocessing=ToCanonical\(.*\) needs whole volumes"):
        _queue(records, preprocessing=jmed.transforms.ToCanonical())
    with pytest.raises(ValueError, match="sampler=WeightedSampler"):
        _queue(records, sampler=jmed.WeightedSampler(PATCH, "t1"))
    with pytest.raises(ValueError, match=r"patch_margin=2 needs patch_reads=True"):
        _queue(records, patch_reads=False, patch_margin=2)
    with pytest.raises(ValueError, match="patch_margin must be"):
        _queue(records, patch_margin=(1, 2))
    with pytest.raises(TypeError, match="patch_reads must be"):
        _queue(records, patch_reads="yes")
    compressed = _write_subjects(tmp_path, n=1, suffix=".nii.gz")
    with pytest.raises(ValueError, match=r"_0\.nii\.gz.*region-readable"):
        _queue(compressed)


def test_chunked_stores_give_the_batches_of_their_nifti_files(records, tmp_path):
    """NIfTI-Zarr copies of the subjects (``jmed.io.convert``) read by region give exactly the
    batches of the uncompressed ``.nii`` originals, label-balanced and augmented."""
    pytest.importorskip("zarr")
    stores = []
    for record in records:
        copy = dict(record)
        for name, kind in (("t1", "intensity"), ("seg", "label")):
            target = tmp_path / (os.path.basename(os.fspath(record[name])) + ".zarr")
            copy[name] = str(jmed.io.convert(record[name], target, kind=kind, chunks=8))
        stores.append(copy)
    options = dict(augmentation=FLIP, num_epochs=2)
    from_nifti = _collect(iter(_queue(records, **options)))
    from_stores = _collect(iter(_queue(stores, cache_dir=tmp_path / "cache", **options)))
    assert len(from_stores) == len(from_nifti) == 6
    _assert_batches_equal(from_stores, from_nifti)
    # the class index of each label store is kept in the cache folder, keyed by the store's
    # files: found again as it is, built again once a chunk changes
    assert len(list((tmp_path / "cache" / "class-index").glob("*.npz"))) == NUM_SUBJECTS
    key = patch_reads.open_region(stores[0]["seg"], "label").cache_key
    assert patch_reads.open_region(stores[0]["seg"], "label").cache_key == key
    store = Path(stores[0]["seg"])
    level_0 = [
        p for p in sorted(store.rglob("*")) if p.is_file() and p.relative_to(store).parts[:2] == ("0", "c")
    ]
    chunk = level_0[0]  # a chunk of the full-resolution labels
    os.utime(chunk, ns=(chunk.stat().st_atime_ns, chunk.stat().st_mtime_ns + 10**9))
    assert patch_reads.open_region(stores[0]["seg"], "label").cache_key != key
