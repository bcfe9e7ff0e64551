"""`run_distributed(fn, world_size)`: spawn real processes that form a process group, with a hard timeout.

Each process gets the torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT), so
code under test initializes exactly as it would under `torchrun`. `fn(rank, world_size, *args)`
runs in every process; what rank 0 returns (picklable) comes back. A failure on any rank raises
here with that rank's traceback; a hang is killed after `timeout` seconds.
"""

from __future__ import annotations

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


def _worker(rank: int, world_size: int, port: int, fn: Callable[..., Any], args: tuple, queue: Any) -> None:
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    try:
        result = fn(rank, world_size, *args)
        # Plain pickle bytes: tensors sent through the queue as shared memory would vanish with this
        # process before the parent reads them.
        queue.put((rank, "ok", pickle.dumps(result)))
    except BaseException:  # report every failure, including SystemExit, to the parent
        queue.put((rank, "error", traceback.format_exc()))
        raise SystemExit(1) from None


def run_distributed(
    fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 120.0, all_ranks: bool = False
) -> Any:
    """Run `fn(rank, world_size, *args)` on `world_size` spawned processes; return rank 0's result
    (with `all_ranks`, the list of every rank's, in rank order)."""
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
