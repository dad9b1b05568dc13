"""Chunked volumes: NIfTI-Zarr read and write, local, over HTTP on loopback and in memory://."""

from __future__ import annotations

import base64
import functools
import http.server
import os
import pathlib
import pickle
import subprocess
import sys
import threading
import uuid

import nibabel as nib
import numpy as np
import pytest

import jmed
from jmed import chunked

zarr = pytest.importorskip("zarr")
fsspec = pytest.importorskip("fsspec")

AFFINE = np.array([[0.0, -2.0, 0.0, 10.0], [1.5, 0.0, 0.0, -3.0], [0.0, 0.0, 3.0, 5.0], [0.0, 0.0, 0.0, 1.0]])


def _ct(tmp_path, shape=(40, 33, 21), name="ct.nii.gz"):
    """An int16 CT-like NIfTI with scaling, and nibabel's reading of it."""
    rng = np.random.default_rng(0)
    raw = (rng.standard_normal(shape) * 300).astype(np.int16)
    img = nib.Nifti1Image(raw, AFFINE)
    img.header.set_slope_inter(0.5, -1024.0)
    path = tmp_path / name
    nib.save(img, path)
    back = nib.load(path)
    return path, np.asarray(back.dataobj, dtype=np.float32), back.affine


def _labels(shape=(40, 33, 21)):
    rng = np.random.default_rng(1)
    return rng.integers(0, 4, shape).astype(np.uint8)


def _chunk_files(store):
    return sorted(p for p in (store / "0" / "c").rglob("*") if p.is_file())


# -- local ---------------------------------------------------------------------------------


def test_converted_store_equals_the_nifti_original(tmp_path):
    src, expected, affine = _ct(tmp_path)
    out = chunked.convert(src, tmp_path / "ct.nii.zarr", chunks=16)
    image = jmed.load(out)
    assert not image.is_loaded
    assert image.shape == (40, 33, 21, 1) and image.dtype == np.float32
    np.testing.assert_allclose(image.affine, affine, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(image.data)[..., 0], expected)
    # stored as the source's int16 with its scaling in the NIfTI header
    group = zarr.open_group(str(out), mode="r")
    assert group["0"].dtype == np.int16 and group["0"].shape == (21, 33, 40)
    header = nib.Nifti1Header.from_fileobj(
        __import__("io").BytesIO(np.asarray(group["nifti"][...]).tobytes())
    )
    assert header.get_slope_inter() == (0.5, -1024.0)
    assert header.get_data_shape() == (40, 33, 21)


def test_label_map_and_multichannel_round_trip(tmp_path):
    labels = _labels()
    jmed.save(jmed.LabelMap(labels, AFFINE), tmp_path / "seg.nii.zarr", chunks=16)
    back = jmed.load(tmp_path / "seg.nii.zarr", kind="label")
    assert back.dtype == np.uint8
    np.testing.assert_array_equal(np.asarray(back.data)[..., 0], labels)
    np.testing.assert_allclose(back.affine, AFFINE)
    data = np.random.default_rng(3).standard_normal((9, 8, 7, 3)).astype(np.float32)
    jmed.save(jmed.Image(data, AFFINE), tmp_path / "multi.nii.zarr", chunks=4)
    back = jmed.load(tmp_path / "multi.nii.zarr")
    np.testing.assert_array_equal(np.asarray(back.data), data)
    np.testing.assert_array_equal(back.read_region((3, 2, 1), (4, 4, 4)), data[3:7, 2:6, 1:5])
    assert zarr.open_group(str(tmp_path / "multi.nii.zarr"), mode="r")["0"].shape == (1, 3, 7, 8, 9)


def test_zarr_v2_store_round_trips(tmp_path):
    data = np.random.default_rng(4).standard_normal((10, 11, 12)).astype(np.float32)
    path = chunked.save(jmed.ScalarImage(data, AFFINE), tmp_path / "v2.nii.zarr", chunks=5, zarr_format=2)
    assert (path / ".zattrs").exists() and (path / "0" / ".zarray").exists()
    back = jmed.load(path)
    np.testing.assert_array_equal(np.asarray(back.data)[..., 0], data)
    np.testing.assert_allclose(back.affine, AFFINE)


