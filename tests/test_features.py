"""HDF5 feature store: round trips, gathers, refusals, read-only use, resume, kill -9,
checksums (issue 11), pooled loads that leave token vectors unread (issue 13) and extra
vectors (BLIP's unimodal embeddings, issue 12), which most stores here carry."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

import storage.features as features_module
from storage.errors import PipelineError
from storage.features import (
    BLOCK_BYTES,
    FeatureStore,
    FeatureWriter,
    StoreIOError,
    main,
    partial_path,
    progress_path,
    store_path,
    verify,
)

REPO = Path(__file__).resolve().parents[1]
HELPER = Path(__file__).with_name("_store_writer.py")
_spec = importlib.util.spec_from_file_location("_store_writer", HELPER)
sw = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sw)

ROWS, DIM, TOKENS = 400, 16, 4
EXTRAS = {"image_embeds": 8, "text_embeds": 12}  # two widths, so a mix-up cannot pass
EXTRAS_ARG = "image_embeds=8,text_embeds=12"  # the same, for the writer process
NUMERIC = ("vectors", "present", "tokens", "mask", "extras/image_embeds", "extras/text_embeds")


def _put(writer: FeatureWriter, start: int, stop: int, dim: int = DIM, token_len: int | None = TOKENS,
         extras: dict[str, int] | None = EXTRAS) -> int:
    """Write rows start..stop-1 of the deterministic store, extras included when declared."""
    return writer.write(*sw.make_rows(start, stop, dim, token_len), extras=sw.make_extras(start, stop, extras))


def _write(path: Path, rows: int = ROWS, chunk: int = 37, token_len: int | None = TOKENS,
           block_bytes: int = BLOCK_BYTES, dim: int = DIM, extras: dict[str, int] | None = EXTRAS,
           **meta_kw) -> Path:
    meta = sw.make_meta(dim, token_len, extras=extras, **meta_kw)
    with FeatureWriter(path, meta, sw.make_ids(rows), fsync=False, block_bytes=block_bytes) as writer:
        for start in range(writer.next_row, rows, chunk):
            _put(writer, start, min(start + chunk, rows), dim, token_len, extras)
        return writer.finalize()


def _expected(rows: int = ROWS, token_len: int | None = TOKENS, dtype: str = "float32"):
    vec, pres, tok, msk = sw.make_rows(0, rows, DIM, token_len)
    cast = np.dtype(dtype)
    return vec.astype(cast), pres, None if tok is None else tok.astype(cast), msk


def _expected_extras(rows: int = ROWS, extras: dict[str, int] | None = EXTRAS,
                     dtype: str = "float32") -> dict[str, np.ndarray]:
    return {name: e.astype(dtype) for name, e in (sw.make_extras(0, rows, extras) or {}).items()}


def _datasets(path: Path) -> dict[str, bytes]:
    """Every dataset's content as bytes, digest tables and extras included, straight from
    h5py (no store code involved)."""
    out = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, obj: out.update({name: obj[()].tobytes()})
                     if isinstance(obj, h5py.Dataset) and name != "news_ids" else None)
        out["news_ids"] = "\n".join(f["news_ids"].asstr()[:]).encode()
    return out


def _flip(path: Path, name: str, nbytes: int = 64) -> int:
    """Invert `nbytes` bytes in the middle of dataset `name`'s data; returns the first row hit."""
    with h5py.File(path, "r") as f:
        offset, size = f[name].id.get_offset(), f[name].id.get_storage_size()
        row_bytes = size // f[name].shape[0]
    at = offset + size // 2
    with open(path, "r+b") as fh:
        fh.seek(at)
        chunk = fh.read(nbytes)
        fh.seek(at)
        fh.write(bytes(b ^ 0xFF for b in chunk))
    return (size // 2) // row_bytes


def _info(path: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "storage.features", "info", str(path), *extra],
                          cwd=REPO, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})


@pytest.fixture(scope="module")
def complete_store(tmp_path_factory) -> Path:
    return _write(tmp_path_factory.mktemp("complete") / "store.h5")


def test_store_path_is_one_safe_file_per_dataset_extractor_mode(tmp_path):
    path = store_path(tmp_path, "mind small/dev", "google/vit-base__patch16", "finetuned")
    assert path == tmp_path / "mind-small-dev__google-vit-base_patch16__finetuned.h5"
    assert store_path(tmp_path, "x" * 300, "bert", "frozen").name.count("__") == 2
    assert len(store_path(tmp_path, "x" * 300, "bert", "frozen").name) < 120
    with pytest.raises(PipelineError, match="mode"):
        store_path(tmp_path, "mind", "bert", "trained")
    with pytest.raises(PipelineError, match="filename-safe"):
        store_path(tmp_path, "///", "bert", "frozen")


