"""`python -m flows.rank`: train one ranker, evaluate on dev, write it all.

Two ways to train, the same outputs:
- on stored features (default): NRMS or LightGBM over the HDF5 stores of the `--features`
  extractors (frozen, or `NAME@finetuned` for the store a fine-tuned run exported). Frozen
  stores that are not extracted yet are extracted first (the extraction is cached).
- `--finetune`: PLM-NR, the NRMS ranker with its extractors trained end to end over the raw
  titles (and cards) (rankers.finetune); `--mtrec` adds MTRec's category and NER tasks with
  gradient surgery, `--no-category` / `--no-ner` / `--no-surgery` drop one part (the
  ablations). Every epoch is checkpointed into `<run>/checkpoints/`, so running the same
  command again after a kill resumes from the last epoch (and after a finished run trains
  nothing more unless given more epochs). After training, each fine-tuned extractor writes
  its vectors into `<storage>/features/<dataset>__<extractor>__finetuned.h5`, which
  `--features bert@finetuned` then feeds to LightGBM or NRMS. Hyperparameters: with `tiny`
  checkpoints the tiny scale (`TINY_FINETUNE_HEAD`, no accumulation, the library's tiny
  encoder rate); with real checkpoints the library's published defaults (NRMS+BERT on
  MIND-small: 3 epochs, head AdamW 1e-4, encoder 2e-5, batch 32 x 4 accumulated = 128,
  K = 4, history 50). Options override either.

`--titles FILE` (GENRE's enhanced titles, `news_id<TAB>title`) replaces the titles the text
and BLIP extractors and fine-tuning read; the dataset is then named `<dataset>-enhanced-<hash>`,
so stores and runs sit beside the original titles' ones. Image stores (IM-MIND cards) stay
those of the original catalogue.

Writes into `<storage>/models/<run>/`: the model (safetensors or LightGBM text format),
`metrics.json` (dev metrics of exactly the ranks submitted in prediction_dev.txt),
`scores_dev.npy` (minus those ranks, which the comparison report resamples), `prediction_dev.txt` and, when the dataset has an unlabeled
test split, `prediction_test.txt` (leaderboard format, real impression ids), and `run.json`
(config, data and store fingerprints, seeds, versions, timings).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, Field, ValidationInfo, field_validator, model_validator

from flows.common import default_world, subdir, validated
from storage.errors import PipelineError, run_cli

ROLE_OF_EXTRACTOR = {"bert": "text", "vit": "image", "blip": "blip"}
EXTRACTOR_OF_ROLE = {"text": "bert", "image": "vit", "blip": "blip"}
RANKERS = ("nrms", "lightgbm", "random", "popularity", "oracle")
FUSIONS = ("hadamard", "concat", "gated", "text", "image", "blip")
STORE_MODES = ("frozen", "finetuned")
FINETUNE_ROLES = ("text", "image")
CHECKPOINTS = "checkpoints"
FROZEN_EPOCHS = 10  # NRMS over stores: at most, with early stopping
FINETUNE_EPOCHS = 3  # as published for NRMS+BERT (and the library's default)
# Fine-tuning the seeded random tiny models on a tiny or small synthetic world: a small head
# at a head-sized rate without accumulation (the tiny world gives 12 micro-batches an epoch;
# 32 x 4 accumulated would be 3 optimizer steps). The published head (rankers.finetune's
# FineTuneConfig defaults) is for real checkpoints.
TINY_FINETUNE_HEAD = dict(dim=32, heads=4, additive_hidden=32, history=20, lr=3e-3)
TINY_ACCUMULATE = 1


def split_mode(spec: str) -> tuple[str, str]:
    """`bert:CKPT@finetuned` -> (`bert:CKPT`, `finetuned`); no suffix is `frozen`."""
    base, sep, mode = spec.strip().rpartition("@")
    if sep and mode in STORE_MODES:
        return base, mode
    return spec.strip(), "frozen"


def role_of(spec: str) -> str:
    return ROLE_OF_EXTRACTOR[split_mode(spec)[0].split(":")[0].lower()]


def _needs(flag: str, info: ValidationInfo, on: str, why: str) -> None:
    if not info.data.get(on):
        raise ValueError(f"{flag} needs --{on.replace('_', '-')} ({why})")


class RankParams(BaseModel):
    """Run parameters, validated before any work starts. Fields are validated in order, so
    each fine-tuning option checks the options it depends on, which come before it."""

    data: Path | None = None
    images: Path | None = None
    titles: Path | None = None
    features: list[str] = Field(default_factory=lambda: ["bert"], min_length=1)
    fusion: Literal["hadamard", "concat", "gated", "text", "image", "blip"] = "text"
    ranker: Literal["nrms", "lightgbm", "random", "popularity", "oracle"] = "nrms"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    epochs: int = Field(FROZEN_EPOCHS, ge=1, le=100)  # left out or None: FINETUNE_EPOCHS with finetune
    lr: float | None = Field(None, gt=0, le=1)
    dropout: float | None = Field(None, ge=0, lt=1)
    tokens: bool = False
    seed: int = Field(0, ge=0)
    storage: Path | None = None
    scale: Literal["tiny", "small", "mind-small"] = "small"
    world_seed: int = Field(0, ge=0)
    run_name: str | None = None
    progress: bool = True
    finetune: bool = False
    mtrec: bool = False
    category: bool = True
    ner: bool = True
    surgery: bool = True
    freeze_layers: int = Field(0, ge=0, le=1000)
    grad_checkpointing: bool = False
    accumulate: int | None = Field(None, ge=1, le=1024)
    encoder_lr: float | None = Field(None, gt=0, le=1)

    @model_validator(mode="before")
    @classmethod
    def _default_epochs(cls, values):
        if isinstance(values, dict) and values.get("epochs") is None:
            values = {**values, "epochs": FINETUNE_EPOCHS if values.get("finetune") else FROZEN_EPOCHS}
        return values

    @field_validator("features")
    @classmethod
    def _known(cls, specs: list[str]) -> list[str]:
        from extractors.registry import parse_spec

        out = []
        for spec in specs:
            for part in spec.split(","):
                base, _ = split_mode(part)
                name, _ = parse_spec(base)
                if name not in ROLE_OF_EXTRACTOR:
                    raise ValueError(f"unknown extractor {name!r}; known: {', '.join(ROLE_OF_EXTRACTOR)} "
                                     "(NAME[:CHECKPOINT][@finetuned])")
                out.append(part.strip())
        return out

    @field_validator("finetune")
    @classmethod
    def _finetune(cls, on: bool, info: ValidationInfo) -> bool:
        if not on:
            return on
        if info.data.get("ranker", "nrms") != "nrms":
            raise ValueError(f"fine-tuning trains the nrms ranker (PLM-NR), not {info.data['ranker']}; drop --ranker, "
                             "or train LightGBM on the fine-tuned store with --features bert@finetuned")
        roles = roles_for(info.data.get("fusion", "text"))
        if not set(roles) <= set(FINETUNE_ROLES):
            raise ValueError(f"fine-tuning trains bert and vit; --fusion {info.data['fusion']} is not one of "
                             "text, image, hadamard, concat, gated")
        if any(split_mode(f)[1] != "frozen" for f in info.data.get("features", [])):
            raise ValueError("fine-tuning reads raw news, not stores; drop the @finetuned suffix from --features")
        if info.data.get("tokens"):
            raise ValueError("--tokens is for stored features; fine-tuning always attends over the token vectors")
        return on

    @field_validator("mtrec")
    @classmethod
    def _mtrec(cls, on: bool, info: ValidationInfo) -> bool:
        if on:
            _needs("--mtrec", info, "finetune", "MTRec's tasks train the text encoder")
            if "text" not in roles_for(info.data.get("fusion", "text")):
                raise ValueError("MTRec's tasks need the text role; use --fusion text, hadamard, concat or gated")
        return on

    @field_validator("category", "ner", "surgery")
    @classmethod
    def _ablation(cls, on: bool, info: ValidationInfo) -> bool:
        if not on:
            _needs(f"--no-{info.field_name}", info, "mtrec", "it drops one part of MTRec")
            if info.field_name == "ner" and not info.data.get("category", True):
                raise ValueError("--no-category with --no-ner leaves no MTRec task: that is the plain fine-tuned "
                                 "model, drop --mtrec")
        return on

    @field_validator("freeze_layers", "grad_checkpointing", "accumulate", "encoder_lr")
    @classmethod
    def _finetune_only(cls, value, info: ValidationInfo):
        if value not in (None, 0, False):
            _needs(f"--{info.field_name.replace('_', '-')}", info, "finetune", "it is a fine-tuning option")
        return value


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
    finetune: bool = False
    mtrec: dict | None = None  # MTRec's switches when its tasks were on
    titles: str | None = None  # the enhanced titles file, if any
    resumed_from: int = 0  # the checkpoint epoch a fine-tuning run resumed from (0: none)
    stores: dict = field(default_factory=dict)  # role -> {"path", "extractor", "mode", ...}


def roles_for(fusion: str) -> tuple[str, ...]:
    return {"hadamard": ("text", "image"), "concat": ("text", "image"), "gated": ("text", "image")}.get(fusion, (fusion,))


def model_kind(params: RankParams) -> str:
    """`nrms`, `lightgbm`, ...; `nrms-finetune`; `mtrec`, `mtrec-no-ner`, ... (run names, reports)."""
    if not params.finetune:
        return params.ranker
    if not params.mtrec:
        return "nrms-finetune"
    return "mtrec" + "".join(f"-no-{part}" for part in ("category", "ner", "surgery") if not getattr(params, part))


def run_name(params: RankParams, dataset: str) -> str:
    if params.run_name:
        return params.run_name
    feats = "+".join(f.replace(":", "-").replace("/", "_").replace("@", "-") for f in params.features)
    uses_features = params.ranker in ("nrms", "lightgbm")
    tokens = "__tokens" if params.tokens and params.ranker == "nrms" else ""
    return f"{dataset}__{model_kind(params)}" + (f"__{params.fusion}__{feats}{tokens}" if uses_features else "")


def role_specs(params: RankParams) -> dict[str, str]:
    """The `--features` spec of every role the fusion needs, or a clear error naming the missing ones."""
    needed = roles_for(params.fusion)
    by_role = {role_of(f): f for f in params.features}
    missing = [r for r in needed if r not in by_role]
    if missing:
        raise PipelineError(
            f"--fusion {params.fusion} needs features for {', '.join(missing)}; add "
            + ", ".join(EXTRACTOR_OF_ROLE[r] for r in missing) + " to --features"
        )
    return {role: by_role[role] for role in needed}


def existing_store(spec: str, catalogue, storage: Path | None, tokens: bool = False, mode: str = "frozen") -> dict | None:
    """The complete store of `spec` (of `mode`) for this catalogue, found without building the
    extractor (loading a real checkpoint takes seconds to minutes), else None.

    Any complete store of that extractor and checkpoint over exactly these news serves,
    whatever preprocessing options `flows.extract` was given (run.json records the store);
    `tokens` asks for one that holds token vectors.
    """
    from extractors.registry import parse_spec
    from extractors.run import slug_of
    from storage.features import FeatureStore, store_path

    name, checkpoint = parse_spec(spec)
    path = store_path(subdir("features", storage), catalogue.name, slug_of(name, checkpoint), mode)
    if not path.is_file():
        return None
    try:
        with FeatureStore.open(path, expected_fingerprint=catalogue.fingerprint()) as store:
            meta = store.meta
            usable = (meta.extractor == name and meta.checkpoint == checkpoint and meta.mode == mode
                      and (meta.token_len is not None or not tokens) and np.array_equal(store.ids, catalogue.ids))
            tuned = meta.preprocess.get("finetune") or {}
    except PipelineError:
        return None  # incomplete, corrupt or stale: extraction decides what to do with it
    if not usable:
        return None
    found = {"store": str(path), "extractor": f"{name}:{checkpoint}", "mode": mode}
    if tuned:
        found.update(weights_sha256=tuned.get("weights_sha256"), finetuned_with=tuned.get("fusion"))
    return found


def finetune_config(params: RankParams, specs: dict[str, str]):
    """The FineTuneConfig of a `--finetune` run: the tiny scale when every checkpoint is
    `tiny`, else the library's published defaults; explicit options override either."""
    from extractors.registry import parse_spec
    from rankers.finetune import FineTuneConfig
    from rankers.mtrec import MTRecConfig

    parsed = {role: parse_spec(spec) for role, spec in specs.items()}
    tiny = all(ckpt == "tiny" for _, ckpt in parsed.values())
    published = FineTuneConfig()
    head = {"epochs": params.epochs, "seed": params.seed}
    if tiny:
        head.update(TINY_FINETUNE_HEAD)
    head.update({k: v for k, v in (("lr", params.lr), ("dropout", params.dropout)) if v is not None})
    full = {role: f"{name}:{ckpt}" for role, (name, ckpt) in parsed.items()}
    return FineTuneConfig(
        fusion=params.fusion, text=full.get("text", published.text), image=full.get("image", published.image),
        encoder_lr=params.encoder_lr, freeze_layers=params.freeze_layers,
        gradient_checkpointing=params.grad_checkpointing,
        accumulate=params.accumulate or (TINY_ACCUMULATE if tiny else published.accumulate),
        mtrec=MTRecConfig(category=params.category, ner=params.ner, surgery=params.surgery) if params.mtrec else None,
        ranker=dataclasses.replace(published.ranker, **head),
    )


