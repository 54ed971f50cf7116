"""Early stopping over epochs, shared by the NRMS trainers (rankers.train, rankers.finetune).

After each epoch the trainer hands `EarlyStopping.update` the epoch's validation metric
(higher is better: both trainers use valid AUC) and its model. A better metric than any
before makes the epoch the best one and keeps a copy of the model's state; otherwise the
epoch is stale, and `patience` stale epochs in a row set `stopped`. At the end, `restore`
loads the best state back into the model.

The counters (`progress()`, plain JSON values) go into a checkpoint's metadata and the best
state into its tensors, so a resumed run (`from_progress`) stops where an uninterrupted
one would.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


@dataclass
class EarlyStopping:
    """Best epoch so far, its metric, stale epochs since, and whether to stop.

    Without a validation split pass metric=None every epoch: each one then counts as the
    best, so training runs all its epochs and keeps the last.
    """

    patience: int
    best: float = -math.inf  # the best metric so far
    best_epoch: int = 0  # 1-based; 0 before any epoch
    stale: int = 0  # epochs since the best one
    stopped: bool = False
    best_state: dict[str, torch.Tensor] | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.patience < 1:
            raise ValueError(f"patience={self.patience}: give at least 1 epoch")

    def update(self, epoch: int, metric: float | None, model: nn.Module | None = None) -> bool:
        """Record `epoch`'s metric (None: nothing to validate on). Returns whether it is the
        new best; then a copy of `model`'s state (if given) is kept."""
        value = float(epoch) if metric is None else float(metric)  # no validation: the latest is the best
        if value > self.best:
            self.best, self.best_epoch, self.stale = value, epoch, 0
            if model is not None:
                self.best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            return True
        self.stale += 1
        self.stopped = self.stale >= self.patience
        return False

    def restore(self, model: nn.Module) -> None:
        """Load the best state kept into `model` (nothing when none was kept)."""
        if self.best_state is not None:
            model.load_state_dict(self.best_state)

    def progress(self) -> dict[str, Any]:
        """The counters as JSON values (a checkpoint's metadata; the best state goes apart)."""
        return {"best": self.best, "best_epoch": self.best_epoch, "stale": self.stale, "stopped": self.stopped}

    @classmethod
    def from_progress(cls, patience: int, progress: Mapping[str, Any],
                      best_state: dict[str, torch.Tensor] | None = None) -> EarlyStopping:
        """The state `progress()` gave, with the best state read back beside it."""
        return cls(patience, best=float(progress["best"]), best_epoch=int(progress["best_epoch"]),
                   stale=int(progress["stale"]), stopped=bool(progress["stopped"]), best_state=best_state)
