"""Size, compute and memory of a model, computed from its provider (nothing is built).

FLOPs follow the PaLM / torchtitan MFU convention: per token,
6 x (matmul parameters) + 12 x layers x heads x head_dim x seq, where the matmul parameters are all
parameters except the input embedding tables, with the output layer counted even when it is tied to
the input embedding (its GEMM runs either way). The causal variant halves the attention term, since a
causal kernel skips the masked half of the scores.

Mamba / hybrid models (`viaduct.models.mamba.HybridModelProvider`) count their layers by kind (see
`flops_per_token` for the SSD scan's share). Their memory estimate, and T5's, is
`viaduct.models.family_memory`'s (`estimate_memory` hands them there); neither has a per-rank
pipeline estimate.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, ClassVar, cast

from viaduct.config.errors import ConfigError, Problem

if TYPE_CHECKING:
    from viaduct.distributed.layout import ParallelLayout
    from viaduct.models.gpt.provider import GPTModelProvider
    from viaduct.models.mamba.provider import HybridModelProvider
    from viaduct.models.provider import ModelProvider
    from viaduct.models.t5.provider import T5ModelProvider
    from viaduct.training.config.container import ConfigContainer

H100_BF16_PEAK_FLOPS = 989e12
"""Dense bf16 peak of an H100 SXM (and H200), the MFU denominator."""


def _norm_params(provider: GPTModelProvider, size: int) -> int:
    return 2 * size if provider.normalization == "LayerNorm" else size


def _layer_params_by_tp(p: GPTModelProvider) -> tuple[int, int]:
    """(parameters tensor parallelism splits, parameters it replicates) of one transformer layer.

    Column-parallel layers (linear_qkv, linear_fc1) split their weight and bias; row-parallel ones
    (linear_proj, linear_fc2) split their weight and replicate their bias; norms are replicated
    (`viaduct.distributed.parallelize`). The embedding tables and the output layer are split by rows.
    """
    assert p.kv_channels is not None and p.num_query_groups is not None and p.ffn_hidden_size is not None
    h, d, ffn = p.hidden_size, p.kv_channels, p.ffn_hidden_size
    qkv_out = (p.num_attention_heads + 2 * p.num_query_groups) * d
    fc1_out = 2 * ffn if p.gated_linear_unit else ffn
    split = qkv_out * h + (qkv_out if p.add_bias_linear or p.add_qkv_bias else 0)
    split += p.num_attention_heads * d * h + fc1_out * h + ffn * h
    split += fc1_out if p.add_bias_linear else 0
    replicated = 2 * _norm_params(p, h) + (2 * _norm_params(p, d) if p.qk_layernorm else 0)
    replicated += 2 * h if p.add_bias_linear else 0
    return split, replicated


def _layer_params(p: GPTModelProvider) -> int:
    return sum(_layer_params_by_tp(p))


def _hybrid(provider: GPTModelProvider) -> HybridModelProvider | None:
    """The provider as a Mamba / hybrid one, None for a GPT model."""
    from viaduct.models.mamba.provider import HybridModelProvider

    return provider if isinstance(provider, HybridModelProvider) else None


def _attention_layer_params_by_tp(p: GPTModelProvider) -> tuple[int, int]:
    """A hybrid model's attention-only layer (its norm, linear_qkv and linear_proj, no MLP) as
    (parameters tensor parallelism splits, parameters it replicates), split as GPT's layer's."""
    assert p.kv_channels is not None and p.num_query_groups is not None
    h, d = p.hidden_size, p.kv_channels
    qkv_out = (p.num_attention_heads + 2 * p.num_query_groups) * d
    split = qkv_out * h + (qkv_out if p.add_bias_linear or p.add_qkv_bias else 0)
    split += p.num_attention_heads * d * h
    replicated = (h if p.add_bias_linear else 0) + _norm_params(p, h)
    return split, replicated + (2 * _norm_params(p, d) if p.qk_layernorm else 0)


def _attention_layer_params(p: GPTModelProvider) -> int:
    return sum(_attention_layer_params_by_tp(p))


def _mlp_layer_params_by_tp(p: GPTModelProvider) -> tuple[int, int]:
    """A hybrid model's MLP-only layer (its norm, linear_fc1 and linear_fc2) as (split, replicated)
    parameters under tensor parallelism, split as GPT's layer's."""
    assert p.ffn_hidden_size is not None
    h, ffn = p.hidden_size, p.ffn_hidden_size
    fc1_out = 2 * ffn if p.gated_linear_unit else ffn
    split = fc1_out * h + ffn * h + (fc1_out if p.add_bias_linear else 0)
    return split, (h if p.add_bias_linear else 0) + _norm_params(p, h)


def _mlp_layer_params(p: GPTModelProvider) -> int:
    return sum(_mlp_layer_params_by_tp(p))


def _mamba_sizes(p: HybridModelProvider) -> tuple[int, int, int]:
    """(d_inner, heads, conv channels) of a Mamba layer (`Mamba2Mixer`)."""
    heads = p.mamba_heads()
    d_inner = heads * p.mamba_head_dim
    return d_inner, heads, d_inner + 2 * p.mamba_num_groups * p.mamba_state_dim


_MAMBA_CONV_KERNEL = 4
"""Width of the Mamba mixer's causal convolution (`Mamba2Mixer`'s default, which the model uses)."""


def _mamba_projection_params(p: HybridModelProvider) -> int:
    """The weights of a Mamba layer's in_proj and out_proj (its matmuls), biases included."""
    h = p.hidden_size
    d_inner, heads, conv_dim = _mamba_sizes(p)
    in_out = d_inner + conv_dim + heads  # [z | x B C | dt]
    return in_out * h + d_inner * h + ((in_out + h) if p.add_bias_linear else 0)


