"""End-to-end PLM-NR: the NRMS ranker with trainable extractors, and MTRec's auxiliary tasks.

The news encoder runs a pre-trained model over the raw news (BERT over the title; with a
fusion of two roles also ViT over the IM-MIND card), then the NRMS token news encoder of
rankers.nrms (self-attention and additive attention over the model's last hidden states),
the fusion (e.g. Hadamard), the NRMS user encoder and the dot product, as in PLM-NR.
Training is the (1 + K)-way softmax of rankers.train; with `mtrec` set, MTRec's category and
NER heads (rankers.mtrec) add their losses, combined by gradient surgery (rankers.surgery).

Cost, the part that decides whether fine-tuning is affordable:
- titles are tokenised once up front; covers are decoded and resized once (uint8, in
  memory when they fit `image_cache_gb`, else decoded per batch);
- a batch encodes each DISTINCT news of its histories and candidates once and indexes the
  vectors back (`batch_tensors` of rankers.train over a `RawNewsBank`); `naive=True` encodes
  every slot separately (same loss and gradients; for tests and benchmarks);
- each batch is padded only to its longest title (dynamic padding);
- on CUDA: bf16 autocast and the fused AdamW; gradient accumulation, freezing the lowest N
  layers and gradient checkpointing are options;
- evaluation encodes each news once, then each user once (score_impressions of rankers.train).
A checkpoint is written after every epoch (rankers.checkpoint); `fit(checkpoint_dir=...)`
resumes a killed run from the last one. `export_features` writes the fine-tuned extractor's
vectors into an HDF5 store of mode `finetuned`, which LightGBM and the report read like a
frozen store.
Under `torchrun` (an initialised process group of N > 1 ranks, rankers.distributed) every
rank calls `fit` alike and it trains data-parallel: every rank builds the same epoch plan and
takes its share of each micro-batch; the losses are weighted so that their sum over ranks is
the one-process loss of the whole micro-batch (the auxiliary ones too: each distinct news is
counted once, by the lowest rank that encodes it), and before each optimizer step the
gradients are summed over ranks, each task's apart before the surgery combines them. So a
step is the one-process step; with dropout 0 the N-process model equals the one-process
model up to float summation order (tests/test_finetune_ddp.py). Rank 0 validates and
broadcasts the metrics and writes the checkpoints (the others wait for each); every rank
resumes from the same checkpoint. `save` and `export_features` write on rank 0 only.
Letters: N catalogue news, U distinct news of a batch, B impressions, H history, C candidates,
L tokens, P patches, D extractor width, d model width.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from rankers import checkpoint as ckpt
from rankers import distributed
from rankers.base import FitReport, check_fields
from rankers.data import Impressions, NewsFeatures
from rankers.early_stopping import EarlyStopping
from rankers.fusion import roles_of
from rankers.metrics import evaluate
from rankers.mtrec import IGNORE, MTRecConfig, tag_titles
from rankers.nrms import NRMSConfig
from rankers.plmnr import FineTuneNRMS, RawNewsBank, enable_gradient_checkpointing, freeze_lowest, token_statistics
from rankers.surgery import combine
from rankers.train import (
    GPU_PATHS, Batch, Samples, autocast, batch_tensors, build_samples, isolated_rng, resolve_device, score_impressions,
    scorable, train_loss,
)
from storage.catalogue import Catalogue
from storage import atomic
from storage.errors import PipelineError

FORMAT = "mmnews-finetune-v1"
MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TOKENIZER_DIR = "tokenizer"
SUPPORTED_ROLES = ("text", "image")
TINY_ENCODER_LR = 1e-3  # a seeded random tiny model learns from scratch: a head-sized rate
PRETRAINED_ENCODER_LR = 2e-5  # usual BERT fine-tuning rates are 1e-5 to 5e-5


@dataclass(frozen=True)
class FineTuneConfig:
    """What is trained and how. `ranker` holds the NRMS head's and the run's settings (width,
    heads, dropout, history, K, head learning rate, batch size, epochs, patience, seed).

    Defaults follow NRMS+BERT on MIND-small (3 epochs, AdamW at 1e-4 for the ranker, an
    effective batch of 128 = 32 x 4 accumulated, K = 4, history 50, titles up to 32 tokens) with
    the encoder at its own, smaller rate. `train_encoder=False` keeps the extractors frozen
    (the frozen counterpart of the same model)."""

    fusion: str = "text"  # text | hadamard | concat | gated | image
    text: str = "bert:tiny"  # extractor spec of the text role
    image: str = "vit:tiny"  # extractor spec of the image role
    max_length: int = 32  # title tokens
    train_encoder: bool = True
    encoder_lr: float | None = None  # None: TINY_ENCODER_LR for `tiny` checkpoints, else PRETRAINED_ENCODER_LR
    freeze_layers: int = 0  # the embeddings and the lowest N transformer layers get no updates
    gradient_checkpointing: bool = False
    accumulate: int = 4  # micro-batches (of ranker.batch_size samples) per optimizer step
    warmup_steps: int = 0  # linear warm-up of every learning rate over this many optimizer steps
    max_grad_norm: float | None = 1.0
    # Standardize the head's input with the initial encoder's token statistics (rankers.nrms).
    # None: only when frozen; a training encoder outgrows them (tiny world: worse with them).
    standardize: bool | None = None
    naive: bool = False  # encode every history/candidate slot separately (tests, benchmarks)
    image_cache_gb: float = 16.0  # decoded covers (uint8) kept in memory up to this size
    mtrec: MTRecConfig | None = None  # MTRec's auxiliary tasks on the text encoder
    ranker: NRMSConfig = NRMSConfig(lr=1e-4, batch_size=32, epochs=3, patience=1)

    def __post_init__(self) -> None:
        roles = roles_of(self.fusion)
        checks = {
            "fusion": all(r in SUPPORTED_ROLES for r in roles),
            "max_length": 4 <= self.max_length <= 512,
            "encoder_lr": self.encoder_lr is None or 0 < self.encoder_lr <= 1,
            "freeze_layers": self.freeze_layers >= 0,
            "accumulate": self.accumulate >= 1,
            "warmup_steps": self.warmup_steps >= 0,
            "max_grad_norm": self.max_grad_norm is None or self.max_grad_norm > 0,
            "image_cache_gb": self.image_cache_gb >= 0,
            "mtrec": self.mtrec is None or "text" in roles,
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise ValueError(
                f"invalid FineTuneConfig {', '.join(f'{k}={getattr(self, k)!r}' for k in bad)} (fusions over "
                f"{'/'.join(SUPPORTED_ROLES)} only; MTRec needs the text role; counts >= 0, accumulate >= 1)")

    @property
    def roles(self) -> tuple[str, ...]:
        return roles_of(self.fusion)

    @property
    def specs(self) -> dict[str, str]:
        return {r: self.text if r == "text" else self.image for r in self.roles}

    def encoder_lr_for(self, role: str) -> float:
        if self.encoder_lr is not None:
            return self.encoder_lr
        tiny = self.specs[role].partition(":")[2] in ("", "tiny")
        return TINY_ENCODER_LR if tiny else PRETRAINED_ENCODER_LR

    def to_dict(self) -> dict:
        out = asdict(self)
        out["ranker"] = self.ranker.to_dict()
        out["mtrec"] = self.mtrec.to_dict() if self.mtrec else None
        return out

    @classmethod
    def from_dict(cls, values: dict) -> FineTuneConfig:
        check_fields(cls, values)
        values = dict(values)
        if "ranker" in values:
            values["ranker"] = NRMSConfig.from_dict(values["ranker"])
        if values.get("mtrec") is not None:
            values["mtrec"] = MTRecConfig(**values["mtrec"])
        return cls(**values)


# ---------------------------------------------------------------------------------------
# The ranker


@dataclass
class _Progress:
    """What a checkpoint records of the run besides early stopping (rankers.early_stopping)."""

    epoch: int = 0
    step: int = 0
    train_seconds: float = 0.0
    history: list = field(default_factory=list)
    valid_metrics: dict = field(default_factory=dict)

    @classmethod
    def from_meta(cls, meta: dict, patience: int, best_state: dict | None) -> tuple[_Progress, EarlyStopping]:
        """The progress and early stopping a checkpoint's metadata holds."""
        progress = dict(meta["progress"])
        stopping = meta.get("stopping")
        if stopping is None:  # written before rankers.early_stopping: the counters sat in the progress
            stopping = {"best": progress.pop("best_auc"), "best_epoch": progress.pop("best_epoch"),
                        "stale": progress.pop("stale"), "stopped": progress.pop("stopped")}
        return cls(**progress), EarlyStopping.from_progress(patience, stopping, best_state)


