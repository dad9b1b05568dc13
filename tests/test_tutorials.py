"""The tutorials in docs/tutorials run as notebooks (jupytext percent scripts executed by
nbclient with the python3 kernel of this interpreter), on small data
(``JMED_TUTORIAL_SMALL=1``), and their rendered ``.ipynb`` match the scripts."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TUTORIALS = ROOT / "docs" / "tutorials"
SCRIPTS = sorted(TUTORIALS.glob("*.py"))

needs_runners = pytest.mark.skipif(
    any(
        importlib.util.find_spec(m) is None
        for m in ("jupytext", "nbclient", "ipykernel", "flax", "matplotlib")
    ),
    reason="jupytext, nbclient, ipykernel, flax and matplotlib run the tutorials",
)


def _execute(script: Path, workdir: Path, monkeypatch) -> object:
    import jupytext
    from nbclient import NotebookClient

    notebook = jupytext.read(script)
    monkeypatch.setenv("JMED_TUTORIAL_SMALL", "1")
    monkeypatch.setenv("PYTHONPATH", str(ROOT))  # this checkout's jmed
    monkeypatch.delenv("XLA_FLAGS", raising=False)  # one CPU device, as a user has
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    client = NotebookClient(
        notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(workdir)}}
    )
    client.execute()  # raises CellExecutionError naming the failing cell
    return notebook


def _text(notebook) -> str:
    parts = []
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            parts.append(output.get("text", ""))
            parts.append(str(output.get("data", {}).get("text/plain", "")))
    return "\n".join(parts)


def _pictures(notebook) -> int:
    return sum("image/png" in o.get("data", {}) for cell in notebook.cells for o in cell.get("outputs", []))


def test_there_are_tutorials():
    assert {p.stem for p in SCRIPTS} >= {"coming_from_torchio", "sliding_window_inference"}


@needs_runners
def test_coming_from_torchio(tmp_path, monkeypatch):
    notebook = _execute(TUTORIALS / "coming_from_torchio.py", tmp_path, monkeypatch)
    text = _text(notebook)
    assert "affine restored: True" in text and "shape restored: True" in text
    # the history in degrees and mm, one line per step of the composed augmentation
    assert re.search(r"RandomAffine\(scales=\(.*degrees=\(.*translation_mm=\(", text), text[:3000]
    assert "is not invertible" not in text  # apply_inverse_transform(warn=False)
    assert "(4, 16, 16, 16, 1) (4, 16, 16, 16, 1)" in text  # a Queue batch, channels last
    losses = re.search(r"\[([\d., ]+)\]\s*$", text.split("shape restored: True")[1], re.M)
    assert losses is not None and len(losses.group(1).split(",")) == 3, text[-2000:]
    assert _pictures(notebook) >= 3  # the figures show in the notebook


@needs_runners
def test_sliding_window_inference(tmp_path, monkeypatch):
    notebook = _execute(TUTORIALS / "sliding_window_inference.py", tmp_path, monkeypatch)
    text = _text(notebook)
    for case in ("case0", "case1", "case2"):
        assert f"{case}_seg.nii.gz" in text and f"{case}_qc.png" in text
    scores = [[float(v) for v in m.split()] for m in re.findall(r"Dice per class: \[([\d. ]+)\]", text)]
    assert len(scores) == 3, text[-2000:]
    # the tiny model, trained for a few steps, still segments the three classes
    assert all(min(s) > 0.5 for s in scores), scores
    assert _pictures(notebook) >= 1


@pytest.mark.skipif(importlib.util.find_spec("jupytext") is None, reason="jupytext reads the scripts")
@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.stem)
def test_rendered_notebook_matches_the_script(script):
    import jupytext

    rendered = script.with_suffix(".ipynb")
    assert rendered.is_file(), f"render it: jupytext --to ipynb {script.relative_to(ROOT)}"
    source = [(c.cell_type, c.source) for c in jupytext.read(script).cells]
    shown = [(c.cell_type, c.source) for c in jupytext.read(rendered).cells]
    assert source == shown, f"out of date: jupytext --to ipynb {script.relative_to(ROOT)}"
