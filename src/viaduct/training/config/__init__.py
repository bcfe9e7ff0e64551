"""Every config component of a training run (contract: the import path Megatron Bridge users know).

from viaduct.training.config import ConfigContainer, TrainingConfig, OptimizerConfig, ...
"""

from viaduct.training.comm_overlap import CommOverlapConfig
from viaduct.training.config.checkpoint import CheckpointConfig
from viaduct.training.config.container import FINALIZE_ORDER, ConfigContainer
from viaduct.training.config.dataset import DataloaderConfig, GPTDatasetConfig, MockGPTDatasetConfig
from viaduct.training.config.distributed import DistributedDataParallelConfig, DistributedInitConfig
from viaduct.training.config.finetuning import FinetuningDatasetConfig, PackedSequenceSpecs
from viaduct.training.config.logger import LoggerConfig
from viaduct.training.config.optimizer import OptimizerConfig
from viaduct.training.config.profiling import ProfilingConfig
from viaduct.training.config.resilience import (
    FaultToleranceConfig,
    InProcessRestartConfig,
    NVRxStragglerDetectionConfig,
    RerunStateMachineConfig,
    StragglerDetectionConfig,
)
from viaduct.training.config.rng import RNGConfig
from viaduct.training.config.scheduler import SchedulerConfig
from viaduct.training.config.t5_dataset import MockT5DatasetConfig, T5DatasetConfig
from viaduct.training.config.tokenizer import TokenizerConfig
from viaduct.training.config.train import TrainingConfig, ValidationConfig
from viaduct.training.mixed_precision import MixedPrecisionConfig

__all__ = [
    "FINALIZE_ORDER",
    "CheckpointConfig",
    "CommOverlapConfig",
    "ConfigContainer",
    "DataloaderConfig",
    "DistributedDataParallelConfig",
    "DistributedInitConfig",
    "FaultToleranceConfig",
    "FinetuningDatasetConfig",
    "GPTDatasetConfig",
    "InProcessRestartConfig",
    "LoggerConfig",
    "MixedPrecisionConfig",
    "MockGPTDatasetConfig",
    "MockT5DatasetConfig",
    "NVRxStragglerDetectionConfig",
    "OptimizerConfig",
    "PackedSequenceSpecs",
    "ProfilingConfig",
    "RNGConfig",
    "RerunStateMachineConfig",
    "SchedulerConfig",
    "StragglerDetectionConfig",
    "T5DatasetConfig",
    "TokenizerConfig",
    "TrainingConfig",
    "ValidationConfig",
]
