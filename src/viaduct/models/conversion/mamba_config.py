"""Mamba-2 `config.json` <-> `MambaModelProvider`, in both published layouts (no torch: validation reads it).

- transformers' `Mamba2ForCausalLM` (`model_type: mamba2`): `hidden_size`, `num_hidden_layers`,
  `state_size`, `head_dim`, `num_heads`, `n_groups`, `expand`, `chunk_size`, `conv_kernel`, ...
- the original `state-spaces/mamba2-*` files of `mamba_ssm` (`MambaLMHeadModel`, no `architectures`):
  `d_model`, `n_layer`, `vocab_size`, `pad_vocab_size_multiple`, `tie_embeddings` and `ssm_cfg` with
  `layer: "Mamba2"`, `d_state`, `headdim`, `ngroups`, ...

Every layer becomes an `M` layer of viaduct's `MambaModel`. A value that model cannot compute (another
convolution width or activation, a clamped time step, no convolution bias, MLP or attention layers in
a `mamba_ssm` config, ...) is refused with the field named rather than silently dropped. Values that
only shape the initialization of weights the checkpoint then overwrites (`time_step_min` / `max` /
`floor`, `A_init_range`, `rescale_prenorm_residual`) are accepted and have no effect.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from viaduct.config import ConfigError, Problem

if TYPE_CHECKING:
    from viaduct.models.conversion.hf_config import _Reader
    from viaduct.models.mamba.provider import HybridModelProvider

HF_MAMBA2 = "Mamba2ForCausalLM"
"""transformers' Mamba-2 language model."""
STATE_SPACES = "MambaLMHeadModel"
"""`mamba_ssm`'s language model class: the layout of the original `state-spaces/mamba2-*` files."""
MAMBA_ARCHITECTURES = (HF_MAMBA2, STATE_SPACES)

# What viaduct's Mamba2Mixer computes (MambaLayer builds it with these): Mamba-2's published values.
_CONV_KERNEL = 4
_UNCLAMPED = (0.0, math.inf)


def is_state_spaces_config(cfg: Mapping[str, Any]) -> bool:
    """Whether a config without `architectures` is `mamba_ssm`'s (its own field names)."""
    return "ssm_cfg" in cfg or ("d_model" in cfg and "n_layer" in cfg)


def _special_float(value: object) -> object:
    """transformers 5 writes infinities as {"__float__": "Infinity"} (earlier versions as the
    non-standard JSON `Infinity`, which Python's json reads as a float)."""
    if isinstance(value, Mapping) and set(value) == {"__float__"}:
        return {"Infinity": math.inf, "-Infinity": -math.inf, "NaN": math.nan}.get(value["__float__"], value)
    return value


def _time_step_limit(r: _Reader, key: str, value: object) -> None:
    """Mamba-2 clamps the time step to this range; viaduct's layers leave it unclamped."""
    if value is None:
        return
    raw = [_special_float(v) for v in value] if isinstance(value, (list, tuple)) else []
    bounds = [float(v) for v in raw if isinstance(v, (int, float)) and not isinstance(v, bool)]
    if len(raw) != 2 or len(bounds) != 2 or (bounds[0], bounds[1]) != _UNCLAMPED:
        r.problem(
            key,
            "only [0.0, Infinity] (no clamping of the time step) is supported: viaduct's Mamba layers "
            "do not clamp it",
            value,
        )


def _common_fields(
    r: _Reader,
    *,
    layers: int | None,
    hidden: int | None,
    heads: int | None,
    groups: int | None,
) -> dict[str, Any]:
    if heads and groups and heads % groups:
        r.problem(
            "n_groups" if "n_groups" in r.cfg else "ssm_cfg.ngroups", f"must divide {heads} heads", groups
        )
    return {
        "num_layers": layers,
        "hybrid_layer_pattern": "M" * layers if layers else None,
        "hidden_size": hidden,
        "mamba_num_heads": heads,
        "mamba_num_groups": groups,
        # Everything around the Mamba layers is a Mamba-2 model's: RMSNorm, no positions, no dropout.
        "normalization": "RMSNorm",
        "layernorm_zero_centered_gamma": False,
        "position_embedding_type": "none",
        "activation_func": "silu",
        "hidden_dropout": 0.0,
        "attention_dropout": 0.0,
    }


