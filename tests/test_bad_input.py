"""Bad input to every public entry point raises a documented exception naming the argument.

Table-driven: each case is ``(public name, call, exception type, message regex)``. The
completeness test checks that every public class and function of ``jmed.__all__`` and
``jmed.transforms.__all__`` has a case, or is in ``EXEMPT`` with a reason.
"""

import inspect
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

import jmed
import jmed.transforms as T
from jmed import datasets, metrics

ROOT = Path(__file__).resolve().parents[1]
EYE = np.eye(4)


def img(shape=(4, 4, 4), kind="intensity"):
    data = np.zeros(shape + (1,), np.uint8 if kind == "label" else np.float32)
    return jmed.Image(data, EYE, kind=kind)


def subj():
    return jmed.Subject(t1=img(), seg=img(kind="label"))


def shifted_subject():
    shifted = EYE.copy()
    shifted[1, 3] = 30.0  # the label map 30 mm away from the image
    return jmed.Subject(t1=img(), seg=jmed.Image(img(kind="label").data, shifted, kind="label"))


def grid_sampler():
    return jmed.GridSampler(img((8, 8, 8)), 4)


# name -> reason it has no bad-input case
EXEMPT = {
    "stack": "takes any list of pytrees; errors come from jax.tree",
    "unstack": "takes any batched pytree; errors come from jax.tree",
    "LoaderIterator": "built by the loaders, not by users",
    "Transform": "abstract base: its constructor only takes include/exclude (checked via Crop)",
    "IntensityTransform": "abstract base (include/exclude checked via RandomNoise)",
    "LabelTransform": "abstract base (include/exclude checked via OneHot)",
    "SpatialTransform": "abstract base (interpolation names checked via RandomAffine)",
    "RandomTransform": "abstract base (a missing key is checked in tests/test_base.py)",
    "MissingKeyError": "the error itself",
    "SampleFn": "a typing.Protocol, not called",
    "ApplyFn": "a typing.Protocol, not called",
    "InverseFn": "a typing.Protocol, not called",
    "TransformFn": "a typing.Protocol, not called",
    "ToCanonical": "only include/exclude",
    "SequentialLabels": "max_label checked like every other positive int",
    "SpatialMapping": "a NamedTuple of arrays built by the library",
    "OutputGrid": "a NamedTuple built by the library",
    "WindowParams": "parameters built by the window transforms",
    "nnunet_intensity_augmentation": "takes no arguments",
    "max_output_bytes": "takes no arguments (a bad JMED_MAX_OUTPUT_BYTES is tested below)",
    "Accumulator": "a typing.Protocol, not called",
    "OutputSpec": "a record that sliding_window_inference builds for accumulator factories",
}