@pytest.mark.parametrize("token_len,dtype,extras", [(None, "float32", None), (TOKENS, "float16", EXTRAS)])
def test_round_trip_is_exact(tmp_path, token_len, dtype, extras):
    path = _write(tmp_path / "s.h5", token_len=token_len, dtype=dtype, extras=extras)
    vec, pres, tok, msk = _expected(token_len=token_len, dtype=dtype)
    assert not partial_path(path).exists() and not progress_path(path).exists()
    with FeatureStore.open(path, expected_fingerprint=sw.FINGERPRINT) as store:
        assert store.meta == sw.make_meta(DIM, token_len, dtype=dtype, extras=extras)
        assert store.extra_names == tuple(extras or ())
        assert store.load().extras == {}  # asked for by name or True only
        more = store.load(extras=True).extras
        assert sorted(more) == sorted(extras or ())
        for name, values in _expected_extras(extras=extras, dtype=dtype).items():
            assert more[name].dtype == np.dtype(dtype) and more[name].tobytes() == values.tobytes()
            assert store.read_rows(7, 30, extras=[name]).extras[name].tobytes() == values[7:30].tobytes()
        assert len(store) == ROWS and store.dim == DIM and store.has_tokens == (token_len is not None)
        assert list(store.ids) == sw.make_ids(ROWS)
        assert store.index["N10007"] == 1
        assert set(store.versions) >= {"python", "numpy", "h5py"}
        np.testing.assert_array_equal(store.present, pres)
        arrays = store.load()
        assert arrays.vectors.dtype == np.dtype(dtype)
        assert arrays.vectors.tobytes() == vec.tobytes()
        assert arrays.present.tobytes() == pres.tobytes()
        if token_len is None:
            assert arrays.tokens is None and arrays.mask is None
            with pytest.raises(PipelineError, match="no token vectors"):
                store.take_tokens([0])
        else:
            assert arrays.tokens.tobytes() == tok.tobytes()
            np.testing.assert_array_equal(arrays.mask, msk)
    with h5py.File(path, "r") as f:
        assert bool(f.attrs["complete"]) and int(f.attrs["committed_rows"]) == ROWS
        assert json.loads(f.attrs["preprocess"]) == {"max_len": token_len or 0, "pooling": "mean"}
        assert f["vectors"].chunks is None and f["vectors"].compression is None
        # Without extras, the attributes and datasets of a store from before extras, no more.
        assert ("extras" in f.attrs, "extras" in f) == (bool(extras), bool(extras))
        if extras:
            assert json.loads(f.attrs["extras"]) == extras
            assert all(f[f"extras/{n}"].chunks is None and f[f"extras/{n}"].compression is None for n in extras)


@pytest.mark.parametrize("in_memory", [False, True])
def test_gathers_in_any_order_with_duplicates(complete_store, in_memory):
    vec, _, tok, msk = _expected()
    ids = np.array(sw.make_ids(ROWS), dtype=object)
    with FeatureStore.open(complete_store, in_memory=in_memory) as store:
        # Dense picks (one block read) and far-apart picks (sorted fancy read) both come back in order.
        for rows in ([5, 3, 5, 4, 3], [399, 0, 200, 0, 399, 17], [], list(range(ROWS))[::-1]):
            rows = np.array(rows, dtype=np.int64)
            assert store.get(ids[rows]).tobytes() == vec[rows].tobytes()
            assert store.take(rows).shape == (len(rows), DIM)
            got_tok, got_mask = store.get_tokens(ids[rows])
            assert got_tok.tobytes() == tok[rows].tobytes()
            np.testing.assert_array_equal(got_mask, msk[rows])
            for name, values in _expected_extras().items():
                assert store.get_extra(name, ids[rows]).tobytes() == values[rows].tobytes()
                assert store.take_extra(name, rows).shape == (len(rows), EXTRAS[name])
        with pytest.raises(IndexError, match="out of range"):
            store.take([0, ROWS])
        with pytest.raises(PipelineError, match="no extra vectors 'itm_score' .*keeps: image_embeds, text_embeds"):
            store.take_extra("itm_score", [0])


def test_unknown_id_is_named(complete_store):
    with FeatureStore.open(complete_store) as store:
        with pytest.raises(PipelineError, match=r"news id 'N999' is not in this feature store \(1 of 2"):
            store.get(["N10000", "N999"])


def test_fingerprint_mismatch_is_refused(complete_store):
    with pytest.raises(PipelineError) as err:
        FeatureStore.open(complete_store, expected_fingerprint="sha256:other")
    assert sw.FINGERPRINT in str(err.value) and "sha256:other" in str(err.value)
    assert "re-run extraction" in str(err.value)


def test_incomplete_store_is_refused_and_info_exits_1(tmp_path, capsys):
    path = tmp_path / "s.h5"
    writer = FeatureWriter(path, sw.make_meta(DIM, TOKENS), sw.make_ids(ROWS), fsync=False)
    writer.write(*sw.make_rows(0, 30, DIM, TOKENS))
    writer.close()
    for target in (path, partial_path(path)):
        with pytest.raises(PipelineError, match=r"interrupted \(30 of 400 rows committed\).*resume"):
            FeatureStore.open(target)
    assert main(["info", str(partial_path(path))]) == 1
    out = capsys.readouterr().out
    assert "verdict      incomplete: 30 of 400 rows committed" in out
    assert "present      24 of 30 committed rows" in out
    # A final name whose complete flag is unset (e.g. copied by hand) is refused too.
    shutil.copy(partial_path(path), tmp_path / "copied.h5")
    with pytest.raises(PipelineError, match="incomplete"):
        FeatureStore.open(tmp_path / "copied.h5")
    assert verify(tmp_path / "copied.h5").status == "incomplete"


def test_info_reports_a_complete_store(complete_store, capsys):
    assert main(["info", str(complete_store), "--check-values"]) == 0
    out = capsys.readouterr().out
    for line in ("extractor    tiny-text", "checkpoint   tiny/kill-test @ r1", "mode         frozen",
                 "rows         400", "dim          16", "dtype        float32",
                 "tokens       (400, 4, 16) with mask (400, 4)",
                 "extras       image_embeds (400, 8), text_embeds (400, 12)", f"fingerprint  {sw.FINGERPRINT}",
                 "present      320 of 400 committed rows", "non-finite   0 rows",
                 'preprocess   {"max_len": 4, "pooling": "mean"}', "verdict      complete"):
        assert line in out
    with pytest.raises(SystemExit) as exit_:
        main(["info", "--help"])
    assert exit_.value.code == 0
    assert "Exit status 0 when complete" in capsys.readouterr().out


def test_check_values_finds_nan(tmp_path, capsys):
    path = tmp_path / "nan.h5"
    with FeatureWriter(path, sw.make_meta(DIM, None), sw.make_ids(20), fsync=False) as writer:
        vec, pres, _, _ = sw.make_rows(0, 20, DIM, None)
        vec[[3, 11], 2] = np.nan
        writer.write(vec, pres)
        writer.finalize()
    assert main(["info", str(path)]) == 0
    assert main(["info", str(path), "--check-values"]) == 1
    assert "verdict      corrupt: 2 rows hold NaN or Inf" in capsys.readouterr().out


