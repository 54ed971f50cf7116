"""`python -m flows.extract`: frozen BERT, ViT and BLIP features of every news into HDF5 stores.

One Prefect task per extractor. A store is the cache: a rerun with the same extractor
config, checkpoint and data fingerprint finds its complete store and recomputes nothing; a
crashed run resumes its partial store. A markdown artifact (and the printed summary) gives
rows, width, missing and corrupt images, throughput and file paths.
"""

from __future__ import annotations

import argparse
import logging
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
    extractors: list[str] = Field(default_factory=lambda: list(DEFAULT_EXTRACTORS), min_length=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    batch_size: int = Field(64, ge=1, le=8192)
    workers: int = Field(0, ge=0, le=64)
    crop: Literal["card", "cover"] = "card"
    missing: Literal["card", "blank", "zeros"] = "card"
    tokens: bool = True
    dtype: Literal["float16", "float32"] = "float16"
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


def preflight(params: ExtractParams) -> None:
    """The checks that can fail in a second, done before Prefect starts."""
    from extractors.checkpoints import ensure_available
    from extractors.registry import parse_spec

    if params.data is not None and not params.data.is_dir():
        raise PipelineError(
            f"data folder {params.data} does not exist; pass --data with a MIND folder (train/ dev/ test/), "
            "or leave it out to use the synthetic world"
        )
    if params.images is not None and not params.images.is_dir():
        raise PipelineError(f"image folder {params.images} does not exist; pass --images with the IM-MIND folder")
    for spec in params.extractors:
        ensure_available(*parse_spec(spec))
    if params.device == "cuda":
        from extractors.run import resolve_device

        resolve_device("cuda")


def run_extractor(spec: str, params: ExtractParams, data: Path) -> dict:
    """Build one extractor and fill its store; the plain function behind the Prefect task."""
    from extractors.registry import create
    from extractors.run import extract_catalogue
    from storage.catalogue import load_catalogue

    catalogue = load_catalogue(data, params.images)
    features = subdir("features", params.storage)
    workdir = features / f"{catalogue.name}__tokenizer-{catalogue.fingerprint()[:12]}"
    extractor = create(
        spec, titles=[str(t) for t in catalogue.title], workdir=workdir, crop=params.crop, missing=params.missing
    )
    result = extract_catalogue(
        extractor, catalogue, features, batch_size=params.batch_size, device=params.device,
        num_workers=params.workers, tokens=params.tokens, dtype=params.dtype, progress=params.progress,
    )
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
        "modality": extractor.modality,
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


def build_flow():
    """The Prefect flow, built on demand so `--help` and errors never import Prefect."""
    from prefect import flow
    from prefect.artifacts import create_markdown_artifact
    from prefect.states import Failed

    extract_one = extract_task()

    @flow(name="extract")
    def extract(params: ExtractParams = ExtractParams()):
        data = params.data or default_world(params.scale, params.seed, params.storage)
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
    p.add_argument(
        "--extractor", action="append", dest="extractors", metavar="NAME[:CHECKPOINT]",
        help="bert, vit or blip; CHECKPOINT is tiny (default), a Hugging Face/timm name in the local cache, or a "
        "local directory. Repeat for several (default: bert vit blip)",
    )
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="default: cuda when available")
    p.add_argument("--batch-size", type=int, default=64, help="news per forward pass (default 64)")
    p.add_argument("--workers", type=int, default=0, help="DataLoader processes decoding images (default 0: in-process)")
    p.add_argument("--crop", choices=["card", "cover"], default="card", help="whole IM-MIND card or the cover box (15,15)-(215,180)")
    p.add_argument("--missing", choices=["card", "blank", "zeros"], default="card",
                   help="news without an image: a rendered title-only card (IM-MIND's way), a white card, or a zero vector")
    p.add_argument("--no-tokens", dest="tokens", action="store_false", help="store pooled vectors only (no token/patch vectors)")
    p.add_argument("--dtype", choices=["float16", "float32"], default="float16", help="stored precision (default float16)")
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
