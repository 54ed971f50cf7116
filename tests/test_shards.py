"""Sharded extraction: shard plans, shards merged to the single-process store (BLIP's extra
vectors included), a shard killed mid-way resumed, refused merges, retried disk errors, and the
flow on a 2-worker LocalCluster."""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from extractors.registry import create
from extractors.run import extract_catalogue, merge_sharded, plan_sharded
from storage.catalogue import load_catalogue
from storage.errors import PipelineError
from storage.features import FeatureStore, StoreIOError, progress_path, verify
from storage.shards import Shard, check_shards, plan_shards, recorded_bounds, shard_bounds, shard_path

ROOT = Path(__file__).resolve().parents[1]
BATCH, CHUNK = 8, 16  # 294 tiny news -> 19 chunks; two shards: rows 0..143 and 144..293
FIELDS = ("ids", "vectors", "present", "tokens", "mask")

# A worker process extracting one shard slowly enough to be killed between commits.
SLOW_SHARD = """
import sys, time
from pathlib import Path
from extractors.registry import create
from extractors.run import extract_catalogue, plan_sharded
from storage.catalogue import load_catalogue

data, features, index = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
catalogue = load_catalogue(data)
extractor = create("bert", titles=[str(t) for t in catalogue.title], workdir=features / "work")
plan = plan_sharded(extractor, catalogue, features, 2, batch_size=8, chunk_rows=16)
forward = extractor.forward

def slow_forward(*args, **kwargs):
    time.sleep(0.05)
    return forward(*args, **kwargs)

extractor.forward = slow_forward
extract_catalogue(extractor, catalogue, features, batch_size=8, chunk_rows=16, device="cpu", progress=False,
                  shard=plan.shards[index])
"""


@pytest.fixture(scope="module")
def catalogue(tiny_world):
    return load_catalogue(tiny_world)


def bert(catalogue, features: Path):
    return create("bert", titles=[str(t) for t in catalogue.title], workdir=features / "work")


def extract(extractor, catalogue, features: Path, shard: Shard | None = None, **kw):
    return extract_catalogue(extractor, catalogue, features, batch_size=BATCH, chunk_rows=CHUNK, device="cpu",
                             progress=False, shard=shard, **kw)


@pytest.fixture(scope="module")
def reference(catalogue, tmp_path_factory):
    """bert:tiny over the tiny world in one process, loaded."""
    features = tmp_path_factory.mktemp("single")
    result = extract(bert(catalogue, features), catalogue, features)
    with FeatureStore.open(result.path) as store:
        return store.load(extras=True)


def assert_same(path: Path, expected) -> None:
    assert verify(path).ok
    with FeatureStore.open(path) as store:
        got = store.load(extras=True)
    for name in FIELDS:
        assert np.array_equal(getattr(got, name), getattr(expected, name)), name
    assert got.extras.keys() == expected.extras.keys()
    for name in got.extras:
        assert np.array_equal(got.extras[name], expected.extras[name]), name


def raw_datasets(path: Path) -> dict[str, bytes]:
    """Every numeric dataset's bytes, digest tables included, read by h5py alone."""
    out = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, obj: out.update({name: obj[()].tobytes()})
                     if isinstance(obj, h5py.Dataset) and name != "news_ids" else None)
    return out


