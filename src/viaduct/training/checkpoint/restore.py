"""Loading-side rules: which tensors to read, key and shape checks, and putting the optimizer right.

* Model keys follow `checkpoint.dist_ckpt_strictness` (Megatron Core's names): a tensor this model
  has but the checkpoint lacks is an error under ``assume_ok_unexpected`` / ``raise_unexpected`` /
  ``raise_all``, a warning under ``log_unexpected`` / ``log_all`` (it keeps its initial value), silent
  under ``return_*`` / ``ignore_all``; tensors the checkpoint has but this model does not use are an
  error only under ``raise_all`` and logged under ``log_all``. The ``return_*`` modes record both lists
  in `LoadReport` for the caller.
* Global shapes must match exactly; the parallel layout may differ (DCP reshards: a sharded
  parameter reads only its own shard of whatever layout saved it).
* Precision across layouts: `float32_source` is the one rule for where a weight's float32 version is
  (the checkpoint's master if it has one, else its model tensor when that is float32), and
  `float32_targets` reads it, on a full resume or with ``load_main_params_from_ckpt``, into what this
  run updates in float32: a 16-bit parameter's master copy, or the float32 parameter itself (a
  sharded run's shards are their own masters). Otherwise, and without a float32 version, the masters
  are reset from the loaded weights (Megatron's ``reload_model_params``), so the next step does not
  undo the load.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from viaduct.training.checkpoint.errors import checkpoint_problem
from viaduct.training.checkpoint.flat import (
    MASTER,
    MODEL,
    TensorInfo,
    model_tensors,
    optimizer_key,
    optimizer_state,
    optimizer_targets,
    unknown_optimizer_params,
)

log = logging.getLogger("viaduct")

_FIX_KEYS = "load a checkpoint of this model, or relax checkpoint.dist_ckpt_strictness (e.g. log_all)"


@dataclass
class LoadReport:
    """What one `Checkpointer.load()` did (for callers, logs and the strictness "return" modes)."""

    path: str
    step: int
    weights_only: bool
    parts: list[str] = field(default_factory=list)
    """Loaded parts: model, optimizer, master_params, scheduler, train_state, rng."""
    missing_keys: list[str] = field(default_factory=list)
    """Model tensors this model has that the checkpoint lacks (left as initialised)."""
    unexpected_keys: list[str] = field(default_factory=list)
    """Model tensors the checkpoint has that this model does not use."""


def model_targets(
    model: nn.Module,
    available: dict[str, TensorInfo],
    policy: str,
    fld: str,
    directory: Path,
    report: LoadReport,
    keep: Callable[[str], bool] | None = None,
) -> dict[str, torch.Tensor]:
    """The model tensors to read (in place), after applying the strictness `policy` to key mismatches;
    only those whose names `keep` accepts (all when None) are wanted."""
    wanted = model_tensors(model)
    if keep is not None:
        wanted = {k: t for k, t in wanted.items() if keep(k[len(MODEL) :])}
    missing = sorted(k[len(MODEL) :] for k in wanted if k not in available)
    unexpected = sorted(k[len(MODEL) :] for k in available if k.startswith(MODEL) and k not in wanted)
    report.missing_keys, report.unexpected_keys = missing, unexpected
    if missing and policy in ("assume_ok_unexpected", "raise_unexpected", "raise_all"):
        raise checkpoint_problem(
            fld, f"it lacks {len(missing)} tensor(s) of this model: {missing[:10]}", directory, fix=_FIX_KEYS
        )
    if unexpected and policy == "raise_all":
        raise checkpoint_problem(
            fld,
            f"it has {len(unexpected)} tensor(s) this model lacks: {unexpected[:10]}",
            directory,
            fix=_FIX_KEYS,
        )
    if missing and policy in ("log_unexpected", "log_all"):
        log.warning(
            "checkpoint %s lacks %d model tensor(s), left as initialised: %s",
            directory,
            len(missing),
            missing[:10],
        )
    if unexpected and policy == "log_all":
        log.warning(
            "checkpoint %s has %d tensor(s) this model does not use: %s",
            directory,
            len(unexpected),
            unexpected[:10],
        )
    return {k: t for k, t in wanted.items() if k in available}


def optimizer_read_targets(
    optimizer: Any, available: dict[str, TensorInfo], *, fld: str, directory: Path
) -> dict[str, torch.Tensor]:
    """The optimizer's per-parameter states to read for a full resume (masters: `float32_targets`)."""
    unknown = unknown_optimizer_params(optimizer, available)
    if unknown:
        raise checkpoint_problem(
            fld,
            f"its optimizer state is for parameters this model lacks: {unknown[:5]}",
            directory,
            fix="load a checkpoint of this model, or set checkpoint.load_optim=false",
        )
    return optimizer_targets(optimizer, available)


