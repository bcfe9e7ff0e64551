"""Mamba-2 parameter names: viaduct's `MambaModel` <-> transformers' `Mamba2ForCausalLM` and the original
`mamba_ssm` (`state-spaces/mamba2-*`) files.

Tensors are copied as they are (the depthwise conv weight [conv_dim, 1, kernel], one dt_bias / A_log
/ D per head, the gated norm's weight over d_inner), except, with several B/C groups, in_proj's rows
([z | x | B | C | dt] in Mamba-2's files) and conv1d's channels ([x | B | C]), which viaduct keeps by
group (see `Mamba2Mixer`): a reordering of rows, so a round trip is bitwise.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from viaduct.config import ConfigError, Problem
from viaduct.models.conversion.mamba_config import HF_MAMBA2, STATE_SPACES
from viaduct.models.conversion.mapping import ParamMapping
from viaduct.models.mamba.provider import HybridModelProvider


def mamba_param_mappings(arch: str, cfg: HybridModelProvider) -> dict[str, ParamMapping]:
    """Every parameter of the all-Mamba model `cfg` (finalized) builds, by viaduct name."""
    if set(cfg.layer_pattern()) != {"M"}:
        raise ConfigError(
            Problem(
                "hybrid_layer_pattern",
                f"a {arch} has Mamba layers only; attention ('*') and MLP ('-') layers have no place in it",
                cfg.layer_pattern(),
            ),
            header="Mamba-2 conversion",
        )
    assert cfg.vocab_size is not None  # set by every Mamba-2 config
    h, vocab = cfg.hidden_size, cfg.vocab_size
    embedding = "backbone.embeddings.weight" if arch == HF_MAMBA2 else "backbone.embedding.weight"
    out = [
        ParamMapping("embedding.word_embeddings.weight", (embedding,), ((vocab, h),), vocab_rows=True),
        ParamMapping("decoder.final_layernorm.weight", ("backbone.norm_f.weight",), ((h,),)),
    ]
    if not cfg.share_embeddings_and_output_weights:
        out.append(ParamMapping("output_layer.weight", ("lm_head.weight",), ((vocab, h),), vocab_rows=True))
    for i in range(len(cfg.layer_pattern())):
        out += mamba_layer_mappings(f"decoder.layers.{i}.", f"backbone.layers.{i}.", cfg)
    return {pm.megatron: pm for pm in out}


def mamba_layer_mappings(ours: str, theirs: str, cfg: HybridModelProvider) -> list[ParamMapping]:
    """The tensors of one Mamba layer, named with the prefixes `ours` (viaduct) and `theirs`: the
    block's norm and the mixer's tensors keep their names (`norm.weight`, `mixer.in_proj.weight`, ...)
    in Mamba-2's files and in Nemotron-H's."""
    h = cfg.hidden_size
    heads, head_dim = cfg.mamba_heads(), cfg.mamba_head_dim
    d_inner = heads * head_dim
    conv_dim = d_inner + 2 * cfg.mamba_num_groups * cfg.mamba_state_dim
    proj = d_inner + conv_dim + heads
    shapes = {
        "norm.weight": (h,),
        "mixer.in_proj.weight": (proj, h),
        "mixer.conv1d.weight": (conv_dim, 1, 4),
        "mixer.conv1d.bias": (conv_dim,),
        "mixer.dt_bias": (heads,),
        "mixer.A_log": (heads,),
        "mixer.D": (heads,),
        "mixer.norm.weight": (d_inner,),
        "mixer.out_proj.weight": (h, d_inner),
    }
    if cfg.add_bias_linear:
        shapes |= {"mixer.in_proj.bias": (proj,), "mixer.out_proj.bias": (h,)}
    return [
        ParamMapping(ours + name, (theirs + name,), (shape,), **_layout(name, cfg))
        for name, shape in shapes.items()
    ]


def _layout(name: str, cfg: HybridModelProvider) -> dict[str, Any]:
    """How a Mamba layer tensor's rows map: as they are, or regrouped (with several B/C groups,
    viaduct keeps in_proj's and conv1d's rows by group; see `Mamba2Mixer`)."""
    groups = cfg.mamba_num_groups
    if groups == 1:
        return {}
    d_inner, bc = cfg.mamba_heads() * cfg.mamba_head_dim, groups * cfg.mamba_state_dim
    if name.startswith("mixer.in_proj."):
        return {
            "kind": "grouped",
            "sections": (d_inner, d_inner, bc, bc, cfg.mamba_heads()),
            "groups": groups,
        }
    if name.startswith("mixer.conv1d."):
        return {"kind": "grouped", "sections": (d_inner, bc, bc), "groups": groups}
    return {}


def mamba_name_candidates(arch: str, hf_name: str) -> tuple[str, ...]:
    """Names a checkpoint may store `hf_name` under: transformers also loads Mamba2ForCausalLM files
    that kept mamba_ssm's `backbone.embedding.weight` (its load hook renames it)."""
    if arch == HF_MAMBA2 and hf_name == "backbone.embeddings.weight":
        return (hf_name, "backbone.embedding.weight")
    return (hf_name,)


_CONVERT = (
    'python -c "import torch; from safetensors.torch import save_file; '
    "sd = torch.load('pytorch_model.bin', map_location='cpu', weights_only=True); "
    "save_file({k: v.clone().contiguous() for k, v in sd.items()}, 'model.safetensors')\" "
    "in the model directory (weights_only=True keeps torch.load from running code; check where the file "
    "comes from all the same)"
)


def refuse_pickled_only(arch: str, directory: Path) -> None:
    """The original state-spaces checkpoints ship only a pickled pytorch_model.bin, which is never read
    here (unpickling can run code): say how to make the safetensors file once."""
    if arch != STATE_SPACES:
        return
    if any(directory.glob("*.safetensors")) or (directory / "model.safetensors.index.json").is_file():
        return
    pickled = sorted(p.name for p in directory.glob("*.bin")) + sorted(p.name for p in directory.glob("*.pt"))
    if pickled:
        raise ConfigError(
            Problem(
                str(directory),
                f"holds only pickled weights ({', '.join(pickled[:5])}), which are never loaded (unpickling "
                "can run code)",
                fix=f"convert them to model.safetensors once: {_CONVERT}",
            ),
            header=f"AutoBridge: cannot load the weights of this {STATE_SPACES} (state-spaces) checkpoint",
        )
