"""`flows.compare --preset`: what each preset plans (runs, pairings, hyperparameters at the
tiny and the published scale, enhanced-title twins), and each preset end to end on the tiny
world, writing its report (zhao2024: its thesis table too)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from runs.compare import ENHANCED, plan
from runs.params import CompareParams
from runs.presets import EXP1, EXP2, EXP3, EXP4, FROZEN_TEXT, PRESETS, PUBLISHED_FINETUNE, TUNED_BERT

ROOT = Path(__file__).resolve().parents[1]



@pytest.fixture(scope="module")
def storage(tmp_path_factory) -> Path:
    """One storage root for the module's flows: stores, and fine-tuned runs the presets share
    (the same settings resume from their finished checkpoints), are made once."""
    return tmp_path_factory.mktemp("presets")


def _by_label(runs):
    return {r.label: r for r in runs}


# ---------------------------------------------------------------------------------------
# Plans


def test_zhao2024_plans_the_four_experiments_with_random(tiny_world):
    runs = _by_label(plan(CompareParams(data=tiny_world, preset="zhao2024", text="bert", image="vit", blip="blip"), tiny_world))
    assert list(runs) == [EXP1, EXP2, EXP3, EXP4, FROZEN_TEXT, "random"]
    frozen_blip, frozen_fused, tuned_fused, tuned_text = (runs[e].params for e in (EXP1, EXP2, EXP3, EXP4))
    assert (frozen_blip.fusion, frozen_blip.finetune, frozen_blip.tokens) == ("blip", False, True)
    assert (frozen_fused.fusion, frozen_fused.features, frozen_fused.finetune) == ("hadamard", ["bert", "vit"], False)
    assert (tuned_fused.fusion, tuned_fused.finetune, tuned_text.fusion, tuned_text.finetune) == ("hadamard", True, "text", True)
    assert {k: runs[k].reference for k in runs} == {EXP1: FROZEN_TEXT, EXP2: FROZEN_TEXT, EXP3: EXP4, EXP4: None,
                                                    FROZEN_TEXT: EXP4, "random": None}
    # Tiny checkpoints: flows.rank's tiny scale, not the published settings.
    assert tuned_text.lr is None and tuned_text.accumulate is None and tuned_text.epochs == 3


def test_real_checkpoints_get_the_published_hyperparameters(tiny_world, monkeypatch):
    # Planning only: the checkpoints need not exist here (their checks have tests of their own).
    monkeypatch.setattr("runs.params.check_checkpoint", lambda spec: None)
    params = CompareParams(data=tiny_world, preset="plm-nr", text="bert:/models/bert-base-uncased",
                           distil="bert:/models/distilbert-base-uncased", epochs=4, finetune_epochs=2)
    runs = _by_label(plan(params, tiny_world))
    assert list(runs) == ["nrms · bert (frozen)", TUNED_BERT, "plm-nr · distilbert (fine-tuned)",
                          "random", "popularity", "oracle"]
    for label in (TUNED_BERT, "plm-nr · distilbert (fine-tuned)"):
        p = runs[label].params
        assert (p.lr, p.encoder_lr, p.accumulate) == (PUBLISHED_FINETUNE["lr"], PUBLISHED_FINETUNE["encoder_lr"],
                                                      PUBLISHED_FINETUNE["accumulate"])
        assert p.epochs == 2 and runs[label].reference == "nrms · bert (frozen)"
    assert runs["plm-nr · distilbert (fine-tuned)"].params.features == ["bert:/models/distilbert-base-uncased"]
    frozen = runs["nrms · bert (frozen)"].params
    assert frozen.epochs == 4 and frozen.tokens and not frozen.finetune
    # Without --distil the DistilBERT run is left out.
    assert "plm-nr · distilbert (fine-tuned)" not in _by_label(plan(CompareParams(data=tiny_world, preset="plm-nr", text="bert", image="vit", blip="blip"),
                                                                    tiny_world))


def test_mtrec_plans_each_ablation(tiny_world):
    runs = _by_label(plan(CompareParams(data=tiny_world, preset="mtrec", baselines=[], text="bert", image="vit", blip="blip"), tiny_world))
    switches = {label: (r.params.mtrec, r.params.category, r.params.ner, r.params.surgery) for label, r in runs.items()}
    assert switches == {
        TUNED_BERT: (False, True, True, True),
        "mtrec": (True, True, True, True),
        "mtrec without category": (True, False, True, True),
        "mtrec without ner": (True, True, False, True),
        "mtrec without surgery": (True, True, True, False),
    }
    assert all(r.reference in (None, TUNED_BERT) and r.params.finetune for r in runs.values())


def test_titles_add_a_paired_twin_of_every_run_that_reads_titles(tiny_world, tmp_path):
    titles = tmp_path / "titles.tsv"
    titles.touch()
    params = CompareParams(data=tiny_world, rankers=["lightgbm"], sources=["text", "image", "hadamard"], text="bert", image="vit", blip="blip", 
                           baselines=["random"], titles=titles)
    runs = _by_label(plan(params, tiny_world))
    assert list(runs) == ["lightgbm · text", "lightgbm · image", "lightgbm · text+image (hadamard)", "random",
                          "lightgbm · text" + ENHANCED, "lightgbm · text+image (hadamard)" + ENHANCED]
    twin = runs["lightgbm · text+image (hadamard)" + ENHANCED]
    assert twin.reference == "lightgbm · text+image (hadamard)" and twin.params.titles == titles
    assert runs["lightgbm · text"].params.titles is None


def test_preset_cli_errors_are_one_line(tmp_path):
    env = {**os.environ, "MMNEWS_STORAGE": str(tmp_path)}
    for args, expected in ((["--preset", "mtrec", "--sources", "text"], "defines its own runs"),
                           (["--preset", "nope"], "invalid choice"),
                           (["--distil", "bert"], "--distil is the DistilBERT of --preset plm-nr")):
        done = subprocess.run([sys.executable, "-m", "flows.compare", *args], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode != 0 and "Traceback" not in done.stderr and expected in done.stderr, done.stderr


# ---------------------------------------------------------------------------------------
# End to end on the tiny world


def _run(tiny_world, storage, preset: str, **options) -> tuple[Path, dict]:
    from flows.compare import build_flow

    # jobs=1: one run at a time, in this process (the suite's other worker has the other core).
    params = CompareParams(data=tiny_world, preset=preset, storage=storage, epochs=1, finetune_epochs=1, n_boot=200, jobs=1,
                           **{"text": "bert", "image": "vit", "blip": "blip", **options},
                           name=preset, progress=False)
    result = build_flow()(params)
    folder = Path(result["folder"])
    for name in ("report.md", "report.html", "metrics.json", "metrics.png"):
        assert (folder / name).is_file() and (folder / name).stat().st_size > 0, name
    return folder, json.loads((folder / "metrics.json").read_text())


def test_plm_nr_preset_end_to_end(tiny_world, storage, prefect_harness):
    folder, report = _run(tiny_world, storage, "plm-nr")
    names = [r["name"] for r in report["runs"]]
    assert names == ["nrms · bert (frozen)", TUNED_BERT, "random", "popularity", "oracle"]
    tuned = report["runs"][1]
    assert tuned["ranker"] == "plm-nr" and tuned["sources"] == ["text (fine-tuned)"]
    assert report["references"][TUNED_BERT] == "nrms · bert (frozen)"
    assert any("Not run: plm-nr · distilbert" in n for n in report["notes"])
    markdown = (folder / "report.md").read_text()
    assert "NRMS + BERT-base (published, MIND-small dev)" in markdown  # the published row of the thesis table


def test_mtrec_preset_end_to_end(tiny_world, storage, prefect_harness):
    _, report = _run(tiny_world, storage, "mtrec", baselines=["random"])
    runs = {r["name"]: r for r in report["runs"]}
    assert list(runs) == [r.label for r in PRESETS["mtrec"].runs] + ["random"]
    assert runs["mtrec without surgery"]["ranker"] == "mtrec" and runs[TUNED_BERT]["ranker"] == "plm-nr"
    assert {report["references"][k] for k in runs if k.startswith("mtrec")} == {TUNED_BERT}
    assert all(report["paired"][k]["auc"]["lo"] <= report["paired"][k]["auc"]["diff"] <= report["paired"][k]["auc"]["hi"]
               for k in runs if k != TUNED_BERT)


@pytest.mark.slow
def test_zhao2024_preset_writes_the_thesis_table(tiny_world, storage, prefect_harness):
    folder, report = _run(tiny_world, storage, "zhao2024")
    assert [r["name"] for r in report["runs"]] == [EXP1, EXP2, EXP3, EXP4, FROZEN_TEXT, "random"]
    assert report["reference"] == EXP4 and report["references"][EXP3] == EXP4
    assert report["references"][EXP2] == FROZEN_TEXT
    sources = {r["name"]: r["sources"] for r in report["runs"]}
    assert sources[EXP3] == ["text (fine-tuned)", "image (fine-tuned)"] and sources[EXP2] == ["text", "image"]
    thesis = (folder / "thesis.md").read_text()
    lines = thesis.splitlines()
    assert "| experiment | AUC | MRR | nDCG@5 | nDCG@10 |" in lines
    assert next(i for i, x in enumerate(lines) if x.startswith("| random |")) < \
           next(i for i, x in enumerate(lines) if x.startswith(f"| {EXP1} |"))
    assert f"| {EXP4} (Zhao 2024, MIND-small) | 0.689 | 0.306 | 0.336 | 0.400 |" in lines
    ours = {r["name"]: r for r in report["runs"]}
    auc = ours[EXP3]["metrics"]["auc"]
    assert f"{auc['value']:.3f} [{auc['lo']:.3f}, {auc['hi']:.3f}]" in thesis  # our intervals
    assert "In the format of the thesis" in (folder / "report.md").read_text()
