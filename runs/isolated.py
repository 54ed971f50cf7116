"""Work in a process of its own, so that several pieces run side by side on the cores.

`run_isolated(params, threads)` starts `python -m runs.isolated` with a ranking run's
parameters as JSON, waits, and returns its RankOutcome; the child loads its data once, fits,
writes the run folder (runs.rank.run_rank) and prints the outcome. `pretrain_isolated(kind,
data, images, storage, threads)` pre-trains one tiny encoder the same way (runs.pretrain). Processes rather than threads: a ranker's
training holds the interpreter lock for its Python steps and draws from process-wide random
generators (torch's dropout), so two runs in threads of one process would neither use two
cores nor stay reproducible. The child is limited to `threads` threads (OMP, MKL, torch,
LightGBM's n_jobs via RankParams.threads), and on Linux the kernel stops it if the parent dies.
A user-fixable failure in the child (PipelineError, an OSError) comes back as a PipelineError
with its one line; anything else as a RuntimeError with the end of the child's output.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from runs.params import RankParams
from storage.errors import PipelineError

RESULT = "mmnews-outcome: "
FAILURE = "mmnews-error: "


def die_with_parent(parent: int) -> None:
    """In a child process, before exec (a Popen preexec_fn): on Linux the kernel sends it
    SIGTERM when the parent dies, even by SIGKILL; elsewhere nothing."""
    import ctypes
    import signal

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:
        os._exit(1)


def run_isolated(params: RankParams, threads: int = 1):
    """Run `params` in a child process; its RankOutcome."""
    from runs.rank import RankOutcome

    return RankOutcome(**_child({"job": "rank", "params": json.loads(params.model_dump_json())}, threads))


def pretrain_isolated(kind: str, data: Path, images: Path | None, storage, threads: int = 1) -> Path:
    """Pre-train `kind` for this data in a child process (runs.pretrain.ensure_pretrained); its folder."""
    job = {"job": "pretrain", "kind": kind, "data": str(data), "images": None if images is None else str(images),
           "storage": None if storage is None else str(storage)}
    return Path(_child(job, threads)["folder"])


def _child(job: dict, threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "OPENBLAS_NUM_THREADS": str(threads), "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    root = Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), env.get("PYTHONPATH", "")) if p)
    parent = os.getpid()
    done = subprocess.run(
        [sys.executable, "-m", "runs.isolated", str(threads)], input=json.dumps(job), env=env,
        capture_output=True, text=True,
        preexec_fn=(lambda: die_with_parent(parent)) if sys.platform.startswith("linux") else None,
    )
    lines = done.stdout.splitlines()
    result = next((ln[len(RESULT):] for ln in reversed(lines) if ln.startswith(RESULT)), None)
    if done.returncode == 0 and result is not None:
        return json.loads(result)
    failure = next((ln[len(FAILURE):] for ln in reversed(lines) if ln.startswith(FAILURE)), None)
    if failure is not None:
        raise PipelineError(failure)
    tail = (done.stderr or done.stdout)[-3000:]
    raise RuntimeError(f"the {job['job']} process ended with code {done.returncode}:\n{tail}")


def main(argv: Sequence[str] | None = None) -> int:
    """The child: a job as JSON on stdin; its result (or the error) on stdout's last line."""
    from storage.errors import as_pipeline_error

    args = list(sys.argv[1:] if argv is None else argv)
    threads = int(args[0]) if args else 1
    try:
        import torch

        torch.set_num_threads(threads)
        job = json.loads(sys.stdin.read())
        if job["job"] == "rank":
            from runs.rank import run_rank

            result = asdict(run_rank(RankParams.model_validate(job["params"])))
        else:
            from runs.pretrain import ensure_pretrained

            images = Path(job["images"]) if job["images"] else None
            result = {"folder": str(ensure_pretrained(job["kind"], Path(job["data"]), images, job["storage"],
                                                      progress=False))}
    except Exception as err:  # noqa: BLE001 - reported to the parent, one line where it can be
        friendly = as_pipeline_error(err)
        if friendly is None:
            raise
        print(FAILURE + str(friendly).replace("\n", " "), flush=True)
        return 1
    print(RESULT + json.dumps(result, default=str), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
