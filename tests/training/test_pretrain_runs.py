"""Whole runs as users start them: TensorBoard files, fp16 skips, the CLI, SIGTERM, checkpoints."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from viaduct.testing import run_viaduct, tiny_pretrain_config, torchrun_viaduct
from viaduct.training.pretrain import pretrain


def _scalars(tb_dir: Path) -> dict[str, list[tuple[int, float]]]:
    ea = EventAccumulator(str(tb_dir))
    ea.Reload()
    return {tag: [(e.step, e.value) for e in ea.Scalars(tag)] for tag in ea.Tags()["scalars"]}


@pytest.mark.slow
def test_tensorboard_gets_every_step_with_megatron_names(tmp_path):
    tb = tmp_path / "tb"
    cfg = tiny_pretrain_config(
        "train.train_iters=6",
        "logger.log_interval=3",
        f"logger.tensorboard_dir={tb}",
        "logger.log_params_norm=true",
        "logger.log_validation_ppl_to_tensorboard=true",
        "logger.log_l2_norm_grad_to_tensorboard=true",
        "train.eval_interval=3",
    )
    pretrain(cfg)
    s = _scalars(tb)
    assert [step for step, _ in s["lm loss"]] == [1, 2, 3, 4, 5, 6]  # every step, though synced every 3
    assert [x for x, _ in s["lm loss vs samples"]] == [8, 16, 24, 32, 40, 48]
    assert {"learning-rate", "batch-size", "grad-norm", "params-norm"} <= set(s)
    assert [step for step, _ in s["lm loss validation"]] == [3, 6]
    assert "lm loss validation ppl" in s
    assert any(tag.startswith("grad-norm/decoder.layers.0") for tag in s)
    assert s["batch-size"][0][1] == 8


@pytest.mark.slow
def test_fp16_overflows_are_skipped_and_counted(tmp_path, caplog):
    tb = tmp_path / "tb"
    cfg = tiny_pretrain_config(
        "mixed_precision=fp16_mixed",
        "mixed_precision.initial_loss_scale=1e30",  # overflows at once; the scale halves until it fits
        "mixed_precision.hysteresis=1",
        "train.train_iters=6",
        "logger.log_interval=6",
        f"logger.tensorboard_dir={tb}",
    )
    with caplog.at_level("INFO", logger="viaduct"):
        state = pretrain(cfg)
    assert state.train_state.step == 6
    line = next(r.getMessage() for r in caplog.records if "iteration        6/" in r.getMessage())
    skipped = int(re.search(r"number of skipped iterations:\s+(\d+)", line).group(1))
    assert skipped >= 1
    scales = [v for _, v in _scalars(tb)["loss-scale"]]
    assert scales[0] < 1e30 and scales == sorted(scales, reverse=True)


def _cli(*args: str, cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return run_viaduct(*args, cwd=cwd, timeout=timeout)


@pytest.mark.slow
def test_cli_runs_the_embedded_default(tmp_path):
    """`viaduct pretrain` with no config trains the default recipe (shortened here for CI)."""
    proc = _cli(
        "pretrain",
        "train.train_iters=2",
        "train.global_batch_size=8",
        "logger.log_interval=1",
        "train.eval_iters=1",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout + proc.stderr
    assert "iteration        2/       2" in out and "lm loss" in out and "tokens per second per GPU" in out
    assert "validation loss at iteration 2" in out


@pytest.mark.slow
def test_cli_config_error_exits_2_with_the_field(tmp_path):
    proc = _cli("pretrain", "train.train_iter=4", cwd=tmp_path)
    assert proc.returncode == 2
    assert "train_iters" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_cli_nan_loss_prints_the_message_and_exits_1(tmp_path):
    """A learning rate of 1e30 blows the weights up: the loss is NaN by the fourth step."""
    proc = _cli(
        "pretrain",
        "--config-file",
        str(_tiny_yaml(tmp_path)),
        "optimizer.lr=1e30",
        "train.eval_iters=0",
        "logger.log_interval=1",
        cwd=tmp_path,
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "error: the training loss is {'lm loss': nan} at iteration" in proc.stderr
    assert "rerun_state_machine.check_for_nan_in_loss" in proc.stderr


def test_run_errors_are_user_facing_errors():
    """The CLI prints TrainingRunErrors without a traceback; each is a ValueError (the project's rule
    for user-facing errors) and still the RuntimeError it always was."""
    from viaduct.distributed.ddp import NonFiniteGradientError
    from viaduct.training.errors import TrainingRunError
    from viaduct.training.step_checks import NonFiniteLossError, WeightHashMismatchError

    for error in (NonFiniteLossError, WeightHashMismatchError, NonFiniteGradientError):
        assert issubclass(error, TrainingRunError)
        assert issubclass(error, ValueError) and issubclass(error, RuntimeError)


@pytest.mark.slow
def test_sigterm_finishes_the_step_saves_and_exits_0(tmp_path):
    save = tmp_path / "ckpt"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "viaduct",
            "pretrain",
            "--config-file",
            str(_tiny_yaml(tmp_path)),
            "train.train_iters=100000",
            "logger.log_interval=1",
            "train.eval_iters=0",
            f"checkpoint.save={save}",
            "checkpoint.save_interval=100000",
        ],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    lines = []
    deadline = time.monotonic() + 120
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        if "iteration        3/" in line:
            proc.send_signal(signal.SIGTERM)
            break
        assert time.monotonic() < deadline, "".join(lines)
    rest, _ = proc.communicate(timeout=120)
    out = "".join(lines) + rest
    assert proc.returncode == 0, out[-3000:]
    assert "received SIGTERM" in out
    step = int((save / "latest_checkpointed_iteration.txt").read_text().strip())
    assert step >= 3 and (save / f"iter_{step:07d}").is_dir()


def _tiny_yaml(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.yaml"
    tiny_pretrain_config().to_yaml(path)
    return path


def _losses(cfg) -> list[float]:
    from viaduct.training.callbacks import Callback

    class Losses(Callback):
        def __init__(self) -> None:
            self.values: list[float] = []

        def on_train_step_end(self, ctx) -> None:
            self.values.append(float(ctx.metrics["losses"]["lm loss"]))

    rec = Losses()
    pretrain(cfg, callbacks=[rec])
    return rec.values


def _losses_and_weights(cfg) -> tuple[list[float], dict[str, torch.Tensor]]:
    from viaduct.training.callbacks import Callback

    class Record(Callback):
        def __init__(self) -> None:
            self.losses: list[float] = []
            self.weights: dict[str, torch.Tensor] = {}

        def on_train_step_end(self, ctx) -> None:
            self.losses.append(float(ctx.metrics["losses"]["lm loss"]))

        def on_train_end(self, ctx) -> None:
            self.weights = {k: v.detach().clone() for k, v in ctx.model.state_dict().items()}

    rec = Record()
    pretrain(cfg, callbacks=[rec])
    return rec.losses, rec.weights


@pytest.mark.slow
def test_resume_from_a_checkpoint_continues_the_same_run(tmp_path):
    """20 steps straight equal 10 steps, a restart from the checkpoint, and 10 more: the losses and
    the final weights, bitwise (fp32, CPU)."""
    common = ("train.train_iters=20", "train.eval_iters=0", "dataset.num_workers=0")
    straight, straight_weights = _losses_and_weights(tiny_pretrain_config(*common))
    save = tmp_path / "ckpt"
    first = _losses(tiny_pretrain_config(*common, "train.exit_interval=10", f"checkpoint.save={save}"))
    second, weights = _losses_and_weights(
        tiny_pretrain_config(*common, f"checkpoint.save={save}", f"checkpoint.load={save}")
    )
    assert len(first) == 10 and len(second) == 10
    assert first + second == straight  # bitwise: same data position, RNG, optimizer and schedule
    assert weights.keys() == straight_weights.keys()
    for name, value in straight_weights.items():
        assert torch.equal(weights[name], value), name


@pytest.mark.slow
def test_finetune_starts_from_pretrained_weights_at_step_0(tmp_path):
    from viaduct.training.pretrain import finetune

    save = tmp_path / "base"
    base = _losses(
        tiny_pretrain_config("train.train_iters=20", "optimizer.lr=3e-3", f"checkpoint.save={save}")
    )
    tuned = _losses(
        tiny_pretrain_config(
            "train.train_iters=2", "train.eval_iters=0", f"checkpoint.pretrained_checkpoint={save}"
        )
    )
    fresh = _losses(tiny_pretrain_config("train.train_iters=2", "train.eval_iters=0"))
    assert len(tuned) == 2  # counted from step 0
    assert tuned[0] < fresh[0] - 0.5 and tuned[0] <= base[0]
    with pytest.raises(ValueError, match="pretrained_checkpoint"):
        finetune(tiny_pretrain_config(f"checkpoint.pretrained_checkpoint={tmp_path / 'missing'}"))


@pytest.mark.slow
def test_profiler_and_progress_file_through_pretrain(tmp_path):
    save = tmp_path / "ckpt"
    cfg = tiny_pretrain_config(
        "train.train_iters=4",
        f"checkpoint.save={save}",
        "logger.log_progress=true",
        f"logger.tensorboard_dir={tmp_path / 'tb'}",
        "+profiling.use_pytorch_profiler=true",
        "profiling.profile_step_start=2",
        "profiling.profile_step_end=3",
        "logger.timing_log_level=1",
        "logger.log_timers_to_tensorboard=true",
    )
    pretrain(cfg)
    traces = list((tmp_path / "torch_profile").glob("*.pt.trace.json*"))
    assert len(traces) == 1
    progress = (save / "progress.txt").read_text()
    assert "Starting job" in progress and "Saved checkpoint" in progress
    tags = set(_scalars(tmp_path / "tb"))
    assert any("forward-backward" in t for t in tags), tags


@pytest.mark.slow
@pytest.mark.distributed
def test_torchrun_runs_data_parallel(tmp_path):
    yaml = _tiny_yaml(tmp_path)
    proc = torchrun_viaduct(
        2,
        "pretrain",
        "--config-file",
        str(yaml),
        "train.train_iters=2",
        "train.eval_iters=0",
        cwd=tmp_path,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "world size 2" in out and "iteration        2/       2" in out


@pytest.mark.slow
def test_resume_on_the_builtin_corpus_continues_exactly(tmp_path):
    """The same on real packed documents (the pydoc corpus): the data position resumes exactly."""
    common = (
        "train.train_iters=6",
        "train.eval_iters=0",
        "dataset._target_=viaduct.training.config.GPTDatasetConfig",
        "dataset.data_path=builtin:pydoc",
        "dataset.split=90,5,5",
        "tokenizer.tokenizer_type=HuggingFaceTokenizer",
        "tokenizer.tokenizer_model=builtin:pydoc-bpe",
    )
    straight = _losses(tiny_pretrain_config(*common))
    save = tmp_path / "ckpt"
    first = _losses(tiny_pretrain_config(*common, "train.exit_interval=3", f"checkpoint.save={save}"))
    second = _losses(tiny_pretrain_config(*common, f"checkpoint.save={save}", f"checkpoint.load={save}"))
    assert first + second == straight


@pytest.mark.slow
def test_resume_with_a_longer_run_is_accepted_and_reported(tmp_path, caplog):
    save = tmp_path / "ckpt"
    common = ("train.eval_iters=0", f"checkpoint.save={save}")
    _losses(tiny_pretrain_config("train.train_iters=6", "train.exit_interval=3", *common))
    with caplog.at_level("INFO", logger="viaduct"):
        more = _losses(tiny_pretrain_config("train.train_iters=8", f"checkpoint.load={save}", *common))
    assert len(more) == 5  # steps 4..8 of the longer run
    assert "train.train_iters" in caplog.text and "scheduler.lr_decay_steps" in caplog.text
