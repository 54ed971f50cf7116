"""What every extractor returns for a batch, and the pooling that makes a vector of tokens.

Letters: B batch, L tokens (or patches), D width.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Encoded:
    """Pooled vectors, and on request the token vectors with their mask."""

    vectors: torch.Tensor  # (B, D)
    tokens: torch.Tensor | None = None  # (B, L, D)
    mask: torch.Tensor | None = None  # (B, L) bool, True = real token
    extras: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> (B, E), e.g. BLIP's unimodal embeddings


def pool(hidden: torch.Tensor, mask: torch.Tensor, how: str) -> torch.Tensor:
    """`cls`: the first position; `mean`: the mean over unmasked positions."""
    if how == "cls":
        return hidden[:, 0]  # (B, D)
    if how == "mean":
        weights = mask.to(hidden.dtype).unsqueeze(-1)  # (B, L, 1)
        return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)  # (B, D)
    raise ValueError(f"unknown pooling {how!r}; known: cls, mean")


def set_trainable(extractor: torch.nn.Module, trainable: bool) -> None:
    """Frozen = evaluation mode and no gradients; trainable = training mode with gradients."""
    extractor.trainable = trainable
    extractor.model.requires_grad_(trainable)
    extractor.train(trainable)


def tokenize_titles(tokenizer, titles, max_length: int) -> dict[str, torch.Tensor]:
    """Pads to the longest title of this batch (dynamic padding), truncates at max_length."""
    batch = tokenizer(list(titles), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