class FineTuneRanker:
    """PLM-NR with trainable extractors, keeping the Ranker contract of rankers.base.

    `FineTuneRanker(catalogue, config, device)`; `fit(train, valid)` (stored features are
    not used: the model reads the catalogue's titles and cards); `score(impressions)`;
    `save(folder)`; `FineTuneRanker.load(folder, catalogue)`; `export_features(dir)`.

    Under torchrun every rank calls `fit` (with the same arguments; `after_epoch` runs on
    every rank, once rank 0's checkpoint of the epoch is written). `score` works on any rank
    (all hold the fitted model) and makes no collective call; `save` and `export_features`
    write on rank 0 only and return the same paths everywhere, so they may be called on rank
    0 alone or on every rank (then `distributed.barrier()` before another rank reads them)."""

    def __init__(self, catalogue: Catalogue, config: FineTuneConfig | None = None, device: str = "auto",
                 progress: bool = True, image_workers: int = 0):
        self.catalogue = catalogue
        self.config = config or FineTuneConfig()
        self.fusion = self.config.fusion
        self.roles = self.config.roles
        self.device = resolve_device(device)
        self.progress = progress
        self.image_workers = image_workers
        self.name = f"nrms-finetune-{self.fusion}"
        self.categories = sorted({str(c) for c in catalogue.category})
        self.model: FineTuneNRMS | None = None
        self.bank: RawNewsBank | None = None
        self.resumed_from = 0  # the epoch of the checkpoint the last fit resumed from (0: none)
        self._aux_targets: tuple[torch.Tensor, torch.Tensor] | None = None

    # -- building -----------------------------------------------------------------------
    def _build(self, workdir: Path | None) -> None:
        """Extractors (seeded), the model, the raw-news bank and the auxiliary targets."""
        from extractors.registry import create

        cfg = self.config
        titles = [str(t) for t in self.catalogue.title]
        extractors = {}
        for role, spec in cfg.specs.items():
            seed = cfg.ranker.seed
            if role == "text":
                ext = create(spec, titles=titles, workdir=workdir, max_length=cfg.max_length, seed=seed)
            else:
                ext = create(spec, seed=seed)
            ext.set_trainable(cfg.train_encoder)
            if cfg.train_encoder:
                freeze_lowest(ext, cfg.freeze_layers)
                if cfg.gradient_checkpointing:
                    enable_gradient_checkpointing(ext)
            extractors[role] = ext
        torch.manual_seed(cfg.ranker.seed)
        self.model = FineTuneNRMS(cfg.ranker, cfg.fusion, extractors, cfg.mtrec, len(self.categories)).to(self.device)
        self.bank = RawNewsBank(self.catalogue, extractors, self.device, cfg.image_cache_gb, self.image_workers)
        if self.model.aux is not None:
            index = {c: i for i, c in enumerate(self.categories)}
            category = torch.tensor([index[str(c)] for c in self.catalogue.category], dtype=torch.long)
            tags = torch.full((len(self.catalogue), cfg.max_length), IGNORE, dtype=torch.long)
            if cfg.mtrec.ner:
                text = extractors["text"]
                tagged = tag_titles(text.tokenizer, text.prepare_titles(titles), [str(e) for e in self.catalogue.title_entities],
                                    text.config.max_length)
                tags[:, : tagged.shape[1]] = torch.from_numpy(tagged)
            self._aux_targets = (category, tags)

    def _optimizer(self) -> torch.optim.Optimizer:
        cfg, model = self.config, self.model
        groups = []
        for role, ext in model.extractors.items():
            params = [p for p in ext.parameters() if p.requires_grad]
            if params:
                groups.append({"params": params, "lr": cfg.encoder_lr_for(role), "name": f"encoder.{role}"})
        encoder = {id(p) for e in model.extractors.values() for p in e.parameters()}
        rest = [p for p in model.parameters() if p.requires_grad and id(p) not in encoder]
        groups.append({"params": rest, "lr": cfg.ranker.lr, "name": "head"})
        for g in groups:
            g["base_lr"] = g["lr"]
        fused = {"fused": True} if self.device.type == "cuda" else {}
        if fused:
            GPU_PATHS["fused AdamW (fine-tuning)"] += 1
        return torch.optim.AdamW(groups, lr=cfg.ranker.lr, weight_decay=cfg.ranker.weight_decay, **fused)

    def _identity(self, train: Impressions) -> dict:
        """What a checkpoint must match to be resumed by this run: everything but the number
        of epochs, so a finished run can also be extended."""
        digest = hashlib.sha256()
        for arr in (train.impression_ids, train.hist_items, train.cand_items, train.labels):
            digest.update(np.ascontiguousarray(arr).tobytes())
        config = self.config.to_dict()
        config["ranker"].pop("epochs")
        identity = {"format": FORMAT, "config": config, "catalogue": self.catalogue.fingerprint(),
                    "train": digest.hexdigest()}
        return json.loads(json.dumps(identity))  # as a checkpoint reads it back (tuples become lists)

    # -- training -----------------------------------------------------------------------
    def fit(self, train: Impressions, valid: Impressions, features: dict[str, NewsFeatures] | None = None, *,
            checkpoint_dir: str | Path | None = None,
            after_epoch: Callable[[int, FitReport], None] | None = None) -> FitReport:
        """Train on `train`, choose the epoch on `valid`. Stored `features` are ignored (the
        extractors read raw news). With `checkpoint_dir`, every epoch is checkpointed there
        and a run over the same settings and data resumes from the last checkpoint.
        `after_epoch(epoch, report)` runs after each epoch's checkpoint.
        Under torchrun every rank calls `fit` with the same splits, config and checkpoint
        folder (checked: a difference raises on every rank instead of hanging); rank 0 alone
        validates and writes the checkpoints, and every rank ends with the chosen weights."""
        # Seeds and draws (weights, dropout, a checkpoint's random state) stay inside: the
        # caller's torch random state is the same after fit.
        with isolated_rng(self.device):
            return self._fit(train, valid, checkpoint_dir, after_epoch)

    def _fit(self, train: Impressions, valid: Impressions, checkpoint_dir: str | Path | None,
             after_epoch: Callable[[int, FitReport], None] | None) -> FitReport:
        cfg, rc = self.config, self.config.ranker
        if not train.labeled:
            raise PipelineError(f"split {train.name!r} is unlabeled; a ranker trains on labeled impressions")
        for split in (train, valid):
            if len(split.cand_items) and int(max(split.cand_items.max(), split.hist_items.max(initial=0))) >= len(self.catalogue):
                raise PipelineError(f"split {split.name!r} refers to news rows beyond the {len(self.catalogue)} of "
                                    f"catalogue {self.catalogue.name!r}; load it with the same catalogue")
        started = time.perf_counter()
        self._train_impressions = len(train)
        checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        ctx = distributed.current()
        with distributed.main_first():  # bert:tiny learns its tokenizer into checkpoint_dir once; others read it
            self._build(checkpoint_dir)
        model, bank = self.model, self.bank
        train_rows = np.concatenate([train.hist_items, train.cand_items])
        standardize = cfg.standardize if cfg.standardize is not None else not cfg.train_encoder
        if standardize:
            for role, (mean, std) in token_statistics(model, bank, train_rows, seed=rc.seed).items():
                model.head.news[role].norm.set_statistics(mean.to(self.device), std.to(self.device))
        opt = self._optimizer()
        state, stopper = _Progress(), EarlyStopping(rc.patience)
        identity = self._identity(train)
        if ctx.enabled:  # ranks that differ in any of these would wait for each other in different calls
            setup = (json.dumps(identity, sort_keys=True), rc.epochs, checkpoint_dir is not None)
            distributed.check_same(distributed.digest(*setup, valid.impression_ids, valid.labels),
                                   "the fine-tuning setup")
            distributed.broadcast_module(model)  # rank 0's weights, whatever a pre-trained load left unseeded
        self.resumed_from = 0
        found = None
        if checkpoint_dir is not None:  # rank 0 clears torn checkpoints; every rank reads the same one
            found = distributed.broadcast_object(ckpt.latest(checkpoint_dir) if ctx.is_main else None)
        if found is not None:
            state, stopper = self._resume(ckpt.read(found, self.device), identity, opt)
        history, mask = train.histories(rc.history)  # (M, H)
        report = FitReport()
        for epoch in range(state.epoch + 1, rc.epochs + 1):
            if stopper.stopped:
                break
            row = self._train_epoch(epoch, train, history, mask, opt, state)
            if scorable(valid):
                metrics = None
                if ctx.is_main:
                    metrics = evaluate(valid.cand_offsets, valid.labels, score_impressions(model, bank, valid))
                metrics = distributed.broadcast_object(metrics)  # every rank chooses and stops alike
                row.update({f"valid_{k}": v for k, v in metrics.items()})
                auc = float(metrics["auc"])
            else:
                metrics, auc = {}, None  # nothing to validate on: keep the last epoch
            state.history.append(row)
            state.epoch = epoch
            if stopper.update(epoch, auc, model):
                state.valid_metrics = {k: float(v) for k, v in metrics.items()}
            self._fill(report, state, stopper, started)
            if checkpoint_dir is not None:
                if ctx.is_main:
                    meta = {"run": identity, "progress": asdict(state), "stopping": stopper.progress()}
                    best = None if stopper.best_epoch == epoch else stopper.best_state
                    ckpt.write(checkpoint_dir, epoch, meta, model.state_dict(), opt.state_dict(),
                               ckpt.rng_state(self.device), best)
                distributed.barrier()  # no rank goes on before the checkpoint it would resume from exists
            if after_epoch is not None:
                after_epoch(epoch, report)
        stopper.restore(model)
        model.eval()
        return self._fill(report, state, stopper, started)

    def _train_epoch(self, epoch: int, train: Impressions, history: np.ndarray, mask: np.ndarray,
                     opt: torch.optim.Optimizer, state: _Progress) -> dict:
        """One pass over this epoch's samples; returns its history row (losses, surgery, time)."""
        from tqdm.auto import tqdm

        cfg, rc, model, bank = self.config, self.config.ranker, self.model, self.bank
        ctx = distributed.current()
        rng = np.random.default_rng([rc.seed, epoch])
        samples = build_samples(train, rc.negatives, rng)
        order = rng.permutation(len(samples.impression))
        shares = None
        if ctx.enabled:
            shares = _Shares(samples, history, mask, ctx, cfg.naive, self._aux_tokens())
            # Dropout masks per rank and epoch: a resumed run draws what an uninterrupted one would.
            torch.manual_seed(distributed.rank_seed(rc.seed, ctx.rank, epoch))
        model.train()
        t0 = time.perf_counter()
        starts = list(range(0, len(order), rc.batch_size))
        sums: dict[str, torch.Tensor] = {}  # loss sums stay on the device: no host sync per step
        surgery: Counter = Counter()
        bar = tqdm(total=len(starts), desc=f"{self.name} epoch {epoch}", unit="batch",
                   disable=not self.progress or not ctx.is_main, dynamic_ncols=True, leave=False)
        for g in range(0, len(starts), cfg.accumulate):
            group = starts[g:g + cfg.accumulate]
            acc = _Accumulator(self._shared_params())
            for s in group:
                idx = order[s:s + rc.batch_size]
                if shares is None:
                    imp = samples.impression[idx]
                    batch = batch_tensors(bank, history[imp], mask[imp], samples.candidates[idx], dedup=not cfg.naive)
                    losses = self._losses(batch)
                else:
                    batch, share = shares.of(idx, bank)
                    losses = self._losses(batch, share)
                acc.backward(losses, 1.0 / len(group), cfg.mtrec)
                for k, v in losses.items():
                    sums[k] = sums[k] + v.detach() if k in sums else v.detach()
                bar.update(1)
            if ctx.enabled:
                acc.all_reduce([p for g in opt.param_groups for p in g["params"]])
            step = acc.finish()
            if step is not None:
                surgery.update(steps=1, projected=int(step.projected), cosine=step.cosine)
            self._step(opt, state.step)
            state.step += 1
        bar.close()
        if ctx.enabled and sums:  # each rank's sums hold its weighted shares of every micro-batch's losses
            keys = sorted(sums)
            sums = dict(zip(keys, distributed.all_reduce_sum(torch.stack([sums[k] for k in keys]))))
        seconds = time.perf_counter() - t0
        state.train_seconds += seconds
        n = max(len(starts), 1)
        row = {"epoch": epoch, "loss": float(sums["main"]) / n, "samples": len(order), "train_seconds": seconds,
               "optimizer_steps": state.step}
        row.update({f"loss_{k}": float(v) / n for k, v in sums.items() if k != "main"})
        if surgery["steps"]:
            row["surgery_projected"] = surgery["projected"] / surgery["steps"]
            row["surgery_cosine"] = surgery["cosine"] / surgery["steps"]
        if not np.isfinite(row["loss"]):
            lrs = ", ".join(f"{g['name']} {g['base_lr']:g}" for g in opt.param_groups)
            raise PipelineError(f"{self.name}: training diverged in epoch {epoch} (mean loss {row['loss']}); "
                                f"lower the learning rates (now {lrs})")
        return row

    def _fill(self, report: FitReport, state: _Progress, stopper: EarlyStopping, started: float) -> FitReport:
        report.epochs, report.best_epoch = state.epoch, stopper.best_epoch
        report.valid_metrics = dict(state.valid_metrics)
        report.history = list(state.history)
        report.seconds = time.perf_counter() - started
        trained = self._train_impressions * len(state.history)
        report.train_impressions_per_s = trained / state.train_seconds if state.train_seconds else 0.0
        return report

    def _resume(self, found: ckpt.Checkpoint, identity: dict,
                opt: torch.optim.Optimizer) -> tuple[_Progress, EarlyStopping]:
        if found.meta.get("run") != identity:
            theirs, ours = found.meta.get("run", {}), identity
            diff = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
            raise PipelineError(f"{found.path} is a checkpoint of another run (differs in {', '.join(diff)}); "
                                "use another checkpoint folder, or delete this one to start over")
        self.model.load_state_dict(found.model)
        opt.load_state_dict(found.optimizer)
        ckpt.set_rng_state(found.rng)
        best = found.best if found.best is not None else found.model
        state, stopper = _Progress.from_meta(found.meta, self.config.ranker.patience,
                                             {k: v.to(self.device) for k, v in best.items()})
        self.resumed_from = state.epoch
        return state, stopper

    def _shared_params(self) -> list[nn.Parameter]:
        """The parameters MTRec's tasks share: the text encoder's trainable ones."""
        if self.model.aux is None or not self.config.mtrec.surgery:
            return []
        return [p for p in self.model.extractors["text"].parameters() if p.requires_grad]

    def _losses(self, batch: Batch, share: _Share | None = None) -> dict[str, torch.Tensor]:
        """The batch's losses; with a data-parallel `share`, this rank's weighted parts of them."""
        model = self.model
        with autocast(self.device):
            if model.aux is None:
                losses = {"main": train_loss(model(batch.inputs, batch.history, batch.history_mask, batch.candidates))}
            else:
                scores, text = model(batch.inputs, batch.history, batch.history_mask, batch.candidates,
                                     return_text=True)
                category, tags = (t[batch.inputs.rows] for t in self._aux_targets)
                if share is not None:
                    category, tags = share.owned_targets(category, tags)
                losses = {"main": train_loss(scores),
                          **model.aux.losses(text, category.to(self.device), tags.to(self.device))}
        return losses if share is None else share.weigh(losses)

    def _aux_tokens(self) -> np.ndarray | None:
        """(N,) the NER-scored tokens of every catalogue news; None without auxiliary tasks."""
        if self._aux_targets is None:
            return None
        return (self._aux_targets[1] != IGNORE).sum(1).numpy()

    def _step(self, opt: torch.optim.Optimizer, step: int) -> None:
        cfg = self.config
        warm = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * warm
        if cfg.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], cfg.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)

    # -- scoring ------------------------------------------------------------------------
    def score(self, impressions: Impressions) -> np.ndarray:
        """Higher is better: (T,) float64 aligned with `impressions.cand_items`."""
        if self.model is None or self.bank is None:
            raise PipelineError("the ranker has no model: fit it, or load it with its catalogue")
        if len(impressions.cand_items) and int(impressions.cand_items.max()) >= self.bank.n:
            raise PipelineError(f"split {impressions.name!r} refers to news rows beyond the {self.bank.n} of the "
                                "catalogue; load the ranker with the catalogue the split was read with")
        return score_impressions(self.model, self.bank, impressions)

    # -- persistence --------------------------------------------------------------------
    def save(self, folder: Path) -> list[Path]:
        from safetensors.torch import save_file

        if self.model is None:
            raise PipelineError("nothing to save: the ranker is not fitted")
        folder = Path(folder)
        files = [folder / MODEL_FILE, folder / CONFIG_FILE] + ([folder / TOKENIZER_DIR] if "text" in self.roles else [])
        if not distributed.is_main():  # data-parallel: rank 0 writes; every rank may call this
            return files
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in self.model.state_dict().items()}
        with atomic.atomic_path(folder / MODEL_FILE) as tmp:
            save_file(state, str(tmp), metadata={"format": FORMAT})
        if "text" in self.model.extractors:
            self.model.extractors["text"].tokenizer.save_pretrained(str(folder / TOKENIZER_DIR))
        meta = {"format": FORMAT, "ranker": "nrms-finetune", "fusion": self.fusion, "config": self.config.to_dict(),
                "categories": self.categories, "catalogue": self.catalogue.fingerprint()}
        atomic.write_json(folder / CONFIG_FILE, meta)
        return files

    @classmethod
    def load(cls, folder: Path, catalogue: Catalogue, device: str = "auto", progress: bool = True) -> FineTuneRanker:
        """A saved ranker over `catalogue` (the news it scores; its tokenizer is the saved one)."""
        from safetensors.torch import load_file

        folder = Path(folder)
        path = folder / CONFIG_FILE
        if not path.is_file() or not (folder / MODEL_FILE).is_file():
            raise PipelineError(f"{folder} holds no saved fine-tuned ranker ({CONFIG_FILE} and {MODEL_FILE} expected)")
        meta = json.loads(path.read_text())
        if meta.get("format") != FORMAT:
            raise PipelineError(f"{path}: format {meta.get('format')!r}, expected {FORMAT!r}")
        ranker = cls(catalogue, FineTuneConfig.from_dict(meta["config"]), device=device, progress=progress)
        ranker.categories = list(meta["categories"])
        with isolated_rng(ranker.device):  # the weights it draws are overwritten below
            ranker._build(folder)
        ranker.model.load_state_dict(load_file(str(folder / MODEL_FILE), device=str(ranker.device)))
        ranker.model.eval()
        return ranker

    # -- fine-tuned features ------------------------------------------------------------
    def export_features(self, features_dir: str | Path, *, roles: tuple[str, ...] | None = None,
                        tokens: bool = True, dtype: str = "float16", batch_size: int = 64,
                        name: str | None = None) -> dict[str, Path]:
        """Write each fine-tuned extractor's vectors (pooled, and token vectors with their
        mask) for every catalogue news into `<features_dir>/<dataset>__<name>__finetuned.h5`
        (`name` defaults to the extractor's `bert-tiny`-style slug). The store's preprocess
        attributes carry the extractor's config plus a `finetune` record (the weights' sha256,
        the fusion, the training config), so a store from other weights is rewritten and an
        identical one reused."""
        from extractors.run import spec_slug, store_meta
        from storage.features import FeatureStore, FeatureWriter, store_path

        if self.model is None:
            raise PipelineError("nothing to export: the ranker is not fitted")
        out = {}
        for role in roles or self.roles:
            ext = self.model.extractors[role]
            if not distributed.is_main():  # data-parallel: rank 0 writes; every rank may call this
                out[role] = store_path(features_dir, self.catalogue.name, name or spec_slug(ext), "finetuned")
                continue
            base = store_meta(ext, self.catalogue, tokens, dtype, mode="finetuned")
            record = {"weights_sha256": _weights_digest(ext), "fusion": self.fusion, "config": self.config.to_dict()}
            meta = dataclasses.replace(base, preprocess={**base.preprocess, "finetune": record})
            path = store_path(features_dir, self.catalogue.name, name or spec_slug(ext), "finetuned")
            Path(features_dir).mkdir(parents=True, exist_ok=True)
            if path.exists():
                try:
                    with FeatureStore.open(path) as store:
                        if not store.meta.differences(meta) and np.array_equal(store.ids, self.catalogue.ids):
                            out[role] = path
                            continue
                except PipelineError:
                    pass
            writer = FeatureWriter(path, meta, self.catalogue.ids, restart=True)
            try:
                self._write_role(writer, role, meta.token_len, batch_size)
                out[role] = writer.finalize()
            finally:
                writer.close()
        return out

    @torch.no_grad()
    def _write_role(self, writer, role: str, token_len: int | None, batch_size: int) -> None:
        """Every catalogue news through the fine-tuned extractor, in row order, into `writer`."""
        model, bank = self.model, self.bank
        model.eval()
        for start in range(0, bank.n, batch_size):
            rows = torch.arange(start, min(start + batch_size, bank.n))
            with autocast(self.device):
                enc = model.encode_role(role, bank.gather(rows, (role,)))
            vectors = enc.vectors.float().cpu().numpy()  # (B, D)
            present = np.ones(len(rows), bool) if role == "text" else bank.present[rows.numpy()]
            tok = msk = None
            if token_len is not None:
                t = enc.tokens.float().cpu().numpy()[:, :token_len]  # (B, l, D)
                tok = np.zeros((len(rows), token_len, t.shape[2]), np.float32)  # (B, L, D)
                msk = np.zeros((len(rows), token_len), bool)
                tok[:, : t.shape[1]] = t
                msk[:, : t.shape[1]] = enc.mask[:, :token_len].cpu().numpy()
            writer.write(vectors, present, tokens=tok, mask=msk)


