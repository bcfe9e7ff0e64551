"""ft (hang detection): the per-rank watchdog, learned timeouts in ft_state.json, validation, and a real
`torchrun --max-restarts 1` job whose rank 1 hangs, is ended by its watchdog, and whose restart resumes
from the checkpoint to the same final weights as an uninterrupted run."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from viaduct.config import ConfigError
from viaduct.testing import (
    assert_identical,
    checkpoint_tensors,
    run_torchrun_job,
    tiny_pretrain_config,
)
from viaduct.training.config import FaultToleranceConfig
from viaduct.training.fault_tolerance import (
    EXIT_CODE_HANG,
    MAX_STATE_BYTES,
    MIN_LEARNED_TIMEOUT,
    MIN_STEPS_TO_LEARN,
    SAFETY_FACTOR,
    STATE_FILE,
    FaultTolerance,
    FTState,
    HangWatchdog,
    learned_timeouts,
)

SRC = str(Path(__file__).parents[2] / "src")


def _python(code: str, tmp_path: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "child.py"
    script.write_text(textwrap.dedent(code))
    env = {**os.environ, "PYTHONPATH": SRC, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=timeout, env=env, cwd=tmp_path
    )


# ------------------------------------------------------------------------------------------ watchdog


@pytest.mark.slow
def test_a_section_past_its_timeout_dumps_every_stack_and_exits(tmp_path: Path) -> None:
    proc = _python(
        f"""
        import time
        from pathlib import Path
        from viaduct.training.fault_tolerance import HangWatchdog

        def stuck_in_the_step():
            time.sleep(60)

        timeouts = {{"setup": 30.0, "step": 0.5, "checkpointing": 30.0, "out_of_section": 30.0}}
        dog = HangWatchdog(timeouts, rank=3, dump_dir=Path({str(tmp_path)!r}))
        dog.start("setup")
        dog.leave()
        with dog.section("step"):
            stuck_in_the_step()
        print("not reached")
        """,
        tmp_path,
    )
    assert proc.returncode == EXIT_CODE_HANG, proc.stderr
    assert "not reached" not in proc.stdout
    assert "rank 3: hang detected: section 'step' has run" in proc.stderr
    assert "over its timeout of 0.5 s" in proc.stderr
    assert "stuck_in_the_step" in proc.stderr  # the main thread's stack names the hung function
    dump = (tmp_path / "ft_hang_rank3.txt").read_text()
    assert "section 'step'" in dump and "stuck_in_the_step" in dump and "_watch" in dump  # all threads


def test_sections_within_their_timeouts_are_recorded_and_never_fire() -> None:
    fired: list[tuple[str, float, float]] = []
    timeouts = {"setup": 5.0, "step": 0.3, "checkpointing": 5.0, "out_of_section": 0.3}
    dog = HangWatchdog(timeouts, poll_interval=0.01, on_hang=lambda *a: fired.append(a))
    dog.start("setup")
    dog.leave()
    for _ in range(5):
        with dog.section("step"):
            time.sleep(0.05)
    with dog.section("checkpointing"):
        time.sleep(0.4)  # longer than a step may take, within the checkpointing timeout
    dog.stop()
    assert fired == []
    assert dog.counts["step"] == 5 and 0.04 < dog.longest["step"] < 0.3
    assert dog.longest["checkpointing"] >= 0.4 and dog.counts["setup"] == 1


def test_time_outside_sections_has_its_own_timeout() -> None:
    fired: list[tuple[str, float, float]] = []
    timeouts = {"setup": 5.0, "step": 5.0, "checkpointing": 5.0, "out_of_section": 0.2}
    dog = HangWatchdog(timeouts, poll_interval=0.01, on_hang=lambda *a: fired.append(a))
    dog.start("setup")
    dog.leave()
    time.sleep(0.5)
    dog.stop()
    assert fired and fired[0][0] == "out_of_section" and fired[0][1] > 0.2 and fired[0][2] == 0.2


@pytest.mark.slow
def test_a_simulated_rank_killed_fault_sigkills_the_process(tmp_path: Path) -> None:
    proc = _python(
        f"""
        import time
        from viaduct.training.config import FaultToleranceConfig
        from viaduct.training.fault_tolerance import FaultTolerance

        cfg = FaultToleranceConfig(
            enable_ft_package=True, simulate_fault=True, simulated_fault_type="rank_killed",
            simulated_fault_rank=0, simulated_fault_base_delay=0,
        )
        ft = FaultTolerance(cfg, {str(tmp_path)!r}, rank=0)
        ft.plan_fault(world_size=1)
        ft.step_start()
        ft.step_end()  # the first step ends: the fault's clock starts
        time.sleep(30)
        print("not reached")
        """,
        tmp_path,
    )
    assert proc.returncode == -9, proc.stderr  # SIGKILL: nothing of the process runs any more
    assert "rank 0: simulated fault rank_killed now" in proc.stderr and "not reached" not in proc.stdout


def test_the_simulated_fault_is_planned_once_for_the_whole_job(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TORCHELASTIC_RESTART_COUNT", raising=False)
    cfg = FaultToleranceConfig(enable_ft_package=True, simulate_fault=True)  # random rank and kind
    drawn: list[list[int]] = []

    def rank0_draw(values: list[int]) -> list[int]:  # what the broadcast from rank 0 does
        drawn.append(values)
        return drawn[0]

    ranks = [FaultTolerance(cfg, tmp_path, rank=r) for r in range(4)]
    for ft in ranks:
        ft.plan_fault(4, rank0_draw)
        ft.close()
    assert len({(ft.fault_rank, ft.fault_type) for ft in ranks}) == 1  # every rank agrees
    assert 0 <= ranks[0].fault_rank < 4 and ranks[0].fault_type in ("rank_hung", "rank_killed")

    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")  # a restarted job: no new fault
    again = FaultTolerance(cfg, tmp_path, rank=0)
    again.plan_fault(4, rank0_draw)
    again.close()
    assert again.fault_rank is None and again.fault_type is None


# ----------------------------------------------------------------------------------- learned timeouts


def test_learned_timeouts_use_the_safety_factor_and_the_floor() -> None:
    current = {"setup": 600.0, "step": 180.0, "checkpointing": 600.0, "out_of_section": 300.0}
    observed = {"setup": 40.0, "step": 2.0, "checkpointing": 1.0}
    early = learned_timeouts(observed, MIN_STEPS_TO_LEARN - 1, current)
    assert early["step"] == 180.0  # too few steps seen: the step timeout is kept
    assert early["setup"] == 40.0 * SAFETY_FACTOR and early["checkpointing"] == MIN_LEARNED_TIMEOUT
    assert early["out_of_section"] == 300.0  # never observed
    later = learned_timeouts({**observed, "step": 30.0}, MIN_STEPS_TO_LEARN, current)
    assert later["step"] == 30.0 * SAFETY_FACTOR


def _ft(tmp_path: Path, **kw: object) -> FaultTolerance:
    cfg = FaultToleranceConfig(enable_ft_package=True, calc_ft_timeouts=True, **kw)  # type: ignore[arg-type]
    return FaultTolerance(cfg, tmp_path, rank=0)


def test_timeouts_are_learned_saved_and_loaded_by_the_next_run(tmp_path: Path) -> None:
    ft = _ft(tmp_path, step_timeout=100.0)
    try:
        for _ in range(MIN_STEPS_TO_LEARN + 1):
            ft.step_start()
            time.sleep(0.001)
            ft.step_end()
        ft.watchdog.longest["step"] = 20.0  # one slow step: the maximum counts
        with ft.checkpointing():
            pass
    finally:
        ft.close()
    data = json.loads((tmp_path / STATE_FILE).read_text())
    assert data["observed_steps"] == MIN_STEPS_TO_LEARN + 1
    assert data["observed_max_seconds"]["step"] == 20.0
    assert data["timeouts"]["step"] == 20.0 * SAFETY_FACTOR
    assert data["timeouts"]["setup"] == MIN_LEARNED_TIMEOUT  # a fast setup: the floor
    assert not list(tmp_path.glob(".*.tmp"))  # written through a temporary file, renamed

    again = _ft(tmp_path, step_timeout=100.0)  # the next run starts with what was learned
    try:
        assert again.watchdog.timeouts["step"] == 20.0 * SAFETY_FACTOR
        again.update_timeouts()  # its own (fast) observations do not forget the slow step
    finally:
        again.close()
    data = json.loads((tmp_path / STATE_FILE).read_text())
    assert data["observed_max_seconds"]["step"] == 20.0 and data["timeouts"]["step"] == 100.0


def test_without_calc_ft_timeouts_the_configured_timeouts_hold(tmp_path: Path) -> None:
    FTState({"step": 1.0}, {"step": 0.1}, 100).save(tmp_path / STATE_FILE)
    cfg = FaultToleranceConfig(enable_ft_package=True, step_timeout=42.0)
    ft = FaultTolerance(cfg, tmp_path, rank=0)
    try:
        assert ft.watchdog.timeouts["step"] == 42.0
        ft.update_timeouts()
    finally:
        ft.close()
    assert json.loads((tmp_path / STATE_FILE).read_text())["timeouts"] == {"step": 1.0}  # not rewritten


@pytest.mark.parametrize(
    "content",
    [
        b"{not json",
        b"\xff\xfe garbage",
        b"[1, 2]",
        json.dumps({"version": 1, "timeouts": {"step": -5}}).encode(),
        json.dumps({"version": 1, "timeouts": {"step": float("nan")}}).encode(),
        json.dumps({"version": 1, "timeouts": {"step": 1e300}}).encode(),
        json.dumps({"version": 1, "timeouts": {"step": True}}).encode(),
        json.dumps({"version": 1, "timeouts": {"rm -rf": 5}}).encode(),
        json.dumps({"version": 1, "timeouts": [], "observed_steps": 3}).encode(),
        json.dumps({"version": 1, "observed_steps": -1}).encode(),
        json.dumps({"version": 99, "timeouts": {"step": 5}}).encode(),
        b"[" * 100_000 + b"]" * 100_000,  # deep nesting, and over the size bound
        b"[" * 20_000 + b"]" * 20_000,  # deep nesting within it
        b'{"version": 1, "pad": "' + b"x" * MAX_STATE_BYTES + b'"}',
    ],
)
def test_a_damaged_state_file_is_ignored_with_a_warning(
    tmp_path: Path, content: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / STATE_FILE).write_bytes(content)
    with caplog.at_level(logging.WARNING, logger="viaduct"):
        ft = _ft(tmp_path, step_timeout=77.0)
        ft.close()
    assert ft.watchdog.timeouts["step"] == 77.0
    assert "ignoring damaged" in caplog.text and STATE_FILE in caplog.text


# ----------------------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("overrides", "path", "words"),
    [
        (["ft.simulate_fault=true"], "ft.simulate_fault", "enable_ft_package"),
        (["ft.calc_ft_timeouts=true"], "ft.calc_ft_timeouts", "enable_ft_package"),
        (
            ["ft.enable_ft_package=true", "ft.simulated_fault_base_delay=-1"],
            "ft.simulated_fault_base_delay",
            ">= 0",
        ),
        (["ft.enable_ft_package=true", "ft.step_timeout=0"], "ft.step_timeout", "> 0"),
        (["ft.enable_ft_package=true", "ft.simulated_fault_rank=-1"], "ft.simulated_fault_rank", ">= 0"),
        (
            ["ft.enable_ft_package=true", "ft.simulate_fault=true", "ft.simulated_fault_rank=2"],
            "ft.simulated_fault_rank",
            "0 to 1 for world size 2",
        ),
        (["ft.enable_ft_package=true", "checkpoint.save=null"], "ft.enable_ft_package", "checkpoint.save"),
    ],
)
def test_validation_names_the_field(tmp_path: Path, overrides: list[str], path: str, words: str) -> None:
    cfg = tiny_pretrain_config(f"checkpoint.save={tmp_path}", *overrides)
    with pytest.raises(ConfigError) as err:
        cfg.validate(world_size=2)
    (problem,) = [p for p in err.value.problems if p.path == path]
    assert words in problem.message + (problem.fix or "")


def test_a_sound_ft_config_validates_and_is_no_longer_refused(tmp_path: Path) -> None:
    cfg = tiny_pretrain_config(
        f"checkpoint.save={tmp_path}",
        "ft.enable_ft_package=true",
        "ft.calc_ft_timeouts=true",
        "ft.simulate_fault=true",
        "ft.simulated_fault_rank=1",
    )
    cfg.validate(world_size=2)
    assert FaultToleranceConfig().check_types("ft") == []


@pytest.mark.slow
def test_config_validate_refuses_what_the_run_refuses(tmp_path: Path) -> None:
    yaml = tmp_path / "run.yaml"
    tiny_pretrain_config().to_yaml(yaml)
    env = {**os.environ, "PYTHONPATH": SRC}
    args = ["ft.enable_ft_package=true", "ft.simulate_fault=true", "ft.simulated_fault_rank=5"]
    validate = subprocess.run(
        [sys.executable, "-m", "viaduct", "config", "validate", "--config-file", str(yaml), *args],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120,
    )  # fmt: skip
    run = subprocess.run(
        [sys.executable, "-m", "viaduct", "pretrain", "--config-file", str(yaml), *args],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120,
    )  # fmt: skip
    for proc in (validate, run):
        out = proc.stdout + proc.stderr
        assert proc.returncode != 0, out
        assert "ft.simulated_fault_rank" in out and "ft.enable_ft_package" in out, out


# ------------------------------------------------------------------------------- torchrun end to end

JOB = """
import os, sys, time
from viaduct.testing import tiny_pretrain_config
from viaduct.training.pretrain import pretrain

