"""The comparison: do images help news recommendation, and where?

`plan(params, data)` (in runs.params, whose CompareParams validator calls it; re-exported
here) turns a comparison's parameters into its ranking runs: each ranker x source (labels
from the fusion registry, text-only first within a ranker and every run of
that ranker paired with it), or a preset's runs (runs.presets); then the baselines; then,
with `titles`, an enhanced-titles twin of every run that reads titles, paired with its
original. Every run's RankParams is built, so a combination no ranker supports fails here,
when the parameters are validated, before any work. `extractions` lists the frozen stores
the runs read (extracted first, each once).

`build_report` scores every run on the same dev impressions: bootstrap intervals, paired
differences of each run from its reference, slices by history length and by candidates with
and without a cover, and each run's share of the oracle's lift; the result is a typed
runs.report.Report.
"""

from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path

import numpy as np

from rankers.fusion import roles_of
from runs.params import (  # the plan lives with the parameters it validates; re-exported here
    CONTROL, DEFAULT_BASELINES, ENHANCED, LIGHTGBM_OPTIONS, CompareParams, PlannedRun, all_tiny, baselines_of, cores,
    default_jobs, grid_reference, plan, reads_images, run_label, split_mode, thread_share,
)
from runs.presets import PUBLISHED_FINETUNE, get_preset
from runs.report import Report
from runs.workspace import Workspace

def main_reference(planned: list[PlannedRun], params: CompareParams) -> str:
    """The report's reference: the preset's, else the first ranker's text-only run, else the first run."""
    labels = [p.label for p in planned]
    if params.preset and get_preset(params.preset).reference in labels:
        return get_preset(params.preset).reference
    return next((p.label for p in planned if not p.baseline and p.params.fusion == "text" and not p.params.titles),
                labels[0])


def extractions(planned: list[PlannedRun]) -> list[tuple[str, Path | None]]:
    """(spec, titles file or None) of every frozen store the planned runs read, each once.
    Image stores are the original catalogue's whatever the titles (see runs.rank)."""
    out: list[tuple[str, Path | None]] = []
    for run in planned:
        for role, spec in run.params.stores.items():
            spec, mode = split_mode(spec)
            job = (spec, None if role == "image" else run.params.titles)
            if mode == "frozen" and job not in out:
                out.append(job)
    return out


def source_names(outcome) -> list[str]:
    """The report's sources of a run: its roles, marked where fine-tuned or read with enhanced titles."""
    names = []
    for role in roles_of(outcome.fusion):
        marks = (["fine-tuned"] if outcome.finetune else []) + (["enhanced titles"] if outcome.titles and role != "image" else [])
        names.append(role + (f" ({', '.join(marks)})" if marks else ""))
    return names


def model_name(outcome) -> str:
    if outcome.mtrec is not None:
        return "mtrec"
    return "plm-nr" if outcome.finetune else outcome.ranker


