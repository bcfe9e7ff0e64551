"""Shared template for pretraining recipes (Megatron Bridge's `_pretrain_common`, viaduct-flavoured)
and the keyword arguments every recipe takes (`apply_recipe_kwargs`).

Recipes take Megatron Bridge's keyword arguments::

    llama32_1b_pretrain_config(train_iters=10, global_batch_size=64, seq_length=2048, lr=1e-4,
                               dir="/results", name="run1")

`dir`/`name` place the run's outputs as Bridge does: checkpoints in `<dir>/<name>/checkpoints` (saved
and resumed from), TensorBoard logs in `<dir>/<name>/tb_logs`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, TypedDict

from viaduct.config import ConfigError, DType, Problem
from viaduct.config.provenance import setting_source
from viaduct.models import GPTModelProvider, T5ModelProvider
from viaduct.training.comm_overlap import CommOverlapConfig
from viaduct.training.config import (
    CheckpointConfig,
    ConfigContainer,
    DistributedDataParallelConfig,
    GPTDatasetConfig,
    LoggerConfig,
    MockGPTDatasetConfig,
    MockT5DatasetConfig,
    OptimizerConfig,
    RNGConfig,
    SchedulerConfig,
    T5DatasetConfig,
    TokenizerConfig,
    TrainingConfig,
)
from viaduct.training.mixed_precision import MixedPrecisionConfig

if TYPE_CHECKING:
    import torch

DEFAULT_RUNS_DIR = "./runs"
"""Where a recipe's run directory `<dir>/<name>` lives when `dir` is not given."""

# Bridge's split for `data_paths` (its get_blend_fields_from_data_paths).
_DATA_PATHS_SPLIT = "9999,8,2"


class PretrainKwargs(TypedDict, total=False):
    """The keyword arguments every pretraining recipe takes (Megatron Bridge's names)."""

    dir: str | None
    """Base directory of the run's outputs; the run directory is <dir>/<name> (default ./runs)."""
    name: str
    """Name of the run: its directory under `dir` (default: the recipe's name)."""
    data_paths: list[str] | None
    """Indexed dataset prefixes (optionally weighted, as dataset.data_path); split 9999,8,2."""
    mock: bool
    """True: train on synthetic tokens (excludes data_paths)."""
    tensor_model_parallel_size: int
    """model.tensor_model_parallel_size (older Bridge name: tensor_parallelism)."""
    pipeline_model_parallel_size: int
    """model.pipeline_model_parallel_size (older Bridge name: pipeline_parallelism)."""
    pipeline_dtype: DType | str | torch.dtype | None
    """model.pipeline_dtype, a dtype or its name (older Bridge name: pipeline_parallelism_dtype)."""
    virtual_pipeline_model_parallel_size: int | None
    """model.virtual_pipeline_model_parallel_size (older Bridge name: virtual_pipeline_parallelism)."""
    context_parallel_size: int
    """model.context_parallel_size (older Bridge name: context_parallelism)."""
    sequence_parallel: bool
    """model.sequence_parallel (older Bridge name: sequence_parallelism)."""
    account_for_embedding_in_pipeline_split: bool
    """model.account_for_embedding_in_pipeline_split."""
    account_for_loss_in_pipeline_split: bool
    """model.account_for_loss_in_pipeline_split."""
    use_megatron_fsdp: bool
    """ddp.use_megatron_fsdp."""
    train_iters: int
    """train.train_iters."""
    global_batch_size: int
    """train.global_batch_size."""
    micro_batch_size: int
    """train.micro_batch_size."""
    seq_length: int
    """model.seq_length (the dataset follows it)."""
    lr: float
    """optimizer.lr (the peak learning rate)."""
    min_lr: float
    """optimizer.min_lr."""
    adam_eps: float
    """optimizer.adam_eps."""
    lr_warmup_iters: int
    """scheduler.lr_warmup_iters (replaces the recipe's warmup fraction, if it has one)."""
    lr_decay_iters: int | None
    """scheduler.lr_decay_iters (None: decay over the whole run)."""
    eval_interval: int | None
    """train.eval_interval."""
    save_interval: int | None
    """checkpoint.save_interval."""
    wandb_project: str | None
    """logger.wandb_project."""
    wandb_entity: str | None
    """logger.wandb_entity."""
    wandb_exp_name: str | None
    """logger.wandb_exp_name."""
    precision_config: MixedPrecisionConfig | str | None
    """mixed_precision: a recipe name ("bf16_mixed") or object."""
    comm_overlap_config: CommOverlapConfig | None
    """comm_overlap."""


