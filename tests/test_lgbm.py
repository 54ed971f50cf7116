"""The LightGBM ranker on the tiny synthetic world with real tiny BERT and ViT features."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest

from extractors.registry import create
from extractors.run import extract_catalogue
from rankers.data import carve_validation, load_features, load_impressions
from rankers.lgbm import (
    IMPORTANCE_FILE, LGBMConfig, LightGBMRanker, feature_matrix, feature_names, resolve_cover, subsample_negatives,
)
from rankers.metrics import evaluate
from storage.catalogue import load_catalogue
from storage.errors import PipelineError
from storage.synthetic import generate_world

# Dev AUC the tiny world's LightGBM must beat. Measured 0.59-0.61 for the sources used
# here, while shuffled training labels give about 0.5 (the tiny world has 300 dev
# impressions: a chance ranker's AUC spreads about +-0.02).
AUC_FLOOR = 0.56
FAST = dict(n_estimators=120, patience=10)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("lgbm")
    world = root / "world"
    generate_world(world, scale="tiny", seed=0)
    catalogue = load_catalogue(world)
    paths = {}
    for role, spec in (("text", "bert"), ("image", "vit")):
        options = {"titles": [str(t) for t in catalogue.title], "workdir": root / "w"} if spec == "bert" else {}
        paths[role] = extract_catalogue(create(spec, **options), catalogue, root / "features", progress=False).path
    features = {role: load_features(path, catalogue) for role, path in paths.items()}
    train, valid = carve_validation(load_impressions(world, "train", catalogue))
    dev = load_impressions(world, "dev", catalogue)
    return {"features": features, "train": train, "valid": valid, "dev": dev}


@pytest.fixture(scope="module")
def fitted(tiny):
    ranker = LightGBMRanker(fusion="hadamard", **FAST)
    report = ranker.fit(tiny["train"], tiny["valid"], tiny["features"])
    return ranker, report


def dev_auc(ranker: LightGBMRanker, dev) -> float:
    return evaluate(dev.cand_offsets, dev.labels, ranker.score(dev))["auc"]


def test_feature_names_and_matrix_shape(tiny):
    config = LGBMConfig(sources=("text", "image"), fuse="hadamard")
    dev, features = tiny["dev"], tiny["features"]
    x = feature_matrix(dev, features, config, resolve_cover(features))
    names = feature_names(config, {"text": 64, "image": 64})
    assert x.shape == (len(dev.cand_items), 2 * (64 + 2) + 2 + 3) == (len(dev.cand_items), len(names))
    assert x.dtype == np.float32 and np.isfinite(x).all()
    assert names[:2] == ["text_h0", "text_h1"] and names[64:66] == ["text_dot", "text_cos"]
    assert names[66] == "image_h0" and names[-5:] == ["fused_dot", "fused_cos", "hist_len", "has_cover", "n_candidates"]
    blip = LGBMConfig(sources=("blip",))
    assert feature_names(blip, {"blip": 3}, cover=False) == ["blip_h0", "blip_h1", "blip_h2", "blip_dot",
                                                             "blip_cos", "hist_len", "n_candidates"]


def _plain_rows(imps, features, config: LGBMConfig, has_cover, rows) -> list[list[float]]:
    """The features of a few rows, one row at a time, as the module docstring defines them."""
    def pooled(role: str, n: int) -> np.ndarray:
        f = features[role]
        keep = [f.tokens[n, j].astype(np.float64) for j in range(f.tokens.shape[1]) if f.mask[n, j]]
        return np.mean(keep, axis=0) if keep else np.zeros(f.dim)

    n_news = len(features["text"].present)
    vec = {r: np.array([pooled(r, n) for n in range(n_news)]) for r in config.sources}
    present = {r: features[r].present for r in config.sources}
    vec = {r: v - v[present[r]].mean(axis=0) for r, v in vec.items()}
    if config.fused:
        vec["fused"] = vec["text"] * vec["image"]
        present["fused"] = present["text"] & present["image"]

    def dot_cos(u: np.ndarray, c: np.ndarray) -> tuple[float, float]:
        d = float(u @ c)
        nu, nc = math.sqrt(float(u @ u)), math.sqrt(float(c @ c))
        return d, (d / (nu * nc) if nu * nc > 0 else 0.0)

    out = []
    for row in rows:
        i = int(np.searchsorted(imps.cand_offsets, row, side="right") - 1)
        history = list(imps.hist_items[imps.hist_offsets[i]:imps.hist_offsets[i + 1]])[-config.history:]
        cand = int(imps.cand_items[row])
        feats: list[float] = []
        for name in [*config.sources, *(["fused"] if config.fused else [])]:
            used = [vec[name][h] for h in history if present[name][h]]
            u = np.mean(used, axis=0) if used else np.zeros(vec[name].shape[1])
            if name != "fused":
                feats += list(u * vec[name][cand])
            feats += list(dot_cos(u, vec[name][cand]))
        feats += [len(imps.hist_items[imps.hist_offsets[i]:imps.hist_offsets[i + 1]]), float(has_cover[cand]),
                  int(imps.cand_offsets[i + 1] - imps.cand_offsets[i])]
        out.append(feats)
    return out


def test_vectorised_features_equal_plain_per_row(tiny):
    dev, features = tiny["dev"], tiny["features"]
    config = LGBMConfig(sources=("text", "image"), fuse="hadamard", history=5)
    cover = resolve_cover(features)
    lengths = dev.history_lengths
    # Rows of an impression with no history, one with fewer clicks than H, one with more.
    picks = [int(np.flatnonzero(lengths == 0)[0]), int(np.flatnonzero((lengths > 0) & (lengths < 5))[0]),
             int(np.flatnonzero(lengths > 5)[0])]
    rows = np.array(sorted({int(dev.cand_offsets[i]) + k for i in picks for k in (0, 1)} | {len(dev.cand_items) - 1}))
    x = feature_matrix(dev, features, config, cover, rows)
    expected = np.array(_plain_rows(dev, features, config, cover, rows))
    assert x.shape == expected.shape
    np.testing.assert_allclose(x, expected, rtol=2e-4, atol=2e-5)
    # A subset of rows gives the same values as the full matrix at those rows.
    np.testing.assert_array_equal(feature_matrix(dev, features, config, cover)[rows], x)


def test_subsample_negatives_keeps_clicks_and_a_seeded_fraction():
    offsets = np.array([0, 10, 12, 12, 30])
    labels = np.zeros(30, dtype=np.int8)
    labels[[0, 5, 10, 11, 12]] = 1  # impression 1: clicks only
    keep = subsample_negatives(offsets, labels, 0.25, seed=3)
    assert keep[labels == 1].all()
    kept_neg = np.add.reduceat((keep & (labels == 0)).astype(int), offsets[:-1])
    assert kept_neg.tolist() == [2, 0, 0, 5]  # ceil(0.25 * [8, 0, -, 17])
    assert np.array_equal(keep, subsample_negatives(offsets, labels, 0.25, seed=3))
    assert not np.array_equal(keep, subsample_negatives(offsets, labels, 0.25, seed=4))
    assert subsample_negatives(offsets, labels, 1.0, seed=3).all()


def test_fit_beats_chance_with_early_stopping(tiny, fitted):
    ranker, report = fitted
    auc = dev_auc(ranker, tiny["dev"])
    assert auc > AUC_FLOOR, auc
    info = ranker.fit_info
    # Early stopping watched valid: it stopped before n_estimators and kept the best tree count.
    assert info["early_stopped"] and report.best_epoch < report.epochs < FAST["n_estimators"]
    assert ranker.best_iteration == report.best_epoch == info["best_iteration"]
    assert len(report.history) == report.epochs and "valid_ndcg@10" in report.history[0]
    assert 0.0 < report.valid_metrics["auc"] <= 1.0
    assert info["train_impressions_used"] + info["train_dropped_no_click"] + info["train_dropped_no_nonclick"] \
        == info["train_impressions"] == len(tiny["train"])


def test_shuffled_labels_fall_to_chance(tiny):
    train = tiny["train"]
    shuffled = replace(train, labels=np.random.default_rng(0).permutation(train.labels))
    ranker = LightGBMRanker(fusion="hadamard", **FAST)
    ranker.fit(shuffled, tiny["valid"], tiny["features"])
    assert dev_auc(ranker, tiny["dev"]) < AUC_FLOOR


def test_save_load_round_trip_and_importance(tiny, fitted, tmp_path):
    ranker, _ = fitted
    files = ranker.save(tmp_path / "model")
    assert {f.name for f in files} == {"model.txt", "config.json", "centres.npz", IMPORTANCE_FILE}
    assert (tmp_path / "model" / "model.txt").read_text().startswith("tree")
    importance = json.loads((tmp_path / "model" / IMPORTANCE_FILE).read_text())
    assert importance["type"] == "gain"
    gains = importance["importance"]
    assert list(gains) != ranker.feature_names and sorted(gains) == sorted(ranker.feature_names)
    assert list(gains.values()) == sorted(gains.values(), reverse=True) and max(gains.values()) > 0
    loaded = LightGBMRanker.load(tmp_path / "model", tiny["features"])
    assert loaded.name == ranker.name == "lightgbm-hadamard"
    np.testing.assert_array_equal(loaded.score(tiny["dev"]), ranker.score(tiny["dev"]))
    with pytest.raises(PipelineError, match="set_features"):
        LightGBMRanker.load(tmp_path / "model").score(tiny["dev"])


def test_impressions_without_click_or_nonclick_are_dropped(tiny):
    train = tiny["train"]
    labels = train.labels.copy()
    off = train.cand_offsets
    labels[off[0]:off[1]] = 0  # impression 0: no click
    labels[off[1]:off[2]] = 1  # impression 1: no non-click
    clicks = np.add.reduceat(labels.astype(int), off[:-1])
    ranker = LightGBMRanker(fusion="text", n_estimators=3, neg_fraction=0.5)
    ranker.fit(replace(train, labels=labels), tiny["valid"], tiny["features"])
    info = ranker.fit_info
    assert info["train_dropped_no_click"] == int((clicks == 0).sum()) >= 1
    assert info["train_dropped_no_nonclick"] == int((clicks == train.candidate_counts).sum()) >= 1
    assert info["train_negatives_dropped"] > 0


def test_configuration_errors(tiny):
    features = tiny["features"]
    with pytest.raises(PipelineError, match="known"):
        LightGBMRanker(depth=3)
    with pytest.raises(PipelineError, match="known"):
        LightGBMRanker(fusion="gated")
    with pytest.raises(ValueError, match="roles"):
        LGBMConfig(sources=("audio",))
    assert LGBMConfig(sources="text+image").sources == ("text", "image")
    ranker = LightGBMRanker(fusion="blip")
    with pytest.raises(PipelineError, match="blip"):
        ranker.fit(tiny["train"], tiny["valid"], features)
    with pytest.raises(PipelineError, match="has_cover"):
        LightGBMRanker(fusion="text", cover_feature=True).set_features({"text": features["text"]})
    with pytest.raises(PipelineError, match="tokens"):
        LightGBMRanker(fusion="text", pooling="mean").set_features(
            {"text": replace(features["text"], tokens=None, mask=None)}, has_cover=features["image"].present)


def test_cover_column_follows_what_the_features_tell(tiny, tmp_path):
    features = tiny["features"]
    text_only = LightGBMRanker(fusion="text", n_estimators=5)
    text_only.set_features({"text": features["text"]})  # no cover flags known: no column
    assert "has_cover" not in text_only.feature_names
    text_only.set_features(features)  # the image store's present flags are the covers
    assert "has_cover" in text_only.feature_names
    explicit = ~features["image"].present
    flagged = LightGBMRanker(fusion="text", has_cover=explicit)
    flagged.set_features({"text": features["text"]})
    np.testing.assert_array_equal(flagged.features_of(tiny["dev"])[:, -2], explicit[tiny["dev"].cand_items])
    blind = LightGBMRanker(fusion="text", cover_feature=False)
    blind.set_features(features)
    assert "has_cover" not in blind.feature_names
    # A model trained with the column refuses stores that cannot give it.
    text_only.fit(tiny["train"], tiny["valid"], features)
    text_only.save(tmp_path / "m")
    with pytest.raises(PipelineError, match="trained with the has_cover"):
        LightGBMRanker.load(tmp_path / "m", {"text": features["text"]})
    loaded = LightGBMRanker.load(tmp_path / "m", {"text": features["text"]}, has_cover=features["image"].present)
    np.testing.assert_array_equal(loaded.score(tiny["dev"]), text_only.score(tiny["dev"]))
