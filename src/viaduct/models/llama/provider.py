"""Llama model providers: the Llama 2 / 3 / 3.1 / 3.2 families and their published sizes.

Each class only changes field defaults of `LlamaStyleProvider` (the Llama architecture on top of
`GPTModelProvider`); names follow Megatron Bridge
(`megatron.bridge.models.llama.Llama32ModelProvider1B` ...) so a Bridge YAML `_target_` maps onto
them, and each size has a short name for overrides (`model=llama32_1b`). Shapes are those of the
Hugging Face `config.json` of the model named in `hf_model_id`.

Fusion flags keep the `GPTModelProvider` defaults: in viaduct they are only hints.

Redeclared fields only change defaults; their help text is the `GPTModelProvider` field's.
"""

from __future__ import annotations

from dataclasses import dataclass

from viaduct.models.gpt.provider import LlamaStyleProvider


@dataclass(kw_only=True)
class LlamaModelProvider(LlamaStyleProvider):
    """The Llama architecture: RMSNorm, SwiGLU, RoPE, no biases, no dropout, untied embeddings."""

    _aliases_ = ("llama",)

    seq_length: int = 4096


# ---------------------------------------------------------------------------- Llama 2


@dataclass(kw_only=True)
class Llama2ModelProvider7B(LlamaModelProvider):
    """Llama 2 7B (meta-llama/Llama-2-7b-hf): 32 layers, 4096 wide, multi-head attention."""

    _aliases_ = ("llama2_7b",)

    num_layers: int = 32
    hidden_size: int = 4096
    ffn_hidden_size: int | None = 11008
    num_attention_heads: int = 32
    vocab_size: int | None = 32000
    hf_model_id: str | None = "meta-llama/Llama-2-7b-hf"


@dataclass(kw_only=True)
class Llama2ModelProvider13B(LlamaModelProvider):
    """Llama 2 13B (meta-llama/Llama-2-13b-hf): 40 layers, 5120 wide, multi-head attention."""

    _aliases_ = ("llama2_13b",)

    num_layers: int = 40
    hidden_size: int = 5120
    ffn_hidden_size: int | None = 13824
    num_attention_heads: int = 40
    vocab_size: int | None = 32000
    hf_model_id: str | None = "meta-llama/Llama-2-13b-hf"


@dataclass(kw_only=True)
class Llama2ModelProvider70B(LlamaModelProvider):
    """Llama 2 70B (meta-llama/Llama-2-70b-hf): 80 layers, 8192 wide, 8 key/value groups."""

    _aliases_ = ("llama2_70b",)

    num_layers: int = 80
    hidden_size: int = 8192
    ffn_hidden_size: int | None = 28672
    num_attention_heads: int = 64
    num_query_groups: int | None = 8
    vocab_size: int | None = 32000
    hf_model_id: str | None = "meta-llama/Llama-2-70b-hf"


# ---------------------------------------------------------------------------- Llama 3


@dataclass(kw_only=True)
class Llama3ModelProvider(LlamaModelProvider):
    """Llama 3: grouped-query attention with 8 groups, rotary base 500k, 128k vocabulary, 8k context."""

    _aliases_ = ("llama3",)

    num_query_groups: int | None = 8
    rotary_base: int = 500_000
    vocab_size: int | None = 128_256
    seq_length: int = 8192
    init_method_std: float = 0.01


@dataclass(kw_only=True)
class Llama3ModelProvider8B(Llama3ModelProvider):
    """Llama 3 8B (meta-llama/Meta-Llama-3-8B): 32 layers, 4096 wide, 14336 FFN, 8 key/value groups."""

    _aliases_ = ("llama3_8b",)

    num_layers: int = 32
    hidden_size: int = 4096
    ffn_hidden_size: int | None = 14_336
    num_attention_heads: int = 32
    hf_model_id: str | None = "meta-llama/Meta-Llama-3-8B"


