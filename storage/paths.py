"""The one storage root under which the pipeline writes everything, and the names allowed in it.

Resolution order: an explicit value (the `--storage DIR` option), then the environment
variable `MMNEWS_STORAGE`, then `./storage` relative to the working directory (in a checkout
that is the `storage` package folder, whose data subfolders are git-ignored).

Names that become paths (`--name`, `--run-name`, dataset and shard names) arrive from the
command line and from `prefect deployment run`, whose API has no authentication, so they are
checked before any work: `check_name` accepts one path component of safe characters, and
`storage_path` builds `<root>/<kind>/<name>` and refuses a result that is not inside that
folder once symbolic links are followed. A subfolder that is itself a link (features/ on a
bigger disk) is the operator's choice and is followed; a link inside it that leads out is
refused. Both raise `UnsafeNameError`, a `PipelineError` (one line on the command line) that is
also a `ValueError` (so a pydantic validator may call them as they are).
Limit: the check happens before the write; someone who can create links in the storage root
between the two can still redirect it (they could write there anyway).
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from pathlib import Path

from storage.errors import PipelineError, describe_os_error

ENV_VAR = "MMNEWS_STORAGE"
SUBFOLDERS = ("data", "features", "models", "reports")
NAME_MAX_LENGTH = 200  # under the usual 255-byte limit with room for suffixes and temporary names
_SAFE = re.compile(r"[A-Za-z0-9._+@=,-]+")
_UNSAFE_RUN = re.compile(r"[^A-Za-z0-9._+@=,-]+")
_RULE = (f"give one name of letters, digits and . _ - + @ = , (at most {NAME_MAX_LENGTH} characters, "
         "not starting with . or -); the folder it goes in is set by --storage")


class UnsafeNameError(PipelineError, ValueError):
    """A name or path that is not one safe component inside the storage root."""


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_name(value: object, parameter: str = "name") -> str:
    """`value` itself if it is one safe path component, else UnsafeNameError naming
    `parameter` (e.g. "--run-name"): "--run-name '../x': is a path (contains '/'); give ..."."""
    if not isinstance(value, str):
        raise UnsafeNameError(f"{parameter} {_shown(value)}: not a text name; {_RULE}")
    problem = None
    if not value:
        problem = "is empty"
    elif "\x00" in value:
        problem = "contains a NUL character"
    elif "/" in value or "\\" in value:
        problem = f"is a path (contains {'/' if '/' in value else chr(92)!r})"
    elif value in (".", ".."):
        problem = "is not a name"
    elif value[0] in ".-":
        problem = f"starts with {value[0]!r}"
    elif len(value) > NAME_MAX_LENGTH:
        problem = f"is {len(value)} characters long"
    elif not _SAFE.fullmatch(value):
        bad = next(c for c in value if not _SAFE.fullmatch(c))
        problem = f"contains {bad!r}"
    if problem:
        raise UnsafeNameError(f"{parameter} {_shown(value)}: {problem}; {_RULE}")
    return value


def safe_name(text: str) -> str:
    """`text` made into a name `check_name` accepts, for names the pipeline derives (a dataset
    folder's name): unsafe runs become '-', leading '.'/'-' go, an over-long name is cut and
    tagged with 8 hex of its sha256. Never empty."""
    name = _UNSAFE_RUN.sub("-", text).lstrip(".-") or "unnamed"
    if len(name) > NAME_MAX_LENGTH:
        name = f"{name[:NAME_MAX_LENGTH - 9]}-{hashlib.sha256(text.encode()).hexdigest()[:8]}"
    return name


def _source(override: str | os.PathLike[str] | None) -> str:
    if override is not None and str(override) != "":
        return "--storage"
    return ENV_VAR if os.environ.get(ENV_VAR) else "the default storage root (./storage)"


def storage_root(override: str | os.PathLike[str] | None = None) -> Path:
    """The storage root as an absolute path (not created)."""
    if override is not None and str(override) != "":
        raw = str(override)
    else:
        raw = os.environ.get(ENV_VAR) or ""
    if "\x00" in raw:
        raise PipelineError(f"{_source(override)} {_shown(raw)}: contains a NUL character; give a folder path")
    if raw:
        return Path(raw).expanduser().resolve()
    return (Path.cwd() / "storage").resolve()


def check_storage_root(override: str | os.PathLike[str] | None = None) -> Path:
    """The storage root if it can be one: neither a file nor under a file (checked with the
    parameters, before any work; it is created when first needed)."""
    root = storage_root(override)
    for path in (root, *root.parents):
        if path.exists():
            if not path.is_dir():
                where = "is a file" if path == root else f"lies under {path}, a file"
                raise PipelineError(f"{_source(override)} {root}: {where}, not a folder; give a folder as the "
                                    "storage root (it is created if missing)")
            break
    return root


def check_writable(folder: str | os.PathLike[str], what: str = "folder") -> Path:
    """`folder` if this process can create a file in it (tried, not guessed from permission
    bits: root ignores them and a read-only mount does not show in them); else one line."""
    folder = Path(folder)
    try:
        fd, probe = tempfile.mkstemp(prefix=".mmnews-write-test-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        named = OSError(err.errno, err.strerror, os.fspath(folder)) if err.errno is not None else err
        raise PipelineError(f"{what} {folder} is not writable: {describe_os_error(named)}") from None
    return folder


def subdir(kind: str, override: str | os.PathLike[str] | None = None, create: bool = True,
           writable: bool = False) -> Path:
    """`<root>/<kind>` for kind in data, features, models, reports; created unless `create` is
    False, and tried for writing with `writable` (call that before long work that ends in a
    write). A root that is a file, or that cannot be created or written, is one line naming
    the path, the option it came from and what to do."""
    if kind not in SUBFOLDERS:
        raise ValueError(f"unknown storage subfolder {kind!r}; known: {', '.join(SUBFOLDERS)}")
    root = storage_root(override)
    source = _source(override)
    if root.exists() and not root.is_dir():
        raise PipelineError(f"{source} {root}: is a file, not a folder; give a folder as the storage root "
                            "(it is created if missing)")
    path = root / kind
    if path.exists() and not path.is_dir():
        raise PipelineError(f"{path}: is a file where the storage root's {kind}/ folder belongs; move it away "
                            f"or choose another storage root ({source})")
    if create:
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise PipelineError(f"cannot create the storage folder {path} ({source}): {describe_os_error(err)}") \
                from None
    if writable:
        check_writable(path, f"the storage folder ({source})")
    return path


def inside(base: str | os.PathLike[str], *names: str, parameter: str = "name") -> Path:
    """`<base>/<names...>` with each name checked by `check_name`, resolved (symbolic links
    followed) and refused unless it lies strictly inside `base` (itself resolved)."""
    base_resolved = Path(base).resolve()
    if not names:
        raise ValueError("inside() needs at least one name")
    for name in names:
        check_name(name, parameter)
    target = base_resolved.joinpath(*names)
    resolved = target.resolve()
    if resolved == base_resolved or not resolved.is_relative_to(base_resolved):
        shown = _shown(names[-1] if len(names) == 1 else "/".join(names))
        raise UnsafeNameError(f"{parameter} {shown}: {target} leads outside {base_resolved} (to {resolved}) through a "
                              "symbolic link; remove the link or choose another name")
    return resolved


def storage_path(kind: str, *names: str, storage: str | os.PathLike[str] | None = None,
                 parameter: str = "name", writable: bool = False) -> Path:
    """`<root>/<kind>/<names...>` for a name given by a user (`--name`, `--run-name`) or derived
    from one: each name one safe component, the result inside that storage folder even after
    symbolic links (see `inside`). The folder `<kind>` is created (and tried for writing with
    `writable`) once the names pass; the returned path is not created."""
    for name in names:
        check_name(name, parameter)  # before anything is created for a refused request
    return inside(subdir(kind, storage, writable=writable), *names, parameter=parameter)
