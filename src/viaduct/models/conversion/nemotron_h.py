"""NVIDIA's Nemotron-H hybrid models: transformers' `NemotronHForCausalLM` <-> viaduct's `MambaModel`.

A Nemotron-H stack is a hybrid pattern of three block kinds, each `x + mixer(norm(x))`: Mamba-2 layers
(`M`), attention layers without position embeddings (`*`) and plain MLP layers (`-`, squared ReLU in
the published models), which are viaduct's hybrid layers one for one. The config names the pattern
as `hybrid_override_pattern` (the published checkpoints) or as a list of block types
(`layers_block_type` / `layer_types`, transformers 5); mixture-of-experts blocks and multi-token
prediction layers are refused with the field named.

Names: each block's single `norm` is viaduct's Mamba layer `norm`, its attention layer's
`input_layernorm` or its MLP layer's `pre_mlp_layernorm`; q/k/v merge into `linear_qkv` as for Llama;
`up_proj` / `down_proj` are `linear_fc1` / `linear_fc2`; the Mamba tensors are Mamba-2's. transformers
saves `backbone.*` (as the published checkpoints do), its modules are `model.*`: both load.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from viaduct.config import ConfigError, Problem
from viaduct.models.conversion.mamba_config import _CONV_KERNEL, _time_step_limit
from viaduct.models.conversion.mamba_mapping import mamba_layer_mappings
from viaduct.models.conversion.mapping import ParamMapping, QKVLayout

if TYPE_CHECKING:
    from viaduct.models.conversion.hf_config import _Reader
    from viaduct.models.mamba.provider import HybridModelProvider

HF_NEMOTRON_H = "NemotronHForCausalLM"
"""transformers' Nemotron-H language model."""

# Block type names of transformers 5 (and of the remote-code original) -> viaduct's layer symbols.
_BLOCK_TYPES = {"mamba": "M", "linear_attention": "M", "attention": "*", "full_attention": "*", "mlp": "-"}
_PATTERN_SYMBOLS = {"M": "M", "*": "*", "-": "-"}


def _pattern(r: _Reader) -> str | None:
    """The layer pattern in viaduct's symbols, from the block type list or the pattern string."""
    for key in ("layers_block_type", "layer_types"):
        types = r.cfg.get(key)
        if types is None:
            continue
        if not isinstance(types, list) or not types:
            r.problem(key, "must be a non-empty list of block types", types)
            return None
        bad = sorted({str(t) for t in types if not isinstance(t, str) or t not in _BLOCK_TYPES})
        if bad:
            r.problem(
                key,
                f"holds block types viaduct does not build: {', '.join(bad)} (mixture-of-experts "
                "blocks are not supported yet); only mamba, attention and mlp",
                types,
            )
            return None
        return "".join(_BLOCK_TYPES[t] for t in types)
    pattern = r.get_str("hybrid_override_pattern", None)
    if not pattern:
        r.problem("hybrid_override_pattern", "is required (or layers_block_type)", pattern)
        return None
    bad = sorted(set(pattern) - set(_PATTERN_SYMBOLS))
    if bad:
        r.problem(
            "hybrid_override_pattern",
            f"holds symbols viaduct does not build: {', '.join(bad)} ('E' is a mixture-of-experts block, "
            "not supported yet); only M, * and -",
            pattern,
        )
        return None
    return pattern


