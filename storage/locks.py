"""One writer at a time: an exclusive, non-blocking lock on a lock file.

`lock_exclusively(path, busy)` opens (creating) `path`, takes an flock on it without waiting
and returns the open descriptor; while another process holds it, it raises PipelineError(busy)
at once. Holders remove their lock file when they are done, so the file a caller opened may
be gone, or replaced, by the time its lock is granted: the lock is then taken again on the file
now under the name, and two processes never both hold it. Release with `os.close(fd)`, after
removing the file where it should go.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from storage.errors import PipelineError


def lock_exclusively(path: str | os.PathLike[str], busy: str) -> int:
    """The descriptor of `path`, exclusively locked by this process; PipelineError(busy) if held."""
    path = Path(path)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise PipelineError(busy) from None
        except BaseException:
            os.close(fd)
            raise
        try:  # the holder before us may have removed the file on its way out
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)
