"""Memory of a training step for the Mamba / hybrid and T5 families (nothing is built).

`viaduct.models.accounting.estimate_memory` hands these families here; the parts and their
conventions are GPT's (`MemoryEstimate`): weights, gradients and Adam's state under plain data
parallelism or FSDP2 (`viaduct.models.family_weights`), the activations the layers keep for the
backward pass, and the loss path, each on one tensor-parallel rank and, for Mamba / hybrid models,
on one pipeline rank and context-parallel rank (its seq / cp tokens). T5 has no pipeline or context
parallelism (refused) and no PEFT (PEFT on a hybrid: `viaduct.models.accounting.
estimate_pipeline_memory`).

Tensor parallelism divides as GPT's estimate does, by one rule (`viaduct.models.accounting.
_per_tp_rank`): weights split by heads, MLP units, B/C groups or vocabulary rows are divided by the
tensor-parallel size, norms and row-parallel biases are whole on every rank; the activations inside
an attention, MLP or Mamba mixer are divided by it, the residual stream's (each norm's input,
statistics and output, which is the next GEMM's input, and the dropout masks) only under sequence
parallelism. A Mamba layer's mixer is split by whole B/C groups (in_proj, conv, dt_bias / A_log / D
and the gated norm's weight; out_proj by its input columns, its bias whole), its block norm whole. T5
splits both stacks as GPT's layers, cross-attention by heads (its key/value projection's output per
encoder token with them), the relative position bias by heads, and the vocabulary; under sequence
parallelism the encoder output, split along the sequence, counts as the residual stream does. The
token ids stay whole on every rank, and so do the attention masks but for a relative bias.

Activations are bytes per token that CUDA's kernels keep for backward, checked on the CPU by summing
the storages saved for backward during one forward (tests/models/test_family_memory.py). `a` is the
compute dtype's size, `f` = 4 (float32). Each norm keeps its input and per-token statistics (rstd: 4
bytes for RMSNorm, mean and rstd: 8 for LayerNorm; CUDA's fused RMSNorm, where the CPU's composite
one keeps a float32 copy of its input and of the normalized values as well); the GEMM after it keeps
its output. Dropout keeps a bool mask per element (CUDA's fused dropout; the CPU's keeps a mask in
the compute dtype); attention dropout keeps nothing (the fused kernels regenerate it from a seed).

A Mamba layer (d = d_inner, c = d_inner + 2 G N conv channels, H heads, G groups; under tensor
parallelism a rank's share of them), per token, eagerly:

    2 a h + norm statistics           the block norm's input and in_proj's input
    a c, or a (d + c + H)             the conv's input: a copy of the groups' x, B, C channels, or
                                      with one group (on the rank) in_proj's output, of which it is
                                      a view
    a c (k - 1 + k (k - 1) / 2s)      the conv's k - 1 shifted copies (k = 4, s = sequence), each
                                      left-padded by its shift
    2 a c                             conv output (silu's input) and silu's output (x, B, C)
    8 H + 4 G                         softplus's input and dt (float32); the gated norm's rstd
    a d (G > 1) + f d (a < 4)         x: a contiguous copy for the scan, a float32 one for D's skip
    f d (a < 4 or G > 1)              z in float32 (silu's input), unless a view of in_proj's output
    16 d                              float32 y, silu(z), y * silu(z), the normalized values
    a d                               out_proj's input

Under torch.compile (`compiled`, the default on CUDA) the partitioner recomputes silu's input and
most of the float32 elementwise chain, keeping the conv's input and shifted copies (it never
recomputes a padding), silu's output, the float32 y and out_proj's input, plus, with several
groups, the 16-bit copies of x and z and dt (with one group only dt, and that in float32), as
`torch.compile(backend="aot_eager_decomp_partition")` shows on the CPU; it also recomputes a gated
MLP's act(gate).

The SSD scan runs under `torch.utils.checkpoint` (`Mamba2Mixer.mix`): it keeps only its inputs (x,
dt, A, B, C, counted above) and recomputes its intermediates when backward reaches the layer. Those
live for one layer at a time, on top of everything kept: exactly the tensors `ssd_chunked` saves,
per token of the sequence padded to whole chunks of Q = mamba_chunk_size (P = mamba_head_dim,
N = mamba_state_dim; the matmuls' operands are in the inputs' dtype, `a`):

    f H (2 Q + 3) + f G Q + a H Q     decays and their exponents, scores, the masked weights
    4 a G N + 2 (a + f) H P           B and C (twice each), x dt and x at the chunk end (operand
                                      and float32), the states' output in float32

plus f H P per token in 16 bits (x in float32), a H P N per chunk (the states entering it) and per
sequence f H C (P N + 1) (the state entering each of the C chunks and its decay) where a loop passes
the states on (up to 64 chunks), or f H (C + 1) (P N + C + 1) where a matmul does (the chunk-end
states and their decay matrix).

That is the PyTorch path. A CUDA run takes the mixer's fused Triton kernels wherever their shapes
suit them (`mixer_kernels_run`: a power-of-two chunk of at least 16, heads up to 128 wide, states up
to 256, norm groups up to 8192, 16- or 32-bit activations), and the estimate, made for CUDA, counts
that path there. The kernels keep only their inputs, per token:

    2 a h + norm statistics           the block norm's input and in_proj's input
    a (d + c + H), or a c + 2 a d     in_proj's output (one group on the rank: the conv's input, z
                                      and dt are views of it), or copies of x B C, x and z
    a c + f H                         the conv's output (the scan's x, B, C); dt in float32
    2 a d + f G                       y in the compute dtype, out_proj's input; the norm's rstd
    f H (eager), a H (compiled,       softplus's input; under torch.compile dt's copy, or in float32
      several groups or float32)      its sum with dt_bias

and their backward's transient is the states entering each chunk and their gradients (2 a H P N per
chunk) with the float32 partial sums of B's and C's gradients (2 f G N per token per share of a
group's heads: `kernel_shapes.head_splits`). The layer's count is checked on the CPU under
Triton's interpreter. On an H100, Mamba-2 780M at 4 x 4096 tokens peaked at 50.31 GiB while the
scan's output was still float32; this count with y in float32 gives 50.25 GiB.

An attention layer keeps its norm's input and output, the fused q, k, v projection output, the
kernel's output (linear_proj's input) and its float32 log-sum-exp (4 bytes per head); rotary
embeddings or QK norm add new copies of q and k. An MLP layer keeps its norm's input and output,
fc1's output (a de-interleaved copy of it when gated) and the activation's output (with a gated
unit also the product act(gate) * up, fc2's input).

T5: an encoder layer is an attention layer and an MLP layer over the encoder tokens. A decoder
layer adds cross-attention: per decoder token its norm's input and output, q, the kernel's output
and log-sum-exp; per encoder token the key/value projection's output (2 x heads x head_dim). The
encoder output is kept once for every decoder layer's key/value projection, and so are the additive
attention masks the training step's padding masks become (per stack; with relative position bias a
[batch, heads, seq, seq] mask and its int64 bucket indices).

Activation recompute (full, uniform or block) keeps each recompute chunk's input and redoes one
chunk's layers in backward, as for GPT; a hybrid model's layers differ, so the peak is that of the
worst chunk. Selective recompute frees nothing in a hybrid model: its MLP layers do not recompute
(`MLPLayer` has no checkpoint) and its attention kernels keep nothing beyond q, k, v and the output.
T5 counts full recompute the same way (each stack's chunk inputs plus one chunk's layers, the chunk
no longer than its stack) and selective recompute as GPT does (mlp: each MLP keeps only its input;
core_attn frees nothing from the fused kernels).
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import torch

from viaduct.config.errors import ConfigError, Problem
from viaduct.models.family_weights import _weights, pipeline_parts

if TYPE_CHECKING:
    from viaduct.distributed.layout import ParallelLayout
    from viaduct.models.accounting import MemoryEstimate
    from viaduct.models.mamba.provider import HybridModelProvider
    from viaduct.models.provider import ModelProvider
    from viaduct.models.t5.provider import T5ModelProvider
    from viaduct.models.transformer_config import TransformerConfig

_F32 = 4
"""Bytes of a float32 element."""


_TOKEN_IDS = 8
"""Bytes per token the embedding lookup keeps: the int64 token ids its backward scatters by."""


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def family(provider: ModelProvider) -> str | None:
    """ "mamba" for a Mamba / hybrid provider, "t5" for a T5 one, None for any other (GPT)."""
    from viaduct.models.mamba.provider import HybridModelProvider
    from viaduct.models.t5.provider import T5ModelProvider

    if isinstance(provider, HybridModelProvider):
        return "mamba"
    if isinstance(provider, T5ModelProvider):
        return "t5"
    return None


# ------------------------------------------------------------------------------ per-layer activations


def _norm_stats(p: TransformerConfig) -> int:
    """Per-token float32 statistics a norm keeps: rstd, plus the mean for LayerNorm."""
    return 2 * _F32 if p.normalization == "LayerNorm" else _F32


def _dropout(p: TransformerConfig, h: int) -> int:
    """One residual branch's dropout mask per token (bool on CUDA), 0 without dropout."""
    return h if p.hidden_dropout > 0 else 0


