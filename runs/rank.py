"""One ranking run: fit a ranker, score dev (and, when asked, test), write everything.

Two ways to train, the same outputs:
- on stored features (default): NRMS or LightGBM over the HDF5 stores of the `features`
  extractors (frozen, or `NAME@finetuned` for the store a fine-tuned run exported), found or
  extracted through the workspace; baselines read no stores;
- `finetune`: PLM-NR, the NRMS ranker with its extractors trained end to end over the raw
  titles (and cards) (rankers.finetune), with MTRec's tasks when `mtrec`; every epoch is
  checkpointed into `<run>/checkpoints/`, so the same run resumes after a kill; afterwards
  each fine-tuned extractor writes `<storage>/features/<dataset>__<extractor>__finetuned.h5`.
  Hyperparameters: with `tiny` checkpoints the tiny scale (`TINY_FINETUNE_HEAD`, no
  accumulation, the library's tiny encoder rate); with real checkpoints the library's
  published defaults (NRMS+BERT on MIND-small: 3 epochs, head AdamW 1e-4, encoder 2e-5,
  batch 32 x 4 accumulated = 128, K = 4, history 50). Options override either.

With `titles` (GENRE's enhanced titles) the text and BLIP extractors and fine-tuning read the
enhanced catalogue `<dataset>-enhanced-<hash>`; image stores stay the original catalogue's.

Writes into `<storage>/models/<run>/`: the model (safetensors or LightGBM text format),
`metrics.json` (dev metrics of exactly the ranks submitted in prediction_dev.txt),
`scores_dev.npy` (minus those ranks, which the comparison report resamples),
`prediction_dev.txt`, with `score_test` and an unlabeled test split `prediction_test.txt`
(leaderboard format, real impression ids), and `run.json` (parameters, data and store
fingerprints, seeds, versions, timings).
"""

from __future__ import annotations

import dataclasses
import json
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from rankers.registry import ranker_entry
from runs.params import RankParams, role_specs, split_mode
from runs.workspace import Workspace
from storage import atomic
from storage.errors import PipelineError
from storage.paths import safe_name, storage_path, subdir

CHECKPOINTS = "checkpoints"
# Fine-tuning the seeded random tiny models on a tiny or small synthetic world: a small head
# at a head-sized rate without accumulation (the tiny world gives 12 micro-batches an epoch;
# 32 x 4 accumulated would be 3 optimizer steps). The published head (rankers.finetune's
# FineTuneConfig defaults) is for real checkpoints.
TINY_FINETUNE_HEAD = dict(dim=32, heads=4, additive_hidden=32, history=20, lr=3e-3)
TINY_ACCUMULATE = 1


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
    seed: int = 0


def model_kind(params: RankParams) -> str:
    """`nrms`, `lightgbm`, ...; `nrms-finetune`; `mtrec`, `mtrec-no-ner`, ... (run names, reports)."""
    if not params.finetune:
        return params.ranker
    if not params.mtrec:
        return "nrms-finetune"
    return "mtrec" + "".join(f"-no-{part}" for part in ("category", "ner", "surgery") if not getattr(params, part))


def run_name(params: RankParams, dataset: str) -> str:
    """The run's folder under `<storage>/models`: `--run-name`, else derived from the settings."""
    if params.run_name:
        return params.run_name
    feats = "+".join(f.replace(":", "-").replace("/", "_").replace("@", "-") for f in params.features)
    uses_features = ranker_entry(params.ranker).reads_features
    tokens = "__tokens" if params.tokens and params.ranker == "nrms" else ""
    seed = f"__seed{params.seed}" if params.seed else ""
    derived = f"{dataset}__{model_kind(params)}" + (f"__{params.fusion}__{feats}{tokens}" if uses_features else "")
    return safe_name(derived + seed)


