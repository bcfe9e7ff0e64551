"""The training loop's logging: console lines, metrics backends, timers, logging setup, progress.

Everything is real: TensorBoard event files are read back with TensorBoard's own reader, W&B runs
in offline mode and its run file is inspected, timers are summarised over real gloo groups.
"""

from __future__ import annotations

import io
import logging
import math
import re
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from viaduct.config import ConfigError
from viaduct.recipes import get_recipe
from viaduct.training.logging import (
    IntervalTiming,
    ProgressFile,
    StepRecord,
    Timers,
    TrainingLogger,
    console,
    setup_python_logging,
    teardown_python_logging,
    write_config_file,
)
from viaduct.training.logging.memory import (
    format_memory_line,
    memory_report,
    summarize_memory_stats,
    theoretical_memory_line,
)
from viaduct.training.logging.metrics import runtime_metrics
from viaduct.training.logging.timers import DummyTimer

CPU = torch.device("cpu")
SEQ = 256  # the default recipe's sequence length


@pytest.fixture(autouse=True)
def restore_viaduct_logger():
    """TrainingLogger installs a console handler on "viaduct": take it away so other tests see none."""
    viaduct_logger = logging.getLogger("viaduct")
    handlers, level = list(viaduct_logger.handlers), viaduct_logger.level
    yield
    viaduct_logger.handlers[:] = handlers
    viaduct_logger.setLevel(level)
    console._active_bar = None


def make_cfg(world_size: int = 1, **logger_fields):
    cfg = get_recipe("default")()
    cfg.logger.tensorboard_dir = cfg.checkpoint.save = cfg.checkpoint.load = None  # nothing in ./runs
    for name, value in logger_fields.items():
        setattr(cfg.logger, name, value)
    return cfg.validate(world_size=world_size)


def make_logger(cfg, *, rank: int = 0, world_size: int = 1, peak: float | None = None, device=CPU):
    return TrainingLogger(
        cfg,
        rank=rank,
        world_size=world_size,
        train_iters=cfg.train.train_iters,
        peak_flops_per_device=peak,
        device=device,
    )


def record(
    step: int, loss: float | None = 2.0, *, skipped: bool = False, nan: bool = False, **kw
) -> StepRecord:
    values = dict(
        step=step,
        consumed_samples=16 * step,
        learning_rate=3e-4,
        decoupled_learning_rate=None,
        global_batch_size=16,
        losses={} if loss is None else {"lm loss": loss},
        grad_norm=1.23456,
        num_zeros=None,
        params_norm=None,
        loss_scale=None,
        skipped=skipped,
        nan=nan,
    )
    values.update(kw)
    return StepRecord(**values)


def timing(iterations: int, elapsed_s: float = 1.0, **kw) -> IntervalTiming:
    values = dict(
        iterations=iterations, elapsed_s=elapsed_s, tokens=iterations * 16 * SEQ, flops=4e12, timers={}
    )
    values.update(kw)
    return IntervalTiming(**values)


def train_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if " iteration " in line]


def scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


# ---------------------------------------------------------------------------------------- console


