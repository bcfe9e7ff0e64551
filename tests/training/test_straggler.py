"""Straggler detection: scores, validation, the control endpoint, and real 2-rank runs on gloo."""

from __future__ import annotations

import logging
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import torch

from viaduct.config import ConfigError
from viaduct.distributed.init import DistributedContext
from viaduct.testing import free_port, run_distributed, run_viaduct, tiny_pretrain_config
from viaduct.training.callbacks import CallbackContext
from viaduct.training.config import NVRxStragglerDetectionConfig, StragglerDetectionConfig
from viaduct.training.gpt_step import forward_step as gpt_forward_step
from viaduct.training.pretrain import pretrain
from viaduct.training.state import GlobalState
from viaduct.training.straggler import (
    ControlServer,
    StragglerDetection,
    build_straggler_detection,
    score_ranks,
)

NVRX_LOGGER = "megatron.bridge.NVRxStragglerDetection"


# ------------------------------------------------------------------------------------------ scores


def test_relative_and_individual_scores():
    scores = score_ranks([0.1, 0.4, None], [5, 5, 0], [0.1, 0.2, None], relative=True, individual=True)
    assert [s.rank for s in scores] == [0, 1]  # rank 2 timed nothing in the window
    assert scores[0].relative == pytest.approx(1.0) and scores[1].relative == pytest.approx(0.25)
    assert scores[0].individual == pytest.approx(1.0) and scores[1].individual == pytest.approx(0.5)
    first = score_ranks([0.3], [1], [None], relative=False, individual=True)
    assert first[0].individual == 1.0 and first[0].relative is None


def test_single_process_detector_reports_and_flags_nothing():
    state = GlobalState(cfg=tiny_pretrain_config())
    detector = StragglerDetection(
        name="straggler", device=torch.device("cpu"), every_steps=2, relative_threshold=0.7
    )
    ctx = CallbackContext(state)
    for step in range(1, 5):
        detector.on_train_step_start(ctx)
        detector.timer.start()
        time.sleep(0.001)
        detector.timer.stop()
        state.train_state.step = step
        detector.on_train_step_end(ctx)
    assert [r.step for r in detector.reports] == [2, 4]
    assert all(r.stragglers == {} and r.scores[0].steps == 2 for r in detector.reports)


# -------------------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("cfg", "path", "words"),
    [
        (
            StragglerDetectionConfig(log_straggler=True, straggler_ctrlr_port=0),
            "straggler_ctrlr_port",
            ["[1, 65535]"],
        ),
        (
            StragglerDetectionConfig(log_straggler=True, straggler_ctrlr_port=70000),
            "straggler_ctrlr_port",
            ["[1, 65535]"],
        ),
        (
            StragglerDetectionConfig(log_straggler=True, straggler_minmax_count=0),
            "straggler_minmax_count",
            [">= 1"],
        ),
        (NVRxStragglerDetectionConfig(enabled=True, profiling_interval=0), "profiling_interval", ["> 0"]),
        (
            NVRxStragglerDetectionConfig(enabled=True, num_gpu_perf_scores_to_print=-1),
            "num_gpu_perf_scores_to_print",
            [">= 0"],
        ),
        (
            NVRxStragglerDetectionConfig(enabled=True, report_time_interval=-1.0),
            "report_time_interval",
            ["> 0"],
        ),
    ],
)
def test_out_of_range_fields_are_refused(cfg, path, words):
    with pytest.raises(ConfigError) as info:
        cfg.finalize()
    found = [p for p in info.value.problems if p.path == path]
    assert found and found[0].fix
    for w in words:
        assert w in f"{found[0].message} {found[0].fix}"


def test_both_components_validate_and_are_no_longer_refused():
    cfg = tiny_pretrain_config(
        "+straggler.log_straggler=true",
        "+nvrx_straggler.enabled=true",
        "nvrx_straggler.stop_if_detected=true",
    )
    cfg.validate()  # used to fail with "straggler detection is not supported yet"
    bad = tiny_pretrain_config("+straggler.log_straggler=true", "straggler.straggler_ctrlr_port=0")
    with pytest.raises(ConfigError, match="straggler.straggler_ctrlr_port"):
        bad.validate()  # the container runs the component's checks
    assert StragglerDetectionConfig().check_types("straggler") == []
    assert NVRxStragglerDetectionConfig(enabled=True).check_types("nvrx_straggler") == []


