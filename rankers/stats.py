"""Confidence intervals and paired comparisons for MIND metrics, by bootstrap over impressions.

Letters: M impressions, T candidate rows, N news, B resamples, K statistics at once.

The official metrics are plain means over impressions, so their uncertainty comes from
which impressions were drawn: a percentile bootstrap resamples the per-impression values
(from `rankers.metrics.per_impression`) with replacement, B times, and reads the interval
off the B resampled means. Metrics are never recomputed per resample.

Paired comparisons. Two runs scored on the same impressions are compared on the SAME
resamples: the statistic is the mean of the per-impression differences (b - a), so the
impression-to-impression variation both runs share cancels, and the interval is much
narrower than two separate intervals suggest. A run compared with itself gives a
difference of exactly 0 with a zero-width interval. `p` is the share of resamples whose
difference is <= 0: a one-sided bootstrap p-value for "b is higher than a" (small: b is
reliably higher; near 1: b is reliably lower). An interval that excludes 0 is the
criterion the reports use.

Determinism. The resamples depend only on (number of impressions, B, seed): every
statistic computed over the same impressions with the same seed sees the same resamples,
whichever function computes it and however many statistics it computes at once.

How it is vectorised. A block of resamples is a (b, M) matrix of drawn indices, turned
into counts per impression by one bincount, and the resampled means of all K statistics
are one matrix product counts (b, M) @ values (M, K) / M. Blocks bound memory to
`RESAMPLE_BLOCK` drawn indices. 73k impressions x 1000 resamples x 4 metrics take about a
second on one core.

Slices. `history_slices` splits impressions by the user's history length; the candidate
slices "with cover" / "without cover" keep, in every impression, only the candidates whose
news has (or lacks) a cover and score those shortened lists again (impressions left
without a click or without a non-click are skipped and counted, as `per_impression` does).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from rankers.metrics import ImpressionMetrics, per_impression

METRICS = ("auc", "mrr", "ndcg@5", "ndcg@10")
"""The metric keys, in report order; the same keys as `rankers.metrics.evaluate`."""

HISTORY_BINS = (("0", 0, 0), ("1-4", 1, 4), ("5-19", 5, 19), ("20+", 20, None))
"""(name, lowest, highest or None) history lengths of each history slice."""

COVER_SLICES = ("with cover", "without cover")
MIN_INTERVAL_N = 20
"""Slices with fewer scored impressions get point values only: no interval, no verdict."""

RESAMPLE_BLOCK = 1 << 21
"""Drawn indices per block of resamples: about 16 MB each for indices and counts."""

ArrayLike = Sequence[float] | np.ndarray


@dataclass(frozen=True)
class Interval:
    """K bootstrap statistics: point estimates, percentile bounds, share of resamples <= 0."""

    point: np.ndarray  # (K,)
    lo: np.ndarray  # (K,)
    hi: np.ndarray  # (K,)
    p: np.ndarray  # (K,) share of resampled means <= 0 (a p-value only for differences)


def resampled_means(values: np.ndarray, n_boot: int = 1000, seed: int = 0) -> np.ndarray:
    """(B, K) means of `values` over B resamples with replacement.

    `values` (M, K): resample its rows (impressions). `values` (S, M, K), S training seeds
    of the same M impressions: the two-level bootstrap, which resamples the S seeds and,
    independently, the M impressions, and averages the drawn seeds' means over the drawn
    impressions (every seed sees the same impressions, which is what they were scored on).
    Row j of the result is the same resample for every column and depends only on
    (S, M, B, seed); with S = 1 it is exactly the one-level bootstrap. Raises ValueError for
    M = 0.
    """
    values = np.asarray(values, dtype=np.float64)
    if values.ndim == 2:
        values = values[None]
    if values.ndim != 3:
        raise ValueError(f"values must be (M impressions, K statistics) or (S seeds, M, K), got shape {values.shape}")
    s, m, k = values.shape
    if m == 0:
        raise ValueError("cannot resample zero impressions")
    if s == 0:
        raise ValueError("cannot resample zero seeds")
    _check_n_boot(n_boot)
    rng = np.random.default_rng(seed)
    seed_rng = np.random.default_rng([seed, 1])  # its own stream: S = 1 draws the same impressions
    rows = max(1, RESAMPLE_BLOCK // m)  # depends on M only, so the draws do too
    out = np.empty((n_boot, k))
    vt = np.ascontiguousarray(values.transpose(0, 2, 1))  # (S, K, M)
    with _one_blas_thread():
        for start in range(0, n_boot, rows):
            b = min(rows, n_boot - start)
            idx = rng.integers(0, m, size=(b, m))  # (b, M) drawn impressions
            idx += (np.arange(b) * m)[:, None]  # one bincount for the whole block
            counts = np.bincount(idx.ravel(), minlength=b * m).reshape(b, m).T.astype(np.float64)  # (M, b)
            # (K, M) @ (M, b): OpenBLAS is several times faster this way round for small K.
            per_seed = np.stack([vt[j] @ counts for j in range(s)]) / m  # (S, K, b)
            if s == 1:
                out[start:start + b] = per_seed[0].T
                continue
            drawn = seed_rng.multinomial(s, np.full(s, 1.0 / s), size=b) / s  # (b, S) weights of drawn seeds
            out[start:start + b] = np.einsum("bs,skb->bk", drawn, per_seed)  # (b, K)
    return out


def interval(values: np.ndarray, n_boot: int = 1000, level: float = 0.95, seed: int = 0) -> Interval:
    """Percentile bootstrap interval of the column means of `values` (M, K), or of the seed-
    averaged column means of `values` (S, M, K) by the two-level bootstrap (`resampled_means`).

    With M = 0 every field is NaN (an empty slice has no estimate).
    """
    values = np.asarray(values, dtype=np.float64)
    if values.ndim not in (2, 3):
        raise ValueError(f"values must be (M impressions, K statistics) or (S seeds, M, K), got shape {values.shape}")
    _check_level(level)
    _check_n_boot(n_boot)
    if not np.isfinite(values).all():
        raise ValueError("values must be finite: a NaN or inf per-impression value has no mean")
    k = values.shape[-1]
    if values.shape[-2] == 0:
        nan = np.full(k, np.nan)
        return Interval(nan, nan.copy(), nan.copy(), nan.copy())
    means = resampled_means(values, n_boot, seed)  # (B, K)
    alpha = 1.0 - level
    lo, hi = np.quantile(means, [alpha / 2, 1 - alpha / 2], axis=0)  # (K,) each
    return Interval(
        point=values.reshape(-1, k).mean(axis=0),
        lo=lo,
        hi=hi,
        p=np.count_nonzero(means <= 0, axis=0) / n_boot,
    )


def bootstrap_ci(
    per_impression_values: ArrayLike, n_boot: int = 1000, level: float = 0.95, seed: int = 0
) -> tuple[float, float, float]:
    """(mean, lo, hi): the mean of (M,) per-impression values and its percentile interval.

    All three are NaN when M = 0.
    """
    x = _vector(per_impression_values, "per_impression_values")
    r = interval(x[:, None], n_boot, level, seed)
    return float(r.point[0]), float(r.lo[0]), float(r.hi[0])


def paired_bootstrap(
    a: ArrayLike, b: ArrayLike, n_boot: int = 1000, level: float = 0.95, seed: int = 0
) -> tuple[float, float, float, float]:
    """(diff, lo, hi, p) of mean(b - a) over the same (M,) impressions, resampled in pairs.

    diff > 0 when b is higher. p is the share of resamples with a difference <= 0.
    """
    a = _vector(a, "a")
    b = _vector(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"a and b must hold the same impressions, got {len(a)} and {len(b)} values")
    r = interval((b - a)[:, None], n_boot, level, seed)
    return float(r.point[0]), float(r.lo[0]), float(r.hi[0]), float(r.p[0])


def metric_matrix(per: ImpressionMetrics) -> np.ndarray:
    """(M, 4) per-impression values in `METRICS` order (rows where not `per.valid` are 0)."""
    return np.stack([per.auc, per.mrr, per.ndcg5, per.ndcg10], axis=1)


def run_metrics(
    offsets: ArrayLike, labels: ArrayLike, scores: ArrayLike,
    n_boot: int = 1000, seed: int = 0, level: float = 0.95,
) -> dict:
    """The four metrics of one run with bootstrap intervals over its valid impressions.

    Returns {metric: {"value", "lo", "hi"}} for each of `METRICS`, plus the ints
    "impressions" (valid, scored), "skipped_no_click" and "skipped_no_nonclick". The
    values equal `rankers.metrics.evaluate`.
    """
    per = per_impression(offsets, labels, scores)
    r = interval(metric_matrix(per)[per.valid], n_boot, level, seed)
    out: dict = {name: _value_entry(r, j) for j, name in enumerate(METRICS)}
    out["impressions"] = int(np.count_nonzero(per.valid))
    out["skipped_no_click"] = per.skipped_no_click
    out["skipped_no_nonclick"] = per.skipped_no_nonclick
    return out


def compare_runs(
    offsets: ArrayLike, labels: ArrayLike, scores_a: ArrayLike, scores_b: ArrayLike,
    n_boot: int = 1000, seed: int = 0, level: float = 0.95,
) -> dict[str, dict[str, float]]:
    """Paired differences b - a of the four metrics over the impressions valid in both.

    Returns {metric: {"diff", "lo", "hi", "p"}}; "diff" > 0 when run b scores higher.
    Use run a = the reference (text-only) run.
    """
    per_a = per_impression(offsets, labels, scores_a)
    per_b = per_impression(offsets, labels, scores_b)
    keep = per_a.valid & per_b.valid
    d = metric_matrix(per_b)[keep] - metric_matrix(per_a)[keep]  # (M', 4)
    r = interval(d, n_boot, level, seed)
    return {name: _delta_entry(r, j) for j, name in enumerate(METRICS)}


def history_slices(history_lengths: ArrayLike) -> dict[str, np.ndarray]:
    """{"0", "1-4", "5-19", "20+"} -> (M,) bool: impressions by history length (a partition)."""
    h = np.asarray(history_lengths)
    if h.ndim != 1 or (len(h) and not np.issubdtype(h.dtype, np.integer)):
        raise ValueError(
            f"history_lengths must be a 1-D integer array, got {h.dtype} of shape {h.shape}"
        )
    if len(h) and h.min() < 0:
        raise ValueError(f"history_lengths must be >= 0, impression {int(np.argmin(h))} has {int(h.min())}")
    return {
        name: (h >= low) & (h <= high if high is not None else True)
        for name, low, high in HISTORY_BINS
    }


def slice_candidates(offsets: ArrayLike, keep_rows: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Keep only some candidate rows of every impression.

    offsets (M+1,), keep_rows (T,) bool. Returns new_offsets (M+1,) int64 (impressions keep
    their place, possibly empty) and row_index (T',) int64, the kept rows in order: the
    sliced labels are labels[row_index].
    """
    off = np.asarray(offsets, dtype=np.int64)
    keep = np.asarray(keep_rows, dtype=bool)
    if off.ndim != 1 or len(off) == 0 or off[0] != 0 or (np.diff(off) < 0).any():
        raise ValueError("offsets must be a non-decreasing 1-D array of M+1 row offsets from 0")
    if keep.shape != (off[-1],):
        raise ValueError(
            f"keep_rows must have one entry per candidate row ({off[-1]}), got shape {keep.shape}"
        )
    kept_before = np.zeros(len(keep) + 1, dtype=np.int64)  # kept rows before each row
    np.cumsum(keep, out=kept_before[1:])
    return kept_before[off], np.flatnonzero(keep)


