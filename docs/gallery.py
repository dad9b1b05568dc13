"""Regenerate the before/after pictures of the transforms gallery (docs/gallery/*.png).

Run from the repository root::

    PYTHONPATH=$PWD python docs/gallery.py

Every picture is a deterministic function of the phantom seed and the transform key, so
rerunning the script reproduces the committed files (up to matplotlib version changes).
``GALLERY`` lists the pictures; ``docs/gallery.md`` shows them and ``tests/test_docs.py``
checks that each picture the page references exists.
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import jax
import numpy as np

import jmed
import jmed.transforms as T
from jmed.plot import plot_transform

OUTPUT = Path(__file__).resolve().parent / "gallery"
DPI = 60
COLOURS = 64
VIEWS = ("axial",)
#: pictures shown in another view (the small components sit off the central axial slice)
OTHER_VIEWS = {"KeepLargestComponent": ("coronal",), "RemoveSmallObjects": ("coronal",)}
PHANTOM_SEED = 0
TRANSFORM_SEED = 1
#: pictures that overlay the label map (the others show the intensity image alone)
LABEL_PICTURES = {
    "CropForeground",
    "RemapLabels",
    "RemoveLabels",
    "KeepLargestComponent",
    "RemoveSmallObjects",
    "RandomFlip",
    "RandomAffine",
    "RandomElasticDeformation",
}


def _landmarks() -> np.ndarray:
    """Histogram landmarks trained on a few phantoms (deterministic)."""
    images = [np.asarray(jmed.datasets.phantom(seed, shape=(32, 32, 32))["t1"].data) for seed in range(3)]
    return T.train_histogram(images)


#: file stem -> (transform, number of random draws shown)
def gallery() -> dict[str, tuple[T.Transform, int]]:
    return {
        # preprocessing (deterministic)
        "ToCanonical": (T.ToCanonical(), 1),
        "Reorient": (T.Reorient("LPS"), 1),
        "Resample": (T.Resample(3.0), 1),
        "Resize": (T.Resize((32, 32, 32)), 1),
        "Crop": (T.Crop((8, 8, 4)), 1),
        "Pad": (T.Pad((8, 8, 8)), 1),
        "CropOrPad": (T.CropOrPad((48, 72, 48)), 1),
        "CropForeground": (T.CropForeground(mask_name="seg", margin=2), 1),
        "EnsureShapeMultiple": (T.EnsureShapeMultiple(40), 1),
        # normalization (deterministic)
        "RescaleIntensity": (T.RescaleIntensity(out_min_max=(0, 1), percentiles=(0.5, 99.5)), 1),
        "ZNormalization": (T.ZNormalization(masking_method="seg"), 1),
        "Clamp": (T.Clamp(out_min=0.2, out_max=0.6), 1),
        "Mask": (T.Mask("seg"), 1),
        "HistogramStandardization": (T.HistogramStandardization(_landmarks()), 1),
        # labels (deterministic)
        "RemapLabels": (T.RemapLabels({1: 2, 2: 1}), 1),
        "RemoveLabels": (T.RemoveLabels(3), 1),
        "KeepLargestComponent": (T.KeepLargestComponent(labels=[3]), 1),
        "RemoveSmallObjects": (T.RemoveSmallObjects(300, labels=[3]), 1),
        # spatial augmentation
        "RandomFlip": (T.RandomFlip(axes=0, flip_probability=1.0), 1),
        "RandomRot90": (T.RandomRot90(axes=(0, 1)), 1),
        "RandomAffine": (T.RandomAffine(scales=0.15, degrees=20, translation=5), 1),
        "RandomElasticDeformation": (T.RandomElasticDeformation(max_displacement=6), 1),
        "RandomAnisotropy": (T.RandomAnisotropy(downsampling=(3, 5)), 1),
        # intensity augmentation
        "RandomNoise": (T.RandomNoise(std=(0.05, 0.15)), 1),
        "RandomBlur": (T.RandomBlur(std=(1, 2.5)), 1),
        "RandomGamma": (T.RandomGamma(log_gamma=(-0.5, 0.5)), 1),
        "RandomBrightness": (T.RandomBrightness(multiplier=(0.6, 1.4)), 1),
        "RandomContrast": (T.RandomContrast(contrast=(0.5, 1.5)), 1),
        "RandomBiasField": (T.RandomBiasField(coefficients=0.8), 1),
        "RandomSwap": (T.RandomSwap(patch_size=8, num_iterations=40), 1),
        "RandomCoarseDropout": (T.RandomCoarseDropout(num_holes=4, hole_size=12), 1),
        "RandomLabelsToImage": (T.RandomLabelsToImage("seg", num_labels=4, image_key="t1"), 1),
        # MRI artefacts
        "RandomMotion": (T.RandomMotion(degrees=10, translation=10), 1),
        "RandomGhosting": (T.RandomGhosting(num_ghosts=(4, 8), intensity=(0.6, 1.0)), 1),
        "RandomSpike": (T.RandomSpike(num_spikes=2, intensity=(0.5, 1.0)), 1),
    }


def _save_small(fig, path: Path) -> None:
    """Save as a palette PNG (a few KB per picture; the docs stay light)."""
    from PIL import Image as PILImage

    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=DPI, format="png")
    buffer.seek(0)
    picture = PILImage.open(buffer).convert("RGB").quantize(colors=COLOURS)
    picture.save(path, optimize=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="only these pictures (default: all)")
    args = parser.parse_args(argv)
    OUTPUT.mkdir(exist_ok=True)
    subject = jmed.datasets.phantom(PHANTOM_SEED, shape=(64, 64, 48), spacing=(1.0, 1.0, 1.5), noise=0.02)
    items = gallery()
    unknown = set(args.names) - set(items)
    if unknown:
        parser.error(f"unknown pictures {sorted(unknown)}; choose from {sorted(items)}")
    for name, (transform, num_samples) in items.items():
        if args.names and name not in args.names:
            continue
        key = jax.random.key(TRANSFORM_SEED) if transform.is_random else None
        views = OTHER_VIEWS.get(name, VIEWS)
        fig = plot_transform(
            key,
            transform,
            subject,
            num_samples=num_samples,
            views=views,
            overlay=None if name in LABEL_PICTURES else False,
            figsize=(2.0 * len(views), 2.0 * (1 + num_samples)),
            title=name,
        )
        path = OUTPUT / f"{name}.png"
        _save_small(fig, path)
        print(f"{path.relative_to(OUTPUT.parent)}: {path.stat().st_size // 1024} KB")


if __name__ == "__main__":
    main()
