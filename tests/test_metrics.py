"""Properties of the vectorised MIND metrics, checked against the plain reference and sklearn."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import roc_auc_score

import rankers.metrics as metrics
from rankers.metrics import evaluate, per_impression, ranks_from_scores, reference_metrics

KEYS = ("auc", "mrr", "ndcg@5", "ndcg@10")
METHODS = ("auto", "pairs", "sort")
relaxed = settings(deadline=None, max_examples=60)


@st.composite
def impressions(draw, *, ties: bool, min_size: int = 0, max_size: int = 14,
                min_imps: int = 0, max_imps: int = 10):
    """(offsets, labels, scores) for a few impressions; sizes include 0, 1 and 2.

    ties=False draws distinct scores within each impression; ties=True draws from a few
    values so ties are common.
    """
    m = draw(st.integers(min_imps, max_imps))
    sizes, labels, scores = [], [], []
    for _ in range(m):
        n = draw(st.integers(min_size, max_size))
        sizes.append(n)
        labels += draw(st.lists(st.integers(0, 1), min_size=n, max_size=n))
        if ties:
            scores += draw(st.lists(st.sampled_from([-1.0, 0.0, 0.5, 2.0]), min_size=n, max_size=n))
        else:
            scores += draw(st.lists(st.floats(-1e6, 1e6, allow_nan=False), min_size=n,
                                    max_size=n, unique=True))
    offsets = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])
    return offsets, np.array(labels, dtype=np.int8), np.array(scores, dtype=np.float64)


def as_rows(per) -> np.ndarray:
    return np.stack([per.auc, per.mrr, per.ndcg5, per.ndcg10], axis=1)  # (M, 4)


def reference_rows(offsets, labels, scores) -> tuple[np.ndarray, np.ndarray]:
    """(M, 4) reference metrics (0 where skipped) and (M,) valid, by the plain loop."""
    m = len(offsets) - 1
    rows, valid = np.zeros((m, 4)), np.zeros(m, dtype=bool)
    for i in range(m):
        rows_i = slice(offsets[i], offsets[i + 1])
        ref = reference_metrics(labels[rows_i], scores[rows_i])
        if ref is not None:
            rows[i] = [ref[k] for k in KEYS]
            valid[i] = True
    return rows, valid


@relaxed
@given(impressions(ties=True))
def test_metrics_lie_in_the_unit_interval(data):
    for method in METHODS:
        per = per_impression(*data, method=method)
        rows = as_rows(per)
        assert np.isfinite(rows).all()
        assert ((rows >= 0) & (rows <= 1 + 1e-12)).all()


@relaxed
@given(impressions(ties=False, min_size=2, min_imps=1))
def test_a_perfect_ranking_scores_one(data):
    offsets, labels, _ = data
    # Every click above every non-click, no ties (distinct offsets below 1/2).
    scores = labels + np.arange(len(labels)) / (2.0 * len(labels))
    per = per_impression(offsets, labels, scores)
    single = per.valid & (np.add.reduceat(labels, offsets[:-1]) == 1)
    assert (per.auc[per.valid] == 1).all()
    np.testing.assert_allclose(per.ndcg5[per.valid], 1.0, rtol=0, atol=1e-12)
    np.testing.assert_allclose(per.ndcg10[per.valid], 1.0, rtol=0, atol=1e-12)
    # The official MRR averages 1/rank over ALL clicks, so even a perfect ranking of P
    # clicks scores (1 + 1/2 + ... + 1/P) / P: exactly 1 only with one click.
    np.testing.assert_allclose(per.mrr[single], 1.0, rtol=0, atol=1e-12)
    for i in np.flatnonzero(per.valid):
        p = int(labels[offsets[i]:offsets[i + 1]].sum())
        assert per.mrr[i] == pytest.approx(sum(1 / r for r in range(1, p + 1)) / p, abs=1e-12)


@relaxed
@given(impressions(ties=False), st.randoms(use_true_random=False))
def test_permuting_candidates_with_their_scores_changes_nothing(data, rnd):
    offsets, labels, scores = data
    perm = np.arange(len(labels))
    for i in range(len(offsets) - 1):
        block = perm[offsets[i]:offsets[i + 1]].tolist()
        rnd.shuffle(block)
        perm[offsets[i]:offsets[i + 1]] = block
    before = per_impression(offsets, labels, scores)
    after = per_impression(offsets, labels[perm], scores[perm])
    np.testing.assert_array_equal(before.valid, after.valid)
    np.testing.assert_allclose(as_rows(before), as_rows(after), rtol=0, atol=1e-12)


@relaxed
@pytest.mark.parametrize("method", METHODS)
@given(data=impressions(ties=False))
def test_vectorised_equals_reference_without_ties(method, data):
    per = per_impression(*data, method=method)
    rows, valid = reference_rows(*data)
    np.testing.assert_array_equal(per.valid, valid)
    np.testing.assert_allclose(as_rows(per), rows, rtol=0, atol=1e-9)


@relaxed
@pytest.mark.parametrize("method", ("pairs", "sort"))
@given(data=impressions(ties=True))
def test_vectorised_equals_reference_with_ties(method, data):
    # The reference sorts by (-score, position): the same tie rule, so ties agree too.
    per = per_impression(*data, method=method)
    rows, valid = reference_rows(*data)
    np.testing.assert_array_equal(per.valid, valid)
    np.testing.assert_allclose(as_rows(per), rows, rtol=0, atol=1e-9)


@relaxed
@given(impressions(ties=True, max_size=30))
def test_small_chunks_give_the_same_result(data):
    # Chunks split clicks of one impression apart; the answer must not depend on that.
    whole = per_impression(*data, method="pairs")
    old = metrics.PAIRS_PER_CHUNK
    metrics.PAIRS_PER_CHUNK = 3
    try:
        chunked = per_impression(*data, method="pairs")
    finally:
        metrics.PAIRS_PER_CHUNK = old
    np.testing.assert_array_equal(as_rows(whole), as_rows(chunked))


@relaxed
@given(impressions(ties=True))
def test_auc_with_ties_equals_sklearn(data):
    offsets, labels, scores = data
    per = per_impression(offsets, labels, scores)
    for i in np.flatnonzero(per.valid):
        rows = slice(offsets[i], offsets[i + 1])
        assert per.auc[i] == pytest.approx(roc_auc_score(labels[rows], scores[rows]), abs=1e-12)


@relaxed
@given(impressions(ties=True))
def test_skipped_impressions_are_counted_and_never_nan(data):
    offsets, labels, scores = data
    sizes = np.diff(offsets)
    clicks = np.array([labels[offsets[i]:offsets[i + 1]].sum() for i in range(len(sizes))])
    with warnings.catch_warnings(), np.errstate(all="raise"):
        warnings.simplefilter("error")
        per = per_impression(offsets, labels, scores)
    assert per.skipped_no_click == int(np.sum(clicks == 0))
    assert per.skipped_no_nonclick == int(np.sum((clicks > 0) & (clicks == sizes)))
    np.testing.assert_array_equal(per.valid, (clicks > 0) & (clicks < sizes))
    assert not np.isnan(as_rows(per)).any()


def test_hand_computed_example():
    offsets = [0, 4, 7, 9, 11]
    labels = [1, 0, 0, 1, 0, 1, 0, 0, 0, 1, 1]
    scores = [0.9, 0.3, 0.5, 0.2, 0.7, 0.7, 0.1, 0.2, 0.1, 0.3, 0.4]
    per = per_impression(offsets, labels, scores)
    # Impression 0, sorted: 0.9 (click, rank 1), 0.5, 0.3, 0.2 (click, rank 4).
    #   AUC: click 0.9 beats both non-clicks, click 0.2 beats none: 2 / (2*2) = 0.5
    #   MRR: (1/1 + 1/4) / 2 = 0.625
    #   DCG = 1/log2(2) + 1/log2(5) = 1 + 0.43067655807339306 = 1.4306765580733931
    #   IDCG = 1/log2(2) + 1/log2(3) = 1 + 0.6309297535714575 = 1.6309297535714575
    #   nDCG@5 = nDCG@10 = 1.4306765580733931 / 1.6309297535714575 = 0.8772153153380493
    # Impression 1: scores 0.7 (non-click), 0.7 (click), 0.1 (non-click).
    #   AUC: the click ties 0.7 (1/2) and beats 0.1 (1): 1.5 / 2 = 0.75
    #   tie rule: the earlier non-click ranks first, the click is rank 2: MRR = 1/2
    #   nDCG = (1/log2(3)) / (1/log2(2)) = 0.6309297535714575
    # Impression 2 has no click, impression 3 no non-click: both skipped.
    assert per.valid.tolist() == [True, True, False, False]
    assert per.auc[:2].tolist() == [0.5, 0.75]
    assert per.mrr[:2].tolist() == [0.625, 0.5]
    assert per.ndcg5[:2] == pytest.approx([0.8772153153380493, 0.6309297535714575], abs=1e-15)
    assert per.ndcg10[:2] == pytest.approx([0.8772153153380493, 0.6309297535714575], abs=1e-15)
    result = evaluate(offsets, labels, scores)
    # Means over the two valid impressions: (0.5 + 0.75)/2, (0.625 + 0.5)/2,
    # (0.8772153153380493 + 0.6309297535714575)/2 = 0.7540725344547534.
    assert result == pytest.approx({
        "auc": 0.625, "mrr": 0.5625, "ndcg@5": 0.7540725344547534,
        "ndcg@10": 0.7540725344547534, "impressions": 2,
        "skipped_no_click": 1, "skipped_no_nonclick": 1,
    }, abs=1e-15)


def test_ndcg_cuts_at_k():
    # One click at rank 7 of 12: outside the top 5, inside the top 10.
    labels = [0] * 12
    labels[6] = 1
    scores = list(range(12, 0, -1))
    result = evaluate([0, 12], labels, scores)
    assert result["ndcg@5"] == 0.0
    assert result["ndcg@10"] == pytest.approx(1 / np.log2(8))  # = 1/3
    assert result["mrr"] == pytest.approx(1 / 7)


def test_ranks_from_scores_breaks_ties_by_position():
    offsets = [0, 4, 4, 7]  # the middle impression is empty
    scores = [0.5, 0.9, 0.5, 0.1, 3.0, 3.0, 3.0]
    # 0.9 first; the two 0.5 in candidate order; then 0.1. All-equal: candidate order.
    assert ranks_from_scores(offsets, scores).tolist() == [2, 1, 3, 4, 1, 2, 3]


@relaxed
@given(impressions(ties=True))
def test_ranks_from_scores_is_a_permutation_following_the_tie_rule(data):
    offsets, labels, scores = data
    ranks = ranks_from_scores(offsets, scores)
    for i in range(len(offsets) - 1):
        r, s = ranks[offsets[i]:offsets[i + 1]], scores[offsets[i]:offsets[i + 1]]
        assert sorted(r.tolist()) == list(range(1, len(r) + 1))
        for a in range(len(r)):
            for b in range(a + 1, len(r)):
                assert (r[a] < r[b]) == (s[a] >= s[b])
    # Ranks as scores keep the order, so MRR and nDCG do not change even with ties.
    per_scores = per_impression(offsets, labels, scores)
    per_ranks = per_impression(offsets, labels, -ranks.astype(float))
    np.testing.assert_allclose(as_rows(per_ranks)[:, 1:], as_rows(per_scores)[:, 1:], atol=1e-12)


def test_evaluate_is_the_mean_over_valid_impressions():
    rng = np.random.default_rng(3)
    sizes = rng.integers(1, 20, 200)
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    labels = (rng.random(offsets[-1]) < 0.2).astype(int)
    scores = rng.random(offsets[-1])
    per = per_impression(offsets, labels, scores)
    result = evaluate(offsets, labels, scores)
    assert result["impressions"] == per.valid.sum() > 0
    assert result["auc"] == pytest.approx(per.auc[per.valid].mean())
    assert result["ndcg@10"] == pytest.approx(per.ndcg10[per.valid].mean())
    assert result["skipped_no_click"] + result["skipped_no_nonclick"] + result["impressions"] == 200


def test_evaluate_refuses_when_nothing_can_be_scored():
    with pytest.raises(ValueError, match="1 without a click, 1 without a non-click"):
        evaluate([0, 2, 3], [0, 0, 1], [0.1, 0.2, 0.3])


@pytest.mark.parametrize("offsets, labels, scores, message", [
    ([0, 2], [0, 1, 1], [0.1, 0.2, 0.3], r"offsets\[-1\] = 2 .* scores has 3"),
    ([0, 3], [0, 1], [0.1, 0.2, 0.3], "same length, got 2 and 3"),
    ([1, 3], [0, 1, 0], [0.1, 0.2, 0.3], r"start at 0, got offsets\[0\] = 1"),
    ([0, 2, 1, 3], [0, 1, 0], [0.1, 0.2, 0.3],
     r"non-decreasing: offsets\[2\] = 1 < offsets\[1\] = 2"),
    ([0.0, 3.0], [0, 1, 0], [0.1, 0.2, 0.3], "offsets must be integers"),
    ([0, 1, 3], [0, 2, 0], [0.1, 0.2, 0.3], r"labels must be 0 or 1: row 1 \(impression 1\) is 2"),
    ([0, 1, 3], [0, 1, 0], [0.1, float("nan"), 0.3], r"NaN: row 1 \(impression 1\)"),
])
def test_bad_inputs_are_named(offsets, labels, scores, message):
    with pytest.raises(ValueError, match=message):
        per_impression(offsets, labels, scores)


def test_reference_skips_and_validates():
    assert reference_metrics([0, 0], [0.1, 0.2]) is None
    assert reference_metrics([1], [0.1]) is None
    with pytest.raises(ValueError, match="same length"):
        reference_metrics([0, 1], [0.1])