@dataclass(kw_only=True)
class Llama3ModelProvider70B(Llama3ModelProvider):
    """Llama 3 70B (meta-llama/Meta-Llama-3-70B): 80 layers, 8192 wide, 28672 FFN, 8 key/value groups."""

    _aliases_ = ("llama3_70b",)

    num_layers: int = 80
    hidden_size: int = 8192
    ffn_hidden_size: int | None = 28_672
    num_attention_heads: int = 64
    hf_model_id: str | None = "meta-llama/Meta-Llama-3-70B"


# ---------------------------------------------------------------------------- Llama 3.1


@dataclass(kw_only=True)
class Llama31ModelProvider(Llama3ModelProvider):
    """Llama 3.1: Llama 3 with rotary frequency scaling (factor 8) for a 128k context."""

    _aliases_ = ("llama31",)

    rope_scaling: bool = True
    rope_scaling_factor: float = 8.0
    seq_length: int = 131_072


@dataclass(kw_only=True)
class Llama31ModelProvider8B(Llama31ModelProvider):
    """Llama 3.1 8B (meta-llama/Llama-3.1-8B): 32 layers, 4096 wide, 14336 FFN, 128k context."""

    _aliases_ = ("llama31_8b",)

    num_layers: int = 32
    hidden_size: int = 4096
    ffn_hidden_size: int | None = 14_336
    num_attention_heads: int = 32
    hf_model_id: str | None = "meta-llama/Llama-3.1-8B"


@dataclass(kw_only=True)
class Llama31ModelProvider70B(Llama31ModelProvider):
    """Llama 3.1 70B (meta-llama/Llama-3.1-70B): 80 layers, 8192 wide, 28672 FFN, 128k context."""

    _aliases_ = ("llama31_70b",)

    num_layers: int = 80
    hidden_size: int = 8192
    ffn_hidden_size: int | None = 28_672
    num_attention_heads: int = 64
    hf_model_id: str | None = "meta-llama/Llama-3.1-70B"


@dataclass(kw_only=True)
class Llama31ModelProvider405B(Llama31ModelProvider):
    """Llama 3.1 405B (meta-llama/Llama-3.1-405B): 126 layers, 16384 wide, 53248 FFN, 128 heads."""

    _aliases_ = ("llama31_405b",)

    num_layers: int = 126
    hidden_size: int = 16_384
    ffn_hidden_size: int | None = 53_248
    num_attention_heads: int = 128
    num_query_groups: int | None = 8
    hf_model_id: str | None = "meta-llama/Llama-3.1-405B"


# ---------------------------------------------------------------------------- Llama 3.2


@dataclass(kw_only=True)
class Llama32ModelProvider1B(Llama31ModelProvider):
    """Llama 3.2 1B (meta-llama/Llama-3.2-1B): 16 layers, 2048 wide, tied embeddings."""

    _aliases_ = ("llama32_1b",)

    num_layers: int = 16
    hidden_size: int = 2048
    ffn_hidden_size: int | None = 8192
    num_attention_heads: int = 32
    num_query_groups: int | None = 8
    kv_channels: int | None = 64
    share_embeddings_and_output_weights: bool = True
    rope_scaling_factor: float = 32.0
    hf_model_id: str | None = "meta-llama/Llama-3.2-1B"


@dataclass(kw_only=True)
class Llama32ModelProvider3B(Llama31ModelProvider):
    """Llama 3.2 3B (meta-llama/Llama-3.2-3B): 28 layers, 3072 wide, 24 heads, tied embeddings."""

    _aliases_ = ("llama32_3b",)

    num_layers: int = 28
    hidden_size: int = 3072
    ffn_hidden_size: int | None = 8192
    num_attention_heads: int = 24
    num_query_groups: int | None = 8
    kv_channels: int | None = 128
    share_embeddings_and_output_weights: bool = True
    rope_scaling_factor: float = 32.0
    hf_model_id: str | None = "meta-llama/Llama-3.2-3B"
