"""Frozen extraction of a whole news catalogue into one HDF5 feature store.

The store is the cache: a complete store whose metadata (extractor config, checkpoint,
dataset fingerprint) matches is returned untouched; an interrupted one is resumed from its
committed rows. Rows are processed in chunks in catalogue order (so the store's commit
counter means something); inside a chunk, titles are sorted by length and padded per batch,
which keeps padding waste small without giving up resumability. Images are decoded in
DataLoader workers into pinned memory and copied without blocking; on a GPU the model runs
under bf16 autocast. Letters: N news, B batch, L tokens, D width.
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
from storage.features import FeatureStore, FeatureWriter, StoreMeta, store_path

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
    checkpoint = Path(extractor.config.checkpoint).name or extractor.config.checkpoint
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{extractor.config.name}-{checkpoint}").strip("-")


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
) -> ExtractionResult:
    """Encode every news of `catalogue` with `extractor` into its store; resume or reuse it."""
    # Chunks hold whole batches, so a resumed run forms exactly the batches an uninterrupted
    # one would have formed, and gives bit-identical vectors.
    chunk_rows = max(1, chunk_rows // batch_size) * batch_size
    meta = store_meta(extractor, catalogue, tokens, dtype)
    path = store_path(features_dir, catalogue.name, spec_slug(extractor), "frozen")
    spec = extractor.config.spec
    cached = _matching_store(path, meta, catalogue)
    if cached is not None:
        return ExtractionResult(spec, path, len(catalogue), meta.dim, meta.token_len, cached=True, present=cached)

    writer = _open_writer(path, meta, catalogue)
    dev = resolve_device(device)
    extractor.to(dev)
    result = ExtractionResult(spec, path, len(catalogue), meta.dim, meta.token_len, resumed_from=writer.next_row)
    started = time.perf_counter()
    bar = _progress(progress, len(catalogue), writer.next_row, spec)
    try:
        if extractor.modality == "text":
            batches = _text_batches(extractor, catalogue, writer.next_row, batch_size, chunk_rows, dev)
        else:
            batches = _image_batches(extractor, catalogue, writer.next_row, batch_size, num_workers, dev, result)
        buffer = _ChunkBuffer(writer, chunk_rows, meta.token_len)
        for rows, encoded, present in batches:
            buffer.add(rows, encoded, present)
            bar.update(len(rows))
        buffer.close()
    finally:
        bar.close()
    result.seconds = time.perf_counter() - started
    writer.finalize()
    with FeatureStore.open(path, expected_fingerprint=meta.fingerprint) as store:
        result.present = int(store.present.sum())
    return result


def _matching_store(path: Path, meta: StoreMeta, catalogue: Catalogue) -> int | None:
    """The present-row count of a complete store made with exactly this meta, else None."""
    if not path.exists():
        return None
    try:
        with FeatureStore.open(path) as store:
            if store.meta.differences(meta) or not np.array_equal(store.ids, catalogue.ids):
                log.info("%s was made with other settings or data; extracting again", path)
                return None
            return int(store.present.sum())
    except PipelineError as err:
        log.warning("%s is unusable (%s); extracting again", path, err)
        return None


def _open_writer(path: Path, meta: StoreMeta, catalogue: Catalogue) -> FeatureWriter:
    if path.exists():
        return FeatureWriter(path, meta, catalogue.ids, restart=True)
    try:
        return FeatureWriter(path, meta, catalogue.ids)
    except PipelineError as err:
        # The store's name is fixed by (dataset, extractor, checkpoint); a partial made with
        # other preprocessing is stale once the user asks for new settings.
        log.warning("%s; discarding the interrupted extraction and starting over", err)
        return FeatureWriter(path, meta, catalogue.ids, restart=True)


class _ChunkBuffer:
    """Collects encoded batches (any row order) and writes whole chunks in catalogue order."""

    def __init__(self, writer: FeatureWriter, chunk_rows: int, token_len: int | None):
        self.writer, self.chunk_rows, self.token_len = writer, chunk_rows, token_len
        self.pending: dict[int, tuple[np.ndarray, np.ndarray | None, np.ndarray | None, bool]] = {}

    def add(self, rows: np.ndarray, encoded, present: np.ndarray) -> None:
        vectors = encoded.vectors.float().cpu().numpy()  # (B, D)
        tokens = mask = None
        if self.token_len is not None:
            tokens, mask = _pad_tokens(encoded.tokens.float().cpu().numpy(), encoded.mask.cpu().numpy(), self.token_len)
        for j, row in enumerate(rows.tolist()):
            self.pending[row] = (vectors[j], None if tokens is None else tokens[j], None if mask is None else mask[j], bool(present[j]))
        self._flush(final=False)

    def close(self) -> None:
        self._flush(final=True)
        if self.writer.next_row != self.writer.rows:
            raise RuntimeError(f"extraction ended at row {self.writer.next_row} of {self.writer.rows}")

    def _flush(self, final: bool) -> None:
        while True:
            start = self.writer.next_row
            end = min(start + self.chunk_rows, self.writer.rows)
            if start >= end or not all(r in self.pending for r in range(start, end)):
                return
            if end - start < self.chunk_rows and not final and end != self.writer.rows:
                return
            items = [self.pending.pop(r) for r in range(start, end)]
            self.writer.write(
                np.stack([it[0] for it in items]),
                np.array([it[3] for it in items]),
                tokens=None if self.token_len is None else np.stack([it[1] for it in items]),
                mask=None if self.token_len is None else np.stack([it[2] for it in items]),
            )


def _pad_tokens(tokens: np.ndarray, mask: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray]:
    """(B, l, D) tokens of one batch -> (B, length, D), zero-padded, mask False on padding."""
    b, l, d = tokens.shape
    out = np.zeros((b, length, d), dtype=tokens.dtype)
    out_mask = np.zeros((b, length), dtype=bool)
    keep = min(l, length)
    out[:, :keep], out_mask[:, :keep] = tokens[:, :keep], mask[:, :keep]
    return out, out_mask


def _autocast(dev: torch.device):
    if dev.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _text_batches(extractor, catalogue: Catalogue, start: int, batch_size: int, chunk_rows: int, dev: torch.device):
    """Yield (rows, Encoded, present) with titles sorted by length inside each chunk."""
    titles = [str(t) for t in catalogue.title]
    encoded_ids = extractor.tokenizer(
        titles[start:], truncation=True, max_length=extractor.config.max_length, add_special_tokens=True
    )["input_ids"]
    lengths = np.fromiter((len(x) for x in encoded_ids), dtype=np.int64, count=len(encoded_ids))
    pad = extractor.tokenizer.pad_token_id or 0
    n = len(catalogue)
    for chunk_start in range(start, n, chunk_rows):
        rows = np.arange(chunk_start, min(chunk_start + chunk_rows, n))
        order = rows[np.argsort(lengths[rows - start], kind="stable")]
        for b in range(0, len(order), batch_size):
            batch_rows = order[b : b + batch_size]
            width = int(lengths[batch_rows - start].max())
            input_ids = np.full((len(batch_rows), width), pad, dtype=np.int64)  # (B, L)
            attention = np.zeros((len(batch_rows), width), dtype=np.int64)  # (B, L)
            for j, r in enumerate(batch_rows - start):
                ids = encoded_ids[r]
                input_ids[j, : len(ids)], attention[j, : len(ids)] = ids, 1
            with torch.inference_mode(), _autocast(dev):
                out = extractor(
                    torch.from_numpy(input_ids).to(dev, non_blocking=True),
                    torch.from_numpy(attention).to(dev, non_blocking=True),
                    return_tokens=True,
                )
            yield batch_rows, out, np.ones(len(batch_rows), dtype=bool)


class _IndexedCards(torch.utils.data.Dataset):
    def __init__(self, cards: CardDataset, start: int):
        self.cards, self.start = cards, start

    def __len__(self) -> int:
        return len(self.cards) - self.start

    def __getitem__(self, i: int):
        pixels, present, status = self.cards[self.start + i]
        return self.start + i, pixels, present, status


def _image_batches(extractor, catalogue: Catalogue, start: int, batch_size: int, num_workers: int, dev: torch.device, result: ExtractionResult):
    """Yield (rows, Encoded, present) in catalogue order; images decoded in workers."""
    cards = CardDataset(
        [catalogue.image_path(i) for i in range(len(catalogue))],
        [str(t) for t in catalogue.title],
        [str(c) for c in catalogue.category],
        extractor.transform,
        extractor.config.missing,
    )
    loader = torch.utils.data.DataLoader(
        _IndexedCards(cards, start), batch_size=batch_size, shuffle=False, num_workers=num_workers,
        pin_memory=dev.type == "cuda", persistent_workers=False,
    )
    titles = catalogue.title
    for rows, pixels, present, statuses in loader:
        rows = rows.numpy()
        for row, status in zip(rows.tolist(), statuses):
            result.images[status] += 1
            if status == CORRUPT:
                result.corrupt_ids.append(str(catalogue.ids[row]))
        pixels = pixels.to(dev, non_blocking=True)
        with torch.inference_mode(), _autocast(dev):
            if extractor.modality == "image":
                out = extractor(pixels, return_tokens=True)
            else:
                batch = {k: v.to(dev, non_blocking=True) for k, v in extractor.tokenize([str(titles[r]) for r in rows]).items()}
                out = extractor(**batch, pixels=pixels, return_tokens=True)
        yield rows, out, present.numpy()


def _progress(enabled: bool, total: int, initial: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="news", disable=not enabled, dynamic_ncols=True, smoothing=0.1)


__all__ = ["ExtractionResult", "extract_catalogue", "resolve_device", "spec_slug", "CONVERTED", "MISSING", "CORRUPT"]
