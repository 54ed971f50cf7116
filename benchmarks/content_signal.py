"""Where the planted content signal is lost: in the click histories, the image vectors, or the rankers?

    .venv/bin/python benchmarks/content_signal.py [--worlds content:0,presence:4] [--scale small]
        [--seeds 2] [--n-boot 500] [--json PATH]

The calibration (benchmarks/calibration.py) found that the default world's content effect
(a user's taste for the cover's style) is rarely reported, and that LightGBM reports a content
effect on some worlds that plant none. This benchmark takes a world apart, step by step, using
the world's hidden truth (topics, styles) only to measure, never to train a pipeline model:

1. Is the effect in the data? A ranker with no learned representation, a logistic regression
   on the user's history shares of the candidate's TRUE topic and TRUE style (and the cover
   flag), fitted on train impressions: dev AUC with and without the style feature. This is what
   the click histories allow at this world's size.
2. Do the image vectors show the style? A linear probe (held-out half) of the store's vectors
   of news with a cover, for the style and for the topic (the cover's colour).
3. Can NRMS use content where it sees it? text+cover against text+image over the pre-trained
   tiny ViT's store, and against text+image over a one-hot of the true style (covered news;
   one extra column for "no cover"): the same ranker, the same text store, `--seeds` seeds,
   the report's two-level bootstrap.
4. What is LightGBM's content gain made of? text+cover against text+image over the ViT store,
   over the same vectors with each topic's mean removed (what the picture says of the
   topic, gone) and with each style's mean removed (what it says of the style, gone).
   Also whether its training seeds change anything.

Stores and pre-trained encoders are found or made through the run layer exactly as
`flows.compare` makes them; worlds and stores share benchmarks/.cache/calibration with the
calibration benchmark. From a checkout that is not installed into the environment, run it from
the repository root as `python -m benchmarks.content_signal ...`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]  # also as -m
from calibration import WORLDS, world_dir  # noqa: E402  benchmarks/calibration.py: same worlds, same cache
from pretrain import hidden_news, probe  # noqa: E402  benchmarks/pretrain.py: the hidden truth, the probe

TEXT, IMAGE = "bert:pretrained", "vit:pretrained"


# ----------------------------------------------------------------------------- 1. the data


def share_features(imp, topic: np.ndarray, style: np.ndarray, cover: np.ndarray) -> np.ndarray:
    """(T, 3) per candidate row: log of the user's smoothed history share of its true topic,
    its cover flag, and (covered candidates) the log-ratio of the user's share of its true style
    among covered clicks to the uniform share; 0 for a candidate without a cover."""
    n_topics, n_styles = int(topic.max()) + 1, int(style.max()) + 1
    out = np.zeros((len(imp.cand_items), 3))
    for i in range(len(imp)):
        hist = imp.hist_items[imp.hist_offsets[i]: imp.hist_offsets[i + 1]]
        t_share = (np.bincount(topic[hist], minlength=n_topics) + 0.5) / (len(hist) + 0.5 * n_topics)
        seen = hist[cover[hist]]
        s_share = (np.bincount(style[seen], minlength=n_styles) + 0.5) / (len(seen) + 0.5 * n_styles)
        a, b = imp.cand_offsets[i], imp.cand_offsets[i + 1]
        c = imp.cand_items[a:b]
        out[a:b, 0] = np.log(t_share[topic[c]])
        out[a:b, 1] = cover[c]
        out[a:b, 2] = np.log(s_share[style[c]] * n_styles) * cover[c]
    return out


def history_ceilings(train, dev, topic, style, cover) -> dict[str, np.ndarray]:
    """Dev scores of the logistic regressions on the true-attribute history shares."""
    from sklearn.linear_model import LogisticRegression

    x_train, x_dev = (share_features(s, topic, style, cover) for s in (train, dev))
    scores = {}
    for name, cols in (("true topic + cover", [0, 1]), ("true topic + cover + true style", [0, 1, 2])):
        model = LogisticRegression(max_iter=1000).fit(x_train[:, cols], train.labels)
        scores[name] = model.decision_function(x_dev[:, cols])
    return scores


# ----------------------------------------------------------------------------- 3, 4. rankers


def without_means(features, by: np.ndarray, keep: np.ndarray, name: str):
    """The store's vectors with each group's mean (over news in `keep`) moved onto the mean of
    all of `keep`: what the vectors say of the group, removed; other news untouched."""
    from rankers.data import NewsFeatures

    v = features.vectors.astype(np.float32).copy()
    centre = v[keep].mean(axis=0)
    for g in np.unique(by[keep]):
        rows = keep & (by == g)
        v[rows] += centre - v[rows].mean(axis=0)
    return NewsFeatures(name, "image", v, features.present.copy())


def style_onehot(style: np.ndarray, cover: np.ndarray):
    """(N, S + 1): the true style of covered news, one more column for "no cover"."""
    from rankers.data import NewsFeatures

    n_styles = int(style.max()) + 1
    v = np.zeros((len(style), n_styles + 1), np.float32)
    v[cover, style[cover]] = 1.0
    v[~cover, n_styles] = 1.0
    return NewsFeatures("true style one-hot", "image", v, cover.copy())


def ranker_scores(ranker: str, arms: dict, train, valid, dev, seeds: int) -> dict[str, np.ndarray]:
    """{arm: (S, T) dev scores as submitted ranks}, every arm trained with seeds 0..S-1."""
    import torch

    from rankers.metrics import ranks_from_scores
    from rankers.nrms import NRMSConfig
    from rankers.registry import create_ranker

    out = {}
    for arm, (fusion, features, extra) in arms.items():
        rows = []
        for seed in range(seeds):
            if ranker == "nrms":
                torch.set_num_threads(1)
                model = create_ranker("nrms", fusion=fusion, device="cpu", progress=False, config=NRMSConfig(seed=seed))
            else:
                model = create_ranker("lightgbm", fusion=fusion, seed=seed, n_jobs=1, **extra)
            model.fit(train, valid, features)
            # As flows.rank: metrics of the submitted ranks (ties broken by position).
            rows.append(-ranks_from_scores(dev.cand_offsets, model.score(dev)).astype(np.float64))
        out[arm] = np.stack(rows)
        print(f"  {ranker} {arm}: {seeds} seed(s) done", file=sys.stderr, flush=True)
    return out


def paired(dev, runs: dict[str, np.ndarray], reference: str, n_boot: int) -> dict[str, dict]:
    """{run: {"auc", "diff", "lo", "hi"}} against `reference`, the report's statistics."""
    from rankers.stats import slice_metrics

    table = slice_metrics(dev.cand_offsets, dev.labels, runs, reference, n_boot=n_boot)["all"]
    out = {}
    for name, entry in table.items():
        row = {"auc": round(entry["metrics"]["auc"]["value"], 4)}
        if entry["delta"] is not None:
            d = entry["delta"]["auc"]
            row.update(diff=round(d["diff"], 4), lo=round(d["lo"], 4), hi=round(d["hi"], 4))
        out[name] = row
    return out


