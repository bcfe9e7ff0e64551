"""Language-model loss: per-token cross entropy of `hidden @ weight.T` against the labels.

With a 128k vocabulary the logits dominate memory: 16 x 2048 tokens give 4.2 G logits, 8.4 GB in bf16
and 16.8 GB more for a float32 copy. The fused path (`linear_cross_entropy`) never holds more than one
chunk of logits: the forward keeps only the log-sum-exp per token, and the backward recomputes each
chunk's logits to form (softmax - one_hot) * grad. That costs one extra logits GEMM (about 6% of a
Llama-1B step) and saves several GB, so larger micro-batches fit. The softmax statistics are always
accumulated in float32.

Which path `cross_entropy_loss_fusion` takes is decided in one place, `use_chunked_loss`: the chunked
path on accelerators, where its chunk kernels are compiled and the memory matters; on a CPU the plain
`F.cross_entropy` over all logits while those fit in `CPU_PLAIN_LOSS_BYTES`. Eager CPU kernels make
the chunked path's extra passes over the logits (max, exp, sum, the one-hot difference) cost
25-30% of a small model's step, where `F.cross_entropy` runs one fused log-softmax each way.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
"""Labels equal to this contribute zero loss and zero gradient (as in `F.cross_entropy`)."""

# Elements of the logits chunk held at once (bf16: 2 GiB), as tokens per chunk for a given vocab.
_CHUNK_ELEMENTS = 1 << 30


def keep_logits_budget(device: torch.device) -> int:
    """Bytes of logits kept for the backward instead of recomputed: 10% of a GPU's memory, else 4 GiB."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory // 10
    return 4 << 30


CPU_PLAIN_LOSS_BYTES = 4 << 30
"""On a CPU, the plain loss path is taken while its logits and their float32 companions fit in this."""


def plain_loss_bytes(tokens: int, vocab_size: int, dtype: torch.dtype) -> int:
    """Memory of the plain path's logits: the logits in `dtype`, plus float32 log-probabilities saved
    for the backward and the float32 gradient it makes (and a float32 copy of 16-bit logits)."""
    itemsize = dtype.itemsize
    return tokens * vocab_size * (itemsize + 8 + (4 if itemsize < 4 else 0))


def use_chunked_loss(
    device: torch.device,
    tokens: int,
    vocab_size: int,
    dtype: torch.dtype,
    *,
    plain_budget_bytes: int | None = None,
) -> bool:
    """The loss path of `cross_entropy_loss_fusion=True`: chunked (`linear_cross_entropy`) or plain.

    Chunked on every device but the CPU. On a CPU, plain (`F.cross_entropy` over all logits, faster
    in eager mode) unless `plain_loss_bytes` exceeds `plain_budget_bytes` (default
    `CPU_PLAIN_LOSS_BYTES`), where holding all logits would cost more memory than the speed is worth.
    """
    if device.type != "cpu":
        return True
    budget = CPU_PLAIN_LOSS_BYTES if plain_budget_bytes is None else plain_budget_bytes
    return plain_loss_bytes(tokens, vocab_size, dtype) > budget


