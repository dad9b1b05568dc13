import jax
import numpy as np
import pytest
from conftest import make_phantom

import jmed
from jmed.transforms import (
    RandomApply,
    RandomBlur,
    RandomBrightness,
    RandomContrast,
    RandomGamma,
    RandomNoise,
)
from jmed.transforms.presets import (
    nnunet_augmentation,
    nnunet_intensity_augmentation,
    torchio_paper_augmentation,
)


def _require(*names):
    missing = [n for n in names if not hasattr(jmed.transforms, n)]
    if missing:
        pytest.skip(f"needs jmed.transforms.{', '.join(missing)}")


def test_nnunet_intensity_steps_and_probabilities():
    pipeline = nnunet_intensity_augmentation()
    assert all(isinstance(t, RandomApply) for t in pipeline)
    kinds = [type(t.transform) for t in pipeline]
    assert kinds == [RandomNoise, RandomBlur, RandomBrightness, RandomContrast, RandomGamma, RandomGamma]
    assert [t.p for t in pipeline] == [0.1, 0.2, 0.15, 0.15, 0.1, 0.3]
    assert pipeline[4].transform.invert and not pipeline[5].transform.invert
    assert pipeline[4].transform.gamma == (0.7, 1.5) and pipeline[5].transform.retain_stats


def test_nnunet_intensity_runs_eager_jit_vmap(run, key):
    subject = make_phantom((10, 9, 8))
    out = run(nnunet_intensity_augmentation(), key, subject, atol=1e-4)
    np.testing.assert_array_equal(out["seg"].data, subject["seg"].data)
    assert np.all(np.isfinite(out["t1"].data))


def test_nnunet_full_pipeline(key):
    _require("RandomAffine", "RandomAnisotropy", "RandomFlip")
    pipeline = nnunet_augmentation()
    subject = make_phantom((16, 14, 12))
    out = pipeline(key, subject)
    assert out["t1"].shape == subject["t1"].shape
    assert len(pipeline) == 10
    jitted = jax.jit(pipeline)(key, subject)
    np.testing.assert_allclose(jitted["t1"].data, out["t1"].data, atol=1e-3)
    np.testing.assert_array_equal(jitted["seg"].data, out["seg"].data)


def test_torchio_paper_pipeline(key):
    _require(
        "RescaleIntensity",
        "ZNormalization",
        "ToCanonical",
        "RandomFlip",
        "RandomAffine",
        "RandomElasticDeformation",
    )
    pipeline = torchio_paper_augmentation()
    out = pipeline(key, make_phantom((16, 14, 12)))
    assert np.all(np.isfinite(out["t1"].data))
