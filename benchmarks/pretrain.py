"""What pre-training the tiny encoders costs and buys: random-init tiny vs pre-trained, same run.

    .venv/bin/python benchmarks/pretrain.py [--scale small] [--seed 0] [--threads 1]
        [--keep DIR] [--no-nrms] [--json PATH]

1. Cost: `extractors.pretraining.pretrain` for bert, vit and blip (BLIP's text encoder
   starting from that BERT) on the synthetic world (`--scale`, made once under
   benchmarks/.cache/), each timed from scratch (wall and CPU seconds, load before and
   after). The budget: all three within 2 minutes on 2 cores.
2. Linear probes of the frozen vectors, random-init tiny (`KIND:tiny`, the project's default)
   against pre-trained (`KIND:DIR`), mean and cls pooling: a logistic regression (sklearn,
   standardised inputs) trained on a random half of the news and scored on the other half
   (stratified, seed 0) predicts the hidden topic (all news; text and BLIP) or the hidden
   cover style (news with a cover; ViT and BLIP). Targets (issue 14): text topic >= 80%;
   image style clearly above chance (20%). Vectors are those an extraction stores: titles,
   and the cards (title-only cards for news without a cover), through the extractors.
3. Text-only NRMS (`--no-nrms` skips it): the ranker of `flows.rank --ranker nrms --fusion
   text` with its defaults, trained on the train split less its last day and scored on dev,
   over the random tiny BERT, the pre-trained BERT (mean and cls pooling) and, as a ceiling
   for any text encoder, a one-hot of each news' true topic; popularity, oracle and random
   rankers beside them. "lift" = (AUC - random) / (oracle - random); the paired bootstrap
   interval (rankers.stats.compare_runs, 1,000 resamples) compares with popularity.
   Issue 14's target: lift >= 55% and an interval above zero. Also printed: ranking
   candidates by the share of the user's history in their true topic (no learning), the
   most a topic-only ranker could get from the history.
Hidden topics and styles are read only to score probes and ceilings, never by pre-training.
From a checkout that is not installed into the environment, run it from the repository root
as `python -m benchmarks.pretrain ...`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]  # also as -m
from extract import synthetic_world  # noqa: E402  benchmarks/extract.py: the world with its cards, made once
from storage.errors import run_cli

KINDS = ("bert", "vit", "blip")
BUDGET_SECONDS = 120.0
TEXT_TARGET = 0.80
LIFT_TARGET = 0.55


def hidden_news(world: Path, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(topic, style, has_cover) (N,) of the catalogue's news, from the world's hidden/news.tsv."""
    rows = {}
    lines = (world / "hidden" / "news.tsv").read_text(encoding="utf-8").splitlines()
    head = lines[0].split("\t")
    for line in lines[1:]:
        f = dict(zip(head, line.split("\t")))
        rows[f["news_id"]] = (int(f["topic"]), int(f["visual_style"]), int(f["has_cover"]))
    table = np.array([rows[n] for n in ids])
    return table[:, 0], table[:, 1], table[:, 2].astype(bool)


# ----------------------------------------------------------------------------- cost


def pretrain_all(world: Path, root: Path, threads: int, reuse: bool = False) -> tuple[dict[str, Path], list[dict]]:
    """Pre-train every kind from scratch into `root` (or reuse finished folders there);
    (folders, one timing row per kind)."""
    from extractors.pretraining import pretrain

    folders, rows = {}, []
    for kind in KINDS:
        folder = root / f"{world.name}__{kind}"
        if not reuse:
            shutil.rmtree(folder, ignore_errors=True)
            shutil.rmtree(folder.with_name(folder.name + ".partial"), ignore_errors=True)
        load = os.getloadavg()[0]
        wall, cpu = time.perf_counter(), time.process_time()
        folders[kind] = pretrain(kind, world, folder, text_init=folders.get("bert") if kind == "blip" else None,
                                 threads=threads, progress=False)
        record = json.loads((folder / "pretrain.json").read_text())
        rows.append({
            "kind": kind, "steps": record["config"]["steps"], "batch": record["config"]["batch_size"],
            "wall_s": round(time.perf_counter() - wall, 1), "cpu_s": round(time.process_time() - cpu, 1),
            "train_s": record["seconds_this_run"], "load_before": round(load, 2), "load_after": round(os.getloadavg()[0], 2),
            "loss_first": record["loss_first_last"][0], "loss_last": record["loss_first_last"][1],
        })
    return folders, rows


