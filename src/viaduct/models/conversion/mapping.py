"""Parameter names and layouts: viaduct (Megatron names) <-> Hugging Face, per architecture.

Layouts that differ (each conversion is a pure reshuffle of rows, so a round trip is bitwise):

- Fused QKV. viaduct's `linear_qkv` rows are grouped by key/value group: for each group its
  heads/groups query heads, then its key head, then its value head (`head_dim` rows each). Hugging Face
  Llama-style models keep `q_proj`, `k_proj` and `v_proj` apart; GPT-2's `c_attn` holds all queries,
  then all keys, then all values.
- Gated MLP. viaduct's `linear_fc1` interleaves the rows: row 2i is gate unit i, row 2i+1 up unit i;
  Hugging Face has `gate_proj` and `up_proj`.
- Mamba-2's in_proj and conv1d with several B/C groups. viaduct keeps the rows by group (for each
  group its z, x, B, C and dt rows, so a tensor-parallel split by rows gives whole groups); Hugging
  Face keeps each kind whole ([z | x | B | C | dt], conv [x | B | C]).
- GPT-2's `Conv1D` layers store the weight as [in, out], the transpose of a linear layer's.
- Vocabulary: viaduct's embedding / output rows may be padded past the vocabulary (tensor
  parallelism); only the first vocab_size rows are Hugging Face's.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

import torch

from viaduct.models.gpt.provider import GPTModelProvider

Kind = Literal["copy", "transpose", "qkv", "fused_qkv_t", "fused_qkv_bias", "gated", "grouped"]
"""How a viaduct tensor is made from its Hugging Face tensors: copied, transposed (GPT-2 Conv1D),
merged from q/k/v, from GPT-2's fused [q|k|v] (weight transposed, or bias), from gate/up, or
regrouped (Mamba-2's sections kept by group)."""


def rows_by_group(tensor: torch.Tensor, sections: tuple[int, ...], groups: int) -> torch.Tensor:
    """Rows [s_1 | s_2 | ...] (each section made of `groups` equal blocks) reordered by group:
    [s_1 block 0 | s_2 block 0 | ... | s_1 block 1 | ...]."""
    rest = tensor.shape[1:]
    parts = [part.reshape(groups, -1, *rest) for part in tensor.split(list(sections), dim=0)]
    return torch.cat(parts, dim=1).reshape(-1, *rest)


def rows_by_section(tensor: torch.Tensor, sections: tuple[int, ...], groups: int) -> torch.Tensor:
    """The inverse of `rows_by_group`."""
    rest = tensor.shape[1:]
    per_group = [size // groups for size in sections]
    parts = tensor.reshape(groups, -1, *rest).split(per_group, dim=1)
    return torch.cat([part.reshape(-1, *rest) for part in parts], dim=0)


@dataclass(frozen=True)
class QKVLayout:
    """The head layout of a fused QKV projection."""

    groups: int
    """Key/value groups."""
    heads_per_group: int
    """Query heads per group."""
    head_dim: int
    """Rows per head."""


@dataclass(frozen=True)
class ParamMapping:
    """One viaduct parameter and the Hugging Face tensors it is made of."""

    megatron: str
    """The viaduct (Megatron) parameter name."""
    hf: tuple[str, ...]
    """The Hugging Face tensor names, in the order the merge takes them."""
    hf_shapes: tuple[tuple[int, ...], ...]
    """The shape each Hugging Face tensor must have."""
    kind: Kind = "copy"
    """How the tensors merge (see `Kind`)."""
    qkv: QKVLayout | None = None
    """The head layout (QKV kinds only)."""
    vocab_rows: bool = False
    """The viaduct tensor may have padding rows past the Hugging Face rows (embedding, output layer)."""
    sections: tuple[int, ...] = ()
    """The Hugging Face row sections that viaduct keeps by group (grouped kind only)."""
    groups: int = 1
    """The number of groups each section is made of (grouped kind only)."""

    def megatron_shape(self) -> tuple[int, ...]:
        """The shape of the merged tensor (without vocabulary padding)."""
        first = self.hf_shapes[0]
        if self.kind in ("transpose", "fused_qkv_t"):
            return (first[1], first[0])
        if self.kind in ("qkv", "gated"):
            return (sum(s[0] for s in self.hf_shapes), *first[1:])
        return first

    # ------------------------------------------------------------------ conversion

    def to_megatron(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        """Merge the Hugging Face tensors (in `hf` order) into the viaduct tensor."""
        if self.kind == "copy":
            return tensors[0]
        if self.kind == "transpose":
            return tensors[0].t().contiguous()
        if self.kind == "grouped":
            return rows_by_group(tensors[0], self.sections, self.groups)
        if self.kind == "gated":
            gate, up = tensors
            return torch.stack((gate, up), dim=1).flatten(0, 1)
        if self.kind == "qkv":
            q, k, v = tensors
        else:  # GPT-2's c_attn: [q | k | v] along the output dimension
            fused = tensors[0].t() if self.kind == "fused_qkv_t" else tensors[0]
            q, k, v = fused.chunk(3, dim=0)
        assert self.qkv is not None
        g, per, d = self.qkv.groups, self.qkv.heads_per_group, self.qkv.head_dim
        rest = q.shape[1:]
        return torch.cat(
            (
                q.reshape(g, per, d, *rest),
                k.reshape(g, 1, d, *rest),
                v.reshape(g, 1, d, *rest),
            ),
            dim=1,
        ).reshape(-1, *rest)

    def megatron_views(self, param: torch.Tensor) -> list[torch.Tensor] | None:
        """The views of `param` that the Hugging Face tensors (in `hf` order) fill, each the HF
        tensor's rows in `to_megatron`'s order, so loading copies each one in place instead of
        building the merged tensor first. None where the merge is not a placement of rows
        (transposes, GPT-2's fused QKV) or `param` is not a contiguous plain tensor."""
        if type(param) not in (torch.Tensor, torch.nn.Parameter) or not param.is_contiguous():
            return None
        rows = self.megatron_shape()[0]
        if self.kind == "copy":
            return [param[:rows]]  # vocabulary padding rows past the HF rows are left as they are
        if param.shape[0] != rows:
            return None
        rest = param.shape[1:]
        if self.kind == "gated":
            pairs = param.view(-1, 2, *rest)
            return [pairs[:, 0], pairs[:, 1]]
        if self.kind == "qkv" and self.qkv is not None:
            per = self.qkv.heads_per_group
            grouped = param.view(self.qkv.groups, per + 2, self.qkv.head_dim, *rest)
            return [grouped[:, :per], grouped[:, per : per + 1], grouped[:, per + 1 :]]
        return None

    def to_hf(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """Split the viaduct tensor into the Hugging Face tensors (in `hf` order), each contiguous."""
        if self.kind == "copy":
            return [tensor]
        if self.kind == "transpose":
            return [tensor.t().contiguous()]
        if self.kind == "grouped":
            return [rows_by_section(tensor, self.sections, self.groups).contiguous()]
        if self.kind == "gated":
            pairs = tensor.unflatten(0, (-1, 2))
            return [pairs[:, 0].contiguous(), pairs[:, 1].contiguous()]
        assert self.qkv is not None
        per, rest = self.qkv.heads_per_group, tensor.shape[1:]
        grouped = tensor.reshape(self.qkv.groups, per + 2, self.qkv.head_dim, *rest)
        q, k, v = grouped.split([per, 1, 1], dim=1)
        q, k, v = (t.reshape(-1, *rest) for t in (q, k, v))
        if self.kind == "qkv":
            return [q.contiguous(), k.contiguous(), v.contiguous()]
        fused = torch.cat((q, k, v), dim=0)
        return [fused.t().contiguous() if self.kind == "fused_qkv_t" else fused.contiguous()]


# Tensors some checkpoints carry that are not parameters (causal-mask and rotary buffers of older
# transformers versions): accepted and skipped.
_IGNORED = {
    "GPT2LMHeadModel": re.compile(r"(^|\.)h\.\d+\.attn\.(bias|masked_bias)$"),
    "llama": re.compile(r"(^|\.)rotary_emb\.inv_freq$"),
}


def is_ignored(arch: str, hf_name: str) -> bool:
    """Whether a checkpoint tensor is a known non-parameter (a buffer older exports saved)."""
    pattern = _IGNORED["GPT2LMHeadModel" if arch == "GPT2LMHeadModel" else "llama"]
    return pattern.search(hf_name) is not None


def hf_name_candidates(arch: str, hf_name: str) -> tuple[str, ...]:
    """The names a checkpoint may store `hf_name` under: the original GPT-2 checkpoints lack the
    `transformer.` prefix that GPT2LMHeadModel saves."""
    if arch == "GPT2LMHeadModel" and hf_name.startswith("transformer."):
        return (hf_name, hf_name.removeprefix("transformer."))
    if arch in ("Mamba2ForCausalLM", "MambaLMHeadModel"):
        from viaduct.models.conversion.mamba_mapping import mamba_name_candidates

        return mamba_name_candidates(arch, hf_name)
    if arch == "NemotronHForCausalLM":
        from viaduct.models.conversion.nemotron_h import nemotron_h_name_candidates

        return nemotron_h_name_candidates(hf_name)
    return (hf_name,)


def param_mappings(arch: str, cfg: GPTModelProvider) -> dict[str, ParamMapping]:
    """Every parameter of the whole model `cfg` builds, by viaduct name (finalized `cfg`)."""
    if arch == "GPT2LMHeadModel":
        return _gpt2(cfg)
    if arch in ("Mamba2ForCausalLM", "MambaLMHeadModel"):
        from viaduct.models.conversion.mamba_mapping import mamba_param_mappings
        from viaduct.models.mamba.provider import HybridModelProvider

        if not isinstance(cfg, HybridModelProvider):
            raise TypeError(f"a {arch} maps onto a HybridModelProvider, not {type(cfg).__name__}")
        return mamba_param_mappings(arch, cfg)
    if arch == "NemotronHForCausalLM":
        from viaduct.models.conversion.nemotron_h import nemotron_h_param_mappings
        from viaduct.models.mamba.provider import HybridModelProvider

        if not isinstance(cfg, HybridModelProvider):
            raise TypeError(f"a {arch} maps onto a HybridModelProvider, not {type(cfg).__name__}")
        return nemotron_h_param_mappings(cfg)
    return _llama_style(cfg)


def _dims(cfg: GPTModelProvider) -> tuple[int, int, int, int, int, int]:
    assert cfg.kv_channels is not None and cfg.num_query_groups is not None and cfg.ffn_hidden_size
    assert cfg.vocab_size is not None
    return (
        cfg.hidden_size,
        cfg.num_attention_heads,
        cfg.num_query_groups,
        cfg.kv_channels,
        cfg.ffn_hidden_size,
        cfg.vocab_size,
    )


def _llama_style(cfg: GPTModelProvider) -> dict[str, ParamMapping]:
    h, heads, groups, d, ffn, vocab = _dims(cfg)
    out: list[ParamMapping] = [
        ParamMapping(
            "embedding.word_embeddings.weight", ("model.embed_tokens.weight",), ((vocab, h),), vocab_rows=True
        ),
        ParamMapping("decoder.final_layernorm.weight", ("model.norm.weight",), ((h,),)),
    ]
    if not cfg.share_embeddings_and_output_weights:
        out.append(ParamMapping("output_layer.weight", ("lm_head.weight",), ((vocab, h),), vocab_rows=True))
    qkv = QKVLayout(groups, heads // groups, d)
    bias = cfg.add_bias_linear
    for i in range(cfg.num_layers):
        m, p = f"decoder.layers.{i}.", f"model.layers.{i}."
        attn = p + "self_attn."
        out += [
            ParamMapping(m + "input_layernorm.weight", (p + "input_layernorm.weight",), ((h,),)),
            ParamMapping(m + "pre_mlp_layernorm.weight", (p + "post_attention_layernorm.weight",), ((h,),)),
            ParamMapping(
                m + "self_attention.linear_qkv.weight",
                (attn + "q_proj.weight", attn + "k_proj.weight", attn + "v_proj.weight"),
                ((heads * d, h), (groups * d, h), (groups * d, h)),
                "qkv",
                qkv=qkv,
            ),
            ParamMapping(
                m + "self_attention.linear_proj.weight", (attn + "o_proj.weight",), ((h, heads * d),)
            ),
            ParamMapping(
                m + "mlp.linear_fc1.weight",
                (p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"),
                ((ffn, h), (ffn, h)),
                "gated",
            ),
            ParamMapping(m + "mlp.linear_fc2.weight", (p + "mlp.down_proj.weight",), ((h, ffn),)),
        ]
        if bias or cfg.add_qkv_bias:
            out.append(
                ParamMapping(
                    m + "self_attention.linear_qkv.bias",
                    (attn + "q_proj.bias", attn + "k_proj.bias", attn + "v_proj.bias"),
                    ((heads * d,), (groups * d,), (groups * d,)),
                    "qkv",
                    qkv=qkv,
                )
            )
        if bias:
            out += [
                ParamMapping(m + "self_attention.linear_proj.bias", (attn + "o_proj.bias",), ((h,),)),
                ParamMapping(
                    m + "mlp.linear_fc1.bias",
                    (p + "mlp.gate_proj.bias", p + "mlp.up_proj.bias"),
                    ((ffn,), (ffn,)),
                    "gated",
                ),
                ParamMapping(m + "mlp.linear_fc2.bias", (p + "mlp.down_proj.bias",), ((h,),)),
            ]
        if cfg.qk_layernorm:
            out += [
                ParamMapping(m + "self_attention.q_layernorm.weight", (attn + "q_norm.weight",), ((d,),)),
                ParamMapping(m + "self_attention.k_layernorm.weight", (attn + "k_norm.weight",), ((d,),)),
            ]
    return {pm.megatron: pm for pm in out}


def _gpt2(cfg: GPTModelProvider) -> dict[str, ParamMapping]:
    h, heads, _, d, ffn, vocab = _dims(cfg)
    t = "transformer."
    out: list[ParamMapping] = [
        ParamMapping("embedding.word_embeddings.weight", (t + "wte.weight",), ((vocab, h),), vocab_rows=True),
        ParamMapping("embedding.position_embeddings.weight", (t + "wpe.weight",), ((cfg.seq_length, h),)),
        ParamMapping("decoder.final_layernorm.weight", (t + "ln_f.weight",), ((h,),)),
        ParamMapping("decoder.final_layernorm.bias", (t + "ln_f.bias",), ((h,),)),
    ]
    if not cfg.share_embeddings_and_output_weights:
        out.append(ParamMapping("output_layer.weight", ("lm_head.weight",), ((vocab, h),), vocab_rows=True))
    qkv = QKVLayout(heads, 1, d)
    for i in range(cfg.num_layers):
        m, p = f"decoder.layers.{i}.", f"{t}h.{i}."
        out += [
            ParamMapping(m + "input_layernorm.weight", (p + "ln_1.weight",), ((h,),)),
            ParamMapping(m + "input_layernorm.bias", (p + "ln_1.bias",), ((h,),)),
            ParamMapping(m + "pre_mlp_layernorm.weight", (p + "ln_2.weight",), ((h,),)),
            ParamMapping(m + "pre_mlp_layernorm.bias", (p + "ln_2.bias",), ((h,),)),
            ParamMapping(
                m + "self_attention.linear_qkv.weight",
                (p + "attn.c_attn.weight",),
                ((h, 3 * h),),
                "fused_qkv_t",
                qkv=qkv,
            ),
            ParamMapping(
                m + "self_attention.linear_qkv.bias",
                (p + "attn.c_attn.bias",),
                ((3 * h,),),
                "fused_qkv_bias",
                qkv=qkv,
            ),
            ParamMapping(
                m + "self_attention.linear_proj.weight", (p + "attn.c_proj.weight",), ((h, h),), "transpose"
            ),
            ParamMapping(m + "self_attention.linear_proj.bias", (p + "attn.c_proj.bias",), ((h,),)),
            ParamMapping(m + "mlp.linear_fc1.weight", (p + "mlp.c_fc.weight",), ((h, ffn),), "transpose"),
            ParamMapping(m + "mlp.linear_fc1.bias", (p + "mlp.c_fc.bias",), ((ffn,),)),
            ParamMapping(m + "mlp.linear_fc2.weight", (p + "mlp.c_proj.weight",), ((ffn, h),), "transpose"),
            ParamMapping(m + "mlp.linear_fc2.bias", (p + "mlp.c_proj.bias",), ((h,),)),
        ]
    return {pm.megatron: pm for pm in out}
