"""Shared fixtures: every test writes under a temporary storage root."""

from __future__ import annotations

import pytest

from storage.paths import ENV_VAR


@pytest.fixture(autouse=True)
def _isolated_storage(tmp_path_factory, monkeypatch):
    root = tmp_path_factory.mktemp("storage")
    monkeypatch.setenv(ENV_VAR, str(root))
    yield root