# Older Bridge recipes (v0.2.0's model_config helpers) spelled the parallel sizes differently.
_OLD_NAMES = {
    "tensor_parallelism": "tensor_model_parallel_size",
    "pipeline_parallelism": "pipeline_model_parallel_size",
    "pipeline_parallelism_dtype": "pipeline_dtype",
    "virtual_pipeline_parallelism": "virtual_pipeline_model_parallel_size",
    "context_parallelism": "context_parallel_size",
    "sequence_parallelism": "sequence_parallel",
}


def _setter(component: str, field: str) -> Callable[[ConfigContainer, Any], None]:
    def set_field(cfg: ConfigContainer, value: Any) -> None:
        setattr(getattr(cfg, component), field, value)

    return set_field


def _set_seq_length(cfg: ConfigContainer, value: Any) -> None:
    cfg.model.seq_length = value
    if getattr(cfg.dataset, "seq_length", None) is not None:  # a recipe that pinned it keeps them equal
        cfg.dataset.seq_length = value


def _set_lr_warmup_iters(cfg: ConfigContainer, value: Any) -> None:
    cfg.scheduler.lr_warmup_fraction = None  # the warmup has one owner: the length given here
    cfg.scheduler.lr_warmup_iters = value


def _set_precision(cfg: ConfigContainer, value: Any) -> None:
    cfg.mixed_precision = value


def _set_comm_overlap(cfg: ConfigContainer, value: Any) -> None:
    cfg.comm_overlap = value


_SETTERS: dict[str, Callable[[ConfigContainer, Any], None]] = {
    **{
        name: _setter("model", name)
        for name in (
            "tensor_model_parallel_size",
            "pipeline_model_parallel_size",
            "virtual_pipeline_model_parallel_size",
            "context_parallel_size",
            "sequence_parallel",
            "account_for_embedding_in_pipeline_split",
            "account_for_loss_in_pipeline_split",
        )
    },
    "pipeline_dtype": _setter("model", "pipeline_dtype"),
    "use_megatron_fsdp": _setter("ddp", "use_megatron_fsdp"),
    **{name: _setter("train", name) for name in ("train_iters", "global_batch_size", "micro_batch_size")},
    "eval_interval": _setter("train", "eval_interval"),
    "seq_length": _set_seq_length,
    **{name: _setter("optimizer", name) for name in ("lr", "min_lr", "adam_eps")},
    "lr_warmup_iters": _set_lr_warmup_iters,
    "lr_decay_iters": _setter("scheduler", "lr_decay_iters"),
    "save_interval": _setter("checkpoint", "save_interval"),
    **{name: _setter("logger", name) for name in ("wandb_project", "wandb_entity", "wandb_exp_name")},
    "precision_config": _set_precision,
    "comm_overlap_config": _set_comm_overlap,
}
RECIPE_KWARGS: tuple[str, ...] = ("dir", "name", "data_paths", "mock", *_SETTERS, *_OLD_NAMES)
"""Every keyword argument a recipe takes."""


def set_run_dir(cfg: ConfigContainer, base_dir: str, name: str) -> str:
    """Put the run's outputs under `<base_dir>/<name>` as Bridge does; returns that directory.

    Checkpoints are saved to and resumed from `<run>/checkpoints`; TensorBoard logs go to
    `<run>/tb_logs`.
    """
    run_dir = os.path.join(base_dir, name)
    checkpoints = os.path.join(run_dir, "checkpoints")
    cfg.checkpoint.save = checkpoints
    cfg.checkpoint.load = checkpoints
    cfg.logger.tensorboard_dir = os.path.join(run_dir, "tb_logs")
    return run_dir


def _set_data(cfg: ConfigContainer, data_paths: list[str] | None, mock: bool) -> None:
    if mock and data_paths:
        raise ConfigError(
            Problem(
                "data_paths",
                "mock=True trains on synthetic tokens and reads no data",
                data_paths,
                fix="pass data_paths or mock=True, not both",
            )
        )
    ds = cfg.dataset
    # Carry over every dataset setting the recipe made, except the ones that name the data.
    named = ("data_path", "blend", "blend_per_split", "split")
    kept = {
        name: getattr(ds, name)
        for name, info in type(ds).spec().fields.items()
        if info.init and name not in named and ds.source_of(name) != "default"
    }
    # The same family of data (span corruption stays span corruption): its mock or its indexed kind.
    t5 = isinstance(ds, T5DatasetConfig)
    mock_cls, indexed_cls = (
        (MockT5DatasetConfig, T5DatasetConfig) if t5 else (MockGPTDatasetConfig, GPTDatasetConfig)
    )
    if mock:
        cfg.dataset = mock_cls(**kept)
    else:
        cfg.dataset = indexed_cls(**kept, data_path=list(data_paths or []), split=_DATA_PATHS_SPLIT)