def float32_source(name: str, available: dict[str, TensorInfo]) -> str | None:
    """The checkpoint key holding parameter `name`'s float32 version, or None when it has none.

    ``optimizer.master.<name>`` if the checkpoint has it (saved by a run with 16-bit parameters and
    float32 master copies), else ``model.<name>`` when that is float32 (saved by a float32 run, or by
    a sharded one, whose float32 shards are their own masters).
    """
    master = optimizer_key(MASTER, name)
    if master in available:
        return master
    weight = MODEL + name
    if weight in available and available[weight].dtype == torch.float32:
        return weight
    return None


def float32_targets(
    optimizer: Any, targets: dict[str, torch.Tensor], available: dict[str, TensorInfo]
) -> set[str]:
    """Read each parameter's float32 version (`float32_source`) into the tensor this run keeps in
    float32; returns the names of the parameters it is read for.

    Edits `targets` (checkpoint key -> tensor read in place, the model's tensors already in it):

    * a 16-bit parameter with a float32 master copy: the master reads the float32 version; the
      16-bit parameter is then copied from it (`restore_optimizer`). From a sharded run's checkpoint
      that is ``model.<name>``, read straight into the master, so no precision is lost on the way;
    * a float32 parameter (its own master: a float32 or sharded run) reads the checkpoint's master
      instead of its 16-bit ``model.<name>`` when the checkpoint has one; a float32 ``model.<name>``
      is already read into it.
    """
    from_ckpt: set[str] = set()
    aliases: dict[tuple[int, object], list[str]] = {}  # a parameter may sit under several model keys
    for k, t in targets.items():
        ident = _storage_id(t)
        if k.startswith(MODEL) and ident is not None:
            aliases.setdefault(ident, []).append(k)
    for slot in optimizer.slots:
        key = float32_source(slot.name, available)
        if key is None:
            continue
        weight = MODEL + slot.name
        if slot.has_copy:
            targets[key] = slot.master  # replaces the 16-bit parameter when key is model.<name>
        elif key != weight:
            # One tensor, one source: a second read of the same storage would race with the first.
            view = targets.pop(weight, None)
            view = slot.param.detach() if view is None else view
            ident = _storage_id(view)
            for alias in aliases.get(ident, []) if ident is not None else []:
                targets.pop(alias, None)
            targets[key] = view
        from_ckpt.add(slot.name)
    return from_ckpt


def _storage_id(t: torch.Tensor) -> tuple[int, object] | None:
    """Where this rank's part of `t` lives (None when it holds no elements here)."""
    part = t.to_local() if isinstance(t, DTensor) else t
    if part.numel() == 0 or part.device.type == "meta":
        return None
    return part.untyped_storage().data_ptr(), part.storage_offset()


def check_shapes(
    targets: dict[str, torch.Tensor], available: dict[str, TensorInfo], fld: str, directory: Path
) -> None:
    wrong = [
        f"{k}: checkpoint {list(available[k].shape)} vs here {list(t.shape)}"
        for k, t in targets.items()
        if tuple(t.shape) != available[k].shape
    ]
    if wrong:
        raise checkpoint_problem(
            fld,
            f"{len(wrong)} tensor shape(s) differ from this model: {wrong[:5]}",
            directory,
            fix="build the model the checkpoint was saved from (see its run_config.yaml)",
        )


def restore_optimizer(
    optimizer: Any,
    loaded: dict[str, torch.Tensor],
    common: dict[str, Any] | None,
    *,
    float32_read: set[str],
    fld: str,
    directory: Path,
    report: LoadReport,
) -> None:
    """Make the optimizer agree with the loaded weights; with `common`, load its full state too.

    `loaded` holds the per-parameter optimizer states just read; `float32_read` names the
    parameters whose float32 version was read from the checkpoint (`float32_targets`).
    """
    with torch.no_grad():
        for s in optimizer.copies:
            if s.name in float32_read:
                s.param.copy_(s.master)  # the checkpoint's float32 weight, and its 16-bit image
            else:
                s.master.copy_(s.param)  # the master follows the loaded 16-bit weight
    if common is None:
        if float32_read:
            report.parts.append("master_params")
        return
    if "optimizer" not in common:
        raise checkpoint_problem(fld, "common.pt lacks the optimizer's parameter groups", directory)
    try:
        optimizer.load_state_dict(optimizer_state(loaded, common["optimizer"]))
    except (ValueError, KeyError) as exc:
        raise checkpoint_problem(
            fld,
            "its optimizer state does not fit this optimizer",
            directory,
            fix="set checkpoint.load_optim=false to start with a fresh optimizer",
            cause=exc,
        ) from exc
    report.parts.append("optimizer")