def default_chunk_tokens(vocab_size: int) -> int:
    """Tokens per chunk so that one chunk of logits has about 2^30 elements (a multiple of 256)."""
    return max(256, (_CHUNK_ELEMENTS // vocab_size) // 256 * 256)


def even_chunk_tokens(tokens: int, vocab_size: int) -> int:
    """Tokens per chunk that split `tokens` into even chunks of at most `default_chunk_tokens`
    (a multiple of 128, so the last chunk is not a sliver)."""
    pieces = max(1, -(-tokens // default_chunk_tokens(vocab_size)))  # no tokens: one empty chunk
    chunk = max(1, -(-tokens // pieces))
    return -(-chunk // 128) * 128


def _chunk_forward(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, logsumexp) per row of a logits chunk, in float32."""
    # Spelled as max / exp-sum (not torch.logsumexp) so Inductor matches its online-softmax pattern
    # and reads the logits once instead of twice.
    x = logits.float()
    row_max = x.amax(dim=-1, keepdim=True)
    lse = (row_max + (x - row_max).exp().sum(dim=-1, keepdim=True).log()).squeeze(-1)
    valid = labels != IGNORE_INDEX
    safe = torch.where(valid, labels, 0)
    target = logits.gather(-1, safe[:, None]).squeeze(-1).float()
    return torch.where(valid, lse - target, 0.0), lse


def _chunk_grad_logits(
    logits: torch.Tensor, lse: torch.Tensor, labels: torch.Tensor, grad: torch.Tensor
) -> torch.Tensor:
    """d loss / d logits = (softmax - one_hot(label)) * grad, in the logits' dtype."""
    valid = labels != IGNORE_INDEX
    probs = torch.exp(logits.float() - lse[:, None])
    one_hot = torch.arange(logits.shape[-1], device=logits.device)[None, :] == labels[:, None]
    g = (probs - one_hot.float()) * torch.where(valid, grad, 0.0)[:, None]
    return g.to(logits.dtype)


@functools.cache
def _compiled(fn: Callable[..., Any]) -> Callable[..., Any]:
    # One fused kernel per chunk on GPU instead of several passes over float32 temporaries.
    return torch.compile(fn, dynamic=False)


def _kernel(fn: Callable[..., Any], t: torch.Tensor) -> Callable[..., Any]:
    return _compiled(fn) if t.is_cuda else fn


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        labels: torch.Tensor,
        chunk: int,
        keep_bytes: int,
    ) -> torch.Tensor:
        n = hidden.shape[0]
        loss = torch.empty(n, dtype=torch.float32, device=hidden.device)
        lse = torch.empty_like(loss)
        fwd = _kernel(_chunk_forward, hidden)
        # Forward runs with grad mode off; needs_input_grad says whether a backward will follow.
        keep = any(ctx.needs_input_grad[:2]) and n * weight.shape[0] * hidden.element_size() <= keep_bytes
        kept: list[torch.Tensor | None] = []
        for start in range(0, n, chunk):
            sl = slice(start, start + chunk)
            logits = hidden[sl] @ weight.t()
            loss[sl], lse[sl] = fwd(logits, labels[sl])
            if keep:
                kept.append(logits)
        ctx.save_for_backward(hidden, weight, labels, lse)
        ctx.chunk, ctx.kept = chunk, kept
        return loss

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        hidden, weight, labels, lse = ctx.saved_tensors
        grad_h, grad_w = chunked_backward(ctx, hidden, weight, labels, lse, grad_loss)
        return grad_h, grad_w, None, None, None


def chunked_backward(
    ctx: Any,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    grad_loss: torch.Tensor,
    on_grad_hidden: Callable[[torch.Tensor], None] | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The backward of a chunked linear cross entropy: each chunk's logits (kept in `ctx.kept`, else
    recomputed), (softmax - one_hot) * grad, then the gradients of hidden and weight.

    `labels` index the columns of `weight` (a label no column has contributes only its softmax);
    `on_grad_hidden` is called with each chunk's hidden gradient as soon as it is written (a
    vocabulary-parallel loss starts reducing it there, overlapping the next chunk's GEMMs).
    """
    need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    grad_h = torch.empty_like(hidden) if need_h else None
    grad_w = torch.zeros_like(weight) if need_w else None
    bwd = _kernel(_chunk_grad_logits, hidden)
    grad_loss = grad_loss.float()
    kept: list[torch.Tensor | None] = ctx.kept
    for i, start in enumerate(range(0, hidden.shape[0], ctx.chunk)):
        sl = slice(start, start + ctx.chunk)
        h = hidden[sl]
        logits = kept[i] if kept else h @ weight.t()
        if kept:
            kept[i] = None  # freed once its gradient exists: at most one extra chunk at a time
        g = bwd(logits, lse[sl], labels[sl], grad_loss[sl])  # [chunk, vocab]
        del logits
        if grad_h is not None:
            torch.mm(g, weight, out=grad_h[sl])
            if on_grad_hidden is not None:
                on_grad_hidden(grad_h[sl])
        if grad_w is not None:
            grad_w.addmm_(g.t(), h)
    ctx.kept = []
    return grad_h, grad_w


@torch.compiler.disable  # its own chunk kernels are compiled; tracing the loop would unroll it
def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    chunk_tokens: int | None = None,
    keep_logits_bytes: int | None = None,
) -> torch.Tensor:
    """Per-token loss [...] of logits = hidden [..., H] @ weight [V, H].T, without holding all logits
    (unless they fit in `keep_logits_bytes`, default `keep_logits_budget`, which saves recomputing)."""
    shape = labels.shape
    h2 = hidden.reshape(-1, hidden.shape[-1])
    n = h2.shape[0]
    if chunk_tokens is None:
        chunk_tokens = even_chunk_tokens(n, weight.shape[0])
    if keep_logits_bytes is None:
        keep_logits_bytes = keep_logits_budget(hidden.device)
    loss = _LinearCrossEntropy.apply(h2, weight, labels.reshape(-1), chunk_tokens, keep_logits_bytes)
    return loss.view(shape)


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, *, upcast: bool = True) -> torch.Tensor:
    """Per-token loss [...] from materialized logits [..., V] (the unfused path)."""
    flat = logits.reshape(-1, logits.shape[-1])
    if upcast:
        flat = flat.float()
    loss = F.cross_entropy(flat, labels.reshape(-1), reduction="none", ignore_index=IGNORE_INDEX)
    return loss.view(labels.shape).float()