def test_region_reads_only_the_chunks_it_touches_and_pads_outside(tmp_path, monkeypatch):
    src, expected, _ = _ct(tmp_path)
    store = chunked.convert(src, tmp_path / "ct.nii.zarr", chunks=16)
    image = jmed.load(store)
    opened = []
    real_read_bytes = pathlib.Path.read_bytes

    def counting_read_bytes(self):
        if "c" in self.parts:  # chunk files, not metadata
            opened.append(self)
        return real_read_bytes(self)

    monkeypatch.setattr(pathlib.Path, "read_bytes", counting_read_bytes)
    box = image.read_region((17, 1, 2), (10, 12, 9))  # one chunk: x 16..31, y 0..15, z 0..15
    np.testing.assert_array_equal(box[..., 0], expected[17:27, 1:13, 2:11])
    assert [p.relative_to(store).as_posix() for p in opened] == ["0/c/0/0/1"]
    opened.clear()
    box = image.read_region((30, -3, 10), (16, 16, 16))  # partly outside: zero-filled
    want = np.zeros((16, 16, 16), np.float32)
    want[:10, 3:, :11] = expected[30:, :13, 10:]
    np.testing.assert_array_equal(box[..., 0], want)
    # x 30..39 -> chunks 1, 2; y 0..12 -> chunk 0; z 10..20 -> chunks 0, 1
    assert len(opened) == 4
    assert not image.is_loaded
    assert image.read_region((100, 100, 100), 2).tolist() == np.zeros((2, 2, 2, 1)).tolist()


def test_pyramid_levels_average_intensities_and_keep_world_positions(tmp_path):
    data = np.random.default_rng(5).standard_normal((9, 8, 5)).astype(np.float32)
    path = jmed.save(jmed.ScalarImage(data, AFFINE), tmp_path / "p.nii.zarr", chunks=4)
    image = jmed.load(path)
    assert chunked.num_levels(image) == 3
    level1 = chunked.pyramid_level(image, 1)
    assert level1.shape == (5, 4, 3, 1)
    padded = np.full((10, 8, 6), np.nan)
    padded[:9, :8, :5] = data
    want = np.nanmean(padded.reshape(5, 2, 4, 2, 3, 2), axis=(1, 3, 5))
    np.testing.assert_allclose(np.asarray(level1.data)[..., 0], want, rtol=1e-6, atol=1e-6)
    # voxel 0 of level 1 sits at the centre of voxels 0..1 of level 0
    np.testing.assert_allclose(level1.affine @ [0, 0, 0, 1], image.affine @ [0.5, 0.5, 0.5, 1])
    np.testing.assert_allclose(level1.affine[:3, :3], image.affine[:3, :3] * 2)
    assert jmed.load(path, level=2).shape == (3, 2, 2, 1)
    with pytest.raises(ValueError, match="level"):
        chunked.pyramid_level(image, 3)


def test_label_pyramid_takes_the_most_frequent_label():
    block = np.array([3, 3, 1, 1, 1, 2, 2, 2], np.int16).reshape(2, 2, 2, 1)
    assert chunked._downsample(block, (2, 2, 2), jmed.LABEL).ravel().tolist() == [1]  # tie 1/2 -> 1
    block = np.array([5, 5, 5, 0, 0, 7, 7, 7], np.int16).reshape(2, 2, 2, 1)
    assert chunked._downsample(block, (2, 2, 2), jmed.LABEL).ravel().tolist() == [5]
    edge = np.array([4, 9, 9], np.int16).reshape(3, 1, 1, 1)  # last block holds one voxel
    assert chunked._downsample(edge, (2, 1, 1), jmed.LABEL).ravel().tolist() == [4, 9]


