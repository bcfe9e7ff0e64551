"""GPT-2 model providers: the four published GPT-2 sizes (124M, 355M, 774M, 1.5B).

Each class only changes field defaults of `GPTModelProvider`; each size has a short name for
overrides (`model=gpt2_124m`). Shapes are those of the Hugging Face `config.json` of the model named
in `hf_model_id`; the MLP is 4 x hidden_size, which `finalize()` derives.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from viaduct.config import FunctionRef
from viaduct.models.gpt.provider import GPTModelProvider


@dataclass(kw_only=True)
class GPT2ModelProvider(GPTModelProvider):
    """GPT-2: LayerNorm, tanh-approximate GELU, biases everywhere, learned positions, tied embeddings."""

    _aliases_ = ("gpt2",)

    normalization: Literal["LayerNorm", "RMSNorm"] = "LayerNorm"
    """Normalization layer type."""
    layernorm_epsilon: float = 1e-5
    """Epsilon of every LayerNorm / RMSNorm."""
    activation_func: FunctionRef = FunctionRef("fast_gelu")
    """MLP activation: gelu, silu, relu, squared_relu, fast_gelu, quick_gelu, ... or a dotted path."""
    gated_linear_unit: bool = False
    """Gated MLP: fc1 produces two halves, act(a) * b (with silu this is SwiGLU)."""
    add_bias_linear: bool = True
    """Give every linear layer a bias."""
    position_embedding_type: Literal["learned_absolute", "rope", "yarn", "none"] = "learned_absolute"
    """Positions: learned absolute embeddings, rotary (rope), YaRN-scaled rotary, or none."""
    share_embeddings_and_output_weights: bool = True
    """Tie the output layer to the input embedding."""
    vocab_size: int | None = 50257
    """Unpadded vocabulary size."""
    seq_length: int = 1024
    """Maximum sequence length; must match dataset.seq_length (the container syncs them)."""
    hidden_dropout: float = 0.1
    """Dropout probability on the hidden states (after attention and after the MLP)."""
    attention_dropout: float = 0.1
    """Dropout probability on the attention weights."""
    init_method_std: float = 0.02
    """Standard deviation of the normal weight init (output layers are scaled by 1/sqrt(2 x num_layers))."""


@dataclass(kw_only=True)
class GPT2ModelProvider124M(GPT2ModelProvider):
    """GPT-2 124M (openai-community/gpt2): 12 layers, 768 wide, 12 heads."""

    _aliases_ = ("gpt2_124m", "gpt2_small")

    num_layers: int = 12
    """Number of transformer layers."""
    hidden_size: int = 768
    """Model width: the size of the hidden states."""
    num_attention_heads: int = 12
    """Number of query attention heads."""
    hf_model_id: str | None = "openai-community/gpt2"
    """Hugging Face model id this configuration comes from (for export and tokenizer defaults)."""


@dataclass(kw_only=True)
class GPT2ModelProvider355M(GPT2ModelProvider):
    """GPT-2 Medium 355M (openai-community/gpt2-medium): 24 layers, 1024 wide, 16 heads."""

    _aliases_ = ("gpt2_355m", "gpt2_medium")

    num_layers: int = 24
    """Number of transformer layers."""
    hidden_size: int = 1024
    """Model width: the size of the hidden states."""
    num_attention_heads: int = 16
    """Number of query attention heads."""
    hf_model_id: str | None = "openai-community/gpt2-medium"
    """Hugging Face model id this configuration comes from (for export and tokenizer defaults)."""


@dataclass(kw_only=True)
class GPT2ModelProvider774M(GPT2ModelProvider):
    """GPT-2 Large 774M (openai-community/gpt2-large): 36 layers, 1280 wide, 20 heads."""

    _aliases_ = ("gpt2_774m", "gpt2_large")

    num_layers: int = 36
    """Number of transformer layers."""
    hidden_size: int = 1280
    """Model width: the size of the hidden states."""
    num_attention_heads: int = 20
    """Number of query attention heads."""
    hf_model_id: str | None = "openai-community/gpt2-large"
    """Hugging Face model id this configuration comes from (for export and tokenizer defaults)."""


@dataclass(kw_only=True)
class GPT2ModelProvider1P5B(GPT2ModelProvider):
    """GPT-2 XL 1.5B (openai-community/gpt2-xl): 48 layers, 1600 wide, 25 heads."""

    _aliases_ = ("gpt2_1p5b", "gpt2_xl")

    num_layers: int = 48
    """Number of transformer layers."""
    hidden_size: int = 1600
    """Model width: the size of the hidden states."""
    num_attention_heads: int = 25
    """Number of query attention heads."""
    hf_model_id: str | None = "openai-community/gpt2-xl"
    """Hugging Face model id this configuration comes from (for export and tokenizer defaults)."""