def parse_hf_mamba2(r: _Reader) -> dict[str, Any]:
    """transformers' `Mamba2Config` -> `MambaModelProvider` fields."""
    hidden = r.get_int("hidden_size")
    layers = r.get_int("num_hidden_layers")
    heads = r.get_int("num_heads", 128)
    head_dim = r.get_int("head_dim", 64)
    expand = r.get_int("expand", 2)
    groups = r.get_int("n_groups", 8)
    if hidden and heads and head_dim and expand and hidden * expand != heads * head_dim:
        r.problem(
            "num_heads",
            f"num_heads x head_dim ({heads} x {head_dim}) must equal expand x hidden_size "
            f"({expand} x {hidden}), as transformers requires",
            heads,
        )
    fields = _common_fields(r, layers=layers, hidden=hidden, heads=heads, groups=groups)
    r.require("conv_kernel", _CONV_KERNEL, "viaduct's Mamba layers convolve over 4 positions")
    r.require("use_conv_bias", True, "viaduct's Mamba layers always have a convolution bias")
    r.require("hidden_act", "silu", "viaduct's Mamba layers apply silu after the convolution")
    _time_step_limit(r, "time_step_limit", r.cfg.get("time_step_limit"))
    for key in ("time_step_min", "time_step_max", "time_step_floor"):  # initialization only
        r.get_float(key, 0.001)
    r.get_bool("rescale_prenorm_residual", False)  # initialization only
    fields.update(
        vocab_size=r.get_int("vocab_size"),
        mamba_state_dim=r.get_int("state_size", 128),
        mamba_head_dim=head_dim,
        mamba_chunk_size=r.get_int("chunk_size", 256),
        layernorm_epsilon=r.get_float("layer_norm_epsilon", 1e-5, positive=True),
        add_bias_linear=r.get_bool("use_bias", False),
        share_embeddings_and_output_weights=r.get_bool("tie_word_embeddings", False),
        # Mamba2Block keeps the residual stream in float32 (a no-op for float32 weights), as
        # viaduct's fp32_residual_connection does.
        fp32_residual_connection=r.get_bool("residual_in_fp32", True),
        init_method_std=r.get_float("initializer_range", 0.1, positive=True),
    )
    return fields


# mamba_ssm's Mamba2 defaults (mamba_ssm.modules.mamba2.Mamba2).
_SSM_DEFAULTS: dict[str, Any] = {
    "d_state": 128,
    "d_conv": 4,
    "expand": 2,
    "headdim": 64,
    "ngroups": 1,
    "chunk_size": 256,
}
# The ssm_cfg keys mamba_ssm's Mamba2 takes (the others above are checked; the rest choose kernels or
# initialization, so any value computes the same model).
_SSM_KNOWN = {
    "layer",
    "d_state",
    "d_conv",
    "expand",
    "headdim",
    "ngroups",
    "chunk_size",
    "A_init_range",
    "dt_min",
    "dt_max",
    "dt_init_floor",
    "dt_limit",
    "bias",
    "conv_bias",
    "D_has_hdim",
    "rmsnorm",
    "norm_before_gate",
    "d_ssm",
    "use_mem_eff_path",
    "activation",
    "sequence_parallel",
    "process_group",
    "layer_idx",
    "conv_init",
}


