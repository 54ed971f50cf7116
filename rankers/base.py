"""The contract every ranker keeps, so flows and the report treat them alike.

A ranker learns on `train` (early stopping and model choice on `valid`, a time-carved part of
train; dev is never seen in fitting) and scores every candidate row of any Impressions.
News features come in as a dict role -> NewsFeatures, roles being `text`, `image` and
`blip` (the multimodal vector); the fusion decides which roles a model uses.
Letters: T candidate rows.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from extractors.registry import ROLES  # noqa: F401 - the rankers' feature roles, re-exported
from rankers.data import Impressions, NewsFeatures


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


def check_fields(cls: type, values: Mapping) -> None:
    """Refuse keys of `values` that are not fields of dataclass `cls` (a saved config from
    another version, a typo), naming them and the known ones."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields {unknown}; known: {sorted(known)}")
