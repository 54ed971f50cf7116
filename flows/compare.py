"""`python -m flows.compare`: the main job. Do images help news recommendation, and where?

Default: the synthetic small world, the three tiny extractors, both rankers (NRMS and
LightGBM) over the sources text, image, text+image (Hadamard) and BLIP, plus the random,
popularity and (on the synthetic world) oracle baselines. Every run is scored on the same
dev impressions; the report gives bootstrap intervals over impressions, paired differences
of each run from the text-only run of the same ranker, and slices by history length and by
candidates with and without a cover. It is written to `<storage>/reports/<name>/` as
report.md, report.html, metrics.json and PNG plots, and published as Prefect artifacts.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, Field

from flows.common import default_world, subdir, validated
from flows.rank import RankParams, roles_for
from storage.errors import PipelineError, run_cli

log = logging.getLogger(__name__)
SOURCES = ("text", "image", "hadamard", "blip", "concat", "gated")
SOURCE_LABEL = {
    "text": "text", "image": "image", "blip": "blip",
    "hadamard": "text+image (hadamard)", "concat": "text+image (concat)", "gated": "text+image (gated)",
}
EXTRACTOR_OF_ROLE = {"text": "bert", "image": "vit", "blip": "blip"}


class CompareParams(BaseModel):
    """Run parameters, validated before any work starts."""

    data: Path | None = None
    images: Path | None = None
    text: str = "bert"
    image: str = "vit"
    blip: str = "blip"
    rankers: list[Literal["nrms", "lightgbm"]] = Field(default_factory=lambda: ["nrms", "lightgbm"], min_length=1)
    sources: list[Literal["text", "image", "hadamard", "blip", "concat", "gated"]] = Field(
        default_factory=lambda: ["text", "image", "hadamard", "blip"], min_length=1
    )
    baselines: list[Literal["random", "popularity", "oracle"]] = Field(
        default_factory=lambda: ["random", "popularity", "oracle"]
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"
    epochs: int = Field(10, ge=1, le=100)
    tokens: bool = False
    seed: int = Field(0, ge=0)
    n_boot: int = Field(1000, ge=100, le=100_000)
    storage: Path | None = None
    scale: Literal["tiny", "small", "mind-small"] = "small"
    world_seed: int = Field(0, ge=0)
    name: str | None = None
    progress: bool = True


def run_label(ranker: str, source: str | None) -> str:
    return ranker if source is None else f"{ranker} · {SOURCE_LABEL[source]}"


def plan(params: CompareParams, data: Path) -> list[tuple[str, RankParams]]:
    """(label, rank params) for every run, text-only first within each ranker."""
    specs = {"text": params.text, "image": params.image, "blip": params.blip}
    order = sorted(params.sources, key=lambda s: s != "text")
    runs = []
    for ranker in params.rankers:
        for source in order:
            features = [specs[role] for role in roles_for(source)]
            runs.append((run_label(ranker, source), RankParams(
                data=data, images=params.images, features=features, fusion=source, ranker=ranker,
                device=params.device, epochs=params.epochs, tokens=params.tokens, seed=params.seed,
                storage=params.storage, progress=params.progress,
            )))
    for baseline in params.baselines:
        if baseline == "oracle" and not (data / "dev" / "click_probs.txt").is_file():
            continue  # real MIND has no known click probabilities
        runs.append((baseline, RankParams(data=data, images=params.images, ranker=baseline, seed=params.seed,
                                           storage=params.storage, progress=params.progress)))
    return runs


def build_report(params: CompareParams, data: Path, outcomes: list[tuple[str, object]]) -> dict:
    """Score every run on dev with intervals, pair each with its ranker's text-only run, slice."""
    from rankers.data import load_impressions
    from rankers.stats import slice_metrics
    from storage.catalogue import load_catalogue

    catalogue = load_catalogue(data, params.images)
    dev = load_impressions(data, "dev", catalogue)
    has_cover = np.fromiter((n in catalogue.images for n in catalogue.ids), dtype=bool, count=len(catalogue))
    scores = {label: np.load(Path(o.folder) / "scores_dev.npy") for label, o in outcomes}
    families: dict[str, list[str]] = {}
    for label, outcome in outcomes:
        family = outcome.ranker if outcome.ranker in params.rankers else "baselines"
        families.setdefault(family, []).append(label)
    main_ref = next((lbl for lbl, o in outcomes if o.fusion == "text" and o.ranker in params.rankers), outcomes[0][0])
    references: dict[str, str] = {}
    slices: dict[str, dict] = {}
    for family, labels in families.items():
        ref = next((lbl for lbl in labels if lbl.endswith("· text")), None)
        if ref is None:  # baselines are compared with the main text-only run
            ref, labels = main_ref, [main_ref, *labels]
        part = slice_metrics(
            dev.cand_offsets, dev.labels, {lbl: scores[lbl] for lbl in labels}, ref,
            history_lengths=dev.history_lengths, cand_items=dev.cand_items, has_cover=has_cover,
            n_boot=params.n_boot, seed=params.seed,
        )
        for sname, by_run in part.items():
            for lbl, entry in by_run.items():
                if lbl == main_ref and family == "baselines":
                    continue  # already there from its own family, paired with nothing
                slices.setdefault(sname, {})[lbl] = entry
        references.update({lbl: ref for lbl in labels if lbl != ref})
    runs = []
    for label, outcome in outcomes:
        fit = outcome.fit or {}
        sources = list(roles_for(outcome.fusion)) if outcome.ranker in params.rankers else [outcome.ranker]
        runs.append({
            "name": label, "ranker": outcome.ranker, "sources": sources,
            "fusion": outcome.fusion if outcome.ranker in params.rankers and outcome.fusion in ("hadamard", "concat", "gated") else None,
            "metrics": slices["all"][label]["metrics"], "impressions": slices["all"][label]["n"],
            "train_seconds": fit.get("seconds") or None, "train_impressions_per_s": fit.get("train_impressions_per_s") or None,
        })
    paired = {lbl: slices["all"][lbl]["delta"] for lbl in references if slices["all"][lbl]["delta"]}
    add_oracle_share(runs)
    return {
        "title": "Do images help news recommendation?",
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "dataset": {"name": catalogue.name, "root": str(catalogue.root), "news": len(catalogue),
                    "with cover": int(has_cover.sum()), "dev impressions": len(dev)},
        "reference": main_ref,
        "references": {k: v for k, v in references.items() if k in paired},
        "runs": runs,
        "paired": paired,
        "slices": {k: v for k, v in slices.items() if k != "all"},
        "bootstrap": {"n_boot": params.n_boot, "level": 0.95, "seed": params.seed},
        "notes": [
            "Each run is paired with the text-only run of the same ranker on the same dev impressions; "
            "baselines are paired with the first ranker's text-only run.",
            "Validation for early stopping is the last day of train; dev is only evaluated.",
        ] + (["Share of oracle lift: (AUC - random's AUC) / (oracle's AUC - random's AUC); the oracle ranks by "
              "the synthetic world's true click probabilities."] if any("oracle_share" in r for r in runs) else []),
        "config": json.loads(params.model_dump_json()),
    }