# ----------------------------------------------------------------------------- vectors


def card_pixels(catalogue, size: tuple[int, int]) -> torch.Tensor:
    """uint8 (N, 3, S, W): every news' card as the extractors read it (title-only card when none)."""
    from extractors.images import CardDataset, ImageTransform

    transform = ImageTransform(size=size, mean=(0.5,) * 3, std=(0.5,) * 3)
    paths = [catalogue.image_path(i) for i in range(len(catalogue))]
    data = CardDataset(paths, catalogue.title, catalogue.category, transform, missing="card", uint8=True)
    return torch.stack([data[i][0] for i in range(len(data))])


def pooled(extractor, catalogue, pixels: torch.Tensor | None, batch: int = 256) -> dict[str, np.ndarray]:
    """{"mean", "cls"} -> (N, D): the extractor's token vectors pooled both ways (extractors.encoded.pool)."""
    from extractors.encoded import pool
    from extractors.images import normalize

    out: dict[str, list] = {"mean": [], "cls": []}
    stats = extractor.transform.stats(torch.device("cpu")) if pixels is not None else None
    for a in range(0, len(catalogue), batch):
        titles = [str(t) for t in catalogue.title[a : a + batch]]
        if extractor.modality == "text":
            enc = extractor.encode(titles, return_tokens=True)
        else:
            px = normalize(pixels[a : a + batch], *stats)
            enc = extractor.encode(px, return_tokens=True) if extractor.modality == "image" else \
                extractor.encode(titles, px, return_tokens=True)
        for how in out:
            out[how].append(pool(enc.tokens, enc.mask, how).float().numpy())
    return {how: np.concatenate(v) for how, v in out.items()}