def parse_nemotron_h(r: _Reader) -> dict[str, Any]:
    """transformers' `NemotronHConfig` -> `HybridModelProvider` fields."""
    from viaduct.models.conversion.hf_config import _activation

    pattern = _pattern(r)
    hidden = r.get_int("hidden_size")
    heads = r.get_int("mamba_num_heads", 128)
    groups = r.get_int("n_groups", 8)
    if heads and groups and heads % groups:
        r.problem("n_groups", f"must divide mamba_num_heads ({heads})", groups)
    attention_heads = r.get_int("num_attention_heads", 32)
    head_dim = r.get_int("head_dim", None, required=False) or r.get_int("attention_head_dim", 128)
    mtp = r.get_int("num_nextn_predict_layers", 0, minimum=0)
    if mtp:
        r.problem("num_nextn_predict_layers", "multi-token prediction layers are not supported (only 0)", mtp)
    if r.cfg.get("sliding_window") is not None:
        r.problem(
            "sliding_window",
            "a sliding attention window is not supported (only null)",
            r.cfg["sliding_window"],
        )
    r.require("conv_kernel", _CONV_KERNEL, "viaduct's Mamba layers convolve over 4 positions")
    r.require("use_conv_bias", True, "viaduct's Mamba layers always have a convolution bias")
    r.require("mamba_hidden_act", "silu", "viaduct's Mamba layers apply silu after the convolution")
    for key in ("use_bias", "mamba_proj_bias", "attention_bias", "mlp_bias"):
        r.require(
            key, False, "viaduct's hybrid layers take biases everywhere or nowhere; Nemotron-H has none"
        )
    _time_step_limit(r, "time_step_limit", r.cfg.get("time_step_limit"))
    for key in ("time_step_min", "time_step_max", "time_step_floor"):  # initialization only
        r.get_float(key, 0.001)
    r.get_bool("rescale_prenorm_residual", True)  # initialization only
    # transformers' NemotronHForCausalLM never ties its lm_head to the embedding, whatever
    # tie_word_embeddings says (it saves and reads both): neither does the imported model.
    r.get_bool("tie_word_embeddings", False)
    return {
        "hybrid_layer_pattern": pattern,
        "num_layers": len(pattern) if pattern else None,
        "hidden_size": hidden,
        "vocab_size": r.get_int("vocab_size"),
        "mamba_num_heads": heads,
        "mamba_head_dim": r.get_int("mamba_head_dim", 64),
        "mamba_num_groups": groups,
        "mamba_state_dim": r.get_int("ssm_state_size", 128),
        "mamba_chunk_size": r.get_int("chunk_size", None, required=False)
        or r.get_int("mamba_chunk_size", 128),
        "num_attention_heads": attention_heads,
        "num_query_groups": r.get_int("num_key_value_heads", attention_heads),
        "kv_channels": head_dim,
        "ffn_hidden_size": r.get_int("intermediate_size"),
        "gated_linear_unit": False,
        "activation_func": _activation(r, "mlp_hidden_act", "relu2"),
        "normalization": "RMSNorm",
        "layernorm_zero_centered_gamma": False,
        "layernorm_epsilon": r.get_float("layer_norm_epsilon", 1e-5, positive=True),
        "position_embedding_type": "none",
        "add_bias_linear": False,
        "hidden_dropout": r.get_float("hidden_dropout", 0.0),
        "attention_dropout": r.get_float("attention_dropout", 0.0),
        "share_embeddings_and_output_weights": False,
        "fp32_residual_connection": r.get_bool("residual_in_fp32", False),
        "seq_length": r.get_int("max_position_embeddings", 4096),
        "init_method_std": r.get_float("initializer_range", 0.02, positive=True),
    }


def nemotron_h_hf_config(p: HybridModelProvider) -> dict[str, Any]:
    """transformers' `NemotronHForCausalLM` config of the (finalized) hybrid model `p` builds, or a
    `ConfigError` naming what no Nemotron-H computes."""
    from viaduct.config.types import DType
    from viaduct.models.conversion.provider_config import _activation

    problems: list[Problem] = []

    def refuse(field: str, value: object, why: str, fix: str) -> None:
        problems.append(Problem(f"model.{field}", why, value, fix=fix))

    if p.normalization != "RMSNorm" or p.layernorm_zero_centered_gamma:
        refuse(
            "normalization",
            p.normalization,
            "Nemotron-H normalizes with RMSNorm",
            "set model.normalization=RMSNorm",
        )
    if p.position_embedding_type != "none":
        refuse(
            "position_embedding_type",
            p.position_embedding_type,
            "Nemotron-H's attention layers take no position embeddings",
            "set model.position_embedding_type=none",
        )
    for field, value, why in (
        ("gated_linear_unit", p.gated_linear_unit, "Nemotron-H's MLP layers are not gated"),
        ("add_bias_linear", p.add_bias_linear, "Nemotron-H's layers have no biases"),
        ("qk_layernorm", p.qk_layernorm, "Nemotron-H's attention has no query/key norm"),
    ):
        if value:
            refuse(field, value, why, f"set model.{field}=false")
    if p.share_embeddings_and_output_weights:
        refuse(
            "share_embeddings_and_output_weights",
            True,
            "transformers' NemotronHForCausalLM never ties its output layer to the embedding",
            "train the hybrid with model.share_embeddings_and_output_weights=false",
        )
    if p.window_size is not None:
        refuse(
            "window_size",
            p.window_size,
            "Nemotron-H attends over the whole sequence",
            "unset model.window_size",
        )
    if problems:
        raise ConfigError(problems, header="no Hugging Face architecture computes this hybrid model")
    return {
        "architectures": [HF_NEMOTRON_H],
        "model_type": "nemotron_h",
        "vocab_size": p.vocab_size,
        "hidden_size": p.hidden_size,
        "num_hidden_layers": p.num_layers,
        "hybrid_override_pattern": p.layer_pattern(),
        "num_attention_heads": p.num_attention_heads,
        "num_key_value_heads": p.num_query_groups,
        "head_dim": p.kv_channels,
        "intermediate_size": p.ffn_hidden_size,
        "mlp_hidden_act": _activation(p),
        "mamba_num_heads": p.mamba_heads(),
        "mamba_head_dim": p.mamba_head_dim,
        "n_groups": p.mamba_num_groups,
        "ssm_state_size": p.mamba_state_dim,
        "chunk_size": p.mamba_chunk_size,
        "conv_kernel": _CONV_KERNEL,
        "use_conv_bias": True,
        "mamba_hidden_act": "silu",
        "use_bias": False,
        "mamba_proj_bias": False,
        "attention_bias": False,
        "mlp_bias": False,
        "layer_norm_epsilon": p.layernorm_epsilon,
        "residual_in_fp32": p.fp32_residual_connection,
        "hidden_dropout": p.hidden_dropout,
        "attention_dropout": p.attention_dropout,
        "max_position_embeddings": p.seq_length,
        "num_nextn_predict_layers": 0,
        "tie_word_embeddings": False,
        "initializer_range": p.init_method_std,
        "torch_dtype": DType.canonical_name(p.params_dtype),
    }


