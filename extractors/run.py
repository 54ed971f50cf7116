"""Frozen extraction of a whole news catalogue into one HDF5 feature store.

The store is the cache: a complete store whose metadata (extractor config, checkpoint,
dataset fingerprint) matches is returned untouched; an interrupted one is resumed from its
committed rows. Rows are processed in chunks in catalogue order (so the store's commit
counter means something); inside a chunk, titles are sorted by length and padded per batch,
which keeps padding waste small without giving up resumability. On a GPU the model runs under
bf16 autocast.

The host keeps up with the device (issue 3's targets on one H100: 40,000 titles/s, 5,000 cards/s,
2,000 BLIP news/s):
- titles are tokenised chunk by chunk by the tokenizer's Rust backend, the next chunk in a thread
  while the model encodes this one (`_TitleEncoder`);
- cards are decoded, cropped and resized in DataLoader workers (`default_workers`) and reach the
  device as uint8, where they are normalised with the extractor's mean and std;
- outputs are cast to the store dtype on the device, copied to the host once per chunk and
  written by a background thread (extractors/chunks.py).
Letters: N news, B batch, L tokens, D width.

Sharded (`plan_sharded`, `extract_catalogue(..., shard=)`, `merge_sharded`): each worker
extracts one contiguous row range into its own store (storage/shards.py), then one merge
writes the usual store. Shard boundaries fall on chunk boundaries, so a shard forms the same
chunks and batches as a single process and the merged store holds the same bytes.
Disk failures surface as `StoreIOError` (or a plain OSError), the errors worth retrying.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from extractors.checkpoints import identity_slug, slug_of
from extractors.chunks import GPU_PATHS, ChunkWriter, to_device
from extractors.device import resolve_device
from extractors.config import TINY
from extractors.images import CONVERTED, CORRUPT, MISSING, CardDataset, normalize, worker_context
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
    note: str = ""  # for the user: which store was reused and why, or why it was extracted again

    @property
    def rows_per_second(self) -> float:
        done = self.rows - self.resumed_from
        return done / self.seconds if self.seconds > 0 and not self.cached else 0.0


WORKERS_FROM_ROWS = 1000
"""Catalogues smaller than this decode their cards in the main process on a CPU: starting a
worker (it imports torch) costs about as much as decoding a thousand cards."""


def default_workers(device: str | torch.device, rows: int | None = None) -> int:
    """DataLoader workers decoding cards when the user names none.

    On a GPU every core but two (one for the main process launching kernels, one for the store
    writer and the tokenizer thread), at most 16: a card costs a worker about 2.7 ms at 224 px
    (1.1 decode, 1.6 resize) and 3.1 ms at 384 px (one core of a 2-core VM), so ViT-B/16 at
    5,000 cards/s needs about 14 cores. On a CPU one per core, at most 4, for catalogues of
    `WORKERS_FROM_ROWS` rows or more (`rows` None: assume large): decoding and resizing a card
    costs more than a tiny model's forward pass, so the main process would otherwise leave the
    other cores idle (the tiny ViT over the synthetic mind-small world's 64,887 news, 2 quiet
    cores: 545-584 news/s with 0 workers, 955-974 with 2; benchmarks/mind_small_rows.py); a
    base model's forward pass dominates instead, and its workers sleep once their queue is full."""
    dev = resolve_device(device) if isinstance(device, str) else device
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    if dev.type != "cuda":
        return 0 if rows is not None and rows < WORKERS_FROM_ROWS else max(1, min(cores, 4))
    return max(1, min(cores - 2, 16))


def spec_slug(extractor) -> str:
    """The store-name part of a built extractor: `bert-tiny`, or the extractor, the
    checkpoint's name and 10 hex of its weights' identity (extractors.checkpoints.slug_of), so
    different weights never share a store and changed weights never reuse one."""
    config = extractor.config
    if config.weights or config.is_tiny:
        return identity_slug(config.name, config.weights or TINY)
    # Built in code around weights that are no checkpoint (the benchmarks' random models).
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{config.name}-{Path(config.checkpoint).name}").strip("-")


def token_len(extractor) -> int:
    """L: the token vectors a store keeps per news (max length, or the vision model's tokens)."""
    return int(extractor.num_tokens)


