"""Process groups and data parallelism, applied to plain models from outside.

`initialize_distributed()` reads the torchrun environment (a plain single process needs none);
`wrap_data_parallel()` wraps a model in `torch.nn.parallel.DistributedDataParallel` driven by the
`ddp` config.
"""

from viaduct.distributed.ddp import wrap_data_parallel
from viaduct.distributed.init import DistributedContext, destroy_distributed, initialize_distributed

__all__ = ["DistributedContext", "destroy_distributed", "initialize_distributed", "wrap_data_parallel"]
