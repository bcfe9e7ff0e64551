"""Megatron Bridge's documented configuration examples, with only the import paths changed.

These are the snippets a Megatron Bridge user would paste: each must run as written here. Where a
snippet elides configs ("# ... other configs") the test supplies small ones. Where it calls
`pretrain(config, forward_step_func)` the test calls `config.validate()`, the step `pretrain`
performs first (a real training run of these sizes does not belong in a unit test). The
model-independence snippet builds its 24-layer model on the `meta` device, so the test needs no 5 GB
of memory.
"""

import pytest

from viaduct.models import GPTModelProvider
from viaduct.training.config import (
    CheckpointConfig,
    ConfigContainer,
    DistributedDataParallelConfig,
    DistributedInitConfig,
    GPTDatasetConfig,
    LoggerConfig,
    OptimizerConfig,
    ProfilingConfig,
    SchedulerConfig,
    TokenizerConfig,
    TrainingConfig,
)
from viaduct.training.mixed_precision import get_mixed_precision_config


def other_configs(seq_length: int = 2048) -> dict:
    return dict(
        optimizer=OptimizerConfig(lr=3e-4, min_lr=3e-5),
        scheduler=SchedulerConfig(start_weight_decay=0.01, end_weight_decay=0.01),
        dataset=GPTDatasetConfig(random_seed=1234, seq_length=seq_length),
        logger=LoggerConfig(),
        tokenizer=TokenizerConfig(tokenizer_type="NullTokenizer", vocab_size=32000),
        checkpoint=CheckpointConfig(),
    )


def test_what_is_config_container():
    model_provider = GPTModelProvider(num_layers=2, hidden_size=64, num_attention_heads=4, seq_length=2048)
    training_config = TrainingConfig(global_batch_size=8, micro_batch_size=2, train_iters=10)
    o = other_configs()
    optimizer_config, scheduler_config, dataset_config = o["optimizer"], o["scheduler"], o["dataset"]
    logger_config, tokenizer_config, checkpoint_config = o["logger"], o["tokenizer"], o["checkpoint"]
    distributed_config, ddp_config = DistributedInitConfig(), DistributedDataParallelConfig()
    peft_config, profiling_config, mp_config, comm_overlap_config = (
        None,
        ProfilingConfig(),
        "bf16_mixed",
        None,
    )

    # ConfigContainer brings together all training configurations
    config = ConfigContainer(
        model=model_provider,  # Model architecture and parallelism
        train=training_config,  # Training loop parameters
        optimizer=optimizer_config,  # Megatron Optimization settings
        scheduler=scheduler_config,  # Learning rate scheduling
        dataset=dataset_config,  # Data loading configuration
        logger=logger_config,  # Logging and monitoring
        tokenizer=tokenizer_config,  # Tokenization settings
        checkpoint=checkpoint_config,  # Checkpointing and resuming
        dist=distributed_config,  # Distributed training setup
        ddp=ddp_config,  # Megatron Distributed Data Parallel settings
        # Optional configurations
        peft=peft_config,  # Parameter-efficient fine-tuning
        profiling=profiling_config,  # Performance profiling
        mixed_precision=mp_config,  # Mixed precision training
        comm_overlap=comm_overlap_config,  # Communication overlap settings
    )
    config.validate()
    assert (
        config.model.bf16
        and config.model.params_dtype == get_mixed_precision_config("bf16_mixed").params_dtype
    )


def test_component_table_required_and_defaults():
    import dataclasses

    fields = {f.name: f for f in dataclasses.fields(ConfigContainer)}
    required = {
        n
        for n, f in fields.items()
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and f.init
    }
    assert required == {
        "model",
        "train",
        "optimizer",
        "scheduler",
        "dataset",
        "logger",
        "tokenizer",
        "checkpoint",
    }
    cfg = ConfigContainer(model=GPTModelProvider(), train=TrainingConfig(), **other_configs())
    assert type(cfg.dist).__name__ == "DistributedInitConfig" and type(cfg.ddp).__name__ == (
        "DistributedDataParallelConfig"
    )
    assert type(cfg.rng).__name__ == "RNGConfig" and type(cfg.rerun_state_machine).__name__ == (
        "RerunStateMachineConfig"
    )
    for name in (
        "mixed_precision",
        "comm_overlap",
        "peft",
        "profiling",
        "ft",
        "straggler",
        "nvrx_straggler",
        "inprocess_restart",
    ):
        assert getattr(cfg, name) is None, name


