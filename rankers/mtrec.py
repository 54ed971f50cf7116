"""MTRec's auxiliary tasks on the text encoder: category classification and title NER.

- Category: softmax(W r + b) over the dataset's categories, r the title's [CLS] hidden state;
  cross-entropy.
- NER: per-token softmax over B / I / O on the title's last hidden states; cross-entropy over
  the real tokens ([CLS], [SEP] and padding are ignored). Tags come from the title entities
  of news.tsv: every occurrence (a character offset with its surface form) marks the tokens
  whose characters overlap it, the first B and the rest I; everything else is O. Plain
  B/I/O, as in MTRec, not one tag pair per entity type.
- Losses: L = L_main + L_category + L_NER; with gradient surgery (rankers.surgery) the
  auxiliary gradient is weighted by lambda = 0.3 and projected off the main one when they
  conflict, over the shared text-encoder parameters.
`MTRecConfig` holds the switches for the ablations (drop the category task, the NER task or
the surgery). Letters: U news, L tokens, D encoder width, K categories.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from rankers.surgery import LAMBDA

O, B, I = 0, 1, 2  # noqa: E741 (the tag names of the scheme)
TAGS = ("O", "B", "I")
IGNORE = -100  # F.cross_entropy's ignore_index: special tokens and padding


@dataclass(frozen=True)
class MTRecConfig:
    """Which auxiliary parts are on. All on is MTRec; each off is one published ablation."""

    category: bool = True
    ner: bool = True
    surgery: bool = True
    weight: float = LAMBDA  # lambda, the auxiliary gradient's weight under surgery

    def __post_init__(self) -> None:
        if not 0.0 < self.weight <= 10.0:
            raise ValueError(f"MTRecConfig.weight (lambda) must be in (0, 10], got {self.weight}")

    @property
    def active(self) -> bool:
        return self.category or self.ner

    def to_dict(self) -> dict:
        return asdict(self)


class MTRecHeads(nn.Module):
    """[CLS] (U, D) -> category logits (U, K); tokens (U, L, D) -> tag logits (U, L, 3)."""

    def __init__(self, dim: int, n_categories: int, config: MTRecConfig):
        super().__init__()
        self.config = config
        self.category = nn.Linear(dim, n_categories) if config.category else None
        self.ner = nn.Linear(dim, len(TAGS)) if config.ner else None

    def losses(self, hidden: torch.Tensor, category: torch.Tensor, tags: torch.Tensor) -> dict[str, torch.Tensor]:
        """Text hidden states (U, L, D), category ids (U,), BIO tags (U, L) (IGNORE where
        not scored) -> {"category": loss, "ner": loss} for the tasks that are on."""
        out: dict[str, torch.Tensor] = {}
        if self.category is not None:
            logits = self.category(hidden[:, 0])  # (U, K) from [CLS]
            out["category"] = F.cross_entropy(logits.float(), category)
        if self.ner is not None:
            logits = self.ner(hidden)  # (U, L, 3)
            tags = tags[:, : logits.shape[1]]
            if bool((tags != IGNORE).any()):
                out["ner"] = F.cross_entropy(logits.float().reshape(-1, len(TAGS)), tags.reshape(-1), ignore_index=IGNORE)
            else:  # no scored token in this batch: a zero that still reaches the head
                out["ner"] = logits.float().sum() * 0.0
        return out


def entity_spans(title: str, entities_json: str) -> list[tuple[int, int]]:
    """Character spans [start, end) of the title entities' occurrences in `title`.

    Each offset is paired with the surface form at the same position (MIND's lists are
    parallel); an offset whose form is not found there (case-insensitively) is looked up by
    exact matching of the form in the title, as MTRec matched entities, and dropped when absent."""
    if not entities_json or not entities_json.strip():
        return []
    try:
        entities = json.loads(entities_json)
    except json.JSONDecodeError:
        return []
    spans: list[tuple[int, int]] = []
    lower = title.lower()
    for ent in entities if isinstance(entities, list) else []:
        if not isinstance(ent, dict):
            continue
        offsets = [o for o in ent.get("OccurrenceOffsets") or [] if isinstance(o, int)]
        forms = [f for f in ent.get("SurfaceForms") or [] if isinstance(f, str) and f]
        for k, offset in enumerate(offsets):
            candidates = ([forms[k]] if k < len(forms) else []) + forms + [ent.get("Label") or ""]
            span = next(((offset, offset + len(f)) for f in candidates
                         if f and lower[offset:offset + len(f)] == f.lower()), None)
            if span is None:
                found = next(((lower.find(f.lower()), len(f)) for f in candidates if f and f.lower() in lower), None)
                span = (found[0], found[0] + found[1]) if found else None
            if span is not None:
                spans.append(span)
        if not offsets:  # no offsets given: exact matching of the surface forms alone
            for f in forms:
                at = lower.find(f.lower())
                if at >= 0:
                    spans.append((at, at + len(f)))
    return sorted(set(spans))


def bio_tags(spans: Sequence[tuple[int, int]], offsets: np.ndarray, real: np.ndarray) -> np.ndarray:
    """B/I/O tags (L,) int64 of one title's tokens.

    `offsets` (L, 2) are the tokens' character spans (a fast tokenizer's offset mapping),
    `real` (L,) bool marks the tokens to tag (not [CLS], [SEP] or padding; those get IGNORE).
    A token overlapping an entity span is B when it is that span's first token, else I."""
    tags = np.where(real, O, IGNORE).astype(np.int64)  # (L,)
    starts, ends = offsets[:, 0], offsets[:, 1]
    for lo, hi in spans:
        inside = np.flatnonzero(real & (starts < hi) & (ends > lo))
        if len(inside):
            tags[inside] = I
            tags[inside[0]] = B
    return tags


def tag_titles(tokenizer, titles: Sequence[str], entities: Sequence[str], max_length: int) -> np.ndarray:
    """B/I/O tags (N, max_length) of every title, aligned with the tokenisation
    `tokenizer(titles, truncation=True, max_length=max_length, padding="max_length")`."""
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("NER tags need token offsets, which only fast (Rust) tokenizers give; "
                         "use a checkpoint with a tokenizer.json, or turn the NER task off")
    enc = tokenizer(list(titles), truncation=True, max_length=max_length, padding="max_length",
                    return_offsets_mapping=True, return_special_tokens_mask=True, return_tensors="np")
    real = (enc["attention_mask"] == 1) & (enc["special_tokens_mask"] == 0)  # (N, L)
    out = np.empty(real.shape, dtype=np.int64)
    for i, (title, ents) in enumerate(zip(titles, entities)):
        out[i] = bio_tags(entity_spans(str(title), str(ents)), enc["offset_mapping"][i], real[i])
    return out