CASES = [
    # --- loader options and accumulators -------------------------------------------------------
    ("SourceOptions", lambda: jmed.SourceOptions(label_names=3), TypeError, r"label_names"),
    ("ShardOptions", lambda: jmed.ShardOptions(shard_count=0), ValueError, r"shard_count"),
    ("BucketOptions", lambda: jmed.BucketOptions(max_buckets=0), ValueError, r"max_buckets"),
    ("WorkerOptions", lambda: jmed.WorkerOptions(worker_buffer_size=-1), ValueError, r"worker_buffer_size"),
    ("DeviceAccumulator", lambda: jmed.DeviceAccumulator((8, 8, 8)), TypeError, r"spec"),
    ("HostAccumulator", lambda: jmed.HostAccumulator((8, 8, 8)), TypeError, r"spec"),
    ("ChunkedAccumulator", lambda: jmed.ChunkedAccumulator(None, "/tmp/out.nii.zarr"), TypeError, r"spec"),
    # --- data model -----------------------------------------------------------------------
    ("Image", lambda: jmed.Image(np.zeros((2, 2)), EYE), ValueError, r"data"),
    ("Image", lambda: jmed.Image(np.zeros((2, 2, 2, 1)), np.eye(3)), ValueError, r"affine"),
    ("Image", lambda: jmed.Image(np.zeros((2, 2, 2, 1)), EYE, kind="mask"), ValueError, r"kind"),
    ("ScalarImage", lambda: jmed.ScalarImage(np.zeros((2,))), ValueError, r"data"),
    ("LabelMap", lambda: jmed.LabelMap(np.zeros((2, 2, 2)), np.zeros((4, 4))), ValueError, r"affine"),
    ("Subject", lambda: jmed.Subject(t1=np.zeros((2, 2, 2))), TypeError, r"t1"),
    ("load", lambda: jmed.load("/nonexistent/x.nii.gz"), FileNotFoundError, r"x\.nii\.gz"),
    ("load", lambda: jmed.load(__file__), ValueError, r"test_bad_input\.py"),
    ("load", lambda: jmed.load("/nonexistent/x.nii.gz", kind="mask"), ValueError, r"kind"),
    ("save", lambda: jmed.save(img(), "/tmp/out.txt"), ValueError, r"out\.txt"),
    ("save", lambda: jmed.save(np.zeros((2, 2, 2)), "/tmp/out.nii.gz"), TypeError, r"Image"),
    ("tune_host_allocator", lambda: jmed.tune_host_allocator(-1), ValueError, r"threshold.*-1"),
    # --- samplers -------------------------------------------------------------------------
    ("PatchSampler", lambda: jmed.PatchSampler(0), ValueError, r"patch_size"),
    ("UniformSampler", lambda: jmed.UniformSampler((4, 4)), ValueError, r"patch_size"),
    ("WeightedSampler", lambda: jmed.WeightedSampler(4, 3), TypeError, r"probability_map"),
    (
        "LabelSampler",
        lambda: jmed.LabelSampler(4, label_probabilities={1: -1.0}),
        ValueError,
        r"label_probabilities",
    ),
    ("LabelSampler", lambda: jmed.LabelSampler(-2), ValueError, r"patch_size"),
    ("GridPatchSampler", lambda: jmed.GridPatchSampler(4, overlap=5), ValueError, r"overlap"),
    ("grid_locations", lambda: jmed.grid_locations((8, 8, 8), 4, overlap=4), ValueError, r"overlap"),
    (
        "extract_patches",
        lambda: jmed.extract_patches(subj(), np.zeros((2, 3), int), (9, 9, 9)),
        ValueError,
        r"patch_size",
    ),
    # --- loading --------------------------------------------------------------------------
    ("SubjectsSource", lambda: jmed.SubjectsSource([]), ValueError, r"subjects"),
    ("SubjectsSource", lambda: jmed.SubjectsSource("a.nii.gz"), TypeError, r"subjects"),
    # a record whose images are on different grids: named, at load time
    (
        "SubjectsSource",
        lambda: jmed.SubjectsSource([shifted_subject()])[0],
        ValueError,
        r"(?s)subject 0 .*do not share a voxel grid.*Resample",
    ),
    (
        "VolumeLoader",
        lambda: next(iter(jmed.VolumeLoader([shifted_subject()], compilation_cache_dir=None))),
        ValueError,
        r"subject 0 .*do not share a voxel grid",
    ),
    (
        "Queue",
        lambda: iter(
            jmed.Queue([subj()], jmed.UniformSampler(2), 1, 4, compilation_cache_dir=None)
        ).set_state([1]),
        ValueError,
        r"state must be a dict",
    ),
    (
        "Queue",
        lambda: jmed.Queue([{"t1": "a.nii.gz"}], jmed.UniformSampler(2), 0, 4),
        ValueError,
        r"samples_per_volume",
    ),
    ("Queue", lambda: jmed.Queue([{"t1": "a.nii.gz"}], "uniform", 1, 4), TypeError, r"sampler"),
    (
        "VolumeLoader",
        lambda: jmed.VolumeLoader([{"t1": "a.nii.gz"}], batch_size=0),
        ValueError,
        r"batch_size",
    ),
    (
        "VolumeLoader",
        lambda: jmed.VolumeLoader([{"t1": "a.nii.gz"}], num_workers=-1),
        ValueError,
        r"num_workers",
    ),
    (
        "augment_and_sample",
        lambda: jmed.augment_and_sample(jax.random.key(0), jmed.stack([subj()]), sampler="x", num_patches=1),
        TypeError,
        r"sampler",
    ),
    # --- inference ------------------------------------------------------------------------
    (
        "sliding_window_inference",
        lambda: jmed.sliding_window_inference(lambda x: x, img(), 2, mode="max"),
        ValueError,
        r"mode",
    ),
    (
        "sliding_window_inference",
        lambda: jmed.sliding_window_inference(lambda x: x, img(), 2, batch_size=0),
        ValueError,
        r"batch_size",
    ),
    ("GridSampler", lambda: jmed.GridSampler(img(), 2, overlap=3), ValueError, r"overlap"),
    ("GridSampler", lambda: jmed.GridSampler(np.zeros((4, 4, 4, 1)), 2), TypeError, r"image"),
    ("GridAggregator", lambda: jmed.GridAggregator(grid_sampler(), mode="max"), ValueError, r"mode"),
    ("GridAggregator", lambda: jmed.GridAggregator("sampler"), TypeError, r"sampler"),
    # --- transforms -----------------------------------------------------------------------
    ("Clamp", lambda: T.Clamp(out_min=2.0, out_max=1.0), ValueError, r"out_min"),
    ("Compose", lambda: T.Compose([T.RandomNoise(), "flip"]), TypeError, r"transforms"),
    ("CopyAffine", lambda: T.CopyAffine(3), TypeError, r"target"),
    ("Crop", lambda: T.Crop(-1), ValueError, r"cropping"),
    ("Crop", lambda: T.Crop((1, 2)), ValueError, r"cropping"),
    ("Crop", lambda: T.Crop(1, include=3), TypeError, r"include"),
    ("CropForeground", lambda: T.CropForeground(margin=-1), ValueError, r"margin"),
    ("CropOrPad", lambda: T.CropOrPad((4, 4)), ValueError, r"target_shape"),
    ("CropOrPad", lambda: T.CropOrPad(4, padding_mode="wrapx"), ValueError, r"padding_mode"),
    ("EnsureShapeMultiple", lambda: T.EnsureShapeMultiple(0), ValueError, r"target_multiple"),
    ("EnsureShapeMultiple", lambda: T.EnsureShapeMultiple(4, method="grow"), ValueError, r"method"),
    ("FillHoles", lambda: T.FillHoles(connectivity=5), ValueError, r"connectivity"),
    ("HistogramStandardization", lambda: T.HistogramStandardization([0.0, 1.0]), ValueError, r"landmarks"),
    ("KeepLargestComponent", lambda: T.KeepLargestComponent(connectivity=7), ValueError, r"connectivity"),
    ("Lambda", lambda: T.Lambda(3), TypeError, r"function"),
    ("Lambda", lambda: T.Lambda(abs, kinds=("mask",)), ValueError, r"kinds"),
    ("Mask", lambda: T.Mask(None), ValueError, r"masking_method"),
    ("OneHot", lambda: T.OneHot(0), ValueError, r"num_classes"),
    ("OneHot", lambda: T.OneHot(3, exclude=5), TypeError, r"exclude"),
    ("OneOf", lambda: T.OneOf([T.RandomNoise()], probabilities=[-1.0]), ValueError, r"probabilities"),
    ("Pad", lambda: T.Pad(-2), ValueError, r"padding"),
    ("Pad", lambda: T.Pad(1, padding_mode="nope"), ValueError, r"padding_mode"),
    ("RandomAffine", lambda: T.RandomAffine(scales=-2), ValueError, r"scales"),
    (
        "RandomAffine",
        lambda: T.RandomAffine(image_interpolation="cubicx"),
        ValueError,
        r"image_interpolation",
    ),
    ("RandomAffine", lambda: T.RandomAffine(center="middle"), ValueError, r"center"),
    ("RandomAnisotropy", lambda: T.RandomAnisotropy(downsampling=0.5), ValueError, r"downsampling"),
    ("RandomAnisotropy", lambda: T.RandomAnisotropy(axes=3), ValueError, r"axes"),
    ("RandomApply", lambda: T.RandomApply(T.RandomNoise(), p=1.5), ValueError, r"\bp\b"),
    ("RandomApply", lambda: T.RandomApply("noise"), TypeError, r"transform"),
    ("RandomBiasField", lambda: T.RandomBiasField(order=-1), ValueError, r"order"),
    ("RandomBlur", lambda: T.RandomBlur(std=-1), ValueError, r"std"),
    ("RandomBlur", lambda: T.RandomBlur(units="inch"), ValueError, r"units"),
    ("RandomBrightness", lambda: T.RandomBrightness(multiplier=-0.5), ValueError, r"multiplier"),
    ("RandomCoarseDropout", lambda: T.RandomCoarseDropout(num_holes=-1), ValueError, r"num_holes"),
    ("RandomContrast", lambda: T.RandomContrast(contrast=-1), ValueError, r"contrast"),
    (
        "RandomElasticDeformation",
        lambda: T.RandomElasticDeformation(num_control_points=3),
        ValueError,
        r"num_control_points",
    ),
    (
        "RandomElasticDeformation",
        lambda: T.RandomElasticDeformation(max_displacement=-1),
        ValueError,
        r"max_displacement",
    ),
    ("RandomFlip", lambda: T.RandomFlip(axes=4), ValueError, r"axes"),
    ("RandomFlip", lambda: T.RandomFlip(flip_probability=2), ValueError, r"flip_probability"),
    ("RandomGamma", lambda: T.RandomGamma(gamma=(-1, 2)), ValueError, r"gamma"),
    ("RandomGhosting", lambda: T.RandomGhosting(num_ghosts=-1), ValueError, r"num_ghosts"),
    ("RandomGhosting", lambda: T.RandomGhosting(axes=5), ValueError, r"axes"),
    ("RandomLabelsToImage", lambda: T.RandomLabelsToImage(3), TypeError, r"label_key"),
    ("RandomLabelsToImage", lambda: T.RandomLabelsToImage("seg", num_labels=0), ValueError, r"num_labels"),
    ("RandomMotion", lambda: T.RandomMotion(num_transforms=0), ValueError, r"num_transforms"),
    ("RandomMotion", lambda: T.RandomMotion(phase_encoding_axis=3), ValueError, r"phase_encoding_axis"),
    ("RandomNoise", lambda: T.RandomNoise(std=-1), ValueError, r"std"),
    ("RandomNoise", lambda: T.RandomNoise(include=1.5), TypeError, r"include"),
    ("RandomRot90", lambda: T.RandomRot90(axes=(0, 0)), ValueError, r"axes"),
    ("RandomSpike", lambda: T.RandomSpike(num_spikes=-1), ValueError, r"num_spikes"),
    ("RandomSwap", lambda: T.RandomSwap(patch_size=0), ValueError, r"patch_size"),
    ("RandomSwap", lambda: T.RandomSwap(num_iterations=-1), ValueError, r"num_iterations"),
    ("RemapLabels", lambda: T.RemapLabels([1, 2]), ValueError, r"mapping"),
    ("RemoveLabels", lambda: T.RemoveLabels("a"), (TypeError, ValueError), r"labels"),
    ("RemoveSmallObjects", lambda: T.RemoveSmallObjects(-1), ValueError, r"min_size"),
    ("Reorient", lambda: T.Reorient("XYZ"), ValueError, r"orientation"),
    ("Resample", lambda: T.Resample(-1.0), ValueError, r"target"),
    ("Resample", lambda: T.Resample(1.0, image_interpolation="sinc"), ValueError, r"image_interpolation"),
    ("RescaleIntensity", lambda: T.RescaleIntensity(percentiles=(50, 10)), ValueError, r"percentiles"),
    ("Resize", lambda: T.Resize(0), ValueError, r"target_shape"),
    ("SomeOf", lambda: T.SomeOf([T.RandomNoise()], num_transforms=3), ValueError, r"num_transforms"),
    ("Spatial", lambda: T.Spatial([T.RandomNoise()]), TypeError, r"transforms"),
    ("Spatial", lambda: T.Spatial(output_shape=(0, 4, 4)), ValueError, r"output_shape"),
    ("ZNormalization", lambda: T.ZNormalization(masking_method=3.5), ValueError, r"masking_method"),
    (
        "affine_mapping",
        lambda: T.affine_mapping(np.ones(3), np.zeros(3), np.zeros(3), (4, 4, 4), EYE, center="middle"),
        ValueError,
        r"center",
    ),
    ("compose_mappings", lambda: T.compose_mappings("a", "b"), TypeError, r"first"),
    ("invert_mapping", lambda: T.invert_mapping("a"), TypeError, r"mapping"),
    ("get_mask", lambda: T.get_mask(subj(), "nope", subj()["t1"]), (KeyError, ValueError), r"nope"),
    ("histogram_percentiles", lambda: T.histogram_percentiles(cutoff=(90, 10)), ValueError, r"cutoff"),
    (
        "histogram_percentiles",
        lambda: T.histogram_percentiles(quantiles="tertiles"),
        ValueError,
        r"quantiles",
    ),
    ("invert", lambda: T.invert("subject"), TypeError, r"Subject"),
    ("replay", lambda: T.replay(subj(), [("flip", None)]), TypeError, r"history"),
    (
        "transform_key",
        lambda: T.transform_key(T.Lambda(lambda x, handle=object(): x)),
        ValueError,
        r"Lambda\.function\.__defaults__\[0\] is a object",
    ),
    ("set_max_output_bytes", lambda: T.set_max_output_bytes(-1), ValueError, r"max_output_bytes.*-1"),
    ("load_landmarks", lambda: T.load_landmarks("/nonexistent/lm.npy"), ValueError, r"lm\.npy"),
    ("save_landmarks", lambda: T.save_landmarks([0.0, 1.0], "/tmp/lm.txt"), ValueError, r"lm\.txt|path"),
    ("train_histogram", lambda: T.train_histogram([]), ValueError, r"image"),
    ("nnunet_augmentation", lambda: T.nnunet_augmentation(axes=(0, 7)), ValueError, r"axes"),
    (
        "torchio_paper_augmentation",
        lambda: T.torchio_paper_augmentation(spacing=-1.0),
        ValueError,
        r"spacing|target",
    ),
    (
        "predict_with_tta",
        lambda: T.predict_with_tta(None, abs, subj(), T.RandomFlip(), num_augmentations=0),
        ValueError,
        r"num_augmentations",
    ),
    # --- metrics --------------------------------------------------------------------------
    (
        "metrics.dice_score",
        lambda: metrics.dice_score(np.zeros((4, 4, 4)), np.zeros((4, 4, 3))),
        ValueError,
        r"shape|target",
    ),
    ("metrics.one_hot", lambda: metrics.one_hot(np.zeros((2, 2)), 0), ValueError, r"num_classes"),
    (
        "metrics.hausdorff_distance",
        lambda: metrics.hausdorff_distance(
            np.zeros((4, 4, 4), int), np.zeros((4, 4, 4), int), percentile=150
        ),
        ValueError,
        r"percentile",
    ),
    (
        "metrics.distance_transform",
        lambda: metrics.distance_transform(np.zeros((4, 4, 4), bool), spacing=(1.0, -1.0, 1.0)),
        ValueError,
        r"spacing",
    ),
    (
        "metrics.dice_loss",
        lambda: metrics.dice_loss(np.zeros((2, 4, 4, 4, 3)), np.zeros((2, 4, 4, 3), int)),
        ValueError,
        r"labels|shape",
    ),
    (
        "metrics.cross_entropy",
        lambda: metrics.cross_entropy(np.zeros((2, 4, 3)), np.zeros((2, 5))),
        ValueError,
        r"labels|shape",
    ),
    # --- datasets -------------------------------------------------------------------------
    ("datasets.phantom", lambda: datasets.phantom(shape=(0, 4, 4)), ValueError, r"shape"),
    ("datasets.phantom", lambda: datasets.phantom(num_classes=1), ValueError, r"num_classes"),
    (
        "datasets.phantom",
        lambda: datasets.phantom(shape=(5000, 5000, 5000)),
        ValueError,
        r"phantom.*5000.*limit",
    ),
    (
        "datasets.split_records",
        lambda: datasets.split_records([{"a": 1}], validation=1.5),
        ValueError,
        r"validation",
    ),
    (
        "datasets.subjects_from_folder",
        lambda: datasets.subjects_from_folder("/nonexistent_dir", {"t1": "*.nii.gz"}),
        FileNotFoundError,
        r"nonexistent_dir",
    ),
    (
        "datasets.subjects_from_csv",
        lambda: datasets.subjects_from_csv("/nonexistent/s.csv"),
        FileNotFoundError,
        r"s\.csv",
    ),
    (
        "datasets.subjects_from_bids",
        lambda: datasets.subjects_from_bids("/nonexistent_bids"),
        FileNotFoundError,
        r"nonexistent_bids",
    ),
    (
        "datasets.download_ixi",
        lambda: datasets.download_ixi("/tmp/ixi", modalities=("CT",)),
        ValueError,
        r"modalities",
    ),
    (
        "datasets.load_subject",
        lambda: datasets.load_subject({"t1": "/nonexistent/t1.nii.gz"}, {"t1": "intensity"}),
        FileNotFoundError,
        r"t1\.nii\.gz",
    ),
]


