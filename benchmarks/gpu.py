"""Every GPU figure of the issues in one run: about 8 minutes on one H100/H200.

    python benchmarks/gpu.py [--out benchmarks/.cache/gpu] [--budget-s 480]
    python benchmarks/gpu.py --cpu-check     # the same code on the CPU at toy sizes (no figures)

Measures, on the GPU, with random weights at base size (they cost what pre-trained ones cost):
1. frozen extraction throughput of BERT-base, ViT-B/16 (cards, JPEG decode included) and BLIP
   base over the synthetic small world's news and cards, which have MIND's shapes (titles of
   about 11 words, 610x195 IM-MIND cards), from checkpoints written in the real on-disk layouts
   (benchmarks/extract.py --models base --checkpoints layouts). Targets: BERT >= 40,000
   titles/s, ViT >= 5,000 cards/s, BLIP >= 2,000 news/s;
2. PLM-NR fine-tuning (BERT-base, batch 32 x 4 = 128, K = 4, history 50, batch deduplication,
   bf16 autocast, fused AdamW): the step time, projected to 3 epochs at MIND-small's 156,965
   train impressions (benchmarks/finetune.py on the small world; the projection scales its
   samples per impression). Target: <= 45 min;
3. NRMS over frozen pooled vectors, one epoch at MIND-small's shape (65,238 news, 156,965
   impressions of about 37 candidates and 33 history clicks, random 768-d vectors).
Then it checks that every GPU-only code path ran (pinned chunk buffers and copy events in
extraction, bf16 autocast in extraction and training, the fused AdamW) and writes
`<out>/gpu.json` and a table with the device's name. Each part runs even if another fails.
Only torch, transformers, timm, h5py, pillow, numpy and this checkout are needed (no Prefect,
no LightGBM), as on the lent GPU machines.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

MIND_SMALL = {"news": 65_238, "train_impressions": 156_965, "candidates": 37.0, "history": 33.0}
TARGETS = {"bert": 40_000, "vit": 5_000, "blip": 2_000, "plmnr_minutes": 45.0}


def extraction(out: Path, device: str, toy: bool) -> dict:
    import extract  # benchmarks/extract.py

    path = out / "extract.json"
    args = ["--models", "tiny" if toy else "base", "--checkpoints", "layouts", "--device", device,
            "--scale", "tiny" if toy else "small", "--naive-rows", "8", "--json", str(path)]
    if not toy:
        args += ["--repeats", "2"]
    extract.main(args)
    doc = json.loads(path.read_text())
    return {r["extractor"]: {"rows_per_s": r["pipeline_rows_per_s"], "target": TARGETS.get(r["extractor"])}
            for r in doc["results"]} | {"_doc": str(path)}


def finetuning(out: Path, device: str, toy: bool) -> dict:
    import finetune  # benchmarks/finetune.py

    path = out / "finetune.json"
    finetune.main(["--models", "tiny" if toy else "base", "--device", device, "--scale", "tiny" if toy else "small",
                   "--steps", "2" if toy else "6", "--json", str(path)])
    doc = json.loads(path.read_text())
    dedup = doc["results"]["dedup"]
    # Steps of 128 samples (clicks) an epoch at MIND-small: the world's clicks per impression times
    # MIND-small's train impressions; the projection counts the training steps (scoring the
    # validation day and dev adds a few minutes at most: one encoding per news).
    steps = MIND_SMALL["train_impressions"] * doc["samples_per_impression"] / 128
    return {"step_ms": dedup["step_s"] * 1e3, "naive_step_ms": doc["results"]["naive"]["step_s"] * 1e3,
            "steps_per_epoch_mind_small": round(steps), "projected_3_epochs_min": 3 * steps * dedup["step_s"] / 60,
            "target_min": TARGETS["plmnr_minutes"], "samples_per_impression": doc["samples_per_impression"],
            "_doc": str(path)}


def nrms_epoch(device: str, toy: bool) -> dict:
    import numpy as np
    import torch

    from rankers.data import Impressions, NewsFeatures, carve_validation
    from rankers.nrms import NRMSConfig
    from rankers.train import NRMSRanker

    scale = 0.01 if toy else 1.0
    n, m = int(MIND_SMALL["news"] * scale) + 100, int(MIND_SMALL["train_impressions"] * scale) + 200
    rng = np.random.default_rng(0)
    cands = np.maximum(2, rng.poisson(MIND_SMALL["candidates"], m))
    hist = rng.poisson(MIND_SMALL["history"], m)
    cand_off = np.concatenate([[0], np.cumsum(cands)])
    hist_off = np.concatenate([[0], np.cumsum(hist)])
    labels = (rng.random(cand_off[-1]) < 0.04).astype(np.int8)
    labels[cand_off[:-1]] = 1  # a click in every impression
    days = 6 * 86_400
    impressions = Impressions(
        name="train", impression_ids=np.arange(m, dtype=np.int64), user_ids=np.array([f"U{i}" for i in range(m)], dtype=object),
        times=np.sort(rng.integers(0, days, m)).astype(np.int64), hist_offsets=hist_off,
        hist_items=rng.integers(0, n, hist_off[-1]), cand_offsets=cand_off, cand_items=rng.integers(0, n, cand_off[-1]),
        labels=labels)
    train, valid = carve_validation(impressions)
    features = {"text": NewsFeatures("random-768", "text", rng.standard_normal((n, 768), dtype=np.float32),
                                     np.ones(n, dtype=bool))}
    ranker = NRMSRanker("text", NRMSConfig(epochs=1), device=device, progress=False)
    start = time.perf_counter()
    report = ranker.fit(train, valid, features)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {"epoch_s": seconds, "train_impressions": len(train), "train_impressions_per_s": report.train_impressions_per_s,
            "note": "one epoch with its validation scoring, random pooled 768-d vectors"}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / ".cache" / "gpu")
    p.add_argument("--cpu-check", action="store_true", help="run every part on the CPU at toy sizes (a dry run)")
    args = p.parse_args(argv)
    import torch

    from extractors.chunks import GPU_PATHS as EXTRACT_PATHS
    from rankers.train import GPU_PATHS as TRAIN_PATHS

    device = "cpu" if args.cpu_check else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("no CUDA GPU here: run this on a GPU machine, or --cpu-check for a dry run on the CPU", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    name = torch.cuda.get_device_name(0) if device == "cuda" else f"CPU ({platform.processor() or platform.machine()})"
    doc = {"device": name, "torch": torch.__version__, "cpus": os.cpu_count(), "started": time.strftime("%Y-%m-%d %H:%M"),
           "load_average": os.getloadavg()[0], "parts": {}}
    started = time.perf_counter()
    for part, run in (("extraction", lambda: extraction(args.out, device, args.cpu_check)),
                      ("plm-nr fine-tuning", lambda: finetuning(args.out, device, args.cpu_check)),
                      ("nrms epoch", lambda: nrms_epoch(device, args.cpu_check))):
        t0 = time.perf_counter()
        try:
            doc["parts"][part] = run()
        except Exception as err:  # noqa: BLE001 - every part runs; the failure is recorded
            doc["parts"][part] = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()[-2000:]}
        doc["parts"][part]["seconds"] = round(time.perf_counter() - t0, 1)
        print(f"[{part}] {json.dumps(doc['parts'][part], default=str)[:400]}", flush=True)
    paths = dict(EXTRACT_PATHS) | dict(TRAIN_PATHS)
    expected = ("pinned chunk buffers", "copy events", "bf16 autocast (extraction)", "bf16 autocast (training)",
                "fused AdamW (fine-tuning)")
    doc["gpu_paths"] = {k: paths.get(k, 0) for k in expected}
    doc["gpu_paths_all_ran"] = all(v > 0 for v in doc["gpu_paths"].values())
    doc["minutes"] = round((time.perf_counter() - started) / 60, 2)
    (args.out / "gpu.json").write_text(json.dumps(doc, indent=2, default=str) + "\n")

    title = "DRY RUN: toy sizes and tiny models on the CPU, not the figures" if args.cpu_check else "GPU figures"
    print(f"\n{title} on {name} ({doc['minutes']} min; torch {torch.__version__}, {os.cpu_count()} CPUs)\n")
    print("| figure | measured | target | met |")
    print("|---|---:|---:|---|")
    ext = doc["parts"].get("extraction", {})
    for key, label in (("bert", "BERT-base titles/s"), ("vit", "ViT-B/16 cards/s"), ("blip", "BLIP base news/s")):
        row = ext.get(key)
        if isinstance(row, dict):
            print(f"| {label} | {row['rows_per_s']:,.0f} | {TARGETS[key]:,} | {row['rows_per_s'] >= TARGETS[key]} |")
    ft = doc["parts"].get("plm-nr fine-tuning", {})
    if "projected_3_epochs_min" in ft:
        print(f"| PLM-NR BERT-base step (batch 128, dedup, bf16) | {ft['step_ms']:.0f} ms | | |")
        print(f"| PLM-NR 3 epochs at MIND-small (projected) | {ft['projected_3_epochs_min']:.1f} min | "
              f"{TARGETS['plmnr_minutes']:.0f} min | {ft['projected_3_epochs_min'] <= TARGETS['plmnr_minutes']} |")
    ep = doc["parts"].get("nrms epoch", {})
    if "epoch_s" in ep:
        print(f"| NRMS epoch over pooled vectors at MIND-small | {ep['epoch_s']:.1f} s | | |")
    for part, result in doc["parts"].items():
        if "error" in result:
            print(f"| {part} | failed: {result['error'][:80]} | | |")
    print(f"\nGPU-only code paths ran: {doc['gpu_paths']} -> {'all' if doc['gpu_paths_all_ran'] else 'NOT all'}")
    print(f"wrote {args.out / 'gpu.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
