"""Hugging Face `config.json` -> viaduct model provider: which architectures map, and field by field how.

Every value read from the (untrusted) config is type-checked; every problem is reported at once as a
`ConfigError` naming the field, the value and the file it came from. A value viaduct's model cannot
reproduce exactly (a rope type it does not implement, a layer-dependent sliding window, ...) is refused
rather than approximated: a converted model must compute what the Hugging Face model computes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from viaduct.config import ConfigError, Problem
from viaduct.models.gpt.provider import GPTModelProvider

SUPPORTED_ARCHITECTURES: tuple[str, ...] = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "GPT2LMHeadModel",
    "Mamba2ForCausalLM",
    "MambaLMHeadModel",
    "NemotronHForCausalLM",
)
"""The Hugging Face `architectures` values `AutoBridge` converts (`MambaLMHeadModel`: the original
`state-spaces/mamba2-*` files of `mamba_ssm`, whose config.json names no architecture;
`NemotronHForCausalLM`: NVIDIA's hybrid Mamba / attention / MLP models)."""

# Hugging Face activation names -> viaduct's `activation_func` names (same function, not an approximation).
_ACTIVATIONS: dict[str, str] = {
    "silu": "silu",
    "swish": "silu",
    "gelu": "gelu",
    "gelu_new": "fast_gelu",
    "gelu_pytorch_tanh": "fast_gelu",
    "relu": "relu",
    "relu2": "squared_relu",
    "quick_gelu": "quick_gelu",
}
_DTYPES: dict[str, str] = {
    "float32": "float32",
    "float": "float32",
    "bfloat16": "bfloat16",
    "float16": "float16",
    "half": "float16",
}
# viaduct's rotary embedding hard-codes Llama 3.1's scaling constants (as Megatron does).
_LLAMA3_CONSTANTS = {
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


@dataclass(frozen=True)
class HFModelSpec:
    """What one Hugging Face model is, once its config is read: its architecture and the provider
    fields it maps to."""

    architecture: str
    """One of SUPPORTED_ARCHITECTURES."""
    provider_cls: type[GPTModelProvider]
    """The viaduct family the architecture belongs to."""
    fields: dict[str, Any]
    """Provider field values, every architecture-defining field set explicitly."""


class _Reader:
    """Typed access to a config mapping that collects every problem instead of stopping at the first."""

    def __init__(self, cfg: Mapping[str, Any], source: str) -> None:
        self.cfg, self.source = cfg, source
        self.problems: list[Problem] = []

    def problem(self, key: str, message: str, value: Any, fix: str | None = None) -> None:
        self.problems.append(Problem(key, message, value, fix=fix, source=self.source))

    def get_int(
        self, key: str, default: int | None = None, *, required: bool = True, minimum: int = 1
    ) -> int | None:
        value = self.cfg.get(key)
        if value is None:
            if default is None and required:
                self.problem(key, "is required", None, fix=f"set {key} in config.json")
            return default
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            self.problem(key, f"must be an integer >= {minimum}", value)
            return None
        return value

    def get_float(self, key: str, default: float, *, positive: bool = False) -> float:
        value = self.cfg.get(key, default)
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if not ok or (positive and value <= 0) or (not positive and value < 0):
            self.problem(key, "must be a finite number" + (" > 0" if positive else " >= 0"), value)
            return default
        return float(value)

    def get_bool(self, key: str, default: bool) -> bool:
        value = self.cfg.get(key, default)
        if value is None:
            return default
        if not isinstance(value, bool):
            self.problem(key, "must be true or false", value)
            return default
        return value

    def get_str(self, key: str, default: str | None) -> str | None:
        value = self.cfg.get(key, default)
        if value is not None and not isinstance(value, str):
            self.problem(key, "must be a string", value)
            return default
        return value

    def require(self, key: str, expected: Any, why: str) -> None:
        """Refuse a value viaduct's model cannot reproduce."""
        if key in self.cfg and self.cfg[key] is not None and self.cfg[key] != expected:
            self.problem(key, f"only {expected!r} is supported: {why}", self.cfg[key])


# A config made in code (transformers' config classes) has no `architectures`: its model_type says it.
_MODEL_TYPES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gpt2": "GPT2LMHeadModel",
    "mamba2": "Mamba2ForCausalLM",
    "nemotron_h": "NemotronHForCausalLM",
}


def architecture_of(cfg: Mapping[str, Any], source: str = "config") -> str:
    """The single supported architecture the config names (`architectures`, else `model_type`), or a
    `ConfigError` listing the supported ones."""
    from viaduct.models.conversion.mamba_config import STATE_SPACES, is_state_spaces_config

    archs = cfg.get("architectures")
    if archs is None and cfg.get("model_type") in _MODEL_TYPES:
        return _MODEL_TYPES[cfg["model_type"]]
    if archs is None and "model_type" not in cfg and is_state_spaces_config(cfg):
        return STATE_SPACES
    supported = ", ".join(SUPPORTED_ARCHITECTURES)
    if not isinstance(archs, list) or len(archs) != 1 or archs[0] not in SUPPORTED_ARCHITECTURES:
        raise ConfigError(
            Problem(
                "architectures",
                f"must name exactly one supported architecture ({supported})",
                archs,
                fix="convert a model of a supported architecture",
                source=source,
            ),
            header="AutoBridge: unsupported Hugging Face model",
        )
    return str(archs[0])


def parse_hf_config(cfg: Mapping[str, Any], source: str = "config") -> HFModelSpec:
    """Map a Hugging Face config (as a plain mapping) to viaduct provider fields; `source` names where
    it came from in error messages."""
    if not isinstance(cfg, Mapping):
        raise ConfigError(
            Problem("", "a Hugging Face config must be a JSON object", type(cfg).__name__, source=source)
        )
    arch = architecture_of(cfg, source)
    r = _Reader(cfg, source)
    from viaduct.models.conversion import mamba_config

    if arch == mamba_config.HF_MAMBA2:
        fields = mamba_config.parse_hf_mamba2(r)
    elif arch == mamba_config.STATE_SPACES:
        fields = mamba_config.parse_state_spaces(r)
    elif arch == "NemotronHForCausalLM":
        from viaduct.models.conversion.nemotron_h import parse_nemotron_h

        fields = parse_nemotron_h(r)
    elif arch == "GPT2LMHeadModel":
        fields = _parse_gpt2(r)
    else:
        fields = _parse_llama_style(r, arch)
    dtype = _dtype(r)
    if r.problems:
        raise ConfigError(r.problems, header=f"AutoBridge: cannot convert this {arch} config")
    fields.update(
        params_dtype=dtype,
        bf16=dtype == "bfloat16",
        fp16=dtype == "float16",
        # No vocabulary padding beyond what tensor parallelism needs: the embedding rows are then
        # exactly the Hugging Face ones.
        should_pad_vocab=False,
    )
    name = cfg.get("_name_or_path")
    if isinstance(name, str) and name:
        fields["hf_model_id"] = name
    return HFModelSpec(arch, _provider_class(arch), fields)


def _provider_class(arch: str) -> type[GPTModelProvider]:
    from viaduct.models.gpt2 import GPT2ModelProvider
    from viaduct.models.llama import LlamaModelProvider
    from viaduct.models.mamba import HybridModelProvider, MambaModelProvider
    from viaduct.models.mistral import MistralModelProvider
    from viaduct.models.qwen import Qwen3ModelProvider, Qwen25ModelProvider

    return {
        "LlamaForCausalLM": LlamaModelProvider,
        "MistralForCausalLM": MistralModelProvider,
        "Qwen2ForCausalLM": Qwen25ModelProvider,
        "Qwen3ForCausalLM": Qwen3ModelProvider,
        "GPT2LMHeadModel": GPT2ModelProvider,
        "Mamba2ForCausalLM": MambaModelProvider,
        "MambaLMHeadModel": MambaModelProvider,
        "NemotronHForCausalLM": HybridModelProvider,
    }[arch]


def _dtype(r: _Reader) -> str:
    # transformers 5 writes "dtype", earlier versions "torch_dtype".
    key = "dtype" if r.cfg.get("dtype") is not None else "torch_dtype"
    value = r.cfg.get(key)
    if value is None or value == "auto":
        return "float32"
    if not isinstance(value, str) or value.removeprefix("torch.") not in _DTYPES:
        r.problem(key, f"must be one of {', '.join(sorted(_DTYPES))}", value)
        return "float32"
    return _DTYPES[value.removeprefix("torch.")]


def _activation(r: _Reader, key: str, default: str) -> str:
    act = r.get_str(key, default)
    if act not in _ACTIVATIONS:
        r.problem(key, f"must be one of {', '.join(_ACTIVATIONS)}", act)
        return "silu"
    return _ACTIVATIONS[act]


def _rope(r: _Reader, fields: dict[str, Any]) -> None:
    """rope_theta and rope scaling: transformers 5 keeps both in `rope_parameters`, earlier versions
    have `rope_theta` and `rope_scaling`."""
    params = r.cfg.get("rope_parameters")
    key = "rope_parameters"
    if params is None:
        params, key = r.cfg.get("rope_scaling"), "rope_scaling"
    if params is not None and not isinstance(params, Mapping):
        r.problem(key, "must be an object", params)
        params = None
    params = dict(params or {})
    theta = params.get("rope_theta", r.cfg.get("rope_theta", 10000.0))
    if (
        isinstance(theta, bool)
        or not isinstance(theta, (int, float))
        or not math.isfinite(theta)
        or theta <= 0
    ):
        r.problem("rope_theta", "must be a positive number", theta)
    elif theta != int(theta):
        r.problem("rope_theta", "must be a whole number (viaduct's rotary_base is an integer)", theta)
    else:
        fields["rotary_base"] = int(theta)
    rope_type = params.get("rope_type", params.get("type", "default"))
    partial = params.get("partial_rotary_factor", r.cfg.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        r.problem(f"{key}.partial_rotary_factor", "only 1.0 (rotate the whole head) is supported", partial)
    if rope_type in (None, "default"):
        return
    factor = params.get("factor")
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not factor > 0:
        r.problem(f"{key}.factor", "must be a positive number", factor)
        return
    if rope_type == "linear":
        fields["seq_len_interpolation_factor"] = float(factor)
    elif rope_type == "llama3":
        for name, expected in _LLAMA3_CONSTANTS.items():
            if params.get(name) != expected:
                r.problem(
                    f"{key}.{name}",
                    f"viaduct's Llama 3.1 rope scaling uses {name} = {expected} (Llama 3.1 / 3.2's value)",
                    params.get(name),
                )
        fields["rope_scaling"] = True
        fields["rope_scaling_factor"] = float(factor)
    else:
        r.problem(
            f"{key}.rope_type",
            "viaduct implements the rope types default, linear and llama3",
            rope_type,
        )


def _parse_llama_style(r: _Reader, arch: str) -> dict[str, Any]:
    hidden = r.get_int("hidden_size")
    heads = r.get_int("num_attention_heads")
    groups = r.get_int("num_key_value_heads", heads, required=False)
    head_dim = r.cfg.get("head_dim")
    if head_dim is None and hidden and heads:
        if hidden % heads:
            r.problem(
                "num_attention_heads", f"must divide hidden_size ({hidden}) when head_dim is unset", heads
            )
        head_dim = hidden // heads
    elif head_dim is not None:
        head_dim = r.get_int("head_dim")
    if heads and groups and heads % groups:
        r.problem("num_key_value_heads", f"must divide num_attention_heads ({heads})", groups)
    fields: dict[str, Any] = {
        "num_layers": r.get_int("num_hidden_layers"),
        "hidden_size": hidden,
        "ffn_hidden_size": r.get_int("intermediate_size"),
        "num_attention_heads": heads,
        "num_query_groups": groups,
        "kv_channels": head_dim,
        "vocab_size": r.get_int("vocab_size"),
        "seq_length": r.get_int("max_position_embeddings"),
        "layernorm_epsilon": r.get_float("rms_norm_eps", 1e-6, positive=True),
        "activation_func": _activation(r, "hidden_act", "silu"),
        "share_embeddings_and_output_weights": r.get_bool("tie_word_embeddings", False),
        "attention_dropout": r.get_float("attention_dropout", 0.0),
        "hidden_dropout": 0.0,
        "init_method_std": r.get_float("initializer_range", 0.02, positive=True),
        "normalization": "RMSNorm",
        "gated_linear_unit": True,
        "position_embedding_type": "rope",
        "qk_layernorm": arch == "Qwen3ForCausalLM",
        "window_size": None,
    }
    _rope(r, fields)
    # Biases: Qwen2 has them on q, k and v only; Llama's attention_bias puts one on o_proj too, which
    # viaduct (add_bias_linear) only has together with MLP biases.
    if arch == "Qwen2ForCausalLM":
        fields.update(add_qkv_bias=True, add_bias_linear=False)
    elif arch == "LlamaForCausalLM":
        attn_bias, mlp_bias = r.get_bool("attention_bias", False), r.get_bool("mlp_bias", False)
        if attn_bias != mlp_bias:
            r.problem(
                "mlp_bias",
                "viaduct gives every linear layer a bias or none (add_bias_linear): attention_bias and "
                f"mlp_bias (attention_bias = {attn_bias}) must be equal",
                mlp_bias,
            )
        fields.update(add_qkv_bias=False, add_bias_linear=attn_bias and mlp_bias)
    else:
        if r.get_bool("attention_bias", False):
            r.problem(
                "attention_bias",
                "biases on the attention projections without MLP biases have no viaduct equivalent",
                True,
            )
        fields.update(add_qkv_bias=False, add_bias_linear=False)
    r.require("pretraining_tp", 1, "a different value changes the numerics of the Hugging Face model")
    # Sliding windows: Mistral's applies to every layer (viaduct's window_size); Qwen's depends on the
    # layer (max_window_layers, layer_types), which viaduct's uniform layers cannot express.
    if arch == "MistralForCausalLM":
        window = r.get_int("sliding_window", required=False)
        if window is not None:
            # Hugging Face lets a query see keys with q - k < sliding_window; viaduct's left window
            # counts the keys before the query, so it is one less.
            fields["window_size"] = (window - 1, 0)
    elif r.get_bool("use_sliding_window", False):
        r.problem(
            "use_sliding_window",
            "a sliding window on some layers only (max_window_layers) has no viaduct equivalent",
            True,
            fix="set use_sliding_window to false (the published Qwen checkpoints do)",
        )
    layer_types = r.cfg.get("layer_types")
    if layer_types is not None and arch != "MistralForCausalLM":
        if not isinstance(layer_types, list) or any(t != "full_attention" for t in layer_types):
            r.problem("layer_types", "only full attention on every layer is supported", layer_types)
    return fields


def _parse_gpt2(r: _Reader) -> dict[str, Any]:
    hidden = r.get_int("n_embd")
    heads = r.get_int("n_head")
    if hidden and heads and hidden % heads:
        r.problem("n_head", f"must divide n_embd ({hidden})", heads)
    inner = r.get_int("n_inner", required=False)
    r.require("scale_attn_weights", True, "viaduct always scales attention scores by 1/sqrt(head_dim)")
    r.require("scale_attn_by_inverse_layer_idx", False, "viaduct has no per-layer attention scaling")
    r.require("add_cross_attention", False, "viaduct's GPT model is decoder-only")
    return {
        "num_layers": r.get_int("n_layer"),
        "hidden_size": hidden,
        "ffn_hidden_size": inner if inner is not None else (4 * hidden if hidden else None),
        "num_attention_heads": heads,
        "num_query_groups": heads,
        "kv_channels": hidden // heads if hidden and heads else None,
        "vocab_size": r.get_int("vocab_size"),
        "seq_length": r.get_int("n_positions"),
        "layernorm_epsilon": r.get_float("layer_norm_epsilon", 1e-5, positive=True),
        "activation_func": _activation(r, "activation_function", "gelu_new"),
        "share_embeddings_and_output_weights": r.get_bool("tie_word_embeddings", True),
        # viaduct has one dropout for the embedding and the residual branches.
        "hidden_dropout": r.get_float("resid_pdrop", 0.1),
        "attention_dropout": r.get_float("attn_pdrop", 0.1),
        "init_method_std": r.get_float("initializer_range", 0.02, positive=True),
        "normalization": "LayerNorm",
        "gated_linear_unit": False,
        "add_bias_linear": True,
        "add_qkv_bias": False,
        "qk_layernorm": False,
        "position_embedding_type": "learned_absolute",
        "window_size": None,
    }
