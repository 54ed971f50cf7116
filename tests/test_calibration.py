"""The verdict can come out "no": worlds where images carry nothing get no "the content helps",
and a world where the cover's content matters gets it (benchmarks/calibration.py measures how
often, over many worlds)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _calibration():
    spec = importlib.util.spec_from_file_location("calibration", ROOT / "benchmarks" / "calibration.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_null_worlds_get_no_content_verdict_and_a_planted_one_does(tmp_path, prefect_harness):
    # LightGBM with one training seed (its seed draws the impressions each tree sees). NRMS's
    # seeds move the tiny world's dev AUC by several hundredths: its verdicts need several
    # seeds (compare --seeds), which benchmarks/calibration.py runs and a test cannot afford.
    # jobs=1: the runs one at a time in this process (the suite's other worker has the other core).
    calibration = _calibration()
    for seed in (1, 2):
        result = calibration.calibrate("null", seed, "tiny", tmp_path, rankers=("lightgbm",), extractors="tiny",
                                       n_boot=300, jobs=1)
        for ranker, answers in result["answers"].items():
            assert answers["content"] != "yes", (seed, ranker, answers)
            assert answers["presence"] != "yes", (seed, ranker, answers)
    # The default world, where a cover's content matters through each user's taste: at the small
    # scale (the tiny world's 300 dev impressions cannot resolve a gain of about 0.01 AUC). This
    # world (seed 0) gets the verdict with the random tiny encoders used here; with the default
    # pre-trained ones and 3 seeds LightGBM gets it on one default world of five and on no
    # presence-only world (benchmarks/RESULTS.md, calibration): this test shows the verdict can
    # come out "yes", not that it is reliable.
    result = calibration.calibrate("content", 0, "small", tmp_path, rankers=("lightgbm",), extractors="tiny",
                                   n_boot=300, jobs=1)
    assert result["answers"]["lightgbm"]["content"] == "yes", result


def test_content_signal_removes_a_groups_part_of_the_image_vectors_and_nothing_else():
    spec = importlib.util.spec_from_file_location("content_signal", ROOT / "benchmarks" / "content_signal.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    import numpy as np

    from rankers.data import NewsFeatures

    rng = np.random.default_rng(0)
    group = rng.integers(0, 3, 60)
    keep = rng.random(60) < 0.5  # the news with a cover
    vectors = rng.standard_normal((60, 4)).astype(np.float32) + 5.0 * group[:, None]  # the group shows
    features = NewsFeatures("v", "image", vectors, keep.copy())
    out = module.without_means(features, group, keep, "v-g").vectors
    means = np.stack([out[keep & (group == g)].mean(axis=0) for g in range(3)])
    assert np.allclose(means, means[0], atol=1e-4)  # no group can be told apart by its mean any more
    assert np.allclose(out[~keep], vectors[~keep])  # news without a cover untouched
    within = out[keep & (group == 1)] - out[keep & (group == 1)].mean(axis=0)
    assert np.allclose(within, vectors[keep & (group == 1)] - vectors[keep & (group == 1)].mean(axis=0), atol=1e-4)
    onehot = module.style_onehot(group, keep).vectors
    assert (onehot.sum(axis=1) == 1).all() and (onehot[~keep, 3] == 1).all() and (onehot[keep, group[keep]] == 1).all()
