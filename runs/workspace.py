"""A workspace: what one process has loaded, handed out again instead of loaded again.

Every flow makes one `Workspace` for its run and passes it to its work. It loads each
dataset's catalogue once (every split's news.tsv parsed once, the catalogue fingerprinted
once) and each split's behaviors once, and it resolves each feature store once: `store()` is
the one "find or extract this store" of the project (flows.extract, flows.rank,
flows.compare and the torchrun entry all use it). It finds a complete store without building
the extractor (loading a real checkpoint takes seconds to minutes), and extracts only on a
miss; `features()` then reads each store once, pooled vectors and token vectors only when
asked for.

Keys are resolved paths and settings; the objects handed out are shared and must be treated
as read-only. A workspace lives as long as its run: a later run in the same process (a test
suite, a worker) makes a new one and sees files changed in between. Safe for the threads
of one run: each item is loaded by the first thread that asks; the others wait for it.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from storage.errors import PipelineError
from storage.paths import subdir

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class StoreRef:
    """A complete feature store found or made for a catalogue: what run records keep of it."""

    path: Path
    extractor: str  # NAME:CHECKPOINT
    mode: str  # frozen | finetuned
    token_len: int | None = None
    extracted: dict | None = None  # the extraction's summary row when this run extracted it
    details: dict = field(default_factory=dict)  # e.g. a fine-tuned store's weights digest

    def record(self) -> dict:
        """The run.json entry of this store."""
        return {"path": str(self.path), "extractor": self.extractor, "mode": self.mode, **self.details}


@dataclass(frozen=True)
class ExtractOptions:
    """How a missing frozen store is extracted (flows.extract's options; its defaults elsewhere)."""

    device: str = "auto"
    batch_size: int = 64
    workers: int | None = None
    crop: str = "card"
    missing: str = "card"
    pooling: str | None = None  # None: the checkpoint's own
    tokens: bool = True
    dtype: str = "float16"
    chunk_rows: int = 1024
    progress: bool = True


class Workspace:
    """Catalogues, splits, stores and features of one run, each loaded once."""

    def __init__(self, storage: str | Path | None = None):
        self.storage = storage
        self.loads: Counter[str] = Counter()  # what was actually loaded, by kind
        self._items: dict[Hashable, Any] = {}
        self._locks: dict[Hashable, threading.Lock] = {}
        self._guard = threading.Lock()

    def _once(self, key: Hashable, load: Callable[[], T]) -> T:
        """`load()` the first time `key` is asked for; its result every time after."""
        with self._guard:
            if key in self._items:
                return self._items[key]
            lock = self._locks.setdefault(key, threading.Lock())
        with lock:
            with self._guard:
                if key in self._items:
                    return self._items[key]
            value = load()
            with self._guard:
                self._items[key] = value
                self.loads[key[0] if isinstance(key, tuple) else str(key)] += 1
            return value

    # -- data -----------------------------------------------------------------------------
    def data_dir(self, data: str | Path | None, scale: str = "small", world_seed: int = 0) -> Path:
        """`data`, or the synthetic world `<storage>/data/synthetic-<scale>-seed<world_seed>`
        (generated on first use)."""
        if data is not None:
            return Path(data).expanduser().resolve()

        def generate() -> Path:
            from storage.synthetic import generate_world

            out = subdir("data", self.storage) / f"synthetic-{scale}-seed{world_seed}"
            generate_world(out, scale=scale, seed=world_seed)
            return out

        return self._once(("world", scale, world_seed), generate)

    def catalogue(self, data: str | Path, images: str | Path | None = None, titles: str | Path | None = None):
        """The dataset's catalogue (with `titles`, the enhanced-titles catalogue over it)."""
        from storage.catalogue import load_catalogue, with_titles
        from storage.mind import read_titles

        root = Path(data).expanduser().resolve()
        pictures = Path(images).expanduser().resolve() if images is not None else None
        original = self._once(("catalogue", root, pictures), lambda: load_catalogue(root, pictures))
        if titles is None:
            return original
        source = Path(titles).expanduser().resolve()
        return self._once(("enhanced", root, pictures, source),
                          lambda: with_titles(original, read_titles(source, known=original.index), source))

    def impressions(self, data: str | Path, split: str, catalogue):
        """One split's impressions over `catalogue` (its behaviors.tsv read once)."""
        from rankers.data import load_impressions

        root = Path(data).expanduser().resolve()
        return self._once(("split", root, split, id(catalogue)), lambda: load_impressions(root, split, catalogue))

    def train_valid(self, data: str | Path, catalogue):
        """(train, valid): train without its last day, and that day (rankers.data.carve_validation)."""
        from rankers.data import carve_validation

        root = Path(data).expanduser().resolve()
        return self._once(("carve", root, id(catalogue)),
                          lambda: carve_validation(self.impressions(root, "train", catalogue)))

    def covers(self, catalogue, allow_no_images: bool = False) -> str | None:
        """For runs that read images: storage.catalogue.check_covers, logged once per catalogue.
        Raises when no news has a cover (unless allowed); returns the warning, if any."""
        from storage.catalogue import check_covers

        def check() -> str | None:
            warning = check_covers(catalogue, allow_no_images)
            if warning:
                log.warning("%s", warning)
            return warning

        return self._once(("covers", id(catalogue), allow_no_images), check)

    def cover_features(self, catalogue):
        """The `cover` role's NewsFeatures: (N, 1) 1.0 where the news has a cover image file,
        0.0 elsewhere; what a ranker knows of covers when it sees no image."""
        from rankers.data import NewsFeatures
        from rankers.fusion import COVER

        def flags():
            has = np.fromiter((n in catalogue.images for n in catalogue.ids), dtype=bool, count=len(catalogue))
            return NewsFeatures(name=COVER, modality="flag", vectors=has.astype(np.float32)[:, None],
                                present=np.ones(len(has), dtype=bool))

        return self._once(("cover", id(catalogue)), flags)

    # -- stores ---------------------------------------------------------------------------
    def features_dir(self) -> Path:
        return subdir("features", self.storage)

    def store(self, spec: str, catalogue, *, mode: str = "frozen", tokens: bool = False,
              options: ExtractOptions | None = None) -> StoreRef:
        """The complete store of extractor `spec` over `catalogue`: found, or (frozen only)
        extracted with `options`. A fine-tuned store must exist (flows.rank --finetune writes it)."""
        key = ("store", spec, mode, tokens, id(catalogue))
        spec = self.resolve(spec, catalogue)

        def resolve() -> StoreRef:
            found = find_store(spec, catalogue, self.features_dir(), tokens=tokens, mode=mode)
            if found is not None:
                log.info("using the complete store %s", found.path)
                return found
            if mode != "frozen":
                titles = f" --titles {catalogue.titles_file}" if catalogue.titles_file else ""
                raise PipelineError(
                    f"no fine-tuned store of {spec} for {catalogue.name} in {self.features_dir()}; fine-tune first "
                    f"(python -m flows.rank --finetune --features {spec}{titles}), which writes it")
            chosen = options or ExtractOptions()
            if tokens and not chosen.tokens:
                chosen = replace(chosen, tokens=True)
            return extract_store(spec, catalogue, self.features_dir(), chosen)

        return self._once(key, resolve)

    def resolve(self, spec: str, catalogue) -> str:
        """`NAME:pretrained` as the folder of its pre-trained model for this catalogue's data
        (runs.pretrain); any other spec as it is."""
        from runs.pretrain import is_pretrained, resolve_spec

        if not is_pretrained(spec):
            return spec
        images = catalogue.image_dir
        return self._once(("pretrained", spec, str(catalogue.root), str(images)),
                          lambda: resolve_spec(spec, catalogue.root, images, self.storage))

    def extract(self, spec: str, catalogue, options: ExtractOptions) -> StoreRef:
        """The frozen store of `spec` made with exactly `options` (extracted, resumed or reused
        by extractors.run); later `store()` lookups of it in this workspace get it at once."""
        unresolved = spec
        spec = self.resolve(spec, catalogue)
        ref = self._once(("extract", spec, options, id(catalogue)),
                         lambda: extract_store(spec, catalogue, self.features_dir(), options))
        with self._guard:
            for tokens in (False, True) if options.tokens else (False,):
                for name in {spec, unresolved}:
                    self._items.setdefault(("store", name, "frozen", tokens, id(catalogue)), ref)
        return ref

    def features(self, ref: StoreRef, catalogue, *, tokens: bool = False, name: str | None = None):
        """The store's NewsFeatures, rows aligned with `catalogue`, read once per (store, tokens)."""
        from rankers.data import load_features

        label = name or ref.extractor + ("@finetuned" if ref.mode == "finetuned" else "")
        return self._once(("features", str(ref.path), tokens, id(catalogue)),
                          lambda: load_features(ref.path, catalogue, name=label, tokens=tokens))


def find_store(spec: str, catalogue, features_dir: Path, *, tokens: bool = False,
               mode: str = "frozen") -> StoreRef | None:
    """The complete store of `spec` (of `mode`) for this catalogue, found without building the
    extractor, else None.

    Any complete store of that extractor and checkpoint over exactly these news serves,
    whatever preprocessing options `flows.extract` was given (run.json records the store);
    `tokens` asks for one that holds token vectors.
    """
    from extractors.registry import parse_spec
    from extractors.run import slug_of
    from storage.features import FeatureStore, store_path

    name, checkpoint = parse_spec(spec)
    path = store_path(features_dir, catalogue.name, slug_of(name, checkpoint), mode)
    if not path.is_file():
        return None
    try:
        with FeatureStore.open(path, expected_fingerprint=catalogue.fingerprint()) as store:
            meta = store.meta
            usable = (meta.extractor == name and meta.checkpoint == checkpoint and meta.mode == mode
                      and (meta.token_len is not None or not tokens) and np.array_equal(store.ids, catalogue.ids))
            tuned = meta.preprocess.get("finetune") or {}
            token_len = meta.token_len
    except PipelineError:
        return None  # incomplete, corrupt or stale: extraction decides what to do with it
    if not usable:
        return None
    details = {}
    if tuned:
        details = {"weights_sha256": tuned.get("weights_sha256"), "finetuned_with": tuned.get("fusion")}
    return StoreRef(path, f"{name}:{checkpoint}", mode, token_len, details=details)


# ----------------------------------------------------------------------------- extracting a store


def build_extractor(spec: str, catalogue, features_dir: Path, options: ExtractOptions):
    """The extractor of `spec` for this catalogue (tiny text models learn their tokenizer from
    its titles, saved beside the stores)."""
    from extractors.registry import create

    workdir = features_dir / f"{catalogue.name}__tokenizer-{catalogue.fingerprint()[:12]}"
    return create(spec, titles=[str(t) for t in catalogue.title], workdir=workdir, crop=options.crop,
                  missing=options.missing, pooling=options.pooling)


def extract_store(spec: str, catalogue, features_dir: Path, options: ExtractOptions, shard=None) -> StoreRef:
    """Fill (or resume, or reuse) the frozen store of `spec` over `catalogue`."""
    from extractors.run import default_workers, extract_catalogue

    extractor = build_extractor(spec, catalogue, features_dir, options)
    workers = default_workers(options.device, len(catalogue)) if options.workers is None else options.workers
    result = extract_catalogue(
        extractor, catalogue, features_dir, batch_size=options.batch_size, device=options.device,
        num_workers=workers, tokens=options.tokens, dtype=options.dtype, chunk_rows=options.chunk_rows,
        progress=options.progress, shard=shard,
    )
    row = summary_row(result, extractor.modality)
    return StoreRef(Path(result.path), result.spec, "frozen", result.token_len, extracted=row)


def summary_row(result, modality: str) -> dict:
    """One extraction (extractors.run.ExtractionResult) as a row of the printed summary."""
    return {
        "extractor": result.spec,
        "store": str(result.path),
        "rows": result.rows,
        "dim": result.dim,
        "token_len": result.token_len,
        "cached": result.cached,
        "resumed_from": result.resumed_from,
        "seconds": round(result.seconds, 3),
        "rows_per_s": round(result.rows_per_second, 1),
        "present": result.present,
        "images": dict(result.images),
        "corrupt_ids": result.corrupt_ids,
        "modality": modality,
        "note": getattr(result, "note", ""),
    }
