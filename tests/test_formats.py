import numpy as np
import pytest

import jmed
from jmed import formats

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def _rotation(angles):
    a, b, c = angles
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return rx @ ry @ rz


# --- NRRD -------------------------------------------------------------------------------------


def test_nrrd_lps_oblique(tmp_path):
    nrrd = pytest.importorskip("nrrd")
    rng = np.random.default_rng(0)
    data = rng.integers(0, 1000, (5, 6, 7)).astype(np.int16)
    directions = _rotation((0.3, -0.2, 0.5)) * np.array([0.8, 1.2, 2.5])  # columns: axis vectors
    origin = np.array([10.0, -20.0, 30.0])
    header = {
        "space": "left-posterior-superior",
        "space directions": directions.T,  # NRRD: one row per axis
        "space origin": origin,
        "kinds": ["domain"] * 3,
    }
    path = tmp_path / "a.nrrd"
    nrrd.write(str(path), data, header)
    image = formats.load_nrrd(path)
    assert image.shape == (5, 6, 7, 1) and image.dtype == np.float32
    np.testing.assert_array_equal(image.numpy()[..., 0], data)
    expected_lps = np.eye(4)
    expected_lps[:3, :3] = directions
    expected_lps[:3, 3] = origin
    np.testing.assert_allclose(image.affine, LPS_TO_RAS @ expected_lps, atol=1e-9)
    # a voxel's RAS position is its LPS position with x and y negated
    voxel = np.array([2, 3, 4])
    lps = directions @ voxel + origin
    np.testing.assert_allclose(jmed.affine.voxel_to_world(image.affine, voxel), lps * [-1, -1, 1], atol=1e-9)
    labels = formats.load_nrrd(path, kind="label")
    assert labels.is_label and labels.dtype == np.int16


def test_nrrd_ras_vector_and_spacings(tmp_path):
    nrrd = pytest.importorskip("nrrd")
    data = np.arange(2 * 4 * 3 * 5, dtype=np.float32).reshape(2, 4, 3, 5)  # vector axis first
    header = {
        "space": "right-anterior-superior",
        "space directions": np.array([[np.nan] * 3, [2.0, 0, 0], [0, 3.0, 0], [0, 0, 4.0]]),
        "space origin": np.array([1.0, 2.0, 3.0]),
        "kinds": ["vector", "domain", "domain", "domain"],
    }
    nrrd.write(str(tmp_path / "v.nrrd"), data, header)
    image = formats.load_nrrd(tmp_path / "v.nrrd")
    assert image.shape == (4, 3, 5, 2)
    np.testing.assert_array_equal(image.numpy(), np.moveaxis(data, 0, -1))
    np.testing.assert_allclose(image.affine, [[2, 0, 0, 1], [0, 3, 0, 2], [0, 0, 4, 3], [0, 0, 0, 1]])
    assert image.orientation == "RAS"

    nrrd.write(str(tmp_path / "s.nrrd"), data[0], {"spacings": [0.5, 1.5, 2.5]})
    image = formats.load_nrrd(tmp_path / "s.nrrd")
    np.testing.assert_allclose(image.affine, np.diag([-0.5, -1.5, 2.5, 1.0]))
    assert image.orientation == "LPS"


def test_nrrd_matches_simpleitk(tmp_path):
    nrrd = pytest.importorskip("nrrd")
    sitk = pytest.importorskip("SimpleITK")
    data = np.random.default_rng(1).random((4, 5, 6)).astype(np.float32)
    directions = _rotation((0.1, 0.4, -0.3)) * np.array([1.0, 0.7, 1.9])
    header = {
        "space": "left-posterior-superior",
        "space directions": directions.T,
        "space origin": [3.0, 4.0, 5.0],
    }
    nrrd.write(str(tmp_path / "a.nrrd"), data, header)
    ours = formats.load_nrrd(tmp_path / "a.nrrd")
    ref = sitk.ReadImage(str(tmp_path / "a.nrrd"))
    lps = np.eye(4)
    lps[:3, :3] = np.array(ref.GetDirection()).reshape(3, 3) * np.array(ref.GetSpacing())
    lps[:3, 3] = ref.GetOrigin()
    np.testing.assert_allclose(ours.affine, LPS_TO_RAS @ lps, atol=1e-6)
    np.testing.assert_allclose(ours.numpy()[..., 0], sitk.GetArrayFromImage(ref).transpose(2, 1, 0))


def test_nrrd_errors(tmp_path):
    nrrd = pytest.importorskip("nrrd")
    with pytest.raises(FileNotFoundError):
        formats.load_nrrd(tmp_path / "none.nrrd")
    (tmp_path / "bad.nrrd").write_text("not a nrrd")
    with pytest.raises(ValueError, match="cannot read NRRD"):
        formats.load_nrrd(tmp_path / "bad.nrrd")
    nrrd.write(str(tmp_path / "f.nrrd"), np.full((2, 2, 2), 0.5, np.float32))
    with pytest.raises(ValueError, match="non-integer"):
        formats.load_nrrd(tmp_path / "f.nrrd", kind="label")
    with pytest.raises(ValueError, match="kind"):
        formats.load_nrrd(tmp_path / "f.nrrd", kind="mask")


# --- DICOM ------------------------------------------------------------------------------------


