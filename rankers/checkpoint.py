"""Epoch checkpoints of a training run that a killed process resumes from.

One folder per completed epoch, `<dir>/epoch-NNNN/`:

    model.safetensors   the model's state after that epoch
    best.safetensors    the best-validated state so far, when it is not this epoch's
    optimizer.pt        the optimizer's state_dict (tensors, numbers, strings)
    rng.pt              torch's random generator states (CPU, and CUDA when used)
    checkpoint.json     epoch, step, early-stopping state, history and the run's identity

Everything is written into `<dir>/.epoch-NNNN.partial/` and published with one rename, so a
kill at any moment leaves either the previous checkpoint or the new one, never half of one;
leftover partial folders are deleted by the next run. Older epochs are removed after the
rename. Only plain tensors and containers are written: reading uses
`torch.load(weights_only=True)`, which refuses to unpickle arbitrary objects.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from storage.errors import PipelineError

MODEL, BEST, OPTIMIZER, RNG, META = "model.safetensors", "best.safetensors", "optimizer.pt", "rng.pt", "checkpoint.json"
_NAME = re.compile(r"^epoch-(\d{4,})$")


@dataclass
class Checkpoint:
    """One published checkpoint, read back."""

    path: Path
    meta: dict
    model: dict[str, torch.Tensor]
    best: dict[str, torch.Tensor] | None  # None: the best state is `model`
    optimizer: dict
    rng: dict[str, torch.Tensor | list[torch.Tensor]]


def _plain(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # Cloned to CPU: safetensors refuses tensors that share storage (tied weights).
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state.items()}


def rng_state(device: torch.device) -> dict:
    state: dict = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def write(directory: Path, epoch: int, meta: dict, model: dict[str, torch.Tensor], optimizer: dict,
          rng: dict, best: dict[str, torch.Tensor] | None = None) -> Path:
    """Publish the checkpoint of `epoch` atomically; returns its folder."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"epoch-{epoch:04d}"
    tmp = directory / f".{final.name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(_plain(model), str(tmp / MODEL))
    if best is not None:
        save_file(_plain(best), str(tmp / BEST))
    torch.save(optimizer, tmp / OPTIMIZER)
    torch.save(rng, tmp / RNG)
    (tmp / META).write_text(json.dumps({**meta, "epoch": epoch}, indent=2, sort_keys=True) + "\n")
    for f in tmp.iterdir():
        _fsync(f)
    if final.exists():  # a rerun of an epoch whose checkpoint was kept: replace it
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync(directory)
    for old in directory.iterdir():
        m = _NAME.match(old.name)
        if m and int(m.group(1)) < epoch:
            shutil.rmtree(old, ignore_errors=True)
    return final


def latest(directory: Path) -> Path | None:
    """The newest published checkpoint folder under `directory`, after deleting partial ones."""
    directory = Path(directory)
    if not directory.is_dir():
        return None
    found = []
    for entry in directory.iterdir():
        if entry.name.startswith(".epoch-") and entry.name.endswith(".partial"):
            shutil.rmtree(entry, ignore_errors=True)  # a kill during writing: never published
            continue
        m = _NAME.match(entry.name)
        if m and (entry / META).is_file():
            found.append((int(m.group(1)), entry))
    return max(found)[1] if found else None


def read(path: Path, map_location: str | torch.device = "cpu") -> Checkpoint:
    from safetensors.torch import load_file

    path = Path(path)
    try:
        meta = json.loads((path / META).read_text())
        model = load_file(str(path / MODEL))
        best = load_file(str(path / BEST)) if (path / BEST).is_file() else None
        optimizer = torch.load(path / OPTIMIZER, map_location=map_location, weights_only=True)
        rng = torch.load(path / RNG, map_location="cpu", weights_only=True)
    except (OSError, ValueError, RuntimeError, json.JSONDecodeError) as err:
        raise PipelineError(f"checkpoint {path} cannot be read ({type(err).__name__}: {err}); delete that folder "
                            "to resume from an earlier epoch, or the whole checkpoint folder to start over") from None
    return Checkpoint(path, meta, model, best, optimizer, rng)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
