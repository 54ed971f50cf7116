"""Finding pre-trained checkpoints offline, and failing fast and clearly when they are absent.

A checkpoint is a local directory or a hub name. Names are looked up in the local Hugging
Face cache only (`HF_HUB_OFFLINE=1` unless the user set it): on these machines nothing can
be downloaded, and a network time-out would take minutes to say what this module says at once.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from storage.errors import PipelineError

T = TypeVar("T")

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def local_dir(checkpoint: str) -> Path | None:
    """The checkpoint as a directory when it names one (absolute, relative or ~)."""
    path = Path(checkpoint).expanduser()
    return path.resolve() if path.is_dir() else None


def looks_like_path(checkpoint: str) -> bool:
    """`/abs`, `./rel`, `../rel` or `~/x`; `org/name` is a hub name (when no such folder exists)."""
    return checkpoint.startswith(("/", ".", "~"))


def missing_message(kind: str, checkpoint: str, cause: BaseException | None = None) -> str:
    hub_cache = os.environ.get("HF_HUB_CACHE") or os.path.join(
        os.environ.get("HF_HOME", os.path.expanduser("~/.cache/huggingface")), "hub"
    )
    where = (
        f"the directory {checkpoint!r} does not exist"
        if looks_like_path(checkpoint)
        else f"{checkpoint!r} is not a local directory and is not in the Hugging Face cache ({hub_cache}); "
        "this machine cannot download it"
    )
    detail = f" ({type(cause).__name__}: {str(cause).splitlines()[0][:200]})" if cause else ""
    return (
        f"cannot load {kind} checkpoint {checkpoint!r}: {where}{detail}. Fix: download it on a connected "
        f"machine (`huggingface-cli download {checkpoint}`) and copy the cache folder here, or pass a local "
        "directory holding config.json, the weights (safetensors) and the tokenizer or preprocessor files, "
        "or use the embedded default `tiny`."
    )


def load_or_explain(kind: str, checkpoint: str, loader: Callable[[str], T]) -> T:
    """Run `loader(checkpoint or its directory)`; a missing checkpoint becomes a PipelineError."""
    path = local_dir(checkpoint)
    if path is None and looks_like_path(checkpoint):
        raise PipelineError(missing_message(kind, checkpoint))
    try:
        return loader(str(path) if path else checkpoint)
    except (OSError, ValueError, RuntimeError) as err:
        raise PipelineError(missing_message(kind, checkpoint, err)) from err


def ensure_available(name: str, checkpoint: str) -> None:
    """Fail in a second when a checkpoint is neither `tiny`, a local directory, nor cached."""
    from extractors.registry import entry

    if checkpoint == "tiny" or local_dir(checkpoint) is not None:
        return
    found = entry(name)
    kind = found.kind
    if looks_like_path(checkpoint):
        raise PipelineError(missing_message(kind, checkpoint))
    from huggingface_hub import try_to_load_from_cache

    repo = checkpoint if "/" in checkpoint else f"{found.hub_prefix}{checkpoint}"
    if not isinstance(try_to_load_from_cache(repo, "config.json"), str):
        raise PipelineError(missing_message(kind, checkpoint))
