"""The extraction engine's parts: the chunk writer (any batch order and width, reused buffers,
extra vectors, writes in order on its thread, errors raised in the caller, resume), the title
encoder, DataLoader workers, store modes, BLIP's extra vectors in its store, and the default
number of workers."""

from __future__ import annotations

import dataclasses
import errno
import os
import tempfile
import threading
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from extractors.chunks import ChunkWriter
from extractors.encoded import Encoded
from extractors.registry import create
from extractors.run import _TitleEncoder, default_workers, extract_catalogue, store_meta
from storage.catalogue import load_catalogue
from storage.errors import PipelineError
from storage.features import FeatureStore, FeatureWriter, StoreIOError, StoreMeta

DIM, LENGTH = 8, 6
EXTRAS = {"image_embeds": 3, "text_embeds": 5}
CPU = torch.device("cpu")


def make_meta(dtype: str = "float16", tokens: bool = True, extras: bool = False) -> StoreMeta:
    return StoreMeta(extractor="synthetic", checkpoint="none", revision="", mode="frozen", preprocess={},
                     fingerprint="sha256:engine-test", dim=DIM, dtype=dtype,  # type: ignore[arg-type]
                     token_len=LENGTH if tokens else None, extras=EXTRAS if extras else {})


def ids(n: int) -> list[str]:
    return [f"N{i}" for i in range(n)]


def encoded(rows: np.ndarray, width: int) -> Encoded:
    """What a model would give for catalogue rows (B,) padded to `width` tokens: every value a
    function of its row and position, so any batching must store the same rows."""
    r = torch.as_tensor(rows, dtype=torch.float32)[:, None]  # (B, 1)
    j = torch.arange(DIM, dtype=torch.float32)[None]  # (1, D)
    p = torch.arange(width, dtype=torch.float32)[None, :, None]  # (1, l, 1)
    vectors = torch.sin(0.37 * r + 1.3 * j) * 3  # (B, D)
    tokens = torch.cos(0.11 * r[:, :, None] + 0.7 * p + 0.05 * j[:, None]) * 5  # (B, l, D)
    mask = torch.arange(width)[None] < (1 + torch.as_tensor(rows)[:, None] % width)  # (B, l)
    extras = {name: torch.tanh(0.29 * r - 0.8 * torch.arange(e, dtype=torch.float32)[None] + k)  # (B, E)
              for k, (name, e) in enumerate(EXTRAS.items())}
    return Encoded(vectors, tokens, mask, extras)


def expected_rows(batches: list[tuple[np.ndarray, int]], n: int, dtype: str):
    """vectors, tokens, mask and extras a row-by-row write of these batches gives."""
    vectors = np.zeros((n, DIM), np.float32)
    tokens = np.zeros((n, LENGTH, DIM), np.float32)
    mask = np.zeros((n, LENGTH), bool)
    extras = {name: np.zeros((n, e), np.float32) for name, e in EXTRAS.items()}
    for rows, width in batches:
        out, keep = encoded(rows, width), min(width, LENGTH)
        vectors[rows] = out.vectors.numpy()
        tokens[rows, :keep] = out.tokens[:, :keep].numpy()
        mask[rows, :keep] = out.mask[:, :keep].numpy()
        for name in extras:
            extras[name][rows] = out.extras[name].numpy()
    return vectors.astype(dtype), tokens.astype(dtype), mask, {k: v.astype(dtype) for k, v in extras.items()}


