"""The one storage root under which the pipeline writes everything.

Resolution order: an explicit value (the `--storage DIR` option), then the environment
variable `MMNEWS_STORAGE`, then `./storage` relative to the working directory (in a checkout
that is the `storage` package folder, whose data subfolders are git-ignored).
"""

from __future__ import annotations

import os
from pathlib import Path

ENV_VAR = "MMNEWS_STORAGE"
SUBFOLDERS = ("data", "features", "models", "reports")


def storage_root(override: str | os.PathLike[str] | None = None) -> Path:
    """The storage root as an absolute path (not created)."""
    if override is not None and str(override) != "":
        return Path(override).expanduser().resolve()
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env).expanduser().resolve()
    return (Path.cwd() / "storage").resolve()


def subdir(kind: str, override: str | os.PathLike[str] | None = None, create: bool = True) -> Path:
    """`<root>/<kind>` for kind in data, features, models, reports."""
    if kind not in SUBFOLDERS:
        raise ValueError(f"unknown storage subfolder {kind!r}; known: {', '.join(SUBFOLDERS)}")
    path = storage_root(override) / kind
    if create:
        path.mkdir(parents=True, exist_ok=True)
    return path
