"""Exact comparison of nested training state (state dicts, snapshots) for bitwise-resume tests."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch


def assert_identical(a: Any, b: Any, where: str = "") -> None:
    """Assert that `a` and `b` are equal to the bit: tensors of the same dtype with equal values, dicts
    with the same keys, lists and tuples of the same length, and equal plain values, recursively.

    The assertion message is the path of the first difference (``.optimizer.state.w[0]``).
    """
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            assert_identical(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def checkpoint_tensors(iteration_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a saved checkpoint iteration (`<save>/iter_NNNNNNN`), read in one process
    through viaduct's checked reader: what tests compare across runs."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from viaduct.training.checkpoint.dcp_index import SafeFileSystemReader, read_index

    meta = read_index(iteration_dir)
    out = {
        k: torch.empty(m.size, dtype=m.properties.dtype)
        for k, m in meta.state_dict_metadata.items()
        if isinstance(m, TensorStorageMetadata)
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(out, storage_reader=SafeFileSystemReader(iteration_dir), no_dist=True)
    return out