def read(path: Path):
    with FeatureStore.open(path) as store:
        return store.load(extras=True)


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_any_batch_order_and_width_store_what_a_row_by_row_write_stores(data):
    n = data.draw(st.integers(0, 40), label="rows")
    chunk = data.draw(st.integers(1, 9), label="chunk rows")
    dtype = data.draw(st.sampled_from(["float16", "float32"]), label="dtype")
    staged = data.draw(st.booleans(), label="staged")
    extras = data.draw(st.booleans(), label="extras")
    batches = []  # (catalogue rows (B,), token width): batches never straddle chunks
    for start in range(0, n, chunk):
        size = min(chunk, n - start)
        order = np.array(data.draw(st.permutations(range(size))), dtype=np.int64)
        step = data.draw(st.integers(1, size))
        for k in range(0, size, step):
            batches.append((start + order[k : k + step], data.draw(st.integers(1, LENGTH + 2))))
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "s.h5"
        writer = FeatureWriter(path, make_meta(dtype, extras=extras), ids(n), fsync=False)
        with ChunkWriter(writer, 0, chunk, CPU, staged=staged) as chunks:
            for rows, width in batches:
                chunks.add(rows, encoded(rows, width), rows % 3 != 0)
            chunks.close()
        writer.finalize()
        got = read(path)
    vectors, tokens, mask, more = expected_rows(batches, n, dtype)
    assert got.vectors.tobytes() == vectors.tobytes()  # the device-side cast rounds as numpy does
    assert got.tokens.tobytes() == tokens.tobytes()  # reused buffers leave no stale tails
    assert np.array_equal(got.mask, mask)
    assert np.array_equal(got.present, np.arange(n) % 3 != 0)
    # Extras the store declares are kept, row for row; a store without them keeps none.
    assert got.extras.keys() == (EXTRAS.keys() if extras else set())
    assert all(got.extras[name].tobytes() == more[name].tobytes() for name in got.extras)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_cuda_path_stores_what_the_cpu_path_stores(tmp_path):
    """Staged on the device, cast there, copied to pinned buffers behind an event: the same bytes."""
    n, chunk = 45, 16
    rng = np.random.default_rng(0)
    batches = []  # shuffled inside each chunk (the index path), some in order (the slice path)
    for start in range(0, n, chunk):
        rows = np.arange(start, min(start + chunk, n))
        rows = rng.permutation(rows) if start // chunk % 2 == 0 else rows
        batches += [rows[k:k + 5] for k in range(0, len(rows), 5)]
    stores = {}
    for device in (CPU, torch.device("cuda")):
        writer = FeatureWriter(tmp_path / f"{device.type}.h5", make_meta(extras=True), ids(n), fsync=False)
        with ChunkWriter(writer, 0, chunk, device) as chunks:
            for rows in batches:
                out = encoded(rows, LENGTH)
                on_device = Encoded(out.vectors.to(device), out.tokens.to(device), out.mask.to(device),
                                    {k: v.to(device) for k, v in out.extras.items()})
                chunks.add(rows, on_device, rows % 4 != 0)
            chunks.close()
        writer.finalize()
        stores[device.type] = read(writer.path)
    for name in ("vectors", "present", "tokens", "mask"):
        assert getattr(stores["cpu"], name).tobytes() == getattr(stores["cuda"], name).tobytes(), name
    assert stores["cuda"].extras.keys() == EXTRAS.keys()
    assert all(stores["cpu"].extras[k].tobytes() == stores["cuda"].extras[k].tobytes() for k in EXTRAS)


def _in_order(n: int, batch: int, width: int = LENGTH):
    """Batches of `batch` consecutive rows of an n-row store, as the image path forms them."""
    for start in range(0, n, batch):
        rows = np.arange(start, min(start + batch, n))
        yield rows, encoded(rows, width), np.ones(len(rows), bool)


def test_chunks_are_written_in_order_one_at_a_time_on_the_writer_thread(tmp_path, monkeypatch):
    n, chunk = 50, 8
    calls, busy = [], threading.Lock()
    real = FeatureWriter.write

    def write(self, vectors, *args, **kwargs):
        assert busy.acquire(blocking=False), "two chunk writes at once"
        try:
            calls.append((self.next_row, len(vectors), threading.current_thread().name))
            return real(self, vectors, *args, **kwargs)
        finally:
            busy.release()

    monkeypatch.setattr(FeatureWriter, "write", write)
    writer = FeatureWriter(tmp_path / "s.h5", make_meta(), ids(n), fsync=False)
    try:
        with ChunkWriter(writer, 0, chunk, CPU) as chunks:
            for rows, out, present in _in_order(n, 4):
                chunks.add(rows, out, present)
            chunks.close()
    finally:
        writer.close()  # an open partial would be inherited by every child this process forks later
    assert [(start, rows) for start, rows, _ in calls] == [(s, min(chunk, n - s)) for s in range(0, n, chunk)]
    assert all(name.startswith("store-writer") for _, _, name in calls)
    assert not any(t.name.startswith("store-writer") for t in threading.enumerate())  # thread stopped


