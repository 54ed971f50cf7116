"""`python -m flows.pretrain`: the tiny encoders pre-trained on the dataset's own train news.

BERT by masked-language modelling on the train titles and abstracts, the ViT by masked-patch
reconstruction on the cards, BLIP by image-text contrastive and matching losses on (card,
title) pairs starting from that BERT; no click, topic or style is read (runs.pretrain,
extractors.pretraining). Each becomes a checkpoint folder under
`<storage>/models/pretrained/`, used as `bert:pretrained`, `vit:pretrained`, `blip:pretrained`
by the other commands, which run this same stage first when a folder is missing. A rerun
reuses the folders; a killed one resumes. BERT and the ViT train side by side (one process
each), then BLIP.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from flows.common import add_world_options, guarded, run_bounded, run_flow, validated
from runs.params import PretrainParams
from storage.errors import run_cli


def pretrain_task():
    """The Prefect task of one kind: in this process, or with `threads` in a process of its own."""
    from prefect import task
    from prefect.cache_policies import NO_CACHE

    from runs.isolated import pretrain_isolated
    from runs.pretrain import ensure_pretrained

    @task(name="pretrain-one", cache_policy=NO_CACHE, task_run_name="pretrain {kind}")
    def pretrain_one(kind: str, data: Path, images: Path | None, storage, progress: bool, threads: int | None):
        if threads is None:
            return guarded(ensure_pretrained, kind, data, images, storage, progress)
        return guarded(pretrain_isolated, kind, data, images, storage, threads)

    return pretrain_one


def pretrain_stage(kinds: Sequence[str], data: Path, images: Path | None, storage, progress: bool,
                   jobs: int | None = None):
    """Pre-train `kinds` (runs.pretrain.kinds_needed order): those that need no other first side
    by side, then the rest; returns kind -> folder, or a Failed state."""
    from prefect.states import Failed

    from runs.compare import cores
    from runs.pretrain import TEXT_INIT

    task = pretrain_task()
    folders = {}
    for wave in ([k for k in kinds if k not in TEXT_INIT], [k for k in kinds if k in TEXT_INIT]):
        if not wave:
            continue
        jobs_now = min(len(wave), jobs or cores())
        threads = max(1, cores() // jobs_now) if jobs_now > 1 else None
        states = run_bounded(task, [(k, data, images, storage, progress and jobs_now == 1, threads) for k in wave],
                             jobs_now)
        for kind, state in zip(wave, states):
            if not state.is_completed():
                return Failed(message=f"pretrain {kind}: {state.message}")
            folders[kind] = state.result()
    return folders


def build_flow():
    from prefect import flow
    from prefect.artifacts import create_markdown_artifact

    from runs.pretrain import kinds_needed
    from runs.workspace import Workspace

    @flow(name="pretrain")
    def pretrain(params: PretrainParams = PretrainParams()):
        data = Workspace(params.storage).data_dir(params.data, params.scale, params.world_seed)
        kinds = kinds_needed([f"{k}:pretrained" for k in params.extractors])
        folders = pretrain_stage(kinds, data, params.images, params.storage, params.progress, params.jobs)
        if not isinstance(folders, dict):
            return folders
        lines = ["| extractor | checkpoint |", "|---|---|"] + [f"| {k} | `{f}` |" for k, f in folders.items()]
        create_markdown_artifact("\n".join(lines), key="pretrained-encoders", description=str(data))
        return {k: str(f) for k, f in folders.items()}

    return pretrain


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m flows.pretrain",
        description="Pre-train the tiny BERT (masked-language modelling), ViT (masked-patch reconstruction) and "
        "BLIP (image-text contrastive and matching, from that BERT) on the dataset's train news, without any "
        "click or label, into <storage>/models/pretrained/; the other commands use them as bert:pretrained, "
        "vit:pretrained and blip:pretrained (and run this first when they are missing). A rerun reuses them; a "
        "killed run resumes.",
    )
    p.add_argument("--data", type=Path, help="MIND folder with train/ (default: the synthetic world)")
    p.add_argument("--images", type=Path, help="IM-MIND folder of <news_id>.jpg (default: DATA/images)")
    p.add_argument("--extractor", action="append", dest="extractors", choices=["bert", "vit", "blip"],
                   help="which to pre-train (repeat; default all three; blip also pre-trains bert, which it starts from)")
    p.add_argument("--jobs", type=int, metavar="N", help="encoders pre-trained at once (default: one per core)")
    add_world_options(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from flows.server import stop_on_sigterm

    stop_on_sigterm()
    args = vars(build_parser().parse_args(argv))
    if args["extractors"] is None:
        args.pop("extractors")
    params = validated(PretrainParams, args, {"extractors": "extractor"})
    for kind, folder in run_flow(build_flow, params, "pre-training").items():
        print(f"{kind}:pretrained -> {folder}")
    return 0


if __name__ == "__main__":
    run_cli(main)
