"""What fine-tuning costs: encoder tokens per training impression and optimizer-step time,
naive per-slot encoding against batch deduplication, in the same run.

    .venv/bin/python benchmarks/finetune.py [--models tiny|base] [--device auto|cpu|cuda]
        [--scale small] [--fusion text|hadamard] [--batch-size 32] [--accumulate 4]
        [--history 50] [--negatives 4] [--steps 6] [--warmup 1] [--threads N] [--json PATH]

Model: PLM-NR as rankers.finetune trains it (FineTuneNRMS over a RawNewsBank, its loss and
optimizer step, bf16 autocast on CUDA). `--models tiny`: the registry's seeded tiny BERT (and
ViT); `--models base`: BERT-base size (12 layers, width 768, random weights, the tokenizer
learned from the titles; they cost what pre-trained ones cost, offline) and, with
`--fusion hadamard`, ViT-B/16. Data: the synthetic world (`storage.synthetic`, `--scale`,
made once under benchmarks/.cache/), its train split less the last day (validation).

The two modes are the library's: `dedup` encodes each distinct news of a micro-batch once
and indexes the vectors back (FineTuneConfig(naive=False), the default); `naive` encodes
every history and candidate slot separately (naive=True). Both train from the same initial
weights on the same samples; steps alternate between them, so other work on the machine
slows both alike. Per optimizer step (`--batch-size` samples x `--accumulate`
micro-batches, K negatives, `--history` clicks):
- encoder token positions: the news encoded x the micro-batch's padded title length (what
  the transformer computes; plus patches per image with hadamard), and real (unpadded) title
  tokens; per training sample and per training impression (samples are clicks: an impression
  with two clicks is two samples);
- the median step time over `--steps` steps after `--warmup`.
Projection: 3 epochs = 3 x (epoch steps x step time + validation scoring, measured once),
plus dev scoring (extrapolated from validation by impressions). The issue's target: 3 epochs
at MIND-small scale (BERT-base size, history 50, K = 4, batch 128) in 45 minutes or less on
one H100: `--device cuda --models base --scale mind-small`.
From a checkout that is not installed into the environment, run it from the repository
root as `python -m benchmarks.finetune ...`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from storage.errors import PipelineError, run_cli

TARGET_MINUTES = 45.0
TARGET = ("3 epochs at MIND-small scale (synthetic world, BERT-base-size model, history 50, K = 4, batch 128) "
          f"in {TARGET_MINUTES:.0f} minutes or less on one H100")
TARGET_COMMAND = "python benchmarks/finetune.py --device cuda --models base --scale mind-small"
EPOCHS = 3
MODES = ("dedup", "naive")


def synthetic_world(cache: Path, scale: str, seed: int, images: bool) -> Path:
    """The synthetic world `scale`/`seed` (with cards when `images`), generated once under `cache`."""
    from storage.synthetic import generate_world

    world = cache / (f"synthetic-{scale}-seed{seed}" + ("" if images else "-text"))
    if not (world / "world.json").is_file():
        partial = cache / f"{world.name}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        generate_world(partial, scale=scale, seed=seed, images=images)
        shutil.rmtree(world, ignore_errors=True)
        partial.rename(world)  # only a finished world gets the reusable name
    return world


def base_extractors(titles: list[str], fusion: str) -> dict:
    """BERT-base (and ViT-B/16) with random weights, as extractors of the registry's kinds."""
    from transformers import BertConfig, BertModel

    from extractors.config import ExtractorConfig
    from extractors.text import TextExtractor
    from extractors.tokenizer import train_wordpiece

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        config = ExtractorConfig(name="bert", checkpoint="random-bert-base", modality="text", pooling="cls")
        out = {"text": TextExtractor(config, BertModel(BertConfig(), add_pooling_layer=False), train_wordpiece(titles))}
        if fusion != "text":
            from extractors.vision import random_vit

            out["image"] = random_vit()
    for ext in out.values():
        ext.set_trainable(True)
    return out


def build(catalogue, args, naive: bool, device: str):
    """A FineTuneRanker ready to train (model, bank, optimizer) in one of the two modes."""
    from runs.rank import TINY_FINETUNE_HEAD
    from rankers.finetune import FineTuneConfig, FineTuneRanker
    from rankers.plmnr import FineTuneNRMS, RawNewsBank

    head = dict(FineTuneConfig().ranker.to_dict())
    if args.models == "tiny":
        head.update(TINY_FINETUNE_HEAD)
    head.update(history=args.history, negatives=args.negatives, batch_size=args.batch_size, epochs=EPOCHS)
    from rankers.nrms import NRMSConfig

    config = FineTuneConfig(fusion=args.fusion, accumulate=args.accumulate, naive=naive,
                            ranker=NRMSConfig.from_dict(head))
    ranker = FineTuneRanker(catalogue, config, device=device, progress=False)
    if args.models == "tiny":
        ranker._build(None)
    else:
        extractors = base_extractors([str(t) for t in catalogue.title], args.fusion)
        torch.manual_seed(config.ranker.seed)
        ranker.model = FineTuneNRMS(config.ranker, args.fusion, extractors).to(ranker.device)
        ranker.bank = RawNewsBank(catalogue, extractors, ranker.device, config.image_cache_gb)
    return ranker, ranker._optimizer()


