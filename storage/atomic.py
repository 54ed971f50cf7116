"""Writing files so that their final name only ever holds a complete file.

Each writer writes to a hidden temporary file in the destination folder
(`.<stem>.tmp-<16 hex><suffix>`: the same file system, so the rename is atomic, and the suffix
kept for libraries that add or check one), flushes and fsyncs it, renames it over the final
name (`os.replace`) and fsyncs the folder. On any failure (a full disk, a quota, a read-only
folder, an exception of the library writing it, Ctrl-C) the temporary file is removed and the
final name keeps what it held before: the previous complete file, or nothing.

Why fsync: on file systems with delayed allocation (ext4, XFS, NFS) a full disk or a quota can
show only when the data reach the disk; fsync before the rename turns that into an OSError
here instead of a short file under the final name, and the folder's fsync makes the rename
itself survive a crash. `durable=False` skips both, for scratch files.

An error raised while writing names the FINAL path (never the temporary one), so
`storage.errors.describe_os_error` tells the user about the file they know. A library's own
exception that reports an OS error (safetensors' "(os error 28)", HDF5's "errno = 28",
LightGBM's "Cannot write ... wrote N of M bytes") is re-raised as that OSError, chained to it.

Limits: a process killed outright (SIGKILL, power loss) leaves its hidden temporary file
behind, never a partial file under the final name. Writing through a symbolic link replaces
the link, not its target.

    write_text(path, text)            write_bytes(path, data)      write_json(path, obj)
    save_npy(path, array)             save_npz(path, {"a": array})
    with atomic_open(path, "wb") as f: ...      # a file object, for code that writes to one
    with atomic_path(path) as tmp: booster.save_model(str(tmp))   # libraries that open by name
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import secrets
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO, Any

import numpy as np

from storage.errors import PipelineError, ShortWriteError, os_error_of

PathLike = str | os.PathLike[str]


def temporary_name(path: PathLike) -> Path:
    """A fresh hidden name beside `path`, keeping its suffix: `.<stem>.tmp-<16 hex><suffix>`."""
    path = Path(path)
    return path.with_name(f".{path.stem}.tmp-{secrets.token_hex(8)}{path.suffix}")


def _fsync_folder(folder: Path) -> None:
    """Make a rename in `folder` durable; file systems that cannot sync a folder are skipped."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return  # e.g. a folder without read permission: the rename happened, durability is best effort
    try:
        os.fsync(fd)
    except OSError as err:
        if err.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF, errno.EACCES):
            raise
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _reraise(err: BaseException, final: Path, tmp: Path) -> None:
    """Raise the OSError that `err` is or reports, naming `final` instead of the temporary
    file; anything else (a bug, Ctrl-C) unchanged."""
    found = os_error_of(err) if isinstance(err, Exception) else None
    if found is None or found.errno is None:
        raise err
    temporary = {os.fspath(tmp), str(tmp)}
    filename = found.filename
    if filename is None or os.fsdecode(filename) in temporary:
        filename = os.fspath(final)
    filename2 = found.filename2  # a rename names both; the temporary one means nothing to the user
    if filename2 is not None and os.fsdecode(filename2) in {*temporary, os.fsdecode(filename)}:
        filename2 = None
    if found is err and (filename, filename2) == (err.filename, err.filename2):
        raise err
    kind = ShortWriteError if isinstance(found, ShortWriteError) else OSError
    raise kind(found.errno, found.strerror or os.strerror(found.errno), filename, None, filename2) from err


def _discard(tmp: Path) -> None:
    with contextlib.suppress(OSError):  # already gone, or the folder refuses: the first error is the one to report
        tmp.unlink()


def _commit(tmp: Path, final: Path, durable: bool) -> None:
    if durable:
        _fsync_file(tmp)
    os.replace(tmp, final)
    if durable:
        _fsync_folder(final.parent)