def _pre_norm(p: TransformerConfig, a: int) -> int:
    """A pre-norm branch's norm: its input and statistics, plus the branch's dropout mask, per token:
    the residual-stream part of a layer, which sequence parallelism splits over the tensor-parallel
    ranks. (The norm's output, the next GEMM's input, is `_gemm_input`.)"""
    return a * p.hidden_size + _norm_stats(p) + _dropout(p, p.hidden_size)


def _gemm_input(p: TransformerConfig, a: int) -> int:
    """The input the GEMM after a pre-norm keeps, per token: whole on every tensor-parallel rank,
    also under sequence parallelism, where it is the all-gathered copy of the norm's output."""
    return a * p.hidden_size


def _one_rank() -> ParallelLayout:
    from viaduct.models.accounting import _single_layout

    return _single_layout()


def attention_layer_bytes(p: TransformerConfig, a: int, *, layout: ParallelLayout | None = None) -> int:
    """Bytes per token an attention-only layer (`AttentionLayer`, a transformer layer's first half)
    keeps for backward on one tensor-parallel rank of `layout` (default one rank), `a` the compute
    dtype's size."""
    from viaduct.models.accounting import _per_tp_rank

    assert p.kv_channels is not None and p.num_query_groups is not None
    q, kv = p.num_attention_heads * p.kv_channels, p.num_query_groups * p.kv_channels
    inner = (q + 2 * kv) * a + q * a + _F32 * p.num_attention_heads
    rope = p.position_embedding_type == "rope"
    if rope or p.qk_layernorm:  # new q and k tensors reach the kernel; v still keeps the fused output
        inner += (q + kv) * a
    if p.qk_layernorm:
        inner += _norm_stats(p) * (p.num_attention_heads + p.num_query_groups)
    return _per_tp_rank(
        layout or _one_rank(), split=inner, stream=_pre_norm(p, a), replicated=_gemm_input(p, a)
    )


