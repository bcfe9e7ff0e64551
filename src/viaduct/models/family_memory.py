"""Memory of a training step for the Mamba / hybrid and T5 families (nothing is built).

`viaduct.models.accounting.estimate_memory` hands these families here; the parts and their
conventions are GPT's (`MemoryEstimate`): weights, gradients and Adam's state under plain data
parallelism or FSDP2, the activations the layers keep for the backward pass, and the loss path.
Neither family has tensor, context or pipeline parallelism (their providers refuse it), nor PEFT.

Activations are bytes per token that CUDA's kernels keep for backward, checked on the CPU by summing
the storages saved for backward during one forward (tests/models/test_family_memory.py). `a` is the
compute dtype's size, `f` = 4 (float32). Each norm keeps its input and per-token statistics (rstd: 4
bytes for RMSNorm, mean and rstd: 8 for LayerNorm; CUDA's fused RMSNorm, where the CPU's composite
one keeps a float32 copy of its input and of the normalized values as well); the GEMM after it keeps
its output. Dropout keeps a bool mask per element (CUDA's fused dropout; the CPU's keeps a mask in
the compute dtype); attention dropout keeps nothing (the fused kernels regenerate it from a seed).

A Mamba layer (d = d_inner, c = d_inner + 2 G N conv channels, H heads, G groups), per token:

    2 a h + norm statistics           the block norm's input and in_proj's input
    a c (s + k - 1) / s               the left-padded conv input (k = conv width, s = sequence)
    2 a c                             conv output (silu's input) and silu's output (x, B, C)
    8 H + 4 G                         softplus's input and dt (float32); the gated norm's rstd
    8 d (a < 4) or f (d + c + H)      float32 z and x copies; in float32, z keeps in_proj's output
    16 d                              float32 y, silu(z), y * silu(z), the normalized values
    a d                               out_proj's input

That is eager mode. Under torch.compile (`compiled`, the default on CUDA) the partitioner keeps
in_proj's output whole (a (d + c + H)) and recomputes the float32 elementwise chain in backward,
keeping three float32 [d] tensors instead of the 8 H + 8 d + 16 d above (two and dt in float32),
as `torch.compile(backend="aot_eager_decomp_partition")` shows on the CPU; it also recomputes a
gated MLP's act(gate).

The SSD scan runs under `torch.utils.checkpoint` (`Mamba2Mixer.forward`): it keeps only its inputs
(x, dt, A, B, C, counted above) and recomputes its float32 intermediates when backward reaches the
layer. Those live for one layer at a time, on top of everything kept: about
10 H Q + 14 H P + 22 G N bytes per token and 10 H P N per chunk (fitted to the scan's saved tensors
within about 15%; Q = mamba_chunk_size, P = mamba_head_dim, N = mamba_state_dim).

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

import itertools
from typing import TYPE_CHECKING

from viaduct.config.errors import ConfigError, Problem

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
    """A pre-norm branch's norm: its input, its statistics and its output (the next GEMM's input),
    plus the branch's dropout mask, per token."""
    return 2 * a * p.hidden_size + _norm_stats(p) + _dropout(p, p.hidden_size)


def attention_layer_bytes(p: TransformerConfig, a: int) -> int:
    """Bytes per token an attention-only layer (`AttentionLayer`, a transformer layer's first half)
    keeps for backward, `a` the compute dtype's size."""
    assert p.kv_channels is not None and p.num_query_groups is not None
    q, kv = p.num_attention_heads * p.kv_channels, p.num_query_groups * p.kv_channels
    n = _pre_norm(p, a) + (q + 2 * kv) * a + q * a + _F32 * p.num_attention_heads
    rope = p.position_embedding_type == "rope"
    if rope or p.qk_layernorm:  # new q and k tensors reach the kernel; v still keeps the fused output
        n += (q + kv) * a
    if p.qk_layernorm:
        n += _norm_stats(p) * (p.num_attention_heads + p.num_query_groups)
    return n


def mlp_layer_bytes(p: TransformerConfig, a: int, compiled: bool = True, recompute: bool = False) -> int:
    """Bytes per token an MLP-only layer (`MLPLayer`, a transformer layer's second half) keeps;
    `recompute`: the MLP runs under selective recompute and keeps only its input (the norm's output)."""
    assert p.ffn_hidden_size is not None
    ffn = p.ffn_hidden_size
    if recompute:
        return _pre_norm(p, a)
    # Non-gated: fc1's output (the activation's input) and the activation's output (fc2's input).
    # Gated: fc1's output (its de-interleaved copy, eagerly) and the product act(gate) * up; eagerly
    # also act(gate), which the compiled backward recomputes.
    inner = (3 if compiled else 4) * ffn if p.gated_linear_unit else 2 * ffn
    return _pre_norm(p, a) + inner * a


