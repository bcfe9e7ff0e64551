"""Weights, gradients and optimizer state of the Mamba / hybrid and T5 families, per GPU (nothing is
built): what each layer and the root group hold, split by tensor parallelism, sharded by FSDP2, and
shared out over pipeline ranks (`viaduct.models.family_memory` adds the activations)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import TYPE_CHECKING

from viaduct.models.accounting import _ceil_div

if TYPE_CHECKING:
    from viaduct.distributed.layout import ParallelLayout
    from viaduct.models.mamba.provider import HybridModelProvider
    from viaduct.models.provider import ModelProvider
    from viaduct.models.t5.provider import T5ModelProvider

_F32 = 4
"""Bytes of a float32 element."""


def _layer_params(provider: ModelProvider) -> tuple[list[tuple[int, int]], tuple[int, int]]:
    """The parameters of each layer FSDP2 wraps, in forward order, and of the root group, each as
    (split by tensor parallelism, replicated): see `viaduct.models.accounting._per_tp_rank`."""
    from viaduct.models.accounting import (
        _attention_layer_params_by_tp,
        _mamba_layer_params_by_tp,
        _mlp_layer_params_by_tp,
        _norm_params,
        num_parameters,
    )
    from viaduct.models.family_memory import family

    kind = family(provider)
    if kind == "mamba":
        hybrid: HybridModelProvider = provider  # type: ignore[assignment]
        per_kind = {
            "M": _mamba_layer_params_by_tp,
            "*": _attention_layer_params_by_tp,
            "-": _mlp_layer_params_by_tp,
        }
        layers = [per_kind[s](hybrid) for s in hybrid.layer_pattern()]
        # The root: the embedding tables and the output layer split by vocabulary (and position) rows,
        # the final norm whole.
        final_norm = _norm_params(hybrid, hybrid.hidden_size)
        root = num_parameters(hybrid) - sum(map(sum, layers)) - final_norm
        return layers, (root, final_norm)
    from viaduct.models.t5.provider import t5_provider_num_parameters

    t5: T5ModelProvider = provider  # type: ignore[assignment]
    spec = t5.t5_spec()
    h, inner, ffn = spec.hidden_size, spec.num_attention_heads * spec.head_dim, spec.ffn_hidden_size
    bias = spec.add_bias_linear

    def column(n_in: int, n_out: int) -> int:  # weight and bias split by output rows
        return n_in * n_out + (n_out if bias else 0)

    # Row-parallel layers (the attention output projections, fc2) split their weight and keep their
    # bias [h] whole, as GPT's.
    row_bias = h if bias else 0
    norm = h * (2 if spec.normalization == "LayerNorm" else 1)
    self_attn = column(h, 3 * inner) + inner * h
    mlp = column(h, ffn * (2 if spec.gated_linear_unit else 1)) + ffn * h
    cross = column(h, inner) + column(h, 2 * inner) + inner * h
    layers = [(self_attn + mlp, 2 * norm + 2 * row_bias)] * spec.encoder_num_layers
    layers += [(self_attn + cross + mlp, 3 * norm + 3 * row_bias)] * spec.decoder_num_layers
    # The root: the token table, learned position or relative bias tables, the output weight or tied
    # output bias, all split (by rows, or relative buckets by heads); the two final norms whole.
    root = t5_provider_num_parameters(t5) - sum(map(sum, layers)) - 2 * norm
    return layers, (root, 2 * norm)


@dataclass(frozen=True)
class RankPart:
    """What one pipeline rank of a Mamba / hybrid model holds and keeps (`pipeline_parts`)."""

    chunks: tuple[tuple[int, ...], ...]
    """The layers (global indices) of each of its model chunks."""
    embedding: bool
    """Whether it holds the embedding (the first stage)."""
    output: bool
    """Whether it holds the final norm, the output layer and the loss (the last stage)."""
    in_flight: int = 1
    """Chunk forward passes whose activations are alive at its peak."""
    sends: bool = False
    """Whether its in-flight outputs go to a next stage (kept until their backward)."""


def pipeline_parts(
    provider: HybridModelProvider, layout: ParallelLayout, num_microbatches: int | None
) -> list[RankPart]:
    """Each pipeline rank's `RankPart` (one part, the whole model, without pipeline parallelism)."""
    from viaduct.distributed.pipeline_split import pipeline_stages
    from viaduct.models.accounting import _in_flight

    if layout.pp <= 1:
        return [RankPart(chunks=(tuple(range(len(provider.layer_pattern()))),), embedding=True, output=True)]
    stages = pipeline_stages(provider)  # type: ignore[arg-type]  # num_layers is set once finalized
    parts = []
    for rank in range(layout.pp):
        mine = [s for s in stages if s.pp_rank == rank]
        output = any(s.post_process for s in mine)
        parts.append(
            RankPart(
                chunks=tuple(s.layers for s in mine),
                embedding=any(s.pre_process for s in mine),
                output=output,
                in_flight=_in_flight(layout.schedule, layout.pp, layout.vpp, rank, num_microbatches),
                sends=not output or layout.vpp > 1,
            )
        )
    return parts