@pytest.mark.slow
def test_validate_command_refuses_what_a_run_refuses(tmp_path: Path):
    cfg = tiny_pretrain_config("+straggler.log_straggler=true", "straggler.straggler_ctrlr_port=0")
    path = tmp_path / "bad.yaml"
    cfg.to_yaml(path)
    result = run_viaduct("config", "validate", "--config-file", str(path), cwd=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "straggler.straggler_ctrlr_port" in result.stderr and "[1, 65535]" in result.stderr
    with pytest.raises(ConfigError, match="straggler.straggler_ctrlr_port"):
        pretrain(tiny_pretrain_config("+straggler.log_straggler=true", "straggler.straggler_ctrlr_port=0"))


# ------------------------------------------------------------------------------- control endpoint


def _get(port: int, path: str, method: str = "GET") -> tuple[int, str]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_control_endpoint_accepts_only_toggles():
    server = ControlServer(free_port())
    try:
        assert server._httpd.server_address[0] == "127.0.0.1"  # never reachable from another host
        assert _get(server.port, "/status") == (200, "straggler detection is off\n")
        assert _get(server.port, "/disable")[0] == 200
        assert _get(server.port, "/enable", method="POST")[0] == 200
        assert server.take() == "enable" and server.take() is None  # the last request wins, once
        for path in ("/run?cmd=id", "/../../etc/passwd", "/enable/now"):
            assert _get(server.port, path)[0] == 404
        assert server.take() is None
    finally:
        server.close()


def test_taken_port_is_a_config_error():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cfg = tiny_pretrain_config("+straggler.log_straggler=true", f"straggler.straggler_ctrlr_port={port}")
        with pytest.raises(ConfigError, match="cannot listen") as info:
            build_straggler_detection(cfg, DistributedContext(), [])
    assert info.value.problems[0].path == "straggler.straggler_ctrlr_port"


def test_off_by_default_builds_nothing():
    assert build_straggler_detection(tiny_pretrain_config(), DistributedContext(), []) == []
    off = tiny_pretrain_config("+straggler.log_straggler=false", "+nvrx_straggler.enabled=false")
    assert build_straggler_detection(off, DistributedContext(), []) == []


# ---------------------------------------------------------------------------- real 2-rank runs

_SLEEP_S = 0.05
# The relative score is what these runs check: rank 0's own step times vary on a busy machine, so its
# individual score could dip below a threshold for no fault of its own.
_RELATIVE_ONLY = "nvrx_straggler.gpu_individual_perf_threshold=0.0"


def _slow_on_rank_1(state: GlobalState, data_iterator: Any, model: torch.nn.Module) -> Any:
    """The default forward step; rank 1 is a straggler: each of its calls takes 50 ms longer."""
    if state.dist is not None and state.dist.rank == 1:
        time.sleep(_SLEEP_S)
    return gpt_forward_step(state, data_iterator, model)


def _rank_1_slows_down(state: GlobalState, data_iterator: Any, model: torch.nn.Module) -> Any:
    """The default forward step, 20 ms long on every rank; rank 1 is 50 ms slower from iteration 7 on.

    The time-based detector plans its next exchange from the step time it has seen so far; steps of a
    known length keep that plan within a few steps of the 50 ms interval, whatever the machine's speed.
    """
    time.sleep(0.02)
    if state.dist is not None and state.dist.rank == 1 and state.train_state.step >= 6:
        time.sleep(_SLEEP_S)
    return gpt_forward_step(state, data_iterator, model)


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def _run(rank: int, world_size: int, overrides: list[str], slow: str, toggles: dict[int, str]) -> dict:
    torch.set_num_threads(1)
    records = _Records()
    for name in (NVRX_LOGGER, "viaduct.straggler"):
        logging.getLogger(name).addHandler(records)
        logging.getLogger(name).setLevel(logging.INFO)
    gathers = [0]
    real_all_gather = torch.distributed.all_gather

    def counting_all_gather(*args: Any, **kwargs: Any) -> Any:
        gathers[0] += 1
        return real_all_gather(*args, **kwargs)

    torch.distributed.all_gather = counting_all_gather  # counts the real collective, which still runs
    replies: list[tuple[int, str]] = []

    def toggle(ctx: CallbackContext) -> None:
        what = toggles.get(ctx.state.train_state.step)
        straggler = ctx.state.cfg.straggler
        if what is not None and rank == 0 and straggler is not None:
            port = straggler.straggler_ctrlr_port
            replies.append(_get(port, f"/{what}"))  # a real HTTP request to rank 0's endpoint

    state = pretrain(
        tiny_pretrain_config(*overrides),
        {"always": _slow_on_rank_1, "later": _rank_1_slows_down}.get(slow),
        callbacks=[{"on_train_step_end": toggle}],
    )
    return {
        "lines": records.lines,
        "exit_reason": state.exit_reason,
        "step": state.train_state.step,
        "gathers": gathers[0],
        "replies": replies,
    }


def _two_ranks(*overrides: str, slow: str = "always", toggles: dict[int, str] | None = None) -> list[dict]:
    base = ["train.train_iters=12", "train.eval_interval=100", "train.eval_iters=1"]
    return run_distributed(
        _run, 2, base + list(overrides), slow, toggles or {}, timeout=240, all_ranks=True, reuse=True
    )


@pytest.mark.slow
@pytest.mark.distributed
def test_sleeping_rank_is_reported_as_straggler():
    results = _two_ranks(
        "+nvrx_straggler.enabled=true", "nvrx_straggler.report_time_interval=0.3", _RELATIVE_ONLY
    )
    lines = results[0]["lines"]
    warnings = [line for line in lines if "stragglers at iteration" in line]
    assert warnings, lines
    assert all("rank 1: relative score" in w and "rank 0:" not in w for w in warnings), warnings
    assert any("relative scores: best rank 0 1.00" in line for line in lines), lines
    assert results[0]["exit_reason"] is None and [r["step"] for r in results] == [12, 12]
    assert results[1]["lines"] == []  # rank 0 reports; the other ranks only take part


@pytest.mark.slow
@pytest.mark.distributed
def test_rank_slower_than_before_gets_a_low_individual_score():
    results = _two_ranks(
        "+nvrx_straggler.enabled=true",
        "nvrx_straggler.report_time_interval=0.05",
        "nvrx_straggler.calc_relative_gpu_perf=false",
        "nvrx_straggler.gpu_individual_perf_threshold=0.5",
        slow="later",
    )
    lines = results[0]["lines"]
    flagged = [line for line in lines if "stragglers at iteration" in line and "rank 1: individual" in line]
    assert flagged, lines
    # Not before it slowed down (iteration 7 is its first slow step), and never by the relative score.
    assert all(int(line.split("iteration ")[1].split(":")[0]) >= 7 for line in flagged), flagged
    assert not any("relative" in line for line in lines), lines


@pytest.mark.slow
@pytest.mark.distributed
def test_stop_if_detected_saves_and_exits(tmp_path: Path):
    save = tmp_path / "ckpt"
    results = _two_ranks(
        "+nvrx_straggler.enabled=true",
        "nvrx_straggler.report_time_interval=0.3",
        "nvrx_straggler.stop_if_detected=true",
        _RELATIVE_ONLY,
        f"checkpoint.save={save}",
    )
    steps = [r["step"] for r in results]
    assert steps[0] == steps[1] < 12  # both ranks stopped at the same step
    for r in results:
        assert r["exit_reason"].startswith("straggler detected (rank 1: relative score")
    assert (save / f"iter_{steps[0]:07d}").is_dir()
    assert (save / "latest_checkpointed_iteration.txt").read_text().strip() == str(steps[0])


@pytest.mark.slow
@pytest.mark.distributed
def test_control_port_toggles_detection_on_every_rank():
    port = free_port()
    results = _two_ranks(
        "+straggler.log_straggler=true",
        f"straggler.straggler_ctrlr_port={port}",
        "logger.log_interval=1",
        toggles={3: "disable", 7: "enable"},
    )
    lines = results[0]["lines"]
    reported = sorted(
        {int(line.split("iteration ")[1].split(",")[0]) for line in lines if " report at " in line}
    )
    # Each request reaches every rank at the report of the step it was made in.
    assert reported == [1, 2, 8, 9, 10, 11, 12], lines
    assert any("detection disabled at iteration 3" in line for line in lines)
    assert any("detection enabled at iteration 7" in line for line in lines)
    assert [code for code, _ in results[0]["replies"]] == [200, 200]
    assert any("relative scores: best rank 0 1.00" in line and "worst rank 1" in line for line in lines)
    # Rank 1 sends nothing, and still follows rank 0's request: both ranks gathered at every step.
    assert results[0]["gathers"] == results[1]["gathers"]


@pytest.mark.slow
@pytest.mark.distributed
def test_disabled_detection_costs_no_collective():
    plain = _two_ranks(slow="")
    off = _two_ranks("+straggler.log_straggler=false", "+nvrx_straggler.enabled=false", slow="")
    on = _two_ranks("+nvrx_straggler.enabled=true", "nvrx_straggler.report_time_interval=0.3", slow="")
    assert [r["gathers"] for r in off] == [r["gathers"] for r in plain]
    assert all(o["gathers"] > p["gathers"] for o, p in zip(on, plain))
    assert off[0]["lines"] == []
    # No collective per step: a handful of exchanges over 12 steps.
    assert on[0]["gathers"] - plain[0]["gathers"] < 12