def cover_rows(cand_items: ArrayLike, has_cover: ArrayLike) -> np.ndarray:
    """(T,) bool: whether each candidate's news has a cover; has_cover (N,) indexed by cand_items."""
    items = np.asarray(cand_items)
    cover = np.asarray(has_cover, dtype=bool)
    if len(items) and (items.min() < 0 or items.max() >= len(cover)):
        raise ValueError(
            f"cand_items must index has_cover (N = {len(cover)} news), got rows "
            f"{int(items.min())}..{int(items.max())}"
        )
    return cover[items]


def slice_metrics(
    offsets: ArrayLike,
    labels: ArrayLike,
    runs: Mapping[str, ArrayLike],
    reference: str,
    *,
    history_lengths: ArrayLike | None = None,
    cand_items: ArrayLike | None = None,
    has_cover: ArrayLike | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, dict[str, dict]]:
    """Every run's metrics on every slice, and its paired difference from `reference`.

    runs: run name -> (T,) scores, or (S, T): the scores of S training seeds. Runs with
    seeds get the two-level bootstrap (seeds, then impressions; `resampled_means`), paired
    with their reference seed by seed (seed i of a run with seed i of its reference: runs of
    one comparison use the same seeds), and a run of one seed (a deterministic baseline) is
    the same for every seed; runs with different numbers of seeds above one cannot be
    paired and raise. Their "value" is the mean over seeds, and each entry lists the seeds'
    own values under "seeds". Slices: "all" (every impression; the same numbers as
    `run_metrics` and `compare_runs`, from one bootstrap for all runs); "history 0",
    "history 1-4", "history 5-19", "history 20+" when `history_lengths` (M,) is given;
    "with cover" and "without cover" when `cand_items` (T,) and `has_cover` (N,) are given.
    Every slice uses `seed`, so slices of equal size share resamples; that is harmless,
    as each slice's interval is read on its own.
    Returns {slice: {run: {"n", "skipped", "metrics": {metric: {"value", "lo", "hi"}},
    "delta": {metric: {"diff", "lo", "hi", "p"}} or None for the reference}}}: "n" counts
    the slice's scored impressions, "skipped" those of the slice left without a click or a
    non-click. An empty slice has n = 0 and NaN values; a slice of fewer than
    MIN_INTERVAL_N impressions keeps its point values but has NaN intervals and p.
    """
    if reference not in runs:
        raise ValueError(f"reference run {reference!r} is not among the runs {sorted(runs)}")
    if (cand_items is None) != (has_cover is None):
        raise ValueError("the cover slices need both cand_items and has_cover")
    off = np.asarray(offsets)
    lab = np.asarray(labels)
    runs = {name: _seed_rows(s, name) for name, s in runs.items()}
    counts = sorted({len(s) for s in runs.values()} - {1})
    if len(counts) > 1:
        raise ValueError(f"runs have different numbers of seeds {counts}; pairing by seed needs the same seeds")
    full = {name: [per_impression(off, lab, row) for row in s] for name, s in runs.items()}
    everyone = np.ones(len(off) - 1, dtype=bool)
    out = {"all": _slice_summary(full, everyone, reference, n_boot, seed, level)}
    if history_lengths is not None:
        lengths = np.asarray(history_lengths)
        if len(lengths) != len(off) - 1:
            raise ValueError(f"history_lengths has {len(lengths)} entries for {len(off) - 1} impressions")
        for name, mask in history_slices(lengths).items():
            out[f"history {name}"] = _slice_summary(full, mask, reference, n_boot, seed, level)
    if cand_items is not None:
        has = cover_rows(cand_items, has_cover)
        if len(has) != len(lab):
            raise ValueError(f"cand_items has {len(has)} rows for {len(lab)} labels")
        for name, keep_rows in zip(COVER_SLICES, (has, ~has)):
            new_off, rows = slice_candidates(off, keep_rows)
            sliced = {run: [per_impression(new_off, lab[rows], row[rows]) for row in s] for run, s in runs.items()}
            out[name] = _slice_summary(sliced, everyone, reference, n_boot, seed, level)
    return out


