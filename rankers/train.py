"""Training and scoring of the NRMS ranker over stored features, and `NRMSRanker` (the Ranker).

Training (NRMS / PLM-NR): every click of `train` is one sample, with K non-clicks drawn
from the SAME impression (without replacement, or with replacement when the impression has
fewer than K), redrawn every epoch from a seeded generator; the loss is the (1 + K)-way
softmax cross-entropy with the click as the target. Sample building is vectorised over
all clicks at once. An epoch visits the impressions in a random order, the clicks of one
impression next to each other (`impression_order`), cut into batches of similar history
length (`length_batches`).

Efficiency (benchmarks/rank_train.py: at MIND-small size on one CPU thread an epoch takes
63 s, 1.9x less than before this round; a step is 34 ms of CPU, 12 of them matrix products,
the rest elementwise work, copies and dropout draws that eager PyTorch does not fuse):
- a batch encodes each DISTINCT news once: torch.unique over its history and candidate
  rows, encode those U rows, index back by the inverse (`batch_tensors(dedup=True)`); the
  naive path (one encoding per slot, `dedup=False`) gives the same scores and exists for
  the tests and benchmarks/rank_train.py;
- and each DISTINCT user once: the clicks of one impression share its history, so a batch
  encodes its B' impressions' users (MIND-small: 1.5 clicks an impression, B' = 87 for
  B = 128) and gives each sample its impression's (`distinct_users`, Batch.users); the
  user encoder is most of a step's arithmetic;
- attention and dropout skip torch's generic CPU paths (rankers.attention), and AdamW
  runs fused;
- scoring encodes every needed news once, every impression's user once (users grouped by
  history length, so little padding is encoded), then scores all candidate rows of all
  impressions (no fake candidates, no per-impression loop);
- token vectors stay where they fit: on the device when small, otherwise on the CPU as
  float16, gathered per batch (MIND-small's 65k x 32 x 768 tokens are 6 GB in float32);
  each batch is trimmed to its longest real title / history;
- on CUDA the forward passes run under bf16 autocast.
Validation AUC on `valid` after every epoch drives early stopping and picks the kept state
(rankers.early_stopping); dev is never an argument of `fit`. `fit` draws from torch's global
generator (weights, dropout) seeded with `seed`, inside `isolated_rng`: the caller's random
state is the same afterwards, and two fits with one seed give the same model.
Under `torchrun` (an initialised process group of N > 1 ranks, rankers.distributed) `fit`
trains data-parallel: every rank builds the same epoch plan, takes its share of each global
batch, and DistributedDataParallel averages the gradients so each step is the one-process
step of the whole batch; rank 0 validates and broadcasts the metrics, so all ranks stop alike.
Letters: S samples (clicks), B batch, B' distinct users (impressions) of a batch, H history,
C candidates (1 + K), U distinct news of a batch, N catalogue news, M impressions, T candidate
rows, L tokens, D width, d model width.
"""

from __future__ import annotations

import contextlib
import json
import time
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from extractors.device import resolve_device
from rankers import distributed
from rankers.base import FitReport
from rankers.data import Impressions, NewsFeatures
from rankers.early_stopping import EarlyStopping
from rankers.fusion import roles_of
from rankers.metrics import evaluate
from rankers.nrms import NRMS, NRMSConfig, RoleInput
from storage import atomic
from storage.errors import PipelineError

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
FORMAT = "mmnews-nrms-v1"


GPU_PATHS: Counter[str] = Counter()
"""How often the GPU-only code paths ran in this process (bf16 autocast, the fused AdamW):
what benchmarks/gpu.py checks, since no test can run them."""


def autocast(device: torch.device) -> torch.autocast:
    if device.type == "cuda":
        GPU_PATHS["bf16 autocast (training)"] += 1
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


# ---------------------------------------------------------------------------------------
# Features on the device


