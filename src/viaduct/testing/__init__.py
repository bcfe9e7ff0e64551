"""Test kit shipped with the package: run one function on N real processes (gloo on CPU, NCCL on GPU),
tiny configurations, and exact comparison of training state."""

from viaduct.testing.compare import assert_identical, checkpoint_tensors
from viaduct.testing.configs import tiny_pretrain_config
from viaduct.testing.distributed import (
    free_port,
    run_distributed,
    run_torchrun_job,
    run_viaduct,
    torchrun_nodes,
    torchrun_viaduct,
)

__all__ = [
    "assert_identical",
    "checkpoint_tensors",
    "free_port",
    "run_distributed",
    "run_torchrun_job",
    "run_viaduct",
    "tiny_pretrain_config",
    "torchrun_nodes",
    "torchrun_viaduct",
]
