"""inprocess_restart: validation, the monitor's heartbeat and progress watchdogs with short timeouts, and
a real torchrun job whose rank 1 raises once mid-run: every rank restarts in the same processes,
resumes from the checkpoint, and ends with the weights of an uninterrupted run."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch.distributed as dist

from viaduct.config import ConfigError, Problem
from viaduct.testing import (
    assert_identical,
    checkpoint_tensors,
    run_torchrun_job,
    tiny_pretrain_config,
)
from viaduct.training.config import InProcessRestartConfig
from viaduct.training.inprocess_restart import Monitor, RestartInterrupt, run_with_restarts

SRC = str(Path(__file__).parents[2] / "src")


# ---------------------------------------------------------------------------------------- validation


def _problems(cfg) -> dict[str, str]:
    with pytest.raises(ConfigError) as info:
        cfg.validate(world_size=2)
    return {p.path: f"{p.message} {p.fix}" for p in info.value.problems}


@pytest.mark.parametrize(
    ("overrides", "path", "words"),
    [
        (["inprocess_restart.soft_timeout=90"], "inprocess_restart.soft_timeout", "< hard_timeout"),
        (["inprocess_restart.heartbeat_timeout=0"], "inprocess_restart.heartbeat_timeout", "> 0"),
        (
            ["inprocess_restart.heartbeat_interval=60"],
            "inprocess_restart.heartbeat_interval",
            "heartbeat_timeout",
        ),
        (["inprocess_restart.max_iterations=-1"], "inprocess_restart.max_iterations", ">= 0"),
        (["inprocess_restart.monitor_thread_interval=0"], "inprocess_restart.monitor_thread_interval", "> 0"),
        (["inprocess_restart.active_world_size=1"], "inprocess_restart.active_world_size", "spare"),
        (["inprocess_restart.max_rank_faults=2"], "inprocess_restart.max_rank_faults", "not supported"),
        (
            ["inprocess_restart.monitor_process_logdir=/tmp/x"],
            "inprocess_restart.monitor_process_logdir",
            "not",
        ),
        (["checkpoint.load=null"], "inprocess_restart.enabled", "checkpoint.load"),
    ],
)
def test_validation_names_the_field(tmp_path: Path, overrides: list[str], path: str, words: str) -> None:
    save = tmp_path / "ckpt"
    cfg = tiny_pretrain_config(
        f"checkpoint.save={save}",
        f"checkpoint.load={save}",
        "inprocess_restart.enabled=true",
        *overrides,
    )
    found = _problems(cfg)
    assert path in found, found
    assert words in found[path], found[path]


def test_a_sound_config_validates_and_is_no_longer_refused(tmp_path: Path) -> None:
    save = tmp_path / "ckpt"
    cfg = tiny_pretrain_config(f"checkpoint.save={save}", f"checkpoint.load={save}")
    cfg.inprocess_restart = InProcessRestartConfig(enabled=True, granularity="rank", max_iterations=0)
    cfg.validate(world_size=2)
    assert InProcessRestartConfig().check_types("inprocess_restart") == []


@pytest.mark.slow
def test_config_validate_refuses_what_the_run_refuses(tmp_path: Path) -> None:
    yaml = tmp_path / "run.yaml"
    tiny_pretrain_config().to_yaml(yaml)
    env = {**os.environ, "PYTHONPATH": SRC}
    args = ["inprocess_restart.enabled=true", "inprocess_restart.active_world_size=3"]
    for command in ("config validate", "pretrain"):
        proc = subprocess.run(
            [sys.executable, "-m", "viaduct", *command.split(), "--config-file", str(yaml), *args],
            capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120,
        )  # fmt: skip
        out = proc.stdout + proc.stderr
        assert proc.returncode != 0, out
        assert (
            "inprocess_restart.active_world_size" in out and "checkpoint.save and checkpoint.load" in out
        ), out


# ------------------------------------------------------------------------------------------- monitor


def _fast(**kw: float) -> InProcessRestartConfig:
    base = dict(
        enabled=True,
        monitor_thread_interval=0.05,
        progress_watchdog_interval=0.05,
        heartbeat_interval=0.05,
        heartbeat_timeout=0.5,
        soft_timeout=0.5,
        hard_timeout=30.0,
        last_call_wait=0.0,
    )
    base.update(kw)
    return InProcessRestartConfig(**base)


@pytest.mark.slow
def test_a_rank_without_heartbeat_triggers_a_restart() -> None:
    store = dist.HashStore()
    # Rank 1 wrote one heartbeat, then its process froze: rank 0's monitor finds it lost.
    store.add("hb/1", 1)
    monitor = Monitor(_fast(), store, rank=0, world_size=2, attempt=0)
    monitor.start()
    try:
        t0 = time.monotonic()
        while monitor.restart_reason() is None and time.monotonic() - t0 < 5:
            time.sleep(0.02)  # this thread keeps making progress: only the heartbeat is missing
        took = time.monotonic() - t0
    finally:
        monitor.stop()
    reason = monitor.restart_reason()
    assert reason is not None and "rank 1: no heartbeat" in reason, reason
    assert 0.5 <= took < 2.0, took


@pytest.mark.slow
def test_a_rank_with_heartbeats_is_not_lost() -> None:
    store = dist.HashStore()
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(0.05):
            store.add("hb/1", 1)

    beater = threading.Thread(target=beat, daemon=True)
    beater.start()
    monitor = Monitor(_fast(soft_timeout=5.0, hard_timeout=10.0), store, rank=0, world_size=2, attempt=0)
    monitor.start()
    try:
        for _ in range(60):
            time.sleep(0.02)
    finally:
        monitor.stop()
        stop.set()
        beater.join()
    assert monitor.restart_reason() is None


@pytest.mark.slow
def test_no_progress_past_the_soft_timeout_interrupts_the_main_thread() -> None:
    store = dist.HashStore()
    monitor = Monitor(_fast(), store, rank=0, world_size=1, attempt=0)
    monitor.start()

    def stuck() -> None:
        time.sleep(1.5)  # one call that never returns in time: the main thread makes no progress
        for _ in range(1000):  # Python code again: the interrupt lands here, long before 10 s
            time.sleep(0.01)

    t0 = time.monotonic()
    try:
        with pytest.raises(RestartInterrupt):
            monitor.run(stuck)
    finally:
        monitor.stop()
    reason = monitor.restart_reason()
    assert reason is not None and "rank 0: no progress" in reason and "soft_timeout 0.5" in reason
    # Uninterrupted, `stuck` would take 11.5 s; a busy machine may delay the interrupt a little.
    assert time.monotonic() - t0 < 6.0


@pytest.mark.slow
def test_an_exception_restarts_the_attempt_up_to_max_iterations(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    for name in ("WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    calls: list[int] = []

    def flaky() -> str:
        calls.append(len(calls))
        if len(calls) < 3:
            raise ValueError(f"fault {len(calls)}")
        return "done"

    assert run_with_restarts(_fast(max_iterations=2), flaky) == "done"
    assert calls == [0, 1, 2]
    assert "in-process restart 2 of 2 after: rank 0: ValueError: fault 2" in caplog.text

    calls.clear()
    with pytest.raises(RuntimeError, match=r"giving up after 1 restart.*ValueError: fault 2"):
        run_with_restarts(_fast(max_iterations=1), flaky)


@pytest.mark.slow
def test_a_configuration_error_is_not_retried(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    calls: list[int] = []

    def misconfigured() -> None:
        calls.append(1)
        raise ConfigError(
            Problem("checkpoint.load", "holds no checkpoint", "/nowhere", fix="point it at one")
        )

    with pytest.raises(ConfigError, match="checkpoint.load"):
        run_with_restarts(_fast(), misconfigured)  # max_iterations None: it would retry for ever
    assert calls == [1]


# ------------------------------------------------------------------------------- torchrun end to end

JOB = """
import os, sys, time
from pathlib import Path
from viaduct.testing import tiny_pretrain_config
from viaduct.training.pretrain import pretrain

