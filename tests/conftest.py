"""Shared fixtures: every test writes under a temporary storage root."""

from __future__ import annotations

import pytest

from storage.paths import ENV_VAR


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
