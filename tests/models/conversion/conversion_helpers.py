"""Tiny random Hugging Face models built locally with transformers (the oracle), saved to a directory."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

transformers = __import__("pytest").importorskip("transformers")

VOCAB = 96

ARCHS: dict[str, tuple[str, dict[str, Any]]] = {
    # Llama 2/3 style: grouped-query attention, untied output layer.
    "llama": (
        "LlamaConfig",
        dict(hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False),
    ),
    # Llama 3.1 rope scaling with Llama 3.2's tied embeddings and an explicit head_dim.
    "llama31": (
        "LlamaConfig",
        dict(hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, max_position_embeddings=4096, tie_word_embeddings=True,
             rope_theta=500000.0,
             rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                           "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    ),
    # Qwen 2.5: biases on q, k, v only; tied.
    "qwen2": (
        "Qwen2Config",
        dict(hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True),
    ),
    # Qwen 3: QK norm, explicit head_dim, multi-query attention.
    "qwen3": (
        "Qwen3Config",
        dict(hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=1, head_dim=16, max_position_embeddings=64, tie_word_embeddings=False),
    ),
    # Mistral with a sliding window shorter than the test sequence, so it matters.
    "mistral": (
        "MistralConfig",
        dict(hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, sliding_window=5, tie_word_embeddings=False),
    ),
    "gpt2": ("GPT2Config", dict(n_embd=32, n_layer=2, n_head=4, n_positions=64)),
}  # fmt: skip

MODEL_CLASSES = {
    "LlamaConfig": "LlamaForCausalLM",
    "Qwen2Config": "Qwen2ForCausalLM",
    "Qwen3Config": "Qwen3ForCausalLM",
    "MistralConfig": "MistralForCausalLM",
    "GPT2Config": "GPT2LMHeadModel",
}


def hf_model(arch: str, seed: int = 0, **overrides: Any) -> Any:
    """A random fp32 model of `arch` in eval mode, every weight drawn (norm scales around 1) so that a
    swapped or misplaced tensor changes the output."""
    config_name, kwargs = ARCHS[arch]
    config = getattr(transformers, config_name)(**{"vocab_size": VOCAB, **kwargs, **overrides})
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = getattr(transformers, MODEL_CLASSES[config_name])(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0.0, 0.1)
            if p.ndim == 1 and ("norm" in name or ".ln_" in name or "layernorm" in name):
                p.add_(1.0)
    return model


def save_hf(arch: str, directory: Path, seed: int = 0, **overrides: Any) -> Any:
    model = hf_model(arch, seed, **overrides)
    model.save_pretrained(directory)
    return model


def load_hf(directory: Path) -> Any:
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, attn_implementation="eager")
    return model.eval()


def tokens(seq: int = 12, batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))
