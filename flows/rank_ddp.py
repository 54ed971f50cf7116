"""`torchrun --nproc-per-node N -m flows.rank_ddp [flows.rank options]`: NRMS, data-parallel.

Frozen NRMS over stores, or with `--finetune` PLM-NR/MTRec fine-tuned end to end
(rankers.finetune, data-parallel the same way; rank 0 checkpoints, exports and writes).

The options and the output folder of `python -m flows.rank --ranker nrms`, trained by N
processes under DistributedDataParallel (rankers.distributed; gloo on CPU, nccl with one GPU
per process), without Prefect. Example, 2 CPU processes:

    OMP_NUM_THREADS=1 torchrun --standalone --nproc-per-node 2 -m flows.rank_ddp \\
        --data DIR --features bert,vit --fusion hadamard --device cpu

- Rank 0 prepares: the default synthetic world when --data is absent, and any feature store
  not extracted yet. The others wait, then read the same splits and stores.
- Every rank builds the same epoch plan; each global batch (NRMSConfig.batch_size rows) is
  split across the ranks and its gradient averaged, so a step is one process's step on the
  whole batch (rankers.train). With --dropout 0 the N-process model equals the one-process
  model up to float summation order (tests/test_ddp.py); with dropout, the masks differ.
- Rank 0 runs flows.rank's `run_rank` (fit, then dev/test scoring and every file of
  `<storage>/models/<run>/`); the other ranks only take part in its fit.

Without torchrun (`python -m flows.rank_ddp ...`) it is `run_rank` in one process.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from flows.common import default_world, validated
from flows.rank import (
    CHECKPOINTS, RankParams, build_parser, existing_store, format_outcome, nrms_config, role_specs, run_name, run_rank,
)
from rankers import distributed
from storage.errors import PipelineError, run_cli


def prepare(params: RankParams) -> tuple[Path, dict[str, dict]]:
    """On rank 0: the data folder and the feature stores, generated or extracted if missing."""
    from flows.extract import ExtractParams, run_extractor
    from storage.catalogue import load_catalogue

    data = params.data or default_world(params.scale, params.world_seed, params.storage)
    stores = {}
    if params.finetune:
        return data, stores  # fine-tuning reads titles and images, not stores
    catalogue = load_catalogue(data, params.images)
    for role, spec in role_specs(params).items():
        extracted = existing_store(spec, catalogue, params.storage, tokens=params.tokens) or run_extractor(
            spec, ExtractParams(data=data, images=params.images, extractors=[spec], device=params.device,
                                storage=params.storage, progress=params.progress), data)
        stores[role] = {"path": extracted["store"], "extractor": extracted["extractor"]}
    return data, stores


def follow(params: RankParams, data: Path, stores: dict[str, dict]) -> None:
    """On ranks > 0: the fit of run_rank, over the same splits, stores and NRMS options.
    (A difference from rank 0's setup is caught by NRMSRanker.fit's check_same.)"""
    from rankers.data import carve_validation, load_features, load_impressions
    from rankers.train import NRMSRanker
    from storage.catalogue import load_catalogue

    catalogue = load_catalogue(data, params.images)
    if params.finetune:
        _follow_finetune(params, data, catalogue)
        return
    features = {role: load_features(s["path"], catalogue, name=s["extractor"], tokens=params.tokens)
                for role, s in stores.items()}
    train, valid = carve_validation(load_impressions(data, "train", catalogue))
    NRMSRanker(params.fusion, nrms_config(params), device=params.device, progress=False).fit(train, valid, features)


def _follow_finetune(params: RankParams, data: Path, catalogue) -> None:
    """On ranks > 0: the fit of a `--finetune` run (FineTuneRanker is data-parallel under
    torchrun; rank 0 validates, checkpoints into the run folder, exports and writes)."""
    from flows.common import subdir
    from flows.rank import finetune_config
    from rankers.data import carve_validation, load_impressions
    from rankers.finetune import FineTuneRanker
    from storage.catalogue import with_titles
    from storage.mind import read_titles

    if params.titles is not None:
        catalogue = with_titles(catalogue, read_titles(params.titles, known=catalogue.index), params.titles)
    train, valid = carve_validation(load_impressions(data, "train", catalogue))
    folder = subdir("models", params.storage) / run_name(params, catalogue.name)
    config = finetune_config(params, role_specs(params))
    FineTuneRanker(catalogue, config, device=params.device, progress=False).fit(
        train, valid, checkpoint_dir=folder / CHECKPOINTS)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    parser.prog = "torchrun --nproc-per-node N -m flows.rank_ddp"
    parser.description = ("Train the NRMS ranker data-parallel (DistributedDataParallel, one process per "
                          "torchrun rank), then write what python -m flows.rank writes, from rank 0.")
    parser.epilog = ("Example: OMP_NUM_THREADS=1 torchrun --standalone --nproc-per-node 2 -m flows.rank_ddp "
                     "--features bert,vit --fusion hadamard --device cpu")
    args = vars(parser.parse_args(argv))
    if args["features"] is None:
        args.pop("features")
    params = validated(RankParams, args)
    if params.ranker != "nrms" and not params.finetune:
        raise PipelineError(f"--ranker {params.ranker}: flows.rank_ddp trains nrms only; "
                            "run the other rankers with python -m flows.rank")
    if params.data is not None and not params.data.is_dir():
        raise PipelineError(f"data folder {params.data} does not exist; pass --data with a MIND folder, or leave it out")
    specs = role_specs(params)  # a missing role fails on every rank before any work
    if not params.finetune and (params.titles is not None or any(s.endswith("@finetuned") for s in specs.values())):
        raise PipelineError("flows.rank_ddp trains frozen NRMS over the original titles' frozen stores only; run "
                            "--titles or NAME@finetuned features with python -m flows.rank")
    with distributed.session(params.device) as ctx:
        prepared: tuple | str = ""
        if ctx.is_main:
            try:
                prepared = prepare(params)
            except PipelineError as err:
                prepared = str(err)
        prepared = distributed.broadcast_object(prepared)
        if isinstance(prepared, str):  # rank 0's error, raised on every rank
            raise PipelineError(prepared)
        data, stores = prepared
        if ctx.is_main:
            print(format_outcome(run_rank(params, data)))
        else:
            follow(params, data, stores)
    return 0


if __name__ == "__main__":
    run_cli(main)
