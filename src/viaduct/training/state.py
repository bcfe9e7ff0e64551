"""`GlobalState`: everything a running job shares (Megatron's global variables, as one object).

The config, the train state (step, consumed samples, FLOPs so far), the distributed context,
timers, the training logger, the signal handler, the tokenizer and how the run ended (why it
stopped early, the final evaluation's losses). `forward_step` functions that ask for it
(`forward_step(state, data_iterator, model)`) get this object, live. `user_state` belongs to the
user: the framework keeps nothing there.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from viaduct.data.tokenizers import Tokenizer
    from viaduct.distributed.init import DistributedContext
    from viaduct.training.config import ConfigContainer
    from viaduct.training.logging import TrainingLogger
    from viaduct.training.logging.timers import Timers
    from viaduct.training.signals import DistributedSignalHandler


@dataclass
class TrainState:
    """Progress of the run; saved in checkpoints so a resumed run continues exactly."""

    step: int = 0
    """Optimizer steps done (the iteration number of the last finished step)."""
    consumed_train_samples: int = 0
    """Training samples consumed over all ranks (skipped iterations included)."""
    skipped_train_samples: int = 0
    """Samples of iterations whose update was skipped (iterations_to_skip)."""
    consumed_valid_samples: int = 0
    """Validation samples consumed over all ranks."""
    floating_point_operations_so_far: float = 0.0
    """Analytic model FLOPs of all steps so far (all ranks)."""
    do_train: bool = True
    do_valid: bool = True
    do_test: bool = True

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors only, so torch.distributed.checkpoint and weights_only loading accept it."""
        return {
            "step": torch.tensor(self.step),
            "consumed_train_samples": torch.tensor(self.consumed_train_samples),
            "skipped_train_samples": torch.tensor(self.skipped_train_samples),
            "consumed_valid_samples": torch.tensor(self.consumed_valid_samples),
            "floating_point_operations_so_far": torch.tensor(
                self.floating_point_operations_so_far, dtype=torch.float64
            ),
            "do_train": torch.tensor(self.do_train),
            "do_valid": torch.tensor(self.do_valid),
            "do_test": torch.tensor(self.do_test),
        }

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        self.step = int(state["step"])
        self.consumed_train_samples = int(state["consumed_train_samples"])
        self.skipped_train_samples = int(state["skipped_train_samples"])
        self.consumed_valid_samples = int(state["consumed_valid_samples"])
        self.floating_point_operations_so_far = float(state["floating_point_operations_so_far"])
        self.do_train = bool(state["do_train"])
        self.do_valid = bool(state["do_valid"])
        self.do_test = bool(state["do_test"])


@dataclass
class GlobalState:
    """Shared state of a running job; `pretrain()` fills it during setup."""

    cfg: ConfigContainer
    """The validated configuration of the run."""
    train_state: TrainState = field(default_factory=TrainState)
    dist: DistributedContext | None = None
    """Set once the process group exists (the first thing `pretrain()` creates)."""
    timers: Timers | None = None
    logger: TrainingLogger | None = None
    signal_handler: DistributedSignalHandler | None = None
    """None unless train.exit_signal_handler is on."""
    tokenizer: Tokenizer | None = None
    start_time: float = field(default_factory=time.time)
    """Wall-clock start of the job (for exit_duration_in_mins)."""
    exit_reason: str | None = None
    """Why the loop stopped before the last iteration (the exit signal, exit_interval,
    exit_duration_in_mins); None when it ran to the end or did not train."""
    exit_code: int | None = None
    """The process exit code the run asks for (16 or 17 from the rerun state machine); None otherwise."""
    final_validation: dict[str, float] | None = None
    """Losses of the validation pass after training; None when none ran (an early exit, no validation
    data, or the last step's own evaluation already covered it)."""
    final_test: dict[str, float] | None = None
    """Losses of the test pass after training; None when none ran."""
    user_state: dict[str, Any] = field(default_factory=dict)
    """Free space for callbacks and forward-step functions: the framework never reads or writes it."""

    @property
    def device(self) -> torch.device:
        return self.dist.device if self.dist is not None else torch.device("cpu")
