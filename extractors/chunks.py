"""Encoded batches into a feature store, chunk by chunk, with the copy and the write off the main path.

A chunk is `chunk_rows` consecutive store rows. Batches fill it in any order (the text path sorts
titles by length inside a chunk) and never straddle two chunks. Per batch, on the model's device,
the outputs are cast to the store's dtype and copied into a staging chunk; on a CPU that is the
host buffer itself. A full chunk goes to the host in one non-blocking copy into one of two pinned
buffers, and a background thread waits for that copy and writes the chunk with
`FeatureWriter.write` (pwrite, fdatasync, then the commit counter) while the main thread fills the
next chunk into the other buffer.

At most one chunk is in flight: handing over chunk k first waits for the write of chunk k-1, so
chunks are written in order by one thread, a chunk is committed only after its rows are on disk
(`FeatureWriter` is unchanged), and a kill -9 still costs only the rows past the counter. A failed
write is raised in the main thread at the next hand-over or at `close()`.

Measured without a model (benchmarks/extract.py --host-path, a 2-core VM): the float32 chunk
buffers and the host float16 cast of the old path cost more than the disk write itself.
Extra vectors the store declares (StoreMeta.extras, e.g. BLIP's image_embeds and text_embeds) travel
the same way, each from `encoded.extras[name]` into its own buffer; extras the store does not
declare are not kept, as token vectors are not when it keeps none.
Letters: C chunk rows, B batch, L tokens, D width, Dt token width, E extra width.
"""

from __future__ import annotations

from collections import Counter

import logging
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from storage.features import FeatureWriter

log = logging.getLogger(__name__)

TORCH_DTYPES = {"float16": torch.float16, "float32": torch.float32}
GPU_PATHS: Counter[str] = Counter()
"""How often the GPU-only code paths ran in this process (pinned host buffers, copy events,
bf16 autocast): what benchmarks/gpu.py checks, since no test can run them."""


def to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """A host array on `device`. On CUDA it goes through pinned memory, so the copy is truly
    asynchronous: from pageable memory it would wait for the GPU to drain first."""
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