# The pwrite failing: in chunk 0, chunk 0's last extras, chunk 1, the last chunk.
@pytest.mark.parametrize("fail_at", [2, 6, 9, 20])
def test_a_failed_write_is_raised_in_the_caller_and_a_rerun_resumes(tmp_path, monkeypatch, fail_at):
    n, chunk = 30, 8  # 4 chunks, the last of 6 rows
    path = tmp_path / "s.h5"
    real, calls = os.pwrite, {"n": 0}

    def flaky(fd, data, offset):
        calls["n"] += 1
        if calls["n"] == fail_at:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", flaky)
    writer = FeatureWriter(path, make_meta(extras=True), ids(n), fsync=False)
    with pytest.raises(StoreIOError, match="No space left"):
        with ChunkWriter(writer, 0, chunk, CPU) as chunks:
            for rows, out, present in _in_order(n, 4):
                chunks.add(rows, out, present)
            chunks.close()
    writer.close()  # safe: nothing writes any more
    committed = (fail_at - 1) // 6 * chunk  # 6 pwrites per chunk: vectors, present, tokens, mask, 2 extras
    monkeypatch.setattr(os, "pwrite", real)
    again = FeatureWriter(path, make_meta(extras=True), ids(n), fsync=False)
    assert again.resumed and again.next_row == committed
    with ChunkWriter(again, 0, chunk, CPU) as chunks:
        for rows, out, present in _in_order(n, 4):
            if rows[0] >= committed:
                chunks.add(rows, out, present)
        chunks.close()
    again.finalize()
    vectors, tokens, _, more = expected_rows([(r, LENGTH) for r, _, _ in _in_order(n, 4)], n, "float16")
    got = read(path)
    assert got.vectors.tobytes() == vectors.tobytes() and got.tokens.tobytes() == tokens.tobytes()
    assert all(got.extras[name].tobytes() == more[name].tobytes() for name in EXTRAS)


def test_an_error_while_filling_waits_for_the_chunk_in_flight(tmp_path, monkeypatch):
    n, chunk = 32, 8
    started, release = threading.Event(), threading.Event()
    real = FeatureWriter.write

    def slow_write(self, *args, **kwargs):
        started.set()
        release.wait(10)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(FeatureWriter, "write", slow_write)
    writer = FeatureWriter(tmp_path / "s.h5", make_meta(), ids(n), fsync=False)
    with pytest.raises(RuntimeError, match="fall outside the chunk"):
        with ChunkWriter(writer, 0, chunk, CPU) as chunks:
            for rows, out, present in _in_order(chunk, 4):
                chunks.add(rows, out, present)  # chunk 0 full: its write starts and blocks
            assert started.wait(10)
            threading.Timer(0.2, release.set).start()
            chunks.add(np.array([chunk + 20]), encoded(np.array([chunk + 20]), 2), np.ones(1, bool))
    assert writer.next_row == chunk  # the leaving block waited for chunk 0 to be committed
    writer.close()


def test_title_encoder_equals_the_tokenizer_call_and_falls_back(tmp_path):
    import transformers

    from extractors.tokenizer import train_wordpiece

    titles = ["Stocks rally as markets rise", "", "   ", "ÉLAN café naïve — “quotes” 日本語 🎉",
              "word " * 80, "UPPER lower MiXeD\tTab\nnewline"]
    fast = train_wordpiece(titles * 3)

    def call(tokenizer):
        out = tokenizer(titles, truncation=True, max_length=12, padding="max_length", return_tensors="np")
        return out["input_ids"], out["attention_mask"]

    backend = _TitleEncoder(fast, 12)
    assert backend._backend is not None
    got = backend(titles)
    assert all(np.array_equal(a, b) and a.dtype == np.int64 for a, b in zip(got, call(fast)))
    assert backend._backend is not None  # agreed on the check: stays on the backend

    vocab = tmp_path / "vocab.txt"
    vocab.write_text("".join(f"{t}\n" for t, _ in sorted(fast.get_vocab().items(), key=lambda kv: kv[1])))
    # The pure-Python BERT tokenizer: BertTokenizerLegacy in transformers 5, BertTokenizer before.
    slow = getattr(transformers, "BertTokenizerLegacy", transformers.BertTokenizer)(vocab_file=str(vocab))
    assert not slow.is_fast
    encoder = _TitleEncoder(slow, 12)
    assert encoder._backend is None
    assert all(np.array_equal(a, b) for a, b in zip(encoder(titles), call(slow)))

    disagreeing = _TitleEncoder(fast, 12)
    disagreeing._backend.enable_padding(length=12, pad_id=fast.pad_token_id + 1)  # a backend gone wrong
    assert all(np.array_equal(a, b) for a, b in zip(disagreeing(titles), call(fast)))
    assert disagreeing._backend is None