def test_truncated_store_is_refused_with_a_clear_message(complete_store, tmp_path):
    size = complete_store.stat().st_size
    for keep in (size // 2, size - 1, 100):
        broken = tmp_path / f"cut{keep}.h5"
        shutil.copy(complete_store, broken)
        os.truncate(broken, keep)
        with pytest.raises(PipelineError) as err:
            FeatureStore.open(broken)
        message = str(err.value)
        assert str(broken) in message and "corrupt or truncated" in message and "re-run extraction" in message
        assert verify(broken).status == "corrupt"
    result = _info(tmp_path / f"cut{size // 2}.h5")
    assert result.returncode == 1
    assert "verdict      corrupt" in result.stdout and "Traceback" not in result.stdout + result.stderr


def test_store_missing_a_dataset_is_refused(complete_store, tmp_path):
    broken = tmp_path / "nomask.h5"
    shutil.copy(complete_store, broken)
    with h5py.File(broken, "r+") as f:
        del f["mask"]
    with pytest.raises(PipelineError, match="missing datasets: mask"):
        FeatureStore.open(broken)
    assert main(["info", str(broken)]) == 1


def test_readers_never_write(complete_store, tmp_path, capsys):
    folder = tmp_path / "ro"
    folder.mkdir()
    path = folder / "store.h5"
    shutil.copy(complete_store, path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    stat = path.stat()
    path.chmod(0o444)
    folder.chmod(0o555)
    try:
        with FeatureStore.open(path, sw.FINGERPRINT, in_memory=True) as store:
            assert store.get(["N10007"]).shape == (1, DIM)
        with FeatureStore.open(path) as store:
            store.take_tokens([3, 1])
        assert main(["info", str(path), "--check-values"]) == 0
    finally:
        folder.chmod(0o755)
        path.chmod(0o644)
    capsys.readouterr()
    # Tests run as root, which ignores the modes: prove no write happened directly.
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest
    assert path.stat().st_mtime_ns == stat.st_mtime_ns
    assert sorted(p.name for p in folder.iterdir()) == ["store.h5"]


def test_resume_after_close_equals_uninterrupted_write(tmp_path):
    reference = _write(tmp_path / "ref.h5", chunk=ROWS)
    path = tmp_path / "s.h5"
    meta, ids = sw.make_meta(DIM, TOKENS, extras=EXTRAS), sw.make_ids(ROWS)
    for stop in (13, 150, 151, ROWS):
        with FeatureWriter(path, meta, ids, fsync=False) as writer:
            assert writer.resumed == (stop != 13)
            for start in range(writer.next_row, stop, 29):
                _put(writer, start, min(start + 29, stop))
            assert writer.next_row == stop
            if stop == ROWS:
                writer.finalize()
    assert _datasets(path) == _datasets(reference)


def test_row_writes_leave_hdf5_metadata_untouched(tmp_path):
    path = tmp_path / "s.h5"
    writer = FeatureWriter(path, sw.make_meta(DIM, TOKENS, extras=EXTRAS), sw.make_ids(ROWS), fsync=False)
    before = np.frombuffer(partial_path(path).read_bytes(), dtype=np.uint8)
    with h5py.File(partial_path(path), "r") as f:
        # The data blocks and their digest tables (written with the rows that complete a block).
        blocks = [(f[n].id.get_offset(), f[n].id.get_storage_size())
                  for n in NUMERIC + tuple(f"checksums/{n}" for n in NUMERIC)]
    for start in range(0, ROWS, 50):
        _put(writer, start, start + 50)
    after = np.frombuffer(partial_path(path).read_bytes(), dtype=np.uint8)
    writer.close()
    outside = np.ones(len(before), dtype=bool)
    for offset, size in blocks:
        outside[offset:offset + size] = False
        assert not np.array_equal(before[offset:offset + size], after[offset:offset + size])
    assert len(after) == len(before)
    # Everything HDF5 itself reads to find the data is byte-for-byte as created.
    assert np.array_equal(before[outside], after[outside])


def test_resume_with_other_meta_or_ids_is_refused_unless_restart(tmp_path):
    path = tmp_path / "s.h5"
    meta, ids = sw.make_meta(DIM, TOKENS, extras=EXTRAS), sw.make_ids(ROWS)
    with FeatureWriter(path, meta, ids, fsync=False) as writer:
        _put(writer, 0, 40)
    cases = [
        (sw.make_meta(DIM, TOKENS, checkpoint="tiny/other", extras=EXTRAS), ids,
         "checkpoint: file has 'tiny/kill-test'"),
        (sw.make_meta(DIM, TOKENS, fingerprint="sha256:new", extras=EXTRAS), ids, "fingerprint: file has"),
        (sw.make_meta(DIM, None, extras=EXTRAS), ids, "token_len: file has 4, this run has None"),
        # A BLIP store from before extras (or an extractor whose extras changed) is not resumed.
        (sw.make_meta(DIM, TOKENS), ids, "extras: file has {'image_embeds': 8, 'text_embeds': 12}, this run has {}"),
        (sw.make_meta(DIM, TOKENS, extras={**EXTRAS, "text_embeds": 16}), ids, "'text_embeds': 16}"),
        (meta, ids[:2] + ["X"] + ids[3:], "news ids differ from row 2 on"),
        (meta, ids[:-1], "rows: file has 400, this run has 399"),
    ]
    for other_meta, other_ids, reason in cases:
        with pytest.raises(PipelineError, match="restart=True") as err:
            FeatureWriter(path, other_meta, other_ids)
        assert reason in str(err.value)
    with FeatureWriter(path, meta, ids, fsync=False) as writer:
        assert writer.resumed and writer.next_row == 40
    with FeatureWriter(path, sw.make_meta(DIM, TOKENS, fingerprint="sha256:new"), ids, restart=True) as writer:
        assert not writer.resumed and writer.next_row == 0


def test_unreadable_partial_is_reported_and_started_over(tmp_path, caplog):
    path = tmp_path / "s.h5"
    meta, ids = sw.make_meta(DIM, TOKENS), sw.make_ids(ROWS)
    with FeatureWriter(path, meta, ids, fsync=False) as writer:
        writer.write(*sw.make_rows(0, 40, DIM, TOKENS))
    with open(partial_path(path), "r+b") as fh:
        fh.write(b"\xff" * 512)  # smash the superblock
    with caplog.at_level(logging.WARNING, logger="storage.features"):
        writer = FeatureWriter(path, meta, ids, fsync=False)
    assert not writer.resumed and writer.next_row == 0
    assert "cannot be reused" in writer.discarded and "starting over" in caplog.text
    writer.close()


def test_writer_guards(tmp_path):
    path = tmp_path / "s.h5"
    meta, ids = sw.make_meta(DIM, TOKENS), sw.make_ids(20)
    writer = FeatureWriter(path, meta, ids, fsync=False)
    with pytest.raises(PipelineError, match="another process is writing"):
        FeatureWriter(path, meta, ids)
    vec, pres, tok, msk = sw.make_rows(0, 20, DIM, TOKENS)
    with pytest.raises(ValueError, match="vectors must have shape"):
        writer.write(vec[:, :3], pres, tok, msk)
    with pytest.raises(ValueError, match="pass tokens and mask"):
        writer.write(vec, pres)
    with pytest.raises(ValueError, match="mask must have shape"):
        writer.write(vec, pres, tok, msk[:, :2])
    with pytest.raises(ValueError, match="extras image_embeds given but the meta declares none"):
        writer.write(vec, pres, tok, msk, extras={"image_embeds": np.zeros((20, 8))})
    writer.write(vec[:10], pres[:10], tok[:10], msk[:10])
    with pytest.raises(ValueError, match="overflow"):
        writer.write(vec, pres, tok, msk)
    with pytest.raises(PipelineError, match="only 10 of 20 rows"):
        writer.finalize()
    writer.write(vec[10:], pres[10:], tok[10:], msk[10:])
    writer.finalize()
    with pytest.raises(PipelineError, match="already exists and is complete"):
        FeatureWriter(path, meta, ids)
    with pytest.raises(PipelineError, match="occurs more than once"):
        FeatureWriter(tmp_path / "d.h5", meta, ["a", "b", "a"])
    keeper = FeatureWriter(tmp_path / "x.h5", sw.make_meta(DIM, None, extras=EXTRAS), ids, fsync=False)
    more = sw.make_extras(0, 20, EXTRAS)
    for bad, match in ((None, r"keeps extras image_embeds, text_embeds; pass exactly those \(got none\)"),
                       ({"image_embeds": more["image_embeds"]}, r"\(got image_embeds\)"),
                       ({**more, "itm": more["image_embeds"]}, r"\(got image_embeds, itm, text_embeds\)"),
                       ({**more, "text_embeds": more["image_embeds"]}, r"extras\['text_embeds'\] must have shape "
                                                                       r"\(20, 12\), got \(20, 8\)")):
        with pytest.raises(ValueError, match=match):
            keeper.write(vec, pres, extras=bad)
    assert keeper.next_row == 0  # nothing written by a refused call
    keeper.close()
    with pytest.raises(ValueError, match="must be a width >= 1"):
        sw.make_meta(DIM, None, extras={"image_embeds": 0})
    with pytest.raises(ValueError, match="letters, digits"):
        sw.make_meta(DIM, None, extras={"a/b": 3})
    # restart=True rewrites a complete store; the old one stays readable until the new one lands.
    rewriter = FeatureWriter(path, meta, ids, restart=True, fsync=False)
    with FeatureStore.open(path) as store:
        assert len(store) == 20
    rewriter.close()


def test_empty_store_round_trips(tmp_path):
    path = tmp_path / "empty.h5"
    with FeatureWriter(path, sw.make_meta(DIM, TOKENS), [], fsync=False) as writer:
        writer.finalize()
    with FeatureStore.open(path) as store:
        assert len(store) == 0 and store.take([]).shape == (0, DIM)
        assert store.load().tokens.shape == (0, TOKENS, DIM)


KILL_ROWS, KILL_CHUNK = 400, 10  # 40 chunks


def _writer_command(path: Path, *extra: str) -> list[str]:
    return [sys.executable, str(HELPER), str(path), "--rows", str(KILL_ROWS), "--chunk", str(KILL_CHUNK),
            "--dim", str(DIM), "--token-len", str(TOKENS), "--extras", EXTRAS_ARG, *extra]


def _spawn(command: list[str]) -> subprocess.Popen:
    return subprocess.Popen(command, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _run_until(proc: subprocess.Popen, marker: str) -> list[str]:
    """Lines the writer printed up to and including `marker` (all of them if it ended first)."""
    lines = []
    for line in proc.stdout:  # blocks on the writer's own progress: no fixed sleeps
        lines.append(line.strip())
        if lines[-1] == marker:
            break
    return lines


def _kill(proc: subprocess.Popen, lines: list[str]) -> list[str]:
    proc.send_signal(signal.SIGKILL)
    # Read through the file objects, not communicate(): the line iterator of _run_until may
    # have read ahead lines into proc.stdout's buffer, which communicate() would skip.
    out = proc.stdout.read()
    err = proc.stderr.read()
    proc.wait()
    assert "Traceback" not in err, err
    return lines + [line.strip() for line in out.splitlines() if line.strip()]


def _resume_point(path: Path) -> int:
    """Where a rerun continues; the probe resumes (or recreates) the partial and writes nothing."""
    with FeatureWriter(path, sw.make_meta(DIM, TOKENS, extras=EXTRAS), sw.make_ids(KILL_ROWS), fsync=False) as probe:
        assert probe.discarded is None, probe.discarded
        return probe.next_row


def _in_flight(lines: list[str]) -> int | None:
    """First row of the last chunk the writer began (None before the first)."""
    begins = [int(line.split()[1]) for line in lines if line.startswith("begin")]
    return begins[-1] if begins else None


def test_kill_9_at_random_moments_loses_at_most_the_chunk_in_flight(tmp_path, complete_store):
    path = tmp_path / "killed.h5"
    jitter = random.Random(0)
    kills = 0
    # Each run resumes the previous one's partial and is killed a little after it reports the
    # marker: during creation, inside chunk k (pwrite, fdatasync, sidecar) or while finalizing.
    for marker in ("start", "begin 0", "begin 30", "begin 90", "begin 170", "begin 260", "begin 340",
                   "begin 390", "finalize"):
        proc = _spawn(_writer_command(path, "--spin", "4000"))
        lines = _run_until(proc, marker)
        for i in range(jitter.randrange(40_000)):  # ~0-1 ms: a chunk's write takes about that long
            pass
        lines = _kill(proc, lines)
        if proc.returncode == 0:  # finished before the signal landed
            break
        assert proc.returncode == -signal.SIGKILL
        kills += 1
        if path.exists():  # killed after the final rename: nothing left to resume
            break
        resumed = _resume_point(path)
        in_flight = _in_flight(lines)
        if in_flight is None:
            assert resumed == 0
        else:
            # Everything before the chunk in flight survived; that chunk is either in or lost.
            assert resumed in (in_flight, in_flight + KILL_CHUNK), (marker, lines[-3:], resumed)
    assert kills >= 5
    if not path.exists():
        sw.write_store(path, KILL_ROWS, KILL_CHUNK, DIM, TOKENS, extras=EXTRAS)
    assert _datasets(path) == _datasets(complete_store)
    with FeatureStore.open(path, sw.FINGERPRINT) as store, FeatureStore.open(complete_store) as reference:
        assert store.meta == reference.meta
    assert not partial_path(path).exists() and not progress_path(path).exists()


# (stall spec, rows a rerun must find committed; None = the final file was already in place)
STALLS = [
    ("fsync:create:1", 0),  # layout written to .partial.tmp, not yet renamed
    ("replace:create:2", 0),  # .partial in place, first sidecar not yet
    ("pwrite:50:1", 50),  # torn write of chunk 5's vectors
    ("pwrite:50:3", 50),  # chunk 5: vectors and present written, tokens torn
    ("pwrite:50:6", 50),  # chunk 5: all but the last extras written, extras/text_embeds torn
    ("fdatasync:80:1", 80),  # chunk 8 written, not yet synced or counted
    ("fsync:120:1", 120),  # chunk 12 synced, new counter half-way to the sidecar
    ("replace:120:1", 120),  # chunk 12 synced, new counter written but not yet renamed in
    ("modify:finalize:1", KILL_ROWS),  # finalize: HDF5 attribute changed in memory only
    ("replace:finalize:1", KILL_ROWS),  # finalize: partial marked complete, not yet renamed
    ("fsync:finalize:3", None),  # finalize: renamed, sidecar not yet removed
]


@pytest.mark.parametrize("stall,committed", STALLS, ids=[s for s, _ in STALLS])
def test_kill_9_at_each_step_of_a_commit(tmp_path, complete_store, stall, committed):
    path = tmp_path / "killed.h5"
    proc = _spawn(_writer_command(path, "--stall", stall))
    lines = _kill(proc, _run_until(proc, "stalled"))
    assert lines[-1] == "stalled" and proc.returncode == -signal.SIGKILL
    if committed is None:
        assert path.exists()
    else:
        assert not path.exists()
        with pytest.raises(PipelineError, match="run extraction"):
            FeatureStore.open(path)
        assert _resume_point(path) == committed
        sw.write_store(path, KILL_ROWS, KILL_CHUNK, DIM, TOKENS, extras=EXTRAS)
    assert _datasets(path) == _datasets(complete_store)
    with FeatureStore.open(path, sw.FINGERPRINT) as store:
        assert store.load(extras=True).extras.keys() == EXTRAS.keys()  # every extras block verified
    with pytest.raises(PipelineError, match="already exists and is complete"):
        FeatureWriter(path, sw.make_meta(DIM, TOKENS, extras=EXTRAS), sw.make_ids(KILL_ROWS))
    assert not progress_path(path).exists() and not partial_path(path).exists()


# --------------------------------------------------------------------------- checksums (issue 11)

SMALL_BLOCKS = 1024  # bytes: vectors (64 B a row) make 16-row blocks, tokens (256 B) 4-row blocks,
# extras/image_embeds (32 B) 32-row blocks, extras/text_embeds (48 B) 21-row blocks


def _rows_of_block(row: int, row_bytes: int, block_bytes: int = SMALL_BLOCKS) -> str:
    per = max(1, block_bytes // row_bytes)
    lo = row // per * per
    return f"rows {lo}..{min(lo + per, ROWS) - 1}"


@pytest.fixture
def blocky_store(tmp_path) -> Path:
    return _write(tmp_path / "blocky.h5", block_bytes=SMALL_BLOCKS)


def test_a_clean_store_verifies_every_block(blocky_store, capsys):
    verdict = verify(blocky_store)
    # Blocks of 16 vector rows, 1024 present rows, 4 token rows, 256 mask rows, 32 and 21
    # extras rows: all checked.
    assert verdict.ok and verdict.blocks_checked == verdict.blocks_total == 25 + 1 + 100 + 2 + 13 + 20
    assert main(["info", str(blocky_store)]) == 0
    out = capsys.readouterr().out
    assert "checksums    sha256 per 1024-byte block of rows: 161 of 161 blocks verified" in out
    assert "every checksum verified" in out
    vec, pres, tok, msk = _expected()
    with FeatureStore.open(blocky_store) as store:
        arrays = store.load()
        assert arrays.vectors.tobytes() == vec.tobytes() and arrays.tokens.tobytes() == tok.tobytes()


def test_flipped_vector_bytes_are_refused_by_every_reader_and_by_info(blocky_store):
    row = _flip(blocky_store, "vectors")  # 64 bytes from row 200 on: one row of one block
    where = _rows_of_block(row, DIM * 4)
    fix = "delete it and re-run extraction"
    with FeatureStore.open(blocky_store) as store:
        with pytest.raises(PipelineError) as err:
            store.load()
        message = str(err.value)
        assert str(blocky_store) in message and f"checksum mismatch in vectors {where}" in message
        assert fix in message
        with pytest.raises(PipelineError, match=f"vectors {where}"):
            store.take([row])  # a dense gather: one verified read
        with pytest.raises(PipelineError, match=f"vectors {where}"):
            store.take([0, row, 399])  # far apart: blocks checked, then a fancy read
        # Blocks elsewhere are intact and still served, verified.
        vec = _expected()[0]
        assert store.take([0, 1, 399]).tobytes() == vec[[0, 1, 399]].tobytes()
    with pytest.raises(PipelineError, match=f"checksum mismatch in vectors {where}"):
        FeatureStore.open(blocky_store, in_memory=True)
    verdict = verify(blocky_store)
    assert verdict.status == "corrupt" and f"checksum mismatch in vectors {where}" in verdict.detail
    assert verdict.blocks_checked == verdict.blocks_total - 1
    result = _info(blocky_store)
    assert result.returncode == 1 and "Traceback" not in result.stdout + result.stderr
    assert f"verdict      corrupt: checksum mismatch in vectors {where}" in result.stdout
    assert "checksums    sha256 per 1024-byte block of rows: 160 of 161 blocks verified" in result.stdout


def test_flipped_token_bytes_are_refused_while_pooled_reads_go_on(blocky_store):
    row = _flip(blocky_store, "tokens")
    where = _rows_of_block(row, TOKENS * DIM * 4)
    vec, pres, tok, _ = _expected()
    with FeatureStore.open(blocky_store) as store:
        pooled = store.load(tokens=False)  # never touches the damaged tokens
        assert pooled.tokens is None and pooled.mask is None and pooled.vectors.tobytes() == vec.tobytes()
        for load in (lambda: store.load(), lambda: store.load(tokens="lazy"), lambda: store.take_tokens([row])):
            with pytest.raises(PipelineError, match=f"checksum mismatch in tokens {where}.*re-run extraction"):
                load()
        got, _ = store.take_tokens([0, 399])
        assert got.tobytes() == tok[[0, 399]].tobytes()
    result = _info(blocky_store)
    assert result.returncode == 1 and f"verdict      corrupt: checksum mismatch in tokens {where}" in result.stdout


def test_flipped_extras_bytes_are_refused_while_other_reads_go_on(blocky_store):
    row = _flip(blocky_store, "extras/text_embeds")
    where = _rows_of_block(row, EXTRAS["text_embeds"] * 4)
    vec, _, tok, _ = _expected()
    more = _expected_extras()
    with FeatureStore.open(blocky_store) as store:
        intact = store.load(tokens=True, extras=["image_embeds"])  # never touches the damaged dataset
        assert intact.tokens.tobytes() == tok.tobytes() and intact.vectors.tobytes() == vec.tobytes()
        assert intact.extras["image_embeds"].tobytes() == more["image_embeds"].tobytes()
        for load in (lambda: store.load(extras=True), lambda: store.read_rows(0, ROWS, extras=["text_embeds"]),
                     lambda: store.take_extra("text_embeds", [row]),
                     lambda: store.take_extra("text_embeds", [0, row, 399])):
            with pytest.raises(PipelineError, match=f"{blocky_store}: checksum mismatch in "
                                                    f"extras/text_embeds {where}.*re-run extraction"):
                load()
        assert store.take_extra("text_embeds", [0, 399]).tobytes() == more["text_embeds"][[0, 399]].tobytes()
    with pytest.raises(PipelineError, match=f"checksum mismatch in extras/text_embeds {where}"):
        FeatureStore.open(blocky_store, in_memory=True)  # the whole store, extras included
    verdict = verify(blocky_store)
    assert verdict.status == "corrupt" and verdict.blocks_checked == verdict.blocks_total - 1
    result = _info(blocky_store)
    assert result.returncode == 1 and "Traceback" not in result.stdout + result.stderr
    assert f"verdict      corrupt: checksum mismatch in extras/text_embeds {where}" in result.stdout


def test_extras_the_attributes_do_not_declare_are_refused(complete_store, tmp_path):
    stray = tmp_path / "stray.h5"
    shutil.copy(complete_store, stray)
    with h5py.File(stray, "r+") as f:
        f.create_dataset("extras/itm_score", data=np.zeros((ROWS, 1), np.float32))
    gone = tmp_path / "gone.h5"
    shutil.copy(complete_store, gone)
    with h5py.File(gone, "r+") as f:
        del f["extras/text_embeds"]
    for path, what in ((stray, "has extras datasets its attributes do not declare: itm_score"),
                       (gone, "missing datasets: extras/text_embeds")):
        with pytest.raises(PipelineError, match=f"{what}.*re-run extraction"):
            FeatureStore.open(path)
        assert verify(path).status == "corrupt" and what in verify(path).detail


def test_changed_ids_or_attributes_are_refused(complete_store, tmp_path):
    ids = tmp_path / "ids.h5"
    shutil.copy(complete_store, ids)
    with h5py.File(ids, "r+") as f:
        f["news_ids"][3] = "N99999"
    attrs = tmp_path / "attrs.h5"
    shutil.copy(complete_store, attrs)
    with h5py.File(attrs, "r+") as f:
        f.attrs.modify("checkpoint", "tiny/kill-tesT")
    widths = tmp_path / "widths.h5"  # extras declared otherwise: the datasets no longer fit either
    shutil.copy(complete_store, widths)
    with h5py.File(widths, "r+") as f:
        f.attrs.modify("extras", '{"image_embeds":8}')
    for path, what in ((ids, "news_ids do not match their checksum"),
                       (attrs, "root attributes do not match their checksum"),
                       (widths, "has extras datasets its attributes do not declare: text_embeds")):
        with pytest.raises(PipelineError, match=f"{what}.*re-run extraction"):
            FeatureStore.open(path)
        assert verify(path).status == "corrupt" and what in verify(path).detail


def test_a_store_written_before_checksums_is_refused_with_re_extract(complete_store, tmp_path):
    old = tmp_path / "old.h5"
    shutil.copy(complete_store, old)
    with h5py.File(old, "r+") as f:  # what format 1 wrote: no checksums at all
        f.attrs.modify("format_version", np.int64(1))
        for key in ("checksum", "block_bytes", "ids_sha256", "attrs_sha256"):
            del f.attrs[key]
        del f["checksums"]
    with pytest.raises(PipelineError) as err:
        FeatureStore.open(old)
    assert str(err.value) == (f"{old}: it was written by an older mmnews (feature store format 1) without "
                              f"checksums, so its data cannot be verified; delete it and re-run extraction")
    assert verify(old).status == "outdated"
    result = _info(old)
    assert result.returncode == 1 and "verdict      outdated" in result.stdout


def test_digests_do_not_depend_on_chunking_resume_or_a_failed_write(tmp_path, monkeypatch):
    reference = _write(tmp_path / "ref.h5", chunk=ROWS, block_bytes=SMALL_BLOCKS)
    path = tmp_path / "s.h5"
    meta, ids = sw.make_meta(DIM, TOKENS, extras=EXTRAS), sw.make_ids(ROWS)
    # Resumes land inside blocks (rows 13, 150, 151 are not multiples of 4, 16, 21 or 32).
    for stop in (13, 150, 151, ROWS):
        with FeatureWriter(path, meta, ids, fsync=False, block_bytes=SMALL_BLOCKS) as writer:
            for start in range(writer.next_row, stop, 29):
                end = min(start + 29, stop)
                if start == 180:  # a disk error half-way through a chunk, then the same chunk again
                    real, calls = os.pwrite, {"n": 0}

                    def flaky(fd, data, offset):
                        calls["n"] += 1
                        if calls["n"] == 3:
                            raise OSError(28, "No space left on device")
                        return real(fd, data, offset)

                    monkeypatch.setattr(os, "pwrite", flaky)
                    with pytest.raises(StoreIOError):
                        _put(writer, start, end)
                    monkeypatch.setattr(os, "pwrite", real)
                _put(writer, start, end)
            if stop == ROWS:
                writer.finalize()
    assert _datasets(path) == _datasets(reference)
    assert verify(path).ok
    with pytest.raises(PipelineError, match="block_bytes: file has 1024, this run has 2048"):
        with FeatureWriter(tmp_path / "t.h5", meta, ids, fsync=False, block_bytes=SMALL_BLOCKS) as writer:
            _put(writer, 0, 10)
        FeatureWriter(tmp_path / "t.h5", meta, ids, block_bytes=2 * SMALL_BLOCKS)


def _write_shards(folder: Path, bounds: list[tuple[int, int]], rows: int = ROWS):
    from storage.shards import Shard, shard_path

    meta, ids = sw.make_meta(DIM, TOKENS, extras=EXTRAS), sw.make_ids(rows)
    shards = []
    for k, (a, b) in enumerate(bounds):
        shard = Shard(k, len(bounds), a, b, shard_path(folder / "store.h5", k, len(bounds)))
        with FeatureWriter(shard.path, meta, ids[a:b], fsync=False, attrs=shard.attrs(rows)) as writer:
            _put(writer, a, b)
            writer.finalize()
        shards.append(shard)
    return meta, ids, shards


def test_merged_shards_equal_the_one_process_store_checksums_included(tmp_path, complete_store):
    from storage.shards import merge_shards

    meta, ids, shards = _write_shards(tmp_path, [(0, 150), (150, 301), (301, ROWS)])
    merged = merge_shards(tmp_path / "store.h5", shards, meta, ids, fsync=False, block_rows=64)
    assert _datasets(merged) == _datasets(complete_store) and verify(merged).ok
    assert {f"extras/{n}" for n in EXTRAS} <= set(_datasets(merged))  # extras and their digests came along


@pytest.mark.parametrize("damaged", ["tokens", "extras/image_embeds"])
def test_a_damaged_shard_is_refused_by_the_merge(tmp_path, damaged):
    from storage.shards import merge_shards

    meta, ids, shards = _write_shards(tmp_path, [(0, 200), (200, ROWS)])
    _flip(shards[1].path, damaged)
    with pytest.raises(PipelineError) as err:
        merge_shards(tmp_path / "store.h5", shards, meta, ids, fsync=False)
    message = str(err.value)
    assert message.startswith("shard-01-of-02 (rows 200..399 of the store): ")
    assert f"{shards[1].path}: checksum mismatch in {damaged}" in message and "re-run extraction" in message
    assert not (tmp_path / "store.h5").exists()


# --------------------------------------------------------------------------- pooled and lazy loads (issue 13)

BIG_ROWS, BIG_DIM, BIG_TOKENS = 1000, 32, 64  # tokens 8 MB against vectors 128 kB (float32)
BIG_EXTRAS = {"image_embeds": 256, "text_embeds": 256}  # 1 MB each


@pytest.fixture(scope="module")
def token_heavy_store(tmp_path_factory) -> Path:
    return _write(tmp_path_factory.mktemp("heavy") / "heavy.h5", rows=BIG_ROWS, chunk=250, token_len=BIG_TOKENS,
                  dim=BIG_DIM, extras=BIG_EXTRAS)


def _bytes_read() -> int:
    """Bytes this process has passed through read()/pread() so far (HDF5's C reads included)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar in /proc/self/io")


def _catalogue(rows: int):
    """What load_features needs of a Catalogue: the ids and the fingerprint."""
    from types import SimpleNamespace

    return SimpleNamespace(ids=np.array(sw.make_ids(rows), dtype=object), fingerprint=lambda: sw.FINGERPRINT)


def test_a_pooled_load_reads_no_token_or_extras_bytes(token_heavy_store):
    from rankers.data import load_features

    tokens_size = BIG_ROWS * BIG_TOKENS * BIG_DIM * 4
    vectors_size = BIG_ROWS * BIG_DIM * 4
    extras_size = BIG_ROWS * sum(BIG_EXTRAS.values()) * 4  # 2 MB: more than the slack below
    slack = min(tokens_size, extras_size) // 10
    before = _bytes_read()
    with FeatureStore.open(token_heavy_store) as store:
        arrays = store.load(tokens=False)
    pooled = _bytes_read() - before
    assert arrays.tokens is None and arrays.extras == {} and arrays.vectors.shape == (BIG_ROWS, BIG_DIM)
    assert vectors_size <= pooled < vectors_size + slack, pooled
    before = _bytes_read()
    features = load_features(token_heavy_store, _catalogue(BIG_ROWS), tokens=False)
    assert _bytes_read() - before < vectors_size + slack
    assert features.tokens is None and features.mask is None and features.extras == {}
    # The counter does see token and extras reads: a full load passes every token byte, and
    # extras when asked for them.
    before = _bytes_read()
    with FeatureStore.open(token_heavy_store) as store:
        store.load(tokens=True)
    assert tokens_size + vectors_size <= _bytes_read() - before < tokens_size + vectors_size + slack
    before = _bytes_read()
    features = load_features(token_heavy_store, _catalogue(BIG_ROWS), tokens=False, extras=True)
    assert _bytes_read() - before >= vectors_size + extras_size
    expected = _expected_extras(BIG_ROWS, BIG_EXTRAS)
    assert features.extras.keys() == expected.keys()
    assert all(features.extras[n].dtype == np.float32 and np.array_equal(features.extras[n], expected[n])
               for n in expected)


def test_lazy_tokens_are_a_verified_memmap_that_holds_no_copy(token_heavy_store, monkeypatch):
    import tracemalloc

    import torch

    from rankers.data import load_features

    monkeypatch.setattr(features_module, "_PIECE_BYTES", 1 << 16)  # the verifying pass's buffer
    tokens_size = BIG_ROWS * BIG_TOKENS * BIG_DIM * 4
    _, _, tok, msk = sw.make_rows(0, BIG_ROWS, BIG_DIM, BIG_TOKENS)
    tracemalloc.start()
    try:
        before = _bytes_read()
        features = load_features(token_heavy_store, _catalogue(BIG_ROWS), tokens=True)
        read = _bytes_read() - before
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert isinstance(features.tokens, np.memmap) and features.tokens.dtype == np.float32
    assert read >= tokens_size  # the one streaming pass that verifies every token block
    assert peak < tokens_size // 4, peak  # ... through a small buffer: no copy of the tokens
    rows = np.array([999, 3, 3, 500])
    assert features.tokens[rows].tobytes() == tok.astype(np.float32)[rows].tobytes()
    np.testing.assert_array_equal(features.mask, msk)
    # What rankers.train.NewsBank does with it: a tensor over the same pages, not a copy.
    shared = torch.from_numpy(np.ascontiguousarray(features.tokens))
    assert np.shares_memory(shared.numpy(), features.tokens)
    assert torch.equal(shared[torch.tensor([999, 3])], torch.from_numpy(tok.astype(np.float32)[[999, 3]]))


def test_lazy_tokens_keep_the_file_untouched_and_survive_close(token_heavy_store):
    digest = hashlib.sha256(token_heavy_store.read_bytes()).hexdigest()
    with FeatureStore.open(token_heavy_store) as store:
        lazy = store.load(tokens="lazy")
        assert store.take_tokens([5])[0].tobytes() == lazy.tokens[[5]].tobytes()
        assert store.load(tokens=True).tokens.tobytes() == lazy.tokens.tobytes()
    lazy.tokens[0] = 7.0  # private to this process (copy-on-write)
    assert float(lazy.tokens[0, 0, 0]) == 7.0
    assert hashlib.sha256(token_heavy_store.read_bytes()).hexdigest() == digest


def _load_in_child(path: str, queue) -> None:
    try:
        with FeatureStore.open(path) as store:
            queue.put(store.load().tokens.shape)
        code = 0
    except BaseException as err:  # the parent's assertion then says what went wrong here
        queue.put(f"{type(err).__name__}: {err}")
        code = 1
    # Leave without the exit handlers inherited from pytest's process: a Prefect service an
    # earlier test started there registers one that fails in a forked copy (exit code 1 after
    # a correct answer, seen after tests/test_extract_flow.py).
    queue.close()
    queue.join_thread()
    os._exit(code)


def test_a_forked_child_verifies_after_its_parent_hashed_in_threads(blocky_store, monkeypatch):
    import multiprocessing

    monkeypatch.setattr(features_module, "_HASH_THREADS", 2)  # a pool even on a 1-core runner
    with FeatureStore.open(blocky_store) as store:
        store.load()  # starts the hashing threads in this process
    assert features_module._hash_pool is not None
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_load_in_child, args=(str(blocky_store), queue))
    child.start()
    child.join(timeout=60)  # a child reusing the parent's dead pool would wait forever
    if child.is_alive():
        child.kill()
        child.join()
    try:
        answer = queue.get(timeout=5)
    except Exception:  # queue.Empty: the child died before it could answer
        answer = None
    assert child.exitcode == 0 and answer == (ROWS, TOKENS, DIM), answer
