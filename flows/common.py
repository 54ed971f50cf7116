"""What every flow's command line shares: the storage root, the default synthetic world,
parameter validation before any work starts, and Prefect's quiet defaults."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import BaseModel, ValidationError

from storage.errors import PipelineError
from storage.paths import storage_root, subdir

# Before Prefect is imported anywhere: no telemetry from a research pipeline.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")


def default_world(scale: str = "small", seed: int = 0, storage: str | Path | None = None) -> Path:
    """The synthetic world `<storage>/data/synthetic-<scale>-seed<seed>`, generated on first use."""
    from storage.synthetic import generate_world

    out = subdir("data", storage) / f"synthetic-{scale}-seed{seed}"
    generate_world(out, scale=scale, seed=seed)
    return out


def validated(model: type[BaseModel], values: dict, options: dict[str, str] | None = None) -> BaseModel:
    """Build a params model; a validation error becomes one readable line per field.
    `options` maps field names to their command-line option where the two differ."""
    options = options or {}
    try:
        return model(**values)
    except ValidationError as err:
        def option(loc: tuple) -> str:
            field = str(loc[0]) if loc else ""
            return "--" + options.get(field, field).replace("_", "-")

        problems = "; ".join(f"{option(e['loc'])}: {e['msg']}" for e in err.errors())
        raise PipelineError(f"invalid options: {problems}") from None


__all__ = ["default_world", "validated", "storage_root", "subdir"]
