"""Resilience components: `rerun_state_machine`, `ft`, `straggler`, `nvrx_straggler`, `inprocess_restart`.

The rerun state machine is built (`viaduct.training.rerun`): the loss checks (NaN/Inf and spiky
loss), result validation by re-running rejected iterations (in place, then after a restart with exit
code 16 or 17), determinism statistics, and error injection to test it. Fault tolerance is built
too (`viaduct.training.fault_tolerance`: hang detection per rank, restarts by torchrun), and so is
straggler detection, both `straggler` and `nvrx_straggler` (`viaduct.training.straggler`: per-rank
step times compared at each report). In-process restart is built as well
(`viaduct.training.inprocess_restart`: every rank re-enters training in the same processes after a
fault); the fields of NVRx's separate monitoring process and per-rank fault counting are refused.
"""

import os
from dataclasses import dataclass
from typing import ClassVar, Literal

from viaduct.config import ConfigBase, Problem, Problems, unsupported
from viaduct.training.config._checks import in_range, positive


@dataclass(kw_only=True)
class RerunStateMachineConfig(ConfigBase):
    """Checks on the loss (NaN/Inf, spikes) and re-running iterations to attribute faults."""

    _component_: ClassVar[str] = "rerun_state_machine"

    check_for_nan_in_loss: bool = True
    """Stop with an error when the loss is NaN or infinite."""

    check_for_spiky_loss: bool = False
    """Report a loss larger than spiky_loss_factor × the largest recent loss."""

    spiky_loss_factor: float = 10.0
    """A loss above this multiple of the largest loss of the recent window counts as a spike."""

    rerun_mode: Literal["disabled", "validate_results", "report_determinism_stats"] = "disabled"
    """Re-run engine: "disabled", "validate_results" (re-run rejected steps) or "report_determinism_stats"."""

    error_injection_rate: int = 0
    """Fake a failed NaN check once every this many validations (0: never); needs validate_results."""

    error_injection_type: Literal["correct_result", "transient_error", "persistent_error"] = "transient_error"
    """Kind of fault error injection fakes."""

    def finalize(self) -> None:
        """Check the spike factor and error injection."""
        p = Problems()
        if self.error_injection_rate < 0:
            p.add(
                "error_injection_rate",
                "must be >= 0 (0 injects nothing)",
                self.error_injection_rate,
                fix="set rerun_state_machine.error_injection_rate to 0 or a positive count of validations",
            )
        elif self.error_injection_rate > 0 and self.rerun_mode != "validate_results":
            p.add(
                "error_injection_rate",
                f"injects faults for result validation, which rerun_mode {self.rerun_mode!r} does not run",
                self.error_injection_rate,
                fix="set rerun_state_machine.rerun_mode=validate_results, or error_injection_rate=0",
            )
        elif self.error_injection_rate > 0 and not self.check_for_nan_in_loss:
            p.add(
                "error_injection_rate",
                "faults are injected into the NaN check, which check_for_nan_in_loss=false turns off",
                self.error_injection_rate,
                fix="set rerun_state_machine.check_for_nan_in_loss=true, or error_injection_rate=0",
            )
        if self.spiky_loss_factor < 1.0:
            p.add(
                "spiky_loss_factor",
                "must be >= 1 (below 1 every ordinary loss would count as a spike)",
                self.spiky_loss_factor,
                fix="set rerun_state_machine.spiky_loss_factor to 1 or more (default 10)",
            )
        p.raise_if_any()


