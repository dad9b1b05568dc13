"""Smoke test of the benchmark runner: a tiny configuration writes both tables.

Timings are never asserted (shared machines); only that the runner completes, keeps the
selected cases and writes the JSON and the Markdown table with the documented columns.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COLUMNS = [
    "group",
    "case",
    "unit",
    "jmed ms",
    "compile s",
    "runs",
    "TorchIO ms",
    "TorchIO/jmed",
    "MONAI ms",
    "MONAI/jmed",
    "note",
]


def test_runner_writes_json_and_markdown(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JMED_BENCH_DATA": str(tmp_path / "absent")}
    command = [
        sys.executable,
        "-m",
        "benchmarks.run",
        "--quick",
        "--only",
        "ZNormalization",
        "RandomNoise",
        "--synthetic-shape",
        "24",
        "20",
        "16",
        "--output",
        str(tmp_path),
        "--name",
        "smoke",
    ]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    result = json.loads((tmp_path / "smoke.json").read_text())
    assert result["meta"]["quick"] is True
    assert result["meta"]["runs"] == 3
    assert "synthetic 24x20x16" in result["meta"]["volume"]
    assert result["meta"]["cores_available"] >= 1
    names = [row["case"] for row in result["rows"]]
    assert names == ["ZNormalization", "RandomNoise"], names
    for row in result["rows"]:
        assert row["jmed"]["median_ms"] > 0
        assert row["jmed"]["runs"] == 3
        assert row["jmed"]["compile_s"] >= 0
        for library in ("torchio", "monai"):
            assert library in row and f"{library}_over_jmed" in row
            if row[library]["median_ms"] is not None:
                ratio = row[library]["median_ms"] / row["jmed"]["median_ms"]
                assert abs(row[f"{library}_over_jmed"] - ratio) < 1e-9

    table = (tmp_path / "smoke.md").read_text().splitlines()
    assert table[0].startswith("# jmed benchmarks (--quick)")
    assert any(line.startswith("- machine:") for line in table)
    assert any(line.startswith("- suite: quick (--quick); date:") for line in table)
    header = next(i for i, line in enumerate(table) if line.startswith("| group"))
    assert [c.strip() for c in table[header].strip("|").split("|")] == COLUMNS
    body = [line for line in table[header + 2 :] if line.startswith("|")]
    assert len(body) == 2
    cells = [c.strip() for c in body[0].strip("|").split("|")]
    assert len(cells) == len(COLUMNS)
    assert cells[:2] == ["preprocessing", "ZNormalization"]
    assert float(cells[3]) >= 0


def test_update_readme_replaces_only_the_marked_table(tmp_path):
    from benchmarks.run import README_END, README_START, update_readme

    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n\nintro\n\n{README_START}\nold table\n{README_END}\n\n## after\n")
    update_readme(readme, "| a | b |\n|---|---|\n| 1 | 2 |\n")
    text = readme.read_text()
    assert "old table" not in text and "| 1 | 2 |" in text
    assert text.startswith("# title\n\nintro\n\n") and text.endswith("\n\n## after\n")
    bare = tmp_path / "BARE.md"
    bare.write_text("no markers")
    with pytest.raises(ValueError, match="no benchmark markers"):
        update_readme(bare, "x")
    assert bare.read_text() == "no markers"