def mamba_layer_bytes(p: HybridModelProvider, a: int, seq: int, compiled: bool = True) -> int:
    """Bytes per token a Mamba layer keeps for backward at sequence length `seq`, eagerly or under
    torch.compile (see the module docstring; the conv's left padding is spread over the sequence,
    rounded up)."""
    from viaduct.models.accounting import _MAMBA_CONV_KERNEL, _mamba_sizes

    d, heads, c = _mamba_sizes(p)
    n = _pre_norm(p, a) + a * d + _F32 * p.mamba_num_groups  # + out_proj's input, the norm's rstd
    n += _ceil_div(a * c * (seq + _MAMBA_CONV_KERNEL - 1), seq) + 2 * a * c
    if compiled:
        # The partitioner keeps in_proj's output whole and recomputes the float32 elementwise chain
        # from it and from the scan's output, keeping three float32 [d] tensors (two and dt in float32).
        n += a * (d + c + heads) + (3 * _F32 * d if a < _F32 else 2 * _F32 * d + _F32 * heads)
        return n
    n += 2 * _F32 * heads  # softplus's input and dt
    # In float32 z is a view of in_proj's output, which its consumer keeps whole; in 16 bits the mixer
    # keeps float32 copies of z (for silu) and of x (for the D skip connection) instead.
    n += 2 * _F32 * d if a < _F32 else _F32 * (d + c + heads)
    return n + 4 * _F32 * d


def mamba_scan_recompute_bytes(p: HybridModelProvider, sequences: int, seq: int) -> int:
    """The SSD scan's float32 intermediates one Mamba layer recomputes in backward (transient, one
    layer at a time), for `sequences` sequences of `seq` tokens: a fit to the
    tensors the chunked scan saves (see the module docstring)."""
    from viaduct.models.accounting import _mamba_sizes

    _, heads, _ = _mamba_sizes(p)
    q = min(p.mamba_chunk_size, seq)
    padded = sequences * _ceil_div(seq, q) * q
    chunks = sequences * (_ceil_div(seq, q) + 1)
    g, hp, n = p.mamba_num_groups, heads * p.mamba_head_dim, p.mamba_state_dim
    return padded * (10 * heads * q + 14 * hp + 22 * g * n) + chunks * 10 * hp * n


def hybrid_layer_bytes(p: HybridModelProvider, a: int, seq: int, compiled: bool = True) -> list[int]:
    """Bytes per token each layer of a hybrid model keeps, in order (`layer_pattern`)."""
    per_kind = {
        "M": mamba_layer_bytes(p, a, seq, compiled),
        "*": attention_layer_bytes(p, a),
        "-": mlp_layer_bytes(p, a, compiled),
    }
    return [per_kind[symbol] for symbol in p.layer_pattern()]


def _selective_mlp(p: TransformerConfig) -> bool:
    """Whether the layers recompute their MLP (selective recompute of "mlp"; T5's and GPT's layers,
    not a hybrid model's MLP layers)."""
    return p.recompute_granularity == "selective" and "mlp" in (p.recompute_modules or ())


def t5_encoder_layer_bytes(p: TransformerConfig, a: int, compiled: bool = True) -> int:
    """Bytes per encoder token one T5 encoder layer keeps (self-attention and MLP, pre-norm)."""
    return attention_layer_bytes(p, a) + mlp_layer_bytes(p, a, compiled, _selective_mlp(p))


def t5_decoder_layer_bytes(p: TransformerConfig, a: int, compiled: bool = True) -> tuple[int, int]:
    """(bytes per decoder token, bytes per encoder token) one T5 decoder layer keeps: its
    self-attention and MLP as the encoder's, and cross-attention (its norm, q, the kernel's output
    and log-sum-exp per decoder token; the key/value projection's output per encoder token)."""
    assert p.kv_channels is not None
    inner = p.num_attention_heads * p.kv_channels
    cross = _pre_norm(p, a) + 2 * inner * a + _F32 * p.num_attention_heads
    mlp = mlp_layer_bytes(p, a, compiled, _selective_mlp(p))
    return attention_layer_bytes(p, a) + mlp + cross, 2 * inner * a


def _t5_layer_config(p: T5ModelProvider) -> TransformerConfig:
    """The provider's fields as a finalized transformer config, with the position kind the shared
    attention sees (rotary only: T5's learned or relative positions never reach it) and the
    provider's recompute settings."""
    cfg = p.t5_spec().layer_config(p.num_layers)
    cfg.recompute_granularity = p.recompute_granularity
    cfg.recompute_modules = p.recompute_modules
    return cfg


