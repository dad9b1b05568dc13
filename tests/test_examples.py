"""The examples run end to end in their ``--quick`` configuration (as subprocesses)."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"

pytest.importorskip("flax")
pytest.importorskip("optax")


def _run(script: str, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT), MPLBACKEND="Agg")
    env.pop("XLA_FLAGS", None)  # the examples choose their own device count
    return subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_brain_segmentation_quick(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "out"
    result = _run(
        "brain_segmentation.py", "--quick", "--data", "synthetic", "--devices", "2", "--output", str(out)
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 cpu device(s) for inference" in result.stdout  # --devices reached the mesh
    # Dice per class printed every epoch, finite
    dice = re.findall(r"Dice (GM|WM) ([-\d.naife]+)", result.stdout)
    assert {name for name, _ in dice} == {"GM", "WM"}, result.stdout
    assert all(math.isfinite(float(v)) and 0 <= float(v) <= 1 for _, v in dice), result.stdout

    prediction = nib.load(out / "prediction.nii.gz")
    validation = nib.load(out / "data" / "phantom2_t1.nii.gz")  # the held-out phantom
    # --quick: 24^3 phantoms at 4 mm, RAS already, a multiple of 4: the grid is unchanged
    assert prediction.shape[:3] == validation.shape[:3] == (24, 24, 24)
    np.testing.assert_allclose(prediction.affine, validation.affine, atol=1e-5)
    labels = np.asarray(prediction.dataobj)
    assert set(np.unique(labels).tolist()) <= {0, 1, 2}
    assert (out / "prediction.png").stat().st_size > 0

    # outputs are never overwritten without --overwrite
    again = _run("brain_segmentation.py", "--quick", "--data", "synthetic", "--output", str(out), timeout=60)
    assert again.returncode != 0
    assert "--overwrite" in again.stderr + again.stdout


def test_brain_segmentation_bad_flag(tmp_path):
    result = _run("brain_segmentation.py", "--patch-size", "30", "--output", str(tmp_path), timeout=60)
    assert result.returncode == 2
    assert "--patch-size must be a multiple of 4" in result.stderr and "30" in result.stderr
    result = _run("brain_segmentation.py", "--data", "ixi", timeout=60)
    assert result.returncode == 2 and "--data" in result.stderr and "ixi" in result.stderr
    assert not any(tmp_path.iterdir())  # nothing was written


def test_device_augmentation_quick():
    result = _run("device_augmentation.py", "--quick")
    assert result.returncode == 0, result.stdout + result.stderr
    match = re.search(r"first call \(compile \+ run\) ([\d.]+) s, then ([\d.]+) ms per step", result.stdout)
    assert match, result.stdout
    losses = [float(v) for v in re.findall(r"loss ([-\d.naife]+)", result.stdout)]
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses), result.stdout
