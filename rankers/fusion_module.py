"""The torch side of a registered fusion (rankers.fusion): its layers and its forward pass.
Letters: B news, d width."""

from __future__ import annotations

import torch
from torch import nn

from rankers.fusion import FusionEntry, fusion_entry


class FusionModule(nn.Module):
    """{role: (B, d)} -> (B, d) for the roles of `entry`, with the layers it declares."""

    def __init__(self, entry: FusionEntry, dim: int):
        super().__init__()
        self.entry = entry
        self.name = entry.name
        self.roles = entry.roles
        self.dim = dim
        self.layers = nn.ModuleDict({k: nn.Linear(dim, dim, bias=spec.bias) for k, spec in entry.layers.items()})

    def forward(self, vectors: dict[str, torch.Tensor]) -> torch.Tensor:
        missing = [r for r in self.roles if r not in vectors]
        if missing:
            raise ValueError(f"fusion {self.name!r} needs roles {self.roles}; missing {missing}")
        return self.entry.fn(vectors, self.layers)  # (B, d)


def create_fusion(name: str, dim: int) -> nn.Module:
    """The fusion registered as `name` as a torch module: {role: (B, d)} -> (B, d), its layers of width `dim`."""
    return FusionModule(fusion_entry(name), dim)
