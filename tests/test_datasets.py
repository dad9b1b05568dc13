import functools
import hashlib
import http.server
import io
import json
import tarfile
import threading
from pathlib import Path

import jax
import nibabel as nib
import numpy as np
import pytest

import jmed
from jmed import datasets

SMALL = (24, 20, 16)


# --- phantom ----------------------------------------------------------------------------


def test_phantom_contract_and_determinism():
    a = datasets.phantom(3, shape=SMALL, spacing=(2.0, 2.5, 3.0))
    b = datasets.phantom(3, shape=SMALL, spacing=(2.0, 2.5, 3.0))
    c = datasets.phantom(4, shape=SMALL, spacing=(2.0, 2.5, 3.0))
    assert a.t1.shape == (*SMALL, 1) and a.t1.dtype == np.float32 and not a.t1.is_label
    assert a.seg.shape == (*SMALL, 1) and a.seg.is_label and a.seg.dtype == np.uint8
    np.testing.assert_allclose(a.t1.spacing, (2.0, 2.5, 3.0))
    assert a.t1.orientation == "RAS"
    # field of view centred on the world origin
    centre = jmed.affine.voxel_to_world(a.t1.affine, (np.array(SMALL) - 1) / 2)
    np.testing.assert_allclose(centre, 0, atol=1e-9)
    np.testing.assert_array_equal(a.t1.numpy(), b.t1.numpy())
    np.testing.assert_array_equal(a.seg.numpy(), b.seg.numpy())
    assert not np.array_equal(a.t1.numpy(), c.t1.numpy())
    a.check_consistent()


def test_phantom_jax_key_is_deterministic():
    key = jax.random.key(7)
    a = datasets.phantom(key, shape=SMALL)
    b = datasets.phantom(key, shape=SMALL)
    c = datasets.phantom(jax.random.fold_in(key, 1), shape=SMALL)
    np.testing.assert_array_equal(a.t1.numpy(), b.t1.numpy())
    assert not np.array_equal(a.seg.numpy(), c.seg.numpy())
    with pytest.raises(TypeError, match="key"):
        datasets.phantom("seed")


def test_phantom_classes_and_intensities():
    s = datasets.phantom(0, shape=(40, 40, 40), noise=0.0, bias=0.0)
    labels, t1 = s.seg.numpy()[..., 0], s.t1.numpy()[..., 0]
    counts = np.bincount(labels.ravel(), minlength=4)
    assert counts.size == 4 and np.all(counts > 200), counts
    means = [t1[labels == c].mean() for c in range(4)]
    # T1-like contrast: WM > GM > CSF > background
    assert means[2] > means[1] > means[3] > means[0]
    # labels are ellipsoid-like: background at the corners, WM at the centre region
    assert labels[0, 0, 0] == 0 and labels[20, 12, 20] in (1, 2)
    three = datasets.phantom(0, shape=(40, 40, 40), num_classes=3).seg.numpy()
    np.testing.assert_array_equal(three, np.where(s.seg.numpy() == 3, 0, s.seg.numpy()))
    two = datasets.phantom(0, shape=(40, 40, 40), num_classes=2).seg.numpy()
    np.testing.assert_array_equal(two, np.isin(s.seg.numpy(), (1, 2)))


def test_phantom_noise_and_bias_controls():
    clean = datasets.phantom(1, shape=SMALL, noise=0.0, bias=0.0)
    noisy = datasets.phantom(1, shape=SMALL, noise=0.1, bias=0.0)
    labels = clean.seg.numpy()[..., 0]
    diff = (noisy.t1.numpy() - clean.t1.numpy())[..., 0][labels == 2]
    assert 0.05 < diff.std() < 0.15
    np.testing.assert_array_equal(clean.seg.numpy(), noisy.seg.numpy())
    biased = datasets.phantom(1, shape=SMALL, noise=0.0, bias=0.3)
    ratio = (biased.t1.numpy() / np.maximum(clean.t1.numpy(), 1e-6))[..., 0][labels == 2]
    assert ratio.std() > 0.02 and np.all(np.abs(np.log(ratio)) < 0.31)


@pytest.mark.parametrize("orientation", ["LPS", "PIR"])
def test_phantom_orientation_is_world_consistent(orientation):
    ras = datasets.phantom(2, shape=SMALL, spacing=(1.0, 1.5, 2.0))
    # same field of view: the RAS spacing/shape permuted into the other orientation's axes
    perm, _ = jmed.affine.orientation_transform("RAS", orientation)
    other = datasets.phantom(
        2,
        shape=[SMALL[p] for p in perm],
        spacing=[(1.0, 1.5, 2.0)[p] for p in perm],
        orientation=orientation,
    )
    assert other.t1.orientation == orientation
    for name in ("t1", "seg"):
        data, affine = jmed.affine.reorient(other[name].numpy(), other[name].affine, "RAS")
        np.testing.assert_allclose(affine, ras[name].affine, atol=1e-9)
        np.testing.assert_allclose(data, ras[name].numpy(), atol=1e-5)


