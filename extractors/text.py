"""`bert`: Hugging Face text encoders over news titles.

BERT, DistilBERT, RoBERTa, XLM-RoBERTa, DeBERTa, ELECTRA, MPNet, ALBERT, ModernBERT, and the
sentence encoders built on them (MiniLM, E5, GTE, BGE in sentence-transformers' layout).
`bert:tiny` is a 2-layer BERT with seeded random weights and a tokenizer learned from the
dataset's titles; `bert:NAME` or `bert:/local/dir` loads a pre-trained encoder and its
tokenizer from the folder extractors.checkpoints resolved.

Pooling: `cls` (the first token, [CLS] or <s>), `mean` (over real tokens), or `model`: the
checkpoint's own sentence pooling from sentence-transformers' `1_Pooling/config.json`, then
L2-normalised when its modules.json says so, exactly as sentence-transformers encodes. A
checkpoint with that pooling uses it by default; others default to `cls`.
Letters: B batch, L tokens, D width, K pooling modes.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from extractors.checkpoints import Checkpoint, ensure_available, load_or_explain
from extractors.config import ExtractorConfig
from extractors.encoded import Encoded, pool, prepare_titles, sentence_pool, set_trainable, tokenize_titles
from extractors.families import SentencePooling
from extractors.tokenizer import tiny_tokenizer

TINY_TEXT = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)


class TextExtractor(nn.Module):
    """Titles -> pooled vectors (B, D), and token vectors (B, L, Dt) with their mask on request.

    D is the hidden width Dt, or K * Dt for `model` pooling over K sentence-transformers modes."""

    modality = "text"

    def __init__(self, config: ExtractorConfig, model: nn.Module, tokenizer, sentence: SentencePooling | None = None):
        super().__init__()
        if config.pooling == "model" and sentence is None:
            raise ValueError(f"{config.spec}: pooling 'model' needs the checkpoint's sentence-transformers pooling")
        self.config = config
        self.model = model
        self.tokenizer = tokenizer
        self.sentence = sentence if config.pooling == "model" else None
        self.token_dim = int(getattr(model.config, "hidden_size", 0) or model.config.dim)
        self.dim = self.token_dim * (len(self.sentence.modes) if self.sentence else 1)
        self.num_tokens = int(config.max_length)
        self.set_trainable(False)

    def set_trainable(self, trainable: bool) -> None:
        set_trainable(self, trainable)

    def prepare_titles(self, titles: Sequence[object]) -> list[str]:
        """The text the tokenizer is given (cut to a sane length; lower-cased where the checkpoint asks)."""
        return prepare_titles(titles, self.config.max_length, bool(self.sentence and self.sentence.lowercase))

    def tokenize(self, titles: Sequence[str]) -> dict[str, torch.Tensor]:
        return tokenize_titles(self.tokenizer, self.prepare_titles(titles), self.config.max_length)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, return_tokens: bool = False) -> Encoded:
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, L, Dt)
        mask = attention_mask.bool()  # (B, L)
        if self.sentence is not None:
            vectors = sentence_pool(hidden, mask, self.sentence.modes, self.sentence.normalize)  # (B, K*Dt)
        else:
            vectors = pool(hidden, mask, self.config.pooling)  # (B, Dt)
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


def max_length_for(ckpt: Checkpoint, model: nn.Module, asked: int) -> int:
    """`asked`, capped by the model's positions and sentence-transformers' max_seq_length."""
    limits = [asked, int(getattr(model.config, "max_position_embeddings", asked) or asked)]
    if ckpt.sentence is not None and ckpt.sentence.max_seq_length:
        limits.append(ckpt.sentence.max_seq_length)
    return min(limits)


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
    """Build `bert:CHECKPOINT`; `pooling` None is the checkpoint's default (see the module).

    `tiny` needs the titles (its tokenizer is learned from them) and saves that tokenizer under
    `workdir/tokenizer` when given, reusing it when present."""
    from dataclasses import replace

    ckpt = ensure_available("bert", checkpoint, pooling)
    config = ckpt.extractor_config("text", max_length=max_length, seed=seed)
    if ckpt.is_tiny:
        tokenizer = tiny_tokenizer(titles, workdir)
        model = build_tiny_text_model(len(tokenizer), max_length, seed, tokenizer.pad_token_id)
        return TextExtractor(config, model, tokenizer)

    from extractors.hf import load_text_encoder, load_tokenizer

    tokenizer = load_or_explain(ckpt, "loading the tokenizer", lambda: load_tokenizer(ckpt.model_path))
    model = load_or_explain(ckpt, "loading the encoder", lambda: load_text_encoder(ckpt.model_path))
    config = replace(config, max_length=max_length_for(ckpt, model, max_length))
    return TextExtractor(config, model, tokenizer, ckpt.sentence)
