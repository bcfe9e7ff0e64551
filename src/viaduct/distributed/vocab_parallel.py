"""The output layer and loss with the vocabulary split over a tensor-parallel group.

The output weight [vocab, hidden] is split by rows: rank r of the group holds rows
[r * V/tp, (r + 1) * V/tp) (the vocabulary is padded to a multiple of tp). The hidden states
[batch, seq, hidden] are the same on every rank of the group. `VocabParallelOutput` is set as
`GPTModel.vocab_output`, so the model itself never touches process groups.

The loss never gathers the vocabulary. It runs in token chunks like `linear_cross_entropy`: each rank
computes, per token, the log-sum-exp of its own slice of the logits and the label's logit where it
owns the label (0 elsewhere), both in float32. After the last chunk one all-gather of these two
numbers per token gives every rank the global log-sum-exp (the log-sum-exp of the ranks' log-sum-exps)
and the label's logit (the sum, which only the owner makes nonzero). That is one collective per
forward instead of three per chunk (max, sum of exponentials, label logit), and it is as accurate: each
rank's log-sum-exp is already shifted by its own maximum, and combining a handful of them is stable.

The backward forms the local slice of (softmax - one_hot) x grad from the global log-sum-exp, which
gives this rank's weight gradient directly. The hidden-state gradient is a partial sum over the
vocabulary slices; each chunk's part is all-reduced asynchronously while the next chunk is computed.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.tensor import DTensor, Replicate

from viaduct.models.common.loss import (
    IGNORE_INDEX,
    _kernel,
    chunked_backward,
    even_chunk_tokens,
    keep_logits_budget,
)

_OTHER_RANK = -1
"""The local label of a token whose label lies in another rank's slice: still counted in the loss
(unlike IGNORE_INDEX), but it matches none of this rank's columns."""


class _GatherInto(Protocol):
    def __call__(
        self, output_tensor: torch.Tensor, input_tensor: torch.Tensor, group: dist.ProcessGroup | None = ...
    ) -> object: ...


# `all_gather_single` replaces `all_gather_into_tensor` (deprecated) in newer PyTorch releases.
_all_gather_into: _GatherInto = getattr(dist, "all_gather_single", dist.all_gather_into_tensor)