def _case_id(case):
    return case[0]


@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_bad_input_raises_naming_the_argument(case):
    _, call, exception, pattern = case
    with pytest.raises(exception, match=pattern):
        call()


def _public(module, names):
    return {
        n
        for n in names
        if (inspect.isclass(getattr(module, n)) or inspect.isfunction(getattr(module, n)))
        and not inspect.ismodule(getattr(module, n))
    }


def test_every_public_entry_point_has_a_bad_input_case():
    covered = {c[0] for c in CASES}
    public = _public(jmed, jmed.__all__) | _public(T, T.__all__)
    missing = sorted(public - covered - set(EXEMPT))
    assert not missing, f"public entry points without a bad-input case (add one or exempt it): {missing}"
    assert not set(EXEMPT) & covered, "exempt names that have a case"
    assert set(EXEMPT) <= public, f"stale exemptions: {sorted(set(EXEMPT) - public)}"


CLI_CASES = [
    (["info", "/nonexistent/x.nii.gz"], r"x\.nii\.gz"),
    (
        ["transform", "/nonexistent/in.nii.gz", "/tmp/out.nii.gz", "NoSuchTransform"],
        r"NoSuchTransform|in\.nii\.gz",
    ),
]


@pytest.mark.parametrize("argv,pattern", CLI_CASES, ids=["info", "transform"])
def test_cli_bad_input_exits_with_a_message(argv, pattern):
    proc = subprocess.run(
        [sys.executable, "-m", "jmed.cli", *argv], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert __import__("re").search(pattern, proc.stderr), proc.stderr[-2000:]


@pytest.mark.parametrize("argv,pattern", CLI_CASES, ids=["info", "transform"])
def test_cli_bad_input_in_process(argv, pattern, capsys):
    import jmed.cli

    assert jmed.cli.main(argv) != 0
    assert __import__("re").search(pattern, capsys.readouterr().err)


def test_cli_unknown_argument_is_a_usage_error(capsys):
    import jmed.cli

    with pytest.raises(SystemExit) as info:
        jmed.cli.main(["info", "--no-such-flag", "x.nii.gz"])
    assert info.value.code == 2
    assert "--no-such-flag" in capsys.readouterr().err


# --- non-finite numbers in transform parameters -------------------------------------------

# the constructor arguments a transform needs before any other can be tried
_REQUIRED = {
    "HistogramStandardization": dict(landmarks=np.linspace(0, 100, 13)),
    "Mask": dict(masking_method="seg"),
    "RandomApply": dict(transform=T.RandomNoise()),
    "RandomLabelsToImage": dict(label_key="seg"),
    "RemoveLabels": dict(labels=[1]),
    "RemoveSmallObjects": dict(min_size=2),
    "Resample": dict(target=1.0),
    "Crop": dict(cropping=1),
    "Pad": dict(padding=1),
    "CropOrPad": dict(target_shape=4),
    "Resize": dict(target_shape=4),
    "EnsureShapeMultiple": dict(target_multiple=2),
    "OneHot": dict(num_classes=3),
    "RemapLabels": dict(mapping={1: 2}),
    "CopyAffine": dict(target="t1"),
    "Lambda": dict(function=abs),
    "Compose": dict(transforms=[T.RandomNoise()]),
    "OneOf": dict(transforms=[T.RandomNoise()]),
    "SomeOf": dict(transforms=[T.RandomNoise()], num_transforms=1),
    "Spatial": dict(transforms=[]),
    "Reorient": dict(orientation="RAS"),
}
# the numeric forms an argument may take, tried in order; the first one accepted is the
# argument's form, and a non-finite number in its first place must then be refused
_FORMS = [0.5, (0.5, 1.0), (0.5, 0.6, 0.7), (1.0, 2.0, 3.0, 4.0, 5.0, 6.0)]


def _numeric_arguments():
    cases = []
    for name in T.__all__:
        cls = getattr(T, name)
        if not (inspect.isclass(cls) and issubclass(cls, T.Transform)):
            continue
        required = _REQUIRED.get(name, {})
        cls(**required)
        for p in inspect.signature(cls).parameters.values():
            # flags (truth values) and names are not numbers
            if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or isinstance(p.default, bool):
                continue
            if p.name in ("include", "exclude", "mask_name"):
                continue
            for form in _FORMS:
                try:
                    cls(**{**required, p.name: form})
                except Exception:
                    continue
                cases.append((name, p.name, form))
                break
    return cases


_NUMERIC_ARGUMENTS = _numeric_arguments()


def test_numeric_arguments_are_found():
    found = {(n, p) for n, p, _ in _NUMERIC_ARGUMENTS}
    assert {("RandomElasticDeformation", "max_displacement"), ("RandomAffine", "degrees")} <= found
    assert len(found) > 40


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize(
    "name,argument,form", _NUMERIC_ARGUMENTS, ids=[f"{n}.{p}" for n, p, _ in _NUMERIC_ARGUMENTS]
)
def test_non_finite_numbers_are_refused_naming_the_argument(name, argument, form, bad):
    value = bad if not isinstance(form, tuple) else (bad, *form[1:])
    with pytest.raises(ValueError, match=rf"{argument}.*(nan|inf)"):
        getattr(T, name)(**{**_REQUIRED.get(name, {}), argument: value})


def test_elastic_nan_displacement_is_refused():
    with pytest.raises(ValueError, match=r"max_displacement.*nan"):
        T.RandomElasticDeformation(max_displacement=float("nan"))
    with pytest.raises(ValueError, match=r"max_displacement.*inf"):
        T.RandomElasticDeformation(max_displacement=(1.0, float("inf"), 1.0))


def test_float_axes_are_refused():
    with pytest.raises(ValueError, match=r"axes"):
        T.RandomFlip(axes=(0.5,))
    with pytest.raises(ValueError, match=r"axes"):
        T.RandomAnisotropy(axes=(float("nan"),))


# --- images of one subject on different grids ---------------------------------------------


def _misaligned(shift=30.0):
    moved = EYE.copy()
    moved[1, 3] = shift
    return jmed.Subject(
        t1=img((8, 8, 8)), seg=jmed.Image(np.zeros((8, 8, 8, 1), np.uint8), moved, kind="label")
    )


@pytest.mark.parametrize(
    "call",
    [
        lambda s: T.RandomAffine(degrees=10)(jax.random.key(0), s),
        lambda s: T.RandomFlip(axes=0, flip_probability=1.0)(jax.random.key(0), s),
        lambda s: T.RandomElasticDeformation(max_displacement=0.5)(jax.random.key(0), s),
        lambda s: jmed.UniformSampler(4)(jax.random.key(0), s, 2),
        lambda s: jmed.LabelSampler(4)(jax.random.key(0), s, 2),
        lambda s: jmed.extract_patches(s, np.zeros((1, 3), int), (4, 4, 4)),
        lambda s: jmed.GridPatchSampler(4)(s),
    ],
    ids=[
        "RandomAffine",
        "RandomFlip",
        "RandomElasticDeformation",
        "UniformSampler",
        "LabelSampler",
        "extract_patches",
        "GridPatchSampler",
    ],
)
def test_images_with_different_affines_are_refused(call):
    with pytest.raises(ValueError, match=r"('t1' and 'seg'|'seg' and 't1').*different affines"):
        call(_misaligned())
    call(_misaligned(shift=1e-5))  # within the tolerance of a float32 header


def test_images_with_different_shapes_are_refused_by_samplers():
    s = jmed.Subject(t1=img((8, 8, 8)), seg=img((8, 8, 6), kind="label"))
    with pytest.raises(ValueError, match=r"t1.*seg|seg.*t1"):
        jmed.UniformSampler(4)(jax.random.key(0), s, 2)


def test_different_affines_are_not_compared_under_jit():
    s = _misaligned()
    out = jax.jit(lambda s: T.RandomFlip(axes=0, flip_probability=1.0)(jax.random.key(0), s))(s)
    np.testing.assert_array_equal(np.asarray(out["seg"].affine)[1, 3], 30.0)


# --- outputs too large to allocate ----------------------------------------------------------


def test_resample_to_a_huge_grid_raises_before_compiling():
    image = jmed.Image(np.zeros((16, 16, 16, 1), np.float32), np.diag([2.0, 2.0, 2.0, 1.0]))
    with pytest.raises(ValueError, match=r"Resample.*\(3200, 3200, 3200\).*limit"):
        T.Resample(0.01)(None, image)


@pytest.mark.parametrize(
    "make",
    [
        lambda: T.Resize(30000),
        lambda: T.CropOrPad(30000),
        lambda: T.Spatial(output_shape=(30000, 30000, 30000)),
    ],
    ids=["Resize", "CropOrPad", "Spatial"],
)
def test_huge_target_shapes_are_refused(make):
    with pytest.raises(ValueError, match=r"30000, 30000, 30000.*limit"):
        make()


@pytest.mark.parametrize(
    "transform,who",
    [
        (lambda: T.Pad(5000), "Pad"),
        (lambda: T.EnsureShapeMultiple(5000), "EnsureShapeMultiple"),
        (lambda: T.Spatial(output_spacing=0.001), "Spatial"),
        (lambda: T.Resize(600), "Resize"),
    ],
    ids=["Pad", "EnsureShapeMultiple", "Spatial-spacing", "Resize-channels"],
)
def test_huge_outputs_are_refused_naming_the_transform(transform, who):
    image = jmed.Image(np.zeros((8, 8, 8, 8), np.float32), EYE)
    with pytest.raises(ValueError, match=rf"{who}.*limit"):
        transform()(None, image)


def test_output_limit_is_configurable(monkeypatch):
    image = jmed.Image(np.zeros((8, 8, 8, 1), np.float32), EYE)
    previous = T.set_max_output_bytes(8 * 8 * 8 * 4)
    try:
        assert T.max_output_bytes() == 2048
        T.Pad(0)(None, image)
        with pytest.raises(ValueError, match=r"Pad: output shape \(10, 10, 10\).*limit"):
            T.Pad(1)(None, image)
    finally:
        T.set_max_output_bytes(previous)
    monkeypatch.setenv("JMED_MAX_OUTPUT_BYTES", "100")
    assert T.max_output_bytes() == 100
    monkeypatch.setenv("JMED_MAX_OUTPUT_BYTES", "lots")
    with pytest.raises(ValueError, match=r"JMED_MAX_OUTPUT_BYTES.*lots"):
        T.max_output_bytes()
    with pytest.raises(ValueError, match=r"max_output_bytes"):
        T.set_max_output_bytes(0)


# --- malformed files at every entry point that reads or writes files -------------------------


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    import gzip

    import nibabel as nib

    folder = tmp_path_factory.mktemp("malformed")
    good = folder / "good.nii.gz"
    nib.save(nib.Nifti1Image(np.arange(512, dtype=np.float32).reshape(8, 8, 8), EYE), good)
    truncated = folder / "truncated.nii.gz"
    truncated.write_bytes(good.read_bytes()[:300])
    header = nib.Nifti1Header()
    header.set_data_shape((30000, 30000, 30000))
    header.set_sform(EYE, code=1)
    header["vox_offset"] = 352
    huge = folder / "huge.nii.gz"
    huge.write_bytes(gzip.compress(header.binaryblock + b"\0" * 36))
    garbage = folder / "garbage.nii"
    garbage.write_bytes(b"not a nifti file at all" * 20)
    landmarks = folder / "landmarks.json"
    landmarks.write_text('{"landmarks": [0.0, 1.')
    csv = folder / "subjects.csv"
    csv.write_text("subject_id,t1\ns1\n")
    (folder / "a_file").write_text("x")
    return {
        "good": good,
        "truncated": truncated,
        "huge": huge,
        "garbage": garbage,
        "landmarks": landmarks,
        "csv": csv,
        "folder": folder,
    }


def _first_volume(loader):
    return next(iter(loader))


FILE_CASES = [
    ("load", lambda f: jmed.load(f["truncated"]), ValueError, r"truncated\.nii\.gz"),
    ("load", lambda f: jmed.load(f["huge"]), ValueError, r"huge\.nii\.gz.*30000"),
    ("load", lambda f: jmed.load(f["garbage"]), ValueError, r"garbage\.nii"),
    ("save", lambda f: jmed.save(img(), f["folder"] / "a_file" / "x.nii.gz"), NotADirectoryError, r"a_file"),
    (
        "SubjectsSource",
        lambda f: jmed.SubjectsSource([{"t1": f["truncated"]}])[0],
        RuntimeError,
        r"truncated\.nii\.gz",
    ),
    (
        "VolumeLoader",
        lambda f: _first_volume(jmed.VolumeLoader([{"t1": f["huge"]}], batch_size=1)),
        RuntimeError,
        r"huge\.nii\.gz",
    ),
    (
        "Queue",
        lambda f: _first_volume(jmed.Queue([{"t1": f["garbage"]}], jmed.UniformSampler(4), 1, 1)),
        RuntimeError,
        r"garbage\.nii",
    ),
    ("Resample", lambda f: T.Resample(str(f["garbage"]))(None, subj()), ValueError, r"garbage\.nii"),
    (
        "HistogramStandardization",
        lambda f: T.HistogramStandardization(str(f["landmarks"])),
        ValueError,
        r"landmarks\.json",
    ),
    ("load_landmarks", lambda f: T.load_landmarks(f["landmarks"]), ValueError, r"landmarks\.json"),
    ("train_histogram", lambda f: T.train_histogram([f["truncated"]]), ValueError, r"truncated\.nii\.gz"),
    (
        "sliding_window_inference",
        lambda f: jmed.sliding_window_inference(lambda x: x, jmed.load(f["huge"], lazy=True), 4),
        ValueError,
        r"huge\.nii\.gz",
    ),
    (
        "datasets.load_subject",
        lambda f: datasets.load_subject({"t1": f["garbage"]}, {"t1": "intensity"}),
        ValueError,
        r"garbage\.nii",
    ),
    (
        "datasets.subjects_from_csv",
        lambda f: datasets.subjects_from_csv(f["csv"]),
        ValueError,
        r"subjects\.csv",
    ),
    # samplers and transforms take subjects: their "malformed input" is a subject whose
    # images do not share a grid (a label map stored shifted or flipped)
    (
        "UniformSampler",
        lambda f: jmed.UniformSampler(4)(jax.random.key(0), _misaligned(), 1),
        ValueError,
        r"different affines",
    ),
    (
        "RandomAffine",
        lambda f: T.RandomAffine()(jax.random.key(0), _misaligned()),
        ValueError,
        r"different affines",
    ),
]


@pytest.mark.parametrize("case", FILE_CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(FILE_CASES)])
def test_malformed_file_raises_naming_it(case, files):
    _, call, exception, pattern = case
    with pytest.raises(exception, match=pattern):
        call(files)