def nemotron_h_param_mappings(cfg: HybridModelProvider) -> dict[str, ParamMapping]:
    """Every parameter of the hybrid model `cfg` (finalized) builds, by viaduct name."""
    assert cfg.vocab_size is not None and cfg.kv_channels is not None and cfg.num_query_groups is not None
    h, vocab = cfg.hidden_size, cfg.vocab_size
    heads, groups, d = cfg.num_attention_heads, cfg.num_query_groups, cfg.kv_channels
    ffn = cfg.ffn_hidden_size
    out = [
        ParamMapping(
            "embedding.word_embeddings.weight",
            ("backbone.embeddings.weight",),
            ((vocab, h),),
            vocab_rows=True,
        ),
        ParamMapping("decoder.final_layernorm.weight", ("backbone.norm_f.weight",), ((h,),)),
    ]
    if not cfg.share_embeddings_and_output_weights:
        out.append(ParamMapping("output_layer.weight", ("lm_head.weight",), ((vocab, h),), vocab_rows=True))
    for i, symbol in enumerate(cfg.layer_pattern()):
        m, p = f"decoder.layers.{i}.", f"backbone.layers.{i}."
        if symbol == "M":
            out += mamba_layer_mappings(m, p, cfg)
        elif symbol == "*":
            out += [
                ParamMapping(m + "input_layernorm.weight", (p + "norm.weight",), ((h,),)),
                ParamMapping(
                    m + "self_attention.linear_qkv.weight",
                    (p + "mixer.q_proj.weight", p + "mixer.k_proj.weight", p + "mixer.v_proj.weight"),
                    ((heads * d, h), (groups * d, h), (groups * d, h)),
                    "qkv",
                    qkv=QKVLayout(groups, heads // groups, d),
                ),
                ParamMapping(
                    m + "self_attention.linear_proj.weight", (p + "mixer.o_proj.weight",), ((h, heads * d),)
                ),
            ]
        else:
            assert ffn is not None
            out += [
                ParamMapping(m + "pre_mlp_layernorm.weight", (p + "norm.weight",), ((h,),)),
                ParamMapping(m + "mlp.linear_fc1.weight", (p + "mixer.up_proj.weight",), ((ffn, h),)),
                ParamMapping(m + "mlp.linear_fc2.weight", (p + "mixer.down_proj.weight",), ((h, ffn),)),
            ]
    return {pm.megatron: pm for pm in out}


def nemotron_h_name_candidates(hf_name: str) -> tuple[str, ...]:
    """transformers saves (and NVIDIA publishes) `backbone.*`; transformers' modules are named
    `model.*`, which a file written from its state dict holds."""
    if hf_name.startswith("backbone."):
        return (hf_name, "model." + hf_name.removeprefix("backbone."))
    return (hf_name,)
