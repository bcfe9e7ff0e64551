"""viaduct model provider -> Hugging Face `config.json`: the reverse of `hf_config`, for exporting a
model that did not come from Hugging Face (one trained from scratch).

The architecture is chosen from what the model computes: learned positions, LayerNorm and biases are
GPT-2; rotary positions with RMSNorm and a gated MLP are Llama, or its relatives that differ in one
feature (Qwen 3: QK norm; Qwen 2: QKV biases; Mistral: a sliding window). A model none of them
computes is refused with the reason, rather than exported as something that computes differently.
"""

from __future__ import annotations

from typing import Any

from viaduct.config import ConfigError, Problem
from viaduct.config.types import DType, FunctionRef
from viaduct.models.gpt.provider import GPTModelProvider

# viaduct activation names -> Hugging Face's (the same function).
_ACTIVATIONS = {
    "silu": "silu",
    "gelu": "gelu",
    "fast_gelu": "gelu_new",
    "relu": "relu",
    "squared_relu": "relu2",
    "quick_gelu": "quick_gelu",
}
_MODEL_TYPES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "GPT2LMHeadModel": "gpt2",
}


def _refuse(field: str, value: object, why: str) -> ConfigError:
    return ConfigError(
        Problem(f"model.{field}", why, value, fix="export a model of a supported architecture"),
        header="no Hugging Face architecture computes this model",
    )


def _activation(p: GPTModelProvider) -> str:
    func = p.activation_func
    name = (
        FunctionRef(func).short_name
        if isinstance(func, (FunctionRef, str))
        else getattr(func, "__name__", "")
    )
    if name not in _ACTIVATIONS:
        raise _refuse("activation_func", name, f"Hugging Face configs name {', '.join(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]


def _architecture(p: GPTModelProvider) -> str:
    if p.position_embedding_type == "learned_absolute":
        if p.normalization != "LayerNorm" or p.gated_linear_unit or not p.add_bias_linear or p.qk_layernorm:
            raise _refuse(
                "position_embedding_type",
                p.position_embedding_type,
                "learned positions export as GPT-2, which has LayerNorm, biases and a plain MLP",
            )
        return "GPT2LMHeadModel"
    if p.position_embedding_type != "rope" or p.normalization != "RMSNorm" or not p.gated_linear_unit:
        raise _refuse(
            "normalization",
            p.normalization,
            "rotary models export as Llama-style models: RMSNorm and a gated MLP",
        )
    if p.qk_layernorm:
        if p.add_bias_linear or p.add_qkv_bias or p.window_size is not None:
            raise _refuse("qk_layernorm", True, "QK norm exports as Qwen 3, which has no biases or window")
        return "Qwen3ForCausalLM"
    if p.add_qkv_bias and not p.add_bias_linear:
        if p.window_size is not None:
            raise _refuse("add_qkv_bias", True, "QKV biases export as Qwen 2, without a sliding window")
        return "Qwen2ForCausalLM"
    if p.window_size is not None:
        left, right = p.window_size
        if right != 0 or left < 0 or p.add_bias_linear or p.add_qkv_bias:
            raise _refuse("window_size", p.window_size, "a causal left window exports as Mistral (no biases)")
        return "MistralForCausalLM"
    if p.add_qkv_bias:
        raise _refuse("add_qkv_bias", True, "QKV biases together with the other biases have no equivalent")
    return "LlamaForCausalLM"


def hf_config_from_provider(provider: GPTModelProvider) -> dict[str, Any]:
    """The Hugging Face config of the model `provider` builds (raises `ConfigError` when no supported
    architecture computes it)."""
    p = provider
    p.finalize()
    from viaduct.models.mamba.provider import HybridModelProvider

    if isinstance(p, HybridModelProvider):
        # All-Mamba models export as Mamba2ForCausalLM, hybrids as NVIDIA's NemotronHForCausalLM.
        if set(p.layer_pattern()) == {"M"}:
            from viaduct.models.conversion.mamba_config import mamba_hf_config

            return mamba_hf_config(p)
        from viaduct.models.conversion.nemotron_h import nemotron_h_hf_config

        return nemotron_h_hf_config(p)
    arch = _architecture(p)
    act = _activation(p)
    dtype = DType.canonical_name(p.params_dtype)
    common: dict[str, Any] = {
        "architectures": [arch],
        "model_type": _MODEL_TYPES[arch],
        "vocab_size": p.vocab_size,
        "tie_word_embeddings": p.share_embeddings_and_output_weights,
        "initializer_range": p.init_method_std,
        "torch_dtype": dtype,
    }
    if arch == "GPT2LMHeadModel":
        return common | {
            "n_embd": p.hidden_size,
            "n_layer": p.num_layers,
            "n_head": p.num_attention_heads,
            "n_positions": p.seq_length,
            "n_inner": p.ffn_hidden_size,
            "layer_norm_epsilon": p.layernorm_epsilon,
            "activation_function": act,
            "resid_pdrop": p.hidden_dropout,
            "embd_pdrop": p.hidden_dropout,
            "attn_pdrop": p.attention_dropout,
        }
    config = common | {
        "hidden_size": p.hidden_size,
        "intermediate_size": p.ffn_hidden_size,
        "num_hidden_layers": p.num_layers,
        "num_attention_heads": p.num_attention_heads,
        "num_key_value_heads": p.num_query_groups,
        "head_dim": p.kv_channels,
        "max_position_embeddings": p.seq_length,
        "rms_norm_eps": p.layernorm_epsilon,
        "hidden_act": act,
        "attention_dropout": p.attention_dropout,
        "rope_theta": float(p.rotary_base),
    }
    if arch == "LlamaForCausalLM":
        config |= {"attention_bias": p.add_bias_linear, "mlp_bias": p.add_bias_linear}
    if arch == "MistralForCausalLM":
        assert p.window_size is not None
        config["sliding_window"] = p.window_size[0] + 1  # Hugging Face's window counts the query too
    if p.rope_scaling:
        config["rope_scaling"] = {
            "rope_type": "llama3",
            "factor": p.rope_scaling_factor,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        }
    elif p.seq_len_interpolation_factor is not None:
        config["rope_scaling"] = {"rope_type": "linear", "factor": p.seq_len_interpolation_factor}
    return config