def test_console_line_formats_and_averages_over_non_skipped_steps(capsys):
    cfg = make_cfg(log_throughput=True)
    lg = make_logger(cfg, peak=1e12)
    records = [
        record(1, 2.0),
        record(2, None, skipped=True),
        record(3, 4.0, loss_scale=1024.0, num_zeros=12.0, params_norm=123.4567),
        record(4, math.inf, skipped=True, nan=True, learning_rate=2.5e-4),
    ]
    lg.log_train(records, timing(4, elapsed_s=1.0, flops=4e12, tokens=4 * 16 * SEQ))
    lg.close()
    out = capsys.readouterr().out
    (line,) = train_lines(out)
    # Rank 0's summary (Megatron Bridge): 1 s over 4 iterations, 4 TFLOP/s per GPU.
    assert "Step Time : 0.25s GPU utilization: 4.0MODEL_TFLOP/s/GPU\n" in out

    assert re.match(r"^ \[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\] iteration ", line)
    assert " iteration        4/     200 |" in line
    assert " consumed samples:           64 |" in line
    assert " elapsed time per iteration (ms): 250.0 |" in line
    # 4e12 FLOPs in 1 s on 1 GPU = 4.0 TFLOP/s; 400% of a 1e12 peak; 16384 tokens/s.
    assert " throughput per GPU (TFLOP/s/GPU): 4.0 |" in line
    assert " tokens per second per GPU: 16384.0 |" in line
    assert " MFU: 400.0% |" in line
    assert " learning rate: 2.500000E-04 |" in line  # the last step's
    assert " global batch size:    16 |" in line
    assert " lm loss: 3.000000E+00 |" in line  # (2 + 4) / 2: skipped steps are left out
    assert " grad norm: 1.235 |" in line
    assert " number of skipped iterations:   2 |" in line
    assert " number of nan iterations:   1 |" in line
    assert "loss scale" not in line  # the last record has no loss scaler
    assert "decoupled" not in line
    # Field order is Megatron's.
    order = [
        "iteration",
        "consumed samples",
        "elapsed time",
        "throughput",
        "learning rate",
        "global batch",
        "lm loss",
    ]
    positions = [line.index(name) for name in order]
    assert positions == sorted(positions)


def test_optional_console_fields(capsys):
    lg = make_logger(make_cfg(log_throughput=False))
    last = record(
        2, 2.0, loss_scale=65536.0, num_zeros=7.0, params_norm=99.87654, decoupled_learning_rate=1e-5
    )
    lg.log_train([record(1, 2.0), last], timing(2))
    out = capsys.readouterr().out
    (line,) = train_lines(out)
    assert "TFLOP/s" not in out and "MFU" not in line  # only with logger.log_throughput
    assert " decoupled learning rate: 1.000000E-05 |" in line
    assert " loss scale: 65536.0 |" in line
    assert " num zeros: 7.0 |" in line
    assert " params norm: 99.877 |" in line

    lg = make_logger(make_cfg(log_throughput=True))  # no peak known: no MFU
    lg.log_train([record(1)], timing(1))
    (line,) = train_lines(capsys.readouterr().out)
    assert "TFLOP/s/GPU" in line and "MFU" not in line


def test_line_reaches_caplog_too(caplog):
    caplog.set_level(logging.INFO, logger="viaduct")
    make_logger(make_cfg()).log_train([record(1)], timing(1))
    assert any(" iteration        1/" in r.getMessage() for r in caplog.records)


def test_only_the_last_rank_prints_and_no_process_group_is_needed(capsys, tmp_path):
    assert not dist.is_initialized()
    cfg = make_cfg(world_size=2, tensorboard_dir=str(tmp_path / "tb"))
    first = make_logger(cfg, rank=0, world_size=2)
    last = make_logger(cfg, rank=1, world_size=2)
    first.log_train([record(1)], timing(1))
    first.log_evaluation(1, 16, {"lm loss": 2.0}, split="validation")
    first.info("from rank 0")
    # Rank 0 prints only its Step Time summary (log_throughput is on in the default recipe).
    assert capsys.readouterr().out == "Step Time : 1.00s GPU utilization: 2.0MODEL_TFLOP/s/GPU\nfrom rank 0\n"
    last.log_train([record(1)], timing(1))
    last.info("rank 1 says nothing")
    assert len(train_lines(capsys.readouterr().out)) == 1
    first.close()
    last.close()
    # Only the last rank wrote event files.
    assert len(list((tmp_path / "tb").glob("events.out.tfevents.*"))) == 1


def test_timers_block_on_console(capsys):
    lg = make_logger(make_cfg(timing_log_option="minmax"))
    lg.log_train([record(1)], timing(1, timers={"forward-backward": (0.1, 0.25)}))
    out = capsys.readouterr().out
    assert "(min, max) time across ranks (ms):" in out
    assert re.search(r"forward-backward \.+: \(100\.00, 250\.00\)", out)

    lg = make_logger(make_cfg(timing_log_option="max"))
    lg.log_train([record(1)], timing(1, timers={"optimizer": (0.1, 0.25)}))
    out = capsys.readouterr().out
    assert "max time across ranks (ms):" in out and re.search(r"optimizer \.+: 250\.00\n", out)


