"""`python -m flows.extract`: frozen BERT, ViT and BLIP features of every news into HDF5 stores.

One Prefect task per extractor. A store is the cache: a rerun with the same extractor
config, checkpoint and data fingerprint finds its complete store and recomputes nothing; a
crashed run resumes its partial store. A markdown artifact (and the printed summary) gives
rows, width, missing and corrupt images, throughput and file paths.

`--shards N` (N >= 2) splits each extraction into N chunk-aligned row ranges run as Prefect
tasks on Dask workers through prefect-dask's DaskTaskRunner: a LocalCluster of N worker
processes (its scheduler and dashboard on 127.0.0.1 only), or the cluster at `--scheduler
ADDRESS` (its workers must see the storage root at the same path). Each shard writes its own
resumable store; a merge task checks every shard and copies them into the usual store,
identical to a single-process one (storage/shards.py). A killed worker's shard resumes on
rerun (or when Dask reschedules it); complete shards are reused; disk errors are retried twice.
The work itself is runs.extract's.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Sequence
from pathlib import Path

from flows.common import add_allow_no_images, add_world_options, guarded, run_flow, validated
from runs.params import ExtractParams
from storage.errors import PipelineError, run_cli

log = logging.getLogger(__name__)
RETRIES, RETRY_DELAY_S = 2, 2.0


def extract_task():
    """The Prefect task around runs.extract.extract_rows. Built on demand so `--help` never
    imports Prefect."""
    from prefect import task
    from prefect.cache_policies import NO_CACHE

    from runs.extract import extract_rows

    @task(name="extract-one", cache_policy=NO_CACHE, task_run_name="extract {spec}")
    def extract_one(spec: str, params: ExtractParams, workspace):
        return guarded(extract_rows, params, workspace, spec)

    return extract_one


def _transient(task, task_run, state) -> bool:
    """Prefect retry condition: retry disk errors (which may pass), not the user-fixable
    PipelineErrors a retry would only repeat (those come back as a returned Failed state)."""
    from storage.features import StoreIOError

    return isinstance(state.data, (OSError, StoreIOError))


def shard_tasks():
    """The Prefect tasks of a sharded extraction: plan (cache check), one shard, merge. A
    StoreIOError or OSError is raised, hence retried; any other PipelineError ends the task
    Failed with its one-line message."""
    from prefect import task
    from prefect.cache_policies import NO_CACHE
    from prefect.states import Failed

    from runs.extract import merge_extractor, plan_extractor, shard_row
    from storage.features import StoreIOError

    def retried(fn, *args):
        try:
            return fn(*args)
        except (StoreIOError, OSError):
            raise
        except PipelineError as err:
            return Failed(message=str(err))

    @task(name="plan-shards", cache_policy=NO_CACHE, task_run_name="plan {spec}")
    def plan_one(spec: str, params: ExtractParams):
        return guarded(plan_extractor, spec, params)

    @task(name="extract-shard", cache_policy=NO_CACHE, task_run_name="extract {spec} {shard.name}",
          retries=RETRIES, retry_delay_seconds=RETRY_DELAY_S, retry_condition_fn=_transient)
    def shard_one(spec: str, params: ExtractParams, shard):
        return retried(shard_row, spec, params, shard)

    @task(name="merge-shards", cache_policy=NO_CACHE, task_run_name="merge {plan.spec}",
          retries=RETRIES, retry_delay_seconds=RETRY_DELAY_S, retry_condition_fn=_transient)
    def merge_one(plan, params: ExtractParams, shard_rows: list[dict], modality: str, seconds: float):
        return retried(merge_extractor, plan, params, shard_rows, modality, seconds)

    return plan_one, shard_one, merge_one


def task_runner(params: ExtractParams, workers: int):
    """Dask through prefect-dask: the scheduler at --scheduler, else a LocalCluster of
    `workers` single-threaded worker processes (one per shard), its scheduler and dashboard
    listening on 127.0.0.1 only.

    Local workers are told this run's Prefect API; without it each would start a temporary
    server of its own. A remote cluster's workers need PREFECT_API_URL in their own environment."""
    from prefect import get_client
    from prefect_dask import DaskTaskRunner

    if params.scheduler:
        return DaskTaskRunner(address=params.scheduler)
    env = {"PREFECT_API_URL": str(get_client(sync_client=True).api_url)}
    return DaskTaskRunner(cluster_kwargs=local_cluster_kwargs(workers, env))