@dataclass(kw_only=True)
class FaultToleranceConfig(ConfigBase):
    """Hang detection: a watchdog ends a hung rank, and `torchrun --max-restarts` restarts the job."""

    _component_: ClassVar[str] = "ft"

    enable_ft_package: bool = False
    """Watch every rank for hangs (needs checkpoint.save); off: the component does nothing."""

    calc_ft_timeouts: bool = False
    """Learn the section timeouts from observed durations (kept in <save>/ft_state.json)."""

    simulate_fault: bool = False
    """Testing: start a thread that injects a fault (first attempt of a job only)."""

    simulated_fault_type: Literal["rank_hung", "rank_killed", "random"] = "random"
    """Kind of injected fault; "random" picks one of the others."""

    simulated_fault_rank: int | None = None
    """Rank that gets the injected fault; None picks one at random."""

    simulated_fault_base_delay: int = 0
    """Seconds after the first training step before the injected fault (plus up to 1 s)."""

    setup_timeout: float = 600.0
    """Seconds from the start of pretrain() to the end of the first step before a rank counts as hung."""

    step_timeout: float = 180.0
    """Seconds one training step may take before the rank counts as hung."""

    checkpointing_timeout: float = 600.0
    """Seconds one checkpoint save may take before the rank counts as hung."""

    out_of_section_timeout: float = 300.0
    """Seconds outside setup, steps and saves (logging, evaluation) before the rank counts as hung."""

    def finalize(self) -> None:
        """Positive timeouts; fault injection only with the watchdog on and a delay >= 0."""
        p = Problems()
        for name in ("setup_timeout", "step_timeout", "checkpointing_timeout", "out_of_section_timeout"):
            positive(p, self, name)
        positive(p, self, "simulated_fault_base_delay", zero_ok=True)
        positive(p, self, "simulated_fault_rank", zero_ok=True)
        if self.simulate_fault and not self.enable_ft_package:
            p.add(
                "simulate_fault",
                "injects a fault for the hang watchdog to find, which enable_ft_package=false turns off",
                True,
                fix="set ft.enable_ft_package=true, or ft.simulate_fault=false",
            )
        if self.calc_ft_timeouts and not self.enable_ft_package:
            p.add(
                "calc_ft_timeouts",
                "learns timeouts for the hang watchdog, which enable_ft_package=false turns off",
                True,
                fix="set ft.enable_ft_package=true, or ft.calc_ft_timeouts=false",
            )
        p.raise_if_any()

    def run_problems(self, world_size: int, save: str | None) -> list[Problem]:
        """What depends on the rest of the run: a checkpoint directory, a fault rank that exists."""
        problems: list[Problem] = []
        if self.enable_ft_package and not save:
            problems.append(
                Problem(
                    "ft.enable_ft_package",
                    "a restarted job resumes from checkpoints (and keeps ft_state.json and the stack "
                    "dumps beside them), and checkpoint.save is unset",
                    True,
                    fix="set checkpoint.save (and checkpoint.save_interval), or ft.enable_ft_package=false",
                )
            )
        rank = self.simulated_fault_rank
        if self.simulate_fault and rank is not None and rank >= world_size:
            problems.append(
                Problem(
                    "ft.simulated_fault_rank",
                    f"must be a rank of the job (0 to {world_size - 1} for world size {world_size})",
                    rank,
                    fix=f"set ft.simulated_fault_rank to 0..{world_size - 1}, or unset it (a random rank)",
                )
            )
        return problems


@dataclass(kw_only=True)
class StragglerDetectionConfig(ConfigBase):
    """Megatron Core's straggler detector: per-rank step-time scores reported every logger.log_interval."""

    _component_: ClassVar[str] = "straggler"

    log_straggler: bool = False
    """Time every rank's steps and report the fastest and slowest ranks every logger.log_interval steps."""

    enable_straggler_on_startup: bool = True
    """Start with the detector enabled (disable_straggler_on_startup wins when both are set)."""

    disable_straggler_on_startup: bool = False
    """Start with the detector disabled (it can be toggled through straggler_ctrlr_port)."""

    straggler_ctrlr_port: int = 65535
    """Port of rank 0's HTTP endpoint on 127.0.0.1 (/enable, /disable, /status) that toggles the detector."""

    straggler_minmax_count: int = 1
    """Number of fastest and slowest ranks to report."""

    def finalize(self) -> None:
        """When log_straggler is on: a valid port and at least one rank to report."""
        p = Problems()
        if self.log_straggler:
            in_range(p, self, "straggler_ctrlr_port", 1, 65535)
            if self.straggler_minmax_count < 1:
                p.add(
                    "straggler_minmax_count",
                    "must be >= 1 (the number of fastest and slowest ranks each report shows)",
                    self.straggler_minmax_count,
                    fix="set straggler.straggler_minmax_count to 1 or more",
                )
        p.raise_if_any()


