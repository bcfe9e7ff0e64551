"""Accelerator memory statistics for the console memory line and the `memory/*` metrics.

CUDA only: `torch.cuda.memory_stats()` describes PyTorch's caching allocator, and the driver's
view (`device_memory_used`) includes every process on the GPU. On CPU there is no comparable
allocator to report, so every function here returns nothing for a non-CUDA device.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from viaduct.training.config import ConfigContainer

# torch.cuda.memory_stats() key -> reported name. The names are the ones Megatron Bridge prints on
# its "[Rank r] (after N iterations) memory (GB)" line.
DEFAULT_MEMORY_KEYS: dict[str, str] = {
    "allocated_bytes.all.current": "current_allocated_mem",
    "active_bytes.all.current": "current_active_mem",
    "inactive_split_bytes.all.current": "current_inactive_mem",
    "reserved_bytes.all.current": "current_reserved_mem",
    "allocated_bytes.all.peak": "peak_allocated_mem",
    "active_bytes.all.peak": "peak_active_mem",
    "inactive_split_bytes.all.peak": "peak_inactive_mem",
    "reserved_bytes.all.peak": "peak_reserved_mem",
    "num_alloc_retries": "alloc_retries",
}

DEVICE_MEMORY_USED = "device_memory_used"
"""Name of the driver-reported memory in use (GB), added when `logger.log_device_memory_used`."""


def _is_cuda(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_available()


def _round_gb(num_bytes: float) -> float:
    """Bytes to GB (1e9), kept to 5 significant digits so lines stay readable."""
    gb = num_bytes / 1e9
    if gb == 0:
        return 0.0
    return round(gb, -math.floor(math.log10(abs(gb))) + 4)


def summarize_memory_stats(
    stats: Mapping[str, float], keys: Mapping[str, str] | None = None
) -> dict[str, float]:
    """Pick `keys` (stat -> name; None: the default set) out of a memory_stats() dict.

    Byte counts become GB; counts (alloc retries, allocations) stay counts. Stats the allocator
    does not report are left out.
    """
    out: dict[str, float] = {}
    for stat, name in (keys or DEFAULT_MEMORY_KEYS).items():
        if stat in stats:
            value = stats[stat]
            out[name] = _round_gb(value) if "bytes" in stat else value
    return out


def device_memory_used_gb(device: torch.device) -> float | None:
    """Memory in use on the device as the driver sees it (all processes), in GB; None off CUDA."""
    if not _is_cuda(device):
        return None
    try:
        # Needs pynvml (NVIDIA) or amdsmi (ROCm); fall back to cudaMemGetInfo when it is missing.
        used = torch.cuda.device_memory_used(device)
    except Exception:
        free, total = torch.cuda.mem_get_info(device)
        used = total - free
    return _round_gb(used)


def memory_report(
    device: torch.device, keys: Mapping[str, str] | None = None, *, device_used: bool = False
) -> dict[str, float]:
    """The memory statistics of `device` by reported name; {} when it is not a CUDA device."""
    if not _is_cuda(device):
        return {}
    # memory_stats() reads the allocator's counters on the host: it does not wait for the GPU.
    report = summarize_memory_stats(torch.cuda.memory_stats(device), keys)
    if device_used:
        used = device_memory_used_gb(device)
        if used is not None:
            report[DEVICE_MEMORY_USED] = used
    return report


def format_memory_line(rank: int, iterations: int, report: Mapping[str, float]) -> str:
    """`[Rank r] (after N iterations) memory (GB) | name: value | ...`."""
    line = f"[Rank {rank}] (after {iterations} iterations) memory (GB)"
    for name, value in report.items():
        line += f" | {name}: {value}"
    return line


def theoretical_memory_line(cfg: ConfigContainer) -> str | None:
    """Megatron's `Theoretical memory footprints: ...` line for a GPT model config (None for others).

    From `viaduct.models.accounting.estimate_config_memory`, per GPU in the run's parallel layout:
    weights (with the gathered copies FSDP holds), gradients and Adam state, then the activations and
    logits of one step's micro-batches; in MB (2^20 bytes), as Megatron prints them.
    """
    from viaduct.models.accounting import estimate_config_memory

    try:
        est = estimate_config_memory(cfg)
    except ValueError:  # not a GPT model, or no vocabulary yet: no line rather than a crash
        return None
    mb = 2**20
    weights = (est.parameters + est.gathered_weights + est.gradients + est.optimizer) / mb
    activations = (est.activations + est.logits) / mb
    return (
        f"Theoretical memory footprints: weight and optimizer={weights:.2f} MB, "
        f"activation={activations:.2f} MB, total={weights + activations:.2f} MB"
    )
