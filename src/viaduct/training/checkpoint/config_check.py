"""Compare a checkpoint's ``run_config.yaml`` with the configuration that resumes from it.

`check_resume_config` loads the saved configuration (safely: a disallowed ``_target_`` is refused
before anything is imported or called), diffs it field by field against the current one, refuses with
one `ConfigError` listing every change that cannot work on resume (parameter shapes or names, the
vocabulary) and returns the accepted changes as log lines.

A change is *incompatible* when the model built from the new config would have different parameter
names or shapes than the checkpoint holds, or when token ids would mean something else:

* sizes: ``num_layers``, ``hidden_size``, ``ffn_hidden_size``, ``num_attention_heads``,
  ``num_query_groups``, ``kv_channels``, ``vocab_size`` and the padded vocabulary (``should_pad_vocab``
  / ``make_vocab_size_divisible_by`` only through the padded size they produce);
* which tensors exist: ``share_embeddings_and_output_weights``, ``position_embedding_type``,
  ``add_bias_linear``, ``add_qkv_bias``, ``normalization`` (LayerNorm has a bias, RMSNorm none),
  ``gated_linear_unit`` (doubles fc1), ``qk_layernorm``, ``num_moe_experts``, ``mtp_num_layers``;
* ``seq_length`` only with learned absolute position embeddings (their table has seq_length rows);
* the tokenizer's vocabulary: ``tokenizer_type``, ``vocab_size``, ``vocab_extra_ids``,
  ``special_tokens``, ``tiktoken_pattern``, ``tiktoken_num_special_tokens``;
* ``optimizer.optimizer`` (adam <-> sgd) when the optimizer state is loaded (not with finetune or
  ``load_optim=false``).

Everything else is accepted and reported: learning rates, schedules, batch sizes, iterations,
``params_dtype`` / mixed precision (tensors are cast on load), dropout, data and logging. Tokenizer
file paths are accepted with a note (a moved file is common; a different vocabulary size is still
caught through ``model.vocab_size``).

The parallel layout may change (checkpoints hold whole tensors, whatever layout saved them): tensor
and context parallel sizes, sequence parallelism, the data-parallel sharding settings and the world
size are named together on one line, with the layout before and after. Only its effect on the padded
vocabulary (padding goes to a multiple of the tensor-parallel size) can refuse a resume.

Derived fields (`viaduct.config.derived`, computed by validate() and never loaded) are not compared.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from viaduct.config import ConfigError, ConfigWarning, Problem
from viaduct.config.base import ConfigBase
from viaduct.config.diff import Change, diff

if TYPE_CHECKING:
    from viaduct.training.config import ConfigContainer

__all__ = ["INCOMPATIBLE_FIELDS", "LAYOUT_FIELDS", "check_resume_config", "load_saved_config"]

log = logging.getLogger("viaduct")

_MODEL_SHAPE_FIELDS = (
    "num_layers",
    "hidden_size",
    "ffn_hidden_size",
    "num_attention_heads",
    "num_query_groups",
    "kv_channels",
    "vocab_size",
    "share_embeddings_and_output_weights",
    "position_embedding_type",
    "add_bias_linear",
    "add_qkv_bias",
    "normalization",
    "gated_linear_unit",
    "qk_layernorm",
    "num_moe_experts",
    "mtp_num_layers",
)
_TOKENIZER_VOCAB_FIELDS = (
    "tokenizer_type",
    "vocab_size",
    "vocab_extra_ids",
    "special_tokens",
    "tiktoken_pattern",
    "tiktoken_num_special_tokens",
)
INCOMPATIBLE_FIELDS: frozenset[str] = frozenset(
    [f"model.{n}" for n in _MODEL_SHAPE_FIELDS] + [f"tokenizer.{n}" for n in _TOKENIZER_VOCAB_FIELDS]
)
"""Dotted config paths whose change makes a checkpoint unloadable (see the module docstring)."""

_TOKENIZER_PATHS = frozenset({"tokenizer.tokenizer_model", "tokenizer.vocab_file", "tokenizer.merge_file"})

LAYOUT_FIELDS: tuple[str, ...] = (
    "model.tensor_model_parallel_size",
    "model.context_parallel_size",
    "model.sequence_parallel",
    "ddp.use_distributed_optimizer",
    "optimizer.use_distributed_optimizer",
    "ddp.data_parallel_sharding_strategy",
    "ddp.use_megatron_fsdp",
    "dist.use_torch_fsdp2",
    "ddp.num_distributed_optimizer_instances",
)
"""Dotted config paths of the parallel layout: a change is reported on one line, never refused."""


def load_saved_config(path: Path) -> ConfigContainer:
    """The configuration a checkpoint was saved with, leniently (keys of older versions are dropped)
    but safely: a `_target_` outside the allowlist raises `ConfigError` before anything is imported."""
    from viaduct.training.config import ConfigContainer

    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            Problem(
                "checkpoint.load",
                f"the checkpoint has no {path.name} to compare the configuration with ({path})",
                fix="resume from a checkpoint saved by viaduct, or load it with checkpoint.finetune=true",
            )
        )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConfigWarning)
        cfg = ConfigContainer.from_yaml(path, strict=False)
    for w in caught:  # dropped keys of an older version: worth a log line, not an error
        log.info("%s", w.message)
    return cfg


def _derived_paths(cfg: ConfigBase) -> set[str]:
    """Dotted paths of the fields computed by validate() (`derived()`): never a user's change."""
    out = set()
    for prefix, obj in cfg.walk():
        for name, info in type(obj).spec().fields.items():
            if info.derived:
                out.add(f"{prefix}.{name}" if prefix else name)
    return out