CLI_FILE_CASES = {
    "info": lambda f: ["info", f["garbage"]],
    "info-stats": lambda f: ["info", f["truncated"], "--stats"],
    "transform": lambda f: ["transform", f["huge"], f["folder"] / "o.nii.gz", "RandomNoise"],
    "plot": lambda f: ["plot", f["truncated"], "-o", f["folder"] / "o.png"],
    "landmarks": lambda f: ["landmarks", f["truncated"], "-o", f["folder"] / "lm.npy"],
    "cache": lambda f: ["cache", f["garbage"], "--cache-dir", f["folder"] / "cache"],
    "convert": lambda f: ["convert", f["garbage"], f["folder"] / "o.nii.zarr"],
}
CLI_PARAMETER_CASES = {
    "info": (["info"], None),
    "transform": (["transform", "IN", "OUT", "RandomNoise", "--kwargs", "std=-1"], r"std"),
    "transform-seed": (["transform", "IN", "OUT", "RandomNoise", "--seed", str(2**70)], r"--seed"),
    "plot": (["plot", "IN", "-o", "/nonexistent_folder/x.png"], r"nonexistent_folder"),
    "landmarks": (["landmarks", "IN", "-o", "lm.txt"], r"lm\.txt|\.npy"),
    "cache": (["cache", "IN"], None),
    "convert": (["convert", "IN", "out.nii.zarr", "--chunks", "0"], r"chunks"),
}


