"""`viaduct config validate --world-size N [--gpu-memory GB]`: the layout, the memory estimate per
GPU, and a failure naming the ways to fit when the estimate exceeds the GPU."""

import subprocess
import sys

import pytest

from viaduct.cli.main import run
from viaduct.config import ConfigError
from viaduct.models.accounting import MemoryBudgetError


def validate(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    assert run(["config", "validate", *args]) == 0
    return capsys.readouterr().out


def test_prints_the_layout_and_the_estimate_per_gpu(capsys: pytest.CaptureFixture[str]) -> None:
    out = validate(capsys, "--recipe", "llama3_8b", "--world-size", "8")
    lines = out.splitlines()
    assert lines[0] == "layout: dp 8 (sharded, optim_grads_params) × cp 1 × tp 1"
    assert lines[1].startswith("memory per GPU (estimate): parameters ")
    for part in ("gradients", "optimizer", "gathered weights", "activations", "logits", "total"):
        assert part in lines[1]
    assert lines[1].endswith("GiB (one GPU: 80 GiB)")
    assert lines[2].startswith("configuration is valid: world size 8, data-parallel 8")


def test_llama3_70b_layout(capsys: pytest.CaptureFixture[str]) -> None:
    out = validate(capsys, "--recipe", "llama3_70b", "--world-size", "64")
    lines = out.splitlines()
    assert lines[0] == (
        "layout: pp 4 (interleaved_1f1b, 5 virtual stages) × dp 2 (sharded, optim) × cp 1 × tp 8 "
        "with sequence parallel"
    )
    # The split, the schedule and its bubble: (4 - 1) / (16 × 5 + 4 - 1) = 3.6%.
    assert lines[1] == (
        "pipeline: 80 layers in 20 stages of 4 layers (4 ranks × 5 virtual stages); interleaved_1f1b "
        "schedule, 16 micro-batches per step, bubble 3.6%"
    )
    assert lines[2].startswith("memory per pipeline rank (estimate, GiB): rank 0 ")
    assert all(f"rank {r} " in lines[2] for r in range(4))
    # The first rank keeps the most micro-batches in flight: it is the one the budget is checked on.
    assert lines[3].startswith("memory per GPU (estimate, pipeline rank 0: the most): parameters ")
    assert lines[3].endswith("GiB (one GPU: 80 GiB)")
    out = validate(
        capsys,
        "--recipe",
        "llama3_70b",
        "--world-size",
        "64",
        "model.virtual_pipeline_model_parallel_size=null",
        "model.pipeline_schedule=1f1b",
    )
    assert (
        "pipeline: 80 layers in 4 stages of 20 layers; 1f1b schedule, 16 micro-batches per step, bubble 15.8%"
        in out
    )
    # Tensor parallelism 4 without the recipe's MLP recompute leaves each rank far more activations:
    # too much, said with the layout.
    with pytest.raises(MemoryBudgetError, match="pp 4 .* × tp 4"):
        run(
            [
                "config",
                "validate",
                "--recipe",
                "llama3_70b",
                "--world-size",
                "64",
                "model.tensor_model_parallel_size=4",
                "model.recompute_granularity=null",
                "model.recompute_modules=null",
            ]
        )
    assert "layout: pp 4 (interleaved_1f1b, 5 virtual stages) × dp 4 (sharded, optim) × cp 1 × tp 4" in (
        capsys.readouterr().out
    )


def test_over_budget_fails_with_the_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(MemoryBudgetError) as info:
        run(["config", "validate", "--recipe", "llama3_8b", "--world-size", "8", "--gpu-memory", "40"])
    out = capsys.readouterr().out
    assert out.startswith("layout: dp 8 (sharded, optim_grads_params)")
    assert "configuration is valid" not in out
    text = str(info.value)
    assert "needs about" in text and "more than the 40 GiB of one GPU" in text
    assert "estimate per GPU: parameters" in text
    assert "model.recompute_granularity=full" in text and "fits" in text
    assert "model.tensor_model_parallel_size=" in text

    # Plain data parallelism of the same model: sharding is one of the ways out.
    with pytest.raises(MemoryBudgetError, match="ddp.data_parallel_sharding_strategy=optim_grads_params"):
        run(
            [
                "config",
                "validate",
                "--recipe",
                "llama3_8b",
                "--world-size",
                "8",
                "ddp.use_distributed_optimizer=false",
                "ddp.data_parallel_sharding_strategy=no_shard",
            ]
        )


def test_without_world_size_nothing_is_estimated_unless_a_budget_is_given(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # One GPU cannot hold Llama 3 8B, but validate without --world-size checks the settings only.
    out = validate(capsys, "--recipe", "llama3_8b")
    assert "layout:" not in out and "memory per GPU" not in out
    assert out.startswith("configuration is valid: world size 1")
    with pytest.raises(MemoryBudgetError, match="on 1 GPU"):
        run(["config", "validate", "--recipe", "llama3_8b", "--gpu-memory", "80"])
    # A small model fits one GPU.
    out = validate(capsys, "--recipe", "llama32_1b", "--gpu-memory", "80", "train.micro_batch_size=1")
    assert "layout: dp 1 (replicated) × cp 1 × tp 1" in out and "(one GPU: 80 GiB)" in out


def test_unknown_vocabulary_is_a_note_unless_a_budget_is_given(capsys: pytest.CaptureFixture[str]) -> None:
    # The embedded default takes its vocabulary from its tokenizer when the run starts.
    out = validate(capsys, "--world-size", "2")
    assert "memory per GPU: not estimated: model.vocab_size is unset" in out
    assert "configuration is valid" in out
    with pytest.raises(ConfigError, match="model.vocab_size"):
        run(["config", "validate", "--world-size", "2", "--gpu-memory", "80"])
    out = validate(capsys, "--world-size", "2", "--gpu-memory", "80", "model.vocab_size=4096")
    assert "memory per GPU (estimate)" in out


@pytest.mark.parametrize("value", ["0", "-3", "nan", "inf", "lots"])
def test_gpu_memory_must_be_a_positive_number(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        run(["config", "validate", "--gpu-memory", value])
    assert info.value.code == 2
    assert "--gpu-memory: expected a positive number of GiB" in capsys.readouterr().err


@pytest.mark.slow
def test_over_budget_exits_2_without_traceback() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "viaduct", "config", "validate", "--recipe", "llama3_8b", "--world-size", "1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2, r.stdout + r.stderr
    assert "Traceback" not in r.stderr
    assert r.stdout.startswith("layout: dp 1")
    assert r.stderr.startswith("error: the configuration does not fit in GPU memory:")
    assert "options (estimate per GPU with each):" in r.stderr and "on 2 GPUs, fits" in r.stderr
