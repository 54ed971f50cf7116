"""Impressions and news features as rankers consume them: everything indexed by catalogue row.

A split's behaviors index its own news.tsv; rankers need one index shared by every split
and every feature store, which is the dataset's catalogue (storage.catalogue: all news,
sorted by id). `Impressions` is a split's behaviors remapped to catalogue rows, and
`NewsFeatures` one store's arrays checked against the same catalogue.
Letters: M impressions, T candidate rows, N news, H history length, L tokens, D width,
E extra width.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from storage.catalogue import Catalogue
from storage.errors import PipelineError
from storage.features import FeatureStore
from storage.mind import Behaviors, News, load_split, read_behaviors

DAY = 86_400
HISTORY = 50  # NRMS / PLM-NR keep the most recent 50 clicks


@dataclass(frozen=True, eq=False)
class Impressions:
    """One split's impressions with news as catalogue rows. `labels` are -1 when unlabeled."""

    name: str
    impression_ids: np.ndarray  # (M,) int64
    user_ids: np.ndarray  # (M,) object str
    times: np.ndarray  # (M,) int64 unix seconds
    hist_offsets: np.ndarray  # (M+1,) int64
    hist_items: np.ndarray  # (sum h,) int64 catalogue rows, oldest first
    cand_offsets: np.ndarray  # (M+1,) int64
    cand_items: np.ndarray  # (T,) int64 catalogue rows
    labels: np.ndarray  # (T,) int8

    def __len__(self) -> int:
        return len(self.impression_ids)

    @property
    def labeled(self) -> bool:
        return bool(len(self.labels)) and bool((self.labels >= 0).all())

    @property
    def history_lengths(self) -> np.ndarray:
        return np.diff(self.hist_offsets)  # (M,)

    @property
    def candidate_counts(self) -> np.ndarray:
        return np.diff(self.cand_offsets)  # (M,)

    @property
    def row_impression(self) -> np.ndarray:
        """The impression of every candidate row: (T,) int64."""
        return np.repeat(np.arange(len(self)), self.candidate_counts)

    def histories(self, max_len: int = HISTORY) -> tuple[np.ndarray, np.ndarray]:
        """The most recent `max_len` clicks of every impression, oldest first, left-aligned:
        rows (M, H) int64 padded with 0, and mask (M, H) bool (True = a real click)."""
        lengths = np.minimum(self.history_lengths, max_len)  # (M,)
        width = max(int(lengths.max(initial=0)), 1)
        mask = np.arange(width)[None, :] < lengths[:, None]  # (M, H)
        # Position j of impression i holds click (end_i - len_i + j): the last len_i clicks.
        starts = self.hist_offsets[1:] - lengths  # (M,)
        take = (starts[:, None] + np.arange(width)[None, :])[mask]
        rows = np.zeros(mask.shape, dtype=np.int64)
        rows[mask] = self.hist_items[take]
        return rows, mask

    def select(self, keep: np.ndarray, name: str | None = None) -> Impressions:
        """The impressions where `keep` (M,) bool is True, in order."""
        keep = np.asarray(keep, dtype=bool)
        hist_idx, hist_off = _ragged_take(self.hist_offsets, keep)
        cand_idx, cand_off = _ragged_take(self.cand_offsets, keep)
        return Impressions(
            name=name or self.name,
            impression_ids=self.impression_ids[keep],
            user_ids=self.user_ids[keep],
            times=self.times[keep],
            hist_offsets=hist_off,
            hist_items=self.hist_items[hist_idx],
            cand_offsets=cand_off,
            cand_items=self.cand_items[cand_idx],
            labels=self.labels[cand_idx],
        )


def _ragged_take(offsets: np.ndarray, keep: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    lengths = np.diff(offsets)[keep]
    new_offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=new_offsets[1:])
    starts = offsets[:-1][keep]
    idx = np.repeat(starts - new_offsets[:-1], lengths) + np.arange(new_offsets[-1])
    return idx, new_offsets


