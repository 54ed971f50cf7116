"""Masked-language modelling for the tiny BERT, on the train split's titles and abstracts.

BERT's own recipe at a tiny scale: a WordPiece vocabulary learned from the corpus
(extractors.tokenizer), the tiny architecture of extractors.text (`TINY_TEXT`), 15% of the
real tokens chosen per sequence (at least one), of which 80% become [MASK], 10% a random
token and 10% stay; cross-entropy on the chosen positions only, through BERT's MLM head
(tied to the word embeddings). No next-sentence task: [CLS] is never trained, so the
checkpoint expects mean pooling, and says so the way sentence-transformers models do
(`modules.json` + `1_Pooling/config.json` with `pooling_mode_mean_tokens: true`).

Saved as a Hugging Face BERT folder (`config.json`, `model.safetensors` holding a
`BertModel` with its pooler, the tokenizer files), loadable by `AutoModel` /
`AutoTokenizer` and so by `bert:DIR`. The pooler is the seeded initial one: nothing trains
it, and nothing in this project reads it; it is there so that `AutoModel` finds every weight
it expects and initialises nothing at load time.
Letters: B batch, L tokens, V vocabulary, D width, K masked positions in the batch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from extractors.pretraining.corpus import Corpus
from extractors.pretraining.loop import PretrainConfig, require
from extractors.text import TINY_TEXT
from extractors.tokenizer import train_wordpiece


@dataclass(frozen=True)
class BertPretrainConfig(PretrainConfig):
    steps: int = 500
    batch_size: int = 128
    epochs: float = 26.0  # the small world's 2,549 train news: the 500 steps; the tiny world's 260: 53
    lr: float = 2e-3
    warmup_steps: int = 40
    mask_prob: float = 0.15
    max_length: int = 64  # corpus sequences (abstracts) are cut here; titles are shorter
    vocab_size: int = 4000
    extract_max_length: int = 32  # what the saved tokenizer and sentence-transformers config advertise for titles

    def check(self) -> None:
        super().check()
        require(self, 0 < self.mask_prob < 1 and self.max_length >= 8 and self.vocab_size >= 100,
                 "mask_prob in (0, 1), max_length >= 8, vocab_size >= 100")


class MaskedLanguageModel:
    """The MLM objective over a tokenised corpus; `model` is a `BertForMaskedLM`."""

    def __init__(self, corpus: Corpus, config: BertPretrainConfig, seed: int):
        from transformers import BertConfig, BertForMaskedLM

        self.config = config
        texts = corpus.texts()
        self.tokenizer = train_wordpiece(texts, vocab_size=config.vocab_size)
        self.tokenizer.model_max_length = config.extract_max_length
        encoded = self.tokenizer(texts, truncation=True, max_length=config.max_length)["input_ids"]
        self.sequences = [torch.tensor(ids, dtype=torch.long) for ids in encoded]
        self.lengths = torch.tensor([len(s) for s in self.sequences])  # (N,)
        self.pad_id = int(self.tokenizer.pad_token_id)
        self.mask_id = int(self.tokenizer.mask_token_id)
        self.special = torch.tensor(sorted(set(self.tokenizer.all_special_ids)), dtype=torch.long)
        self.first_plain = int(self.special.max()) + 1  # special tokens come first in the vocabulary
        self.bert_config = BertConfig(
            vocab_size=len(self.tokenizer), max_position_embeddings=max(config.max_length, 64),
            pad_token_id=self.pad_id, **TINY_TEXT,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.model = BertForMaskedLM(self.bert_config)
        self.seed = seed

    def batch(self, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(input_ids (B, L) with masks applied, attention (B, L), positions (K, 2), targets (K,))."""
        cfg = self.config
        rows = length_batch(self.lengths, cfg.batch_size, generator)
        width = int(self.lengths[rows].max())
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)  # (B, L)
        for r, i in enumerate(rows):
            ids[r, : len(self.sequences[i])] = self.sequences[i]
        real = ~torch.isin(ids, self.special)  # (B, L) maskable: no [CLS], [SEP], [PAD]
        chosen = (torch.rand(ids.shape, generator=generator) < cfg.mask_prob) & real  # (B, L)
        # At least one target per sequence: a short title could otherwise teach nothing.
        none = ~chosen.any(1) & real.any(1)
        if none.any():
            score = torch.rand(ids.shape, generator=generator).masked_fill(~real, -1.0)
            pick = score.argmax(1)
            chosen[none.nonzero()[:, 0], pick[none]] = True
        targets = ids[chosen]  # (K,)
        how = torch.rand(targets.shape, generator=generator)
        replaced = targets.clone()
        replaced[how < 0.8] = self.mask_id
        random_ids = torch.randint(self.first_plain, len(self.tokenizer), targets.shape, generator=generator)
        swap = (how >= 0.8) & (how < 0.9)
        replaced[swap] = random_ids[swap]
        inputs = ids.clone()
        inputs[chosen] = replaced
        return inputs, (ids != self.pad_id).long(), chosen.nonzero(), targets

    def loss(self, generator: torch.Generator) -> torch.Tensor:
        inputs, attention, positions, targets = self.batch(generator)
        hidden = self.model.bert(input_ids=inputs, attention_mask=attention).last_hidden_state  # (B, L, D)
        picked = hidden[positions[:, 0], positions[:, 1]]  # (K, D): the head runs on targets only
        logits = self.model.cls(picked)  # (K, V)
        return nn.functional.cross_entropy(logits, targets)

    def encoder(self) -> nn.Module:
        """A `BertModel` (with pooler) holding the trained encoder: what `AutoModel` loads."""
        from transformers import BertModel

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            model = BertModel(self.bert_config, add_pooling_layer=True)
        missing, unexpected = model.load_state_dict(self.model.bert.state_dict(), strict=False)
        if unexpected or any(not k.startswith("pooler.") for k in missing):
            raise RuntimeError(f"BERT encoder weights do not line up: missing {missing}, unexpected {unexpected}")
        return model.eval()

    def save(self, folder: Path) -> None:
        self.encoder().save_pretrained(str(folder))
        self.tokenizer.save_pretrained(str(folder))
        write_sentence_transformers_files(folder, self.bert_config.hidden_size, self.config.extract_max_length)

    def card(self) -> dict[str, Any]:
        return {
            "load_with": "bert:DIR",
            "pooling": "mean",
            "objective": "masked language modelling (15% of tokens: 80% [MASK], 10% random, 10% kept) on the "
                         "train split's titles and abstracts",
            "corpus_sequences": len(self.sequences),
            "vocabulary": len(self.tokenizer),
        }


