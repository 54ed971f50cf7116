"""The pre-training loop every objective shares: cache, resume, atomic publication.

A run trains in `<out>.partial/` and checkpoints there every `checkpoint_every` steps into one
safetensors file (model, optimizer moments and, in its metadata, the step, the losses so far
and the run's identity), replaced atomically; killed at any point, the same call resumes from
the last checkpoint. When training ends the objective writes the model in a real
checkpoint's layout into `<out>.partial/final/`, `pretrain.json` joins it last, and the folder
is renamed to `<out>`: a folder under the final name is always complete. A later call with
the same identity (kind, config, seed, data digest) returns `<out>` untouched; one with
another identity is refused.

Determinism: every step draws its batch, masks and dropout from its own seed, derived from
(seed, kind, step), inside `torch.random.fork_rng`, so the caller's global RNG is left as it
was, and the steps a resumed run repeats draw exactly what they drew the first time: a
resumed run ends bit-identical to an uninterrupted one (same torch build and thread count).
"""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import time
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from storage.errors import PipelineError

FORMAT = "mmnews pre-trained tiny encoder"
FORMAT_VERSION = 1
STATE_FILE = "state.safetensors"
RECORD = "pretrain.json"


@dataclass(frozen=True)
class PretrainConfig:
    """The optimisation budget every kind shares; kinds add their objective's knobs."""

    steps: int = 400
    batch_size: int = 64
    lr: float = 1e-3
    warmup_steps: int = 40
    min_lr_ratio: float = 0.1  # cosine decay from lr to lr * this
    weight_decay: float = 0.05
    grad_clip: float = 1.0
    checkpoint_every: int = 50
    epochs: float = 0.0  # > 0: at most this many passes over the corpus (`sized`); `steps` stays the cap

    def sized(self, news: int) -> PretrainConfig:
        """This config for a corpus of `news` news: `steps` cut to `epochs` passes where that is
        fewer (a tiny world needs a tenth of the small world's steps to see its news as often),
        the warm-up cut to a fifth of the steps. Unchanged with `epochs` 0."""
        if self.epochs <= 0:
            return self
        steps = max(1, min(self.steps, math.ceil(self.epochs * news / self.batch_size)))
        return replace(self, steps=steps, warmup_steps=min(self.warmup_steps, steps // 5),
                       checkpoint_every=min(self.checkpoint_every, steps))

    def check(self) -> None:
        problems = []
        if self.steps < 1:
            problems.append(f"steps={self.steps} (need >= 1)")
        if self.batch_size < 2:
            problems.append(f"batch_size={self.batch_size} (need >= 2)")
        if not 0 < self.lr < 1:
            problems.append(f"lr={self.lr} (need 0 < lr < 1)")
        if self.checkpoint_every < 1:
            problems.append(f"checkpoint_every={self.checkpoint_every} (need >= 1)")
        if self.warmup_steps < 0 or not 0 <= self.min_lr_ratio <= 1:
            problems.append(f"warmup_steps={self.warmup_steps}, min_lr_ratio={self.min_lr_ratio}")
        if problems:
            raise PipelineError(f"invalid pre-training config {type(self).__name__}: {', '.join(problems)}")

    def lr_at(self, step: int) -> float:
        """Linear warm-up over `warmup_steps`, then cosine decay to lr * min_lr_ratio at the end."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        span = max(self.steps - self.warmup_steps, 1)
        cosine = 0.5 * (1 + math.cos(math.pi * min(step - self.warmup_steps, span) / span))
        return self.lr * (self.min_lr_ratio + (1 - self.min_lr_ratio) * cosine)


def require(config: PretrainConfig, ok: bool, what: str) -> None:
    if not ok:
        raise PipelineError(f"invalid pre-training config {config}: need {what}")


class Objective(Protocol):
    """One kind's self-supervised task over one corpus.

    `model` holds every trained parameter (the encoder and the task's heads); `loss` draws
    its batch with `generator` and returns a scalar; `save` writes the encoder alone in the
    layout of a real checkpoint of its kind; `card` says how to load and pool it.
    """

    model: nn.Module

    def loss(self, generator: torch.Generator) -> torch.Tensor: ...

    def save(self, folder: Path) -> None: ...

    def card(self) -> dict[str, Any]: ...


def step_seed(seed: int, kind: str, step: int) -> int:
    """The seed of one step: a function of (seed, kind, step) only, so a rerun repeats it."""
    return int(np.random.SeedSequence([seed, zlib.crc32(kind.encode()), step]).generate_state(1)[0])


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: matrices decay, biases, norms, embeddings' position/token-type rows and
    learned tokens (cls, mask, positions) do not, as in BERT and MAE."""
    decay, plain = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        keep = p.ndim < 2 or name.endswith(("pos_embed", "cls_token", "mask_token", "position_embeddings.weight"))
        (plain if keep else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]


def _state_tensors(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    # Clones: tied weights share storage, which safetensors refuses to write twice.
    out = {f"model.{k}": v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    for i, state in opt.state_dict()["state"].items():
        for name, value in state.items():
            out[f"opt.{i}.{name}"] = torch.as_tensor(value).detach().clone().contiguous()
    return out


def _save_state(path: Path, model: nn.Module, opt: torch.optim.Optimizer, meta: dict[str, str]) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + ".tmp")
    save_file(_state_tensors(model, opt), str(tmp), metadata=meta)
    os.replace(tmp, path)


def _load_state(path: Path, model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, str]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
    tensors = load_file(str(path))
    model.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("opt."):
            _, i, name = key.split(".", 2)
            state.setdefault(int(i), {})[name] = value
    full = opt.state_dict()
    full["state"] = state
    opt.load_state_dict(full)
    return meta


def read_record(folder: Path) -> dict | None:
    """The pretrain.json of a finished folder, None when there is none."""
    marker = folder / RECORD
    if not marker.is_file():
        return None
    try:
        return json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise PipelineError(f"{marker}: unreadable ({err}); delete {folder} to pre-train again") from err


def check_out(out: Path, identity: dict) -> bool:
    """True when `out` already holds this very run; raise when it holds anything else."""
    record = read_record(out)
    if record is not None:
        if record.get("identity") == identity:
            return True
        theirs = record.get("identity", {})
        diff = ", ".join(f"{k}: {theirs.get(k)!r} (asked {v!r})" for k, v in identity.items() if theirs.get(k) != v)
        raise PipelineError(
            f"{out} already holds a pre-trained model of another run ({diff or 'another format'}); "
            f"choose another output folder or delete {out}"
        )
    if out.exists():
        raise PipelineError(
            f"{out} exists but holds no {RECORD} (not a finished pre-training); choose another output folder or delete it"
        )
    return False


def run(
    kind: str,
    objective: Objective,
    config: PretrainConfig,
    out: Path,
    identity: dict,
    *,
    seed: int,
    progress: bool = True,
    on_step: Callable[[int, float], None] | None = None,
) -> Path:
    """Train `objective` for `config.steps` steps into `out` (resuming, caching, atomic)."""
    if check_out(out, identity):
        return out
    partial = out.with_name(out.name + ".partial")
    state_path = partial / STATE_FILE
    token = json.dumps(identity, sort_keys=True)
    model = objective.model
    opt = torch.optim.AdamW(_param_groups(model, config.weight_decay), lr=config.lr, betas=(0.9, 0.98), eps=1e-6)
    losses: list[float] = []
    start = 0
    if state_path.is_file():
        meta = _load_state(state_path, model, opt) if _same_run(state_path, token) else None
        if meta is not None:
            start, losses = int(meta["step"]), json.loads(meta["losses"])
    if start == 0 and partial.exists():
        shutil.rmtree(partial)  # another run's leftovers, or nothing worth keeping
    partial.mkdir(parents=True, exist_ok=True)

    from tqdm import tqdm

    bar = tqdm(total=config.steps, initial=start, desc=f"pretrain {kind}", unit="step", disable=not progress)
    began = time.perf_counter()
    model.train()
    params = [p for g in opt.param_groups for p in g["params"]]
    for step in range(start, config.steps):
        for group in opt.param_groups:
            group["lr"] = config.lr_at(step)
        s = step_seed(seed, kind, step)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(s)  # dropout, inside the fork: the caller's generator is untouched
            generator = torch.Generator().manual_seed(s)
            loss = objective.loss(generator)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip > 0:
                nn.utils.clip_grad_norm_(params, config.grad_clip)
            opt.step()
        value = float(loss.detach())
        if not math.isfinite(value):
            raise PipelineError(
                f"pre-training {kind} diverged at step {step + 1} (loss {value}); lower the learning rate "
                f"(now {config.lr}) or delete {partial} and retry"
            )
        losses.append(value)
        done = step + 1
        if done % config.checkpoint_every == 0 or done == config.steps:
            _save_state(state_path, model, opt, {"identity": token, "step": str(done), "losses": json.dumps(losses)})
        bar.update(1)
        bar.set_postfix(loss=f"{value:.3f}")
        if on_step is not None:
            on_step(done, value)
    bar.close()
    model.eval()

    final = partial / "final"
    if final.exists():
        shutil.rmtree(final)
    final.mkdir()
    objective.save(final)
    record = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "identity": identity,
        **objective.card(),
        "config": asdict(config),
        "seed": seed,
        "losses": [round(x, 6) for x in losses],
        "loss_first_last": [_mean(losses[: max(len(losses) // 10, 1)]), _mean(losses[-max(len(losses) // 10, 1):])],
        "seconds_this_run": round(time.perf_counter() - began, 2),
        "resumed_from_step": start,
        "torch_threads": torch.get_num_threads(),
        "versions": _versions(),
    }
    tmp = final / (RECORD + ".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, final / RECORD)
    os.replace(final, out)
    shutil.rmtree(partial)
    return out


def _same_run(state_path: Path, token: str) -> bool:
    from safetensors import safe_open

    try:
        with safe_open(str(state_path), framework="pt") as f:
            return (f.metadata() or {}).get("identity") == token
    except Exception:  # noqa: BLE001 - a torn or foreign file: start over rather than fail
        return False


def _mean(values: list[float]) -> float:
    return round(float(np.mean(values)), 6) if values else float("nan")


def _versions() -> dict[str, str]:
    import timm
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "timm": timm.__version__,
            "python": platform.python_version()}
