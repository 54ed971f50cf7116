"""A WordPiece tokenizer learned from the dataset's own titles, for the tiny models.

Pre-trained checkpoints bring their tokenizer; the embedded default has none, so it learns
one from the titles it will encode and saves it as an ordinary Hugging Face tokenizer folder
beside the features.

The vocabulary is chosen here rather than by `tokenizers`' WordPiece trainer: that trainer
breaks ties between equally frequent merges in hash-map order, so the same titles gave a
different vocabulary on every run, and with it different embeddings for a seeded model. Ours
is the BERT normaliser and pre-tokeniser of `tokenizers`, then every character seen (as a
word start and as a `##` continuation, so no word is ever unknown), then whole words by
descending frequency with ties broken alphabetically. Encoding is the `tokenizers` WordPiece
model (greedy longest match), exactly as for a pre-trained BERT.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def learn_vocabulary(titles: Sequence[str], vocab_size: int) -> list[str]:
    """Special tokens, all characters (bare and `##`), then the most frequent words."""
    from tokenizers.normalizers import BertNormalizer
    from tokenizers.pre_tokenizers import BertPreTokenizer

    from extractors.encoded import title_chars

    normalizer = BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=True, lowercase=True)
    pre = BertPreTokenizer()
    words: Counter[str] = Counter()
    limit = title_chars(512)  # what an extractor would tokenise of it at most
    for title in titles:
        words.update(w for w, _ in pre.pre_tokenize_str(normalizer.normalize_str(str(title)[:limit])))
    chars = sorted({c for w in words for c in w})
    vocab = SPECIAL_TOKENS + chars + [f"##{c}" for c in chars]
    room = max(vocab_size - len(vocab), 0)
    taken = set(vocab)
    ranked = sorted(words.items(), key=lambda kv: (-kv[1], kv[0]))
    vocab += [w for w, _ in ranked if w not in taken][:room]
    return vocab


def train_wordpiece(titles: Sequence[str], vocab_size: int = 4000, out_dir: str | Path | None = None):
    """A lower-casing BERT WordPiece tokenizer over `titles`; saved to `out_dir` when given."""
    from tokenizers import BertWordPieceTokenizer
    from transformers import BertTokenizerFast

    vocab = learn_vocabulary(titles, vocab_size)
    wordpiece = BertWordPieceTokenizer(
        vocab={t: i for i, t in enumerate(vocab)}, lowercase=True, strip_accents=True, clean_text=True
    )
    tokenizer = BertTokenizerFast(
        tokenizer_object=wordpiece._tokenizer,
        do_lower_case=True,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )
    if out_dir is not None:
        tokenizer.save_pretrained(str(out_dir))
    return tokenizer


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def tiny_tokenizer(titles: Sequence[str] | None, workdir: str | Path | None):
    """The tiny models' tokenizer: loaded from `workdir/tokenizer` when saved there, else
    learned from `titles` (and saved there when `workdir` is given)."""
    from storage.errors import PipelineError

    saved = Path(workdir) / "tokenizer" if workdir is not None else None
    if saved is not None and (saved / "tokenizer.json").is_file():
        return load_tokenizer(saved)
    if not titles:
        raise PipelineError("the tiny models learn their tokenizer from the dataset's titles, but none were given")
    if saved is not None:
        saved.mkdir(parents=True, exist_ok=True)
    return train_wordpiece(titles, out_dir=saved)
