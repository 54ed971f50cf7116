"""Every news of a dataset once: the union of its splits' news.tsv, with its cover images.

MIND repeats a news item in every split whose behaviors mention it; extraction encodes each
news once, so feature stores are keyed by this catalogue (rows sorted by news id) and
fingerprinted by it. The fingerprint covers the text fields and the image files' names and
sizes, so a store made before the data changed is recognised as stale.
Letters: N news.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from storage.errors import PipelineError
from storage.mind import News, read_news

SPLITS = ("train", "dev", "test")


@dataclass(frozen=True, eq=False)
class Catalogue:
    """The dataset's distinct news (N rows, sorted by id) and where their images are."""

    name: str
    root: Path
    ids: np.ndarray  # (N,) object str, sorted
    index: dict[str, int]
    category: np.ndarray  # (N,) object str
    subcategory: np.ndarray  # (N,) object str
    title: np.ndarray  # (N,) object str
    abstract: np.ndarray  # (N,) object str
    title_entities: np.ndarray  # (N,) object str, raw JSON
    image_dir: Path | None
    images: frozenset[str]  # ids with a file `<image_dir>/<id>.jpg`
    image_sizes: tuple[tuple[str, int], ...]  # (file name, bytes), sorted, for the fingerprint

    def __len__(self) -> int:
        return len(self.ids)

    def image_path(self, i: int) -> Path | None:
        news_id = self.ids[i]
        return self.image_dir / f"{news_id}.jpg" if news_id in self.images else None

    def fingerprint(self) -> str:
        """sha256 over the text fields and the image names and sizes; computed once (the
        catalogue is immutable), since every store lookup and run record asks for it."""
        if "_fingerprint" not in self.__dict__:
            object.__setattr__(self, "_fingerprint", self._digest())
        return self.__dict__["_fingerprint"]

    def _digest(self) -> str:
        digest = hashlib.sha256(b"mmnews-catalogue-v1\n")
        for row in zip(self.ids, self.category, self.subcategory, self.title, self.abstract):
            digest.update("\t".join(row).encode("utf-8") + b"\n")
        digest.update(b"images\n")
        for name, size in self.image_sizes:
            digest.update(f"{name}\t{size}\n".encode())
        return digest.hexdigest()


def load_catalogue(data_dir: str | Path, image_dir: str | Path | None = None, name: str | None = None) -> Catalogue:
    """Read the news of every split folder under `data_dir` (train/, dev/, test/, or the folder
    itself when it holds news.tsv). Images default to `<data_dir>/images` when it exists."""
    root = Path(data_dir).expanduser().resolve()
    if not root.is_dir():
        raise PipelineError(
            f"data folder {root} does not exist; pass --data with a MIND folder (train/ dev/ test/ with news.tsv and "
            "behaviors.tsv), or leave --data out to use the synthetic world"
        )
    files = [root / s / "news.tsv" for s in SPLITS if (root / s / "news.tsv").is_file()]
    if not files and (root / "news.tsv").is_file():
        files = [root / "news.tsv"]
    if not files:
        raise PipelineError(f"{root} holds no news.tsv (looked in {', '.join(SPLITS)} and the folder itself)")
    tables = [read_news(f) for f in files]
    rows: dict[str, tuple[News, int]] = {}
    for table in tables:
        for i, news_id in enumerate(table.ids):
            rows.setdefault(news_id, (table, i))
    ids = np.array(sorted(rows), dtype=object)

    def column(field: str) -> np.ndarray:
        return np.array([getattr(rows[n][0], field)[rows[n][1]] for n in ids], dtype=object)

    images_root = Path(image_dir).expanduser().resolve() if image_dir else root / "images"
    if image_dir and not images_root.is_dir():
        raise PipelineError(f"image folder {images_root} does not exist; pass --images with the IM-MIND folder of <news_id>.jpg files")
    sizes: list[tuple[str, int]] = []
    if images_root.is_dir():
        with os.scandir(images_root) as entries:
            sizes = sorted((e.name, e.stat().st_size) for e in entries if e.name.endswith(".jpg") and e.is_file())
    known = set(rows)
    with_image = frozenset(n[: -len(".jpg")] for n, _ in sizes) & known
    return Catalogue(
        name=name or root.name,
        root=root,
        ids=ids,
        index={n: i for i, n in enumerate(ids)},
        category=column("category"),
        subcategory=column("subcategory"),
        title=column("title"),
        abstract=column("abstract"),
        title_entities=column("title_entities"),
        image_dir=images_root if images_root.is_dir() else None,
        images=with_image,
        image_sizes=tuple(sizes),
    )
