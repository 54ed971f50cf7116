"""`python -m flows.extract`: frozen BERT, ViT and BLIP features of every news into HDF5 stores.

One Prefect task per extractor. A store is the cache: a rerun with the same extractor
config, checkpoint and data fingerprint finds its complete store and recomputes nothing; a
crashed run resumes its partial store. A markdown artifact (and the printed summary) gives
rows, width, missing and corrupt images, throughput and file paths.

`--shards N` (N >= 2) splits each extraction into N chunk-aligned row ranges run as Prefect
tasks on Dask workers through prefect-dask's DaskTaskRunner: a LocalCluster of N worker
processes, or the cluster at `--scheduler ADDRESS` (its workers must see the storage root at
the same path). Each shard writes its own resumable store; a merge task checks every shard
and copies them into the usual store, identical to a single-process one (storage/shards.py).
A killed worker's shard resumes on rerun (or when Dask reschedules it); complete shards are
reused; disk errors are retried twice.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, field_validator

from flows.common import default_world, subdir, validated
from storage.errors import PipelineError, run_cli

log = logging.getLogger(__name__)
DEFAULT_EXTRACTORS = ("bert", "vit", "blip")


class ExtractParams(BaseModel):
    """Run parameters, validated before any work starts."""

    data: Path | None = None
    images: Path | None = None
    titles: Path | None = None
    extractors: list[str] = Field(default_factory=lambda: list(DEFAULT_EXTRACTORS), min_length=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    batch_size: int = Field(64, ge=1, le=8192)
    workers: int | None = Field(None, ge=0, le=64)  # None: extractors.run.default_workers(device)
    crop: Literal["card", "cover"] = "card"
    missing: Literal["card", "blank", "zeros"] = "card"
    tokens: bool = True
    dtype: Literal["float16", "float32"] = "float16"
    chunk_rows: int = Field(1024, ge=1, le=1_000_000)
    shards: int = Field(1, ge=1, le=256)
    scheduler: str | None = None
    storage: Path | None = None
    scale: Literal["tiny", "small", "mind-small"] = "small"
    seed: int = Field(0, ge=0)
    progress: bool = True

    @field_validator("extractors")
    @classmethod
    def _known(cls, specs: list[str]) -> list[str]:
        from extractors.registry import available, parse_spec

        for spec in specs:
            name, _ = parse_spec(spec)
            if name not in available():
                raise ValueError(f"unknown extractor {name!r}; known: {', '.join(available())}")
        return specs

    @field_validator("scheduler")
    @classmethod
    def _address(cls, address: str | None) -> str | None:
        if address is not None and not address.strip():
            raise ValueError("an empty scheduler address; give tcp://HOST:PORT, or leave it out for a local cluster")
        return address


def preflight(params: ExtractParams) -> None:
    """The checks that can fail in a second, done before Prefect starts."""
    from extractors.checkpoints import ensure_available
    from extractors.registry import parse_spec

    if params.data is not None and not params.data.is_dir():
        raise PipelineError(
            f"data folder {params.data} does not exist; pass --data with a MIND folder (train/ dev/ test/), "
            "or leave it out to use the synthetic world"
        )
    if params.scheduler is not None and params.shards < 2:
        raise PipelineError("--scheduler needs --shards 2 or more (the shards are what the cluster's workers run)")
    if params.scheduler is not None:
        reach_scheduler(params.scheduler)
    if params.images is not None and not params.images.is_dir():
        raise PipelineError(f"image folder {params.images} does not exist; pass --images with the IM-MIND folder")
    if params.titles is not None and not params.titles.is_file():
        raise PipelineError(f"titles file {params.titles} does not exist; pass --titles with a news_id<TAB>title file")
    for spec in params.extractors:
        ensure_available(*parse_spec(spec))
    if params.device == "cuda":
        from extractors.run import resolve_device

        resolve_device("cuda")


def reach_scheduler(address: str, timeout_s: float = 5.0) -> None:
    """Fail in seconds, not after Dask's 30 s connect timeout, when a tcp:// scheduler does not answer."""
    import socket
    from urllib.parse import urlsplit

    parts = urlsplit(address if "://" in address else f"tcp://{address}")
    if parts.scheme != "tcp":
        return  # tls://, ws://...: left to Dask
    try:
        port = parts.port
    except ValueError:
        port = None
    if not parts.hostname or port is None:
        raise PipelineError(f"--scheduler {address!r} is not an address like tcp://HOST:8786")
    try:
        socket.create_connection((parts.hostname, port), timeout=timeout_s).close()
    except OSError as err:
        raise PipelineError(
            f"no Dask scheduler answers at {address} ({err}); start one there (`dask scheduler`), check the "
            "address, or leave --scheduler out for a local cluster"
        ) from None


