"""`python -m flows.rank`: train one ranker, evaluate on dev, write it all.

On stored features (NRMS or LightGBM over the stores of `--features`, frozen or
`NAME@finetuned`; missing frozen stores are extracted first, the extraction cached), or
`--finetune`: PLM-NR, the NRMS ranker with its extractors trained end to end (`--mtrec` adds
MTRec's tasks; `--no-category` / `--no-ner` / `--no-surgery` drop one part), checkpointed
every epoch so the same command resumes a killed run. The work is runs.rank's (see there
for what is written into `<storage>/models/<run>/`); this module parses and validates the
options and wraps the run in a Prefect task and artifact.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from flows.common import add_allow_no_images, add_lightgbm_options, add_world_options, guarded, run_flow, validated
from runs.params import FROZEN_EPOCHS, RankParams
from storage.errors import run_cli

OPTIONS = {"category": "no-category", "ner": "no-ner", "surgery": "no-surgery"}


def rank_task():
    """The Prefect task around runs.rank.run_rank (in this process, with the flow's workspace),
    or with `threads` runs.isolated.run_isolated (a process of its own limited to that many
    threads, so that several run at once); a PipelineError ends it Failed with its message."""
    from prefect import task
    from prefect.cache_policies import NO_CACHE

    from runs.isolated import run_isolated
    from runs.rank import run_rank

    @task(name="rank-one", cache_policy=NO_CACHE, task_run_name="rank {label}")
    def rank_one(label: str, params: RankParams, workspace, threads: int | None = None):
        if threads is None:
            return guarded(run_rank, params, workspace)
        return guarded(run_isolated, params.model_copy(update={"progress": False}), threads)

    return rank_one


def build_flow():
    from prefect import flow
    from prefect.artifacts import create_markdown_artifact
    from prefect.states import Failed

    from flows.pretrain import pretrain_stage
    from runs.pretrain import kinds_needed
    from runs.rank import format_outcome
    from runs.workspace import Workspace

    rank_one = rank_task()

    @flow(name="rank")
    def rank(params: RankParams = RankParams()):
        workspace = Workspace(params.storage)
        kinds = kinds_needed(params.extractor_specs)
        if kinds:  # the tiny encoders pre-trained on this data, when asked for
            data = workspace.data_dir(params.data, params.scale, params.world_seed)
            folders = pretrain_stage(kinds, data, params.images, params.storage, params.progress)
            if not isinstance(folders, dict):
                return folders
        state = rank_one(params.ranker, params, workspace, return_state=True)
        if state.is_failed():
            return Failed(message=state.message)
        outcome = state.result()
        create_markdown_artifact(f"```\n{format_outcome(outcome)}\n```", key="rank-run", description="Ranking run")
        return outcome

    return rank


def build_parser() -> argparse.ArgumentParser:
    from extractors.registry import available as extractors
    from rankers.fusion import available as fusions
    from rankers.registry import ranker_names

    p = argparse.ArgumentParser(
        prog="python -m flows.rank",
        description="Train a ranker on stored news features, or fine-tune its extractors end to end (--finetune), "
        "evaluate it on dev with the official MIND metrics, and write the model, dev metrics, prediction files "
        "and a run record under <storage>/models/<run>/. Missing frozen feature stores are extracted first.",
        epilog="Examples: python -m flows.rank --features bert,vit --fusion hadamard --ranker nrms | "
        "python -m flows.rank --finetune --features bert:bert-base-uncased,vit:vit_base_patch16_224 --fusion "
        "hadamard (PLM-NR; rerun the same command to resume after a kill) | python -m flows.rank --finetune "
        "--mtrec --no-surgery (an MTRec ablation) | python -m flows.rank --ranker lightgbm --features "
        "bert@finetuned (LightGBM on the store a fine-tuned run exported)",
    )
    p.add_argument("--data", type=Path, help="MIND folder with train/ dev/ [test/] (default: the synthetic world)")
    p.add_argument("--images", type=Path, help="IM-MIND folder of <news_id>.jpg (default: DATA/images)")
    p.add_argument("--titles", type=Path, metavar="FILE",
                   help="news_id<TAB>title lines replacing those news' titles for extraction and fine-tuning "
                   "(GENRE's enhanced titles); the dataset becomes <dataset>-enhanced-<hash> in store and run names")
    p.add_argument("--features", action="append", metavar="NAME[:CKPT][@finetuned][,...]",
                   help=f"extractors whose stores feed the ranker ({', '.join(extractors())}), comma-separated or "
                   "repeated (default: bert:pretrained, the tiny BERT pre-trained on this data). NAME@finetuned reads the store a --finetune run exported instead of the "
                   "frozen one. With --finetune: the extractors to fine-tune")
    p.add_argument("--fusion", choices=fusions(), default="text",
                   help="how the feature roles combine into one news vector (a single source, or text and image "
                   "fused); which rankers train on which: rankers/registry.py")
    p.add_argument("--ranker", choices=ranker_names(), default="nrms", help="nrms (attention), lightgbm, or a baseline")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--epochs", type=int,
                   help=f"maximum epochs (early stopping on validation; default {FROZEN_EPOCHS}, with --finetune 3 "
                   "as published)")
    p.add_argument("--lr", type=float, help="NRMS (head) learning rate (default: NRMSConfig's; fine-tuning: 1e-4, "
                   "3e-3 with tiny checkpoints)")
    p.add_argument("--dropout", type=float, help="NRMS dropout rate in [0, 1) (default: NRMSConfig's)")
    p.add_argument("--tokens", action="store_true",
                   help="NRMS news encoders attend over the stores' token vectors (self-attention, then additive "
                   "attention) instead of projecting the pooled vectors; about 40x the cost of a step")
    p.add_argument("--no-test", dest="score_test", action="store_false",
                   help="do not write prediction_test.txt even when the dataset has a test split")
    ft = p.add_argument_group(
        "fine-tuning (PLM-NR and MTRec)",
        "Train the --features extractors of the fusion's roles (bert, vit) end to end with the NRMS ranker. "
        "Checkpoints go to <storage>/models/<run>/checkpoints after every epoch: the same command resumes a "
        "killed run. Afterwards each fine-tuned extractor writes <storage>/features/<dataset>__<extractor>__"
        "finetuned.h5 (read with --features NAME@finetuned; the latest fine-tuning of that extractor wins). "
        "With tiny checkpoints a tiny-scale head (d 32, history 20, lr 3e-3, no accumulation); with real ones "
        "the published NRMS+BERT settings (3 epochs, lr 1e-4, encoder 2e-5, batch 32 x 4, K 4, history 50).")
    ft.add_argument("--finetune", action="store_true", help="fine-tune the extractors (PLM-NR); --ranker nrms only")
    ft.add_argument("--mtrec", action="store_true",
                    help="add MTRec's category and NER tasks on the text encoder, with gradient surgery")
    ft.add_argument("--no-category", dest="category", action="store_false", help="MTRec without the category task")
    ft.add_argument("--no-ner", dest="ner", action="store_false", help="MTRec without the NER task")
    ft.add_argument("--no-surgery", dest="surgery", action="store_false",
                    help="MTRec with plain summed losses instead of gradient surgery")
    ft.add_argument("--freeze-layers", type=int, default=0, metavar="N",
                    help="no updates for the embeddings and the lowest N transformer layers")
    ft.add_argument("--grad-checkpointing", action="store_true",
                    help="recompute activations in backward (less memory, more time)")
    ft.add_argument("--accumulate", type=int, metavar="N",
                    help="micro-batches of 32 per optimizer step (default 4, 1 with tiny checkpoints)")
    ft.add_argument("--encoder-lr", type=float,
                    help="the extractors' learning rate (default 2e-5 pre-trained, 1e-3 tiny)")
    add_allow_no_images(p)
    add_lightgbm_options(p)
    p.add_argument("--seed", type=int, default=0, help="ranker seed")
    p.add_argument("--run-name", help="folder name under <storage>/models (default: derived from the settings)")
    add_world_options(p)
    return p


def parse_params(argv: Sequence[str] | None, parser: argparse.ArgumentParser | None = None) -> RankParams:
    args = vars((parser or build_parser()).parse_args(argv))
    if args["features"] is None:
        args.pop("features")
    return validated(RankParams, args, OPTIONS)


def main(argv: Sequence[str] | None = None) -> int:
    from flows.server import stop_on_sigterm
    from runs.rank import format_outcome

    stop_on_sigterm()
    params = parse_params(argv)
    print(format_outcome(run_flow(build_flow, params, "ranking")))
    return 0


if __name__ == "__main__":
    run_cli(main)
