"""Fusions: how the per-role news vectors of one news become the one vector that is scored.

One registry, and a fusion is one registered function: `@register(name, roles=..., label=...,
layers=...)` on `fn(v, layers) -> (B, d)`, where `v` maps each role to its (B, d) news
vectors and `layers` holds the learned layers the entry declares (each `Linear(d, d)`,
built by `rankers.fusion_module.create_fusion`). The registry and the entries import no torch, so flows list,
validate and label fusions without loading it; an unknown or duplicate name raises with
the list of known names. Every fusion declares the roles it needs, among FEATURE_ROLES: the
extractor roles `text`, `image`, `blip` (a store's vectors) and `cover` (whether the news has a
cover image at all, a 1-wide flag from the catalogue, never an image's content), and maps
{role: (B, d)} to (B, d).

- `text`, `image`, `blip`: a single source, passed through (the news encoder already ends
  at width d).
- `hadamard` (Zhao's thesis): each modality projected to d, then the elementwise product,
  so a text direction only counts where the image agrees.
- `concat`: a linear map of [t; i] to d, written as A t + B i + b (the same map).
- `gated`: g = sigmoid(A t + B i + b); g * t + (1 - g) * i, a learned per-dimension mix.
- `text+cover`: the text vector plus a learned embedding of the cover flag (its news encoder
  maps the flag to d): the control arm that knows THAT a news has a cover and nothing of what
  it shows, so "having a cover helps" and "the cover's content helps" are separate questions.
Letters: B news, d width.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from extractors.registry import ROLES
from storage.errors import PipelineError

if TYPE_CHECKING:
    from torch import Tensor, nn

COVER = "cover"
"""The role of the cover flag: (N, 1) 1.0 where the news has a cover image, from the catalogue."""
FEATURE_ROLES = (*ROLES, COVER)


@dataclass(frozen=True)
class Layer:
    """A learned layer of a fusion: Linear(d, d), with or without a bias."""

    bias: bool = True


@dataclass(frozen=True)
class FusionEntry:
    name: str
    roles: tuple[str, ...]
    label: str
    fn: Callable[[Mapping[str, Any], Mapping[str, Any]], Any]
    layers: Mapping[str, Layer]


_FUSIONS: dict[str, FusionEntry] = {}


def register(name: str, *, roles: tuple[str, ...], label: str | None = None,
             layers: Mapping[str, Layer] | None = None) -> Callable[[Callable], Callable]:
    """Register `fn(v, layers) -> (B, d)` as fusion `name` over `roles` (each a known role).
    `label` is how reports name a run over it (default: the name)."""

    def deco(fn: Callable) -> Callable:
        if name in _FUSIONS:
            raise ValueError(f"fusion {name!r} is registered twice; known: {', '.join(_FUSIONS)}")
        unknown = [r for r in roles if r not in FEATURE_ROLES]
        if not roles or unknown:
            raise ValueError(f"fusion {name!r} declares roles {roles}; each must be one of {', '.join(FEATURE_ROLES)}")
        _FUSIONS[name] = FusionEntry(name, tuple(roles), label or name, fn, dict(layers or {}))
        return fn

    return deco


def available() -> list[str]:
    """Fusion names in registration order: single sources first, then the multimodal ones."""
    return list(_FUSIONS)


def fusion_entry(name: str) -> FusionEntry:
    if name not in _FUSIONS:
        raise PipelineError(f"unknown fusion {name!r}; known: {', '.join(_FUSIONS)}")
    return _FUSIONS[name]


def roles_of(name: str) -> tuple[str, ...]:
    """The feature roles fusion `name` needs, e.g. ("text", "image")."""
    return fusion_entry(name).roles


def label_of(name: str) -> str:
    """How reports name fusion `name`, e.g. "text+image (hadamard)"."""
    return fusion_entry(name).label


# ----------------------------------------------------------------------------- built-ins


def _passthrough(role: str) -> Callable:
    def single(v: Mapping[str, Tensor], layers: Mapping[str, nn.Module]) -> Tensor:
        return v[role]  # (B, d)

    return single


for _role in ROLES:
    register(_role, roles=(_role,))(_passthrough(_role))


@register("text+cover", roles=("text", COVER), label="text+cover")
def text_and_cover(v: Mapping[str, Tensor], layers: Mapping[str, nn.Module]) -> Tensor:
    return v["text"] + v[COVER]  # (B, d): the flag's embedding added to the news vector


@register("hadamard", roles=("text", "image"), label="text+image (hadamard)",
          layers={"text": Layer(), "image": Layer()})
def hadamard(v: Mapping[str, Tensor], layers: Mapping[str, nn.Module]) -> Tensor:
    return layers["text"](v["text"]) * layers["image"](v["image"])  # (B, d)


@register("concat", roles=("text", "image"), label="text+image (concat)",
          layers={"text": Layer(), "image": Layer(bias=False)})
def concat(v: Mapping[str, Tensor], layers: Mapping[str, nn.Module]) -> Tensor:
    return layers["text"](v["text"]) + layers["image"](v["image"])  # W [t; i] + b: (B, d)


@register("gated", roles=("text", "image"), label="text+image (gated)",
          layers={"text": Layer(), "image": Layer(bias=False)})
def gated(v: Mapping[str, Tensor], layers: Mapping[str, nn.Module]) -> Tensor:
    t, i = v["text"], v["image"]  # (B, d) each
    g = (layers["text"](t) + layers["image"](i)).sigmoid()  # (B, d)
    return g * t + (1 - g) * i
