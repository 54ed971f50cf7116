"""User-facing errors and the command-line wrapper that prints them without a traceback.

Every problem a user can fix (bad input, missing files, wrong options) is raised as a
`PipelineError` whose message names the file, line or id, what was expected, and what to do.
Command-line entry points run through `run_cli`, which turns those into one line on stderr
and a non-zero exit code.

Operating-system errors are problems a user can fix too (a full disk, a read-only folder, a
file where a folder should be), so `run_cli` prints them the same way: `describe_os_error`
names the path, what went wrong and what to do. Libraries that write files themselves report
them in their own exception types; `as_pipeline_error` also recognises those that carry the
system's error code in the message (safetensors and other Rust code: "(os error 28)", HDF5:
"errno = 28") or LightGBM's "Cannot write ... wrote N of M bytes". Inside a Prefect task,
`as_pipeline_error(err)` gives the same one line. Anything else is a bug and keeps its
traceback (and so does an OSError when MMNEWS_TRACEBACK=1 is set, for debugging).
"""

from __future__ import annotations

import errno
import os
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

TRACEBACK_ENV = "MMNEWS_TRACEBACK"


class PipelineError(Exception):
    """A problem the user can fix; its message is complete and printed as is."""


class DataFormatError(PipelineError):
    """Malformed input at a known place: rendered as `path:line: message`."""

    def __init__(self, path: str | Path, line: int | None, message: str):
        self.path = str(path)
        self.line = line
        self.message = message
        where = f"{self.path}:{line}" if line is not None else self.path
        super().__init__(f"{where}: {message}")


class ShortWriteError(OSError):
    """A library wrote only part of a file and gave no system error code (LightGBM)."""


_ACCESS = "give this user access to it (chmod/chown) or choose another folder (--storage or MMNEWS_STORAGE)"
_SPACE = "free space there, or point --storage (or MMNEWS_STORAGE) at a disk with room, then run again"

# errno -> (what happened, what to do). Each message reads "PATH: what (ENAME); what to do".
_OS_ADVICE: dict[int, tuple[str, str]] = {
    errno.ENOSPC: ("no space left on the device", _SPACE),
    errno.EDQUOT: ("disk quota exceeded", "free space within your quota, or point --storage (or MMNEWS_STORAGE) "
                   "at another disk, then run again"),
    errno.EFBIG: ("file too large: the file size limit or the file system's maximum was reached",
                  "raise the limit (ulimit -f) or write to a file system that allows larger files"),
    errno.EACCES: ("permission denied", _ACCESS),
    errno.EPERM: ("operation not permitted", _ACCESS),
    errno.EROFS: ("read-only file system", "point --storage (or MMNEWS_STORAGE) at a writable folder, or mount "
                  "the disk read-write"),
    errno.ENOTDIR: ("a part of this path is a file, not a folder", "move that file away or choose another path"),
    errno.EISDIR: ("is a folder where a file was expected", "move the folder away or give the path of a file"),
    errno.ENOENT: ("no such file or folder", "check the path"),
    errno.EEXIST: ("already exists", "move it away or choose another name"),
    errno.ENOTEMPTY: ("the folder is not empty", "move its contents away or choose another folder"),
    errno.ENAMETOOLONG: ("the name is too long for the file system",
                         "choose a shorter name or a shorter --storage path"),
    errno.ELOOP: ("too many levels of symbolic links", "fix the link (it may point at itself)"),
    errno.EMFILE: ("too many open files", "raise the limit (ulimit -n) or use fewer workers"),
    errno.ENFILE: ("too many open files on the system", "close other programs or use fewer workers"),
    errno.EIO: ("input/output error", "the disk or network file system failed: check it (dmesg) and run again"),
    errno.ESTALE: ("stale network file handle", "remount the network file system and run again"),
    errno.EXDEV: ("cannot move across file systems", "keep the storage root on one file system"),
    errno.EAGAIN: ("resource temporarily unavailable (locked by another process?)",
                   "wait for the other process to finish and run again"),
}

# Library messages that carry an OS error: Rust's io::Error ("No space left on device (os
# error 28)", e.g. safetensors), HDF5 ("errno = 28, error message = ...", with "name = 'PATH'").
_OS_CODE = re.compile(r"\(os error (\d+)\)|\berrno = (\d+)")
_HDF5_NAME = re.compile(r"\bname = '([^']*)'")
# Short writes reported without an error code: LightGBM's file writer ("Cannot write binary
# data to PATH, wrote N of M bytes") and numpy's C fwrite in `ndarray.tofile` ("N requested and
# M written").
_LGBM_SHORT_WRITE = re.compile(r"Cannot write (?:binary )?data to (.+?), wrote (\d+) of (\d+) bytes")
_NUMPY_SHORT_WRITE = re.compile(r"^(\d+) requested and (\d+) written$")


