"""The extractor registry: `NAME[:CHECKPOINT]` on the command line -> a built extractor.

One dict and a `register` decorator (the timm `register_model` habit); an unknown or
duplicate name raises with the list of known names.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from extractors.config import TINY
from storage.errors import PipelineError

_REGISTRY: dict[str, Callable[..., Any]] = {}


def register(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register an extractor constructor `fn(checkpoint, **options) -> extractor` under `name`."""

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        if name in _REGISTRY:
            raise ValueError(f"extractor {name!r} is registered twice; known: {', '.join(sorted(_REGISTRY))}")
        _REGISTRY[name] = fn
        return fn

    return deco


def available() -> list[str]:
    _load_builtins()
    return sorted(_REGISTRY)


def parse_spec(spec: str) -> tuple[str, str]:
    """`bert` -> (bert, tiny); `vit:vit_base_patch16_224` -> (vit, vit_base_patch16_224)."""
    name, _, checkpoint = spec.strip().partition(":")
    if not name:
        raise PipelineError(f"empty extractor in {spec!r}; expected NAME[:CHECKPOINT], NAME one of {', '.join(available())}")
    return name.lower(), checkpoint or TINY


def create(spec: str, **options: Any) -> Any:
    """Build the extractor named by `spec` (`NAME[:CHECKPOINT]`)."""
    name, checkpoint = parse_spec(spec)
    _load_builtins()
    if name not in _REGISTRY:
        raise PipelineError(f"unknown extractor {name!r}; known: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name](checkpoint, **options)


def _load_builtins() -> None:
    # Importing the modules runs their @register decorators; kept lazy so that importing the
    # registry does not import torch.
    import extractors.blip  # noqa: F401
    import extractors.text  # noqa: F401
    import extractors.vision  # noqa: F401