def _mamba_layer_params_by_tp(p: HybridModelProvider) -> tuple[int, int]:
    """A Mamba layer (norm, in_proj, depthwise conv1d weight and bias, dt_bias / A_log / D per head,
    the gated RMSNorm over d_inner, out_proj) as (split, replicated) parameters under tensor
    parallelism, which gives each rank whole B/C groups of everything in the mixer but out_proj's
    bias, and keeps the layer's norm whole."""
    d_inner, heads, conv_dim = _mamba_sizes(p)
    conv = conv_dim * _MAMBA_CONV_KERNEL + conv_dim
    out_bias = p.hidden_size if p.add_bias_linear else 0
    split = _mamba_projection_params(p) - out_bias + conv + 3 * heads + d_inner
    return split, _norm_params(p, p.hidden_size) + out_bias


def _mamba_layer_params(p: HybridModelProvider) -> int:
    return sum(_mamba_layer_params_by_tp(p))


def _hybrid_layers_params(p: HybridModelProvider) -> int:
    per_kind = {"M": _mamba_layer_params, "*": _attention_layer_params, "-": _mlp_layer_params}
    return sum(per_kind[symbol](p) for symbol in p.layer_pattern())


def _hybrid_flops_per_token(p: HybridModelProvider, seq: int, causal: bool, trainable: int | None) -> float:
    """See `flops_per_token`."""
    pattern = p.layer_pattern()
    n_mamba, n_attn, n_mlp = pattern.count("M"), pattern.count("*"), pattern.count("-")
    # Weight matmuls: every parameter but the norms, the embedding tables, the conv and the per-head
    # scalars; the output layer counted even when tied.
    matmul = n_attn * _attention_layer_params(p) + n_mlp * _mlp_layer_params(p)
    matmul -= (n_attn + n_mlp) * _norm_params(p, p.hidden_size)
    if p.qk_layernorm:
        assert p.kv_channels is not None
        matmul -= n_attn * 2 * _norm_params(p, p.kv_channels)
    matmul += n_mamba * _mamba_projection_params(p) + p.padded_vocab_size() * p.hidden_size
    _, heads, conv_dim = _mamba_sizes(p)
    q = min(p.mamba_chunk_size, seq)
    scan = 2 * q * (p.mamba_num_groups * p.mamba_state_dim + heads * p.mamba_head_dim)
    scan += 4 * heads * p.mamba_head_dim * p.mamba_state_dim
    conv = 2 * conv_dim * _MAMBA_CONV_KERNEL
    assert p.kv_channels is not None
    attention = 12 * n_attn * p.num_attention_heads * p.kv_channels * seq
    mixing = 3.0 * n_mamba * (scan + conv) + (attention / 2 if causal else float(attention))
    if trainable is not None:
        return 4.0 * matmul + 6.0 * trainable + mixing
    return 6.0 * matmul + mixing


def embedding_parameters(provider: GPTModelProvider) -> int:
    """Input embedding tables: tokens, plus learned positions when configured."""
    provider.finalize()
    n = provider.padded_vocab_size() * provider.hidden_size
    if provider.position_embedding_type == "learned_absolute":
        n += provider.seq_length * provider.hidden_size
    return n


def num_parameters(provider: GPTModelProvider, *, exclude_embeddings: bool = False) -> int:
    """Parameters of the model `provider.provide()` builds (each shared tensor once).

    `exclude_embeddings` leaves out the input embedding tables (the "non-embedding" count); a tied
    output layer shares the token table, so it is left out with it.
    """
    provider.finalize()
    h, vocab = provider.hidden_size, provider.padded_vocab_size()
    hybrid = _hybrid(provider)
    layers = _hybrid_layers_params(hybrid) if hybrid else provider.num_layers * _layer_params(provider)
    n = layers + _norm_params(provider, h)
    if not provider.share_embeddings_and_output_weights:
        n += vocab * h
    return n if exclude_embeddings else n + embedding_parameters(provider)


def flops_per_token(
    provider: GPTModelProvider,
    seq_length: int | None = None,
    *,
    causal: bool = False,
    trainable: int | None = None,
) -> float:
    """Training FLOPs (forward + backward) per token at `seq_length` (default: model.seq_length).

    `trainable`: PEFT's adapter parameters (`trainable_parameters`), when only they train: the frozen
    weights then take 4 FLOPs per parameter and token (forward, and the gradient of their input; no
    weight gradient), the adapters 6.

    Mamba / hybrid models: attention layers as above (their heads x head_dim x seq term), every
    weight matmul (attention, MLP, a Mamba layer's in_proj and out_proj, the output layer) at 6 per
    parameter and token, and per Mamba layer and token 3 x the forward FLOPs of its sequence mixing,
    counted as the SSD scan computes them (`viaduct.models.mamba.ssd.ssd_chunked`), with Q =
    min(mamba_chunk_size, seq), G groups, N = mamba_state_dim, H heads of P = mamba_head_dim:

        2 Q (G N + H P)   the chunk's C B^T scores and their product with x (the quadratic form)
      + 4 H P N           the chunk-end states and the output from the states entering the chunk
      + 2 C K             the depthwise convolution (C channels, kernel K = 4)

    (the state passing between chunks, per chunk rather than per token, is left out). The causal
    halving applies to the attention term only: the scan computes its masked scores in full. PEFT's
    frozen weights count 4 per parameter and token as for GPT; the sequence mixing counts 3x its
    forward whatever trains (the backward through it runs either way)."""
    provider.finalize()
    assert provider.kv_channels is not None
    seq = seq_length or provider.seq_length
    hybrid = _hybrid(provider)
    if hybrid is not None:
        return _hybrid_flops_per_token(hybrid, seq, causal, trainable)
    matmul_params = num_parameters(provider, exclude_embeddings=True)
    if provider.share_embeddings_and_output_weights:
        matmul_params += provider.padded_vocab_size() * provider.hidden_size
    attention = 12 * provider.num_layers * provider.num_attention_heads * provider.kv_channels * seq
    attention_flops = attention / 2 if causal else float(attention)
    if trainable is not None:
        return 4.0 * matmul_params + 6.0 * trainable + attention_flops
    return 6.0 * matmul_params + attention_flops