@dataclass(kw_only=True)
class NVRxStragglerDetectionConfig(ConfigBase):
    """NVRx straggler detection: relative and individual GPU performance scores, reported periodically."""

    _component_: ClassVar[str] = "nvrx_straggler"

    enabled: bool = False
    """Time every rank's steps and score them every report_time_interval seconds."""

    report_time_interval: float = 300.0
    """Seconds between straggler reports (reached at a step boundary; no collective in between)."""

    calc_relative_gpu_perf: bool = True
    """Score each rank against the others: fastest rank's median step time / this rank's."""

    calc_individual_gpu_perf: bool = True
    """Score each rank against its own history: its best earlier median step time / the current one."""

    num_gpu_perf_scores_to_print: int = 5
    """Best and worst scores printed per report (0: print only when stragglers are found)."""

    gpu_relative_perf_threshold: float = 0.7
    """Relative score below which a GPU is a straggler."""

    gpu_individual_perf_threshold: float = 0.7
    """Individual score below which a GPU is a straggler."""

    stop_if_detected: bool = False
    """Stop training (saving a checkpoint when checkpoint.save is set) when a straggler is detected."""

    enable_logging: bool = True
    """Log the scores and the stragglers found (detection and stop_if_detected work either way)."""

    profiling_interval: int = 1
    """Time every this many steps (1: every step)."""

    logger_name: str = "megatron.bridge.NVRxStragglerDetection"
    """Python logger that receives the reports (viaduct's console when nothing handles that logger)."""

    def finalize(self) -> None:
        """When enabled: at least one score, a positive interval, thresholds in [0, 1]."""
        p = Problems()
        if self.enabled:
            if not (self.calc_relative_gpu_perf or self.calc_individual_gpu_perf):
                p.add(
                    "calc_relative_gpu_perf",
                    "detection is enabled but computes no score",
                    False,
                    fix="set nvrx_straggler.calc_relative_gpu_perf or "
                    "nvrx_straggler.calc_individual_gpu_perf to true",
                )
            positive(p, self, "report_time_interval")
            positive(p, self, "profiling_interval")
            positive(p, self, "num_gpu_perf_scores_to_print", zero_ok=True)
            in_range(p, self, "gpu_relative_perf_threshold", 0.0, 1.0)
            in_range(p, self, "gpu_individual_perf_threshold", 0.0, 1.0)
        p.raise_if_any()


