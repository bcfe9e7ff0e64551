"""Process-group setup from the launcher's environment (torchrun sets RANK, WORLD_SIZE, LOCAL_RANK).

One process with no environment needs no process group at all. CUDA is used when present (NCCL
between GPUs); without it everything runs on the CPU over gloo.
"""

from __future__ import annotations

import logging
import os
from collections.abc import MutableMapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from viaduct.training.config.distributed import DistributedInitConfig

if TYPE_CHECKING:
    from viaduct.distributed.mesh import ParallelMesh


@dataclass
class DistributedContext:
    """Where this process stands: its rank, the world, its device and its process groups."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str | None = None
    created: bool = False
    """Whether viaduct created the default process group (and so destroys it at the end)."""
    host_group: dist.ProcessGroup | None = None
    """A gloo group for host-side collectives (exit decisions): no device synchronisation. None when
    dist.use_gloo_process_groups is false: those collectives then go through the default group."""
    parallel: ParallelMesh | None = None
    """The device mesh of the run's parallel layout (set by the run's setup, once the config is known)."""

    @property
    def host_device(self) -> torch.device:
        """Where tensors of host-side collectives must live for `host_group`."""
        return torch.device("cpu") if self.host_group is not None else self.device

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_last_rank(self) -> bool:
        return self.rank == self.world_size - 1


log = logging.getLogger(__name__)

_FR_PATH_VARS = ("TORCH_FR_DUMP_TEMP_FILE", "TORCH_NCCL_DEBUG_INFO_TEMP_FILE")


def flight_recorder_env(cfg: DistributedInitConfig, environ: MutableMapping[str, str]) -> dict[str, str]:
    """Put the dist.flight_recorder_* settings into `environ`; returns the variables it set.

    PyTorch's NCCL process groups read these variables when they are created, so this must run
    before the process group exists. Nothing is set without a dump path (from the config, or
    already in the environment). A variable the launcher already set wins over the config, with a
    warning: the person who exported it meant it.
    """
    path = next((environ[v] for v in _FR_PATH_VARS if environ.get(v)), None) or cfg.flight_recorder_dump_path
    if path is None:
        return {}
    # A directory would make every rank write to the same name; PyTorch appends the rank to the prefix.
    prefix = os.path.join(path, "_dump_") if os.path.isdir(path) else path
    wanted = {
        "TORCH_FR_DUMP_TEMP_FILE": prefix,
        "TORCH_NCCL_DEBUG_INFO_TEMP_FILE": prefix,
        "TORCH_NCCL_TRACE_BUFFER_SIZE": str(cfg.flight_recorder_trace_buffer_size),
        "TORCH_NCCL_DUMP_ON_TIMEOUT": str(int(cfg.flight_recorder_dump_on_timeout)),
        "TORCH_INCLUDE_STACK_TRACE": str(int(cfg.flight_recorder_include_stack_trace)),
        "TORCH_INCLUDE_ONLY_ACTIVE": str(int(cfg.flight_recorder_include_only_active)),
        "TORCH_NCCL_EXTRA_DUMP_ON_EXEC": str(int(cfg.flight_recorder_extra_dump_on_exec)),
    }
    applied: dict[str, str] = {}
    for name, value in wanted.items():
        if name in environ:
            if environ[name] != value:
                log.warning(
                    "flight recorder: %s is already set to %r in the environment; keeping it (config: %r)",
                    name,
                    environ[name],
                    value,
                )
            continue
        environ[name] = value
        applied[name] = value
    return applied


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    return int(value) if value.strip().isdigit() else default


_runs_in_this_process = 0
_inprocess_attempt: int | None = None
"""The in-process restart attempt now running (0 first), or None outside `inprocess_restart`."""


def begin_restartable_run() -> int:
    """Count a run that in-process restart wraps: its attempts share the run's number."""
    global _runs_in_this_process
    _runs_in_this_process += 1
    return _runs_in_this_process


def set_inprocess_attempt(attempt: int | None) -> None:
    """Name the in-process restart attempt whose process group `_fresh_store` prefixes next."""
    global _inprocess_attempt
    _inprocess_attempt = attempt


