"""Frozen extraction of a whole news catalogue into one HDF5 feature store.

The store is the cache: a complete store whose metadata (extractor config, checkpoint,
dataset fingerprint) matches is returned untouched; an interrupted one is resumed from its
committed rows. Rows are processed in chunks in catalogue order (so the store's commit
counter means something); inside a chunk, titles are sorted by length and padded per batch,
which keeps padding waste small without giving up resumability. Images are decoded in
DataLoader workers into pinned memory and copied without blocking; on a GPU the model runs
under bf16 autocast. Letters: N news, B batch, L tokens, D width.

Sharded (`plan_sharded`, `extract_catalogue(..., shard=)`, `merge_sharded`): each worker
extracts one contiguous row range into its own store (storage/shards.py), then one merge
writes the usual store. Shard boundaries fall on chunk boundaries, so a shard forms the same
chunks and batches as a single process and the merged store holds the same bytes.
Disk failures surface as `StoreIOError` (or a plain OSError), the errors worth retrying.
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from extractors.images import CONVERTED, CORRUPT, MISSING, CardDataset
from storage.catalogue import Catalogue
from storage.errors import PipelineError
from storage.features import FeatureStore, FeatureWriter, StoreIOError, StoreMeta, store_path
from storage.shards import Shard, merge_shards, plan_shards, shard_problems

log = logging.getLogger(__name__)


@dataclass
class ExtractionResult:
    """What one extraction did, for the printed summary and the flow's artifact."""

    spec: str
    path: Path
    rows: int
    dim: int
    token_len: int | None
    cached: bool = False
    resumed_from: int = 0
    seconds: float = 0.0
    images: Counter = field(default_factory=Counter)  # read status -> count, rows done in this run
    corrupt_ids: list[str] = field(default_factory=list)
    present: int = 0
    shard: Shard | None = None  # set when this was one shard of a sharded extraction

    @property
    def rows_per_second(self) -> float:
        done = self.rows - self.resumed_from
        return done / self.seconds if self.seconds > 0 and not self.cached else 0.0


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise PipelineError("--device cuda was asked for, but torch sees no CUDA GPU here; use --device cpu or auto")
    return torch.device(device)


def spec_slug(extractor) -> str:
    """`bert` + checkpoint as a file-name part: different checkpoints get different stores."""
    return slug_of(extractor.config.name, extractor.config.checkpoint)


def slug_of(name: str, checkpoint: str) -> str:
    """The file-name part of extractor `name` with `checkpoint` (a local directory by its last part)."""
    checkpoint = Path(checkpoint).name or checkpoint
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{name}-{checkpoint}").strip("-")


def token_len(extractor) -> int:
    if extractor.modality == "image":
        return int(extractor.model.patch_embed.num_patches + extractor.model.num_prefix_tokens)
    return int(extractor.config.max_length)


def store_meta(extractor, catalogue: Catalogue, tokens: bool, dtype: str, mode: str = "frozen") -> StoreMeta:
    return StoreMeta(
        extractor=extractor.config.name,
        checkpoint=extractor.config.checkpoint,
        revision=extractor.config.revision or "",
        mode=mode,
        preprocess=extractor.config.to_dict(),
        fingerprint=catalogue.fingerprint(),
        dim=extractor.dim,
        dtype=dtype,
        token_len=token_len(extractor) if tokens else None,
    )


