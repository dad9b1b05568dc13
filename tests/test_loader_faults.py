"""Loader behaviour under faults: corrupt files, a killed worker, a full disk for the cache."""

import ast
import errno
import json
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

    if __name__ == "__main__":
        records = [{"t1": p} for p in sys.argv[1:]]
        loader = jmed.VolumeLoader(records, batch_size=1, num_workers=1, shuffle_subjects=False,
                                   preprocessing=KillWorkerAt(1), worker_buffer_size=1)
        seen = []
        try:
            for batch in loader:
                seen.append(int(batch.metadata["subject_index"][0]))
        except BaseException as err:
            print("RAISED", type(err).__name__, seen, flush=True)
            print("MESSAGE", err, flush=True)
            sys.exit(3)
        print("FINISHED", seen, flush=True)
    """
)


def _run_script(tmp_path, text, *args, name="script.py"):
    script = tmp_path / name
    script.write_text(text)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]),
        "JAX_PLATFORMS": "cpu",
    }
    return subprocess.run(
        [sys.executable, str(script), *args], capture_output=True, text=True, timeout=180, env=env
    )


def test_killed_worker_does_not_hang_and_names_the_subject(tmp_path):
    records = _write(tmp_path)
    try:
        proc = _run_script(tmp_path, KILL_SCRIPT, *[r["t1"] for r in records], name="kill.py")
    except subprocess.TimeoutExpired:
        pytest.fail("the loader hung after a worker was killed")
    out = proc.stdout + proc.stderr
    # grain notices the dead worker and raises in the main process
    assert proc.returncode == 3 and "RAISED RuntimeError" in proc.stdout, out[-3000:]
    assert "FINISHED" not in proc.stdout
    (message,) = [line for line in proc.stdout.splitlines() if line.startswith("MESSAGE")]
    # the worker was killed preparing subject 1; the subjects named are those not yet
    # delivered that it was preparing (an element it had queued dies with it)
    seen = ast.literal_eval(proc.stdout.split("RAISED RuntimeError ")[1].splitlines()[0])
    assert "t1_1.nii.gz" in message and "t1_3.nii.gz" not in message, message
    assert all(f"t1_{i}.nii.gz" not in message for i in seen), message
    assert "memory" in message and "num_workers" in message


NO_GUARD_SCRIPT = textwrap.dedent(
    """
    import sys
    import numpy as np
    import jmed

    subjects = [jmed.Subject(t1=jmed.Image(np.zeros((6, 5, 4, 1), np.float32), np.eye(4)))]
    queue = jmed.Queue(subjects, jmed.UniformSampler(2), 2, 2, num_workers=1,
                       compilation_cache_dir=None)
    for batch in queue:
        pass
    print("FINISHED", flush=True)
    """
)


def test_script_without_main_guard_gets_one_clear_error(tmp_path):
    proc = _run_script(tmp_path, NO_GUARD_SCRIPT, name="no_guard.py")
    assert proc.returncode != 0 and "FINISHED" not in proc.stdout, proc.stderr[-3000:]
    assert 'if __name__ == "__main__":' in proc.stderr, proc.stderr[-3000:]
    # one error from the main process, not one per worker
    assert proc.stderr.count("Traceback") == 1, proc.stderr[-3000:]
    assert "bootstrapping" not in proc.stderr


GUARDS = {
    "guarded": "if __name__ == '__main__':\n    {call}",
    "guarded, compound": "if __name__ == '__main__' and True:\n    {call}",
    "exit guard": "import sys\nif __name__ != '__main__':\n    sys.exit()\n{call}",
    "unguarded": "{call}",
    "guard elsewhere": "if __name__ == '__main__':\n    pass\n{call}",
}


@pytest.mark.parametrize("form", list(GUARDS))
def test_main_guard_check_reads_the_calling_line(tmp_path, form):
    guarded = not form.startswith(("unguarded", "guard elsewhere"))
    text = (
        "import jmed.data.processes\n"
        + GUARDS[form].format(call="jmed.data.processes._check_main_guard()")
        + "\n"
    )
    path = tmp_path / "main.py"
    path.write_text(text)
    main = type(sys)("__main__")
    main.__file__ = str(path)
    saved = sys.modules["__main__"]
    sys.modules["__main__"] = main
    try:
        code = compile(text, str(path), "exec")
        if guarded:
            exec(code, main.__dict__)
        else:
            with pytest.raises(RuntimeError, match=r'if __name__ == "__main__":'):
                exec(code, main.__dict__)
    finally:
        sys.modules["__main__"] = saved


LEAK_SCRIPT = textwrap.dedent(
    """
    import numpy as np
    import jmed

    if __name__ == "__main__":
        subjects = [
            jmed.Subject(t1=jmed.Image(np.full((12, 12, 12, 1), i, np.float32), np.eye(4)))
            for i in range(3)
        ]
        queue = jmed.Queue(subjects, jmed.UniformSampler(4), 4, 4, batch_size=2, num_workers=1,
                           compilation_cache_dir=None)
        print("BATCHES", sum(1 for _ in queue), flush=True)
        with iter(queue) as it:  # stopped early, as a training loop that counts steps
            next(it)
        kept = iter(queue)  # still open and referenced at exit
        next(kept)
    """
)


def test_no_leaked_shared_memory_at_exit(tmp_path):
    proc = _run_script(tmp_path, LEAK_SCRIPT, name="leak.py")
    assert proc.returncode == 0 and "BATCHES 6" in proc.stdout, proc.stderr[-3000:]
    assert "leaked shared_memory" not in proc.stderr, proc.stderr[-3000:]
    assert "Exception ignored" not in proc.stderr, proc.stderr[-3000:]


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("target", ["save", "rename"])
def test_full_disk_while_caching(tmp_path, monkeypatch, caplog, target):
    records = _write(tmp_path, n=2)
    cache = tmp_path / "cache"
    expected = _volumes(records)
    if target == "save":
        monkeypatch.setattr(jmed.data.cache.np, "save", _enospc)
    else:
        monkeypatch.setattr(jmed.data.cache.os, "rename", _enospc)
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


# --- records whose images do not share a grid ----------------------------------------------


def _misaligned(folder, how):
    """Subject 1's label map: shifted 30 mm, stored flipped front-to-back with a matching
    affine (same world content, another voxel grid), or of another shape."""
    records = _write(folder, n=3)
    seg_path = Path(records[1]["seg"])
    seg = np.asarray(nib.load(seg_path).dataobj)
    affine = np.eye(4)
    if how == "shifted":
        affine[1, 3] = 30.0
    elif how == "flipped":
        seg = seg[:, ::-1].copy()
        affine[1, 1], affine[1, 3] = -1.0, SHAPE[1] - 1
    else:
        seg = np.zeros((SHAPE[0] + 1, *SHAPE[1:]), np.uint8)
    nib.save(nib.Nifti1Image(seg, affine), seg_path)
    return records


def _queue(records, **kw):
    options = dict(
        sampler=jmed.UniformSampler(2),
        samples_per_volume=2,
        max_length=4,
        batch_size=2,
        seed=3,
        label_names="seg",
        shuffle_subjects=False,
        compilation_cache_dir=None,
        augmentation=jmed.transforms.RandomFlip(axes=(0, 1)),
    )
    return jmed.Queue(records, **{**options, **kw})


@pytest.mark.parametrize("how", ["shifted", "flipped", "shape"])
@pytest.mark.parametrize("buckets", ["auto", None])
def test_misaligned_subject_raises_naming_it(tmp_path, how, buckets):
    records = _misaligned(tmp_path, how)
    with pytest.raises(
        ValueError, match=r"subject 1 \(.*seg_1\.nii\.gz.*t1_1\.nii\.gz\).*voxel grid"
    ) as info:
        list(_queue(records, buckets=buckets))
    assert "RandomFlip" not in str(info.value)
    assert "Resample" in str(info.value)


@pytest.mark.parametrize("how", ["shifted", "flipped", "shape"])
def test_misaligned_subject_is_skipped_with_skip_errors(tmp_path, how, caplog):
    records = _misaligned(tmp_path, how)
    with caplog.at_level(logging.WARNING, logger="jmed.data"):
        batches = list(_queue(records, buckets=None, skip_errors=True))
    indices = np.concatenate([b.metadata["subject_index"] for b in batches])
    assert sorted(indices.tolist()) == [0, 0, 2, 2]
    assert any("seg_1.nii.gz" in r.getMessage() and "skip" in r.getMessage() for r in caplog.records)


def test_flipped_label_map_passes_after_canonical_preprocessing(tmp_path):
    records = _misaligned(tmp_path, "flipped")
    queue = _queue(records, buckets=None, preprocessing=jmed.transforms.ToCanonical(), augmentation=None)
    batches = list(queue)
    assert sum(len(b.metadata["subject_index"]) for b in batches) == 6
    reference = np.zeros(SHAPE, np.uint8)
    reference[1:4, 1:3, 1:3] = 1  # what _write stores, in the t1 grid
    for batch in batches:
        for k, location in enumerate(batch.metadata["location"]):
            i0, j0, k0, i1, j1, k1 = location
            np.testing.assert_array_equal(batch["seg"].data[k][..., 0], reference[i0:i1, j0:j1, k0:k1])


# --- resume with another worker count ------------------------------------------------------


def _patches(batches):
    return np.concatenate([np.asarray(b["t1"].data) for b in batches])


def test_resume_with_another_worker_count(tmp_path):
    records = _write(tmp_path, n=4)
    kw = dict(num_epochs=2, shuffle_subjects=True, max_length=6, augmentation=None)
    reference = list(_queue(records, **kw))
    assert len(reference) == 8
    for saved, restored in [(1, 2), (2, 0), (0, 2)]:
        first = iter(_queue(records, num_workers=saved, **kw))
        head = [next(first) for _ in range(3)]
        state = json.loads(json.dumps(first.get_state()))
        first.close()
        again = iter(_queue(records, num_workers=restored, **kw))
        again.set_state(state)
        rest = list(again)
        np.testing.assert_array_equal(
            _patches(head + rest), _patches(reference), err_msg=f"{saved}->{restored}"
        )


def test_state_in_an_unknown_layout_refuses_another_worker_count(tmp_path):
    records = _write(tmp_path, n=2)
    it = iter(_queue(records))
    state = {"format": jmed.data.state._STATE_FORMAT, "num_workers": 3, "pipeline": {"unknown": 1}}
    with pytest.raises(ValueError, match=r"num_workers=3.*num_workers=0"):
        it.set_state(state)
    it.close()


# --- decode cache validation ---------------------------------------------------------------


def _entry_of(cache, records, index):
    entries = [p for p in cache.iterdir() if p.name not in ("files",) and not p.name.startswith(".")]
    for entry in entries:
        info = json.loads((entry / "geometry.json").read_text())
        if info["images"]["t1"]["shape"]:
            data = np.load(entry / "t1.npy")
            want = np.asarray(nib.load(records[index]["t1"]).dataobj)
            if np.array_equal(data[..., 0], want):
                return entry
    raise AssertionError("no entry")


def _warned(caplog, text):
    return [r.getMessage() for r in caplog.records if text in r.getMessage()]


@pytest.mark.parametrize("damage", ["shape", "values", "truncated", "kind"])
def test_damaged_cache_entry_is_detected_and_rebuilt(tmp_path, caplog, damage):
    records = _write(tmp_path, n=2)
    cache = tmp_path / "cache"
    expected = _volumes(records, cache_dir=cache)
    entry = _entry_of(cache, records, 1)
    t1 = entry / "t1.npy"
    if damage == "shape":
        np.save(t1, np.zeros((2, 2, 2, 1), np.float32))
    elif damage == "values":
        np.save(t1, np.load(t1) + 1)
    elif damage == "truncated":
        t1.write_bytes(t1.read_bytes()[:100])
    else:
        geometry = json.loads((entry / "geometry.json").read_text())
        geometry["images"]["seg"]["kind"] = "intensity"
        (entry / "geometry.json").write_text(json.dumps(geometry))
    jmed.data.cache._VERIFIED.clear()  # as in a new run
    with caplog.at_level(logging.WARNING, logger="jmed.data"):
        got = _volumes(records, cache_dir=cache)
    for g, w in zip(got, expected, strict=True):
        np.testing.assert_array_equal(np.asarray(g["t1"].data), np.asarray(w["t1"].data))
        np.testing.assert_array_equal(np.asarray(g["seg"].data), np.asarray(w["seg"].data))
        assert g["seg"].kind == "label"
    assert _warned(caplog, str(entry)), [r.getMessage() for r in caplog.records]
    # repaired: the next run reads the rebuilt entry without a warning
    caplog.clear()
    jmed.data.cache._VERIFIED.clear()
    with caplog.at_level(logging.WARNING, logger="jmed.data"):
        _volumes(records, cache_dir=cache)
    assert not _warned(caplog, "cache"), [r.getMessage() for r in caplog.records]


def test_memo_pointing_at_another_subject_is_detected(tmp_path, caplog):
    records = _write(tmp_path, n=2)
    cache = tmp_path / "cache"
    expected = _volumes(records, cache_dir=cache)
    memos = {json.loads(p.read_text())["path"]: p for p in (cache / "files").iterdir()}
    memo_0 = json.loads(memos[str(Path(records[0]["t1"]).resolve())].read_text())
    memo_1_path = memos[str(Path(records[1]["t1"]).resolve())]
    memo_1 = json.loads(memo_1_path.read_text())
    memo_1["sha256"] = memo_0["sha256"]  # same size and mtime, another subject's digest
    memo_1_path.write_text(json.dumps(memo_1))
    with caplog.at_level(logging.WARNING, logger="jmed.data"):
        got = _volumes(records, cache_dir=cache)
    np.testing.assert_array_equal(np.asarray(got[1]["t1"].data), np.asarray(expected[1]["t1"].data))
    assert _warned(caplog, str(memo_1_path))


def test_read_only_cache_folder_warns_and_continues(tmp_path, monkeypatch, caplog):
    records = _write(tmp_path, n=2)
    expected = _volumes(records)
    cache = tmp_path / "cache"
    cache.mkdir()

    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(cache))

    # what a folder without write permission does (the tests may run as root)
    monkeypatch.setattr(jmed._atomic.tempfile, "mkstemp", refuse)
    monkeypatch.setattr(jmed._atomic.tempfile, "mkdtemp", refuse)
    monkeypatch.setattr(jmed.data.cache._Cache, "_warned", set())
    with caplog.at_level(logging.WARNING, logger="jmed.data"):
        got = _volumes(records, cache_dir=cache)
    for g, w in zip(got, expected, strict=True):
        np.testing.assert_array_equal(np.asarray(g["t1"].data), np.asarray(w["t1"].data))
    warnings = _warned(caplog, "without caching")
    assert len(warnings) == 1 and str(cache) in warnings[0], [r.getMessage() for r in caplog.records]
