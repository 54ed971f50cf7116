"""What every flow's command line shares: quiet Prefect defaults, parameter validation before
any work starts, running a flow against one Prefect server, and tasks that fail with one line."""

from __future__ import annotations

import os
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any

from runs.params import validated
from storage.errors import PipelineError, as_pipeline_error

# Before Prefect is imported anywhere: no telemetry from a research pipeline.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
# Before LightGBM or torch start their OpenMP threads: idle threads sleep instead of spinning,
# which made LightGBM 2-3x and an NRMS epoch 8x slower on a shared 2-core machine.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def run_flow(build: Callable[[], Any], params: Any, what: str) -> Any:
    """Build the flow and run it on `params` against the configured Prefect server or one
    temporary server for this command; a failed run becomes a PipelineError with its message."""
    from flows.server import prefect_api

    with prefect_api():
        state = build()(params, return_state=True)
        if state.is_failed() or state.is_crashed():
            raise PipelineError(state.message or f"{what} failed")
        return state.result()


def guarded(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call the run layer from a task: a user-fixable problem (PipelineError, or an OSError such
    as a full disk or a read-only folder) ends the task Failed with its one-line message
    instead of a traceback in the logs."""
    from prefect.states import Failed

    try:
        return fn(*args, **kwargs)
    except Exception as err:
        friendly = as_pipeline_error(err)
        if friendly is None:
            raise
        return Failed(message=str(friendly))


__all__ = ["guarded", "run_flow", "validated"]


IN_PROCESS = "in-process"


@dataclass(frozen=True)
class Job:
    """One task call of a `run_graph`: `task.submit(*args)` once every job named in `after`
    has completed. Jobs that share an `exclusive` name never run at once (work done in this
    process, which shares torch's threads and random generator, is all "in-process"). A
    failed `fatal` job stops the graph: nothing new starts, what runs finishes. A `here` job
    runs in the calling thread, where an interrupt reaches it (a submitted task's thread runs
    on to its end); nothing new starts meanwhile."""

    key: Hashable
    task: Any
    args: tuple
    after: tuple = ()
    exclusive: str | None = None
    fatal: bool = False
    here: bool = False  # run in the calling thread (Ctrl+C and SIGTERM interrupt it there)


def run_graph(jobs: Sequence[Job], slots: int) -> dict:
    """Run `jobs` with at most `slots` at once, each as soon as what it needs is done, the
    first ready in list order first; key -> final state. A job whose prerequisite failed, or
    that a failed fatal job kept from starting, does not run and maps to None. Every other
    job runs (a failure does not cancel the others, whose results a rerun reuses); the caller
    decides what a failed state means."""
    from prefect.futures import as_completed

    states: dict = {}
    running: dict = {}  # key -> (job, future)
    waiting = list(jobs)
    stopped = False
    while True:
        held = {job.exclusive for job, _ in running.values() if job.exclusive}
        here = None
        for job in list(waiting):
            if stopped or any(k in states and not _completed(states[k]) for k in job.after):
                waiting.remove(job)
                states[job.key] = None
            elif len(running) < max(1, slots) and all(k in states for k in job.after) and (
                    job.exclusive is None or job.exclusive not in held):
                waiting.remove(job)
                if job.here:
                    here = job
                    break
                running[job.key] = (job, job.task.submit(*job.args))
                if job.exclusive:
                    held.add(job.exclusive)
        if here is not None:
            state = here.task(*here.args, return_state=True)
            states[here.key] = state
            stopped = stopped or (here.fatal and not state.is_completed())
            continue
        if not running:
            break
        done = next(as_completed([future for _, future in running.values()]))
        key = next(k for k, (_, future) in running.items() if future is done)
        done.wait()
        job, _ = running.pop(key)
        states[key] = done.state
        stopped = stopped or (job.fatal and not done.state.is_completed())
    for job in waiting:  # prerequisites that never ran
        states[job.key] = None
    return states


def _completed(state) -> bool:
    return state is not None and state.is_completed()


def run_bounded(task, calls: list[tuple], jobs: int) -> list:
    """Submit `task(*call)` for every call with at most `jobs` running at once; their final
    states, in the calls' order (a run_graph without prerequisites)."""
    states = run_graph([Job(i, task, call) for i, call in enumerate(calls)], jobs)
    return [states[i] for i in range(len(calls))]


# ----------------------------------------------------------------------------- shared options


def add_allow_no_images(p) -> None:
    p.add_argument("--allow-no-images", action="store_true",
                   help="run image extractors even when no news has a cover file (every image vector then comes "
                   "from a title-only card); without it such a run is refused, and one with under 20%% of news "
                   "covered is warned (IM-MIND covers 44%% of MIND-small)")


def add_lightgbm_options(p) -> None:
    lg = p.add_argument_group("LightGBM", "Defaults: rankers/lgbm.py LGBMConfig (500 trees with early stopping on "
                              "valid NDCG@10, learning rate 0.1, every non-click, at most 1,000,000 training rows, "
                              "each tree on a seeded 80%% of the training impressions)")
    lg.add_argument("--lgbm-trees", type=int, metavar="N", help="boosting rounds at most (early stopping may end sooner)")
    lg.add_argument("--lgbm-learning-rate", type=float, metavar="LR", help="shrinkage per tree")
    lg.add_argument("--lgbm-neg-fraction", type=float, metavar="F",
                    help="keep this fraction of each impression's non-clicks (every click, at least one non-click)")
    lg.add_argument("--lgbm-max-rows", type=int, metavar="N",
                    help="training rows at most: fewer non-clicks per impression, then fewer impressions")
    lg.add_argument("--lgbm-bagging", type=float, metavar="F",
                    help="share of the training impressions each tree sees, drawn from --seed (default 0.8; 1: "
                    "no bagging, and every seed gives the same model)")


def add_world_options(p) -> None:
    """--storage, and the synthetic world used when --data is absent; --no-progress."""
    from pathlib import Path

    p.add_argument("--storage", type=Path, help="storage root (default: $MMNEWS_STORAGE or ./storage)")
    p.add_argument("--scale", choices=["tiny", "small", "mind-small"], default="small",
                   help="synthetic world scale when --data is absent")
    p.add_argument("--world-seed", type=int, default=0, help="synthetic world seed when --data is absent")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