# Dense bf16 peaks (no sparsity) of the accelerators we measure on; MFU is only reported for these.
_PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "B200": 2250e12}


def peak_flops(device_name: str) -> float | None:
    """Dense bf16 peak FLOP/s of a GPU by its name (torch.cuda.get_device_name), None if unknown."""
    for key, value in _PEAK_BF16_FLOPS.items():
        if key in device_name.upper():
            return value
    return None


def mfu(tokens_per_second: float, flops_per_tok: float, peak_flops: float = H100_BF16_PEAK_FLOPS) -> float:
    """Model FLOPs utilization in [0, 1]."""
    return tokens_per_second * flops_per_tok / peak_flops


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes one GPU needs for a training step (estimates; allocator overhead, the CUDA context and
    communication buffers not included). See `estimate_memory` for what each part holds under
    plain and sharded data parallelism."""

    parameters: int
    """The stored weights: params_dtype, whole (DDP); float32 shards (FSDP2)."""
    gradients: int
    """The gradients the optimizer steps on: whole float32 main grads, or params_dtype without them
    (DDP); float32 shards, plus the unsharded gradients micro-batches accumulate into where FSDP2
    reduces once per step (strategy optim, no sharding under tensor / context parallelism, any
    strategy under pipeline parallelism)."""
    optimizer: int
    """Adam's two moments, plus float32 master weights when params_dtype is 16-bit (DDP only: under
    FSDP2 the float32 shard is the master)."""
    activations: int
    """Tensors the transformer layers keep for the backward pass (one micro-batch; under pipeline
    parallelism, those of every micro-batch in flight at the rank's peak)."""
    logits: int
    """The logits kept for the backward (none with the fused loss above its budget) and one chunk."""
    gathered_weights: int = 0
    """FSDP2's unsharded params_dtype copies of the weights alive at the peak (0 under DDP)."""
    pipeline_rank: int | None = None
    """The pipeline rank the estimate is for (None: no pipeline parallelism, every rank alike)."""
    layers: int | None = None
    """Transformer layers that pipeline rank holds, all its model chunks together (None without
    pipeline parallelism)."""

    PARTS: ClassVar[tuple[str, ...]] = (
        "parameters",
        "gradients",
        "optimizer",
        "gathered_weights",
        "activations",
        "logits",
    )
    """The names of the parts, in the order `describe()` lists them."""

    @property
    def total(self) -> int:
        return sum(getattr(self, k) for k in self.PARTS)

    def as_gib(self) -> dict[str, float]:
        """Each part and the total in GiB, rounded to 0.01."""
        parts = {k: getattr(self, k) for k in self.PARTS}
        parts["total"] = self.total
        return {k: round(v / 2**30, 2) for k, v in parts.items()}

    def describe(self) -> str:
        """One line in GiB, e.g. "parameters 1.87, gradients 1.87, ..., total 58.12 GiB"."""
        gib = self.as_gib()
        parts = ", ".join(f"{k.replace('_', ' ')} {gib[k]:.2f}" for k in self.PARTS)
        return f"{parts}; total {gib['total']:.2f} GiB"


def _layer_activation_bytes(p: GPTModelProvider, act_bytes: int) -> tuple[int, int, int]:
    """Bytes per token one layer keeps for backward without recompute, as (residual-stream part,
    GEMM inputs, attention/MLP part): sequence parallelism splits the first over the tensor-parallel
    ranks, tensor parallelism the third; the second, the norms' outputs that the QKV and fc1 GEMMs
    keep, is whole on every rank (under sequence parallelism their all-gathered copies)."""
    assert p.kv_channels is not None and p.num_query_groups is not None and p.ffn_hidden_size is not None
    h, d, ffn = p.hidden_size, p.kv_channels, p.ffn_hidden_size
    q, kv = p.num_attention_heads * d, p.num_query_groups * d
    stream = 2 * h * act_bytes  # each norm keeps its input
    gemm_inputs = 2 * h * act_bytes  # and the GEMM after it keeps its output
    if p.hidden_dropout > 0:
        stream += 2 * h  # two bool masks
    attention = (q + 2 * kv) + q  # q, k, v for the kernel + its output (input of linear_proj)
    mlp = 3 * ffn if p.gated_linear_unit else 2 * ffn  # fc1 output(s) + activation output
    if p.recompute_granularity == "selective" and "mlp" in (p.recompute_modules or ()):
        # The fused attention kernels keep only q, k, v and the output, so core_attn frees nothing here.
        mlp = 0
        # The recomputed MLP keeps only its input, before sequence parallelism's all-gather (which
        # runs again in the recompute): a shard of the residual stream, not fc1's gathered input.
        stream, gemm_inputs = stream + h * act_bytes, gemm_inputs - h * act_bytes
    return stream, gemm_inputs, (attention + mlp) * act_bytes


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _per_tp_rank(layout: ParallelLayout, *, split: int = 0, stream: int = 0, replicated: int = 0) -> int:
    """One tensor-parallel rank's share of a count (parameters, or bytes per token kept for backward),
    the one rule every model family's estimate divides by: `split` is divided by `layout.tp` (weights
    split by heads, MLP units, B/C groups or vocabulary rows, and the activations inside the attention,
    MLP or mixer), `stream` only under sequence parallelism (the residual stream's activations: the
    norms' inputs and the dropout masks), `replicated` not at all (norm weights, row-parallel biases,
    and the input a column-parallel GEMM keeps, which under sequence parallelism is the whole
    all-gathered copy). Each divided part is rounded up."""
    stream_split = layout.tp if layout.sequence_parallel else 1
    return _ceil_div(split, layout.tp) + _ceil_div(stream, stream_split) + replicated


@dataclass(frozen=True)
class _Share:
    """What one rank holds and keeps: the whole model, or one pipeline rank's part of it."""

    layers: int
    """Transformer layers whose weights the rank holds (all its model chunks)."""
    chunk_layers: int
    """Layers of its largest model chunk: what one forward pass in flight keeps activations for."""
    embedding: bool
    """Whether it holds the embedding tables (the first stage)."""
    output: bool
    """Whether it holds the final norm, the output layer and the loss (the last stage)."""
    in_flight: int = 1
    """Chunk forward passes whose activations are alive at its peak."""
    sends: bool = False
    """Whether its in-flight outputs go to a next stage (kept until their backward)."""
    tied_copy: bool = False
    """Whether it holds a copy of the tied embedding table as its output layer (the last stage)."""


def _fsdp_weights(
    p: GPTModelProvider, layout: ParallelLayout, grad_reduce_in_fp32: bool, accumulates: bool, share: _Share
) -> tuple[int, int, int, int]:
    """(parameters, gradients, optimizer, gathered weights) bytes per GPU under FSDP2."""
    pbytes = p.params_dtype.itemsize
    h, vocab = p.hidden_size, p.padded_vocab_size()
    split, replicated = _layer_params_by_tp(p)
    layer = _per_tp_rank(layout, split=split, replicated=replicated)  # one layer on one tp rank
    # The root group: embedding tables (split by rows), final norm, output layer (split by rows).
    root = _per_tp_rank(layout, split=embedding_parameters(p)) if share.embedding else 0
    if share.output:
        root += _norm_params(p, h)
        if not p.share_embeddings_and_output_weights or share.tied_copy:
            root += _per_tp_rank(layout, split=vocab * h)
    local = root + share.layers * layer  # what the rank holds, on one tensor-parallel rank
    shard = _ceil_div(local, layout.grad_shards)
    gradients = 4 * shard
    if accumulates and not layout.sync_grads_every_microbatch:
        # optim / no_shard / pipeline: micro-batches accumulate into unsharded gradients, reduced
        # after the last.
        gradients += local * (4 if grad_reduce_in_fp32 else pbytes)
    if layout.pp > 1:
        # PyTorch's schedules keep every layer gathered from its first backward to the end of the step.
        gathered = local
    elif layout.reshard_after_forward:
        # The root stays gathered from the first forward to the last backward (its output layer is
        # needed again as soon as backward starts); of the layers, the one computing and the next.
        gathered = root + min(2, share.layers) * layer
    else:
        gathered = local  # every layer stays gathered from its forward to its backward
    return 4 * shard, gradients, 8 * shard, gathered * pbytes


def _in_flight(schedule: str | None, pp: int, vpp: int, rank: int, num_microbatches: int | None) -> int:
    """Chunk forward passes whose activations pipeline rank `rank` keeps at its peak (PyTorch's
    schedules): 1f1b runs pp - rank forwards before its first backward; gpipe all micro-batches;
    the interleaved schedules (vpp - 1) × pp + 2 × (pp - 1 - rank) + 1 (Megatron's count: the first
    rank keeps pp × vpp + pp - 1 chunks, (1 + (pp - 1) / (pp × vpp)) times 1f1b's activations).
    interleaved_zero_bubble is counted like interleaved_1f1b (it starts fewer forwards early but keeps
    inputs for its deferred weight gradients). `num_microbatches` None: as many as fill the pipeline."""
    m = num_microbatches if num_microbatches is not None else pp * max(vpp, 1) * 4
    if schedule == "gpipe":
        return m
    if schedule == "1f1b":
        return min(m, pp - rank)
    per_round = m // max(1, m // pp)
    return min(m * vpp, (vpp - 1) * per_round + 2 * (pp - 1 - rank) + 1)


def _pipeline_shares(
    p: GPTModelProvider, layout: ParallelLayout, num_microbatches: int | None
) -> list[_Share]:
    """What each pipeline rank holds and keeps (`viaduct.distributed.pipeline_split`)."""
    from viaduct.distributed.pipeline_split import pipeline_stages

    stages = pipeline_stages(p)
    if len(stages) != layout.pp * layout.vpp:
        raise ValueError(
            f"the layout's pipeline ({layout.pp} ranks × {layout.vpp} chunks) does not match the model's "
            f"split into {len(stages)} stages"
        )
    shares = []
    for rank in range(layout.pp):
        mine = [s for s in stages if s.pp_rank == rank]
        output = any(s.post_process for s in mine)
        shares.append(
            _Share(
                layers=sum(len(s.layers) for s in mine),
                chunk_layers=max(len(s.layers) for s in mine),
                embedding=any(s.pre_process for s in mine),
                output=output,
                in_flight=_in_flight(layout.schedule, layout.pp, layout.vpp, rank, num_microbatches),
                sends=not output or layout.vpp > 1,
                tied_copy=output,
            )
        )
    return shares


def estimate_memory(
    provider: GPTModelProvider | T5ModelProvider,
    micro_batch_size: int,
    seq_length: int | None = None,
    *,
    layout: ParallelLayout | None = None,
    master_weights: bool | None = None,
    grad_reduce_in_fp32: bool | None = None,
    num_microbatches: int | None = None,
    keep_logits_bytes: int = 4 << 30,
    trainable: int | None = None,
    compiled: bool = True,
) -> MemoryEstimate:
    """Memory of one GPU for a training step with Adam on `micro_batch_size` x `seq_length` tokens,
    under `layout` (default: one rank, or plain data parallelism, where every rank holds everything).

    Weights, gradients and optimizer state:

    * plain data parallelism (DDP): the weights in params_dtype; float32 main gradients and float32
      master weights when params_dtype is 16-bit (`master_weights`, default "params_dtype is
      16-bit"; `grad_reduce_in_fp32=False` keeps the gradients in params_dtype); Adam's two float32
      moments. All whole on every rank.
    * FSDP2 (`layout.uses_fsdp`): the weights stored in float32 (the master copy), their gradients
      and Adam's two moments, each split over the `layout.tp` tensor-parallel ranks (the weights
      and column-parallel biases of linear_qkv, linear_proj, linear_fc1, linear_fc2, the embedding
      tables and the output layer; norms and row-parallel biases are replicated) and sharded over
      `layout.grad_shards` ranks. Compute gathers params_dtype copies (`gathered_weights`): the root
      group (embedding, final norm, output layer) from the first forward to the last backward, and
      with `reshard_after_forward` (strategy optim_grads_params) two layers (the one computing and
      the one prefetched), without it all of them. Where gradients are reduced once per step rather
      than per micro-batch (strategy optim, and no_shard under tensor or context parallelism), the
      micro-batches of a step (`num_microbatches`; None: more than one) also accumulate into
      unsharded gradients (float32 with `grad_reduce_in_fp32`, which defaults to
      `master_weights`). FSDP's padding of shards and the transient unsharded gradient of the layer
      being reduced are left out.

    Activations count activation recompute (full: one saved input per recompute chunk plus one
    layer's activations; selective: the recomputed parts dropped) and dropout masks, for the
    sequence / `layout.cp` tokens of a context-parallel rank; tensor parallelism divides the
    attention and MLP activations by `layout.tp`, sequence parallelism the residual-stream ones too.
    The loss path (cross_entropy_loss_fusion: one chunk of logits, plus all of them when they fit in
    `keep_logits_bytes`, see `viaduct.models.common.loss`; otherwise the full logits in the compute
    dtype plus a float32 copy) sees the vocabulary / `layout.tp` of a tensor-parallel rank.

    Pipeline parallelism (`layout.pp` > 1): the estimate of the pipeline rank that needs the most
    (`estimate_pipeline_memory` gives each). A rank holds its stages' layers, the first also the
    embedding, the last the final norm and the output layer (with tied embeddings, a copy of the
    table), FSDP2 over its data-parallel ranks whatever the strategy. PyTorch's schedules reduce
    gradients once per step and keep the gathered weights from one micro-batch to the next, so the
    unsharded gradients and all the rank's gathered weights count. Activations are those of the
    micro-batches in flight at the rank's peak (`_in_flight`: pp - rank under 1f1b, all under gpipe,
    Megatron's count for the interleaved schedules; each in-flight pass keeps its chunk's layers and
    the output it sent), the logits those of the last stage only.

    PEFT (`trainable`: the adapter parameters of the whole model, `viaduct.peft.transform.
    adapter_parameter_count`): the frozen base weights are stored in params_dtype (also under FSDP2)
    with no gradient, master or optimizer state; the adapters, in the transformer layers, have all
    of those (float32 shards under FSDP2), spread over pipeline ranks with the layers.

    Mamba / hybrid and T5 providers: `viaduct.models.family_memory.estimate_family_memory`, the same
    parts under DDP and FSDP2, on a tensor-parallel rank and (Mamba / hybrid) on a pipeline rank,
    divided by the same rules (PEFT on a hybrid as above: the base frozen, the adapters trained);
    context parallelism, and pipeline parallelism and PEFT for T5, are refused.
    `compiled` (those families only; GPT's activations are the same either way): the model runs
    under torch.compile (`train.torch_compile`, the default on CUDA), whose backward recomputes part
    of a Mamba layer's float32 elementwise work and a gated MLP's activation instead of keeping them.
    """
    per_rank = estimate_pipeline_memory(
        provider,
        micro_batch_size,
        seq_length,
        layout=layout or _single_layout(),
        master_weights=master_weights,
        grad_reduce_in_fp32=grad_reduce_in_fp32,
        num_microbatches=num_microbatches,
        keep_logits_bytes=keep_logits_bytes,
        trainable=trainable,
        compiled=compiled,
    )
    return max(per_rank, key=lambda e: e.total)


def estimate_pipeline_memory(
    provider: GPTModelProvider | T5ModelProvider,
    micro_batch_size: int,
    seq_length: int | None = None,
    *,
    layout: ParallelLayout,
    master_weights: bool | None = None,
    grad_reduce_in_fp32: bool | None = None,
    num_microbatches: int | None = None,
    keep_logits_bytes: int = 4 << 30,
    trainable: int | None = None,
    compiled: bool = True,
) -> list[MemoryEstimate]:
    """`estimate_memory` of each pipeline rank of `layout` (by rank, each with its `pipeline_rank` and
    `layers`; one entry, without them, without pipeline parallelism). A T5 provider raises
    `ConfigError` under pipeline parallelism, which is not built for it (see `estimate_memory`)."""
    from viaduct.models.family_memory import estimate_family_memory, family

    if family(provider) is not None:
        if trainable is not None and family(provider) != "mamba":
            raise ConfigError(
                Problem("peft", "PEFT is not built for this model family", type(provider).__name__)
            )
        estimates = estimate_family_memory(
            provider,
            micro_batch_size,
            seq_length,
            layout=layout,
            master_weights=master_weights,
            grad_reduce_in_fp32=grad_reduce_in_fp32,
            num_microbatches=num_microbatches,
            keep_logits_bytes=keep_logits_bytes,
            compiled=compiled,
        )
        if trainable is None:
            return estimates
        hybrid = cast("GPTModelProvider", provider)
        return [
            _with_frozen_base(
                est,
                hybrid,
                layout,
                est.layers or hybrid.num_layers,
                trainable,
                master_weights,
                grad_reduce_in_fp32,
            )
            for est in estimates
        ]
    provider = cast("GPTModelProvider", provider)  # family() took the others
    provider.finalize()
    if layout.pp <= 1:
        whole = _Share(
            layers=provider.num_layers, chunk_layers=provider.num_layers, embedding=True, output=True
        )
        shares = [whole]
    else:
        shares = _pipeline_shares(provider, layout, num_microbatches)
    out = []
    for rank, share in enumerate(shares):
        est = _estimate(
            provider,
            micro_batch_size,
            seq_length,
            layout,
            share,
            master_weights,
            grad_reduce_in_fp32,
            num_microbatches,
            keep_logits_bytes,
        )
        if trainable is not None:
            est = _with_frozen_base(
                est, provider, layout, share.layers, trainable, master_weights, grad_reduce_in_fp32
            )
        out.append(est if layout.pp <= 1 else replace(est, pipeline_rank=rank, layers=share.layers))
    return out


def _with_frozen_base(
    est: MemoryEstimate,
    p: GPTModelProvider,
    layout: ParallelLayout,
    layers: int,
    trainable: int,
    master_weights: bool | None,
    grad_reduce_in_fp32: bool | None,
) -> MemoryEstimate:
    """`est` (every weight trained) redone for PEFT: the base frozen in params_dtype, only the
    `trainable` adapter parameters (the share of them on the rank's `layers` layers) with gradients and
    optimizer state."""
    pbytes = p.params_dtype.itemsize
    master = pbytes < 4 if master_weights is None else master_weights
    grad_fp32 = master if grad_reduce_in_fp32 is None else grad_reduce_in_fp32
    adapters = _ceil_div(trainable * layers, max(1, p.num_layers))
    if layout.uses_fsdp:
        # The estimate's float32 shards become params_dtype ones; the adapters are float32 shards.
        base = est.parameters // 4 * pbytes
        shard = _ceil_div(adapters, layout.grad_shards)
        return replace(est, parameters=base + 4 * shard, gradients=4 * shard, optimizer=8 * shard)
    return replace(
        est,
        parameters=est.parameters + adapters * pbytes,
        gradients=adapters * (4 if master and grad_fp32 else pbytes),
        optimizer=adapters * (8 + (4 if master else 0)),
    )


def _single_layout() -> ParallelLayout:
    # Imported here: viaduct.distributed loads torch, which counting parameters does not need.
    from viaduct.distributed.layout import ParallelLayout

    return ParallelLayout(world_size=1)


def _logits_bytes(p: ModelProvider, tokens: int, vocab: int, act_bytes: int, keep_logits_bytes: int) -> int:
    """The loss path's logits over `tokens` tokens and `vocab` columns: with cross_entropy_loss_fusion
    one chunk, the float32 loss and log-sum-exp, and all logits when they fit `keep_logits_bytes`
    (else a second chunk, recomputed); without it all logits, their gradient and a float32 copy."""
    from viaduct.models.common.loss import default_chunk_tokens

    if not p.cross_entropy_loss_fusion:
        return tokens * vocab * (2 * act_bytes + 4)
    chunk = min(tokens, default_chunk_tokens(vocab))
    logits = chunk * vocab * act_bytes + tokens * 8
    all_logits = tokens * vocab * act_bytes
    return logits + (all_logits if all_logits <= keep_logits_bytes else chunk * vocab * act_bytes)


def _estimate(
    p: GPTModelProvider,
    micro_batch_size: int,
    seq_length: int | None,
    layout: ParallelLayout,
    share: _Share,
    master_weights: bool | None,
    grad_reduce_in_fp32: bool | None,
    num_microbatches: int | None,
    keep_logits_bytes: int,
) -> MemoryEstimate:
    """The estimate of one rank holding `share` (see `estimate_memory`)."""
    tokens = micro_batch_size * _ceil_div(seq_length or p.seq_length, layout.cp)
    pbytes = p.params_dtype.itemsize
    if master_weights is None:
        master_weights = pbytes < 4
    grad_fp32 = master_weights if grad_reduce_in_fp32 is None else grad_reduce_in_fp32
    if layout.uses_fsdp:
        accumulates = num_microbatches is None or num_microbatches > 1
        parameters, gradients, optimizer, gathered = _fsdp_weights(p, layout, grad_fp32, accumulates, share)
    else:
        n = num_parameters(p)
        parameters, gathered = n * pbytes, 0
        gradients = n * (4 if master_weights and grad_fp32 else pbytes)
        optimizer = n * (8 + (4 if master_weights else 0))

    act_bytes = p.autocast_dtype.itemsize if p.enable_autocast and p.autocast_dtype else pbytes
    stream, gemm_inputs, inner = _layer_activation_bytes(p, act_bytes)
    per_layer = _per_tp_rank(layout, split=inner, stream=stream, replicated=gemm_inputs)
    residual = _per_tp_rank(layout, stream=p.hidden_size * (4 if p.fp32_residual_connection else act_bytes))
    n_layers = share.chunk_layers
    # What each forward pass in flight keeps until its backward, and what the backward's recompute
    # adds on top for the one pass being run backward.
    if n_layers == 0:
        stored, recompute = 0, 0
    elif p.recompute_granularity == "full":
        k = p.recompute_num_layers or 1
        if p.recompute_method == "uniform":
            stored, recompute = _ceil_div(n_layers, k) * residual, min(k, n_layers) * per_layer
        else:  # the kept layers' activations are gone by the time the first k are recomputed
            kept = min(k, n_layers)
            stored = kept * residual + (n_layers - kept) * per_layer
            recompute = per_layer if n_layers <= k else 0
    else:
        stored, recompute = n_layers * per_layer, 0
    kept_bytes = share.in_flight * stored + recompute
    if share.sends:
        kept_bytes += share.in_flight * residual  # the stage outputs sent on, kept for their backward
    if share.output:
        # The final norm's input, and its output, which the output layer keeps (gathered under
        # sequence parallelism).
        kept_bytes += _per_tp_rank(
            layout, stream=p.hidden_size * act_bytes, replicated=p.hidden_size * act_bytes
        )
    activations = tokens * kept_bytes

    logits = 0
    if share.output:
        # The vocabulary of one tensor-parallel rank.
        vocab = _per_tp_rank(layout, split=p.padded_vocab_size())
        logits = _logits_bytes(p, tokens, vocab, act_bytes, keep_logits_bytes)
    return MemoryEstimate(
        parameters=parameters,
        gradients=gradients,
        optimizer=optimizer,
        gathered_weights=gathered,
        activations=activations,
        logits=logits,
    )


# ------------------------------------------------------------------------------ a whole configuration


def estimate_config_memory(cfg: ConfigContainer, world_size: int | None = None) -> MemoryEstimate:
    """`estimate_memory` of a validated `cfg` on `world_size` ranks (default: the world size it was
    validated for), in the layout `viaduct.distributed.layout.layout_of` gives it, with its micro-batch
    size and number of micro-batches per step (under pipeline parallelism: its busiest rank's)."""
    model, mbs, layout, num_microbatches = _config_inputs(cfg, world_size)
    return estimate_memory(
        model,
        mbs,
        layout=layout,
        grad_reduce_in_fp32=cfg.ddp.grad_reduce_in_fp32,
        num_microbatches=num_microbatches,
        trainable=trainable_parameters(cfg),
        # None compiles on CUDA, where the estimate is for.
        compiled=cfg.train.torch_compile is not False,
    )


def trainable_parameters(cfg: ConfigContainer) -> int | None:
    """The parameters a run trains when it trains adapters only (PEFT), else None (all of them)."""
    if cfg.peft is None:
        return None
    from viaduct.peft.transform import adapter_parameter_count

    return adapter_parameter_count(cfg.peft._low_rank(), cfg.model)  # type: ignore[arg-type]


def estimate_config_pipeline_memory(
    cfg: ConfigContainer, world_size: int | None = None
) -> list[MemoryEstimate]:
    """`estimate_config_memory` of each pipeline rank (`estimate_pipeline_memory`), by rank."""
    model, mbs, layout, num_microbatches = _config_inputs(cfg, world_size)
    return estimate_pipeline_memory(
        model,
        mbs,
        layout=layout,
        grad_reduce_in_fp32=cfg.ddp.grad_reduce_in_fp32,
        num_microbatches=num_microbatches,
        trainable=trainable_parameters(cfg),
    )


def _config_inputs(
    cfg: ConfigContainer, world_size: int | None
) -> tuple[GPTModelProvider | T5ModelProvider, int, ParallelLayout, int | None]:
    """(model, micro batch size, layout, micro-batches per step) of a validated `cfg` on `world_size`."""
    from viaduct.distributed.layout import layout_of
    from viaduct.models.gpt.provider import GPTModelProvider
    from viaduct.models.t5.provider import T5ModelProvider

    model = cfg.model
    if not isinstance(model, (GPTModelProvider, T5ModelProvider)):
        raise ConfigError(
            Problem(
                "model",
                "the memory estimate covers GPT, Mamba / hybrid and T5 models",
                type(model).__name__,
            )
        )
    if model.vocab_size is None:
        raise ConfigError(
            Problem(
                "model.vocab_size",
                "the memory estimate needs the vocabulary size (the tokenizer sets it when a run starts)",
                None,
                fix="set model.vocab_size to the tokenizer's vocabulary size",
            )
        )
    mbs, gbs = cfg.train.micro_batch_size, cfg.train.global_batch_size
    assert mbs is not None  # validate() checked it
    world = world_size or cfg.world_size or 1
    layout = layout_of(cfg, world)
    if world == cfg.world_size and cfg.num_microbatches is not None:
        num_microbatches: int | None = cfg.num_microbatches
    else:  # another world size than validated: the same batch arithmetic, for the planner's what-ifs
        num_microbatches = max(1, gbs // (mbs * layout.dp)) if gbs else None
    return model, mbs, layout, num_microbatches


MemoryChanges = dict[str, object]
"""Dotted field path -> value: one way to change a configuration."""


@dataclass(frozen=True)
class MemoryOption:
    """One way to bring a configuration under the memory of a GPU, with the estimate it gives."""

    changes: MemoryChanges
    """The settings to change (dotted path -> value)."""
    world_size: int
    """GPUs to run on (the ones asked about, unless more are needed)."""
    total: int
    """Estimated bytes per GPU with the changes."""
    budget: int
    """Bytes of one GPU."""

    @property
    def fits(self) -> bool:
        return self.total <= self.budget

    def __str__(self) -> str:
        settings = " ".join(
            f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in self.changes.items()
        )
        verdict = "fits" if self.fits else "still too much"
        gpus = f"{self.world_size} GPU{'s' * (self.world_size != 1)}"
        return f"{settings or 'the same settings'}: {self.total / 2**30:.1f} GiB on {gpus}, {verdict}"


class MemoryBudgetError(ConfigError):
    """A configuration whose estimated memory per GPU exceeds the GPU's: the estimate, the layout
    and the options (`MemoryOption`) that fit, each on a line of the message."""

    def __init__(
        self,
        estimate: MemoryEstimate,
        layout: ParallelLayout,
        gpu_memory_gib: float,
        options: list[MemoryOption],
    ):
        self.estimate, self.layout, self.gpu_memory_gib, self.options = (
            estimate,
            layout,
            gpu_memory_gib,
            options,
        )
        gpus = f"{layout.world_size} GPU{'s' * (layout.world_size != 1)}"
        problem = Problem(
            "",
            f"needs about {estimate.total / 2**30:.1f} GiB per GPU on {gpus} ({layout.describe()}), "
            f"more than the {gpu_memory_gib:g} GiB of one GPU",
            fix="one of the options below" if options else "run on more GPUs with sharded data parallelism",
        )
        super().__init__([problem], header="the configuration does not fit in GPU memory")

    def _render(self) -> str:
        lines = [super()._render(), f"  estimate per GPU: {self.estimate.describe()}"]
        if self.options:
            lines.append("  options (estimate per GPU with each):")
            lines += [f"    - {option}" for option in self.options]
        return "\n".join(lines)

    def __reduce__(self) -> tuple[type[MemoryBudgetError], tuple[object, ...]]:
        # Pickling (multiprocessing, pytest-xdist) rebuilds it from its parts, not from the problems.
        return (self.__class__, (self.estimate, self.layout, self.gpu_memory_gib, self.options))


def _apply(cfg: ConfigContainer, changes: MemoryChanges) -> ConfigContainer:
    variant = copy.deepcopy(cfg)
    for path, value in changes.items():
        component, name = path.split(".")
        setattr(getattr(variant, component), name, value)
    return variant


def _valid_total(cfg: ConfigContainer, changes: MemoryChanges, world_size: int) -> int | None:
    """Estimated bytes per GPU of `cfg` with `changes`, or None when the result does not validate."""
    variant = _apply(cfg, changes)
    try:
        with warnings.catch_warnings():  # the user sees the warnings of their own config only
            warnings.simplefilter("ignore")
            variant.validate(world_size=world_size)
        return estimate_config_memory(variant, world_size).total
    except ValueError:
        return None


_SHARD_EVERYTHING: MemoryChanges = {
    "ddp.use_distributed_optimizer": True,
    "ddp.data_parallel_sharding_strategy": "optim_grads_params",
}
_FULL_RECOMPUTE: MemoryChanges = {
    "model.recompute_granularity": "full",
    "model.recompute_method": "uniform",
    "model.recompute_num_layers": 1,
}


def memory_options(cfg: ConfigContainer, world_size: int, gpu_memory_gib: float) -> list[MemoryOption]:
    """Ways to bring a validated `cfg` on `world_size` GPUs under `gpu_memory_gib` GiB per GPU, each
    with its estimate: sharding parameters, gradients and optimizer state (ZeRO-3), tensor
    parallelism with sequence parallelism (the smallest size that fits), full activation recompute,
    a micro-batch of 1; then all of them together, and, when that is still too much, the number of
    GPUs at which it fits. Only changes that validate are offered."""
    from viaduct.distributed.layout import layout_of

    budget = int(gpu_memory_gib * 2**30)
    layout = layout_of(cfg, world_size)
    candidates: list[MemoryChanges] = []
    combined: MemoryChanges = {}
    if layout.strategy != "optim_grads_params":
        combined.update(_SHARD_EVERYTHING)  # more GPUs only help a sharded run
        # Under pipeline parallelism every sharding strategy keeps the same at the peak (the
        # schedules hold weights gathered and gradients unsharded through a step).
        if layout.dp > 1 and not (layout.pp > 1 and layout.sharded):
            candidates.append(_SHARD_EVERYTHING)
    tensor_parallel: MemoryChanges | None = None  # the smallest size that fits, else the largest valid
    for tp in (t for t in (2, 4, 8) if t > layout.tp):
        changes: MemoryChanges = {"model.tensor_model_parallel_size": tp, "model.sequence_parallel": True}
        total = _valid_total(cfg, changes, world_size)
        if total is not None:
            tensor_parallel = changes
            if total <= budget:
                break
    if tensor_parallel is not None:
        candidates.append(tensor_parallel)
    if cfg.model.recompute_granularity != "full":
        candidates.append(_FULL_RECOMPUTE)
    if (cfg.train.micro_batch_size or 1) > 1:
        candidates.append({"train.micro_batch_size": 1})

    options: list[MemoryOption] = []
    for changes in candidates:
        total = _valid_total(cfg, changes, world_size)
        if total is not None:
            combined.update(changes)
            options.append(MemoryOption(dict(changes), world_size, total, budget))
    if any(o.fits for o in options):
        if len(options) > 1:
            total = _valid_total(cfg, combined, world_size)
            if total is not None and total < min(o.total for o in options):
                options.append(MemoryOption(combined, world_size, total, budget))
        return options
    total = _valid_total(cfg, combined, world_size) if combined else None
    if total is not None and len(combined) > len(options[0].changes if options else {}):
        options.append(MemoryOption(combined, world_size, total, budget))
    # More GPUs shard the weights thinner; a GPU's activations stay, so give up after 1024 times.
    variant = _apply(cfg, combined)
    for factor in (2**k for k in range(1, 11)):
        try:
            more = estimate_config_memory(variant, world_size * factor).total
        except ValueError:
            break
        if more <= budget:
            options.append(MemoryOption(combined, world_size * factor, more, budget))
            break
    return options


def check_memory(cfg: ConfigContainer, world_size: int, gpu_memory_gib: float) -> MemoryEstimate:
    """The per-GPU estimate of a validated `cfg` on `world_size` GPUs (`estimate_config_memory`);
    raises `MemoryBudgetError` with the ways to fit (`memory_options`) when it exceeds
    `gpu_memory_gib` GiB. The estimate leaves out the CUDA context, communication buffers and
    allocator fragmentation: leave a few GiB of the budget for them."""
    from viaduct.distributed.layout import layout_of

    estimate = estimate_config_memory(cfg, world_size)
    if estimate.total <= gpu_memory_gib * 2**30:
        return estimate
    raise MemoryBudgetError(
        estimate, layout_of(cfg, world_size), gpu_memory_gib, memory_options(cfg, world_size, gpu_memory_gib)
    )
