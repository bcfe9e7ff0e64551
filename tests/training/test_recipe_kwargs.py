"""Every recipe takes Megatron Bridge's keyword arguments, through one helper."""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch

from viaduct.config import ConfigError
from viaduct.recipes import get_recipe, list_recipes, llama32_1b_pretrain_config, tiny_gpt_pretrain_config
from viaduct.recipes.common import RECIPE_KWARGS
from viaduct.training.comm_overlap import CommOverlapConfig
from viaduct.training.config import ConfigContainer, GPTDatasetConfig, MockGPTDatasetConfig

# keyword, value, where it lands
KEYWORDS: list[tuple[str, Any, str]] = [
    ("train_iters", 10, "train.train_iters"),
    ("global_batch_size", 64, "train.global_batch_size"),
    ("micro_batch_size", 4, "train.micro_batch_size"),
    ("seq_length", 2048, "model.seq_length"),
    ("lr", 1e-4, "optimizer.lr"),
    ("min_lr", 1e-6, "optimizer.min_lr"),
    ("adam_eps", 1e-5, "optimizer.adam_eps"),
    ("lr_warmup_iters", 7, "scheduler.lr_warmup_iters"),
    ("lr_decay_iters", 90, "scheduler.lr_decay_iters"),
    ("eval_interval", 25, "train.eval_interval"),
    ("save_interval", 40, "checkpoint.save_interval"),
    ("tensor_model_parallel_size", 2, "model.tensor_model_parallel_size"),
    ("pipeline_model_parallel_size", 2, "model.pipeline_model_parallel_size"),
    ("virtual_pipeline_model_parallel_size", 2, "model.virtual_pipeline_model_parallel_size"),
    ("context_parallel_size", 2, "model.context_parallel_size"),
    ("sequence_parallel", True, "model.sequence_parallel"),
    ("pipeline_dtype", torch.bfloat16, "model.pipeline_dtype"),
    ("account_for_embedding_in_pipeline_split", True, "model.account_for_embedding_in_pipeline_split"),
    ("account_for_loss_in_pipeline_split", True, "model.account_for_loss_in_pipeline_split"),
    ("use_megatron_fsdp", True, "ddp.use_megatron_fsdp"),
    ("wandb_project", "proj", "logger.wandb_project"),
    ("wandb_entity", "team", "logger.wandb_entity"),
    ("wandb_exp_name", "exp", "logger.wandb_exp_name"),
    ("precision_config", "fp32", "mixed_precision"),
    ("tensor_parallelism", 2, "model.tensor_model_parallel_size"),
    ("pipeline_parallelism", 2, "model.pipeline_model_parallel_size"),
    ("pipeline_parallelism_dtype", torch.float16, "model.pipeline_dtype"),
    ("virtual_pipeline_parallelism", 3, "model.virtual_pipeline_model_parallel_size"),
    ("context_parallelism", 2, "model.context_parallel_size"),
    ("sequence_parallelism", True, "model.sequence_parallel"),
]


def _get(cfg: ConfigContainer, path: str) -> tuple[Any, str, Any]:
    """(owning object, field name, value) of dotted `path`."""
    *parents, field = path.split(".")
    owner: Any = cfg
    for name in parents:
        owner = getattr(owner, name)
    return owner, field, getattr(owner, field)


@pytest.mark.parametrize("recipe", [llama32_1b_pretrain_config, tiny_gpt_pretrain_config])
@pytest.mark.parametrize(("keyword", "value", "path"), KEYWORDS, ids=[k[0] for k in KEYWORDS])
def test_each_keyword_sets_its_field(recipe, keyword: str, value: Any, path: str) -> None:
    before = _get(recipe(), path)[2]
    owner, field, got = _get(recipe(**{keyword: value}), path)
    assert got == value and got != before
    assert owner.source_of(field) == f"{recipe.__name__}({keyword}=...)"