def describe_os_error(err: OSError, action: str | None = None) -> str:
    """One line for an OSError: `PATH: what happened (ENAME)[ while ACTION]; what to do`.

    `action` (e.g. "writing the model") says what the pipeline was doing. The path is the
    error's filename (both for a rename), else one found in an HDF5 message, else the message
    says the system gave none.
    """
    code = err.errno
    text = str(err)
    if code is None:
        found = _OS_CODE.search(text)
        code = int(found.group(1) or found.group(2)) if found else None
    path = err.filename if err.filename is not None else None
    if path is None:
        named = _HDF5_NAME.search(text)
        path = named.group(1) if named else None
    where = os.fsdecode(path) if path is not None else "(the system named no file)"
    if err.filename2 is not None:
        where = f"{where} -> {os.fsdecode(err.filename2)}"
    while_ = f" while {action}" if action else ""
    name = errno.errorcode.get(code, f"errno {code}") if code is not None else "no error code"
    if isinstance(err, ShortWriteError):
        return f"{where}: {err.strerror} (a full disk, a quota or a file size limit?){while_}; {_SPACE}"
    if code in _OS_ADVICE:
        what, fix = _OS_ADVICE[code]
        return f"{where}: {what} ({name}){while_}; {fix}"
    if code is not None:
        reason = err.strerror or os.strerror(code)
    else:
        reason = err.strerror or text or type(err).__name__
    return f"{where}: {reason} ({name}){while_}; check the path and the disk, then run again"


def os_error_of(exc: BaseException, path: str | os.PathLike[str] | None = None) -> OSError | None:
    """The OSError `exc` is or reports, with `path` as its file when it names none; else None.

    Recognised: an OSError itself; an exception whose message carries a system error code
    ("(os error N)", "errno = N"); a short write reported without a code (LightGBM's "Cannot
    write ... wrote N of M bytes", numpy's "N requested and M written"), returned as a
    ShortWriteError with the byte counts.
    """
    text = str(exc)
    if isinstance(exc, OSError):
        numpy_short = _NUMPY_SHORT_WRITE.match(text) if exc.errno is None else None
        if numpy_short:
            return ShortWriteError(errno.EIO, f"the write stopped after {numpy_short.group(2)} of "
                                   f"{numpy_short.group(1)} bytes", None if path is None else os.fspath(path))
        if exc.filename is None and path is not None and exc.errno is not None:
            return OSError(exc.errno, exc.strerror or os.strerror(exc.errno), os.fspath(path))
        return exc
    found = _OS_CODE.search(text)
    if found:
        code = int(found.group(1) or found.group(2))
        named = _HDF5_NAME.search(text)
        where = os.fspath(path) if path is not None else (named.group(1) if named else None)
        return OSError(code, os.strerror(code), where)
    short = _LGBM_SHORT_WRITE.search(text)
    if short:
        where = os.fspath(path) if path is not None else short.group(1)
        return ShortWriteError(errno.EIO, f"the write stopped after {short.group(2)} of {short.group(3)} bytes", where)
    return None


def as_pipeline_error(exc: BaseException, action: str | None = None) -> PipelineError | None:
    """The user-facing form of `exc`: itself for a PipelineError, one line (see
    `describe_os_error`) for an OS error or a library error that reports one, None for
    anything else (a bug: let it raise with its traceback).

    In a Prefect task (where run_cli does not apply):

        except Exception as err:
            friendly = as_pipeline_error(err, "writing the model")
            if friendly is None:
                raise
            raise friendly from None
    """
    if isinstance(exc, PipelineError):
        return exc
    found = os_error_of(exc)
    if found is None:
        return None
    return PipelineError(describe_os_error(found, action))


def run_cli(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> NoReturn:
    """Run `main(argv)` and exit with its code; a PipelineError, an OSError (or a library error
    reporting one) becomes one line on stderr, exit 1."""
    try:
        code = main(argv)
    except PipelineError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:
        sys.exit(1)
    except Exception as err:
        friendly = as_pipeline_error(err)
        if friendly is None or os.environ.get(TRACEBACK_ENV):
            raise
        print(f"error: {friendly}", file=sys.stderr)
        sys.exit(1)
    sys.exit(code or 0)