def _build(spec: str, params: ExtractParams, data: Path):
    """(catalogue, extractor, features folder) for one extractor spec."""
    from extractors.registry import create
    from storage.catalogue import load_catalogue

    catalogue = load_catalogue(data, params.images, titles=params.titles)
    features = subdir("features", params.storage)
    workdir = features / f"{catalogue.name}__tokenizer-{catalogue.fingerprint()[:12]}"
    extractor = create(
        spec, titles=[str(t) for t in catalogue.title], workdir=workdir, crop=params.crop, missing=params.missing
    )
    return catalogue, extractor, features


def run_extractor(spec: str, params: ExtractParams, data: Path, shard=None) -> dict:
    """Build one extractor and fill its store (or one shard's store); the plain function
    behind the Prefect tasks."""
    from extractors.run import default_workers, extract_catalogue

    catalogue, extractor, features = _build(spec, params, data)
    workers = default_workers(params.device) if params.workers is None else params.workers
    result = extract_catalogue(
        extractor, catalogue, features, batch_size=params.batch_size, device=params.device,
        num_workers=workers, tokens=params.tokens, dtype=params.dtype, chunk_rows=params.chunk_rows,
        progress=params.progress, shard=shard,
    )
    return _row(result, extractor.modality)


def _row(result, modality: str) -> dict:
    return {
        "extractor": result.spec,
        "store": str(result.path),
        "rows": result.rows,
        "dim": result.dim,
        "token_len": result.token_len,
        "cached": result.cached,
        "resumed_from": result.resumed_from,
        "seconds": round(result.seconds, 3),
        "rows_per_s": round(result.rows_per_second, 1),
        "present": result.present,
        "images": dict(result.images),
        "corrupt_ids": result.corrupt_ids,
        "modality": modality,
    }


def plan_extractor(spec: str, params: ExtractParams, data: Path) -> tuple:
    """(plan, modality, cached row or None) of one sharded extraction: run in the flow's
    process before any worker starts, so a complete store costs no cluster."""
    from extractors.run import finished_store, plan_sharded

    catalogue, extractor, features = _build(spec, params, data)
    plan = plan_sharded(extractor, catalogue, features, params.shards, batch_size=params.batch_size,
                        chunk_rows=params.chunk_rows, tokens=params.tokens, dtype=params.dtype)
    done = finished_store(plan, catalogue)
    if done is None:
        return plan, extractor.modality, None
    return plan, extractor.modality, _row(done, extractor.modality) | {"shards": _shard_counts(plan, [])}


def merge_extractor(plan, params: ExtractParams, data: Path, shard_rows: list[dict], modality: str,
                    seconds: float) -> dict:
    """Check and merge the shards of `plan` into its store; the row sums up the shards."""
    from extractors.run import merge_sharded
    from storage.catalogue import load_catalogue

    catalogue = load_catalogue(data, params.images, titles=params.titles)
    result = merge_sharded(plan, catalogue)
    row = _row(result, modality)
    computed = sum(r["rows"] - r["resumed_from"] for r in shard_rows if not r["cached"])
    images: dict[str, int] = {}
    for r in shard_rows:
        for status, k in r["images"].items():
            images[status] = images.get(status, 0) + k
    total = seconds + result.seconds
    row.update(
        seconds=round(total, 3), rows_per_s=round(computed / total, 1) if total > 0 and computed else 0.0,
        images=images, corrupt_ids=[i for r in shard_rows for i in r["corrupt_ids"]],
        shards=_shard_counts(plan, shard_rows),
    )
    return row


def _shard_counts(plan, shard_rows: list[dict]) -> dict:
    return {
        "count": len(plan.shards),
        "computed": sum(1 for r in shard_rows if not r["cached"]),
        "reused": sum(1 for r in shard_rows if r["cached"]),
        "resumed": sum(1 for r in shard_rows if not r["cached"] and r["resumed_from"]),
    }


