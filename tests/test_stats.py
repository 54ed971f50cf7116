"""Bootstrap intervals, paired comparisons and slices: properties and constructed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rankers.metrics import evaluate, per_impression
from rankers.stats import (
    METRICS,
    MIN_INTERVAL_N,
    bootstrap_ci,
    compare_runs,
    history_slices,
    interval,
    paired_bootstrap,
    resampled_means,
    run_metrics,
    slice_candidates,
    slice_metrics,
)

relaxed = settings(deadline=None, max_examples=40)
unit_values = st.lists(st.floats(0.0, 1.0, allow_nan=False), min_size=1, max_size=60)


def world(m: int = 300, seed: int = 0, n_news: int = 200):
    """M impressions of 2..30 candidates, each with a click and a non-click, and some runs.

    "good" is noisy truth, "better" less noisy truth, "noise" pure noise.
    """
    rng = np.random.default_rng(seed)
    sizes = rng.integers(2, 31, m)
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    t = int(offsets[-1])
    labels = (rng.random(t) < 0.15).astype(np.int8)
    labels[offsets[:-1]] = 1
    labels[offsets[:-1] + 1] = 0
    runs = {
        "noise": rng.random(t),
        "good": labels + rng.normal(0, 1.5, t),
        "better": labels + rng.normal(0, 0.5, t),
    }
    items = rng.integers(0, n_news, t)
    history = rng.integers(0, 40, m)
    has_cover = rng.random(n_news) < 0.5
    return offsets, labels, runs, items, history, has_cover


@relaxed
@given(unit_values, st.integers(0, 2**32 - 1), st.sampled_from([0.5, 0.9, 0.95, 0.99]))
def test_the_interval_contains_the_mean(values, seed, level):
    mean, lo, hi = bootstrap_ci(values, n_boot=300, level=level, seed=seed)
    assert mean == pytest.approx(float(np.mean(values)), abs=1e-12)
    assert lo - 1e-12 <= mean <= hi + 1e-12
    assert min(values) - 1e-12 <= lo <= hi <= max(values) + 1e-12


@relaxed
@given(unit_values, st.integers(0, 2**32 - 1))
def test_a_run_compared_with_itself_differs_by_exactly_zero(values, seed):
    assert paired_bootstrap(values, values, n_boot=200, seed=seed) == (0.0, 0.0, 0.0, 1.0)


def test_compare_runs_and_slices_of_a_run_with_itself_are_exactly_zero():
    offsets, labels, runs, items, history, cover = world()
    same = compare_runs(offsets, labels, runs["good"], runs["good"].copy(), n_boot=200)
    assert same == {m: {"diff": 0.0, "lo": 0.0, "hi": 0.0, "p": 1.0} for m in METRICS}
    sliced = slice_metrics(offsets, labels, {"a": runs["good"], "b": runs["good"].copy()}, "a",
                           history_lengths=history, cand_items=items, has_cover=cover, n_boot=200)
    for name, by_run in sliced.items():
        assert by_run["a"]["delta"] is None
        for m in METRICS:
            if by_run["b"]["n"] >= MIN_INTERVAL_N:
                assert by_run["b"]["delta"][m] == {"diff": 0.0, "lo": 0.0, "hi": 0.0, "p": 1.0}, name
            elif by_run["b"]["n"]:
                assert by_run["b"]["delta"][m]["diff"] == 0.0, name
            assert by_run["a"]["metrics"][m]["value"] == by_run["b"]["metrics"][m]["value"] or by_run["a"]["n"] == 0


@relaxed
@given(st.lists(st.floats(0.0, 1.0, allow_nan=False), min_size=5, max_size=60, unique=True),
       st.integers(0, 2**32 - 2))
def test_the_bootstrap_is_deterministic_per_seed(values, seed):
    first = bootstrap_ci(values, n_boot=200, seed=seed)
    assert bootstrap_ci(values, n_boot=200, seed=seed) == first
    again = resampled_means(np.asarray(values)[:, None], n_boot=200, seed=seed)
    other = resampled_means(np.asarray(values)[:, None], n_boot=200, seed=seed + 1)
    assert not np.array_equal(again, other)


def test_resamples_do_not_depend_on_how_many_statistics_share_them():
    # Run intervals and paired intervals must see the same resamples to be comparable.
    rng = np.random.default_rng(3)
    x = rng.random((500, 3))
    together = resampled_means(x, n_boot=300, seed=7)
    for k in range(3):
        alone = resampled_means(x[:, [k]], n_boot=300, seed=7)
        np.testing.assert_allclose(alone[:, 0], together[:, k], rtol=0, atol=1e-13)


def test_every_resample_draws_m_impressions_across_partial_blocks(monkeypatch):
    import rankers.stats as stats

    # With the identity as values, M times a resampled mean is a resample's draw counts.
    m = 50
    monkeypatch.setattr(stats, "RESAMPLE_BLOCK", m * 7)  # blocks of 7, the last one of 2
    counts = resampled_means(np.eye(m), n_boot=100, seed=1) * m  # (B, M)
    whole = np.round(counts)
    np.testing.assert_allclose(counts, whole, rtol=0, atol=1e-9)
    assert (whole >= 0).all() and (whole.sum(axis=1) == m).all()
    assert len({tuple(row) for row in whole.astype(int)}) == 100  # no block repeats another


def test_the_interval_width_matches_the_normal_theory():
    rng = np.random.default_rng(1)
    x = rng.normal(0.6, 0.2, 4000)
    mean, lo, hi = bootstrap_ci(x, n_boot=2000, seed=0)
    half = 1.96 * x.std() / math.sqrt(len(x))
    assert (hi - lo) / 2 == pytest.approx(half, rel=0.1)
    assert (mean - lo) == pytest.approx(hi - mean, rel=0.2)


def test_a_clearly_better_run_has_a_paired_interval_above_zero():
    offsets, labels, runs, *_ = world(m=400)
    diff = compare_runs(offsets, labels, runs["good"], runs["better"], n_boot=500)
    for m in METRICS:
        assert diff[m]["lo"] > 0, m
        assert diff[m]["lo"] <= diff[m]["diff"] <= diff[m]["hi"]
        assert diff[m]["p"] == 0.0
    worse = compare_runs(offsets, labels, runs["better"], runs["good"], n_boot=500)
    assert worse["auc"]["hi"] < 0 and worse["auc"]["p"] == 1.0
    assert worse["auc"]["diff"] == pytest.approx(-diff["auc"]["diff"], abs=1e-12)


def test_pairing_is_narrower_than_two_separate_intervals():
    offsets, labels, runs, *_ = world(m=400)
    a = run_metrics(offsets, labels, runs["good"], n_boot=500)
    b = run_metrics(offsets, labels, runs["better"], n_boot=500)
    d = compare_runs(offsets, labels, runs["good"], runs["better"], n_boot=500)
    separate = (a["auc"]["hi"] - a["auc"]["lo"]) + (b["auc"]["hi"] - b["auc"]["lo"])
    assert d["auc"]["hi"] - d["auc"]["lo"] < separate


def test_run_metrics_values_are_the_official_means():
    offsets, labels, runs, *_ = world()
    labels = labels.copy()
    labels[offsets[3]:offsets[4]] = 0  # one impression without a click: skipped
    got = run_metrics(offsets, labels, runs["good"], n_boot=100)
    want = evaluate(offsets, labels, runs["good"])
    for m in METRICS:
        assert got[m]["value"] == pytest.approx(want[m], abs=1e-12)
        assert got[m]["lo"] <= got[m]["value"] <= got[m]["hi"]
    for key in ("impressions", "skipped_no_click", "skipped_no_nonclick"):
        assert got[key] == want[key]


def test_history_slices_partition_impressions_at_the_bin_edges():
    lengths = np.array([0, 1, 4, 5, 19, 20, 1000, 0, 3])
    slices = history_slices(lengths)
    assert list(slices) == ["0", "1-4", "5-19", "20+"]
    stacked = np.stack(list(slices.values()))  # (4, M)
    assert (stacked.sum(axis=0) == 1).all()
    assert {k: np.flatnonzero(v).tolist() for k, v in slices.items()} == {
        "0": [0, 7], "1-4": [1, 2, 8], "5-19": [3, 4], "20+": [5, 6]}
    with pytest.raises(ValueError, match=">= 0"):
        history_slices(np.array([3, -1]))


@relaxed
@given(st.lists(st.lists(st.booleans(), max_size=8), max_size=10))
def test_slice_candidates_equals_a_plain_filter(keep_lists):
    sizes = [len(k) for k in keep_lists]
    offsets = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])
    keep = np.array([x for k in keep_lists for x in k], dtype=bool)
    rows_all = np.arange(len(keep))
    new_offsets, row_index = slice_candidates(offsets, keep)
    assert len(new_offsets) == len(offsets)
    for i in range(len(sizes)):
        plain = [r for r in rows_all[offsets[i]:offsets[i + 1]] if keep[r]]
        assert row_index[new_offsets[i]:new_offsets[i + 1]].tolist() == plain


def test_slices_are_subsets_recomputed_as_plain_filters():
    offsets, labels, runs, items, history, cover = world(m=200)
    out = slice_metrics(offsets, labels, runs, "good", history_lengths=history,
                        cand_items=items, has_cover=cover, n_boot=100)
    assert list(out) == ["all", "history 0", "history 1-4", "history 5-19", "history 20+",
                         "with cover", "without cover"]
    per = per_impression(offsets, labels, runs["better"])
    # Impression slices: the full per-impression values of the slice's impressions.
    n_hist = 0
    for name, mask in history_slices(history).items():
        entry = out[f"history {name}"]["better"]
        keep = mask & per.valid
        n_hist += entry["n"]
        assert entry["n"] == keep.sum()
        assert entry["metrics"]["auc"]["value"] == pytest.approx(per.auc[keep].mean(), abs=1e-12)
    assert n_hist == out["all"]["better"]["n"]
    # Candidate slices: every impression's list filtered, then scored as it stands.
    for name, want_cover in (("with cover", True), ("without cover", False)):
        sub_offsets, sub_labels, sub_scores, skipped = [0], [], [], 0
        for i in range(len(offsets) - 1):
            rows = [r for r in range(offsets[i], offsets[i + 1]) if cover[items[r]] == want_cover]
            y = labels[rows]
            if y.sum() == 0 or y.sum() == len(y):
                skipped += 1
                continue
            sub_labels += y.tolist()
            sub_scores += runs["better"][rows].tolist()
            sub_offsets.append(len(sub_labels))
        want = evaluate(sub_offsets, sub_labels, sub_scores)
        entry = out[name]["better"]
        assert entry["n"] == want["impressions"]
        assert entry["skipped"] == skipped
        for m in METRICS:
            assert entry["metrics"][m]["value"] == pytest.approx(want[m], abs=1e-12)
        assert entry["delta"]["auc"]["lo"] > 0  # "better" beats "good" on every slice


def test_slice_all_equals_run_metrics_and_compare_runs():
    offsets, labels, runs, *_ = world(m=250)
    out = slice_metrics(offsets, labels, runs, "good", n_boot=300, seed=5)
    assert list(out) == ["all"]
    single = run_metrics(offsets, labels, runs["noise"], n_boot=300, seed=5)
    paired = compare_runs(offsets, labels, runs["good"], runs["noise"], n_boot=300, seed=5)
    for m in METRICS:
        for key in ("value", "lo", "hi"):
            assert out["all"]["noise"]["metrics"][m][key] == pytest.approx(single[m][key], abs=1e-12)
        for key in ("diff", "lo", "hi", "p"):
            assert out["all"]["noise"]["delta"][m][key] == pytest.approx(paired[m][key], abs=1e-12)


def test_an_empty_slice_has_no_estimate():
    offsets, labels, runs, items, history, cover = world(m=50)
    history = np.full_like(history, 7)  # every impression in "5-19"
    out = slice_metrics(offsets, labels, runs, "good", history_lengths=history, n_boot=50)
    empty = out["history 0"]["better"]
    assert empty["n"] == 0
    assert math.isnan(empty["metrics"]["auc"]["value"]) and math.isnan(empty["delta"]["auc"]["lo"])
    assert out["history 5-19"]["better"]["n"] == out["all"]["better"]["n"]


def test_a_tiny_slice_keeps_its_values_but_gets_no_interval():
    offsets, labels, runs, items, history, cover = world(m=200)
    history = np.full_like(history, 7)
    history[:3] = 0  # three impressions without history
    out = slice_metrics(offsets, labels, runs, "good", history_lengths=history, n_boot=50)
    tiny = out["history 0"]["better"]
    assert tiny["n"] == 3 < MIN_INTERVAL_N
    assert np.isfinite(tiny["metrics"]["auc"]["value"]) and np.isfinite(tiny["delta"]["auc"]["diff"])
    assert math.isnan(tiny["metrics"]["auc"]["lo"]) and math.isnan(tiny["delta"]["auc"]["hi"])
    assert math.isnan(tiny["delta"]["auc"]["p"])
    assert np.isfinite(out["history 5-19"]["better"]["delta"]["auc"]["lo"])


def test_bad_arguments_are_refused_with_a_reason():
    with pytest.raises(ValueError, match="level"):
        bootstrap_ci([0.1, 0.2], level=1.0)
    with pytest.raises(ValueError, match="n_boot"):
        bootstrap_ci([0.1, 0.2], n_boot=0)
    with pytest.raises(ValueError, match="finite"):
        interval(np.array([[0.1], [np.nan]]))
    with pytest.raises(ValueError, match="same impressions"):
        paired_bootstrap([0.1, 0.2], [0.1])
    offsets, labels, runs, items, history, cover = world(m=20)
    with pytest.raises(ValueError, match="reference run 'text'"):
        slice_metrics(offsets, labels, runs, "text")
    with pytest.raises(ValueError, match="both cand_items and has_cover"):
        slice_metrics(offsets, labels, runs, "good", cand_items=items)
    with pytest.raises(ValueError, match="one entry per candidate row"):
        slice_candidates(offsets, np.ones(3, dtype=bool))
    assert all(math.isnan(v) for v in bootstrap_ci([]))


# ------------------------------------------------------------------------------ training seeds


def _seeded_scores(rng, offsets, labels, shifts):
    """Scores of one arm per seed: the labels plus noise, each seed's signal scaled by its shift."""
    base = rng.normal(size=len(labels))
    return np.stack([base + shift * labels for shift in shifts])  # (S, T)


