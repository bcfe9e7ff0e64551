"""Context parallelism (CP): each sample's sequence is split across the `cp` ranks of a group, so
sequences too long for one device fit, while every rank keeps the whole model.

Layout (load-balanced for causal attention, as in Megatron): the sequence is cut into ``2 × cp``
equal chunks and CP rank ``r`` holds chunks ``r`` and ``2·cp − 1 − r``, in that order. Under the
causal rule a query chunk ``i`` attends to ``i + 1`` key chunks, so pairing an early chunk with a
late one gives every rank the same ``2·cp + 1`` chunk-pairs of attention work.

`shard_batch` cuts a micro-batch to a rank's share (creating position ids first, so rotary and
learned position embeddings see the true positions). `ContextParallelAttention`, installed on
every attention layer by `apply_context_parallel`, all-gathers keys and values over the group (as
Llama 3's training did: one collective per layer, keys and values together), puts them back into
global order and attends the local queries to the keys up to each query chunk. Its backward
reduce-scatters the key/value gradients, so each rank receives the sum of every rank's
contribution to its own chunks. Parameter gradients are then partial sums over each rank's
tokens: reduce them (SUM) over the CP group together with data parallelism.

Everything runs under gloo on the CPU as well as NCCL; the model code itself never sees
`torch.distributed` (it only calls the `SelfAttention.kernel` hook).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import sdpa_kernel

from viaduct.models.common.attention import _SDPA_BACKENDS, SelfAttention
from viaduct.models.enums import AttnBackend

SEQUENCE_KEYS = ("tokens", "labels", "loss_mask", "position_ids")
"""Batch entries of shape [batch, seq, ...] that `shard_batch` cuts along dim 1."""


class ContextParallelError(ValueError):
    """A batch, mask or attention setting that context parallelism cannot split or run."""


def _check_split(seq_len: int, cp: int, rank: int) -> None:
    if cp < 1:
        raise ContextParallelError(
            f"context_parallel_size must be >= 1, got {cp}; set model.context_parallel_size=1 or more"
        )
    if not 0 <= rank < cp:
        raise ContextParallelError(
            f"context-parallel rank {rank} is outside [0, {cp}) for context_parallel_size {cp}"
        )
    if seq_len <= 0 or seq_len % (2 * cp):
        raise ContextParallelError(
            f"sequence length {seq_len} cannot be split for context_parallel_size {cp}: context "
            f"parallelism cuts each sequence into 2 x {cp} = {2 * cp} equal chunks (rank r holds "
            f"chunks r and {2 * cp - 1}-r, so causal attention work is balanced), so the length must "
            f"be a positive multiple of {2 * cp}; fix: use a model.seq_length that is a multiple of "
            f"{2 * cp} (e.g. {max(2 * cp, seq_len - seq_len % (2 * cp))}) or change "
            "model.context_parallel_size"
        )


def cp_positions(seq_len: int, cp: int, rank: int) -> torch.Tensor:
    """The global positions (int64) CP rank `rank` of `cp` holds, in its local order: chunk `rank`
    then chunk ``2·cp − 1 − rank`` of the ``2·cp`` equal chunks of `seq_len`."""
    _check_split(seq_len, cp, rank)
    c = seq_len // (2 * cp)
    late = 2 * cp - 1 - rank
    return torch.cat((torch.arange(rank * c, (rank + 1) * c), torch.arange(late * c, (late + 1) * c)))


def shard_batch(batch: dict[str, torch.Tensor], cp: int, rank: int) -> dict[str, torch.Tensor]:
    """CP rank `rank`'s share of a micro-batch (see the module docstring for the layout).

    tokens, labels, loss_mask and position_ids ([batch, seq, ...]) are cut along dim 1; position ids
    are created first when absent (0..seq-1 for every sample), so the model sees the true positions.
    A document `attention_mask` (bool, True = masked out, [..., seq, seq]) keeps this rank's query
    rows and every key column: [..., seq / cp, seq]. Other entries pass through unchanged.
    """
    present = [key for key in SEQUENCE_KEYS if key in batch]
    if not present:
        raise ContextParallelError(
            f"shard_batch: the batch has none of {', '.join(SEQUENCE_KEYS)} (keys: {sorted(batch)}); "
            "there is no sequence to split"
        )
    ref = batch[present[0]]
    if ref.dim() < 2:
        raise ContextParallelError(
            f"shard_batch: batch[{present[0]!r}] has shape {tuple(ref.shape)}; expected [batch, seq, ...]"
        )
    b, s = ref.shape[0], ref.shape[1]
    for key in present:
        t = batch[key]
        # position ids may be shared by every sample ([1, seq]), as the model broadcasts them.
        batch_ok = t.dim() >= 2 and (t.shape[0] == b or (key == "position_ids" and t.shape[0] == 1))
        if not batch_ok or t.shape[1] != s:
            raise ContextParallelError(
                f"shard_batch: batch[{key!r}] has shape {tuple(t.shape)} but batch[{present[0]!r}] has "
                f"{tuple(ref.shape)}; every sequence entry must be [batch={b}, seq={s}, ...]"
            )
    index = cp_positions(s, cp, rank).to(ref.device)
    out = dict(batch)
    if "position_ids" not in out:
        out["position_ids"] = torch.arange(s, device=ref.device).expand(b, s)
    for key in SEQUENCE_KEYS:
        if key in out:
            out[key] = out[key].index_select(1, index)
    mask = out.get("attention_mask")
    if mask is not None:
        if mask.dim() < 2 or tuple(mask.shape[-2:]) != (s, s):
            raise ContextParallelError(
                f"shard_batch: attention_mask has shape {tuple(mask.shape)}; context parallelism needs "
                f"a full [batch, 1, seq, seq] mask with seq={s} (True = masked out) to keep this rank's "
                "query rows; fix: build the batch with the full mask, or leave it out for causal attention"
            )
        out["attention_mask"] = mask.index_select(mask.dim() - 2, index)
    return out


# ------------------------------------------------------------------------------------------ collectives

# torch >= 2.9 names the single-tensor collectives *_single; the older names are deprecated there.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class _AllGather(torch.autograd.Function):
    """[*shape] on each rank -> [cp, *shape] (rank order); backward sums the gradients over the
    group and hands each rank the slice of its own input (a reduce-scatter)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        cp = dist.get_world_size(group)
        # The concatenated form ([cp * n, ...]) is the one every backend accepts (gloo refuses a stack).
        out = x.new_empty((cp * x.shape[0], *x.shape[1:]))
        _all_gather_single(out, x.contiguous(), group=group)
        return out.unflatten(0, (cp, x.shape[0]))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        out = grad.new_empty(grad.shape[1:])
        _reduce_scatter_single(out, grad.flatten(0, 1).contiguous(), group=ctx.group)
        return out, None


