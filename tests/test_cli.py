import os
import subprocess
import sys

import jax
import nibabel as nib
import numpy as np
import pytest
from nibabel.testing import data_path

import jmed
from jmed import cli

ANAT = os.path.join(data_path, "anatomical.nii")


def _jmed(*args, cwd=None):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    return subprocess.run(
        [sys.executable, "-m", "jmed.cli", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=300,
    )


def test_parse_kwargs():
    assert cli.parse_kwargs('degrees=10 scales=(0.9, 1.1) mode=linear axes=[0, 1] name="a b"') == {
        "degrees": 10,
        "scales": (0.9, 1.1),
        "mode": "linear",
        "axes": [0, 1],
        "name": "a b",
    }
    with pytest.raises(cli.CommandError, match="NAME=VALUE"):
        cli.parse_kwargs("degrees")


def test_info_prints_header_and_stats():
    result = _jmed("info", ANAT, "--stats")
    assert result.returncode == 0, result.stderr
    ref = nib.load(ANAT)
    assert "(33, 41, 25, 1)" in result.stdout
    assert "orientation: LAS" in result.stdout
    data = ref.get_fdata()
    assert f"max {data.max():.6g}" in result.stdout


def test_transform_matches_python_api(tmp_path):
    out = tmp_path / "noisy.nii.gz"
    result = _jmed("transform", ANAT, out, "RandomNoise", "--kwargs", "std=(0.5, 1.0)", "--seed", "3")
    assert result.returncode == 0, result.stderr
    expected = jmed.transforms.RandomNoise(std=(0.5, 1.0))(jax.random.key(3), jmed.load(ANAT))
    np.testing.assert_allclose(np.asarray(jmed.load(out).data), np.asarray(expected.data), atol=1e-5)
    # deterministic transform, no seed needed
    out2 = tmp_path / "rescaled.nii"
    result = _jmed("transform", ANAT, out2, "RescaleIntensity", "--kwargs", "out_min_max=(0, 1)")
    assert result.returncode == 0, result.stderr
    data = np.asarray(jmed.load(out2).data)
    assert data.min() == pytest.approx(0) and data.max() == pytest.approx(1)


def test_transform_bad_input(tmp_path):
    missing = _jmed("transform", tmp_path / "nope.nii", tmp_path / "o.nii", "RandomNoise")
    assert missing.returncode == 1 and "nope.nii" in missing.stderr
    bad_name = _jmed("transform", ANAT, tmp_path / "o.nii", "RandomBanana")
    assert bad_name.returncode == 1 and "unknown transform 'RandomBanana'" in bad_name.stderr
    assert "RandomNoise" in bad_name.stderr  # lists what is available
    bad_kwargs = _jmed("transform", ANAT, tmp_path / "o.nii", "RandomNoise", "--kwargs", "std=-1")
    assert bad_kwargs.returncode == 1 and "std" in bad_kwargs.stderr
    unknown_kwarg = _jmed("transform", ANAT, tmp_path / "o.nii", "RandomNoise", "--kwargs", "colour=3")
    assert unknown_kwarg.returncode == 1 and "colour" in unknown_kwarg.stderr
    usage = _jmed("transform", ANAT)
    assert usage.returncode == 2 and "jmed transform --help" in usage.stderr
    assert len(usage.stderr.splitlines()) == 1, usage.stderr


def test_transform_never_overwrites_input(tmp_path):
    copy = tmp_path / "input.nii"
    copy.write_bytes(open(ANAT, "rb").read())
    before = copy.read_bytes()
    result = _jmed("transform", copy, copy, "RandomNoise", "--overwrite")
    assert result.returncode == 1 and "is the input file" in result.stderr
    assert copy.read_bytes() == before
    existing = tmp_path / "existing.nii"
    existing.write_bytes(b"keep me")
    result = _jmed("transform", copy, existing, "RandomNoise")
    assert result.returncode == 1 and "pass --overwrite" in result.stderr
    assert "overwrite=True" not in result.stderr
    assert existing.read_bytes() == b"keep me"


def _write(path, data, affine=None):
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), path)
    return path