def test_chunk_class_index_stored_and_estimated(tmp_path):
    labels = np.zeros((32, 32, 16), np.uint8)
    labels[:16, :16] = 1
    labels[20:32, 16:32, 8:16] = 2
    labels[3, 3, 3] = 7  # one voxel: exact index only
    path = jmed.save(jmed.LabelMap(labels, AFFINE), tmp_path / "s.nii.zarr", chunks=8)
    image = jmed.load(path, kind="label")
    index = chunked.chunk_class_index(image)
    assert index.exact and index.chunk_shape == (8, 8, 8) and index.grid == (4, 4, 2)
    want = np.zeros((4, 4, 2, 4), np.int64)
    for i, j, k in np.ndindex(4, 4, 2):
        values, counts = np.unique(
            labels[i * 8 : i * 8 + 8, j * 8 : j * 8 + 8, k * 8 : k * 8 + 8], return_counts=True
        )
        want[i, j, k, np.searchsorted([0, 1, 2, 7], values)] = counts
    assert index.labels.tolist() == [0, 1, 2, 7]
    np.testing.assert_array_equal(index.counts, want)
    np.testing.assert_array_equal(index.chunks_with(7), [[0, 0, 0]])
    assert index.box((3, 3, 1)) == ((24, 24, 8), (8, 8, 8))
    assert not image.is_loaded
    estimate = chunked.chunk_class_index(image, level=1)
    assert not estimate.exact and estimate.counts.sum() == labels.size
    assert 7 not in estimate.labels.tolist()
    assert {tuple(c) for c in estimate.chunks_with(2)} == {tuple(c) for c in index.chunks_with(2)}
    # the same index computed region by region from a NIfTI file
    nib.save(nib.Nifti1Image(labels, AFFINE), tmp_path / "s.nii")
    scanned = chunked.chunk_class_index(jmed.load(tmp_path / "s.nii", kind="label", lazy=True), chunks=8)
    np.testing.assert_array_equal(scanned.counts, want)
    with pytest.raises(ValueError, match="label map"):
        chunked.chunk_class_index(jmed.load(path))


def test_save_streams_a_lazy_source_without_loading_it(tmp_path):
    src, expected, _ = _ct(tmp_path, name="ct.nii")
    lazy = jmed.load(src, lazy=True)
    out = jmed.save(lazy, tmp_path / "ct.nii.zarr", chunks=8)
    assert not lazy.is_loaded
    np.testing.assert_array_equal(np.asarray(jmed.load(out).data)[..., 0], expected)


def test_convert_back_to_nifti_and_progress(tmp_path, capsys):
    src, expected, affine = _ct(tmp_path)
    store = chunked.convert(src, tmp_path / "ct.nii.zarr", chunks=16, progress=True)
    assert "convert" in capsys.readouterr().err
    back = chunked.convert(store, tmp_path / "back.nii.gz")
    np.testing.assert_array_equal(np.asarray(nib.load(back).dataobj, dtype=np.float32), expected)
    np.testing.assert_allclose(nib.load(back).affine, affine, atol=1e-5)


def test_ome_zarr_and_plain_zarr_with_an_affine(tmp_path):
    data = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)  # (x, y, z)
    group = zarr.create_group(str(tmp_path / "ome.zarr"))
    array = group.create_array("s0", shape=(6, 5, 4), chunks=(2, 2, 2), dtype="float32")
    array[...] = data.transpose(2, 1, 0)
    axes = [{"name": n, "type": "space", "unit": "micrometer"} for n in "zyx"]
    transforms = [
        {"type": "scale", "scale": [3000.0, 2000.0, 1000.0]},
        {"type": "translation", "translation": [5, 6, 7]},
    ]
    group.attrs["ome"] = {
        "version": "0.5",
        "multiscales": [
            {"axes": axes, "datasets": [{"path": "s0", "coordinateTransformations": transforms}]}
        ],
    }
    image = jmed.load(tmp_path / "ome.zarr")
    np.testing.assert_array_equal(np.asarray(image.data)[..., 0], data)
    want = np.diag([1.0, 2.0, 3.0, 1.0])
    want[:3, 3] = [0.007, 0.006, 0.005]
    np.testing.assert_allclose(image.affine, want)
    plain = zarr.create_array(
        str(tmp_path / "plain.zarr"), shape=(4, 5, 6), chunks=(2, 2, 2), dtype="float32"
    )
    plain[...] = data
    plain.attrs["affine"] = AFFINE.tolist()
    image = jmed.load(tmp_path / "plain.zarr")
    np.testing.assert_array_equal(image.read_region((1, 1, 1), (2, 3, 4))[..., 0], data[1:3, 1:4, 1:5])
    np.testing.assert_allclose(image.affine, AFFINE)