def length_batch(lengths: torch.Tensor, size: int, generator: torch.Generator, jitter: float = 4.0) -> list[int]:
    """`size` random rows of similar length: a random window of the rows sorted by a jittered
    length. Titles and abstracts differ 2-3x in length, so random batches were mostly padding;
    the jitter (in tokens) keeps the windows from always grouping the same rows."""
    n = len(lengths)
    if n <= size:
        return torch.randperm(n, generator=generator).tolist()
    key = lengths.float() + jitter * torch.rand(n, generator=generator)  # (N,)
    order = torch.argsort(key)
    start = int(torch.randint(0, n - size + 1, (1,), generator=generator))
    return order[start : start + size].tolist()


def write_sentence_transformers_files(folder: Path, width: int, max_seq_length: int) -> None:
    """The sentence-transformers description of a mean-pooled encoder (as all-MiniLM-L6-v2's)."""
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    pooling = {
        "word_embedding_dimension": width,
        "pooling_mode_cls_token": False,
        "pooling_mode_mean_tokens": True,
        "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False,
    }
    (folder / "1_Pooling").mkdir(exist_ok=True)
    (folder / "modules.json").write_text(json.dumps(modules, indent=2) + "\n", encoding="utf-8")
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(pooling, indent=2) + "\n", encoding="utf-8")
    (folder / "sentence_bert_config.json").write_text(
        json.dumps({"max_seq_length": max_seq_length, "do_lower_case": False}, indent=2) + "\n", encoding="utf-8"
    )