def t5_mask_bytes(p: T5ModelProvider, a: int, batch: int, enc_seq: int, dec_seq: int) -> int:
    """The additive attention masks the training step's padding masks become, each kept once for
    all the layers of its stack: encoder self-attention and cross-attention [batch, 1, 1, enc_seq],
    decoder self-attention (causal) [batch, 1, dec_seq, dec_seq]; with relative position bias the
    self-attention masks carry the bias per head, plus the int64 bucket indices of each stack."""
    heads = p.num_attention_heads
    if p.position_embedding_type == "relative":
        enc = batch * heads * enc_seq * enc_seq * a + 8 * enc_seq * enc_seq
        dec = batch * heads * dec_seq * dec_seq * a + 8 * dec_seq * dec_seq
    else:
        enc, dec = batch * enc_seq * a, batch * dec_seq * dec_seq * a
    return enc + dec + batch * enc_seq * a


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


# ------------------------------------------------------------------------------ weights


def _layer_params(provider: ModelProvider) -> tuple[list[int], int]:
    """(parameters of each layer FSDP2 wraps, in forward order; the root group's parameters)."""
    from viaduct.models.accounting import (
        _attention_layer_params,
        _mamba_layer_params,
        _mlp_layer_params,
        num_parameters,
    )

    kind = family(provider)
    if kind == "mamba":
        hybrid: HybridModelProvider = provider  # type: ignore[assignment]
        per_kind = {"M": _mamba_layer_params, "*": _attention_layer_params, "-": _mlp_layer_params}
        layers = [per_kind[s](hybrid) for s in hybrid.layer_pattern()]
        return layers, num_parameters(hybrid) - sum(layers)
    from viaduct.models.t5.provider import t5_provider_num_parameters

    t5: T5ModelProvider = provider  # type: ignore[assignment]
    spec = t5.t5_spec()
    h, inner, ffn = spec.hidden_size, spec.num_attention_heads * spec.head_dim, spec.ffn_hidden_size
    bias = spec.add_bias_linear

    def linear(n_in: int, n_out: int) -> int:
        return n_in * n_out + (n_out if bias else 0)

    norm = h * (2 if spec.normalization == "LayerNorm" else 1)
    self_attn = linear(h, 3 * inner) + linear(inner, h)
    mlp = linear(h, ffn * (2 if spec.gated_linear_unit else 1)) + linear(ffn, h)
    cross = linear(h, inner) + linear(h, 2 * inner) + linear(inner, h)
    layers = [2 * norm + self_attn + mlp] * spec.encoder_num_layers
    layers += [3 * norm + self_attn + cross + mlp] * spec.decoder_num_layers
    return layers, t5_provider_num_parameters(t5) - sum(layers)


def _num_parameters(provider: ModelProvider) -> int:
    layers, root = _layer_params(provider)
    return sum(layers) + root


def _weights(
    provider: ModelProvider,
    layout: ParallelLayout,
    pbytes: int,
    master: bool,
    grad_fp32: bool,
    num_microbatches: int | None,
) -> tuple[int, int, int, int]:
    """(parameters, gradients, optimizer, gathered weights) bytes per GPU, as for GPT: whole under
    DDP; float32 shards under FSDP2, which wraps each layer (Mamba, attention, MLP; T5's encoder and
    decoder layers) and keeps the rest (embeddings, final norms, output layer) in the root group."""
    layers, root = _layer_params(provider)
    local = sum(layers) + root
    if not layout.uses_fsdp:
        gradients = local * (_F32 if master and grad_fp32 else pbytes)
        return local * pbytes, gradients, local * (2 * _F32 + (_F32 if master else 0)), 0
    shard = _ceil_div(local, layout.grad_shards)
    gradients = _F32 * shard
    accumulates = num_microbatches is None or num_microbatches > 1
    if accumulates and not layout.sync_grads_every_microbatch:
        gradients += local * (_F32 if grad_fp32 else pbytes)
    if layout.reshard_after_forward:
        # The root stays gathered from the first forward to the last backward; of the layers, the one
        # computing and the one prefetched (the largest neighbouring pair: the layers differ).
        pairs = [a + b for a, b in itertools.pairwise(layers)] or layers or [0]
        gathered = root + max(pairs)
    else:
        gathered = local
    return _F32 * shard, gradients, 2 * _F32 * shard, gathered * pbytes


# ------------------------------------------------------------------------------ the estimate


