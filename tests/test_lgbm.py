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
import rankers.lgbm as lgbm_module
from rankers.lgbm import (
    IMPORTANCE_FILE, FeatureBuilder, FeatureRows, LGBMConfig, LightGBMRanker, cap_rows, feature_matrix, feature_names,
    impression_chunks, resolve_cover, subsample_negatives,
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


def test_the_seed_draws_the_bagged_impressions_and_without_bagging_changes_nothing(tiny, fitted):
    def scores(**options):
        ranker = LightGBMRanker(fusion="hadamard", **FAST, **options)
        ranker.fit(tiny["train"], tiny["valid"], tiny["features"])
        return ranker.score(tiny["dev"])

    ranker, _ = fitted  # seed 0 with the default bagging
    assert ranker.config.booster_params()["bagging_by_query"] is True
    same = scores(seed=0)
    assert np.array_equal(same, ranker.score(tiny["dev"]))  # a seed is repeatable
    assert not np.array_equal(scores(seed=1), same)  # another seed, other impressions per tree: another model
    assert np.array_equal(scores(seed=0, bagging_fraction=1.0), scores(seed=1, bagging_fraction=1.0))
    with pytest.raises(ValueError, match="bagging_fraction"):
        LightGBMRanker(fusion="hadamard", bagging_fraction=0.0)


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


# ------------------------------------------------------------------------------------------
# Rows, chunks and threads


def _offsets_and_labels(seed: int = 0, m: int = 200):
    rng = np.random.default_rng(seed)
    counts = rng.integers(2, 40, m)
    offsets = np.concatenate([[0], np.cumsum(counts)])
    labels = (rng.random(offsets[-1]) < 0.1).astype(np.int8)
    labels[offsets[:-1]] = 1  # a click and (counts >= 2) a non-click in every impression
    labels[offsets[:-1] + 1] = 0
    return offsets, labels


def _per_impression(offsets, values):
    return np.add.reduceat(values.astype(np.int64), offsets[:-1])


@pytest.mark.parametrize("fraction", [1.0, 0.5])
def test_row_cap_by_negatives_keeps_every_click_and_a_non_click_per_impression(fraction):
    offsets, labels = _offsets_and_labels()
    clicks = int(labels.sum())
    cap = clicks + len(offsets) - 1 + 300  # room for 300 non-clicks above the one per impression
    config = LGBMConfig(max_rows=cap, neg_fraction=fraction, seed=4)
    keep = cap_rows(offsets, labels, config)
    assert clicks + len(offsets) - 1 < keep.sum() <= cap
    assert keep[labels == 1].all() and (_per_impression(offsets, keep & (labels == 0)) >= 1).all()
    assert np.array_equal(keep, cap_rows(offsets, labels, config))  # seeded
    # A subset of what the uncapped fraction keeps (one seed, nested draws).
    assert not (keep & ~subsample_negatives(offsets, labels, fraction, seed=4)).any()
    assert cap_rows(offsets, labels, replace(config, max_rows=10**9)).sum() == \
        subsample_negatives(offsets, labels, fraction, seed=4).sum()


def test_row_cap_drops_whole_impressions_when_non_clicks_cannot_give_enough():
    offsets, labels = _offsets_and_labels()
    for sampling in ("negatives", "impressions"):
        keep = cap_rows(offsets, labels, LGBMConfig(max_rows=500, row_sampling=sampling, seed=1))
        assert 0 < keep.sum() <= 500
        per = _per_impression(offsets, keep)
        kept = per > 0
        if sampling == "impressions":  # whole impressions, as they were
            assert np.array_equal(per[kept], np.diff(offsets)[kept])
        else:  # the kept impressions hold every click and one non-click
            assert np.array_equal(_per_impression(offsets, keep & (labels == 0))[kept], np.ones(kept.sum()))
        assert kept.sum() < len(offsets) - 1


def test_capped_fit_counts_what_it_dropped(tiny):
    train = tiny["train"]
    ranker = LightGBMRanker(fusion="text", n_estimators=3, max_rows=2000, row_sampling="impressions")
    rows = ranker.training_rows(train, tiny["valid"], tiny["features"])
    info = ranker.fit_info
    assert info["train_rows"] == len(rows.rows) == rows.group.sum() <= 2000 and (rows.group > 0).all()
    assert info["train_impressions_capped"] > 0
    assert info["train_impressions_used"] + info["train_dropped_no_click"] + info["train_dropped_no_nonclick"] + \
        info["train_impressions_capped"] == info["train_impressions"]
    assert rows.valid.candidate_counts.sum() <= 2000 < tiny["valid"].candidate_counts.sum()
    np.testing.assert_array_equal(rows.y, rows.train.labels[rows.rows])


def test_chunked_features_equal_the_whole_matrix(tiny, monkeypatch):
    dev, features = tiny["dev"], tiny["features"]
    config = LGBMConfig(sources=("text", "image"), fuse="hadamard", history=7)
    builder = FeatureBuilder(config, features, resolve_cover(features))
    whole = builder.block(dev, np.arange(len(dev.cand_items)))  # one block: every user once
    monkeypatch.setattr(lgbm_module, "ROWS_PER_CHUNK", 37)
    np.testing.assert_array_equal(builder.matrix(dev), whole)
    rows = np.sort(np.random.default_rng(0).choice(len(dev.cand_items), 500, replace=False))
    np.testing.assert_array_equal(builder.matrix(dev, rows), whole[rows])
    sequence = FeatureRows(builder, dev, rows)  # what LightGBM reads: slices and single rows
    assert len(sequence) == 500
    np.testing.assert_array_equal(sequence[100:250], whole[rows[100:250]])
    np.testing.assert_array_equal(sequence[7], whole[rows[7]])
    imp = dev.row_impression
    spans = list(impression_chunks(imp, 37))
    assert spans[0][0] == 0 and spans[-1][1] == len(imp) and all(a < b for a, b in spans)
    assert all(imp[b - 1] != imp[b] for _, b in spans[:-1])  # no impression is split


def test_datasets_built_block_by_block_train_the_same_trees(tiny):
    import lightgbm as lgb

    ranker = LightGBMRanker(fusion="hadamard", n_estimators=15, patience=15)
    ranker.fit(tiny["train"], tiny["valid"], tiny["features"])
    rows = LightGBMRanker(ranker.config).training_rows(tiny["train"], tiny["valid"], tiny["features"])
    assert len(rows.rows) <= lgbm_module.BIN_SAMPLE  # so the bins come from every row, as LightGBM's own
    params = ranker.config.booster_params()
    whole = lgb.Dataset(rows.x, rows.y, group=rows.group, feature_name=rows.builder.names, params=params)
    valid = lgb.Dataset(rows.valid_x, rows.valid.labels, group=rows.valid.candidate_counts, reference=whole)
    booster = lgb.train(params, whole, num_boost_round=15, valid_sets=[valid], valid_names=["valid"],
                        callbacks=[lgb.early_stopping(15, first_metric_only=True, verbose=False)])
    assert booster.best_iteration == ranker.best_iteration
    np.testing.assert_array_equal(booster.predict(rows.valid_x, num_iteration=ranker.best_iteration),
                                  ranker.score(rows.valid))


def test_bins_from_a_sample_still_learn_and_scoring_in_chunks_changes_nothing(tiny, monkeypatch):
    monkeypatch.setattr(lgbm_module, "BIN_SAMPLE", 400)
    ranker = LightGBMRanker(fusion="hadamard", **FAST)
    ranker.fit(tiny["train"], tiny["valid"], tiny["features"])
    assert ranker.fit_info["train_rows"] > 400
    dev = tiny["dev"]
    scores = ranker.score(dev)
    assert evaluate(dev.cand_offsets, dev.labels, scores)["auc"] > AUC_FLOOR
    monkeypatch.setattr(lgbm_module, "SCORE_ROWS", 50)
    np.testing.assert_array_equal(ranker.score(dev), scores)
    np.testing.assert_array_equal(scores, ranker.booster.predict(ranker.features_of(dev),
                                                                 num_iteration=ranker.best_iteration))


def test_threads_default_to_the_machines_cores():
    import os

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert LGBMConfig().threads == cores == LGBMConfig().booster_params()["num_threads"]
    assert LGBMConfig(n_jobs=3).threads == 3 and LGBMConfig(n_jobs=-2).threads == max(1, cores - 1)
    for bad in (dict(n_jobs=0), dict(max_rows=1), dict(row_sampling="rows"), dict(learning_rate=0.0)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            LGBMConfig(**bad)


def test_lambdarank_without_normalisation_improves_on_its_first_tree():
    """The cause of "best tree = 1" (module docstring), on one weak, monotone feature and
    impressions of MIND-like sizes: LightGBM's default lambdarank_norm makes the training
    NDCG@10 fall below the first tree's; the parameters the ranker uses do not."""
    import lightgbm as lgb

    rng = np.random.default_rng(0)
    counts = np.clip(rng.lognormal(np.log(30), 0.7, 4000).astype(int), 5, 300)
    offsets = np.concatenate([[0], np.cumsum(counts)])
    x = rng.standard_normal((offsets[-1], 1)).astype(np.float32)
    labels = (rng.random(offsets[-1]) < 1 / (1 + np.exp(3.5 - 0.3 * x[:, 0]))).astype(int)
    none = _per_impression(offsets, labels) == 0
    labels[offsets[:-1][none] + rng.integers(0, counts[none])] = 1  # every impression has a click
    params = {**LGBMConfig(n_jobs=1, bagging_fraction=1.0).booster_params(), "min_child_samples": 20}  # no bagging: the effect alone
    curves = {}
    for norm in (False, True):
        data = lgb.Dataset(x, labels, group=counts, params={**params, "lambdarank_norm": norm})
        recorded: dict = {}
        lgb.train({**params, "lambdarank_norm": norm}, data, 30, valid_sets=[data], valid_names=["train"],
                  callbacks=[lgb.record_evaluation(recorded)])
        curves[norm] = recorded["train"]["ndcg@10"]
    assert params["lambdarank_norm"] is False
    assert min(curves[False][5:]) > curves[False][0]  # measured 0.248 -> 0.255 .. 0.261
    assert min(curves[True][1:10]) < curves[True][0]  # measured 0.253 -> 0.237