def probe(x: np.ndarray, y: np.ndarray, seed: int = 0) -> tuple[float, float]:
    """(accuracy, chance) of a logistic regression on a stratified random half, scored on the other."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    counts = np.bincount(y)
    keep = counts[y] >= 2  # a class of one news cannot be on both sides (the tiny world has some)
    x, y = x[keep], y[keep]
    xa, xb, ya, yb = train_test_split(x, y, test_size=0.5, random_state=seed, stratify=y)
    scaler = StandardScaler().fit(xa)
    clf = LogisticRegression(max_iter=3000).fit(scaler.transform(xa), ya)
    chance = np.bincount(yb).max() / len(yb)
    return float(clf.score(scaler.transform(xb), yb)), float(chance)


def probes(world: Path, catalogue, folders: dict[str, Path]) -> tuple[list[dict], dict[str, np.ndarray]]:
    """Probe rows for every kind x {random tiny, pre-trained} x {mean, cls}; and the text vectors."""
    from extractors.registry import create

    topic, style, cover = hidden_news(world, catalogue.ids)
    titles = [str(t) for t in catalogue.title]
    pixels = {"vit": card_pixels(catalogue, (64, 192)), "blip": card_pixels(catalogue, (64, 64))}
    tasks = {"bert": [("topic", None)], "vit": [("style", cover), ("topic", cover)],
             "blip": [("topic", None), ("style", cover)]}
    rows, text = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for kind in KINDS:
            for source, checkpoint in (("random tiny", "tiny"), ("pre-trained", str(folders[kind]))):
                extractor = create(f"{kind}:{checkpoint}", titles=titles, workdir=Path(tmp) / kind)
                vectors = pooled(extractor, catalogue, pixels.get(kind))
                if kind == "bert":
                    text[source] = vectors
                for how, x in vectors.items():
                    for target, keep in tasks[kind]:
                        y = topic if target == "topic" else style
                        sel = np.ones(len(y), bool) if keep is None else keep
                        acc, chance = probe(x[sel], y[sel])
                        rows.append({"kind": kind, "source": source, "pooling": how, "target": target,
                                     "news": int(sel.sum()), "accuracy": round(acc, 4), "chance": round(chance, 4)})
    return rows, text


# ----------------------------------------------------------------------------- NRMS


def nrms_rows(world: Path, catalogue, text: dict[str, dict[str, np.ndarray]], threads: int) -> list[dict]:
    """Text-only NRMS over several vector sets, baselines and ceilings, scored on dev."""
    from rankers.baselines import create_ranker
    from rankers.data import NewsFeatures, carve_validation, load_impressions
    from rankers.metrics import evaluate, ranks_from_scores
    from rankers.nrms import NRMSConfig
    from rankers.stats import compare_runs

    topic, _, _ = hidden_news(world, catalogue.ids)
    train, valid = carve_validation(load_impressions(world, "train", catalogue))
    dev = load_impressions(world, "dev", catalogue)
    scores: dict[str, np.ndarray] = {}

    def ranked(raw: np.ndarray) -> np.ndarray:
        # As flows.rank: metrics of the submitted ranks (ties broken by position), not raw scores.
        return -ranks_from_scores(dev.cand_offsets, raw).astype(np.float64)

    for name, options in (("random", {"seed": 0}), ("popularity", {"seed": 0}),
                          ("oracle", {"click_probs": world / "dev" / "click_probs.txt"})):
        ranker = create_ranker(name, **options)
        ranker.fit(train, valid, {})
        scores[name] = ranked(ranker.score(dev))

    def features(name: str, vectors: np.ndarray) -> dict:
        # float16, as a feature store keeps them.
        v = vectors.astype(np.float16).astype(np.float32)
        return {"text": NewsFeatures(name, "text", v, np.ones(len(v), bool))}

    onehot = np.eye(int(topic.max()) + 1, dtype=np.float32)[topic]
    runs = {
        "NRMS, random tiny BERT (mean)": text["random tiny"]["mean"],
        "NRMS, pre-trained BERT (mean)": text["pre-trained"]["mean"],
        "NRMS, pre-trained BERT (cls)": text["pre-trained"]["cls"],
        "NRMS, true topic one-hot (ceiling)": onehot,
    }
    for name, vectors in runs.items():
        torch.set_num_threads(threads)
        ranker = create_ranker("nrms", fusion="text", device="cpu", progress=False, config=NRMSConfig(seed=0))
        ranker.fit(train, valid, features(name, vectors))
        scores[name] = ranked(ranker.score(dev))

    # No learning: the share of the user's history in the candidate's true topic.
    share = np.empty(len(dev.cand_items))
    for i in range(len(dev)):
        hist = dev.hist_items[dev.hist_offsets[i] : dev.hist_offsets[i + 1]]
        counts = np.bincount(topic[hist], minlength=len(onehot[0])) + 0.3
        a, b = dev.cand_offsets[i], dev.cand_offsets[i + 1]
        share[a:b] = counts[topic[dev.cand_items[a:b]]] / counts.sum()
    scores["history share of the true topic (ceiling)"] = ranked(share)

    metrics = {k: evaluate(dev.cand_offsets, dev.labels, v) for k, v in scores.items()}
    lo, hi = metrics["random"]["auc"], metrics["oracle"]["auc"]
    rows = []
    for name, m in metrics.items():
        row = {"run": name, "auc": round(m["auc"], 4), "mrr": round(m["mrr"], 4),
               "lift": round((m["auc"] - lo) / (hi - lo), 4)}
        if name not in ("random", "popularity", "oracle"):
            d = compare_runs(dev.cand_offsets, dev.labels, scores["popularity"], scores[name])["auc"]
            row["vs_popularity"] = {k: round(d[k], 4) for k in ("diff", "lo", "hi")}
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------- report


def format_tables(cost: list[dict], probe_rows: list[dict], nrms: list[dict] | None) -> str:
    lines = ["pre-training cost (from scratch, one process, sequential)",
             f"{'kind':<6}{'steps':>6}{'batch':>6}{'wall s':>8}{'cpu s':>7}{'train s':>8}{'load':>12}{'loss':>17}"]
    for r in cost:
        lines.append(f"{r['kind']:<6}{r['steps']:>6}{r['batch']:>6}{r['wall_s']:>8.1f}{r['cpu_s']:>7.1f}{r['train_s']:>8.1f}"
                     f"{r['load_before']:>6.2f}->{r['load_after']:<5.2f}{r['loss_first']:>8.3f}->{r['loss_last']:.3f}")
    wall, cpu = sum(r["wall_s"] for r in cost), sum(r["cpu_s"] for r in cost)
    # The CPU seconds are what the work costs; the wall seconds are what it took beside the
    # machine's other work (a load above 2 on 2 cores stretches them).
    verdict = "met" if wall <= BUDGET_SECONDS else ("not met at this load; its CPU time fits" if cpu <= BUDGET_SECONDS
                                                    else "not met")
    lines.append(f"total  wall {wall:.1f} s, cpu {cpu:.1f} s; budget {BUDGET_SECONDS:.0f} s on 2 cores: {verdict}")
    lines += ["", "linear probes of frozen vectors (held-out half of the news)",
              f"{'kind':<6}{'target':<8}{'pooling':<8}{'news':>6}{'random tiny':>13}{'pre-trained':>13}{'chance':>8}"]
    keyed = {(r["kind"], r["target"], r["pooling"], r["source"]): r for r in probe_rows}
    for (kind, target, how, source), r in keyed.items():
        if source != "random tiny":
            continue
        p = keyed[(kind, target, how, "pre-trained")]
        lines.append(f"{kind:<6}{target:<8}{how:<8}{r['news']:>6}{r['accuracy']:>13.1%}{p['accuracy']:>13.1%}{r['chance']:>8.1%}")
    text = max(r["accuracy"] for r in probe_rows if r["kind"] == "bert" and r["source"] == "pre-trained")
    lines.append(f"text topic target >= {TEXT_TARGET:.0%}: {'met' if text >= TEXT_TARGET else 'not met'} ({text:.1%})")
    if nrms:
        lines += ["", "dev ranking, text only (NRMS as flows.rank trains it)",
                  f"{'run':<44}{'AUC':>8}{'MRR':>8}{'lift':>7}   AUC vs popularity [95% CI]"]
        for r in nrms:
            d = r.get("vs_popularity")
            ci = f"   {d['diff']:+.4f} [{d['lo']:+.4f}, {d['hi']:+.4f}]" if d else ""
            lines.append(f"{r['run']:<44}{r['auc']:>8.4f}{r['mrr']:>8.4f}{r['lift']:>7.0%}{ci}")
        best = next(r for r in nrms if r["run"] == "NRMS, pre-trained BERT (mean)")
        lines.append(f"target lift >= {LIFT_TARGET:.0%} with the interval above 0: lift {best['lift']:.0%}, "
                     f"interval {'above' if best['vs_popularity']['lo'] > 0 else 'not above'} 0")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/pretrain.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", default="small", choices=["tiny", "small", "mind-small"])
    parser.add_argument("--seed", type=int, default=0, help="world seed (default 0)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: fastest for tiny models here)")
    parser.add_argument("--cache", type=Path, default=Path(__file__).resolve().parent / ".cache")
    parser.add_argument("--keep", type=Path, default=None, help="keep the pre-trained folders here (default: a temp dir)")
    parser.add_argument("--reuse", action="store_true", help="reuse finished folders under --keep (no cost figures)")
    parser.add_argument("--no-nrms", action="store_true", help="skip the NRMS runs (minutes)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures as JSON")
    args = parser.parse_args(argv)

    from storage.catalogue import load_catalogue

    before = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    world = synthetic_world(args.cache, args.scale, args.seed)
    catalogue = load_catalogue(world)
    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        folders, cost = pretrain_all(world, root, args.threads, reuse=args.reuse)
        torch.set_num_threads(args.threads)
        probe_rows, text = probes(world, catalogue, folders)
    nrms = None if args.no_nrms else nrms_rows(world, catalogue, text, args.threads)
    torch.set_num_threads(before)
    print(f"{world.name}: {len(catalogue):,} news; {platform.machine()} {os.cpu_count()} CPUs, torch threads {args.threads}")
    print(format_tables(cost, probe_rows, nrms))
    if args.json:
        args.json.write_text(json.dumps({"world": world.name, "cost": cost, "probes": probe_rows, "nrms": nrms,
                                         "cpus": os.cpu_count(), "threads": args.threads}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    run_cli(main)