@pytest.mark.parametrize("command", list(CLI_FILE_CASES))
def test_cli_malformed_file_is_one_line(command, files, capsys):
    import re

    import jmed.cli

    argv = [str(a) for a in CLI_FILE_CASES[command](files)]
    assert jmed.cli.main(argv) == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("jmed ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert re.search(r"garbage\.nii|truncated\.nii\.gz|huge\.nii\.gz", lines[0]), err


@pytest.mark.parametrize("command", list(CLI_PARAMETER_CASES))
def test_cli_bad_parameter(command, files, capsys, monkeypatch):
    import re

    import jmed.cli

    monkeypatch.chdir(files["folder"])
    argv, pattern = CLI_PARAMETER_CASES[command]
    argv = [
        str(files["good"]) if a == "IN" else str(files["folder"] / "out.nii.gz") if a == "OUT" else a
        for a in argv
    ]
    if pattern is None:  # a missing required argument: a usage error
        with pytest.raises(SystemExit) as info:
            jmed.cli.main(argv)
        assert info.value.code == 2
        return
    assert jmed.cli.main(argv) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and re.search(pattern, err), err


def test_every_cli_subcommand_has_file_and_parameter_cases():
    import jmed.cli

    commands = set(jmed.cli.build_parser()._subparsers._group_actions[0].choices)
    assert commands <= {c.split("-")[0] for c in CLI_FILE_CASES}
    assert commands <= {c.split("-")[0] for c in CLI_PARAMETER_CASES}