def _weights(
    provider: ModelProvider,
    layout: ParallelLayout,
    pbytes: int,
    master: bool,
    grad_fp32: bool,
    num_microbatches: int | None,
    part: RankPart | None = None,
) -> tuple[int, int, int, int]:
    """(parameters, gradients, optimizer, gathered weights) bytes per GPU, as for GPT: whole under
    DDP; float32 shards under FSDP2 (always so under tensor parallelism), which wraps each layer
    (Mamba, attention, MLP; T5's encoder and decoder layers) and keeps the rest (embeddings, final
    norms, output layer) in the root group; each a tensor-parallel rank's share. `part`: a pipeline
    rank's layers and root parts only (its copy of a tied table on the last stage included)."""
    from viaduct.models.accounting import _per_tp_rank, embedding_parameters

    by_tp, (root_split, root_whole) = _layer_params(provider)
    if part is not None and layout.pp > 1:
        hybrid: HybridModelProvider = provider  # type: ignore[assignment]
        by_tp = [by_tp[i] for chunk in part.chunks for i in chunk]
        table = embedding_parameters(hybrid)
        output = root_split - table  # the output layer (0 when tied to the token table)
        if hybrid.share_embeddings_and_output_weights and part.output and not part.embedding:
            output = hybrid.padded_vocab_size() * hybrid.hidden_size  # the last stage's copy
        root_split = (table if part.embedding else 0) + (output if part.output else 0)
        root_whole = root_whole if part.output else 0  # the final norm
    layers = [_per_tp_rank(layout, split=split, replicated=whole) for split, whole in by_tp]
    root = _per_tp_rank(layout, split=root_split, replicated=root_whole)
    local = sum(layers) + root
    if not layout.uses_fsdp:
        gradients = local * (_F32 if master and grad_fp32 else pbytes)
        return local * pbytes, gradients, local * (2 * _F32 + (_F32 if master else 0)), 0
    shard = _ceil_div(local, layout.grad_shards)
    gradients = _F32 * shard
    accumulates = num_microbatches is None or num_microbatches > 1
    if accumulates and not layout.sync_grads_every_microbatch:
        gradients += local * (_F32 if grad_fp32 else pbytes)
    if layout.pp > 1:
        # PyTorch's schedules keep every layer gathered from its first backward to the end of the step.
        gathered = local
    elif layout.reshard_after_forward:
        # The root stays gathered from the first forward to the last backward; of the layers, the one
        # computing and the one prefetched (the largest neighbouring pair: the layers differ).
        pairs = [a + b for a, b in itertools.pairwise(layers)] or layers or [0]
        gathered = root + max(pairs)
    else:
        gathered = local
    return _F32 * shard, gradients, 2 * _F32 * shard, gathered * pbytes
