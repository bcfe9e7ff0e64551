"""Mistral model providers: Mistral 7B (v0.1) with its sliding-window attention.

Each class only changes field defaults of `LlamaStyleProvider` (the Llama architecture on top of
`GPTModelProvider`); names follow Megatron Bridge
(`megatron.bridge.models.mistral.MistralModelProvider`) so a Bridge YAML `_target_` maps onto them.
The family defaults here are those of Mistral-7B-v0.1 (Bridge's base class describes v0.3; a Bridge
YAML lists every field, so it loads with its own values either way).

Redeclared fields only change defaults; their help text is the `GPTModelProvider` field's.
"""

from __future__ import annotations

from dataclasses import dataclass

from viaduct.models.gpt.provider import LlamaStyleProvider


@dataclass(kw_only=True)
class MistralModelProvider(LlamaStyleProvider):
    """Mistral: Llama-like (RMSNorm, SwiGLU, RoPE, no biases) with 8 key/value groups and a 4096 window."""

    _aliases_ = ("mistral",)

    num_query_groups: int | None = 8
    window_size: tuple[int, int] | None = (4096, 0)
    vocab_size: int | None = 32000
    seq_length: int = 32_768


@dataclass(kw_only=True)
class MistralModelProvider7B(MistralModelProvider):
    """Mistral 7B (mistralai/Mistral-7B-v0.1): 32 layers, 4096 wide, 14336 FFN, 8 key/value groups."""

    _aliases_ = ("mistral_7b",)

    num_layers: int = 32
    hidden_size: int = 4096
    ffn_hidden_size: int | None = 14_336
    num_attention_heads: int = 32
    hf_model_id: str | None = "mistralai/Mistral-7B-v0.1"