@contextlib.contextmanager
def atomic_path(path: PathLike, *, durable: bool = True, mkdir: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside `path` for a library that writes a file by name
    (`booster.save_model`, safetensors' `save_file`, `h5py.File(tmp, "w")`); when the block ends
    without an exception the file is synced and renamed to `path`, otherwise removed.

    The library must have closed the file when the block ends. A library that reports a failed
    write only in its own exception type is re-raised as the OSError it reports (see module
    docstring); one that fails silently cannot be caught here: prefer writing its bytes with
    `write_bytes`/`write_text` (e.g. `write_text(path, booster.model_to_string())`).
    """
    final = Path(path)
    if mkdir:
        final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(final)
    try:
        yield tmp
        if not tmp.exists():
            raise PipelineError(f"{final}: the writer produced no file (expected it at {tmp.name}); this is a bug")
        _commit(tmp, final, durable)
    except BaseException as err:
        _discard(tmp)
        _reraise(err, final, tmp)


@contextlib.contextmanager
def atomic_open(path: PathLike, mode: str = "w", *, encoding: str = "utf-8", newline: str | None = "\n",
                durable: bool = True, mkdir: bool = True) -> Iterator[IO[Any]]:
    """Yield a file object (mode "w" text or "wb" binary) whose contents appear under `path`
    only when the block ends without an exception."""
    if mode not in ("w", "wb"):
        raise ValueError(f"mode must be 'w' or 'wb', got {mode!r}")
    final = Path(path)
    if mkdir:
        final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(final)
    try:
        # O_EXCL: the name is fresh; 0o666 before the umask, as open() would give the final file.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
        raw = io.FileIO(fd, "w", closefd=True)
        handle: IO[Any] = io.BufferedWriter(raw)
        if mode == "w":
            handle = io.TextIOWrapper(handle, encoding=encoding, newline=newline)
        try:
            yield handle
            handle.flush()
            if durable:
                os.fsync(raw.fileno())
            handle.close()
        except BaseException:
            with contextlib.suppress(Exception):  # closing flushes again; the first error is the one to report
                handle.close()
            raise
        os.replace(tmp, final)
        if durable:
            _fsync_folder(final.parent)
    except BaseException as err:
        _discard(tmp)
        _reraise(err, final, tmp)


def _write_all(fd: int, data: bytes | memoryview) -> None:
    """os.write until every byte is written (a write may be short), raising on failure."""
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        if n <= 0:  # a regular file never returns 0 for a non-empty write unless the disk is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        view = view[n:]


def write_bytes(path: PathLike, data: bytes | bytearray | memoryview, *, durable: bool = True,
                mkdir: bool = True) -> Path:
    """Write `data` to `path` atomically; returns the path."""
    final = Path(path)
    if mkdir:
        final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(final)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
        try:
            _write_all(fd, data)
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, final)
        if durable:
            _fsync_folder(final.parent)
    except BaseException as err:
        _discard(tmp)
        _reraise(err, final, tmp)
    return final


def write_text(path: PathLike, text: str, *, encoding: str = "utf-8", durable: bool = True,
               mkdir: bool = True) -> Path:
    """Write `text` to `path` atomically, with its `\\n` line ends as given; returns the path."""
    return write_bytes(path, text.encode(encoding), durable=durable, mkdir=mkdir)


def write_json(path: PathLike, obj: Any, *, indent: int | None = 2, sort_keys: bool = True, durable: bool = True,
               **dumps: Any) -> Path:
    """`json.dumps(obj, indent=indent, sort_keys=sort_keys, **dumps)` plus a final newline,
    written atomically. The text is built before the file is opened, so an object that cannot
    be written as JSON leaves no file at all."""
    return write_text(path, json.dumps(obj, indent=indent, sort_keys=sort_keys, **dumps) + "\n", durable=durable)


class _Stream:
    """A file object numpy does not take for a real file: `np.save` then writes through
    `write` (whose OSError keeps its errno) instead of C `fwrite` ("N requested and M written",
    no errno)."""

    def __init__(self, handle: IO[bytes]):
        self.write = handle.write


def save_npy(path: PathLike, array: np.ndarray, *, durable: bool = True) -> Path:
    """`np.save` without pickles (object arrays are refused), written atomically."""
    with atomic_open(path, "wb", durable=durable) as handle:
        np.save(_Stream(handle), np.asanyarray(array), allow_pickle=False)
    return Path(path)


def save_npz(path: PathLike, arrays: Mapping[str, np.ndarray], *, durable: bool = True,
             compressed: bool = False) -> Path:
    """`np.savez` (or `savez_compressed`) of named arrays, written atomically."""
    for name, value in arrays.items():
        if np.asanyarray(value).dtype == object:
            raise ValueError(f"array {name!r} holds Python objects; an .npz here holds plain numbers")
    save = np.savez_compressed if compressed else np.savez
    with atomic_open(path, "wb", durable=durable) as handle:
        save(handle, **arrays)
    return Path(path)