@dataclass(kw_only=True)
class InProcessRestartConfig(ConfigBase):
    """In-process restart: on a fault, abort and re-enter training in the same processes.

    A fault is an exception on any rank, a rank without heartbeat for `heartbeat_timeout` seconds,
    or a rank without progress for `soft_timeout` seconds. Every rank then restarts from the latest
    checkpoint in `checkpoint.save` (so `checkpoint.save` and `checkpoint.load` must name the same
    directory). There are no spare ranks: every rank of the job takes part in each attempt.
    """

    _component_: ClassVar[str] = "inprocess_restart"

    enabled: bool = False
    """Enable in-process restart."""

    max_iterations: int | None = None
    """Maximum number of restarts; None is unlimited."""

    monitor_thread_interval: float = 1.0
    """Seconds between checks of the monitoring thread."""

    monitor_process_interval: float = unsupported("a separate monitoring process", 1.0)
    """Seconds between checks of the monitoring process (there is none: the monitor thread checks)."""

    progress_watchdog_interval: float = 1.0
    """Seconds between automatic progress-watchdog timestamps."""

    heartbeat_interval: float = 30.0
    """Seconds between heartbeats used to detect unresponsive ranks."""

    soft_timeout: float = 60.0
    """Seconds without progress before a restart is triggered."""

    hard_timeout: float = 90.0
    """Seconds without progress before the ranks are terminated."""

    heartbeat_timeout: float = 60.0
    """Seconds without a heartbeat before a rank counts as lost."""

    barrier_timeout: float = 120.0
    """Timeout in seconds of the restart machinery's internal barriers."""

    completion_timeout: float = 120.0
    """Timeout in seconds of the barrier on completion."""

    last_call_wait: float = 1.0
    """Seconds other ranks get to report concurrent failures."""

    termination_grace_time: float = 1.0
    """Seconds between SIGTERM and SIGKILL after the hard timeout."""

    granularity: Literal["node", "rank"] = "node"
    """Unit that is restarted or replaced: a whole node or one rank."""

    active_world_size: int | None = None
    """Ranks that run the job; the rest are warm spares. None uses WORLD_SIZE."""

    empty_cuda_cache: bool = True
    """Empty the CUDA cache while restarting."""

    max_rank_faults: int | None = unsupported("counting faults per rank", None)
    """Faults a rank may have before the job stops; None is unlimited."""

    monitor_process_logdir: str | None = unsupported("a separate monitoring process", None)
    """Directory for the monitoring process's logs; None disables them."""

    def finalize(self) -> None:
        """When enabled: positive intervals and timeouts, soft_timeout < hard_timeout, heartbeats that
        come more often than heartbeat_timeout, and max_iterations >= 0 (or None: unlimited)."""
        p = Problems()
        if self.enabled:
            for name in (
                "monitor_thread_interval",
                "progress_watchdog_interval",
                "heartbeat_interval",
                "soft_timeout",
                "hard_timeout",
                "heartbeat_timeout",
                "barrier_timeout",
                "completion_timeout",
            ):
                positive(p, self, name)
            positive(p, self, "last_call_wait", zero_ok=True)
            positive(p, self, "termination_grace_time", zero_ok=True)
            positive(p, self, "max_iterations", zero_ok=True)
            if 0 < self.hard_timeout <= self.soft_timeout:
                p.add(
                    "soft_timeout",
                    f"must be < hard_timeout ({self.hard_timeout}): the restart must be tried before "
                    "the rank is ended",
                    self.soft_timeout,
                    fix="lower inprocess_restart.soft_timeout or raise inprocess_restart.hard_timeout",
                )
            if 0 < self.heartbeat_timeout <= self.heartbeat_interval:
                p.add(
                    "heartbeat_interval",
                    f"must be < heartbeat_timeout ({self.heartbeat_timeout}): otherwise every rank "
                    "looks lost between two heartbeats",
                    self.heartbeat_interval,
                    fix="lower inprocess_restart.heartbeat_interval or raise "
                    "inprocess_restart.heartbeat_timeout",
                )
            positive(p, self, "active_world_size")
        p.raise_if_any()

    def run_problems(self, world_size: int, save: str | None, load: str | None) -> list[Problem]:
        """What depends on the rest of the run: a checkpoint to restart from, no spare ranks."""
        problems: list[Problem] = []
        if not self.enabled:
            return problems
        if not save or not load or os.path.normpath(save) != os.path.normpath(load):
            problems.append(
                Problem(
                    "inprocess_restart.enabled",
                    "a restart resumes from the latest checkpoint the run saved, so checkpoint.save and "
                    f"checkpoint.load must name the same directory (save={save!r}, load={load!r})",
                    True,
                    fix="set checkpoint.save and checkpoint.load to one directory (and "
                    "checkpoint.save_interval), or inprocess_restart.enabled=false",
                )
            )
        if self.active_world_size is not None and self.active_world_size != world_size:
            problems.append(
                Problem(
                    "inprocess_restart.active_world_size",
                    f"must be the world size ({world_size}): warm spare ranks are not supported, every "
                    "rank trains",
                    self.active_world_size,
                    fix="unset inprocess_restart.active_world_size",
                )
            )
        return problems
