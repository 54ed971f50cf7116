"""Data-parallel NRMS: batch shares, the gradient scaling of micro-batches, and two CPU
processes under torchrun (gloo) against one process on the tiny world."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rankers import distributed
from rankers.base import ROLES
from rankers.data import NewsFeatures
from rankers.distributed import Context, micro_batch, share_bounds, shard, shard_plan
from rankers.nrms import NRMS, NRMSConfig
from rankers.train import NewsBank, batch_tensors, forward_batch, train_loss
from storage.errors import PipelineError

ROOT = Path(__file__).resolve().parents[1]

# Two processes against one, both with dropout 0 (per-rank dropout masks would differ from the
# one process's). Measured on the tiny world, 3 epochs: every dev metric equal, model weights
# within 4e-6 and dev scores (up to 2.7) within 5e-7; the tolerances leave room for other
# summation orders (3 processes, other torch builds).
METRIC_TOLERANCE = 0.002
SCORE_TOLERANCE = 1e-4



# ------------------------------------------------------------------------------------------
# Shares


@settings(max_examples=200, deadline=None)
@given(n=st.integers(0, 300), world=st.integers(1, 9))
def test_shares_cover_every_row_once_in_order_with_sizes_within_one(n, world):
    rows = np.arange(n) * 7 + 3
    parts = [shard(rows, r, world) for r in range(world)]
    assert np.array_equal(np.concatenate(parts), rows)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)
    assert np.array_equal(share_bounds(n, world), np.concatenate([[0], np.cumsum(sizes)]))


def test_micro_batches_of_a_plan():
    plan = [np.arange(7), np.arange(7, 9), np.arange(9, 12)]
    assert all(part is rows and share == 1.0 for (part, share), rows in zip(shard_plan(plan, Context()), plan))
    third = shard_plan(plan, Context(rank=2, world_size=3))
    assert [p.tolist() for p, _ in third] == [[5, 6], [7], [11]]  # a batch of 2 has no third share:
    assert [s for _, s in third] == [2 / 7, 0.0, 1 / 3]  # its first row, weighted 0
    shares = [sum(micro_batch(rows, Context(r, 3))[1] for r in range(3)) for rows in plan]
    assert shares == pytest.approx([1.0, 1.0, 1.0])


def test_one_process_without_torchrun(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    ctx = distributed.init("cpu")
    assert ctx == Context() and not ctx.enabled and ctx.is_main and distributed.is_main()
    t = torch.tensor([1.0, 2.0])
    assert distributed.all_reduce_sum(t) is t and t.tolist() == [1.0, 2.0]
    assert distributed.broadcast_object({"auc": 0.5}) == {"auc": 0.5}
    model = torch.nn.Linear(2, 2)
    assert distributed.wrap(model, "cpu") is model
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(PipelineError, match="RANK=2 is not within WORLD_SIZE=2"):
        distributed.env_context()


# ------------------------------------------------------------------------------------------
# The scaling: DDP's average of the ranks' scaled gradients is the whole batch's gradient


def tiny_model(n: int = 30, dim: int = 8, seed: int = 0) -> tuple[NRMS, NewsBank]:
    rng = np.random.default_rng(seed)
    features = {role: NewsFeatures(role, "text", rng.normal(size=(n, dim)).astype(np.float32), np.ones(n, bool))
                for role in ROLES}
    tokens = {"text": False, "image": False}
    torch.manual_seed(seed)
    config = NRMSConfig(dim=16, heads=4, additive_hidden=16, dropout=0.0, history=5)
    model = NRMS(config, "hadamard", {"text": dim, "image": dim}, tokens)
    return model, NewsBank(features, tokens, torch.device("cpu"))


def gradients(model: NRMS, bank: NewsBank, rows: np.ndarray, data: tuple, scale: float) -> list[torch.Tensor]:
    history, mask, candidates = data
    model.zero_grad()
    loss = train_loss(forward_batch(model, batch_tensors(bank, history[rows], mask[rows], candidates[rows])))
    (loss * scale).backward()
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("world, size", [(2, 7), (3, 7), (3, 2)])  # unequal shares; an empty one
def test_scaled_share_gradients_average_to_the_whole_batch_gradient(world, size):
    model, bank = tiny_model()
    rng = np.random.default_rng(1)
    lengths = rng.integers(0, 6, size)
    data = (rng.integers(0, 30, (size, 5)), np.arange(5)[None, :] < lengths[:, None], rng.integers(0, 30, (size, 4)))
    rows = np.arange(size)
    whole = gradients(model, bank, rows, data, 1.0)
    per_rank = []
    for rank in range(world):
        part, share = micro_batch(rows, Context(rank, world))
        per_rank.append(gradients(model, bank, part, data, share * world))
    averaged = [torch.stack(g).mean(0) for g in zip(*per_rank)]  # what DDP's all-reduce gives
    for a, b in zip(averaged, whole):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------
# torchrun: 2 CPU processes against 1


def test_entry_point_rejects_other_rankers():
    from flows.rank_ddp import main

    with pytest.raises(PipelineError, match="trains nrms only"):
        main(["--ranker", "lightgbm"])
    with pytest.raises(PipelineError, match="needs features for image; add vit"):
        main(["--fusion", "hadamard", "--features", "bert"])
    with pytest.raises(PipelineError, match="frozen stores only"):
        main(["--features", "bert@finetuned"])


def run_bounded(command: list[str], env: dict, timeout: float) -> subprocess.CompletedProcess:
    """Run in a process group of its own; on a timeout kill the group (torchrun and its workers)."""
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(command, proc.returncode, out, err)


@pytest.mark.slow
def test_two_processes_under_torchrun_match_one_process(tiny_world, tmp_path):
    from flows.rank_ddp import prepare
    from runs.params import RankParams
    from runs.rank import run_rank
    from rankers.data import load_features, load_impressions
    from rankers.train import NRMSRanker
    from storage.catalogue import load_catalogue

    options = dict(data=tiny_world, features=["bert", "vit"], fusion="hadamard", device="cpu", epochs=3,
                   dropout=0.0, storage=tmp_path, progress=False)
    prepare(RankParams(**options))  # extracted once, here; both runs reuse the stores
    one = Path(run_rank(RankParams(**options, run_name="one")).folder)
    stores = json.loads((one / "run.json").read_text())["stores"]

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "MMNEWS_STORAGE": str(tmp_path)}
    args = ["--data", str(tiny_world), "--features", "bert,vit", "--fusion", "hadamard", "--device", "cpu",
            "--epochs", "3", "--dropout", "0", "--storage", str(tmp_path), "--no-progress", "--run-name", "two"]
    done = run_bounded([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        "-m", "flows.rank_ddp", *args], env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("dev AUC") == 1  # rank 0 alone reports
    two = tmp_path / "models" / "two"
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())

    m1, m2 = (json.loads((f / "metrics.json").read_text()) for f in (one, two))
    for metric in ("auc", "mrr", "ndcg@5", "ndcg@10"):
        assert m2[metric] == pytest.approx(m1[metric], abs=METRIC_TOLERANCE), metric
    assert m2["impressions"] == m1["impressions"]
    f1, f2 = (json.loads((f / "run.json").read_text())["fit"] for f in (one, two))
    assert (f2["epochs"], f2["best_epoch"]) == (f1["epochs"], f1["best_epoch"])
    for a, b in zip(f1["history"], f2["history"]):
        assert b["samples"] == a["samples"]
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-4)
        assert b["valid_auc"] == pytest.approx(a["valid_auc"], abs=METRIC_TOLERANCE)

    catalogue = load_catalogue(tiny_world)
    features = {role: load_features(s["path"], catalogue) for role, s in stores.items()}
    dev = load_impressions(tiny_world, "dev", catalogue)
    s1, s2 = (NRMSRanker.load(f, device="cpu", features=features).score(dev) for f in (one, two))
    np.testing.assert_allclose(s2, s1, rtol=0, atol=SCORE_TOLERANCE)
    assert np.abs(s1).max() > 100 * SCORE_TOLERANCE  # the tolerance is small against the scores
