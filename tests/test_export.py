"""``jax.export`` of every transform and preset: lowered for CPU, CUDA and TPU from this
CPU host, serialized, deserialized and called on CPU, bit-identical to the jitted call.

Transforms are exported a group at a time (one program returns the outputs of several
transforms) to keep the number of compilations small; each output is compared with the
same transform's direct ``jax.jit`` call on the same key.
"""

import re
from pathlib import Path

import jax
import numpy as np
import pytest
from test_properties import ABSTRACT, CASES, make_transform

import jmed
import jmed.transforms as T
from jmed.affine import from_spacing
from jmed.transforms import presets

PLATFORMS = ("cpu", "cuda", "tpu")
SHAPE = (13, 11, 9)
# transforms that need concrete voxel values on the host and refuse tracing
REFUSED = {"KeepLargestComponent", "RemoveSmallObjects", "FillHoles", "CropForeground"}
# transforms whose output shape follows the affine's values: exported with the affine as
# a constant of the program (the voxel data are the inputs)
HEADER = {"Reorient", "ToCanonical"}
# RandomRot90 in the (0, 1) plane needs equal sizes on those axes
SQUARE = {"RandomRot90"}
GROUP_SIZE = 8


def _subject(shape=SHAPE, seed=0):
    rng = np.random.default_rng(seed)
    affine = from_spacing((1.0, 1.5, 2.0), (3.0, -7.0, 11.0), "LPS")
    intensity = rng.normal(50.0, 20.0, shape + (2,)).astype(np.float32)
    labels = rng.integers(0, 3, shape + (1,)).astype(np.uint8)
    labels[2:8, 3:8, 2:7] = 1  # a foreground block (CropForeground, Mask)
    return jmed.Subject(
        t1=jmed.Image(intensity, affine, kind="intensity"),
        seg=jmed.Image(labels, affine, kind="label"),
    )


def _call(transform, key, subject):
    return transform(key if transform.is_random else None, subject)


def _group_fn(transforms, header_affine=None):
    """``(key, subject) -> outputs`` of every transform (key ``fold_in(key, i)`` for the
    ``i``-th); with ``header_affine``, ``(key, t1, seg)`` voxel data instead of a subject,
    the affine a constant."""

    def outputs(key, subject):
        return tuple(_call(t, jax.random.fold_in(key, i), subject) for i, t in enumerate(transforms))

    if header_affine is None:
        return outputs

    def from_data(key, t1, seg):
        subject = jmed.Subject(
            t1=jmed.Image(t1, header_affine, kind="intensity"),
            seg=jmed.Image(seg, header_affine, kind="label"),
        )
        return outputs(key, subject)

    return from_data


def _export_roundtrip(fn, *args):
    """Export for every platform, serialize, deserialize; returns the reloaded program."""
    exported = jax.export.export(jax.jit(fn), platforms=PLATFORMS)(*args)
    assert exported.platforms == PLATFORMS
    data = exported.serialize()
    assert isinstance(data, (bytes, bytearray))
    restored = jax.export.deserialize(data)
    assert restored.in_tree == exported.in_tree
    return restored


def _assert_identical(actual, expected, label):
    a_leaves, a_tree = jax.tree.flatten(actual)
    e_leaves, e_tree = jax.tree.flatten(expected)
    assert a_tree == e_tree, f"{label}: structures differ: {a_tree} vs {e_tree}"
    for a, e in zip(a_leaves, e_leaves):
        a, e = np.asarray(a), np.asarray(e)
        assert a.dtype == e.dtype and a.shape == e.shape, (label, a.dtype, e.dtype, a.shape, e.shape)
        # bit-identical (NaNs compare by their bits too)
        np.testing.assert_array_equal(
            a.reshape(-1).view(np.uint8), e.reshape(-1).view(np.uint8), err_msg=label
        )


def _check_group(names, transforms, args, header_affine=None):
    fn = _group_fn(transforms, header_affine)
    restored = _export_roundtrip(fn, *args)
    reloaded = restored.call(*args)
    direct = jax.jit(fn)(*args)
    for name, a, e in zip(names, reloaded, direct):
        _assert_identical(a, e, name)
    return reloaded


def _exported_names():
    return sorted(n for n in CASES if n not in ABSTRACT | REFUSED)


def _groups():
    plain = [n for n in _exported_names() if n not in HEADER | SQUARE]
    groups = [plain[i : i + GROUP_SIZE] for i in range(0, len(plain), GROUP_SIZE)]
    return [pytest.param(g, id=f"{g[0]}..{g[-1]}") for g in groups]


def test_every_transform_is_exported_or_refuses():
    """The groups below cover every public transform but the abstract bases."""
    covered = set(_exported_names()) | REFUSED
    assert covered == set(CASES) - ABSTRACT
    assert "RandomAffine" in covered and "RescaleIntensity" in covered


