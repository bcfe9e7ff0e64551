"""Llama model providers: the Llama 2 / 3 / 3.1 / 3.2 families and their published sizes.

Each class only changes field defaults of `GPTModelProvider`; names follow Megatron Bridge
(`megatron.bridge.models.llama.Llama32ModelProvider1B` ...) so a Bridge YAML `_target_` maps onto
them, and each size has a short name for overrides (`model=llama32_1b`). Shapes are those of the
Hugging Face `config.json` of the model named in `hf_model_id`.

Fusion flags keep the `GPTModelProvider` defaults: in viaduct they are only hints.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from viaduct.config import FunctionRef
from viaduct.models.gpt.provider import GPTModelProvider


@dataclass(kw_only=True)
class LlamaModelProvider(GPTModelProvider):
    """The Llama architecture: RMSNorm, SwiGLU, RoPE, no biases, no dropout, untied embeddings."""

    _aliases_ = ("llama",)

    normalization: Literal["LayerNorm", "RMSNorm"] = "RMSNorm"
    """Normalization layer type."""
    layernorm_epsilon: float = 1e-5
    """Epsilon of every LayerNorm / RMSNorm."""
    activation_func: FunctionRef = FunctionRef("silu")
    """MLP activation: gelu, silu, relu, squared_relu, fast_gelu, quick_gelu, ... or a dotted path."""
    gated_linear_unit: bool = True
    """Gated MLP: fc1 produces two halves, act(a) * b (with silu this is SwiGLU)."""
    position_embedding_type: Literal["learned_absolute", "rope", "yarn", "none"] = "rope"
    """Positions: learned absolute embeddings, rotary (rope), YaRN-scaled rotary, or none."""
    rotary_base: int = 10000
    """Rotary embedding base (theta)."""
    add_bias_linear: bool = False
    """Give every linear layer a bias."""
    hidden_dropout: float = 0.0
    """Dropout probability on the hidden states (after attention and after the MLP)."""
    attention_dropout: float = 0.0
    """Dropout probability on the attention weights."""
    share_embeddings_and_output_weights: bool = False
    """Tie the output layer to the input embedding."""
    seq_length: int = 4096
    """Maximum sequence length; must match dataset.seq_length (the container syncs them)."""
    init_method_std: float = 0.02
    """Standard deviation of the normal weight init (output layers are scaled by 1/sqrt(2 x num_layers))."""


# ---------------------------------------------------------------------------- Llama 2


@dataclass(kw_only=True)
class Llama2ModelProvider7B(LlamaModelProvider):
    """Llama 2 7B (meta-llama/Llama-2-7b-hf): 32 layers, 4096 wide, multi-head attention."""

    _aliases_ = ("llama2_7b",)

    num_layers: int = 32
    """Number of transformer layers."""
    hidden_size: int = 4096
    """Model width: the size of the hidden states."""
    ffn_hidden_size: int | None = 11008
    """Hidden size of the MLP."""
    num_attention_heads: int = 32
    """Number of query attention heads."""
    vocab_size: int | None = 32000
    """Unpadded vocabulary size."""
    hf_model_id: str | None = "meta-llama/Llama-2-7b-hf"
    """Hugging Face model id this configuration comes from (for export and tokenizer defaults)."""


@dataclass(kw_only=True)
class Llama2ModelProvider13B(LlamaModelProvider):
    """Llama 2 13B (meta-llama/Llama-2-13b-hf): 40 layers, 5120 wide, multi-head attention."""

    _aliases_ = ("llama2_13b",)

    num_layers: int = 40
    """Number of transformer layers."""
    hidden_size: int = 5120
    """Model width: the size of the hidden states."""
    ffn_hidden_size: int | None = 13824
    """Hidden size of the MLP."""
    num_attention_heads: int = 40
    """Number of query attention heads."""
    vocab_size: int | None = 32000
    """Unpadded vocabulary size."""
    hf_model_id: str | None = "meta-llama/Llama-2-13b-hf"
    """Hugging Face model id this configuration comes from (for export and tokenizer defaults)."""


@dataclass(kw_only=True)
class Llama2ModelProvider70B(LlamaModelProvider):
    """Llama 2 70B (meta-llama/Llama-2-70b-hf): 80 layers, 8192 wide, 8 key/value groups."""

    _aliases_ = ("llama2_70b",)

    num_layers: int = 80
    """Number of transformer layers."""
    hidden_size: int = 8192
    """Model width: the size of the hidden states."""
    ffn_hidden_size: int | None = 28672
    """Hidden size of the MLP."""
    num_attention_heads: int = 64
    """Number of query attention heads."""
    num_query_groups: int | None = 8
    """Key/value head groups for grouped-query attention."""
    vocab_size: int | None = 32000
    """Unpadded vocabulary size."""
    hf_model_id: str | None = "meta-llama/Llama-2-70b-hf"
    """Hugging Face model id this configuration comes from (for export and tokenizer defaults)."""


# ---------------------------------------------------------------------------- Llama 3


@dataclass(kw_only=True)
class Llama3ModelProvider(LlamaModelProvider):
    """Llama 3: grouped-query attention with 8 groups, rotary base 500k, 128k vocabulary, 8k context."""

    _aliases_ = ("llama3",)

    num_query_groups: int | None = 8
    """Key/value head groups for grouped-query attention."""
    rotary_base: int = 500_000
    """Rotary embedding base (theta)."""
    vocab_size: int | None = 128_256
    """Unpadded vocabulary size."""
    seq_length: int = 8192
    """Maximum sequence length; must match dataset.seq_length (the container syncs them)."""
    init_method_std: float = 0.01
    """Standard deviation of the normal weight init (output layers are scaled by 1/sqrt(2 x num_layers))."""


@dataclass(kw_only=True)
class Llama3ModelProvider8B(Llama3ModelProvider):
    """Llama 3 8B (meta-llama/Meta-Llama-3-8B): 32 layers, 4096 wide, 14336 FFN, 8 key/value groups."""

    _aliases_ = ("llama3_8b",)

    num_layers: int = 32
    """Number of transformer layers."""
    hidden_size: int = 4096
    """Model width: the size of the hidden states."""
    ffn_hidden_size: int | None = 14_336
    """Hidden size of the MLP."""
    num_attention_heads: int = 32
    """Number of query attention heads."""
    hf_model_id: str | None = "meta-llama/Meta-Llama-3-8B"
    """Hugging Face model id this configuration comes from (for export and tokenizer defaults)."""


@dataclass(kw_only=True)
class Llama3ModelProvider70B(Llama3ModelProvider):
    """Llama 3 70B (meta-llama/Meta-Llama-3-70B): 80 layers, 8192 wide, 28672 FFN, 8 key/value groups."""

    _aliases_ = ("llama3_70b",)

    num_layers: int = 80
    """Number of transformer layers."""
    hidden_size: int = 8192
    """Model width: the size of the hidden states."""
    ffn_hidden_size: int | None = 28_672
    """Hidden size of the MLP."""
    num_attention_heads: int = 64
    """Number of query attention heads."""
    hf_model_id: str | None = "meta-llama/Meta-Llama-3-70B"
    """Hugging Face model id this configuration comes from (for export and tokenizer defaults)."""


# ---------------------------------------------------------------------------- Llama 3.1


@dataclass(kw_only=True)
class Llama31ModelProvider(Llama3ModelProvider):
    """Llama 3.1: Llama 3 with rotary frequency scaling (factor 8) for a 128k context."""

    _aliases_ = ("llama31",)

    rope_scaling: bool = True
    """Llama-3.1-style rotary frequency scaling (needs position_embedding_type rope)."""
    rope_scaling_factor: float = 8.0
    """Factor of the Llama-3.1-style rotary scaling."""
    seq_length: int = 131_072
    """Maximum sequence length; must match dataset.seq_length (the container syncs them)."""


@dataclass(kw_only=True)
class Llama31ModelProvider8B(Llama31ModelProvider):
    """Llama 3.1 8B (meta-llama/Llama-3.1-8B): 32 layers, 4096 wide, 14336 FFN, 128k context."""

    _aliases_ = ("llama31_8b",)

    num_layers: int = 32
    """Number of transformer layers."""
    hidden_size: int = 4096
    """Model width: the size of the hidden states."""
    ffn_hidden_size: int | None = 14_336
    """Hidden size of the MLP."""
    num_attention_heads: int = 32
    """Number of query attention heads."""
    hf_model_id: str | None = "meta-llama/Llama-3.1-8B"
    """Hugging Face model id this configuration comes from (for export and tokenizer defaults)."""


@dataclass(kw_only=True)
class Llama31ModelProvider70B(Llama31ModelProvider):
    """Llama 3.1 70B (meta-llama/Llama-3.1-70B): 80 layers, 8192 wide, 28672 FFN, 128k context."""

    _aliases_ = ("llama31_70b",)

    num_layers: int = 80
    """Number of transformer layers."""
    hidden_size: int = 8192
    """Model width: the size of the hidden states."""
    ffn_hidden_size: int | None = 28_672
    """Hidden size of the MLP."""
    num_attention_heads: int = 64
    """Number of query attention heads."""
    hf_model_id: str | None = "meta-llama/Llama-3.1-70B"
    """Hugging Face model id this configuration comes from (for export and tokenizer defaults)."""


@dataclass(kw_only=True)
class Llama31ModelProvider405B(Llama31ModelProvider):
    """Llama 3.1 405B (meta-llama/Llama-3.1-405B): 126 layers, 16384 wide, 53248 FFN, 128 heads."""

    _aliases_ = ("llama31_405b",)

    num_layers: int = 126
    """Number of transformer layers."""
    hidden_size: int = 16_384
    """Model width: the size of the hidden states."""
    ffn_hidden_size: int | None = 53_248
    """Hidden size of the MLP."""
    num_attention_heads: int = 128
    """Number of query attention heads."""
    num_query_groups: int | None = 8
    """Key/value head groups for grouped-query attention."""
    hf_model_id: str | None = "meta-llama/Llama-3.1-405B"
    """Hugging Face model id this configuration comes from (for export and tokenizer defaults)."""


# ---------------------------------------------------------------------------- Llama 3.2


@dataclass(kw_only=True)
class Llama32ModelProvider1B(Llama31ModelProvider):
    """Llama 3.2 1B (meta-llama/Llama-3.2-1B): 16 layers, 2048 wide, tied embeddings."""

    _aliases_ = ("llama32_1b",)

    num_layers: int = 16
    """Number of transformer layers."""
    hidden_size: int = 2048
    """Model width: the size of the hidden states."""
    ffn_hidden_size: int | None = 8192
    """Hidden size of the MLP."""
    num_attention_heads: int = 32
    """Number of query attention heads."""
    num_query_groups: int | None = 8
    """Key/value head groups for grouped-query attention."""
    kv_channels: int | None = 64
    """Size of each attention head."""
    share_embeddings_and_output_weights: bool = True
    """Tie the output layer to the input embedding."""
    rope_scaling_factor: float = 32.0
    """Factor of the Llama-3.1-style rotary scaling."""
    hf_model_id: str | None = "meta-llama/Llama-3.2-1B"
    """Hugging Face model id this configuration comes from (for export and tokenizer defaults)."""


@dataclass(kw_only=True)
class Llama32ModelProvider3B(Llama31ModelProvider):
    """Llama 3.2 3B (meta-llama/Llama-3.2-3B): 28 layers, 3072 wide, 24 heads, tied embeddings."""

    _aliases_ = ("llama32_3b",)

    num_layers: int = 28
    """Number of transformer layers."""
    hidden_size: int = 3072
    """Model width: the size of the hidden states."""
    ffn_hidden_size: int | None = 8192
    """Hidden size of the MLP."""
    num_attention_heads: int = 24
    """Number of query attention heads."""
    num_query_groups: int | None = 8
    """Key/value head groups for grouped-query attention."""
    kv_channels: int | None = 128
    """Size of each attention head."""
    share_embeddings_and_output_weights: bool = True
    """Tie the output layer to the input embedding."""
    rope_scaling_factor: float = 32.0
    """Factor of the Llama-3.1-style rotary scaling."""
    hf_model_id: str | None = "meta-llama/Llama-3.2-3B"
    """Hugging Face model id this configuration comes from (for export and tokenizer defaults)."""
