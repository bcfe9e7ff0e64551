"""`run_distributed(fn, world_size)`: spawn real processes that form a process group, with a hard timeout.

Each process gets the torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT), so
code under test initializes exactly as it would under `torchrun`. `fn(rank, world_size, *args)`
runs in every process; what rank 0 returns (picklable) comes back. A failure on any rank raises
here with that rank's traceback; a hang is killed after `timeout` seconds.
"""

from __future__ import annotations

import atexit
import os
import pickle
import signal
import socket
import subprocess
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port that was free a moment ago (for MASTER_PORT)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_viaduct(
    *args: str, cwd: str | os.PathLike[str], timeout: float = 240.0
) -> subprocess.CompletedProcess[str]:
    """Run `viaduct ARGS` in a fresh Python process, as a user would; output is captured."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "viaduct", *args]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


def torchrun_viaduct(
    nproc: int, *args: str, cwd: str | os.PathLike[str], timeout: float = 240.0
) -> subprocess.CompletedProcess[str]:
    """Run `viaduct ARGS` under a real torchrun launch of `nproc` local processes; output is captured.

    One intra-op thread per process, so N ranks on a small CPU do not oversubscribe it.
    """
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc)]
    command += ["--master-port", str(free_port()), "-m", "viaduct", *args]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


def torchrun_nodes(
    nnodes: int, nproc: int, *args: str, cwd: str | os.PathLike[str], timeout: float = 300.0
) -> list[subprocess.CompletedProcess[str]]:
    """Run `viaduct ARGS` as a job of `nnodes` nodes × `nproc` processes on this machine: one torchrun
    agent per "node", all meeting at one c10d rendezvous, as on a cluster. Returns each agent's result."""
    endpoint = f"127.0.0.1:{free_port()}"
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nnodes)]
    command += ["--nproc-per-node", str(nproc), "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint]
    command += ["--rdzv-id", f"viaduct-test-{os.getpid()}", "-m", "viaduct", *args]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    agents = [
        subprocess.Popen(
            command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for _ in range(nnodes)
    ]
    results = []
    try:
        for agent in agents:
            out, _ = agent.communicate(timeout=timeout)
            results.append(subprocess.CompletedProcess(command, agent.returncode, out, ""))
    finally:
        for agent in agents:
            if agent.poll() is None:
                agent.kill()
                agent.communicate()
    return results


def run_torchrun_job(
    script: Path,
    *args: str,
    nproc: int = 2,
    launcher_args: tuple[str, ...] = (),
    cwd: Path,
    timeout: float = 240,
) -> subprocess.CompletedProcess[str]:
    """`python -m torch.distributed.run --nproc-per-node NPROC [launcher_args] SCRIPT ARGS` on a free
    port, one thread per rank, this checkout's viaduct first on the path; stdout and stderr captured.

    The job runs in a session of its own: on a timeout the agent and its workers are killed together
    (killing only the agent would leave the workers running), and the test fails with the job's
    last output."""
    import pytest

    src = str(Path(__file__).resolve().parents[2])
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), *launcher_args]
    command += ["--master-port", str(free_port()), str(script), *args]
    env = {**os.environ, "PYTHONPATH": src, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=cwd,
        start_new_session=True,
    )  # fmt: skip
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"the torchrun job did not finish in {timeout:.0f} s:\n{(out + err)[-6000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _torchrun_env(rank: int, world_size: int, port: int) -> dict[str, str]:
    """The variables torchrun gives a rank of a one-node job."""
    return {
        "RANK": str(rank),
        "WORLD_SIZE": str(world_size),
        "LOCAL_RANK": str(rank),
        "LOCAL_WORLD_SIZE": str(world_size),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
    }


