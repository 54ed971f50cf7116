"""Every news of a dataset once: the union of its splits' news.tsv, with its cover images.

MIND repeats a news item in every split whose behaviors mention it; extraction encodes each
news once, so feature stores are keyed by this catalogue (rows sorted by news id) and
fingerprinted by it. The fingerprint covers the text fields and each image file's name, size
and modification time (nanoseconds), so a store made before the data changed is recognised as
stale, a cover replaced by one of the same size included.

Why modification times and not the covers' contents: IM-MIND has 54,421 covers, about 3 GB;
hashing them would read all of it on every load of the catalogue (every run, every process:
about 5 s with a warm page cache on 2 cores, much longer from a cold disk), while a stat per
file costs about a quarter of a second. Any ordinary replacement (an editor, a new
download, `cp` or `unzip` of a changed file) gives the file a new mtime. What it misses: a
replacement that copies the old file's time along with different bytes of the same size
(`cp -p`, `rsync -a`, `touch -r`). What it costs: copying the images folder WITHOUT keeping
times (`cp -r` instead of `cp -a`/`rsync -a`) gives another fingerprint, so the feature
stores made before are seen as stale and extracted again.

Covers: `cover_share` is the share of news with a cover file. IM-MIND has one for 44% of
MIND-small's news (28,692 of 65,238) and about 34% of MIND-large's (54,421 of 161,013), and the
synthetic world draws 44% by default. `check_covers` refuses an image run where no news has a
cover (a wrong or empty `--images` folder, or a world generated with `--no-images`) unless
`allow_no_images`, and warns below MIN_COVER_SHARE (see there).

A titles file (GENRE's "enhanced titles", `load_catalogue(..., titles=FILE)` or
`with_titles`) replaces the titles the extractors and fine-tuning read. The catalogue then
has another fingerprint and another name, `<dataset>-enhanced-<8 hex of the titles>`, so its
feature stores and runs sit beside the original's instead of replacing them.
Letters: N news.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from storage.errors import PipelineError
from storage.mind import News, read_news, read_titles

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
    image_files: tuple[tuple[str, int, int], ...]  # (file name, bytes, mtime_ns), sorted, for the fingerprint
    titles_file: Path | None = None  # the enhanced titles that replaced the originals, if any
    titles_digest: str = ""  # sha256 of those titles (ids and texts)
    enhanced: int = 0  # news whose title the file replaced
    split_news: Mapping[str, News] = dataclasses.field(default_factory=dict)  # split -> its parsed news.tsv

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def cover_share(self) -> float:
        """The share of news with a cover file, in [0, 1] (0 for an empty catalogue)."""
        return len(self.images) / len(self.ids) if len(self.ids) else 0.0

    def image_path(self, i: int) -> Path | None:
        news_id = self.ids[i]
        return self.image_dir / f"{news_id}.jpg" if news_id in self.images else None

    def fingerprint(self) -> str:
        """sha256 over the text fields and the image names, sizes and mtimes; computed once (the
        catalogue is immutable), since every store lookup and run record asks for it."""
        if "_fingerprint" not in self.__dict__:
            object.__setattr__(self, "_fingerprint", self._digest())
        return self.__dict__["_fingerprint"]

    def _digest(self) -> str:
        digest = hashlib.sha256(b"mmnews-catalogue-v2\n")
        for row in zip(self.ids, self.category, self.subcategory, self.title, self.abstract):
            digest.update("\t".join(row).encode("utf-8") + b"\n")
        if self.titles_file is not None:  # even a file that changes no title makes another catalogue
            digest.update(f"enhanced titles\t{self.titles_digest}\n".encode())
        digest.update(b"images\n")
        for name, size, mtime_ns in self.image_files:
            digest.update(f"{name}\t{size}\t{mtime_ns}\n".encode())
        return digest.hexdigest()


def with_titles(catalogue: Catalogue, titles: Mapping[str, str], source: str | Path) -> Catalogue:
    """The catalogue with the titles of `titles` (news id -> title, e.g. from
    storage.mind.read_titles) in place of the originals; `source` is the file they came from."""
    unknown = [n for n in titles if n not in catalogue.index]
    if unknown:
        raise PipelineError(f"{source}: {len(unknown)} news ids are not in {catalogue.name}: "
                            f"{', '.join(unknown[:10])}{' ...' if len(unknown) > 10 else ''}")
    if catalogue.titles_file is not None:
        raise PipelineError(f"{catalogue.name} already has enhanced titles from {catalogue.titles_file}; "
                            "give one titles file")
    title = catalogue.title.copy()
    digest = hashlib.sha256(b"mmnews-titles-v1\n")
    for news_id in sorted(titles):
        title[catalogue.index[news_id]] = titles[news_id]
        digest.update(f"{news_id}\t{titles[news_id]}\n".encode())
    hexdigest = digest.hexdigest()
    return dataclasses.replace(catalogue, name=f"{catalogue.name}-enhanced-{hexdigest[:8]}", title=title,
                               titles_file=Path(source), titles_digest=hexdigest, enhanced=len(titles))


def load_catalogue(data_dir: str | Path, image_dir: str | Path | None = None, name: str | None = None,
                   titles: str | Path | None = None) -> Catalogue:
    """Read the news of every split folder under `data_dir` (train/, dev/, test/, or the folder
    itself when it holds news.tsv). Images default to `<data_dir>/images` when it exists.
    `titles`: a `news_id<TAB>title` file whose titles replace the originals (see `with_titles`)."""
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
    split_news = {f.parent.name: t for f, t in zip(files, tables) if f.parent != root}
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
    files: list[tuple[str, int, int]] = []
    if images_root.is_dir():
        with os.scandir(images_root) as entries:
            for entry in entries:
                if entry.name.endswith(".jpg") and entry.is_file():
                    stat = entry.stat()
                    files.append((entry.name, stat.st_size, stat.st_mtime_ns))
        files.sort()
    known = set(rows)
    with_image = frozenset(f[0][: -len(".jpg")] for f in files) & known
    catalogue = Catalogue(
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
        image_files=tuple(files),
        split_news=split_news,
    )
    if titles is None:
        return catalogue
    return with_titles(catalogue, read_titles(titles, known=catalogue.index), titles)


MIN_COVER_SHARE = 0.20
"""Below this share of news with a cover, an image run is warned. IM-MIND covers 44% of
MIND-small's news and about 34% of MIND-large's; under 20% more than two in five of the covers
a real MIND catalogue should have are absent (a partly unpacked or a sample images folder, files
named otherwise than <news_id>.jpg), while a complete IM-MIND folder never comes near it. A
synthetic world generated with a low --cover-rate is warned too; the text says so."""


def check_covers(catalogue: Catalogue, allow_no_images: bool = False) -> str | None:
    """For runs that use images: None when the cover share looks like a real one, a warning
    text when it is under MIN_COVER_SHARE, and PipelineError when no news has a cover (every
    image vector would come from a title-only card) unless `allow_no_images`, which turns that
    case into a warning as well."""
    share = catalogue.cover_share
    counted = f"{len(catalogue.images):,} of {len(catalogue):,} news ({share:.1%}) have a cover"
    if share >= MIN_COVER_SHARE:
        return None
    if catalogue.images:
        return (f"only {counted} in {catalogue.image_dir}; IM-MIND has one for 44% of MIND-small's news: check that "
                f"--images is the complete folder of <news_id>.jpg files (ignore this for a synthetic world "
                f"generated with a low --cover-rate)")
    where = _why_no_cover(catalogue)
    if allow_no_images:
        return (f"no news of {catalogue.name} has a cover: {where}; with --allow-no-images every image vector comes "
                "from a title-only card")
    raise PipelineError(f"no news of {catalogue.name} has a cover image: {where}; pass --images with the IM-MIND "
                        "folder of <news_id>.jpg files, or --allow-no-images to run on title-only cards (a synthetic "
                        "world generated with --no-images has no covers)")


def _why_no_cover(catalogue: Catalogue) -> str:
    """Where the covers were looked for and what was there instead."""
    if catalogue.image_dir is None:
        return f"there is no image folder ({catalogue.root / 'images'} does not exist)"
    names: list[str] = []
    count = 0
    with os.scandir(catalogue.image_dir) as entries:
        for entry in entries:
            count += 1
            if len(names) < 3:
                names.append(entry.name)
    if count == 0:
        return f"the image folder {catalogue.image_dir} is empty"
    jpgs = len(catalogue.image_files)
    return (f"the image folder {catalogue.image_dir} holds {count:,} entries ({jpgs:,} .jpg files) but none is "
            f"named <news_id>.jpg for a news of this dataset (e.g. {', '.join(sorted(names))})")
