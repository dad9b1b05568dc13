"""Whole augmentation pipelines: the TorchIO paper's, per subject, and nnU-Net's, per batch.

TorchIO paper pipeline (``jmed.transforms.torchio_paper_augmentation``): RescaleIntensity,
RandomMotion, HistogramStandardization, RandomBiasField, ZNormalization, RandomNoise,
ToCanonical, Resample (1 mm), CropOrPad (160, 192, 160), RandomFlip, RandomAffine,
RandomElasticDeformation, TorchIO defaults, on a T1 + label map. jmed runs it the way the
library is meant to be used: the steps whose output shape depends on header values
(ToCanonical, Resample, CropOrPad) run eagerly first, where values are concrete (loader
side), then the random steps run as one jitted program (they commute with the geometry
steps up to the voxel grid; the per-subject time includes both parts). TorchIO runs the
same transforms in the paper's order. Target for jmed: <= 350 ms per subject on 2 cores.

nnU-Net preset (``jmed.transforms.nnunet_augmentation``): ``jit(vmap(preset))`` over a
batch of patches (4 x 128^3, t1 + label map; ``--quick``: 2 x 96^3). jmed only.

Usage: ``PYTHONPATH=. python benchmarks/bench_pipeline.py [--quick] [--data DIR] [--runs N]``
"""

from __future__ import annotations

import argparse
import warnings

import jax
import numpy as np

import jmed
from jmed.transforms import Compose, nnunet_augmentation, torchio_paper_augmentation

GEOMETRY = ("ToCanonical", "Resample", "CropOrPad")


def paper_pipeline_jmed(volume, target):
    """``fn(i)``: one subject through the paper pipeline (geometry eager, the rest jitted)."""
    pipeline = torchio_paper_augmentation(landmarks=volume.landmarks(), spacing=1.0, target_shape=target)
    geometry = Compose([t for t in pipeline.transforms if type(t).__name__ in GEOMETRY])
    random_part = Compose([t for t in pipeline.transforms if type(t).__name__ not in GEOMETRY])
    augment = jax.jit(lambda key, subject: random_part(key, subject).without_history())
    subject = volume.subject()

    def run(i):
        shaped = geometry(None, subject).without_history()
        return augment(jax.random.key(i), shaped)

    return run


def paper_pipeline_torchio(volume, target):
    try:
        import torchio as tio
    except ImportError:
        return None
    transform = tio.Compose(
        [
            tio.RescaleIntensity(),
            tio.RandomMotion(),
            tio.HistogramStandardization({"t1": volume.torchio_landmarks()}),
            tio.RandomBiasField(),
            tio.ZNormalization(),
            tio.RandomNoise(),
            tio.ToCanonical(),
            tio.Resample(1.0),
            tio.CropOrPad(target),
            tio.RandomFlip(axes=(0,)),
            tio.RandomAffine(),
            tio.RandomElasticDeformation(),
        ]
    )
    subject = volume.torchio_subject()
    return lambda i: transform(subject)


def nnunet_batch_jmed(volume, batch, patch):
    """``fn(i)``: ``jit(vmap(nnunet_augmentation()))`` on ``batch`` centre patches."""
    subject = volume.subject(device=False)
    start = [(n - p) // 2 for n, p in zip(volume.shape, patch)]
    region = tuple(slice(s, s + p) for s, p in zip(start, patch))
    affine = jmed.affine.translate_voxels(volume.affine, start)
    patches = jmed.Subject(
        t1=jmed.ScalarImage(np.asarray(subject["t1"].data)[region + (0,)], affine),
        seg=jmed.LabelMap(np.asarray(subject["seg"].data)[region + (0,)], affine),
    )
    stacked = jax.device_put(jmed.stack([patches] * batch))
    preset = nnunet_augmentation()
    fn = jax.jit(jax.vmap(lambda key, s: preset(key, s).without_history()))
    return lambda i: fn(jax.random.split(jax.random.key(i), batch), stacked)


def cases(quick: bool, volume) -> list:
    from benchmarks.common import Case

    target = volume.scaled((160, 192, 160))

    def paper():
        return {
            "jmed": paper_pipeline_jmed(volume, target),
            "torchio": paper_pipeline_torchio(volume, target),
        }

    batch, size = (2, 96) if quick else (4, 128)
    patch = volume.scaled(size)
    name = f"nnU-Net preset, vmap {batch} x {'x'.join(map(str, patch))}"
    return [
        Case(
            "pipeline",
            "TorchIO paper pipeline (12 transforms)",
            build=paper,
            unit="subject (t1+seg)",
            note="jmed: geometry eager + random part jitted; target <= 350 ms on 2 cores; no MONAI equivalent",
        ),
        Case(
            "pipeline",
            name,
            build=lambda: {"jmed": nnunet_batch_jmed(volume, batch, patch)},
            unit=f"batch of {batch}",
            note="jmed only" + ("; smaller than the full run (4 x 128^3)" if quick else ""),
        ),
    ]


def main(argv: list[str] | None = None) -> None:
    from benchmarks.common import default_data_dir, load_volume, print_rows, run_case, set_torch_threads

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=None)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    threads = set_torch_threads()
    volume = load_volume(args.data or default_data_dir())
    print(
        f"volume: {volume.source}, {volume.shape}; jax on {jax.devices()[0].platform}; torch threads {threads}"
    )
    budget = 3.0 if args.quick else None
    rows = [(case, run_case(case, args.runs, args.quick, budget)) for case in cases(args.quick, volume)]
    print_rows("pipelines (ms per unit)", rows)


if __name__ == "__main__":
    main()