# ----------------------------------------------------------------------------- one world


def diagnose(kind: str, world_seed: int, scale: str, root: Path, seeds: int, n_boot: int) -> dict:
    from rankers.data import carve_validation
    from runs.workspace import Workspace
    from storage.synthetic import generate_world

    started = time.perf_counter()
    data = world_dir(kind, world_seed, scale, root)
    generate_world(data, scale=scale, seed=world_seed, **WORLDS[kind])
    ws = Workspace(root / "storage")
    cat = ws.catalogue(data)
    topic, style, cover = hidden_news(data, cat.ids)
    train, valid = carve_validation(ws.impressions(data, "train", cat))
    dev = ws.impressions(data, "dev", cat)
    text = ws.features(ws.store(TEXT, cat), cat)
    image = ws.features(ws.store(IMAGE, cat), cat)
    flag = ws.cover_features(cat)
    result: dict = {"kind": kind, "world_seed": world_seed, "scale": scale, "dev_impressions": len(dev)}

    ceilings = history_ceilings(ws.impressions(data, "train", cat), dev, topic, style, cover)
    result["history"] = paired(dev, ceilings, "true topic + cover", n_boot)

    result["probe"] = {}
    for target, y in (("style", style), ("topic", topic)):
        acc, chance = probe(image.vectors[cover], y[cover])
        result["probe"][target] = {"accuracy": round(acc, 4), "chance": round(chance, 4)}

    nrms = ranker_scores("nrms", {
        "text+cover": ("text+cover", {"text": text, "cover": flag}, {}),
        "text+image (ViT store)": ("hadamard", {"text": text, "image": image}, {}),
        "text+image (true style)": ("hadamard", {"text": text, "image": style_onehot(style, cover)}, {}),
    }, train, valid, dev, seeds)
    result["nrms"] = paired(dev, nrms, "text+cover", n_boot)

    lgbm = ranker_scores("lightgbm", {
        "text+cover": ("text+cover", {"text": text}, {"has_cover": cover}),
        "text+image (ViT store)": ("hadamard", {"text": text, "image": image}, {}),
        "ViT minus topic means": ("hadamard", {"text": text, "image": without_means(image, topic, cover, "vit-topic")}, {}),
        "ViT minus style means": ("hadamard", {"text": text, "image": without_means(image, style, cover, "vit-style")}, {}),
    }, train, valid, dev, seeds)
    result["lightgbm"] = paired(dev, lgbm, "text+cover", n_boot)
    if seeds > 1:  # did a training seed change any LightGBM score?
        result["lightgbm_seeds_identical"] = bool(all(np.array_equal(s[0], row) for s in lgbm.values() for row in s))
    result["seconds"] = round(time.perf_counter() - started, 1)
    return result


