"""Benchmark NRMS training at MIND-small size: an epoch of today's code path against the baseline.

    .venv/bin/python benchmarks/rank_train.py [--paths old,new] [--epochs 1] [--seed 0]
    .venv/bin/python benchmarks/rank_train.py --micro [--tokens] [--steps 40] [--subset 200] ...

Default (the epoch rows): `NRMSRanker("text", NRMSConfig(epochs=E)).fit(train, valid)` on
the synthetic `mind-small` world (benchmarks/mind_small.py: 131k train impressions, 193k
clicks, so about 1,510 steps of 128 an epoch; 26k valid impressions) with tiny BERT's
pooled text vectors (64-d), 1 torch thread, then scoring dev. `old` is rankers/train.py,
nrms.py and attention.py at mind_small.BASELINE_COMMIT; `new` is this checkout. Each run is a
child process; an epoch is its training (`train_seconds`) plus the validation pass that
early stopping takes after it. Prints wall and CPU seconds (CPU time is what a machine
without other work would show as wall time), dev AUC after the last epoch (both paths
draw different batches and dropout masks, so it is equivalent, not equal) and the
target of issue 13 (<= 2 min an epoch).

--micro: the step-level table on random MIND-small-shaped arrays (N news with pooled
vectors (N, D), or with --tokens token vectors (N, L, D) float16 with ragged masks; M train
impressions with about 37 candidates and histories of about 33 clicks, long-tailed news
popularity so that a batch repeats news as MIND's do). It times, in one run:
- building one epoch's samples (vectorised negative sampling over all clicks);
- training steps (forward, (1 + K)-way loss, backward, AdamW) with batch deduplication
  (each distinct news of a batch encoded once) against the naive per-slot encoding, the
  same batches for both; first steps are warm-up and not timed;
- scoring `--eval-impressions` impressions the encode-once way (each news once, each user
  once, all candidate rows) against a per-impression loop (encode that impression's
  history and candidates, score) on a `--subset` of them, extrapolated; both must agree.
Letters: N news, M impressions, L tokens, D width.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time

import numpy as np
import torch

from rankers.data import Impressions, NewsFeatures
from rankers.nrms import NRMS, NRMSConfig
from rankers.train import (
    NewsBank, autocast, batch_tensors, build_samples, forward_batch, resolve_device, score_impressions, train_loss,
)

import mind_small

EPOCH_TARGET_S = 120.0  # issue 13: an NRMS epoch over pooled text vectors at MIND-small size


def popular_items(rng: np.random.Generator, n_news: int, size: int) -> np.ndarray:
    """News rows with a long-tailed popularity (rank r drawn with weight 1 / (r + 20))."""
    weights = 1.0 / (np.arange(n_news) + 20.0)
    perm = rng.permutation(n_news)
    return perm[rng.choice(n_news, size=size, p=weights / weights.sum())].astype(np.int64)


def make_impressions(rng: np.random.Generator, m: int, n_news: int, candidates: float, history: float,
                     name: str) -> Impressions:
    cand_len = np.maximum(2, rng.geometric(1 / (candidates - 1), m))  # (M,) long tail, >= 2
    hist_len = np.where(rng.random(m) < 0.05, 0, rng.geometric(1 / history, m))  # (M,) 5% cold users
    cand_off = np.concatenate([[0], np.cumsum(cand_len)]).astype(np.int64)
    hist_off = np.concatenate([[0], np.cumsum(hist_len)]).astype(np.int64)
    t = int(cand_off[-1])
    labels = (rng.random(t) < 0.025).astype(np.int8)
    labels[cand_off[:-1]] = 1  # every impression has a click (MIND keeps only those) ...
    labels[cand_off[:-1] + 1] = 0  # ... and a non-click
    return Impressions(
        name=name, impression_ids=np.arange(1, m + 1, dtype=np.int64), user_ids=np.array(["U"] * m, dtype=object),
        times=np.zeros(m, np.int64), hist_offsets=hist_off, hist_items=popular_items(rng, n_news, int(hist_off[-1])),
        cand_offsets=cand_off, cand_items=popular_items(rng, n_news, t), labels=labels,
    )


def make_features(rng: np.random.Generator, n_news: int, dim: int, tokens: bool, length: int) -> NewsFeatures:
    vectors = rng.standard_normal((n_news, dim), dtype=np.float32)
    if not tokens:
        return NewsFeatures("random", "text", vectors, np.ones(n_news, bool))
    lengths = rng.integers(8, length + 1, n_news)
    mask = np.arange(length)[None, :] < lengths[:, None]  # (N, L)
    toks = np.empty((n_news, length, dim), np.float16)
    for start in range(0, n_news, 4096):  # in chunks: float32 noise for all N would be 4x the store
        toks[start:start + 4096] = rng.standard_normal((min(4096, n_news - start), length, dim), dtype=np.float32)
    return NewsFeatures("random", "text", vectors, np.ones(n_news, bool), toks, mask)


def time_training(models: dict[bool, NRMS], bank: NewsBank, train: Impressions, config: NRMSConfig, steps: int,
                  warmup: int, device: torch.device) -> dict[bool, dict]:
    """Median step time with dedup (True) and naive (False) encoding. The two modes alternate
    on the same batches, so a machine shared with other work slows both alike."""
    history, mask = train.histories(config.history)
    samples = build_samples(train, config.negatives, np.random.default_rng(0))
    order = np.random.default_rng(1).permutation(len(samples.impression))
    opts = {dedup: torch.optim.AdamW(m.parameters(), lr=config.lr) for dedup, m in models.items()}
    times: dict[bool, list[float]] = {dedup: [] for dedup in models}
    distinct: dict[bool, list[int]] = {dedup: [] for dedup in models}
    for step in range(warmup + steps):
        idx = order[step * config.batch_size:(step + 1) * config.batch_size]
        imp = samples.impression[idx]
        for dedup, model in models.items():
            model.train()
            start = time.perf_counter()
            batch = batch_tensors(bank, history[imp], mask[imp], samples.candidates[idx], dedup=dedup)
            with autocast(device):
                loss = train_loss(forward_batch(model, batch))
            opts[dedup].zero_grad(set_to_none=True)
            loss.backward()
            opts[dedup].step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if step >= warmup:
                times[dedup].append(time.perf_counter() - start)
                distinct[dedup].append(batch.distinct)
    clicks_per_impression = len(samples.impression) / len(train)
    out = {}
    for dedup in models:
        per_step = statistics.median(times[dedup])
        samples_per_s = config.batch_size / per_step
        out[dedup] = {"step_s": per_step, "samples_per_s": samples_per_s,
                      "impressions_per_s": samples_per_s / clicks_per_impression,
                      "distinct": float(np.mean(distinct[dedup])),
                      "slots": config.batch_size * (history.shape[1] + 1 + config.negatives)}
    return out


@torch.no_grad()
def naive_scores(model: NRMS, bank: NewsBank, imps: Impressions, n: int, history: int) -> np.ndarray:
    """Per impression: encode its history and candidates, score; the plain way."""
    model.eval()
    rows, mask = imps.histories(history)
    out = []
    for i in range(n):
        cand = imps.cand_items[imps.cand_offsets[i]:imps.cand_offsets[i + 1]][None]  # (1, C)
        with autocast(bank.device):
            scores = forward_batch(model, batch_tensors(bank, rows[i:i + 1], mask[i:i + 1], cand, dedup=False))
        out.append(scores[0].float().cpu().numpy())
    return np.concatenate(out).astype(np.float64)


def epoch_child(spec: dict) -> dict:
    """One fit of `spec["epochs"]` epochs by the old or new NRMSRanker, then dev scoring."""
    from rankers.metrics import evaluate

    load_before = mind_small.load()
    catalogue, train, valid, dev = mind_small.splits(spec["seed"])
    features = {"text": mind_small.text_store(catalogue)}
    if spec["path"] == "old":
        module, config_module = mind_small.baseline("train"), mind_small.baseline("nrms")
    else:
        import rankers.nrms as config_module
        import rankers.train as module
    config = config_module.NRMSConfig(epochs=spec["epochs"], seed=spec["seed"], patience=spec["epochs"])
    ranker = module.NRMSRanker("text", config, device="cpu", progress=False)  # 1 torch thread, the default
    mind_small.reset_peak()
    wall, cpu = time.perf_counter(), time.process_time()
    report = ranker.fit(train, valid, features)
    fit_s, fit_cpu = time.perf_counter() - wall, time.process_time() - cpu
    wall, cpu = time.perf_counter(), time.process_time()
    ranker.score(valid)  # what early stopping pays after every epoch
    valid_s, valid_cpu = time.perf_counter() - wall, time.process_time() - cpu
    metrics = evaluate(dev.cand_offsets, dev.labels, ranker.score(dev))
    train_s = sum(h["train_seconds"] for h in report.history)
    samples = report.history[0]["samples"]
    steps = len(report.history) * math.ceil(samples / config.batch_size)
    # CPU seconds of training alone: the fit's, less its validation passes (one per epoch).
    train_cpu = fit_cpu - len(report.history) * valid_cpu
    return {
        **spec, "fit_s": fit_s, "fit_cpu_s": fit_cpu, "train_s": train_s, "train_cpu_s": train_cpu,
        "valid_s": valid_s, "valid_cpu_s": valid_cpu, "steps": steps, "samples": samples,
        "epoch_s": train_s / len(report.history) + valid_s,
        "epoch_cpu_s": train_cpu / len(report.history) + valid_cpu,
        "step_ms": train_s / steps * 1e3, "step_cpu_ms": train_cpu / steps * 1e3,
        "loss": report.history[-1]["loss"], "valid_auc": report.history[-1].get("valid_auc"),
        "dev_auc": float(metrics["auc"]), "dev_ndcg10": float(metrics["ndcg@10"]), "peak_gb": mind_small.peak_gb(),
        "load_before": load_before, "load_after": mind_small.load(),
    }


def epochs(args: argparse.Namespace) -> None:
    mind_small.splits(args.seed)  # generate the world once, outside the timed children
    runs = []
    for path in args.paths.split(","):
        spec = {"path": path, "epochs": args.epochs, "seed": args.seed}
        proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"{spec}: the child failed:\n{proc.stderr[-3000:]}")
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(json.dumps(runs[-1]), flush=True)
    print(f"\n{'path':9s} {'epochs':>6s} {'steps':>6s} {'step ms':>8s} {'(cpu)':>6s} {'train s/ep':>10s} {'(cpu)':>6s} "
          f"{'valid s':>7s} {'(cpu)':>6s} {'epoch s':>7s} {'(cpu)':>6s} {'peak GiB':>8s} {'dev AUC':>8s} "
          f"{'nDCG@10':>8s}  load")
    for r in runs:
        n = r["epochs"]
        print(f"{'baseline' if r['path'] == 'old' else 'new':9s} {n:6d} {r['steps']:6d} {r['step_ms']:8.1f} "
              f"{r['step_cpu_ms']:6.1f} {r['train_s'] / n:10.1f} {r['train_cpu_s'] / n:6.1f} {r['valid_s']:7.1f} "
              f"{r['valid_cpu_s']:6.1f} {r['epoch_s']:7.1f} {r['epoch_cpu_s']:6.1f} {r['peak_gb']:8.2f} "
              f"{r['dev_auc']:8.4f} {r['dev_ndcg10']:8.4f}  {r['load_before']:.1f} -> {r['load_after']:.1f}")
    old = next((r for r in runs if r["path"] == "old"), None)
    for r in runs:
        if r["path"] == "new":
            if old is not None:
                print(f"speed-up per epoch: {old['epoch_s'] / r['epoch_s']:.2f}x wall, "
                      f"{old['epoch_cpu_s'] / r['epoch_cpu_s']:.2f}x CPU")
            verdict = "met" if r["epoch_s"] <= EPOCH_TARGET_S else "NOT met"
            print(f"target: an epoch <= {EPOCH_TARGET_S:.0f} s: {verdict} ({r['epoch_s']:.0f} s wall, "
                  f"{r['epoch_cpu_s']:.0f} s CPU)")
    print(f"machine: {mind_small.machine()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--paths", default="old,new", help="epoch rows: comma-separated old (baseline), new")
    parser.add_argument("--epochs", type=int, default=1, help="epoch rows: epochs per fit")
    parser.add_argument("--micro", action="store_true", help="the step-level table on random arrays instead")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--news", type=int, default=65238)
    parser.add_argument("--impressions", type=int, default=156965)
    parser.add_argument("--eval-impressions", type=int, default=73152)
    parser.add_argument("--candidates", type=float, default=37.0)
    parser.add_argument("--history", type=float, default=33.0)
    parser.add_argument("--dim", type=int, default=64, help="stored feature width D")
    parser.add_argument("--tokens", action="store_true", help="token features (N, L, D) float16 instead of pooled")
    parser.add_argument("--token-len", type=int, default=32)
    parser.add_argument("--model-dim", type=int, default=NRMSConfig.dim)
    parser.add_argument("--heads", type=int, default=NRMSConfig.heads)
    parser.add_argument("--batch-size", type=int, default=NRMSConfig.batch_size)
    parser.add_argument("--steps", type=int, default=40, help="timed training steps per mode")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--subset", type=int, default=200, help="impressions for the per-impression scoring loop")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(epoch_child(json.loads(args.child))))
    elif args.micro:
        micro(args)
    else:
        epochs(args)


def micro(args: argparse.Namespace) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    rng = np.random.default_rng(args.seed)

    t0 = time.perf_counter()
    train = make_impressions(rng, args.impressions, args.news, args.candidates, args.history, "train")
    dev = make_impressions(rng, args.eval_impressions, args.news, args.candidates, args.history, "dev")
    features = {"text": make_features(rng, args.news, args.dim, args.tokens, args.token_len)}
    build_s = time.perf_counter() - t0
    config = NRMSConfig(dim=args.model_dim, heads=args.heads, batch_size=args.batch_size)
    plan = {"text": args.tokens}
    bank = NewsBank(features, plan, device)
    print(f"data: {args.news} news, {len(train)} train impressions ({len(train.cand_items)} rows, "
          f"{int((train.labels == 1).sum())} clicks), {len(dev)} eval impressions ({len(dev.cand_items)} rows); "
          f"mean history {train.history_lengths.mean():.1f}; features "
          + (f"tokens ({args.news}, {args.token_len}, {args.dim}) float16" if args.tokens
             else f"pooled ({args.news}, {args.dim})")
          + f"; built in {build_s:.1f} s")
    print(f"model: NRMS text, d={config.dim}, {config.heads} heads, history {config.history}, K={config.negatives}, "
          f"batch {config.batch_size}, device {device}" + (" (bf16 autocast)" if device.type == "cuda" else ""))

    sample_s = []
    for epoch in range(3):
        start = time.perf_counter()
        samples = build_samples(train, config.negatives, np.random.default_rng(epoch))
        sample_s.append(time.perf_counter() - start)

    models = {}
    for dedup in (True, False):
        torch.manual_seed(args.seed)
        models[dedup] = NRMS(config, "text", {"text": args.dim}, plan).to(device)
    results = time_training(models, bank, train, config, args.steps, args.warmup, device)

    torch.manual_seed(args.seed)
    model = NRMS(config, "text", {"text": args.dim}, plan).to(device).eval()
    start = time.perf_counter()
    fast = score_impressions(model, bank, dev)
    eval_s = time.perf_counter() - start
    n = min(args.subset, len(dev))
    start = time.perf_counter()
    slow = naive_scores(model, bank, dev, n, config.history)
    loop_s = (time.perf_counter() - start) * len(dev) / n
    diff = float(np.abs(fast[:len(slow)] - slow).max())
    tol = 1e-4 if device.type == "cpu" else 5e-2  # bf16 on CUDA

    d, s = results[True], results[False]
    rows = [
        ("build_samples (one epoch)", f"{statistics.median(sample_s):.3f} s",
         f"{len(samples.impression)} samples, vectorised, median of 3"),
        ("train step, dedup", f"{d['step_s'] * 1e3:.1f} ms",
         f"{d['samples_per_s']:.0f} samples/s, {d['impressions_per_s']:.0f} train impressions/s; "
         f"{d['distinct']:.0f} distinct of {d['slots']} slots encoded"),
        ("train step, naive", f"{s['step_s'] * 1e3:.1f} ms",
         f"{s['samples_per_s']:.0f} samples/s, {s['impressions_per_s']:.0f} train impressions/s"),
        ("  dedup speed-up", f"{s['step_s'] / d['step_s']:.2f}x",
         f"epoch at dedup speed: {len(samples.impression) / d['samples_per_s'] / 60:.1f} min, "
         f"naive: {len(samples.impression) / s['samples_per_s'] / 60:.1f} min"),
        ("score, encode once", f"{eval_s:.2f} s", f"all {len(dev)} impressions, {len(dev.cand_items)} rows"),
        ("score, per-impression loop", f"{loop_s:.2f} s", f"EXTRAPOLATED from {n} impressions"),
        ("  encode-once speed-up", f"{loop_s / eval_s:.1f}x", f"max |difference| on the subset {diff:.1e}"),
    ]
    width = max(len(r[0]) for r in rows)
    print()
    print(f"{'step':<{width}}  {'time':>10}  note")
    for name, value, note in rows:
        print(f"{name:<{width}}  {value:>10}  {note}")
    gpu = f", GPU {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""
    print(f"\nmachine: {platform.platform()}, {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__} "
          f"with {torch.get_num_threads()} threads{gpu}, Python {platform.python_version()}, numpy {np.__version__}; "
          f"load average {os.getloadavg()[0]:.1f}")
    if diff > tol:
        raise SystemExit(f"FAILED: encode-once scores differ from the per-impression loop by {diff:.1e} (> {tol})")


if __name__ == "__main__":
    main()
