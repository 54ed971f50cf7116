"""PLM-NR with trainable extractors: the model, and the raw news it reads.

- `RawNewsBank`: every catalogue news' inputs prepared once (titles tokenised, covers decoded
  and resized to uint8), gathered per batch on the device the way rankers.train.NewsBank
  gathers stored features: each batch padded to its own longest title, pixels normalised
  with the extractor's mean and std (exactly the pixels of extractors.images).
- `FineTuneNRMS`: extractors per role (BERT over the title, ViT over the card) -> the NRMS
  token news encoder (self-attention, additive attention) -> fusion -> NRMS user encoder ->
  dot product; optionally MTRec's auxiliary heads on the text encoder. Its `forward` and
  `encode_news` have NRMS's signatures, so rankers.train's batching (`batch_tensors`, dedup
  or naive) and encode-once scoring (`score_impressions`) drive it unchanged.
- `freeze_lowest`, `enable_gradient_checkpointing`: the memory and cost options of fine-tuning.
Letters: N catalogue news, U distinct news, B impressions, H history, C candidates, L tokens,
P patches, S x W image size, D extractor width, d model width.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from rankers.mtrec import MTRecConfig, MTRecHeads
from rankers.nrms import NRMS, NRMSConfig, RoleInput
from rankers.train import autocast
from storage.catalogue import Catalogue
from storage.errors import PipelineError


# ---------------------------------------------------------------------------------------
# Raw news, prepared once


@dataclass
class NewsInputs:
    """The raw inputs of U news on the device; `rows` are their catalogue rows (CPU)."""

    rows: torch.Tensor  # (U,) int64
    input_ids: torch.Tensor | None = None  # (U, L)
    attention_mask: torch.Tensor | None = None  # (U, L)
    pixels: torch.Tensor | None = None  # (U, 3, S, W) normalised


class RawNewsBank:
    """Every catalogue news' model inputs, gathered per batch like rankers.train.NewsBank.

    Text: all titles tokenised once, padded to max_length on the CPU; `gather` cuts a batch
    to its longest title. Images: every card read once (RGB, missing ones by the extractor's
    `missing` strategy), cropped and resized to uint8; normalised on the device per batch
    with the extractor's mean and std, giving exactly the pixels of extractors.images."""

    def __init__(self, catalogue: Catalogue, extractors: dict[str, nn.Module], device: torch.device,
                 image_cache_gb: float = 16.0, image_workers: int = 0):
        self.n = len(catalogue)
        self.device = device
        self.catalogue = catalogue
        self.image_status: Counter = Counter()
        self.input_ids = self.attention = self.lengths = None
        self.pixels: torch.Tensor | None = None
        self.cards = None
        text = extractors.get("text")
        if text is not None:
            enc = text.tokenizer(text.prepare_titles(catalogue.title), truncation=True,
                                 max_length=text.config.max_length, padding="max_length", return_tensors="np")
            self.input_ids = torch.from_numpy(enc["input_ids"].astype(np.int64))  # (N, Lmax)
            self.attention = torch.from_numpy(enc["attention_mask"].astype(np.int64))  # (N, Lmax)
            self.lengths = self.attention.sum(1)  # (N,)
        vision = extractors.get("image")
        if vision is not None:
            self._prepare_images(vision, image_cache_gb, image_workers)

    def _prepare_images(self, vision, cache_gb: float, workers: int) -> None:
        from extractors.images import CardDataset, worker_context

        cfg = vision.config
        self.missing = cfg.missing
        self.mean = torch.tensor(cfg.mean, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(cfg.std, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        cat = self.catalogue
        # uint8 crops (S*W*3 bytes a cover in the cache); normalised per batch in `gather`.
        self.cards = CardDataset([cat.image_path(i) for i in range(self.n)], [str(t) for t in cat.title],
                                 [str(c) for c in cat.category], vision.transform, cfg.missing, uint8=True)
        self.present = np.zeros(self.n, dtype=bool)
        if self.n * 3 * cfg.image_size[0] * cfg.image_size[1] > cache_gb * 2**30:
            return  # decoded per batch in gather
        pixels = torch.empty(self.n, 3, *cfg.image_size, dtype=torch.uint8)  # (N, 3, S, W)
        loader = torch.utils.data.DataLoader(self.cards, batch_size=None, num_workers=workers,
                                             multiprocessing_context=worker_context(workers))
        for i, (img, present, status) in enumerate(loader):
            pixels[i] = img
            self.present[i] = present
            self.image_status[status] += 1
        self.pixels = pixels

    def _uint8_pixels(self, rows: torch.Tensor) -> torch.Tensor:
        if self.pixels is not None:
            return self.pixels[rows]
        out = []
        for r in rows.tolist():
            img, present, status = self.cards[r]
            self.present[r] = present
            out.append(img)
        return torch.stack(out)  # (U, 3, S, W)

    def gather(self, rows: torch.Tensor, roles: tuple[str, ...] = ("text", "image")) -> NewsInputs:
        """Inputs of catalogue rows (U,) (a CPU int64 tensor) on the device, for `roles`."""
        out = NewsInputs(rows=rows)
        if self.input_ids is not None and "text" in roles:
            width = max(int(self.lengths[rows].max()) if len(rows) else 1, 1)
            out.input_ids = self.input_ids[rows, :width].to(self.device, non_blocking=True)  # (U, L)
            out.attention_mask = self.attention[rows, :width].to(self.device, non_blocking=True)
        if self.cards is not None and "image" in roles:
            raw = self._uint8_pixels(rows).to(self.device, non_blocking=True)  # (U, 3, S, W)
            pixels = (raw.float() / 255.0 - self.mean) / self.std
            if self.missing == "zeros":  # what CardDataset gives a missing cover under `zeros`
                keep = torch.from_numpy(self.present[rows.numpy()]).to(self.device)
                pixels = pixels * keep.view(-1, 1, 1, 1)
            out.pixels = pixels
        return out


# ---------------------------------------------------------------------------------------
# The model


class FineTuneNRMS(nn.Module):
    """Extractors per role -> NRMS token news encoders -> fusion -> user encoder -> scores.

    `forward` has NRMS.forward's signature (inputs of U news, (B, H) / (B, C) indices into
    them), so rankers.train's batching and encode-once scoring drive it unchanged."""

    def __init__(self, config: NRMSConfig, fusion: str, extractors: dict[str, nn.Module],
                 mtrec: MTRecConfig | None = None, n_categories: int = 0):
        super().__init__()
        self.config = config  # read by rankers.train.score_impressions (history, dim)
        self.extractors = nn.ModuleDict(extractors)
        widths = {r: int(e.dim) for r, e in extractors.items()}
        self.head = NRMS(config, fusion, widths, {r: True for r in extractors})
        active = mtrec is not None and mtrec.active
        self.aux = MTRecHeads(widths["text"], n_categories, mtrec) if active else None

    def train(self, mode: bool = True) -> FineTuneNRMS:
        super().train(mode)
        for ext in self.extractors.values():
            if not ext.trainable:
                ext.eval()  # a frozen extractor never runs dropout
        return self

    def encode_role(self, role: str, inputs: NewsInputs):
        """One extractor's Encoded: pooled (U, D), token vectors (U, L|P, D) and mask."""
        ext = self.extractors[role]
        with torch.set_grad_enabled(torch.is_grad_enabled() and ext.trainable):
            if role == "text":
                return ext(inputs.input_ids, inputs.attention_mask, return_tokens=True)
            return ext(inputs.pixels, return_tokens=True)

    def encode_tokens(self, inputs: NewsInputs) -> dict:
        """{role: Encoded} for every extractor."""
        return {role: self.encode_role(role, inputs) for role in self.extractors}

    def encode_news(self, inputs: NewsInputs, return_text: bool = False):
        """(U, d) news vectors; with return_text also the text role's hidden states (U, L, D)."""
        encoded = self.encode_tokens(inputs)
        news = self.head.encode_news({r: RoleInput(tokens=e.tokens, mask=e.mask) for r, e in encoded.items()})
        if return_text:
            text = encoded.get("text")
            return news, (text.tokens if text is not None else None)
        return news

    def encode_user(self, clicks: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.head.encode_user(clicks, mask)  # (B, H, d) -> (B, d)

    def forward(self, inputs: NewsInputs, history: torch.Tensor, history_mask: torch.Tensor,
                candidates: torch.Tensor, return_text: bool = False):
        """Scores (B, C); with return_text also the text hidden states of the U news."""
        news, text = self.encode_news(inputs, return_text=True)  # (U, d), (U, L, D)
        users = self.encode_user(news[history], history_mask)  # (B, d)
        scores = self.head.score(users, news[candidates])  # (B, C)
        return (scores, text) if return_text else scores


def _layers(extractor: nn.Module) -> tuple[list[nn.Module], nn.ModuleList]:
    """(embedding modules, transformer layers) of a Hugging Face text model or a timm ViT."""
    model = extractor.model
    if hasattr(model, "blocks"):  # timm VisionTransformer
        emb = [m for m in (model.patch_embed,) if m is not None]
        return emb, model.blocks
    for path in ("encoder.layer", "transformer.layer", "encoder.layers", "layers"):
        obj = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
        if isinstance(obj, nn.ModuleList):
            emb = [m for m in (getattr(model, "embeddings", None),) if m is not None]
            return emb, obj
    raise PipelineError(f"cannot find the transformer layers of {extractor.config.spec} to freeze; "
                        "use freeze_layers=0 with this checkpoint")


def freeze_lowest(extractor: nn.Module, n: int) -> None:
    """No gradients for the embeddings and the lowest `n` transformer layers (n > 0)."""
    if n <= 0:
        return
    emb, layers = _layers(extractor)
    if n > len(layers):
        raise PipelineError(f"freeze_layers={n} but {extractor.config.spec} has {len(layers)} layers")
    for module in [*emb, *layers[:n]]:
        module.requires_grad_(False)
    for name in ("cls_token", "pos_embed", "reg_token"):  # timm keeps these as bare parameters
        p = getattr(extractor.model, name, None)
        if isinstance(p, nn.Parameter):
            p.requires_grad_(False)


def enable_gradient_checkpointing(extractor: nn.Module) -> None:
    """Recompute activations in backward instead of keeping them (memory for time)."""
    model = extractor.model
    kwargs = {"use_reentrant": False}  # the reentrant variant gives no gradients below frozen embeddings
    if hasattr(model, "activation_checkpointing_enable"):  # Hugging Face >= 5 (the old name is deprecated)
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    elif hasattr(model, "gradient_checkpointing_enable"):  # Hugging Face 4
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    elif hasattr(model, "set_grad_checkpointing"):  # timm
        model.set_grad_checkpointing(True)
    else:
        raise PipelineError(f"{extractor.config.spec} does not support gradient checkpointing")


@torch.no_grad()
def token_statistics(model: FineTuneNRMS, bank: RawNewsBank, rows: np.ndarray, limit: int = 1024,
                     chunk: int = 128, seed: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per-dimension mean and std (D,) of each extractor's real token vectors over `rows`
    (at most `limit`, seeded), for the head's Standardize layers (see rankers.nrms)."""
    rows = np.unique(rows)
    if len(rows) > limit:
        rows = np.sort(np.random.default_rng(seed).choice(rows, limit, replace=False))
    was = model.training
    model.eval()
    sums: dict[str, list] = {}
    for start in range(0, len(rows), chunk):
        with autocast(bank.device):
            encoded = model.encode_tokens(bank.gather(torch.from_numpy(rows[start:start + chunk])))
        for role, e in encoded.items():
            x = e.tokens[e.mask].double()  # (n, D)
            s = sums.setdefault(role, [0.0, 0.0, 0])
            s[0], s[1], s[2] = s[0] + x.sum(0), s[1] + (x * x).sum(0), s[2] + len(x)
    model.train(was)
    out = {}
    for role, (total, total_sq, count) in sums.items():
        mean = total / max(count, 1)
        std = (total_sq / max(count, 1) - mean * mean).clamp_min(0).sqrt()
        out[role] = (mean.float().cpu(), std.float().cpu())
    return out