def test_phantom_bad_arguments():
    with pytest.raises(ValueError, match="num_classes"):
        datasets.phantom(0, shape=SMALL, num_classes=5)
    with pytest.raises(ValueError, match="spacing"):
        datasets.phantom(0, shape=SMALL, spacing=(1, 0, 1))
    with pytest.raises(ValueError, match="shape"):
        datasets.phantom(0, shape=(4, 4))
    with pytest.raises(ValueError, match="orientation"):
        datasets.phantom(0, shape=SMALL, orientation="RAX")


# --- MNI152 ---------------------------------------------------------------------------------


def test_mni152_matches_nibabel():
    nilearn = pytest.importorskip("nilearn")
    folder = Path(nilearn.__file__).parent / "datasets" / "data"
    s = datasets.MNI152()
    assert s.t1.shape == (197, 233, 189, 1) and s.t1.orientation == "RAS"
    gm = np.asarray(nib.load(folder / "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz").dataobj) / 255
    wm = np.asarray(nib.load(folder / "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz").dataobj) / 255
    labels = s.seg.numpy()[..., 0]
    assert set(np.unique(labels).tolist()) == {0, 1, 2}
    brain = np.maximum(gm, wm) >= 0.5
    np.testing.assert_array_equal(labels > 0, brain)
    np.testing.assert_array_equal(labels[brain & (wm > gm)], 2)
    np.testing.assert_array_equal(labels[brain & (gm > wm)], 1)
    np.testing.assert_allclose(s.seg.affine, s.t1.affine)


def test_mni152_without_nilearn(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "nilearn":
            raise ImportError("no nilearn")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(ImportError, match="pip install nilearn"):
        datasets.MNI152()


# --- records ---------------------------------------------------------------------------------


def _write(path, data, affine=None, dtype=np.float32):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(data, dtype), np.eye(4) if affine is None else affine), path)
    return path


def _make_flat_folder(tmp_path, ids=("sub-01", "sub-02", "sub-03")):
    for i, sid in enumerate(ids):
        _write(tmp_path / f"{sid}_T1w.nii.gz", np.full((4, 5, 6), i))
        _write(tmp_path / f"{sid}_seg.nii.gz", np.full((4, 5, 6), i % 2), dtype=np.uint8)
    return tmp_path


def test_subjects_from_folder_flat_and_nested(tmp_path):
    root = _make_flat_folder(tmp_path / "flat")
    records = datasets.subjects_from_folder(root, {"t1": "*_T1w.nii.gz", "seg": "*_seg.nii.gz"})
    assert [r["subject_id"] for r in records] == ["sub-01", "sub-02", "sub-03"]
    assert records[1]["t1"] == str((root / "sub-02_T1w.nii.gz").resolve())
    subject = datasets.load_subject(records[1], {"t1": "intensity", "seg": "label"})
    assert float(subject.t1.numpy().mean()) == 1.0 and subject.seg.is_label

    nested = tmp_path / "nested"
    for sid in ("a", "b"):
        _write(nested / sid / "image.nii.gz", np.zeros((3, 3, 3)))
        _write(nested / "labels" / f"{sid}.nii.gz", np.zeros((3, 3, 3)), dtype=np.uint8)
    records = datasets.subjects_from_folder(nested, {"image": "*/image.nii.gz", "seg": "labels/*.nii.gz"})
    assert [r["subject_id"] for r in records] == ["a", "b"]
    bids_like = tmp_path / "bidsish"
    _write(bids_like / "sub-7" / "anat" / "sub-7_T1w.nii", np.zeros((3, 3, 3)))
    records = datasets.subjects_from_folder(bids_like, {"t1": "sub-*/anat/sub-*_T1w.nii"})
    assert records[0]["subject_id"] == "7"