def chunk_size(batch_size: int, chunk_rows: int) -> int:
    """Rows per committed chunk: `chunk_rows` rounded down to whole batches (at least one).

    Chunks hold whole batches, so a resumed run (or a shard starting on a chunk boundary)
    forms exactly the batches an uninterrupted single run forms, and gives bit-identical
    vectors."""
    return max(1, chunk_rows // batch_size) * batch_size


def catalogue_store(extractor, catalogue: Catalogue, features_dir: Path) -> Path:
    """The store `extract_catalogue` fills for this extractor and catalogue."""
    return store_path(features_dir, catalogue.name, spec_slug(extractor), "frozen")


def extract_catalogue(
    extractor,
    catalogue: Catalogue,
    features_dir: Path,
    *,
    batch_size: int = 64,
    device: str = "auto",
    num_workers: int = 0,
    tokens: bool = True,
    dtype: str = "float16",
    chunk_rows: int = 1024,
    progress: bool = True,
    shard: Shard | None = None,
) -> ExtractionResult:
    """Encode every news of `catalogue` with `extractor` into its store; resume or reuse it.

    With `shard` (from `plan_sharded`, same batch_size and chunk_rows), only rows
    [shard.start, shard.stop) are encoded, into the shard's own store.
    """
    chunk_rows = chunk_size(batch_size, chunk_rows)
    meta = store_meta(extractor, catalogue, tokens, dtype)
    n = len(catalogue)
    spec = extractor.config.spec
    if shard is None:
        path, first, stop, attrs = catalogue_store(extractor, catalogue, features_dir), 0, n, None
    else:
        _check_shard(shard, n, chunk_rows)
        path, first, stop, attrs = shard.path, shard.start, shard.stop, shard.attrs(n)
    ids = catalogue.ids[first:stop]
    cached = _matching_store(path, meta, ids, shard, catalogue.ids)
    if cached is not None:
        return ExtractionResult(spec, path, stop - first, meta.dim, meta.token_len, cached=True, present=cached,
                                shard=shard)

    writer = _open_writer(path, meta, ids, attrs)
    try:
        result = ExtractionResult(spec, path, stop - first, meta.dim, meta.token_len, resumed_from=writer.next_row,
                                  shard=shard)
        dev = resolve_device(device)
        extractor.to(dev)
        started = time.perf_counter()
        start = first + writer.next_row  # catalogue row to resume from
        bar = _progress(progress, stop - first, writer.next_row, spec if shard is None else f"{spec} {shard.name}")
        try:
            if extractor.modality == "text":
                batches = _text_batches(extractor, catalogue, start, stop, batch_size, chunk_rows, dev)
            else:
                batches = _image_batches(extractor, catalogue, start, stop, batch_size, num_workers, dev, result)
            buffer = _ChunkBuffer(writer, first, chunk_rows, meta.token_len, meta.dim)
            for rows, encoded, present in batches:
                buffer.add(rows, encoded, present)
                bar.update(len(rows))
            buffer.close()
        finally:
            bar.close()
        result.seconds = time.perf_counter() - started
        writer.finalize()
    except BaseException:
        # Releases the store's lock, so a retry in this same process can resume the partial.
        writer.close()
        raise
    with FeatureStore.open(path, expected_fingerprint=meta.fingerprint) as store:
        result.present = int(store.present.sum())
    return result


def _check_shard(shard: Shard, rows: int, chunk_rows: int) -> None:
    aligned = shard.start % chunk_rows == 0 and (shard.stop % chunk_rows == 0 or shard.stop == rows)
    if not (0 <= shard.start <= shard.stop <= rows) or not aligned:
        raise PipelineError(
            f"{shard.describe()} does not lie on {chunk_rows}-row chunk boundaries of the {rows} rows; "
            f"plan the shards with the same batch size and chunk rows as the extraction (plan_sharded)")


@dataclass(frozen=True)
class ShardPlan:
    """A sharded extraction of one extractor: the final store, the meta every shard and the
    merged store must carry, and the shards (picklable, for workers elsewhere)."""

    spec: str
    path: Path
    meta: StoreMeta
    shards: tuple[Shard, ...]


def plan_sharded(
    extractor,
    catalogue: Catalogue,
    features_dir: Path,
    shards: int,
    *,
    batch_size: int = 64,
    chunk_rows: int = 1024,
    tokens: bool = True,
    dtype: str = "float16",
) -> ShardPlan:
    """Up to `shards` contiguous, chunk-aligned row ranges of the catalogue's store."""
    path = catalogue_store(extractor, catalogue, features_dir)
    planned = plan_shards(path, len(catalogue), shards, chunk_size(batch_size, chunk_rows))
    return ShardPlan(extractor.config.spec, path, store_meta(extractor, catalogue, tokens, dtype), tuple(planned))


def finished_store(plan: ShardPlan, catalogue: Catalogue) -> ExtractionResult | None:
    """The cached result when the plan's store is already complete and matching, else None."""
    present = _matching_store(plan.path, plan.meta, catalogue.ids)
    if present is None:
        return None
    return ExtractionResult(plan.spec, plan.path, len(catalogue), plan.meta.dim, plan.meta.token_len, cached=True,
                            present=present)


def merge_sharded(plan: ShardPlan, catalogue: Catalogue, *, remove_shards: bool = True) -> ExtractionResult:
    """Check every shard of `plan` and merge them into its store (reused when already there)."""
    done = finished_store(plan, catalogue)
    if done is not None:
        return done
    started = time.perf_counter()
    merge_shards(plan.path, plan.shards, plan.meta, catalogue.ids, remove=remove_shards)
    with FeatureStore.open(plan.path, expected_fingerprint=plan.meta.fingerprint) as store:
        present = int(store.present.sum())
    return ExtractionResult(plan.spec, plan.path, len(catalogue), plan.meta.dim, plan.meta.token_len,
                            seconds=time.perf_counter() - started, present=present)


def _matching_store(path: Path, meta: StoreMeta, ids: np.ndarray, shard: Shard | None = None,
                    all_ids: np.ndarray | None = None) -> int | None:
    """The present-row count of a complete store made with exactly this meta and ids (and,
    for a shard, recording exactly this shard), else None."""
    if not path.exists():
        return None
    try:
        with FeatureStore.open(path) as store:
            stale = store.meta.differences(meta) or not np.array_equal(store.ids, ids)
            if not stale and shard is not None:
                stale = bool(shard_problems(shard, store, meta, all_ids))
            if stale:
                log.info("%s was made with other settings or data; extracting again", path)
                return None
            return int(store.present.sum())
    except StoreIOError:
        raise
    except PipelineError as err:
        log.warning("%s is unusable (%s); extracting again", path, err)
        return None


def _open_writer(path: Path, meta: StoreMeta, ids: np.ndarray, attrs: dict | None = None) -> FeatureWriter:
    if path.exists():
        return FeatureWriter(path, meta, ids, restart=True, attrs=attrs)
    try:
        return FeatureWriter(path, meta, ids, attrs=attrs)
    except StoreIOError:
        raise
    except PipelineError as err:
        # The store's name is fixed by (dataset, extractor, checkpoint); a partial made with
        # other preprocessing (or, for a shard, another row range) is stale once the user asks
        # for new settings.
        log.warning("%s; discarding the interrupted extraction and starting over", err)
        return FeatureWriter(path, meta, ids, restart=True, attrs=attrs)


class _ChunkBuffer:
    """One chunk of rows being filled by batches (in any order inside the chunk), written to
    the store as soon as every row of it has arrived. Batches never straddle chunks.
    `first` is the catalogue row of the store's row 0 (a shard's start)."""

    def __init__(self, writer: FeatureWriter, first: int, chunk_rows: int, token_len: int | None, dim: int):
        self.writer, self.first, self.chunk_rows, self.token_len, self.dim = writer, first, chunk_rows, token_len, dim
        self._start_chunk()

    def _start_chunk(self) -> None:
        self.start = self.first + self.writer.next_row
        size = min(self.chunk_rows, self.writer.rows - self.writer.next_row)
        self.filled = 0
        self.vectors = np.zeros((size, self.dim), dtype=np.float32)  # (C, D)
        self.present = np.zeros(size, dtype=bool)  # (C,)
        if self.token_len is not None:
            self.tokens = np.zeros((size, self.token_len, self.dim), dtype=np.float32)  # (C, L, D)
            self.mask = np.zeros((size, self.token_len), dtype=bool)  # (C, L)

    def add(self, rows: np.ndarray, encoded, present: np.ndarray) -> None:
        at = rows - self.start  # (B,) positions inside the chunk
        if at.min() < 0 or at.max() >= len(self.vectors):
            raise RuntimeError(f"batch rows {rows.min()}..{rows.max()} fall outside the chunk starting at {self.start}")
        self.vectors[at] = encoded.vectors.float().cpu().numpy()
        self.present[at] = present
        if self.token_len is not None:
            tokens = encoded.tokens.float().cpu().numpy()  # (B, l, D)
            keep = min(tokens.shape[1], self.token_len)
            self.tokens[at, :keep] = tokens[:, :keep]
            self.mask[at, :keep] = encoded.mask[:, :keep].cpu().numpy()
        self.filled += len(rows)
        if self.filled == len(self.vectors):
            tokens = (self.tokens, self.mask) if self.token_len is not None else (None, None)
            self.writer.write(self.vectors, self.present, tokens=tokens[0], mask=tokens[1])
            if self.writer.next_row < self.writer.rows:
                self._start_chunk()

    def close(self) -> None:
        if self.writer.next_row != self.writer.rows:
            raise RuntimeError(f"extraction ended at row {self.writer.next_row} of {self.writer.rows}")


def _autocast(dev: torch.device):
    if dev.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _text_batches(extractor, catalogue: Catalogue, start: int, stop: int, batch_size: int, chunk_rows: int,
                  dev: torch.device):
    """Yield (rows, Encoded, present) for catalogue rows start..stop-1, titles sorted by
    length inside each chunk."""
    titles = [str(t) for t in catalogue.title[start:stop]]
    # Tokenised once, padded to max_length in the tokenizer's Rust code; each batch is then a
    # slice cut to its own longest title, so the loop below does no per-title Python work.
    encoded = extractor.tokenizer(
        titles, truncation=True, max_length=extractor.config.max_length, padding="max_length", return_tensors="np"
    )
    input_ids = encoded["input_ids"].astype(np.int64)  # (N', Lmax)
    attention = encoded["attention_mask"].astype(np.int64)  # (N', Lmax)
    lengths = attention.sum(1)  # (N',)
    for chunk_start in range(start, stop, chunk_rows):
        rows = np.arange(chunk_start, min(chunk_start + chunk_rows, stop))
        order = rows[np.argsort(lengths[rows - start], kind="stable")]
        for b in range(0, len(order), batch_size):
            batch_rows = order[b : b + batch_size]
            local = batch_rows - start
            width = int(lengths[local].max())
            with torch.inference_mode(), _autocast(dev):
                out = extractor(
                    torch.from_numpy(input_ids[local, :width]).to(dev, non_blocking=True),
                    torch.from_numpy(attention[local, :width]).to(dev, non_blocking=True),
                    return_tokens=True,
                )
            yield batch_rows, out, np.ones(len(batch_rows), dtype=bool)


class _IndexedCards(torch.utils.data.Dataset):
    def __init__(self, cards: CardDataset, start: int, stop: int):
        self.cards, self.start, self.stop = cards, start, stop

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, i: int):
        pixels, present, status = self.cards[self.start + i]
        return self.start + i, pixels, present, status