def test_no_memory_line_on_cpu(capsys):
    lg = make_logger(make_cfg(log_device_memory_used=True))
    lg.log_train([record(1)], timing(1))
    assert "memory (GB)" not in capsys.readouterr().out
    assert memory_report(CPU) == {}


def test_memory_statistics_to_gigabytes():
    stats = {
        "allocated_bytes.all.current": 1_234_567_890,
        "reserved_bytes.all.peak": 2_000_000_000,
        "num_alloc_retries": 3,
    }
    report = summarize_memory_stats(stats)
    assert report == {"current_allocated_mem": 1.2346, "peak_reserved_mem": 2.0, "alloc_retries": 3}
    assert summarize_memory_stats(stats, {"num_alloc_retries": "retries"}) == {"retries": 3}
    assert format_memory_line(3, 10, report) == (
        "[Rank 3] (after 10 iterations) memory (GB) | current_allocated_mem: 1.2346 | "
        "peak_reserved_mem: 2.0 | alloc_retries: 3"
    )


def test_theoretical_memory_line_follows_the_estimate():
    from viaduct.models.accounting import estimate_config_memory

    cfg = get_recipe("llama32_1b")()
    cfg.model.vocab_size = 128256
    cfg.validate()  # bf16_mixed: bf16 weights with float32 masters and main grads
    est = estimate_config_memory(cfg)
    line = theoretical_memory_line(cfg)
    weights = re.search(r"weight and optimizer=([\d.]+) MB, activation=([\d.]+) MB, total=([\d.]+) MB", line)
    assert line.startswith("Theoretical memory footprints: ") and weights
    w, a, total = (float(x) for x in weights.groups())
    # 1.24B parameters x (2 bf16 + 4 main grad + 4 master + 8 Adam) bytes
    assert w == pytest.approx(1.2358e9 * 18 / 2**20, rel=1e-3)
    assert a == pytest.approx((est.activations + est.logits) / 2**20, abs=0.01)
    assert total == pytest.approx(w + a, abs=0.02)
    assert theoretical_memory_line(get_recipe("default")()) is None  # vocabulary not known yet
    sharded = get_recipe("llama32_1b")()
    sharded.model.vocab_size = 128256
    sharded.ddp.use_distributed_optimizer = True
    sharded.validate(world_size=8)
    w8 = float(re.search(r"weight and optimizer=([\d.]+) MB", theoretical_memory_line(sharded)).group(1))
    assert w8 < w / 2  # the run's layout: Adam state and masters sharded over 8 ranks (ZeRO-1)


def test_progress_bar_only_on_a_tty(monkeypatch, capsys):
    cfg = make_cfg()
    lg = make_logger(cfg)  # capsys' stdout is not a terminal: no bar
    lg.progress(3)
    assert capsys.readouterr().out == ""
    lg.close()

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    term = Terminal()
    monkeypatch.setattr(sys, "stdout", term)
    lg = TrainingLogger(
        cfg, rank=0, world_size=1, train_iters=50, peak_flops_per_device=None, device=CPU, start_step=10
    )
    lg.progress(12)
    assert lg._bar is not None and lg._bar.n == 12  # starts at start_step
    lg.log_train([record(11), record(12)], timing(2))  # printed above the bar, through tqdm.write
    lg.close()
    lg.close()  # idempotent
    assert console._active_bar is None
    text = term.getvalue()
    assert " iteration       12/      50 |" in text
    assert "12/50" in text  # the bar itself


# ---------------------------------------------------------------------------------------- metrics


