"""`python -m flows.compare`: the main job. Do images help news recommendation, and where?

Default: the synthetic small world, the three tiny extractors, both rankers (NRMS and
LightGBM) over the sources text, image, text+image (Hadamard) and BLIP, plus the random,
popularity and (on the synthetic world) oracle baselines. Every run is scored on the same
dev impressions; the report gives bootstrap intervals over impressions, paired differences
of each run from the text-only run of the same ranker, and slices by history length and by
candidates with and without a cover. It is written to `<storage>/reports/<name>/` as
report.md, report.html, metrics.json and PNG plots, and published as Prefect artifacts.

`--preset plm-nr|mtrec|zhao2024` replaces the ranker x source grid with a published
configuration (flows/presets.py): frozen and fine-tuned runs, MTRec's ablations, each paired
with the run the preset names, and the published numbers beside ours in the thesis-format
table (zhao2024 also writes `thesis.md`). `--titles FILE` (GENRE's enhanced titles) adds, for
every run that reads titles, a twin over the enhanced titles, labelled "· enhanced titles"
and paired with its original-titles run.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, Field, field_validator

from flows.common import default_world, subdir, validated
from flows.presets import PRESETS, PUBLISHED_FINETUNE, Preset, get_preset
from flows.rank import RankParams, role_specs, roles_for, split_mode
from storage.errors import PipelineError, run_cli

log = logging.getLogger(__name__)
SOURCES = ("text", "image", "hadamard", "blip", "concat", "gated")
SOURCE_LABEL = {
    "text": "text", "image": "image", "blip": "blip",
    "hadamard": "text+image (hadamard)", "concat": "text+image (concat)", "gated": "text+image (gated)",
}
EXTRACTOR_OF_ROLE = {"text": "bert", "image": "vit", "blip": "blip"}
DEFAULT_BASELINES = ("random", "popularity", "oracle")
ENHANCED = " · enhanced titles"


class CompareParams(BaseModel):
    """Run parameters, validated before any work starts."""

    data: Path | None = None
    images: Path | None = None
    titles: Path | None = None
    preset: Literal["plm-nr", "mtrec", "zhao2024"] | None = None
    text: str = "bert"
    image: str = "vit"
    blip: str = "blip"
    distil: str | None = None  # plm-nr's DistilBERT, e.g. bert:distilbert-base-uncased
    rankers: list[Literal["nrms", "lightgbm"]] = Field(default_factory=lambda: ["nrms", "lightgbm"], min_length=1)
    sources: list[Literal["text", "image", "hadamard", "blip", "concat", "gated"]] = Field(
        default_factory=lambda: ["text", "image", "hadamard", "blip"], min_length=1
    )
    # None: random, popularity and oracle, or the preset's own
    baselines: list[Literal["random", "popularity", "oracle"]] | None = None
    device: Literal["auto", "cpu", "cuda"] = "auto"
    epochs: int = Field(10, ge=1, le=100)
    finetune_epochs: int | None = Field(None, ge=1, le=100)  # None: 3, as published
    tokens: bool = False
    seed: int = Field(0, ge=0)
    n_boot: int = Field(1000, ge=100, le=100_000)
    storage: Path | None = None
    scale: Literal["tiny", "small", "mind-small"] = "small"
    world_seed: int = Field(0, ge=0)
    name: str | None = None
    progress: bool = True

    @field_validator("distil")
    @classmethod
    def _bert(cls, spec: str | None) -> str | None:
        if spec is not None and not spec.strip().lower().startswith("bert"):
            raise ValueError(f"{spec!r}: expected a text model spec, bert:CKPT (e.g. bert:distilbert-base-uncased)")
        return spec


@dataclass
class PlannedRun:
    """One run of a comparison: its label, its flows.rank parameters, the label of the run it
    is paired with in the report (None: the main reference), and whether it is a baseline."""

    label: str
    params: RankParams
    reference: str | None = None
    baseline: bool = False


def run_label(ranker: str, source: str | None) -> str:
    return ranker if source is None else f"{ranker} · {SOURCE_LABEL[source]}"


def baselines_of(params: CompareParams) -> list[str]:
    if params.baselines is not None:
        return list(params.baselines)
    return list(get_preset(params.preset).baselines if params.preset else DEFAULT_BASELINES)


def all_tiny(specs: Sequence[str]) -> bool:
    """Whether every one of these extractor specs is an embedded tiny model."""
    from extractors.registry import parse_spec

    return all(parse_spec(split_mode(s)[0])[1] == "tiny" for s in specs)


def plan(params: CompareParams, data: Path) -> list[PlannedRun]:
    """Every run of the comparison: the preset's, or each ranker x source (text-only first
    within each ranker, paired with it); then the baselines; then, with --titles, an
    enhanced-titles twin of every run that reads titles, paired with its original."""
    runs = _preset_runs(params, data, get_preset(params.preset)) if params.preset else _grid_runs(params, data)
    for baseline in baselines_of(params):
        if baseline == "oracle" and not (data / "dev" / "click_probs.txt").is_file():
            continue  # real MIND has no known click probabilities
        runs.append(PlannedRun(baseline, RankParams(data=data, images=params.images, ranker=baseline, seed=params.seed,
                                                    storage=params.storage, progress=params.progress), baseline=True))
    if params.titles is not None:
        twins = [PlannedRun(run.label + ENHANCED, run.params.model_copy(update={"titles": params.titles}), run.label)
                 for run in runs if not run.baseline and set(roles_for(run.params.fusion)) & {"text", "blip"}]
        runs += twins
    return runs


def _grid_runs(params: CompareParams, data: Path) -> list[PlannedRun]:
    specs = {"text": params.text, "image": params.image, "blip": params.blip}
    order = sorted(params.sources, key=lambda s: s != "text")
    runs = []
    for ranker in params.rankers:
        reference = run_label(ranker, "text") if "text" in params.sources else None
        for source in order:
            features = [specs[role] for role in roles_for(source)]
            label = run_label(ranker, source)
            runs.append(PlannedRun(label, RankParams(
                data=data, images=params.images, features=features, fusion=source, ranker=ranker,
                device=params.device, epochs=params.epochs, tokens=params.tokens, seed=params.seed,
                storage=params.storage, progress=params.progress,
            ), None if label == reference else reference))
    return runs


def _preset_runs(params: CompareParams, data: Path, preset: Preset) -> list[PlannedRun]:
    """The preset's runs as flows.rank parameters; a run whose text spec was not given
    (plm-nr's DistilBERT without --distil) is left out."""
    specs = {"text": params.text, "image": params.image, "blip": params.blip}
    runs = []
    for run in preset.runs:
        text = params.distil if run.text == "distil" else params.text
        if text is None:
            continue
        role_spec = {**specs, "text": text}
        options = dict(data=data, images=params.images, features=[role_spec[r] for r in roles_for(run.fusion)],
                       fusion=run.fusion, ranker="nrms", device=params.device, seed=params.seed,
                       storage=params.storage, progress=params.progress)
        if run.finetune:
            # Tiny checkpoints train at flows.rank's tiny scale; real ones as published.
            options.update(finetune=True, **({} if all_tiny(options["features"]) else run.published))
            if params.finetune_epochs is not None:
                options["epochs"] = params.finetune_epochs
            if run.mtrec is not None:
                options.update(mtrec=True, **run.mtrec)
        else:
            options.update(epochs=params.epochs, tokens=run.tokens or params.tokens)
        runs.append(PlannedRun(run.label, RankParams(**options), run.reference or
                               (None if run.label == preset.reference else preset.reference)))
    return runs


def main_reference(planned: list[PlannedRun], params: CompareParams) -> str:
    """The report's reference: the preset's, else the first ranker's text-only run, else the first run."""
    labels = [p.label for p in planned]
    if params.preset and get_preset(params.preset).reference in labels:
        return get_preset(params.preset).reference
    return next((p.label for p in planned if not p.baseline and p.params.fusion == "text" and not p.params.titles),
                labels[0])


def source_names(outcome) -> list[str]:
    """The report's sources of a run: its roles, marked where fine-tuned or read with enhanced titles."""
    names = []
    for role in roles_for(outcome.fusion):
        marks = (["fine-tuned"] if outcome.finetune else []) + (["enhanced titles"] if outcome.titles and role != "image" else [])
        names.append(role + (f" ({', '.join(marks)})" if marks else ""))
    return names


def model_name(outcome) -> str:
    if outcome.mtrec is not None:
        return "mtrec"
    return "plm-nr" if outcome.finetune else outcome.ranker


def build_report(params: CompareParams, data: Path, runs: list[tuple[PlannedRun, object]]) -> dict:
    """Score every run on dev with intervals, pair each with its reference, slice."""
    from rankers.data import load_impressions
    from rankers.stats import slice_metrics
    from storage.catalogue import load_catalogue

    catalogue = load_catalogue(data, params.images)
    dev = load_impressions(data, "dev", catalogue)
    has_cover = np.fromiter((n in catalogue.images for n in catalogue.ids), dtype=bool, count=len(catalogue))
    scores = {p.label: np.load(Path(o.folder) / "scores_dev.npy") for p, o in runs}
    main_ref = main_reference([p for p, _ in runs], params)
    references = {p.label: p.reference if p.reference in scores else main_ref for p, _ in runs if p.label != main_ref}
    # One bootstrap per reference over it and the runs paired with it. A run that is itself
    # paired (a reference with a reference) keeps the entry with its delta.
    groups: dict[str, list[str]] = {}
    for label, ref in references.items():
        groups.setdefault(ref, []).append(label)
    if not groups:
        groups[main_ref] = []
    slices: dict[str, dict] = {}
    for ref, labels in groups.items():
        part = slice_metrics(
            dev.cand_offsets, dev.labels, {lbl: scores[lbl] for lbl in [ref, *labels]}, ref,
            history_lengths=dev.history_lengths, cand_items=dev.cand_items, has_cover=has_cover,
            n_boot=params.n_boot, seed=params.seed,
        )
        for sname, by_run in part.items():
            out = slices.setdefault(sname, {})
            for lbl, entry in by_run.items():
                if lbl != ref or lbl not in out:
                    out[lbl] = entry
    report_runs = []
    for planned, outcome in runs:
        fit = outcome.fit or {}
        label = planned.label
        report_runs.append({
            "name": label, "ranker": model_name(outcome),
            "sources": [outcome.ranker] if planned.baseline else source_names(outcome),
            "fusion": outcome.fusion if not planned.baseline and outcome.fusion in ("hadamard", "concat", "gated") else None,
            "metrics": slices["all"][label]["metrics"], "impressions": slices["all"][label]["n"],
            "train_seconds": fit.get("seconds") or None, "train_impressions_per_s": fit.get("train_impressions_per_s") or None,
        })
    # Slices list runs in the report's order.
    slices = {s: {p.label: by_run[p.label] for p, _ in runs if p.label in by_run} for s, by_run in slices.items()}
    paired = {lbl: slices["all"][lbl]["delta"] for lbl in references if slices["all"][lbl]["delta"]}
    add_oracle_share(report_runs)
    preset = get_preset(params.preset) if params.preset else None
    notes = [
        "Each run is paired with the text-only run of the same ranker on the same dev impressions; "
        "baselines are paired with the first ranker's text-only run." if preset is None else
        f"Preset {preset.name}: each run is paired with the run named in the paired table; baselines with {main_ref}.",
        "Validation for early stopping is the last day of train; dev is only evaluated.",
    ]
    if preset is not None:
        notes += list(preset.notes)
        tuned = [p.params for p, _ in runs if p.params.finetune]
        if tuned:
            scale = ("the tiny scale (embedded tiny models; flows.rank's TINY_FINETUNE_HEAD)"
                     if all(all_tiny(p.features) for p in tuned) else f"as published, {PUBLISHED_FINETUNE}")
            notes.append(f"Fine-tuning hyperparameters: {scale}"
                         + (f"; at most {params.finetune_epochs} epochs" if params.finetune_epochs else "") + ".")
        skipped = [r.label for r in preset.runs if r.label not in scores]
        if skipped:
            notes.append(f"Not run: {', '.join(skipped)} (give --distil bert:CKPT with a DistilBERT checkpoint; "
                         "the tiny models have no distilled counterpart).")
    if params.titles is not None:
        enhanced = next((o.titles for p, o in runs if o.titles), str(params.titles))
        notes.append(f"Runs marked '{ENHANCED.strip(' ·')}' read the titles of {enhanced} (GENRE's enhanced titles) "
                     "instead of the dataset's, for text and BLIP; each is paired with its original-titles run.")
    notes += ["Share of oracle lift: (AUC - random's AUC) / (oracle's AUC - random's AUC); the oracle ranks by "
              "the synthetic world's true click probabilities."] if any("oracle_share" in r for r in report_runs) else []
    report = {
        "title": preset.title if preset else "Do images help news recommendation?",
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "dataset": {"name": catalogue.name, "root": str(catalogue.root), "news": len(catalogue),
                    "with cover": int(has_cover.sum()), "dev impressions": len(dev)},
        "reference": main_ref,
        "references": {k: v for k, v in references.items() if k in paired},
        "runs": report_runs,
        "paired": paired,
        "slices": {k: v for k, v in slices.items() if k != "all"},
        "bootstrap": {"n_boot": params.n_boot, "level": 0.95, "seed": params.seed},
        "notes": notes,
        "config": json.loads(params.model_dump_json()),
    }
    if preset is not None and preset.published:
        report["baselines"] = [dict(p) for p in preset.published]
    return report


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
    width = max([36] + [len(run["name"]) for run in report["runs"]])
    lines = [f"{'run':<{width}} {'AUC':>7} {'MRR':>7} {'nDCG@5':>7} {'nDCG@10':>7}" + (f" {'lift':>6}" if share else "")
             + f"  ΔAUC vs {report['reference']} (unless noted), 95% CI"]
    for run in report["runs"]:
        m = run["metrics"]
        delta = report["paired"].get(run["name"], {}).get("auc")
        d = f"{delta['diff']:+.4f} [{delta['lo']:+.4f}, {delta['hi']:+.4f}]" if delta else "reference" if run["name"] in report["references"].values() or run["name"] == report["reference"] else ""
        if delta and report["references"].get(run["name"], report["reference"]) != report["reference"]:
            d += f" vs {report['references'][run['name']]}"
        lift = f" {run['oracle_share']:6.0%}" if "oracle_share" in run else " " * 7 if share else ""
        lines.append(f"{run['name']:<{width}} {m['auc']['value']:7.4f} {m['mrr']['value']:7.4f} "
                     f"{m['ndcg@5']['value']:7.4f} {m['ndcg@10']['value']:7.4f}{lift}  {d}")
    if share:
        lines.append("lift: share of the oracle's AUC gain over random, (AUC - random) / (oracle - random)")
    return "\n".join(lines)


def extractions(planned: list[PlannedRun]) -> list[tuple[str, Path | None]]:
    """(spec, titles file or None) of every frozen store the planned runs read, each once.
    Image stores are the original catalogue's whatever the titles (see flows.rank)."""
    out: list[tuple[str, Path | None]] = []
    for run in planned:
        p = run.params
        if run.baseline or p.finetune:
            continue
        for role, spec in role_specs(p).items():
            spec, mode = split_mode(spec)
            job = (spec, None if role == "image" else p.titles)
            if mode == "frozen" and job not in out:
                out.append(job)
    return out


def build_flow():
    from prefect import flow, task
    from prefect.artifacts import create_markdown_artifact, create_table_artifact
    from prefect.cache_policies import NO_CACHE
    from prefect.states import Failed

    from flows.extract import ExtractParams, extract_task
    from flows.presets import thesis_markdown
    from flows.rank import rank_task
    from storage.reports import render_markdown, write_report

    extract_one, rank_one = extract_task(), rank_task()

    @task(name="report", cache_policy=NO_CACHE)
    def report_task(params: CompareParams, data: Path, runs: list):
        report = build_report(params, data, runs)
        default = f"{report['dataset']['name']}__" + (f"{params.preset}__" if params.preset else "")
        name = params.name or f"{default}{_dt.datetime.now(_dt.timezone.utc):%Y%m%d-%H%M%S}"
        folder = subdir("reports", params.storage) / name
        files = write_report(folder, report)
        if params.preset and get_preset(params.preset).thesis:
            files["thesis"] = folder / "thesis.md"
            files["thesis"].write_text(thesis_markdown(report, get_preset(params.preset)))
        create_markdown_artifact(render_markdown(report), key="comparison-report", description=str(folder))
        create_table_artifact(
            [{"run": r["name"], **{m: round(v["value"], 4) for m, v in r["metrics"].items()}} for r in report["runs"]],
            key="comparison-metrics", description="dev metrics per run",
        )
        return {"folder": str(folder), "files": {k: str(v) for k, v in files.items()}, "report": report}

    @flow(name="compare")
    def compare(params: CompareParams = CompareParams()):
        data = params.data or default_world(params.scale, params.world_seed, params.storage)
        planned = plan(params, data)
        for spec, titles in extractions(planned):
            extract_params = ExtractParams(data=data, images=params.images, titles=titles, extractors=[spec],
                                           device=params.device, storage=params.storage, progress=params.progress)
            state = extract_one(spec, extract_params, data, return_state=True)
            if state.is_failed():
                return Failed(message=state.message)
        runs = []
        for run in planned:
            state = rank_one(run.label, run.params, data, return_state=True)
            if state.is_failed():
                return Failed(message=f"{run.label}: {state.message}")
            runs.append((run, state.result()))
        return report_task(params, data, runs)

    return compare


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m flows.compare",
        description="The main job: text-only against multimodal news recommendation on the same dev impressions, "
        "with bootstrap intervals, paired differences and slices, written as report.md, report.html, metrics.json "
        "and plots under <storage>/reports/<name>/. Without --data it runs on the synthetic small world with the "
        "tiny extractors.",
        epilog="Presets: plm-nr (NRMS over frozen BERT; PLM-NR: NRMS + BERT fine-tuned; + DistilBERT with --distil), "
        "mtrec (fine-tuned BERT, MTRec, MTRec without category / NER / surgery), zhao2024 (the thesis's four "
        "experiments with random, its table in thesis.md with our intervals). With the tiny default extractors "
        "fine-tuning runs at a tiny scale; with real checkpoints at the published settings (3 epochs, lr 1e-4, "
        "encoder 2e-5, batch 128). Example: python -m flows.compare --preset zhao2024 --data ~/MIND-small "
        "--images ~/IM-MIND --text bert:bert-base-uncased --image vit:vit_base_patch16_224 --blip "
        "blip:Salesforce/blip-itm-base-coco --device cuda",
    )
    p.add_argument("--data", type=Path, help="MIND folder with train/ dev/ [test/] (default: the synthetic world)")
    p.add_argument("--images", type=Path, help="IM-MIND folder of <news_id>.jpg (default: DATA/images)")
    p.add_argument("--preset", choices=sorted(PRESETS),
                   help="a published configuration instead of the ranker x source grid (see below)")
    p.add_argument("--titles", type=Path, metavar="FILE",
                   help="news_id<TAB>title file (GENRE's enhanced titles): every run that reads titles gets a twin "
                   "over them, labelled '· enhanced titles' and paired with its original")
    p.add_argument("--text", default="bert", metavar="bert[:CKPT]", help="text extractor (default bert:tiny)")
    p.add_argument("--image", default="vit", metavar="vit[:CKPT]", help="image extractor (default vit:tiny)")
    p.add_argument("--blip", default="blip", metavar="blip[:CKPT]", help="multimodal extractor (default blip:tiny)")
    p.add_argument("--distil", metavar="bert:CKPT", help="plm-nr: the DistilBERT to fine-tune as well")
    p.add_argument("--rankers", help="comma-separated: nrms, lightgbm (default both; not with --preset)")
    p.add_argument("--sources",
                   help="comma-separated: text, image, hadamard, concat, gated, blip (default text,image,hadamard,blip; "
                   "not with --preset)")
    p.add_argument("--baselines", help="comma-separated: random, popularity, oracle (default all three, oracle only on "
                   "the synthetic world; a preset's own: zhao2024 random)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--epochs", type=int, default=10, help="maximum epochs of NRMS over stores (early stopping on validation)")
    p.add_argument("--finetune-epochs", type=int, help="maximum epochs of fine-tuned runs (default 3, as published)")
    p.add_argument("--tokens", action="store_true", help="NRMS attends over token vectors (slower; see flows.rank --help)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples for the intervals")
    p.add_argument("--storage", type=Path, help="storage root (default: $MMNEWS_STORAGE or ./storage)")
    p.add_argument("--scale", choices=["tiny", "small", "mind-small"], default="small", help="synthetic world scale when --data is absent")
    p.add_argument("--world-seed", type=int, default=0)
    p.add_argument("--name", help="report folder name (default: <dataset>__[<preset>__]<UTC time>)")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = vars(build_parser().parse_args(argv))
    if args["preset"] and (args["rankers"] is not None or args["sources"] is not None):
        raise PipelineError(f"--preset {args['preset']} defines its own runs; drop --rankers and --sources")
    for key in ("rankers", "sources", "baselines"):
        if args[key] is None:
            args.pop(key)
        else:
            args[key] = [x.strip() for x in args[key].split(",") if x.strip()]
    params = validated(CompareParams, args)
    if params.data is not None and not params.data.is_dir():
        raise PipelineError(f"data folder {params.data} does not exist; pass --data with a MIND folder, or leave it out")
    if params.titles is not None and not params.titles.is_file():
        raise PipelineError(f"titles file {params.titles} does not exist; pass --titles with a news_id<TAB>title file")
    if params.distil is not None and params.preset != "plm-nr":
        raise PipelineError("--distil is the DistilBERT of --preset plm-nr; drop it, or add --preset plm-nr")
    from extractors.checkpoints import ensure_available
    from extractors.registry import parse_spec

    for spec in (params.text, params.image, params.blip, params.distil):
        if spec is not None:
            ensure_available(*parse_spec(spec))
    state = build_flow()(params, return_state=True)
    if state.is_failed():
        raise PipelineError(state.message or "comparison failed")
    result = state.result()
    print(summary_table(result["report"]))
    if "thesis" in result["files"]:
        print("\n" + Path(result["files"]["thesis"]).read_text())
    print(f"\nreport: {result['files']['html']}\n        {result['files']['markdown']}")
    return 0


if __name__ == "__main__":
    run_cli(main)
