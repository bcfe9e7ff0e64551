"""Test-wide settings: built-in corpora are cached in one temporary directory per test session, tests
marked `distributed` (several processes) also count as `slow`, and tests marked `gpu` are skipped where
CUDA is not available.

Tiers: `pytest -q` runs everything; `pytest -q -m "not slow"` is the fast tier for the inner loop.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator

import pytest


@pytest.hookimpl(tryfirst=True)  # before `-m` selects by marker
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import torch

    for item in items:
        if item.get_closest_marker("distributed") is not None and item.get_closest_marker("slow") is None:
            item.add_marker(pytest.mark.slow)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True, scope="session")
def _viaduct_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    # Subprocesses (the CLI tests) inherit it through the environment.
    os.environ.setdefault("VIADUCT_CACHE", str(tmp_path_factory.mktemp("viaduct-cache")))


@pytest.fixture(autouse=True, scope="module")
def _end_kept_processes() -> Iterator[None]:
    """Processes kept by `run_distributed(..., reuse=True)` serve one test module: its tests share
    their start-up, and no module sees what another left in them (or holds their memory)."""
    yield
    kept = sys.modules.get("viaduct.testing.distributed")
    if kept is not None:
        kept.close_pools()
