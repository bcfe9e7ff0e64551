"""The flat, tensors-only view of model and optimizer that the storage formats read and write.

Keys: ``model.<name>`` (the model's state_dict: Megatron names), ``optimizer.<kind>.<param name>``
with kind one of the torch optimizer's per-parameter states (``exp_avg``, ``exp_avg_sq``, ``step``,
``momentum_buffer``...) or ``master`` (the float32 master copy of a 16-bit parameter). Parameter names
contain dots but kinds never do, so the key splits unambiguously.

Everything that is not a tensor (parameter groups with their hyperparameters, the loss scaler,
non-tensor per-parameter state) goes to `common.pt` instead, so that torch.distributed.checkpoint
never has to pickle an object and every file loads with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor

MODEL = "model."
OPTIMIZER = "optimizer."
MASTER = "master"


@dataclass(frozen=True)
class TensorInfo:
    """Shape and dtype of one tensor in a checkpoint (known without reading its data)."""

    shape: tuple[int, ...]
    dtype: torch.dtype


def model_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model.<name>`` -> tensor, sharing storage with the model (so loading writes in place)."""
    out = {}
    for name, value in model.state_dict().items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(
                f"model state {name!r} is a {type(value).__name__}, not a tensor; cannot checkpoint it"
            )
        out[MODEL + name] = value
    return out


def optimizer_key(kind: str, name: str) -> str:
    return f"{OPTIMIZER}{kind}.{name}"


def split_optimizer_key(key: str) -> tuple[str, str]:
    """``optimizer.<kind>.<name>`` -> (kind, name)."""
    kind, _, name = key[len(OPTIMIZER) :].partition(".")
    return kind, name


def optimizer_tensors(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split `MixedPrecisionOptimizer.state_dict()` into flat tensors and the non-tensor rest."""
    tensors: dict[str, torch.Tensor] = {}
    extra: dict[str, dict[str, Any]] = {}
    for name, per_param in state["state"].items():
        for kind, value in per_param.items():
            if isinstance(value, torch.Tensor):
                tensors[optimizer_key(kind, name)] = value
            else:  # e.g. SGD's momentum_buffer=None: a plain value, kept with the hyperparameters
                extra.setdefault(name, {})[kind] = value
    for name, master in state.get("master", {}).items():
        tensors[optimizer_key(MASTER, name)] = master
    common = {"param_groups": state["param_groups"], "extra_state": extra}
    if "loss_scaler" in state:
        common["loss_scaler"] = state["loss_scaler"]
    return tensors, common


def optimizer_targets(optimizer: Any, available: dict[str, TensorInfo]) -> dict[str, torch.Tensor]:
    """Tensors to load the checkpoint's per-parameter optimizer states into (not the float32
    masters: `restore.float32_targets` decides where those go).

    A fresh torch optimizer has no state yet (it is created at the first step), so the states are
    allocated from the checkpoint's shapes and dtypes, laid out like the parameter: on its device, and
    for a sharded (DTensor) parameter as a DTensor of the same mesh and placements, so that the
    checkpoint reader fills only this rank's shard whatever layout saved it. 0-dim states (Adam's
    ``step``) go on the CPU, where torch keeps them unless fused or capturable (the optimizer's own
    load_state_dict moves them where it wants them).
    """
    slots = {s.name: s for s in optimizer.slots}
    targets: dict[str, torch.Tensor] = {}
    for key, info in available.items():
        if not key.startswith(OPTIMIZER):
            continue
        kind, name = split_optimizer_key(key)
        slot = slots.get(name)
        if slot is None or kind == MASTER:
            continue  # the optimizer's load_state_dict reports parameters this model lacks
        master = slot.master
        if len(info.shape) == 0:
            targets[key] = torch.empty((), dtype=info.dtype, device="cpu")
        elif isinstance(master, DTensor) and tuple(master.shape) == info.shape:
            targets[key] = torch.empty_like(master, dtype=info.dtype)
        else:  # plain parameter, or a shape the shape check refuses before anything is read
            targets[key] = torch.empty(info.shape, dtype=info.dtype, device=master.device)
    return targets


def unknown_optimizer_params(optimizer: Any, available: dict[str, TensorInfo]) -> list[str]:
    """Parameter names with optimizer state in the checkpoint that this optimizer does not have."""
    names = {s.name for s in optimizer.slots}
    return sorted(
        {split_optimizer_key(k)[1] for k in available if k.startswith(OPTIMIZER)} - names,
    )


def optimizer_state(loaded: dict[str, torch.Tensor], common: dict[str, Any]) -> dict[str, Any]:
    """Rebuild the `MixedPrecisionOptimizer.load_state_dict()` argument from loaded tensors + common."""
    state: dict[str, dict[str, Any]] = {}
    master: dict[str, torch.Tensor] = {}
    for key, value in loaded.items():
        if not key.startswith(OPTIMIZER):
            continue
        kind, name = split_optimizer_key(key)
        if kind == MASTER:
            master[name] = value
        else:
            state.setdefault(name, {})[kind] = value
    for name, values in common.get("extra_state", {}).items():
        state.setdefault(name, {}).update(values)
    out: dict[str, Any] = {"state": state, "param_groups": common["param_groups"], "master": master}
    if "loss_scaler" in common:
        out["loss_scaler"] = common["loss_scaler"]
    return out


def nbytes(tensors: dict[str, torch.Tensor], *, local: bool = False) -> int:
    """Bytes of distinct storages (a tensor under two names, e.g. tied weights, counts once).

    A sharded (DTensor) tensor counts its whole size, or with `local` only this rank's shard."""
    seen: set[tuple[int, object]] = set()  # (storage, offset); offsets may be symbolic under compile
    total = 0
    for t in tensors.values():
        part = t.to_local() if isinstance(t, DTensor) else t
        ident = (
            (part.untyped_storage().data_ptr(), part.storage_offset())
            if part.device.type != "meta"
            else (id(t), 0)
        )
        if ident in seen:
            continue
        seen.add(ident)
        sized = part if local else t
        total += sized.numel() * sized.element_size()
    return total
