"""Seeding and saving the random-number generators of Python, NumPy and torch.

Seeds follow Megatron: every rank uses `seed + 100 × pipeline rank`, plus
`10 × data-parallel rank` when `rng.data_parallel_random_init` is set, so pipeline stages (which hold
different layers) initialise differently while data-parallel replicas stay identical.

`get_rng_state()` returns only tensors, ints, floats, strings, lists and dicts, so a checkpoint holding it
loads with `torch.load(weights_only=True)` (NumPy arrays and Python's tuple state would not).
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

from viaduct.config import ConfigError, Problem

__all__ = ["derive_seed", "get_rng_state", "set_random_seed", "set_rng_state"]

_MAX_NUMPY_SEED = 2**32 - 1  # np.random.seed rejects anything larger


def derive_seed(
    seed: int, *, pp_rank: int = 0, dp_rank: int = 0, data_parallel_random_init: bool = False
) -> int:
    """The seed of one rank: seed + 100 × pp_rank (+ 10 × dp_rank with data_parallel_random_init)."""
    if pp_rank < 0 or dp_rank < 0:  # a caller's bug, not a user setting
        raise ValueError(f"ranks are >= 0, got pp_rank={pp_rank}, dp_rank={dp_rank}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed <= 0:
        raise ConfigError(
            Problem("rng.seed", "must be a positive integer", seed, fix="set rng.seed to e.g. 1234")
        )
    out = seed + 100 * pp_rank
    if data_parallel_random_init:
        out += 10 * dp_rank
    if out > _MAX_NUMPY_SEED:
        raise ConfigError(
            Problem(
                "rng.seed",
                f"seed + rank offsets ({out}) exceeds 2**32 - 1, the largest seed NumPy accepts",
                seed,
                fix="set rng.seed to a smaller number",
            )
        )
    return out


def set_random_seed(
    seed: int, *, pp_rank: int = 0, dp_rank: int = 0, data_parallel_random_init: bool = False
) -> int:
    """Seed Python `random`, NumPy's global RNG and torch (CPU and all CUDA devices); return the seed used."""
    used = derive_seed(
        seed, pp_rank=pp_rank, dp_rank=dp_rank, data_parallel_random_init=data_parallel_random_init
    )
    random.seed(used)
    np.random.seed(used)
    # torch.manual_seed also seeds every CUDA device (lazily, so it does not initialise CUDA itself).
    torch.manual_seed(used)
    return used


def get_rng_state() -> dict[str, Any]:
    """The state of every generator `set_random_seed` seeds, as torch.load(weights_only=True)-safe data."""
    version, internal, gauss_next = random.getstate()
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": {
            "version": int(version),
            # 625 unsigned 32-bit words: an int64 tensor holds them exactly and saves compactly.
            "state": torch.tensor(internal, dtype=torch.int64),
            "gauss_next": gauss_next,  # float or None
        },
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch": torch.get_rng_state(),
        # One state per visible device: the index is the device ordinal.
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `get_rng_state()` returned (possibly after a torch.save/torch.load round trip).

    CUDA states are restored for the devices both runs see; a run resumed on fewer or more visible
    devices keeps the seeded state of the others.
    """
    missing = [k for k in ("python", "numpy", "torch") if k not in state]
    if missing:
        raise ValueError(f"RNG state lacks {missing}; expected the dict returned by get_rng_state()")
    py = state["python"]
    internal = tuple(int(x) for x in torch.as_tensor(py["state"]).tolist())
    gauss_next = py["gauss_next"]
    random.setstate((int(py["version"]), internal, None if gauss_next is None else float(gauss_next)))

    npy = state["numpy"]
    keys = torch.as_tensor(npy["keys"]).numpy().astype(np.uint32)
    np.random.set_state(
        (npy["kind"], keys, int(npy["pos"]), int(npy["has_gauss"]), float(npy["cached_gaussian"]))
    )

    torch.set_rng_state(torch.as_tensor(state["torch"], dtype=torch.uint8).cpu())
    cuda_states = state.get("cuda") or []
    if cuda_states and torch.cuda.is_available():
        for device, cuda_state in enumerate(cuda_states[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(torch.as_tensor(cuda_state, dtype=torch.uint8).cpu(), device)