def test_tensorboard_scalars_names_steps_and_sample_axis(tmp_path):
    tb = tmp_path / "tb"
    cfg = make_cfg(
        tensorboard_dir=str(tb),
        tensorboard_log_interval=2,
        log_world_size_to_tensorboard=True,
        log_timers_to_tensorboard=True,
        log_throughput_to_tensorboard=True,
        log_runtime_to_tensorboard=True,
        runtime_time_unit="seconds",
        throughput_window_size=2,
    )
    lg = make_logger(cfg, peak=1e13)
    lg.log_train(
        [record(s, float(s), loss_scale=8.0, num_zeros=1.0, params_norm=5.0) for s in (1, 2, 3, 4)],
        timing(4, elapsed_s=1.0, timers={"forward-backward": (0.1, 0.2)}),
    )
    lg.log_train([record(5, 5.0, decoupled_learning_rate=1e-5), record(6, 6.0)], timing(2, elapsed_s=1.0))
    lg.close()
    s = scalars(tb)

    assert s["learning-rate"] == [
        (2, pytest.approx(3e-4)),
        (4, pytest.approx(3e-4)),
        (6, pytest.approx(3e-4)),
    ]
    assert [x for x, _ in s["learning-rate vs samples"]] == [32, 64, 96]  # consumed samples
    assert s["lm loss"] == [(2, 2.0), (4, 4.0), (6, 6.0)]
    assert [x for x, _ in s["lm loss vs samples"]] == [32, 64, 96]
    assert s["batch-size"][0] == (2, 16.0) and "batch-size vs samples" in s
    assert s["loss-scale"] == [(2, 8.0), (4, 8.0)] and "loss-scale vs samples" in s
    for name in ("grad-norm", "num-zeros", "params-norm", "world-size"):
        assert name in s and f"{name} vs samples" in s
    assert s["world-size"][0] == (2, 1.0)
    assert "decoupled-learning-rate" not in s  # step 5 is not on the interval
    # Per interval, at its last step:
    assert s["iteration-time"] == [(4, 0.25), (6, 0.5)]
    assert s["forward-backward-time"] == [(4, pytest.approx(0.2))]
    assert s["throughput/tflops/device"] == [(4, 4.0), (6, 4.0)]
    assert s["throughput/mfu"] == [(4, pytest.approx(40.0)), (6, pytest.approx(40.0))]
    # Rolling window of 2 steps: at step 6 both steps took 0.5 s -> 2 batches / s, 32 samples / s.
    assert s["throughput/batches_per_sec"][-1] == (6, 2.0)
    assert s["throughput/samples_per_sec"][-1] == (6, 32.0)
    assert s["throughput/tokens_per_sec"][-1] == (6, 32.0 * SEQ)
    assert s["throughput/global_batch_size"][-1] == (6, 16.0)
    assert s["time/batches"] == [(2, 2.0), (4, 4.0), (6, 6.0)]
    assert s["time/samples"][-1] == (6, 96.0) and s["time/tokens"][-1] == (6, 96.0 * SEQ)
    assert {"time/total", "time/remaining_estimate"} <= s.keys()
    assert not any(name.startswith("memory/") for name in s)  # CPU: no memory statistics


def test_tensorboard_switches(tmp_path):
    tb = tmp_path / "tb"
    cfg = make_cfg(tensorboard_dir=str(tb), log_loss_scale_to_tensorboard=False)
    lg = make_logger(cfg)
    lg.log_train([record(1, loss_scale=4.0, decoupled_learning_rate=2e-5)], timing(1))
    lg.log_scalars(1, {"l2_norm/grad/global": 0.5})
    lg.close()
    s = scalars(tb)
    assert "loss-scale" not in s
    assert s["decoupled-learning-rate"] == [(1, pytest.approx(2e-5))]
    assert s["l2_norm/grad/global"] == [(1, 0.5)]
    for absent in ("world-size", "iteration-time", "throughput/tflops", "time/total"):
        assert absent not in s


def test_runtime_estimate_units():
    m = runtime_metrics(
        elapsed_s=3600.0,
        step=20,
        start_step=10,
        train_iters=30,
        consumed_samples=320,
        tokens=320 * SEQ,
        unit="hours",
    )
    # 10 steps in this job took an hour; 10 steps remain.
    assert m["time/remaining_estimate"] == pytest.approx(1.0)
    assert m["time/total"] == pytest.approx(1.0)
    assert m["time/batches"] == 20 and m["time/samples"] == 320