def _seed_rows(scores: ArrayLike, name: str) -> np.ndarray:
    """(S, T) scores of a run: one row per seed."""
    arr = np.asarray(scores, dtype=np.float64)
    if arr.ndim == 1:
        return arr[None]
    if arr.ndim != 2 or arr.shape[0] == 0:
        raise ValueError(f"run {name!r}: scores must be (T,) or (S seeds, T), got shape {arr.shape}")
    return arr


def _slice_summary(
    per: Mapping[str, Sequence[ImpressionMetrics]], mask: np.ndarray, reference: str,
    n_boot: int, seed: int, level: float,
) -> dict[str, dict]:
    """All runs of one slice in one bootstrap: their values, then their differences."""
    keep = mask.copy()
    for p in per.values():
        keep &= p[0].valid  # the same for every run and seed: validity depends on labels only
    names = list(per)
    others = [n for n in names if n != reference]
    seeds = max(len(p) for p in per.values())
    values = {n: np.stack([metric_matrix(p)[keep] for p in per[n]]) for n in names}  # (S_n, M', 4) each
    columns = [values[n] for n in names] + [values[n] - values[reference] for n in others]
    stacked = np.concatenate([np.broadcast_to(c, (seeds, *c.shape[1:])) for c in columns], axis=2)  # (S, M', K)
    r = interval(stacked, n_boot, level, seed)  # K = 4 (R + R - 1)
    n = int(np.count_nonzero(keep))
    if 0 < n < MIN_INTERVAL_N:  # a percentile interval over a handful of impressions means nothing
        nan = np.full_like(r.point, np.nan)
        r = Interval(point=r.point, lo=nan, hi=nan, p=nan)
    k = len(METRICS)
    skipped = int(np.count_nonzero(mask & ~per[reference][0].valid))
    out = {}
    for i, name in enumerate(names):
        entry = {
            "n": n,
            "skipped": skipped,
            "metrics": {m: _value_entry(r, i * k + j) for j, m in enumerate(METRICS)},
            "delta": None,
        }
        if len(values[name]) > 1:
            by_seed = values[name].mean(axis=1) if n else np.full((len(values[name]), k), np.nan)  # (S, 4)
            entry["seeds"] = [{m: float(v[j]) for j, m in enumerate(METRICS)} for v in by_seed]
        if name != reference:
            base = (len(names) + others.index(name)) * k
            entry["delta"] = {m: _delta_entry(r, base + j) for j, m in enumerate(METRICS)}
        out[name] = entry
    return out


def _one_blas_thread() -> contextlib.AbstractContextManager:
    """Limit BLAS to one thread while resampling, where threadpoolctl is installed.

    These products are short and wide; threaded OpenBLAS ran them 2x to 20x SLOWER than
    one thread on a 2-core machine busy with other work (measured: 20k impressions x 1000
    resamples x 36 statistics, 8.8 s against 0.4 s). Without threadpoolctl (it comes with
    scikit-learn) the results are the same, only slower there.
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def _value_entry(r: Interval, j: int) -> dict[str, float]:
    return {"value": float(r.point[j]), "lo": float(r.lo[j]), "hi": float(r.hi[j])}


def _delta_entry(r: Interval, j: int) -> dict[str, float]:
    return {"diff": float(r.point[j]), "lo": float(r.lo[j]), "hi": float(r.hi[j]), "p": float(r.p[j])}


def _vector(x: ArrayLike, what: str) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{what} must be 1-D (one value per impression), got shape {arr.shape}")
    return arr


def _check_level(level: float) -> None:
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must lie strictly between 0 and 1, got {level}")


def _check_n_boot(n_boot: int) -> None:
    if int(n_boot) != n_boot or n_boot < 1:
        raise ValueError(f"n_boot must be a positive integer, got {n_boot}")
