"""Data-parallel fine-tuning: the ranks' weighted losses of a micro-batch sum to the one-process
losses (MTRec's auxiliary ones included), and two CPU processes under torchrun (gloo) against
one process on the tiny world, with a resume and gradient surgery."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_ddp import run_bounded

from rankers.distributed import Context
from rankers.finetune import FineTuneConfig, FineTuneRanker, _Shares
from rankers.mtrec import MTRecConfig
from rankers.nrms import NRMSConfig
from rankers.train import batch_tensors, build_samples

REPO = Path(__file__).resolve().parents[1]
HELPER = Path(__file__).with_name("_ddp_finetune.py")
HEAD = dict(dim=16, heads=2, additive_hidden=16, history=10, batch_size=32, lr=3e-3, dropout=0.0)

# Two processes against one, dropout 0 everywhere (the head's and tiny BERT's). Measured on the
# tiny world (120 train impressions; plain bert:tiny 1 epoch + 1 resumed, MTRec with surgery
# 1 epoch): every dev and validation metric equal, dev scores within 1.2e-6 (up to 2.1),
# losses within 2e-7, surgery cosines within 1e-7; the two ranks end with identical weights.
# The tolerances are those of the NRMS test (tests/test_ddp.py), with room for other
# summation orders (3 processes, other torch builds).
METRIC_TOLERANCE = 0.002
SCORE_TOLERANCE = 1e-4
LOSS_TOLERANCE = 1e-5



@pytest.fixture(scope="module")
def world(tiny_world):
    from rankers.data import carve_validation, load_impressions
    from storage.catalogue import load_catalogue

    cat = load_catalogue(tiny_world)
    train, _ = carve_validation(load_impressions(tiny_world, "train", cat))
    return {"root": tiny_world, "catalogue": cat, "train": train}


# ------------------------------------------------------------------------------------------
# The weights: the ranks' parts of a micro-batch sum to the whole micro-batch


@pytest.fixture(scope="module")
def mtrec(world):
    cfg = FineTuneConfig(mtrec=MTRecConfig(), ranker=NRMSConfig(**HEAD))
    ranker = FineTuneRanker(world["catalogue"], cfg, device="cpu", progress=False)
    ranker._build(None)
    ranker.model.eval()  # tiny BERT's dropout off: a rank's forward is the one process's
    return ranker


def task_gradients(ranker, losses: dict[str, torch.Tensor]) -> dict[str, list[torch.Tensor]]:
    params = [p for p in ranker.model.parameters() if p.requires_grad]
    out = {}
    for k, loss in losses.items():
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        out[k] = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
    return out


@pytest.mark.parametrize("world_size, size, naive", [(2, 9, False), (3, 9, False), (3, 2, False), (2, 9, True)])
def test_rank_shares_sum_to_the_one_process_losses_and_task_gradients(mtrec, world, world_size, size, naive):
    ranker, train = mtrec, world["train"]
    samples = build_samples(train, 4, np.random.default_rng(0))
    history, mask = train.histories(ranker.config.ranker.history)
    lengths = mask[samples.impression].sum(axis=1)
    # Long histories first, short ones last: the last rank's own history width is below the
    # batch's, and its padding slots (news row 0) count in the one-process auxiliary losses.
    long, short = np.flatnonzero(lengths == lengths.max()), np.flatnonzero((lengths > 0) & (lengths <= 3))
    idx = np.concatenate([long[: size - size // 2], short[: size // 2]])
    imp = samples.impression[idx]
    whole = batch_tensors(ranker.bank, history[imp], mask[imp], samples.candidates[idx], dedup=not naive)
    expected = ranker._losses(whole)
    assert set(expected) == {"main", "category", "ner"}
    expected_grads = task_gradients(ranker, expected)

    shares = [_Shares(samples, history, mask, Context(r, world_size), naive, ranker._aux_tokens()).of(idx, ranker.bank)
              for r in range(world_size)]
    # Each news of the micro-batch (each slot, naive) is owned by exactly one rank.
    owned = np.concatenate([batch.inputs.rows.numpy()[share.owned] for batch, share in shares])
    np.testing.assert_array_equal(np.sort(owned), np.sort(whole.inputs.rows.numpy()))
    if not naive:
        assert sum(batch.distinct for batch, _ in shares) > whole.distinct  # ranks share news: ownership matters
    if size < world_size:
        assert shares[-1][1].main == 0.0 and not shares[-1][1].owned.any()  # an empty share adds nothing

    parts = [ranker._losses(batch, share) for batch, share in shares]
    grads = [task_gradients(ranker, losses) for losses in parts]
    for task, value in expected.items():
        torch.testing.assert_close(sum(p[task] for p in parts), value, rtol=0, atol=1e-6, msg=task)
        for i, g in enumerate(expected_grads[task]):
            torch.testing.assert_close(sum(r[task][i] for r in grads), g, rtol=1e-4, atol=1e-6, msg=f"{task} {i}")


# ------------------------------------------------------------------------------------------
# torchrun: 2 CPU processes against 1


def _helper():
    spec = importlib.util.spec_from_file_location("_ddp_finetune", HELPER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_two_processes_under_torchrun_match_one_process(world, tmp_path):
    scenarios = {
        # plain fine-tuning of bert:tiny; the second run resumes epoch 1's checkpoint on every rank
        "text": {"config": FineTuneConfig(accumulate=2, ranker=NRMSConfig(**HEAD, epochs=2, patience=2)).to_dict(),
                 "impressions": 120, "resume_at": 1},
        # MTRec: category and NER heads, the task gradients reduced before the surgery
        "mtrec": {"config": FineTuneConfig(accumulate=2, mtrec=MTRecConfig(),
                                           ranker=NRMSConfig(**HEAD, epochs=1)).to_dict(),
                  "impressions": 120, "resume_at": None},
    }
    _helper().run(world["root"], tmp_path / "one", scenarios)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    done = run_bounded([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        str(HELPER), str(world["root"]), str(tmp_path / "two"), json.dumps(scenarios)],
                       env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    two = tmp_path / "two"

    # None on every rank stays None; None on some ranks counts as zeros there.
    assert [json.loads((two / f"sums-{r}.json").read_text()) for r in (0, 1)] == [[None, [1.0] * 3, [3.0]]] * 2

    for name in scenarios:
        one_report, two_report = (json.loads((tmp_path / run / name / "report.json").read_text())
                                  for run in ("one", "two"))
        for metric in ("auc", "mrr", "ndcg@5", "ndcg@10"):
            assert two_report["dev"][metric] == pytest.approx(one_report["dev"][metric], abs=METRIC_TOLERANCE), metric
            assert two_report["valid"][metric] == pytest.approx(one_report["valid"][metric], abs=METRIC_TOLERANCE)
        assert (two_report["epochs"], two_report["best_epoch"]) == (one_report["epochs"], one_report["best_epoch"])
        assert len(two_report["history"]) == len(one_report["history"]) == one_report["epochs"]
        for a, b in zip(one_report["history"], two_report["history"]):
            assert (b["samples"], b["optimizer_steps"]) == (a["samples"], a["optimizer_steps"])
            losses = [k for k in a if k.startswith("loss")]
            assert losses == [k for k in b if k.startswith("loss")]
            for k in losses + ["surgery_cosine"] * ("surgery_cosine" in a):
                assert b[k] == pytest.approx(a[k], abs=LOSS_TOLERANCE), k
            assert b.get("surgery_projected") == a.get("surgery_projected")
        s1, s2 = (np.load(tmp_path / run / name / "dev_scores.npy") for run in ("one", "two"))
        np.testing.assert_allclose(s2, s1, rtol=0, atol=SCORE_TOLERANCE)
        assert np.abs(s1).max() > 100 * SCORE_TOLERANCE  # the tolerance is small against the scores

        ranks = [json.loads((two / name / f"rank-{r}.json").read_text()) for r in (0, 1)]
        assert ranks[0]["weights"] == ranks[1]["weights"]  # every step summed the same gradients everywhere
        assert ranks[0]["saved"] == ranks[1]["saved"] and ranks[0]["stores"] == ranks[1]["stores"]
        assert all(Path(p).exists() for p in [*ranks[0]["saved"], *ranks[0]["stores"].values()])
    resumed = [json.loads((two / "text" / f"rank-{r}.json").read_text())["resumed_from"] for r in (0, 1)]
    assert resumed == [1, 1]  # every rank resumed from epoch 1's checkpoint
    assert sorted(p.name for p in (two / "text" / "checkpoints").iterdir()) == ["epoch-0002", "tokenizer"]