def store_meta(extractor, catalogue: Catalogue, tokens: bool, dtype: str, mode: str = "frozen",
               extra_preprocess: dict | None = None) -> StoreMeta:
    """What the store of `extractor` over `catalogue` records. `extra_preprocess` joins the
    extractor config in `preprocess` (e.g. a fine-tuning record: stores made from other weights
    then differ); it may not replace the config's own keys. The extractor's `extras`
    ({name: width}; BLIP's image_embeds and text_embeds; none when it has no such attribute)
    become the store's extra datasets, filled from each batch's `Encoded.extras`."""
    preprocess = extractor.config.to_dict()
    clash = sorted(set(extra_preprocess or {}) & set(preprocess))
    if clash:
        raise ValueError(f"extra_preprocess may not replace the extractor config's keys: {', '.join(clash)}; "
                         f"put them under a key of their own")
    return StoreMeta(
        extractor=extractor.config.name,
        checkpoint=extractor.config.checkpoint,
        revision=extractor.config.revision or "",
        mode=mode,
        preprocess={**preprocess, **(extra_preprocess or {})},
        fingerprint=catalogue.fingerprint(),
        dim=extractor.dim,
        dtype=dtype,
        token_len=token_len(extractor) if tokens else None,
        token_dim=extractor.token_dim if tokens and extractor.token_dim != extractor.dim else None,
        extras=dict(getattr(extractor, "extras", None) or {}),
    )


def chunk_size(batch_size: int, chunk_rows: int) -> int:
    """Rows per committed chunk: `chunk_rows` rounded down to whole batches (at least one).

    Chunks hold whole batches, so a resumed run (or a shard starting on a chunk boundary)
    forms exactly the batches an uninterrupted single run forms, and gives bit-identical
    vectors."""
    return max(1, chunk_rows // batch_size) * batch_size


def catalogue_store(extractor, catalogue: Catalogue, features_dir: Path, mode: str = "frozen") -> Path:
    """The store `extract_catalogue` fills for this extractor and catalogue."""
    return store_path(features_dir, catalogue.name, spec_slug(extractor), mode)


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
    mode: str = "frozen",
    extra_preprocess: dict | None = None,
) -> ExtractionResult:
    """Encode every news of `catalogue` with `extractor` into its store; resume or reuse it.

    With `shard` (from `plan_sharded`, same batch_size, chunk_rows, mode and extra_preprocess),
    only rows [shard.start, shard.stop) are encoded, into the shard's own store. `mode` names
    the store (`finetuned` for an extractor with trained weights) and `extra_preprocess` joins
    its recorded preprocessing (see `store_meta`).
    """
    chunk_rows = chunk_size(batch_size, chunk_rows)
    meta = store_meta(extractor, catalogue, tokens, dtype, mode, extra_preprocess)
    n = len(catalogue)
    spec = extractor.config.spec
    if shard is None:
        path, first, stop, attrs = catalogue_store(extractor, catalogue, features_dir, mode), 0, n, None
    else:
        _check_shard(shard, n, chunk_rows)
        path, first, stop, attrs = shard.path, shard.start, shard.stop, shard.attrs(n)
    ids = catalogue.ids[first:stop]
    cached = _matching_store(path, meta, ids, shard, catalogue.ids)
    if cached is not None:
        note = (f"reused {path}: complete, made from the same weights ({extractor.config.weights or spec}), "
                f"settings and news")
        log.info("%s", note)
        return ExtractionResult(spec, path, stop - first, meta.dim, meta.token_len, cached=True, present=cached,
                                shard=shard, note=note)

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
                batches = _image_batches(extractor, catalogue, start, stop, batch_size, chunk_rows, num_workers,
                                         dev, result)
            with contextlib.closing(batches), ChunkWriter(writer, first, chunk_rows, dev) as chunks:
                for rows, encoded, present in batches:
                    chunks.add(rows, encoded, present)
                    bar.update(len(rows))
                chunks.close()
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
    mode: str = "frozen",
    extra_preprocess: dict | None = None,
) -> ShardPlan:
    """Up to `shards` contiguous, chunk-aligned row ranges of the catalogue's store."""
    path = catalogue_store(extractor, catalogue, features_dir, mode)
    planned = plan_shards(path, len(catalogue), shards, chunk_size(batch_size, chunk_rows))
    meta = store_meta(extractor, catalogue, tokens, dtype, mode, extra_preprocess)
    return ShardPlan(extractor.config.spec, path, meta, tuple(planned))


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
            stale = store.meta.differences(meta) or (["news ids"] if not np.array_equal(store.ids, ids) else [])
            if not stale and shard is not None:
                stale = list(shard_problems(shard, store, meta, all_ids))
            if stale:
                log.warning("%s was made with other settings or data (%s); extracting again", path,
                            "; ".join(stale[:3]))
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