def test_incremental_writer_commits_atomically(tmp_path):
    target = tmp_path / "acc.nii.zarr"
    writer = chunked.ChunkedWriter(target, (10, 9, 8), np.float32, AFFINE, chunks=4, levels=2)
    writer.write_region((0, 0, 0), np.ones((5, 5, 5), np.float32))
    writer.write_region((3, 3, 3), writer.read_region((3, 3, 3), (4, 4, 4)) + 2)
    assert not target.exists()  # nothing at the target before commit
    assert [p.name for p in tmp_path.iterdir()][0].startswith(".jmed-")
    writer.commit()
    want = np.zeros((10, 9, 8), np.float32)
    want[:5, :5, :5] = 1
    want[3:7, 3:7, 3:7] += 2
    np.testing.assert_array_equal(np.asarray(jmed.load(target).data)[..., 0], want)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["acc.nii.zarr"]
    with pytest.raises(FileExistsError, match="overwrite=True"):
        chunked.ChunkedWriter(target, (2, 2, 2), np.float32, AFFINE)
    with pytest.raises(RuntimeError, match="boom"):
        with chunked.ChunkedWriter(target, (2, 2, 2), np.float32, AFFINE, overwrite=True) as w:
            w.write_region((0, 0, 0), np.full((2, 2, 2), 9, np.float32))
            raise RuntimeError("boom")
    np.testing.assert_array_equal(np.asarray(jmed.load(target).data)[..., 0], want)  # old store intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["acc.nii.zarr"]
    with chunked.ChunkedWriter(target, (2, 2, 2), np.int16, AFFINE, overwrite=True) as w:
        w.write_region((0, 0, 0), np.full((2, 2, 2), 9, np.int16))
    assert np.asarray(jmed.load(target, kind="label").data).tolist() == np.full((2, 2, 2, 1), 9).tolist()
    with pytest.raises(ValueError, match="leaves the volume"):
        chunked.ChunkedWriter(tmp_path / "x.nii.zarr", (2, 2, 2), np.float32, AFFINE).write_region(
            (1, 0, 0), np.zeros((2, 2, 2))
        )


# -- remote --------------------------------------------------------------------------------


class _CountingHandler(http.server.SimpleHTTPRequestHandler):
    requests: list[str] = []

    def do_GET(self):  # noqa: N802 - http.server's name
        type(self).requests.append(self.path)
        super().do_GET()

    def log_message(self, *args):
        pass


@pytest.fixture
def http_root(tmp_path):
    handler = type("Handler", (_CountingHandler,), {"requests": []})
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(handler, directory=str(tmp_path))
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", handler.requests
    finally:
        server.shutdown()
        server.server_close()


def test_http_store_reads_only_the_needed_chunks(tmp_path, http_root):
    pytest.importorskip("aiohttp")
    base, requests = http_root
    src, expected, affine = _ct(tmp_path)
    chunked.convert(src, tmp_path / "ct.nii.zarr", chunks=16)
    image = jmed.load(f"{base}/ct.nii.zarr")
    np.testing.assert_allclose(image.affine, affine, atol=1e-6)
    assert not any("/0/c/" in r for r in requests)  # the header only
    requests.clear()
    box = image.read_region((17, 1, 2), (10, 12, 9))
    np.testing.assert_array_equal(box[..., 0], expected[17:27, 1:13, 2:11])
    assert [r for r in requests if "/c/" in r] == ["/ct.nii.zarr/0/c/0/0/1"]
    requests.clear()
    box = image.read_region((0, 0, 0), (20, 20, 1))  # x chunks 0, 1; y chunks 0, 1; z chunk 0
    np.testing.assert_array_equal(box[..., 0], expected[:20, :20, :1])
    assert sorted(r for r in requests if "/c/" in r) == [
        f"/ct.nii.zarr/0/c/0/{j}/{i}" for j in (0, 1) for i in (0, 1)
    ]
    requests.clear()
    np.testing.assert_array_equal(np.asarray(image.data)[..., 0], expected)
    assert (
        len([r for r in requests if "/0/c/" in r]) == len(_chunk_files(tmp_path / "ct.nii.zarr")) == 2 * 3 * 3
    )


