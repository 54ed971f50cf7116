"""Score a leaderboard prediction file against a truth file with the official MIND metrics.

    python -m flows.score TRUTH PREDICTION [--json]

Prints AUC, MRR, nDCG@5 and nDCG@10 (per impression, then the mean; see
`rankers.metrics`) and how many impressions were scored and skipped. With `--json` it
prints exactly one line, `{"auc": .., "mrr": .., "ndcg@5": .., "ndcg@10": .., "impressions": ..}`.

Where it agrees with the official `evaluate.py`: the metrics and their plain mean over
impressions, and masked truth lines (`<id> []`), which are skipped whatever their prediction
line holds. Where it is stricter, by our choice: an impression without a click or without a
non-click is skipped and counted (the official scorer gives NaN for it, or fails); the
prediction must have exactly one line per truth impression with the truth's ids in the truth's
order (the official one checks ids, fills missing lines with rank 1 and ignores extra lines);
ranks must be a permutation of 1..n (the official one does not check); a masked impression's
prediction line must still carry its id (the official one does not read that line at all).

A malformed file exits with code 1 and one line on stderr, `error: PATH: line N: what is
wrong and what to do`. This is a plain command line: it imports numpy and the readers only
(no Prefect, no torch), so it starts fast.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from rankers.metrics import evaluate
from storage.errors import DataFormatError, PipelineError, run_cli
from storage.submission import read_prediction, read_truth

JSON_KEYS = ("auc", "mrr", "ndcg@5", "ndcg@10", "impressions")


def score_files(truth_path: str | Path, prediction_path: str | Path) -> dict[str, float | int]:
    """`rankers.metrics.evaluate` of a prediction file (its metrics and skipped counts) plus
    "masked", the number of masked truth impressions left out.

    Raises PipelineError (DataFormatError for a malformed line) on bad input.
    """
    truth = read_truth(truth_path)
    ranks = read_prediction(prediction_path, truth)  # (T,) 1 = best
    sizes = np.diff(truth.offsets)  # (M,)
    # Masked impressions (`[]`) own no rows: dropping their offsets leaves every row in place.
    offsets = np.concatenate([[0], truth.offsets[1:][sizes > 0]])  # (M'+1,)
    masked = int(np.count_nonzero(sizes == 0))
    seen = np.concatenate([[0], np.cumsum(truth.labels, dtype=np.int64)])  # (T+1,)
    n_click = seen[offsets[1:]] - seen[offsets[:-1]]  # (M',)
    if not ((n_click > 0) & (n_click < np.diff(offsets))).any():
        raise PipelineError(
            f"{truth_path}: no impression has both a click and a non-click, so there is "
            "nothing to score; is this the truth file?"
        )
    # A rank is a score with the best candidate highest; ranks are distinct, so the tie
    # rule never applies and AUC equals that of the scores the ranks came from.
    return {**evaluate(offsets, truth.labels, -ranks.astype(np.float64)), "masked": masked}


def format_table(result: dict[str, float | int]) -> str:
    """The metrics as a small aligned table, then the impression counts."""
    rows = [("AUC", result["auc"]), ("MRR", result["mrr"]),
            ("nDCG@5", result["ndcg@5"]), ("nDCG@10", result["ndcg@10"])]
    lines = [f"{'metric':<8}  {'value':>6}"]
    lines += [f"{name:<8}  {value:.4f}" for name, value in rows]
    lines.append(
        f"impressions scored: {result['impressions']} (skipped: "
        f"{result['skipped_no_click']} without a click, "
        f"{result['skipped_no_nonclick']} without a non-click"
        + (f", {result['masked']} masked" if result.get("masked") else "") + ")"
    )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m flows.score",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Score a MIND leaderboard prediction against the truth: AUC, MRR, nDCG@5 and\n"
            "nDCG@10 per impression, then the mean over the impressions that have both a\n"
            "click and a non-click (the others are skipped and counted; the official scorer\n"
            "gives NaN for them). Masked truth lines '<id> []' are skipped as the official\n"
            "scorer skips them: the ranks on their prediction line are not read (its id is\n"
            "still checked, which the official scorer does not do)."
        ),
        epilog=(
            "formats, one line per impression:\n"
            "  truth       <impression_id> [l1,l2,...]   0/1 labels\n"
            "  prediction  <impression_id> [r1,r2,...]   each candidate's rank, 1 = best,\n"
            "              in the original candidate order, lines in the truth file's order\n"
            "\n"
            "A malformed file exits with code 1 and 'error: PATH: line N: ...' on stderr."
        ),
    )
    parser.add_argument("truth", type=Path, help="truth file, e.g. truth.txt")
    parser.add_argument("prediction", type=Path, help="prediction file, e.g. prediction.txt")
    parser.add_argument(
        "--json", action="store_true",
        help='print one JSON line {"auc", "mrr", "ndcg@5", "ndcg@10", "impressions"} instead '
        "of the table",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = score_files(args.truth, args.prediction)
    except DataFormatError as err:
        # Scorer messages name the line in words: "PATH: line N: ...".
        where = f"{err.path}: line {err.line}" if err.line is not None else err.path
        raise PipelineError(f"{where}: {err.message}") from None
    if args.json:
        print(json.dumps({key: result[key] for key in JSON_KEYS}))
    else:
        print(format_table(result))
    return 0


if __name__ == "__main__":
    run_cli(main)