def test_skip_train_metrics_log_still_logs_evaluation(tmp_path, capsys):
    tb = tmp_path / "tb"
    lg = make_logger(make_cfg(tensorboard_dir=str(tb), skip_train_metrics_log=True))
    lg.log_train([record(1), record(2)], timing(2))
    assert capsys.readouterr().out == ""
    lg.log_evaluation(2, 32, {"lm loss": 1.5}, split="validation")
    lg.close()
    assert "validation loss at iteration 2" in capsys.readouterr().out
    assert set(scalars(tb)) == {"lm loss validation", "lm loss validation vs samples"}


def test_validation_box_and_perplexity(tmp_path, capsys):
    tb = tmp_path / "tb"
    lg = make_logger(make_cfg(tensorboard_dir=str(tb), log_validation_ppl_to_tensorboard=True))
    lg.log_evaluation(100, 3200, {"lm loss": 2.0}, split="validation")
    lg.log_evaluation(100, 3200, {"lm loss": 30.0}, split="test")
    with pytest.raises(ValueError, match="split"):
        lg.log_evaluation(100, 3200, {"lm loss": 2.0}, split="train")  # type: ignore[arg-type]
    lg.close()
    lines = capsys.readouterr().out.splitlines()
    text = (
        " validation loss at iteration 100 on validation set |"
        " lm loss value: 2.000000E+00 | lm loss PPL: 7.389056E+00 | "
    )
    assert lines[:3] == ["-" * (len(text) + 1), text, "-" * (len(text) + 1)]
    # exp(min(20, x)): a diverged loss still prints a number
    assert "on test set | lm loss value: 3.000000E+01 | lm loss PPL: 4.851652E+08 |" in lines[4]
    s = scalars(tb)
    assert s["lm loss validation"] == [(100, 2.0)]
    assert s["lm loss validation vs samples"] == [(3200, 2.0)]
    assert s["lm loss validation ppl"] == [(100, pytest.approx(math.exp(2.0)))]
    assert s["lm loss validation ppl vs samples"] == [(3200, pytest.approx(math.exp(2.0)))]
    assert s["lm loss test"] == [(100, 30.0)]
    assert s["lm loss test ppl"] == [(100, pytest.approx(math.exp(20.0), rel=1e-6))]


def test_nan_validation_loss_prints_nan_perplexity(tmp_path, capsys):
    """The cap at exp(20) must not turn a NaN loss into a finite perplexity (min(20, nan) is 20)."""
    from viaduct.training.eval import perplexity

    assert math.isnan(perplexity(math.nan))
    assert perplexity(math.inf) == pytest.approx(math.exp(20.0))  # a diverged loss still prints a number
    tb = tmp_path / "tb"
    lg = make_logger(make_cfg(tensorboard_dir=str(tb), log_validation_ppl_to_tensorboard=True))
    lg.log_evaluation(10, 320, {"lm loss": math.nan}, split="validation")
    lg.close()
    out = capsys.readouterr().out
    assert "lm loss value: NAN | lm loss PPL: NAN |" in out
    assert math.isnan(scalars(tb)["lm loss validation ppl"][0][1])


