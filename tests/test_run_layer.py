"""The run layer and the flows' shell: data loaded once per comparison, the whole plan checked
before any server starts, the temporary Prefect server's life, a busy machine, loopback-only
servers, and names that must stay inside the storage root."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from pydantic import ValidationError

from runs.params import CompareParams, ExtractParams, RankParams

ROOT = Path(__file__).resolve().parents[1]
# Nothing listens here: a command that got as far as talking to Prefect would fail differently.
DEAD_API = "http://127.0.0.1:9/api"


def cli(module: str, *args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env={**os.environ, **(env or {})},
                          capture_output=True, text=True, timeout=timeout)


# ------------------------------------------------------------------------------ loaded once


def test_one_comparison_parses_each_file_once_and_fingerprints_each_catalogue_once(
        tiny_world, tmp_path, prefect_harness, monkeypatch):
    import rankers.data
    import storage.catalogue
    import storage.mind
    from flows.compare import build_flow

    parsed: Counter[str] = Counter()

    def counting(module, name: str):
        real = getattr(module, name)

        def wrapper(path, *args, **kwargs):
            parsed[str(Path(path).relative_to(tiny_world))] += 1
            return real(path, *args, **kwargs)

        monkeypatch.setattr(module, name, wrapper)

    counting(storage.catalogue, "read_news")
    counting(storage.mind, "read_news")
    counting(storage.mind, "read_behaviors")
    counting(rankers.data, "read_behaviors")
    fingerprints = []
    real_digest = storage.catalogue.Catalogue._digest
    monkeypatch.setattr(storage.catalogue.Catalogue, "_digest",
                        lambda self: fingerprints.append(self.name) or real_digest(self))

    # One job: every run in this process (with more, each run's process loads its data once).
    params = CompareParams(data=tiny_world, rankers=["lightgbm", "nrms"], sources=["text", "hadamard"], jobs=1, text="bert", image="vit", blip="blip", 
                           epochs=1, n_boot=100, storage=tmp_path, name="once", progress=False)
    result = build_flow()(params)
    assert len(result["report"].runs) == 7  # 2 rankers x 2 sources + 3 baselines
    news = {f"{s}/news.tsv" for s in ("train", "dev", "test")}
    assert {k for k in parsed if k.endswith("news.tsv")} == news
    assert all(parsed[f] == 1 for f in news), parsed
    # train and dev behaviors once each; test's never (the report reads dev only).
    assert {k: v for k, v in parsed.items() if k.endswith("behaviors.tsv")} == {
        "train/behaviors.tsv": 1, "dev/behaviors.tsv": 1}
    assert fingerprints == [tiny_world.name]


def test_a_workspace_hands_out_the_same_objects(tiny_world, tmp_path):
    from runs.workspace import Workspace

    ws = Workspace(tmp_path)
    first = ws.catalogue(tiny_world)
    assert ws.catalogue(str(tiny_world)) is first
    assert ws.impressions(tiny_world, "dev", first) is ws.impressions(tiny_world, "dev", first)
    assert ws.train_valid(tiny_world, first) is ws.train_valid(tiny_world, first)
    assert Workspace(tmp_path).catalogue(tiny_world) is not first  # a new run sees files anew
    assert ws.loads["catalogue"] == 1 and ws.loads["split"] == 2  # dev, and train under the carve


# ------------------------------------------------------------------------------ the plan


@pytest.mark.parametrize("module, args, expected", [
    ("flows.compare", ["--sources", "concat", "--rankers", "lightgbm"],
     "run 'lightgbm · text+image (concat)': --ranker lightgbm cannot train on --fusion concat"),
    ("flows.compare", ["--preset", "mtrec", "--rankers", "nrms"], "defines its own runs"),
    ("flows.compare", ["--image", "bert"], "--image: 'bert' is a text extractor"),
    ("flows.compare", ["--text", "bert:./no/such/checkpoint"], "cannot load text checkpoint './no/such/checkpoint'"),
    ("flows.compare", ["--data", "/no/such/mind"], "data folder /no/such/mind does not exist"),
    ("flows.compare", ["--name", "../../escape"], "--name '../../escape': is a path"),
    ("flows.rank", ["--ranker", "lightgbm", "--fusion", "gated", "--features", "bert,vit"],
     "--ranker lightgbm cannot train on --fusion gated"),
    ("flows.rank", ["--fusion", "hadamard"], "needs features for image; add vit"),
    ("flows.rank", ["--run-name", "/abs/path"], "--run-name '/abs/path': is a path"),
    ("flows.extract", ["--extractor", "vit:/no/such/dir"], "cannot load vision checkpoint '/no/such/dir'"),
    ("flows.extract", ["--titles", "/no/titles.tsv"], "titles file /no/titles.tsv does not exist"),
])
def test_a_bad_plan_is_one_line_before_any_server_starts(module, args, expected, tmp_path):
    done = cli(module, *args, "--storage", str(tmp_path), env={"PREFECT_API_URL": DEAD_API})
    assert done.returncode == 1, done.stderr
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("error: ") and "Traceback" not in done.stderr
    assert expected in done.stderr, done.stderr
    assert not (tmp_path / "reports").exists() and not (tmp_path.parent / "escape").exists()


def test_deployment_parameters_get_the_same_checks():
    with pytest.raises(ValidationError, match="cannot train on --fusion concat"):
        CompareParams.model_validate({"rankers": ["lightgbm"], "sources": ["concat"]})
    with pytest.raises(ValidationError, match="is a path"):
        CompareParams.model_validate({"name": "../../escape"})
    with pytest.raises(ValidationError, match="is a path"):
        RankParams.model_validate({"run_name": "/abs/path", "ranker": "random"})
    with pytest.raises(ValidationError, match="world_seed|extra|seed"):
        ExtractParams.model_validate({"world_seed": -1})
    # a parameter the command no longer takes (extract's old `seed`, now `world_seed`) is refused, not dropped
    with pytest.raises(ValidationError, match="extra_forbidden|Extra inputs"):
        ExtractParams.model_validate({"seed": 3})


@pytest.mark.parametrize("module", ["flows.compare", "flows.extract"])
def test_a_file_as_storage_root_is_one_line_before_any_server_starts(module, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    for root, expected in ((blocker, "is a file, not a folder"), (blocker / "below", f"lies under {blocker}, a file")):
        done = cli(module, "--storage", str(root), env={"PREFECT_API_URL": DEAD_API})
        assert done.returncode == 1, done.stderr
        assert done.stderr.count("\n") == 1 and done.stderr.startswith("error: ") and "Traceback" not in done.stderr
        assert expected in done.stderr, done.stderr


def test_the_schema_the_server_enforces_refuses_what_a_ranker_cannot_train_on():
    from prefect.utilities.callables import parameter_schema
    from prefect.utilities.schema_tools.validation import validate

    from flows.compare import build_flow

    schema = parameter_schema(build_flow()).model_dump_for_openapi()

    def accepted(params: dict) -> bool:
        try:
            validate({"params": params}, schema, raise_on_error=True)
        except Exception:  # noqa: BLE001 - Prefect's own validation error types
            return False
        return True

    assert not accepted({"rankers": ["lightgbm"], "sources": ["concat"]})
    assert not accepted({"sources": ["gated"]})  # the default rankers include lightgbm
    assert accepted({"rankers": ["nrms"], "sources": ["concat"]})
    assert accepted({"rankers": ["lightgbm"], "sources": ["text", "hadamard"]})
    assert not accepted({"rankers": ["nrms"], "sorces": ["text"]})  # a misspelt parameter


# ------------------------------------------------------------------------------ the server


def _uvicorn_children(pid: int) -> list:
    import psutil

    try:
        children = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    found = []
    for child in children:
        try:
            if "uvicorn" in " ".join(child.cmdline()):
                found.append(child)
        except psutil.Error:
            pass
    return found


def _without_prefect_api() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(OMP_NUM_THREADS="1", PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1")
    return env


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_a_terminated_command_leaves_no_server_running(tmp_path, sig):
    import psutil

    env = _without_prefect_api()
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    proc = subprocess.Popen([sys.executable, "-m", "flows.extract", "--scale", "tiny", "--extractor", "bert",
                             "--storage", str(tmp_path), "--no-progress"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        servers = []
        while not servers:
            assert proc.poll() is None, proc.stdout.read().decode()[-2000:]
            assert time.monotonic() < deadline, "no temporary server appeared"
            servers = _uvicorn_children(proc.pid)
            time.sleep(0.1)
        proc.send_signal(sig)
        proc.wait(timeout=60)
        gone, alive = psutil.wait_procs(servers, timeout=30)
        assert not alive, f"server processes left after {sig.name}: {[p.pid for p in alive]}"
        if sig == signal.SIGTERM:
            assert proc.returncode == 130 and "Traceback" not in proc.stdout.read().decode()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.mark.slow
def test_extraction_completes_beside_two_busy_processes(tmp_path):
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    try:
        env = _without_prefect_api()
        env["PREFECT_HOME"] = str(tmp_path / "prefect-home")
        done = subprocess.run([sys.executable, "-m", "flows.extract", "--scale", "tiny", "--extractor", "bert",
                               "--storage", str(tmp_path), "--no-progress"], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=900)
    finally:
        for p in busy:
            p.kill()
            p.wait()
    assert done.returncode == 0, done.stderr[-3000:]
    assert "bert:tiny" in done.stdout and list((tmp_path / "features").glob("*bert-tiny__frozen.h5"))


def test_a_server_that_does_not_answer_is_one_line(monkeypatch):
    from flows import server
    from storage.errors import PipelineError

    started = server.TemporaryServer()
    monkeypatch.setattr(server.TemporaryServer, "_healthy", lambda self: False)
    with pytest.raises(PipelineError, match=r"did not answer within 2 s .*prefect server start.*PREFECT_API_URL"):
        started.start(timeout=2)
    started.stop()
    assert started.process.poll() is not None


def test_the_server_waits_as_long_as_the_user_says(monkeypatch):
    """A generous default for a loaded machine; PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS
    (Prefect's own name for it) overrides it, and a value that is not a number is one line."""
    from flows import server
    from storage.errors import PipelineError

    monkeypatch.delenv(server.TIMEOUT_ENV, raising=False)
    assert server.startup_timeout() == server.STARTUP_TIMEOUT_S >= 120
    monkeypatch.setenv(server.TIMEOUT_ENV, "900")
    assert server.startup_timeout() == 900
    monkeypatch.setenv(server.TIMEOUT_ENV, "soon")
    with pytest.raises(PipelineError, match="PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS='soon' is not a number"):
        server.startup_timeout()


# ------------------------------------------------------------------------------ Dask, loopback only


@pytest.mark.slow
def test_the_local_dask_cluster_listens_on_loopback_only():
    import psutil
    from distributed import LocalCluster

    from flows.extract import local_cluster_kwargs

    with LocalCluster(**local_cluster_kwargs(2, env={})) as cluster:
        pids = {os.getpid()} | {p.pid for p in psutil.Process().children(recursive=True)}
        listening = [c.laddr for c in psutil.net_connections(kind="inet")
                     if c.status == psutil.CONN_LISTEN and c.pid in pids]
        assert cluster.scheduler_address.startswith("tcp://127.0.0.1:")
        assert cluster.dashboard_link is None or "127.0.0.1" in cluster.dashboard_link
        assert listening and all(addr.ip in ("127.0.0.1", "::1") for addr in listening), listening


# ------------------------------------------------------------------------------ covers


def test_image_runs_refuse_an_empty_images_folder(tiny_world, tmp_path):
    from runs.extract import extract_rows
    from runs.rank import run_rank
    from runs.workspace import Workspace
    from storage.errors import PipelineError

    empty = tmp_path / "no-covers"
    empty.mkdir()
    params = ExtractParams(data=tiny_world, images=empty, extractors=["vit"], storage=tmp_path, progress=False)
    with pytest.raises(PipelineError, match="no news of tiny has a cover image.*--allow-no-images"):
        extract_rows(params, Workspace(tmp_path), "vit")
    assert not list((tmp_path / "features").glob("*.h5"))
    rank = RankParams(data=tiny_world, images=empty, ranker="lightgbm", fusion="hadamard", features=["bert", "vit"],
                      storage=tmp_path, progress=False)
    with pytest.raises(PipelineError, match="no news of tiny has a cover image"):
        run_rank(rank)
    # Text runs do not care, and the user may insist.
    text = extract_rows(params.model_copy(update={"extractors": ["bert"]}), Workspace(tmp_path), "bert")
    assert text["rows"] > 0 and "cover_warning" not in text


# ------------------------------------------------------------------------------ runs side by side


def test_a_run_in_a_process_of_its_own_equals_the_run_in_this_one(tiny_world, tmp_path, monkeypatch):
    from runs import isolated
    from runs.isolated import run_isolated
    from runs.rank import run_rank

    isolated.close_idle()
    here = {}
    for ranker, fusion, features in (("nrms", "hadamard", ["bert", "vit"]), ("lightgbm", "text", ["bert"])):
        params = RankParams(data=tiny_world, ranker=ranker, fusion=fusion, features=features, epochs=2,
                            storage=tmp_path, progress=False)
        here[ranker] = (params, run_rank(params))
        there = run_isolated(params.model_copy(update={"run_name": f"{ranker}-isolated"}), threads=1)
        assert there.dev_metrics == here[ranker][1].dev_metrics and there.folder.endswith(f"{ranker}-isolated")
    # One child served both runs, and serves a third with the same result as a fresh one.
    [child] = isolated._IDLE
    params, expected = here["nrms"]
    again = run_isolated(params.model_copy(update={"run_name": "nrms-again"}), threads=1)
    assert again.dev_metrics == expected.dev_metrics and isolated._IDLE == [child]
    # A child is reused only in the environment it started in (MMNEWS_STORAGE, PREFECT_*, ...).
    monkeypatch.setenv("MMNEWS_SOMETHING", "else")
    run_isolated(params.model_copy(update={"run_name": "nrms-other-env"}), threads=1)
    assert len(isolated._IDLE) == 2 and child in isolated._IDLE
    isolated.close_idle()
    assert isolated._IDLE == [] and child.process.poll() == 0


def test_a_failing_run_in_its_own_process_is_one_line(tiny_world, tmp_path):
    from runs.isolated import run_isolated
    from storage.errors import PipelineError

    params = RankParams(data=tiny_world, ranker="lightgbm", features=["bert@finetuned"], storage=tmp_path,
                        progress=False)
    with pytest.raises(PipelineError, match=r"^no fine-tuned store of bert .*--finetune --features bert\)"):
        run_isolated(params)


def test_a_comparison_over_seeds_reports_every_seed(tiny_world, tmp_path, prefect_harness):
    import json

    from flows.compare import build_flow

    params = CompareParams(data=tiny_world, rankers=["nrms", "lightgbm"], sources=["text", "hadamard"], baselines=["popularity"], text="bert", image="vit", blip="blip", 
                           seeds=2, seed=3, jobs=2, epochs=2, n_boot=100, storage=tmp_path, name="seeds", lgbm_bagging=1.0,
                           progress=False)
    result = build_flow()(params)
    report = json.loads((Path(result["folder"]) / "metrics.json").read_text())
    runs = {r["name"]: r for r in report["runs"]}
    for name in ("nrms · text", "nrms · text+image (hadamard)"):
        seeds = runs[name]["seeds"]
        assert [s["seed"] for s in seeds] == [3, 4]
        assert runs[name]["metrics"]["auc"]["value"] == pytest.approx(sum(s["metrics"]["auc"] for s in seeds) / 2)
        for s in (3, 4):  # each seed trained into a folder of its own
            assert (tmp_path / "models" / f"tiny__nrms__{name.split(' · ')[1].split(' ')[0].replace('text+image', 'hadamard')}__bert{'+vit' if 'image' in name else ''}__seed{s}").is_dir()
    assert runs["popularity"].get("seeds") is None  # a deterministic baseline runs once
    assert "two-level bootstrap" in " ".join(report["notes"])
    # LightGBM without bagging draws nothing at random: the report says its seeds changed nothing,
    # and says so of no NRMS run (their seeds differ).
    assert runs["lightgbm · text"]["seeds"][0]["metrics"] == runs["lightgbm · text"]["seeds"][1]["metrics"]
    (same,) = [n for n in report["notes"] if n.startswith("Seeds that changed nothing")]
    assert "lightgbm · text" in same and "nrms" not in same
    assert runs["nrms · text"]["seeds"][0]["metrics"] != runs["nrms · text"]["seeds"][1]["metrics"]


def test_pretrained_checkpoints_resolve_to_their_folder_and_are_reused(tiny_world, tmp_path):
    from runs.pretrain import ensure_pretrained, folder_of, kinds_needed
    from runs.rank import run_rank

    assert kinds_needed(["blip:pretrained", "vit", "bert:x"]) == ["bert", "blip"]  # BLIP starts from the BERT
    assert folder_of("bert", tiny_world, None, tmp_path) is not None
    with pytest.raises(Exception, match="not pre-trained yet; run python -m flows.pretrain"):
        run_rank(RankParams(data=tiny_world, ranker="lightgbm", features=["bert:pretrained"], storage=tmp_path,
                            progress=False))
    folder = ensure_pretrained("bert", tiny_world, None, tmp_path, progress=False)
    assert folder.parent == tmp_path / "models" / "pretrained" and (folder / "model.safetensors").is_file()
    mtime = (folder / "model.safetensors").stat().st_mtime_ns
    assert ensure_pretrained("bert", tiny_world, None, tmp_path, progress=False) == folder  # cached
    assert (folder / "model.safetensors").stat().st_mtime_ns == mtime
    outcome = run_rank(RankParams(data=tiny_world, ranker="lightgbm", features=["bert:pretrained"], storage=tmp_path,
                                  progress=False))
    assert outcome.stores["text"]["extractor"] == f"bert:{folder}"
    assert Path(outcome.folder).name == "tiny__lightgbm__text__bert-pretrained"


# ------------------------------------------------------------------------------ the presence control


def test_the_text_plus_cover_arm_knows_only_whether_there_is_a_cover(tiny_world, tmp_path):
    import json


    from runs.rank import run_rank

    def run(ranker, fusion, features):
        params = RankParams(data=tiny_world, ranker=ranker, fusion=fusion, features=features, epochs=1,
                            storage=tmp_path, progress=False)
        outcome = run_rank(params)
        return outcome, Path(outcome.folder)

    text, folder = run("lightgbm", "text", ["bert"])
    assert "has_cover" not in json.loads((folder / "config.json").read_text())["feature_names"]
    cover, folder = run("lightgbm", "text+cover", ["bert"])
    names = json.loads((folder / "config.json").read_text())["feature_names"]
    assert "has_cover" in names and not any(n.startswith("image") for n in names)
    assert set(cover.stores) == {"text"}  # the flag comes from the catalogue, not from a store
    nrms, folder = run("nrms", "text+cover", ["bert"])
    from safetensors.numpy import load_file

    weights = load_file(str(folder / "model.safetensors"))
    assert any(k.startswith("news.cover.") for k in weights) and not any("image" in k for k in weights)


def test_content_runs_are_paired_with_the_presence_control():
    from runs.compare import grid_reference

    sources = ["text", "text+cover", "image", "hadamard", "gated", "blip"]
    assert {s: grid_reference(s, sources) for s in sources} == {
        "text": None, "text+cover": "text", "image": "text", "hadamard": "text+cover", "gated": "text+cover",
        "blip": "text"}
    assert grid_reference("hadamard", ["text", "hadamard"]) == "text"  # no control: as before


def test_the_report_answers_the_two_questions_content_first():
    from runs.render import headline, question_sentences
    from runs.report import Report

    def values(v):
        return {m: {"value": v, "lo": v - 0.01, "hi": v + 0.01} for m in ("auc", "mrr", "ndcg@5", "ndcg@10")}

    def delta(d, half=0.01):
        return {m: {"diff": d, "lo": d - half, "hi": d + half, "p": 0.5} for m in ("auc", "mrr", "ndcg@5", "ndcg@10")}

    def question(kind, run, ref, d, answer):
        return {"kind": kind, "ranker": "nrms", "run": run, "reference": ref, "auc": delta(d)["auc"], "answer": answer}

    runs = [{"name": n, "ranker": "nrms", "sources": s, "metrics": values(0.6), "impressions": 100}
            for n, s in (("text", ["text"]), ("text+cover", ["text", "cover"]), ("hadamard", ["text", "image"]))]
    report = Report.parse({
        "title": "t", "created": "2026-12-02", "dataset": {"name": "d"}, "reference": "text", "runs": runs,
        "references": {"text+cover": "text", "hadamard": "text+cover"},
        "paired": {"text+cover": delta(0.08), "hadamard": delta(0.0, 0.02)},
        "questions": [question("content", "hadamard", "text+cover", 0.0, "no"),
                      question("presence", "text+cover", "text", 0.08, "yes")],
    }).model_dump()
    first, tone = headline(report)
    assert first.startswith("Does the cover's content help") and "Not significantly for nrms" in first
    assert tone == "none"
    assert question_sentences(report)[1][0].startswith("Does having a cover help? Yes for nrms")


# ----------------------------------------------------------------------------- flows.common.run_graph


@pytest.fixture(scope="module")
def graph_task(prefect_harness):
    """(run, step): `step` a task that records when it ran, sleeps and fails when asked;
    `run(jobs_of, slots)` runs the graph `jobs_of(step)` in a flow, its states and spans."""
    import threading
    import time

    from prefect import flow, task
    from prefect.cache_policies import NO_CACHE

    log: list = []
    threads: dict = {}
    lock = threading.Lock()

    @task(cache_policy=NO_CACHE)
    def step(name: str, seconds: float, fail: bool = False):
        start = time.monotonic()
        time.sleep(seconds)
        with lock:
            log.append((name, start, time.monotonic()))
            threads[name] = threading.current_thread()
        if fail:
            raise ValueError(f"{name} failed")
        return name

    def run(schedule):
        log.clear()
        threads.clear()
        caller: dict = {}

        def body():
            caller["thread"] = threading.current_thread()
            return schedule(step)

        result = flow(body, name="graph")()
        run.here = {name: thread is caller["thread"] for name, thread in threads.items()}
        return result, {name: (start, end) for name, start, end in log}

    return run


def _overlap(a, b) -> bool:
    return a[0] < b[1] and b[0] < a[1]


def test_a_job_starts_once_what_it_needs_is_done_and_not_before(graph_task):
    from flows.common import Job, run_graph

    states, spans = graph_task(lambda step: run_graph([
        Job("slow", step, ("slow", 3.0)),
        Job("fast", step, ("fast", 0.1)),
        Job("after-fast", step, ("after-fast", 0.1), after=("fast",)),
        Job("after-both", step, ("after-both", 0.05), after=("slow", "after-fast")),
    ], 2))
    assert all(state.is_completed() for state in states.values())
    assert spans["after-fast"][0] >= spans["fast"][1]
    assert spans["after-both"][0] >= max(spans["slow"][1], spans["after-fast"][1])
    assert _overlap(spans["after-fast"], spans["slow"]), spans  # what needs only the fast job does not wait for the slow one


def test_slots_and_exclusive_jobs_bound_what_runs_at_once(graph_task):
    from flows.common import Job, run_graph

    states, spans = graph_task(lambda step: run_graph([
        Job("a", step, ("a", 2.0), exclusive="here"),
        Job("b", step, ("b", 0.1), exclusive="here"),
        Job("c", step, ("c", 0.1)),
        Job("d", step, ("d", 0.1)),
    ], 2))
    assert all(state.is_completed() for state in states.values())
    assert not _overlap(spans["a"], spans["b"])
    for t in {s for span in spans.values() for s in span}:
        assert sum(start <= t < end for start, end in spans.values()) <= 2
    assert _overlap(spans["a"], spans["c"]) and _overlap(spans["a"], spans["d"])  # b waited, the slot did not


def test_a_failed_prerequisite_skips_its_dependents_and_a_fatal_one_stops_the_graph(graph_task):
    from flows.common import Job, run_graph

    states, spans = graph_task(lambda step: run_graph([
        Job("broken", step, ("broken", 0.05, True)),
        Job("needs-broken", step, ("needs-broken", 0.05), after=("broken",)),
        Job("independent", step, ("independent", 0.05)),
    ], 1))
    assert states["broken"].is_failed() and "broken failed" in states["broken"].message
    assert states["needs-broken"] is None and "needs-broken" not in spans
    assert states["independent"].is_completed()  # a failure does not cancel the others

    states, spans = graph_task(lambda step: run_graph([
        Job("fatal", step, ("fatal", 0.05, True), fatal=True),
        Job("later", step, ("later", 0.05)),
    ], 1))
    assert states["fatal"].is_failed() and states["later"] is None and "later" not in spans


def test_a_job_marked_here_runs_in_the_calling_thread(graph_task):
    """In-process work (an extraction) runs in the flow's own thread, where Ctrl+C and SIGTERM
    interrupt it; a submitted task's thread would run on to its end."""
    from flows.common import Job, run_graph

    states, spans = graph_task(lambda step: run_graph([
        Job("child", step, ("child", 1.0)),
        Job("here", step, ("here", 0.1), here=True),
        Job("after", step, ("after", 0.05), after=("here",)),
    ], 2))
    assert all(state.is_completed() for state in states.values())
    assert graph_task.here == {"child": False, "here": True, "after": False}
    assert _overlap(spans["here"], spans["child"]) and spans["after"][0] >= spans["here"][1]


def test_run_bounded_gives_the_states_in_the_calls_order(graph_task):
    from flows.common import run_bounded

    states, spans = graph_task(lambda step: run_bounded(step, [(f"j{i}", 0.4 * (2 - i)) for i in range(3)], 3))
    assert [state.result() for state in states] == ["j0", "j1", "j2"]
    assert spans["j2"][1] < spans["j0"][1]  # they ran at once, the last call first done
