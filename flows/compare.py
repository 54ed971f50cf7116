"""`python -m flows.compare`: the main job. Do images help news recommendation, and where?

Default: the synthetic small world, the three tiny extractors, both rankers (NRMS and
LightGBM) over the sources text, image, text+image (Hadamard) and BLIP, plus the random,
popularity and (on the synthetic world) oracle baselines. Every run is scored on the same
dev impressions; the report gives bootstrap intervals over impressions, paired differences
of each run from the text-only run of the same ranker, and slices by history length and by
candidates with and without a cover. It is written to `<storage>/reports/<name>/` as
report.md, report.html, metrics.json and PNG plots, and published as Prefect artifacts.

`--preset plm-nr|mtrec|zhao2024` replaces the ranker x source grid with a published
configuration (runs/presets.py). `--titles FILE` (GENRE's enhanced titles) adds, for every
run that reads titles, a twin over the enhanced titles, paired with its original. The plan
(runs.compare) is validated with the parameters, before Prefect starts; the work is the run
layer's: one workspace for the whole comparison, so every dataset file is read once.
"""

from __future__ import annotations

import argparse
import datetime as _dt
from collections.abc import Sequence
from pathlib import Path

from flows.common import add_allow_no_images, add_lightgbm_options, add_world_options, guarded, run_flow, validated
from runs.params import CompareParams
from storage import atomic
from storage.errors import run_cli
from storage.paths import safe_name, storage_path


