"""Benchmark the MIND metrics and the scorer at MIND-small dev size.

    .venv/bin/python benchmarks/score.py [--impressions 73152] [--seed 0] [--loop-limit 60]

Builds M impressions with random candidate counts (mean about 37, at least 2), about 4%
clicks with at least one per impression, and random float scores (T about 2.7M rows). It
times, in one run:
- `rankers.metrics.evaluate` (vectorised), first call and median of repeats;
- a Python loop of `reference_metrics` over impressions (the plain per-impression way),
  on all impressions, or on a prefix extrapolated linearly when the full loop would take
  longer than --loop-limit seconds (the output says which);
- `ranks_from_scores`, `write_truth`, `write_prediction`, and scoring the files through
  `flows.score.score_files` (read truth, read prediction, evaluate), the CLI's code path,
  and the whole `python -m flows.score --json` process.
It checks that the vectorised and the reference values agree to 1e-9 and that both file
paths reproduce `evaluate` on the scores, then prints a table and the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from flows.score import score_files
from rankers.metrics import evaluate, per_impression, ranks_from_scores, reference_metrics
from storage.submission import write_prediction, write_truth

KEYS = ("auc", "mrr", "ndcg@5", "ndcg@10")
REPO = Path(__file__).resolve().parents[1]


def make_data(m: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(M,) ids, (M+1,) offsets, (T,) labels, (T,) scores shaped like MIND-small dev."""
    rng = np.random.default_rng(seed)
    sizes = np.maximum(2, rng.geometric(1 / 36, m))  # (M,) long tail like MIND
    offsets = np.zeros(m + 1, dtype=np.int64)
    np.cumsum(sizes, out=offsets[1:])
    t = int(offsets[-1])
    labels = (rng.random(t) < 0.015).astype(np.int8)  # (T,)
    # Every labeled MIND impression has a click: add one where there is none, which
    # lifts the click rate to about 4%.
    labels[rng.integers(offsets[:-1], offsets[1:])] = 1
    scores = rng.random(t)  # (T,) distinct with overwhelming probability
    ids = np.arange(1, m + 1) * 7 + 100  # real-looking ids, not line numbers
    return ids, offsets, labels, scores


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--impressions", type=int, default=73152)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--loop-limit", type=float, default=60.0,
                        help="seconds the reference loop may take before it is extrapolated")
    args = parser.parse_args()

    ids, offsets, labels, scores = make_data(args.impressions, args.seed)
    m, t = len(ids), len(scores)
    print(f"data: {m} impressions, {t} candidate rows (mean {t / m:.1f}), "
          f"{labels.mean():.2%} clicks, seed {args.seed}")

    first, result = timed(evaluate, offsets, labels, scores)
    runs = [timed(evaluate, offsets, labels, scores)[0] for _ in range(args.repeats)]
    vec = statistics.median(runs)
    per = per_impression(offsets, labels, scores)
    sort_s, by_sort = timed(per_impression, offsets, labels, scores, method="sort")
    sort_diff = max(float(np.abs(getattr(by_sort, f) - getattr(per, f)).max())
                    for f in ("auc", "mrr", "ndcg5", "ndcg10"))

    # Time the loop on a prefix first, then on everything if that fits in --loop-limit.
    probe = min(m, 2000)
    probe_s, _ = timed(_reference_loop, offsets, labels, scores, probe)
    if probe_s * m / probe <= args.loop_limit:
        loop_s, ref = timed(_reference_loop, offsets, labels, scores, m)
        loop_note = f"all {m} impressions"
    else:
        n = max(probe, int(m * args.loop_limit / 4 / (probe_s * m / probe)))
        part_s, ref = timed(_reference_loop, offsets, labels, scores, n)
        loop_s = part_s * m / n
        loop_note = f"EXTRAPOLATED linearly from {n} impressions ({part_s:.2f} s)"
    worst = _max_difference(per, ref)

    ranks_s, ranks = timed(ranks_from_scores, offsets, scores)
    with tempfile.TemporaryDirectory() as tmp:
        truth_path, pred_path = Path(tmp, "truth.txt"), Path(tmp, "prediction.txt")
        truth_w, _ = timed(write_truth, truth_path, ids, offsets, labels)
        pred_w, _ = timed(write_prediction, pred_path, ids, offsets, ranks)
        file_s, from_files = timed(score_files, truth_path, pred_path)
        size_mb = pred_path.stat().st_size / 1e6
        command = [sys.executable, "-m", "flows.score", str(truth_path), str(pred_path), "--json"]
        cli_s, proc = timed(subprocess.run, command, capture_output=True, text=True, cwd=REPO,
                            check=True)
        from_cli = json.loads(proc.stdout)
    file_diff = max(abs(src[k] - result[k]) for src in (from_files, from_cli) for k in KEYS)

    print(f"\nagreement: max |vectorised - reference| over {len(ref)} impressions = "
          f"{worst:.2e} (must be < 1e-9); files and CLI vs evaluate = {file_diff:.2e}")
    print("metrics: " + ", ".join(f"{k} {result[k]:.4f}" for k in KEYS)
          + " (random scores: AUC near 0.5)")
    print()
    rows = [
        ("evaluate (vectorised), median", vec,
         f"{args.repeats} repeats; first call {first:.3f} s"),
        ("per_impression, method='sort'", sort_s,
         f"the dense-click fallback; diff {sort_diff:.1e}"),
        ("reference_metrics loop", loop_s, loop_note),
        ("speed-up, loop / evaluate", None,
         f"{loop_s / vec:.1f}x (first call: {loop_s / first:.1f}x)"),
        ("ranks_from_scores", ranks_s, "lexsort of all rows"),
        ("write_truth", truth_w, ""),
        ("write_prediction", pred_w, f"{size_mb:.1f} MB"),
        ("flows.score.score_files", file_s, "read truth + prediction, evaluate"),
        ("python -m flows.score --json", cli_s, "whole process, interpreter start included"),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"{'step':<{width}}  {'seconds':>8}  note")
    for name, secs, note in rows:
        shown = f"{secs:8.3f}" if secs is not None else " " * 8
        print(f"{name:<{width}}  {shown}  {note}")
    print(f"\nmachine: {platform.platform()}, {platform.machine()}, {os.cpu_count()} CPUs, "
          f"Python {platform.python_version()}, numpy {np.__version__}")
    if worst >= 1e-9 or file_diff >= 1e-9 or sort_diff >= 1e-9:
        sys.exit("FAILED: the vectorised metrics disagree with the reference")


def _reference_loop(offsets: np.ndarray, labels: np.ndarray, scores: np.ndarray,
                    n: int) -> list[dict[str, float] | None]:
    return [reference_metrics(labels[offsets[i]:offsets[i + 1]],
                              scores[offsets[i]:offsets[i + 1]]) for i in range(n)]


def _max_difference(per, ref: list[dict[str, float] | None]) -> float:
    worst = 0.0
    for i, r in enumerate(ref):
        if (r is not None) != bool(per.valid[i]):
            return float("inf")
        if r is not None:
            got = (per.auc[i], per.mrr[i], per.ndcg5[i], per.ndcg10[i])
            worst = max(worst, *(abs(a - r[k]) for a, k in zip(got, KEYS)))
    return worst


if __name__ == "__main__":
    main()