def test_seeds_that_disagree_widen_the_paired_interval():
    """Two arms with the same mean gain over the reference: one whose three seeds agree, one
    whose seeds disagree. Only the second's interval must account for the seeds' spread."""
    rng = np.random.default_rng(0)
    m, c = 2000, 10
    offsets = np.arange(0, (m + 1) * c, c)
    labels = (rng.random(m * c) < 0.2).astype(np.int8)
    labels[offsets[:-1]] = 1  # a click per impression
    labels[offsets[:-1] + 1] = 0  # and a non-click
    reference = _seeded_scores(np.random.default_rng(1), offsets, labels, [0.5, 0.5, 0.5])
    agree = _seeded_scores(np.random.default_rng(2), offsets, labels, [1.0, 1.0, 1.0])
    disagree = _seeded_scores(np.random.default_rng(2), offsets, labels, [0.2, 1.0, 1.8])
    out = slice_metrics(offsets, labels, {"ref": reference, "agree": agree, "disagree": disagree}, "ref",
                        n_boot=400, seed=0)["all"]
    width = {name: out[name]["delta"]["auc"]["hi"] - out[name]["delta"]["auc"]["lo"] for name in ("agree", "disagree")}
    assert width["disagree"] > 2 * width["agree"], width
    assert out["agree"]["delta"]["auc"]["lo"] > 0  # seeds that agree: a clear gain
    # The value is the mean over seeds, and every seed's own value is listed.
    per_seed = [evaluate(offsets, labels, row)["auc"] for row in disagree]
    assert [s["auc"] for s in out["disagree"]["seeds"]] == pytest.approx(per_seed)
    assert out["disagree"]["metrics"]["auc"]["value"] == pytest.approx(np.mean(per_seed))


def test_one_seed_is_the_one_level_bootstrap_and_a_baseline_pairs_with_every_seed():
    rng = np.random.default_rng(3)
    offsets = np.arange(0, 301 * 8, 8)
    labels = (rng.random(300 * 8) < 0.3).astype(np.int8)
    a, b = rng.normal(size=(2, len(labels)))
    one = slice_metrics(offsets, labels, {"a": a, "b": b}, "a", n_boot=200, seed=5)["all"]
    stacked = slice_metrics(offsets, labels, {"a": a[None], "b": b[None]}, "a", n_boot=200, seed=5)["all"]
    assert one == stacked
    # A deterministic baseline (one row) is paired with each seed of a seeded reference.
    seeded = slice_metrics(offsets, labels, {"a": np.stack([a, a, a]), "b": b}, "a", n_boot=200, seed=5)["all"]
    assert seeded["b"]["delta"]["auc"]["diff"] == pytest.approx(one["b"]["delta"]["auc"]["diff"])
    with pytest.raises(ValueError, match="different numbers of seeds"):
        slice_metrics(offsets, labels, {"a": np.stack([a, a]), "b": np.stack([b, b, b])}, "a", n_boot=100)