@settings(max_examples=300, deadline=None)
@given(rows=st.integers(0, 5000), shards=st.integers(1, 16), chunk=st.integers(1, 600))
def test_shard_bounds_are_whole_chunks_covering_every_row_once(rows, shards, chunk):
    bounds = shard_bounds(rows, shards, chunk)
    chunks = max(1, -(-rows // chunk))
    assert len(bounds) == min(shards, chunks)
    assert bounds[0][0] == 0 and bounds[-1][1] == rows
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
    assert all(start % chunk == 0 for start, _ in bounds)
    assert all(stop > start for start, stop in bounds) or rows == 0
    sizes = [-(-(stop - start) // chunk) for start, stop in bounds]  # chunks per shard
    assert max(sizes) - min(sizes) <= 1


def test_shard_files_are_named_after_the_store(tmp_path):
    store = tmp_path / "mind__bert-tiny__frozen.h5"
    assert shard_path(store, 0, 2) == tmp_path / "shards" / "mind__bert-tiny__frozen.shard-00-of-02.h5"
    assert shard_path(store, 7, 120).name == "mind__bert-tiny__frozen.shard-007-of-120.h5"
    planned = plan_shards(store, 294, 4, 128)  # only 3 chunks: 3 shards
    assert [(s.index, s.count, s.start, s.stop) for s in planned] == [(0, 3, 0, 128), (1, 3, 128, 256), (2, 3, 256, 294)]
    assert planned[2].path.name.endswith("shard-02-of-03.h5")


def test_two_shards_merge_to_the_single_process_store(catalogue, reference, tmp_path):
    extractor = bert(catalogue, tmp_path)
    plan = plan_sharded(extractor, catalogue, tmp_path, 2, batch_size=BATCH, chunk_rows=CHUNK)
    assert [(s.start, s.stop) for s in plan.shards] == [(0, 144), (144, 294)]
    for shard in plan.shards:
        result = extract(extractor, catalogue, tmp_path, shard)
        assert result.path == shard.path and result.rows == shard.rows and not result.cached
        assert recorded_bounds(shard.path) == {"shard_index": shard.index, "shard_count": 2, "shard_start": shard.start,
                                               "shard_stop": shard.stop, "shard_of_rows": len(catalogue)}
    merged = merge_sharded(plan, catalogue)
    assert merged.path == tmp_path / f"{catalogue.name}__bert-tiny__frozen.h5" and not merged.cached
    assert_same(merged.path, reference)
    assert not (tmp_path / "shards").exists()  # shards are redundant once merged
    assert merge_sharded(plan, catalogue).cached


@pytest.mark.parametrize("spec", ["vit", "blip"])
def test_image_shards_merge_to_the_single_process_store(catalogue, tmp_path, spec):
    head = 40  # 40 news in 3 chunks: the DataLoader path, kept cheap
    small = dataclasses.replace(catalogue, ids=catalogue.ids[:head], title=catalogue.title[:head],
                                category=catalogue.category[:head], subcategory=catalogue.subcategory[:head],
                                abstract=catalogue.abstract[:head], title_entities=catalogue.title_entities[:head],
                                index={n: i for i, n in enumerate(catalogue.ids[:head])})
    extractor = create(spec, titles=[str(t) for t in small.title], workdir=tmp_path / "work")
    single = extract(extractor, small, tmp_path / "single")
    with FeatureStore.open(single.path) as store:
        expected = store.load(extras=True)
    assert 0 < int(expected.present.sum()) < head  # some covers, some title-only cards
    # BLIP keeps its unimodal embeddings beside the grounded vectors; ViT keeps none.
    assert expected.extras.keys() == ({"image_embeds", "text_embeds"} if spec == "blip" else set())
    plan = plan_sharded(extractor, small, tmp_path / "sharded", 2, batch_size=BATCH, chunk_rows=CHUNK)
    assert plan.meta.extras == getattr(extractor, "extras", {})
    assert [(s.start, s.stop) for s in plan.shards] == [(0, 16), (16, 40)]
    for shard in plan.shards:
        extract(extractor, small, tmp_path / "sharded", shard)
    merged = merge_sharded(plan, small).path
    assert_same(merged, expected)
    assert raw_datasets(merged) == raw_datasets(single.path)  # byte for byte, digest tables included


def test_killed_shard_resumes_and_the_complete_one_is_reused(catalogue, reference, tmp_path):
    extractor = bert(catalogue, tmp_path)
    plan = plan_sharded(extractor, catalogue, tmp_path, 2, batch_size=BATCH, chunk_rows=CHUNK)
    first, second = plan.shards
    extract(extractor, catalogue, tmp_path, first)
    before = (os.stat(first.path).st_mtime_ns, first.path.read_bytes())

    child = subprocess.Popen([sys.executable, "-c", SLOW_SHARD, str(catalogue.root), str(tmp_path), "1"], cwd=ROOT,
                             env={**os.environ, "PYTHONPATH": str(ROOT)})
    progress = progress_path(second.path)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and child.poll() is None:
        try:
            if json.loads(progress.read_text()).get("committed_rows", 0) >= 32:
                break
        except (FileNotFoundError, json.JSONDecodeError):
            pass
        time.sleep(0.02)
    assert child.poll() is None, "the shard finished before it could be killed"
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert not second.path.exists()

    with pytest.raises(PipelineError, match=r"shard-01-of-02 .*not complete \(\d+ of 150 rows committed.*resume"):
        merge_sharded(plan, catalogue)
    results = [extract(extractor, catalogue, tmp_path, shard) for shard in plan.shards]
    assert results[0].cached and not results[1].cached
    assert 32 <= results[1].resumed_from < second.rows and results[1].resumed_from % CHUNK == 0
    assert (os.stat(first.path).st_mtime_ns, first.path.read_bytes()) == before
    assert_same(merge_sharded(plan, catalogue).path, reference)


def test_merge_refuses_missing_mismatched_and_misplaced_shards(catalogue, tmp_path):
    extractor = bert(catalogue, tmp_path)
    plan = plan_sharded(extractor, catalogue, tmp_path, 2, batch_size=BATCH, chunk_rows=CHUNK)
    first, second = plan.shards
    extract(extractor, catalogue, tmp_path, first)
    with pytest.raises(PipelineError, match=rf"shard-01-of-02 .*{second.path}: missing; re-run the sharded extraction"):
        merge_sharded(plan, catalogue)

    extract(extractor, catalogue, tmp_path, second, dtype="float32")
    with pytest.raises(PipelineError, match=r"shard-01-of-02.*does not belong to this store: dtype: file has "
                                            r"'float32', this run has 'float16'"):
        merge_sharded(plan, catalogue)

    second.path.write_bytes(first.path.read_bytes())  # shard 0's file under shard 1's name
    with pytest.raises(PipelineError, match=r"rows: file has 144, the range 144..293 has 150"):
        merge_sharded(plan, catalogue)
    assert not plan.path.exists()

    gap = [first, dataclasses.replace(second, start=160)]
    with pytest.raises(PipelineError, match=r"starts at row 160 but the previous shard ends at row 144 \(a gap\)"):
        check_shards(gap, plan.meta, catalogue.ids)
    with pytest.raises(PipelineError, match=r"not the whole set of 2"):
        check_shards([first], plan.meta, catalogue.ids)


def test_disk_error_is_distinguishable_and_a_retry_resumes(catalogue, reference, tmp_path, monkeypatch):
    extractor = bert(catalogue, tmp_path)
    real, calls = os.pwrite, {"n": 0}

    def flaky(fd, data, offset):
        calls["n"] += 1
        if calls["n"] == 12:  # inside the third chunk
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", flaky)
    with pytest.raises(StoreIOError, match="No space left"):
        extract(extractor, catalogue, tmp_path)
    again = extract(extractor, catalogue, tmp_path)  # same process: the lock was released
    assert again.resumed_from == 2 * CHUNK
    assert_same(again.path, reference)


def test_shard_task_retries_disk_errors_only(tmp_path, prefect_harness, monkeypatch):
    from prefect import flow

    import flows.extract as fx

    monkeypatch.setattr(fx, "RETRY_DELAY_S", 0)
    calls = []

    def flaky(spec, params, shard):
        calls.append(spec)
        if spec == "io" and len(calls) == 1:
            raise StoreIOError("disk hiccup")
        if spec == "bad":
            raise PipelineError("a user-fixable problem")
        return {"extractor": spec}

    monkeypatch.setattr("runs.extract.shard_row", flaky)
    _, shard_one, _ = fx.shard_tasks()
    shard = Shard(0, 1, 0, 1, tmp_path / "s.h5")

    @flow
    def one(spec: str):
        state = shard_one(spec, fx.ExtractParams(), shard, return_state=True)
        return (True, state.message) if state.is_failed() else (False, state.result())

    assert one("io") == (False, {"extractor": "io"}) and calls == ["io", "io"]
    calls.clear()
    assert one("bad") == (True, "a user-fixable problem") and calls == ["bad"]


def test_flow_with_two_dask_workers_computes_the_missing_shard_and_merges(
    tiny_world, catalogue, reference, tmp_path, prefect_harness
):
    from flows.extract import ExtractParams, build_flow
    from runs.extract import summary_markdown

    features = tmp_path / "features"
    params = ExtractParams(data=tiny_world, extractors=["bert"], shards=2, batch_size=BATCH, chunk_rows=CHUNK,
                           device="cpu", storage=tmp_path, progress=False)
    # The flow's own extractor (same tokenizer folder) computes shard 0 first: as a killed
    # run leaves it, the flow must reuse that shard and compute only the other.
    workdir = features / f"{catalogue.name}__tokenizer-{catalogue.fingerprint()[:12]}"
    extractor = create("bert", titles=[str(t) for t in catalogue.title], workdir=workdir)
    plan = plan_sharded(extractor, catalogue, features, 2, batch_size=BATCH, chunk_rows=CHUNK)
    extract(extractor, catalogue, features, plan.shards[0])

    flow = build_flow()
    (row,) = flow(params)
    assert row["shards"] == {"count": 2, "computed": 1, "reused": 1, "resumed": 0}
    assert not row["cached"] and row["rows"] == len(catalogue) and row["store"] == str(plan.path)
    assert "merged 2 shards: 1 computed, 1 reused" in summary_markdown([row], tiny_world)
    assert_same(plan.path, reference)
    assert not (features / "shards").exists()

    mtime = os.stat(plan.path).st_mtime_ns
    (again,) = flow(params)  # a complete store: no cluster, no shard, no merge
    assert again["cached"] and again["shards"]["computed"] == 0
    assert os.stat(plan.path).st_mtime_ns == mtime


def test_scheduler_without_shards_or_unreachable_is_refused():
    from pydantic import ValidationError

    from runs.extract import reach_scheduler
    from runs.params import ExtractParams

    with pytest.raises(ValidationError, match="--scheduler needs --shards 2 or more"):
        ExtractParams(scheduler="tcp://127.0.0.1:8786", extractors=["bert"])
    with pytest.raises(PipelineError, match=r"no Dask scheduler answers at tcp://127.0.0.1:1 .*leave --scheduler out"):
        reach_scheduler(ExtractParams(scheduler="tcp://127.0.0.1:1", shards=2, extractors=["bert"]).scheduler)


@pytest.mark.slow
def test_flow_survives_a_dask_worker_killed_mid_shard(tiny_world, reference, tmp_path, prefect_harness):
    import threading

    import psutil

    from flows.extract import ExtractParams, build_flow

    killed: list[tuple[int, str, int]] = []
    done = threading.Event()

    def kill_a_worker_writing_a_shard() -> None:
        # Only a process this test started: a Dask worker holding a shard's partial open.
        while not done.is_set():
            for child in psutil.Process().children(recursive=True):
                try:
                    # This test's partials only: a process caught between fork and exec holds
                    # whatever its parent has open.
                    partials = [f.path for f in child.open_files()
                                if f.path.endswith(".h5.partial") and f.path.startswith(str(tmp_path))]
                except psutil.Error:
                    continue
                for partial in partials:
                    try:
                        committed = json.loads(Path(f"{partial}.json").read_text())["committed_rows"]
                    except (OSError, ValueError, KeyError):
                        continue
                    if committed >= CHUNK:
                        child.kill()
                        killed.append((child.pid, partial, committed))
                        return
            time.sleep(0.01)

    killer = threading.Thread(target=kill_a_worker_writing_a_shard, daemon=True)
    killer.start()
    params = ExtractParams(data=tiny_world, extractors=["bert"], shards=2, batch_size=BATCH, chunk_rows=CHUNK,
                           device="cpu", storage=tmp_path, progress=False)
    try:
        (row,) = build_flow()(params)
    finally:
        done.set()
        killer.join()
    if not killed:
        pytest.skip("both shards finished before a worker could be killed mid-shard")
    # Dask reran the dead worker's shard elsewhere; it resumed from the rows committed before the kill.
    assert row["shards"] == {"count": 2, "computed": 2, "reused": 0, "resumed": 1}
    assert_same(Path(row["store"]), reference)