def mlp_layer_bytes(
    p: TransformerConfig,
    a: int,
    compiled: bool = True,
    recompute: bool = False,
    *,
    layout: ParallelLayout | None = None,
) -> int:
    """Bytes per token an MLP-only layer (`MLPLayer`, a transformer layer's second half) keeps on one
    tensor-parallel rank; `recompute`: the MLP runs under selective recompute and keeps only its
    input (the norm's output)."""
    from viaduct.models.accounting import _per_tp_rank

    assert p.ffn_hidden_size is not None
    ffn = p.ffn_hidden_size
    # Non-gated: fc1's output (the activation's input) and the activation's output (fc2's input).
    # Gated: fc1's output (its de-interleaved copy, eagerly) and the product act(gate) * up; eagerly
    # also act(gate), which the compiled backward recomputes.
    inner = (3 if compiled else 4) * ffn if p.gated_linear_unit else 2 * ffn
    if recompute:
        # Only the MLP's input is kept, before sequence parallelism's all-gather (re-run in the
        # recompute): a shard of the residual stream.
        return _per_tp_rank(layout or _one_rank(), stream=_pre_norm(p, a) + _gemm_input(p, a))
    return _per_tp_rank(
        layout or _one_rank(), split=inner * a, stream=_pre_norm(p, a), replicated=_gemm_input(p, a)
    )


