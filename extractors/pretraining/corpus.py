"""What the tiny encoders are pre-trained on: the train split's news, read without any label.

Pre-training sees only the inputs an extractor encodes, never a click, a topic or a style:
the texts (titles and abstracts) and the cards (the IM-MIND image of a news with a cover,
the title-only card IM-MIND shows for one without) of the news in `train/news.tsv`. Dev and
test news stay unseen, as a real encoder never saw the evaluation news either.

`digest` fingerprints exactly what a kind reads (texts; plus card file names and sizes for
the image kinds), so a pre-trained folder is recognised as stale when its data changed.
Letters: N news, S image height, W image width.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from storage.catalogue import load_catalogue
from storage.errors import PipelineError
from storage.mind import read_news


@dataclass(frozen=True, eq=False)
class Corpus:
    """The train split's news (N rows, file order) and where their cards are."""

    data_dir: Path
    ids: np.ndarray  # (N,) object str
    category: np.ndarray  # (N,) object str
    title: np.ndarray  # (N,) object str
    abstract: np.ndarray  # (N,) object str, "" where there is none
    image_paths: tuple[Path | None, ...]  # (N,) the card file, None for news without a cover

    def __len__(self) -> int:
        return len(self.ids)

    def texts(self) -> list[str]:
        """Titles, then the non-empty abstracts: the masked-language-modelling corpus."""
        return [str(t) for t in self.title] + [str(a) for a in self.abstract if str(a).strip()]

    def digest(self, images: bool) -> str:
        """sha256 over what a kind reads: ids, categories, titles, abstracts (and card names and sizes)."""
        h = hashlib.sha256(b"mmnews-pretrain-corpus-v1\n")
        for row in zip(self.ids, self.category, self.title, self.abstract):
            h.update("\t".join(row).encode("utf-8") + b"\n")
        if images:
            h.update(b"cards\n")
            for news_id, path in zip(self.ids, self.image_paths):
                if path is not None:
                    h.update(f"{news_id}\t{path.stat().st_size}\n".encode())
        return h.hexdigest()


def load_corpus(data_dir: str | Path, images_dir: str | Path | None = None) -> Corpus:
    """The news of `data_dir/train/news.tsv` (or `data_dir/news.tsv`), with the card of each
    news found in `images_dir` (default `data_dir/images`, as storage.catalogue)."""
    root = Path(data_dir).expanduser().resolve()
    path = next((p for p in (root / "train" / "news.tsv", root / "news.tsv") if p.is_file()), None)
    if path is None:
        raise PipelineError(
            f"{root} holds neither train/news.tsv nor news.tsv; pre-training reads the train split's news, "
            "pass --data with a MIND folder (train/ dev/ test/)"
        )
    news = read_news(path)
    if len(news.ids) == 0:
        raise PipelineError(f"{path} holds no news; pre-training needs the train split's titles")
    catalogue = load_catalogue(root, images_dir)
    image_dir = catalogue.image_dir
    paths = tuple(
        image_dir / f"{n}.jpg" if image_dir is not None and n in catalogue.images else None for n in news.ids
    )
    return Corpus(root, news.ids, news.category, _cut(news.title), _cut(news.abstract), paths)


def _cut(texts: np.ndarray) -> np.ndarray:
    """Texts cut as the extractors cut them before tokenising (extractors.encoded.title_chars at
    the longest sequence anything here keeps): a 50 MB title costs no tokenizer gigabytes."""
    from extractors.encoded import title_chars

    limit = title_chars(512)
    if not any(len(str(t)) > limit for t in texts):
        return texts
    return np.array([str(t)[:limit] for t in texts], dtype=object)


def card_pixels(corpus: Corpus, size: tuple[int, int], progress: bool = False) -> torch.Tensor:
    """Every news' card resized to `size` (S, W): uint8 (N, 3, S, W), decoded once.

    The extractors' own path (extractors.images.CardDataset, missing="card"): a news without
    a readable image gets the title-only card. Normalisation is left to the model.
    """
    from tqdm import tqdm

    from extractors.images import CardDataset, ImageTransform

    transform = ImageTransform(size=size, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), crop="card")
    data = CardDataset(corpus.image_paths, corpus.title, corpus.category, transform, missing="card", uint8=True)
    out = torch.empty(len(data), 3, *size, dtype=torch.uint8)
    for i in tqdm(range(len(data)), desc="cards", unit="img", disable=not progress):
        out[i] = data[i][0]
    return out
