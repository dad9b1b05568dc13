"""The README's quick start runs as written."""

import re
from pathlib import Path

import numpy as np

README = Path(__file__).resolve().parents[1] / "README.md"


def test_quick_start_runs(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python block"
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(blocks[0], str(README), "exec"), namespace)
    subject, restored = namespace["subject"], namespace["restored"]
    assert (tmp_path / "t1.nii.gz").exists() and (tmp_path / "seg_augmented.nii.gz").exists()
    # the inverse undoes the geometry: labels come back where they were (up to interpolation)
    agreement = np.mean(np.asarray(restored["seg"].data) == np.asarray(subject["seg"].data))
    assert agreement > 0.9
