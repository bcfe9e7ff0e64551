"""Tiny configurations for tests: a 2-layer GPT on synthetic tokens that trains in a second on a CPU."""

from __future__ import annotations

from viaduct.config import apply_overrides
from viaduct.recipes import get_recipe
from viaduct.recipes.llama import llama_model
from viaduct.training.config import (
    CheckpointConfig,
    ConfigContainer,
    LoggerConfig,
    MockGPTDatasetConfig,
    TokenizerConfig,
)


def tiny_pretrain_config(*overrides: str, seq_length: int = 32) -> ConfigContainer:
    """The embedded default shrunk: 2 layers, 64 wide, float32, 10 steps of 8 × `seq_length` tokens
    of synthetic data with the byte-level tokenizer (no corpus to build), writing no checkpoint and
    no TensorBoard logs until asked.

    `overrides` are Hydra-style strings applied last (`"train.train_iters=4"`).
    """
    cfg = get_recipe("default")()
    cfg.model = llama_model(
        num_layers=2,
        hidden_size=64,
        ffn_hidden_size=128,
        num_attention_heads=4,
        seq_length=seq_length,
        share_embeddings_and_output_weights=True,
        make_vocab_size_divisible_by=64,
    )
    cfg.mixed_precision = "fp32"
    cfg.train.train_iters = 10
    cfg.train.global_batch_size = 8
    cfg.train.micro_batch_size = 4
    cfg.train.eval_interval = 5
    cfg.train.eval_iters = 2
    cfg.scheduler.lr_warmup_iters = 0  # runs of 1-2 steps must validate; tests that need warmup set it
    cfg.dataset = MockGPTDatasetConfig(random_seed=1234, num_workers=0)
    cfg.tokenizer = TokenizerConfig(tokenizer_type="ByteLevelTokenizer")
    cfg.logger = LoggerConfig(log_interval=5)
    cfg.checkpoint = CheckpointConfig()  # saves nothing: the recipe's ./runs would be shared by tests
    if overrides:
        apply_overrides(cfg, list(overrides))
    return cfg
