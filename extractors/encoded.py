"""What every extractor returns for a batch, the poolings that make a vector of tokens, and
the titles every tokenizer is given.

Letters: B batch, L tokens (or patches), D width, K pooling modes.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch


@dataclass
class Encoded:
    """Pooled vectors, and on request the token vectors with their mask."""

    vectors: torch.Tensor  # (B, D)
    tokens: torch.Tensor | None = None  # (B, L, D)
    mask: torch.Tensor | None = None  # (B, L) bool, True = real token
    extras: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> (B, E): BLIP's image_embeds, text_embeds


def pool(hidden: torch.Tensor, mask: torch.Tensor, how: str) -> torch.Tensor:
    """`cls`: the first position; `mean`: the mean over unmasked positions."""
    if how == "cls":
        return hidden[:, 0]  # (B, D)
    if how == "mean":
        weights = mask.to(hidden.dtype).unsqueeze(-1)  # (B, L, 1)
        return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)  # (B, D)
    raise ValueError(f"unknown pooling {how!r}; known: cls, mean")


def sentence_pool(hidden: torch.Tensor, mask: torch.Tensor, modes: Sequence[str], normalize: bool) -> torch.Tensor:
    """sentence-transformers' pooling: each mode of `modes` (cls, max, mean, mean_sqrt_len,
    weightedmean, lasttoken), concatenated in that order, then L2-normalised when asked. (B, K*D)"""
    weights = mask.to(hidden.dtype).unsqueeze(-1)  # (B, L, 1)
    count = weights.sum(1).clamp_min(1e-9)  # (B, 1)
    out = []
    for mode in modes:
        if mode == "cls":
            out.append(hidden[:, 0])
        elif mode == "max":
            out.append(hidden.masked_fill(~mask.unsqueeze(-1), torch.finfo(hidden.dtype).min).amax(1))
        elif mode == "mean":
            out.append((hidden * weights).sum(1) / count)
        elif mode == "mean_sqrt_len":
            out.append((hidden * weights).sum(1) / count.sqrt())
        elif mode == "weightedmean":
            position = torch.arange(1, hidden.shape[1] + 1, device=hidden.device, dtype=hidden.dtype)  # (L,)
            w = weights * position.view(1, -1, 1)  # (B, L, 1)
            out.append((hidden * w).sum(1) / w.sum(1).clamp_min(1e-9))
        elif mode == "lasttoken":
            position = torch.arange(hidden.shape[1], device=hidden.device)  # (L,)
            last = (mask.long() * position).argmax(1)  # (B,) the last real token, whichever side was padded
            out.append(hidden[torch.arange(hidden.shape[0], device=hidden.device), last])
        else:
            raise ValueError(f"unknown sentence-transformers pooling {mode!r}")
    vectors = torch.cat(out, dim=-1)  # (B, K*D)
    return torch.nn.functional.normalize(vectors, dim=-1) if normalize else vectors


def title_chars(max_length: int) -> int:
    """The most characters of a title (or abstract) handed to a tokenizer that keeps
    `max_length` tokens: 16 characters per kept token (an English WordPiece or BPE token
    averages about 4), at least 2048, so a real title never loses a token it would have kept,
    and a 50 MB title no longer costs 9 GB of tokenizer memory."""
    return max(2048, 16 * int(max_length))


def prepare_titles(titles: Iterable[object], max_length: int, lowercase: bool = False) -> list[str]:
    """What every tokenizer is given: each title as str, cut to `title_chars(max_length)`,
    lower-cased when the checkpoint asks (sentence-transformers' do_lower_case)."""
    limit = title_chars(max_length)
    out = [str(t)[:limit] for t in titles]
    return [t.lower() for t in out] if lowercase else out


def set_trainable(extractor: torch.nn.Module, trainable: bool) -> None:
    """Frozen = evaluation mode and no gradients; trainable = training mode with gradients."""
    extractor.trainable = trainable
    extractor.model.requires_grad_(trainable)
    extractor.train(trainable)


def tokenize_titles(tokenizer, titles, max_length: int) -> dict[str, torch.Tensor]:
    """Pads to the longest title of this batch (dynamic padding), truncates at max_length.
    `titles` have been through `prepare_titles`."""
    batch = tokenizer(list(titles), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