# ---------------------------------------------------------------------------------------
# The two ways to fit


def nrms_config(params: RankParams):
    """The NRMSConfig of a frozen NRMS run (every torchrun rank builds the same one)."""
    from rankers.nrms import NRMSConfig

    tuning = {k: v for k, v in (("lr", params.lr), ("dropout", params.dropout)) if v is not None}
    return NRMSConfig(epochs=params.epochs, seed=params.seed, use_tokens=params.tokens, **tuning)


def _fit_on_stores(params: RankParams, data: Path, catalogue, original, train, valid):
    """(ranker, fit report, stores) of a ranker over feature stores (or a baseline)."""
    from flows.extract import ExtractParams, run_extractor
    from rankers.registry import create_ranker
    from rankers.data import load_features

    features, stores = {}, {}
    if params.ranker in ("nrms", "lightgbm"):
        for role, spec in role_specs(params).items():
            spec, mode = split_mode(spec)
            # Enhanced titles change what BERT and BLIP read; the images stay the dataset's.
            cat = original if role == "image" else catalogue
            extracted = existing_store(spec, cat, params.storage, tokens=params.tokens, mode=mode)
            if extracted is None and mode == "finetuned":
                raise PipelineError(
                    f"no fine-tuned store of {spec} for {cat.name} in {subdir('features', params.storage)}; "
                    f"fine-tune first (python -m flows.rank --finetune --features {spec}"
                    + (f" --titles {params.titles}" if params.titles and role != "image" else "")
                    + "), which writes it")
            if extracted is None:
                extracted = run_extractor(
                    spec,
                    ExtractParams(data=data, images=params.images, titles=None if role == "image" else params.titles,
                                  extractors=[spec], device=params.device, storage=params.storage,
                                  progress=params.progress),
                    data,
                )
                extracted["mode"] = "frozen"
            # Token vectors are read only for an NRMS that attends over them: LightGBM and the
            # pooled news encoder use the stored (pooled) vectors.
            name = extracted["extractor"] + ("@finetuned" if mode == "finetuned" else "")
            features[role] = load_features(extracted["store"], cat, name=name,
                                           tokens=params.ranker == "nrms" and params.tokens)
            stores[role] = {"path": extracted["store"], **{k: v for k, v in extracted.items() if k != "store"}}

    options = {"seed": params.seed}
    if params.ranker == "nrms":
        options = dict(fusion=params.fusion, device=params.device, progress=params.progress,
                       config=nrms_config(params))
    elif params.ranker == "lightgbm":
        options.update(fusion=params.fusion)
    elif params.ranker == "oracle":
        options.update(click_probs=data / "dev" / "click_probs.txt")
    ranker = create_ranker(params.ranker, **options)
    return ranker, ranker.fit(train, valid, features), stores


