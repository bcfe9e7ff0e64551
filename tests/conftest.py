"""Test-wide settings: built-in corpora are cached in one temporary directory per test session."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(autouse=True, scope="session")
def _viaduct_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    # Subprocesses (the CLI tests) inherit it through the environment.
    os.environ.setdefault("VIADUCT_CACHE", str(tmp_path_factory.mktemp("viaduct-cache")))