def test_default_workers(monkeypatch):
    for cores, gpu, cpu in ((16, 14, 4), (2, 1, 2), (1, 1, 1), (64, 16, 4)):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid, c=cores: set(range(c)), raising=False)
        assert default_workers(torch.device("cuda")) == gpu
        assert default_workers("cpu", rows=65_238) == default_workers(CPU) == cpu
        assert default_workers("cpu", rows=294) == 0  # a tiny catalogue decodes faster than workers start


# ---- on the tiny world -------------------------------------------------------------------


def head(catalogue, n: int):
    return dataclasses.replace(catalogue, ids=catalogue.ids[:n], title=catalogue.title[:n],
                               category=catalogue.category[:n], subcategory=catalogue.subcategory[:n],
                               abstract=catalogue.abstract[:n], title_entities=catalogue.title_entities[:n],
                               index={x: i for i, x in enumerate(catalogue.ids[:n])})


@pytest.mark.parametrize("spec", ["vit", "blip"])
def test_card_workers_give_the_same_store(tiny_world, tmp_path, spec):
    catalogue = head(load_catalogue(tiny_world), 40)
    extractor = create(spec, titles=[str(t) for t in catalogue.title], workdir=tmp_path / "work")
    stores = {}
    for workers in (0, 2):
        result = extract_catalogue(extractor, catalogue, tmp_path / f"w{workers}", batch_size=8, chunk_rows=16,
                                   device="cpu", num_workers=workers, progress=False)
        assert result.images == {"ok": int(result.present), "missing": 40 - int(result.present)}
        stores[workers] = read(result.path)
    for name in ("vectors", "present", "tokens", "mask"):
        assert np.array_equal(getattr(stores[0], name), getattr(stores[2], name)), name
    assert stores[0].extras.keys() == stores[2].extras.keys() == ({"image_embeds", "text_embeds"} if spec == "blip"
                                                                  else set())
    for name in stores[0].extras:
        assert np.array_equal(stores[0].extras[name], stores[2].extras[name]), name


def test_a_blip_store_keeps_the_unimodal_embeddings_the_extractor_returns(tiny_world, tmp_path, monkeypatch):
    from extractors.images import CardDataset, normalize
    from rankers.data import load_features

    n, batch = 24, 8
    catalogue = head(load_catalogue(tiny_world), n)
    titles = [str(t) for t in catalogue.title]
    blip = create("blip", titles=titles, workdir=tmp_path / "work")
    width = blip.projection_dim
    assert blip.extras == {"image_embeds": width, "text_embeds": width} and width != blip.dim
    result = extract_catalogue(blip, catalogue, tmp_path, batch_size=batch, chunk_rows=16, device="cpu",
                               dtype="float32", progress=False)

    # The same inputs, batch for batch: the cards as extraction decodes them, the titles as
    # the extractor tokenises them.
    cards = CardDataset([catalogue.image_path(i) for i in range(n)], titles, [str(c) for c in catalogue.category],
                        blip.transform, blip.config.missing, uint8=True)
    mean, std = blip.transform.stats(CPU)
    outs = []
    for start in range(0, n, batch):
        pixels = normalize(torch.stack([cards[i][0] for i in range(start, start + batch)]), mean, std)
        outs.append(blip.encode(titles[start:start + batch], pixels))
    expected = {name: torch.cat([o.extras[name] for o in outs]).numpy() for name in blip.extras}  # (N, E)
    vectors = torch.cat([o.vectors for o in outs]).numpy()  # (N, D)

    with FeatureStore.open(result.path) as store:
        assert store.meta.extras == blip.extras
        got = store.load(extras=True)
        gathered = store.take_extra("text_embeds", [5, 0, 5])
    assert np.array_equal(got.vectors, vectors)  # the image-grounded vector is still `vectors`
    for name, values in expected.items():
        assert got.extras[name].shape == (n, width) and np.array_equal(got.extras[name], values), name
    assert np.array_equal(gathered, expected["text_embeds"][[5, 0, 5]])
    assert not np.allclose(expected["image_embeds"], expected["text_embeds"])  # two different embeddings
    features = load_features(result.path, catalogue, tokens=False, extras=True)
    assert np.array_equal(features.vectors, vectors)
    assert all(np.array_equal(features.extras[name], values) for name, values in expected.items())

    # A pooled load (and a load with tokens) reads no byte of the extras' data.
    with h5py.File(result.path, "r") as f:
        extras_at = [(f[f"extras/{name}"].id.get_offset(), f[f"extras/{name}"].id.get_storage_size())
                     for name in blip.extras]
        vectors_at = f["vectors"].id.get_offset()
    reads, real = [], os.preadv

    def spy(fd, buffers, offset):
        reads.append((offset, offset + sum(len(b) for b in buffers)))
        return real(fd, buffers, offset)

    monkeypatch.setattr(os, "preadv", spy)
    pooled = load_features(result.path, catalogue, tokens=False)
    with FeatureStore.open(result.path) as store:
        full = store.load(tokens=True)
    monkeypatch.undo()
    assert pooled.extras == {} and full.extras == {} and full.tokens is not None
    assert any(lo <= vectors_at < hi for lo, hi in reads)  # the spy sees the data reads
    touched = [(lo, hi) for lo, hi in reads for at, size in extras_at if lo < at + size and at < hi]
    assert not touched, touched