def test_subjects_from_folder_errors(tmp_path):
    root = _make_flat_folder(tmp_path)
    (root / "sub-03_seg.nii.gz").unlink()
    pattern = {"t1": "*_T1w.nii.gz", "seg": "*_seg.nii.gz"}
    with pytest.raises(ValueError, match=r"sub-03 \(missing seg\)"):
        datasets.subjects_from_folder(root, pattern)
    with pytest.warns(UserWarning, match="sub-03"):
        records = datasets.subjects_from_folder(root, pattern, on_missing="skip")
    assert len(records) == 2
    with pytest.raises(FileNotFoundError, match="matches pattern"):
        datasets.subjects_from_folder(root, {"t1": "*_T2w.nii.gz"})
    with pytest.raises(FileNotFoundError, match="does not exist"):
        datasets.subjects_from_folder(root / "nope", pattern)
    with pytest.raises(ValueError, match="duplicate subject id"):
        datasets.subjects_from_folder(root, {"t1": "*.nii.gz"}, subject_id=lambda name, p: "same")


def test_subjects_from_csv(tmp_path):
    root = _make_flat_folder(tmp_path)
    (root / "table.csv").write_text(
        "subject_id,t1,seg,age,site\n"
        "sub-01,sub-01_T1w.nii.gz,sub-01_seg.nii.gz,42,A\n"
        f"sub-02,{(root / 'sub-02_T1w.nii.gz').resolve()},sub-02_seg.nii.gz,n/a,B\n"
    )
    records = datasets.subjects_from_csv(root / "table.csv")
    assert records[0] == {
        "subject_id": "sub-01",
        "t1": str((root / "sub-01_T1w.nii.gz").resolve()),
        "seg": str((root / "sub-01_seg.nii.gz").resolve()),
        "age": 42,
        "site": "A",
    }
    assert records[1]["age"] is None
    subjects = datasets.records_to_subjects(records, {"t1": "intensity", "seg": "label"}, metadata=["age"])
    assert subjects[0].metadata == {"age": 42} and float(subjects[1].t1.numpy().max()) == 1.0

    (root / "dup.csv").write_text("subject_id,t1\nsub-01,sub-01_T1w.nii.gz\nsub-01,sub-02_T1w.nii.gz\n")
    with pytest.raises(ValueError, match="duplicate subject id 'sub-01' on lines 2 and 3"):
        datasets.subjects_from_csv(root / "dup.csv")
    (root / "missing.csv").write_text("subject_id,t1\nsub-09,sub-09_T1w.nii.gz\n")
    with pytest.raises(FileNotFoundError, match="sub-09"):
        datasets.subjects_from_csv(root / "missing.csv")
    with pytest.raises(ValueError, match="no id column"):
        datasets.subjects_from_csv(root / "missing.csv", id_column="participant")


def test_load_subject_errors(tmp_path):
    root = _make_flat_folder(tmp_path)
    _write(root / "shifted.nii.gz", np.zeros((4, 5, 6)), affine=np.diag([2.0, 1, 1, 1]))
    record = {"subject_id": "x", "t1": str(root / "sub-01_T1w.nii.gz"), "seg": str(root / "shifted.nii.gz")}
    with pytest.raises(ValueError, match="subject 'x'.*different affines"):
        datasets.load_subject(record, {"t1": "intensity", "seg": "label"})
    with pytest.raises(KeyError, match="no image 'flair'"):
        datasets.load_subject(record, {"flair": "intensity"})
    with pytest.raises(FileNotFoundError, match="subject 'x'"):
        datasets.load_subject({"subject_id": "x", "t1": str(root / "gone.nii")}, {"t1": "intensity"})
    with pytest.raises(ValueError, match="duplicate subject id"):
        datasets.records_to_subjects([record, record], {"t1": "intensity"})


def _make_bids(root):
    (root / "participants.tsv").parent.mkdir(parents=True, exist_ok=True)
    (root / "participants.tsv").write_text("participant_id\tage\tsex\nsub-01\t30\tF\nsub-02\tn/a\tM\n")
    for sub in ("sub-01", "sub-02"):
        _write(root / sub / "anat" / f"{sub}_T1w.nii.gz", np.zeros((3, 3, 3)))
        (root / sub / "anat" / f"{sub}_T1w.json").write_text(
            json.dumps({"RepetitionTime": 2.3, "Nested": {}})
        )
        _write(
            root / "derivatives" / "manual" / sub / "anat" / f"{sub}_dseg.nii.gz",
            np.zeros((3, 3, 3)),
            dtype=np.uint8,
        )
    _write(root / "sub-02" / "anat" / "sub-02_T2w.nii.gz", np.zeros((3, 3, 3)))