def add_oracle_share(runs: list[dict]) -> None:
    """Each run's share of the oracle's AUC lift over random, (AUC - random) / (oracle - random),
    as `oracle_share`, when both baselines ran (the synthetic world's yardstick)."""
    auc = {r["name"]: r["metrics"]["auc"]["value"] for r in runs}
    if "random" not in auc or "oracle" not in auc or auc["oracle"] <= auc["random"]:
        return
    for run in runs:
        run["oracle_share"] = (auc[run["name"]] - auc["random"]) / (auc["oracle"] - auc["random"])


def summary_table(report: dict) -> str:
    share = any("oracle_share" in run for run in report["runs"])
    lines = [f"{'run':<36} {'AUC':>7} {'MRR':>7} {'nDCG@5':>7} {'nDCG@10':>7}" + (f" {'lift':>6}" if share else "")
             + "  ΔAUC vs reference"]
    for run in report["runs"]:
        m = run["metrics"]
        delta = report["paired"].get(run["name"], {}).get("auc")
        d = f"{delta['diff']:+.4f} [{delta['lo']:+.4f}, {delta['hi']:+.4f}]" if delta else "reference" if run["name"] in report["references"].values() or run["name"] == report["reference"] else ""
        lift = f" {run['oracle_share']:6.0%}" if "oracle_share" in run else " " * 7 if share else ""
        lines.append(f"{run['name']:<36} {m['auc']['value']:7.4f} {m['mrr']['value']:7.4f} "
                     f"{m['ndcg@5']['value']:7.4f} {m['ndcg@10']['value']:7.4f}{lift}  {d}")
    if share:
        lines.append("lift: share of the oracle's AUC gain over random, (AUC - random) / (oracle - random)")
    return "\n".join(lines)


