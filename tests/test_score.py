"""The leaderboard files (storage.submission) and the scorer command line (flows.score)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from flows import score
from rankers.metrics import evaluate, ranks_from_scores
from storage.errors import DataFormatError, PipelineError, run_cli
from storage.submission import (
    read_prediction,
    read_truth,
    read_values,
    write_prediction,
    write_truth,
    write_values,
)

REPO = Path(__file__).resolve().parents[1]

# Three impressions with real-looking ids (not line numbers): 3, 2 and 4 candidates.
IDS = [101, 205, 309]
OFFSETS = [0, 3, 5, 9]
LABELS = [1, 0, 0, 0, 1, 0, 1, 1, 0]
GOOD = "101 [1,2,3]\n205 [2,1]\n309 [4,1,2,3]\n"


@pytest.fixture
def truth_path(tmp_path: Path) -> Path:
    path = tmp_path / "truth.txt"
    write_truth(path, IDS, OFFSETS, LABELS)
    return path


def run_main(argv: list[str], capsys) -> tuple[int, str, str]:
    """Run the scorer in-process as `python -m flows.score` would: exit code, stdout, stderr."""
    with pytest.raises(SystemExit) as exit_info:
        run_cli(score.main, argv)
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def run_cli_process(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.score", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=60)


def test_files_use_the_official_layout(tmp_path: Path, truth_path: Path):
    assert truth_path.read_text() == "101 [1,0,0]\n205 [0,1]\n309 [0,1,1,0]\n"
    write_prediction(tmp_path / "p.txt", IDS, OFFSETS, [1, 2, 3, 2, 1, 4, 1, 2, 3])
    assert (tmp_path / "p.txt").read_text() == GOOD


def test_truth_round_trip_and_lenient_spacing(tmp_path: Path, truth_path: Path):
    truth = read_truth(truth_path)
    assert truth.ids.tolist() == ["101", "205", "309"]
    assert truth.offsets.tolist() == OFFSETS
    assert truth.labels.tolist() == LABELS
    spaced = tmp_path / "spaced.txt"
    spaced.write_bytes(b"101 [1, 0, 0]\r\n205  [ 0 , 1 ]\r\n309 [0,1,1,0]\r\n\r\n")
    again = read_truth(spaced)
    assert again.ids.tolist() == truth.ids.tolist()
    assert again.labels.tolist() == LABELS


def test_values_round_trip_is_deterministic(tmp_path: Path):
    values = [0.5, -0.0, 1 / 3, 2.0, 1e-9]
    path = tmp_path / "click_probs.txt"
    write_values(path, ["a1", "b2"], [0, 3, 5], values)
    assert path.read_text() == "a1 [0.500000,0.000000,0.333333]\nb2 [2.000000,0.000000]\n"
    back = read_values(path)
    assert back.ids.tolist() == ["a1", "b2"]
    assert back.offsets.tolist() == [0, 3, 5]
    np.testing.assert_allclose(back.values, values, atol=5e-7)
    write_values(path, ["a1"], [0, 1], [0.25], decimals=2)
    assert path.read_text() == "a1 [0.25]\n"


def test_empty_lists_are_allowed_in_values(tmp_path: Path):
    path = tmp_path / "v.txt"
    path.write_text("x []\ny [1.5]\n")
    assert read_values(path).offsets.tolist() == [0, 0, 1]


def test_writers_refuse_bad_ranks_and_ids(tmp_path: Path):
    with pytest.raises(ValueError, match="not a permutation"):
        write_prediction(tmp_path / "p.txt", IDS, OFFSETS, [1, 1, 3, 2, 1, 4, 1, 2, 3])
    with pytest.raises(ValueError, match="without whitespace"):
        write_truth(tmp_path / "t.txt", ["a b"], [0, 1], [1])
    with pytest.raises(ValueError, match="finite"):
        write_values(tmp_path / "v.txt", ["a"], [0, 1], [np.inf])


# Each malformed prediction against the 3-impression truth, and the line to report.
MALFORMED = {
    "id mismatch": ("101 [1,2,3]\n999 [2,1]\n309 [4,1,2,3]\n", 2, "impression id 999"),
    "wrong number of ranks": ("101 [1,2,3]\n205 [2,1]\n309 [1,2,3]\n", 3, "has 3 ranks but 4"),
    "repeated rank": ("101 [1,1,3]\n205 [2,1]\n309 [4,1,2,3]\n", 1, "rank 1 appears 2 times"),
    "rank out of range": ("101 [1,2,3]\n205 [0,1]\n309 [4,1,2,3]\n", 2, "rank 0 is outside 1..2"),
    "missing lines": ("101 [1,2,3]\n205 [2,1]\n", 3, "missing lines"),
    "extra lines": (GOOD + "400 [1]\n", 4, "extra line"),
    "unparsable line": ("101 [1,2,3]\n205 2,1\n309 [4,1,2,3]\n", 2, "cannot parse"),
    "unparsable list": ("101 [1,2,3]\n205 [2,x]\n309 [4,1,2,3]\n", 2, "cannot parse the list"),
    "trailing comma": ("101 [1,2,3]\n205 [2,1,]\n309 [4,1,2,3]\n", 2, "cannot parse the list"),
    "blank line inside": ("101 [1,2,3]\n\n205 [2,1]\n309 [4,1,2,3]\n", 2, "empty line"),
    "empty file": ("", 1, "empty"),
    # Two problems: the earlier line wins.
    "earliest problem": ("101 [1,2,3]\n999 [2,1]\nnonsense\n", 2, "impression id 999"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_prediction_names_the_line(case, tmp_path: Path, truth_path: Path, capsys):
    text, line, words = MALFORMED[case]
    pred = tmp_path / "prediction.txt"
    pred.write_text(text)
    with pytest.raises(DataFormatError) as err:
        read_prediction(pred, read_truth(truth_path))
    assert err.value.line == line
    assert words in err.value.message

    code, out, stderr = run_main([str(truth_path), str(pred)], capsys)
    assert code == 1
    assert out == ""
    assert f"{pred}: line {line}: " in stderr
    assert "Traceback" not in stderr


@pytest.mark.parametrize("case", ["id mismatch", "empty file"])
def test_malformed_prediction_from_the_command_line(case, tmp_path: Path, truth_path: Path):
    text, line, words = MALFORMED[case]
    pred = tmp_path / "prediction.txt"
    pred.write_text(text)
    proc = run_cli_process(str(truth_path), str(pred))
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert f"line {line}: " in proc.stderr and words in proc.stderr
    assert "Traceback" not in proc.stderr


# A masked truth impression (`[]`) between the three of TRUTH: the official scorer skips its
# prediction line without reading it, so a real submission that ranks it must score.
MASKED_TRUTH = "101 [1,0,0]\n150 []\n205 [0,1]\n309 [0,1,1,0]\n"


@pytest.mark.parametrize("masked_line", ["150 [3,1,2]", "150 []", "150 [x, y", "150 [1,1]", "150"])
def test_masked_truth_lines_are_skipped_whatever_the_prediction_ranks(masked_line, tmp_path: Path, capsys):
    truth, pred = tmp_path / "truth.txt", tmp_path / "prediction.txt"
    truth.write_text(MASKED_TRUTH)
    pred.write_text(f"101 [1,2,3]\n{masked_line}\n205 [2,1]\n309 [4,1,2,3]\n")
    ranks = read_prediction(pred, read_truth(truth))
    assert ranks.tolist() == [1, 2, 3, 2, 1, 4, 1, 2, 3]
    expected = evaluate(OFFSETS, LABELS, -ranks.astype(np.float64))  # the three unmasked impressions
    assert score.score_files(truth, pred) == pytest.approx({**expected, "masked": 1}, abs=1e-12)
    code, out, _ = run_main([str(truth), str(pred)], capsys)
    assert code == 0 and "impressions scored: 3 (skipped: 0 without a click, 0 without a non-click, 1 masked)" in out


def test_a_masked_line_still_needs_its_id(tmp_path: Path):
    truth, pred = tmp_path / "truth.txt", tmp_path / "prediction.txt"
    truth.write_text(MASKED_TRUTH)
    pred.write_text("101 [1,2,3]\n999 [3,1,2]\n205 [2,1]\n309 [4,1,2,3]\n")
    with pytest.raises(DataFormatError) as err:
        read_prediction(pred, read_truth(truth))
    assert err.value.line == 2 and "impression id 999 where the truth file has 150" in err.value.message
    pred.write_text("101 [1,2,3]\n")  # and its line, like any other
    with pytest.raises(DataFormatError, match="missing lines"):
        read_prediction(pred, read_truth(truth))


@pytest.mark.parametrize("text, line, words", [
    ("101 [1,0,0]\n205 [0,2]\n", 2, "label 2 is not 0 or 1"),
    ("101 [1,0,0]\n101 [0,1]\n", 2, "already appeared at line 1"),
    ("101 [1,0,0]\n205 [0,1\n", 2, "cannot parse"),
])
def test_malformed_truth_names_the_line(text, line, words, tmp_path: Path, capsys):
    truth = tmp_path / "truth.txt"
    truth.write_text(text)
    code, _, stderr = run_main([str(truth), str(tmp_path / "unused.txt")], capsys)
    assert code == 1
    assert f"{truth}: line {line}: " in stderr and words in stderr


def test_missing_file_is_a_clear_error(tmp_path: Path, truth_path: Path, capsys):
    code, _, stderr = run_main([str(truth_path), str(tmp_path / "nope.txt")], capsys)
    assert code == 1
    assert "nope.txt: no such file" in stderr
    proc = run_cli_process(str(tmp_path / "missing-truth.txt"), str(truth_path))
    assert proc.returncode == 1 and "missing-truth.txt: no such file" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_truth_without_anything_to_score(tmp_path: Path, capsys):
    truth, pred = tmp_path / "t.txt", tmp_path / "p.txt"
    truth.write_text("1 [0,0]\n2 [1]\n")
    pred.write_text("1 [1,2]\n2 [1]\n")
    code, _, stderr = run_main([str(truth), str(pred)], capsys)
    assert code == 1 and "nothing to score" in stderr


def test_json_output_has_exactly_the_five_keys(tmp_path: Path, truth_path: Path, capsys):
    pred = tmp_path / "prediction.txt"
    pred.write_text(GOOD)
    code, out, _ = run_main([str(truth_path), str(pred), "--json"], capsys)
    assert code == 0
    assert out.count("\n") == 1
    result = json.loads(out)
    assert list(result) == ["auc", "mrr", "ndcg@5", "ndcg@10", "impressions"]
    # Impression 101: click ranked 1 -> all 1. Impression 205: click ranked 1 -> all 1.
    # Impression 309: clicks ranked 1 and 2 (a perfect order): AUC 1, nDCG 1,
    # MRR (1/1 + 1/2)/2 = 0.75. Means: MRR (1 + 1 + 0.75)/3 = 0.9166...
    assert result["impressions"] == 3
    assert result["auc"] == result["ndcg@5"] == result["ndcg@10"] == 1.0
    assert result["mrr"] == pytest.approx(2.75 / 3)


def test_table_output(tmp_path: Path, truth_path: Path, capsys):
    pred = tmp_path / "prediction.txt"
    pred.write_text(GOOD)
    code, out, _ = run_main([str(truth_path), str(pred)], capsys)
    assert code == 0
    assert "AUC" in out and "nDCG@10" in out
    assert "impressions scored: 3 (skipped: 0 without a click, 0 without a non-click)" in out


def test_help_explains_the_formats(capsys):
    with pytest.raises(SystemExit) as exit_info:
        score.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--json" in out and "[r1,r2,...]" in out and "1 = best" in out


@pytest.mark.parametrize("seed", range(6))
def test_round_trip_scores_to_ranks_to_file_to_scorer(seed, tmp_path: Path, capsys):
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 25, 40)  # includes impressions of 1 and 2 candidates
    sizes[:2] = [1, 2]
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    labels = (rng.random(offsets[-1]) < 0.2).astype(np.int8)
    labels[offsets[2:-1]] = 1  # most impressions get a click
    scores = rng.normal(size=offsets[-1])  # tie-free
    ids = rng.choice(10**6, size=len(sizes), replace=False)
    expected = evaluate(offsets, labels, scores)

    truth, pred = tmp_path / "truth.txt", tmp_path / "prediction.txt"
    write_truth(truth, ids, offsets, labels)
    write_prediction(pred, ids, offsets, ranks_from_scores(offsets, scores))
    code, out, _ = run_main([str(truth), str(pred), "--json"], capsys)
    assert code == 0
    result = json.loads(out)
    for key in ("auc", "mrr", "ndcg@5", "ndcg@10"):
        assert result[key] == pytest.approx(expected[key], abs=1e-9)
    assert result["impressions"] == expected["impressions"]
    assert score.score_files(truth, pred) == pytest.approx({**expected, "masked": 0}, abs=1e-9)


def test_scorer_imports_neither_prefect_nor_torch():
    code = ("import sys, flows.score; "
            "print(sorted(m for m in ('prefect', 'torch') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_scorer_errors_are_pipeline_errors(tmp_path: Path, truth_path: Path):
    # Callers other than the CLI get the structured error, with the line kept.
    pred = tmp_path / "prediction.txt"
    pred.write_text("101 [1,2,3]\n")
    with pytest.raises(PipelineError) as err:
        score.score_files(truth_path, pred)
    assert isinstance(err.value, DataFormatError) and err.value.line == 2