def test_finetuned_mode_and_extra_preprocess_name_and_key_the_store(tiny_world, tmp_path):
    catalogue = head(load_catalogue(tiny_world), 24)
    bert = create("bert", titles=[str(t) for t in catalogue.title], workdir=tmp_path / "work")
    frozen = extract_catalogue(bert, catalogue, tmp_path, batch_size=8, chunk_rows=8, progress=False)
    assert frozen.path.name.endswith("__bert-tiny__frozen.h5")
    assert store_meta(bert, catalogue, True, "float16") == read_meta(frozen.path)  # default unchanged
    assert read_meta(frozen.path).extras == {}  # a text extractor keeps no extras ...
    with h5py.File(frozen.path, "r") as f:
        assert "extras" not in f and "extras" not in f.attrs  # ... and its store is laid out as before them
    with FeatureStore.open(frozen.path) as store:
        assert store.load(extras=True).extras == {}
        with pytest.raises(PipelineError, match="no extra vectors 'image_embeds' .*keeps: none"):
            store.take_extra("image_embeds", [0])

    record = {"finetune": {"weights_sha256": "ab" * 32, "fusion": "hadamard"}}
    tuned = extract_catalogue(bert, catalogue, tmp_path, batch_size=8, chunk_rows=8, progress=False,
                              mode="finetuned", extra_preprocess=record)
    assert tuned.path.name.endswith("__bert-tiny__finetuned.h5") and not tuned.cached
    meta = read_meta(tuned.path)
    assert meta == store_meta(bert, catalogue, True, "float16", "finetuned", record)
    assert meta.mode == "finetuned" and meta.preprocess["finetune"] == record["finetune"]
    assert meta.preprocess["pooling"] == bert.config.pooling  # the extractor config is all there too
    again = extract_catalogue(bert, catalogue, tmp_path, batch_size=8, chunk_rows=8, progress=False,
                              mode="finetuned", extra_preprocess=record)
    assert again.cached
    other = {"finetune": {**record["finetune"], "weights_sha256": "cd" * 32}}
    redone = extract_catalogue(bert, catalogue, tmp_path, batch_size=8, chunk_rows=8, progress=False,
                               mode="finetuned", extra_preprocess=other)
    assert not redone.cached and redone.path == tuned.path
    assert read_meta(tuned.path).preprocess["finetune"]["weights_sha256"] == "cd" * 32
    assert extract_catalogue(bert, catalogue, tmp_path, batch_size=8, chunk_rows=8, progress=False).cached
    with pytest.raises(ValueError, match="may not replace the extractor config's keys: pooling"):
        store_meta(bert, catalogue, True, "float16", "finetuned", {"pooling": "cls"})


def read_meta(path: Path) -> StoreMeta:
    with FeatureStore.open(path) as store:
        return store.meta