def _autocast(dev: torch.device):
    if dev.type == "cuda":
        GPU_PATHS["bf16 autocast (extraction)"] += 1
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


class _TitleEncoder:
    """Titles -> input_ids and attention_mask (n, max_length) int64, padded to max_length:
    exactly what the tokenizer's own batch call gives.

    A fast tokenizer is driven through a copy of its Rust backend: the transformers wrapper
    spends about 45 us of Python per title on top (measured), which holds the GIL and caps it
    near 20,000 titles/s however many cores there are, half of BERT-base's 40,000 titles/s.
    The backend releases the GIL and spreads a batch over the cores. The first call checks the
    two agree on its first titles and keeps the wrapper when they do not (or for a slow tokenizer).
    """

    CHECKED_TITLES = 64

    def __init__(self, tokenizer, max_length: int):
        self.tokenizer, self.max_length = tokenizer, max_length
        self._backend = self._backend_copy()
        self._checked = self._backend is None

    def _backend_copy(self):
        backend = getattr(tokenizer := self.tokenizer, "backend_tokenizer", None)
        if not getattr(tokenizer, "is_fast", False) or backend is None or tokenizer.pad_token_id is None:
            return None
        from tokenizers import Tokenizer

        try:
            # A copy: the caller's tokenizer keeps its own padding state, and no two threads share one.
            copy = Tokenizer.from_str(backend.to_str())
            copy.enable_truncation(self.max_length, direction=tokenizer.truncation_side)
            copy.enable_padding(direction=tokenizer.padding_side, pad_id=tokenizer.pad_token_id,
                                pad_type_id=tokenizer.pad_token_type_id, pad_token=tokenizer.pad_token,
                                length=self.max_length)
        except Exception as err:  # noqa: BLE001 - any backend it cannot copy is served by the wrapper
            log.debug("tokenizer backend not usable directly (%s); using the transformers call", err)
            return None
        return copy

    def __call__(self, titles: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        if not self._checked:
            self._checked = True
            sample = list(titles[: self.CHECKED_TITLES])
            if not all(np.array_equal(a, b) for a, b in zip(self._encode(sample), self._wrapper(sample))):
                log.info("the tokenizer's backend disagrees with its transformers call; using the latter")
                self._backend = None
        return self._encode(titles) if self._backend is not None else self._wrapper(titles)

    def _encode(self, titles: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        encoded = self._backend.encode_batch(list(titles))
        ids = np.array([e.ids for e in encoded], dtype=np.int64).reshape(len(titles), self.max_length)
        attention = np.array([e.attention_mask for e in encoded], dtype=np.int64).reshape(ids.shape)
        return ids, attention

    def _wrapper(self, titles: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        encoded = self.tokenizer(list(titles), truncation=True, max_length=self.max_length, padding="max_length",
                                 return_tensors="np")
        return encoded["input_ids"].astype(np.int64), encoded["attention_mask"].astype(np.int64)


def _prefetched(fn: Callable, items: Sequence) -> Iterator:
    """fn(item) for each item in order; fn of the next item runs in a thread meanwhile."""
    if not items:
        return
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenize")
    try:
        ahead = pool.submit(fn, items[0])
        for item in items[1:]:
            done, ahead = ahead.result(), pool.submit(fn, item)
            yield done
        yield ahead.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _title_chunks(extractor, catalogue: Catalogue, start: int, stop: int,
                  chunk_rows: int) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """(first row, input_ids (C, Lmax), attention (C, Lmax)) of each chunk of rows start..stop-1,
    padded to max_length; each batch is later cut to its own longest title."""
    encode = _TitleEncoder(extractor.tokenizer, extractor.config.max_length)
    bounds = [(a, min(a + chunk_rows, stop)) for a in range(start, stop, chunk_rows)]
    return _prefetched(lambda ab: (ab[0], *encode(extractor.prepare_titles(catalogue.title[ab[0]:ab[1]]))), bounds)


def _cut(ids: np.ndarray, attention: np.ndarray, local: np.ndarray, dev: torch.device) -> tuple[torch.Tensor, ...]:
    """Rows `local` of a chunk's max_length-padded titles, cut to their longest, on `dev`: (B, l) each."""
    width = max(int(attention[local].sum(1).max()), 1)
    return to_device(ids[local, :width], dev), to_device(attention[local, :width], dev)


def _text_batches(extractor, catalogue: Catalogue, start: int, stop: int, batch_size: int, chunk_rows: int,
                  dev: torch.device):
    """Yield (rows, Encoded, present) for catalogue rows start..stop-1, titles sorted by
    length inside each chunk."""
    with contextlib.closing(_title_chunks(extractor, catalogue, start, stop, chunk_rows)) as chunks:
        for first, ids, attention in chunks:
            order = np.argsort(attention.sum(1), kind="stable")  # (C,) chunk positions, shortest first
            for b in range(0, len(order), batch_size):
                local = order[b : b + batch_size]
                input_ids, mask = _cut(ids, attention, local, dev)
                with torch.inference_mode(), _autocast(dev):
                    out = extractor(input_ids, mask, return_tokens=True)
                yield first + local, out, np.ones(len(local), dtype=bool)


class _IndexedCards(torch.utils.data.Dataset):
    def __init__(self, cards: CardDataset, start: int, stop: int):
        self.cards, self.start, self.stop = cards, start, stop

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, i: int):
        pixels, present, status = self.cards[self.start + i]
        return self.start + i, pixels, present, status


def _image_batches(extractor, catalogue: Catalogue, start: int, stop: int, batch_size: int, chunk_rows: int,
                   num_workers: int, dev: torch.device, result: ExtractionResult):
    """Yield (rows, Encoded, present) for catalogue rows start..stop-1 in order; cards decoded
    and resized in workers, normalised on the device."""
    cards = CardDataset(
        [catalogue.image_path(i) for i in range(len(catalogue))],
        [str(t) for t in catalogue.title],
        [str(c) for c in catalogue.category],
        extractor.transform,
        extractor.config.missing,
        uint8=True,
    )
    loader = torch.utils.data.DataLoader(
        _IndexedCards(cards, start, stop), batch_size=batch_size, shuffle=False, num_workers=num_workers,
        pin_memory=dev.type == "cuda", persistent_workers=False, multiprocessing_context=worker_context(num_workers),
    )
    mean, std = extractor.transform.stats(dev)
    zero_missing = extractor.config.missing == "zeros"
    batches = iter(loader)  # workers start here, before the tokenizer thread starts
    titles = _title_chunks(extractor, catalogue, start, stop, chunk_rows) if extractor.modality != "image" else None
    first = chunk_end = start
    try:
        for rows, pixels, present, statuses in batches:
            rows = rows.numpy()
            result.images.update(statuses)
            if CORRUPT in statuses:
                result.corrupt_ids += [str(catalogue.ids[r]) for r, st in zip(rows, statuses) if st == CORRUPT]
            pixels = normalize(pixels.to(dev, non_blocking=True), mean, std)  # (B, 3, S, W)
            if zero_missing:
                pixels = pixels.masked_fill(~present.to(dev, non_blocking=True).view(-1, 1, 1, 1), 0.0)
            with torch.inference_mode(), _autocast(dev):
                if extractor.modality == "image":
                    out = extractor(pixels, return_tokens=True)
                else:
                    if rows[0] >= chunk_end:  # batches never straddle chunks (chunk_size)
                        first, ids, attention = next(titles)
                        chunk_end = first + len(ids)
                    input_ids, mask = _cut(ids, attention, rows - first, dev)
                    out = extractor(input_ids, mask, pixels=pixels, return_tokens=True)
            yield rows, out, present.numpy()
    finally:
        if titles is not None:
            titles.close()


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


__all__ = ["ExtractionResult", "ShardPlan", "catalogue_store", "chunk_size", "default_workers", "extract_catalogue",
           "finished_store", "merge_sharded", "plan_sharded", "resolve_device", "slug_of", "spec_slug", "store_meta",
           "CONVERTED", "MISSING", "CORRUPT"]