def _fit_finetuned(params: RankParams, catalogue, train, valid, folder: Path):
    """(ranker, fit report, stores, config) of PLM-NR (or MTRec) fine-tuned end to end,
    checkpointed into `folder/checkpoints`, with its fine-tuned stores exported."""
    from rankers.finetune import FineTuneRanker
    from storage.features import FeatureStore

    config = finetune_config(params, role_specs(params))
    ranker = FineTuneRanker(catalogue, config, device=params.device, progress=params.progress)
    checkpoints = folder / CHECKPOINTS
    try:
        report = ranker.fit(train, valid, checkpoint_dir=checkpoints)
    except PipelineError as err:
        if str(checkpoints) not in str(err):
            raise
        raise PipelineError(f"{err} (or pass --run-name NAME to train these settings in a run folder of their own)") from None
    stores = {}
    for role, path in ranker.export_features(subdir("features", params.storage)).items():
        with FeatureStore.open(path) as store:
            tuned = store.meta.preprocess.get("finetune") or {}
        stores[role] = {"path": str(path), "extractor": config.specs[role], "mode": "finetuned",
                        "weights_sha256": tuned.get("weights_sha256")}
    return ranker, report, stores, config


# ---------------------------------------------------------------------------------------
# The run


def run_rank(params: RankParams, data: Path) -> RankOutcome:
    """The plain function behind the flow: load, fit, evaluate, write."""
    from rankers.data import carve_validation, load_impressions
    from storage.catalogue import load_catalogue, with_titles
    from storage.mind import read_titles

    original = load_catalogue(data, params.images)
    catalogue = original
    if params.titles is not None:
        catalogue = with_titles(original, read_titles(params.titles, known=original.index), params.titles)
    started = time.perf_counter()
    train, valid = carve_validation(load_impressions(data, "train", catalogue))
    dev = load_impressions(data, "dev", catalogue)
    name = run_name(params, catalogue.name)
    folder = subdir("models", params.storage) / name
    folder.mkdir(parents=True, exist_ok=True)
    record: dict = {}
    if params.finetune:
        ranker, report, stores, config = _fit_finetuned(params, catalogue, train, valid, folder)
        record["finetune"] = {"config": config.to_dict(), "checkpoints": str(folder / CHECKPOINTS),
                              "resumed_from_epoch": ranker.resumed_from}
    else:
        ranker, report, stores = _fit_on_stores(params, data, catalogue, original, train, valid)
    outcome = write_run(params, data, name, folder, catalogue, ranker, report, stores, (train, valid, dev),
                        started, record)
    if params.finetune:
        outcome.resumed_from = ranker.resumed_from
        outcome.mtrec = config.mtrec.to_dict() if config.mtrec else None
    return outcome


