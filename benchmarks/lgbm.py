"""Benchmark the LightGBM ranker at MIND-small size: today's code path against the baseline.

    .venv/bin/python benchmarks/lgbm.py [--cases text,hadamard] [--paths old,new]
                                        [--threads 1] [--image-dim 64] [--seed 0]

Data: the synthetic `mind-small` world (benchmarks/mind_small.py: 64,887 news, 131k train
impressions and 26k carved valid ones, 4.8M useful train rows; 73k dev impressions, 2.7M
rows), tiny BERT's pooled text vectors (64-d, extracted once) and, for Hadamard, a random
64-d image store present for 44% of news (no cover images are rendered at this size; the
trees find nothing in it, so its figures measure cost, not quality).

Each case is the stage `flows.rank` runs: `LightGBMRanker(fusion=case).fit(train, valid)`
with the ranker's defaults, then scoring dev. `old` is rankers/lgbm.py at
mind_small.BASELINE_COMMIT (the whole training matrix in memory, 1 thread, all rows,
lambdarank's default normalisation); `new` is this checkout; `--threads 1` adds a `new`
run with n_jobs=1 (the default uses all cores). Every run is a child process, so its peak
resident memory (VmHWM, counted from after loading the data) is its own. Prints a table,
the targets of issue 13 and the load average before and after each run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import mind_small

TARGETS = {"text": (120.0, 2.0), "hadamard": (300.0, 3.0)}  # seconds, GiB (issue 13)


def child(spec: dict) -> dict:
    """One fit and dev scoring; returns its figures."""
    import numpy as np

    from rankers.metrics import evaluate

    load_before = mind_small.load()
    catalogue, train, valid, dev = mind_small.splits(spec["seed"])
    features = {"text": mind_small.text_store(catalogue)}
    if spec["case"] == "hadamard":
        features["image"] = mind_small.random_store(len(catalogue), spec["image_dim"])
    module = mind_small.baseline("lgbm") if spec["path"] == "old" else __import__("rankers.lgbm").lgbm
    options = {} if spec["n_jobs"] is None else {"n_jobs": spec["n_jobs"]}
    ranker = module.LightGBMRanker(fusion=spec["case"], **options)
    mind_small.reset_peak()
    loaded_gb = mind_small.peak_gb()
    start = time.perf_counter()
    report = ranker.fit(train, valid, features)
    fit_s = time.perf_counter() - start
    t0 = time.perf_counter()
    scores = ranker.score(dev)
    score_s = time.perf_counter() - t0
    metrics = evaluate(dev.cand_offsets, dev.labels, scores)
    info = ranker.fit_info
    return {
        **spec, "fit_s": fit_s, "score_s": score_s, "total_s": fit_s + score_s, "peak_gb": mind_small.peak_gb(),
        "loaded_gb": loaded_gb, "features_s": info["features_seconds"], "boost_s": info["boost_seconds"],
        "rows": info["train_rows"], "features": info["features"], "trees": info["trees_trained"],
        "best": info["best_iteration"], "threads": info.get("threads", ranker.config.n_jobs),  # old: n_jobs
        "valid_ndcg10": max((h["valid_ndcg@10"] for h in report.history), default=float("nan")),
        "dev_auc": float(metrics["auc"]), "dev_ndcg10": float(metrics["ndcg@10"]),
        "dev_scores_finite": bool(np.isfinite(scores).all()), "load_before": load_before, "load_after": mind_small.load(),
    }


def run_child(spec: dict) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{spec}: the child failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default="text,hadamard", help="comma-separated: text, hadamard")
    parser.add_argument("--paths", default="old,new", help="comma-separated: old (the baseline commit), new")
    parser.add_argument("--threads", default="1", help="extra `new` runs with these n_jobs (comma-separated; '' none)")
    parser.add_argument("--image-dim", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return

    mind_small.splits(args.seed)  # generate the world once, outside the timed children
    runs = []
    for case in args.cases.split(","):
        specs = [dict(case=case, path=p, n_jobs=None) for p in args.paths.split(",")]
        if "new" in args.paths.split(","):
            specs += [dict(case=case, path="new", n_jobs=int(t)) for t in args.threads.split(",") if t and case == "text"]
        for spec in specs:
            spec.update(seed=args.seed, image_dim=args.image_dim)
            result = run_child(spec)
            runs.append(result)
            print(json.dumps(result), flush=True)

    print(f"\n{'case':9s} {'path':10s} {'threads':>7s} {'rows':>9s} {'F':>4s} {'features s':>10s} {'boost s':>8s} "
          f"{'trees':>6s} {'best':>5s} {'fit s':>7s} {'dev s':>6s} {'total s':>8s} {'peak GiB':>8s} "
          f"{'dev AUC':>8s} {'nDCG@10':>8s}  load")
    for r in runs:
        label = "baseline" if r["path"] == "old" else "new"
        print(f"{r['case']:9s} {label:10s} {r['threads']:>7} {r['rows']:9d} {r['features']:4d} {r['features_s']:10.1f} "
              f"{r['boost_s']:8.1f} {r['trees']:6d} {r['best']:5d} {r['fit_s']:7.1f} {r['score_s']:6.1f} "
              f"{r['total_s']:8.1f} {r['peak_gb']:8.2f} {r['dev_auc']:8.4f} {r['dev_ndcg10']:8.4f}  "
              f"{r['load_before']:.1f} -> {r['load_after']:.1f}")
    for case, (seconds, gib) in TARGETS.items():
        for r in [r for r in runs if r["case"] == case and r["path"] == "new" and r["n_jobs"] is None]:
            ok = r["total_s"] <= seconds and r["peak_gb"] <= gib
            print(f"target {case}: <= {seconds:.0f} s and <= {gib:.0f} GiB: {'met' if ok else 'NOT met'} "
                  f"({r['total_s']:.0f} s, {r['peak_gb']:.2f} GiB, {r['threads']} threads)")
    print(f"machine: {mind_small.machine()}, lightgbm {_lgbm_version()}")


def _lgbm_version() -> str:
    import lightgbm

    return lightgbm.__version__


if __name__ == "__main__":
    main()
