"""prefect.yaml: its entrypoints and defaults (fast), then end to end (slow): a real server on
127.0.0.1, a process worker, `prefect deploy --all` and `prefect deployment run
'compare/default' --watch` on the tiny world, exactly the commands of docs/deployments.md.
Every process the slow test starts is stopped by its id."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PREFECT = [sys.executable, "-m", "prefect"]
POOL = "mmnews"
REPORT = "deployed-tiny"
# The compare run, kept cheap: one ranker, two sources, one baseline, few resamples.
PARAMS = {"scale": "tiny", "text": "bert", "image": "vit", "rankers": ["lightgbm"], "sources": ["text", "hadamard"],
          "baselines": ["random"],
          "n_boot": 100, "name": REPORT, "progress": False}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tail(path: Path, n: int = 3000) -> str:
    return path.read_text(errors="replace")[-n:] if path.is_file() else ""


def get_json(url: str, body: dict | None = None) -> object:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # a member exists but is not ours to signal
        return True
    return True


class Processes:
    """Background processes of this test, each the leader of its own process group, stopped
    in reverse order by pid: the listed signals with a grace period each, then SIGKILL to
    what is left of its group (a worker's flow-run child shares the worker's group)."""

    def __init__(self, logs: Path, env: dict[str, str]):
        self.logs, self.env = logs, env
        self.started: list[tuple[subprocess.Popen, tuple[tuple[signal.Signals, float], ...]]] = []

    def start(self, name: str, args: list[str], stop: tuple[tuple[signal.Signals, float], ...]) -> subprocess.Popen:
        log = (self.logs / f"{name}.log").open("wb")
        proc = subprocess.Popen(args, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()  # the child holds its own copy
        self.started.append((proc, stop))
        return proc

    def stop_all(self) -> list[int]:
        """Stop everything; return the pids (process groups) still alive afterwards."""
        for proc, steps in reversed(self.started):
            for sig, grace in steps:
                if proc.poll() is not None:
                    break
                proc.send_signal(sig)
                try:
                    proc.wait(timeout=grace)
                except subprocess.TimeoutExpired:
                    pass
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
            if group_alive(proc.pid):
                os.killpg(proc.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        alive = [p.pid for p, _ in self.started]
        while True:  # killed members may take a moment to be reaped
            alive = [pid for pid in alive if group_alive(pid)]
            if not alive or time.monotonic() > deadline:
                return alive
            time.sleep(0.1)


def prefect(args: list[str], env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(PREFECT + args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_prefect_yaml_deploys_the_three_flows_of_flows_deployments():
    import yaml
    from prefect import Flow

    import flows.compare
    import flows.extract
    import flows.rank

    # Importing the flow modules builds no flow; only flows/deployments.py does.
    modules = {"extract": flows.extract, "rank": flows.rank, "compare": flows.compare}
    assert not [m for m in modules.values() if any(isinstance(v, Flow) for v in vars(m).values())]
    import flows.deployments

    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    assert not spec.get("build") and not spec.get("push") and "pull" not in spec  # see prefect.yaml
    params = {"extract": flows.extract.ExtractParams, "rank": flows.rank.RankParams, "compare": flows.compare.CompareParams}
    seen = []
    for deployment in spec["deployments"]:
        path, name = deployment["entrypoint"].split(":")
        flow = getattr(flows.deployments, name)
        assert path == "flows/deployments.py" and isinstance(flow, Flow) and flow.name == name
        assert deployment["work_pool"]["name"] == POOL
        params[name].model_validate(deployment["parameters"]["params"])  # defaults the flow accepts
        seen.append(f"{flow.name}/{deployment['name']}")
    assert sorted(seen) == ["compare/default", "extract/default", "rank/default"]


@pytest.mark.slow
def test_deploy_and_run_compare_on_a_process_worker(tmp_path):
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    storage = tmp_path / "storage"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        PREFECT_HOME=str(tmp_path / "prefect-home"), PREFECT_API_URL=api, PREFECT_CLI_PROMPT="false",
        PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1", PREFECT_WORKER_QUERY_SECONDS="2",
        MMNEWS_STORAGE=str(storage),
    )
    procs = Processes(tmp_path, env)
    try:
        server = procs.start("server", PREFECT + ["server", "start", "--host", "127.0.0.1", "--port", str(port)],
                             stop=((signal.SIGTERM, 15), (signal.SIGINT, 5)))
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, f"the server exited with {server.returncode}:\n{tail(tmp_path / 'server.log')}"
            try:
                if get_json(f"{api}/health") is True:
                    break
            except (urllib.error.URLError, OSError):
                pass
            assert time.monotonic() < deadline, f"no /api/health after 120 s:\n{tail(tmp_path / 'server.log')}"
            time.sleep(0.25)

        done = prefect(["work-pool", "create", POOL, "--type", "process"], env)
        assert done.returncode == 0, done.stdout + done.stderr
        # The worker only needs the pool; it boots while the flows are deployed.
        worker = procs.start("worker", PREFECT + ["worker", "start", "--pool", POOL],
                             stop=((signal.SIGTERM, 2), (signal.SIGINT, 15)))
        done = prefect(["deploy", "--all", "--no-prompt"], env)
        assert done.returncode == 0, done.stdout + done.stderr
        deployments = get_json(f"{api}/deployments/filter", {})
        assert sorted(f"{d['name']}@{d['work_pool_name']}" for d in deployments) == [f"default@{POOL}"] * 3
        assert all(d["pull_steps"] == [{"prefect.deployments.steps.set_working_directory": {"directory": str(ROOT)}}]
                   for d in deployments)

        # A combination no ranker trains on is refused by the server itself: no flow run exists.
        bad = {**PARAMS, "sources": ["text", "concat"]}
        refused = prefect(["deployment", "run", "compare/default", "--param", f"params={json.dumps(bad)}"], env)
        assert refused.returncode != 0 and "concat" in refused.stdout + refused.stderr, refused.stdout + refused.stderr
        assert get_json(f"{api}/flow_runs/filter", {}) == []

        run = prefect(["deployment", "run", "compare/default", "--param", f"params={json.dumps(PARAMS)}",
                       "--watch", "--watch-timeout", "240"], env, timeout=300)
        output = run.stdout + run.stderr
        assert worker.poll() is None, f"the worker died:\n{tail(tmp_path / 'worker.log')}"
        assert run.returncode == 0, f"{output}\nworker log:\n{tail(tmp_path / 'worker.log')}"
        flow_run_id = next(line.split("UUID:")[1].strip() for line in output.splitlines() if "UUID:" in line)
        flow_run = get_json(f"{api}/flow_runs/{flow_run_id}")
        assert flow_run["state"]["type"] == "COMPLETED" and flow_run["state"]["name"] == "Completed"
        assert flow_run["parameters"]["params"]["name"] == REPORT
        artifacts = get_json(f"{api}/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [flow_run_id]}}})
        assert {"comparison-report", "comparison-metrics"} <= {a["key"] for a in artifacts}

        folder = storage / "reports" / REPORT
        for name in ("report.md", "report.html", "metrics.json"):
            assert (folder / name).is_file() and (folder / name).stat().st_size > 0, name
        runs = [r["name"] for r in json.loads((folder / "metrics.json").read_text())["runs"]]
        assert runs == ["lightgbm · text", "lightgbm · text+image (hadamard)", "random"]
    finally:
        alive = procs.stop_all()
    assert not alive, f"process groups still alive after stopping: {alive}"
