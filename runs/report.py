"""The comparison report as a file format: typed models, validation, and the files written.

`Report` (and its parts: `RunEntry`, `Interval`, `Delta`, `SliceEntry`, `Published`,
`Bootstrap`) is the one definition of `metrics.json`: the comparison builds one,
`runs.render.write_report` validates it and writes it with its renderings, and a reader
validates `metrics.json` back into it. Metrics are `auc`, `mrr`, `ndcg@5`, `ndcg@10`, as fractions;
None (null in JSON) where undefined, e.g. an empty slice, or an interval on too few
impressions. `paired` and each slice's `delta` compare a run with its reference on the same
impressions: `diff` = run - reference, `p` the share of resamples with diff <= 0.

`runs.render.write_report(folder, report)` writes into `folder` (the names in `FILES`), each
file replaced atomically:
- `report.md` and `report.html` (runs.render), `metrics.json` (the validated report);
- `metrics.png`, `deltas.png` (only with a run to compare) and `cost.png` (only when some
  run has a training time).
A malformed report raises `ReportError` naming the key path, e.g.
`report["runs"][1]["metrics"]: Field required`.
"""

from __future__ import annotations

import datetime as _dt
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

Metric = Literal["auc", "mrr", "ndcg@5", "ndcg@10"]
METRICS: tuple[str, ...] = ("auc", "mrr", "ndcg@5", "ndcg@10")
FILES = {
    "markdown": "report.md",
    "html": "report.html",
    "json": "metrics.json",
    "metrics_plot": "metrics.png",
    "deltas_plot": "deltas.png",
    "cost_plot": "cost.png",
}


class ReportError(ValueError):
    """A report that does not validate as `Report`; the message names the key path."""


def _finite(v: float | None) -> float | None:
    return v if v is None or math.isfinite(v) else None


class _Part(BaseModel):
    model_config = ConfigDict(extra="forbid", ser_json_inf_nan="null")


class Interval(_Part):
    """A metric's point value and its interval (lo, hi None: too few impressions)."""

    value: float | None
    lo: float | None
    hi: float | None

    @field_validator("value", "lo", "hi")
    @classmethod
    def finite(cls, v: float | None) -> float | None:
        return _finite(v)


class Delta(_Part):
    """A paired difference, run minus its reference, with its interval and one-sided p."""

    diff: float | None
    lo: float | None
    hi: float | None
    p: float | None

    @field_validator("diff", "lo", "hi", "p")
    @classmethod
    def finite(cls, v: float | None) -> float | None:
        return _finite(v)


def _all_metrics(values: Mapping[str, Any]) -> Mapping[str, Any]:
    missing = [m for m in METRICS if m not in values]
    if missing:
        raise ValueError(f"missing key {missing[0]!r} (metrics are {', '.join(METRICS)})")
    return values


class SeedValue(_Part):
    """One training seed's own point values on every dev impression."""

    seed: int
    metrics: dict[Metric, float | None]

    @field_validator("metrics")
    @classmethod
    def complete(cls, v: dict) -> dict:
        return _all_metrics({k: _finite(x) for k, x in v.items()})


class RunEntry(_Part):
    name: str
    ranker: str
    sources: list[str]
    metrics: dict[Metric, Interval]
    impressions: int = Field(ge=0)
    fusion: str | None = None
    train_seconds: float | None = None
    train_impressions_per_s: float | None = None
    notes: str | None = None
    oracle_share: float | None = None
    seeds: list[SeedValue] | None = None  # a run trained with several seeds: each seed's values

    @field_validator("sources", mode="before")
    @classmethod
    def listed(cls, v: object) -> object:
        if isinstance(v, str) or not isinstance(v, (list, tuple)):
            raise ValueError("expected a list of source names such as ['text', 'image']")
        return v

    @field_validator("metrics")
    @classmethod
    def complete(cls, v: dict) -> dict:
        return _all_metrics(v)


class SliceEntry(_Part):
    n: int = Field(ge=0)
    skipped: int | None = None
    metrics: dict[Metric, Interval]
    delta: dict[Metric, Delta] | None = None
    seeds: list[dict[Metric, float | None]] | None = None

    @field_validator("metrics")
    @classmethod
    def complete(cls, v: dict) -> dict:
        return _all_metrics(v)


