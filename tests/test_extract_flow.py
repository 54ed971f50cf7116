"""The extraction flow on the tiny world: stores, cache, resume after kill -9, CLI errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from extractors.registry import create
from extractors.run import extract_catalogue
from storage.catalogue import load_catalogue
from storage.features import FeatureStore, progress_path, verify

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def world(tiny_world) -> Path:
    return tiny_world


def cli(*args: str, env_root: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "MMNEWS_STORAGE": str(env_root)}
    return subprocess.run(
        [sys.executable, "-m", "flows.extract", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )


def test_flow_writes_three_complete_stores_and_reruns_from_cache(world, tmp_path, prefect_harness):
    from flows.extract import ExtractParams, build_flow

    flow = build_flow()
    params = ExtractParams(data=world, extractors=["bert", "vit", "blip"], storage=tmp_path, progress=False)
    rows = flow(params)
    assert [r["extractor"] for r in rows] == ["bert:tiny", "vit:tiny", "blip:tiny"]
    catalogue = load_catalogue(world)
    for r in rows:
        assert not r["cached"]
        assert verify(r["store"]).ok
        with FeatureStore.open(r["store"], expected_fingerprint=catalogue.fingerprint()) as store:
            arrays = store.load()
            assert list(arrays.ids) == list(catalogue.ids)
            assert arrays.vectors.shape == (len(catalogue), r["dim"])
            assert np.isfinite(arrays.vectors).all()
            assert arrays.tokens.shape[:2] == arrays.mask.shape == (len(catalogue), r["token_len"])
            expected_present = len(catalogue.images) if r["modality"] != "text" else len(catalogue)
            assert int(arrays.present.sum()) == expected_present
    assert rows[1]["images"] == {"ok": len(catalogue.images), "missing": len(catalogue) - len(catalogue.images)}

    mtimes = {r["store"]: os.stat(r["store"]).st_mtime_ns for r in rows}
    again = flow(params)
    assert all(r["cached"] for r in again)
    assert {r["store"]: os.stat(r["store"]).st_mtime_ns for r in again} == mtimes


def test_changed_settings_extract_again(world, tmp_path):
    catalogue = load_catalogue(world)
    vit = create("vit")
    first = extract_catalogue(vit, catalogue, tmp_path, progress=False)
    cover = create("vit", crop="cover")
    second = extract_catalogue(cover, catalogue, tmp_path, progress=False)
    assert second.path == first.path and not second.cached
    with FeatureStore.open(second.path) as store:
        assert store.meta.preprocess["crop"] == "cover"


@pytest.mark.parametrize("spec", ["bert", "vit"])
def test_killed_extraction_resumes_to_identical_store(world, tmp_path, spec):
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    catalogue = load_catalogue(world)
    child = subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "_slow_extract.py"), str(world), str(killed), spec], cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    store_name = f"{catalogue.name}__{spec}-tiny__frozen.h5"
    progress = progress_path(killed / store_name)
    deadline = time.monotonic() + 120
    committed = 0
    while time.monotonic() < deadline and child.poll() is None:
        if progress.exists():
            try:
                committed = json.loads(progress.read_text()).get("committed_rows", 0)
            except (json.JSONDecodeError, OSError):
                committed = 0
            if committed >= 48:
                break
        time.sleep(0.02)
    assert child.poll() is None, "the child finished before it could be killed"
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert not (killed / store_name).exists()

    extractor = create(spec, titles=[str(t) for t in catalogue.title], workdir=killed / "work")
    resumed = extract_catalogue(extractor, catalogue, killed, batch_size=8, chunk_rows=16, device="cpu", progress=False)
    assert 48 <= resumed.resumed_from < len(catalogue)
    fresh = create(spec, titles=[str(t) for t in catalogue.title], workdir=clean / "work")
    reference = extract_catalogue(fresh, catalogue, clean, batch_size=8, chunk_rows=16, device="cpu", progress=False)
    with FeatureStore.open(resumed.path) as a, FeatureStore.open(reference.path) as b:
        x, y = a.load(), b.load()
    assert np.array_equal(x.ids, y.ids) and np.array_equal(x.present, y.present)
    assert np.array_equal(x.vectors, y.vectors)
    assert np.array_equal(x.tokens, y.tokens) and np.array_equal(x.mask, y.mask)


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--extractor", "clip"], "unknown extractor 'clip'"),
        (["--data", "/no/such/folder"], "data folder /no/such/folder does not exist"),
        (["--extractor", "bert:no-org/no-model"], "cannot load text checkpoint 'no-org/no-model'"),
        (["--extractor", "vit:./no/dir"], "cannot load vision checkpoint './no/dir'"),
        (["--batch-size", "0"], "--batch-size"),
    ],
)
def test_cli_errors_are_one_line(args, expected, tmp_path):
    done = cli(*args, env_root=tmp_path)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert expected in done.stderr
    assert done.stderr.strip().count("\n") == 0


def test_cli_help_explains():
    done = subprocess.run([sys.executable, "-m", "flows.extract", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0 and "--extractor" in done.stdout and "tiny" in done.stdout
