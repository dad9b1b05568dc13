import jax
import numpy as np
import pytest
from conftest import make_phantom

import jmed
from jmed.transforms import invert
from jmed.transforms.labels import (
    FillHoles,
    KeepLargestComponent,
    OneHot,
    RemapLabels,
    RemoveLabels,
    RemoveSmallObjects,
    SequentialLabels,
)


@pytest.fixture
def subject():
    return make_phantom((12, 10, 8), num_labels=3)


def _seg(s):
    return np.asarray(s.seg.data)[..., 0]


def _fixture():
    """Label 1: a big blob with a closed hole and a tiny island; label 2: two blobs."""
    seg = np.zeros((16, 14, 12), np.uint8)
    seg[1:8, 1:8, 1:8] = 1
    seg[3:5, 3:5, 3:5] = 0  # hole of label 1
    seg[12, 12, 10] = 1  # island of label 1 (1 voxel)
    seg[10:14, 1:5, 1:5] = 2  # 64 voxels
    seg[10:12, 9:11, 8:10] = 2  # 8 voxels
    t1 = np.random.default_rng(0).normal(size=seg.shape).astype(np.float32)
    return jmed.Subject(t1=jmed.ScalarImage(t1), seg=jmed.LabelMap(seg))


def test_one_hot(run, subject):
    t = OneHot(3)
    out = t(subject)
    assert out.seg.shape == (12, 10, 8, 3) and out.seg.dtype == np.uint8 and out.seg.is_label
    np.testing.assert_array_equal(np.argmax(np.asarray(out.seg.data), -1), _seg(subject))
    np.testing.assert_array_equal(np.asarray(out.seg.data).sum(-1), 1)
    np.testing.assert_array_equal(out.t1.data, subject.t1.data)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 2\)"):
        OneHot(2)(subject)
    with pytest.raises(ValueError, match="num_classes"):
        OneHot(0)


def test_remap_and_remove_labels(run, subject):
    t = RemapLabels({1: 2, 2: 1})
    out = t(subject)
    seg = _seg(subject).astype(int)
    np.testing.assert_array_equal(_seg(out), np.select([seg == 1, seg == 2], [2, 1], seg))
    np.testing.assert_array_equal(_seg(invert(t(subject))), seg)
    removed = run(lambda k, s, t=RemoveLabels([2]): t(s), None, subject)
    np.testing.assert_array_equal(_seg(removed), np.where(seg == 2, 0, seg))
    assert not RemapLabels({1: 2}).invertible  # 2 is kept and 1 -> 2: not one-to-one
    with pytest.raises(ValueError, match="mapping"):
        RemapLabels({1.5: 2})
    with pytest.raises(ValueError, match="labels"):
        RemoveLabels([])


def test_sequential_labels(run):
    seg = np.zeros((6, 5, 4), np.uint8)
    seg[0] = 3
    seg[1] = 7
    seg[2] = 200
    subject = jmed.Subject(seg=jmed.LabelMap(seg))
    t = SequentialLabels()
    out = t(subject)
    seg = seg.astype(int)
    np.testing.assert_array_equal(_seg(out), np.select([seg == 3, seg == 7, seg == 200], [1, 2, 3], 0))
    wide = jmed.Subject(seg=jmed.LabelMap(seg.astype(np.int32) * 1000))
    np.testing.assert_array_equal(_seg(SequentialLabels()(wide)), _seg(out))
    with pytest.raises(TypeError, match="max_label"):
        jax.jit(lambda s: SequentialLabels()(s))(wide)
    out = jax.jit(lambda s: SequentialLabels(max_label=200_000)(s))(wide)
    np.testing.assert_array_equal(_seg(out), _seg(SequentialLabels()(wide)))


def test_keep_largest_component_per_label():
    subject = _fixture()
    t = KeepLargestComponent()
    out = t(subject)
    seg, res = _seg(subject), _seg(out)
    expected = seg.copy()
    expected[12, 12, 10] = 0
    expected[10:12, 9:11, 8:10] = 0
    np.testing.assert_array_equal(res, expected)
    only2 = _seg(KeepLargestComponent(labels=2)(subject))
    assert only2[12, 12, 10] == 1 and only2[10, 9, 8] == 0
    np.testing.assert_array_equal(out.t1.data, subject.t1.data)


def test_keep_largest_connectivity():
    seg = np.zeros((6, 6, 6), np.uint8)
    seg[0:2, 0:2, 0:2] = 1  # 8 voxels
    seg[2, 2, 2] = seg[3, 3, 3] = seg[4, 4, 4] = seg[5, 5, 5] = seg[2, 3, 2] = 1  # corner-connected
    subject = jmed.Subject(seg=jmed.LabelMap(seg))
    six = _seg(KeepLargestComponent(connectivity=6)(subject))
    np.testing.assert_array_equal(six, (np.indices(seg.shape) < 2).all(0))
    np.testing.assert_array_equal(_seg(KeepLargestComponent(connectivity=26)(subject)), seg)
    with pytest.raises(ValueError, match="connectivity"):
        KeepLargestComponent(connectivity=8)


