"""Reading checkpoints saved by older versions: the row layouts of the fused weights.

Version 1 stored `linear_qkv` as ``[all q heads | all k groups | all v groups]`` and a gated
`linear_fc1` as ``[gate | up]``. Version 2 stores them so that a contiguous share of the rows (what a
tensor-parallel rank holds) is a whole unit: `linear_qkv` grouped by query group, each group
``[its q heads | its k | its v]`` (Megatron Core's layout), and the gated `linear_fc1` interleaved,
row 2i the gate and row 2i+1 the up projection of unit i.

A version-1 checkpoint is converted after its tensors are read, in full, into this process: the rows
of those weights, their biases and the optimizer state of each (Adam moments, float32 masters,
momentum) are reordered in place. Every version-1 checkpoint was saved unsharded, so this holds the
whole tensor; a sharded (DTensor) model cannot be converted shard by shard and refuses it instead.

The index functions are pure: ``new = old[index]`` along the rows.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.distributed.tensor import DTensor

from viaduct.training.checkpoint.errors import checkpoint_problem
from viaduct.training.checkpoint.flat import MODEL, OPTIMIZER, split_optimizer_key
from viaduct.training.checkpoint.layout import CHECKPOINT_VERSION

if TYPE_CHECKING:
    from viaduct.models.transformer_config import TransformerConfig

__all__ = [
    "check_upgradable",
    "checkpoint_version",
    "fc1_rows_v1_to_v2",
    "inverse",
    "qkv_rows_v1_to_v2",
    "row_permutations",
    "upgrade_v1",
]

_FUSED = re.compile(r"(?:^|\.)(linear_qkv|linear_fc1)\.(?:weight|bias)$")


def qkv_rows_v1_to_v2(num_heads: int, num_groups: int, head_dim: int) -> torch.Tensor:
    """Row index taking a `linear_qkv` weight from ``[q heads | k groups | v groups]`` (version 1)
    to the per-group ``[q heads of g | k of g | v of g]`` layout (version 2)."""
    per_group = num_heads // num_groups
    heads: list[int] = []  # head-sized blocks of the old layout, in the new order
    for g in range(num_groups):
        heads += range(g * per_group, (g + 1) * per_group)  # q heads of group g
        heads += [num_heads + g, num_heads + num_groups + g]  # k, v of group g
    blocks = torch.tensor(heads, dtype=torch.long)
    return (blocks[:, None] * head_dim + torch.arange(head_dim)).flatten()


def fc1_rows_v1_to_v2(ffn_hidden_size: int) -> torch.Tensor:
    """Row index taking a gated `linear_fc1` weight from ``[gate | up]`` (version 1) to interleaved
    rows (version 2: row 2i gate unit i, row 2i+1 up unit i)."""
    units = torch.arange(ffn_hidden_size)
    return torch.stack([units, units + ffn_hidden_size], dim=1).flatten()


def inverse(index: torch.Tensor) -> torch.Tensor:
    """The index undoing `index` (``old = new[inverse(index)]``)."""
    out = torch.empty_like(index)
    out[index] = torch.arange(index.numel())
    return out


def row_permutations(cfg: TransformerConfig) -> dict[str, torch.Tensor]:
    """Module name -> version 1 to 2 row index, for the fused weights of a model built from `cfg`."""
    assert cfg.kv_channels is not None and cfg.num_query_groups is not None and cfg.ffn_hidden_size
    perms = {"linear_qkv": qkv_rows_v1_to_v2(cfg.num_attention_heads, cfg.num_query_groups, cfg.kv_channels)}
    if cfg.gated_linear_unit:
        perms["linear_fc1"] = fc1_rows_v1_to_v2(cfg.ffn_hidden_size)
    return perms


def _param_name(key: str) -> str | None:
    """The parameter a flat checkpoint key belongs to (None for keys of neither kind)."""
    if key.startswith(MODEL):
        return key[len(MODEL) :]
    if key.startswith(OPTIMIZER):
        return split_optimizer_key(key)[1]
    return None


def _to_upgrade(tensors: dict[str, torch.Tensor], perms: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Key -> row index of every tensor in `tensors` that version 2 lays out differently."""
    out = {}
    for key, t in tensors.items():
        name = _param_name(key)
        m = _FUSED.search(name) if name is not None else None
        if m is None or m.group(1) not in perms or t.ndim == 0:
            continue  # 0-dim per-parameter state (Adam's step) has no rows
        out[key] = perms[m.group(1)]
    return out


def checkpoint_version(meta: dict[str, Any], common: dict[str, Any], fld: str, directory: Path) -> int:
    """The version a checkpoint was saved with: metadata.json's, else common.pt's, else 1 (written
    before versions were recorded). A version newer than this code knows is refused."""
    recorded = common.get("checkpoint_version", 1) if isinstance(common, dict) else 1
    version = meta.get("checkpoint_version", recorded)
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise checkpoint_problem(
            fld,
            f"it records checkpoint_version {version!r} (metadata.json), not a positive integer",
            directory,
            fix="load an intact copy of this checkpoint",
        )
    if version > CHECKPOINT_VERSION:
        raise checkpoint_problem(
            fld,
            f"it was saved as checkpoint version {version} by a newer viaduct; this one reads "
            f"versions up to {CHECKPOINT_VERSION}",
            directory,
            fix="load it with the viaduct version that saved it (or a newer one)",
        )
    return version


def check_upgradable(
    tensors: dict[str, torch.Tensor], cfg: TransformerConfig, fld: str, directory: Path
) -> None:
    """Refuse, before anything is read, to convert a version-1 checkpoint into sharded tensors."""
    sharded = sorted(
        k for k in _to_upgrade(tensors, row_permutations(cfg)) if isinstance(tensors[k], DTensor)
    )
    if sharded:
        raise checkpoint_problem(
            fld,
            "it is a version-1 checkpoint, whose fused weights (linear_qkv, gated linear_fc1) have "
            f"another row order, and this model holds them sharded ({sharded[0]}), which cannot be "
            "converted shard by shard",
            directory,
            fix="load it once in a single process (no tensor parallelism, no sharded data "
            "parallelism) and save it again: the new checkpoint has the current layout",
        )


def upgrade_v1(tensors: dict[str, torch.Tensor], cfg: TransformerConfig, fld: str, directory: Path) -> int:
    """Reorder, in place, the rows of the freshly read version-1 `tensors` (flat checkpoint keys,
    full unsharded tensors) into version 2's layout; returns how many tensors changed."""
    todo = _to_upgrade(tensors, row_permutations(cfg))
    # Model tensors are checked against the model before reading; optimizer state takes the
    # checkpoint's shapes, so a state that does not match its parameter's rows is caught here.
    wrong = [
        f"{k}: {list(tensors[k].shape)}" for k, index in todo.items() if tensors[k].shape[0] != len(index)
    ]
    if wrong:
        raise checkpoint_problem(
            fld,
            f"{len(wrong)} tensor(s) do not have the rows of their parameter in this model: {wrong[:3]}",
            directory,
            fix="build the model the checkpoint was saved from (see its run_config.yaml)",
        )
    seen: set[tuple[int, object]] = set()  # (storage, offset); offsets may be symbolic
    with torch.no_grad():
        for key, index in todo.items():
            t = tensors[key]
            ident = (t.untyped_storage().data_ptr(), t.storage_offset())
            if ident in seen:  # one tensor under two keys: reorder it once
                continue
            seen.add(ident)
            t.copy_(t.index_select(0, index.to(t.device)))
    return len(seen)
