"""HDF5 feature store: the vectors of one extractor over one dataset, in one file.

On disk
-------
One file per (dataset, extractor, mode), named by `store_path`:
`<features>/<dataset>__<extractor>__<mode>.h5`. Letters: N news, D vector width,
L tokens, Dt token width, B checksum blocks of a dataset.

    news_ids  (N,)        variable-length UTF-8 str; row i of every dataset is news_ids[i]
    vectors   (N, D)      float16 | float32 (StoreMeta.dtype), one pooled vector per news
    present   (N,)        bool; False where the input was missing (e.g. no image)
    tokens    (N, L, Dt)  optional token vectors, same dtype as vectors
    mask      (N, L)      bool, True on real tokens; exists exactly when tokens does
    extras/<name> (N, E)  optional further vectors per news, same dtype as vectors, one
                          dataset per name declared in StoreMeta.extras (BLIP's unimodal
                          `image_embeds` and `text_embeds` beside its image-grounded vectors)
    checksums/<name> (B, 32)  uint8 SHA-256 of each block of rows of dataset <name>
                          (vectors, present, and tokens, mask, extras/<name> when present);
                          see Checksums

Root attributes: `format` ("mmnews-features"), `format_version`, the `StoreMeta` fields
(`extractor`, `checkpoint`, `revision`, `mode`, `preprocess` as JSON, `fingerprint`, `dim`,
`dtype`, `token_len` and `token_dim`, 0 when there are no tokens, and `extras` as JSON
{name: width}, only when there are extras), `rows`, `created` (ISO
UTC), `versions` (JSON: python, numpy, h5py, hdf5, and torch/transformers/timm when
installed), `write_id`, the integrity pair `complete` / `committed_rows`, and the checksum
attributes `checksum` ("sha256"), `block_bytes`, `ids_sha256` and `attrs_sha256`.

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
   (and the digests of the blocks it completes, see Checksums) with `os.pwrite`, then
   `fdatasync`, then records the new committed-row count in the sidecar
   `<file>.partial.json` (temp file, fsync, `os.replace`). The counter therefore never
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

Checksums
---------
Issue 11: bytes flipped in the middle of a finished store went unnoticed and moved a
published result. Every numeric dataset is therefore cut into blocks of whole rows of about
`block_bytes` (1 MiB unless the writer is told otherwise): block b holds rows
[b*R, min((b+1)*R, N)) with R = max(1, block_bytes // bytes per row), and
`checksums/<name>[b]` is the SHA-256 of those rows' raw bytes as stored (little-endian
floats, bool as one byte 0/1). `ids_sha256` covers the ids (UTF-8, each ended by NUL)
and `attrs_sha256` every root attribute written at creation (canonical JSON; not `complete`,
`committed_rows` or itself, which change later). A mismatch is never used: readers raise
PipelineError naming the file, the dataset and its rows, and the fix (delete the file and
re-run extraction); `info` verifies every block and exits 1.

Why these and not HDF5's Fletcher-32 filter: a filter needs chunked datasets and sees only
data written through HDF5, not rows pwritten past it as here, and HDF5 checks it only on its
own read path (no memmap, no raw reads). The digest tables instead are two more preallocated
contiguous datasets written with pwrite like the rows: the `write` that completes a block
also writes its digest, before the fdatasync that precedes the counter update, so the
counter never runs ahead of a digest, a kill -9 costs nothing more than before and no HDF5
metadata changes while rows go in. Blocks are fixed by row number, not by write calls, so
any chunking, any resume and a merge of shards (storage/shards.py) give byte-identical
digests. The writer hashes rows as they pass (one running hash per dataset); a resumed
writer re-reads the committed rows of each block in progress (at most one block per
dataset) from the partial. Per-block digests let a reader check exactly what it reads:
`load` the datasets it loads, a gather the blocks it touches (each block once per open
store); 1 MiB keeps a sparse gather's over-read small and the tables small (32 bytes per
MiB). SHA-256 rather than CRC-32 (2.0 GB/s against SHA-256's 1.0 GB/s with SHA-NI on the
2-core machine, blake2b 0.8): a 32-bit check per block is weak across tens of thousands of
blocks, and SHA-256 leaves nothing to argue about; the cost is measured in
benchmarks/store_read.py (benchmarks/RESULTS.md).

Stores written before checksums (format version 1) are refused with "delete it and re-run
extraction": accepting them with a warning would let through exactly the silent damage this
guards against, and a rerun of extraction rewrites them.

Extras
------
Extra vectors came after format 2 and stay inside it, with no version bump: a store that
declares none is laid out and attributed exactly as before (no `extras` attribute, no
`extras` group), so every format-2 store opens as one without extras; a store that declares
some adds one attribute (covered by `attrs_sha256`) and datasets that a reader from before
extras never looks at, so nothing refuses it either. A bump would have made every older
reader refuse every new store, extras or not, for data it does not read. Inside this version
extras are datasets like `vectors`: preallocated, contiguous, pwritten with each chunk before
the fdatasync that precedes the counter, digested per block in `checksums/extras/<name>`,
verified on every read and by `info`, compared on resume (`StoreMeta.differences`), copied
by a shard merge. A BLIP store from before extras differs from today's meta in `extras`, so
extraction rewrites it rather than reusing it.

Reading
-------
`FeatureStore.load(tokens=False)` reads vectors and present only: a pooled ranker over a
store with tokens reads no token byte and holds no more memory than over a store without.
Extras are read only when asked (`load(extras=True)`, `read_rows(..., extras=True)`,
`take_extra`), so the same holds for them.
`load(tokens=True)` reads everything into memory, as before. `load(tokens="lazy")` returns
tokens as a copy-on-write `np.memmap` of the contiguous dataset: pages are read when
touched, writes stay private to the process, `torch.from_numpy` shares it without a copy.
A memmap's reads cannot be intercepted (torch indexes its memory directly), so its blocks
are verified up front in one streaming pass through a 16 MiB buffer: the file is read once
more, memory stays flat. Gathers on an unloaded store (`take`, `take_tokens`) verify the
blocks they touch.

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
import hashlib
import importlib.metadata
import json
import logging
import os
import platform
import re
import uuid
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import h5py
import numpy as np
from h5py import h5d, h5p

from storage.errors import PipelineError, run_cli
from storage.locks import lock_exclusively

log = logging.getLogger(__name__)

FORMAT = "mmnews-features"
FORMAT_VERSION = 2  # 2: per-block checksums (module docstring); 1 had none and is refused
CHECKSUM = "sha256"
BLOCK_BYTES = 1 << 20  # default bytes of rows per checksummed block
_DIGEST_SIZE = 32
_PIECE_BYTES = 16 << 20  # streaming verification reads this much at a time
_HASH_THREADS = min(8, len(os.sched_getaffinity(0)))  # hashlib releases the GIL on large buffers
# Root attributes that change after creation, so attrs_sha256 leaves them out.
_MUTABLE_ATTRS = ("complete", "committed_rows", "attrs_sha256")
MODES = ("frozen", "finetuned")
DTYPES = ("float16", "float32")
# Explicit little-endian so the bytes pwritten by the writer match the file's datatype.
_NUMPY_DTYPE = {"float16": np.dtype("<f2"), "float32": np.dtype("<f4")}
_OPTIONAL_PACKAGES = ("torch", "transformers", "timm")
_PROGRESS_FORMAT = "mmnews-features-progress"
EXTRAS_GROUP = "extras"
_EXTRA_NAME = re.compile(r"[A-Za-z0-9_.-]+")

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
    `extras` names further per-news vectors and their widths E, each kept in the dataset
    `extras/<name>` (N, E) (e.g. BLIP's {"image_embeds": 256, "text_embeds": 256}); empty
    for most extractors.
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
    extras: dict[str, int] = dataclasses.field(default_factory=dict)

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
        object.__setattr__(self, "extras", _normal_extras(self.extras))

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
            # Only when declared: a store without extras keeps exactly the attributes it had before them.
            **({"extras": self.extras_json()} if self.extras else {}),
        }

    def extras_json(self) -> str:
        return json.dumps(self.extras, sort_keys=True, separators=(",", ":"))

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
            extras=json.loads(str(attrs["extras"])) if "extras" in attrs else {},
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


def _normal_extras(extras: Any) -> dict[str, int]:
    """StoreMeta.extras checked and sorted by name: names that are one HDF5 path part, widths >= 1."""
    if not isinstance(extras, dict):
        raise ValueError(f"StoreMeta.extras must be a dict of name -> width, got {type(extras).__name__}")
    out = {}
    for name in sorted(extras, key=str):
        width = extras[name]
        if not isinstance(name, str) or not _EXTRA_NAME.fullmatch(name):
            raise ValueError(f"StoreMeta.extras name {name!r} must be letters, digits, '.', '_' or '-'")
        if isinstance(width, bool) or not isinstance(width, (int, np.integer)) or int(width) < 1:
            raise ValueError(f"StoreMeta.extras[{name!r}] must be a width >= 1, got {width!r}")
        out[name] = int(width)
    return out


def extra_dataset(name: str) -> str:
    """The dataset that holds the extra vectors `name`: `extras/<name>`."""
    return f"{EXTRAS_GROUP}/{name}"


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


class _Outdated(_Corrupt):
    """Internal: a store of an older format (no checksums); refused with its own message."""


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
    block_bytes: int = BLOCK_BYTES


_REQUIRED_ATTRS = ("format", "format_version", "extractor", "checkpoint", "revision", "mode", "preprocess",
                   "fingerprint", "dim", "dtype", "token_len", "token_dim", "rows", "created", "versions",
                   "write_id", "complete", "committed_rows", "checksum", "block_bytes", "ids_sha256",
                   "attrs_sha256")
_OPTIONAL_ATTRS = ("extras",)  # StoreMeta fields written only when set


def _data_names(meta: StoreMeta) -> list[str]:
    """The numeric datasets of a store, in write order."""
    return (["vectors", "present"] + (["tokens", "mask"] if meta.has_tokens else [])
            + [extra_dataset(name) for name in meta.extras])


def _float_names(meta: StoreMeta) -> list[str]:
    """The datasets in the store dtype: vectors, tokens, extras."""
    return [name for name in _data_names(meta) if name not in ("present", "mask")]


def _sums_name(name: str) -> str:
    return f"checksums/{name}"


def _block_rows(row_bytes: int, block_bytes: int) -> int:
    """R: rows per checksummed block of a dataset whose rows take `row_bytes` each."""
    return max(1, block_bytes // max(row_bytes, 1))


def _read_header(f: h5py.File) -> StoreHeader:
    """Parse and cross-check attributes and dataset shapes; raise _Corrupt naming the problem."""
    if "format" not in f.attrs:
        raise _Corrupt("not a feature store (no 'format' attribute)")
    if f.attrs["format"] != FORMAT:
        raise _Corrupt(f"format is {f.attrs['format']!r}, expected {FORMAT!r}")
    version = int(f.attrs["format_version"]) if "format_version" in f.attrs else None
    if version == 1:
        raise _Outdated("it was written by an older mmnews (feature store format 1) without checksums, "
                        "so its data cannot be verified")
    if version != FORMAT_VERSION:
        raise _Corrupt(f"format version {version} is not supported (this code reads version {FORMAT_VERSION})")
    missing = [a for a in _REQUIRED_ATTRS if a not in f.attrs]
    if missing:
        raise _Corrupt(f"missing attributes: {', '.join(missing)}")
    if f.attrs["checksum"] != CHECKSUM:
        raise _Corrupt(f"checksum is {f.attrs['checksum']!r}, expected {CHECKSUM!r}")
    try:
        meta = StoreMeta.from_attrs(f.attrs)
        versions = json.loads(str(f.attrs["versions"]))
    except (ValueError, TypeError, KeyError) as err:
        raise _Corrupt(f"unreadable metadata attributes: {err}") from None
    n = int(f.attrs["rows"])
    block_bytes = int(f.attrs["block_bytes"])
    if block_bytes < 1 or n < 0:
        raise _Corrupt(f"rows {n} or block_bytes {block_bytes} out of range")
    names = _data_names(meta)
    required = ["news_ids", *names, *(_sums_name(name) for name in names)]
    absent = [name for name in required if name not in f]
    if absent:
        raise _Corrupt(f"missing datasets: {', '.join(absent)}")
    if not meta.has_tokens and ("tokens" in f or "mask" in f):
        raise _Corrupt("has a tokens/mask dataset but token_len is 0")
    if EXTRAS_GROUP in f:
        group = f[EXTRAS_GROUP]
        stray = sorted(set(group) - set(meta.extras)) if isinstance(group, h5py.Group) else [EXTRAS_GROUP]
        if stray:
            raise _Corrupt(f"has extras datasets its attributes do not declare: {', '.join(stray)}")
    expect = {"news_ids": (n,), "vectors": (n, meta.dim), "present": (n,)}
    if meta.has_tokens:
        expect["tokens"] = (n, int(meta.token_len or 0), meta.tokens_width)
        expect["mask"] = (n, int(meta.token_len or 0))
    expect.update({extra_dataset(name): (n, width) for name, width in meta.extras.items()})
    for name, shape in expect.items():
        if not isinstance(f[name], h5py.Dataset) or f[name].shape != shape:
            got = getattr(f[name], "shape", "a group")
            raise _Corrupt(f"dataset {name} has shape {got}, expected {shape}")
    string_info = h5py.check_string_dtype(f["news_ids"].dtype)
    if string_info is None or string_info.encoding != "utf-8":
        raise _Corrupt(f"dataset news_ids has dtype {f['news_ids'].dtype}, expected UTF-8 strings")
    want = _NUMPY_DTYPE[meta.dtype]
    for name in _float_names(meta):
        if f[name].dtype != want:
            raise _Corrupt(f"dataset {name} has dtype {f[name].dtype}, expected {meta.dtype}")
    for name in ("present", "mask") if meta.has_tokens else ("present",):
        if f[name].dtype != np.bool_:
            raise _Corrupt(f"dataset {name} has dtype {f[name].dtype}, expected bool")
    for name in names:
        dset = f[name]
        row_bytes = int(np.prod(dset.shape[1:], dtype=np.int64)) * dset.dtype.itemsize
        blocks = -(-n // _block_rows(row_bytes, block_bytes))
        sums = f[_sums_name(name)]
        if not isinstance(sums, h5py.Dataset) or sums.shape != (blocks, _DIGEST_SIZE) or sums.dtype != np.uint8:
            raise _Corrupt(f"dataset {_sums_name(name)} has shape {getattr(sums, 'shape', 'a group')}, "
                           f"expected ({blocks}, {_DIGEST_SIZE}) uint8")
    committed = int(f.attrs["committed_rows"])
    return StoreHeader(meta=meta, rows=n, complete=bool(f.attrs["complete"]), committed_rows=committed,
                       created=str(f.attrs["created"]), versions=versions, write_id=str(f.attrs["write_id"]),
                       format_version=version, block_bytes=block_bytes)


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


@dataclass(frozen=True)
class _Span:
    """Where one numeric dataset and its digest table lie in the file, and its block grid."""

    name: str
    dtype: np.dtype
    shape: tuple[int, ...]  # (N, ...)
    offset: int  # byte offset of row 0
    row_bytes: int
    block_rows: int  # R
    sums_offset: int  # byte offset of the (B, 32) digest table

    @property
    def rows(self) -> int:
        return self.shape[0]

    @property
    def blocks(self) -> int:
        return -(-self.rows // self.block_rows)

    def bounds(self, block: int) -> tuple[int, int]:
        """Rows [lo, hi) of a block."""
        return block * self.block_rows, min((block + 1) * self.block_rows, self.rows)

    def typed(self, raw: np.ndarray, rows: int) -> np.ndarray:
        """Raw bytes (rows * row_bytes,) uint8 of whole rows -> (rows, ...) in the store dtype."""
        return raw.view(self.dtype).reshape((rows,) + self.shape[1:])


def _spans(f: h5py.File, names: Sequence[str], block_bytes: int,
           regions: dict[str, tuple[int, int]] | None = None) -> dict[str, _Span]:
    regions = regions or _raw_regions(f, [*names, *(_sums_name(name) for name in names)])
    spans = {}
    for name in names:
        dset = f[name]
        # bool is stored as a 1-byte enum {0, 1}: its raw form is uint8 0/1, read back as np.bool_.
        dtype = np.dtype(np.bool_) if dset.dtype == np.bool_ else dset.dtype
        row_bytes = int(np.prod(dset.shape[1:], dtype=np.int64)) * dtype.itemsize
        spans[name] = _Span(name=name, dtype=dtype, shape=tuple(dset.shape), offset=regions[name][0],
                            row_bytes=row_bytes, block_rows=_block_rows(row_bytes, block_bytes),
                            sums_offset=regions[_sums_name(name)][0])
    return spans


def _check_layout(f: h5py.File, path: Path) -> tuple[StoreHeader, dict[str, _Span]]:
    """Header plus the data and digest blocks, checked to lie inside the file; _Corrupt otherwise."""
    header = _read_header(f)
    names = _data_names(header.meta)
    regions = _raw_regions(f, [*names, *(_sums_name(name) for name in names)])
    end = max((offset + size for offset, size in regions.values()), default=0)
    size = path.stat().st_size
    if end > size:
        raise _Corrupt(f"data runs to byte {end} but the file has {size}")
    return header, _spans(f, names, header.block_bytes, regions)


def _plain(value: Any) -> Any:
    """An attribute value as JSON-able Python, the same whether just set or read back."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value.tolist()]
    if isinstance(value, np.generic):
        return value.item()
    return value