@pytest.mark.parametrize("names", _groups())
def test_transforms_export_and_reload_bit_identical(names):
    subject = _subject()
    transforms = [make_transform(n, subject) for n in names]
    key = jax.random.key(7)
    reloaded = _check_group(names, transforms, (key, subject))
    # the reloaded outputs are the transforms' outputs, not just equal to the jitted call
    for name, t, out in zip(names, transforms, reloaded):
        if name in ("RandomNoise", "Clamp", "RandomFlip", "RescaleIntensity"):
            i = names.index(name)
            eager = _call(t, jax.random.fold_in(key, i), subject)
            for image in out:
                np.testing.assert_allclose(out[image].data, eager[image].data, rtol=1e-5, atol=1e-4)


def test_shape_from_header_transforms_export_with_a_constant_affine():
    subject = _subject()
    names = sorted(HEADER)
    transforms = [make_transform(n, subject) for n in names]
    args = (jax.random.key(3), subject["t1"].data, subject["seg"].data)
    reloaded = _check_group(names, transforms, args, header_affine=np.asarray(subject["t1"].affine))
    for name, t, out in zip(names, transforms, reloaded):
        np.testing.assert_array_equal(out["t1"].data, t(subject)["t1"].data, err_msg=name)


def test_rot90_exports_on_a_square_plane():
    subject = _subject((11, 11, 9))
    names = sorted(SQUARE)
    _check_group(names, [make_transform(n, subject) for n in names], (jax.random.key(5), subject))


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_host_only_transforms_refuse_export_clearly(name):
    subject = _subject()
    transform = make_transform(name, subject)
    fn = _group_fn([transform])
    with pytest.raises(TypeError, match=name) as info:
        jax.export.export(jax.jit(fn), platforms=PLATFORMS)(jax.random.key(0), subject)
    assert "traced" in str(info.value) or "concrete" in str(info.value)


PRESETS = {
    "nnunet_augmentation": (lambda: presets.nnunet_augmentation(), False),
    "nnunet_intensity_augmentation": (lambda: presets.nnunet_intensity_augmentation(), False),
    "torchio_paper_augmentation": (
        lambda: presets.torchio_paper_augmentation(target_shape=(12, 12, 10)),
        True,
    ),
}


def test_presets_export_and_reload_bit_identical():
    assert set(PRESETS) == set(presets.__all__)
    subject = _subject()
    key = jax.random.key(11)
    plain = [n for n, (_, header) in PRESETS.items() if not header]
    _check_group(plain, [PRESETS[n][0]() for n in plain], (key, subject))
    header = [n for n, (_, header) in PRESETS.items() if header]
    args = (key, subject["t1"].data, subject["seg"].data)
    _check_group(header, [PRESETS[n][0]() for n in header], args, np.asarray(subject["t1"].affine))


def test_reloaded_subject_keeps_names_metadata_and_history():
    subject = _subject().replace(
        metadata={"site": "a", "raw": b"\x00\x01", "flag": True, "age": np.float32(41)}
    )
    pipeline = T.Compose([T.RandomFlip(axes=(0, 1)), T.Pad((1, 0, 0, 1, 0, 0))])
    key = jax.random.key(2)
    restored = _export_roundtrip(lambda k, s: pipeline(k, s), key, subject)
    out = restored.call(key, subject)
    expected = jax.jit(lambda k, s: pipeline(k, s))(key, subject)
    _assert_identical(out, expected, "Compose")
    assert list(out) == ["seg", "t1"] and out["seg"].kind == "label" and out["t1"].kind == "intensity"
    assert out.metadata["site"] == "a" and out.metadata["raw"] == b"\x00\x01" and out.metadata["flag"] is True
    assert float(out.metadata["age"]) == 41.0
    # the history keeps the params; its transform is a stand-in that prints as the original
    ((recorded, params),) = out.history
    assert repr(recorded) == repr(pipeline) and recorded == pipeline
    _assert_identical(params, expected.history[0][1], "params")
    with pytest.raises(AttributeError, match="serialized"):
        recorded.apply(out, params)
    # a subject with that history is accepted by a program exported for one
    again = _export_roundtrip(lambda s: T.Clamp(out_min=0.0)(s), out)
    _assert_identical(again.call(out), jax.jit(lambda s: T.Clamp(out_min=0.0)(s))(expected), "history input")


def test_image_exports_alone():
    image = _subject()["t1"]
    restored = _export_roundtrip(lambda k, im: T.RandomGamma()(k, im), jax.random.key(1), image)
    out = restored.call(jax.random.key(1), image)
    assert isinstance(out, jmed.Image) and out.kind == "intensity"
    _assert_identical(out, jax.jit(lambda k, im: T.RandomGamma()(k, im))(jax.random.key(1), image), "Image")


def test_docs_page_runs(tmp_path, monkeypatch):
    """The code of docs/export.md runs as written (its blocks in order, one namespace)."""
    page = Path(__file__).resolve().parents[1] / "docs" / "export.md"
    blocks = re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)
    assert len(blocks) == 2, "docs/export.md: expected an export block and a reload block"
    monkeypatch.chdir(tmp_path)
    namespace = {}
    for block in blocks:
        exec(compile(block, str(page), "exec"), namespace)
    assert (tmp_path / "augment.jaxexport").stat().st_size > 0
    expected = jax.jit(namespace["augment_batch"])(namespace["keys"], namespace["batch"])
    _assert_identical(namespace["augmented"], expected, "docs/export.md")