def to_catalogue(behaviors: Behaviors, news: News, catalogue: Catalogue, name: str) -> Impressions:
    """Remap a split's news indices to catalogue rows."""
    try:
        rows = np.fromiter((catalogue.index[n] for n in news.ids), dtype=np.int64, count=len(news.ids))
    except KeyError as err:
        raise PipelineError(f"news {err.args[0]} of {news.path} is not in the catalogue of {catalogue.root}") from None
    return Impressions(
        name=name,
        impression_ids=behaviors.impression_ids,
        user_ids=behaviors.user_ids,
        times=behaviors.times,
        hist_offsets=behaviors.hist_offsets,
        hist_items=rows[behaviors.hist_items],
        cand_offsets=behaviors.cand_offsets,
        cand_items=rows[behaviors.cand_items],
        labels=behaviors.labels,
    )


def load_impressions(data_dir: str | Path, split: str, catalogue: Catalogue) -> Impressions:
    """`<data_dir>/<split>` as Impressions over the catalogue. The split's news.tsv is the one
    the catalogue already parsed (when it was read from this folder), so it is read once."""
    news = catalogue.split_news.get(split)
    folder = Path(data_dir) / split
    if news is None or Path(news.path).resolve() != (folder / "news.tsv").resolve():
        loaded = load_split(folder)
        return to_catalogue(loaded.behaviors, loaded.news, catalogue, split)
    behaviors = read_behaviors(folder / "behaviors.tsv", news.index)
    return to_catalogue(behaviors, news, catalogue, split)


def carve_validation(train: Impressions, days: int = 1) -> tuple[Impressions, Impressions]:
    """Split train by time: the impressions of its last `days` day(s) become the validation
    split that drives early stopping and model choice (dev is never trained or tuned on)."""
    if len(train) == 0:
        raise PipelineError("the train split has no impressions")
    day = train.times // DAY  # (M,)
    cut = day.max() - days + 1
    valid = day >= cut
    if valid.all() or not valid.any():
        raise PipelineError(
            f"cannot carve a validation split from the last {days} day(s) of train: train spans "
            f"{int(day.max() - day.min()) + 1} day(s)"
        )
    return train.select(~valid, "train"), train.select(valid, "valid")


@dataclass(frozen=True, eq=False)
class NewsFeatures:
    """One feature store, rows aligned with the catalogue.

    `tokens` from `load_features` is the store's own float16/float32 array as a lazy,
    copy-on-write np.memmap over the file (pages are read when touched; in-place writes stay
    private to the process): numpy indexing and `torch.from_numpy` work on it without a copy.
    """

    name: str
    modality: str  # text | image | multimodal
    vectors: np.ndarray  # (N, D) float32
    present: np.ndarray  # (N,) bool
    tokens: np.ndarray | None = None  # (N, L, Dt) float16 | float32, lazy (np.memmap) from a store
    mask: np.ndarray | None = None  # (N, L) bool
    extras: dict[str, np.ndarray] = field(default_factory=dict)  # name -> (N, E) float32, when asked

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])


def load_features(path: str | Path, catalogue: Catalogue, name: str | None = None, tokens: bool = True,
                  extras: bool = False) -> NewsFeatures:
    """Load a complete store made from this catalogue (checked by fingerprint and ids).

    tokens=False reads only the pooled vectors and `present`: no token byte is read, so a
    pooled ranker needs no more memory over a store with tokens than over one without.
    tokens=True maps the token vectors lazily (see NewsFeatures), after one streaming pass
    that verifies their checksums. extras=True also reads the store's extra vectors (BLIP's
    image_embeds and text_embeds) into `extras`; by default none is read. Every byte used
    is checked against the store's checksums.
    """
    with FeatureStore.open(path, expected_fingerprint=catalogue.fingerprint()) as store:
        arrays = store.load(tokens="lazy" if tokens else False, extras=extras)
        modality = store.meta.preprocess.get("modality", "text")
        extractor = store.meta.extractor
    if not np.array_equal(arrays.ids, catalogue.ids):
        raise PipelineError(f"{path}: its news ids are not the catalogue's; extract the features again")
    return NewsFeatures(
        name=name or extractor,
        modality=modality,
        vectors=arrays.vectors.astype(np.float32),
        present=arrays.present.astype(bool),
        tokens=arrays.tokens,
        mask=arrays.mask,
        extras={key: value.astype(np.float32) for key, value in arrays.extras.items()},
    )
