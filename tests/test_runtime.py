"""Host allocator tuning: large blocks come from the heap after the call."""

import subprocess
import sys
import textwrap

import pytest

import jmed
from jmed.runtime import _glibc

glibc_only = pytest.mark.skipif(_glibc() is None, reason="needs glibc")
# the probe reads mallinfo2 (glibc >= 2.33)
mallinfo2_only = pytest.mark.skipif(
    _glibc() is None or not hasattr(_glibc(), "mallinfo2"), reason="needs glibc >= 2.33 (mallinfo2)"
)

# Counts the blocks glibc has mmapped while a 64 MB NumPy array is alive.
_PROBE = textwrap.dedent(
    """
    import ctypes, sys
    import numpy as np
    import jmed

    class MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in
                    ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                     "fsmblks", "uordblks", "fordblks", "keepcost")]

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2
    if sys.argv[1] == "tune":
        assert jmed.tune_host_allocator() is True
    before = libc.mallinfo2().hblkhd
    a = np.ones(8 * 2**20)  # 64 MiB
    print(libc.mallinfo2().hblkhd - before)
    """
)


def _mapped_bytes(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, check=True)
    return int(out.stdout.strip())


@mallinfo2_only
def test_large_blocks_come_from_the_heap_after_tuning():
    assert _mapped_bytes("default") >= 64 * 2**20  # glibc's default: a fresh mapping
    assert _mapped_bytes("tune") == 0


@pytest.mark.parametrize("bad", [0, 2**20 - 1, 2**31, 1.5, True, "1GiB"])
def test_bad_threshold(bad):
    with pytest.raises(ValueError, match="threshold"):
        jmed.tune_host_allocator(bad)


def test_non_glibc_changes_nothing(monkeypatch):
    from jmed import runtime

    monkeypatch.setattr(runtime, "_glibc", lambda: None)
    monkeypatch.setattr(runtime, "_applied", None)
    assert jmed.tune_host_allocator(2**28) is False
    assert runtime.applied_threshold() is None


def test_loader_workers_follow_the_building_process(monkeypatch, tmp_path):
    import pickle

    from jmed import data, runtime

    subject = jmed.datasets.phantom(0, shape=(8, 8, 8))
    path = tmp_path / "t1.nii.gz"
    jmed.save(subject["t1"], path)
    source = data.SubjectsSource([{"t1": str(path)}])
    monkeypatch.setattr(runtime, "_applied", None)
    assert data._Load(source).allocator_threshold is None
    monkeypatch.setattr(runtime, "_applied", 2**28)  # as after tune_host_allocator(2**28)
    load = pickle.loads(pickle.dumps(data._Load(source)))  # as a spawned worker gets it
    monkeypatch.setattr(runtime, "_applied", None)  # a fresh worker process
    calls = []

    def tune(threshold):
        calls.append(threshold)
        runtime._applied = threshold
        return True

    monkeypatch.setattr(runtime, "tune_host_allocator", tune)
    for _ in range(2):
        assert load.map((0, 0))[1]["t1"].spatial_shape == (8, 8, 8)
    assert calls == [2**28]  # once per worker, not once per subject
