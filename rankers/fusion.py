"""Fusions: how the per-role news vectors of one news become the one vector that is scored.

One registry (a dict and a `register` decorator, name -> class); an unknown or duplicate
name raises with the list of known names. Every fusion declares the roles it needs
(`text`, `image`, `blip`, see rankers.base.ROLES), is built with the common width d, and
maps {role: (B, d)} to (B, d).

- `hadamard` (the default; Zhao's thesis): each modality projected to d, then the
  elementwise product, so a text direction only counts where the image agrees.
- `concat`: [t; i] then a linear map to d.
- `gated`: g = sigmoid(W [t; i]); g * t + (1 - g) * i, a learned per-dimension mix.
- `text`, `image`, `blip`: a single source, passed through (the news encoder already
  ends at width d).
Letters: B news, d width.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from rankers.base import ROLES
from storage.errors import PipelineError

_FUSIONS: dict[str, type[Fusion]] = {}


def register(name: str, label: str | None = None) -> Callable[[type[Fusion]], type[Fusion]]:
    """Register a fusion class under `name`; its `roles` must be known roles. `label` is how
    reports name a run over it (default: the name)."""

    def deco(cls: type[Fusion]) -> type[Fusion]:
        if name in _FUSIONS:
            raise ValueError(f"fusion {name!r} is registered twice; known: {', '.join(sorted(_FUSIONS))}")
        unknown = [r for r in cls.roles if r not in ROLES]
        if not cls.roles or unknown:
            raise ValueError(f"fusion {name!r} declares roles {cls.roles}; each must be one of {', '.join(ROLES)}")
        cls.name = name
        cls.label = label or name
        _FUSIONS[name] = cls
        return cls

    return deco


def available() -> list[str]:
    """Fusion names in registration order: single sources first, then the multimodal ones."""
    return list(_FUSIONS)


def fusion_class(name: str) -> type[Fusion]:
    if name not in _FUSIONS:
        raise PipelineError(f"unknown fusion {name!r}; known: {', '.join(_FUSIONS)}")
    return _FUSIONS[name]


def roles_of(name: str) -> tuple[str, ...]:
    """The feature roles fusion `name` needs, e.g. ("text", "image")."""
    return fusion_class(name).roles


def label_of(name: str) -> str:
    """How reports name fusion `name`, e.g. "text+image (hadamard)"."""
    return fusion_class(name).label


def create_fusion(name: str, dim: int) -> Fusion:
    return fusion_class(name)(dim)


class Fusion(nn.Module):
    """{role: (B, d)} -> (B, d) for the roles in `roles`."""

    name: str = ""
    label: str = ""
    roles: tuple[str, ...] = ()

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def check(self, vectors: dict[str, torch.Tensor]) -> None:
        missing = [r for r in self.roles if r not in vectors]
        if missing:
            raise ValueError(f"fusion {self.name!r} needs roles {self.roles}; missing {missing}")


class _Single(Fusion):
    def forward(self, vectors: dict[str, torch.Tensor]) -> torch.Tensor:
        self.check(vectors)
        return vectors[self.roles[0]]


@register("text")
class TextOnly(_Single):
    roles = ("text",)


@register("image")
class ImageOnly(_Single):
    roles = ("image",)


@register("blip")
class BlipOnly(_Single):
    roles = ("blip",)


@register("hadamard", label="text+image (hadamard)")
class Hadamard(Fusion):
    roles = ("text", "image")

    def __init__(self, dim: int):
        super().__init__(dim)
        self.proj = nn.ModuleDict({r: nn.Linear(dim, dim) for r in self.roles})

    def forward(self, vectors: dict[str, torch.Tensor]) -> torch.Tensor:
        self.check(vectors)
        out = self.proj[self.roles[0]](vectors[self.roles[0]])  # (B, d)
        for role in self.roles[1:]:
            out = out * self.proj[role](vectors[role])  # (B, d)
        return out


@register("concat", label="text+image (concat)")
class Concat(Fusion):
    roles = ("text", "image")

    def __init__(self, dim: int):
        super().__init__(dim)
        self.proj = nn.Linear(dim * len(self.roles), dim)

    def forward(self, vectors: dict[str, torch.Tensor]) -> torch.Tensor:
        self.check(vectors)
        return self.proj(torch.cat([vectors[r] for r in self.roles], dim=-1))  # (B, 2d) -> (B, d)


@register("gated", label="text+image (gated)")
class Gated(Fusion):
    roles = ("text", "image")

    def __init__(self, dim: int):
        super().__init__(dim)
        self.gate = nn.Linear(2 * dim, dim)

    def forward(self, vectors: dict[str, torch.Tensor]) -> torch.Tensor:
        self.check(vectors)
        t, i = vectors["text"], vectors["image"]  # (B, d) each
        g = torch.sigmoid(self.gate(torch.cat([t, i], dim=-1)))  # (B, d)
        return g * t + (1 - g) * i