class NewsBank:
    """The features of the roles a model uses, indexed by catalogue row, gathered per batch.

    Pooled vectors always live on the device (N x D floats). Token vectors live on the
    device (float16 on CUDA) when they take at most `resident_gb`, otherwise on the CPU as
    float16 (pinned on CUDA) and only each batch's rows travel. On a CPU device they are
    used in place (no copy of a float32 store).
    """

    def __init__(self, features: dict[str, NewsFeatures], tokens: dict[str, bool], device: torch.device,
                 resident_gb: float = 4.0):
        self.device = device
        self.tokens = tokens
        counts = {r: len(features[r].vectors) for r in tokens}
        if len(set(counts.values())) != 1:
            raise PipelineError(
                f"feature stores cover different numbers of news {counts}; extract them from one catalogue")
        self.n = next(iter(counts.values()))
        self.vectors: dict[str, torch.Tensor] = {}
        self.token_vectors: dict[str, torch.Tensor] = {}
        self.masks: dict[str, torch.Tensor] = {}
        for role, use in tokens.items():
            f = features[role]
            if not use:
                self.vectors[role] = torch.as_tensor(np.asarray(f.vectors, dtype=np.float32)).to(device)  # (N, D)
                continue
            with warnings.catch_warnings():  # a read-only (memory-mapped) store: only ever read here
                warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
                tok = torch.from_numpy(np.ascontiguousarray(f.tokens))  # (N, L, D), no copy
            if device.type == "cuda":
                fits = tok.numel() * 2 <= resident_gb * 2**30
                tok = tok.to(torch.float16)
                tok = tok.to(device) if fits else tok.pin_memory()
            self.token_vectors[role] = tok
            self.masks[role] = torch.from_numpy(np.asarray(f.mask, dtype=bool)).to(tok.device)  # (N, L)

    def gather(self, rows: torch.Tensor) -> dict[str, RoleInput]:
        """Features of catalogue rows (U,) (a CPU int64 tensor) on the device."""
        out: dict[str, RoleInput] = {}
        dev_rows = rows.to(self.device)
        for role, use in self.tokens.items():
            if not use:
                out[role] = RoleInput(vectors=self.vectors[role][dev_rows])  # (U, D)
                continue
            tok = self.token_vectors[role]
            idx = rows.to(tok.device)
            mask = self.masks[role][idx]  # (U, L)
            # Titles are much shorter than the store's L: drop the columns nobody in the batch uses.
            used = torch.nonzero(mask.any(dim=0))
            width = int(used.max()) + 1 if len(used) else 1
            out[role] = RoleInput(
                tokens=tok[idx, :width].to(self.device, non_blocking=True).float(),  # (U, L', D)
                mask=mask[:, :width].to(self.device, non_blocking=True),  # (U, L')
            )
        return out


# ---------------------------------------------------------------------------------------
# Samples


@dataclass(frozen=True)
class Samples:
    """One epoch's training samples: the impression of every click and its candidates,
    the click first (so the target is always 0)."""

    impression: np.ndarray  # (S,) int64
    candidates: np.ndarray  # (S, C) int64 catalogue rows


def build_samples(impressions: Impressions, negatives: int, rng: np.random.Generator) -> Samples:
    """One sample per click with `negatives` non-clicks of its impression, drawn without
    replacement when the impression has that many and with replacement otherwise. Clicks of
    impressions without any non-click are dropped (there is nothing to contrast them with)."""
    labels = impressions.labels
    row_imp = impressions.row_impression  # (T,)
    clicks = np.flatnonzero(labels == 1)  # (S,)
    non_clicks = np.flatnonzero(labels == 0)  # rows, grouped by impression as rows are
    counts = np.bincount(row_imp[non_clicks], minlength=len(impressions))  # (M,)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])  # (M,)
    imp = row_imp[clicks]  # (S,)
    keep = counts[imp] > 0
    clicks, imp = clicks[keep], imp[keep]
    n = counts[imp]  # (S,)
    k = negatives
    pick = np.empty((len(imp), k), dtype=np.int64)  # (S, K) positions among the impression's non-clicks
    few = n < k
    pick[few] = np.floor(rng.random((int(few.sum()), k)) * n[few, None]).astype(np.int64)
    # Without replacement (sequential, vectorised over samples): draw r in [0, n - j), then
    # step it past the already chosen positions in ascending order: the r-th unchosen one.
    many = ~few
    m = n[many]
    chosen = np.empty((int(many.sum()), k), dtype=np.int64)
    for j in range(k):
        r = np.floor(rng.random(len(m)) * (m - j)).astype(np.int64)
        for v in np.sort(chosen[:, :j], axis=1).T:
            r += r >= v
        chosen[:, j] = r
    pick[many] = chosen
    negative_rows = non_clicks[starts[imp, None] + pick]  # (S, K)
    cands = np.concatenate([impressions.cand_items[clicks, None], impressions.cand_items[negative_rows]], axis=1)
    return Samples(impression=imp.astype(np.int64), candidates=cands.astype(np.int64))  # (S,), (S, C)