def _all_gather(t: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """[group size, *t.shape]: every rank's `t`, in group-rank order."""
    size = dist.get_world_size(group)
    out = t.new_empty((size * t.shape[0], *t.shape[1:]))
    _all_gather_into(out, t.contiguous(), group=group)
    return out.view(size, *t.shape)


def _local_labels(labels: torch.Tensor, offset: int, v_local: int) -> torch.Tensor:
    """Labels in this rank's column numbering: owned ones shifted into [0, v_local), ignored ones kept
    as IGNORE_INDEX, the rest `_OTHER_RANK`."""
    local = labels - offset
    owned = (local >= 0) & (local < v_local)
    other = torch.where(labels == IGNORE_INDEX, IGNORE_INDEX, _OTHER_RANK)
    return torch.where(owned, local, other)


def _local_stats(logits: torch.Tensor, local_labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-sum-exp of each row of this rank's logits slice, the label's logit where this rank owns
    the label else 0), in float32."""
    # Max / exp-sum rather than torch.logsumexp, as in loss._chunk_forward: Inductor fuses it into one
    # read of the logits.
    x = logits.float()
    row_max = x.amax(dim=-1, keepdim=True)
    lse = (row_max + (x - row_max).exp().sum(dim=-1, keepdim=True).log()).squeeze(-1)
    owned = local_labels >= 0
    safe = torch.where(owned, local_labels, 0)
    target = logits.gather(-1, safe[:, None]).squeeze(-1).float()
    return lse, torch.where(owned, target, 0.0)


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Per-token loss [n] of hidden [n, H] against a vocabulary slice weight [V/tp, H] (see the module
    docstring). Every rank of the group must backpropagate the same gradient of the loss, as it does
    when the loss is computed identically on each of them."""

    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        labels: torch.Tensor,
        offset: int,
        chunk: int,
        keep_bytes: int,
        group: dist.ProcessGroup,
    ) -> torch.Tensor:
        n, v_local = hidden.shape[0], weight.shape[0]
        local_labels = _local_labels(labels, offset, v_local)
        stats = torch.empty(2, n, dtype=torch.float32, device=hidden.device)  # local lse, label logit
        stats_of = _kernel(_local_stats, hidden)
        # Forward runs with grad mode off; needs_input_grad says whether a backward will follow.
        keep = any(ctx.needs_input_grad[:2]) and n * v_local * hidden.element_size() <= keep_bytes
        kept: list[torch.Tensor | None] = []
        for start in range(0, n, chunk):
            sl = slice(start, start + chunk)
            logits = hidden[sl] @ weight.t()
            stats[0, sl], stats[1, sl] = stats_of(logits, local_labels[sl])
            if keep:
                kept.append(logits)
        every = _all_gather(stats, group)  # [tp, 2, n]
        lse = torch.logsumexp(every[:, 0], dim=0)
        target = every[:, 1].sum(dim=0)
        loss = torch.where(labels != IGNORE_INDEX, lse - target, 0.0)
        ctx.save_for_backward(hidden, weight, local_labels, lse)
        ctx.chunk, ctx.kept, ctx.group = chunk, kept, group
        return loss

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        hidden, weight, local_labels, lse = ctx.saved_tensors
        pending: list[dist.Work] = []

        def reduce(grad_h_chunk: torch.Tensor) -> None:
            # This rank's vocabulary slice gives a partial sum; the replicated hidden states need the
            # whole. Reducing this chunk overlaps the next chunk's GEMMs.
            work = dist.all_reduce(grad_h_chunk, group=ctx.group, async_op=True)
            if work is not None:
                pending.append(work)

        # A label of another rank (_OTHER_RANK) matches no column here, so each chunk's gradient is
        # this rank's slice of the global (softmax - one_hot) x grad.
        grad_h, grad_w = chunked_backward(ctx, hidden, weight, local_labels, lse, grad_loss, reduce)
        for work in pending:
            work.wait()
        return grad_h, grad_w, None, None, None, None, None


