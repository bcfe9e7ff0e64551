"""Mamba-2 and hybrid pretraining recipes (published shapes; mock data and a null tokenizer by default)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from viaduct.models import MambaModelProvider130M, NVIDIAMambaHybridModelProvider8B
from viaduct.recipes.common import PretrainKwargs, apply_recipe_kwargs, pretrain_common
from viaduct.recipes.registry import recipe
from viaduct.training.config import ConfigContainer

if TYPE_CHECKING:
    from typing_extensions import Unpack


@recipe("mamba2_130m")
def mamba2_130m_pretrain_config(**kwargs: Unpack[PretrainKwargs]) -> ConfigContainer:
    """Mamba-2 130M shape (24 Mamba layers, 768 wide, state 128, one B/C group), 2048-token context.

    The vocabulary is the GPT-NeoX tokenizer's 50277, padded to a multiple of 16 (50288) as the
    published checkpoints are. Embeddings stay untied (Megatron Bridge's default for this family; the
    published checkpoints tie them: model.share_embeddings_and_output_weights=true for that).

    Keyword arguments (`train_iters=`, `lr=`, `dir=`, ...): see `viaduct.recipes.common.PretrainKwargs`.
    With its one B/C group the 130M shape splits over no tensor- or context-parallel ranks; data
    parallelism, FSDP and pipeline parallelism scale it.
    """
    model = MambaModelProvider130M(vocab_size=50277, should_pad_vocab=True)
    cfg = pretrain_common(model, name="mamba2_130m")
    return apply_recipe_kwargs(cfg, kwargs, recipe="mamba2_130m_pretrain_config", default_name="mamba2_130m")


@recipe("mamba2_hybrid_8b")
def mamba2_hybrid_8b_pretrain_config(**kwargs: Unpack[PretrainKwargs]) -> ConfigContainer:
    """NVIDIA's Mamba-2-Hybrid 8B shape (56 layers: 24 Mamba, 4 attention with 8 KV groups, 28 MLP;
    4096 wide), 4096-token context, a 256000-token vocabulary, FSDP2 sharding of parameters,
    gradients and optimizer state over the data-parallel ranks, micro-batches of 1.

    Keyword arguments (`train_iters=`, `lr=`, `dir=`, ...): see `viaduct.recipes.common.PretrainKwargs`.
    Its 8 B/C groups split over up to 8 tensor × context-parallel ranks; pipeline parallelism splits
    the 56 layers.
    """
    cfg = pretrain_common(NVIDIAMambaHybridModelProvider8B(vocab_size=256000), name="mamba2_hybrid_8b")
    cfg.ddp.use_distributed_optimizer = True
    cfg.ddp.data_parallel_sharding_strategy = "optim_grads_params"
    cfg.train.micro_batch_size = 1
    return apply_recipe_kwargs(
        cfg, kwargs, recipe="mamba2_hybrid_8b_pretrain_config", default_name="mamba2_hybrid_8b"
    )