def parse_state_spaces(r: _Reader) -> dict[str, Any]:
    """`mamba_ssm`'s `MambaConfig` (the `state-spaces/mamba2-*` config.json) -> provider fields."""
    ssm = r.cfg.get("ssm_cfg")
    if ssm is None:
        ssm = {}
    if not isinstance(ssm, Mapping):
        r.problem("ssm_cfg", "must be an object", ssm)
        ssm = {}
    if ssm.get("layer", "Mamba1") != "Mamba2":
        r.problem(
            "ssm_cfg.layer",
            "only Mamba-2 layers ('Mamba2') are supported; Mamba-1 checkpoints do not convert",
            ssm.get("layer"),
        )
    sub = type(r)({**_SSM_DEFAULTS, **ssm}, r.source)

    def ssm_int(key: str) -> int | None:
        return sub.get_int(key)

    hidden = r.get_int("d_model")
    layers = r.get_int("n_layer")
    head_dim, expand, groups = ssm_int("headdim"), ssm_int("expand"), ssm_int("ngroups")
    heads = None
    if hidden and head_dim and expand:
        if (expand * hidden) % head_dim:
            sub.problem("headdim", f"must divide expand x d_model ({expand * hidden})", head_dim)
        else:
            heads = expand * hidden // head_dim
    d_ssm = ssm.get("d_ssm")
    if d_ssm is not None and hidden and expand and d_ssm != expand * hidden:
        sub.problem(
            "d_ssm",
            "a scan over part of the channels (the rest a gated MLP) is not supported; only null or "
            "expand x d_model",
            d_ssm,
        )
    sub.require("d_conv", _CONV_KERNEL, "viaduct's Mamba layers convolve over 4 positions")
    sub.require("conv_bias", True, "viaduct's Mamba layers always have a convolution bias")
    sub.require("rmsnorm", True, "viaduct's Mamba layers always apply the gated RMSNorm")
    sub.require("norm_before_gate", False, "viaduct's gated RMSNorm gates before normalizing")
    sub.require("D_has_hdim", False, "viaduct's skip connection D has one value per head")
    sub.require("activation", "silu", "viaduct's Mamba layers apply silu after the convolution")
    _time_step_limit(sub, "dt_limit", ssm.get("dt_limit"))
    for key in sorted(set(ssm) - _SSM_KNOWN):
        sub.problem(key, "is not a Mamba2 option viaduct knows", ssm[key])
    bias = sub.get_bool("bias", False)
    # Problems of ssm_cfg name their place in it.
    r.problems += [
        Problem(f"ssm_cfg.{p.path}", p.message, p.value, fix=p.fix, source=p.source) for p in sub.problems
    ]
    d_intermediate = r.cfg.get("d_intermediate", 0)
    if d_intermediate not in (0, None):
        r.problem(
            "d_intermediate", "MLP blocks after each Mamba layer are not supported (only 0)", d_intermediate
        )
    for key in ("attn_layer_idx",):
        if r.cfg.get(key) not in (None, []):
            r.problem(key, "attention layers are not supported in a mamba_ssm config (only [])", r.cfg[key])
    r.require("rms_norm", True, "viaduct's Mamba models use RMSNorm")
    r.get_bool("fused_add_norm", True)  # a kernel choice: the same model either way
    vocab = r.get_int("vocab_size")
    multiple = r.get_int("pad_vocab_size_multiple", 8)
    if vocab and multiple:
        # mamba_ssm pads the vocabulary in the model itself: the weights have the padded rows.
        vocab = -(-vocab // multiple) * multiple
    fields = _common_fields(r, layers=layers, hidden=hidden, heads=heads, groups=groups)
    fields.update(
        vocab_size=vocab,
        mamba_state_dim=ssm_int("d_state"),
        mamba_head_dim=head_dim,
        mamba_chunk_size=ssm_int("chunk_size"),
        layernorm_epsilon=1e-5,  # mamba_ssm's fixed norm_epsilon
        add_bias_linear=bias,
        share_embeddings_and_output_weights=r.get_bool("tie_embeddings", True),
        fp32_residual_connection=r.get_bool("residual_in_fp32", True),
        init_method_std=0.02,
    )
    return fields


def mamba_hf_config(p: HybridModelProvider) -> dict[str, Any]:
    """transformers' `Mamba2ForCausalLM` config of the (finalized) model `p` builds, or a
    `ConfigError` naming what no Mamba2ForCausalLM computes."""
    from viaduct.config.types import DType

    problems: list[Problem] = []
    fix = "export a model with only Mamba layers ('M') and Mamba-2's RMSNorm"

    def refuse(field: str, value: object, why: str) -> None:
        problems.append(Problem(f"model.{field}", why, value, fix=fix))

    pattern = p.layer_pattern()
    if set(pattern) != {"M"}:
        refuse(
            "hybrid_layer_pattern",
            pattern,
            "attention ('*') and MLP ('-') layers have no place in a Mamba2ForCausalLM: a hybrid exports as "
            "NemotronHForCausalLM",
        )
    if p.normalization != "RMSNorm" or p.layernorm_zero_centered_gamma:
        refuse("normalization", p.normalization, "Mamba2ForCausalLM normalizes with RMSNorm (plain gamma)")
    heads, head_dim = p.mamba_heads(), p.mamba_head_dim
    if (heads * head_dim) % p.hidden_size:
        refuse(
            "mamba_num_heads",
            heads,
            f"Mamba2ForCausalLM's inner size is a whole multiple (expand) of hidden_size ({p.hidden_size}); "
            f"mamba_num_heads x mamba_head_dim is {heads * head_dim}",
        )
    if problems:
        raise ConfigError(problems, header="no Hugging Face architecture computes this model")
    return {
        "architectures": [HF_MAMBA2],
        "model_type": "mamba2",
        "vocab_size": p.vocab_size,
        "hidden_size": p.hidden_size,
        "num_hidden_layers": p.num_layers,
        "state_size": p.mamba_state_dim,
        "head_dim": head_dim,
        "num_heads": heads,
        "n_groups": p.mamba_num_groups,
        "expand": heads * head_dim // p.hidden_size,
        "chunk_size": p.mamba_chunk_size,
        "conv_kernel": _CONV_KERNEL,
        "hidden_act": "silu",
        "use_bias": p.add_bias_linear,
        "use_conv_bias": True,
        "layer_norm_epsilon": p.layernorm_epsilon,
        "residual_in_fp32": p.fp32_residual_connection,
        "tie_word_embeddings": p.share_embeddings_and_output_weights,
        "initializer_range": p.init_method_std,
        "torch_dtype": DType.canonical_name(p.params_dtype),
    }