def test_plot_writes_png(tmp_path):
    pytest.importorskip("matplotlib")
    seg = _write(
        tmp_path / "seg.nii.gz",
        (np.asarray(nib.load(ANAT).dataobj) > 100).astype(np.uint8),
        nib.load(ANAT).affine,
    )
    out = tmp_path / "view.png"
    result = _jmed("plot", ANAT, "--label", seg, "-o", out)
    assert result.returncode == 0, result.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    again = _jmed("plot", ANAT, "-o", out)
    assert again.returncode == 1 and "exists" in again.stderr
    missing = _jmed("plot", tmp_path / "none.nii", "-o", tmp_path / "x.png")
    assert missing.returncode == 1 and "none.nii" in missing.stderr


def test_convert_to_nifti_zarr(tmp_path):
    pytest.importorskip("zarr")
    out = tmp_path / "anat.nii.zarr"
    result = _jmed("convert", ANAT, out, "--chunks", "16", "8", "16")
    assert result.returncode == 0, result.stderr
    assert "100%" in result.stderr  # a progress bar
    converted = jmed.load(out)
    reference = nib.load(ANAT)
    np.testing.assert_array_equal(
        np.asarray(converted.data)[..., 0], np.asarray(reference.get_fdata(), np.float32)
    )
    np.testing.assert_allclose(np.asarray(converted.affine), reference.affine, atol=1e-5)
    assert converted._data.source is not None
    info = _jmed("info", out)
    assert info.returncode == 0, info.stderr
    assert f"shape:       {tuple(converted.shape)}" in info.stdout
    assert f"orientation: {converted.orientation}" in info.stdout
    refused = _jmed("convert", ANAT, out)
    assert (
        refused.returncode == 1
        and "--overwrite" in refused.stderr
        and len(refused.stderr.strip().splitlines()) == 1
    )
    bad = _jmed("convert", ANAT, tmp_path / "b.nii.zarr", "--chunks", "0")
    assert bad.returncode == 1 and "chunks" in bad.stderr
    missing = _jmed("convert", tmp_path / "none.nii.gz", tmp_path / "c.nii.zarr")
    assert missing.returncode == 1 and "none.nii.gz" in missing.stderr


def test_landmarks_and_cache(tmp_path):
    rng = np.random.default_rng(0)
    paths = [
        _write(tmp_path / f"im{i}.nii.gz", rng.gamma(2.0 + i, 10.0, (12, 10, 8)).astype(np.float32))
        for i in range(2)
    ]
    out = tmp_path / "landmarks.npy"
    result = _jmed("landmarks", *paths, "-o", out)
    assert result.returncode == 0, result.stderr
    assert "train_histogram: 100%" in result.stderr and "2/2" in result.stderr  # a progress bar
    landmarks = np.load(out)
    expected = jmed.transforms.train_histogram(paths)
    np.testing.assert_allclose(landmarks, expected, rtol=1e-6)
    assert np.all(np.diff(landmarks) >= 0)
    refused = _jmed("landmarks", *paths, "-o", out)
    assert refused.returncode == 1 and "exists" in refused.stderr
    bad_mask = _jmed("landmarks", *paths, "-o", tmp_path / "l2.npy", "--mask", paths[0])
    assert bad_mask.returncode == 1 and "one mask per image" in bad_mask.stderr

    cache = tmp_path / "cache"
    result = _jmed("cache", *paths, "--cache-dir", cache, "--name", "t1")
    assert result.returncode == 0, result.stderr
    entries = [p for p in cache.iterdir() if (p / "geometry.json").exists()]
    assert len(entries) == 2
    cached = np.load(entries[0] / "t1.npy")
    assert cached.shape == (12, 10, 8, 1)
    missing = _jmed("cache", tmp_path / "none.nii.gz", "--cache-dir", cache)
    assert missing.returncode == 1 and "none.nii.gz" in missing.stderr


# --- errors are one line, never a traceback ---------------------------------------------------


