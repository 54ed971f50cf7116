"""The rank and compare flows on the tiny world: files, scorer agreement, the report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from runs.params import RankParams
from runs.rank import run_rank
from flows.score import score_files

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def world(tiny_world) -> Path:
    return tiny_world


@pytest.mark.parametrize("ranker, fusion, features", [("lightgbm", "hadamard", ["bert", "vit"]), ("popularity", "text", ["bert"])])
def test_prediction_file_scores_as_reported(world, tmp_path, ranker, fusion, features):
    params = RankParams(data=world, ranker=ranker, fusion=fusion, features=features, storage=tmp_path, progress=False)
    outcome = run_rank(params)
    folder = Path(outcome.folder)
    for name in ("prediction_dev.txt", "prediction_test.txt", "metrics.json", "run.json"):
        assert (folder / name).is_file(), name
    # The dev truth comes from the world's behaviors; write it in the leaderboard format.
    from rankers.data import load_impressions
    from storage.catalogue import load_catalogue
    from storage.submission import write_truth

    dev = load_impressions(world, "dev", load_catalogue(world))
    write_truth(tmp_path / "truth.txt", dev.impression_ids, dev.cand_offsets, dev.labels)
    scored = score_files(tmp_path / "truth.txt", folder / "prediction_dev.txt")
    for metric in ("auc", "mrr", "ndcg@5", "ndcg@10"):
        assert scored[metric] == pytest.approx(outcome.dev_metrics[metric], abs=1e-12)
    assert scored["impressions"] == outcome.dev_metrics["impressions"]
    record = json.loads((folder / "run.json").read_text())
    assert record["data"]["fingerprint"] and record["seeds"]["ranker"] == 0
    assert record["dev_metrics"]["auc"] == outcome.dev_metrics["auc"]
    # The unlabeled test split gets a prediction with its real impression ids, in order.
    test_ids = [line.split(" ", 1)[0] for line in (folder / "prediction_test.txt").read_text().splitlines()]
    assert test_ids == [str(i) for i in load_impressions(world, "test", load_catalogue(world)).impression_ids]


def test_fusion_without_its_features_is_a_clear_error(world, tmp_path):

    from pydantic import ValidationError

    # Refused when the parameters are validated, before any work.
    with pytest.raises(ValidationError, match="needs features for image; add vit"):
        RankParams(data=world, ranker="lightgbm", fusion="hadamard", features=["bert"], storage=tmp_path, progress=False)


def test_compare_flow_writes_every_report_file(world, tmp_path, prefect_harness):
    from flows.compare import build_flow
    from runs.params import CompareParams

    params = CompareParams(
        data=world, storage=tmp_path, epochs=2, n_boot=200, name="tiny-report", progress=False, text="bert", image="vit", blip="blip",
        sources=["text", "image", "hadamard", "blip"],
        jobs=1,  # one run at a time, in this process: the suite's other worker has the other core
    )
    result = build_flow()(params)
    folder = Path(result["folder"])
    assert folder == tmp_path / "reports" / "tiny-report"
    for name in ("report.md", "report.html", "metrics.json", "metrics.png", "deltas.png"):
        assert (folder / name).is_file() and (folder / name).stat().st_size > 0, name
    report = json.loads((folder / "metrics.json").read_text())
    names = [r["name"] for r in report["runs"]]
    for ranker in ("nrms", "lightgbm"):
        for source in ("text", "image", "text+image (hadamard)", "blip"):
            assert f"{ranker} · {source}" in names
    assert {"random", "popularity", "oracle"} <= set(names)
    assert report["references"]["lightgbm · text+image (hadamard)"] == "lightgbm · text"
    assert report["references"]["nrms · image"] == "nrms · text"
    assert {"history 0", "history 1-4", "history 5-19", "history 20+", "with cover", "without cover"} <= set(report["slices"])
    oracle = next(r for r in report["runs"] if r["name"] == "oracle")
    stored = json.loads((world / "world.json").read_text())["summary"]["dev_metrics"]["oracle"]
    assert oracle["metrics"]["auc"]["value"] == pytest.approx(stored["auc"], abs=1e-6)  # world.json keeps 6 decimals
    assert oracle["oracle_share"] == pytest.approx(1.0)
    assert next(r for r in report["runs"] if r["name"] == "random")["oracle_share"] == pytest.approx(0.0)
    markdown = (folder / "report.md").read_text()
    assert "Do images help?" in markdown and "nrms · text+image (hadamard)" in markdown
    from storage.catalogue import load_catalogue

    share = f"{load_catalogue(world).cover_share:.1%}"  # the report states how many news have a cover
    assert report["dataset"]["cover share"] == share and f"cover share: {share}" in markdown
    assert "share of oracle lift" in markdown


def test_oracle_share_is_the_lift_over_random_relative_to_the_oracle():
    from runs.compare import add_oracle_share

    runs = [{"name": n, "metrics": {"auc": {"value": v}}} for n, v in (("random", 0.5), ("oracle", 0.8), ("a", 0.65))]
    add_oracle_share(runs)
    assert [r["oracle_share"] for r in runs] == pytest.approx([0.0, 1.0, 0.5])
    without = [{"name": "a", "metrics": {"auc": {"value": 0.6}}}]
    add_oracle_share(without)
    assert "oracle_share" not in without[0]


def test_compare_cli_rejects_bad_options(tmp_path):
    env = {**os.environ, "MMNEWS_STORAGE": str(tmp_path)}
    done = subprocess.run([sys.executable, "-m", "flows.compare", "--rankers", "svm"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "Traceback" not in done.stderr and "--rankers" in done.stderr


def test_a_complete_store_is_used_without_building_the_extractor(world, tmp_path, monkeypatch):
    import extractors.registry

    params = RankParams(data=world, ranker="lightgbm", fusion="text", features=["bert"], storage=tmp_path, progress=False)
    first = run_rank(params)

    def no_build(*args, **kwargs):
        raise AssertionError("the extractor was built although its store is complete")

    monkeypatch.setattr(extractors.registry, "create", no_build)
    again = run_rank(params)
    assert again.dev_metrics == first.dev_metrics
    # Asking NRMS for token vectors still finds the store: the flow extracts with tokens.
    tokens = RankParams(data=world, ranker="nrms", fusion="text", features=["bert"], tokens=True, epochs=1,
                        storage=tmp_path, progress=False)
    assert run_rank(tokens).fit["epochs"] == 1
