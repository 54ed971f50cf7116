"""User-facing errors and the command-line wrapper that prints them without a traceback.

Every problem a user can fix (bad input, missing files, wrong options) is raised as a
`PipelineError` whose message names the file, line or id, what was expected, and what to do.
Command-line entry points run through `run_cli`, which turns those into one line on stderr
and a non-zero exit code. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn


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


def run_cli(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> NoReturn:
    """Run `main(argv)` and exit with its code; a PipelineError becomes one line on stderr, exit 1."""
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
    sys.exit(code or 0)