def _padded_vocab(model: Any) -> int | None:
    try:
        return int(model.padded_vocab_size())
    except Exception:  # vocab_size not filled in yet, or a provider without padding
        return None


def _incompatible(change: Change, saved: ConfigContainer, current: ConfigContainer) -> str | None:
    """Why `change` cannot work on resume, or None when it can."""
    path = change.path
    if path in INCOMPATIBLE_FIELDS:
        if path.startswith("tokenizer."):
            return "changes the tokenizer's vocabulary: token ids would mean something else"
        return "changes the model's parameter shapes or names"
    if path == "model.seq_length":
        if getattr(current.model, "position_embedding_type", None) == "learned_absolute":
            return "changes the learned position-embedding table (seq_length rows)"
        return None
    if path == "model._target_":
        return None  # a different provider class may still build the same tensors: the loader checks
    if path == "optimizer.optimizer":
        c = current.checkpoint
        if c.load_optim and not c.finetune:
            return "the saved optimizer state is for another optimizer"
    return None


def _fix_for(path: str) -> str:
    if path == "optimizer.optimizer":
        return "keep the saved optimizer, or set checkpoint.load_optim=false to start a fresh one"
    return (
        f"set {path} back to the value in the checkpoint's run_config.yaml (another shape cannot resume it)"
    )


