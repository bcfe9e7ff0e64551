"""GPT-2 model providers: the four published GPT-2 sizes (124M, 355M, 774M, 1.5B).

Each class only changes field defaults of `GPTModelProvider`; each size has a short name for
overrides (`model=gpt2_124m`). Shapes are those of the Hugging Face `config.json` of the model named
in `hf_model_id`; the MLP is 4 x hidden_size, which `finalize()` derives.

Redeclared fields only change defaults; their help text is the `GPTModelProvider` field's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from viaduct.config import FunctionRef
from viaduct.models.gpt.provider import GPTModelProvider
from viaduct.models.transformer_config import Normalization, PositionEmbeddingType


@dataclass(kw_only=True)
class GPT2ModelProvider(GPTModelProvider):
    """GPT-2: LayerNorm, tanh-approximate GELU, biases everywhere, learned positions, tied embeddings."""

    # Declared with the base's type: mypy would infer a one-name tuple that the sizes below, with
    # two names each, could not override.
    _aliases_: ClassVar[tuple[str, ...]] = ("gpt2",)

    normalization: Normalization = "LayerNorm"
    layernorm_epsilon: float = 1e-5
    activation_func: FunctionRef = FunctionRef("fast_gelu")
    gated_linear_unit: bool = False
    add_bias_linear: bool = True
    position_embedding_type: PositionEmbeddingType = "learned_absolute"
    share_embeddings_and_output_weights: bool = True
    vocab_size: int | None = 50257
    seq_length: int = 1024
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    init_method_std: float = 0.02


@dataclass(kw_only=True)
class GPT2ModelProvider124M(GPT2ModelProvider):
    """GPT-2 124M (openai-community/gpt2): 12 layers, 768 wide, 12 heads."""

    _aliases_ = ("gpt2_124m", "gpt2_small")

    num_layers: int = 12
    hidden_size: int = 768
    num_attention_heads: int = 12
    hf_model_id: str | None = "openai-community/gpt2"


@dataclass(kw_only=True)
class GPT2ModelProvider355M(GPT2ModelProvider):
    """GPT-2 Medium 355M (openai-community/gpt2-medium): 24 layers, 1024 wide, 16 heads."""

    _aliases_ = ("gpt2_355m", "gpt2_medium")

    num_layers: int = 24
    hidden_size: int = 1024
    num_attention_heads: int = 16
    hf_model_id: str | None = "openai-community/gpt2-medium"


@dataclass(kw_only=True)
class GPT2ModelProvider774M(GPT2ModelProvider):
    """GPT-2 Large 774M (openai-community/gpt2-large): 36 layers, 1280 wide, 20 heads."""

    _aliases_ = ("gpt2_774m", "gpt2_large")

    num_layers: int = 36
    hidden_size: int = 1280
    num_attention_heads: int = 20
    hf_model_id: str | None = "openai-community/gpt2-large"


@dataclass(kw_only=True)
class GPT2ModelProvider1P5B(GPT2ModelProvider):
    """GPT-2 XL 1.5B (openai-community/gpt2-xl): 48 layers, 1600 wide, 25 heads."""

    _aliases_ = ("gpt2_1p5b", "gpt2_xl")

    num_layers: int = 48
    hidden_size: int = 1600
    num_attention_heads: int = 25
    hf_model_id: str | None = "openai-community/gpt2-xl"
