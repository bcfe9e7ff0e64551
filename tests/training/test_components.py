"""The training components alone: defaults, finalize() rules and derived values.

Every rule is tested with a bad value (the ConfigError names the field, the rule and a fix) and a
good one; derived values are checked and recomputed after edits. The scheduler step math is in
test_scheduler_steps.py.
"""

import subprocess
import sys

import pytest

from viaduct.config import ConfigError, DType
from viaduct.config.docstrings import field_docstrings
from viaduct.training.config.checkpoint import CheckpointConfig
from viaduct.training.config.dataset import DataloaderConfig, GPTDatasetConfig, MockGPTDatasetConfig
from viaduct.training.config.distributed import DistributedDataParallelConfig, DistributedInitConfig
from viaduct.training.config.logger import LoggerConfig
from viaduct.training.config.optimizer import OptimizerConfig
from viaduct.training.config.profiling import ProfilingConfig
from viaduct.training.config.resilience import (
    FaultToleranceConfig,
    InProcessRestartConfig,
    NVRxStragglerDetectionConfig,
    RerunStateMachineConfig,
    StragglerDetectionConfig,
)
from viaduct.training.config.rng import RNGConfig
from viaduct.training.config.scheduler import SchedulerConfig
from viaduct.training.config.tokenizer import TokenizerConfig
from viaduct.training.config.train import TrainingConfig

ALL = [
    TrainingConfig,
    OptimizerConfig,
    SchedulerConfig,
    GPTDatasetConfig,
    MockGPTDatasetConfig,
    LoggerConfig,
    TokenizerConfig,
    CheckpointConfig,
    DistributedInitConfig,
    DistributedDataParallelConfig,
    RNGConfig,
    RerunStateMachineConfig,
    FaultToleranceConfig,
    StragglerDetectionConfig,
    NVRxStragglerDetectionConfig,
    InProcessRestartConfig,
    ProfilingConfig,
]
# Components whose defaults alone are a valid configuration.
VALID_BY_DEFAULT = [
    SchedulerConfig,
    LoggerConfig,
    CheckpointConfig,
    DistributedInitConfig,
    DistributedDataParallelConfig,
    RNGConfig,
    RerunStateMachineConfig,
    FaultToleranceConfig,
    StragglerDetectionConfig,
    NVRxStragglerDetectionConfig,
    InProcessRestartConfig,
    ProfilingConfig,
]


def problems(cfg) -> list:
    with pytest.raises(ConfigError) as info:
        cfg.finalize()
    return info.value.problems


def expect(cfg, path: str, *words: str):
    """finalize() fails with a problem at `path` whose message or fix has every word; returns it."""
    found = [p for p in problems(cfg) if p.path == path]
    assert found, f"no problem at {path!r}: {problems(cfg)}"
    p = found[0]
    text = f"{p.message} {p.fix}"
    assert p.fix, p
    for w in words:
        assert w in text, f"{w!r} not in {text!r}"
    return p


def train(**kw) -> TrainingConfig:
    return TrainingConfig(**{"micro_batch_size": 2, "global_batch_size": 8, "train_iters": 100, **kw})


# ----------------------------------------------------------------------------------------- general


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.__name__)
def test_every_field_documented_and_legacy_names_distinct(cls):
    docs = field_docstrings(cls)
    names = cls.spec().public_names()
    assert [n for n in names if not docs.get(n)] == []
    assert set(cls.legacy_fields()).isdisjoint(names)


