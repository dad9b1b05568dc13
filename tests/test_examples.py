"""The examples run end to end in their ``--quick`` configuration (as subprocesses).

Data-parallel training is checked against itself: the same seed on 1 and on 8 emulated
CPU devices (``XLA_FLAGS=--xla_force_host_platform_device_count=N``) must give the same
losses up to float rounding, with the batch really split over the 8 devices and the
weights replicated (each script prints where they live).
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from _processes import free_port, run_together

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"

pytest.importorskip("flax")
pytest.importorskip("optax")


def _run(
    script: str, *args: str, timeout: float = 240, devices: int | None = None
) -> subprocess.CompletedProcess:
    """Run an example; ``devices``: emulated CPU devices through ``XLA_FLAGS`` (else the
    script's own choice)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT), MPLBACKEND="Agg")
    env.pop("XLA_FLAGS", None)
    if devices is not None:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


SPLIT_8 = (
    "batch of 8 split over 8 device(s), 1 each; parameters and optimizer state replicated on 8 device(s)"
)
SPLIT_1 = (
    "batch of 8 split over 1 device(s), 8 each; parameters and optimizer state replicated on 1 device(s)"
)


def _assert_same_losses(one: list[float], eight: list[float]) -> None:
    assert len(one) == len(eight) and len(one) >= 3, (one, eight)
    assert all(math.isfinite(v) for v in one + eight), (one, eight)
    # the losses move (the steps change the weights and see other batches), so equal
    # lists are not an accident of a constant
    assert max(one) - min(one) > 1e-3, one
    np.testing.assert_allclose(eight, one, rtol=2e-4, atol=1e-5)


def test_brain_segmentation_quick_same_losses_on_1_and_8_devices(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "out"
    # --devices emulates the devices from the script itself
    eight = _run(
        "brain_segmentation.py", "--quick", "--data", "synthetic", "--devices", "8", "--batch-size", "8",
        "--output", str(out),
    )  # fmt: skip
    assert eight.returncode == 0, eight.stdout + eight.stderr
    assert "data-parallel on 8 cpu device(s)" in eight.stdout
    assert SPLIT_8 in eight.stdout, eight.stdout
    one = _run(
        "brain_segmentation.py", "--quick", "--data", "synthetic", "--batch-size", "8", "--output",
        str(tmp_path / "one"), devices=1,
    )  # fmt: skip
    assert one.returncode == 0, one.stdout + one.stderr
    assert SPLIT_1 in one.stdout, one.stdout

    history = {name: json.loads((tmp_path / name / "history.json").read_text()) for name in ("out", "one")}
    assert history["out"]["devices"] == 8 and history["one"]["devices"] == 1
    # 2 epochs x 2 steps
    _assert_same_losses(history["one"]["losses"], history["out"]["losses"])
    # validation (sliding windows split over the same mesh) agrees as well
    for a, b in zip(history["one"]["dice"], history["out"]["dice"]):
        assert a.keys() == b.keys() == {"GM", "WM"}
        for name in a:
            assert 0 <= a[name] <= 1 and abs(a[name] - b[name]) < 0.02, (a, b)
    # Dice per class printed every epoch, finite
    dice = re.findall(r"Dice (GM|WM) ([-\d.naife]+)", eight.stdout)
    assert {name for name, _ in dice} == {"GM", "WM"}, eight.stdout
    assert all(math.isfinite(float(v)) and 0 <= float(v) <= 1 for _, v in dice), eight.stdout

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
    result = _run("brain_segmentation.py", "--devices", "8", "--batch-size", "6", timeout=60)
    assert result.returncode == 2
    assert "--batch-size (6) must be a multiple of --devices (8)" in result.stderr, result.stderr
    assert not any(tmp_path.iterdir())  # nothing was written


def _step_losses(stdout: str) -> list[float]:
    return [float(v) for v in re.findall(r"^step \d+/\d+  loss ([-\d.naife]+)", stdout, flags=re.M)]


def test_device_augmentation_quick_same_losses_on_1_and_8_devices():
    eight = _run("device_augmentation.py", "--quick", "--batch-size", "8", devices=8)
    assert eight.returncode == 0, eight.stdout + eight.stderr
    assert SPLIT_8 in eight.stdout, eight.stdout
    match = re.search(r"first call \(compile \+ run\) ([\d.]+) s, then ([\d.]+) ms per step", eight.stdout)
    assert match, eight.stdout
    one = _run("device_augmentation.py", "--quick", "--batch-size", "8", devices=1)
    assert one.returncode == 0, one.stdout + one.stderr
    assert SPLIT_1 in one.stdout, one.stdout
    _assert_same_losses(_step_losses(one.stdout), _step_losses(eight.stdout))


def test_tpu_training_quick_on_8_emulated_devices(tmp_path):
    result = _run("tpu_training.py", "--quick", "--output", str(tmp_path), devices=8)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "1 process(es), 8 cpu device(s) (8 per process); global batch 8" in out, out
    assert SPLIT_8 in out, out
    # memory per device as XLA reports it, for the train step and the validation program
    for name in ("train step", "validation of a (24, 24, 24) volume"):
        match = re.search(rf"memory per device, {re.escape(name)}: ([\d.]+) MiB", out)
        assert match and float(match.group(1)) > 0, out
    history = json.loads((tmp_path / "history.json").read_text())
    assert len(history["losses"]) == 4 and all(math.isfinite(v) for v in history["losses"]), history
    assert history["memory"]["train_step"]["temporaries"] > 0
    assert len(history["dice"]) == 2 and all(0 <= d[c] <= 1 for d in history["dice"] for c in ("GM", "WM"))


def test_tpu_training_quick_in_two_processes():
    """``jax.distributed`` from the command line: 2 processes x 2 emulated devices, one mesh."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    address = f"127.0.0.1:{free_port()}"
    command = [sys.executable, EXAMPLES / "tpu_training.py", "--quick", "--epochs", "1"]
    command += ["--coordinator-address", address, "--num-processes", "2"]
    outputs = run_together(
        [[*command, "--process-id", str(i)] for i in range(2)], env=env, timeout=300, cwd=ROOT
    )
    assert "2 process(es) (jax.distributed), 4 cpu device(s) (2 per process); global batch 4" in outputs[0]
    assert (
        "batch of 4 split over 4 device(s), 1 each; parameters and optimizer state replicated on 4 device(s)"
        in outputs[0]
    ), outputs[0]
    losses = [
        json.loads(re.search(rf"^process {i}: losses (\[.*\])$", out, flags=re.M).group(1))
        for i, out in enumerate(outputs)
    ]
    # one global loss per step, the same in both processes
    assert len(losses[0]) == 2 and all(math.isfinite(v) for v in losses[0]), losses
    assert losses[0] == losses[1]
