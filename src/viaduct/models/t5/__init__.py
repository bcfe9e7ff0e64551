"""T5-style encoder-decoder models."""

from viaduct.models.t5.attention import CrossAttention, RelativePositionBias, relative_position_bucket
from viaduct.models.t5.model import T5Model, T5Spec, t5_num_parameters

__all__ = [
    "CrossAttention",
    "RelativePositionBias",
    "T5Model",
    "T5Spec",
    "relative_position_bucket",
    "t5_num_parameters",
]