def write_run(params: RankParams, data: Path, name: str, folder: Path, catalogue, ranker, report, stores: dict,
              splits: tuple, started: float, extra: dict | None = None) -> RankOutcome:
    """Score dev (and test) with a fitted ranker and write the model, predictions, metrics and
    run.json into `folder`: what every flows.rank run writes, however it was trained."""
    from rankers.data import load_impressions
    from rankers.metrics import evaluate, ranks_from_scores
    from storage.features import package_versions
    from storage.submission import write_prediction

    train, valid, dev = splits
    scoring_started = time.perf_counter()
    # Metrics are computed from the ranks written to prediction_dev.txt, not the raw scores:
    # tied scores (common in tree ensembles) would otherwise count half in AUC here and be
    # broken by position in the file, and the leaderboard's figure would differ from ours.
    dev_ranks = ranks_from_scores(dev.cand_offsets, ranker.score(dev))
    dev_scores = -dev_ranks.astype(np.float64)
    dev_metrics = evaluate(dev.cand_offsets, dev.labels, dev_scores)
    score_seconds = time.perf_counter() - scoring_started

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
    data_record = {"root": str(catalogue.root), "name": catalogue.name, "fingerprint": catalogue.fingerprint(),
                   "news": len(catalogue), "train": len(train), "valid": len(valid), "dev": len(dev)}
    if catalogue.titles_file is not None:
        data_record["titles"] = {"file": str(catalogue.titles_file), "replaced": catalogue.enhanced,
                                 "sha256": catalogue.titles_digest}
    record = {
        "run": name,
        "params": json.loads(params.model_dump_json()),
        "data": data_record,
        "stores": stores,
        "seeds": {"ranker": params.seed, "world": params.world_seed},
        "versions": {**package_versions(), "platform": platform.platform()},
        "fit": fit,
        "dev_metrics": dev_metrics,
        "timings": {"total_seconds": round(time.perf_counter() - started, 3), "fit_seconds": report.seconds,
                    "dev_scoring_seconds": round(score_seconds, 3)},
        **(extra or {}),
    }
    (folder / "run.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    files += [str(folder / "metrics.json"), str(folder / "run.json")]
    return RankOutcome(name, params.ranker, params.fusion, params.features, str(folder), dev_metrics, fit, files,
                       finetune=params.finetune, titles=str(catalogue.titles_file) if catalogue.titles_file else None,
                       stores=stores)


def format_outcome(outcome: RankOutcome) -> str:
    m = outcome.dev_metrics
    lines = [
        outcome.run,
        f"  dev AUC {m['auc']:.4f}  MRR {m['mrr']:.4f}  nDCG@5 {m['ndcg@5']:.4f}  "
        f"nDCG@10 {m['ndcg@10']:.4f}  ({m['impressions']:,} impressions)",
    ]
    if outcome.titles:
        lines.append(f"  enhanced titles from {outcome.titles}")
    if outcome.finetune:
        epochs = outcome.fit.get("epochs", 0)
        resumed = f", resumed after epoch {outcome.resumed_from}" if outcome.resumed_from else ""
        lines.append(f"  fine-tuned {epochs} epoch(s){resumed}; best epoch {outcome.fit.get('best_epoch', 0)}")
        lines += [f"  fine-tuned {role} store: {s['path']}" for role, s in outcome.stores.items()]
    lines.append(f"  written to {outcome.folder}")
    return "\n".join(lines)


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
                   help="extractors whose stores feed the ranker: bert (text), vit (image), blip (multimodal); "
                   "comma-separated or repeated (default: bert). NAME@finetuned reads the store a --finetune run "
                   "exported instead of the frozen one. With --finetune: the extractors to fine-tune")
    p.add_argument("--fusion", choices=FUSIONS, default="text",
                   help="how modalities combine: hadamard/concat/gated (text and image), or a single source text/image/blip")
    p.add_argument("--ranker", choices=RANKERS, default="nrms", help="nrms (attention), lightgbm, or a baseline")
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
    params = validated(RankParams, args, {"category": "no-category", "ner": "no-ner", "surgery": "no-surgery"})
    if params.data is not None and not params.data.is_dir():
        raise PipelineError(f"data folder {params.data} does not exist; pass --data with a MIND folder, or leave it out")
    if params.titles is not None and not params.titles.is_file():
        raise PipelineError(f"titles file {params.titles} does not exist; pass --titles with a news_id<TAB>title file")
    if params.finetune:
        from extractors.checkpoints import ensure_available
        from extractors.registry import parse_spec

        for spec in role_specs(params).values():
            ensure_available(*parse_spec(spec))
    state = build_flow()(params, return_state=True)
    if state.is_failed():
        raise PipelineError(state.message or "ranking failed")
    print(format_outcome(state.result()))
    return 0


if __name__ == "__main__":
    run_cli(main)