@pytest.mark.slow
def test_wandb_offline_run(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-env"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    save_dir = tmp_path / "wb"
    cfg = make_cfg(wandb_project="viaduct-test", wandb_exp_name="smoke", wandb_save_dir=str(save_dir))
    lg = make_logger(cfg)
    lg.log_train([record(1, 2.5), record(2, 2.25)], timing(2))
    lg.log_evaluation(2, 32, {"lm loss": 2.0}, split="validation")
    lg.close()
    lg.close()
    runs = list((save_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and runs[0].is_dir()
    (run_file,) = runs[0].glob("run-*.wandb")
    names = (b"learning-rate", b"lm loss", b"samples vs steps", b"lm loss validation", b"viaduct-test")
    # W&B's own service process writes the run file; it may still be flushing when finish() returns.
    deadline = time.monotonic() + 20
    data = run_file.read_bytes()
    while not all(name in data for name in names) and time.monotonic() < deadline:
        time.sleep(0.2)
        data = run_file.read_bytes()
    for name in names:
        assert name in data
    assert b"learning-rate vs samples" not in data  # W&B gets step-indexed scalars only


def test_missing_wandb_is_a_config_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # makes `import wandb` fail as if not installed
    cfg = make_cfg(wandb_project="p")
    with pytest.raises(ConfigError) as err:
        make_logger(cfg, rank=0, world_size=1)
    (problem,) = err.value.problems
    assert problem.path == "logger.wandb_project"
    assert 'pip install "viaduct[wandb]"' in (problem.fix or "")


# ---------------------------------------------------------------------------------------- timers


def test_timers_levels_and_dummy():
    timers = Timers(log_level=1, log_option="minmax", barrier=True, device=CPU)
    fine = timers("batch-generator", log_level=2)
    assert isinstance(fine, DummyTimer) and fine is timers("other", log_level=2)
    fine.start()
    fine.stop()
    assert fine.elapsed() == 0.0

    step = timers("forward-backward", log_level=1)
    assert step is timers("forward-backward", log_level=1)
    with pytest.raises(ValueError, match="created at log level 1"):
        timers("forward-backward", log_level=0)
    step.start(barrier=True)  # no process group: the barrier request is a no-op
    with pytest.raises(RuntimeError, match="started twice"):
        step.start()
    time.sleep(0.02)
    step.stop(barrier=True)
    assert timers.names == ["forward-backward"]
    summary = timers.summarize(["forward-backward", "batch-generator"], normalizer=2.0)
    assert list(summary) == ["forward-backward"]  # dummies are left out
    lo, hi = summary["forward-backward"]
    assert lo == hi and 0.01 <= lo < 0.5
    assert timers("forward-backward", log_level=1).elapsed() == 0.0  # summarize reset it

    level0 = Timers(log_level=0, device=CPU)
    assert isinstance(level0("forward-backward", log_level=1), DummyTimer)
    with pytest.raises(ValueError):
        Timers(log_level=3)


def test_timer_elapsed_while_running():
    timer = Timers(0, device=CPU)("interval-time")
    timer.start()
    time.sleep(0.01)
    first = timer.elapsed(reset=True)
    assert first >= 0.01 and timer.active  # still running after the read
    timer.stop()
    assert timer.elapsed(reset=False) < first + 0.5


def test_timers_summarize_with_a_gloo_group(tmp_path):
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        timers = Timers(1, "max", device=CPU)
        t = timers("optimizer", log_level=1)
        t.start(barrier=True)
        time.sleep(0.01)
        t.stop(barrier=True)
        ((name, (lo, hi)),) = timers.summarize(["optimizer"]).items()
        assert name == "optimizer" and lo == hi >= 0.01
        assert timers.summarize_all(["optimizer"]) == {}  # reset by the first summary
    finally:
        dist.destroy_process_group()


def _two_rank_timers(rank: int, path: str, out: str) -> None:
    dist.init_process_group("gloo", store=dist.FileStore(path, 2), rank=rank, world_size=2)
    try:
        timers = Timers(1, "minmax", device=CPU)
        t = timers("forward-backward", log_level=1)
        t.start()
        time.sleep(0.05 * (rank + 1))  # rank 1 is the slow one
        t.stop()
        if rank == 1:
            timers("only-on-rank-1", log_level=1).start()
            timers("only-on-rank-1", log_level=1).stop()
        names = ["forward-backward", "only-on-rank-1"]
        summary = timers.summarize(names, normalizer=1.0, reset=False)
        per_rank = timers.summarize_all(names)
        if rank == 0:
            Path(out).write_text(repr((summary, per_rank)))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.distributed
def test_timers_summarize_across_two_ranks(tmp_path):
    out = tmp_path / "out.txt"
    mp.spawn(_two_rank_timers, args=(str(tmp_path / "store"), str(out)), nprocs=2, join=True)
    summary, per_rank = eval(out.read_text())
    lo, hi = summary["forward-backward"]
    assert 0.04 <= lo < hi and hi >= 0.09
    assert "only-on-rank-1" in summary  # ranks without the timer are left out of min/max
    assert per_rank["forward-backward"][0] == pytest.approx(lo) and per_rank["only-on-rank-1"][0] == 0.0


# ---------------------------------------------------------------------------------------- setup


@pytest.fixture
def clean_logging():
    """Undo setup_python_logging and restore every logger's level (set_level_for_all_loggers)."""
    manager = logging.Logger.manager
    saved = {name: lg.level for name, lg in manager.loggerDict.items() if isinstance(lg, logging.Logger)}
    root_level = logging.getLogger().level
    yield
    teardown_python_logging()
    for name, lg in list(manager.loggerDict.items()):
        if isinstance(lg, logging.Logger):
            lg.setLevel(saved.get(name, logging.NOTSET))
    logging.getLogger().setLevel(root_level)


class Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.names.append(record.name)


def test_setup_python_logging_levels_and_module_filter(clean_logging):
    collect = Collect()
    root = logging.getLogger()
    root.addHandler(collect)
    root.setLevel(logging.DEBUG)
    try:
        logging.getLogger("noisy.module.child")
        setup_python_logging(
            make_cfg(logging_level=logging.WARNING, modules_to_filter=["noisy.module"]).logger
        )
        assert logging.getLogger("viaduct").level == logging.WARNING
        assert root.level == logging.DEBUG  # only viaduct's loggers without set_level_for_all_loggers
        logging.getLogger("noisy.module.child").warning("dropped")
        logging.getLogger("noisy.module").warning("dropped")
        logging.getLogger("noisy.modulex").warning("kept")  # a different logger that shares the prefix
        logging.getLogger("viaduct.training").info("below the level")
        logging.getLogger("viaduct.training").warning("kept")
        assert collect.names == ["noisy.modulex", "viaduct.training"]

        setup_python_logging(make_cfg(logging_level=logging.ERROR, set_level_for_all_loggers=True).logger)
        assert root.level == logging.ERROR and logging.getLogger("noisy.module").level == logging.ERROR
        logging.getLogger("noisy.module.child").error("kept now: the filter was replaced")
        assert collect.names[-1] == "noisy.module.child"
    finally:
        root.removeHandler(collect)


def test_filter_warnings_hides_repeated_torch_warnings(clean_logging):
    from torch.utils.checkpoint import checkpoint

    def run_checkpoint() -> None:
        checkpoint(torch.sin, torch.ones(2, requires_grad=True))  # no use_reentrant: torch warns

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        run_checkpoint()
    assert any("use_reentrant" in str(w.message) for w in seen)

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        setup_python_logging(make_cfg(filter_warnings=True).logger)
        for _ in range(3):
            run_checkpoint()
            warnings.warn_explicit(
                "repeated torch notice", UserWarning, "dataloader.py", 1, module="torch.utils.data"
            )
        for _ in range(2):
            warnings.warn("user code warns every time", UserWarning, stacklevel=1)
    messages = [str(w.message) for w in seen]
    assert not any("use_reentrant" in m for m in messages)
    assert messages.count("repeated torch notice") == 1
    assert messages.count("user code warns every time") == 2


def test_write_config_file(tmp_path):
    path = tmp_path / "cfg" / "run.yaml"
    cfg = make_cfg(save_config_filepath=str(path))
    assert write_config_file(cfg, rank=1) is None and not path.exists()
    assert write_config_file(cfg, rank=0) == str(path)
    assert "train_iters: 200" in path.read_text()


# ---------------------------------------------------------------------------------------- progress.txt


def test_progress_file(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    progress = ProgressFile(tmp_path)
    progress.job_start(0, world_size=8)
    progress.checkpoint_saved(
        100, 3200, tokens=2_500_000_000, flops_so_far=8e15, elapsed_s=100.0, world_size=8
    )
    resumed = ProgressFile(tmp_path)  # a second job resumes from that checkpoint
    resumed.job_start(100, world_size=8)
    resumed.checkpoint_saved(
        200, 6400, tokens=5_000_000_000, flops_so_far=1.6e16, elapsed_s=50.0, world_size=8
    )

    rows = [line.split("\t") for line in (tmp_path / "progress.txt").read_text().splitlines()]
    assert len(rows) == 4
    assert all(r[1] == "Job ID: 42" and r[2] == "# GPUs: 8" for r in rows)
    assert rows[0][3:] == ["Starting job", "Iteration: 0"]
    assert rows[1][3:] == [
        "Saved checkpoint",
        "Iteration: 100",
        "Job throughput: 10.0 TFLOP/s/GPU",  # 8e15 FLOPs / (100 s * 8 GPUs)
        "Cumulative throughput: 10.0 TFLOP/s/GPU",
        "Floating-point operations: 8.00e+15",
        "Tokens (in billions): 2.50",
        "Consumed samples: 3200",
    ]
    # The second job counts from the checkpoint it resumed: 8e15 FLOPs in 50 s on 8 GPUs.
    assert rows[3][5] == "Job throughput: 20.0 TFLOP/s/GPU"
    assert rows[3][6] == "Cumulative throughput: 40.0 TFLOP/s/GPU"  # 1.6e16 since the first start
    assert rows[3][8] == "Tokens (in billions): 5.00"

    cfg = make_cfg()
    assert ProgressFile.from_config(cfg, rank=0) is None  # log_progress is off
    cfg.logger.log_progress = True
    cfg.checkpoint.save = str(tmp_path / "ckpt")
    cfg.validate(world_size=1)
    assert ProgressFile.from_config(cfg, rank=1) is None
    assert ProgressFile.from_config(cfg, rank=0).path == tmp_path / "ckpt" / "progress.txt"


# ---------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_memory_line_and_metrics(tmp_path, capsys):
    device = torch.device("cuda", torch.cuda.current_device())
    keep = torch.empty(64 * 2**20, dtype=torch.uint8, device=device)  # 64 MiB allocated
    tb = tmp_path / "tb"
    cfg = make_cfg(tensorboard_dir=str(tb), log_memory_to_tensorboard=True, log_device_memory_used=True)
    cfg.model.vocab_size = 4096  # as pretrain() sets it from the tokenizer
    lg = make_logger(cfg, device=device)
    lg.log_train([record(1)], timing(1))
    lg.log_train([record(2)], timing(1))
    lg.close()
    out = capsys.readouterr().out
    memory_lines = [line for line in out.splitlines() if "memory (GB)" in line]
    assert len(memory_lines) == 1  # after the first interval only
    assert memory_lines[0].startswith("[Rank 0] (after 1 iterations) memory (GB) | current_allocated_mem: ")
    assert "device_memory_used" in memory_lines[0]
    assert out.count("Theoretical memory footprints: weight and optimizer=") == 1
    s = scalars(tb)
    assert [step for step, _ in s["memory/current_allocated_mem"]] == [1, 2]
    assert s["memory/current_allocated_mem"][0][1] >= 0.06
    assert s["memory/device_memory_used"][0][1] > 0
    del keep

    timers = Timers(1, device=device)
    t = timers("forward-backward", log_level=1)
    t.start()
    a = torch.randn(2048, 2048, device=device)
    for _ in range(20):
        a = a @ a / 2048
    t.stop()  # waits for the matmuls: the time is the GPU's, not the launch's
    assert timers.summarize(["forward-backward"], reset=False)["forward-backward"][0] > 0

    # NCCL gathers CUDA tensors.
    dist.init_process_group("nccl", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        lo, hi = timers.summarize(["forward-backward"])["forward-backward"]
        assert 0 < lo == hi
    finally:
        dist.destroy_process_group()