def _worker(rank: int, world_size: int, port: int, fn: Callable[..., Any], args: tuple, queue: Any) -> None:
    os.environ.update(_torchrun_env(rank, world_size, port))
    try:
        result = fn(rank, world_size, *args)
        # Plain pickle bytes: tensors sent through the queue as shared memory would vanish with this
        # process before the parent reads them.
        queue.put((rank, "ok", pickle.dumps(result)))
    except BaseException:  # report every failure, including SystemExit, to the parent
        queue.put((rank, "error", traceback.format_exc()))
        raise SystemExit(1) from None


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 120.0,
    all_ranks: bool = False,
    reuse: bool = False,
) -> Any:
    """Run `fn(rank, world_size, *args)` on `world_size` spawned processes; return rank 0's result
    (with `all_ranks`, the list of every rank's, in rank order).

    With `reuse`, the processes are kept for the next `reuse` call of the same world size (see
    `_Pool`): no process start-up and imports per call, for functions that leave nothing behind
    (a `pretrain()` run does not)."""
    if reuse:
        return _pool(world_size).run(fn, args, timeout, all_ranks)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_worker, args=(r, world_size, port, fn, args, queue), daemon=False)
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    results: dict[int, tuple[str, Any]] = {}
    import queue as queue_mod
    import time

    deadline = time.monotonic() + timeout
    try:
        while len(results) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(
                    f"run_distributed: ranks {sorted(set(range(world_size)) - set(results))} "
                    f"did not finish within {timeout:.0f} s"
                )
            try:
                rank, status, payload = queue.get(timeout=min(remaining, 1.0))
            except queue_mod.Empty:
                dead = [i for i, p in enumerate(procs) if p.exitcode not in (None, 0) and i not in results]
                if dead:
                    raise RuntimeError(
                        f"run_distributed: rank {dead[0]} died with exit code "
                        f"{procs[dead[0]].exitcode} before reporting"
                    ) from None
                continue
            results[rank] = (status, payload)
            if status == "error":
                raise RuntimeError(f"rank {rank} failed:\n{payload}")
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join()
    if all_ranks:
        return [pickle.loads(results[r][1]) for r in range(world_size)]
    return pickle.loads(results[0][1])


def _pool_worker(rank: int, world_size: int, tasks: Any, results: Any) -> None:
    """Run tasks until told to stop; each in a fresh process group and environment."""
    import torch
    import torch.distributed as dist

    base_env = dict(os.environ)
    while True:
        task = tasks.get()
        if task is None:
            return
        fn, args, port = task
        os.environ.clear()
        os.environ.update(base_env)
        os.environ.update(_torchrun_env(rank, world_size, port))
        try:
            payload = pickle.dumps(fn(rank, world_size, *args))
            status = "ok"
        except BaseException:
            payload, status = traceback.format_exc().encode(), "error"
        # What one task leaves must not reach the next: a process group it did not tear down, and
        # torch.compile's caches (guards of the last model would make the next one recompile and
        # count against the recompile limit).
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        torch._dynamo.reset()
        results.put((rank, status, payload))


class _Pool:
    """`world_size` spawned processes that run one `run_distributed(..., reuse=True)` call after
    another. A failure or a timeout ends them (a rank may be stuck in a collective); the next call
    starts new ones."""

    def __init__(self, world_size: int) -> None:
        ctx = mp.get_context("spawn")
        self.world_size = world_size
        self.results = ctx.Queue()
        self.tasks = [ctx.Queue() for _ in range(world_size)]
        self.procs = [
            ctx.Process(target=_pool_worker, args=(r, world_size, self.tasks[r], self.results))
            for r in range(world_size)
        ]
        for proc in self.procs:
            proc.start()

    def run(self, fn: Callable[..., Any], args: tuple, timeout: float, all_ranks: bool) -> Any:
        import queue as queue_mod
        import time

        port = free_port()
        for q in self.tasks:
            q.put((fn, args, port))
        results: dict[int, tuple[str, bytes]] = {}
        deadline = time.monotonic() + timeout
        try:
            while len(results) < self.world_size:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    missing = sorted(set(range(self.world_size)) - set(results))
                    raise TimeoutError(
                        f"run_distributed: ranks {missing} did not finish within {timeout:.0f} s"
                    )
                try:
                    rank, status, payload = self.results.get(timeout=min(remaining, 1.0))
                except queue_mod.Empty:
                    dead = [i for i, p in enumerate(self.procs) if not p.is_alive()]
                    if dead:
                        raise RuntimeError(
                            f"run_distributed: rank {dead[0]} died with exit code "
                            f"{self.procs[dead[0]].exitcode} before reporting"
                        ) from None
                    continue
                results[rank] = (status, payload)
                if status == "error":  # the other ranks may wait for it in a collective: no waiting
                    raise RuntimeError(f"rank {rank} failed:\n{payload.decode()}")
        except BaseException:
            self.close()
            raise
        if all_ranks:
            return [pickle.loads(results[r][1]) for r in range(self.world_size)]
        return pickle.loads(results[0][1])

    def close(self) -> None:
        _pools.pop(self.world_size, None)
        for proc in self.procs:
            if proc.is_alive():
                proc.kill()
            proc.join()


_pools: dict[int, _Pool] = {}


def _pool(world_size: int) -> _Pool:
    if world_size not in _pools:
        _pools[world_size] = _Pool(world_size)
    return _pools[world_size]


def close_pools() -> None:
    """End the processes kept by `run_distributed(..., reuse=True)` (tests call it at session end;
    at interpreter exit it also runs)."""
    for pool in list(_pools.values()):
        for q in pool.tasks:
            q.put(None)
        for proc in pool.procs:
            proc.join(timeout=10)
        pool.close()


atexit.register(close_pools)
