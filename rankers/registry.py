"""The ranker registry: one table of entries, name -> what a ranker is and where it is built.

An entry carries what callers need to know without building or importing the ranker (the
timm habit: the registry holds names and metadata, never the plug-ins): a label for
reports, whether it is a reference baseline, the fusions it can train on
(rankers.fusion's names; `ANY_FUSION` for every registered one, `()` for rankers that read
no features), and its constructor as `module:function`, imported on first `create_ranker`.
So a broken model module breaks only itself, and listing or validating names imports none
of them. An unknown or duplicate name raises with the list of known names.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from storage.errors import PipelineError

ANY_FUSION = ("*",)
"""`fusions` value of a ranker that trains on every registered fusion."""


@dataclass(frozen=True)
class RankerEntry:
    """One registered ranker; `constructor(**options) -> Ranker`."""

    name: str
    constructor: str
    label: str
    fusions: tuple[str, ...] = ()
    baseline: bool = False

    def __post_init__(self) -> None:
        if ":" not in self.constructor:
            raise ValueError(f"ranker {self.name!r}: constructor {self.constructor!r} is not module:function")

    @property
    def reads_features(self) -> bool:
        return bool(self.fusions)

    def supports(self, fusion: str) -> bool:
        return self.fusions == ANY_FUSION or fusion in self.fusions

    def supported_fusions(self) -> list[str]:
        """The fusion names this ranker trains on, in the fusion registry's order."""
        if not self.fusions:
            return []
        from rankers.fusion import available

        return [f for f in available() if self.supports(f)]

    def build(self) -> Callable[..., Any]:
        module, _, function = self.constructor.partition(":")
        return getattr(importlib.import_module(module), function)


_RANKERS: dict[str, RankerEntry] = {}


def register_ranker(entry: RankerEntry) -> RankerEntry:
    """Add a ranker entry; a duplicate name raises with the known names."""
    if entry.name in _RANKERS:
        raise ValueError(f"ranker {entry.name!r} is registered twice; known: {', '.join(sorted(_RANKERS))}")
    _RANKERS[entry.name] = entry
    return entry


register_ranker(RankerEntry("nrms", "rankers.train:NRMSRanker", label="NRMS", fusions=ANY_FUSION))
register_ranker(RankerEntry("lightgbm", "rankers.lgbm:LightGBMRanker", label="LightGBM",
                            fusions=("text", "image", "blip", "text+cover", "hadamard")))
register_ranker(RankerEntry("random", "rankers.baselines:create_random", label="random", baseline=True))
register_ranker(RankerEntry("popularity", "rankers.baselines:create_popularity",
                            label="popularity (smoothed train CTR)", baseline=True))
register_ranker(RankerEntry("oracle", "rankers.baselines:create_oracle",
                            label="oracle (true click probabilities)", baseline=True))


def ranker_names() -> list[str]:
    return sorted(_RANKERS)


def trained_rankers() -> list[str]:
    """The rankers that learn from features (not the reference baselines)."""
    return [n for n in ranker_names() if not _RANKERS[n].baseline]


def baseline_rankers() -> list[str]:
    return [n for n in ranker_names() if _RANKERS[n].baseline]


def ranker_entry(name: str) -> RankerEntry:
    if name not in _RANKERS:
        raise PipelineError(f"unknown ranker {name!r}; known: {', '.join(ranker_names())}")
    return _RANKERS[name]


def create_ranker(name: str, **options: Any) -> Any:
    """Build the ranker registered as `name` with its options."""
    return ranker_entry(name).build()(**options)