def test_subjects_from_bids(tmp_path):
    _make_bids(tmp_path)
    records = datasets.subjects_from_bids(
        tmp_path, derivatives={"seg": "derivatives/manual/{subject}/anat/{subject}_dseg.nii.gz"}
    )
    assert [r["subject_id"] for r in records] == ["sub-01", "sub-02"]
    r = records[0]
    assert r["t1"].endswith("sub-01_T1w.nii.gz") and r["seg"].endswith("sub-01_dseg.nii.gz")
    assert r["t1.RepetitionTime"] == 2.3 and "t1.Nested" not in r
    assert r["age"] == 30 and r["sex"] == "F" and r["participant_id"] == "sub-01" and r["session"] is None
    assert records[1]["age"] is None
    with pytest.raises(ValueError, match=r"sub-01 \(missing t2\)"):
        datasets.subjects_from_bids(tmp_path, {"t1": "T1w", "t2": "T2w"})
    with pytest.warns(UserWarning):
        only = datasets.subjects_from_bids(tmp_path, {"t1": "T1w", "t2": "T2w"}, on_missing="skip")
    assert [r["subject_id"] for r in only] == ["sub-02"]


def test_subjects_from_bids_sessions_and_runs(tmp_path):
    for ses in ("ses-1", "ses-2"):
        _write(tmp_path / "sub-01" / ses / "anat" / f"sub-01_{ses}_T1w.nii.gz", np.zeros((3, 3, 3)))
    records = datasets.subjects_from_bids(tmp_path)
    assert [(r["subject_id"], r["participant_id"], r["session"]) for r in records] == [
        ("sub-01_ses-1", "sub-01", "ses-1"),
        ("sub-01_ses-2", "sub-01", "ses-2"),
    ]
    _write(tmp_path / "sub-01" / "ses-1" / "anat" / "sub-01_ses-1_run-2_T1w.nii.gz", np.zeros((3, 3, 3)))
    with pytest.raises(ValueError, match="several T1w images"):
        datasets.subjects_from_bids(tmp_path)
    with pytest.warns(UserWarning, match=r"sub-01_ses-2 \(missing t1\)"):
        records = datasets.subjects_from_bids(tmp_path, entities={"run": "2"}, on_missing="skip")
    assert [r["subject_id"] for r in records] == ["sub-01_ses-1"]
    with pytest.raises(FileNotFoundError, match="no sub-"):
        datasets.subjects_from_bids(tmp_path / "sub-01")


# --- splitting ---------------------------------------------------------------------------------


def _records(n=40):
    return [
        {
            "subject_id": f"s{i:02d}",
            "site": "AB"[i % 2] if i < 30 else "C",
            "patient": i // 4,
            "dx": i % 3 == 0,
        }
        for i in range(n)
    ]


def test_split_records_deterministic_and_disjoint():
    records = _records()
    train, val = datasets.split_records(records, validation=0.25, seed=1)
    assert len(val) == 10 and len(train) == 30
    ids = {r["subject_id"] for r in train} | {r["subject_id"] for r in val}
    assert len(ids) == 40
    assert datasets.split_records(records, validation=0.25, seed=1) == (train, val)
    assert datasets.split_records(records, validation=0.25, seed=2)[1] != val
    # input order is kept
    assert [r["subject_id"] for r in val] == sorted(r["subject_id"] for r in val)


def test_split_records_stratified_and_grouped():
    records = _records()
    _, val = datasets.split_records(records, validation=0.2, seed=0, stratify="site")
    counts = {s: sum(r["site"] == s for r in val) for s in "ABC"}
    assert counts == {"A": 3, "B": 3, "C": 2}  # 20 % of 15, 15 and 10, rounded
    train, val = datasets.split_records(records, validation=0.3, seed=0, group="patient")
    assert not {r["patient"] for r in train} & {r["patient"] for r in val}
    assert len(val) == 12  # 3 of 10 patients, 4 records each
    with pytest.raises(ValueError, match="differs within group"):
        datasets.split_records(records, stratify="dx", group="patient")
    with pytest.raises(ValueError, match="validation"):
        datasets.split_records(records, validation=1.0)
    with pytest.raises(ValueError, match="lack that key"):
        datasets.split_records(records, stratify="age")


# --- IXI --------------------------------------------------------------------------------------


def _tar_bytes(files):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, payload in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return buffer.getvalue()


def _nifti_bytes(value):
    image = nib.Nifti1Image(np.full((3, 3, 3), value, np.float32), np.eye(4))
    return image.to_bytes()