class Question(_Part):
    """One ranker's answer to one of the report's two questions, read off a paired AUC difference:
    `presence`, does having a cover help (text+cover against text)? `content`, does what the
    cover shows help beyond that (text+image against text+cover)?"""

    kind: Literal["presence", "content"]
    ranker: str
    run: str
    reference: str
    auc: Delta
    answer: Literal["yes", "no", "hurts", "undecided"]  # interval above 0, spanning 0, below 0; too few impressions


class Published(_Part):
    """Published numbers shown beside ours (not runs of this pipeline)."""

    name: str
    metrics: dict[Metric, float]
    source: str | None = None


class Bootstrap(_Part):
    n_boot: int = Field(ge=1)
    level: float = Field(gt=0, lt=1)
    seed: int


class Report(_Part):
    title: str
    created: str
    dataset: dict[str, Any]
    reference: str
    runs: list[RunEntry] = Field(min_length=1)
    paired: dict[str, dict[Metric, Delta]]
    references: dict[str, str] = Field(default_factory=dict)
    slices: dict[str, dict[str, SliceEntry]] = Field(default_factory=dict)
    baselines: list[Published] = Field(default_factory=list)
    questions: list[Question] = Field(default_factory=list)
    bootstrap: Bootstrap | None = None
    notes: list[str] = Field(default_factory=list)
    config: dict[str, Any] = Field(default_factory=dict)

    @field_validator("created", mode="before")
    @classmethod
    def _iso(cls, v: object) -> object:
        return v.isoformat() if isinstance(v, (_dt.datetime, _dt.date)) else v

    @field_validator("dataset")
    @classmethod
    def _named(cls, v: dict) -> dict:
        if "name" not in v:
            raise ValueError("missing key 'name'")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> Report:
        names = [r.name for r in self.runs]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"run names must be unique; used twice: {twice}")
        known = set(names)

        def need(name: str, where: str) -> None:
            if name not in known:
                raise ValueError(f"{where}: {name!r} is not a run; the runs are {names}")

        need(self.reference, "reference")
        for name in self.paired:
            need(name, f"paired[{name!r}]")
        for name, ref in self.references.items():
            need(name, f"references[{name!r}]")
            need(ref, f"references[{name!r}] -> {ref!r}")
        for sname, by_run in self.slices.items():
            for name in by_run:
                need(name, f"slices[{sname!r}][{name!r}]")
        for i, q in enumerate(self.questions):
            need(q.run, f"questions[{i}].run")
            need(q.reference, f"questions[{i}].reference")
        return self

    @classmethod
    def parse(cls, data: Mapping) -> Report:
        """Validate plain data (a dict, or metrics.json's content) into a Report."""
        plain = _plain(data)
        try:
            return cls.model_validate(plain)
        except ValidationError as err:
            raise ReportError(_describe(err, plain)) from None

    @classmethod
    def read(cls, path: str | os.PathLike[str]) -> Report:
        """A report read back from its metrics.json, validated."""
        import json

        return cls.parse(json.loads(Path(path).read_text(encoding="utf-8")))


def _plain(obj: object) -> object:
    """numpy scalars and arrays as Python numbers and lists (pydantic reads those)."""
    import numpy as np

    if isinstance(obj, Mapping):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _plain(obj.tolist())
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    return obj


def _describe(err: ValidationError, data: object = None) -> str:
    """The first problems as `report["runs"][1] ('name'): missing key 'metrics'`."""

    def where(loc: tuple) -> str:
        out = "report"
        for i, part in enumerate(loc):
            out += f"[{part}]" if isinstance(part, int) else f'["{part}"]'
            if loc[:1] == ("runs",) and i == 1 and isinstance(data, Mapping):
                runs = data.get("runs")
                if isinstance(runs, list) and isinstance(part, int) and part < len(runs) \
                        and isinstance(runs[part], Mapping) and "name" in runs[part]:
                    out += f" ({runs[part]['name']!r})"
        return out

    def one(e: dict) -> str:
        loc = tuple(e["loc"])
        if e["type"] == "missing" and loc:
            return f"{where(loc[:-1])}: missing key {loc[-1]!r}"
        return f"{where(loc)}: {e['msg'].removeprefix('Value error, ')}"

    return "; ".join(one(e) for e in err.errors()[:5])
