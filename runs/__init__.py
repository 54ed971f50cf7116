"""The run layer: what a run is and how it is carried out, below the Prefect flows.

- `runs.params`: the parameters of each command as pydantic models whose validators check
  the whole plan (registries, every ranker x fusion x source combination, checkpoints,
  input folders, names) in about a second, for the command line and deployments alike;
- `runs.workspace`: each dataset's catalogue and splits loaded once per process, and one
  memoised "find or extract this store" that every flow (the torchrun entry included) uses;
- `runs.extract`, `runs.rank`, `runs.compare`: the work itself, as plain functions;
- `runs.report` (the report's typed models and files) and `runs.render` (Markdown, HTML
  and plots of a report).

No Prefect here: `flows/` parses and validates the parameters, asks this layer for work,
and wraps it in tasks and artifacts; a notebook can call these functions directly.
"""