def patches(ranker) -> int:
    ext = ranker.model.extractors["image"] if "image" in ranker.model.extractors else None
    return 0 if ext is None else int(ext.model.patch_embed.num_patches + ext.model.num_prefix_tokens)


def time_steps(rankers: dict, optimizers: dict, train, args) -> tuple[dict, float]:
    """Per mode: median step seconds and mean tokens per step; and samples per impression."""
    from rankers.train import batch_tensors, build_samples

    any_ranker = next(iter(rankers.values()))
    history, mask = train.histories(args.history)  # (M, H)
    rng = np.random.default_rng([0, 1])
    samples = build_samples(train, args.negatives, rng)
    order = rng.permutation(len(samples.impression))
    per_step = args.batch_size * args.accumulate
    needed = (args.warmup + args.steps) * per_step
    if needed > len(order):
        raise PipelineError(f"--warmup + --steps need {needed:,} samples, the world has {len(order):,}; "
                            "take fewer steps or a larger --scale")
    p = patches(any_ranker)
    stats = {m: {"seconds": [], "positions": [], "real": [], "news": []} for m in rankers}
    for step in range(args.warmup + args.steps):
        for mode, ranker in rankers.items():
            ranker.model.train()
            positions = real = news = 0
            if ranker.device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            for micro in range(args.accumulate):
                at = step * per_step + micro * args.batch_size
                idx = order[at:at + args.batch_size]
                imp = samples.impression[idx]
                batch = batch_tensors(ranker.bank, history[imp], mask[imp], samples.candidates[idx],
                                      dedup=mode == "dedup")
                loss = ranker._losses(batch)["main"] / args.accumulate
                loss.backward()
                ids = batch.inputs.input_ids
                positions += ids.numel() + batch.distinct * p  # (U, L) title positions + U x P patches
                real += int(batch.inputs.attention_mask.sum())
                news += batch.distinct
            ranker._step(optimizers[mode], step)
            if ranker.device.type == "cuda":
                torch.cuda.synchronize()
            if step >= args.warmup:
                s = stats[mode]
                s["seconds"].append(time.perf_counter() - start)
                s["positions"].append(positions)
                s["real"].append(real)
                s["news"].append(news)
    out = {}
    for mode, s in stats.items():
        out[mode] = {"step_s": statistics.median(s["seconds"]), "positions": float(np.mean(s["positions"])),
                     "real": float(np.mean(s["real"])), "news": float(np.mean(s["news"]))}
    return out, len(samples.impression) / len(train)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", choices=("tiny", "base"), default="tiny",
                        help="tiny: the registry's seeded tiny models; base: BERT-base size (and ViT-B/16), random weights")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--scale", default="small", help="synthetic world scale: tiny, small, mind-small (default small)")
    parser.add_argument("--seed", type=int, default=0, help="world seed")
    parser.add_argument("--fusion", choices=("text", "hadamard"), default="text")
    parser.add_argument("--batch-size", type=int, default=32, help="samples per micro-batch (default 32)")
    parser.add_argument("--accumulate", type=int, default=4, help="micro-batches per optimizer step (default 4: 128)")
    parser.add_argument("--history", type=int, default=50)
    parser.add_argument("--negatives", type=int, default=4, help="K")
    parser.add_argument("--steps", type=int, default=6, help="timed optimizer steps per mode (default 6)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed first steps per mode (default 1)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--cache", type=Path, default=Path(__file__).resolve().parent / ".cache",
                        help="where the world goes (default: benchmarks/.cache)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here as JSON")
    args = parser.parse_args(argv)
    for option in ("batch_size", "accumulate", "history", "negatives", "steps", "threads"):
        value = getattr(args, option)
        if value is not None and value < 1:
            parser.error(f"--{option.replace('_', '-')} must be at least 1, got {value}")
    if args.warmup < 0:
        parser.error(f"--warmup must be 0 or more, got {args.warmup}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from rankers.data import carve_validation, load_impressions
    from rankers.train import resolve_device, score_impressions
    from storage.catalogue import load_catalogue
    from storage.synthetic import SCALES

    print(f"target (issue 5): {TARGET}; measured by `{TARGET_COMMAND}`", flush=True)
    if args.scale not in SCALES:
        raise PipelineError(f"unknown --scale {args.scale!r}; known: {', '.join(SCALES)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise PipelineError("--device cuda: torch sees no CUDA GPU on this machine, so the target cannot be measured "
                            "here; run the command above on a GPU machine, or measure the CPU with --device cpu")
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.cache.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    world = synthetic_world(args.cache, args.scale, args.seed, images=args.fusion != "text")
    catalogue = load_catalogue(world)
    train, valid = carve_validation(load_impressions(world, "train", catalogue))
    dev = load_impressions(world, "dev", catalogue)
    data_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    rankers, optimizers = {}, {}
    for mode in MODES:
        rankers[mode], optimizers[mode] = build(catalogue, args, naive=mode == "naive", device=str(device))
    build_s = time.perf_counter() - t0
    first = rankers["dedup"].model
    params = sum(p.numel() for p in first.extractors.parameters())
    print(f"data: synthetic world scale={args.scale} seed={args.seed}: {len(catalogue):,} news, {len(train):,} train / "
          f"{len(valid):,} valid / {len(dev):,} dev impressions; mean history {train.history_lengths.mean():.1f}, "
          f"{len(train.cand_items) / max(len(train), 1):.1f} candidates per impression (loaded in {data_s:.1f} s)")
    print(f"model: PLM-NR {args.fusion}, {args.models} extractors ({params / 1e6:.1f}M parameters), head d="
          f"{first.config.dim}, history {args.history}, K={args.negatives}, batch {args.batch_size} x {args.accumulate} "
          f"= {args.batch_size * args.accumulate}, device {device}"
          + (" (bf16 autocast)" if device.type == "cuda" else "") + f"; built both in {build_s:.1f} s", flush=True)

    results, per_impression = time_steps(rankers, optimizers, train, args)
    start = time.perf_counter()
    score_impressions(rankers["dedup"].model, rankers["dedup"].bank, valid)
    if device.type == "cuda":
        torch.cuda.synchronize()
    valid_s = time.perf_counter() - start

    per_step = args.batch_size * args.accumulate
    epoch_samples = per_impression * len(train)
    epoch_steps = int(np.ceil(epoch_samples / per_step))
    dev_s = valid_s * len(dev) / max(len(valid), 1)
    print()
    header = (f"{'mode':<6}  {'step (ms)':>10}  {'news / step':>11}  {'positions / step':>16}  "
              f"{'positions / impr.':>17}  {'real tokens / impr.':>19}  {'3 epochs (min)':>14}")
    print(header)
    rows = {}
    for mode in MODES:
        r = results[mode]
        minutes = (EPOCHS * (epoch_steps * r["step_s"] + valid_s) + dev_s) / 60
        rows[mode] = {**r, "positions_per_impression": r["positions"] / per_step * per_impression,
                      "real_per_impression": r["real"] / per_step * per_impression, "projected_minutes": minutes}
        print(f"{mode:<6}  {r['step_s'] * 1e3:>10.1f}  {r['news']:>11,.0f}  {r['positions']:>16,.0f}  "
              f"{rows[mode]['positions_per_impression']:>17,.0f}  {rows[mode]['real_per_impression']:>19,.0f}  "
              f"{minutes:>14,.1f}")
    d, n = rows["dedup"], rows["naive"]
    print(f"\ndedup against naive: {n['positions'] / d['positions']:.1f}x fewer token positions, "
          f"{n['step_s'] / d['step_s']:.2f}x faster steps")
    print(f"epoch: {epoch_samples:,.0f} samples ({per_impression:.2f} per impression) = {epoch_steps:,} steps; "
          f"validation scoring {valid_s:.1f} s (encode each news once), dev scoring ~{dev_s:.1f} s (estimated "
          f"from validation by impressions); medians of {args.steps} steps after {args.warmup} warm-up")
    at_target = device.type == "cuda" and args.models == "base" and args.scale == "mind-small" \
        and args.fusion == "text" and per_step == 128 and args.history == 50 and args.negatives == 4
    if at_target:
        name = torch.cuda.get_device_name(device)
        verdict = "met" if d["projected_minutes"] <= TARGET_MINUTES else "not met"
        note = "" if "H100" in name else f" (the target is for one H100; this is {name})"
        print(f"target: {TARGET}: projected {d['projected_minutes']:.1f} min with dedup: {verdict}{note}")
    else:
        print(f"target: not measured by this configuration; it needs `{TARGET_COMMAND}`")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    gpu = f", GPU {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""
    print(f"machine: {platform.platform()}, {os.cpu_count()} CPUs, torch {torch.__version__} with "
          f"{torch.get_num_threads()} threads{gpu}, Python {platform.python_version()}; load average {load:.1f}")
    if args.json is not None:
        doc = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
               "epoch_samples": epoch_samples, "epoch_steps": epoch_steps, "valid_scoring_s": valid_s,
               "train_impressions": len(train), "samples_per_impression": per_impression,
               "results": rows, "target_minutes": TARGET_MINUTES, "at_target_config": at_target,
               "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                           "device": str(device), "load_average": load}}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    run_cli(main)