def length_batches(order: np.ndarray, lengths: np.ndarray, batch_size: int, rng: np.random.Generator,
                   pool: int = 32) -> list[np.ndarray]:
    """Split shuffled samples `order` into batches of similar history length `lengths[order]`.

    Each run of `pool` batches' worth of shuffled samples is sorted by length and cut into
    batches, and the batches are shuffled again: a batch is padded only to its own longest
    history (batch_tensors), so on histories that average under half the cap this roughly
    halves the user encoder's work, while every batch still mixes users drawn at random.
    """
    batches = []
    span = batch_size * pool
    for start in range(0, len(order), span):
        part = order[start:start + span]
        part = part[np.argsort(lengths[part], kind="stable")]
        batches += [part[i:i + batch_size] for i in range(0, len(part), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def impression_order(samples: Samples, rng: np.random.Generator) -> np.ndarray:
    """(S,) the samples shuffled by impression: impressions in random order, the samples
    (clicks) of each one together, so that a batch encodes their shared user once."""
    rank = rng.permutation(int(samples.impression.max(initial=-1)) + 1)  # (M,) a random place per impression
    return np.argsort(rank[samples.impression], kind="stable")


def train_loss(scores: torch.Tensor) -> torch.Tensor:
    """(1 + K)-way softmax cross-entropy over scores (B, C) whose column 0 is the click."""
    target = torch.zeros(len(scores), dtype=torch.long, device=scores.device)
    return F.cross_entropy(scores.float(), target)


# ---------------------------------------------------------------------------------------
# Batches


@dataclass
class Batch:
    """Model inputs of one batch: U news' features and indices into them."""

    inputs: dict[str, RoleInput]
    history: torch.Tensor  # (B', H) int64 into the U news
    history_mask: torch.Tensor  # (B', H) bool
    candidates: torch.Tensor  # (B, C) int64 into the U news
    distinct: int  # U
    users: torch.Tensor | None = None  # (B,) int64: the history row of each candidate row; None: B' = B


def batch_tensors(bank: NewsBank, history: np.ndarray, history_mask: np.ndarray, candidates: np.ndarray,
                  dedup: bool = True, width: int | None = None, users: np.ndarray | None = None) -> Batch:
    """Catalogue rows history (B', H) with mask, candidates (B, C) -> a Batch on the device.

    dedup=True encodes each distinct news of the batch once; dedup=False one per slot.
    `users` (B,) maps each candidate row to its history row (the distinct users of a batch,
    each encoded once); None: history row b is row b's. Histories are cut to their longest
    (`width` fixes it instead: a data-parallel rank's share of a batch keeps the whole
    batch's history slots, padding included)."""
    if width is None:
        width = max(int(history_mask.sum(axis=1).max(initial=0)), 1)  # histories are left-aligned
    history, history_mask = history[:, :width], history_mask[:, :width]  # (B', H')
    rows = torch.from_numpy(np.concatenate([history.ravel(), candidates.ravel()]))  # (B'*H' + B*C,)
    if dedup:
        distinct, inverse = torch.unique(rows, return_inverse=True)  # (U,), (B'*H' + B*C,)
    else:
        distinct, inverse = rows, torch.arange(len(rows))
    b, h = history.shape
    inverse = inverse.to(bank.device)
    return Batch(
        inputs=bank.gather(distinct),
        history=inverse[: b * h].view(b, h),
        history_mask=torch.from_numpy(history_mask).to(bank.device),
        candidates=inverse[b * h:].view(len(candidates), -1),
        distinct=len(distinct),
        users=None if users is None else torch.from_numpy(np.asarray(users, dtype=np.int64)).to(bank.device),
    )


def distinct_users(impressions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(distinct impressions (B',), index of each sample's among them (B,)) of a batch's
    samples `impressions` (B,): the clicks of one impression share one user to encode."""
    distinct, users = np.unique(impressions, return_inverse=True)
    return distinct, users.reshape(-1)


def forward_batch(model: NRMS, batch: Batch) -> torch.Tensor:
    return model(batch.inputs, batch.history, batch.history_mask, batch.candidates, batch.users)  # (B, C)


# ---------------------------------------------------------------------------------------
# Scoring: each news once, each user once


@torch.no_grad()
def encode_catalogue(model: NRMS, bank: NewsBank, rows: np.ndarray, chunk: int = 4096) -> torch.Tensor:
    """News vectors of the given catalogue rows in a (N, d) float32 table (other rows 0)."""
    table = torch.zeros(bank.n, model.config.dim, device=bank.device)  # (N, d)
    rows = np.unique(rows)
    for start in range(0, len(rows), chunk):
        part = torch.from_numpy(rows[start:start + chunk])
        with autocast(bank.device):
            table[part.to(bank.device)] = model.encode_news(bank.gather(part)).float()  # (chunk, d)
    return table


@torch.no_grad()
def score_impressions(model: NRMS, bank: NewsBank, impressions: Impressions, chunk: int | None = None,
                      row_chunk: int | None = None) -> np.ndarray:
    """Scores (T,) float64 of every candidate row of `impressions`, in their order: users
    `chunk` at a time, candidate rows `row_chunk` at a time (defaults: on a GPU 2048 and
    2^20; on the CPU 512 and 2^17, where the larger ones raised the peak memory of scoring
    MIND-small's dev split by 1.65 GiB instead of 0.23 and took no less time)."""
    cuda = bank.device.type == "cuda"
    chunk = chunk or (2048 if cuda else 512)
    row_chunk = row_chunk or (1 << 20 if cuda else 1 << 17)
    was_training = model.training
    model.eval()
    try:
        history, mask = impressions.histories(model.config.history)  # (M, H)
        table = encode_catalogue(model, bank, np.concatenate([history[mask], impressions.cand_items]))
        users = torch.empty(len(impressions), model.config.dim, device=bank.device)  # (M, d)
        # Users in order of history length, each chunk cut to its longest history: MIND's
        # histories average 33 of the 50 slots, so this skips a third of the padding.
        lengths = mask.sum(axis=1)  # (M,)
        order = np.argsort(lengths, kind="stable")
        for start in range(0, len(order), chunk):
            sel = order[start:start + chunk]
            width = max(int(lengths[sel].max()), 1)
            h = torch.from_numpy(history[sel, :width]).to(bank.device)  # (B, H')
            m = torch.from_numpy(mask[sel, :width]).to(bank.device)
            with autocast(bank.device):
                u = model.encode_user(table[h], m).float()  # (B, H', d) -> (B, d)
            users[torch.from_numpy(sel).to(bank.device)] = u
        row_imp = impressions.row_impression  # (T,)
        scores = np.empty(len(row_imp), dtype=np.float64)
        for start in range(0, len(row_imp), row_chunk):
            imp = torch.from_numpy(row_imp[start:start + row_chunk]).to(bank.device)
            cand = torch.from_numpy(impressions.cand_items[start:start + row_chunk]).to(bank.device)
            part = (users[imp] * table[cand]).sum(dim=-1)  # (rows,)
            scores[start:start + len(part)] = part.double().cpu().numpy()
        return scores
    finally:
        model.train(was_training)


# ---------------------------------------------------------------------------------------
# The ranker


def scorable(impressions: Impressions) -> bool:
    """Whether some impression has both a click and a non-click (else AUC is undefined)."""
    if not len(impressions) or not impressions.labeled:
        return False
    row_imp = impressions.row_impression
    clicks = np.bincount(row_imp, weights=impressions.labels == 1, minlength=len(impressions))
    return bool(((clicks > 0) & (clicks < impressions.candidate_counts)).any())


def _token_plan(config: NRMSConfig, roles: tuple[str, ...], features: dict[str, NewsFeatures]) -> dict[str, bool]:
    plan = {}
    for role in roles:
        has = features[role].tokens is not None and features[role].mask is not None
        if config.use_tokens is True and not has:
            raise PipelineError(f"use_tokens=True but the {role} store {features[role].name!r} holds no token vectors; "
                                "extract it with tokens or set use_tokens to None or False")
        plan[role] = has and config.use_tokens is not False and role not in config.pooled_roles
    return plan


def feature_statistics(features: NewsFeatures, tokens: bool, rows: np.ndarray, limit: int = 8192,
                       seed: int = 0, chunk: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension mean and std (D,) of a store's pooled vectors, or of its real token
    vectors, over `rows` (at most `limit` of them, drawn with a seeded generator)."""
    rows = np.unique(rows)
    if len(rows) > limit:
        rows = np.sort(np.random.default_rng(seed).choice(rows, limit, replace=False))
    dim = features.tokens.shape[2] if tokens else features.dim
    total, total_sq, count = np.zeros(dim), np.zeros(dim), 0
    for start in range(0, len(rows), chunk):
        part = rows[start:start + chunk]
        x = features.tokens[part][features.mask[part]] if tokens else features.vectors[part]  # (n, D)
        x = x.astype(np.float64)
        total += x.sum(0)
        total_sq += (x * x).sum(0)
        count += len(x)
    mean = total / max(count, 1)
    std = np.sqrt(np.maximum(total_sq / max(count, 1) - mean * mean, 0.0))
    return torch.from_numpy(mean).float(), torch.from_numpy(std).float()


def _widths(features: dict[str, NewsFeatures], tokens: dict[str, bool]) -> dict[str, int]:
    return {r: int(features[r].tokens.shape[2]) if use else features[r].dim for r, use in tokens.items()}


@contextlib.contextmanager
def isolated_rng(device: torch.device) -> Iterator[None]:
    """torch's global generators (the CPU's, and the GPUs' on CUDA) saved on entry and put
    back on exit (torch.random.fork_rng): a trainer seeds and draws inside (model weights,
    dropout, a resumed checkpoint's state) and its caller's random state is as it was."""
    devices = list(range(torch.cuda.device_count())) if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        yield


@contextlib.contextmanager
def cpu_threads(device: torch.device, n: int | None) -> Iterator[None]:
    """torch's intra-op threads limited to `n` while on a CPU device (None: leave as is).

    The ranker's operations are small (a batch's user encoder is a few (128, 50, 128)
    attentions), so extra threads gain little and cost a lot whenever the cores are shared:
    on the 2-core machines, with other work running, an epoch over the small synthetic world
    took 4.8 s on 1 thread and 40 s on 2 (7 s on 2 with OMP_WAIT_POLICY=PASSIVE).
    """
    if device.type != "cpu" or n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class NRMSRanker:
    """NRMS over stored features, keeping the Ranker contract of rankers.base.

    `NRMSRanker(fusion, config, device)`; `fit(train, valid, features)`; `score(impressions)`;
    `save(folder)`; `NRMSRanker.load(folder, device, features)`.
    """

    def __init__(self, fusion: str = "hadamard", config: NRMSConfig | None = None, device: str = "auto",
                 progress: bool = True, resident_gb: float = 4.0, cpu_threads: int | None = 1):
        self.cpu_threads = cpu_threads
        self.config = config or NRMSConfig()
        self.fusion = fusion
        self.roles = roles_of(fusion)
        self.device = resolve_device(device)
        self.progress = progress
        self.resident_gb = resident_gb
        self.name = f"nrms-{fusion}"
        self.model: NRMS | None = None
        self.bank: NewsBank | None = None
        self.feature_names: dict[str, str] = {}

    # -- features -----------------------------------------------------------------------
    def _check_features(self, features: dict[str, NewsFeatures]) -> None:
        missing = [r for r in self.roles if r not in features]
        if missing:
            raise PipelineError(f"fusion {self.fusion!r} needs feature roles {', '.join(self.roles)}; "
                                f"none given for {', '.join(missing)}")

    def set_features(self, features: dict[str, NewsFeatures]) -> None:
        """Attach the features a loaded model scores with; their widths must match the model's."""
        if self.model is None:
            raise PipelineError("set_features needs a fitted or loaded model")
        self._check_features(features)
        for role in self.roles:
            use = self.model.tokens[role]
            if use and features[role].tokens is None:
                raise PipelineError(f"the model encodes {role} tokens but store {features[role].name!r} has none; "
                                    "load it with tokens")
        widths = _widths(features, self.model.tokens)
        expected = {r: int(self.model.news[r].in_dim) for r in self.roles}
        if widths != expected:
            raise PipelineError(f"feature widths {widths} differ from the model's {expected}; "
                                "use the stores the model was trained on")
        self.bank = NewsBank(features, self.model.tokens, self.device, self.resident_gb)
        self.feature_names = {r: features[r].name for r in self.roles}

    # -- training -----------------------------------------------------------------------
    def fit(self, train: Impressions, valid: Impressions, features: dict[str, NewsFeatures]) -> FitReport:
        with cpu_threads(self.device, self.cpu_threads), isolated_rng(self.device):
            return self._fit(train, valid, features)

    def _fit(self, train: Impressions, valid: Impressions, features: dict[str, NewsFeatures]) -> FitReport:
        from tqdm.auto import tqdm

        cfg = self.config
        if not train.labeled:
            raise PipelineError(f"split {train.name!r} is unlabeled; a ranker trains on labeled impressions")
        self._check_features(features)
        tokens = _token_plan(cfg, self.roles, features)
        torch.manual_seed(cfg.seed)  # inside isolated_rng: the caller's generator is restored after fit
        model = NRMS(cfg, self.fusion, _widths(features, tokens), tokens)
        # Input statistics from the news the training split shows, never from dev's.
        train_rows = np.concatenate([train.hist_items, train.cand_items])
        for role in self.roles:
            stats = feature_statistics(features[role], tokens[role], train_rows, seed=cfg.seed)
            model.news[role].norm.set_statistics(*stats)
        self.model = model.to(self.device)
        self.set_features(features)
        model, bank = self.model, self.bank
        ctx = distributed.current()
        if ctx.enabled:
            distributed.check_same(distributed.digest(self.fusion, cfg, tokens, train.impression_ids, train.labels,
                                                      valid.impression_ids), "the training setup")
            torch.manual_seed(distributed.rank_seed(cfg.seed, ctx.rank))  # dropout differs across ranks
        net = distributed.wrap(model, self.device)  # DDP over `model` when data-parallel
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
        history, mask = train.histories(cfg.history)  # (M, H)
        lengths = mask.sum(axis=1)  # (M,)

        report = FitReport()
        started = time.perf_counter()
        train_seconds = 0.0
        stopper = EarlyStopping(cfg.patience)
        for epoch in range(1, cfg.epochs + 1):
            rng = np.random.default_rng([cfg.seed, epoch])
            samples = build_samples(train, cfg.negatives, rng)
            order = impression_order(samples, rng)
            plan = length_batches(order, lengths[samples.impression], cfg.batch_size, rng)
            model.train()
            t0 = time.perf_counter()
            running, batches = torch.zeros((), device=self.device), 0
            bar = tqdm(plan, desc=f"{self.name} epoch {epoch}", unit="batch",
                       disable=not self.progress or not ctx.is_main, dynamic_ncols=True, leave=False)
            for idx in bar:
                idx, share = distributed.micro_batch(idx, ctx)  # the whole batch and 1.0 in one process
                imp, users = distinct_users(samples.impression[idx])  # (B',), (B,)
                batch = batch_tensors(bank, history[imp], mask[imp], samples.candidates[idx], users=users)
                with autocast(self.device):
                    loss = train_loss(forward_batch(net, batch))
                opt.zero_grad(set_to_none=True)
                # DDP averages gradients over ranks: scaled so, they sum to the whole batch's mean loss's.
                (loss * (share * ctx.world_size)).backward()
                opt.step()
                running += loss.detach() * share  # summed on the device: no host sync per step
                batches += 1
                if batches % 20 == 0:
                    bar.set_postfix(loss=f"{float(running) / batches:.4f}", refresh=False)
            bar.close()
            total = float(distributed.all_reduce_sum(running))
            seconds = time.perf_counter() - t0
            train_seconds += seconds
            row = {"epoch": epoch, "loss": total / max(batches, 1), "samples": len(order), "train_seconds": seconds}
            if not np.isfinite(total):
                raise PipelineError(f"{self.name}: training diverged in epoch {epoch} (mean loss "
                                    f"{total / max(batches, 1)}); lower the learning rate (now {cfg.lr})")
            metrics, auc = {}, None  # nothing to validate on: keep the last epoch
            if scorable(valid):
                t1 = time.perf_counter()
                metrics = evaluate(valid.cand_offsets, valid.labels, self._score(valid)) if ctx.is_main else None
                metrics = distributed.broadcast_object(metrics)
                row.update({f"valid_{k}": v for k, v in metrics.items()})
                row["valid_seconds"] = time.perf_counter() - t1
                auc = float(metrics["auc"])
            report.history.append(row)
            report.epochs = epoch
            if stopper.update(epoch, auc, model):
                report.best_epoch, report.valid_metrics = epoch, {k: float(v) for k, v in metrics.items()}
            if stopper.stopped:
                break
        stopper.restore(model)
        model.eval()
        report.seconds = time.perf_counter() - started
        report.train_impressions_per_s = len(train) * report.epochs / train_seconds if train_seconds else 0.0
        return report

    # -- scoring ------------------------------------------------------------------------
    def _score(self, impressions: Impressions) -> np.ndarray:
        if len(impressions.cand_items) and int(impressions.cand_items.max()) >= self.bank.n:
            raise PipelineError(f"split {impressions.name!r} refers to news rows beyond the {self.bank.n} of the "
                                "features; use stores extracted from the same catalogue")
        return score_impressions(self.model, self.bank, impressions)

    def score(self, impressions: Impressions) -> np.ndarray:
        """Higher is better: (T,) float64 aligned with `impressions.cand_items`."""
        if self.model is None or self.bank is None:
            raise PipelineError("the ranker has no model or no features: fit it, or load it with features")
        with cpu_threads(self.device, self.cpu_threads):
            return self._score(impressions)

    # -- persistence --------------------------------------------------------------------
    def save(self, folder: Path) -> list[Path]:
        from safetensors.torch import save_file

        if self.model is None:
            raise PipelineError("nothing to save: the ranker is not fitted")
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}
        with atomic.atomic_path(folder / MODEL_FILE) as tmp:
            save_file(state, str(tmp), metadata={"format": FORMAT})
        meta = {
            "format": FORMAT,
            "ranker": "nrms",
            "fusion": self.fusion,
            "roles": list(self.roles),
            "widths": {r: int(self.model.news[r].in_dim) for r in self.roles},
            "tokens": dict(self.model.tokens),
            "features": self.feature_names,
            "config": self.config.to_dict(),
        }
        atomic.write_json(folder / CONFIG_FILE, meta)
        return [folder / MODEL_FILE, folder / CONFIG_FILE]

    @classmethod
    def load(cls, folder: Path, device: str = "auto", features: dict[str, NewsFeatures] | None = None,
             progress: bool = True) -> NRMSRanker:
        """A saved ranker; give `features` (or call `set_features`) before scoring."""
        from safetensors.torch import load_file

        folder = Path(folder)
        path = folder / CONFIG_FILE
        if not path.is_file() or not (folder / MODEL_FILE).is_file():
            raise PipelineError(f"{folder} holds no saved NRMS ranker ({CONFIG_FILE} and {MODEL_FILE} expected)")
        meta = json.loads(path.read_text())
        if meta.get("format") != FORMAT:
            raise PipelineError(f"{path}: format {meta.get('format')!r}, expected {FORMAT!r}")
        config = NRMSConfig.from_dict(meta["config"])
        ranker = cls(meta["fusion"], config, device=device, progress=progress)
        ranker.model = NRMS(config, meta["fusion"], meta["widths"], meta["tokens"])
        ranker.model.load_state_dict(load_file(str(folder / MODEL_FILE)))
        ranker.model.to(ranker.device).eval()
        ranker.feature_names = dict(meta.get("features", {}))
        if features is not None:
            ranker.set_features(features)
        return ranker
