"""Llama-family pretraining recipes (published shapes; mock data and a null tokenizer by default)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from viaduct.models import (
    GPTModelProvider,
    Llama2ModelProvider7B,
    Llama3ModelProvider8B,
    Llama3ModelProvider70B,
    Llama32ModelProvider1B,
)
from viaduct.models.gpt.provider import LlamaStyleProvider
from viaduct.recipes.common import PretrainKwargs, apply_recipe_kwargs, pretrain_common
from viaduct.recipes.registry import recipe
from viaduct.training.config import ConfigContainer

if TYPE_CHECKING:
    from typing_extensions import Unpack


def llama_model(**shape: object) -> GPTModelProvider:
    """A plain `GPTModelProvider` with the Llama architecture (RMSNorm, SwiGLU, RoPE, no biases,
    no dropout, untied embeddings) and the given shape; for custom sizes that keep the generic
    `_target_`. The published sizes are classes: `viaduct.models.Llama32ModelProvider1B` ...
    The architecture's values are `LlamaStyleProvider`'s, the base of those classes.
    """
    return GPTModelProvider(**{**LlamaStyleProvider.architecture(), **shape})


@recipe("llama32_1b")
def llama32_1b_pretrain_config(**kwargs: Unpack[PretrainKwargs]) -> ConfigContainer:
    """Llama 3.2 1B shape (16 layers, 2048 wide, tied embeddings, RoPE scaling factor 32).

    Keyword arguments (`train_iters=`, `lr=`, `dir=`, ...): see `viaduct.recipes.common.PretrainKwargs`.
    """
    seq_length = 8192  # pretraining context (the published model extends to 128k)
    model = Llama32ModelProvider1B(seq_length=seq_length)
    cfg = pretrain_common(model, name="llama32_1b")
    return apply_recipe_kwargs(cfg, kwargs, recipe="llama32_1b_pretrain_config", default_name="llama32_1b")


def _shard_everything(cfg: ConfigContainer) -> None:
    """FSDP2 sharding of parameters, gradients and optimizer state over the data-parallel ranks, on
    a model built on the meta device (each rank materializes only its shard)."""
    cfg.ddp.use_distributed_optimizer = True
    cfg.ddp.data_parallel_sharding_strategy = "optim_grads_params"
    cfg.model.init_model_with_meta_device = True


@recipe("llama3_8b")
def llama3_8b_pretrain_config(**kwargs: Unpack[PretrainKwargs]) -> ConfigContainer:
    """Llama 3 8B shape (32 layers, 4096 wide, 14336 FFN, 8 KV groups), FSDP2 for 8 x 80 GB GPUs.

    Parameters, gradients and optimizer state are sharded over the data-parallel ranks (FSDP2,
    strategy optim_grads_params); bf16 mixed precision, micro-batches of 1 x 8192 tokens. On 8 GPUs
    that is about 56 GiB per GPU (`viaduct config validate --recipe llama3_8b --world-size 8`).

    Keyword arguments (`train_iters=`, `lr=`, `tensor_model_parallel_size=`, `dir=`, ...): see
    `viaduct.recipes.common.PretrainKwargs`.
    """
    cfg = pretrain_common(Llama3ModelProvider8B(), name="llama3_8b")
    _shard_everything(cfg)
    cfg.train.micro_batch_size = 1
    return apply_recipe_kwargs(cfg, kwargs, recipe="llama3_8b_pretrain_config", default_name="llama3_8b")


@recipe("llama3_70b")
def llama3_70b_pretrain_config(**kwargs: Unpack[PretrainKwargs]) -> ConfigContainer:
    """Llama 3 70B shape (80 layers, 8192 wide, 28672 FFN, 64 heads, 8 KV groups), for 64 x 80 GB GPUs.

    Tensor parallelism 8 with sequence parallelism inside each 8-GPU node; pipeline parallelism 4
    with 5 virtual stages per rank (20 stages of 4 layers, interleaved 1F1B schedule); sharded data
    parallelism (FSDP2, strategy optim) over the remaining ranks; bf16 mixed precision, selective
    recompute of the MLPs, micro-batches of 1 x 8192 tokens. On 64 GPUs (data-parallel 2) the global
    batch of 32 is 16 micro-batches per step, a pipeline bubble of 3.6%, and the busiest pipeline rank
    (the first: its in-flight micro-batches) needs about 49 GiB per GPU
    (`viaduct config validate --recipe llama3_70b --world-size 64 --gpu-memory 80`). On 32 GPUs
    (no data parallelism) that is about 66 GiB: use full activation recompute there
    (`model.recompute_granularity=full model.recompute_method=uniform model.recompute_num_layers=1`:
    about 49 GiB).

    Why the MLPs are recomputed: PyTorch's sequence parallelism keeps the all-gathered input of each
    column-parallel GEMM for its backward (Megatron's gathers it again instead); without recompute
    the first pipeline rank would need about 74 GiB. The recomputed MLP keeps only its input's
    sequence shard and gathers it again in backward.

    Strategy optim rather than optim_grads_params: under pipeline parallelism PyTorch's schedules keep
    the weights gathered and the gradients unsharded from one micro-batch to the next anyway, so
    resharding after each forward would only add all-gathers.

    Keyword arguments (`train_iters=`, `lr=`, `tensor_model_parallel_size=`,
    `pipeline_model_parallel_size=`, `dir=`, ...): see `viaduct.recipes.common.PretrainKwargs`;
    `tensor_model_parallel_size=1` needs `sequence_parallel=False` too.
    """
    cfg = pretrain_common(Llama3ModelProvider70B(), name="llama3_70b")
    _shard_everything(cfg)
    cfg.ddp.data_parallel_sharding_strategy = "optim"
    model = cfg.model
    model.tensor_model_parallel_size = 8
    model.sequence_parallel = True
    model.pipeline_model_parallel_size = 4
    model.virtual_pipeline_model_parallel_size = 5
    model.recompute_granularity = "selective"
    model.recompute_modules = ["mlp"]
    cfg.train.micro_batch_size = 1
    return apply_recipe_kwargs(cfg, kwargs, recipe="llama3_70b_pretrain_config", default_name="llama3_70b")


@recipe("llama2_7b")
def llama2_7b_pretrain_config(**kwargs: Unpack[PretrainKwargs]) -> ConfigContainer:
    """Llama 2 7B shape (32 layers, 4096 wide, 11008 FFN, multi-head attention, 4k context).

    Keyword arguments (`train_iters=`, `lr=`, `dir=`, ...): see `viaduct.recipes.common.PretrainKwargs`.
    """
    cfg = pretrain_common(Llama2ModelProvider7B(), name="llama2_7b")
    return apply_recipe_kwargs(cfg, kwargs, recipe="llama2_7b_pretrain_config", default_name="llama2_7b")