def refuse_parallelism(provider: ModelProvider, layout: ParallelLayout, *, pipeline: bool = False) -> None:
    """Raise `ConfigError` for what the families do not build: pipeline parallelism (and any
    per-rank pipeline estimate), tensor and context parallelism."""
    kind = "Mamba / hybrid" if family(provider) == "mamba" else "T5"
    problems = []
    if pipeline or layout.pp > 1:
        problems.append(
            Problem(
                "model.pipeline_model_parallel_size",
                f"pipeline parallelism is not built for {kind} models, so there is no per-rank "
                "pipeline estimate",
                layout.pp,
                fix="estimate the whole model with estimate_memory (pipeline_model_parallel_size=1)",
            )
        )
    for path, size, what in (
        ("model.tensor_model_parallel_size", layout.tp, "tensor"),
        ("model.context_parallel_size", layout.cp, "context"),
    ):
        if size > 1:
            problems.append(
                Problem(
                    path,
                    f"{what} parallelism is not built for {kind} models",
                    size,
                    fix=f"set {path}=1",
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
) -> MemoryEstimate:
    """`viaduct.models.accounting.estimate_memory` of a Mamba / hybrid or T5 provider (the module
    docstring says what the activations count). `seq_length`: the (encoder) sequence length, default
    the provider's; T5's decoder sees seq_length_dec. `compiled`: the model runs under torch.compile
    (the default on CUDA), whose partitioner keeps less of a Mamba layer and of a gated MLP."""
    from viaduct.models.accounting import MemoryEstimate, _logits_bytes

    refuse_parallelism(provider, layout)
    provider.finalize()
    pbytes = provider.params_dtype.itemsize
    master = pbytes < _F32 if master_weights is None else master_weights
    grad_fp32 = master if grad_reduce_in_fp32 is None else grad_reduce_in_fp32
    parameters, gradients, optimizer, gathered = _weights(
        provider, layout, pbytes, master, grad_fp32, num_microbatches
    )
    autocast = provider.enable_autocast and provider.autocast_dtype
    a = provider.autocast_dtype.itemsize if autocast else pbytes  # type: ignore[union-attr]
    b = micro_batch_size
    seq = seq_length or provider.seq_length
    h = provider.hidden_size
    if family(provider) == "mamba":
        hybrid: HybridModelProvider = provider  # type: ignore[assignment]
        tokens = b * seq
        residual = h * (_F32 if hybrid.fp32_residual_connection else a)
        _, peak = stack_activations(hybrid_layer_bytes(hybrid, a, seq, compiled), residual, hybrid)
        activations = tokens * peak
        if "M" in hybrid.layer_pattern():
            activations += mamba_scan_recompute_bytes(hybrid, b, seq)
        activations += tokens * (2 * a * h + _norm_stats(hybrid))  # final norm: input, output
        activations += tokens * (_TOKEN_IDS + _dropout(hybrid, h))  # the embedding's
        logit_tokens, extra = tokens, 0
    else:
        t5: T5ModelProvider = provider  # type: ignore[assignment]
        cfg = _t5_layer_config(t5)
        enc_tokens, dec_tokens = b * seq, b * t5.seq_length_dec
        residual = a * h
        enc_kept, enc_peak = stack_activations(
            [t5_encoder_layer_bytes(cfg, a, compiled)] * t5.effective_encoder_num_layers, residual, t5
        )
        per_dec, per_enc = t5_decoder_layer_bytes(cfg, a, compiled)
        # Full recompute keeps a decoder layer's input only: its key/value output goes with the rest.
        dec_layers = [per_dec * dec_tokens + per_enc * enc_tokens] * t5.num_layers
        _, dec_peak = stack_activations(dec_layers, residual * dec_tokens, t5)
        # Backward runs the decoder (the encoder's kept activations all alive), then the encoder.
        layers = max(enc_tokens * enc_kept + dec_peak, enc_tokens * enc_peak)
        embedding = (_TOKEN_IDS + _dropout(cfg, h)) * (enc_tokens + dec_tokens)
        final_norms = (2 * a * h + _norm_stats(cfg)) * (enc_tokens + dec_tokens)  # the encoder's: output
        masks = t5_mask_bytes(t5, a, b, seq, t5.seq_length_dec)
        activations = layers + embedding + final_norms + masks
        logit_tokens = dec_tokens
        extra = 0
        if t5.share_embeddings_and_output_weights and provider.cross_entropy_loss_fusion:
            # The chunked loss takes no bias: hidden states and the table get the bias as one more
            # column (`_fold_bias`), copies kept for the backward.
            vocab = provider.padded_vocab_size()
            extra = dec_tokens * (h + 1) * a + vocab * (h + 1) * pbytes
    logits = _logits_bytes(provider, logit_tokens, provider.padded_vocab_size(), a, keep_logits_bytes) + extra
    return MemoryEstimate(
        parameters=parameters,
        gradients=gradients,
        optimizer=optimizer,
        gathered_weights=gathered,
        activations=activations,
        logits=logits,
    )
