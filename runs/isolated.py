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

The children are kept and reused, one job at a time each, by the thread that started them,
until `close_idle()` (flows.compare calls it when its runs are done; the rest at exit): a
child's start (Python, torch, LightGBM and scikit-learn imported) cost about 3.4 s, paid 30
times by the demo. Reuse changes no result:
every job seeds what it draws from (a trainer's fit runs inside rankers.train.isolated_rng and
seeds torch itself; LightGBM and the samplers take their seed), and a child that fails other
than with a one-line error is dropped, never reused.
"""

from __future__ import annotations

import atexit
import json
import os
import subprocess
import sys
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from runs.params import RankParams
from storage.errors import PipelineError

RESULT = "mmnews-outcome: "
FAILURE = "mmnews-error: "


def die_with_parent(parent: int) -> None:
    """In a child process of `parent` (first thing after exec, or a Popen preexec_fn): on Linux
    the kernel sends it SIGTERM when the parent (the thread that started it) dies, even by
    SIGKILL; elsewhere nothing. A child whose parent is already gone exits."""
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


class _Worker:
    """One child serving jobs: a JSON line in, its result (or error) line out."""

    def __init__(self, threads: int, key: tuple):
        self.key = key  # threads, environment and folder it was started with: reused only for the same
        # The kernel stops the child when the thread that started it ends (PR_SET_PDEATHSIG
        # follows the thread), so only that thread, alive while it waits, reuses it.
        self.owner = threading.current_thread()
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
               "OPENBLAS_NUM_THREADS": str(threads), "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
        root = Path(__file__).resolve().parents[1]
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), env.get("PYTHONPATH", "")) if p)
        self.stderr = tempfile.TemporaryFile(mode="w+", prefix="mmnews-child-")
        # The child asks for the death signal itself (`--parent`), first thing after exec: a
        # preexec_fn would run Python between fork and exec, which can deadlock while another
        # thread of this process holds a lock (an extraction importing a library beside it).
        self.process = subprocess.Popen(
            [sys.executable, "-m", "runs.isolated", str(threads), "--serve", "--parent", str(os.getpid())],
            env=env, text=True, bufsize=1, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr,
        )

    def call(self, job: dict) -> dict:
        """The job's result; PipelineError for a one-line failure (the child stays usable);
        RuntimeError when the child died or answered nothing (it is then unusable)."""
        try:
            self.process.stdin.write(json.dumps(job) + "\n")
            self.process.stdin.flush()
        except OSError:
            pass  # the child is gone: reported below
        else:
            for line in self.process.stdout:
                if line.startswith(RESULT):
                    return json.loads(line[len(RESULT):])
                if line.startswith(FAILURE):
                    raise PipelineError(line[len(FAILURE):].rstrip("\n"))
        code = self.process.wait()
        self.stderr.seek(0)
        tail = self.stderr.read()[-3000:]
        raise RuntimeError(f"the {job['job']} process ended with code {code}:\n{tail}")

    def close(self) -> None:
        if self.process.poll() is None:
            try:
                self.process.stdin.close()  # the child's loop ends at end of input
                self.process.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                self.process.kill()
                self.process.wait()
        self.stderr.close()


_IDLE: list[_Worker] = []
_SET_BY_LIBRARIES = ("TORCHINDUCTOR_", "KMP_")
_LOCK = threading.Lock()


def _child(job: dict, threads: int) -> dict:
    # A child sees the environment (MMNEWS_STORAGE, PREFECT_*, ...) and folder it started in.
    # Some libraries set variables of their own on first use (torch: TORCHINDUCTOR_CACHE_DIR);
    # those are left out of the key, so they do not end every reuse.
    env = tuple(sorted((k, v) for k, v in os.environ.items() if not k.startswith(_SET_BY_LIBRARIES)))
    key = (threads, os.getcwd(), env)
    with _LOCK:
        worker = next((w for w in _IDLE if w.key == key and w.owner is threading.current_thread()
                       and w.process.poll() is None), None)
        if worker is not None:
            _IDLE.remove(worker)
    worker = worker or _Worker(threads, key)
    try:
        return worker.call(job)
    except PipelineError:
        raise  # a one-line failure: the child answered and serves the next job
    except BaseException:
        worker.close()
        worker = None
        raise
    finally:
        if worker is not None:
            with _LOCK:
                _IDLE.append(worker)


def close_idle() -> None:
    """Stop every idle child (each exits at the end of its input)."""
    with _LOCK:
        workers = list(_IDLE)
        _IDLE.clear()
    for worker in workers:
        worker.close()


atexit.register(close_idle)


_WORKSPACES: dict = {}


def _run(job: dict) -> dict:
    if job["job"] == "rank":
        from runs.rank import run_rank
        from runs.workspace import Workspace

        # One workspace for the child's life (the jobs of one comparison, see close_idle): each
        # dataset's files are read once per process, as in the parent, not once per run.
        params = RankParams.model_validate(job["params"])
        key = str(params.storage)
        if key not in _WORKSPACES:
            _WORKSPACES[key] = Workspace(params.storage)
        return asdict(run_rank(params, _WORKSPACES[key]))
    from runs.pretrain import ensure_pretrained

    images = Path(job["images"]) if job["images"] else None
    return {"folder": str(ensure_pretrained(job["kind"], Path(job["data"]), images, job["storage"], progress=False))}


def main(argv: Sequence[str] | None = None) -> int:
    """The child: jobs as JSON lines on stdin (one job, or with `--serve` one per line until the
    input ends); each job's result (or its one-line error) on a stdout line of its own."""
    from storage.errors import as_pipeline_error

    args = list(sys.argv[1:] if argv is None else argv)
    if "--parent" in args and sys.platform.startswith("linux"):
        die_with_parent(int(args[args.index("--parent") + 1]))
    threads = int(args[0]) if args and args[0].isdigit() else 1
    import torch

    torch.set_num_threads(threads)
    lines = sys.stdin if "--serve" in args else [sys.stdin.read()]
    for line in lines:
        if not line.strip():
            continue
        try:
            result = _run(json.loads(line))
        except Exception as err:  # noqa: BLE001 - reported to the parent, one line where it can be
            friendly = as_pipeline_error(err)
            if friendly is None:
                raise
            print(FAILURE + str(friendly).replace("\n", " "), flush=True)
            if "--serve" not in args:
                return 1
            continue
        print(RESULT + json.dumps(result, default=str), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
