"""HDF5 feature store: the vectors of one extractor over one dataset, in one file.

On disk
-------
One file per (dataset, extractor, mode), named by `store_path`:
`<features>/<dataset>__<extractor>__<mode>.h5`. Letters: N news, D vector width,
L tokens, Dt token width.

    news_ids  (N,)        variable-length UTF-8 str; row i of every dataset is news_ids[i]
    vectors   (N, D)      float16 | float32 (StoreMeta.dtype), one pooled vector per news
    present   (N,)        bool; False where the input was missing (e.g. no image)
    tokens    (N, L, Dt)  optional token vectors, same dtype as vectors
    mask      (N, L)      bool, True on real tokens; exists exactly when tokens does

Root attributes: `format` ("mmnews-features"), `format_version`, the `StoreMeta` fields
(`extractor`, `checkpoint`, `revision`, `mode`, `preprocess` as JSON, `fingerprint`, `dim`,
`dtype`, `token_len` and `token_dim`, 0 when there are no tokens), `rows`, `created` (ISO
UTC), `versions` (JSON: python, numpy, h5py, hdf5, and torch/transformers/timm when
installed), `write_id`, and the integrity pair `complete` / `committed_rows`.

Numeric datasets are contiguous and uncompressed: random row gathers are what rankers do,
and gzip makes them 20-50x slower (docs/ENVIRONMENT.md).

Crash safety
------------
The number of rows is known before extraction starts (the news ids), so the whole file is
laid out once and its HDF5 metadata is never written again while rows go in:

1. Creation. `<file>.partial.tmp` is written by h5py with every dataset at its final shape,
   contiguous, allocated early (H5D_ALLOC_TIME_EARLY with fill time NEVER: the space is
   reserved in the file, sparse, without writing it), the ids and every attribute in place,
   `complete=False`, `committed_rows=0`. It is closed, fsynced and renamed to
   `<file>.partial`. A kill during creation leaves only the `.tmp`, which the next run deletes.
2. Rows. The writer does not keep HDF5 open. It asks HDF5 once for each dataset's byte
   offset (`DatasetID.get_offset()`; a contiguous, unfiltered dataset is stored as one plain
   C-order block there, which is exactly where HDF5 reads it) and writes each chunk of rows
   with `os.pwrite`, then `fdatasync`, then records the new committed-row count in the
   sidecar `<file>.partial.json` (temp file, fsync, `os.replace`). The counter therefore never
   runs ahead of data on disk, and a kill -9 at any moment costs at most the chunk in flight;
   rows past the counter may hold anything and are rewritten on resume. Since no HDF5
   metadata is written in this phase, there is no metadata cache a kill could half-flush;
   a test checks that every byte outside the datasets' data blocks stays unchanged.
3. Finalize. With the counter at N, h5py opens the partial once more and overwrites the two
   fixed-size attributes `complete` and `committed_rows` in place (`attrs.modify`: a few bytes
   of one object header, no allocation), closes, fsyncs and renames the partial to the final
   name with `os.replace`, then fsyncs the folder and removes the sidecar. A kill before the
   rename leaves a partial whose counter is N, and the rerun only finalizes again; should that
   one header write have been torn, the partial no longer opens, and the rerun says so (a
   warning) and starts over. Readers only ever see a final name once it is complete.

Not chosen: SWMR (`libver='latest'`, `swmr_mode=True`) with resizable chunked datasets.
SWMR promises concurrent readers a consistent view while the writer is alive, not a file
that survives the writer's death: appends rewrite the chunk index, every flush writes the
metadata cache, and a killed SWMR writer leaves the superblock's "open for write" flag set
so the file will not open again without `h5clear`. Flushing an ordinary h5py file after
each chunk has the same torn-flush window. Fixed-size preallocation needs neither.

A resumed run must match the partial exactly (every StoreMeta field, the dataset
fingerprint, the ids in order); otherwise it refuses and names the differences, unless
`restart=True`, which deletes the partial. An advisory lock on `<file>.lock` keeps two
writers off one partial. Readers open with mode 'r' and HDF5 file locking off: a final file
is never written again, and locking fails on some read-only mounts.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import fcntl
import hashlib
import importlib.metadata
import json
import logging
import os
import platform
import re
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import h5py
import numpy as np
from h5py import h5d, h5p

from storage.errors import PipelineError, run_cli

log = logging.getLogger(__name__)

FORMAT = "mmnews-features"
FORMAT_VERSION = 1
MODES = ("frozen", "finetuned")
DTYPES = ("float16", "float32")
# Explicit little-endian so the bytes pwritten by the writer match the file's datatype.
_NUMPY_DTYPE = {"float16": np.dtype("<f2"), "float32": np.dtype("<f4")}
_OPTIONAL_PACKAGES = ("torch", "transformers", "timm")
_PROGRESS_FORMAT = "mmnews-features-progress"

PathLike = str | os.PathLike[str]


class StoreIOError(PipelineError):
    """A disk read or write of a store failed (space, permissions, a flaky network mount).

    Unlike the other PipelineErrors it may be transient: the committed rows are intact, so
    an orchestrator may retry and the writer resumes where the counter stands.
    """


# --------------------------------------------------------------------------- metadata


@dataclass(frozen=True)
class StoreMeta:
    """What produced the vectors; written into the file and checked on resume and read.

    `preprocess` is the extractor's preprocessing config (max length, image size, mean/std,
    crop box, pooling ...) as a JSON-serialisable dict. `fingerprint` identifies the news
    the vectors were computed from (`News.fingerprint()`). `token_dim` is the width of the
    token vectors when it differs from `dim` (e.g. CLIP: projected pooled vs hidden tokens).
    """

    extractor: str
    checkpoint: str
    revision: str
    mode: Literal["frozen", "finetuned"]
    preprocess: dict[str, Any]
    fingerprint: str
    dim: int
    dtype: Literal["float16", "float32"]
    token_len: int | None = None
    token_dim: int | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"StoreMeta.mode must be one of {MODES}, got {self.mode!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"StoreMeta.dtype must be one of {DTYPES}, got {self.dtype!r}")
        if int(self.dim) < 1:
            raise ValueError(f"StoreMeta.dim must be >= 1, got {self.dim}")
        if self.token_len is not None and int(self.token_len) < 1:
            raise ValueError(f"StoreMeta.token_len must be >= 1 or None, got {self.token_len}")
        if self.token_dim is not None and self.token_len is None:
            raise ValueError("StoreMeta.token_dim is set but token_len is None")
        if self.token_dim is not None and int(self.token_dim) < 1:
            raise ValueError(f"StoreMeta.token_dim must be >= 1 or None, got {self.token_dim}")
        for name in ("extractor", "checkpoint", "revision", "fingerprint"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"StoreMeta.{name} must be a str, got {getattr(self, name)!r}")
        try:
            # Normalised to its JSON form (tuples become lists) so a meta read back equals this one.
            normal = json.loads(json.dumps(self.preprocess, sort_keys=True, allow_nan=False))
        except (TypeError, ValueError) as err:
            raise ValueError(f"StoreMeta.preprocess must be JSON-serialisable: {err}") from None
        if not isinstance(normal, dict):
            raise ValueError(f"StoreMeta.preprocess must be a dict, got {type(self.preprocess).__name__}")
        object.__setattr__(self, "preprocess", normal)

    @property
    def has_tokens(self) -> bool:
        return self.token_len is not None

    @property
    def tokens_width(self) -> int:
        """Dt: width of the token vectors."""
        return int(self.token_dim if self.token_dim is not None else self.dim)

    def preprocess_json(self) -> str:
        """Canonical JSON: key order and tuple-vs-list differences do not count as changes."""
        return json.dumps(self.preprocess, sort_keys=True, separators=(",", ":"), allow_nan=False)

    def to_attrs(self) -> dict[str, Any]:
        return {
            "extractor": self.extractor,
            "checkpoint": self.checkpoint,
            "revision": self.revision,
            "mode": self.mode,
            "preprocess": self.preprocess_json(),
            "fingerprint": self.fingerprint,
            "dim": np.int64(self.dim),
            "dtype": self.dtype,
            "token_len": np.int64(self.token_len or 0),
            "token_dim": np.int64(self.tokens_width if self.has_tokens else 0),
        }

    @classmethod
    def from_attrs(cls, attrs: Any) -> StoreMeta:
        token_len = int(attrs["token_len"]) or None
        token_dim = int(attrs["token_dim"]) if token_len else None
        dim = int(attrs["dim"])
        return cls(
            extractor=str(attrs["extractor"]),
            checkpoint=str(attrs["checkpoint"]),
            revision=str(attrs["revision"]),
            mode=str(attrs["mode"]),  # type: ignore[arg-type]
            preprocess=json.loads(str(attrs["preprocess"])),
            fingerprint=str(attrs["fingerprint"]),
            dim=dim,
            dtype=str(attrs["dtype"]),  # type: ignore[arg-type]
            token_len=token_len,
            # Stored as the effective width; keep None when it equals dim so meta round-trips.
            token_dim=token_dim if token_dim not in (None, dim) else None,
        )

    def differences(self, other: StoreMeta) -> list[str]:
        """Human-readable field differences, `self` being what is on disk."""
        out = []
        for field in dataclasses.fields(self):
            if field.name == "preprocess":
                a, b = self.preprocess_json(), other.preprocess_json()
            elif field.name == "token_dim":
                a = self.tokens_width if self.has_tokens else None
                b = other.tokens_width if other.has_tokens else None
            else:
                a, b = getattr(self, field.name), getattr(other, field.name)
            if a != b:
                out.append(f"{field.name}: file has {a!r}, this run has {b!r}")
        return out


def store_path(features_dir: PathLike, dataset_name: str, extractor_name: str, mode: str) -> Path:
    """`<features_dir>/<dataset>__<extractor>__<mode>.h5`, each part made filename-safe.

    Characters outside [A-Za-z0-9._-] become '-', runs of '_' shrink to one so that '__'
    stays an unambiguous separator, and an over-long part is cut and tagged with a hash.
    """
    if mode not in MODES:
        raise PipelineError(f"unknown feature mode {mode!r}; known: {', '.join(MODES)}")
    parts = [_safe_part(dataset_name, "dataset name"), _safe_part(extractor_name, "extractor name"), mode]
    return Path(features_dir) / ("__".join(parts) + ".h5")


def _safe_part(text: str, what: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9._-]+", "-", str(text))
    safe = re.sub(r"_{2,}", "_", safe).strip("._-")
    if not safe:
        raise PipelineError(f"{what} {text!r} has no filename-safe characters; use letters, digits, '.', '_' or '-'")
    if len(safe) > 80:
        digest = hashlib.sha256(str(text).encode("utf-8")).hexdigest()[:10]
        safe = f"{safe[:69]}-{digest}"
    return safe


def package_versions() -> dict[str, str]:
    """Versions that shaped the vectors; optional packages are looked up, never imported."""
    versions = {"python": platform.python_version(), "numpy": np.__version__,
                "h5py": h5py.version.version, "hdf5": h5py.version.hdf5_version}
    for name in _OPTIONAL_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return versions


def partial_path(path: PathLike) -> Path:
    return Path(f"{path}.partial")


def progress_path(path: PathLike) -> Path:
    """The sidecar holding the committed-row counter of `<path>.partial`."""
    return Path(f"{path}.partial.json")


def _lock_path(path: PathLike) -> Path:
    return Path(f"{path}.lock")


def _final_of(path: Path) -> Path:
    return path.with_name(path.name[: -len(".partial")]) if path.name.endswith(".partial") else path


# --------------------------------------------------------------------------- file checks


class _Corrupt(Exception):
    """Internal: the file opened but does not hold a well-formed store."""


@dataclass(frozen=True)
class StoreHeader:
    """What a structurally sound file says about itself (attributes, parsed)."""

    meta: StoreMeta
    rows: int
    complete: bool
    committed_rows: int
    created: str
    versions: dict[str, str]
    write_id: str
    format_version: int


_REQUIRED_ATTRS = ("format", "format_version", "extractor", "checkpoint", "revision", "mode", "preprocess",
                   "fingerprint", "dim", "dtype", "token_len", "token_dim", "rows", "created", "versions",
                   "write_id", "complete", "committed_rows")


def _read_header(f: h5py.File) -> StoreHeader:
    """Parse and cross-check attributes and dataset shapes; raise _Corrupt naming the problem."""
    missing = [a for a in _REQUIRED_ATTRS if a not in f.attrs]
    if missing:
        if "format" not in f.attrs:
            raise _Corrupt("not a feature store (no 'format' attribute)")
        raise _Corrupt(f"missing attributes: {', '.join(missing)}")
    if f.attrs["format"] != FORMAT:
        raise _Corrupt(f"format is {f.attrs['format']!r}, expected {FORMAT!r}")
    version = int(f.attrs["format_version"])
    if version != FORMAT_VERSION:
        raise _Corrupt(f"format version {version} is not supported (this code reads version {FORMAT_VERSION})")
    try:
        meta = StoreMeta.from_attrs(f.attrs)
        versions = json.loads(str(f.attrs["versions"]))
    except (ValueError, TypeError, KeyError) as err:
        raise _Corrupt(f"unreadable metadata attributes: {err}") from None
    n = int(f.attrs["rows"])
    required = ["news_ids", "vectors", "present"] + (["tokens", "mask"] if meta.has_tokens else [])
    absent = [name for name in required if name not in f]
    if absent:
        raise _Corrupt(f"missing datasets: {', '.join(absent)}")
    if not meta.has_tokens and ("tokens" in f or "mask" in f):
        raise _Corrupt("has a tokens/mask dataset but token_len is 0")
    expect = {"news_ids": (n,), "vectors": (n, meta.dim), "present": (n,)}
    if meta.has_tokens:
        expect["tokens"] = (n, int(meta.token_len or 0), meta.tokens_width)
        expect["mask"] = (n, int(meta.token_len or 0))
    for name, shape in expect.items():
        if not isinstance(f[name], h5py.Dataset) or f[name].shape != shape:
            got = getattr(f[name], "shape", "a group")
            raise _Corrupt(f"dataset {name} has shape {got}, expected {shape}")
    string_info = h5py.check_string_dtype(f["news_ids"].dtype)
    if string_info is None or string_info.encoding != "utf-8":
        raise _Corrupt(f"dataset news_ids has dtype {f['news_ids'].dtype}, expected UTF-8 strings")
    want = _NUMPY_DTYPE[meta.dtype]
    for name in ("vectors", "tokens") if meta.has_tokens else ("vectors",):
        if f[name].dtype != want:
            raise _Corrupt(f"dataset {name} has dtype {f[name].dtype}, expected {meta.dtype}")
    for name in ("present", "mask") if meta.has_tokens else ("present",):
        if f[name].dtype != np.bool_:
            raise _Corrupt(f"dataset {name} has dtype {f[name].dtype}, expected bool")
    committed = int(f.attrs["committed_rows"])
    return StoreHeader(meta=meta, rows=n, complete=bool(f.attrs["complete"]), committed_rows=committed,
                       created=str(f.attrs["created"]), versions=versions, write_id=str(f.attrs["write_id"]),
                       format_version=version)


def _raw_regions(f: h5py.File, names: Sequence[str]) -> dict[str, tuple[int, int]]:
    """(byte offset, byte size) of each dataset's contiguous data block; _Corrupt if not laid out so."""
    regions = {}
    for name in names:
        dset = f[name]
        size = int(np.prod(dset.shape, dtype=np.int64)) * dset.dtype.itemsize
        if dset.chunks is not None or dset.compression is not None:
            raise _Corrupt(f"dataset {name} is chunked or compressed; expected contiguous")
        offset = dset.id.get_offset()
        if size == 0:
            regions[name] = (0, 0)
            continue
        if offset is None or int(dset.id.get_storage_size()) != size:
            raise _Corrupt(f"dataset {name} has no allocated contiguous storage")
        regions[name] = (int(offset), size)
    return regions