def _one_line_error(capsys, argv, *patterns):
    code = cli.main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code == 1, err
    assert "Traceback" not in err
    # progress lines may come first; the error is one line
    errors = [line for line in err.splitlines() if line.startswith("jmed ")]
    assert len(errors) == 1 and "error:" in errors[0], err
    for pattern in patterns:
        assert pattern in err, err
    return err


def _huge_header(path):
    header = nib.Nifti1Header()
    header.set_data_shape((30000, 30000, 30000))
    header.set_data_dtype(np.uint8)
    header.set_sform(np.eye(4), code=1)
    header["vox_offset"] = 352
    path.write_bytes(header.binaryblock + b"\0" * 36)
    return path


def test_output_parent_is_a_file(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    _one_line_error(capsys, ["transform", ANAT, tmp_path / "file" / "out.nii.gz", "RandomNoise"], "file")
    _one_line_error(capsys, ["landmarks", ANAT, "-o", tmp_path / "file" / "lm.npy"], "file")


def test_seed_too_large(tmp_path, capsys):
    _one_line_error(
        capsys,
        ["transform", ANAT, tmp_path / "o.nii.gz", "RandomNoise", "--seed", 2**70],
        "--seed",
        str(2**70),
    )
    assert not (tmp_path / "o.nii.gz").exists()


def test_huge_dims_input(tmp_path, capsys):
    huge = _huge_header(tmp_path / "huge.nii")
    _one_line_error(capsys, ["transform", huge, tmp_path / "o.nii.gz", "RandomNoise"], "huge.nii", "30000")
    assert cli.main(["info", str(huge)]) == 0  # the header alone
    assert "(30000, 30000, 30000, 1)" in capsys.readouterr().out


def test_rgb_input(tmp_path, capsys):
    rgb = np.zeros((4, 4, 4), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    rgb["G"] = 9
    path = _write(tmp_path / "rgb.nii.gz", rgb)
    assert cli.main(["transform", str(path), str(tmp_path / "o.nii.gz"), "Clamp"]) == 0
    out = np.asarray(jmed.load(tmp_path / "o.nii.gz").data)
    assert out.shape == (4, 4, 4, 3)
    # one channel per colour, values kept (Clamp without bounds changes nothing)
    np.testing.assert_array_equal(out, np.stack([rgb["R"], rgb["G"], rgb["B"]], axis=-1).astype(np.float32))
    _one_line_error(
        capsys,
        ["transform", path, tmp_path / "l.nii.gz", "RemapLabels", "--label", "--kwargs", "mapping={1:2}"],
        "rgb.nii.gz",
        "RGB",
    )


def test_plot_into_a_missing_folder(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    _one_line_error(capsys, ["plot", ANAT, "-o", tmp_path / "missing" / "view.png"], "missing")


def test_read_only_output_folder(tmp_path, capsys, monkeypatch):
    from jmed import _atomic

    def refuse(prefix, dir):
        raise PermissionError(13, "Permission denied", str(dir))

    monkeypatch.setattr(_atomic.tempfile, "mkdtemp", refuse)
    _one_line_error(
        capsys, ["transform", ANAT, tmp_path / "o.nii.gz", "RandomNoise"], "Permission denied", str(tmp_path)
    )
    _one_line_error(capsys, ["landmarks", ANAT, "-o", tmp_path / "lm.json"], "Permission denied")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_output_folder_for_real(tmp_path, capsys):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        _one_line_error(capsys, ["transform", ANAT, folder / "o.nii.gz", "RandomNoise"], "ermission")
    finally:
        folder.chmod(0o700)


def test_info_reads_only_the_header(tmp_path, capsys):
    path = tmp_path / "cut.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((20, 20, 20), np.float32), np.eye(4)), path)
    path.write_bytes(path.read_bytes()[:200])
    assert cli.main(["info", str(path)]) == 0
    assert "(20, 20, 20, 1)" in capsys.readouterr().out
    _one_line_error(capsys, ["info", path, "--stats"], "cut.nii.gz")


def test_landmarks_overwrite_under_a_write_error_keeps_the_old_file(tmp_path, capsys, monkeypatch):
    import json

    out = tmp_path / "lm.json"
    assert cli.main(["landmarks", ANAT, "-o", str(out)]) == 0
    before = out.read_bytes()

    def half_dump(record, f, **kw):
        f.write('{"landmarks": [0.0, 1.')
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(json, "dump", half_dump)
    _one_line_error(capsys, ["landmarks", ANAT, "-o", out, "--overwrite"], "No space left", "lm.json")
    assert out.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["lm.json"]


_EFBIG = """
import resource, signal, sys
from jmed import cli
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
sys.exit(cli.main({argv!r}))
"""


def test_file_too_large_is_one_line_and_keeps_the_old_output(tmp_path):
    out = tmp_path / "o.nii"
    old = jmed.ScalarImage(np.ones((2, 2, 2), np.float32))
    jmed.save(old, out)
    before = out.read_bytes()
    argv = ["transform", ANAT, str(out), "RandomNoise", "--overwrite"]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run(
        [sys.executable, "-c", _EFBIG.format(limit=20000, argv=argv)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert "File too large" in proc.stderr and "o.nii" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert out.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["o.nii"]


# --- start-up: commands import only what they need --------------------------------------------

_IMPORTS_AFTER = """
import sys
from jmed import cli
try:
    code = cli.main({argv!r})
except SystemExit as exit:
    code = exit.code
heavy = sorted(m for m in ("jax", "jaxlib", "matplotlib", "grain", "scipy.ndimage") if m in sys.modules)
print("HEAVY", code, *heavy, file=sys.stderr)
"""


def _heavy_imports(argv):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run(
        [sys.executable, "-c", _IMPORTS_AFTER.format(argv=[str(a) for a in argv])],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    line = proc.stderr.strip().splitlines()[-1].split()
    assert line[0] == "HEAVY", proc.stderr
    return int(line[1]), line[2:]


def test_help_and_info_do_not_import_jax_or_matplotlib():
    assert _heavy_imports(["--help"]) == (0, [])
    assert _heavy_imports(["transform", "--help"]) == (0, [])
    assert _heavy_imports(["info", ANAT]) == (0, [])
    assert _heavy_imports(["info", ANAT, "--label"]) == (0, [])
    # the reference: commands that compute do import JAX
    code, heavy = _heavy_imports(["info", ANAT, "--stats"])
    assert code == 0 and "jax" in heavy


def _fixtures(tmp_path):
    rng = np.random.default_rng(0)
    affine = np.diag([1.5, -2.0, 0.8, 1.0])
    affine[:3, 3] = (10, 20, -5)
    paths = {
        "3d.nii.gz": (rng.normal(size=(6, 5, 4)).astype(np.float32), "intensity"),
        "4d.nii": (rng.normal(size=(6, 5, 4, 3)).astype(np.float32), "intensity"),
        "2d.nii": (rng.normal(size=(6, 5)).astype(np.float32), "intensity"),
        "labels.mgz": (rng.integers(0, 4, (6, 5, 4)).astype(np.int32), "label"),
        "big_labels.nii.gz": (rng.integers(0, 4, (6, 5, 4)).astype(np.uint32), "label"),
        "bytes.nii.gz": (rng.integers(0, 4, (6, 5, 4)).astype(np.uint8), "label"),
    }
    out = []
    for name, (data, kind) in paths.items():
        path = tmp_path / name
        cls = nib.MGHImage if name.endswith(".mgz") else nib.Nifti1Image
        nib.save(cls(data, affine), path)
        out.append((path, kind))
    return out


def test_info_header_equals_jmed_load(tmp_path):
    for path, kind in _fixtures(tmp_path) + [(ANAT, "intensity"), (ANAT, "label")]:
        header = cli._Header(str(path), kind)
        image = jmed.load(path, kind=kind, lazy=True)
        assert header.shape == image.shape, path
        assert header.dtype == image.dtype, path
        assert header.orientation == image.orientation, path
        np.testing.assert_allclose(header.affine, np.asarray(image.affine), err_msg=str(path))
        np.testing.assert_allclose(header.spacing, np.asarray(image.spacing), rtol=1e-12)
        np.testing.assert_allclose(header.origin, np.asarray(image.origin), rtol=1e-12)
    from jmed import _header, io

    assert io.READ_EXTENSIONS is _header.READ_EXTENSIONS  # one list for jmed info and jmed.load


def test_info_prints_the_header_facts(tmp_path, capsys):
    path, _ = _fixtures(tmp_path)[1]  # 4D
    assert cli.main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "shape:       (6, 5, 4, 3)" in out
    assert "spacing:     (1.5, 2.0, 0.8) mm" in out
    assert "origin:      (10.0, 20.0, -5.0) mm" in out
    assert "orientation: RPS" in out
    assert cli.main(["info", str(tmp_path / "bytes.nii.gz"), "--label"]) == 0
    assert "dtype:       uint8" in capsys.readouterr().out
    assert cli.main(["info", str(tmp_path / "bytes.nii.gz")]) == 0
    assert "dtype:       float32 (stored as uint8)" in capsys.readouterr().out
    assert cli.main(["info", ANAT]) == 0  # big-endian int16
    assert "dtype:       float32 (stored as int16)" in capsys.readouterr().out
    rgb = np.zeros((4, 4, 4), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    assert cli.main(["info", str(_write(tmp_path / "rgb.nii.gz", rgb))]) == 0
    out = capsys.readouterr().out
    assert "shape:       (4, 4, 4, 3)" in out and "dtype:       float32 (stored as RGB)" in out


# --- transform: label files, the list of transforms, overwrite ----------------------------------


def _label_file(tmp_path, dtype):
    data = np.zeros((10, 9, 8), dtype)
    data[2:6, 2:6, 2:6] = 1
    data[6:9, 3:7, 1:5] = 2
    return _write(tmp_path / f"seg_{np.dtype(dtype).name}.nii.gz", data)


@pytest.mark.parametrize("dtype", [np.uint8, np.int16])
def test_transform_warns_on_an_integer_file_read_as_intensity(tmp_path, capsys, dtype):
    seg = _label_file(tmp_path, dtype)
    out = tmp_path / "out.nii.gz"
    argv = ["transform", str(seg), str(out), "RandomAffine", "--kwargs", "degrees=20"]
    assert cli.main(argv) == 0
    err = capsys.readouterr().err
    warnings_ = [line for line in err.splitlines() if "warning" in line]
    assert len(warnings_) == 1, err
    assert warnings_[0].startswith("jmed transform: warning: ")
    assert seg.name in warnings_[0] and "--label" in warnings_[0] and "3 distinct values" in warnings_[0]
    values = np.unique(np.asarray(jmed.load(out).data))
    assert not np.all(values == np.round(values))  # what the warning is about: interpolated floats
    # as a label map: no warning, labels stay labels
    assert cli.main([*argv, "--label", "--overwrite"]) == 0
    assert "warning" not in capsys.readouterr().err
    assert set(np.unique(np.asarray(jmed.load(out, kind="label").data))) <= {0, 1, 2}


def test_transform_does_not_warn_on_integer_intensity_images(tmp_path, capsys):
    # anatomical.nii is stored as int16 with thousands of values: an intensity image
    assert nib.load(ANAT).get_data_dtype() == np.dtype(">i2")
    assert cli.main(["transform", ANAT, str(tmp_path / "o.nii.gz"), "RandomFlip"]) == 0
    assert "warning" not in capsys.readouterr().err


ABSTRACT = {"Transform", "IntensityTransform", "LabelTransform", "SpatialTransform"}


def test_transform_list_has_only_transforms_one_can_apply(capsys):
    with pytest.raises(SystemExit) as exit:
        cli.main(["transform", "--list"])
    assert exit.value.code == 0
    listed = capsys.readouterr().out.split()
    assert listed == cli.available_transforms()
    assert not set(listed) & ABSTRACT
    assert not set(listed) & {"Compose", "OneOf", "SomeOf", "RandomApply", "Lambda"}
    # concrete classes that others subclass stay listed
    assert {"RandomAffine", "RemapLabels", "Reorient", "ToCanonical", "RandomMotion"} <= set(listed)
    everything = {
        name
        for name in jmed.transforms.__all__
        if isinstance(getattr(jmed.transforms, name), type)
        and issubclass(getattr(jmed.transforms, name), jmed.transforms.Transform)
    }
    assert ABSTRACT <= everything
    err = _one_line_error(capsys, ["transform", ANAT, "o.nii", "SpatialTransform"], "cannot be applied")
    assert "LabelTransform" not in err and "RandomAffine" in err


def test_overwrite_errors_name_the_option(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    existing = tmp_path / "exists.png"
    existing.write_bytes(b"keep")
    for argv in (
        ["transform", ANAT, existing, "RandomNoise"],
        ["plot", ANAT, "-o", existing],
        ["landmarks", ANAT, "-o", existing],
    ):
        err = _one_line_error(capsys, argv, "pass --overwrite")
        assert "overwrite=True" not in err
    assert existing.read_bytes() == b"keep"


# --- every error is one line: 1 for files and values, 2 for the command line --------------------

USAGE_ERRORS = [
    [],
    ["bogus"],
    ["info"],
    ["info", ANAT, "--colour"],
    ["transform", ANAT],
    ["transform", ANAT, "o.nii", "RandomNoise", "--seed", "x"],
    ["plot", ANAT],
    ["landmarks", "-o", "l.npy"],
    ["cache", ANAT],
]


@pytest.mark.parametrize("argv", USAGE_ERRORS, ids=lambda a: " ".join(map(os.path.basename, a)) or "none")
def test_usage_errors_are_one_line_with_status_2(argv, capsys):
    with pytest.raises(SystemExit) as exit:
        cli.main(argv)
    assert exit.value.code == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1 and ": error: " in lines[0] and "--help" in lines[0], captured.err
    assert lines[0].startswith("jmed")


def test_file_errors_are_one_line_with_status_1_for_every_command(tmp_path, capsys):
    missing = tmp_path / "missing.nii.gz"
    for argv in (
        ["info", missing],
        ["info", tmp_path],
        ["transform", missing, tmp_path / "o.nii", "RandomNoise"],
        ["plot", missing, "-o", tmp_path / "o.png"],
        ["landmarks", missing, "-o", tmp_path / "l.npy"],
        ["cache", missing, "--cache-dir", tmp_path / "cache"],
    ):
        _one_line_error(capsys, argv, "missing.nii.gz" if missing in argv else str(tmp_path))
    bad = tmp_path / "bad.nii"
    bad.write_bytes(b"not an image at all")
    _one_line_error(capsys, ["info", bad], "bad.nii")
    singular = nib.Nifti1Image(np.zeros((3, 3, 3), np.float32), np.diag([1.0, 1.0, 1.0, 1.0]))
    singular.set_sform(np.array([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]]), code=1)
    nib.save(singular, tmp_path / "singular.nii")
    _one_line_error(capsys, ["info", tmp_path / "singular.nii"], "singular.nii", "singular")
    (tmp_path / "notes.txt").write_text("x")
    _one_line_error(capsys, ["info", tmp_path / "notes.txt"], "unsupported extension")


def test_unexpected_errors_are_one_line_too(tmp_path, capsys, monkeypatch):
    def broken(args):
        raise RuntimeError("something\nbroke")

    monkeypatch.setattr(cli, "cmd_info", broken)
    err = _one_line_error(capsys, ["info", ANAT], "unexpected RuntimeError: something broke")
    assert "Traceback" not in err


def test_header_warnings_are_one_line_once(tmp_path, capsys):
    image = nib.Nifti1Image(np.arange(60, dtype=np.float32).reshape(5, 4, 3), np.eye(4))
    image.set_qform(None, code=0)
    image.set_sform(None, code=0)
    path = tmp_path / "no_orientation.nii"
    nib.save(image, path)
    for argv in (["info", str(path)], ["transform", str(path), str(tmp_path / "o.nii"), "RandomNoise"]):
        assert cli.main(argv) == 0
        lines = capsys.readouterr().err.splitlines()
        assert len(lines) == 1, lines
        assert (
            lines[0].startswith(f"jmed {argv[0]}: warning: ") and "neither a qform nor an sform" in lines[0]
        )
