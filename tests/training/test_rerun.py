"""The rerun state machine: result validation by re-running iterations, determinism statistics and
error injection, through real runs of `pretrain()` (exit codes observed on real subprocesses)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from viaduct.config import ConfigError, apply_overrides
from viaduct.recipes import tiny_gpt_pretrain_config
from viaduct.testing.configs import tiny_pretrain_config
from viaduct.testing.distributed import run_distributed
from viaduct.training.config.resilience import RerunStateMachineConfig
from viaduct.training.gpt_step import forward_step as gpt_forward_step
from viaduct.training.pretrain import pretrain
from viaduct.training.rerun import RerunStateMachine, _Rejection
from viaduct.training.state import GlobalState
from viaduct.training.train import RNGSnapshot

_SCRIPT = """
import sys
from viaduct.testing.configs import tiny_pretrain_config
from viaduct.training.pretrain import pretrain

state = pretrain(tiny_pretrain_config(*sys.argv[1:]))
print("finished at iteration", state.train_state.step)
"""

# 2 micro-batches per step: injecting once every 4 validations hits micro-batch 1 of iteration 2,
# and nothing else in 3 iterations.
_COMMON = (
    "train.train_iters=3",
    "train.eval_iters=1",
    "logger.log_interval=1",
    "rerun_state_machine.rerun_mode=validate_results",
)


def _run_script(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "train.py"
    script.write_text(_SCRIPT)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, str(script), *overrides],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
    )


def _events(save: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (save / "rerun_validation.jsonl").read_text().splitlines()]


def _injecting(tmp_path: Path, kind: str) -> list[str]:
    save = tmp_path / "ck"
    return [
        *_COMMON,
        "rerun_state_machine.error_injection_rate=4",
        f"rerun_state_machine.error_injection_type={kind}",
        f"checkpoint.save={save}",
        f"checkpoint.load={save}",
    ]


# ---------------------------------------------------------------------------------------- validation


REFUSED = [
    ("rerun_state_machine.error_injection_rate=-1", "rerun_state_machine.error_injection_rate", ">= 0"),
    (
        "rerun_state_machine.error_injection_rate=5",
        "rerun_state_machine.error_injection_rate",
        "rerun_mode 'disabled' does not run",
    ),
    (
        "{rerun_state_machine: {rerun_mode: validate_results, error_injection_rate: 5, "
        "check_for_nan_in_loss: false}}",
        "rerun_state_machine.error_injection_rate",
        "check_for_nan_in_loss=false turns off",
    ),
    (
        "{rerun_state_machine: {rerun_mode: validate_results}, model: {pipeline_model_parallel_size: 2}}",
        "rerun_state_machine.rerun_mode",
        "not built for pipeline parallelism",
    ),
]


def _problem_line(problems: list, path: str, rule: str) -> str:
    found = [p for p in problems if p.path == path and rule in p.message]
    assert len(found) == 1, [str(p) for p in problems]
    return f"{found[0].path}: {found[0].message}"


def _overrides(text: str) -> list[str]:
    if not text.startswith("{"):
        return [text]
    # "{a: {b: 1}}" as dotted overrides (the CLI takes them the same way).
    import yaml

    def flat(prefix: str, node: Any) -> list[str]:
        if isinstance(node, dict):
            return [o for k, v in node.items() for o in flat(f"{prefix}{k}.", v)]
        return [f"{prefix[:-1]}={str(node).lower() if isinstance(node, bool) else node}"]

    return flat("", yaml.safe_load(text))


@pytest.mark.parametrize(("override", "path", "rule"), REFUSED, ids=[r[2] for r in REFUSED])
def test_validate_and_pretrain_refuse_the_same(override: str, path: str, rule: str) -> None:
    overrides = _overrides(override)
    with pytest.raises(ConfigError) as by_validate:
        apply_overrides(tiny_gpt_pretrain_config(), overrides).validate()
    expected = _problem_line(by_validate.value.problems, path, rule)
    with pytest.raises(ConfigError) as by_run:
        pretrain(apply_overrides(tiny_gpt_pretrain_config(), overrides))
    assert _problem_line(by_run.value.problems, path, rule) == expected


@pytest.mark.slow
@pytest.mark.parametrize(("override", "path", "rule"), REFUSED, ids=[r[2] for r in REFUSED])
def test_cli_validate_refuses_the_same(override: str, path: str, rule: str) -> None:
    overrides = _overrides(override)
    with pytest.raises(ConfigError) as by_validate:
        apply_overrides(tiny_gpt_pretrain_config(), overrides).validate()
    expected = _problem_line(by_validate.value.problems, path, rule)
    r = subprocess.run(
        [sys.executable, "-m", "viaduct", "config", "validate", *overrides],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2, r.stdout + r.stderr
    assert expected in r.stderr


def test_the_modes_and_injection_validate() -> None:
    for overrides in (
        ["rerun_state_machine.rerun_mode=validate_results"],
        ["rerun_state_machine.rerun_mode=report_determinism_stats"],
        [
            "rerun_state_machine.rerun_mode=validate_results",
            "rerun_state_machine.error_injection_rate=7",
            "rerun_state_machine.error_injection_type=persistent_error",
        ],
    ):
        apply_overrides(tiny_gpt_pretrain_config(), overrides).validate()


# ----------------------------------------------------------------------------- injection, exit codes


@pytest.mark.slow
def test_transient_error_is_replayed_in_place_and_training_continues(tmp_path: Path) -> None:
    r = _run_script(tmp_path, *_injecting(tmp_path, "transient_error"))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "finished at iteration 3" in r.stdout
    events = _events(tmp_path / "ck")
    assert [e["event"] for e in events] == ["rejected", "transient_fault"]
    assert [(e["iteration"], e["microbatch"]) for e in events] == [(2, 1), (2, 1)]
    assert all(e["injected"] == "transient_error" for e in events)
    assert math.isfinite(events[1]["replay"])


@pytest.mark.slow
def test_correct_result_exits_16_then_17_after_the_resume(tmp_path: Path) -> None:
    save = tmp_path / "ck"
    first = _run_script(tmp_path, *_injecting(tmp_path, "correct_result"))
    assert first.returncode == 16, first.stdout + first.stderr
    assert "resume on another GPU to disambiguate" in first.stdout + first.stderr
    # The checkpoint is the state before iteration 2, with the record the resumed run needs.
    assert (save / "latest_checkpointed_iteration.txt").read_text().strip() == "1"
    common = torch.load(save / "iter_0000001" / "common.pt", weights_only=True)
    record = json.loads(common["rerun_state_machine"])
    assert record["iteration"] == 2 and record["ranks"]["0"]["microbatch"] == 1
    assert math.isnan(float.fromhex(record["ranks"]["0"]["value"]))
    assert [e["event"] for e in _events(save)] == ["rejected", "reproduced_in_place"]

    second = _run_script(tmp_path, *_injecting(tmp_path, "correct_result"))
    assert second.returncode == 17, second.stdout + second.stderr
    assert "reproduced after the restart" in second.stdout + second.stderr
    assert [e["event"] for e in _events(save)][2:] == ["result_reproduced_after_restart"]
    assert (save / "latest_checkpointed_iteration.txt").read_text().strip() == "1"


@pytest.mark.slow
def test_persistent_error_exits_16_then_the_resumed_run_continues(tmp_path: Path) -> None:
    save = tmp_path / "ck"
    first = _run_script(tmp_path, *_injecting(tmp_path, "persistent_error"))
    assert first.returncode == 16, first.stdout + first.stderr
    assert [e["event"] for e in _events(save)] == ["rejected", "reproduced_in_place"]

    second = _run_script(tmp_path, *_injecting(tmp_path, "persistent_error"))
    assert second.returncode == 0, second.stdout + second.stderr
    assert "finished at iteration 3" in second.stdout
    events = _events(save)
    assert [e["event"] for e in events][2:] == ["persistent_fault"]
    assert events[2]["iteration"] == 2 and math.isfinite(events[2]["replay"])
    assert (save / "latest_checkpointed_iteration.txt").read_text().strip() == "3"
    # Later checkpoints carry no record: nothing waits for a restart any more.
    assert "rerun_state_machine" not in torch.load(save / "iter_0000003" / "common.pt", weights_only=True)


# ------------------------------------------------------------------------------ replays are exact


def _train(*overrides: str, forward_step: Any = None) -> tuple[list[float], dict[str, torch.Tensor]]:
    """Per-step losses and the final weights of a tiny run."""
    losses: list[float] = []
    weights: dict[str, torch.Tensor] = {}

    def step_end(ctx: Any) -> None:
        losses.append(float(ctx.metrics["losses"]["lm loss"]))

    def train_end(ctx: Any) -> None:
        weights.update({k: v.detach().clone() for k, v in ctx.model.state_dict().items()})

    cfg = tiny_pretrain_config(
        "train.train_iters=4", "train.eval_iters=1", "logger.log_interval=2", *overrides
    )
    pretrain(cfg, forward_step, callbacks=[{"on_train_step_end": step_end, "on_train_end": train_end}])
    return losses, weights


def _assert_bitwise(a: tuple[list[float], dict[str, torch.Tensor]], b: tuple[list[float], dict]) -> None:
    assert a[0] == b[0]
    assert a[1].keys() == b[1].keys()
    assert all(torch.equal(a[1][k], b[1][k]) for k in a[1])


@pytest.mark.slow
def test_a_replayed_correct_result_is_bitwise_the_original(tmp_path: Path) -> None:
    plain = _train()
    # Every third validation is rejected (iterations 2 and 3) and re-run in place.
    replayed = _train(
        "rerun_state_machine.rerun_mode=validate_results",
        "rerun_state_machine.error_injection_rate=3",
        f"checkpoint.save={tmp_path / 'ck'}",
    )
    assert [e["event"] for e in _events(tmp_path / "ck")].count("transient_fault") == 2
    _assert_bitwise(plain, replayed)


@pytest.mark.slow
def test_determinism_stats_run_each_step_twice_and_report_zero_on_cpu(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    calls: list[int] = []

    def counting(state: GlobalState, data_iterator: Any, model: torch.nn.Module) -> Any:
        if model.training:  # evaluation runs it too
            calls.append(state.train_state.step)
        return gpt_forward_step(state, data_iterator, model)

    plain = _train(forward_step=counting)
    assert len(calls) == 4 * 2  # 4 steps of 2 micro-batches
    calls.clear()
    twice = _train(
        "rerun_state_machine.rerun_mode=report_determinism_stats",
        f"checkpoint.save={tmp_path / 'ck'}",
        forward_step=counting,
    )
    assert len(calls) == 4 * 2 * 2
    _assert_bitwise(plain, twice)
    out = capfd.readouterr()
    assert "determinism over 2 iterations (each run twice): loss max abs diff 0.000e+00" in out.out + out.err
    stats = [e for e in _events(tmp_path / "ck") if e["event"] == "determinism_stats"]
    assert len(stats) == 2  # one per log interval
    assert all(s["max_abs_diff"] == 0 and s["unequal_iterations"] == 0 for s in stats)


# -------------------------------------------------------------------------------------------- DDP

_POISONED_CALL = 2  # rank 1's forward of iteration 2 (1 micro-batch per step under 2-way DDP)


def _poison_once(state: GlobalState, data_iterator: Any, model: torch.nn.Module) -> Any:
    """The default forward step; on rank 1, the first run of iteration 2 gives a NaN (a transient fault
    on one rank only, in the real forward pass: its gradients are NaN too)."""
    calls = state.user_state.setdefault("calls", [0])
    calls[0] += 1
    output, loss_func = gpt_forward_step(state, data_iterator, model)
    if state.dist is not None and state.dist.rank == 1 and calls[0] == _POISONED_CALL:
        output = output * float("nan")
    return output, loss_func


def _ddp_worker(rank: int, world_size: int, root: str, poison: bool) -> dict[str, Any]:
    torch.set_num_threads(1)
    save = Path(root) / ("faulty" if poison else "clean")
    overrides = [
        "train.train_iters=3",
        "train.eval_iters=1",
        "logger.log_interval=1",
        f"checkpoint.save={save}",
    ]
    if poison:
        overrides.append("rerun_state_machine.rerun_mode=validate_results")
    weights: dict[str, torch.Tensor] = {}

    def train_end(ctx: Any) -> None:
        weights.update({k: v.detach().clone() for k, v in ctx.model.state_dict().items()})

    state = pretrain(
        tiny_pretrain_config(*overrides),
        _poison_once if poison else None,
        callbacks=[{"on_train_end": train_end}],
    )
    return {"step": state.train_state.step, "weights": weights}


@pytest.mark.slow
@pytest.mark.distributed
def test_ddp_ranks_replay_together_when_one_rank_rejects(tmp_path: Path) -> None:
    faulty = run_distributed(_ddp_worker, 2, str(tmp_path), True, timeout=240, all_ranks=True, reuse=True)
    clean = run_distributed(_ddp_worker, 2, str(tmp_path), False, timeout=240, all_ranks=True, reuse=True)
    assert [r["step"] for r in faulty] == [3, 3]
    events = _events(tmp_path / "faulty")
    assert [(e["rank"], e["event"]) for e in events] == [(1, "rejected"), (1, "transient_fault")]
    # Both ranks replayed (their weights agree) and the replay erased the fault: the weights are
    # bitwise those of a run without it.
    for got, want in zip(faulty, clean):
        assert all(torch.equal(got["weights"][k], want["weights"][k]) for k in want["weights"])


# ------------------------------------------------------------------------------ spikes, checkpoints


def _spike_at_iteration_3(state: GlobalState, data_iterator: Any, model: torch.nn.Module) -> Any:
    """The default forward step, with a real (reproducible) 1000-fold loss at iteration 3."""
    output, loss_func = gpt_forward_step(state, data_iterator, model)
    if model.training and state.train_state.step == 2:  # the step being run is step + 1
        output = output * 1000.0
    return output, loss_func


@pytest.mark.slow
def test_a_reproduced_spiky_loss_is_logged_and_training_continues(tmp_path: Path) -> None:
    cfg = tiny_pretrain_config(
        "train.train_iters=4",
        "train.eval_iters=1",
        "rerun_state_machine.rerun_mode=validate_results",
        "rerun_state_machine.check_for_spiky_loss=true",
        f"checkpoint.save={tmp_path / 'ck'}",
    )
    state = pretrain(cfg, _spike_at_iteration_3)
    assert state.train_state.step == 4 and state.exit_code is None
    events = _events(tmp_path / "ck")
    assert [e["event"] for e in events] == ["rejected", "spiky_loss_reproduced"]
    assert events[0]["check"] == "spiky_loss" and events[0]["fatal"] is False and events[0]["iteration"] == 3


def _machine() -> RerunStateMachine:
    cfg = RerunStateMachineConfig(rerun_mode="validate_results")
    return RerunStateMachine(cfg, capture_rng=lambda: RNGSnapshot.capture(torch.device("cpu")))


@pytest.mark.parametrize(
    "record",
    [
        "{not json",
        json.dumps({"iteration": "x", "ranks": {}}),
        json.dumps(
            {"iteration": 3, "ranks": {"0": {"microbatch": -1, "value": "nan", "check": 1, "injected": 0}}}
        ),
        json.dumps(
            {"iteration": 3, "ranks": {"0": {"microbatch": 0, "value": "bogus", "check": 1, "injected": 0}}}
        ),
        json.dumps(
            {"iteration": 3, "ranks": {"0": {"microbatch": 0, "value": "nan", "check": 9, "injected": 0}}}
        ),
        json.dumps([1, 2]),
        b"bytes are not a record",
        "x" * 2_000_000,
    ],
    ids=["syntax", "iteration", "microbatch", "value", "check", "list", "bytes", "huge"],
)
def test_an_unreadable_record_in_a_checkpoint_is_ignored(
    record: object, caplog: pytest.LogCaptureFixture
) -> None:
    machine = _machine()
    machine.load_checkpoint_state(record, "ck/iter_0000002")
    assert machine.resumed_iteration is None and machine.resumed == {}
    assert "record is unreadable" in caplog.text


def test_a_saved_record_round_trips() -> None:
    machine = _machine()
    machine.validations = 4
    machine.pending = machine._record(2, _Rejection(1, float("nan"), 1, 3))
    resumed = _machine()
    resumed.load_checkpoint_state(machine.checkpoint_state(), "ck")
    assert resumed.resumed_iteration == 2 and resumed.validations == 4
    (got,) = resumed.resumed.values()
    assert got.microbatch == 1 and math.isnan(got.value) and got.fatal and got.injected == 3
