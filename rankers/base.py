"""The contract every ranker keeps, so flows and the report treat them alike.

A ranker learns on `train` (early stopping and model choice on `valid`, a time-carved part of
train; dev is never seen in fitting) and scores every candidate row of any Impressions.
News features come in as a dict role -> NewsFeatures, roles being `text`, `image` and
`blip` (the multimodal vector); the fusion decides which roles a model uses.
Letters: T candidate rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from rankers.data import Impressions, NewsFeatures

ROLES = ("text", "image", "blip")


@dataclass
class FitReport:
    """What training did: for the run record and the report's cost columns."""

    epochs: int = 0
    best_epoch: int = 0
    valid_metrics: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    train_impressions_per_s: float = 0.0
    history: list[dict] = field(default_factory=list)  # one dict per epoch: loss, valid metrics


class Ranker(Protocol):
    name: str

    def fit(self, train: Impressions, valid: Impressions, features: dict[str, NewsFeatures]) -> FitReport: ...

    def score(self, impressions: Impressions) -> np.ndarray:
        """Higher is better: (T,) float64 aligned with `impressions.cand_items`."""
        ...

    def save(self, folder: Path) -> list[Path]:
        """Write the fitted model (safetensors / LightGBM text + a JSON config); return the files."""
        ...
