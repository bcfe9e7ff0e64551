"""Qwen model providers: the Qwen 2.5 and Qwen 3 families and their published sizes.

Each class only changes field defaults of `LlamaStyleProvider` (the Llama architecture on top of
`GPTModelProvider`); names follow Megatron Bridge
(`megatron.bridge.models.qwen.Qwen25ModelProvider500M` ...) so a Bridge YAML `_target_` maps onto
them, and each size has a short name for overrides (`model=qwen3_600m`). Shapes are those of the
Hugging Face `config.json` of the model named in `hf_model_id`.

Redeclared fields only change defaults; their help text is the `GPTModelProvider` field's.
"""

from __future__ import annotations

from dataclasses import dataclass

from viaduct.models.gpt.provider import LlamaStyleProvider

# ---------------------------------------------------------------------------- Qwen 2.5


@dataclass(kw_only=True)
class Qwen25ModelProvider(LlamaStyleProvider):
    """Qwen 2.5: Llama-like (RMSNorm, SwiGLU, RoPE base 1M) with a bias on the QKV projection only."""

    _aliases_ = ("qwen25",)

    layernorm_epsilon: float = 1e-6
    rotary_base: int = 1_000_000
    add_qkv_bias: bool = True
    vocab_size: int | None = 151_936
    seq_length: int = 32_768


@dataclass(kw_only=True)
class Qwen25ModelProvider500M(Qwen25ModelProvider):
    """Qwen 2.5 0.5B (Qwen/Qwen2.5-0.5B): 24 layers, 896 wide, 14 heads, 2 key/value groups, tied."""

    _aliases_ = ("qwen25_500m",)

    num_layers: int = 24
    hidden_size: int = 896
    ffn_hidden_size: int | None = 4864
    num_attention_heads: int = 14
    num_query_groups: int | None = 2
    share_embeddings_and_output_weights: bool = True
    hf_model_id: str | None = "Qwen/Qwen2.5-0.5B"


@dataclass(kw_only=True)
class Qwen25ModelProvider1P5B(Qwen25ModelProvider):
    """Qwen 2.5 1.5B (Qwen/Qwen2.5-1.5B): 28 layers, 1536 wide, 12 heads, 2 key/value groups, tied."""

    _aliases_ = ("qwen25_1p5b",)

    num_layers: int = 28
    hidden_size: int = 1536
    ffn_hidden_size: int | None = 8960
    num_attention_heads: int = 12
    num_query_groups: int | None = 2
    share_embeddings_and_output_weights: bool = True
    hf_model_id: str | None = "Qwen/Qwen2.5-1.5B"


@dataclass(kw_only=True)
class Qwen25ModelProvider3B(Qwen25ModelProvider):
    """Qwen 2.5 3B (Qwen/Qwen2.5-3B): 36 layers, 2048 wide, 16 heads, 2 key/value groups, tied."""

    _aliases_ = ("qwen25_3b",)

    num_layers: int = 36
    hidden_size: int = 2048
    ffn_hidden_size: int | None = 11008
    num_attention_heads: int = 16
    num_query_groups: int | None = 2
    share_embeddings_and_output_weights: bool = True
    hf_model_id: str | None = "Qwen/Qwen2.5-3B"


@dataclass(kw_only=True)
class Qwen25ModelProvider7B(Qwen25ModelProvider):
    """Qwen 2.5 7B (Qwen/Qwen2.5-7B): 28 layers, 3584 wide, 28 heads, 4 key/value groups, untied."""

    _aliases_ = ("qwen25_7b",)

    num_layers: int = 28
    hidden_size: int = 3584
    ffn_hidden_size: int | None = 18944
    num_attention_heads: int = 28
    num_query_groups: int | None = 4
    vocab_size: int | None = 152_064
    hf_model_id: str | None = "Qwen/Qwen2.5-7B"


@dataclass(kw_only=True)
class Qwen25ModelProvider14B(Qwen25ModelProvider):
    """Qwen 2.5 14B (Qwen/Qwen2.5-14B): 48 layers, 5120 wide, 40 heads, 8 key/value groups, untied."""

    _aliases_ = ("qwen25_14b",)

    num_layers: int = 48
    hidden_size: int = 5120
    ffn_hidden_size: int | None = 13824
    num_attention_heads: int = 40
    num_query_groups: int | None = 8
    vocab_size: int | None = 152_064
    hf_model_id: str | None = "Qwen/Qwen2.5-14B"


# ---------------------------------------------------------------------------- Qwen 3


@dataclass(kw_only=True)
class Qwen3ModelProvider(LlamaStyleProvider):
    """Qwen 3: Llama-like (RMSNorm, SwiGLU, RoPE base 1M), no biases, RMSNorm on queries and keys."""

    _aliases_ = ("qwen3",)

    layernorm_epsilon: float = 1e-6
    rotary_base: int = 1_000_000
    qk_layernorm: bool = True
    num_query_groups: int | None = 8
    kv_channels: int | None = 128
    vocab_size: int | None = 151_936
    seq_length: int = 40_960


@dataclass(kw_only=True)
class Qwen3ModelProvider600M(Qwen3ModelProvider):
    """Qwen 3 0.6B (Qwen/Qwen3-0.6B): 28 layers, 1024 wide, 16 heads of 128, tied embeddings."""

    _aliases_ = ("qwen3_600m",)

    num_layers: int = 28
    hidden_size: int = 1024
    ffn_hidden_size: int | None = 3072
    num_attention_heads: int = 16
    share_embeddings_and_output_weights: bool = True
    hf_model_id: str | None = "Qwen/Qwen3-0.6B"


@dataclass(kw_only=True)
class Qwen3ModelProvider1P7B(Qwen3ModelProvider):
    """Qwen 3 1.7B (Qwen/Qwen3-1.7B): 28 layers, 2048 wide, 16 heads of 128, tied embeddings."""

    _aliases_ = ("qwen3_1p7b",)

    num_layers: int = 28
    hidden_size: int = 2048
    ffn_hidden_size: int | None = 6144
    num_attention_heads: int = 16
    share_embeddings_and_output_weights: bool = True
    hf_model_id: str | None = "Qwen/Qwen3-1.7B"


@dataclass(kw_only=True)
class Qwen3ModelProvider4B(Qwen3ModelProvider):
    """Qwen 3 4B (Qwen/Qwen3-4B): 36 layers, 2560 wide, 32 heads of 128, tied embeddings."""

    _aliases_ = ("qwen3_4b",)

    num_layers: int = 36
    hidden_size: int = 2560
    ffn_hidden_size: int | None = 9728
    num_attention_heads: int = 32
    share_embeddings_and_output_weights: bool = True
    hf_model_id: str | None = "Qwen/Qwen3-4B"


@dataclass(kw_only=True)
class Qwen3ModelProvider8B(Qwen3ModelProvider):
    """Qwen 3 8B (Qwen/Qwen3-8B): 36 layers, 4096 wide, 32 heads of 128, untied embeddings."""

    _aliases_ = ("qwen3_8b",)

    num_layers: int = 36
    hidden_size: int = 4096
    ffn_hidden_size: int | None = 12288
    num_attention_heads: int = 32
    hf_model_id: str | None = "Qwen/Qwen3-8B"
