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

import numpy as np
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


def test_loader_rates_from_batch_arrivals():
    from benchmarks.bench_loader import rates

    arrivals = [2.0, 2.0, 2.0, 3.0, 4.0, 6.0, 7.0, 10.0]
    sizes = [4, 4, 4, 4, 4, 4, 4, 2]
    whole = rates(arrivals, sizes)
    assert whole["first_batch_s"] == 2.0
    # steady: batches after the first quarter (index 2), over 10 - 2 s
    assert whole["patches_per_s"] == pytest.approx((4 * 4 + 2) / 8)
    assert whole["overall_patches_per_s"] == pytest.approx(30 / 10)
    assert whole["patches"] == 30
    # a prefix: the batch completing 12 patches arrives at 2 s; 13 patches need the 4th
    assert rates(arrivals, sizes, 12)["overall_patches_per_s"] == pytest.approx(12 / 2)
    assert rates(arrivals, sizes, 13)["overall_patches_per_s"] == pytest.approx(16 / 3)
    assert rates(arrivals, sizes, 1000)["patches"] == 30


@pytest.mark.parametrize(
    ("shape_range", "fov_range"), [((150, 200), (150.0, 250.0)), ((48, 64), (48.0, 80.0))]
)
def test_heterogeneous_subjects_differ_in_shape_spacing_and_orientation(shape_range, fov_range):
    import nibabel as nib

    from benchmarks.bench_heterogeneous import SPACING_RANGE, subject_specs

    specs = subject_specs(12, shape_range, fov_range, seed=3)
    assert specs == subject_specs(12, shape_range, fov_range, seed=3)
    assert specs != subject_specs(12, shape_range, fov_range, seed=4)
    for key in ("shape", "spacing", "orientation"):
        assert len({spec[key] for spec in specs}) == 12, key
    anisotropic = 0
    for spec in specs:
        shape, spacing = np.array(spec["shape"]), np.array(spec["spacing"])
        assert np.all((shape >= shape_range[0]) & (shape <= shape_range[1])), spec
        assert np.all((spacing >= SPACING_RANGE[0]) & (spacing <= SPACING_RANGE[1])), spec
        fov = shape * spacing
        assert np.all((fov >= fov_range[0] - 1e-9) & (fov <= fov_range[1] + 1e-9)), spec
        anisotropic += len(set(spec["spacing"])) > 1
        # a valid code names each of the three anatomical axes once
        ornt = nib.orientations.axcodes2ornt(tuple(spec["orientation"]))
        assert sorted(ornt[:, 0].astype(int).tolist()) == [0, 1, 2], spec
    assert 0 < anisotropic < 12


def test_heterogeneous_shape_range_that_cannot_hold_the_fov_is_refused():
    from benchmarks.bench_heterogeneous import subject_specs

    with pytest.raises(ValueError, match="shape_range"):
        subject_specs(2, (10, 12), (100.0, 120.0))


_QUEUE_SCRIPT = """
import json
import sys

import jmed
from benchmarks import bench_heterogeneous

if __name__ == "__main__":
    folder, records = sys.argv[1], json.loads(sys.argv[2])
    bench_heterogeneous._record_compilations(folder, "main")
    bench_heterogeneous._count_compilations_in_workers(folder)
    queue = jmed.Queue(records, jmed.UniformSampler(8), 2, 4, batch_size=2, num_workers=2, label_names="seg",
                       compilation_cache_dir=folder + "/xla")
    print("batches", sum(1 for _ in queue))
"""


def test_heterogeneous_benchmark_counts_compilations_per_worker(tmp_path):
    """The listeners installed in grain's workers see every compilation JAX logs."""
    import nibabel as nib

    from benchmarks.bench_heterogeneous import LOGGED_COMPILATION, read_compilations

    records = []
    for i, shape in enumerate([(12, 14, 10), (10, 12, 16)]):  # one subject per worker
        rng = np.random.default_rng(i)
        record = {}
        for name, data in (
            ("t1", rng.random(shape, np.float32)),
            ("seg", rng.integers(0, 3, shape, np.uint8)),
        ):
            record[name] = str(tmp_path / f"{name}_{i}.nii.gz")
            nib.save(nib.Nifti1Image(data, np.eye(4)), record[name])
        records.append(record)
    script = tmp_path / "count_compilations.py"
    script.write_text(_QUEUE_SCRIPT)
    log = tmp_path / "compilations"
    log.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_LOG_COMPILES": "1"}
    done = subprocess.run(
        [sys.executable, str(script), str(log), json.dumps(records)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "batches 2" in done.stdout
    counted = read_compilations(log)
    assert set(counted) >= {"worker0", "worker1"}, counted
    assert counted["worker0"]["pid"] != counted["worker1"]["pid"]
    for role in ("worker0", "worker1"):
        assert counted[role]["compilations"] >= 1, counted  # each worker builds its programs
    # both shapes share one bucket: the program one worker compiled, the other loaded
    assert sum(counted[role]["cache_hits"] for role in ("worker0", "worker1")) >= 1, counted
    total = sum(c["compilations"] for c in counted.values())
    assert total == done.stderr.count(LOGGED_COMPILATION), (counted, done.stderr[-3000:])


def test_device_benchmark_splits_the_batch_over_emulated_devices():
    """Each device count runs in its own process, on that many devices, batch split evenly."""
    from benchmarks import bench_device
    from benchmarks.run import MODULES

    assert "bench_device" in MODULES
    config = bench_device.Config(volume=24, per_device=1, patch=16, num_patches=2)
    results = bench_device.run(config, runs=1, device_counts=(1, 2))
    assert sorted(results) == [1, 2]
    for n, r in results.items():
        assert r["devices"] == n and r["batch_size"] == n
        # the patches come out split like the volumes: one device's share each
        assert r["output_shards"] == n and r["patches_per_shard"] == config.num_patches
        assert r["median_s"] > 0 and r["volumes_per_s"] == pytest.approx(n / r["median_s"])
        assert r["per_device_volumes_per_s"] == pytest.approx(r["volumes_per_s"] / n)
    assert results[1]["scaling"] == pytest.approx(1.0)
    names = [case.name for case in bench_device.cases(quick=True)]
    assert len(names) == 4 and all("emulated CPU device" in name for name in names), names