def test_http_missing_store_is_a_clear_error(http_root):
    pytest.importorskip("aiohttp")
    base, _ = http_root
    with pytest.raises(FileNotFoundError, match="missing.nii.zarr"):
        jmed.load(f"{base}/missing.nii.zarr")


def test_memory_filesystem_store(tmp_path):
    src, expected, affine = _ct(tmp_path)
    store = chunked.convert(src, tmp_path / "ct.nii.zarr", chunks=16)
    name = f"jmed-{uuid.uuid4().hex}"
    memory = fsspec.filesystem("memory")
    memory.put(str(store), f"/{name}/ct.nii.zarr", recursive=True)
    try:
        image = jmed.load(f"memory://{name}/ct.nii.zarr")
        np.testing.assert_allclose(image.affine, affine, atol=1e-6)
        np.testing.assert_array_equal(
            image.read_region((5, 6, 7), (20, 20, 3))[..., 0], expected[5:25, 6:26, 7:10]
        )
        np.testing.assert_array_equal(np.asarray(image.data)[..., 0], expected)
        with pytest.raises(ValueError, match="local folders only"):
            jmed.save(image, f"memory://{name}/copy.nii.zarr")
    finally:
        memory.rm(f"/{name}", recursive=True)


# -- bad input -----------------------------------------------------------------------------


def test_missing_store_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.nii.zarr"):
        jmed.load(tmp_path / "nope.nii.zarr")


def test_corrupt_chunk_names_the_store(tmp_path):
    src, expected, _ = _ct(tmp_path)
    store = chunked.convert(src, tmp_path / "ct.nii.zarr", chunks=16)
    (store / "0" / "c" / "1" / "1" / "1").write_bytes(b"not a blosc frame")
    image = jmed.load(store)  # the header is fine
    np.testing.assert_array_equal(image.read_region((0, 0, 0), 16)[..., 0], expected[:16, :16, :16])
    with pytest.raises(ValueError, match=r"ct\.nii\.zarr.*corrupt chunk"):
        image.read_region((16, 16, 16), 4)
    with pytest.raises(ValueError, match=r"ct\.nii\.zarr"):
        image.data  # noqa: B018


def test_header_that_disagrees_with_the_array_names_the_store(tmp_path):
    store = jmed.save(jmed.ScalarImage(np.zeros((6, 7, 8), np.float32)), tmp_path / "bad.nii.zarr", chunks=4)
    header = nib.Nifti1Header()
    header.set_data_shape((6, 7, 9))
    header.set_data_dtype(np.float32)
    group = zarr.open_group(str(store), mode="r+")
    group["nifti"][...] = np.frombuffer(header.binaryblock, np.uint8)
    with pytest.raises(ValueError, match=r"bad\.nii\.zarr.*header and the array disagree"):
        jmed.load(store)


def test_not_a_volume_and_bad_arguments(tmp_path):
    zarr.create_group(str(tmp_path / "empty.zarr"))
    with pytest.raises(ValueError, match=r"empty\.zarr.*multiscales"):
        jmed.load(tmp_path / "empty.zarr")
    (tmp_path / "file.zarr").write_text("x")
    with pytest.raises(ValueError, match=r"file\.zarr"):
        jmed.load(tmp_path / "file.zarr")
    image = jmed.ScalarImage(np.zeros((4, 4, 4), np.float32))
    jmed.save(image, tmp_path / "a.nii.zarr")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        jmed.save(image, tmp_path / "a.nii.zarr")
    jmed.save(jmed.ScalarImage(np.ones((4, 4, 4), np.float32)), tmp_path / "a.nii.zarr", overwrite=True)
    assert float(np.asarray(jmed.load(tmp_path / "a.nii.zarr").data).min()) == 1.0
    with pytest.raises(ValueError, match="chunks"):
        jmed.save(image, tmp_path / "b.nii.zarr", chunks=0)
    with pytest.raises(ValueError, match="chunks and levels"):
        jmed.save(image, tmp_path / "b.nii.gz", chunks=8)
    with pytest.raises(ValueError, match="level"):
        jmed.load(tmp_path / "a.nii.zarr", level=5)
    with pytest.raises(ValueError, match="single-resolution"):
        jmed.load(tmp_path / "x.nii", level=1)


