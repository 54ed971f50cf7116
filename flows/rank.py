"""`python -m flows.rank`: train one ranker on stored features, evaluate on dev, write it all.

Writes into `<storage>/models/<run>/`: the model (safetensors or LightGBM text format),
`metrics.json` (dev metrics of exactly the ranks submitted in prediction_dev.txt),
`scores_dev.npy` (minus those ranks, which the comparison report resamples), `prediction_dev.txt` and, when the dataset has an unlabeled
test split, `prediction_test.txt` (leaderboard format, real impression ids), and `run.json`
(config, data and store fingerprints, seeds, versions, timings). Features that are not
extracted yet are extracted first (the extraction is cached).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, Field, field_validator

from flows.common import default_world, subdir, validated
from storage.errors import PipelineError, run_cli

ROLE_OF_EXTRACTOR = {"bert": "text", "vit": "image", "blip": "blip"}
RANKERS = ("nrms", "lightgbm", "random", "popularity", "oracle")
FUSIONS = ("hadamard", "concat", "gated", "text", "image", "blip")


class RankParams(BaseModel):
    """Run parameters, validated before any work starts."""

    data: Path | None = None
    images: Path | None = None
    features: list[str] = Field(default_factory=lambda: ["bert"], min_length=1)
    fusion: Literal["hadamard", "concat", "gated", "text", "image", "blip"] = "text"
    ranker: Literal["nrms", "lightgbm", "random", "popularity", "oracle"] = "nrms"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    epochs: int = Field(10, ge=1, le=100)
    lr: float | None = Field(None, gt=0, le=1)
    dropout: float | None = Field(None, ge=0, lt=1)
    tokens: bool = False
    seed: int = Field(0, ge=0)
    storage: Path | None = None
    scale: Literal["tiny", "small", "mind-small"] = "small"
    world_seed: int = Field(0, ge=0)
    run_name: str | None = None
    progress: bool = True

    @field_validator("features")
    @classmethod
    def _known(cls, specs: list[str]) -> list[str]:
        from extractors.registry import parse_spec

        out = []
        for spec in specs:
            for part in spec.split(","):
                name, _ = parse_spec(part)
                if name not in ROLE_OF_EXTRACTOR:
                    raise ValueError(f"unknown extractor {name!r}; known: {', '.join(ROLE_OF_EXTRACTOR)}")
                out.append(part.strip())
        return out


@dataclass
class RankOutcome:
    """What one ranking run produced (also the flow's return value)."""

    run: str
    ranker: str
    fusion: str
    features: list[str]
    folder: str
    dev_metrics: dict
    fit: dict
    files: list[str] = field(default_factory=list)


def roles_for(fusion: str) -> tuple[str, ...]:
    return {"hadamard": ("text", "image"), "concat": ("text", "image"), "gated": ("text", "image")}.get(fusion, (fusion,))


def run_name(params: RankParams, dataset: str) -> str:
    if params.run_name:
        return params.run_name
    feats = "+".join(f.replace(":", "-").replace("/", "_") for f in params.features)
    uses_features = params.ranker in ("nrms", "lightgbm")
    return f"{dataset}__{params.ranker}" + (f"__{params.fusion}__{feats}" if uses_features else "")


def existing_store(spec: str, catalogue, storage: Path | None, tokens: bool = False) -> dict | None:
    """The complete frozen store of `spec` for this catalogue, found without building the
    extractor (loading a real checkpoint takes seconds to minutes), else None.

    Any complete store of that extractor and checkpoint over exactly these news serves,
    whatever preprocessing options `flows.extract` was given (run.json records the store);
    `tokens` asks for one that holds token vectors.
    """
    from extractors.registry import parse_spec
    from extractors.run import slug_of
    from storage.features import FeatureStore, store_path

    name, checkpoint = parse_spec(spec)
    path = store_path(subdir("features", storage), catalogue.name, slug_of(name, checkpoint), "frozen")
    if not path.is_file():
        return None
    try:
        with FeatureStore.open(path, expected_fingerprint=catalogue.fingerprint()) as store:
            meta = store.meta
            usable = (meta.extractor == name and meta.checkpoint == checkpoint and meta.mode == "frozen"
                      and (meta.token_len is not None or not tokens) and np.array_equal(store.ids, catalogue.ids))
    except PipelineError:
        return None  # incomplete, corrupt or stale: extraction decides what to do with it
    return {"store": str(path), "extractor": f"{name}:{checkpoint}"} if usable else None


def run_rank(params: RankParams, data: Path) -> RankOutcome:
    """The plain function behind the flow: load, fit, evaluate, write."""
    from flows.extract import ExtractParams, run_extractor
    from rankers.baselines import create_ranker
    from rankers.data import carve_validation, load_features, load_impressions
    from rankers.metrics import evaluate, ranks_from_scores
    from storage.catalogue import load_catalogue
    from storage.features import package_versions
    from storage.submission import write_prediction

    catalogue = load_catalogue(data, params.images)
    started = time.perf_counter()
    features = {}
    stores = {}
    if params.ranker in ("nrms", "lightgbm"):
        needed = roles_for(params.fusion)
        by_role = {ROLE_OF_EXTRACTOR[f.split(":")[0].lower()]: f for f in params.features}
        missing = [r for r in needed if r not in by_role]
        if missing:
            raise PipelineError(
                f"--fusion {params.fusion} needs features for {', '.join(missing)}; add "
                + ", ".join({'text': 'bert', 'image': 'vit', 'blip': 'blip'}[r] for r in missing) + " to --features"
            )
        for role in needed:
            extracted = existing_store(by_role[role], catalogue, params.storage, tokens=params.tokens)
            if extracted is None:
                extracted = run_extractor(
                    by_role[role],
                    ExtractParams(data=data, images=params.images, extractors=[by_role[role]], device=params.device,
                                  storage=params.storage, progress=params.progress),
                    data,
                )
            # Token vectors are read only for an NRMS that attends over them: LightGBM and the
            # pooled news encoder use the stored (pooled) vectors.
            features[role] = load_features(extracted["store"], catalogue, name=extracted["extractor"],
                                           tokens=params.ranker == "nrms" and params.tokens)
            stores[role] = {"path": extracted["store"], "extractor": extracted["extractor"]}

    train, valid = carve_validation(load_impressions(data, "train", catalogue))
    dev = load_impressions(data, "dev", catalogue)
    options = {"seed": params.seed}
    if params.ranker == "nrms":
        from rankers.nrms import NRMSConfig

        tuning = {k: v for k, v in (("lr", params.lr), ("dropout", params.dropout)) if v is not None}
        options = dict(fusion=params.fusion, device=params.device, progress=params.progress,
                       config=NRMSConfig(epochs=params.epochs, seed=params.seed, use_tokens=params.tokens, **tuning))
    elif params.ranker == "lightgbm":
        options.update(fusion=params.fusion)
    elif params.ranker == "oracle":
        options.update(click_probs=data / "dev" / "click_probs.txt")
    ranker = create_ranker(params.ranker, **options)
    report = ranker.fit(train, valid, features)
    scoring_started = time.perf_counter()
    # Metrics are computed from the ranks written to prediction_dev.txt, not the raw scores:
    # tied scores (common in tree ensembles) would otherwise count half in AUC here and be
    # broken by position in the file, and the leaderboard's figure would differ from ours.
    dev_ranks = ranks_from_scores(dev.cand_offsets, ranker.score(dev))
    dev_scores = -dev_ranks.astype(np.float64)
    dev_metrics = evaluate(dev.cand_offsets, dev.labels, dev_scores)
    score_seconds = time.perf_counter() - scoring_started

    name = run_name(params, catalogue.name)
    folder = subdir("models", params.storage) / name
    folder.mkdir(parents=True, exist_ok=True)
    files = [str(p) for p in ranker.save(folder)]
    write_prediction(folder / "prediction_dev.txt", dev.impression_ids, dev.cand_offsets, dev_ranks)
    files.append(str(folder / "prediction_dev.txt"))
    test_dir = data / "test"
    if params.ranker != "oracle" and (test_dir / "behaviors.tsv").is_file():
        test = load_impressions(data, "test", catalogue)
        test_scores = ranker.score(test)
        write_prediction(folder / "prediction_test.txt", test.impression_ids, test.cand_offsets, ranks_from_scores(test.cand_offsets, test_scores))
        files.append(str(folder / "prediction_test.txt"))
    np.save(folder / "scores_dev.npy", dev_scores)  # minus the submitted ranks, for the report
    (folder / "metrics.json").write_text(json.dumps(dev_metrics, indent=2) + "\n")
    fit = asdict(report)
    record = {
        "run": name,
        "params": json.loads(params.model_dump_json()),
        "data": {"root": str(catalogue.root), "fingerprint": catalogue.fingerprint(), "news": len(catalogue),
                 "train": len(train), "valid": len(valid), "dev": len(dev)},
        "stores": stores,
        "seeds": {"ranker": params.seed, "world": params.world_seed},
        "versions": {**package_versions(), "platform": platform.platform()},
        "fit": fit,
        "dev_metrics": dev_metrics,
        "timings": {"total_seconds": round(time.perf_counter() - started, 3), "fit_seconds": report.seconds,
                    "dev_scoring_seconds": round(score_seconds, 3)},
    }
    (folder / "run.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    files += [str(folder / "metrics.json"), str(folder / "run.json")]
    return RankOutcome(name, params.ranker, params.fusion, params.features, str(folder), dev_metrics, fit, files)


def format_outcome(outcome: RankOutcome) -> str:
    m = outcome.dev_metrics
    return (
        f"{outcome.run}\n  dev AUC {m['auc']:.4f}  MRR {m['mrr']:.4f}  nDCG@5 {m['ndcg@5']:.4f}  "
        f"nDCG@10 {m['ndcg@10']:.4f}  ({m['impressions']:,} impressions)\n  written to {outcome.folder}"
    )


def rank_task():
    """The Prefect task around `run_rank`; a PipelineError ends it Failed with its message."""
    from prefect import task
    from prefect.cache_policies import NO_CACHE
    from prefect.states import Failed

    @task(name="rank-one", cache_policy=NO_CACHE, task_run_name="rank {label}")
    def rank_one(label: str, params: RankParams, data: Path):
        try:
            return run_rank(params, data)
        except PipelineError as err:
            return Failed(message=str(err))

    return rank_one


def build_flow():
    from prefect import flow
    from prefect.artifacts import create_markdown_artifact
    from prefect.states import Failed

    rank_one = rank_task()

    @flow(name="rank")
    def rank(params: RankParams = RankParams()):
        data = params.data or default_world(params.scale, params.world_seed, params.storage)
        state = rank_one(params.ranker, params, data, return_state=True)
        if state.is_failed():
            return Failed(message=state.message)
        outcome = state.result()
        create_markdown_artifact(f"```\n{format_outcome(outcome)}\n```", key="rank-run", description="Ranking run")
        return outcome

    return rank


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m flows.rank",
        description="Train a ranker on stored news features, evaluate it on dev with the official MIND metrics, "
        "and write the model, dev metrics, prediction files and a run record under <storage>/models/<run>/. "
        "Missing feature stores are extracted first.",
        epilog="Example: python -m flows.rank --features bert,vit --fusion hadamard --ranker nrms",
    )
    p.add_argument("--data", type=Path, help="MIND folder with train/ dev/ [test/] (default: the synthetic world)")
    p.add_argument("--images", type=Path, help="IM-MIND folder of <news_id>.jpg (default: DATA/images)")
    p.add_argument("--features", action="append", metavar="NAME[:CKPT][,...]",
                   help="extractors whose stores feed the ranker: bert (text), vit (image), blip (multimodal); "
                   "comma-separated or repeated (default: bert)")
    p.add_argument("--fusion", choices=FUSIONS, default="text",
                   help="how modalities combine: hadamard/concat/gated (text and image), or a single source text/image/blip")
    p.add_argument("--ranker", choices=RANKERS, default="nrms", help="nrms (attention), lightgbm, or a baseline")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--epochs", type=int, default=10, help="maximum epochs for nrms (early stopping on validation)")
    p.add_argument("--lr", type=float, help="NRMS learning rate (default: NRMSConfig's)")
    p.add_argument("--dropout", type=float, help="NRMS dropout rate in [0, 1) (default: NRMSConfig's)")
    p.add_argument("--tokens", action="store_true",
                   help="NRMS news encoders attend over the stores' token vectors (self-attention, then additive "
                   "attention) instead of projecting the pooled vectors; about 40x the cost of a step")
    p.add_argument("--seed", type=int, default=0, help="ranker seed")
    p.add_argument("--storage", type=Path, help="storage root (default: $MMNEWS_STORAGE or ./storage)")
    p.add_argument("--scale", choices=["tiny", "small", "mind-small"], default="small", help="synthetic world scale when --data is absent")
    p.add_argument("--world-seed", type=int, default=0, help="synthetic world seed when --data is absent")
    p.add_argument("--run-name", help="folder name under <storage>/models (default: derived from the settings)")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = vars(build_parser().parse_args(argv))
    if args["features"] is None:
        args.pop("features")
    params = validated(RankParams, args)
    if params.data is not None and not params.data.is_dir():
        raise PipelineError(f"data folder {params.data} does not exist; pass --data with a MIND folder, or leave it out")
    state = build_flow()(params, return_state=True)
    if state.is_failed():
        raise PipelineError(state.message or "ranking failed")
    print(format_outcome(state.result()))
    return 0


if __name__ == "__main__":
    run_cli(main)
