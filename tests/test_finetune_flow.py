"""`flows.rank --finetune` on the tiny world: the outputs of a frozen run plus checkpoints and
fine-tuned stores, a rerun that resumes from the run folder's checkpoints, LightGBM over a
fine-tuned store, MTRec's ablation switches, enhanced titles, and one-line CLI errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from runs.params import RankParams
from runs.rank import CHECKPOINTS, finetune_config, run_rank
from storage.errors import PipelineError

ROOT = Path(__file__).resolve().parents[1]



@pytest.fixture(scope="module")
def storage(tmp_path_factory) -> Path:
    """One storage root for the module: the fine-tuned store of the first test feeds LightGBM."""
    return tmp_path_factory.mktemp("finetune-flow")


@pytest.fixture(scope="module")
def tuned(tiny_world, storage):
    params = RankParams(data=tiny_world, finetune=True, features=["bert"], epochs=1, storage=storage, progress=False)
    return params, run_rank(params)


def test_finetune_writes_what_a_frozen_run_writes_plus_checkpoints_and_stores(tiny_world, storage, tuned):
    _, outcome = tuned
    folder = Path(outcome.folder)
    assert folder == storage / "models" / "tiny__nrms-finetune__text__bert"
    for name in ("model.safetensors", "config.json", "metrics.json", "prediction_dev.txt", "prediction_test.txt",
                 "scores_dev.npy", "run.json"):
        assert (folder / name).is_file(), name
    assert sorted(p.name for p in (folder / CHECKPOINTS).iterdir() if p.name.startswith("epoch")) == ["epoch-0001"]
    store = storage / "features" / "tiny__bert-tiny__finetuned.h5"
    assert outcome.stores["text"]["path"] == str(store) and store.is_file()
    record = json.loads((folder / "run.json").read_text())
    assert record["finetune"]["config"]["ranker"]["epochs"] == 1
    assert record["finetune"]["config"]["ranker"]["dim"] == 32  # the tiny scale for tiny checkpoints
    assert record["finetune"]["resumed_from_epoch"] == 0
    assert record["stores"]["text"]["mode"] == "finetuned" and len(record["stores"]["text"]["weights_sha256"]) == 64
    assert record["dev_metrics"] == json.loads((folder / "metrics.json").read_text()) == outcome.dev_metrics
    assert 0.0 <= outcome.dev_metrics["auc"] <= 1.0 and outcome.fit["epochs"] == 1


def test_a_rerun_resumes_from_the_run_folders_checkpoints(tiny_world, storage, tuned):
    params, first = tuned
    folder = Path(first.folder)
    # A run killed after its epoch's checkpoint, before its outputs: only checkpoints remain.
    for name in ("model.safetensors", "metrics.json", "run.json", "scores_dev.npy"):
        (folder / name).unlink()
    again = run_rank(params)
    assert again.resumed_from == 1 and again.fit["epochs"] == 1  # nothing left to train
    assert again.dev_metrics == first.dev_metrics and (folder / "model.safetensors").is_file()
    assert json.loads((folder / "run.json").read_text())["finetune"]["resumed_from_epoch"] == 1
    longer = run_rank(params.model_copy(update={"epochs": 2}))
    assert longer.resumed_from == 1 and [row["epoch"] for row in longer.fit["history"]] == [1, 2]
    assert longer.folder == first.folder


def test_lightgbm_reads_the_finetuned_store(tiny_world, storage, tuned):
    params = RankParams(data=tiny_world, ranker="lightgbm", features=["bert@finetuned"], storage=storage, progress=False)
    outcome = run_rank(params)
    assert Path(outcome.folder).name == "tiny__lightgbm__text__bert-finetuned"
    store = outcome.stores["text"]
    assert store["mode"] == "finetuned" and store["path"].endswith("tiny__bert-tiny__finetuned.h5")
    assert len(store["weights_sha256"]) == 64
    # No fine-tuned store of an extractor: say how to make one.
    missing = RankParams(data=tiny_world, ranker="lightgbm", features=["bert@finetuned"], storage=storage / "other",
                         progress=False)
    with pytest.raises(PipelineError, match="no fine-tuned store of bert.*--finetune --features bert"):
        run_rank(missing)


def test_mtrec_ablation_switches_reach_the_training(tiny_world, tmp_path):
    params = RankParams(data=tiny_world, finetune=True, features=["bert"], mtrec=True, surgery=False, ner=False, epochs=1,
                        storage=tmp_path, progress=False)
    outcome = run_rank(params)
    assert Path(outcome.folder).name == "tiny__mtrec-no-ner-no-surgery__text__bert"
    assert outcome.mtrec == {"category": True, "ner": False, "surgery": False, "weight": pytest.approx(0.3)}
    row = outcome.fit["history"][0]
    assert "loss_category" in row and "loss_ner" not in row and "surgery_projected" not in row


def test_finetune_config_scales(tiny_world, monkeypatch):
    monkeypatch.setattr("runs.params.check_checkpoint", lambda spec: None)  # /models/bert-base is not here
    tiny = finetune_config(RankParams(finetune=True, features=["bert"]), {"text": "bert"})
    assert (tiny.ranker.dim, tiny.ranker.lr, tiny.accumulate, tiny.ranker.epochs) == (32, 3e-3, 1, 3)
    real = finetune_config(RankParams(finetune=True, features=["bert:/models/bert-base"]),
                           {"text": "bert:/models/bert-base"})
    assert (real.ranker.lr, real.accumulate, real.ranker.history, real.encoder_lr_for("text")) == (1e-4, 4, 50, 2e-5)
    tuned = finetune_config(RankParams(finetune=True, lr=5e-4, encoder_lr=1e-5, accumulate=2, freeze_layers=1,
                                       grad_checkpointing=True, fusion="hadamard", features=["bert", "vit"]),
                            {"text": "bert", "image": "vit"})
    assert (tuned.ranker.lr, tuned.encoder_lr, tuned.accumulate, tuned.freeze_layers) == (5e-4, 1e-5, 2, 1)
    assert tuned.gradient_checkpointing and tuned.text == "bert:tiny" and tuned.image == "vit:tiny"


@pytest.mark.parametrize("values, field, message", [
    ({"mtrec": True}, "mtrec", "needs --finetune"),
    ({"finetune": True, "mtrec": True, "category": False, "ner": False}, "ner", "leaves no MTRec task"),
    ({"finetune": True, "ner": False}, "ner", "needs --mtrec"),
    ({"finetune": True, "ranker": "lightgbm"}, "finetune", "nrms ranker"),
    ({"finetune": True, "fusion": "blip", "features": ["blip"]}, "finetune", "bert and vit"),
    ({"finetune": True, "features": ["bert@finetuned"]}, "finetune", "@finetuned"),
    ({"accumulate": 2}, "accumulate", "needs --finetune"),
    ({"freeze_layers": 2}, "freeze_layers", "needs --finetune"),
])
def test_inconsistent_fine_tuning_options_are_refused(values, field, message):
    from pydantic import ValidationError

    with pytest.raises(ValidationError) as err:
        RankParams(**values)
    assert any(e["loc"] == (field,) and message in e["msg"] for e in err.value.errors()), err.value


def test_finetune_with_enhanced_titles_trains_on_them(tiny_world, tmp_path):
    from storage.catalogue import load_catalogue

    cat = load_catalogue(tiny_world)
    titles = tmp_path / "titles.tsv"
    titles.write_text("".join(f"{n}\t{c} {t}\n" for n, t, c in zip(cat.ids, cat.title, cat.category)))
    outcome = run_rank(RankParams(data=tiny_world, finetune=True, features=["bert"], titles=titles, epochs=1, storage=tmp_path,
                                  progress=False))
    enhanced = load_catalogue(tiny_world, titles=titles)
    assert Path(outcome.folder).name == f"{enhanced.name}__nrms-finetune__text__bert" and outcome.titles == str(titles)
    assert Path(outcome.stores["text"]["path"]).name == f"{enhanced.name}__bert-tiny__finetuned.h5"
    record = json.loads((Path(outcome.folder) / "run.json").read_text())
    assert record["data"]["titles"]["replaced"] == len(cat) and record["data"]["fingerprint"] == enhanced.fingerprint()


@pytest.mark.parametrize("args, expected", [
    (["--mtrec"], "--mtrec needs --finetune"),
    (["--finetune", "--ranker", "lightgbm"], "--finetune"),
    (["--finetune", "--titles", "/nonexistent/titles.tsv"], "titles file /nonexistent/titles.tsv does not exist"),
])
def test_cli_errors_are_one_line(tmp_path, args, expected):
    env = {**os.environ, "MMNEWS_STORAGE": str(tmp_path)}
    done = subprocess.run([sys.executable, "-m", "flows.rank", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert expected in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