def test_fill_holes():
    subject = _fixture()
    t = FillHoles()
    out = t(subject)
    expected = _seg(subject).copy()
    expected[3:5, 3:5, 3:5] = 1
    np.testing.assert_array_equal(_seg(out), expected)
    # a cavity holding another label is not a hole of label 1
    seg = _seg(subject).copy()
    seg[3, 3, 3] = 2
    filled = _seg(FillHoles(labels=1)(jmed.Subject(seg=jmed.LabelMap(seg))))
    np.testing.assert_array_equal(filled, seg)


def test_remove_small_objects():
    subject = _fixture()
    t = RemoveSmallObjects(9)
    out = t(subject)
    expected = _seg(subject).copy()
    expected[12, 12, 10] = 0
    expected[10:12, 9:11, 8:10] = 0
    np.testing.assert_array_equal(_seg(out), expected)
    np.testing.assert_array_equal(_seg(RemoveSmallObjects(2)(subject))[10:12, 9:11, 8:10], 2)
    with pytest.raises(ValueError, match="min_size"):
        RemoveSmallObjects(0)


def test_components_against_scipy_on_phantom():
    ndimage = pytest.importorskip("scipy.ndimage")
    rng = np.random.default_rng(3)
    field = ndimage.gaussian_filter(rng.normal(size=(30, 28, 26)), 1.5)
    seg = np.digitize(field, [0.02, 0.08]).astype(np.uint8)
    out = _seg(KeepLargestComponent()(jmed.Subject(seg=jmed.LabelMap(seg))))
    for label in (1, 2):
        comp, num = ndimage.label(seg == label)
        sizes = np.bincount(comp.ravel())[1:]
        np.testing.assert_array_equal(out == label, comp == np.argmax(sizes) + 1)


COMPONENT_TRANSFORMS = {
    "KeepLargestComponent": lambda: KeepLargestComponent(),
    "RemoveSmallObjects": lambda: RemoveSmallObjects(9),
    "FillHoles": lambda: FillHoles(),
}


@pytest.mark.parametrize("name", sorted(COMPONENT_TRANSFORMS))
def test_component_transforms_refuse_tracing_clearly(name):
    """Host-only: under jit or vmap a TypeError names the transform and says to call it
    eagerly (no host callback inside a compiled program)."""
    subject = _fixture()
    t = COMPONENT_TRANSFORMS[name]()
    message = rf"{name} .*eagerly, outside jit/vmap"
    with pytest.raises(TypeError, match=message):
        jax.jit(lambda s: t(s))(subject)
    with pytest.raises(TypeError, match=message):
        jax.vmap(lambda s: t(s))(jmed.stack([subject, subject]))
    # eagerly: numpy in, numpy out, the same as the per-label host computation
    out = t(subject)
    assert isinstance(out["seg"].data, np.ndarray) and out["seg"].dtype == np.uint8
    np.testing.assert_array_equal(out["t1"].data, subject["t1"].data)


def _write_volumes(folder):
    import nibabel as nib

    seg = np.asarray(_fixture()["seg"].data)[..., 0]
    t1 = np.random.default_rng(1).normal(size=seg.shape).astype(np.float32)
    nib.save(nib.Nifti1Image(seg, np.eye(4)), folder / "seg.nii.gz")
    nib.save(nib.Nifti1Image(t1, np.eye(4)), folder / "t1.nii.gz")
    return [{"t1": str(folder / "t1.nii.gz"), "seg": str(folder / "seg.nii.gz")}]


def test_component_transforms_run_in_the_loader_preprocessing(tmp_path):
    """The loader's preprocessing runs eagerly (and its shape is planned from the headers
    with the transform in it); in the jitted augmentation the transform refuses."""
    from jmed.sampling import UniformSampler

    records = _write_volumes(tmp_path)
    cleanup = jmed.transforms.Compose([KeepLargestComponent(), FillHoles()])
    source = jmed.SubjectsSource(records, label_names="seg", preprocessing=cleanup)
    assert source.predicted_shape(0)[0] == (16, 14, 12)
    expected = _seg(FillHoles()(KeepLargestComponent()(_fixture())))
    np.testing.assert_array_equal(_seg(source[0]), expected)
    options = dict(
        sampler=UniformSampler((16, 14, 12)),
        samples_per_volume=1,
        max_length=1,
        batch_size=1,
        seed=0,
        label_names="seg",
        num_workers=0,
        shard_index=0,
        shard_count=1,
    )
    batch = next(iter(jmed.Queue(records, preprocessing=cleanup, **options)))
    np.testing.assert_array_equal(np.asarray(batch["seg"].data)[0, ..., 0], expected)
    with pytest.raises(TypeError, match="KeepLargestComponent .*eagerly"):
        next(iter(jmed.Queue(records, augmentation=KeepLargestComponent(), **options)))