@pytest.fixture
def ixi_server(tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    (served / "IXI-T1.tar").write_bytes(
        _tar_bytes({f"IXI00{i}-Guys-000{i}-T1.nii": _nifti_bytes(i) for i in (1, 2, 3)})
    )
    (served / "IXI-T2.tar").write_bytes(
        _tar_bytes({f"IXI00{i}-Guys-000{i}-T2.nii": _nifti_bytes(i) for i in (1, 2)})
    )
    (served / "IXI-PD.tar").write_bytes(b"this is not a tar archive" * 100)
    (served / "IXI-DTI.tar").write_bytes(_tar_bytes({"../evil-DTI.nii": b"x"}))
    requests = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(served), **kwargs)

        def log_message(self, *args):
            requests.append(self.path)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/", served, requests
    finally:
        server.shutdown()
        server.server_close()


def test_download_ixi(tmp_path, ixi_server):
    url, served, requests = ixi_server
    root = tmp_path / "ixi"
    md5 = hashlib.md5((served / "IXI-T1.tar").read_bytes()).hexdigest()
    download = functools.partial(datasets.download_ixi, root, url=url, timeout=10)
    records = download(["T1"], checksums={"T1": md5})
    assert [r["subject_id"] for r in records] == ["IXI001-Guys-0001", "IXI002-Guys-0002", "IXI003-Guys-0003"]
    assert float(jmed.load(records[2]["t1"]).numpy().mean()) == 3.0
    assert sorted(p.name for p in root.iterdir()) == ["IXI-T1"]  # no temporary leftovers
    assert len(requests) == 1
    # present: not downloaded again
    t2 = hashlib.md5((served / "IXI-T2.tar").read_bytes()).hexdigest()
    with pytest.warns(UserWarning, match="IXI003"):
        records = download(["T1", "T2"], checksums={"T2": t2})
    assert len(requests) == 2 and [r["subject_id"] for r in records] == [
        "IXI001-Guys-0001",
        "IXI002-Guys-0002",
    ]
    assert set(records[0]) == {"subject_id", "t1", "t2"}


def test_download_ixi_progress(tmp_path, ixi_server, capsys):
    url, served, requests = ixi_server
    md5 = hashlib.md5((served / "IXI-T1.tar").read_bytes()).hexdigest()
    quiet = datasets.download_ixi(tmp_path / "a", url=url, timeout=10, checksums={"T1": md5})
    assert capsys.readouterr().err == ""
    shown = datasets.download_ixi(tmp_path / "b", url=url, timeout=10, checksums={"T1": md5}, progress=True)
    err = capsys.readouterr().err
    size = (served / "IXI-T1.tar").stat().st_size
    kilo = f"{size / 1000:.1f}k"
    assert "IXI-T1.tar: 100%" in err and f"{kilo}/{kilo}" in err and "B/s" in err, err  # bytes, SI-scaled
    assert [r["subject_id"] for r in shown] == [r["subject_id"] for r in quiet]
    for a, b in zip(quiet, shown):
        assert Path(a["t1"]).read_bytes() == Path(b["t1"]).read_bytes()


def test_download_ixi_failures_leave_nothing(tmp_path, ixi_server):
    url, _, _ = ixi_server
    root = tmp_path / "ixi"
    download = functools.partial(datasets.download_ixi, root, url=url, timeout=10)
    with pytest.raises(ValueError, match="checksum mismatch"):
        download(["T1"], checksums={"T1": "0" * 32})
    with pytest.raises(ValueError, match="checksum mismatch.*IXI-T1.tar.*34901a0593b41dd19c1a1f746eac2d58"):
        download(["T1"])  # the published checksum by default
    with (
        pytest.warns(UserWarning, match="IXI-PD.tar was not verified"),
        pytest.raises(ValueError, match="not a valid tar"),
    ):
        download(["PD"], checksums={})
    with (
        pytest.warns(UserWarning, match="not verified"),
        pytest.raises(ValueError, match="unsafe archive member"),
    ):
        download(["DTI"], checksums={})
    with pytest.raises(OSError):
        download(["MRA"])  # 404
    assert list(root.iterdir()) == []
    with pytest.raises(ValueError, match="modalities"):
        download(["FLAIR"])
    with pytest.raises(ValueError, match="checksums.*T1.*'abc'"):
        download(["T1"], checksums={"T1": "abc"})


def test_ixi_defaults_are_https_and_published_checksums():
    import inspect
    from urllib.parse import urlparse

    assert urlparse(datasets.IXI_URL).scheme == "https"
    assert inspect.signature(datasets.download_ixi).parameters["url"].default == datasets.IXI_URL
    assert set(datasets.IXI_MD5) == set(datasets.IXI_MODALITIES)
    assert all(len(v) == 32 and int(v, 16) >= 0 for v in datasets.IXI_MD5.values())
