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
    "ToCanonical": "only include/exclude",
    "SequentialLabels": "max_label checked like every other positive int",
    "SpatialMapping": "a NamedTuple of arrays built by the library",
    "OutputGrid": "a NamedTuple built by the library",
    "WindowParams": "parameters built by the window transforms",
    "nnunet_intensity_augmentation": "takes no arguments",
}

CASES = [
    # --- data model -----------------------------------------------------------------------
    ("Image", lambda: jmed.Image(np.zeros((2, 2)), EYE), ValueError, r"data"),
    ("Image", lambda: jmed.Image(np.zeros((2, 2, 2, 1)), np.eye(3)), ValueError, r"affine"),
    ("Image", lambda: jmed.Image(np.zeros((2, 2, 2, 1)), EYE, kind="mask"), ValueError, r"kind"),
    ("ScalarImage", lambda: jmed.ScalarImage(np.zeros((2, 2))), ValueError, r"data"),
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
