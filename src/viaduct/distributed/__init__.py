"""Process groups and parallelism, applied to plain models from outside.

`initialize_distributed()` reads the torchrun environment (a plain single process needs none);
`layout_of()` says how a config arranges the world (pure arithmetic, no torch needed);
`build_mesh()` makes that layout a device mesh; `build_parallel_model()` applies tensor, context and
sharded data parallelism, `build_pipeline()` builds a rank's pipeline stages (`pipeline_stages()`
says which layers each holds, again without torch); `wrap_data_parallel()` wraps a model in DDP for
plain data parallelism.

Names are imported on first use, so reading the layout of a config does not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from viaduct.distributed.ddp import wrap_data_parallel
    from viaduct.distributed.init import DistributedContext, destroy_distributed, initialize_distributed
    from viaduct.distributed.layout import ParallelLayout, layout_of
    from viaduct.distributed.mesh import ParallelMesh, build_mesh
    from viaduct.distributed.parallelize import build_parallel_model, build_pipeline
    from viaduct.distributed.pipeline import Pipeline
    from viaduct.distributed.pipeline_split import StageSpec, pipeline_stages

_WHERE = {
    "wrap_data_parallel": "ddp",
    "DistributedContext": "init",
    "destroy_distributed": "init",
    "initialize_distributed": "init",
    "ParallelLayout": "layout",
    "layout_of": "layout",
    "ParallelMesh": "mesh",
    "build_mesh": "mesh",
    "build_parallel_model": "parallelize",
    "build_pipeline": "parallelize",
    "Pipeline": "pipeline",
    "StageSpec": "pipeline_split",
    "pipeline_stages": "pipeline_split",
}

__all__ = [
    "DistributedContext",
    "ParallelLayout",
    "ParallelMesh",
    "Pipeline",
    "StageSpec",
    "build_mesh",
    "build_parallel_model",
    "build_pipeline",
    "destroy_distributed",
    "initialize_distributed",
    "layout_of",
    "pipeline_stages",
    "wrap_data_parallel",
]


def __getattr__(name: str) -> object:
    if name in _WHERE:
        return getattr(importlib.import_module(f"viaduct.distributed.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'viaduct.distributed' has no attribute {name!r}")