save, fault_step, fault = sys.argv[1], int(sys.argv[2]), sys.argv[3]
cfg = tiny_pretrain_config(
    "train.train_iters=20", "train.eval_iters=0", "logger.log_interval=100", "dataset.num_workers=0",
    f"checkpoint.save={save}", f"checkpoint.load={save}", "checkpoint.save_interval=5",
    "inprocess_restart.enabled=true", "inprocess_restart.max_iterations=2",
    "inprocess_restart.soft_timeout=3", "inprocess_restart.hard_timeout=30",
)
rank = int(os.environ["RANK"])
marker = Path(save).parent / f"{Path(save).name}.fault-injected"
attempts = []

def on_setup(ctx):
    attempts.append(1)
    with open(Path(save).parent / f"{Path(save).name}.pids.rank{rank}", "a") as f:
        f.write(f"{os.getpid()}\\n")

def on_step_end(ctx):
    step = ctx.state.train_state.step
    print(f"IPR-STEP attempt={len(attempts)} rank={rank} step={step}", flush=True)
    if rank == 1 and step == fault_step and not marker.exists():
        marker.touch()
        if fault == "raise":
            raise RuntimeError(f"injected fault at step {step}")
        print(f"IPR-HANG at {time.time():.3f}", flush=True)
        while True:  # hangs in Python code: rank 0 waits in the next collective and stops progressing
            time.sleep(0.05)