@dataclass
class _Chunk:
    """Tensors of one chunk: vectors (C, D), tokens (C, L, Dt) and mask (C, L) or None, and
    extras {name: (C, E)} as the store declares them."""

    vectors: torch.Tensor
    tokens: torch.Tensor | None
    mask: torch.Tensor | None
    extras: dict[str, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def empty(cls, writer: FeatureWriter, rows: int, device: torch.device, pin: bool = False) -> _Chunk:
        meta = writer.meta
        dtype = TORCH_DTYPES[meta.dtype]
        if pin:
            GPU_PATHS["pinned chunk buffers"] += 1
        vectors = torch.empty(rows, meta.dim, dtype=dtype, device=device, pin_memory=pin)
        extras = {name: torch.empty(rows, width, dtype=dtype, device=device, pin_memory=pin)
                  for name, width in meta.extras.items()}
        if not meta.has_tokens:
            return cls(vectors, None, None, extras)
        length = int(meta.token_len or 0)
        tokens = torch.empty(rows, length, meta.tokens_width, dtype=dtype, device=device, pin_memory=pin)
        mask = torch.empty(rows, length, dtype=torch.bool, device=device, pin_memory=pin)
        return cls(vectors, tokens, mask, extras)

    def copy_from(self, other: _Chunk, rows: int, non_blocking: bool) -> None:
        for name in ("vectors", "tokens", "mask"):
            dst = getattr(self, name)
            if dst is not None:
                dst[:rows].copy_(getattr(other, name)[:rows], non_blocking=non_blocking)
        for name, dst in self.extras.items():
            dst[:rows].copy_(other.extras[name][:rows], non_blocking=non_blocking)


def _extra(encoded, name: str, dst: torch.Tensor) -> torch.Tensor:
    """encoded.extras[name] (B, E), checked against the chunk buffer (C, E) it goes into: a
    (B, 1) tensor would otherwise broadcast into it silently."""
    src = encoded.extras.get(name)
    if src is None:
        raise RuntimeError(f"the store keeps extra vectors {name!r} but the extractor returned "
                           f"{', '.join(sorted(encoded.extras)) or 'none'}")
    if src.ndim != 2 or src.shape[1] != dst.shape[1]:
        raise RuntimeError(f"extra vectors {name!r} have shape {tuple(src.shape)}; the store keeps (B, {dst.shape[1]})")
    return src


class ChunkWriter:
    """Fill `writer`'s store from its next row on with batches of encoded rows.

        with ChunkWriter(writer, first, chunk_rows, device) as chunks:
            for rows, encoded, present in batches:   # catalogue rows (B,), Encoded, (B,) bool
                chunks.add(rows, encoded, present)
            chunks.close()                           # waits for the last write, raises its error

    `first` is the catalogue row of the store's row 0 (a shard's start). Leaving the block
    without `close()` (an error) waits for the write in flight, so the caller may then close
    the writer. Token vectors longer than the store's token_len are cut; shorter ones are
    zero-padded with a False mask. `staged` (default: unless the device is the CPU) fills a
    chunk on the device and copies it to the host once it is full.
    """

    def __init__(self, writer: FeatureWriter, first: int, chunk_rows: int, device: torch.device,
                 staged: bool | None = None):
        self.writer, self.first, self.chunk_rows, self.device = writer, first, chunk_rows, device
        self.next_row = writer.next_row  # store row where the chunk being filled starts
        rows = min(chunk_rows, writer.rows - writer.next_row)  # no chunk is larger
        staged = device.type != "cpu" if staged is None else staged
        self._host = [_Chunk.empty(writer, rows, torch.device("cpu"), pin=device.type == "cuda") for _ in range(2)]
        self._present = [np.zeros(rows, dtype=bool) for _ in range(2)]
        self._stage = _Chunk.empty(writer, rows, device) if staged else None  # filled on the device
        self._slot = 0
        self._pool: ThreadPoolExecutor | None = None  # started at the first hand-over
        self._pending: Future | None = None
        self._closed = False
        self._start_chunk()

    # -- filling

    def _start_chunk(self) -> None:
        self.start = self.first + self.next_row  # catalogue row of the chunk's first row
        self.size = min(self.chunk_rows, self.writer.rows - self.next_row)
        self.filled = 0

    def add(self, rows: np.ndarray, encoded, present: np.ndarray) -> None:
        """Rows (B,) of the current chunk: encoded.vectors (B, D), when the store keeps tokens
        encoded.tokens (B, l, Dt) with encoded.mask (B, l), and encoded.extras[name] (B, E) for
        each extra the store declares, on the model's device."""
        at = np.asarray(rows) - self.start  # (B,) positions inside the chunk
        if len(at) == 0:
            return
        if at.min() < 0 or at.max() >= self.size:
            raise RuntimeError(f"batch rows {rows.min()}..{rows.max()} fall outside the chunk of rows "
                               f"{self.start}..{self.start + self.size - 1}")
        target = self._stage if self._stage is not None else self._host[self._slot]
        with torch.inference_mode():
            if at[-1] - at[0] == len(at) - 1 and np.all(np.diff(at) == 1):
                self._put_slice(target, int(at[0]), encoded)
            else:
                self._put_index(target, to_device(at, self.device), encoded)
        self._present[self._slot][at] = present
        self.filled += len(at)
        if self.filled == self.size:
            self._hand_over()

    def _put_slice(self, target: _Chunk, a: int, encoded) -> None:
        b = a + encoded.vectors.shape[0]
        target.vectors[a:b].copy_(encoded.vectors)  # cast to the store dtype on the device
        if target.tokens is not None:
            keep = min(encoded.tokens.shape[1], target.tokens.shape[1])
            target.tokens[a:b, :keep].copy_(encoded.tokens[:, :keep])
            target.tokens[a:b, keep:].zero_()  # the buffers are reused: clear what a longer batch left
            target.mask[a:b, :keep].copy_(encoded.mask[:, :keep])
            target.mask[a:b, keep:] = False
        for name, dst in target.extras.items():
            dst[a:b].copy_(_extra(encoded, name, dst))

    def _put_index(self, target: _Chunk, index: torch.Tensor, encoded) -> None:
        dtype = target.vectors.dtype
        target.vectors.index_copy_(0, index, encoded.vectors.to(dtype))
        if target.tokens is not None:
            keep = min(encoded.tokens.shape[1], target.tokens.shape[1])
            target.tokens[:, :keep].index_copy_(0, index, encoded.tokens[:, :keep].to(dtype))
            target.tokens[:, keep:].index_fill_(0, index, 0)
            target.mask[:, :keep].index_copy_(0, index, encoded.mask[:, :keep])
            target.mask[:, keep:].index_fill_(0, index, False)
        for name, dst in target.extras.items():
            dst.index_copy_(0, index, _extra(encoded, name, dst).to(dtype))

    # -- writing

    def _hand_over(self) -> None:
        """Send the full chunk to the writer thread and start the next one in the other slot."""
        rows, slot = self.size, self._slot
        host = self._host[slot]
        copied = None
        if self._stage is not None:
            # The slot's previous chunk was written before the last hand-over returned.
            host.copy_from(self._stage, rows, non_blocking=self.device.type == "cuda")
            if self.device.type == "cuda":
                copied = torch.cuda.Event()
                copied.record()
                GPU_PATHS["copy events"] += 1
        self._wait()
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="store-writer")
        self._pending = self._pool.submit(self._write, host, self._present[slot], rows, copied)
        self.next_row += rows
        self._slot = 1 - slot
        if self.next_row < self.writer.rows:
            self._start_chunk()

    def _write(self, host: _Chunk, present: np.ndarray, rows: int, copied) -> None:
        if copied is not None:
            copied.synchronize()  # the chunk's one wait for the GPU, off the main thread
        tokens = mask = None
        if host.tokens is not None:
            tokens, mask = host.tokens[:rows].numpy(), host.mask[:rows].numpy()
        extras = {name: buffer[:rows].numpy() for name, buffer in host.extras.items()}  # name -> (C, E)
        self.writer.write(host.vectors[:rows].numpy(), present[:rows], tokens=tokens, mask=mask, extras=extras)

    def _wait(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()  # re-raises the write's error here, in the main thread

    def close(self) -> None:
        """Wait for the last write; raise its error, or RuntimeError when rows are missing."""
        self._closed = True
        try:
            self._wait()
        finally:
            self._stop()
        if self.writer.next_row != self.writer.rows:
            raise RuntimeError(f"extraction ended at row {self.writer.next_row} of {self.writer.rows}")

    def _stop(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def __enter__(self) -> ChunkWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._closed:
            return
        # Unwinding from an error: the write in flight must end before anyone closes the file.
        try:
            self._wait()
        except BaseException as err:  # noqa: BLE001 - the error being raised already says what went wrong
            log.warning("%s: the chunk in flight was not committed either (%s)", self.writer.path, err)
        finally:
            self._stop()
