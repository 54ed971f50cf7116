"""`bert`: any Hugging Face text encoder (BERT, DistilBERT, MiniLM...) over news titles.

`bert:tiny` is a 2-layer BERT with seeded random weights and a tokenizer learned from the
dataset's titles; `bert:NAME` or `bert:/local/dir` loads a pre-trained encoder and its tokenizer.
Letters: B batch, L tokens, D width.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from extractors.checkpoints import load_or_explain
from extractors.config import ExtractorConfig, default_pooling
from extractors.encoded import Encoded, pool, set_trainable, tokenize_titles
from extractors.tokenizer import tiny_tokenizer

TINY_TEXT = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)


class TextExtractor(nn.Module):
    """Titles -> pooled vectors (B, D), and token vectors (B, L, D) with their mask on request."""

    modality = "text"

    def __init__(self, config: ExtractorConfig, model: nn.Module, tokenizer):
        super().__init__()
        self.config = config
        self.model = model
        self.tokenizer = tokenizer
        self.dim = int(model.config.hidden_size)
        self.set_trainable(False)

    def set_trainable(self, trainable: bool) -> None:
        set_trainable(self, trainable)

    def tokenize(self, titles: Sequence[str]) -> dict[str, torch.Tensor]:
        return tokenize_titles(self.tokenizer, titles, self.config.max_length)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, return_tokens: bool = False) -> Encoded:
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, L, D)
        mask = attention_mask.bool()  # (B, L)
        vectors = pool(hidden, mask, self.config.pooling)  # (B, D)
        return Encoded(vectors, hidden if return_tokens else None, mask if return_tokens else None)

    @torch.inference_mode()
    def encode(self, titles: Sequence[str], return_tokens: bool = False) -> Encoded:
        """Frozen encoding of raw titles on the model's device."""
        device = next(self.model.parameters()).device
        batch = {k: v.to(device) for k, v in self.tokenize(titles).items()}
        return self(**batch, return_tokens=return_tokens)


def build_tiny_text_model(vocab_size: int, max_length: int, seed: int, pad_token_id: int) -> nn.Module:
    from transformers import BertConfig, BertModel

    config = BertConfig(
        vocab_size=vocab_size, max_position_embeddings=max(max_length, 64), pad_token_id=pad_token_id, **TINY_TEXT
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return BertModel(config, add_pooling_layer=False)


def create_bert(
    checkpoint: str = "tiny",
    *,
    titles: Sequence[str] | None = None,
    workdir: str | Path | None = None,
    pooling: str | None = None,
    max_length: int = 32,
    seed: int = 0,
    **_: object,
) -> TextExtractor:
    """Build `bert:CHECKPOINT`. `tiny` needs the titles (its tokenizer is learned from them)
    and saves that tokenizer under `workdir/tokenizer` when given, reusing it when present."""
    config = ExtractorConfig(
        name="bert", checkpoint=checkpoint, modality="text", pooling=default_pooling(checkpoint, pooling),
        max_length=max_length, seed=seed,
    )
    if config.is_tiny:
        tokenizer = tiny_tokenizer(titles, workdir)
        model = build_tiny_text_model(len(tokenizer), max_length, seed, tokenizer.pad_token_id)
        return TextExtractor(config, model, tokenizer)

    from transformers import AutoModel, AutoTokenizer

    tokenizer = load_or_explain("text", checkpoint, AutoTokenizer.from_pretrained)
    model = load_or_explain("text", checkpoint, AutoModel.from_pretrained)
    limit = getattr(model.config, "max_position_embeddings", max_length)
    config = replace(config, max_length=min(max_length, int(limit)))
    return TextExtractor(config, model, tokenizer)

