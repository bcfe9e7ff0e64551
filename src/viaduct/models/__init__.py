"""Model providers: a model's configuration, which builds the plain `nn.Module` on its own (`provide()`)."""

from viaduct.models.enums import AttnBackend
from viaduct.models.gpt import GPTModelProvider
from viaduct.models.gpt2 import (
    GPT2ModelProvider,
    GPT2ModelProvider1P5B,
    GPT2ModelProvider124M,
    GPT2ModelProvider355M,
    GPT2ModelProvider774M,
)
from viaduct.models.llama import (
    Llama2ModelProvider7B,
    Llama2ModelProvider13B,
    Llama2ModelProvider70B,
    Llama3ModelProvider,
    Llama3ModelProvider8B,
    Llama3ModelProvider70B,
    Llama31ModelProvider,
    Llama31ModelProvider8B,
    Llama31ModelProvider70B,
    Llama31ModelProvider405B,
    Llama32ModelProvider1B,
    Llama32ModelProvider3B,
    LlamaModelProvider,
)
from viaduct.models.mistral import MistralModelProvider, MistralModelProvider7B
from viaduct.models.provider import ModelProvider
from viaduct.models.qwen import (
    Qwen3ModelProvider,
    Qwen3ModelProvider1P7B,
    Qwen3ModelProvider4B,
    Qwen3ModelProvider8B,
    Qwen3ModelProvider600M,
    Qwen25ModelProvider,
    Qwen25ModelProvider1P5B,
    Qwen25ModelProvider3B,
    Qwen25ModelProvider7B,
    Qwen25ModelProvider14B,
    Qwen25ModelProvider500M,
)
from viaduct.models.transformer_config import TransformerConfig

__all__ = [
    "AttnBackend",
    "GPT2ModelProvider",
    "GPT2ModelProvider1P5B",
    "GPT2ModelProvider124M",
    "GPT2ModelProvider355M",
    "GPT2ModelProvider774M",
    "GPTModelProvider",
    "Llama2ModelProvider7B",
    "Llama2ModelProvider13B",
    "Llama2ModelProvider70B",
    "Llama3ModelProvider",
    "Llama3ModelProvider8B",
    "Llama3ModelProvider70B",
    "Llama31ModelProvider",
    "Llama31ModelProvider8B",
    "Llama31ModelProvider70B",
    "Llama31ModelProvider405B",
    "Llama32ModelProvider1B",
    "Llama32ModelProvider3B",
    "LlamaModelProvider",
    "MistralModelProvider",
    "MistralModelProvider7B",
    "ModelProvider",
    "Qwen3ModelProvider",
    "Qwen3ModelProvider1P7B",
    "Qwen3ModelProvider4B",
    "Qwen3ModelProvider8B",
    "Qwen3ModelProvider600M",
    "Qwen25ModelProvider",
    "Qwen25ModelProvider1P5B",
    "Qwen25ModelProvider3B",
    "Qwen25ModelProvider7B",
    "Qwen25ModelProvider14B",
    "Qwen25ModelProvider500M",
    "TransformerConfig",
]