def _fresh_store(rank: int, world: int, timeout: timedelta) -> dist.Store:
    """The launcher's store (env://), under a prefix of its own for each run in this process.

    The store of a job outlives a run (torchrun's agent keeps it; a TCP store server is shared by the
    groups of a process), and process-group setup numbers its keys from zero again after a teardown,
    so a second run in the same processes would read the first run's keys and hang. Each run's
    prefix keeps their keys apart; every rank counts its runs the same way. The prefix also names
    torchrun's restart: the processes of a restarted job count from one again, and would otherwise
    read the failed attempt's keys (a dead rank's address) from the store the agent kept. Under
    in-process restart, the run was counted once when it began, and the prefix names the attempt
    too: each attempt forms a new group in the same processes, which must not read the last one's.
    """
    global _runs_in_this_process
    if _inprocess_attempt is None:
        _runs_in_this_process += 1
    store, _, _ = next(dist.rendezvous("env://", rank, world, timeout=timeout))
    attempt = _env_int("TORCHELASTIC_RESTART_COUNT", 0)
    prefix = f"viaduct/attempt{attempt}/run{_runs_in_this_process}"
    if _inprocess_attempt is not None:
        prefix += f"/inprocess{_inprocess_attempt}"
    return dist.PrefixStore(prefix, store)


def initialize_distributed(cfg: DistributedInitConfig) -> DistributedContext:
    """Set the device and, under a launcher, create the default process group.

    The flight-recorder variables are set first, before any process group is created.
    """
    flight_recorder_env(cfg, os.environ)
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", cfg.local_rank)
    if torch.cuda.is_available():
        index = 0 if cfg.external_gpu_device_mapping else local_rank
        device = torch.device("cuda", index)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")

    created = False
    if dist.is_available() and dist.is_initialized():
        world, rank = dist.get_world_size(), dist.get_rank()
    elif world > 1:
        init_backend = cfg.distributed_backend if device.type == "cuda" else "gloo"
        timeout = timedelta(minutes=cfg.distributed_timeout_minutes)
        dist.init_process_group(
            backend=init_backend,
            store=_fresh_store(rank, world, timeout),
            rank=rank,
            world_size=world,
            timeout=timeout,
            device_id=device if device.type == "cuda" else None,
        )
        created = True
    backend = dist.get_backend() if dist.is_available() and dist.is_initialized() else None
    host_group: dist.ProcessGroup | None = None
    if backend == "gloo":
        host_group = dist.group.WORLD
    elif backend is not None and cfg.use_gloo_process_groups:
        host_group = dist.new_group(backend="gloo")
    return DistributedContext(rank, world, local_rank, device, backend, created, host_group)


def set_timeout_after_init(ctx: DistributedContext, cfg: DistributedInitConfig) -> None:
    """Apply dist.distributed_timeout_seconds_after_init (after the first step), if set."""
    if cfg.distributed_timeout_seconds_after_init is None or ctx.backend is None:
        return
    # torch has no public setter; this is the hook Megatron uses too.
    setter = getattr(dist.distributed_c10d, "_set_pg_timeout", None)
    if setter is not None:
        setter(timedelta(seconds=cfg.distributed_timeout_seconds_after_init), None)


def destroy_distributed(ctx: DistributedContext, *, abort: bool = False) -> None:
    """Tear down what `initialize_distributed` created (abort after an error: peers may be gone)."""
    if not ctx.created or not dist.is_initialized():
        return
    # Drop our handle on the groups: a process group still referenced at interpreter exit has its
    # gloo threads torn down during finalization, which aborts the process (SIGABRT).
    host_group, ctx.host_group = ctx.host_group, None
    ctx.parallel = None
    if abort and hasattr(dist.distributed_c10d, "_abort_process_group"):
        try:
            dist.distributed_c10d._abort_process_group()
            return
        except Exception:  # fall back to the graceful path
            pass
    if not abort:
        # Every rank reaches the end before any tears its connections down: a rank that left early
        # would break a peer still finishing its last collective.
        dist.barrier(group=host_group)
    del host_group
    dist.destroy_process_group()