def apply_recipe_kwargs(
    cfg: ConfigContainer, kwargs: Mapping[str, Any], *, recipe: str, default_name: str
) -> ConfigContainer:
    """Apply a recipe's keyword arguments (`PretrainKwargs`) to the config it built; returns `cfg`.

    An unknown keyword raises `TypeError` listing the valid ones, as a Python function would. Each
    value is recorded as set by "<recipe>(<keyword>=...)", and checked by `cfg.validate()` as any
    other setting.
    """
    from viaduct.config.errors import did_you_mean

    unknown = [k for k in kwargs if k not in RECIPE_KWARGS]
    if unknown:
        hints = [h for h in (did_you_mean(k, RECIPE_KWARGS) for k in unknown) if h]
        raise TypeError(
            f"{recipe}() got unexpected keyword argument{'s' * (len(unknown) > 1)} "
            f"{', '.join(map(repr, unknown))}"
            + (f" ({'; '.join(hints)})" if hints else "")
            + f"; valid keywords: {', '.join(RECIPE_KWARGS)}"
        )
    values = dict(kwargs)
    for old, new in _OLD_NAMES.items():
        if old in values and new in values:
            raise TypeError(f"{recipe}() got both {old!r} and {new!r}; they are the same setting")
    for key, value in values.items():
        if key in ("dir", "name", "data_paths", "mock"):
            continue
        with setting_source(f"{recipe}({key}=...)"):  # the name the caller used
            _SETTERS[_OLD_NAMES.get(key, key)](cfg, value)
    if "data_paths" in values or values.get("mock"):
        with setting_source(
            f"{recipe}(data_paths=...)" if "data_paths" in values else f"{recipe}(mock=True)"
        ):
            _set_data(cfg, values.get("data_paths"), bool(values.get("mock")))
    if "dir" in values or "name" in values:
        with setting_source(f"{recipe}(dir=..., name=...)"):
            set_run_dir(cfg, values.get("dir") or DEFAULT_RUNS_DIR, values.get("name") or default_name)
    return cfg


def pretrain_common(model: GPTModelProvider | T5ModelProvider, *, name: str) -> ConfigContainer:
    """A complete pretraining config around `model`: AdamW + cosine, mock data, bf16 mixed precision.

    Recipes call this, then change what differs; everything stays overridable from YAML and CLI.
    Outputs go to ./runs/<name> (`set_run_dir`).
    """
    cfg = ConfigContainer(
        model=model,
        train=TrainingConfig(
            train_iters=300_000,
            global_batch_size=32,
            micro_batch_size=2,
            eval_interval=500,
            eval_iters=32,
            manual_gc=True,
            manual_gc_interval=100,
        ),
        optimizer=OptimizerConfig(
            optimizer="adam",
            lr=3e-4,
            min_lr=3e-5,
            weight_decay=0.1,
            adam_beta1=0.9,
            adam_beta2=0.95,
            adam_eps=1e-8,
            clip_grad=1.0,
        ),
        scheduler=SchedulerConfig(
            lr_decay_style="cosine",
            lr_warmup_iters=500,
            start_weight_decay=0.033,
            end_weight_decay=0.033,
            weight_decay_incr_style="constant",
        ),
        # The model owns the sequence length; the dataset follows it (one owner, Bridge issue #879).
        dataset=MockGPTDatasetConfig(random_seed=1234, split="9999,8,2"),
        logger=LoggerConfig(log_interval=10, log_throughput=True),
        tokenizer=TokenizerConfig(tokenizer_type="NullTokenizer", vocab_size=model.vocab_size),
        checkpoint=CheckpointConfig(save_interval=500),
        ddp=DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, overlap_grad_reduce=True, average_in_collective=True
        ),
        rng=RNGConfig(seed=1234),
        mixed_precision="bf16_mixed",
    )
    set_run_dir(cfg, DEFAULT_RUNS_DIR, name)
    return cfg
