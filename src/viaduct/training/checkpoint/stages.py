"""Checkpoints of a model split into pipeline stages.

Parameter names are the whole model's on every stage (`decoder.layers.<global index>`), so a
checkpoint holds the model once, whatever the pipeline layout that saved it, and any layout loads
it. Two things need every stage's view: the optimizer's parameter groups (each stage knows only its
own parameters' names; rank 0 writes them for all) and, at load, telling a tensor that another stage
holds apart from one no stage has.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch.distributed as dist
from torch import nn

from viaduct.training.checkpoint.flat import MODEL, TensorInfo, model_tensors, split_optimizer_key

if TYPE_CHECKING:
    from viaduct.training.optim import MixedPrecisionOptimizer


def merge_stage_optimizer_common(common: dict[str, Any], group: dist.ProcessGroup) -> dict[str, Any]:
    """The optimizer's non-tensor state of the whole model: each pipeline stage knows only the names
    of its own parameters, so the stages' parameter groups are merged (rank 0 writes the result)."""
    gathered: list[dict[str, Any] | None] = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, common, group=group)
    merged = {**common, "param_groups": [], "extra_state": {}}
    for part in gathered:
        assert part is not None
        merged["extra_state"].update(part["extra_state"])
        for g in part["param_groups"]:
            same = next((m for m in merged["param_groups"] if _same_group(m, g)), None)
            if same is None:
                merged["param_groups"].append({**g, "param_names": list(g["param_names"])})
            else:
                same["param_names"] += [n for n in g["param_names"] if n not in same["param_names"]]
    return merged


def _same_group(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two stages' parameter groups are the same group (equal settings, names aside)."""
    strip = ("param_names", "lr", "weight_decay")  # the scheduler's values: equal on every stage anyway
    return {k: v for k, v in a.items() if k not in strip} == {k: v for k, v in b.items() if k not in strip}


def without_other_stages(
    available: dict[str, TensorInfo],
    model: nn.Module,
    optimizer: MixedPrecisionOptimizer | None,
    group: dist.ProcessGroup,
) -> dict[str, TensorInfo]:
    """The checkpoint's tensors without those of the parameters other pipeline stages hold, so that
    what is left over is what no stage of this model has (reported as unexpected, as without stages)."""
    mine = {k[len(MODEL) :] for k in model_tensors(model)}
    if optimizer is not None:
        mine |= {s.name for s in optimizer.slots}
    gathered: list[set[str] | None] = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, mine, group=group)
    others = set().union(*(g for g in gathered if g is not None)) - mine

    def name_of(key: str) -> str:
        return key[len(MODEL) :] if key.startswith(MODEL) else split_optimizer_key(key)[1]

    return {k: v for k, v in available.items() if name_of(k) not in others}