def _write_series(
    folder,
    volume,
    affine_lps,
    *,
    series_uid="1.2.3.4",
    slope=1.0,
    intercept=0.0,
    shuffle=True,
    prefix="slice",
):
    """Write ``volume`` (x=column, y=row, z=slice) as one DICOM file per slice."""
    pydicom = pytest.importorskip("pydicom")
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    col_vec, row_vec, step = affine_lps[:3, 0], affine_lps[:3, 1], affine_lps[:3, 2]
    col_spacing, row_spacing = np.linalg.norm(col_vec), np.linalg.norm(row_vec)
    iop = np.concatenate([col_vec / col_spacing, row_vec / row_spacing])
    order = np.random.default_rng(0).permutation(volume.shape[2]) if shuffle else range(volume.shape[2])
    for n, k in enumerate(order):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = pydicom.Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = MRImageStorage
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.SeriesInstanceUID = series_uid
        ds.StudyInstanceUID = "1.2.3"
        ds.Modality = "MR"
        ds.InstanceNumber = int(n + 1)  # deliberately not the spatial order
        ds.ImagePositionPatient = [float(v) for v in affine_lps[:3, 3] + k * step]
        ds.ImageOrientationPatient = [float(v) for v in iop]
        ds.PixelSpacing = [float(row_spacing), float(col_spacing)]
        ds.SliceThickness = float(np.linalg.norm(step))
        ds.Rows, ds.Columns = volume.shape[1], volume.shape[0]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 0
        ds.RescaleSlope = slope
        ds.RescaleIntercept = intercept
        ds.PixelData = np.ascontiguousarray(volume[:, :, k].T.astype(np.uint16)).tobytes()
        ds.save_as(str(folder / f"{prefix}{n:03d}.dcm"), enforce_file_format=True)


def _oblique_lps():
    affine = np.eye(4)
    affine[:3, :3] = _rotation((0.2, 0.1, -0.4)) * np.array([0.9, 1.1, 3.0])
    affine[:3, 3] = [-40.0, 25.0, 12.0]
    return affine


def test_dicom_series_geometry_and_values(tmp_path):
    pytest.importorskip("pydicom")
    volume = np.random.default_rng(0).integers(0, 4000, (6, 5, 4)).astype(np.uint16)
    affine_lps = _oblique_lps()
    _write_series(tmp_path / "series", volume, affine_lps, slope=0.5, intercept=-100.0)
    (tmp_path / "series" / "README.txt").write_text("not dicom")
    image = formats.load_dicom(tmp_path / "series")
    assert image.shape == (6, 5, 4, 1) and image.dtype == np.float32
    np.testing.assert_allclose(image.numpy()[..., 0], volume * 0.5 - 100.0)
    np.testing.assert_allclose(image.affine, LPS_TO_RAS @ affine_lps, atol=1e-4)
    labels = formats.load_dicom(tmp_path / "series" / "slice000.dcm", kind="label")
    np.testing.assert_array_equal(labels.numpy()[..., 0], volume)
    assert formats.read_image(tmp_path / "series").shape == (6, 5, 4, 1)


def test_dicom_matches_simpleitk(tmp_path):
    pytest.importorskip("pydicom")
    sitk = pytest.importorskip("SimpleITK")
    volume = np.random.default_rng(1).integers(0, 1000, (7, 6, 5)).astype(np.uint16)
    _write_series(tmp_path / "s", volume, _oblique_lps())
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(tmp_path / "s")))
    ref = reader.Execute()
    lps = np.eye(4)
    lps[:3, :3] = np.array(ref.GetDirection()).reshape(3, 3) * np.array(ref.GetSpacing())
    lps[:3, 3] = ref.GetOrigin()
    ours = formats.load_dicom(tmp_path / "s")
    np.testing.assert_allclose(ours.affine, LPS_TO_RAS @ lps, atol=1e-4)
    np.testing.assert_allclose(ours.numpy()[..., 0], sitk.GetArrayFromImage(ref).transpose(2, 1, 0))


def test_dicom_errors(tmp_path):
    pytest.importorskip("pydicom")
    volume = np.zeros((4, 4, 3), np.uint16)
    _write_series(tmp_path / "two", volume, _oblique_lps(), series_uid="1.1")
    _write_series(tmp_path / "two", volume, _oblique_lps(), series_uid="2.2", prefix="other")
    with pytest.raises(ValueError, match="several series"):
        formats.load_dicom(tmp_path / "two")
    assert formats.load_dicom(tmp_path / "two", series_uid="2.2").shape == (4, 4, 3, 1)
    with pytest.raises(ValueError, match="no series"):
        formats.load_dicom(tmp_path / "two", series_uid="9.9")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError):
        formats.load_dicom(tmp_path / "empty")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "a.txt").write_text("x")
    with pytest.raises(ValueError, match="no DICOM image slices"):
        formats.load_dicom(tmp_path / "junk")
    gap = _oblique_lps()
    _write_series(tmp_path / "gap", np.zeros((4, 4, 4), np.uint16), gap, shuffle=False)
    (tmp_path / "gap" / "slice001.dcm").unlink()
    with pytest.raises(ValueError, match="not uniform"):
        formats.load_dicom(tmp_path / "gap")