def local_cluster_kwargs(workers: int, env: dict[str, str]) -> dict:
    """distributed.LocalCluster's options: single-threaded worker processes, and every server
    it starts (scheduler, workers, dashboard) on 127.0.0.1 only; Dask's default dashboard
    listens on all interfaces."""
    return {"n_workers": workers, "threads_per_worker": 1, "processes": True, "env": env,
            "host": "127.0.0.1", "dashboard_address": "127.0.0.1:0"}


def build_sharded_flow():
    """The subflow that runs on Dask: for each extractor, its shards in parallel, then the merge."""
    from prefect import flow
    from prefect.states import Failed

    _, shard_one, merge_one = shard_tasks()

    @flow(name="extract-shards")
    def extract_shards(jobs: list[tuple], params: ExtractParams):
        rows = []
        for spec, plan, modality in jobs:  # extractors one after another, shards side by side
            started = time.perf_counter()
            futures = [shard_one.submit(spec, params, shard) for shard in plan.shards]
            for future in futures:  # all of them: a failed shard leaves the others finished for a rerun
                future.wait()
            states = [future.state for future in futures]
            failed = [s for s in states if s.is_failed() or s.is_crashed()]
            if failed:
                return Failed(message=failed[0].message)
            shard_rows = [s.result() for s in states]
            seconds = time.perf_counter() - started
            state = merge_one(plan, params, shard_rows, modality, seconds, return_state=True)
            if state.is_failed():
                return Failed(message=state.message)
            rows.append(state.result())
        return rows

    return extract_shards


def build_flow():
    """The Prefect flow, built on demand so `--help` and errors never import Prefect."""
    from prefect import flow
    from prefect.artifacts import create_markdown_artifact
    from prefect.states import Failed

    from flows.pretrain import pretrain_stage
    from runs.extract import summary_markdown
    from runs.pretrain import kinds_needed
    from runs.workspace import Workspace

    extract_one = extract_task()
    plan_one, _, _ = shard_tasks()
    extract_shards = build_sharded_flow()

    def sharded(params: ExtractParams):
        """The rows of every extractor, or a Failed state."""
        rows: list[dict | None] = []
        jobs = []
        for spec in params.extractors:
            state = plan_one(spec, params, return_state=True)
            if state.is_failed():
                return Failed(message=state.message)
            plan, modality, done = state.result()
            rows.append(done)
            if done is None:
                jobs.append((spec, plan, modality))
        if jobs:  # only now start (or connect to) a cluster
            import dask

            workers = max(len(plan.shards) for _, plan, _ in jobs)  # a small store may make fewer shards
            # Built first: it imports distributed, whose defaults must be in the config before the
            # `set` below, or leaving the block would drop the whole `distributed` section.
            runner = task_runner(params, workers)
            # Dask's default daemonic workers could not start DataLoader processes (--workers).
            with dask.config.set({"distributed.worker.daemon": False}):
                state = extract_shards.with_options(task_runner=runner)(jobs, params, return_state=True)
            if state.is_failed() or state.is_crashed():
                return Failed(message=state.message)
            merged = iter(state.result())
            rows = [r if r is not None else next(merged) for r in rows]
        return rows

    @flow(name="extract")
    def extract(params: ExtractParams = ExtractParams()):
        workspace = Workspace(params.storage)
        data = workspace.data_dir(params.data, params.scale, params.world_seed)
        kinds = kinds_needed(params.extractors)
        if kinds:  # the tiny encoders pre-trained on this data, when asked for
            folders = pretrain_stage(kinds, data, params.images, params.storage, params.progress)
            if not isinstance(folders, dict):
                return folders
        if params.shards > 1:
            rows = sharded(params.model_copy(update={"data": data}))
            if not isinstance(rows, list):
                return rows
        else:
            rows = []
            for spec in params.extractors:  # one device: extractors run one after another
                state = extract_one(spec, params, workspace, return_state=True)
                if state.is_failed():
                    return Failed(message=state.message)
                rows.append(state.result())
        create_markdown_artifact(summary_markdown(rows, data), key="feature-extraction", description="Feature stores")
        return rows

    return extract


