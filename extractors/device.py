"""The torch device a command asked for: `auto` (a CUDA GPU when there is one), `cpu`, `cuda`."""

from __future__ import annotations

import torch

from storage.errors import PipelineError


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """`device` as a torch.device; asking for CUDA where torch sees no GPU is one clear error."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise PipelineError(f"--device {device} was asked for, but torch sees no CUDA GPU here; use --device cpu or auto")
    return dev