# ----------------------------------------------------------------------------- report


def format_world(r: dict) -> str:
    def delta(row: dict) -> str:
        if "diff" not in row:
            return "reference"
        verdict = "yes" if row["lo"] > 0 else ("hurts" if row["hi"] < 0 else "no")
        return f"{row['diff']:+.4f} [{row['lo']:+.4f}, {row['hi']:+.4f}] {verdict}"

    lines = [f"## {r['kind']} world, seed {r['world_seed']} ({r['scale']}, {r['dev_impressions']:,} dev impressions, "
             f"{r['seconds']:.0f} s)", "", "| step | run | dev AUC | ΔAUC [95% CI] |", "|---|---|---|---|"]
    for step, key in (("1. history, true attributes", "history"), ("3. NRMS", "nrms"), ("4. LightGBM", "lightgbm")):
        for name, row in r[key].items():
            lines.append(f"| {step} | {name} | {row['auc']:.4f} | {delta(row)} |")
    p = r["probe"]
    lines += ["", f"2. linear probe of the ViT store, covered news: style {p['style']['accuracy']:.1%} "
                  f"(chance {p['style']['chance']:.1%}), topic {p['topic']['accuracy']:.1%} "
                  f"(chance {p['topic']['chance']:.1%})"]
    if "lightgbm_seeds_identical" in r:
        lines.append(f"LightGBM's training seeds gave identical scores: {'yes' if r['lightgbm_seeds_identical'] else 'no'}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worlds", default="content:0,presence:4",
                   help=f"KIND:SEED,... with KIND one of {', '.join(WORLDS)} (default content:0,presence:4)")
    p.add_argument("--scale", default="small", choices=["tiny", "small"])
    p.add_argument("--seeds", type=int, default=2, help="training seeds per ranker arm (default 2)")
    p.add_argument("--n-boot", type=int, default=500)
    p.add_argument("--cache", type=Path, default=Path(__file__).resolve().parent / ".cache" / "calibration")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    worlds = []
    for item in args.worlds.split(","):
        kind, _, seed = item.strip().partition(":")
        if kind not in WORLDS or not seed.isdigit():
            p.error(f"--worlds: {item!r} is not KIND:SEED with KIND one of {', '.join(WORLDS)}")
        worlds.append((kind, int(seed)))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    load = os.getloadavg()[0]
    started = time.perf_counter()
    results = [diagnose(kind, seed, args.scale, args.cache, args.seeds, args.n_boot) for kind, seed in worlds]
    print(f"Content signal: {platform.node()}, {os.cpu_count()} cores, load {load:.1f} at the start, "
          f"{os.getloadavg()[0]:.1f} at the end; {(time.perf_counter() - started) / 60:.1f} min; "
          f"{args.seeds} training seed(s) per arm, {args.n_boot} resamples\n")
    print("\n\n".join(format_world(r) for r in results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
