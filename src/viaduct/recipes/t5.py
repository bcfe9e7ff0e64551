"""T5 pretraining recipe: the T5-base shape (220M) on span corruption of the embedded corpus."""

from __future__ import annotations

from typing import TYPE_CHECKING

from viaduct.models.t5.provider import T5ModelProvider220M
from viaduct.recipes.common import PretrainKwargs, apply_recipe_kwargs, pretrain_common
from viaduct.recipes.registry import recipe
from viaduct.training.config import ConfigContainer, T5DatasetConfig, TokenizerConfig

if TYPE_CHECKING:
    from typing_extensions import Unpack


@recipe("t5_220m")
def t5_220m_pretrain_config(**kwargs: Unpack[PretrainKwargs]) -> ConfigContainer:
    """T5 220M (T5-base shape: 12 + 12 layers, 768 wide), span corruption of the built-in corpus.

    Encoder sequences of 512 tokens, decoder 128; Megatron's masking (15% of the tokens in spans of
    up to 10, geometric lengths) over Python's documentation (`builtin:pydoc`) with the built-in
    BPE tokenizer and 100 sentinel tokens; plain data parallelism (T5 is not sharded yet), bf16.
    `data_paths=[...]` trains on other indexed data (a tokenizer with sentinels: vocab_extra_ids).

    Keyword arguments (`train_iters=`, `lr=`, `dir=`, ...): see `viaduct.recipes.common.PretrainKwargs`.
    """
    model = T5ModelProvider220M()
    cfg = pretrain_common(model, name="t5_220m")
    cfg.train.train_iters, cfg.train.global_batch_size, cfg.train.micro_batch_size = 20_000, 64, 8
    cfg.train.eval_interval, cfg.train.eval_iters = 500, 8
    cfg.optimizer.lr, cfg.optimizer.min_lr = 1e-4, 1e-5
    cfg.scheduler.lr_warmup_iters = 500
    cfg.dataset = T5DatasetConfig(data_path="builtin:pydoc", split="98,1,1", random_seed=1234)
    cfg.tokenizer = TokenizerConfig(
        tokenizer_type="HuggingFaceTokenizer", tokenizer_model="builtin:pydoc-bpe", vocab_extra_ids=100
    )
    model.vocab_size = None  # follows the tokenizer (its 4,096 tokens and the 100 sentinels)
    # Padded to a multiple of 128: the tokenizer's odd size would leave the output layer's GEMMs
    # misaligned, and cuBLAS then takes kernels several times slower.
    model.should_pad_vocab = True
    return apply_recipe_kwargs(cfg, kwargs, recipe="t5_220m_pretrain_config", default_name="t5_220m")