def test_import_jmed_does_not_import_zarr_and_a_missing_extra_says_what_to_install(tmp_path, monkeypatch):
    code = "import jmed, sys; print(sorted(m for m in ('zarr', 'fsspec', 'aiohttp') if m in sys.modules))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=os.getcwd()
    )
    assert out.stdout.strip() == "[]"
    monkeypatch.setitem(sys.modules, "zarr", None)
    with pytest.raises(ImportError, match=r'pip install "jmed\[zarr\]"'):
        jmed.load(tmp_path / "x.nii.zarr")


def test_remote_nifti_files_memory_and_http(tmp_path, http_root):
    pytest.importorskip("aiohttp")
    base, requests = http_root
    gz, expected, affine = _ct(tmp_path)
    plain, _, _ = _ct(tmp_path, name="ct.nii")
    image = jmed.load(f"{base}/ct.nii.gz")
    np.testing.assert_allclose(image.affine, affine, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(image.data)[..., 0], expected)
    name = f"jmed-{uuid.uuid4().hex}"
    memory = fsspec.filesystem("memory")
    memory.put(str(plain), f"/{name}/ct.nii")
    try:
        image = jmed.load(f"memory://{name}/ct.nii", lazy=True)
        assert image._data.reads_regions  # byte ranges of the remote file
        np.testing.assert_array_equal(
            image.read_region((3, 4, 5), (6, 7, 8))[..., 0], expected[3:9, 4:11, 5:13]
        )
        assert not image.is_loaded
        with pytest.raises(FileNotFoundError, match="none.nii"):
            jmed.load(f"memory://{name}/none.nii")
    finally:
        memory.rm(f"/{name}", recursive=True)
    with pytest.raises(ValueError, match="remote files"):
        jmed.load(f"{base}/ct.mgz")


def test_a_lazy_store_image_pickles_and_reopens(tmp_path):
    data = np.random.default_rng(7).standard_normal((9, 8, 7)).astype(np.float32)
    path = jmed.save(jmed.ScalarImage(data, AFFINE), tmp_path / "p.nii.zarr", chunks=4)
    image = pickle.loads(pickle.dumps(jmed.load(path)))
    assert not image.is_loaded
    np.testing.assert_array_equal(image.read_region((1, 2, 3), (4, 4, 4))[..., 0], data[1:5, 2:6, 3:7])
    np.testing.assert_allclose(image.affine, AFFINE)


def test_draft_store_with_a_base64_header_in_the_attributes(tmp_path):
    data = np.random.default_rng(8).standard_normal((6, 5, 4)).astype(np.float32)
    path = chunked.save(jmed.ScalarImage(data, AFFINE), tmp_path / "d.nii.zarr", chunks=4, zarr_format=2)
    group = zarr.open_group(str(path), mode="r+")
    header = np.asarray(group["nifti"][...]).tobytes()
    del group["nifti"]
    group.attrs["nifti"] = {"base64": base64.b64encode(header).decode()}
    image = jmed.load(path)
    np.testing.assert_allclose(image.affine, AFFINE)
    np.testing.assert_array_equal(np.asarray(image.data)[..., 0], data)


def test_convert_inflates_a_gzipped_file_once(tmp_path, monkeypatch):
    """Slabs are read in file order from one open file: the number of times the .nii.gz is
    opened does not grow with the number of slabs."""
    import gzip

    data = np.random.default_rng(7).integers(-1000, 1000, (12, 10, 24)).astype(np.int16)
    source = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(data, np.eye(4)), source)
    opened = []
    init = gzip.GzipFile.__init__

    def counting_init(self, *args, **kwargs):
        opened.append(1)
        init(self, *args, **kwargs)

    monkeypatch.setattr(gzip.GzipFile, "__init__", counting_init)
    counts = {}
    for chunks in (12, 2):  # 2 slabs, then 12 slabs
        opened.clear()
        out = jmed.io.convert(source, tmp_path / f"ct{chunks}.nii.zarr", chunks=chunks, levels=1)
        counts[chunks] = len(opened)
        np.testing.assert_array_equal(np.asarray(jmed.load(out).data)[..., 0], data.astype(np.float32))
    assert counts[2] == counts[12], counts
