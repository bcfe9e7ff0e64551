"""Resilience components: `rerun_state_machine`, `ft`, `straggler`, `nvrx_straggler`, `inprocess_restart`.

The rerun state machine is built (`viaduct.training.rerun`): the loss checks (NaN/Inf and spiky
loss), result validation by re-running rejected iterations (in place, then after a restart with exit
code 16 or 17), determinism statistics, and error injection to test it. Fault tolerance,
straggler detection and in-process restart need the NVIDIA Resiliency Extension or Megatron's
runtime; their full field sets are kept so Megatron Bridge configs load, and setting any of those
components is reported as not supported.
"""

from dataclasses import dataclass
from typing import ClassVar, Literal

from viaduct.config import ConfigBase, Problems
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
    """Hang detection with the NVIDIA Resiliency Extension rank monitor (needs its ft_launcher)."""

    _component_: ClassVar[str] = "ft"
    _unsupported_ = "fault tolerance"

    enable_ft_package: bool = False
    """Enable the NVRx rank-monitor integration."""

    calc_ft_timeouts: bool = False
    """Learn the section timeouts from observed durations (kept in <save>/ft_state.json)."""

    simulate_fault: bool = False
    """Testing: start a thread that injects a fault."""

    simulated_fault_type: Literal["rank_hung", "rank_killed", "random"] = "random"
    """Kind of injected fault; "random" picks one of the others."""

    simulated_fault_rank: int | None = None
    """Rank that gets the injected fault; None picks one at random."""

    simulated_fault_base_delay: int = 0
    """Seconds before the injected fault (plus a small random delay)."""


@dataclass(kw_only=True)
class StragglerDetectionConfig(ConfigBase):
    """Megatron Core's straggler detector: per-rank throughput estimates reported every log_interval."""

    _component_: ClassVar[str] = "straggler"
    _unsupported_ = "straggler detection"

    log_straggler: bool = False
    """Track and log per-GPU throughput to find stragglers."""

    enable_straggler_on_startup: bool = True
    """Start with the detector enabled."""

    disable_straggler_on_startup: bool = False
    """Start with the detector disabled (it can be toggled through straggler_ctrlr_port)."""

    straggler_ctrlr_port: int = 65535
    """Port that toggles the detector on and off at runtime."""

    straggler_minmax_count: int = 1
    """Number of fastest and slowest ranks to report."""


@dataclass(kw_only=True)
class NVRxStragglerDetectionConfig(ConfigBase):
    """NVRx straggler detection: relative and individual GPU performance scores, reported periodically."""

    _component_: ClassVar[str] = "nvrx_straggler"
    _unsupported_ = "NVRx straggler detection"

    enabled: bool = False
    """Enable NVRx straggler detection."""

    report_time_interval: float = 300.0
    """Seconds between straggler reports."""

    calc_relative_gpu_perf: bool = True
    """Score each GPU against the other GPUs."""

    calc_individual_gpu_perf: bool = True
    """Score each GPU against its own best history."""

    num_gpu_perf_scores_to_print: int = 5
    """Best and worst scores printed per report (0: print only when stragglers are found)."""

    gpu_relative_perf_threshold: float = 0.7
    """Relative score below which a GPU is a straggler."""

    gpu_individual_perf_threshold: float = 0.7
    """Individual score below which a GPU is a straggler."""

    stop_if_detected: bool = False
    """Stop training when a straggler is detected."""

    enable_logging: bool = True
    """Log the GPU performance scores."""

    profiling_interval: int = 1
    """Profile every this many steps."""

    logger_name: str = "megatron.bridge.NVRxStragglerDetection"
    """Python logger that receives the reports."""

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
    """NVRx in-process restart: on a fault, abort and re-enter training in the same processes."""

    _component_: ClassVar[str] = "inprocess_restart"
    _unsupported_ = "in-process restart"

    enabled: bool = False
    """Enable in-process restart."""

    max_iterations: int | None = None
    """Maximum number of restarts; None is unlimited."""

    monitor_thread_interval: float = 1.0
    """Seconds between checks of the monitoring thread."""

    monitor_process_interval: float = 1.0
    """Seconds between checks of the monitoring process."""

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

    max_rank_faults: int | None = None
    """Faults a rank may have before the job stops; None is unlimited."""

    monitor_process_logdir: str | None = None
    """Directory for the monitoring process's logs; None disables them."""