def _check_layout(f: h5py.File, path: Path) -> tuple[StoreHeader, dict[str, tuple[int, int]]]:
    """Header plus data blocks, checked to lie inside the file; _Corrupt otherwise."""
    header = _read_header(f)
    regions = _raw_regions(f, ["vectors", "present"] + (["tokens", "mask"] if header.meta.has_tokens else []))
    end = max((offset + size for offset, size in regions.values()), default=0)
    size = path.stat().st_size
    if end > size:
        raise _Corrupt(f"data runs to byte {end} but the file has {size}")
    return header, regions


def _open_h5(path: Path, mode: str = "r") -> h5py.File:
    """h5py.File without HDF5 file locking (see module docstring); OSError passes through."""
    return h5py.File(path, mode, locking=False)


def _corrupt_message(path: Path, reason: str) -> str:
    return (f"{path}: feature store is corrupt or truncated ({reason}); "
            f"delete it and re-run extraction")


def _read_progress(path: Path, write_id: str, rows: int) -> int | None:
    """Committed rows recorded in the sidecar for this partial, or None when there is none."""
    sidecar = progress_path(_final_of(path))
    try:
        data = json.loads(sidecar.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        log.warning("%s: unreadable progress file (%s); counting 0 committed rows", sidecar, err)
        return 0
    if not isinstance(data, dict) or data.get("format") != _PROGRESS_FORMAT or data.get("write_id") != write_id:
        # A sidecar left by another attempt says nothing about this partial.
        return None
    committed = data.get("committed_rows")
    if not isinstance(committed, int) or not 0 <= committed <= rows:
        log.warning("%s: committed_rows %r out of range 0..%d; counting 0", sidecar, committed, rows)
        return 0
    return committed


# --------------------------------------------------------------------------- writing


def _fsync_path(path: Path, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def _dcpl_early() -> h5p.PropDCID:
    """Contiguous layout allocated at creation, never filled: row writes then touch no metadata."""
    dcpl = h5p.create(h5p.DATASET_CREATE)
    dcpl.set_alloc_time(h5d.ALLOC_TIME_EARLY)
    dcpl.set_fill_time(h5d.FILL_TIME_NEVER)
    return dcpl


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while len(data):
        done = os.pwrite(fd, data, offset)
        data, offset = data[done:], offset + done


class FeatureWriter:
    """Write a store row chunk by row chunk, resumably; the final name appears on `finalize()`.

        writer = FeatureWriter(path, meta, ids)          # resumes `<path>.partial` if it matches
        for start in range(writer.next_row, len(ids), B):
            writer.write(vectors, present)               # (B, D), (B,): rows start..start+B-1
        writer.finalize()

    Each `write` call is one chunk: its rows are on disk and counted before it returns.
    `restart=True` discards a partial (and lets a complete file be rewritten). `fsync=False`
    skips fsync calls: still safe against a killed process, not against power loss.
    The context manager closes without finalizing, leaving the partial to resume.
    `attrs` are extra root attributes written at creation (e.g. a shard's row range); they
    may not shadow the store's own attributes.
    """

    def __init__(self, path: PathLike, meta: StoreMeta, ids: Sequence[str] | np.ndarray, *,
                 restart: bool = False, fsync: bool = True, attrs: dict[str, Any] | None = None):
        self.path = Path(path)
        if self.path.name.endswith(".partial"):
            raise ValueError(f"{self.path}: pass the final file name; the writer adds '.partial' itself")
        clash = sorted(set(attrs or {}) & set(_REQUIRED_ATTRS))
        if clash:
            raise ValueError(f"extra attributes may not replace the store's own: {', '.join(clash)}")
        self.extra_attrs = dict(attrs or {})
        self.meta = meta
        self.ids = _check_ids(ids)  # (N,) object str
        self.rows = len(self.ids)
        self.partial = partial_path(self.path)
        self.progress = progress_path(self.path)
        self.fsync = fsync
        self.resumed = False
        self.discarded: str | None = None  # why an existing partial could not be reused
        self.next_row = 0  # rows 0..next_row-1 are on disk and counted
        self._write_id = ""
        self._fd: int | None = None
        self._lock_fd: int | None = None
        self._regions: dict[str, tuple[int, int]] = {}
        self._acquire_lock()
        try:
            self._prepare(restart)
            self._fd = os.open(self.partial, os.O_RDWR)
        except BaseException:
            self._release_lock()
            raise

    # -- setup

    def _acquire_lock(self) -> None:
        lock = _lock_path(self.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise PipelineError(f"{self.path}: another process is writing this feature store "
                                    f"(it holds {lock}); wait for it to finish") from None
            # The holder before us may have unlinked the lock file on its way out.
            try:
                same = os.stat(lock).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self._lock_fd = fd
                return
            os.close(fd)

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            _unlink(_lock_path(self.path))
            os.close(self._lock_fd)
            self._lock_fd = None

    def _prepare(self, restart: bool) -> None:
        # Leftovers of a run killed mid-creation or mid-counter-update; never part of the store.
        _unlink(Path(f"{self.partial}.tmp"))
        _unlink(Path(f"{self.progress}.tmp"))
        if restart:
            _unlink(self.progress)
            _unlink(self.partial)
        elif self.path.exists():
            if not self.partial.exists():
                _unlink(self.progress)  # left by a run killed between its final rename and cleanup
            raise PipelineError(f"{self.path} already exists and is complete; open it with FeatureStore.open, "
                                f"or pass restart=True (or delete it) to extract again")
        if self.partial.exists() and self._try_resume():
            return
        _unlink(self.progress)
        _unlink(self.partial)
        self._create()

    def _try_resume(self) -> bool:
        """Reuse the partial if it matches this run; False when it is unusable and must go."""
        try:
            with _open_h5(self.partial) as f:
                header, regions = _check_layout(f, self.partial)
                stored_ids = f["news_ids"].asstr()[:] if header.rows else np.empty(0, dtype=object)
        except (OSError, _Corrupt, KeyError, ValueError) as err:
            self.discarded = f"{self.partial} cannot be reused ({err}); starting over"
            log.warning("%s", self.discarded)
            return False
        problems = header.meta.differences(self.meta)
        if header.rows != self.rows:
            problems.append(f"rows: file has {header.rows}, this run has {self.rows}")
        elif not np.array_equal(stored_ids, self.ids):
            first = int(np.flatnonzero(stored_ids != self.ids)[0])
            problems.append(f"news ids differ from row {first} on "
                            f"(file {stored_ids[first]!r}, this run {self.ids[first]!r})")
        if problems:
            raise PipelineError(
                f"{self.partial}: an interrupted extraction with different settings is in the way; "
                + "; ".join(problems)
                + f". Pass restart=True to discard it (or delete {self.partial} and {self.progress}).")
        committed = _read_progress(self.partial, header.write_id, header.rows)
        self.next_row = committed or 0
        self._regions = regions
        self._write_id = header.write_id
        self.resumed = True
        return True

    def _create(self) -> None:
        """Lay out the whole file under a temp name, then rename it to `.partial` (see docstring)."""
        meta, n = self.meta, self.rows
        tmp = Path(f"{self.partial}.tmp")
        self._write_id = uuid.uuid4().hex
        dt = _NUMPY_DTYPE[meta.dtype]
        with h5py.File(tmp, "w", locking=False) as f:
            f.create_dataset("news_ids", shape=(n,), dtype=h5py.string_dtype("utf-8"),
                             data=self.ids if n else None)
            f.create_dataset("vectors", shape=(n, meta.dim), dtype=dt, dcpl=_dcpl_early())
            f.create_dataset("present", shape=(n,), dtype=np.bool_, dcpl=_dcpl_early())
            if meta.has_tokens:
                length = int(meta.token_len or 0)
                f.create_dataset("tokens", shape=(n, length, meta.tokens_width), dtype=dt, dcpl=_dcpl_early())
                f.create_dataset("mask", shape=(n, length), dtype=np.bool_, dcpl=_dcpl_early())
            attrs = {"format": FORMAT, "format_version": np.int64(FORMAT_VERSION), **meta.to_attrs(),
                     "rows": np.int64(n),
                     "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                     "versions": json.dumps(package_versions(), sort_keys=True),
                     "write_id": self._write_id,
                     # Fixed-size scalars, later overwritten in place by finalize().
                     "complete": np.bool_(False), "committed_rows": np.int64(0),
                     **self.extra_attrs}
            for key, value in attrs.items():
                f.attrs[key] = value
            names = ["vectors", "present"] + (["tokens", "mask"] if meta.has_tokens else [])
            self._regions = _raw_regions(f, names)
        if self.fsync:
            _fsync_path(tmp)
        os.replace(tmp, self.partial)
        if self.fsync:
            _fsync_path(self.partial.parent, directory=True)
        self.next_row = 0
        self._save_progress()

    def _save_progress(self) -> None:
        tmp = Path(f"{self.progress}.tmp")
        body = json.dumps({"format": _PROGRESS_FORMAT, "write_id": self._write_id,
                           "committed_rows": self.next_row, "rows": self.rows})
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(body)
            fh.flush()
            if self.fsync:
                os.fsync(fh.fileno())
        os.replace(tmp, self.progress)

    # -- rows

    def write(self, vectors: np.ndarray, present: np.ndarray | Sequence[bool],
              tokens: np.ndarray | None = None, mask: np.ndarray | None = None) -> int:
        """Write rows next_row .. next_row+K-1 and commit them; returns the new next_row.

        vectors (K, D); present (K,) bool; tokens (K, L, Dt) and mask (K, L) bool exactly
        when the meta has token_len. Floats are cast to the store dtype.
        """
        if self._fd is None:
            raise ValueError(f"{self.path}: writer is closed")
        meta = self.meta
        dt = _NUMPY_DTYPE[meta.dtype]
        vec = np.ascontiguousarray(vectors, dtype=dt)  # (K, D)
        k = vec.shape[0] if vec.ndim == 2 else -1
        if vec.ndim != 2 or vec.shape[1] != meta.dim:
            raise ValueError(f"vectors must have shape (K, {meta.dim}), got {np.shape(vectors)}")
        pres = np.ascontiguousarray(present, dtype=np.bool_)  # (K,)
        if pres.shape != (k,):
            raise ValueError(f"present must have shape ({k},), got {pres.shape}")
        chunk = {"vectors": vec, "present": pres}
        if meta.has_tokens:
            length, width = int(meta.token_len or 0), meta.tokens_width
            if tokens is None or mask is None:
                raise ValueError(f"{self.path}: this store keeps token vectors; pass tokens and mask")
            tok = np.ascontiguousarray(tokens, dtype=dt)  # (K, L, Dt)
            msk = np.ascontiguousarray(mask, dtype=np.bool_)  # (K, L)
            if tok.shape != (k, length, width):
                raise ValueError(f"tokens must have shape ({k}, {length}, {width}), got {tok.shape}")
            if msk.shape != (k, length):
                raise ValueError(f"mask must have shape ({k}, {length}), got {msk.shape}")
            chunk.update(tokens=tok, mask=msk)
        elif tokens is not None or mask is not None:
            raise ValueError(f"{self.path}: tokens given but the meta has token_len=None")
        if self.next_row + k > self.rows:
            raise ValueError(f"{self.path}: {k} rows at row {self.next_row} overflow the {self.rows} rows")
        if k == 0:
            return self.next_row
        start = self.next_row
        try:
            for name, arr in chunk.items():
                offset, size = self._regions[name]
                row_bytes = size // self.rows
                # bool is stored as a 1-byte enum {0, 1}: the uint8 view is its on-disk form.
                raw = arr.view(np.uint8) if arr.dtype == np.bool_ else arr
                _pwrite_all(self._fd, memoryview(raw).cast("B"), offset + start * row_bytes)
            if self.fsync:
                os.fdatasync(self._fd)
            # Only now, with the rows on disk, may the counter move past them.
            self.next_row = start + k
            self._save_progress()
        except OSError as err:
            self.next_row = start  # the counter on disk did not move; these rows can be written again
            raise StoreIOError(f"{self.partial}: writing rows {start}..{start + k - 1} failed ({err}); "
                                f"fix the disk problem (space, permissions) and re-run to resume") from None
        return self.next_row

    def finalize(self) -> Path:
        """Mark complete and publish under the final name (atomically); returns that path."""
        if self._fd is None:
            raise ValueError(f"{self.path}: writer is closed")
        if self.next_row != self.rows:
            raise PipelineError(f"{self.path}: cannot finalize, only {self.next_row} of {self.rows} rows written; "
                                f"write the remaining rows first")
        if self.fsync:
            os.fsync(self._fd)
        os.close(self._fd)
        self._fd = None
        try:
            with _open_h5(self.partial, "r+") as f:
                f.attrs.modify("committed_rows", np.int64(self.rows))
                f.attrs.modify("complete", np.bool_(True))
            if self.fsync:
                _fsync_path(self.partial)
            os.replace(self.partial, self.path)
            if self.fsync:
                _fsync_path(self.path.parent, directory=True)
            _unlink(self.progress)
        except OSError as err:
            raise StoreIOError(f"{self.partial}: finalizing failed ({err}); all rows are committed, "
                                f"re-run to finalize again") from None
        finally:
            self._release_lock()
        return self.path

    def close(self) -> None:
        """Stop without finalizing: the partial and its counter stay for a later resume."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._release_lock()

    def __enter__(self) -> FeatureWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _check_ids(ids: Sequence[str] | np.ndarray) -> np.ndarray:
    arr = np.empty(len(ids), dtype=object)
    arr[:] = list(ids)
    bad = [i for i, x in enumerate(arr) if not isinstance(x, str)]
    if bad:
        raise ValueError(f"news ids must be str; row {bad[0]} is {arr[bad[0]]!r}")
    seen: set[str] = set()
    for row, news_id in enumerate(arr.tolist()):
        if news_id in seen:
            raise PipelineError(f"news id {news_id!r} (row {row}) occurs more than once; "
                                f"a feature store needs unique ids")
        seen.add(news_id)
    return arr


# --------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class FeatureArrays:
    """A whole store in memory. ids (N,) str; vectors (N, D); present (N,) bool;
    tokens (N, L, Dt) and mask (N, L) bool, or None."""

    ids: np.ndarray
    vectors: np.ndarray
    present: np.ndarray
    tokens: np.ndarray | None
    mask: np.ndarray | None


class FeatureStore:
    """A complete, verified store opened read-only. Use `FeatureStore.open`.

    Gathers (`get`, `take`, `*_tokens`) read sorted unique rows from the file, or from memory
    after `load()` / `open(..., in_memory=True)`; any order and duplicates are fine.
    """

    def __init__(self, path: Path, f: h5py.File, header: StoreHeader, ids: np.ndarray):
        self.path = path
        self.meta = header.meta
        self.created = header.created
        self.versions = header.versions
        self.ids = ids  # (N,) object str
        self.index: dict[str, int] = {x: i for i, x in enumerate(ids.tolist())}
        self._file: h5py.File | None = f
        self._arrays: FeatureArrays | None = None
        self.present = self._read(lambda: f["present"][:])  # (N,) bool

    @classmethod
    def open(cls, path: PathLike, expected_fingerprint: str | None = None, *, in_memory: bool = False) -> FeatureStore:
        """Open and verify a complete store; PipelineError says what is wrong and what to do."""
        path = Path(path)
        if path.name.endswith(".partial"):
            raise PipelineError(_incomplete_message(path))
        if not path.exists():
            if partial_path(path).exists():
                raise PipelineError(_incomplete_message(partial_path(path)))
            raise PipelineError(f"{path}: no feature store here; run extraction first")
        try:
            f = _open_h5(path)
        except OSError as err:
            raise PipelineError(_corrupt_message(path, str(err))) from None
        try:
            try:
                header, _ = _check_layout(f, path)
                ids = f["news_ids"].asstr()[:] if header.rows else np.empty(0, dtype=object)
            except _Corrupt as err:
                raise PipelineError(_corrupt_message(path, str(err))) from None
            except OSError as err:
                raise PipelineError(_corrupt_message(path, f"cannot read it: {err}")) from None
            if not header.complete or header.committed_rows != header.rows:
                raise PipelineError(f"{path}: feature store is incomplete ({header.committed_rows} of "
                                    f"{header.rows} rows committed, complete={header.complete}); "
                                    f"delete it and re-run extraction")
            if len(set(ids.tolist())) != len(ids):
                raise PipelineError(_corrupt_message(path, "news_ids has duplicates"))
            if expected_fingerprint is not None and header.meta.fingerprint != expected_fingerprint:
                raise PipelineError(
                    f"{path}: features were extracted from dataset fingerprint {header.meta.fingerprint} "
                    f"but the dataset now has fingerprint {expected_fingerprint}; the news changed since "
                    f"extraction: re-run extraction for this dataset")
            store = cls(path, f, header, ids)
            if in_memory:
                store.load()
        except BaseException:
            f.close()
            raise
        return store

    # -- properties

    @property
    def dim(self) -> int:
        return self.meta.dim

    @property
    def has_tokens(self) -> bool:
        return self.meta.has_tokens

    def __len__(self) -> int:
        return len(self.ids)

    def __repr__(self) -> str:
        return f"FeatureStore({str(self.path)!r}, rows={len(self)}, dim={self.dim}, extractor={self.meta.extractor!r})"

    # -- access

    def rows(self, ids: Sequence[str] | np.ndarray) -> np.ndarray:
        """(K,) int64 row of each id; PipelineError naming the first unknown id."""
        out = np.empty(len(ids), dtype=np.int64)
        index = self.index
        for k, news_id in enumerate(ids):
            row = index.get(news_id)
            if row is None:
                missing = sum(1 for x in ids if x not in index)
                raise PipelineError(f"{self.path}: news id {news_id!r} is not in this feature store "
                                    f"({missing} of {len(ids)} requested ids unknown); re-run extraction "
                                    f"for the dataset that contains it")
            out[k] = row
        return out

    def get(self, ids: Sequence[str] | np.ndarray) -> np.ndarray:
        """(K, D) vectors of the given news ids, in the given order."""
        return self.take(self.rows(ids))

    def take(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """(K, D) vectors of the given rows, in the given order (duplicates allowed)."""
        return self._gather("vectors", indices)

    def get_tokens(self, ids: Sequence[str] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """tokens (K, L, Dt) and mask (K, L) of the given news ids."""
        return self.take_tokens(self.rows(ids))

    def take_tokens(self, indices: Sequence[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """tokens (K, L, Dt) and mask (K, L) of the given rows."""
        if not self.has_tokens:
            raise PipelineError(f"{self.path}: this feature store has no token vectors; "
                                f"re-run extraction with tokens enabled")
        return self._gather("tokens", indices), self._gather("mask", indices)

    def load(self) -> FeatureArrays:
        """Read the whole store into memory; later gathers are served from it."""
        if self._arrays is None:
            f = self._require_open()
            tok = self._read(lambda: f["tokens"][:]) if self.has_tokens else None
            msk = self._read(lambda: f["mask"][:]) if self.has_tokens else None
            vec = self._read(lambda: f["vectors"][:])
            self._arrays = FeatureArrays(ids=self.ids, vectors=vec, present=self.present, tokens=tok, mask=msk)
        return self._arrays

    def _gather(self, name: str, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)  # (K,)
        n = len(self)
        if idx.size and (idx.min() < 0 or idx.max() >= n):
            bad = int(idx[(idx < 0) | (idx >= n)][0])
            raise IndexError(f"{self.path}: row {bad} out of range 0..{n - 1}")
        if self._arrays is not None:
            return getattr(self._arrays, name)[idx]
        dset = self._require_open()[name]
        if idx.size == 0:
            return np.empty((0,) + dset.shape[1:], dtype=dset.dtype)
        # h5py fancy indexing needs strictly increasing indices: read the sorted unique rows,
        # then scatter back to the requested order (and duplicates) in memory.
        uniq, inverse = np.unique(idx, return_inverse=True)
        lo, hi = int(uniq[0]), int(uniq[-1]) + 1
        if hi - lo <= 2 * len(uniq) + 64:
            # Dense enough: one contiguous read beats a many-hyperslab selection.
            block = self._read(lambda: dset[lo:hi])
            rows = block[uniq - lo]
        else:
            rows = self._read(lambda: dset[uniq])
        return rows[inverse]

    def _read(self, fn: Callable[[], np.ndarray]) -> np.ndarray:
        try:
            return fn()
        except OSError as err:
            raise PipelineError(_corrupt_message(self.path, f"read failed: {err}")) from None

    def _require_open(self) -> h5py.File:
        if self._file is None:
            raise ValueError(f"{self.path}: feature store is closed")
        return self._file

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> FeatureStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _incomplete_message(partial: Path) -> str:
    committed = "?"
    rows = "?"
    try:
        with _open_h5(partial) as f:
            header = _read_header(f)
        rows = str(header.rows)
        committed = str(_read_progress(partial, header.write_id, header.rows) or 0)
    except (OSError, _Corrupt, KeyError, ValueError):
        pass
    return (f"{_final_of(partial)} is not complete: the extraction writing {partial} was interrupted "
            f"({committed} of {rows} rows committed); re-run extraction to resume it")


# --------------------------------------------------------------------------- verdict / CLI


@dataclass(frozen=True)
class Verdict:
    """Integrity of one file. status: complete | incomplete | corrupt; detail says why and what to do."""

    status: Literal["complete", "incomplete", "corrupt"]
    detail: str
    header: StoreHeader | None = None
    committed: int | None = None
    present_count: int | None = None
    nonfinite_rows: int | None = None

    @property
    def ok(self) -> bool:
        return self.status == "complete"


def verify(path: PathLike, check_values: bool = False) -> Verdict:
    """Inspect a store or a `.partial` without raising for its problems.

    check_values also scans the committed rows of vectors and tokens for NaN/Inf.
    """
    path = Path(path)
    if not path.exists():
        raise PipelineError(f"{path}: no such file")
    redo = "delete it and re-run extraction"
    try:
        f = _open_h5(path)
    except OSError as err:
        return Verdict("corrupt", f"HDF5 cannot open it ({err}); {redo}")
    with f:
        try:
            header, _ = _check_layout(f, path)
            is_partial = path.name.endswith(".partial")
            if is_partial:
                committed = _read_progress(path, header.write_id, header.rows) or 0
            else:
                committed = header.committed_rows
            present_count = int(np.count_nonzero(f["present"][:committed]))
            nonfinite = _count_nonfinite_rows(f, committed, header.meta.has_tokens) if check_values else None
        except _Corrupt as err:
            return Verdict("corrupt", f"{err}; {redo}")
        except OSError as err:
            return Verdict("corrupt", f"read failed ({err}); {redo}")
    found = dict(header=header, committed=committed, present_count=present_count, nonfinite_rows=nonfinite)
    if is_partial or not header.complete or committed != header.rows:
        how = ("re-run extraction to resume it" if is_partial
               else "it was never finalized; delete it and re-run extraction")
        return Verdict("incomplete", f"{committed} of {header.rows} rows committed; {how}", **found)
    if nonfinite:
        return Verdict("corrupt", f"{nonfinite} rows hold NaN or Inf; {redo}", **found)
    return Verdict("complete", f"all {header.rows} rows committed", **found)


def _count_nonfinite_rows(f: h5py.File, committed: int, has_tokens: bool, block: int = 4096) -> int:
    bad = np.zeros(committed, dtype=bool)  # (N',)
    for start in range(0, committed, block):
        stop = min(start + block, committed)
        vec = f["vectors"][start:stop]  # (b, D)
        bad[start:stop] |= ~np.isfinite(vec).all(axis=1)
        if has_tokens:
            tok = f["tokens"][start:stop]  # (b, L, Dt)
            bad[start:stop] |= ~np.isfinite(tok).all(axis=(1, 2))
    return int(bad.sum())


def _print_info(path: Path, verdict: Verdict) -> None:
    print(f"file         {path}")
    header = verdict.header
    if header is not None:
        meta = header.meta
        n = header.rows
        tokens = (f"({n}, {meta.token_len}, {meta.tokens_width}) with mask ({n}, {meta.token_len})"
                  if meta.has_tokens else "none")
        print(f"extractor    {meta.extractor}")
        print(f"checkpoint   {meta.checkpoint}" + (f" @ {meta.revision}" if meta.revision else ""))
        print(f"mode         {meta.mode}")
        print(f"rows         {n}")
        print(f"dim          {meta.dim}")
        print(f"dtype        {meta.dtype}")
        print(f"tokens       {tokens}")
        print(f"fingerprint  {meta.fingerprint}")
        print(f"created      {header.created}")
        print(f"versions     " + ", ".join(f"{k} {v}" for k, v in sorted(header.versions.items())))
        print(f"format       {FORMAT} v{header.format_version}")
        print(f"present      {verdict.present_count} of {verdict.committed} committed rows")
        if verdict.nonfinite_rows is not None:
            print(f"non-finite   {verdict.nonfinite_rows} rows with NaN/Inf")
        print(f"preprocess   {json.dumps(meta.preprocess, sort_keys=True)}")
    print(f"verdict      {verdict.status}: {verdict.detail}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m storage.features",
        description="Inspect HDF5 feature stores written by the extractors.")
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser(
        "info", help="print a store's metadata and integrity verdict",
        description="Print the metadata of a feature store (extractor, checkpoint, mode, rows, dim, "
                    "dtype, tokens, dataset fingerprint, creation time, package versions, preprocessing) "
                    "and its integrity verdict. Exit status 0 when complete, 1 when incomplete "
                    "(an interrupted extraction, e.g. a .partial file) or corrupt.")
    info.add_argument("file", type=Path, help="a .h5 store or a .h5.partial left by an interrupted extraction")
    info.add_argument("--check-values", action="store_true",
                      help="also scan the committed rows for NaN/Inf (reads all vectors and tokens)")
    args = parser.parse_args(argv)
    verdict = verify(args.file, check_values=args.check_values)
    _print_info(args.file, verdict)
    return 0 if verdict.ok else 1


if __name__ == "__main__":
    run_cli(main)
