"""The attention parts only T5 needs: cross-attention to the encoder output and T5's bucketed
relative position bias."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


class CrossAttention(nn.Module):
    """The decoder's attention over the encoder output (Megatron Core's `CrossAttention`).

    Queries come from the decoder (`linear_q`), keys and values from the encoder output in one GEMM
    (`linear_kv`). The rows of `linear_kv` are grouped by head as in Megatron Core: for each head
    [its k | its v], kv_channels rows each, so a contiguous share of the rows (a tensor-parallel
    shard) is whole heads; `forward` therefore reads the number of heads from the tensors. No
    position information enters here (neither rotary nor relative bias), as in Megatron and T5.
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        head_dim: int,
        *,
        bias: bool,
        attention_dropout: float,
        softmax_scale: float | None = None,
        recompute_core_attention: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, head_dim
        inner = num_heads * head_dim
        self.linear_q = nn.Linear(hidden_size, inner, bias=bias, device=device, dtype=dtype)
        self.linear_kv = nn.Linear(hidden_size, 2 * inner, bias=bias, device=device, dtype=dtype)
        self.linear_proj = nn.Linear(inner, hidden_size, bias=bias, device=device, dtype=dtype)
        self.scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
        self.dropout_p = attention_dropout
        self.recompute_core_attention = recompute_core_attention
        """Selective recompute: re-run the attention kernel in the backward pass instead of keeping
        what it saves (the score matrices on the unfused path)."""

    def forward(
        self, x: torch.Tensor, context: torch.Tensor, attn_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x [batch, seq_q, hidden] attends over context [batch, seq_k, hidden].

        attn_mask: None (every key), a bool tensor (True = may attend) or an additive float tensor,
        broadcastable to [batch, heads, seq_q, seq_k].
        """
        b, s_q, _ = x.shape
        s_k = context.shape[1]
        q = self.linear_q(x).view(b, s_q, -1, self.head_dim).transpose(1, 2)
        kv = self.linear_kv(context).view(b, s_k, -1, 2, self.head_dim)
        k, v = (t.transpose(1, 2) for t in kv.unbind(3))  # [batch, heads, seq_k, head_dim]
        if self.recompute_core_attention and torch.is_grad_enabled():
            out = checkpoint(self.core_attention, q, k, v, attn_mask, use_reentrant=False)
        else:
            out = self.core_attention(q, k, v, attn_mask)
        return self.linear_proj(out.transpose(1, 2).reshape(b, s_q, -1))

    def core_attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None
    ) -> torch.Tensor:
        """softmax(q k^T * scale + mask) v over [batch, heads, seq, head_dim]."""
        return F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=attn_mask,
            dropout_p=self.dropout_p if self.training else 0.0,
            scale=self.scale,
        )


def relative_position_bucket(
    relative_position: torch.Tensor, *, bidirectional: bool, num_buckets: int, max_distance: int
) -> torch.Tensor:
    """T5's bucket (int64, in [0, num_buckets)) of each relative position (key minus query position).

    Half of the buckets (of each direction, when bidirectional) hold the exact distances 0, 1, ...;
    the other half cover distances up to `max_distance` in logarithmically growing ranges, and every
    distance beyond shares the last bucket. Bidirectional: positive offsets (keys after the query)
    take the upper half of the buckets. Unidirectional (causal): keys after the query all fall in
    bucket 0, they are masked anyway. The arithmetic is T5's (and Megatron's), so a checkpoint's
    bias table means the same here.
    """
    rel = relative_position.long()
    buckets = torch.zeros_like(rel)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (rel > 0).long() * num_buckets
        distance = rel.abs()
    else:
        distance = (-rel).clamp(min=0)
    max_exact = num_buckets // 2
    is_small = distance < max_exact
    # clamp(min=1): log(0) would be -inf and its cast to int64 undefined; those entries are `is_small`
    # and discarded by the `where` below.
    scaled = torch.log(distance.clamp(min=1).float() / max_exact) / math.log(max_distance / max_exact)
    large = max_exact + (scaled * (num_buckets - max_exact)).long()
    large = large.clamp(max=num_buckets - 1)
    return buckets + torch.where(is_small, distance, large)


class RelativePositionBias(nn.Module):
    """A learned bias per head and relative-position bucket, added to the attention scores.

    One of these serves every layer of its stack (T5 shares the table across layers): the encoder's
    is bidirectional, the decoder's unidirectional. The table is `relative_attention_bias.weight`
    [num_buckets, num_heads], as in Megatron Core and Hugging Face T5.
    """

    def __init__(
        self,
        num_heads: int,
        *,
        bidirectional: bool,
        num_buckets: int,
        max_distance: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.bidirectional, self.num_buckets, self.max_distance = bidirectional, num_buckets, max_distance
        self.relative_attention_bias = nn.Embedding(num_buckets, num_heads, device=device, dtype=dtype)

    def forward(self, query_length: int, key_length: int) -> torch.Tensor:
        """The bias [1, heads, query_length, key_length] for positions 0.. of queries and keys."""
        device = self.relative_attention_bias.weight.device
        query = torch.arange(query_length, device=device)[:, None]
        key = torch.arange(key_length, device=device)[None, :]
        bucket = relative_position_bucket(
            key - query,
            bidirectional=self.bidirectional,
            num_buckets=self.num_buckets,
            max_distance=self.max_distance,
        )
        return self.relative_attention_bias(bucket).permute(2, 0, 1).unsqueeze(0)

    def extra_repr(self) -> str:
        return (
            f"bidirectional={self.bidirectional}, num_buckets={self.num_buckets}, "
            f"max_distance={self.max_distance}"
        )
