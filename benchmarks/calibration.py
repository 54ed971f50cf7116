"""Calibration: does the pipeline find planted truth, and only planted truth?

    .venv/bin/python benchmarks/calibration.py [--scale small] [--world-seeds 0,1,2,3,4]
        [--kinds null,presence,content] [--rankers nrms,lightgbm] [--extractors pretrained]
        [--seeds 1] [--n-boot 500] [--json PATH]

For each kind of synthetic world and each world seed, it generates the world, runs the
comparison exactly as `python -m flows.compare` does (pre-trained tiny encoders, or `tiny`
ones with `--extractors tiny`; sources text, text+cover and text+image (hadamard)), and reads
the report's two verdicts per ranker: "having a cover helps" (text+cover beats text, the paired
interval above 0) and "the cover's content helps" (text+image beats text+cover). World kinds:
- `null`: images carry nothing (`--cover-effect 0 --visual-weight 0`): neither verdict may be
  reached more often than the intervals' error rate;
- `presence`: only having a cover matters (`--visual-weight 0`, the default cover effect):
  "presence" should be found, "content" not;
- `content`: the default world (a cover effect and a taste-dependent visual match): both.
Targets (issue 14): "content helps" in at most 10% of null worlds, in at least 80% of default
(content) worlds. The table prints how often each verdict was reached per world kind and
ranker; `--json` writes every world's answers. Nothing about the worlds or the pipeline is
tuned here: these are the defaults a user gets.

`calibrate` is the plain function (tests/test_calibration.py runs it on tiny worlds).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

WORLDS = {
    "null": {"cover_effect": 0.0, "visual_weight": 0.0},
    "presence": {"visual_weight": 0.0},
    "content": {},
}
SOURCES = ["text", "text+cover", "hadamard"]


def world_dir(kind: str, world_seed: int, scale: str, root: Path, world: dict | None = None) -> Path:
    """Where the `kind` world of this seed and scale lives under the cache `root` (named by its
    generator options, so a world is made once for every benchmark that asks for it)."""
    options = {**WORLDS[kind], **(world or {})}
    tag = "-".join(f"{k}{v:g}" for k, v in sorted(options.items())) or "default"
    return root / "worlds" / f"{scale}-{tag}-seed{world_seed}"


def calibrate(kind: str, world_seed: int, scale: str, root: Path, *, rankers=("nrms", "lightgbm"),
              extractors: str = "pretrained", seeds: int = 1, n_boot: int = 500, jobs: int | None = None,
              world: dict | None = None) -> dict:
    """Generate a `kind` world and run the comparison on it; {ranker: {"presence", "content"}:
    answer} with answers yes / no / hurts / undecided (runs.report.Question), plus timings.
    `world` overrides the kind's generator options."""
    from flows.compare import build_flow
    from runs.params import CompareParams
    from storage.synthetic import generate_world

    options = {**WORLDS[kind], **(world or {})}
    data = world_dir(kind, world_seed, scale, root, world)
    started = time.perf_counter()
    generate_world(data, scale=scale, seed=world_seed, **options)
    params = CompareParams(
        data=data, storage=root / "storage", rankers=list(rankers), sources=SOURCES, baselines=["random"],
        text=f"bert:{extractors}", image=f"vit:{extractors}", seeds=seeds, n_boot=n_boot, jobs=jobs,
        name=f"calibration-{data.name}", progress=False,
    )
    report = build_flow()(params)["report"]
    answers: dict = {r: {} for r in rankers}
    for q in report.questions:
        answers[q.ranker][q.kind] = q.answer
        answers[q.ranker][f"{q.kind}_auc"] = [q.auc.diff, q.auc.lo, q.auc.hi]
    return {"kind": kind, "world_seed": world_seed, "scale": scale, "world": options, "answers": answers,
            "seconds": round(time.perf_counter() - started, 1)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scale", default="small", choices=["tiny", "small"])
    p.add_argument("--world-seeds", default="0,1,2,3,4")
    p.add_argument("--kinds", default="null,presence,content")
    p.add_argument("--rankers", default="nrms,lightgbm")
    p.add_argument("--extractors", default="pretrained", choices=["pretrained", "tiny"])
    p.add_argument("--seeds", type=int, default=1, help="training seeds per ranker run")
    p.add_argument("--n-boot", type=int, default=500)
    p.add_argument("--jobs", type=int, default=None)
    p.add_argument("--cache", type=Path, default=Path(__file__).resolve().parent / ".cache" / "calibration")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    from flows.server import prefect_api

    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    rankers = [r.strip() for r in args.rankers.split(",") if r.strip()]
    world_seeds = [int(s) for s in args.world_seeds.split(",") if s.strip()]
    started = time.perf_counter()
    load = os.getloadavg()[0]
    results = []
    with prefect_api():
        for kind in kinds:
            for seed in world_seeds:
                result = calibrate(kind, seed, args.scale, args.cache, rankers=rankers, extractors=args.extractors,
                                   seeds=args.seeds, n_boot=args.n_boot, jobs=args.jobs)
                results.append(result)
                print(json.dumps(result), file=sys.stderr, flush=True)
    minutes = (time.perf_counter() - started) / 60
    print(f"\nCalibration: {args.scale} worlds, seeds {world_seeds}, extractors {args.extractors}, "
          f"{args.seeds} training seed(s), {args.n_boot} resamples; {platform.node()}, {os.cpu_count()} cores, "
          f"load {load:.1f} at the start, {os.getloadavg()[0]:.1f} at the end; {minutes:.1f} min\n")
    print("| world | ranker | worlds | 'having a cover helps' | 'the content helps' | target for 'content helps' |")
    print("|---|---|---:|---:|---:|---|")
    verdict = {}
    for kind in kinds:
        for ranker in rankers:
            rows = [r["answers"].get(ranker, {}) for r in results if r["kind"] == kind]
            presence = sum(a.get("presence") == "yes" for a in rows)
            content = sum(a.get("content") == "yes" for a in rows)
            n = len(rows)
            target = {"null": "<= 10%", "content": ">= 80%"}.get(kind, "")
            met = ""
            if kind == "null":
                met = " (met)" if content <= 0.10 * n else " (NOT met)"
            elif kind == "content":
                met = " (met)" if content >= 0.80 * n else " (NOT met)"
            verdict[(kind, ranker)] = content
            print(f"| {kind} | {ranker} | {n} | {presence}/{n} ({presence / n:.0%}) | {content}/{n} "
                  f"({content / n:.0%}) | {target}{met} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