def mixer_kernels_run(p: HybridModelProvider, a: int) -> bool:
    """Whether a CUDA run of `p` with `a`-byte activations (on an Ampere or newer GPU, which the
    estimate assumes) takes the Mamba mixer's fused Triton kernels (convolution, scan, gated norm):
    where their shapes suit them (`kernel_shapes`)."""
    from viaduct.models.mamba.kernel_shapes import norm_fits, scan_fits

    dtype = {2: torch.bfloat16, 4: torch.float32}.get(a)
    group = p.mamba_heads() * p.mamba_head_dim // p.mamba_num_groups
    return (
        dtype is not None
        and scan_fits(p.mamba_chunk_size, p.mamba_head_dim, p.mamba_state_dim, dtype)
        and norm_fits(group, group, dtype)
    )


def mamba_layer_bytes(
    p: HybridModelProvider,
    a: int,
    seq: int,
    compiled: bool = True,
    *,
    layout: ParallelLayout | None = None,
    kernels: bool = True,
) -> int:
    """Bytes per token a Mamba layer keeps for backward at sequence length `seq`, eagerly or under
    torch.compile, on one tensor-parallel rank of `layout` (default one rank), which holds
    mamba_num_groups / tp whole B/C groups (see the module docstring; the shifted copies' padding is
    spread over the sequence, rounded up). `kernels`: on the fused kernels' path where they run
    (`mixer_kernels_run`, a CUDA run); False: the PyTorch path."""
    from viaduct.models.accounting import _MAMBA_CONV_KERNEL, _mamba_sizes, _per_tp_rank

    layout = layout or _one_rank()
    d, heads, c = _mamba_sizes(p)
    k = _MAMBA_CONV_KERNEL
    # With one group on the rank, the mixer's per-group split of in_proj's output gives views: the
    # conv reads (and keeps) in_proj's output whole, and x and z need no copy. With more, x B C, x
    # and z are each copied out of the interleaved groups.
    one_group = p.mamba_num_groups // layout.tp == 1
    if kernels and mixer_kernels_run(p, a):
        # The kernels keep their inputs: in_proj's output (or the copies), the convolution's
        # output (the scan's x, B, C), dt in float32, y in the compute dtype, the norm's rstd.
        n = a * (d + c + heads) if one_group else a * c + 2 * a * d
        n += a * c + _F32 * heads + 2 * a * d + _F32 * p.mamba_num_groups  # y and out_proj's input
        if not compiled:
            n += _F32 * heads  # softplus's input
        elif not one_group or a == _F32:
            n += a * heads  # dt's copy, or in float32 its sum with dt_bias
        return _per_tp_rank(layout, split=n, stream=_pre_norm(p, a), replicated=_gemm_input(p, a))
    n = a * (d + c + heads) if one_group else a * c  # the conv's input
    # Its k - 1 shifted copies (each seq + shift rows long) and silu's output (the scan's x, B and C).
    n += _ceil_div(a * c * ((k - 1) * seq + k * (k - 1) // 2), seq) + a * c
    n += a * d + _F32 * p.mamba_num_groups  # out_proj's input; the gated norm's rstd per group
    if compiled:
        # The partitioner recomputes silu's input and most of the float32 elementwise chain, keeping
        # the scan's output y in float32; dt (its copy, or in float32 its sum with dt_bias) except
        # where in 16 bits in_proj's output is kept whole; with several groups the 16-bit copies of
        # x and z.
        n += _F32 * d
        if not one_group or a == _F32:
            n += a * heads
        if not one_group:
            n += 2 * a * d
    else:
        n += a * c + 2 * _F32 * heads  # silu's input; softplus's input and dt (float32)
        # x: a contiguous copy for the scan (several groups), a float32 one for the D skip (16 bits);
        # z: float32 for silu (a copy unless it is a view of in_proj's float32 output).
        n += (0 if one_group else a * d) + (_F32 * d if a < _F32 else 0)
        n += _F32 * d if a < _F32 or not one_group else 0
        n += 4 * _F32 * d  # float32 y, silu(z), y * silu(z), the normalized values
    return _per_tp_rank(layout, split=n, stream=_pre_norm(p, a), replicated=_gemm_input(p, a))


def mamba_scan_recompute_bytes(
    p: HybridModelProvider,
    a: int,
    sequences: int,
    seq: int,
    *,
    layout: ParallelLayout | None = None,
    kernels: bool = True,
) -> int:
    """The SSD scan's intermediates one Mamba layer recomputes in backward (transient, one layer at a
    time) for `sequences` sequences of `seq` tokens with `a`-byte inputs, on one tensor-parallel rank
    (its heads and groups): the tensors `ssd_chunked` saves (see the module docstring), or, on the
    fused kernels' path (`kernels`, where they run), their backward's largest buffers."""
    from viaduct.models.accounting import _mamba_sizes, _per_tp_rank
    from viaduct.models.mamba.kernel_shapes import head_splits, head_sum_rows
    from viaduct.models.mamba.ssd import SEQUENTIAL_CHUNKS

    _, heads, _ = _mamba_sizes(p)
    q = p.mamba_chunk_size  # the scan pads the sequence to whole chunks of this size
    chunks = sequences * _ceil_div(seq, q)
    g, hp, n = p.mamba_num_groups, heads * p.mamba_head_dim, p.mamba_state_dim
    if kernels and mixer_kernels_run(p, a):
        # The states entering the chunks and their gradients (the operand dtype), and the float32
        # partial sums of B's and C's gradients, one per share of a group's heads.
        rows = head_sum_rows(q, n, torch.bfloat16 if a < _F32 else torch.float32)
        splits = head_splits(chunks * g * (q // rows), heads // g)
        total = 2 * a * chunks * hp * n + 2 * splits * _F32 * chunks * q * g * n
        return _per_tp_rank(layout or _one_rank(), split=total)
    per_padded = _F32 * heads * (2 * q + 3) + _F32 * g * q + a * heads * q + 4 * a * g * n
    per_padded += 2 * (a + _F32) * hp
    total = chunks * q * per_padded + chunks * a * hp * n
    if a < _F32:
        total += sequences * seq * _F32 * hp  # x in float32 (for x * dt)
    c = _ceil_div(seq, q)
    if c <= SEQUENTIAL_CHUNKS:  # states passed on by a loop: the state entering each chunk, its decay
        total += sequences * _F32 * heads * c * (p.mamba_head_dim * n + 1)
    else:  # by a matmul: the chunk-end states (the initial one's included) and their decay matrix
        total += sequences * _F32 * heads * (c + 1) * (p.mamba_head_dim * n + c + 1)
    return _per_tp_rank(layout or _one_rank(), split=total)


def hybrid_layer_bytes(
    p: HybridModelProvider,
    a: int,
    seq: int,
    compiled: bool = True,
    *,
    layout: ParallelLayout | None = None,
) -> list[int]:
    """Bytes per token each layer of a hybrid model keeps on one tensor-parallel rank, in order
    (`layer_pattern`)."""
    per_kind = {
        "M": mamba_layer_bytes(p, a, seq, compiled, layout=layout),
        "*": attention_layer_bytes(p, a, layout=layout),
        "-": mlp_layer_bytes(p, a, compiled, layout=layout),
    }
    return [per_kind[symbol] for symbol in p.layer_pattern()]


def _selective_mlp(p: TransformerConfig) -> bool:
    """Whether the layers recompute their MLP (selective recompute of "mlp"; T5's and GPT's layers,
    not a hybrid model's MLP layers)."""
    return p.recompute_granularity == "selective" and "mlp" in (p.recompute_modules or ())


def t5_encoder_layer_bytes(
    p: TransformerConfig, a: int, compiled: bool = True, *, layout: ParallelLayout | None = None
) -> int:
    """Bytes per encoder token one T5 encoder layer keeps (self-attention and MLP, pre-norm) on one
    tensor-parallel rank of `layout` (default one rank)."""
    mlp = mlp_layer_bytes(p, a, compiled, _selective_mlp(p), layout=layout)
    return attention_layer_bytes(p, a, layout=layout) + mlp


def t5_decoder_layer_bytes(
    p: TransformerConfig, a: int, compiled: bool = True, *, layout: ParallelLayout | None = None
) -> tuple[int, int]:
    """(bytes per decoder token, bytes per encoder token) one T5 decoder layer keeps on one
    tensor-parallel rank: its self-attention and MLP as the encoder's, and cross-attention (its
    norm, q, the kernel's output and log-sum-exp per decoder token; the key/value projection's
    output per encoder token, split by heads)."""
    from viaduct.models.accounting import _per_tp_rank

    assert p.kv_channels is not None
    layout = layout or _one_rank()
    inner = p.num_attention_heads * p.kv_channels
    cross = _per_tp_rank(
        layout,
        split=2 * inner * a + _F32 * p.num_attention_heads,
        stream=_pre_norm(p, a),
        replicated=_gemm_input(p, a),
    )
    mlp = mlp_layer_bytes(p, a, compiled, _selective_mlp(p), layout=layout)
    per_dec = attention_layer_bytes(p, a, layout=layout) + mlp + cross
    # Under sequence parallelism each layer's key/value projection gathers the encoder output (split
    # along the sequence) and keeps its own whole copy.
    gathered = a * p.hidden_size if layout.sequence_parallel else 0
    return per_dec, _per_tp_rank(layout, split=2 * inner * a, replicated=gathered)


def _t5_layer_config(p: T5ModelProvider) -> TransformerConfig:
    """The provider's fields as a finalized transformer config, with the position kind the shared
    attention sees (rotary only: T5's learned or relative positions never reach it) and the
    provider's recompute settings."""
    cfg = p.t5_spec().layer_config(p.num_layers)
    cfg.recompute_granularity = p.recompute_granularity
    cfg.recompute_modules = p.recompute_modules
    return cfg


def t5_mask_bytes(
    p: T5ModelProvider,
    a: int,
    batch: int,
    enc_seq: int,
    dec_seq: int,
    *,
    layout: ParallelLayout | None = None,
) -> int:
    """The additive attention masks the training step's padding masks become, each kept once for
    all the layers of its stack: encoder self-attention and cross-attention [batch, 1, 1, enc_seq],
    decoder self-attention (causal) [batch, 1, dec_seq, dec_seq]; with relative position bias the
    self-attention masks carry the bias per head (a tensor-parallel rank's heads), plus the int64
    bucket indices of each stack."""
    from viaduct.models.accounting import _per_tp_rank

    heads = p.num_attention_heads
    if p.position_embedding_type == "relative":
        per_head = batch * heads * (enc_seq * enc_seq + dec_seq * dec_seq) * a
        whole = 8 * (enc_seq * enc_seq + dec_seq * dec_seq)
    else:
        per_head, whole = 0, batch * enc_seq * a + batch * dec_seq * dec_seq * a
    return _per_tp_rank(layout or _one_rank(), split=per_head, replicated=whole + batch * enc_seq * a)


# ------------------------------------------------------------------------------ recompute


def stack_activations(layer_bytes: list[int], residual: int, p: TransformerConfig) -> tuple[int, int]:
    """(kept through the forward, peak while backward runs) of a stack whose layers keep
    `layer_bytes` each without recompute and `residual` for a saved layer input, under the provider's
    recompute settings (full: uniform chunks of recompute_num_layers keep their input and redo their
    layers in backward; block: the first recompute_num_layers layers do, the rest keep everything)."""
    n = len(layer_bytes)
    if n == 0:
        return 0, 0
    if p.recompute_granularity != "full":
        kept = sum(layer_bytes)
        return kept, kept
    k = max(1, p.recompute_num_layers or 1)
    if p.recompute_method == "uniform":
        chunks = [layer_bytes[i : i + k] for i in range(0, n, k)]
        kept = len(chunks) * residual
        # Backward runs the chunks last to first: chunk j is redone while chunks 0..j keep their input.
        peak = max((j + 1) * residual + sum(chunk) for j, chunk in enumerate(chunks))
        return kept, peak
    first = min(k, n)
    kept = first * residual + sum(layer_bytes[first:])
    # The kept layers' activations are gone by the time the first ones are redone.
    return kept, max(kept, first * residual + max(layer_bytes[:first]))


# ------------------------------------------------------------------------------ the estimate


def refuse_parallelism(provider: ModelProvider, layout: ParallelLayout) -> None:
    """Raise `ConfigError` for what the families do not build: pipeline and context parallelism for
    T5."""
    kind = "Mamba / hybrid" if family(provider) == "mamba" else "T5"
    problems = []
    if kind == "T5" and layout.pp > 1:
        problems.append(
            Problem(
                "model.pipeline_model_parallel_size",
                "pipeline parallelism is not built for T5 models, so there is no per-rank pipeline estimate",
                layout.pp,
                fix="estimate the whole model with estimate_memory (pipeline_model_parallel_size=1)",
            )
        )
    if kind == "T5" and layout.cp > 1:
        problems.append(
            Problem(
                "model.context_parallel_size",
                "context parallelism is not built for T5 models",
                layout.cp,
                fix="set model.context_parallel_size=1",
            )
        )
    if problems:
        raise ConfigError(problems, header=f"no memory estimate for this {kind} layout")


def estimate_family_memory(
    provider: ModelProvider,
    micro_batch_size: int,
    seq_length: int | None,
    *,
    layout: ParallelLayout,
    master_weights: bool | None,
    grad_reduce_in_fp32: bool | None,
    num_microbatches: int | None,
    keep_logits_bytes: int,
    compiled: bool = True,
) -> list[MemoryEstimate]:
    """`viaduct.models.accounting.estimate_pipeline_memory` of a Mamba / hybrid or T5 provider (the
    module docstring says what the activations count): the estimate of each pipeline rank of
    `layout`, one without pipeline parallelism. `seq_length`: the (encoder) sequence length, default
    the provider's; T5's decoder sees seq_length_dec. `compiled`: the model runs under torch.compile
    (the default on CUDA), whose partitioner keeps less of a Mamba layer and of a gated MLP.

    A pipeline rank of a Mamba / hybrid model (GPT's rules, `viaduct.models.accounting`): its layers'
    weights, the first rank also the embedding, the last the final norm and the output layer (with
    tied embeddings, a copy of the table), all kept gathered under FSDP2; the activations of the
    micro-batches in flight at its peak, each keeping its largest chunk's layers and the output it
    sent; the logits on the last rank only."""
    from viaduct.models.accounting import MemoryEstimate, _logits_bytes, _per_tp_rank

    refuse_parallelism(provider, layout)
    provider.finalize()
    pbytes = provider.params_dtype.itemsize
    master = pbytes < _F32 if master_weights is None else master_weights
    grad_fp32 = master if grad_reduce_in_fp32 is None else grad_reduce_in_fp32
    autocast = provider.enable_autocast and provider.autocast_dtype
    a = provider.autocast_dtype.itemsize if autocast else pbytes  # type: ignore[union-attr]
    b = micro_batch_size
    seq = seq_length or provider.seq_length
    h = provider.hidden_size

    def final_norm(p: TransformerConfig) -> int:
        """A final norm's input and statistics, and its output (whole: the output layer, or each
        cross-attention under sequence parallelism, reads it gathered), per token."""
        return _per_tp_rank(layout, stream=a * h + _norm_stats(p), replicated=a * h)

    def embedding(p: TransformerConfig) -> int:
        """What the embedding keeps per token: its int64 token ids (every tensor-parallel rank reads
        them whole) and its dropout mask."""
        return _per_tp_rank(layout, stream=_dropout(p, h), replicated=_TOKEN_IDS)

    def logits_of(tokens: int) -> int:
        vocab = _per_tp_rank(layout, split=provider.padded_vocab_size())  # a tensor-parallel rank's
        return _logits_bytes(provider, tokens, vocab, a, keep_logits_bytes)

    if family(provider) == "mamba":
        hybrid: HybridModelProvider = provider  # type: ignore[assignment]
        # Under context parallelism a rank keeps its seq / cp tokens of everything; a Mamba mixer's
        # inside runs over every token for cp-th of the groups, the same amount.
        tokens = b * _ceil_div(seq, layout.cp)
        residual = _per_tp_rank(layout, stream=h * (_F32 if hybrid.fp32_residual_connection else a))
        layer_bytes = hybrid_layer_bytes(hybrid, a, seq, compiled, layout=layout)
        pattern = hybrid.layer_pattern()
        estimates: list[MemoryEstimate] = []
        for part in pipeline_parts(hybrid, layout, num_microbatches):
            parameters, gradients, optimizer, gathered = _weights(
                provider, layout, pbytes, master, grad_fp32, num_microbatches, part
            )
            # Each pass in flight keeps its chunk's layers (the largest chunk counted); the one run
            # backward also holds what its recompute brings back.
            stacks = [stack_activations([layer_bytes[i] for i in c], residual, hybrid) for c in part.chunks]
            kept = max(k for k, _ in stacks)
            activations = tokens * (part.in_flight * kept + max(peak - k for k, peak in stacks))
            if any(pattern[i] == "M" for c in part.chunks for i in c):
                activations += _ceil_div(
                    mamba_scan_recompute_bytes(hybrid, a, b, seq, layout=layout), layout.cp
                )
            if part.sends:
                activations += tokens * part.in_flight * residual
            if part.embedding:
                activations += tokens * part.in_flight * embedding(hybrid)
            if part.output:
                activations += tokens * final_norm(hybrid)
            estimate = MemoryEstimate(
                parameters=parameters,
                gradients=gradients,
                optimizer=optimizer,
                gathered_weights=gathered,
                activations=activations,
                logits=logits_of(tokens) if part.output else 0,
            )
            if layout.pp > 1:
                layers = sum(len(c) for c in part.chunks)
                estimate = replace(estimate, pipeline_rank=len(estimates), layers=layers)
            estimates.append(estimate)
        return estimates

    t5: T5ModelProvider = provider  # type: ignore[assignment]
    parameters, gradients, optimizer, gathered = _weights(
        provider, layout, pbytes, master, grad_fp32, num_microbatches
    )
    cfg = _t5_layer_config(t5)
    enc_tokens, dec_tokens = b * seq, b * t5.seq_length_dec
    residual = _per_tp_rank(layout, stream=a * h)
    encoder_layer = t5_encoder_layer_bytes(cfg, a, compiled, layout=layout)
    enc_kept, enc_peak = stack_activations([encoder_layer] * t5.effective_encoder_num_layers, residual, t5)
    per_dec, per_enc = t5_decoder_layer_bytes(cfg, a, compiled, layout=layout)
    # Full recompute keeps a decoder layer's input only: its key/value output goes with the rest.
    dec_layers = [per_dec * dec_tokens + per_enc * enc_tokens] * t5.num_layers
    _, dec_peak = stack_activations(dec_layers, residual * dec_tokens, t5)
    # Backward runs the decoder (the encoder's kept activations all alive), then the encoder.
    layers = max(enc_tokens * enc_kept + dec_peak, enc_tokens * enc_peak)
    # The encoder's final norm output is the encoder output every cross-attention reads.
    per_token = embedding(cfg) + final_norm(cfg)
    masks = t5_mask_bytes(t5, a, b, seq, t5.seq_length_dec, layout=layout)
    activations = layers + per_token * (enc_tokens + dec_tokens) + masks
    extra = 0
    vocab_parallel = layout.tp > 1  # the vocabulary-parallel loss always takes the folded bias
    if t5.share_embeddings_and_output_weights and (provider.cross_entropy_loss_fusion or vocab_parallel):
        # The chunked and the vocabulary-parallel losses take no bias: hidden states and the table
        # (a rank's rows of it) get the bias as one more column (`_fold_bias`), copies kept for the
        # backward.
        vocab = provider.padded_vocab_size()
        extra = dec_tokens * _per_tp_rank(layout, stream=(h + 1) * a)
        extra += _per_tp_rank(layout, split=vocab * (h + 1)) * pbytes
    return [
        MemoryEstimate(
            parameters=parameters,
            gradients=gradients,
            optimizer=optimizer,
            gathered_weights=gathered,
            activations=activations,
            logits=logits_of(dec_tokens) + extra,
        )
    ]