def _attrs_digest(attrs: Any) -> str:
    """SHA-256 of every root attribute but the mutable ones, as canonical JSON."""
    plain = {key: _plain(attrs[key]) for key in sorted(attrs) if key not in _MUTABLE_ATTRS}
    body = json.dumps(plain, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(body.encode("utf-8")).hexdigest()


def _ids_digest(ids: np.ndarray) -> str:
    """SHA-256 of the ids as UTF-8, each ended by NUL (unambiguous: HDF5 strings hold no NUL)."""
    return hashlib.sha256(("\0".join(ids.tolist()) + "\0").encode("utf-8")).hexdigest()


def _check_digests(f: h5py.File, ids: np.ndarray) -> None:
    """The attributes and ids against their digests; _Corrupt naming which differ."""
    if _attrs_digest(f.attrs) != str(f.attrs["attrs_sha256"]):
        raise _Corrupt("the root attributes do not match their checksum (attrs_sha256)")
    if _ids_digest(ids) != str(f.attrs["ids_sha256"]):
        raise _Corrupt("news_ids do not match their checksum (ids_sha256)")


def _read_ids(f: h5py.File, rows: int) -> np.ndarray:
    return f["news_ids"].asstr()[:] if rows else np.empty(0, dtype=object)


_hash_pool: ThreadPoolExecutor | None = None


def _forget_hash_pool() -> None:
    # A forked child inherits the pool object but not its threads.
    global _hash_pool
    _hash_pool = None


os.register_at_fork(after_in_child=_forget_hash_pool)


def _sha256_all(buffers: Sequence[np.ndarray]) -> list[bytes]:
    """SHA-256 digest of each buffer, spread over threads when there are several."""
    global _hash_pool
    if _HASH_THREADS < 2 or len(buffers) < 2:
        return [hashlib.sha256(b).digest() for b in buffers]
    if _hash_pool is None:
        _hash_pool = ThreadPoolExecutor(max_workers=_HASH_THREADS, thread_name_prefix="store-sha256")
    return list(_hash_pool.map(lambda b: hashlib.sha256(b).digest(), buffers))


def _pread_into(fd: int, buf: np.ndarray, offset: int) -> None:
    """Fill the uint8 array `buf` from byte `offset`; _Corrupt when the file ends first."""
    view = memoryview(buf).cast("B")
    while len(view):
        got = os.preadv(fd, [view], offset)
        if got == 0:
            raise _Corrupt(f"the file ends at byte {offset}, inside a dataset")
        view, offset = view[got:], offset + got


class _Blocks:
    """Checksum-verified raw reads of one store's numeric datasets (see "Checksums").

    Each block is verified at most once per instance; `verified[name]` (B,) records which.
    Raises PipelineError on a mismatch, _Corrupt on a short file and OSError on a failed read.
    """

    def __init__(self, path: Path, fd: int, spans: dict[str, _Span]):
        self.path, self.fd, self.spans = path, fd, spans
        self.digests: dict[str, np.ndarray] = {}  # name -> (B, 32) uint8
        self.verified: dict[str, np.ndarray] = {}  # name -> (B,) bool
        for name, span in spans.items():
            table = np.empty(span.blocks * _DIGEST_SIZE, dtype=np.uint8)
            _pread_into(fd, table, span.sums_offset)
            self.digests[name] = table.reshape(span.blocks, _DIGEST_SIZE)
            self.verified[name] = np.zeros(span.blocks, dtype=bool)

    def read(self, name: str, lo: int, hi: int) -> np.ndarray:
        """Rows [lo, hi) of dataset `name` in the store dtype, every block they touch verified."""
        span = self.spans[name]
        if hi <= lo:
            return span.typed(np.empty(0, dtype=np.uint8), 0)
        b0, b1 = lo // span.block_rows, -(-hi // span.block_rows)
        if self.verified[name][b0:b1].all():
            raw = np.empty((hi - lo) * span.row_bytes, dtype=np.uint8)
            _pread_into(self.fd, raw, span.offset + lo * span.row_bytes)
            return span.typed(raw, hi - lo)
        first = span.bounds(b0)[0]
        raw = np.empty((span.bounds(b1 - 1)[1] - first) * span.row_bytes, dtype=np.uint8)
        self._refuse(name, self.scan(name, b0, b1, out=raw))
        return span.typed(raw[(lo - first) * span.row_bytes:(hi - first) * span.row_bytes], hi - lo)

    def ensure(self, name: str, rows: np.ndarray) -> None:
        """Verify the blocks that the sorted rows (K,) touch, reading each unverified one once."""
        span = self.spans[name]
        blocks = np.unique(np.asarray(rows, dtype=np.int64) // span.block_rows)
        todo = blocks[~self.verified[name][blocks]]
        if not len(todo):
            return
        # Runs of consecutive blocks are read with one call each.
        cuts = np.flatnonzero(np.diff(todo) != 1) + 1
        for run in np.split(todo, cuts):
            self._refuse(name, self.scan(name, int(run[0]), int(run[-1]) + 1))

    def verify(self, name: str) -> None:
        """Verify every block of `name` in one streaming pass (memory: one 16 MiB buffer)."""
        self._refuse(name, self.scan(name, 0, self.spans[name].blocks))

    def scan(self, name: str, b0: int, b1: int, out: np.ndarray | None = None) -> list[int]:
        """Read blocks b0..b1-1 (into `out`, raw bytes of exactly those rows, when given; else
        through a reused buffer), hash the unverified ones and return those that mismatch."""
        span = self.spans[name]
        block_bytes = span.block_rows * span.row_bytes
        per_piece = max(1, _PIECE_BYTES // max(block_bytes, 1))
        first = span.bounds(b0)[0]
        buffer = None
        bad = []
        for a in range(b0, b1, per_piece):
            b = min(a + per_piece, b1)
            if out is None and self.verified[name][a:b].all():
                continue
            lo, hi = span.bounds(a)[0], span.bounds(b - 1)[1]
            size = (hi - lo) * span.row_bytes
            if out is not None:
                piece = out[(lo - first) * span.row_bytes:(hi - first) * span.row_bytes]
            else:
                if buffer is None:
                    buffer = np.empty(min(per_piece * block_bytes, (span.bounds(b1 - 1)[1] - first) * span.row_bytes),
                                      dtype=np.uint8)
                piece = buffer[:size]
            _pread_into(self.fd, piece, span.offset + lo * span.row_bytes)
            todo = [block for block in range(a, b) if not self.verified[name][block]]
            slices = [piece[(span.bounds(k)[0] - lo) * span.row_bytes:(span.bounds(k)[1] - lo) * span.row_bytes]
                      for k in todo]
            for block, digest in zip(todo, _sha256_all(slices)):
                if digest == self.digests[name][block].tobytes():
                    self.verified[name][block] = True
                else:
                    bad.append(block)
        return bad

    def describe(self, name: str, bad: Sequence[int]) -> str:
        span = self.spans[name]
        lo, hi = span.bounds(bad[0])
        more = f", and {len(bad) - 1} more of its blocks" if len(bad) > 1 else ""
        return (f"checksum mismatch in {name} rows {lo}..{hi - 1} (block {bad[0]} of {span.blocks}{more}): "
                f"the file changed after it was written (a disk fault, an incomplete copy, an edit)")

    def _refuse(self, name: str, bad: Sequence[int]) -> None:
        if bad:
            raise PipelineError(f"{self.path}: {self.describe(name, bad)}; delete it and re-run extraction")


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
    may not shadow the store's own attributes. `block_bytes` sets the checksummed block size
    (module docstring); stores compare equal only when written with the same one.
    """

    def __init__(self, path: PathLike, meta: StoreMeta, ids: Sequence[str] | np.ndarray, *,
                 restart: bool = False, fsync: bool = True, attrs: dict[str, Any] | None = None,
                 block_bytes: int = BLOCK_BYTES):
        self.path = Path(path)
        if self.path.name.endswith(".partial"):
            raise ValueError(f"{self.path}: pass the final file name; the writer adds '.partial' itself")
        if int(block_bytes) < 1:
            raise ValueError(f"block_bytes must be >= 1, got {block_bytes}")
        self.block_bytes = int(block_bytes)
        clash = sorted(set(attrs or {}) & {*_REQUIRED_ATTRS, *_OPTIONAL_ATTRS})
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
        self._spans: dict[str, _Span] = {}
        self._hashes: dict[str, Any] = {}  # name -> running SHA-256 of the block in progress
        self._acquire_lock()
        try:
            self._prepare(restart)
            self._fd = os.open(self.partial, os.O_RDWR)
            self._start_hashes()
        except BaseException:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
            self._release_lock()
            raise

    # -- setup

    def _acquire_lock(self) -> None:
        lock = _lock_path(self.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock_fd = lock_exclusively(lock, f"{self.path}: another process is writing this feature store "
                                               f"(it holds {lock}); wait for it to finish")

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
                header, spans = _check_layout(f, self.partial)
                stored_ids = _read_ids(f, header.rows)
                _check_digests(f, stored_ids)
        except (OSError, _Corrupt, KeyError, ValueError) as err:
            self.discarded = f"{self.partial} cannot be reused ({err}); starting over"
            log.warning("%s", self.discarded)
            return False
        problems = header.meta.differences(self.meta)
        if header.block_bytes != self.block_bytes:
            problems.append(f"block_bytes: file has {header.block_bytes}, this run has {self.block_bytes}")
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
        self._spans = spans
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
            for name, width in meta.extras.items():
                f.create_dataset(extra_dataset(name), shape=(n, width), dtype=dt, dcpl=_dcpl_early())
            names = _data_names(meta)
            for name in names:
                row_bytes = int(np.prod(f[name].shape[1:], dtype=np.int64)) * f[name].dtype.itemsize
                blocks = -(-n // _block_rows(row_bytes, self.block_bytes))
                f.create_dataset(_sums_name(name), shape=(blocks, _DIGEST_SIZE), dtype=np.uint8, dcpl=_dcpl_early())
            attrs = {"format": FORMAT, "format_version": np.int64(FORMAT_VERSION), **meta.to_attrs(),
                     "rows": np.int64(n),
                     "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                     "versions": json.dumps(package_versions(), sort_keys=True),
                     "write_id": self._write_id,
                     # Fixed-size scalars, later overwritten in place by finalize().
                     "complete": np.bool_(False), "committed_rows": np.int64(0),
                     "checksum": CHECKSUM, "block_bytes": np.int64(self.block_bytes),
                     "ids_sha256": _ids_digest(self.ids),
                     **self.extra_attrs}
            for key, value in attrs.items():
                f.attrs[key] = value
            # Hashed as read back, so that the reader's digest of the same attributes agrees.
            f.attrs["attrs_sha256"] = _attrs_digest(f.attrs)
            self._spans = _spans(f, names, self.block_bytes)
        if self.fsync:
            _fsync_path(tmp)
        os.replace(tmp, self.partial)
        if self.fsync:
            _fsync_path(self.partial.parent, directory=True)
        self.next_row = 0
        self._save_progress()

    def _start_hashes(self) -> None:
        """Running hashes of the blocks in progress: a resumed writer re-reads their committed rows."""
        self._hashes = {}
        for name, span in self._spans.items():
            h = hashlib.sha256()
            lo = (self.next_row // span.block_rows) * span.block_rows
            if lo < self.next_row < self.rows:
                raw = np.empty((self.next_row - lo) * span.row_bytes, dtype=np.uint8)
                try:
                    _pread_into(self._fd, raw, span.offset + lo * span.row_bytes)
                except OSError as err:
                    raise StoreIOError(f"{self.partial}: reading committed rows {lo}..{self.next_row - 1} to resume "
                                       f"failed ({err}); fix the disk problem and re-run to resume") from None
                except _Corrupt as err:
                    raise PipelineError(_corrupt_message(self.partial, str(err))) from None
                h.update(raw)
            self._hashes[name] = h

    def _hash_rows(self, start: int,
                   raws: dict[str, memoryview]) -> tuple[dict[str, Any], dict[str, tuple[int, bytes]]]:
        """Feed rows start.. (raw bytes per dataset) to copies of the running hashes.

        Returns the new running hashes and, per dataset, (first block, digests) of the blocks
        these rows complete. Nothing of the writer changes, so a failed write can be retried.
        """
        hashes, done = {}, {}
        for name, raw in raws.items():
            span = self._spans[name]
            stop = start + len(raw) // span.row_bytes
            h = self._hashes[name].copy()
            first, digests = -1, []
            row = start
            while row < stop:
                block = row // span.block_rows
                end = span.bounds(block)[1]
                upto = min(stop, end)
                h.update(raw[(row - start) * span.row_bytes:(upto - start) * span.row_bytes])
                if upto == end:
                    first = block if first < 0 else first
                    digests.append(h.digest())
                    h = hashlib.sha256()
                row = upto
            hashes[name] = h
            if digests:
                done[name] = (first, b"".join(digests))
        return hashes, done

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
              tokens: np.ndarray | None = None, mask: np.ndarray | None = None,
              extras: Mapping[str, np.ndarray] | None = None) -> int:
        """Write rows next_row .. next_row+K-1 and commit them; returns the new next_row.

        vectors (K, D); present (K,) bool; tokens (K, L, Dt) and mask (K, L) bool exactly
        when the meta has token_len; extras {name: (K, E)} with exactly the meta's names
        exactly when it declares extras. Floats are cast to the store dtype.
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
        chunk.update(self._extras_chunk(extras, k, dt))
        if self.next_row + k > self.rows:
            raise ValueError(f"{self.path}: {k} rows at row {self.next_row} overflow the {self.rows} rows")
        if k == 0:
            return self.next_row
        start = self.next_row
        # bool is stored as a 1-byte enum {0, 1}: the uint8 view is its on-disk form.
        raws = {name: memoryview(arr.view(np.uint8) if arr.dtype == np.bool_ else arr).cast("B")
                for name, arr in chunk.items()}
        hashes, digests = self._hash_rows(start, raws)
        try:
            for name, raw in raws.items():
                span = self._spans[name]
                _pwrite_all(self._fd, raw, span.offset + start * span.row_bytes)
            # The digests of the blocks these rows complete go down with them, before the sync.
            for name, (first, table) in digests.items():
                _pwrite_all(self._fd, memoryview(table), self._spans[name].sums_offset + first * _DIGEST_SIZE)
            if self.fsync:
                os.fdatasync(self._fd)
            # Only now, with the rows and digests on disk, may the counter move past them.
            self.next_row = start + k
            self._save_progress()
        except OSError as err:
            self.next_row = start  # the counter on disk did not move; these rows can be written again
            raise StoreIOError(f"{self.partial}: writing rows {start}..{start + k - 1} failed ({err}); "
                                f"fix the disk problem (space, permissions) and re-run to resume") from None
        self._hashes = hashes
        return self.next_row

    def _extras_chunk(self, extras: Mapping[str, np.ndarray] | None, k: int, dt: np.dtype) -> dict[str, np.ndarray]:
        """{dataset: (K, E) in the store dtype} of the extras this store declares, checked."""
        declared = self.meta.extras
        given = dict(extras or {})
        if sorted(given) != sorted(declared):
            if not declared:
                raise ValueError(f"{self.path}: extras {', '.join(sorted(given))} given but the meta declares none")
            raise ValueError(f"{self.path}: this store keeps extras {', '.join(declared)}; pass exactly those "
                             f"(got {', '.join(sorted(given)) or 'none'})")
        out = {}
        for name, width in declared.items():
            arr = np.ascontiguousarray(given[name], dtype=dt)  # (K, E)
            if arr.shape != (k, width):
                raise ValueError(f"extras[{name!r}] must have shape ({k}, {width}), got {arr.shape}")
            out[extra_dataset(name)] = arr
        return out

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
    bad = [i for i, x in enumerate(arr) if not isinstance(x, str) or "\0" in x]
    if bad:
        raise ValueError(f"news ids must be str without NUL; row {bad[0]} is {arr[bad[0]]!r}")
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
    """A store's arrays. ids (N,) str; vectors (N, D); present (N,) bool; tokens (N, L, Dt)
    and mask (N, L) bool, or None (no tokens in the store, or not asked for); extras
    {name: (N, E)}, the extra vectors asked for (empty unless asked). From
    `load(tokens="lazy")` tokens is a copy-on-write np.memmap of the file (module docstring)."""

    ids: np.ndarray
    vectors: np.ndarray
    present: np.ndarray
    tokens: np.ndarray | None
    mask: np.ndarray | None
    extras: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)


class FeatureStore:
    """A complete store opened read-only, every read checked against its checksums. Use
    `FeatureStore.open`.

    Opening verifies the attributes, the ids and `present`; every later read verifies the
    blocks it touches, once per open store. Gathers (`get`, `take`, `*_tokens`) read sorted
    unique rows from the file, or from memory after `load()` / `open(..., in_memory=True)`;
    any order and duplicates are fine.
    """

    def __init__(self, path: Path, f: h5py.File, header: StoreHeader, ids: np.ndarray, blocks: _Blocks):
        self.path = path
        self.meta = header.meta
        self.created = header.created
        self.versions = header.versions
        self.ids = ids  # (N,) object str
        self.index: dict[str, int] = {x: i for i, x in enumerate(ids.tolist())}
        self._file: h5py.File | None = f
        self._blocks: _Blocks | None = blocks
        self._memory: dict[str, np.ndarray] = {}  # whole datasets read into memory
        self._mapped_tokens: np.ndarray | None = None  # (N, L, Dt) memmap, verified
        self.present = self._whole("present")  # (N,) bool

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
        fd: int | None = None
        try:
            try:
                header, spans = _check_layout(f, path)
                ids = _read_ids(f, header.rows)
                _check_digests(f, ids)
            except _Outdated as err:
                raise PipelineError(f"{path}: {err}; delete it and re-run extraction") from None
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
            fd = os.open(path, os.O_RDONLY)
            blocks = _raw_call(path, lambda: _Blocks(path, fd, spans))
            store = cls(path, f, header, ids, blocks)
            if in_memory:
                store.load(extras=True)
        except BaseException:
            f.close()
            if fd is not None:
                os.close(fd)
            raise
        return store

    # -- properties

    @property
    def dim(self) -> int:
        return self.meta.dim

    @property
    def has_tokens(self) -> bool:
        return self.meta.has_tokens

    @property
    def extra_names(self) -> tuple[str, ...]:
        """Names of the extra vectors the store keeps (StoreMeta.extras), sorted."""
        return tuple(self.meta.extras)

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
        self._require_tokens()
        return self._gather("tokens", indices), self._gather("mask", indices)

    def get_extra(self, name: str, ids: Sequence[str] | np.ndarray) -> np.ndarray:
        """(K, E) extra vectors `name` of the given news ids."""
        return self.take_extra(name, self.rows(ids))

    def take_extra(self, name: str, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """(K, E) extra vectors `name` of the given rows (any order, duplicates allowed)."""
        (name,) = self._extra_names([name])
        return self._gather(extra_dataset(name), indices)

    def load(self, tokens: bool | Literal["lazy"] = True, extras: bool | Sequence[str] = False) -> FeatureArrays:
        """The store's arrays, read into memory and verified; later gathers are served from them.

        tokens=True reads tokens and mask too; False leaves them unread (None), so a pooled
        ranker reads no token byte; "lazy" reads the mask and maps the tokens as a
        copy-on-write np.memmap, verified first in one streaming pass (module docstring).
        extras=True reads every extra dataset, a sequence of names those; False (default)
        reads none.
        """
        if tokens not in (True, False, "lazy"):
            raise ValueError(f"tokens must be True, False or 'lazy', got {tokens!r}")
        names = self._extra_names(extras)
        vectors = self._whole("vectors")  # (N, D)
        tok = msk = None
        if tokens is not False and self.has_tokens:
            msk = self._whole("mask")  # (N, L)
            if tokens is True or "tokens" in self._memory:
                tok = self._whole("tokens")  # (N, L, Dt)
            else:
                tok = self._map_tokens()  # (N, L, Dt) memmap
        more = {name: self._whole(extra_dataset(name)) for name in names}  # name -> (N, E)
        return FeatureArrays(ids=self.ids, vectors=vectors, present=self.present, tokens=tok, mask=msk, extras=more)

    def read_rows(self, start: int, stop: int, tokens: bool = True,
                  extras: bool | Sequence[str] = False) -> FeatureArrays:
        """Rows start..stop-1 of every dataset (tokens and mask, extras, only when asked), verified."""
        n = len(self)
        if not 0 <= start <= stop <= n:
            raise IndexError(f"{self.path}: rows {start}..{stop - 1} out of range 0..{n - 1}")
        with_tokens = tokens and self.has_tokens
        names = self._extra_names(extras)
        return FeatureArrays(
            ids=self.ids[start:stop],
            vectors=self._rows("vectors", start, stop),
            present=self.present[start:stop],
            tokens=self._rows("tokens", start, stop) if with_tokens else None,
            mask=self._rows("mask", start, stop) if with_tokens else None,
            extras={name: self._rows(extra_dataset(name), start, stop) for name in names},
        )

    def _extra_names(self, extras: bool | Sequence[str]) -> list[str]:
        """The extras a read asks for: all of them (True), none (False) or these names."""
        if extras is True:
            return list(self.meta.extras)
        if extras is False:
            return []
        if isinstance(extras, str):
            raise ValueError(f"extras must be True, False or a sequence of names, got {extras!r}")
        unknown = [name for name in extras if name not in self.meta.extras]
        if unknown:
            kept = ", ".join(self.meta.extras) or "none"
            raise PipelineError(f"{self.path}: this feature store has no extra vectors {unknown[0]!r} (it keeps: "
                                f"{kept}); re-run extraction with an extractor that returns them")
        return list(extras)

    def _rows(self, name: str, start: int, stop: int) -> np.ndarray:
        if name in self._memory:
            return self._memory[name][start:stop]
        return _raw_call(self.path, lambda: self._require_open()[1].read(name, start, stop))

    def _whole(self, name: str) -> np.ndarray:
        if name not in self._memory:
            self._memory[name] = self._rows(name, 0, len(self))
        return self._memory[name]

    def _map_tokens(self) -> np.ndarray:
        """(N, L, Dt) tokens as a copy-on-write memmap, every block verified first."""
        if self._mapped_tokens is None:
            blocks = self._require_open()[1]
            _raw_call(self.path, lambda: blocks.verify("tokens"))
            span = blocks.spans["tokens"]
            if span.rows == 0:
                self._mapped_tokens = np.empty(span.shape, dtype=span.dtype)
            else:
                # 'c': private pages, so torch.from_numpy takes it without a read-only warning
                # and a stray in-place write can never reach the file.
                self._mapped_tokens = np.memmap(self.path, dtype=span.dtype, mode="c", offset=span.offset,
                                                shape=span.shape)
        return self._mapped_tokens

    def _require_tokens(self) -> None:
        if not self.has_tokens:
            raise PipelineError(f"{self.path}: this feature store has no token vectors; "
                                f"re-run extraction with tokens enabled")

    def _gather(self, name: str, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)  # (K,)
        n = len(self)
        if idx.size and (idx.min() < 0 or idx.max() >= n):
            bad = int(idx[(idx < 0) | (idx >= n)][0])
            raise IndexError(f"{self.path}: row {bad} out of range 0..{n - 1}")
        if name in self._memory:
            return self._memory[name][idx]
        if name == "tokens" and self._mapped_tokens is not None:
            return np.asarray(self._mapped_tokens[idx])
        f, blocks = self._require_open()
        dset = f[name]
        if idx.size == 0:
            return np.empty((0,) + dset.shape[1:], dtype=dset.dtype)
        # h5py fancy indexing needs strictly increasing indices: read the sorted unique rows,
        # then scatter back to the requested order (and duplicates) in memory.
        uniq, inverse = np.unique(idx, return_inverse=True)
        lo, hi = int(uniq[0]), int(uniq[-1]) + 1
        if hi - lo <= 2 * len(uniq) + 64:
            # Dense enough: one contiguous (verified) read beats a many-hyperslab selection.
            rows = self._rows(name, lo, hi)[uniq - lo]
        else:
            _raw_call(self.path, lambda: blocks.ensure(name, uniq))
            rows = self._read(lambda: dset[uniq])
        return rows[inverse]

    def _read(self, fn: Callable[[], np.ndarray]) -> np.ndarray:
        try:
            return fn()
        except OSError as err:
            raise PipelineError(_corrupt_message(self.path, f"read failed: {err}")) from None

    def _require_open(self) -> tuple[h5py.File, _Blocks]:
        if self._file is None or self._blocks is None:
            raise ValueError(f"{self.path}: feature store is closed")
        return self._file, self._blocks

    def close(self) -> None:
        """Close the file; arrays already returned (a lazy token memmap included) stay usable."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._blocks is not None:
            os.close(self._blocks.fd)
            self._blocks = None

    def __enter__(self) -> FeatureStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _raw_call(path: Path, fn: Callable[[], Any]) -> Any:
    """Run a raw read: a short file is corruption, a failed read a (maybe transient) disk error."""
    try:
        return fn()
    except _Corrupt as err:
        raise PipelineError(_corrupt_message(path, str(err))) from None
    except OSError as err:
        raise StoreIOError(f"{path}: reading the feature store failed ({err}); check the disk and re-run") from None


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
    """Integrity of one file. status: complete | incomplete | corrupt | outdated (written
    before checksums); detail says why and what to do."""

    status: Literal["complete", "incomplete", "corrupt", "outdated"]
    detail: str
    header: StoreHeader | None = None
    committed: int | None = None
    present_count: int | None = None
    nonfinite_rows: int | None = None
    blocks_checked: int | None = None  # checksummed blocks verified (all, or those of committed rows)
    blocks_total: int | None = None

    @property
    def ok(self) -> bool:
        return self.status == "complete"


def verify(path: PathLike, check_values: bool = False) -> Verdict:
    """Inspect a store or a `.partial` without raising for its problems.

    Verifies the checksums of the attributes, the ids and every block of committed rows (a
    partial's block in progress cannot be checked yet). check_values also scans the
    committed rows of vectors and tokens for NaN/Inf.
    """
    path = Path(path)
    if not path.exists():
        raise PipelineError(f"{path}: no such file")
    redo = "delete it and re-run extraction"
    try:
        f = _open_h5(path)
    except OSError as err:
        return Verdict("corrupt", f"HDF5 cannot open it ({err}); {redo}")
    found: dict[str, Any] = {}
    with f:
        try:
            header, spans = _check_layout(f, path)
            found["header"] = header
            _check_digests(f, _read_ids(f, header.rows))
            is_partial = path.name.endswith(".partial")
            if is_partial:
                committed = _read_progress(path, header.write_id, header.rows) or 0
            else:
                committed = header.committed_rows
            found["committed"] = committed
            mismatches = _scan_committed(path, spans, committed, found)
            if mismatches:
                return Verdict("corrupt", f"{'; '.join(mismatches)}; {redo}", **found)
            found["present_count"] = int(np.count_nonzero(f["present"][:committed]))
            if check_values:
                found["nonfinite_rows"] = _count_nonfinite_rows(f, committed, header.meta)
        except _Outdated as err:
            return Verdict("outdated", f"{err}; {redo}", **found)
        except _Corrupt as err:
            return Verdict("corrupt", f"{err}; {redo}", **found)
        except OSError as err:
            return Verdict("corrupt", f"read failed ({err}); {redo}", **found)
    if is_partial or not header.complete or committed != header.rows:
        how = ("re-run extraction to resume it" if is_partial
               else "it was never finalized; delete it and re-run extraction")
        return Verdict("incomplete", f"{committed} of {header.rows} rows committed; {how}", **found)
    if found.get("nonfinite_rows"):
        return Verdict("corrupt", f"{found['nonfinite_rows']} rows hold NaN or Inf; {redo}", **found)
    return Verdict("complete", f"all {header.rows} rows committed, every checksum verified", **found)


def _scan_committed(path: Path, spans: dict[str, _Span], committed: int, found: dict[str, Any]) -> list[str]:
    """Verify every block whose rows are all committed; one line per dataset with mismatches.
    Records blocks_checked / blocks_total in `found`."""
    fd = os.open(path, os.O_RDONLY)
    try:
        blocks = _Blocks(path, fd, spans)
        mismatches, checked, total = [], 0, 0
        for name, span in spans.items():
            # A block's digest is written when its last row is: only whole committed blocks count.
            whole = span.blocks if committed >= span.rows else committed // span.block_rows
            bad = blocks.scan(name, 0, whole)
            if bad:
                mismatches.append(blocks.describe(name, bad))
            checked += whole - len(bad)
            total += span.blocks
        found.update(blocks_checked=checked, blocks_total=total)
        return mismatches
    finally:
        os.close(fd)


def _count_nonfinite_rows(f: h5py.File, committed: int, meta: StoreMeta, block: int = 4096) -> int:
    bad = np.zeros(committed, dtype=bool)  # (N',)
    for start in range(0, committed, block):
        stop = min(start + block, committed)
        for name in _float_names(meta):
            rows = f[name][start:stop]  # (b, D), (b, L, Dt), (b, E)
            bad[start:stop] |= ~np.isfinite(rows.reshape(len(rows), -1)).all(axis=1)
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
        print("extras       " + (", ".join(f"{name} ({n}, {width})" for name, width in meta.extras.items()) or "none"))
        print(f"fingerprint  {meta.fingerprint}")
        print(f"created      {header.created}")
        print("versions     " + ", ".join(f"{k} {v}" for k, v in sorted(header.versions.items())))
        print(f"format       {FORMAT} v{header.format_version}")
        if verdict.blocks_total is not None:
            print(f"checksums    {CHECKSUM} per {header.block_bytes}-byte block of rows: "
                  f"{verdict.blocks_checked} of {verdict.blocks_total} blocks verified")
        if verdict.present_count is not None:
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
                    "dtype, tokens, extras, dataset fingerprint, creation time, package versions, preprocessing) "
                    "and its integrity verdict, verifying every checksum (attributes, ids, each block "
                    "of rows). Exit status 0 when complete, 1 when incomplete (an interrupted extraction, "
                    "e.g. a .partial file), corrupt (a checksum mismatch names the dataset and rows) or "
                    "outdated (written before checksums).")
    info.add_argument("file", type=Path, help="a .h5 store or a .h5.partial left by an interrupted extraction")
    info.add_argument("--check-values", action="store_true",
                      help="also scan the committed rows for NaN/Inf (reads all vectors, tokens and extras)")
    args = parser.parse_args(argv)
    verdict = verify(args.file, check_values=args.check_values)
    _print_info(args.file, verdict)
    return 0 if verdict.ok else 1


if __name__ == "__main__":
    run_cli(main)