def build_report(params: CompareParams, workspace: Workspace, runs: list[tuple[PlannedRun, list]]) -> Report:
    """Score every run on dev with intervals, pair each with its reference, slice. `runs`
    pairs each planned run with the outcomes of its seeds, in `PlannedRun.seeds` order; a run
    of several seeds gets the two-level bootstrap (rankers.stats), paired seed by seed."""
    from rankers.stats import slice_metrics

    data = workspace.data_dir(params.data, params.scale, params.world_seed)
    catalogue = workspace.catalogue(data, params.images)
    dev = workspace.impressions(data, "dev", catalogue)
    has_cover = np.fromiter((n in catalogue.images for n in catalogue.ids), dtype=bool, count=len(catalogue))
    scores = {p.label: np.stack([np.load(Path(o.folder) / "scores_dev.npy") for o in outcomes])
              for p, outcomes in runs}  # (S, T) each
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
    for planned, outcomes in runs:
        outcome = outcomes[0]
        fits = [o.fit or {} for o in outcomes]
        label = planned.label
        multimodal = not planned.baseline and len(roles_of(outcome.fusion)) > 1
        entry = {
            "name": label, "ranker": model_name(outcome),
            "sources": [outcome.ranker] if planned.baseline else source_names(outcome),
            "fusion": outcome.fusion if multimodal else None,
            "metrics": slices["all"][label]["metrics"], "impressions": slices["all"][label]["n"],
            "train_seconds": _mean([f.get("seconds") for f in fits]),
            "train_impressions_per_s": _mean([f.get("train_impressions_per_s") for f in fits]),
        }
        if "seeds" in slices["all"][label]:
            entry["seeds"] = [{"seed": s, "metrics": m} for s, m in zip(planned.seeds, slices["all"][label]["seeds"])]
        report_runs.append(entry)
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
            scale = ("the tiny scale (embedded tiny models; runs.rank's TINY_FINETUNE_HEAD)"
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
    warning = workspace.covers(catalogue, params.allow_no_images) if any(
        reads_images(p.params.stores.values()) for p, _ in runs) else None
    if warning:
        notes.append(f"Covers: {warning}.")
    if params.seeds > 1:
        notes.append(
            f"Every trained run was trained {params.seeds} times, with seeds {params.seed} to "
            f"{params.seed + params.seeds - 1}, on the same stores; its value is the mean over seeds, and each "
            "seed's own value is listed. Intervals come from a two-level bootstrap: each resample draws the seeds "
            "with replacement and, independently, the dev impressions, and averages the drawn seeds' means over the "
            "drawn impressions; a paired difference takes each seed of a run against the same seed of its "
            "reference. So the intervals cover both which impressions were drawn and which seeds were trained "
            f"(with {params.seeds} seeds the seed part is a rough estimate, narrow rather than wide).")
        same = [p.label for p, _ in runs if len(scores[p.label]) > 1 and (scores[p.label] == scores[p.label][0]).all()]
        if same:
            notes.append(
                f"Seeds that changed nothing: {', '.join(same)} gave the same scores with every seed (training "
                "that draws nothing at random, as LightGBM with --lgbm-bagging 1: no bagging, every row kept), so "
                "their intervals and differences cover the dev impressions only.")
    notes += ["Share of oracle lift: (AUC - random's AUC) / (oracle's AUC - random's AUC); the oracle ranks by "
              "the synthetic world's true click probabilities."] if any("oracle_share" in r for r in report_runs) else []
    report = {
        "title": preset.title if preset else "Do images help news recommendation?",
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "dataset": {"name": catalogue.name, "root": str(catalogue.root), "news": len(catalogue),
                    "with cover": int(has_cover.sum()), "cover share": f"{catalogue.cover_share:.1%}",
                    "dev impressions": len(dev)},
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
    report["questions"] = questions(runs, references, paired)
    if report["questions"]:
        notes.insert(0, "The two questions: does having a cover help (each ranker's text+cover run, which knows only "
                     "whether a news has a cover, against its text run), and does the cover's content help beyond "
                     "that (its text+image runs against its text+cover run)? The headline answers the second.")
    return Report.parse(report)


def questions(runs: list[tuple[PlannedRun, list]], references: dict[str, str], paired: dict) -> list[dict]:
    """The report's two questions, per ranker, from the paired AUC differences (see
    runs.report.Question): presence = text+cover vs text, content = text+image vs text+cover."""
    fusion = {p.label: p.params.fusion for p, _ in runs if not p.baseline}
    ranker = {p.label: p.params.ranker for p, _ in runs if not p.baseline}
    out = []
    for label, ref in references.items():
        delta = (paired.get(label) or {}).get("auc")
        if label not in fusion or ref not in fusion or delta is None:
            continue
        if fusion[label] == CONTROL and fusion[ref] == "text":
            kind = "presence"
        elif fusion[ref] == CONTROL and {"text", "image"} <= set(roles_of(fusion[label])):
            kind = "content"
        else:
            continue
        lo, hi = delta.get("lo"), delta.get("hi")
        answer = ("undecided" if lo is None or hi is None or lo != lo else
                  "yes" if lo > 0 else "hurts" if hi < 0 else "no")
        out.append({"kind": kind, "ranker": ranker[label], "run": label, "reference": ref, "auc": delta,
                    "answer": answer})
    return sorted(out, key=lambda q: q["kind"] != "content")


def _mean(values: list) -> float | None:
    known = [float(v) for v in values if v]
    return sum(known) / len(known) if known else None


def add_oracle_share(runs: list[dict]) -> None:
    """Each run's share of the oracle's AUC lift over random, (AUC - random) / (oracle - random),
    as `oracle_share`, when both baselines ran (the synthetic world's yardstick)."""
    auc = {r["name"]: r["metrics"]["auc"]["value"] for r in runs}
    if "random" not in auc or "oracle" not in auc or auc["oracle"] <= auc["random"]:
        return
    for run in runs:
        run["oracle_share"] = (auc[run["name"]] - auc["random"]) / (auc["oracle"] - auc["random"])


def summary_table(report: Report) -> str:
    """The comparison as a fixed-width table for the terminal."""
    runs = report.runs
    share = any(run.oracle_share is not None for run in runs)
    width = max([36] + [len(run.name) for run in runs])
    lines = [f"{'run':<{width}} {'AUC':>7} {'MRR':>7} {'nDCG@5':>7} {'nDCG@10':>7}" + (f" {'lift':>6}" if share else "")
             + f"  ΔAUC vs {report.reference} (unless noted), 95% CI"]
    for run in runs:
        m = run.metrics
        delta = report.paired.get(run.name, {}).get("auc")
        ref = report.references.get(run.name, report.reference)
        if delta and delta.diff is not None:
            d = f"{delta.diff:+.4f} [{_pm(delta.lo)}, {_pm(delta.hi)}]" + (f" vs {ref}" if ref != report.reference else "")
        elif run.name == report.reference or run.name in report.references.values():
            d = "reference"
        else:
            d = ""
        lift = f" {run.oracle_share:6.0%}" if run.oracle_share is not None else " " * 7 if share else ""
        lines.append(f"{run.name:<{width}} {_v(m['auc'].value)} {_v(m['mrr'].value)} "
                     f"{_v(m['ndcg@5'].value)} {_v(m['ndcg@10'].value)}{lift}  {d}")
    if share:
        lines.append("lift: share of the oracle's AUC gain over random, (AUC - random) / (oracle - random)")
    from runs.render import question_sentences

    lines += ["", *(s for s, _ in question_sentences(report.model_dump()))]
    return "\n".join(lines).rstrip()


def _v(x: float | None) -> str:
    return f"{x:7.4f}" if x is not None else f"{'—':>7}"


def _pm(x: float | None) -> str:
    return f"{x:+.4f}" if x is not None else "—"
