"""GPT-2 model providers (124M, 355M, 774M, 1.5B) with their published shapes."""

from viaduct.models.gpt2.provider import (
    GPT2ModelProvider,
    GPT2ModelProvider1P5B,
    GPT2ModelProvider124M,
    GPT2ModelProvider355M,
    GPT2ModelProvider774M,
)

__all__ = [
    "GPT2ModelProvider",
    "GPT2ModelProvider1P5B",
    "GPT2ModelProvider124M",
    "GPT2ModelProvider355M",
    "GPT2ModelProvider774M",
]
