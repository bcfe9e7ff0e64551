"""`run_distributed(..., reuse=True)`: the same processes serve call after call, each call in a fresh
process group and environment; a failure ends them and the next call starts new ones."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

from viaduct.testing import run_distributed
from viaduct.testing.distributed import close_pools

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


def _sum_ranks(rank: int, world: int, leave_group: bool) -> tuple[int, float, str | None]:
    assert os.environ.get("LEFT_BEHIND") is None  # what the last call set is gone
    os.environ["LEFT_BEHIND"] = "1"
    dist.init_process_group("gloo")
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    if not leave_group:
        dist.destroy_process_group()
    return os.getpid(), float(t), None


def _fail_on_rank_1(rank: int, world: int) -> None:
    if rank == 1:
        raise RuntimeError("rank 1 gives up")


def test_kept_processes_serve_several_calls_and_a_failure_replaces_them() -> None:
    try:
        first = run_distributed(_sum_ranks, 2, True, reuse=True, all_ranks=True)
        # The first call left its process group up: the next one still forms its own.
        second = run_distributed(_sum_ranks, 2, False, reuse=True, all_ranks=True)
        assert [r[1] for r in first] == [r[1] for r in second] == [3.0, 3.0]
        assert [r[0] for r in first] == [r[0] for r in second]  # the same processes
        assert len({r[0] for r in first}) == 2

        with pytest.raises(RuntimeError, match="rank 1 failed:(.|\n)*rank 1 gives up"):
            run_distributed(_fail_on_rank_1, 2, reuse=True, timeout=60)
        third = run_distributed(_sum_ranks, 2, False, reuse=True, all_ranks=True)
        assert [r[1] for r in third] == [3.0, 3.0]
        assert not {r[0] for r in third} & {r[0] for r in first}  # new processes after the failure
    finally:
        close_pools()