class _CopyToVocabParallel(torch.autograd.Function):
    """Identity forward; the backward sums the hidden-state gradient over the group, since each rank's
    output slice contributes only part of it."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return hidden.view_as(hidden)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        # A copy: the incoming gradient may be shared with other consumers, so it is not reduced in place.
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _GatherVocab(torch.autograd.Function):
    """Local logits [..., V/tp] -> full logits [..., V] gathered over the group. The backward keeps
    this rank's columns of the gradient: every rank computes the same thing from the full logits, so
    each holds the whole gradient already."""

    @staticmethod
    def forward(ctx: Any, local: torch.Tensor, group: dist.ProcessGroup, rank: int) -> torch.Tensor:
        v_local = local.shape[-1]
        ctx.rank, ctx.v_local = rank, v_local
        flat = local.reshape(-1, v_local)
        every = _all_gather(flat, group)  # [tp, tokens, V/tp]
        full = every.permute(1, 0, 2).reshape(flat.shape[0], -1)
        return full.view(*local.shape[:-1], full.shape[-1])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        start = ctx.rank * ctx.v_local
        return grad[..., start : start + ctx.v_local].contiguous(), None, None


def _autocast_dtype(device: torch.device) -> torch.dtype | None:
    return torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None


class VocabParallelOutput:
    """`GPTModel.vocab_output` for an output weight split by vocabulary rows over `group`.

    `chunk_tokens`: tokens per chunk of the loss (None: even chunks of about 2^30 local logits each);
    `keep_logits_bytes`: this rank's logits are kept for the backward while they fit in this many bytes,
    else recomputed there (None: `keep_logits_budget` of the device; 0 always recomputes).
    """

    def __init__(
        self,
        group: dist.ProcessGroup,
        *,
        chunk_tokens: int | None = None,
        keep_logits_bytes: int | None = None,
    ) -> None:
        if chunk_tokens is not None and chunk_tokens < 1:
            raise ValueError(f"chunk_tokens={chunk_tokens}: a loss chunk needs at least 1 token (or None)")
        if keep_logits_bytes is not None and keep_logits_bytes < 0:
            raise ValueError(
                f"keep_logits_bytes={keep_logits_bytes}: a byte budget is >= 0 (0 always recomputes)"
            )
        rank = dist.get_rank(group)
        if rank < 0:
            raise ValueError("VocabParallelOutput: this process is not a member of the given group")
        self.group = group
        self.rank = rank
        self.size = dist.get_world_size(group)
        self.chunk_tokens = chunk_tokens
        self.keep_logits_bytes = keep_logits_bytes

    # ------------------------------------------------------------------ inputs

    def _weight_slice(self, weight: torch.Tensor) -> torch.Tensor:
        """This rank's rows of the output weight; a DTensor's local shard keeps its autograd link."""
        if not isinstance(weight, DTensor):
            return weight
        rows = weight.shape[0]
        local = weight.to_local()
        if local.shape[0] * self.size != rows:
            raise ValueError(
                f"output weight: this rank holds {local.shape[0]} of its {rows} vocabulary rows, but a "
                f"split over the {self.size} ranks of the tensor-parallel group holds {rows / self.size:g}; "
                f"shard it Shard(0) over that group's mesh dimension (placements: {weight.placements})"
            )
        return local

    @staticmethod
    def _replicated(t: torch.Tensor, what: str) -> torch.Tensor:
        """The plain tensor of a replicated input (hidden states or labels)."""
        if not isinstance(t, DTensor):
            return t
        if not all(isinstance(p, Replicate) for p in t.placements):
            raise ValueError(
                f"{what}: the vocabulary-parallel output needs them whole on every rank (Replicate), "
                f"got placements {t.placements}"
            )
        return t.to_local()

    # ------------------------------------------------------------------ VocabOutput

    @torch.compiler.disable  # collectives and the chunk loop (whose kernels are compiled) stay eager
    def loss(self, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Per-token cross entropy [batch, seq] (float32) against global vocabulary ids in `labels`
        (IGNORE_INDEX: 0, no gradient), identical on every rank of the group. A label outside the
        vocabulary belongs to no rank and counts as a logit of 0 (not checked: that would synchronize)."""
        h = self._replicated(hidden, "hidden states")
        w = self._weight_slice(weight)
        y = self._replicated(labels, "labels")
        autocast = _autocast_dtype(h.device)
        if autocast is not None:  # as GPTModel.loss: the GEMMs run in the autocast dtype
            h, w = h.to(autocast), w.to(autocast)
        h2 = h.reshape(-1, h.shape[-1])
        n, v_local = h2.shape[0], w.shape[0]
        chunk = self.chunk_tokens if self.chunk_tokens is not None else even_chunk_tokens(n, v_local)
        keep = self.keep_logits_bytes if self.keep_logits_bytes is not None else keep_logits_budget(h.device)
        loss = _VocabParallelCrossEntropy.apply(
            h2, w, y.reshape(-1), self.rank * v_local, chunk, keep, self.group
        )
        return loss.view(y.shape)

    @torch.compiler.disable  # the collectives stay eager
    def logits(self, hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Full logits [batch, seq, vocab], gathered over the group (for evaluation and generation: it
        holds the whole vocabulary on every rank)."""
        h = self._replicated(hidden, "hidden states")
        w = self._weight_slice(weight)
        local = F.linear(_CopyToVocabParallel.apply(h, self.group), w)  # autocast applies here as usual
        return _GatherVocab.apply(local, self.group, self.rank)
