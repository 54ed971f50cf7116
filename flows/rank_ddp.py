"""`torchrun --nproc-per-node N -m flows.rank_ddp [flows.rank options]`: NRMS, data-parallel.

Frozen NRMS over stores, or with `--finetune` PLM-NR/MTRec fine-tuned end to end
(rankers.finetune, data-parallel the same way; rank 0 checkpoints, exports and writes).

The options and the output folder of `python -m flows.rank --ranker nrms`, trained by N
processes under DistributedDataParallel (rankers.distributed; gloo on CPU, nccl with one GPU
per process), without Prefect. Example, 2 CPU processes:

    OMP_NUM_THREADS=1 torchrun --standalone --nproc-per-node 2 -m flows.rank_ddp \\
        --data DIR --features bert,vit --fusion hadamard --device cpu

- Rank 0 prepares: the default synthetic world when --data is absent, and any feature store
  not extracted yet, through the run layer's workspace (the same "find or extract" as every
  flow). The others wait, then find the same stores.
- Every rank builds the same epoch plan; each global batch (NRMSConfig.batch_size rows) is
  split across the ranks and its gradient averaged, so a step is one process's step on the
  whole batch (rankers.train). With --dropout 0 the N-process model equals the one-process
  model up to float summation order (tests/test_ddp.py); with dropout, the masks differ.
- Rank 0 runs runs.rank's `run_rank` (fit, then dev/test scoring and every file of
  `<storage>/models/<run>/`); the other ranks only take part in its fit.

Without torchrun (`python -m flows.rank_ddp ...`) it is `run_rank` in one process.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from flows.rank import build_parser, parse_params
from rankers import distributed
from runs.params import RankParams
from storage.errors import PipelineError, run_cli


def prepare(params: RankParams) -> Path:
    """On rank 0: the data folder, with every feature store the run reads extracted."""
    from runs.rank import dataset, resolve_stores
    from runs.workspace import Workspace

    from runs.pretrain import ensure_pretrained, kinds_needed

    workspace = Workspace(params.storage)
    ds = dataset(params, workspace)
    for kind in kinds_needed(params.extractor_specs):
        ensure_pretrained(kind, ds.data, params.images, params.storage, params.progress)
    resolve_stores(params, workspace, ds)  # fine-tuning reads titles and images: no stores
    return ds.data


def follow(params: RankParams) -> None:
    """On ranks > 0: the fit of run_rank, over the same splits, stores and options. (A
    difference from rank 0's setup is caught by the rankers' check_same.)"""
    from runs.params import role_specs
    from runs.rank import CHECKPOINTS, dataset, finetune_config, nrms_config, resolve_stores, run_name
    from runs.workspace import Workspace
    from storage.paths import storage_path

    workspace = Workspace(params.storage)
    ds = dataset(params, workspace)
    train, valid = workspace.train_valid(ds.data, ds.catalogue)
    if params.finetune:
        from rankers.finetune import FineTuneRanker

        folder = storage_path("models", run_name(params, ds.catalogue.name), storage=params.storage,
                              parameter="--run-name")
        specs = {role: workspace.resolve(spec, ds.original if role == "image" else ds.catalogue)
                 for role, spec in role_specs(params.features, params.fusion).items()}
        config = finetune_config(params, specs)
        FineTuneRanker(ds.catalogue, config, device=params.device, progress=False).fit(
            train, valid, checkpoint_dir=folder / CHECKPOINTS)
        return
    from rankers.train import NRMSRanker

    refs = resolve_stores(params, workspace, ds)
    features = {role: workspace.features(ref, ds.original if role == "image" else ds.catalogue, tokens=params.tokens)
                for role, ref in refs.items()}
    NRMSRanker(params.fusion, nrms_config(params), device=params.device, progress=False).fit(train, valid, features)


def main(argv: Sequence[str] | None = None) -> int:
    from runs.rank import format_outcome, run_rank

    parser = build_parser()
    parser.prog = "torchrun --nproc-per-node N -m flows.rank_ddp"
    parser.description = ("Train the NRMS ranker data-parallel (DistributedDataParallel, one process per "
                          "torchrun rank), then write what python -m flows.rank writes, from rank 0.")
    parser.epilog = ("Example: OMP_NUM_THREADS=1 torchrun --standalone --nproc-per-node 2 -m flows.rank_ddp "
                     "--features bert,vit --fusion hadamard --device cpu")
    params = parse_params(argv, parser)
    if params.ranker != "nrms" and not params.finetune:
        raise PipelineError(f"--ranker {params.ranker}: flows.rank_ddp trains nrms only; "
                            "run the other rankers with python -m flows.rank")
    if not params.finetune and (params.titles is not None or any(s.endswith("@finetuned") for s in params.features)):
        raise PipelineError("flows.rank_ddp trains frozen NRMS over the original titles' frozen stores only; run "
                            "--titles or NAME@finetuned features with python -m flows.rank")
    with distributed.session(params.device) as ctx:
        prepared: Path | str = ""
        if ctx.is_main:
            try:
                prepared = prepare(params)
            except PipelineError as err:
                prepared = str(err)
        prepared = distributed.broadcast_object(prepared)
        if isinstance(prepared, str):  # rank 0's error, raised on every rank
            raise PipelineError(prepared)
        params = params.model_copy(update={"data": prepared})
        if ctx.is_main:
            print(format_outcome(run_rank(params)))
        else:
            follow(params)
    return 0


if __name__ == "__main__":
    run_cli(main)