def build_parser() -> argparse.ArgumentParser:
    from extractors.registry import available

    p = argparse.ArgumentParser(
        prog="python -m flows.extract",
        description="Encode every news title and IM-MIND card with frozen extractors into HDF5 feature stores "
        "(<storage>/features/<dataset>__<extractor>-<checkpoint>__frozen.h5). Without --data it uses the "
        "synthetic small world (generated on first use); without --extractor it runs bert, vit and blip pre-trained "
        "on the dataset's train news (bert:pretrained ..., pre-trained first when missing).",
        epilog="Examples: python -m flows.extract --extractor bert --extractor vit:vit_base_patch16_224 --device cuda; "
        "python -m flows.extract --data ~/MIND-small --images ~/IM-MIND --extractor bert:/models/bert-base-uncased",
    )
    p.add_argument("--data", type=Path, help="MIND folder with train/ dev/ test/ (default: the synthetic world)")
    p.add_argument("--images", type=Path, help="IM-MIND folder of <news_id>.jpg (default: DATA/images)")
    p.add_argument("--titles", type=Path, metavar="FILE",
                   help="news_id<TAB>title lines that replace those news' titles (GENRE's enhanced titles); the "
                   "stores are named after the dataset plus -enhanced-<hash>, beside the original titles' stores")
    p.add_argument(
        "--extractor", action="append", dest="extractors", metavar="NAME[:CHECKPOINT]",
        help=f"{', '.join(available())}; CHECKPOINT is pretrained (the tiny model pre-trained on this data, see "
        "flows.pretrain), tiny (random weights), a Hugging Face/timm name in the local cache, or a local directory. "
        "Repeat for several (default: bert:pretrained vit:pretrained blip:pretrained)",
    )
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="default: cuda when available")
    p.add_argument("--batch-size", type=int, default=64, help="news per forward pass (default 64)")
    p.add_argument("--workers", type=int, default=None,
                   help="DataLoader processes decoding images (default: on a CPU one per core, at most 4, for 1,000 "
                   "news or more, else 0; on a GPU every core but two, at most 16)")
    p.add_argument("--crop", choices=["card", "cover"], default="card", help="whole IM-MIND card or the cover box (15,15)-(215,180)")
    p.add_argument("--missing", choices=["card", "blank", "zeros"], default="card",
                   help="news without an image: a rendered title-only card (IM-MIND's way), a white card, or a zero vector")
    p.add_argument("--pooling", choices=["cls", "mean", "model"],
                   help="how token vectors become the stored vector: the class token, the masked mean, or the "
                   "model's own (sentence-transformers' 1_Pooling and normalisation, SigLIP's head, CLIP's joint-space "
                   "projection); default: each checkpoint's own (docs/checkpoints.md)")
    p.add_argument("--no-tokens", dest="tokens", action="store_false", help="store pooled vectors only (no token/patch vectors)")
    p.add_argument("--dtype", choices=["float16", "float32"], default="float16", help="stored precision (default float16)")
    p.add_argument("--chunk-rows", type=int, default=1024, metavar="N",
                   help="news per committed chunk, rounded down to whole batches (default 1024): the unit of resume, "
                   "of the length sort of titles, and of shards")
    p.add_argument("--shards", type=int, default=1, metavar="N",
                   help="split each extraction into N row ranges of whole chunks, run in parallel on Dask workers and "
                   "merged into the same store (default 1: in this process)")
    p.add_argument("--scheduler", metavar="ADDRESS",
                   help="with --shards: a Dask scheduler (tcp://HOST:PORT) whose workers see the storage root at the "
                   "same path and have PREFECT_API_URL set to this run's Prefect server (default: a local cluster of "
                   "--shards worker processes on 127.0.0.1, set up for both)")
    add_allow_no_images(p)
    add_world_options(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from flows.server import stop_on_sigterm

    stop_on_sigterm()
    args = vars(build_parser().parse_args(argv))
    if args["extractors"] is None:
        args.pop("extractors")
    params = validated(ExtractParams, args, {"extractors": "extractor"})
    if params.scheduler is not None:
        from runs.extract import reach_scheduler

        reach_scheduler(params.scheduler)
    from runs.extract import summary_markdown
    from runs.workspace import Workspace

    rows = run_flow(build_flow, params, "extraction")
    print(summary_markdown(rows, Workspace(params.storage).data_dir(params.data, params.scale, params.world_seed)))
    return 0


if __name__ == "__main__":
    run_cli(main)