def _weights_digest(module: nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


class _Accumulator:
    """Backward passes of the micro-batches of one optimizer step.

    Without surgery the losses are summed (L = L_main + L_category + L_NER) and every
    gradient accumulates in place. With surgery the shared parameters' gradients of the
    main and the auxiliary losses are kept apart over the micro-batches and combined by
    rankers.surgery once per step, on the whole step's gradients."""

    def __init__(self, shared: list[nn.Parameter]):
        self.shared = shared
        self.main: list[torch.Tensor | None] = [None] * len(shared)
        self.aux: list[torch.Tensor | None] = [None] * len(shared)
        self.weight = 0.0
        self.used = False

    @staticmethod
    def _take(params: list[nn.Parameter], into: list[torch.Tensor | None]) -> None:
        for i, p in enumerate(params):
            if p.grad is not None:
                into[i] = p.grad if into[i] is None else into[i] + p.grad
                p.grad = None

    def backward(self, losses: dict[str, torch.Tensor], scale: float, mtrec: MTRecConfig | None) -> None:
        aux = [v for k, v in losses.items() if k != "main"]
        if not self.shared or not aux:
            (sum(losses.values()) * scale).backward()
            return
        self.used, self.weight = True, mtrec.weight
        (losses["main"] * scale).backward(retain_graph=True)
        self._take(self.shared, self.main)
        (sum(aux) * scale).backward()
        self._take(self.shared, self.aux)

    def finish(self):
        """Write the combined gradients into the shared parameters; the surgery step or None."""
        if not self.used:
            return None
        grads, step = combine(self.main, self.aux, self.weight)
        for p, g in zip(self.shared, grads):
            p.grad = g
        return step

    def all_reduce(self, params: list[nn.Parameter]) -> None:
        """Data-parallel: sum this step's gradients over ranks before `finish`, the shared
        parameters' per-task gradients apart, so the surgery sees the whole batch's task
        gradients as one process does (the projection is not linear: projecting per rank
        and summing would differ)."""
        n = len(self.shared)
        grads = distributed.all_reduce_sum_list([*self.main, *self.aux, *(p.grad for p in params)],
                                                [*self.shared, *self.shared, *params])
        self.main, self.aux = grads[:n], grads[n:2 * n]
        for p, g in zip(params, grads[2 * n:]):
            p.grad = g


@dataclass(frozen=True)
class _Share:
    """A rank's weights for its part of one micro-batch, chosen so that the weighted losses of
    all ranks sum to the one-process losses of the whole micro-batch.

    The main loss is a mean over samples: weight len(part) / len(batch). The auxiliary losses
    are means over the batch's news (category) and over their scored tokens (NER): each news
    is owned by one rank (the lowest that encodes it; every slot in naive mode), its targets
    are ignored elsewhere, and each rank's mean over its owned news is weighted by its
    fraction of the batch's news (tokens)."""

    main: float
    owned: np.ndarray | None = None  # (U,) bool over the rank's batch news; None without auxiliary tasks
    category: float = 0.0
    ner: float = 0.0

    def owned_targets(self, category: torch.Tensor, tags: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Category ids (U,) and tags (U, L) with the news this rank does not own ignored."""
        if not self.owned.any():  # weight 0: a finite loss that adds nothing (a mean over nothing is NaN)
            return category, tags
        keep = torch.from_numpy(self.owned)
        ignored = torch.tensor(IGNORE, dtype=category.dtype)
        return torch.where(keep, category, ignored), torch.where(keep[:, None], tags, ignored)

    def weigh(self, losses: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        weights = {"main": self.main, "category": self.category, "ner": self.ner}
        return {k: v * weights[k] for k, v in losses.items()}


class _Shares:
    """Every rank's part of the epoch's micro-batches (rankers.distributed.micro_batch) and
    the weights of its losses (`_Share`). Every rank computes all parts from the same plan,
    which tells it which news of its batch lower ranks already encode."""

    def __init__(self, samples: Samples, history: np.ndarray, mask: np.ndarray, ctx: distributed.Context, naive: bool,
                 tokens: np.ndarray | None):
        self.samples, self.history, self.mask, self.ctx = samples, history, mask, ctx
        self.naive, self.tokens = naive, tokens

    def _news(self, rows: np.ndarray, width: int) -> np.ndarray:
        """The news rows that batch_tensors encodes for these samples (every slot when naive)."""
        imp = self.samples.impression[rows]
        slots = np.concatenate([self.history[imp, :width].ravel(), self.samples.candidates[rows].ravel()])
        return slots if self.naive else np.unique(slots)

    def of(self, idx: np.ndarray, bank: RawNewsBank) -> tuple[Batch, _Share]:
        """This rank's batch of the micro-batch `idx` (sample indices) and its weights."""
        ctx, imp = self.ctx, self.samples.impression
        # The whole micro-batch's history width, so that the parts' slots are exactly its slots
        # (the padding news too, which the auxiliary losses of one process count).
        width = max(int(self.mask[imp[idx]].sum(axis=1).max(initial=0)), 1)
        part, fraction = distributed.micro_batch(idx, ctx)
        batch = batch_tensors(bank, self.history[imp[part]], self.mask[imp[part]], self.samples.candidates[part],
                              dedup=not self.naive, width=width)
        if self.tokens is None:
            return batch, _Share(fraction)
        news = [self._news(distributed.shard(idx, r, ctx.world_size), width) for r in range(ctx.world_size)]
        whole = np.concatenate(news) if self.naive else np.unique(np.concatenate(news))
        if fraction == 0:
            owned = np.zeros(batch.distinct, bool)
        elif self.naive:
            owned = np.ones(batch.distinct, bool)
        else:
            owned = ~np.isin(news[ctx.rank], np.concatenate([np.empty(0, np.int64), *news[:ctx.rank]]))
        scored = int(self.tokens[whole].sum())
        mine = int(self.tokens[batch.inputs.rows.numpy()[owned]].sum())
        return batch, _Share(fraction, owned, category=int(owned.sum()) / len(whole),
                             ner=mine / scored if scored else 0.0)