def check_resume_config(
    saved_yaml_path: Path,
    current: ConfigContainer,
    *,
    saved_world_size: int | None = None,
    world_size: int | None = None,
) -> list[str]:
    """Diff the checkpoint's ``run_config.yaml`` against `current` (a validated config).

    Raises `ConfigError` listing every incompatible change (and for an unreadable or unsafe file);
    returns one line per accepted change ("optimizer.lr: 0.0003 -> 0.0001"), which it also logs.
    A changed parallel layout (`LAYOUT_FIELDS`, or the world size: `saved_world_size` is the one the
    checkpoint was saved by, `world_size` this run's) is one line of its own
    ("resuming with a different parallel layout: ...").
    """
    saved = load_saved_config(Path(saved_yaml_path))
    skip = _derived_paths(saved) | _derived_paths(current)
    changes = [c for c in diff(saved, current) if c.path not in skip and not c.path.startswith("checkpoint.")]
    problems: list[Problem] = []
    accepted: list[str] = []
    layout_changes = [c for c in changes if c.path in LAYOUT_FIELDS]
    changes = [c for c in changes if c.path not in LAYOUT_FIELDS]
    layout_line = _layout_line(layout_changes, saved, current, saved_world_size, world_size)
    for change in changes:
        why = _incompatible(change, saved, current)
        if why is not None:
            problems.append(
                Problem(
                    change.path,
                    f"{why}: the checkpoint was saved with {change.before!r}, this run has {change.after!r}",
                    fix=_fix_for(change.path),
                    source=_source(current, change.path),
                )
            )
            continue
        note = ""
        if change.path in _TOKENIZER_PATHS:
            note = " (tokenizer file moved? the vocabulary must be the same)"
        elif "derived" in (_source(current, change.path) or ""):
            note = " (derived)"
        accepted.append(f"{change}{note}")
    before, after = _padded_vocab(saved.model), _padded_vocab(current.model)
    if (
        before is not None
        and after is not None
        and before != after
        and "model.vocab_size" not in {p.path for p in problems}
    ):
        problems.append(_padded_vocab_problem(saved, current, before, after))
    if problems:
        raise ConfigError(
            problems,
            header=f"cannot resume from {Path(saved_yaml_path).parent}: the configuration changed in "
            f"{len(problems)} way(s) the checkpoint cannot follow (to start a new run instead, point "
            "checkpoint.save, checkpoint.load and logger.tensorboard_dir at another directory)",
        )
    if accepted:
        log.info(
            "resuming with %d configuration change(s) since the checkpoint:\n  %s",
            len(accepted),
            "\n  ".join(accepted),
        )
    if layout_line is not None:
        log.info("%s", layout_line)
        accepted.append(layout_line)
    return accepted


def _layout_line(
    changes: list[Change],
    saved: ConfigContainer,
    current: ConfigContainer,
    saved_world: int | None,
    world: int | None,
) -> str | None:
    """One line naming every layout change and the layout before and after (None: no change):
    "resuming with a different parallel layout: <field>: <before> -> <after>, ... (<layout> -> <layout>)"."""
    from viaduct.distributed.layout import layout_of

    parts = [str(c) for c in changes]
    if saved_world is not None and world is not None and saved_world != world:
        parts.append(f"world size: {saved_world} -> {world}")
    if not parts:
        return None
    line = "resuming with a different parallel layout: " + ", ".join(parts)
    if saved_world is not None and world is not None:
        try:
            before, after = layout_of(saved, saved_world).describe(), layout_of(current, world).describe()
        except (AttributeError, TypeError, ValueError):  # an older config lacking a layout field
            return line
        line += f" ({before} -> {after})"
    return line


def _padded_vocab_problem(
    saved: ConfigContainer, current: ConfigContainer, before: int, after: int
) -> Problem:
    """The embedding and output layer would change their number of rows: say which setting did it."""
    tp_before = int(getattr(saved.model, "tensor_model_parallel_size", 1) or 1)
    tp_after = int(getattr(current.model, "tensor_model_parallel_size", 1) or 1)
    message = f"changes the padded vocabulary (embedding and output rows) from {before} to {after}"
    if tp_before == tp_after:
        return Problem(
            "model.make_vocab_size_divisible_by",
            message,
            fix="set model.should_pad_vocab / make_vocab_size_divisible_by back to the saved values",
        )
    return Problem(
        "model.tensor_model_parallel_size",
        f"{message}: the vocabulary is padded to a multiple of the tensor-parallel size "
        f"({tp_before} -> {tp_after}; times make_vocab_size_divisible_by with should_pad_vocab)",
        tp_after,
        fix=f"resume with tensor_model_parallel_size={tp_before}, or train with a model.vocab_size that "
        "every tensor-parallel size you use pads alike (a multiple of them all)",
        source=_source(current, "model.tensor_model_parallel_size"),
    )


def _source(cfg: ConfigBase, path: str) -> str | None:
    """Where the current value of dotted `path` came from (for the error message)."""
    obj: Any = cfg
    *parents, leaf = path.split(".")
    for part in parents:
        obj = getattr(obj, part, None)
        if not isinstance(obj, ConfigBase):
            return None
    try:
        return obj.source_of(leaf)
    except Exception:
        return None
