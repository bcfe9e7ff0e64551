"""Shared template for pretraining recipes (Megatron Bridge's `_pretrain_common`, viaduct-flavoured)."""

from __future__ import annotations

from viaduct.models import GPTModelProvider
from viaduct.training.config import (
    CheckpointConfig,
    ConfigContainer,
    DistributedDataParallelConfig,
    LoggerConfig,
    MockGPTDatasetConfig,
    OptimizerConfig,
    RNGConfig,
    SchedulerConfig,
    TokenizerConfig,
    TrainingConfig,
)


def pretrain_common(model: GPTModelProvider, *, name: str) -> ConfigContainer:
    """A complete pretraining config around `model`: AdamW + cosine, mock data, bf16 mixed precision.

    Recipes call this, then change what differs; everything stays overridable from YAML and CLI.
    """
    run_dir = f"./runs/{name}"
    return ConfigContainer(
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
        logger=LoggerConfig(log_interval=10, log_throughput=True, tensorboard_dir=f"{run_dir}/tb_logs"),
        tokenizer=TokenizerConfig(tokenizer_type="NullTokenizer", vocab_size=model.vocab_size),
        checkpoint=CheckpointConfig(
            save=f"{run_dir}/checkpoints", load=f"{run_dir}/checkpoints", save_interval=500
        ),
        ddp=DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, overlap_grad_reduce=True, average_in_collective=True
        ),
        rng=RNGConfig(seed=1234),
        mixed_precision="bf16_mixed",
    )