def gather_sequence(x: torch.Tensor, group: dist.ProcessGroup, seq_dim: int) -> torch.Tensor:
    """The whole sequence, in global order, of a tensor whose `seq_dim` holds this rank's two chunks
    (`cp_positions` layout); differentiable (gradients flow back to each rank's own chunks)."""
    s_local = x.shape[seq_dim]
    gathered = _AllGather.apply(x, group)  # [cp, ..., s_local, ...]
    halves = gathered.unflatten(seq_dim + 1, (2, s_local // 2))  # [cp, ..., 2, c, ...]
    early = halves.select(seq_dim + 1, 0)  # chunks 0 .. cp-1 in rank order
    late = halves.select(seq_dim + 1, 1).flip(0)  # rank cp-1 holds chunk cp, ..., rank 0 chunk 2cp-1
    chunks = torch.cat((early, late))  # [2cp, ..., c, ...] in global order
    return chunks.movedim(0, seq_dim).flatten(seq_dim, seq_dim + 1)


# ------------------------------------------------------------------------------------------ attention


class ContextParallelAttention:
    """An `AttentionKernel` for a sequence split over `group` in the `cp_positions` layout.

    Keys and values are all-gathered (one collective for both) and put in global order; each of the
    rank's two query chunks attends to the keys up to and including itself, with the causal rule
    key position <= query position (a lower-right-aligned triangle within that last key chunk).
    Honours the module's scale, attention dropout (in training), grouped-query heads, attention
    backend (unfused / local: the plain math path), sliding window, and a document mask: the model
    passes it as True = may attend, holding this rank's query rows over all keys in global order
    ([..., seq / cp, seq]), which is what `shard_batch` makes of a batch's attention_mask.
    """

    def __init__(self, group: dist.ProcessGroup) -> None:
        self.group = group
        self.cp = dist.get_world_size(group)
        self.rank = dist.get_rank(group)

    def __repr__(self) -> str:
        return f"ContextParallelAttention(cp={self.cp}, rank={self.rank})"

    def __call__(
        self,
        module: SelfAttention,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        attn_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        s_local = q.shape[2]
        if k.shape[2] != s_local or v.shape[2] != s_local or s_local % 2:
            raise ContextParallelError(
                f"context-parallel attention got {s_local} local queries and {k.shape[2]} local keys; "
                "each rank must hold two equal chunks of the same tokens: split the batch with "
                "viaduct.distributed.context_parallel.shard_batch"
            )
        c, seq = s_local // 2, s_local * self.cp
        if attn_mask is not None:
            if attn_mask.dtype != torch.bool or tuple(attn_mask.shape[-2:]) != (s_local, seq):
                raise ContextParallelError(
                    f"context-parallel attention needs a bool mask of this rank's {s_local} query rows "
                    f"over all {seq} keys ([batch, 1, {s_local}, {seq}]), got {attn_mask.dtype} "
                    f"{tuple(attn_mask.shape)}; split the batch (and its attention_mask) with shard_batch"
                )
        if module.backend == AttnBackend.fused and q.device.type != "cuda":
            raise ContextParallelError(
                f"model.attention_backend=fused: the cuDNN / memory-efficient attention kernels need "
                f"CUDA, but the model runs on {q.device.type}; use attention_backend=auto (or flash)"
            )
        left = module.window[0] if module.window is not None and module.window[0] >= 0 else None
        math_path = module.backend in (AttnBackend.unfused, AttnBackend.local)
        dropout_p = module.dropout_p if module.training else 0.0
        # Plain causal multi-head attention on CUDA takes the lower-right causal bias below. Grouped
        # queries keep the tensor mask: where flash is refused, that bias calls the memory-efficient
        # kernel directly, bypassing the dispatcher's check of unequal head counts.
        causal_only = q.device.type == "cuda" and not math_path and left is None and attn_mask is None
        # FlashAttention takes no tensor mask: grouped keys and values are repeated to one per query
        # head so that the lower-right causal bias applies.
        expand = causal_only and module.backend == AttnBackend.flash and module.num_groups != module.num_heads
        plain_cuda = causal_only and (module.num_groups == module.num_heads or expand)

        kv = gather_sequence(torch.stack((k, v)), self.group, seq_dim=3)  # [2, b, groups, seq, d]
        if expand:
            kv = kv.repeat_interleave(module.num_heads // module.num_groups, dim=2)
        backends = None if math_path else _SDPA_BACKENDS[module.backend]
        kernels = sdpa_kernel(backends) if backends is not None else contextlib.nullcontext()
        outs = []
        with kernels:
            for half, chunk in enumerate((self.rank, 2 * self.cp - 1 - self.rank)):
                q_start = chunk * c
                # Keys past the chunk are in the future; a window also drops those too far back.
                k_start, k_end = (0 if left is None else max(0, q_start - left)), q_start + c
                qi = q[:, :, half * c : (half + 1) * c]
                ki, vi = kv[0, :, :, k_start:k_end], kv[1, :, :, k_start:k_end]
                mask: torch.Tensor
                if plain_cuda:
                    # Lower-right causal, not a tensor: CUDA runs it in the flash / memory-efficient
                    # kernels without materializing a [chunk, keys] mask.
                    from torch.nn.attention.bias import causal_lower_right  # imports torch._dynamo

                    mask = causal_lower_right(c, k_end - k_start)
                else:
                    q_pos = torch.arange(q_start, q_start + c, device=q.device)[:, None]
                    k_pos = torch.arange(k_start, k_end, device=q.device)[None, :]
                    mask = k_pos <= q_pos
                    if left is not None:
                        mask = mask & (q_pos - k_pos <= left)
                    if attn_mask is not None:
                        mask = attn_mask[..., half * c : (half + 1) * c, k_start:k_end] & mask
                if math_path:
                    outs.append(module._math_attention(qi, ki, vi, mask, dropout_p))
                    continue
                outs.append(
                    F.scaled_dot_product_attention(
                        qi,
                        ki,
                        vi,
                        attn_mask=mask,
                        dropout_p=dropout_p,
                        scale=module.scale,
                        enable_gqa=ki.shape[1] != qi.shape[1],
                    )
                )
        return torch.cat(outs, dim=2)


def apply_context_parallel(model: nn.Module, group: dist.ProcessGroup) -> int:
    """Install `ContextParallelAttention(group)` on every `SelfAttention` of `model`, and the
    context-parallel runner on every Mamba mixer (`viaduct.distributed.mamba_context`); returns how
    many layers. Feed the model `shard_batch(batch, cp, rank)` with the group's size and this rank."""
    from viaduct.distributed.mamba_context import apply_mamba_context_parallel

    kernel = ContextParallelAttention(group)
    count = 0
    for module in model.modules():
        if isinstance(module, SelfAttention):
            module.kernel = kernel
            count += 1
    return count + apply_mamba_context_parallel(model, group)


class ContextParallelBatches:
    """A data iterator whose micro-batches are cut for one context-parallel rank (`shard_batch`).

    Every rank of a context-parallel group reads the same samples (they share one data-parallel
    rank); wrapping the iterator gives each its share of the tokens, so a user's forward step and
    loss function run unchanged on the local tokens.
    """

    def __init__(self, batches: Iterator[dict[str, torch.Tensor]], cp: int, rank: int) -> None:
        self.batches, self.cp, self.rank = batches, cp, rank

    def __iter__(self) -> ContextParallelBatches:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        return shard_batch(next(self.batches), self.cp, self.rank)
