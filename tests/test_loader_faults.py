"""Loader behaviour under faults: corrupt files, a killed worker, a full disk for the cache."""

import errno
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from absl import flags

import jmed
import jmed.data

if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()

SHAPE = (6, 5, 4)
ROOT = Path(__file__).resolve().parents[1]


def _write(folder, n=4):
    records = []
    for i in range(n):
        t1 = np.random.default_rng(i).standard_normal(SHAPE).astype(np.float32) + i
        seg = np.zeros(SHAPE, np.uint8)
        seg[1:4, 1:3, 1:3] = 1
        nib.save(nib.Nifti1Image(t1, np.eye(4)), folder / f"t1_{i}.nii.gz")
        nib.save(nib.Nifti1Image(seg, np.eye(4)), folder / f"seg_{i}.nii.gz")
        records.append({"t1": str(folder / f"t1_{i}.nii.gz"), "seg": str(folder / f"seg_{i}.nii.gz")})
    return records


def _corrupt(path):
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: len(data) // 2])  # truncated gzip stream


def _volumes(records, **kw):
    loader = jmed.VolumeLoader(
        records, batch_size=1, shuffle_subjects=False, drop_last=False, label_names="seg", **kw
    )
    return list(iter(loader))


def test_corrupt_file_raises_naming_it(tmp_path):
    records = _write(tmp_path)
    _corrupt(records[2]["t1"])
    with pytest.raises(RuntimeError, match=r"subject 2.*t1_2\.nii\.gz"):
        _volumes(records)


def test_corrupt_file_is_skipped_with_skip_errors(tmp_path, caplog):
    records = _write(tmp_path)
    _corrupt(records[1]["seg"])
    with caplog.at_level(logging.WARNING, logger="jmed.data"):
        batches = _volumes(records, skip_errors=True)
    assert [int(b.metadata["subject_index"][0]) for b in batches] == [0, 2, 3]
    assert any("seg_1.nii.gz" in r.getMessage() for r in caplog.records)


def test_corrupt_file_in_worker_raises_naming_it(tmp_path):
    records = _write(tmp_path, n=3)
    _corrupt(records[1]["t1"])
    with pytest.raises(Exception, match=r"t1_1\.nii\.gz"):
        _volumes(records, num_workers=1)


KILL_SCRIPT = textwrap.dedent(
    """
    import sys
    from absl import flags
    flags.FLAGS.mark_as_parsed()
    import jmed
    from _helpers_reliability import KillWorkerAt

    records = [{"t1": p} for p in sys.argv[1:]]
    loader = jmed.VolumeLoader(records, batch_size=1, num_workers=1, shuffle_subjects=False,
                               preprocessing=KillWorkerAt(1))
    seen = []
    try:
        for batch in loader:
            seen.append(int(batch.metadata["subject_index"][0]))
    except BaseException as err:
        print("RAISED", type(err).__name__, seen, flush=True)
        sys.exit(3)
    print("FINISHED", seen, flush=True)
    """
)


def test_killed_worker_does_not_hang(tmp_path):
    records = _write(tmp_path)
    script = tmp_path / "kill.py"
    script.write_text(KILL_SCRIPT)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]),
        "JAX_PLATFORMS": "cpu",
    }
    try:
        proc = subprocess.run(
            [sys.executable, str(script), *[r["t1"] for r in records]],
            capture_output=True,
            text=True,
            timeout=180,
            env=env,
        )
    except subprocess.TimeoutExpired:
        pytest.fail("the loader hung after a worker was killed")
    out = proc.stdout + proc.stderr
    # grain notices the dead worker and raises in the main process
    assert proc.returncode == 3 and "RAISED" in proc.stdout, out[-3000:]
    assert "FINISHED" not in proc.stdout


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("target", ["save", "rename"])
def test_full_disk_while_caching(tmp_path, monkeypatch, caplog, target):
    records = _write(tmp_path, n=2)
    cache = tmp_path / "cache"
    expected = _volumes(records)
    if target == "save":
        monkeypatch.setattr(jmed.data.np, "save", _enospc)
    else:
        monkeypatch.setattr(jmed.data.os, "rename", _enospc)
    with caplog.at_level(logging.WARNING, logger="jmed.data"):
        batches = _volumes(records, cache_dir=cache)
    # documented fallback: the volumes are still delivered, uncached, with a warning
    for got, want in zip(batches, expected, strict=True):
        np.testing.assert_array_equal(np.asarray(got["t1"].data), np.asarray(want["t1"].data))
    assert any("cache" in r.getMessage() and "No space" in r.getMessage() for r in caplog.records)
    # no entry folder (complete or partial) and no temporary folder is left behind
    leftovers = [p for p in cache.iterdir() if p.name != "files"]
    assert leftovers == [], leftovers
    monkeypatch.undo()
    # a later run computes and stores complete entries
    again = _volumes(records, cache_dir=cache)
    entries = [p for p in cache.iterdir() if p.name != "files"]
    assert len(entries) == 2 and all((p / "geometry.json").exists() for p in entries)
    for got, want in zip(again, expected, strict=True):
        np.testing.assert_array_equal(np.asarray(got["t1"].data), np.asarray(want["t1"].data))


def test_partial_entry_without_geometry_is_recomputed(tmp_path):
    records = _write(tmp_path, n=1)
    cache = tmp_path / "cache"
    expected = _volumes(records, cache_dir=cache)
    (entry,) = [p for p in cache.iterdir() if p.name != "files"]
    # simulate an interrupted writer that left a data file but no geometry.json
    (entry / "geometry.json").unlink()
    np.save(entry / "t1.npy", np.zeros(3, np.float32))
    got = _volumes(records, cache_dir=cache)
    np.testing.assert_array_equal(np.asarray(got[0]["t1"].data), np.asarray(expected[0]["t1"].data))
    # the incomplete entry was replaced by a complete one
    assert (entry / "geometry.json").exists()
    np.testing.assert_array_equal(np.load(entry / "t1.npy"), np.asarray(expected[0]["t1"].data)[0])