def build_flow():
    from prefect import flow, task
    from prefect.artifacts import create_markdown_artifact, create_table_artifact
    from prefect.cache_policies import NO_CACHE
    from prefect.states import Failed

    from flows.extract import ExtractParams, extract_task
    from flows.rank import rank_task
    from storage.reports import render_markdown, write_report

    extract_one, rank_one = extract_task(), rank_task()

    @task(name="report", cache_policy=NO_CACHE)
    def report_task(params: CompareParams, data: Path, outcomes: list):
        report = build_report(params, data, outcomes)
        name = params.name or f"{report['dataset']['name']}__{_dt.datetime.now(_dt.timezone.utc):%Y%m%d-%H%M%S}"
        folder = subdir("reports", params.storage) / name
        files = write_report(folder, report)
        create_markdown_artifact(render_markdown(report), key="comparison-report", description=str(folder))
        create_table_artifact(
            [{"run": r["name"], **{m: round(v["value"], 4) for m, v in r["metrics"].items()}} for r in report["runs"]],
            key="comparison-metrics", description="dev metrics per run",
        )
        return {"folder": str(folder), "files": {k: str(v) for k, v in files.items()}, "report": report}

    @flow(name="compare")
    def compare(params: CompareParams = CompareParams()):
        data = params.data or default_world(params.scale, params.world_seed, params.storage)
        roles = {role for src in params.sources for role in roles_for(src)}
        specs = {"text": params.text, "image": params.image, "blip": params.blip}
        for role in sorted(roles):
            extract_params = ExtractParams(data=data, images=params.images, extractors=[specs[role]], device=params.device,
                                           storage=params.storage, progress=params.progress)
            state = extract_one(specs[role], extract_params, data, return_state=True)
            if state.is_failed():
                return Failed(message=state.message)
        outcomes = []
        for label, rank_params in plan(params, data):
            state = rank_one(label, rank_params, data, return_state=True)
            if state.is_failed():
                return Failed(message=f"{label}: {state.message}")
            outcomes.append((label, state.result()))
        return report_task(params, data, outcomes)

    return compare


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m flows.compare",
        description="The main job: text-only against multimodal news recommendation on the same dev impressions, "
        "with bootstrap intervals, paired differences and slices, written as report.md, report.html, metrics.json "
        "and plots under <storage>/reports/<name>/. Without --data it runs on the synthetic small world with the "
        "tiny extractors.",
    )
    p.add_argument("--data", type=Path, help="MIND folder with train/ dev/ [test/] (default: the synthetic world)")
    p.add_argument("--images", type=Path, help="IM-MIND folder of <news_id>.jpg (default: DATA/images)")
    p.add_argument("--text", default="bert", metavar="bert[:CKPT]", help="text extractor (default bert:tiny)")
    p.add_argument("--image", default="vit", metavar="vit[:CKPT]", help="image extractor (default vit:tiny)")
    p.add_argument("--blip", default="blip", metavar="blip[:CKPT]", help="multimodal extractor (default blip:tiny)")
    p.add_argument("--rankers", default="nrms,lightgbm", help="comma-separated: nrms, lightgbm (default both)")
    p.add_argument("--sources", default="text,image,hadamard,blip",
                   help="comma-separated: text, image, hadamard, concat, gated, blip (default text,image,hadamard,blip)")
    p.add_argument("--baselines", default="random,popularity,oracle", help="comma-separated; oracle only on the synthetic world")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--epochs", type=int, default=10, help="maximum NRMS epochs (early stopping on validation)")
    p.add_argument("--tokens", action="store_true", help="NRMS attends over token vectors (slower; see flows.rank --help)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples for the intervals")
    p.add_argument("--storage", type=Path, help="storage root (default: $MMNEWS_STORAGE or ./storage)")
    p.add_argument("--scale", choices=["tiny", "small", "mind-small"], default="small", help="synthetic world scale when --data is absent")
    p.add_argument("--world-seed", type=int, default=0)
    p.add_argument("--name", help="report folder name (default: <dataset>__<UTC time>)")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = vars(build_parser().parse_args(argv))
    for key in ("rankers", "sources", "baselines"):
        args[key] = [x.strip() for x in args[key].split(",") if x.strip()]
    params = validated(CompareParams, args)
    if params.data is not None and not params.data.is_dir():
        raise PipelineError(f"data folder {params.data} does not exist; pass --data with a MIND folder, or leave it out")
    from extractors.checkpoints import ensure_available
    from extractors.registry import parse_spec

    for spec in (params.text, params.image, params.blip):
        ensure_available(*parse_spec(spec))
    state = build_flow()(params, return_state=True)
    if state.is_failed():
        raise PipelineError(state.message or "comparison failed")
    result = state.result()
    print(summary_table(result["report"]))
    print(f"\nreport: {result['files']['html']}\n        {result['files']['markdown']}")
    return 0


if __name__ == "__main__":
    run_cli(main)