def test_all_of_these_approaches_work(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # 1. Direct Python configuration
    config = ConfigContainer(
        model=GPTModelProvider(num_layers=24, hidden_size=2048),
        train=TrainingConfig(global_batch_size=256, train_iters=10000),
        # ... other configs
        **other_configs(),
    )

    # 2. YAML-based serialization and deserialization (round-trip)
    config.to_yaml("my_config.yaml")
    loaded = ConfigContainer.from_yaml("my_config.yaml")  # Load previously saved config
    assert loaded == config
    config = loaded

    # 3. Programmatic override after creation
    config.train.global_batch_size = 512  # Override after instantiation
    config.model.num_layers = 48  # Modify model architecture
    assert config.train.global_batch_size == 512 and config.model.num_layers == 48


def test_dataclasses_of_dataclasses():
    import dataclasses

    assert dataclasses.is_dataclass(ConfigContainer)
    hints = {f.name: f.type for f in dataclasses.fields(ConfigContainer)}
    assert hints["train"] is TrainingConfig and hints["optimizer"] is OptimizerConfig


def test_lazy_configuration_and_deferred_validation():
    # Megatron Bridge approach - deferred validation
    config = TrainingConfig(train_iters=1000)
    config.train_iters = 5000  # User can safely override
    assert config.train_iters == 5000

    # Validation happens automatically right when training starts (pretrain calls validate first)
    container = ConfigContainer(
        model=GPTModelProvider(num_layers=2, hidden_size=64, num_attention_heads=4),
        train=config,
        **other_configs(seq_length=1024),
    )
    config.global_batch_size, config.micro_batch_size = 32, 4
    container.validate()
    assert container.scheduler.lr_decay_steps == 5000 * 32  # dependent values use the override


def test_model_independence():
    # Models can be used standalone
    model_provider = GPTModelProvider(
        num_layers=24,
        hidden_size=2048,
        vocab_size=50000,  # Must be explicitly set
        seq_length=2048,  # Must be explicitly set
        num_attention_heads=16,  # (the seed elides it; 0 heads cannot build a model)
    )
    # This works independently of other configs
    import torch

    from viaduct.models.accounting import num_parameters

    with torch.device("meta"):
        model_provider.finalize()
        model = model_provider.provide()
    assert model_provider.ffn_hidden_size == 4 * 2048 and model_provider.kv_channels == 128
    assert isinstance(model, torch.nn.Module)
    assert sum(p.numel() for p in model.parameters()) == num_parameters(model_provider)
    logits = model(torch.zeros(2, 16, dtype=torch.long, device="meta"))
    assert logits.shape == (2, 16, 50000)


def test_usage(capsys):
    # Create and configure
    config = ConfigContainer(
        model=GPTModelProvider(num_layers=24, seq_length=2048, hidden_size=1024, num_attention_heads=16),
        train=TrainingConfig(train_iters=1000, global_batch_size=16, micro_batch_size=2),
        dataset=GPTDatasetConfig(sequence_length=2048, random_seed=1234),  # Must match model seq_length
        # ... other required configs
        **{k: v for k, v in other_configs().items() if k != "dataset"},
    )

    # Modify as needed
    config.train.train_iters = 5000
    config.model.hidden_size = 4096

    # Start training - validation happens automatically
    config.validate()
    assert config.model.ffn_hidden_size == 4 * 4096
    assert config.scheduler.lr_decay_steps == 5000 * 16

    # Print YAML configuration to console
    config.print_yaml()
    assert "_target_: viaduct.training.config.container.ConfigContainer" in capsys.readouterr().out


def test_export_and_import(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = ConfigContainer(
        model=GPTModelProvider(num_layers=2, hidden_size=64, num_attention_heads=4),
        train=TrainingConfig(train_iters=10, global_batch_size=4, micro_batch_size=2),
        **other_configs(1024),
    )
    # Save to file
    config.to_yaml("config.yaml")
    # Load configuration from YAML file
    config2 = ConfigContainer.from_yaml("config.yaml")
    assert config2 == config
    config2.validate()


def test_seq_length_mismatch_is_caught_at_validation():
    config = ConfigContainer(
        model=GPTModelProvider(num_layers=2, hidden_size=64, num_attention_heads=4, seq_length=4096),
        train=TrainingConfig(train_iters=10, global_batch_size=4, micro_batch_size=2),
        **other_configs(2048),
    )
    with pytest.raises(ValueError, match=r"dataset.seq_length: conflicts with model.seq_length \(4096"):
        config.validate()