def _image_batches(extractor, catalogue: Catalogue, start: int, stop: int, batch_size: int, num_workers: int,
                   dev: torch.device, result: ExtractionResult):
    """Yield (rows, Encoded, present) for catalogue rows start..stop-1 in order; images decoded
    in workers."""
    cards = CardDataset(
        [catalogue.image_path(i) for i in range(len(catalogue))],
        [str(t) for t in catalogue.title],
        [str(c) for c in catalogue.category],
        extractor.transform,
        extractor.config.missing,
    )
    loader = torch.utils.data.DataLoader(
        _IndexedCards(cards, start, stop), batch_size=batch_size, shuffle=False, num_workers=num_workers,
        pin_memory=dev.type == "cuda", persistent_workers=False,
    )
    titles = catalogue.title
    for rows, pixels, present, statuses in loader:
        rows = rows.numpy()
        result.images.update(statuses)
        if CORRUPT in statuses:
            result.corrupt_ids += [str(catalogue.ids[r]) for r, st in zip(rows, statuses) if st == CORRUPT]
        pixels = pixels.to(dev, non_blocking=True)
        with torch.inference_mode(), _autocast(dev):
            if extractor.modality == "image":
                out = extractor(pixels, return_tokens=True)
            else:
                batch = {k: v.to(dev, non_blocking=True) for k, v in extractor.tokenize([str(titles[r]) for r in rows]).items()}
                out = extractor(**batch, pixels=pixels, return_tokens=True)
        yield rows, out, present.numpy()


class _NoProgress:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(enabled: bool, total: int, initial: int, desc: str):
    if not enabled:
        return _NoProgress()
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="news", dynamic_ncols=True, smoothing=0.1)


__all__ = ["ExtractionResult", "ShardPlan", "catalogue_store", "chunk_size", "extract_catalogue", "finished_store",
           "merge_sharded", "plan_sharded", "resolve_device", "spec_slug", "CONVERTED", "MISSING", "CORRUPT"]
