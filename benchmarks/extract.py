"""How fast `extractors.run.extract_catalogue` encodes a catalogue, against a naive loop.

For each extractor (bert, vit, blip), in one process, on the same model and device:
- pipeline: `extract_catalogue` into a fresh temporary feature folder (so nothing is reused),
  token vectors on as by default; rows/s is the whole call's wall clock (store creation,
  tokenising or JPEG decoding, the forward passes, HDF5 writes, finalizing);
- naive: one news at a time, every title padded to max_length, every card decoded in the main
  process right before its forward pass, no batching, results written into numpy arrays of the
  store's shapes and dtype, under the same autocast as the pipeline. It runs on the first
  --naive-rows news only (the output says so), and its pooled vectors are compared with the
  pipeline's for those rows.
The model runs once on a few news before either is timed, and every card is read once so
both find the files in the page cache. Letters: N news, B batch, L tokens (or patches), D width.

`--host-path` measures the host's share alone, with no model: synthetic model outputs shaped
like BERT-base's (32 x 768 token vectors, titles sorted by length inside a chunk and each batch
cut to its longest) and ViT-B/16's (197 x 768, in order) go through the chunk buffers into a
`FeatureWriter` store (fsync on, as extraction writes), by
- old: the engine as it was (a copy kept here, `OldChunkBuffer`): float32 chunk buffers
  allocated per chunk, `.float().cpu().numpy()` per batch, the float16 cast and the write in the
  main thread;
- new: `extractors.chunks.ChunkWriter` with float32 outputs on the CPU, i.e. the cast to float16
  done by the CPU, as when the model runs there;
- new, fp16 outputs: the same with outputs already in float16: the host's work when the model
  runs on a GPU, where the cast runs on the device and the copy to pinned memory is a DMA;
- write only: `FeatureWriter.write` of ready float16 chunks, one after the other: what the disk
  allows, the ceiling of any host path on this machine.
All four must store the same bytes (checked). Targets for one H100 are printed beside.

Data: the synthetic world (`storage.synthetic.generate_world`, `--scale`, made once under
benchmarks/.cache/), all its news or the first --rows of them. Models have random weights (they
cost what pre-trained ones cost, offline), built one of two ways (`--checkpoints`):
- `layouts` (default with `--models base`): checkpoints written in the on-disk layouts of the
  thesis' public ones (extractors/layouts.py, once, under benchmarks/.cache/checkpoints/) and
  loaded by the registry exactly as a user's `bert:DIR` would be: bert-base-uncased (BERT-base,
  12 layers, 768), google/vit-base-patch16-224 (transformers ViT-B/16, 224 px) and
  Salesforce/blip-itm-base-coco (BLIP base, ViT-B/16 at 384 px, BERT-base text). With
  `--models tiny` the same layouts shrunk to 2 layers of width 32 (a quick check on a CPU);
- `code` (default with `--models tiny`): the registry's tiny models, or with `--models base`
  base-size models built in code (timm vit_base_patch16_224, `BlipForImageTextRetrieval(BlipConfig())`).
On CUDA with base models, the issue's targets for one H100 are printed beside the figures.

Usage: python benchmarks/extract.py [--models tiny|base] [--checkpoints layouts|code] [--device auto|cpu|cuda]
       [--scale small] [--rows N] [--naive-rows N] [--repeats R] [--extractors bert,vit,blip] [--batch-size N]
       [--workers N] [--threads N] [--no-tokens] [--json PATH]
       python benchmarks/extract.py --host-path [--rows N] [--repeats R] [--batch-size N] [--json PATH]
Base models on a CPU default to --rows 128 --naive-rows 16: a base BLIP does under one news/s
per core.
From a checkout that is not installed into the environment (no `uv sync`), run it from the
repository root as `python -m benchmarks.extract ...`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from storage.errors import PipelineError, run_cli

EXTRACTORS = ("bert", "vit", "blip")
UNITS = {"bert": "titles/s", "vit": "cards/s", "blip": "news/s"}
# The throughput targets for base-size models on one H100, pipeline path.
TARGETS = {
    "bert": (40_000, "BERT-base >= 40,000 titles/s"),
    "vit": (5_000, "ViT-B/16 >= 5,000 cards/s including JPEG decode"),
    "blip": (2_000, "BLIP >= 2,000 news/s"),
}
WARMUP_ROWS = 4
NAIVE_ROWS = 300
# A base-size BLIP takes seconds per news on a few CPU cores: base models on a CPU get smaller
# defaults than the whole world (which would take hours).
ROWS_BASE_CPU = 128
NAIVE_ROWS_BASE_CPU = 16


@dataclasses.dataclass
class Measure:
    extractor: str
    models: str
    device: str
    rows: int
    batch_size: int
    workers: int
    pipeline_seconds: float
    pipeline_loop_seconds: float  # ExtractionResult.seconds: the batch loop alone
    naive_rows: int
    naive_seconds: float
    max_abs_diff: float  # pooled vectors, naive vs pipeline, on the naive rows

    @property
    def pipeline_rate(self) -> float:
        return self.rows / self.pipeline_seconds

    @property
    def naive_rate(self) -> float:
        return self.naive_rows / self.naive_seconds

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "pipeline_rows_per_s": self.pipeline_rate,
                "naive_rows_per_s": self.naive_rate, "speedup": self.pipeline_rate / self.naive_rate}


# ---------------------------------------------------------------- environment


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine(dev: torch.device) -> dict:
    import timm
    import transformers

    info = {
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "cpu": _cpu_name(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "timm": timm.__version__,
        "torch_threads": torch.get_num_threads(),
        # Other work on the machine skews every figure; the load says whether there was any.
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else _cpu_name(),
    }
    return info


# ---------------------------------------------------------------- data


def synthetic_world(cache: Path, scale: str, seed: int) -> Path:
    """The synthetic world `scale`/`seed` with its cards, generated once under `cache`."""
    from storage.synthetic import generate_world

    world = cache / f"synthetic-{scale}-seed{seed}"
    if not (world / "world.json").is_file():
        partial = cache / f"{world.name}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        generate_world(partial, scale=scale, seed=seed)
        shutil.rmtree(world, ignore_errors=True)
        partial.rename(world)  # only a finished world gets the reusable name
    return world


def head(catalogue, n: int):
    """The first `n` news of `catalogue` (ids stay sorted) as a catalogue of its own."""
    if n >= len(catalogue):
        return catalogue
    ids = catalogue.ids[:n]
    kept = set(ids.tolist())
    return dataclasses.replace(
        catalogue,
        ids=ids,
        index={news_id: i for i, news_id in enumerate(ids.tolist())},
        category=catalogue.category[:n],
        subcategory=catalogue.subcategory[:n],
        title=catalogue.title[:n],
        abstract=catalogue.abstract[:n],
        title_entities=catalogue.title_entities[:n],
        images=catalogue.images & kept,
        image_files=tuple(f for f in catalogue.image_files if f[0][: -len(".jpg")] in kept),
    )


def warm_page_cache(catalogue) -> None:
    for i in range(len(catalogue)):
        path = catalogue.image_path(i)
        if path is not None:
            path.read_bytes()


# ---------------------------------------------------------------- models


LAYOUT_OF = {"bert": "bert-base-uncased", "vit": "google/vit-base-patch16-224", "blip": "Salesforce/blip-itm-base-coco"}
"""The public checkpoint whose layout each extractor is timed over (the thesis' three)."""


def from_layout(name: str, models: str, titles: list[str], cache: Path):
    """The extractor `name` over a random-weight checkpoint in its public layout, written once
    under `cache` and loaded through the registry as `NAME:DIR`."""
    from extractors.layouts import write_checkpoint
    from extractors.registry import create

    repo = LAYOUT_OF[name]
    folder = cache / "checkpoints" / models / repo.replace("/", "__")
    if not (folder / "config.json").is_file():
        partial = folder.with_name(folder.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        write_checkpoint(repo, partial, titles, size=models)
        shutil.rmtree(folder, ignore_errors=True)
        partial.rename(folder)  # only a finished checkpoint gets the reusable name
    return create(f"{name}:{folder}")


def build(name: str, models: str, titles: list[str], checkpoints: str = "code", cache: Path | None = None):
    """The extractor `name`: from a real layout, the registry's tiny one, or a base-size one built in code."""
    if checkpoints == "layouts":
        return from_layout(name, models, titles, cache or Path(tempfile.mkdtemp()))
    if models == "tiny":
        from extractors.registry import create

        return create(name, titles=titles)

    from extractors.config import ExtractorConfig

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        if name == "bert":
            from transformers import BertConfig, BertModel

            from extractors.text import TextExtractor
            from extractors.tokenizer import train_wordpiece

            config = ExtractorConfig(name="bert", checkpoint="random-bert-base", modality="text")
            return TextExtractor(config, BertModel(BertConfig()), train_wordpiece(titles))
        if name == "vit":
            from extractors.vision import random_vit

            return random_vit()
        if name == "blip":
            from transformers import BlipConfig, BlipForImageTextRetrieval
            from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

            from extractors.blip import BlipExtractor
            from extractors.tokenizer import train_wordpiece

            model = BlipForImageTextRetrieval(BlipConfig())
            side = int(model.config.vision_config.image_size)
            config = ExtractorConfig(
                name="blip", checkpoint="random-blip-base", modality="multimodal", image_size=(side, side),
                mean=tuple(OPENAI_CLIP_MEAN), std=tuple(OPENAI_CLIP_STD), interpolation="bicubic",
            )
            return BlipExtractor(config, model, train_wordpiece(titles))
    raise PipelineError(f"unknown extractor {name!r}; known: {', '.join(EXTRACTORS)}")


def _autocast(dev: torch.device):
    # The pipeline's precision (extractors/run.py): the speed-up measures batching, not bf16.
    if dev.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


# ---------------------------------------------------------------- the two paths


def pipeline(extractor, catalogue, workdir: Path, dev: torch.device, batch_size: int, workers: int,
             tokens: bool, compare_rows: int) -> tuple[float, float, np.ndarray]:
    """Wall seconds of `extract_catalogue` into a fresh folder, its loop seconds, and the
    (compare_rows, D) pooled vectors it stored."""
    from extractors.run import extract_catalogue
    from storage.features import FeatureStore

    with tempfile.TemporaryDirectory(prefix="features-", dir=workdir) as features:
        start = time.perf_counter()
        result = extract_catalogue(
            extractor, catalogue, Path(features), batch_size=batch_size, device=dev.type,
            num_workers=workers, tokens=tokens, progress=False,
        )
        seconds = time.perf_counter() - start
        if result.cached or result.rows != len(catalogue):
            raise RuntimeError(f"{result.path}: expected a fresh extraction of {len(catalogue)} rows, got {result}")
        with FeatureStore.open(result.path) as store:
            vectors = store.take(np.arange(compare_rows))  # (n, D)
    return seconds, result.seconds, vectors


def naive(extractor, catalogue, n: int, dev: torch.device, tokens: bool) -> tuple[float, np.ndarray]:
    """Seconds to encode the first `n` news one at a time, and their (n, D) pooled vectors."""
    from extractors.images import CardDataset
    from extractors.run import token_len

    titles = [str(t) for t in catalogue.title[:n]]
    cards = None
    if extractor.modality != "text":
        cards = CardDataset(
            [catalogue.image_path(i) for i in range(n)], titles, [str(c) for c in catalogue.category[:n]],
            extractor.transform, extractor.config.missing,
        )
    length = token_len(extractor)
    vectors = np.zeros((n, extractor.dim), dtype=np.float16)  # (n, D), the store's dtype
    token_vectors = np.zeros((n, length, extractor.token_dim), dtype=np.float16) if tokens else None  # (n, L, Dt)
    mask = np.zeros((n, length), dtype=bool) if tokens else None  # (n, L)

    def padded(title: str) -> dict[str, torch.Tensor]:
        batch = extractor.tokenizer(
            extractor.prepare_titles([title])[0], padding="max_length", truncation=True,
            max_length=extractor.config.max_length, return_tensors="pt",
        )
        return {"input_ids": batch["input_ids"].to(dev), "attention_mask": batch["attention_mask"].to(dev)}  # (1, L)

    start = time.perf_counter()
    for i in range(n):
        if cards is not None:
            pixels = cards[i][0][None].to(dev)  # (1, 3, S, W)
        with torch.inference_mode(), _autocast(dev):
            if extractor.modality == "text":
                out = extractor(**padded(titles[i]), return_tokens=tokens)
            elif extractor.modality == "image":
                out = extractor(pixels, return_tokens=tokens)
            else:
                out = extractor(**padded(titles[i]), pixels=pixels, return_tokens=tokens)
        vectors[i] = out.vectors[0].float().cpu().numpy()
        if tokens:
            keep = min(out.tokens.shape[1], length)
            token_vectors[i, :keep] = out.tokens[0, :keep].float().cpu().numpy()
            mask[i, :keep] = out.mask[0, :keep].cpu().numpy()
    return time.perf_counter() - start, vectors


def measure(name: str, args: argparse.Namespace, catalogue, dev: torch.device, workdir: Path) -> Measure:
    extractor = build(name, args.models, [str(t) for t in catalogue.title], args.checkpoints, args.cache)
    extractor.to(dev)
    batch_size = args.batch_size or default_batch_size(args.models, dev)
    workers = 0 if extractor.modality == "text" else args.workers
    n_naive = min(args.naive_rows, len(catalogue))

    # Kernels, allocator, DataLoader and h5py imports are paid once here, outside both timings.
    pipeline(extractor, head(catalogue, WARMUP_ROWS), workdir, dev, min(batch_size, WARMUP_ROWS), 0, args.tokens, 1)
    naive(extractor, catalogue, 1, dev, args.tokens)

    # Best of --repeats: other work on the machine only ever makes a run slower.
    runs = [pipeline(extractor, catalogue, workdir, dev, batch_size, workers, args.tokens, n_naive)
            for _ in range(args.repeats)]
    seconds, loop_seconds, stored = min(runs, key=lambda run: run[0])
    naive_seconds, vectors = min((naive(extractor, catalogue, n_naive, dev, args.tokens) for _ in range(args.repeats)),
                                 key=lambda run: run[0])
    diff = float(np.abs(vectors.astype(np.float32) - stored.astype(np.float32)).max()) if n_naive else 0.0
    del extractor
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return Measure(name, args.models, dev.type, len(catalogue), batch_size, workers, seconds, loop_seconds,
                   n_naive, naive_seconds, diff)


# ---------------------------------------------------------------- host path (no model)


@dataclasses.dataclass(frozen=True)
class HostCase:
    name: str
    extractor: str  # whose H100 target applies
    token_len: int
    dim: int
    rows: int
    sorted_titles: bool  # the text path: lengths vary, sorted inside a chunk, batches cut to their longest


HOST_CASES = (
    HostCase("BERT-base tokens 32x768", "bert", 32, 768, 16_384, True),
    HostCase("ViT-B/16 tokens 197x768", "vit", 197, 768, 8_192, False),
)
HOST_PATHS = ("old", "new", "new, fp16 outputs", "write only")
HOST_CHUNK = 1024  # extract_catalogue's default chunk_rows


class OldChunkBuffer:
    """extractors/run.py's _ChunkBuffer before the host-path work, kept as the baseline."""

    def __init__(self, writer, first: int, chunk_rows: int, token_len: int | None, dim: int):
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


def chunk_pattern(case: HostCase, batch: int, tokens: bool, seed: int = 0) -> list[tuple[np.ndarray, object]]:
    """One chunk's batches as (positions in the chunk (B,), Encoded of float32 CPU tensors),
    formed the way the engine forms them; every chunk of the run reuses them."""
    from extractors.encoded import Encoded

    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    if case.sorted_titles:
        lengths = rng.integers(8, case.token_len + 1, size=HOST_CHUNK)  # tokens per title, [CLS] and [SEP] included
        order = np.argsort(lengths, kind="stable")
    else:
        lengths, order = np.full(HOST_CHUNK, case.token_len), np.arange(HOST_CHUNK)
    out = []
    for b in range(0, HOST_CHUNK, batch):
        local = order[b : b + batch]
        if not case.sorted_titles and out and len(local) == len(out[-1][0]):
            out.append((local, out[-1][1]))  # equal (B, 197, D) batches: one tensor serves them all
            continue
        width = int(lengths[local].max())
        mask = torch.from_numpy(np.arange(width)[None] < lengths[local][:, None])  # (B, l)
        out.append((local, Encoded(torch.randn(len(local), case.dim, generator=gen),  # (B, D)
                                   torch.randn(len(local), width, case.dim, generator=gen) if tokens else None,
                                   mask if tokens else None)))  # (B, l, D), (B, l)
    return out


def _as_fp16(pattern):
    from extractors.encoded import Encoded

    return [(local, Encoded(e.vectors.half(), None if e.tokens is None else e.tokens.half(), e.mask))
            for local, e in pattern]


def assembled_chunk(pattern, case: HostCase, tokens: bool) -> tuple:
    """The float16 chunk (vectors, present, tokens, mask) the pattern's batches fill."""
    vectors = np.zeros((HOST_CHUNK, case.dim), np.float16)  # (C, D)
    token_arr = np.zeros((HOST_CHUNK, case.token_len, case.dim), np.float16) if tokens else None  # (C, L, D)
    mask = np.zeros((HOST_CHUNK, case.token_len), bool) if tokens else None  # (C, L)
    for local, encoded in pattern:
        vectors[local] = encoded.vectors.numpy()
        if tokens:
            width = encoded.tokens.shape[1]
            token_arr[local, :width] = encoded.tokens.numpy()
            mask[local, :width] = encoded.mask.numpy()
    return vectors, np.ones(HOST_CHUNK, bool), token_arr, mask


def feed(pattern, rows: int) -> Iterator[tuple[np.ndarray, object, np.ndarray]]:
    """(catalogue rows, Encoded, present) of every batch of a `rows`-row store."""
    for start in range(0, rows, HOST_CHUNK):
        for local, encoded in pattern:
            yield start + local, encoded, np.ones(len(local), bool)


def store_digest(path: Path) -> str:
    from storage.features import FeatureStore

    digest = hashlib.sha256()
    with FeatureStore.open(path) as store:
        for start in range(0, len(store), HOST_CHUNK):
            rows = np.arange(start, min(start + HOST_CHUNK, len(store)))
            digest.update(store.take(rows).tobytes())
            if store.has_tokens:
                for arr in store.take_tokens(rows):
                    digest.update(arr.tobytes())
    return digest.hexdigest()


def host_run(case: HostCase, path_name: str, pattern, rows: int, tokens: bool, folder: Path) -> tuple[float, str, int]:
    """Seconds from the first batch to the finalized store, the store's digest, and its bytes."""
    from extractors.chunks import ChunkWriter
    from storage.features import FeatureWriter, StoreMeta

    meta = StoreMeta(extractor=case.extractor, checkpoint="synthetic", revision="", mode="frozen", preprocess={},
                     fingerprint="sha256:host-path", dim=case.dim, dtype="float16",
                     token_len=case.token_len if tokens else None)
    path = folder / f"{case.extractor}-{path_name.replace(',', '').replace(' ', '-')}.h5"
    writer = FeatureWriter(path, meta, [f"N{i}" for i in range(rows)])  # laid out before the clock starts
    start = time.perf_counter()
    if path_name == "write only":
        for _ in range(0, rows, HOST_CHUNK):
            writer.write(*pattern)
    elif path_name == "old":
        buffer = OldChunkBuffer(writer, 0, HOST_CHUNK, meta.token_len, meta.dim)
        for batch in feed(pattern, rows):
            buffer.add(*batch)
        buffer.close()
    else:
        with ChunkWriter(writer, 0, HOST_CHUNK, torch.device("cpu")) as chunks:
            for batch in feed(pattern, rows):
                chunks.add(*batch)
            chunks.close()
    writer.finalize()
    seconds = time.perf_counter() - start
    size = path.stat().st_size
    digest = store_digest(path)
    path.unlink()
    return seconds, digest, size


def host_path_main(args: argparse.Namespace) -> int:
    batch = args.batch_size or 256
    if (args.rows or 0) % HOST_CHUNK or HOST_CHUNK % batch:
        raise PipelineError(f"--host-path: --rows must be a multiple of {HOST_CHUNK} and --batch-size divide it")
    torch.set_num_threads(args.threads or default_threads(torch.device("cpu")))
    cache = args.cache
    cache.mkdir(parents=True, exist_ok=True)
    info = machine(torch.device("cpu"))
    print(f"machine: {info['platform']}, {info['cpus']} CPUs ({info['cpu']}), Python {info['python']}, "
          f"torch {info['torch']} ({info['torch_threads']} threads), load average {info['load_average_1min']:.2f}")
    print(f"host path: synthetic model outputs -> chunk buffers -> FeatureWriter (float16 store, fsync on, "
          f"{HOST_CHUNK}-row chunks, batch {batch}) in {cache}; no model; best of {args.repeats} run(s)")
    print(flush=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="host-path-", dir=cache) as folder:
        for case in HOST_CASES:
            rows = args.rows or case.rows
            pattern = chunk_pattern(case, batch, args.tokens)
            patterns = {"old": pattern, "new": pattern, "new, fp16 outputs": _as_fp16(pattern),
                        "write only": assembled_chunk(pattern, case, args.tokens)}
            label = case.name if args.tokens else f"{case.name.split(' tokens')[0]} vectors only"
            row = {"case": label, "extractor": case.extractor, "rows": rows, "batch": batch, "tokens": args.tokens}
            runs: dict[str, list[float]] = {name: [] for name in HOST_PATHS}
            digests = set()
            # Round robin, so that load from elsewhere and the disk's writeback weigh on every path alike.
            for _ in range(args.repeats):
                for name in HOST_PATHS:
                    seconds, digest, size = host_run(case, name, patterns[name], rows, args.tokens, Path(folder))
                    runs[name].append(rows / seconds)
                    digests.add(digest)
                    row["store_mb"] = size / 1e6
                    print(f"  {row['case']}: {name}: {rows / seconds:,.0f} rows/s", flush=True)
            row.update({name: max(rates) for name, rates in runs.items()}, runs=runs, same_bytes=len(digests) == 1)
            results.append(row)
    print()
    print(f"{'case':<24}  {'rows':>6}  {'old rows/s':>10}  {'new rows/s':>10}  {'speed-up':>8}  "
          f"{'new, fp16 outputs':>17}  {'speed-up':>8}  {'write only':>10}  {'GB/s':>5}  {'same bytes':>10}  "
          f"H100 target (GB/s of store writes it implies)")
    for r in results:
        gb_per_row = r["store_mb"] / 1e3 / r["rows"]
        target = TARGETS[r["extractor"]][0]
        print(f"{r['case']:<24}  {r['rows']:>6,}  {r['old']:>10,.0f}  {r['new']:>10,.0f}  {r['new'] / r['old']:>7.1f}x  "
              f"{r['new, fp16 outputs']:>17,.0f}  {r['new, fp16 outputs'] / r['old']:>7.1f}x  "
              f"{r['write only']:>10,.0f}  {r['write only'] * gb_per_row:>5.2f}  {'yes' if r['same_bytes'] else 'NO':>10}  "
              f"{TARGETS[r['extractor']][1]} ({target * gb_per_row:.2f} GB/s)")
    print()
    print("rows/s over the whole run, from the first batch to the finalized store (fsync on); best of the runs.")
    print("old: float32 chunk buffers per chunk, host float16 cast, write in the main thread (the engine before).")
    print("new: extractors.chunks.ChunkWriter, float32 outputs cast to float16 on the CPU (the model on a CPU).")
    print("new, fp16 outputs: the host's part when the model runs on a GPU (cast on the device, DMA to pinned")
    print("  memory): float16 rows copied into a reused buffer, the write in a background thread.")
    print("write only: FeatureWriter.write of ready float16 chunks in a loop, the disk's ceiling here; GB/s is its")
    print("  rate in store bytes. With token vectors on, a target needs a disk that sustains the GB/s beside it.")
    if not all(r["same_bytes"] for r in results):
        raise RuntimeError("the old and new host paths stored different bytes")
    info["load_average_1min_at_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    print(f"\nload average at the end: {info['load_average_1min_at_end']:.2f} ({info['cpus']} CPUs)")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"machine": info, "host_path": results}, indent=2) + "\n", encoding="utf-8")
        print(f"\nwrote {args.json}")
    return 0


# ---------------------------------------------------------------- options and report


def default_batch_size(models: str, dev: torch.device) -> int:
    if models == "tiny":
        return 64
    return 256 if dev.type == "cuda" else 16


def default_threads(dev: torch.device) -> int:
    # On a CPU, no more threads than the cores other work leaves free: measured on a 2-core VM
    # with one core busy elsewhere, tiny BERT ran 100x slower on 2 threads than on 1, the two
    # waiting on each other while one had no core. The load average says how busy it is.
    threads = torch.get_num_threads()
    if dev.type != "cpu" or not hasattr(os, "getloadavg"):
        return threads
    free = (os.cpu_count() or 1) - round(os.getloadavg()[0])
    return max(1, min(threads, free))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", choices=("tiny", "base"), default="tiny",
                        help="tiny: the registry's seeded tiny models; base: base-size models, random weights")
    parser.add_argument("--checkpoints", choices=("auto", "layouts", "code"), default="auto",
                        help="layouts: random weights in the public checkpoints' on-disk layouts, loaded as NAME:DIR; "
                             "code: models built in code (default: layouts with --models base, code with tiny)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--extractors", default=",".join(EXTRACTORS),
                        help=f"comma-separated subset of {','.join(EXTRACTORS)}")
    parser.add_argument("--scale", default="small", help="synthetic world scale: tiny, small, mind-small")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rows", type=int, default=None,
                        help=f"encode only the first ROWS news (default: all; {ROWS_BASE_CPU} with base models on cpu)")
    parser.add_argument("--naive-rows", type=int, default=None,
                        help=f"news the naive loop is timed on, a prefix (default {NAIVE_ROWS}, "
                             f"{NAIVE_ROWS_BASE_CPU} with base models on cpu)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="time each path this many times and keep the best (the least disturbed)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="default 64 with tiny models, 256 with base on cuda, 16 with base on cpu")
    parser.add_argument("--workers", type=int, default=None,
                        help="DataLoader workers decoding cards (default: extractors.run.default_workers, 0 on cpu, "
                             "CPUs - 2 up to 16 on cuda)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's own choice, on cpu capped at the cores "
                             "the load average leaves free)")
    parser.add_argument("--tokens", action=argparse.BooleanOptionalAction, default=True,
                        help="store token vectors, as extraction does by default")
    parser.add_argument("--cache", type=Path, default=Path(__file__).resolve().parent / ".cache",
                        help="where the world and the temporary stores go (default: benchmarks/.cache)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here as JSON")
    parser.add_argument("--host-path", action="store_true",
                        help="no model: time synthetic BERT-base and ViT-B/16 outputs through the chunk buffers "
                             "and the store writer, the old engine against the new")
    args = parser.parse_args(argv)
    args.extractors = [e.strip().lower() for e in args.extractors.split(",") if e.strip()]
    if args.checkpoints == "auto":
        args.checkpoints = "layouts" if args.models == "base" else "code"
    unknown = [e for e in args.extractors if e not in EXTRACTORS]
    if unknown or not args.extractors:
        parser.error(f"--extractors: unknown {', '.join(unknown) or '(none given)'}; known: {', '.join(EXTRACTORS)}")
    for option in ("rows", "naive_rows", "batch_size", "repeats", "threads"):
        value = getattr(args, option)
        if value is not None and value < 1:
            parser.error(f"--{option.replace('_', '-')} must be at least 1, got {value}")
    if args.workers is not None and args.workers < 0:
        parser.error(f"--workers must be 0 or more, got {args.workers}")
    return args


def report(results: list[Measure], info: dict, dev: torch.device, models: str) -> None:
    header = (f"{'extractor':<9}  {'models':<6}  {'device':<6}  {'rows':>6}  {'batch':>5}  {'workers':>7}  "
              f"{'pipeline rows/s':>15}  {'naive rows':>10}  {'naive rows/s':>12}  {'speed-up':>8}  {'max|diff|':>9}")
    print(header)
    for m in results:
        print(f"{m.extractor:<9}  {m.models:<6}  {m.device:<6}  {m.rows:>6,}  {m.batch_size:>5}  {m.workers:>7}  "
              f"{m.pipeline_rate:>15,.1f}  {m.naive_rows:>10,}  {m.naive_rate:>12,.1f}  "
              f"{m.pipeline_rate / m.naive_rate:>7.1f}x  {m.max_abs_diff:>9.2e}")
    print()
    print("pipeline rows/s: the whole extract_catalogue call (store creation, tokenising or JPEG decoding,")
    print("  forward passes, HDF5 writes, finalize) over all rows. naive rows/s: timed on a SUBSET, the first")
    print("  'naive rows' news, one at a time. max|diff|: pooled float16 vectors, naive vs pipeline, those rows.")
    if dev.type == "cuda" and models == "base":
        print()
        name = info["device_name"]
        note = "" if "H100" in name else f" (the targets are for one H100; this is {name})"
        print(f"targets for one H100, pipeline path{note}:")
        for m in results:
            target, text = TARGETS[m.extractor]
            verdict = "met" if m.pipeline_rate >= target else "not met"
            print(f"  {text:<48} measured {m.pipeline_rate:>10,.0f} {UNITS[m.extractor]:<8}  {verdict}")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.host_path:
        return host_path_main(args)

    from extractors.run import resolve_device
    from storage.catalogue import load_catalogue
    from storage.synthetic import SCALES

    if args.scale not in SCALES:
        raise PipelineError(f"unknown --scale {args.scale!r}; known: {', '.join(SCALES)}")
    dev = resolve_device(args.device)
    threads_note = "given"
    if args.threads is None:
        args.threads, threads_note = default_threads(dev), "auto"
    torch.set_num_threads(args.threads)
    workers_note = "given"
    if args.workers is None:
        from extractors.run import default_workers

        args.workers, workers_note = default_workers(dev), "auto"
    base_cpu = args.models == "base" and dev.type == "cpu"
    if args.rows is None and base_cpu:
        args.rows = ROWS_BASE_CPU
    if args.naive_rows is None:
        args.naive_rows = NAIVE_ROWS_BASE_CPU if base_cpu else NAIVE_ROWS
    args.cache.mkdir(parents=True, exist_ok=True)

    world = synthetic_world(args.cache, args.scale, args.seed)
    full = load_catalogue(world)
    catalogue = head(full, args.rows) if args.rows else full
    warm_page_cache(catalogue)

    info = machine(dev)
    print(f"machine: {info['platform']}, {info['cpus']} CPUs ({info['cpu']}), Python {info['python']}, "
          f"torch {info['torch']} ({info['torch_threads']} threads), transformers {info['transformers']}, "
          f"timm {info['timm']}, load average {info['load_average_1min']:.2f}")
    print(f"device: {info['device']} ({info['device_name']})")
    covers = sum(catalogue.image_path(i) is not None for i in range(len(catalogue)))
    print(f"data: synthetic world scale={args.scale} seed={args.seed} in {world}")
    print(f"      {len(catalogue):,} of its {len(full):,} news, {covers:,} with a card image "
          f"(the others get a rendered title card)")
    source = ("random weights in the layouts of " + ", ".join(LAYOUT_OF[e] for e in args.extractors)
              if args.checkpoints == "layouts" else "built in code")
    print(f"models: {args.models}, {source}; token vectors {'on' if args.tokens else 'off'}; "
          f"card workers {args.workers} ({workers_note}); torch threads {args.threads} ({threads_note}); "
          f"best of {args.repeats} run(s) per path")
    print(flush=True)

    results = []
    with tempfile.TemporaryDirectory(prefix="extract-bench-", dir=args.cache) as workdir:
        for name in args.extractors:
            results.append(measure(name, args, catalogue, dev, Path(workdir)))
            m = results[-1]
            print(f"  {name}: pipeline {m.pipeline_rate:,.1f} rows/s, naive {m.naive_rate:,.1f} rows/s", flush=True)
    print()
    report(results, info, dev, args.models)
    info["load_average_1min_at_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    print(f"\nload average at the end: {info['load_average_1min_at_end']:.2f} ({info['cpus']} CPUs)")

    if args.json is not None:
        doc = {"machine": info, "scale": args.scale, "seed": args.seed, "models": args.models,
               "checkpoints": args.checkpoints,
               "tokens": args.tokens, "repeats": args.repeats, "results": [m.to_dict() for m in results]}
        if dev.type == "cuda" and args.models == "base":
            doc["targets"] = {m.extractor: {"target": TARGETS[m.extractor][0],
                                            "met": m.pipeline_rate >= TARGETS[m.extractor][0]} for m in results}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    run_cli(main)