def test_modules_import_without_torch():
    code = (
        "import sys\n"
        "import viaduct.training.config.train, viaduct.training.config.optimizer, "
        "viaduct.training.config.scheduler, viaduct.training.config.dataset, viaduct.training.config.logger, "
        "viaduct.training.config.tokenizer, viaduct.training.config.checkpoint, "
        "viaduct.training.config.distributed, viaduct.training.config.rng, "
        "viaduct.training.config.resilience, viaduct.training.config.profiling\n"
        "assert 'torch' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("cls", VALID_BY_DEFAULT, ids=lambda c: c.__name__)
def test_defaults_finalize_twice(cls):
    cfg = cls()
    cfg.finalize()
    cfg.finalize()


def test_spec_defaults():
    t, d, c = TrainingConfig(), GPTDatasetConfig(random_seed=1), CheckpointConfig()
    assert (t.eval_iters, t.eval_interval, t.skip_train, t.empty_unused_memory_level) == (100, 1000, False, 0)
    assert (d.num_workers, d.persistent_workers, d.data_sharding, d.drop_last) == (2, True, True, True)
    assert (d.reset_position_ids, d.reset_attention_mask, d.eod_mask_loss) == (False, False, False)
    assert (c.most_recent_k, c.ckpt_format, c.fully_parallel_save, c.save_tokenizer_assets) == (
        -1,
        "torch_dist",
        True,
        True,
    )
    assert OptimizerConfig().params_dtype == DType("float32") and OptimizerConfig().weight_decay == 0.01
    assert RNGConfig().seed == 1234 and ProfilingConfig().profile_ranks == [0]
    assert RerunStateMachineConfig().rerun_mode == "disabled"
    assert LoggerConfig().log_interval == 100 and DistributedInitConfig().distributed_timeout_minutes == 10
    assert GPTDatasetConfig.spec().required() == []  # random_seed defaults to 1234 (a usability fix)


@pytest.mark.parametrize(
    ("cfg", "path", "reason"),
    [
        (
            OptimizerConfig(overlap_param_gather_with_optimizer_step=True),
            "optimizer.overlap_param_gather_with_optimizer_step",
            "all-gather",
        ),
        (OptimizerConfig(main_grads_dtype="bf16"), "optimizer.main_grads_dtype", "non-fp32"),
        (DistributedInitConfig(use_sharp=True), "dist.use_sharp", "SHARP"),
        (
            DistributedDataParallelConfig(reduce_scatter_with_fp32_accumulation=True),
            "ddp.reduce_scatter_with_fp32_accumulation",
            "",
        ),
    ],
)
def test_unsupported_values_reported_by_type_check(cfg, path, reason):
    found = [p for p in cfg.check_types(path.split(".")[0]) if p.path == path]
    assert found and "is not supported yet" in found[0].message and reason in found[0].message


def test_supported_values_pass_type_check():
    assert OptimizerConfig(main_grads_dtype="fp32", lr=1.0).check_types("optimizer") == []
    assert OptimizerConfig(use_distributed_optimizer=True, lr=1.0).check_types("optimizer") == []
    assert DistributedInitConfig(use_torch_fsdp2=True).check_types("dist") == []
    sharded = DistributedDataParallelConfig(
        data_parallel_sharding_strategy="optim_grads",
        use_megatron_fsdp=True,
        num_distributed_optimizer_instances=2,
    )
    assert sharded.check_types("ddp") == []
    assert (
        TokenizerConfig(tokenizer_type="Bert").check_types("tokenizer")[0].path == "tokenizer.tokenizer_type"
    )


# ----------------------------------------------------------------------------------------- train


@pytest.mark.parametrize(
    ("kw", "path", "words"),
    [
        ({"micro_batch_size": 0}, "micro_batch_size", ["> 0", "train.micro_batch_size"]),
        ({"train_samples": 800}, "train_samples", ["both", "train.train_iters"]),
        ({"train_iters": -5}, "train_iters", ["> 0"]),
        ({"train_iters": None, "train_samples": 3}, "train_samples", ["0 steps", "at least 8"]),
        ({"eval_interval": 0}, "eval_interval", ["> 0", "train.eval_interval"]),
        ({"exit_duration_in_mins": 0}, "exit_duration_in_mins", ["leave it unset"]),
        ({"eval_iters": -1}, "eval_iters", [">= 0"]),
        ({"iterations_to_skip": [0, 3]}, "iterations_to_skip", ["from 1"]),
        ({"exit_interval": 0}, "exit_interval", ["> 0"]),
        ({"manual_gc_interval": -1}, "manual_gc_interval", [">= 0"]),
    ],
)
def test_train_rules(kw, path, words):
    expect(train(**kw), path, *words)


def test_train_reports_every_missing_value_at_once():
    paths = {p.path for p in problems(TrainingConfig())}
    assert paths == {"micro_batch_size", "global_batch_size", "train_iters"}


def test_train_derived_values_and_idempotence():
    t = train(eval_micro_batch_size=1)
    t.finalize()
    t.finalize()
    assert (
        t.effective_train_iters,
        t.effective_eval_global_batch_size,
        t.effective_eval_micro_batch_size,
    ) == (
        100,
        8,
        1,
    )
    t.global_batch_size, t.train_iters, t.train_samples = 16, None, 1000
    t.finalize()
    assert t.effective_train_iters == 62 and t.effective_eval_global_batch_size == 16
    assert t.train_iters is None  # the user's field is never rewritten
    assert t.source_of("effective_train_iters").startswith("derived")


# ----------------------------------------------------------------------------------------- optimizer


@pytest.mark.parametrize(
    ("kw", "path", "words"),
    [
        ({"lr": None}, "lr", ["optimizer.lr"]),
        ({"lr": -1.0}, "lr", [">= 0"]),
        ({"min_lr": 1e-2}, "min_lr", ["above lr", "optimizer.min_lr <= optimizer.lr"]),
        ({"decoupled_min_lr": 1e-5}, "decoupled_min_lr", ["decoupled_lr"]),
        ({"decoupled_lr": 1e-4, "decoupled_min_lr": 1e-3}, "decoupled_min_lr", ["above"]),
        ({"adam_beta2": 1.0}, "adam_beta2", ["[0.0, 1.0)"]),
        ({"adam_eps": 0.0}, "adam_eps", ["> 0"]),
        ({"fp16": True, "bf16": True}, "bf16", ["only one"]),
        ({"min_loss_scale": 2.0**40}, "min_loss_scale", ["initial_loss_scale"]),
        ({"clip_grad": -1.0}, "clip_grad", [">= 0"]),
        ({"hysteresis": 0}, "hysteresis", ["> 0"]),
    ],
)
def test_optimizer_rules(kw, path, words):
    expect(OptimizerConfig(**{"lr": 1e-3, **kw}), path, *words)


def test_optimizer_good():
    OptimizerConfig(lr=3e-4, min_lr=3e-5, decoupled_lr=1e-4, decoupled_min_lr=1e-5, clip_grad=0.0).finalize()


# ----------------------------------------------------------------------------------------- scheduler


@pytest.mark.parametrize(
    ("kw", "path", "words"),
    [
        ({"max_steps": 0}, "max_steps", ["> 0"]),
        ({"start_weight_decay": 0.1, "end_weight_decay": 0.05}, "end_weight_decay", [">= start"]),
        ({"start_weight_decay": 0.1}, "end_weight_decay", ["together"]),
        ({"start_weight_decay": 0.0, "end_weight_decay": 0.1}, "weight_decay_incr_style", ["linear"]),
        ({"start_weight_decay": -0.1, "end_weight_decay": 0.0}, "start_weight_decay", [">= 0"]),
        (
            {"override_opt_param_scheduler": True, "use_checkpoint_opt_param_scheduler": True},
            "use_checkpoint_opt_param_scheduler",
            ["exclude"],
        ),
        ({"lr_decay_iters": 10, "lr_warmup_samples": 5}, "lr_warmup_samples", ["mixes", "lr_decay_iters"]),
        ({"lr_warmup_fraction": 0.1, "lr_warmup_iters": 5}, "lr_warmup_iters", ["lr_warmup_fraction"]),
        ({"lr_warmup_fraction": 1.0}, "lr_warmup_fraction", ["[0.0, 1.0)"]),
        ({"lr_decay_iters": 0}, "lr_decay_iters", ["> 0"]),
    ],
)
def test_scheduler_rules(kw, path, words):
    expect(SchedulerConfig(**kw), path, *words)


def test_scheduler_good():
    SchedulerConfig(start_weight_decay=0.0, end_weight_decay=0.1, weight_decay_incr_style="cosine").finalize()
    SchedulerConfig(start_weight_decay=0.033, end_weight_decay=0.033, lr_warmup_fraction=0.01).finalize()


# ----------------------------------------------------------------------------------------- dataset


def ds(cls=GPTDatasetConfig, **kw):
    return cls(**{"random_seed": 1234, **kw})


@pytest.mark.parametrize(
    ("data_path", "blend"),
    [
        ("a b c", (["a", "b", "c"], None)),
        ("a b", (["a", "b"], None)),
        (["0.3", "/d/a", "0.7", "/d/b"], (["/d/a", "/d/b"], [0.3, 0.7])),
        ("1 a 3 b", (["a", "b"], [1.0, 3.0])),
    ],
)
def test_data_path_becomes_effective_blend(data_path, blend):
    d = ds(data_path=data_path, split="98,2")
    d.finalize()
    assert d.effective_blend == blend and d.blend is None and d.data_path == data_path
    assert d.mock is False
    assert d.split_matrix[0] == (0.0, 0.98) and d.split_matrix[1] == pytest.approx((0.98, 1.0))
    assert d.split_matrix[2] is None


def test_split_matrix_and_mock():
    d = ds(blend=(["a", "b"], [1.0, 2.0]), split="969,30,1")
    d.finalize()
    assert d.mock is False and d.effective_blend == (["a", "b"], [1.0, 2.0])
    expected = [(0.0, 0.969), (0.969, 0.999), (0.999, 1.0)]
    assert all(got == pytest.approx(want) for got, want in zip(d.split_matrix, expected))
    m = ds()
    m.finalize()
    assert m.mock is True and m.effective_blend is None and m.split is None
    assert m.split_matrix == [
        pytest.approx((0, 1 / 3)),
        pytest.approx((1 / 3, 2 / 3)),
        pytest.approx((2 / 3, 1)),
    ]
    per = ds(blend_per_split=[(["a"], None), None, (["c"], [1.0])])
    per.finalize()
    assert per.split_matrix is None and per.mock is False


@pytest.mark.parametrize(
    ("kw", "path", "words"),
    [
        ({"blend": (["a"], None), "data_path": "b", "split": "1"}, "data_path", ["one of"]),
        ({"blend": (["a", "b"], [1.0]), "split": "1"}, "blend", ["2 prefixes but 1 weights"]),
        ({"blend": (["a", "b"], [0.0, 0.0]), "split": "1"}, "blend", ["not all 0"]),
        ({"blend": (["a"], None)}, "split", ["969,30,1"]),
        ({"data_path": "a"}, "split", ["dataset.split"]),
        ({"data_path": ["0.5", "a", "b", "c"], "split": "1"}, "data_path", ["weighted"]),
        ({"data_path": "", "split": "1"}, "data_path", ["no data"]),
        ({"blend_per_split": [None, None, None], "split": "1"}, "split", ["blend_per_split"]),
        ({"blend_per_split": [(["a"], None)]}, "blend_per_split", ["3 entries"]),
        ({"blend_per_split": [(["a"], [1.0, 2.0]), None, None]}, "blend_per_split[0]", ["weights"]),
        ({"split": "a,b"}, "split", ["non-negative numbers"]),
        ({"split": "1,1,1,1"}, "split", ["up to three"]),
        ({"split": "0,0"}, "split", ["sum to 0"]),
        ({"seq_length": 0}, "seq_length", ["> 0"]),
        ({"seq_length": 1024, "sequence_length": 2048}, "sequence_length", ["1024", "dataset.seq_length"]),
        ({"random_seed": -1}, "random_seed", ["2**32"]),
        ({"num_workers": -1}, "num_workers", [">= 0"]),
        ({"num_dataset_builder_threads": 0}, "num_dataset_builder_threads", ["> 0"]),
        ({"per_dataset_sequences_path": "/no/such.json"}, "per_dataset_sequences_path", ["does not exist"]),
    ],
)
def test_dataset_rules(kw, path, words):
    expect(ds(**kw), path, *words)


@pytest.mark.parametrize("name", ["blend", "blend_per_split", "data_path"])
def test_mock_dataset_names_no_data(name):
    value = {"blend": (["a"], None), "blend_per_split": [None, None, None], "data_path": "a"}[name]
    expect(ds(MockGPTDatasetConfig, **{name: value}), name, "synthetic", "GPTDatasetConfig")
    m = ds(MockGPTDatasetConfig, split="1,0,0")
    m.finalize()
    assert m.mock is True and m.split_matrix == [(0.0, 1.0), None, None]


def test_dataloader_effective_persistent_workers(tmp_path):
    d = ds(num_workers=0, per_dataset_sequences_path=str(tmp_path))
    d.finalize()
    assert d.persistent_workers is True and d.effective_persistent_workers is False
    d.num_workers = 4
    d.finalize()
    assert d.effective_persistent_workers is True


def test_dataset_kinds_by_name_and_recompute():
    assert DataloaderConfig.variant("mock") is MockGPTDatasetConfig
    assert DataloaderConfig.variant("gpt") is GPTDatasetConfig
    assert DataloaderConfig not in DataloaderConfig.variants()
    assert GPTDatasetConfig().random_seed == 1234  # `dataset=mock` on the CLI builds a complete object
    ds(sequence_length=512, seq_length=512).finalize()  # Megatron Core's name agrees: fine
    d = ds(data_path="a", split="1")
    d.finalize()
    d.data_path = "0.5 x 0.5 y"
    d.finalize()
    assert d.effective_blend == (["x", "y"], [0.5, 0.5])


# ----------------------------------------------------------------------------------------- logger, tokenizer


def test_logger_rules():
    expect(LoggerConfig(log_interval=0), "log_interval", "> 0", "logger.log_interval")
    expect(LoggerConfig(wandb_exp_name="run1"), "wandb_exp_name", "wandb_project")
    expect(LoggerConfig(wandb_project=" "), "wandb_project", "empty")
    expect(LoggerConfig(log_memory_interval=0), "log_memory_interval", "> 0")
    LoggerConfig(wandb_project="p", wandb_exp_name="run1", tensorboard_dir="/tmp/tb").finalize()


@pytest.mark.parametrize(
    ("kw", "path", "words"),
    [
        ({}, "tokenizer_type", ["NullTokenizer"]),
        (
            {"tokenizer_type": "GPT2BPETokenizer", "merge_file": "/x"},
            "vocab_file",
            ["GPT2BPETokenizer needs"],
        ),
        ({"tokenizer_type": "GPT2BPETokenizer", "vocab_file": "/no/v.json"}, "merge_file", ["needs"]),
        (
            {"tokenizer_type": "GPT2BPETokenizer", "vocab_file": "/no/v.json", "merge_file": "/no/m"},
            "vocab_file",
            ["does not exist", "tokenizer.vocab_file"],
        ),
        ({"tokenizer_type": "SentencePieceTokenizer"}, "tokenizer_model", ["tokenizer.model"]),
        ({"tokenizer_type": "HuggingFaceTokenizer"}, "tokenizer_model", ["tokenizer.tokenizer_model"]),
        (
            {"tokenizer_type": "HuggingFaceTokenizer", "tokenizer_model": "./no/such/dir"},
            "tokenizer_model",
            ["does not exist"],
        ),
        ({"tokenizer_type": "TikTokenizer", "tokenizer_model": "/no/t.json"}, "tiktoken_pattern", ["v2"]),
        ({"tokenizer_type": "NullTokenizer"}, "vocab_size", ["32000"]),
        ({"tokenizer_type": "NullTokenizer", "vocab_size": 0}, "vocab_size", ["> 0"]),
        (
            {"tokenizer_type": "NullTokenizer", "vocab_size": 10, "null_tokenizer_eod_id": 10},
            "null_tokenizer_eod_id",
            ["[0, 10)"],
        ),
    ],
)
def test_tokenizer_rules(kw, path, words):
    expect(TokenizerConfig(**kw), path, *words)


def test_tokenizer_good(tmp_path):
    vocab, merges = tmp_path / "vocab.json", tmp_path / "merges.txt"
    vocab.write_text("{}")
    merges.write_text("")
    TokenizerConfig(
        tokenizer_type="GPT2BPETokenizer", vocab_file=str(vocab), merge_file=str(merges)
    ).finalize()
    TokenizerConfig(tokenizer_type="HuggingFaceTokenizer", tokenizer_model="org/not-downloaded").finalize()
    TokenizerConfig(tokenizer_type="NullTokenizer", vocab_size=32000, null_tokenizer_eod_id=0).finalize()
    TokenizerConfig(tokenizer_type="ByteLevelTokenizer").finalize()


# ----------------------------------------------------------------------------------------- checkpoint


@pytest.mark.parametrize(
    ("kw", "path", "words"),
    [
        ({"save_interval": 10}, "save_interval", ["checkpoint.save"]),
        ({"save": "/tmp/x", "save_interval": 0}, "save_interval", ["> 0"]),
        ({"async_save": True}, "async_save", ["checkpoint.save"]),
        ({"async_save": True, "save": "/tmp/x", "ckpt_format": "torch"}, "async_save", ["torch_dist"]),
        ({"ckpt_step": 5}, "ckpt_step", ["checkpoint.load"]),
        ({"load_main_params_from_ckpt": True}, "load_main_params_from_ckpt", ["load_optim"]),
        ({"pretrained_checkpoint": "/no/such/ckpt"}, "pretrained_checkpoint", ["does not exist"]),
        ({"load": "/no/such/ckpt", "save": "/elsewhere"}, "load", ["does not exist", "checkpoint.load"]),
        (
            {"load": "/no/such/ckpt", "save": "/no/such/ckpt", "exit_on_missing_checkpoint": True},
            "load",
            ["exit_on_missing_checkpoint"],
        ),
        ({"finetune": True}, "finetune", ["pretrained_checkpoint"]),
        ({"most_recent_k": 0}, "most_recent_k", ["-1"]),
    ],
)
def test_checkpoint_rules(kw, path, words):
    expect(CheckpointConfig(**kw), path, *words)


def test_checkpoint_good(tmp_path):
    run = str(tmp_path / "run")  # does not exist yet: the resume-if-present pattern
    CheckpointConfig(save=run, load=run, save_interval=100, async_save=True).finalize()
    CheckpointConfig(save=run, load=run + "/", most_recent_k=2).finalize()
    CheckpointConfig(pretrained_checkpoint=str(tmp_path), finetune=True).finalize()
    CheckpointConfig(
        load=str(tmp_path), ckpt_step=0, load_main_params_from_ckpt=True, load_optim=False
    ).finalize()


# ----------------------------------------------------------------------------------------- the rest


@pytest.mark.parametrize(
    ("cfg", "path", "words"),
    [
        (DistributedInitConfig(distributed_timeout_minutes=0), "distributed_timeout_minutes", ["> 0"]),
        (DistributedInitConfig(local_rank=-1), "local_rank", [">= 0"]),
        (
            DistributedInitConfig(distributed_timeout_seconds_after_init=0),
            "distributed_timeout_seconds_after_init",
            [],
        ),
        (DistributedDataParallelConfig(bucket_size=0), "bucket_size", ["ddp.bucket_size"]),
        (DistributedDataParallelConfig(bucket_size=10, num_buckets=2), "num_buckets", ["bucket_size"]),
        (RNGConfig(seed=0), "seed", ["rng.seed"]),
        (RNGConfig(seed=2**31), "seed", ["2**31"]),
        (RerunStateMachineConfig(spiky_loss_factor=0.5), "spiky_loss_factor", [">= 1"]),
        (
            NVRxStragglerDetectionConfig(
                enabled=True, calc_relative_gpu_perf=False, calc_individual_gpu_perf=False
            ),
            "calc_relative_gpu_perf",
            ["calc_individual_gpu_perf"],
        ),
        (NVRxStragglerDetectionConfig(enabled=True, report_time_interval=0), "report_time_interval", ["> 0"]),
        (
            NVRxStragglerDetectionConfig(enabled=True, gpu_relative_perf_threshold=1.5),
            "gpu_relative_perf_threshold",
            ["[0.0, 1.0]"],
        ),
        (
            NVRxStragglerDetectionConfig(enabled=True, gpu_individual_perf_threshold=-0.1),
            "gpu_individual_perf_threshold",
            ["[0.0, 1.0]"],
        ),
        (ProfilingConfig(profile_step_start=5, profile_step_end=4), "profile_step_end", ["before"]),
        (ProfilingConfig(profile_step_start=-1), "profile_step_start", [">= 0"]),
        (ProfilingConfig(profile_ranks=[0, -2]), "profile_ranks", ["non-negative"]),
        (
            ProfilingConfig(use_pytorch_profiler=True, use_nsys_profiler=True),
            "use_nsys_profiler",
            ["exclude"],
        ),
        (
            ProfilingConfig(record_memory_history=True, memory_snapshot_path=""),
            "memory_snapshot_path",
            ["empty"],
        ),
    ],
)
def test_other_component_rules(cfg, path, words):
    expect(cfg, path, *words)


def test_other_components_good():
    NVRxStragglerDetectionConfig(gpu_relative_perf_threshold=5.0).finalize()  # only checked when enabled
    NVRxStragglerDetectionConfig(enabled=True, calc_relative_gpu_perf=False).finalize()
    ProfilingConfig(
        use_pytorch_profiler=True, profile_step_start=3, profile_step_end=3, profile_ranks=[]
    ).finalize()
    RNGConfig(seed=1).finalize()
    DistributedDataParallelConfig(num_buckets=4).finalize()


@pytest.mark.parametrize("split", ["nan,1,1", "inf,1,0", "1,-1,0", "a,b"])
def test_split_parts_must_be_finite_non_negative_numbers(split):
    with pytest.raises(ConfigError, match="split: is not a list of up to three finite non-negative numbers"):
        ds(data_path="a", split=split).finalize()