def finetune_config(params: RankParams, specs: dict[str, str]):
    """The FineTuneConfig of a `finetune` run: the tiny scale when every checkpoint is
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


def nrms_config(params: RankParams):
    """The NRMSConfig of a frozen NRMS run (every torchrun rank builds the same one)."""
    from rankers.nrms import NRMSConfig

    tuning = {k: v for k, v in (("lr", params.lr), ("dropout", params.dropout)) if v is not None}
    return NRMSConfig(epochs=params.epochs, seed=params.seed, use_tokens=params.tokens, **tuning)


def run_folder(params: RankParams, name: str) -> Path:
    """`<storage>/models/<name>`, created, checked to lie inside the storage root and writable."""
    folder = storage_path("models", name, storage=params.storage, parameter="--run-name", writable=True)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@dataclass(frozen=True)
class Dataset:
    """The data one run reads: its folder, catalogue (enhanced with `titles`) and the original."""

    data: Path
    catalogue: object
    original: object


def dataset(params: RankParams, workspace: Workspace) -> Dataset:
    data = workspace.data_dir(params.data, params.scale, params.world_seed)
    original = workspace.catalogue(data, params.images)
    catalogue = workspace.catalogue(data, params.images, params.titles) if params.titles is not None else original
    return Dataset(data, catalogue, original)


def resolve_stores(params: RankParams, workspace: Workspace, ds: Dataset) -> dict:
    """Role -> StoreRef of every store the run reads (found, or extracted when frozen)."""
    from runs.params import reads_images

    if reads_images(params.stores.values()):
        workspace.covers(ds.original, params.allow_no_images)
    refs = {}
    for role, spec in params.stores.items():
        base, mode = split_mode(spec)
        # Enhanced titles change what BERT and BLIP read; the images stay the dataset's.
        cat = ds.original if role == "image" else ds.catalogue
        refs[role] = workspace.store(base, cat, mode=mode, tokens=params.tokens and params.ranker == "nrms")
    return refs


def _fit_on_stores(params: RankParams, workspace: Workspace, ds: Dataset, train, valid):
    """(ranker, fit report, stores) of a ranker over feature stores (or a baseline)."""
    from rankers.registry import create_ranker

    refs = resolve_stores(params, workspace, ds)
    features = {}
    for role, ref in refs.items():
        cat = ds.original if role == "image" else ds.catalogue
        # Token vectors are read only for an NRMS that attends over them: LightGBM and the
        # pooled news encoder use the stored (pooled) vectors.
        features[role] = workspace.features(ref, cat, tokens=params.ranker == "nrms" and params.tokens)
    from rankers.fusion import COVER, roles_of

    if params.ranker in ("nrms", "lightgbm") and COVER in roles_of(params.fusion):
        features[COVER] = workspace.cover_features(ds.original)
    options: dict = {"seed": params.seed}
    if params.ranker == "nrms":
        options = dict(fusion=params.fusion, device=params.device, progress=params.progress,
                       config=nrms_config(params))
    elif params.ranker == "lightgbm":
        options.update(fusion=params.fusion, **params.lightgbm_options)
        if COVER in features:  # LightGBM takes the flag as a feature, not as a store
            options.update(has_cover=features.pop(COVER).vectors[:, 0] > 0)
        if params.threads is not None:
            options.update(n_jobs=params.threads)
    elif params.ranker == "oracle":
        options.update(click_probs=ds.data / "dev" / "click_probs.txt")
    ranker = create_ranker(params.ranker, **options)
    return ranker, ranker.fit(train, valid, features), {role: ref.record() for role, ref in refs.items()}


def _fit_finetuned(params: RankParams, workspace: Workspace, ds: Dataset, train, valid, folder: Path, storage):
    """(ranker, fit report, stores, config) of PLM-NR (or MTRec) fine-tuned end to end,
    checkpointed into `folder/checkpoints`, with its fine-tuned stores exported."""
    from rankers.finetune import FineTuneRanker
    from storage.features import FeatureStore

    specs = {role: workspace.resolve(spec, ds.original if role == "image" else ds.catalogue)
             for role, spec in role_specs(params.features, params.fusion).items()}
    config = finetune_config(params, specs)
    ranker = FineTuneRanker(ds.catalogue, config, device=params.device, progress=params.progress)
    checkpoints = folder / CHECKPOINTS
    try:
        report = ranker.fit(train, valid, checkpoint_dir=checkpoints)
    except PipelineError as err:
        if str(checkpoints) not in str(err):
            raise
        raise PipelineError(f"{err} (or pass --run-name NAME to train these settings in a run folder of their own)") from None
    stores = {}
    for role, path in ranker.export_features(subdir("features", storage)).items():
        with FeatureStore.open(path) as store:
            tuned = store.meta.preprocess.get("finetune") or {}
        stores[role] = {"path": str(path), "extractor": config.specs[role], "mode": "finetuned",
                        "weights_sha256": tuned.get("weights_sha256")}
    return ranker, report, stores, config


def run_rank(params: RankParams, workspace: Workspace | None = None) -> RankOutcome:
    """Load (through the workspace), fit, evaluate, write."""
    workspace = workspace or Workspace(params.storage)
    ds = dataset(params, workspace)
    started = time.perf_counter()
    train, valid = workspace.train_valid(ds.data, ds.catalogue)
    dev = workspace.impressions(ds.data, "dev", ds.catalogue)
    name = run_name(params, ds.catalogue.name)
    folder = run_folder(params, name)
    record: dict = {}
    if params.finetune:
        ranker, report, stores, config = _fit_finetuned(params, workspace, ds, train, valid, folder, params.storage)
        record["finetune"] = {"config": config.to_dict(), "checkpoints": str(folder / CHECKPOINTS),
                              "resumed_from_epoch": ranker.resumed_from}
    else:
        ranker, report, stores = _fit_on_stores(params, workspace, ds, train, valid)
    test = None
    if params.score_test and params.ranker != "oracle" and (ds.data / "test" / "behaviors.tsv").is_file():
        test = workspace.impressions(ds.data, "test", ds.catalogue)
    outcome = write_run(params, ds, name, folder, ranker, report, stores, (train, valid, dev, test), started, record)
    if params.finetune:
        outcome.resumed_from = ranker.resumed_from
        outcome.mtrec = config.mtrec.to_dict() if config.mtrec else None
    return outcome


def write_run(params: RankParams, ds: Dataset, name: str, folder: Path, ranker, report, stores: dict,
              splits: tuple, started: float, extra: dict | None = None) -> RankOutcome:
    """Score dev (and test when given) with a fitted ranker and write the model, predictions,
    metrics and run.json into `folder`: what every ranking run writes, however it was trained."""
    from rankers.metrics import evaluate, ranks_from_scores
    from storage.features import package_versions
    from storage.submission import write_prediction

    train, valid, dev, test = splits
    catalogue = ds.catalogue
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
    if test is not None:
        test_scores = ranker.score(test)
        write_prediction(folder / "prediction_test.txt", test.impression_ids, test.cand_offsets,
                         ranks_from_scores(test.cand_offsets, test_scores))
        files.append(str(folder / "prediction_test.txt"))
    atomic.save_npy(folder / "scores_dev.npy", dev_scores)  # minus the submitted ranks, for the report
    atomic.write_json(folder / "metrics.json", dev_metrics, sort_keys=False)
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
    atomic.write_json(folder / "run.json", record, sort_keys=False, default=str)
    files += [str(folder / "metrics.json"), str(folder / "run.json")]
    return RankOutcome(name, params.ranker, params.fusion, params.features, str(folder), dev_metrics, fit, files,
                       finetune=params.finetune, titles=str(catalogue.titles_file) if catalogue.titles_file else None,
                       stores=stores, seed=params.seed)


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
