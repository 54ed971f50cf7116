"""Shared fixtures: every test writes under a temporary storage root."""

from __future__ import annotations

import pytest

from storage.paths import ENV_VAR

# The files whose tests take longest (pytest --durations=0, 2026-12-03: these 15 hold 95% of the
# suite's time), longest first. `make test` hands whole files to the two workers in collection
# order (--dist loadfile --no-loadscope-reorder), so the long ones start first and the workers
# finish together; xdist's own order (files with the most tests first) left the 54 s deployment
# test and the 45 s calibration test to run last, on one worker, while the other waited.
LONGEST_FIRST = (
    "test_run_layer.py", "test_shards.py", "test_deployments.py", "test_finetune.py", "test_calibration.py",
    "test_finetune_ddp.py", "test_extract_flow.py", "test_rank_flow.py", "test_presets.py", "test_pretrain.py",
    "test_ddp.py", "test_extract_engine.py", "test_checkpoints.py", "test_security.py", "test_finetune_flow.py",
)


def pytest_collection_modifyitems(config, items):
    """Files in LONGEST_FIRST order, then the rest; each file's own tests keep their order."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


@pytest.fixture(autouse=True)
def _isolated_storage(tmp_path_factory, monkeypatch):
    root = tmp_path_factory.mktemp("storage")
    monkeypatch.setenv(ENV_VAR, str(root))
    yield root


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """Tiny models on 2 shared cores: one torch thread is faster (spinning OpenMP threads made
    a ranker epoch 8x slower, see rankers.train.cpu_threads) and keeps runs bit-reproducible."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def prefect_harness(tmp_path_factory):
    """One temporary Prefect server and database for the flow tests of this session."""
    import os

    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ["PREFECT_HOME"] = str(tmp_path_factory.mktemp("prefect-home"))
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory):
    """The tiny synthetic world (seed 0), generated once per session; tests only read it."""
    from storage.synthetic import generate_world

    out = tmp_path_factory.mktemp("world") / "tiny"
    generate_world(out, scale="tiny", seed=0)
    return out