pretrain(cfg, callbacks=[{"on_train_start": on_setup, "on_train_step_end": on_step_end}])
"""


def _torchrun(
    tmp_path: Path, save: Path, fault_step: int, fault: str = "raise"
) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "job.py"
    script.write_text(JOB)
    return run_torchrun_job(script, str(save), str(fault_step), fault, cwd=tmp_path)


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same job without a fault (run once for the module): its final checkpoint."""
    root = tmp_path_factory.mktemp("ipr_clean")
    clean = _torchrun(root, root / "clean", fault_step=-1)
    assert clean.returncode == 0, (clean.stdout + clean.stderr)[-6000:]
    return root / "clean" / "iter_0000020"


def _restarted_in_place_to_the_clean_end(
    tmp_path: Path, name: str, out: str, rank: int, clean_ckpt: Path
) -> None:
    """Both ranks ran two attempts in one process each; the second resumed from the checkpoint of
    step 5 and trained to the end, with the final weights of the run without a fault."""
    for r in (0, 1):
        pids = (tmp_path / f"{name}.pids.rank{r}").read_text().split()
        assert len(pids) == 2 and pids[0] == pids[1], pids  # two attempts, one process
    second = [int(s) for s in re.findall(rf"IPR-STEP attempt=2 rank={rank} step=(\d+)", out)]
    assert second[0] == 6 and second[-1] == 20, second
    assert_identical(
        checkpoint_tensors(clean_ckpt), checkpoint_tensors(tmp_path / name / "iter_0000020"), "weights"
    )


@pytest.mark.slow
@pytest.mark.distributed
def test_an_exception_on_one_rank_restarts_every_rank_in_the_same_processes(
    tmp_path: Path, clean_run: Path
) -> None:
    faulty = _torchrun(tmp_path, tmp_path / "faulty", fault_step=8)
    out = faulty.stdout + faulty.stderr
    assert faulty.returncode == 0, out[-6000:]
    assert "RuntimeError: injected fault at step 8" in out  # the rank that raised logs it
    # Rank 0's error (its peer left mid-collective) is reported beside the cause.
    restart = re.search(r"in-process restart 1 of 2 after: (.*)", out)
    assert restart and "rank 1: RuntimeError: injected fault at step 8" in restart[1], out[-6000:]
    _restarted_in_place_to_the_clean_end(tmp_path, "faulty", out, 0, clean_run)


@pytest.mark.slow
@pytest.mark.distributed
def test_a_hung_rank_is_found_by_the_soft_timeout_and_every_rank_restarts(
    tmp_path: Path, clean_run: Path
) -> None:
    hung = _torchrun(tmp_path, tmp_path / "hung", fault_step=8, fault="hang")
    out = hung.stdout + hung.stderr
    assert hung.returncode == 0, out[-6000:]
    # Rank 0 waits in a collective for rank 1, which keeps running Python: rank 0 stops progressing.
    restart = re.search(r"in-process restart 1 of 2 after: (.*)", out)
    assert restart and "rank 0: no progress" in restart[1] and "soft_timeout 3.0 s" in restart[1], out[-6000:]
    _restarted_in_place_to_the_clean_end(tmp_path, "hung", out, 1, clean_run)