def test_the_recipe_example_and_its_effect(tmp_path) -> None:
    cfg = llama32_1b_pretrain_config(
        train_iters=10, global_batch_size=64, seq_length=2048, lr=1e-4, dir=str(tmp_path), name="run1"
    )
    # The recipe's 500 warmup steps do not fit a 10-step run: said, never shortened behind the back.
    with pytest.raises(ConfigError, match="scheduler.lr_warmup_iters: warmup"):
        cfg.validate()
    cfg = llama32_1b_pretrain_config(
        train_iters=10,
        global_batch_size=64,
        seq_length=2048,
        lr=1e-4,
        lr_warmup_iters=2,
        dir=str(tmp_path),
        name="run1",
    )
    cfg.validate()
    run = os.path.join(str(tmp_path), "run1")
    assert cfg.checkpoint.save == cfg.checkpoint.load == os.path.join(run, "checkpoints")
    assert cfg.logger.tensorboard_dir == os.path.join(run, "tb_logs")
    assert cfg.dataset.seq_length == 2048  # follows the model
    assert cfg.scheduler.lr_decay_steps == 10 * 64  # the schedule follows the keywords
    assert cfg.checkpoint.source_of("save") == "llama32_1b_pretrain_config(dir=..., name=...)"


def test_dir_and_name_default_to_runs_and_the_recipe_name() -> None:
    assert llama32_1b_pretrain_config().checkpoint.save == os.path.join("./runs", "llama32_1b", "checkpoints")
    only_name = llama32_1b_pretrain_config(name="exp")
    assert only_name.checkpoint.save == os.path.join("./runs", "exp", "checkpoints")
    only_dir = llama32_1b_pretrain_config(dir="/results")
    assert only_dir.logger.tensorboard_dir == os.path.join("/results", "llama32_1b", "tb_logs")
    # The embedded default follows the same rule as every recipe: ./runs/tiny_gpt.
    assert tiny_gpt_pretrain_config().checkpoint.save == os.path.join("./runs", "tiny_gpt", "checkpoints")
    tiny = tiny_gpt_pretrain_config(dir="/results")
    assert tiny.checkpoint.load == os.path.join("/results", "tiny_gpt", "checkpoints")


def test_lr_warmup_iters_replaces_a_warmup_fraction() -> None:
    assert tiny_gpt_pretrain_config().scheduler.lr_warmup_fraction == 0.1
    cfg = tiny_gpt_pretrain_config(lr_warmup_iters=5)
    assert cfg.scheduler.lr_warmup_fraction is None
    assert cfg.validate().scheduler.lr_warmup_steps == 5 * 16


def test_data_keywords(tmp_path) -> None:
    cfg = llama32_1b_pretrain_config(data_paths=["0.3", "/data/a", "0.7", "/data/b"])
    assert isinstance(cfg.dataset, GPTDatasetConfig) and not isinstance(cfg.dataset, MockGPTDatasetConfig)
    assert cfg.dataset.data_path == ["0.3", "/data/a", "0.7", "/data/b"] and cfg.dataset.split == "9999,8,2"
    assert cfg.dataset.random_seed == 1234  # the recipe's other dataset settings carry over
    tiny = tiny_gpt_pretrain_config(mock=True)
    assert type(tiny.dataset) is MockGPTDatasetConfig and tiny.dataset.num_workers == 0
    tiny.validate()
    with pytest.raises(ConfigError, match="mock=True trains on synthetic tokens"):
        tiny_gpt_pretrain_config(mock=True, data_paths=["/data/a"])


def test_comm_overlap_keyword() -> None:
    overlap = CommOverlapConfig(overlap_grad_reduce=False)
    assert llama32_1b_pretrain_config(comm_overlap_config=overlap).comm_overlap is overlap


def test_unknown_keyword_is_a_type_error_listing_the_valid_ones() -> None:
    with pytest.raises(TypeError) as info:
        llama32_1b_pretrain_config(train_iter=10)
    text = str(info.value)
    assert "llama32_1b_pretrain_config() got unexpected keyword argument 'train_iter'" in text
    assert "did you mean train_iters" in text
    assert all(k in text for k in ("dir", "name", "global_batch_size", "seq_length", "lr_warmup_iters"))
    with pytest.raises(TypeError, match="both 'tensor_parallelism' and 'tensor_model_parallel_size'"):
        llama32_1b_pretrain_config(tensor_parallelism=2, tensor_model_parallel_size=2)


def test_every_recipe_takes_the_keywords() -> None:
    names = {name for name, doc in list_recipes().items() if not doc.startswith("alias of")}
    assert len(names) >= 7
    for name in names:
        cfg = get_recipe(name)(train_iters=7, lr=2e-4, name="kw")
        assert cfg.train.train_iters == 7 and cfg.optimizer.lr == 2e-4, name
        assert cfg.checkpoint.save == os.path.join("./runs", "kw", "checkpoints"), name
    assert set(RECIPE_KWARGS) >= {k for k, _, _ in KEYWORDS} | {"dir", "name", "data_paths", "mock"}
