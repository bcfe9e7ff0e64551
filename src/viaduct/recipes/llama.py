"""Llama-family pretraining recipes (published shapes; mock data and a null tokenizer by default)."""

from __future__ import annotations

from viaduct.config.types import FunctionRef
from viaduct.models import GPTModelProvider
from viaduct.recipes.common import pretrain_common
from viaduct.recipes.registry import recipe
from viaduct.training.config import ConfigContainer


def llama_model(**shape: object) -> GPTModelProvider:
    """The Llama architecture: RMSNorm, SwiGLU, RoPE, no biases, no dropout, untied embeddings."""
    base: dict[str, object] = dict(
        normalization="RMSNorm",
        activation_func=FunctionRef("silu"),
        gated_linear_unit=True,
        position_embedding_type="rope",
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        share_embeddings_and_output_weights=False,
        layernorm_epsilon=1e-5,
        init_method_std=0.02,
    )
    base.update(shape)
    return GPTModelProvider(**base)  # type: ignore[arg-type]


def llama3_model(**shape: object) -> GPTModelProvider:
    """Llama 3: grouped-query attention with 8 groups, rotary base 500k, 128k vocabulary."""
    base: dict[str, object] = dict(
        num_query_groups=8, rotary_base=500_000, vocab_size=128_256, seq_length=8192, init_method_std=0.01
    )
    base.update(shape)
    return llama_model(**base)


@recipe("llama32_1b")
def llama32_1b_pretrain_config() -> ConfigContainer:
    """Llama 3.2 1B shape (16 layers, 2048 wide, tied embeddings, RoPE scaling factor 32)."""
    model = llama3_model(
        num_layers=16,
        hidden_size=2048,
        ffn_hidden_size=8192,
        num_attention_heads=32,
        kv_channels=64,
        share_embeddings_and_output_weights=True,
        rope_scaling=True,
        rope_scaling_factor=32.0,
    )
    return pretrain_common(model, name="llama32_1b", seq_length=8192)


@recipe("llama3_8b")
def llama3_8b_pretrain_config() -> ConfigContainer:
    """Llama 3 8B shape (32 layers, 4096 wide, 14336 FFN, 8 KV groups)."""
    model = llama3_model(num_layers=32, hidden_size=4096, ffn_hidden_size=14_336, num_attention_heads=32)
    return pretrain_common(model, name="llama3_8b", seq_length=8192)
