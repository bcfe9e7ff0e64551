"""Loading-side rules: which tensors to read, key and shape checks, and putting the optimizer right.

* Model keys follow `checkpoint.dist_ckpt_strictness` (Megatron Core's names): a tensor this model
  has but the checkpoint lacks is an error under ``assume_ok_unexpected`` / ``raise_unexpected`` /
  ``raise_all``, a warning under ``log_unexpected`` / ``log_all`` (it keeps its initial value), silent
  under ``return_*`` / ``ignore_all``; tensors the checkpoint has but this model does not use are an
  error only under ``raise_all`` and logged under ``log_all``. The ``return_*`` modes record both lists
  in `LoadReport` for the caller.
* Shapes must match exactly (resharding between parallel layouts comes with tensor parallelism).
* Loading weights without the optimizer state resets the float32 masters from the loaded weights
  (Megatron's ``reload_model_params``), or from the checkpoint's masters with
  ``load_main_params_from_ckpt``, so the next step does not undo the load.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

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
) -> dict[str, torch.Tensor]:
    """The model tensors to read (in place), after applying the strictness `policy` to key mismatches."""
    wanted = model_tensors(model)
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
    optimizer: Any, available: dict[str, TensorInfo], *, full_state: bool, fld: str, directory: Path
) -> dict[str, torch.Tensor]:
    """Optimizer tensors to read: the full state, or only the float32 masters (in place)."""
    if full_state:
        unknown = unknown_optimizer_params(optimizer, available)
        if unknown:
            raise checkpoint_problem(
                fld,
                f"its optimizer state is for parameters this model lacks: {unknown[:5]}",
                directory,
                fix="load a checkpoint of this model, or set checkpoint.load_optim=false",
            )
        return optimizer_targets(optimizer, available)
    keys = {optimizer_key(MASTER, s.name): s.master for s in optimizer.copies}
    return {k: t for k, t in keys.items() if k in available}


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
    fld: str,
    directory: Path,
    report: LoadReport,
) -> None:
    """Make the optimizer agree with the loaded weights; with `common`, load its full state too.

    `loaded` holds the optimizer tensors just read; masters among them were read in place.
    """
    from_ckpt = {id(t) for t in loaded.values()}
    with torch.no_grad():
        for s in optimizer.copies:
            if id(s.master) in from_ckpt:
                s.param.copy_(s.master)  # the checkpoint's float32 master, and its 16-bit image
            else:
                s.master.copy_(s.param)  # the master follows the loaded 16-bit weight
    if common is None:
        if from_ckpt:
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