def summary_markdown(rows: list[dict], data: Path) -> str:
    lines = [
        f"# Feature extraction\n\nData: `{data}`\n",
        "| extractor | rows | width | tokens | present | missing | converted | corrupt | news/s | status | store |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        images = r["images"]
        status = "cached" if r["cached"] else (f"resumed at row {r['resumed_from']}" if r["resumed_from"] else "extracted")
        shards = r.get("shards")
        if shards and not r["cached"]:
            resumed = f", {shards['resumed']} of them resumed" if shards["resumed"] else ""
            status = (f"merged {shards['count']} shards: {shards['computed']} computed{resumed}, "
                      f"{shards['reused']} reused")
        lines.append(
            f"| {r['extractor']} | {r['rows']:,} | {r['dim']} | {r['token_len'] or '-'} | {r['present']:,} | "
            f"{images.get('missing', 0):,} | {images.get('converted', 0):,} | {images.get('corrupt', 0):,} | "
            f"{r['rows_per_s'] or '-'} | {status} | `{r['store']}` |"
        )
    corrupt = [(r["extractor"], i) for r in rows for i in r["corrupt_ids"]]
    if corrupt:
        shown = ", ".join(i for _, i in corrupt[:20])
        lines.append(f"\nCorrupt images (treated as missing): {len(corrupt)}: {shown}{' ...' if len(corrupt) > 20 else ''}")
    return "\n".join(lines) + "\n"


def extract_task():
    """The Prefect task around `run_extractor`; a PipelineError ends it Failed with its one-line
    message (no traceback in the logs). Built on demand so `--help` never imports Prefect."""
    from prefect import task
    from prefect.cache_policies import NO_CACHE
    from prefect.states import Failed

    @task(name="extract-one", cache_policy=NO_CACHE, task_run_name="extract {spec}")
    def extract_one(spec: str, params: ExtractParams, data: Path):
        try:
            return run_extractor(spec, params, data)
        except PipelineError as err:
            return Failed(message=str(err))

    return extract_one


RETRIES, RETRY_DELAY_S = 2, 2.0


def _transient(task, task_run, state) -> bool:
    """Prefect retry condition: retry disk errors (which may pass), not the user-fixable
    PipelineErrors a retry would only repeat (those come back as a returned Failed state)."""
    from storage.features import StoreIOError

    return isinstance(state.data, (OSError, StoreIOError))


def shard_tasks():
    """The Prefect tasks of a sharded extraction: plan (cache check), one shard, merge. A
    StoreIOError or OSError is raised, hence retried; any other PipelineError ends the task
    Failed with its one-line message. Built on demand so `--help` never imports Prefect."""
    from prefect import task
    from prefect.cache_policies import NO_CACHE
    from prefect.states import Failed

    from storage.features import StoreIOError

    def guarded(fn, *args):
        try:
            return fn(*args)
        except StoreIOError:
            raise
        except PipelineError as err:
            return Failed(message=str(err))

    @task(name="plan-shards", cache_policy=NO_CACHE, task_run_name="plan {spec}")
    def plan_one(spec: str, params: ExtractParams, data: Path):
        return guarded(plan_extractor, spec, params, data)

    @task(name="extract-shard", cache_policy=NO_CACHE, task_run_name="extract {spec} {shard.name}",
          retries=RETRIES, retry_delay_seconds=RETRY_DELAY_S, retry_condition_fn=_transient)
    def shard_one(spec: str, params: ExtractParams, data: Path, shard):
        return guarded(run_extractor, spec, params, data, shard)

    @task(name="merge-shards", cache_policy=NO_CACHE, task_run_name="merge {plan.spec}",
          retries=RETRIES, retry_delay_seconds=RETRY_DELAY_S, retry_condition_fn=_transient)
    def merge_one(plan, params: ExtractParams, data: Path, shard_rows: list[dict], modality: str, seconds: float):
        return guarded(merge_extractor, plan, params, data, shard_rows, modality, seconds)

    return plan_one, shard_one, merge_one


def task_runner(params: ExtractParams, workers: int):
    """Dask through prefect-dask: the scheduler at --scheduler, else a LocalCluster of
    `workers` single-threaded worker processes (one per shard).

    Local workers are told this run's Prefect API (a temporary server included); without it
    each would start a temporary server of its own. A remote cluster's workers need
    PREFECT_API_URL in their own environment."""
    from prefect import get_client
    from prefect_dask import DaskTaskRunner

    if params.scheduler:
        return DaskTaskRunner(address=params.scheduler)
    env = {"PREFECT_API_URL": str(get_client(sync_client=True).api_url)}
    return DaskTaskRunner(
        cluster_kwargs={"n_workers": workers, "threads_per_worker": 1, "processes": True, "env": env}
    )


def build_sharded_flow():
    """The subflow that runs on Dask: for each extractor, its shards in parallel, then the merge."""
    from prefect import flow
    from prefect.states import Failed

    _, shard_one, merge_one = shard_tasks()

    @flow(name="extract-shards")
    def extract_shards(jobs: list[tuple], params: ExtractParams, data: Path):
        rows = []
        for spec, plan, modality in jobs:  # extractors one after another, shards side by side
            started = time.perf_counter()
            futures = [shard_one.submit(spec, params, data, shard) for shard in plan.shards]
            for future in futures:  # all of them: a failed shard leaves the others finished for a rerun
                future.wait()
            states = [future.state for future in futures]
            failed = [s for s in states if s.is_failed() or s.is_crashed()]
            if failed:
                return Failed(message=failed[0].message)
            shard_rows = [s.result() for s in states]
            seconds = time.perf_counter() - started
            state = merge_one(plan, params, data, shard_rows, modality, seconds, return_state=True)
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

    extract_one = extract_task()
    plan_one, _, _ = shard_tasks()
    extract_shards = build_sharded_flow()

    def sharded(params: ExtractParams, data: Path):
        """The rows of every extractor, or a Failed state."""
        rows: list[dict | None] = []
        jobs = []
        for spec in params.extractors:
            state = plan_one(spec, params, data, return_state=True)
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
                state = extract_shards.with_options(task_runner=runner)(jobs, params, data, return_state=True)
            if state.is_failed() or state.is_crashed():
                return Failed(message=state.message)
            merged = iter(state.result())
            rows = [r if r is not None else next(merged) for r in rows]
        return rows

    @flow(name="extract")
    def extract(params: ExtractParams = ExtractParams()):
        data = params.data or default_world(params.scale, params.seed, params.storage)
        if params.shards > 1:
            rows = sharded(params, data)
            if not isinstance(rows, list):
                return rows
        else:
            rows = []
            for spec in params.extractors:  # one device: extractors run one after another
                state = extract_one(spec, params, data, return_state=True)
                if state.is_failed():
                    return Failed(message=state.message)
                rows.append(state.result())
        create_markdown_artifact(summary_markdown(rows, data), key="feature-extraction", description="Feature stores")
        return rows

    return extract


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m flows.extract",
        description="Encode every news title and IM-MIND card with frozen extractors into HDF5 feature stores "
        "(<storage>/features/<dataset>__<extractor>-<checkpoint>__frozen.h5). Without --data it uses the "
        "synthetic small world (generated on first use); without --extractor it runs bert, vit and blip, all tiny.",
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
        help="bert, vit or blip; CHECKPOINT is tiny (default), a Hugging Face/timm name in the local cache, or a "
        "local directory. Repeat for several (default: bert vit blip)",
    )
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="default: cuda when available")
    p.add_argument("--batch-size", type=int, default=64, help="news per forward pass (default 64)")
    p.add_argument("--workers", type=int, default=None,
                   help="DataLoader processes decoding images (default: 0 on CPU, where the model keeps the cores busy; "
                   "on a GPU every core but two, at most 16)")
    p.add_argument("--crop", choices=["card", "cover"], default="card", help="whole IM-MIND card or the cover box (15,15)-(215,180)")
    p.add_argument("--missing", choices=["card", "blank", "zeros"], default="card",
                   help="news without an image: a rendered title-only card (IM-MIND's way), a white card, or a zero vector")
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
                   "--shards worker processes, set up for both)")
    p.add_argument("--storage", type=Path, help="storage root (default: $MMNEWS_STORAGE or ./storage)")
    p.add_argument("--scale", choices=["tiny", "small", "mind-small"], default="small", help="synthetic world scale when --data is absent")
    p.add_argument("--seed", type=int, default=0, help="synthetic world seed when --data is absent")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = vars(build_parser().parse_args(argv))
    if args["extractors"] is None:
        args.pop("extractors")
    params = validated(ExtractParams, args, {"extractors": "extractor"})
    preflight(params)
    state = build_flow()(params, return_state=True)
    if state.is_failed():
        raise PipelineError(state.message or "extraction failed")
    rows = state.result()
    data = params.data or default_world(params.scale, params.seed, params.storage)
    print(summary_markdown(rows, data))
    return 0


if __name__ == "__main__":
    run_cli(main)
