"""Mistral model providers: Mistral 7B (v0.1) with its sliding-window attention.

Each class only changes field defaults of `GPTModelProvider`; names follow Megatron Bridge
(`megatron.bridge.models.mistral.MistralModelProvider`) so a Bridge YAML `_target_` maps onto them.
The family defaults here are those of Mistral-7B-v0.1 (Bridge's base class describes v0.3; a Bridge
YAML lists every field, so it loads with its own values either way).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from viaduct.config import FunctionRef
from viaduct.models.gpt.provider import GPTModelProvider


@dataclass(kw_only=True)
class MistralModelProvider(GPTModelProvider):
    """Mistral: Llama-like (RMSNorm, SwiGLU, RoPE, no biases) with 8 key/value groups and a 4096 window."""

    _aliases_ = ("mistral",)

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
    num_query_groups: int | None = 8
    """Key/value head groups for grouped-query attention."""
    window_size: tuple[int, int] | None = (4096, 0)
    """Sliding-window attention as (left, right) tokens; -1 means unbounded on that side; unset = full."""
    vocab_size: int | None = 32000
    """Unpadded vocabulary size."""
    seq_length: int = 32_768
    """Maximum sequence length; must match dataset.seq_length (the container syncs them)."""
    init_method_std: float = 0.02
    """Standard deviation of the normal weight init (output layers are scaled by 1/sqrt(2 x num_layers))."""


@dataclass(kw_only=True)
class MistralModelProvider7B(MistralModelProvider):
    """Mistral 7B (mistralai/Mistral-7B-v0.1): 32 layers, 4096 wide, 14336 FFN, 8 key/value groups."""

    _aliases_ = ("mistral_7b",)

    num_layers: int = 32
    """Number of transformer layers."""
    hidden_size: int = 4096
    """Model width: the size of the hidden states."""
    ffn_hidden_size: int | None = 14_336
    """Hidden size of the MLP."""
    num_attention_heads: int = 32
    """Number of query attention heads."""
    hf_model_id: str | None = "mistralai/Mistral-7B-v0.1"
    """Hugging Face model id this configuration comes from (for export and tokenizer defaults)."""