def build_flow():
    from prefect import flow, task
    from prefect.artifacts import create_markdown_artifact, create_table_artifact
    from prefect.cache_policies import NO_CACHE
    from prefect.states import Failed

    from flows.common import IN_PROCESS, Job, run_graph
    from flows.extract import extract_task
    from flows.pretrain import pretrain_task
    from flows.rank import rank_task
    from runs.compare import PlannedRun, build_report, cores, default_jobs, extractions, plan, thread_share
    from runs.isolated import close_idle
    from runs.params import ExtractParams
    from runs.pretrain import TEXT_INIT, kinds_needed
    from runs.presets import get_preset, thesis_markdown
    from runs.render import render_markdown
    from runs.render import write_report
    from runs.workspace import Workspace

    extract_one, rank_one, pretrain_one = extract_task(), rank_task(), pretrain_task()

    def write(params: CompareParams, workspace, runs: list):
        report = build_report(params, workspace, runs)
        default = f"{report.dataset['name']}__" + (f"{params.preset}__" if params.preset else "")
        name = params.name or safe_name(f"{default}{_dt.datetime.now(_dt.timezone.utc):%Y%m%d-%H%M%S}")
        folder = storage_path("reports", name, storage=params.storage, parameter="--name", writable=True)
        files = write_report(folder, report)
        if params.preset and get_preset(params.preset).thesis:
            files["thesis"] = atomic.write_text(folder / "thesis.md",
                                                thesis_markdown(report.model_dump(), get_preset(params.preset)))
        create_markdown_artifact(render_markdown(report), key="comparison-report", description=str(folder))
        create_table_artifact(
            [{"run": r.name, **{m: round(v.value, 4) if v.value is not None else None for m, v in r.metrics.items()}}
             for r in report.runs],
            key="comparison-metrics", description="dev metrics per run",
        )
        return {"folder": str(folder), "files": {k: str(v) for k, v in files.items()}, "report": report}

    @task(name="report", cache_policy=NO_CACHE)
    def report_task(params: CompareParams, workspace, runs: list):
        return guarded(write, params, workspace, runs)

    @flow(name="compare")
    def compare(params: CompareParams = CompareParams()):
        workspace = Workspace(params.storage)
        data = workspace.data_dir(params.data, params.scale, params.world_seed)
        planned = plan(params, data)
        calls = [(label, replica) for run in planned for label, replica in run.replicas()]
        try:
            states = run_graph(graph(params, data, workspace, planned, calls), params.jobs or cores())
        finally:
            close_idle()  # the ranking and pre-training children, kept between jobs (runs.isolated)
        for key, state in states.items():
            if key[0] != "rank" and state is not None and not state.is_completed():
                return Failed(message=f"pretrain {key[1]}: {state.message}" if key[0] == "pretrain" else state.message)
        for i, (label, _) in enumerate(calls):
            state = states[("rank", i)]
            if state is None or not state.is_completed():
                return Failed(message=f"{label}: {state.message if state is not None else 'not run'}")
        outcomes = iter(states[("rank", i)].result() for i in range(len(calls)))
        runs = [(run, [next(outcomes) for _ in run.seeds]) for run in planned]
        state = report_task(params, workspace, runs, return_state=True)
        if state.is_failed():
            return Failed(message=state.message)
        return state.result()

    def graph(params: CompareParams, data, workspace, planned, calls) -> list[Job]:
        """The comparison's work as jobs, each started as soon as what it needs is there: the
        tiny encoders pre-trained on this data (side by side, BLIP after the BERT it starts
        from), each store extracted once its encoder is trained (in this process's main
        thread, where Ctrl+C and SIGTERM reach it), each ranking run once its stores exist. On
        two cores or more the ranking runs and pre-training take one core each in processes
        of their own, so the text runs train while BLIP still pre-trains; with one job at a
        time (a GPU) a run trains in this process after every store is there."""
        slots = params.jobs or cores()
        kinds = kinds_needed(spec for run in planned for spec in run.params.extractor_specs)
        first = [k for k in kinds if k not in TEXT_INIT]
        together = min(len(first), slots)
        jobs = []
        for kind in kinds:
            if kind in TEXT_INIT:  # after the kind it starts from; one core when others run beside it
                threads = 1 if slots > 1 else None
                after = (("pretrain", TEXT_INIT[kind]),)
            else:
                threads = max(1, cores() // together) if together > 1 else None
                after = ()
            progress = params.progress and threads is None
            jobs.append(Job(("pretrain", kind), pretrain_one, (kind, data, params.images, params.storage, progress, threads),
                            after, None if threads else IN_PROCESS, fatal=True, here=threads is None))
        for spec, titles in extractions(planned):
            extract_params = ExtractParams(data=data, images=params.images, titles=titles, extractors=[spec],
                                           device=params.device, storage=params.storage, progress=params.progress,
                                           allow_no_images=params.allow_no_images)
            jobs.append(Job(("extract", spec, titles), extract_one, (spec, extract_params, workspace),
                            tuple(("pretrain", k) for k in kinds_needed([spec])), IN_PROCESS, fatal=True, here=True))
        everything = tuple(job.key for job in jobs)
        # One run at a time (a GPU, --jobs 1): in this process.
        threads = thread_share(params) if min(default_jobs(params), len(calls)) > 1 else None
        for i, (label, replica) in enumerate(calls):
            needs = tuple(("extract", spec, titles) for spec, titles in extractions([PlannedRun(label, replica)]))
            jobs.append(Job(("rank", i), rank_one, (label, replica, workspace, threads),
                            needs if threads else everything, None if threads else IN_PROCESS, here=threads is None))
        return jobs

    return compare


def build_parser() -> argparse.ArgumentParser:
    from rankers.fusion import available as fusions
    from rankers.registry import baseline_rankers, trained_rankers
    from runs.params import DEFAULT_EXTRACTORS, DEFAULT_SOURCES
    from runs.presets import PRESETS

    p = argparse.ArgumentParser(
        prog="python -m flows.compare",
        description="The main job: text-only against multimodal news recommendation on the same dev impressions, "
        "with bootstrap intervals, paired differences and slices, written as report.md, report.html, metrics.json "
        "and plots under <storage>/reports/<name>/. Without --data it runs on the synthetic small world with the "
        "tiny extractors pre-trained on its train news (pre-trained first when missing).",
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
    p.add_argument("--text", default=DEFAULT_EXTRACTORS[0], metavar="bert[:CKPT]",
                   help=f"text extractor (default {DEFAULT_EXTRACTORS[0]}: the tiny BERT pre-trained on this data's "
                   "train news, see flows.pretrain; bert:tiny is the random one)")
    p.add_argument("--image", default=DEFAULT_EXTRACTORS[1], metavar="vit[:CKPT]",
                   help=f"image extractor (default {DEFAULT_EXTRACTORS[1]})")
    p.add_argument("--blip", default=DEFAULT_EXTRACTORS[2], metavar="blip[:CKPT]",
                   help=f"multimodal extractor (default {DEFAULT_EXTRACTORS[2]})")
    p.add_argument("--distil", metavar="bert:CKPT", help="plm-nr: the DistilBERT to fine-tune as well")
    p.add_argument("--rankers", help=f"comma-separated: {', '.join(trained_rankers())} (default nrms,lightgbm; "
                   "not with --preset)")
    p.add_argument("--sources", help=f"comma-separated fusions: {', '.join(fusions())} (default "
                   f"{','.join(DEFAULT_SOURCES)}; not with --preset); each ranker trains on the ones it supports "
                   "(rankers/registry.py). text+cover knows only whether a news has a cover: text+image runs are "
                   "paired with it (does the content help?), it with text (does having a cover help?)")
    p.add_argument("--baselines", help=f"comma-separated: {', '.join(baseline_rankers())} (default all three, oracle "
                   "only on the synthetic world; a preset's own: zhao2024 random)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--epochs", type=int, default=10, help="maximum epochs of NRMS over stores (early stopping on validation)")
    p.add_argument("--finetune-epochs", type=int, help="maximum epochs of fine-tuned runs (default 3, as published)")
    p.add_argument("--tokens", action="store_true", help="NRMS attends over token vectors (slower; see flows.rank --help)")
    p.add_argument("--score-test", action="store_true",
                   help="also write each run's prediction_test.txt when the dataset has a test split (the report "
                   "reads dev only)")
    add_allow_no_images(p)
    add_lightgbm_options(p)
    p.add_argument("--seed", type=int, default=0, help="ranker seed (and the bootstrap's)")
    p.add_argument("--seeds", type=int, default=1, metavar="N",
                   help="train every ranker run N times, with seeds SEED to SEED+N-1, on the same stores; the report "
                   "shows each seed and intervals over seeds and impressions (default 1)")
    p.add_argument("--jobs", type=int, metavar="N",
                   help="ranking runs trained at once (default: one per core on a CPU, each run single-threaded; "
                   "1 with --device cuda)")
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples for the intervals")
    p.add_argument("--name", help="report folder name (default: <dataset>__[<preset>__]<UTC time>)")
    add_world_options(p)
    return p


def parse_params(argv: Sequence[str] | None) -> CompareParams:
    args = vars(build_parser().parse_args(argv))
    for key in ("rankers", "sources", "baselines"):
        if args[key] is None:
            args.pop(key)
        else:
            args[key] = [x.strip() for x in args[key].split(",") if x.strip()]
    return validated(CompareParams, args)


def main(argv: Sequence[str] | None = None) -> int:
    from flows.server import stop_on_sigterm
    from runs.compare import summary_table

    stop_on_sigterm()
    params = parse_params(argv)
    result = run_flow(build_flow, params, "comparison")
    print(summary_table(result["report"]))
    if "thesis" in result["files"]:
        print("\n" + Path(result["files"]["thesis"]).read_text())
    print(f"\nreport: {result['files']['html']}\n        {result['files']['markdown']}")
    return 0


if __name__ == "__main__":
    run_cli(main)