save, extra = sys.argv[1], sys.argv[2:]
cfg = tiny_pretrain_config(
    "train.train_iters=40", "train.eval_iters=0", "logger.log_interval=100", "dataset.num_workers=0",
    f"checkpoint.save={save}", f"checkpoint.load={save}", "checkpoint.save_interval=5",
    "ft.enable_ft_package=true", *extra,
)
restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")

def on_step_start(ctx):
    time.sleep(0.1)  # outside the watched step: paces the run so the fault lands mid-run

def on_step_end(ctx):
    step = ctx.state.train_state.step
    print(f"FT-STEP restart={restart} rank={ctx.state.dist.rank} step={step} t={time.time():.3f}", flush=True)

pretrain(cfg, callbacks=[{"on_train_step_start": on_step_start, "on_train_step_end": on_step_end}])
"""


def _torchrun(tmp_path: Path, save: Path, *extra: str, restarts: int = 0) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "job.py"
    script.write_text(JOB)
    return run_torchrun_job(
        script, str(save), *extra, launcher_args=("--max-restarts", str(restarts)), cwd=tmp_path
    )


@pytest.mark.slow
@pytest.mark.distributed
def test_a_hung_rank_is_restarted_by_torchrun_and_resumes_to_the_same_weights(
    tmp_path: Path,
) -> None:
    step_timeout = 3.0
    hung = _torchrun(
        tmp_path,
        tmp_path / "hung",
        "ft.simulate_fault=true",
        "ft.simulated_fault_type=rank_hung",
        "ft.simulated_fault_rank=1",
        "ft.simulated_fault_base_delay=2",
        f"ft.step_timeout={step_timeout}",
        restarts=1,
    )
    out = hung.stdout + hung.stderr
    assert hung.returncode == 0, out[-6000:]
    fault = re.search(r"rank 1: simulated fault rank_hung now \(at ([\d.]+)\)", out)
    detected = re.search(r"rank 1: hang detected: section 'step' has run ([\d.]+) s.*\(at ([\d.]+)\)", out)
    assert fault and detected, out[-6000:]
    assert "_simulated_hang" in out  # the stack dump shows where the main thread is stuck
    assert (tmp_path / "hung" / "ft_hang_rank1.txt").is_file()
    steps = re.findall(r"FT-STEP restart=(\d) rank=0 step=(\d+) t=([\d.]+)", out)
    first = [(int(s), float(t)) for r, s, t in steps if r == "0"]
    second = [(int(s), float(t)) for r, s, t in steps if r == "1"]
    assert first and second, out[-6000:]
    assert second[0][0] > 1 and second[0][0] <= first[-1][0] + 1  # resumed from a checkpoint, no gap
    assert second[-1][0] == 40

    t_fault, t_detect, t_resume = float(fault[1]), float(detected[2]), second[0][1]
    # The hang starts at the next step after the fault; it is found within the timeout (+ polling).
    assert t_detect - t_fault < step_timeout + 2.0
    print(
        f"\nhang detection: fault at +0, detected at +{t_detect - t_fault:.1f} s (step timeout "
        f"{step_timeout} s), restarted job's first new step (iteration {second[0][0]}) at "
        f"+{t_resume - t_fault:.1f} s"
    )

    clean = _torchrun(tmp_path, tmp_path / "clean")
    assert clean.returncode == 0, (clean.stdout + clean.stderr)[-6000:]
    assert_identical(
        checkpoint_tensors(tmp_path / "clean" / "iter_0000040"),
        checkpoint_tensors(tmp_path / "hung" / "iter_0000040"),
        "weights",
    )
