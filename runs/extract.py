"""Extraction as runs do it: build an extractor for a catalogue, fill its store, describe it.

flows.extract calls
`extract_rows` (one summary row per extractor) and, for sharded extractions on Dask,
`plan_extractor` / `shard_row` / `merge_extractor`, whose arguments are plain and picklable
so that a Dask worker in another process can run them.
"""

from __future__ import annotations

import socket
from pathlib import Path
from urllib.parse import urlsplit

from runs.workspace import ExtractOptions, Workspace, build_extractor, extract_store, summary_row
from storage.errors import PipelineError
from storage.paths import subdir


def options_of(params) -> ExtractOptions:
    """The ExtractOptions of flows.extract's parameters."""
    return ExtractOptions(device=params.device, batch_size=params.batch_size, workers=params.workers,
                          crop=params.crop, missing=params.missing, pooling=params.pooling, tokens=params.tokens,
                          dtype=params.dtype, chunk_rows=params.chunk_rows, progress=params.progress)


def extract_rows(params, workspace: Workspace, spec: str) -> dict:
    """flows.extract's work for one extractor in this process: the store's summary row. The
    store must have exactly the settings asked for (another one is extracted again)."""
    from runs.params import reads_images

    data = workspace.data_dir(params.data, params.scale, params.world_seed)
    catalogue = workspace.catalogue(data, params.images, params.titles)
    warning = workspace.covers(catalogue, params.allow_no_images) if reads_images([spec]) else None
    row = dict(workspace.extract(spec, catalogue, options_of(params)).extracted)
    if warning:
        row["cover_warning"] = warning
    return row


# ----------------------------------------------------------------------------- sharded


def _plain_catalogue(params):
    from storage.catalogue import load_catalogue

    data = Path(params.data) if params.data is not None else Workspace(params.storage).data_dir(
        None, params.scale, params.world_seed)
    return data, load_catalogue(data, params.images, titles=params.titles)


def plan_extractor(spec: str, params) -> tuple:
    """(plan, modality, cached row or None) of one sharded extraction: run in the flow's
    process before any worker starts, so a complete store costs no cluster."""
    from extractors.run import finished_store, plan_sharded

    _, catalogue = _plain_catalogue(params)
    features = subdir("features", params.storage)
    options = options_of(params)
    extractor = build_extractor(spec, catalogue, features, options)
    plan = plan_sharded(extractor, catalogue, features, params.shards, batch_size=params.batch_size,
                        chunk_rows=params.chunk_rows, tokens=params.tokens, dtype=params.dtype)
    done = finished_store(plan, catalogue)
    if done is None:
        return plan, extractor.modality, None
    return plan, extractor.modality, summary_row(done, extractor.modality) | {"shards": shard_counts(plan, [])}


def shard_row(spec: str, params, shard) -> dict:
    """Extract one shard in this (worker) process: its summary row."""
    _, catalogue = _plain_catalogue(params)
    ref = extract_store(spec, catalogue, subdir("features", params.storage), options_of(params), shard=shard)
    return ref.extracted


def merge_extractor(plan, params, shard_rows: list[dict], modality: str, seconds: float) -> dict:
    """Check and merge the shards of `plan` into its store; the row sums up the shards."""
    from extractors.run import merge_sharded

    _, catalogue = _plain_catalogue(params)
    result = merge_sharded(plan, catalogue)
    row = summary_row(result, modality)
    computed = sum(r["rows"] - r["resumed_from"] for r in shard_rows if not r["cached"])
    images: dict[str, int] = {}
    for r in shard_rows:
        for status, k in r["images"].items():
            images[status] = images.get(status, 0) + k
    total = seconds + result.seconds
    row.update(
        seconds=round(total, 3), rows_per_s=round(computed / total, 1) if total > 0 and computed else 0.0,
        images=images, corrupt_ids=[i for r in shard_rows for i in r["corrupt_ids"]],
        shards=shard_counts(plan, shard_rows),
    )
    return row


def shard_counts(plan, shard_rows: list[dict]) -> dict:
    return {
        "count": len(plan.shards),
        "computed": sum(1 for r in shard_rows if not r["cached"]),
        "reused": sum(1 for r in shard_rows if r["cached"]),
        "resumed": sum(1 for r in shard_rows if not r["cached"] and r["resumed_from"]),
    }


def reach_scheduler(address: str, timeout_s: float = 5.0) -> None:
    """Fail in seconds, not after Dask's 30 s connect timeout, when a tcp:// scheduler does not answer."""
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
    for r in rows:
        if r.get("note"):
            lines.append(f"\n{r['extractor']}: {r['note']}")
    for warning in dict.fromkeys(r["cover_warning"] for r in rows if r.get("cover_warning")):
        lines.append(f"\nWarning: {warning}")
    corrupt = [(r["extractor"], i) for r in rows for i in r["corrupt_ids"]]
    if corrupt:
        shown = ", ".join(i for _, i in corrupt[:20])
        lines.append(f"\nCorrupt images (treated as missing): {len(corrupt)}: {shown}{' ...' if len(corrupt) > 20 else ''}")
    return "\n".join(lines) + "\n"


__all__ = ["build_extractor", "extract_rows", "extract_store", "merge_extractor", "plan_extractor",
           "reach_scheduler", "shard_row", "summary_markdown", "summary_row"]
