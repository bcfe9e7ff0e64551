"""Causal self-attention with a fused QKV projection, grouped-query heads and optional QK norm."""

from __future__ import annotations

import contextlib
import math
from typing import TYPE_CHECKING, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint

from viaduct.models.common.norms import Norm
from viaduct.models.common.rotary import apply_rotary
from viaduct.models.enums import AttnBackend

if TYPE_CHECKING:
    from viaduct.models.transformer_config import TransformerConfig

Rope = tuple[torch.Tensor, torch.Tensor]
LayerKV = tuple[torch.Tensor, torch.Tensor]
"""One layer's KV cache: keys and values [batch, kv_heads, max_len, head_dim], written in place."""


class AttentionKernel(Protocol):
    """A replacement for `SelfAttention.core_attention`, installed from outside the model (context
    parallelism attends over a sequence split across processes): called with the module, q, k, v
    [batch, heads, seq, head_dim] and the mask (True = may attend), returns [batch, heads, seq, dim]."""

    def __call__(
        self,
        module: SelfAttention,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        attn_mask: torch.Tensor | None,
    ) -> torch.Tensor: ...


# AttnBackend -> the SDPA kernels allowed (None: PyTorch picks; unfused/local run our own math path).
_SDPA_BACKENDS: dict[AttnBackend, list[SDPBackend] | None] = {
    AttnBackend.auto: None,
    AttnBackend.flash: [SDPBackend.FLASH_ATTENTION],
    AttnBackend.fused: [SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION],
}


def sliding_window_mask(seq_len: int, window: tuple[int, int], device: torch.device) -> torch.Tensor:
    """Boolean [seq, seq] mask (True = may attend): causal, and at most window[0] tokens back."""
    i = torch.arange(seq_len, device=device)
    dist = i[:, None] - i[None, :]  # query position - key position
    allowed = dist >= 0
    if window[0] >= 0:
        allowed = allowed & (dist <= window[0])
    return allowed


class SelfAttention(nn.Module):
    """Multi-head / grouped-query / multi-query attention (Megatron's `SelfAttention`).

    One GEMM produces all queries, keys and values, its rows grouped by query group as in Megatron
    Core: for each group, [its num_heads/num_groups q heads | its k | its v], kv_channels rows each.
    A contiguous share of those rows (a tensor-parallel shard) is then whole groups, so `forward`
    takes the number of groups from the projection's output width rather than from the config.
    """

    def __init__(
        self,
        cfg: TransformerConfig,
        *,
        recompute_core_attention: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        assert cfg.kv_channels is not None and cfg.num_query_groups is not None, "finalize() the config first"
        self.num_heads, self.num_groups = cfg.num_attention_heads, cfg.num_query_groups
        self.head_dim = cfg.kv_channels
        self.heads_per_group = self.num_heads // self.num_groups
        qkv_out = (self.num_heads + 2 * self.num_groups) * self.head_dim
        self.linear_qkv = nn.Linear(
            cfg.hidden_size,
            qkv_out,
            bias=cfg.add_bias_linear or cfg.add_qkv_bias,
            device=device,
            dtype=dtype,
        )
        self.q_layernorm: Norm | None = None
        self.k_layernorm: Norm | None = None
        if cfg.qk_layernorm:

            def head_norm() -> Norm:
                return Norm(
                    self.head_dim,
                    cfg.normalization,
                    cfg.layernorm_epsilon,
                    zero_centered_gamma=cfg.layernorm_zero_centered_gamma,
                    device=device,
                    dtype=dtype,
                )

            self.q_layernorm, self.k_layernorm = head_norm(), head_norm()
        self.linear_proj = nn.Linear(
            self.num_heads * self.head_dim,
            cfg.hidden_size,
            bias=cfg.add_bias_linear,
            device=device,
            dtype=dtype,
        )
        self.scale = cfg.softmax_scale or 1.0 / math.sqrt(self.head_dim)
        self.dropout_p = cfg.attention_dropout
        self.backend = cfg.attention_backend
        self.window = cfg.window_size
        self.softmax_in_fp32 = cfg.effective_attention_softmax_in_fp32
        self.rotary_interleaved = cfg.rotary_interleaved
        self.recompute_core_attention = recompute_core_attention
        self.kernel: AttentionKernel | None = None
        """Set from outside to replace the attention kernel (see `AttentionKernel`); None: local."""

    def forward(
        self,
        x: torch.Tensor,
        rope: Rope | None = None,
        attn_mask: torch.Tensor | None = None,
        kv_cache: LayerKV | None = None,
        cache_position: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x [batch, seq, hidden]; attn_mask bool, True = may attend, broadcastable to [b, 1, s, s].

        With `kv_cache` (generation): this layer's cached keys and values [batch, kv_heads, max_len,
        head_dim]; the new keys and values are written at the slots `cache_position` [seq] and the
        queries attend over the whole cache, `attn_mask` then being [b, 1, seq, max_len] (see
        `viaduct.inference.kv_cache.KVCache.attention_mask`).
        """
        b, s, _ = x.shape
        per_group = self.heads_per_group
        qkv = self.linear_qkv(x)
        # Head counts come from the tensors from here on: under tensor parallelism this module holds
        # only some of the groups (self.num_heads / num_groups stay the model's totals).
        groups = qkv.shape[-1] // ((per_group + 2) * self.head_dim)
        qkv = qkv.view(b, s, groups, per_group + 2, self.head_dim)
        q, k, v = qkv.split([per_group, 1, 1], dim=3)
        q = q.reshape(b, s, groups * per_group, self.head_dim)
        k, v = k.squeeze(3), v.squeeze(3)  # [batch, seq, groups, head_dim]
        if self.q_layernorm is not None and self.k_layernorm is not None:
            q, k = self.q_layernorm(q), self.k_layernorm(k)
        if rope is not None:
            q = apply_rotary(q, *rope, interleaved=self.rotary_interleaved)
            k = apply_rotary(k, *rope, interleaved=self.rotary_interleaved)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [batch, heads, seq, head_dim]
        if kv_cache is not None:
            out = self._cached_attention(q, k, v, attn_mask, kv_cache, cache_position)
        elif self.recompute_core_attention and torch.is_grad_enabled():
            out = checkpoint(self.core_attention, q, k, v, attn_mask, use_reentrant=False)
        else:
            out = self.core_attention(q, k, v, attn_mask)
        out = out.transpose(1, 2).reshape(b, s, -1)
        return self.linear_proj(out)

    def _cached_attention(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        attn_mask: torch.Tensor | None,
        kv_cache: LayerKV,
        cache_position: torch.Tensor | None,
    ) -> torch.Tensor:
        """Write k, v into the cache at `cache_position`, then attend q over every cached slot.

        The mask (built by the cache) already holds causality, padding and the sliding window, in
        cache slots rather than square [seq, seq] positions, so neither the window rule nor the
        is_causal shortcut of `core_attention` applies here.
        """
        if self.kernel is not None:
            raise ValueError(
                "generation with a KV cache runs in one process: this attention has a replacement "
                "kernel installed (context parallelism); build the model without it"
            )
        if attn_mask is None or cache_position is None:
            raise ValueError("attention with a KV cache needs the cache's attn_mask and cache_position")
        k_all, v_all = kv_cache
        # index_copy_ with a tensor of slots keeps the decode step's shapes static (one compiled graph
        # for every step), where slicing by a Python int would recompile at each new position.
        k_all.index_copy_(2, cache_position, k.to(k_all.dtype))
        v_all.index_copy_(2, cache_position, v.to(v_all.dtype))
        # Under autocast the new q is in the autocast dtype while the cache keeps the model's.
        k_all, v_all = k_all.to(q.dtype), v_all.to(q.dtype)
        if self.backend in (AttnBackend.unfused, AttnBackend.local):
            return self._math_attention(q, k_all, v_all, attn_mask, 0.0)
        # PyTorch picks the kernel: the flash kernel takes no mask, and one query row per step gains
        # nothing from it.
        return F.scaled_dot_product_attention(
            q,
            k_all,
            v_all,
            attn_mask=attn_mask,
            scale=self.scale,
            enable_gqa=k_all.shape[1] != q.shape[1],
        )

    def core_attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None
    ) -> torch.Tensor:
        """softmax(q k^T * scale + mask) v over [batch, heads, seq, head_dim]."""
        if self.kernel is not None:
            return self.kernel(self, q, k, v, attn_mask)
        if self.window is not None:
            window = sliding_window_mask(q.shape[2], self.window, q.device)
            attn_mask = window if attn_mask is None else attn_mask & window
        dropout_p = self.dropout_p if self.training else 0.0
        if self.backend in (AttnBackend.unfused, AttnBackend.local):
            return self._math_attention(q, k, v, attn_mask, dropout_p)
        backends = _SDPA_BACKENDS[self.backend]
        if self.backend == AttnBackend.fused and q.device.type != "cuda":
            raise ValueError(
                f"model.attention_backend=fused: the cuDNN / memory-efficient attention kernels need "
                f"CUDA, but the model runs on {q.device.type}; use attention_backend=auto (or flash)"
            )
        kernels = sdpa_kernel(backends) if backends is not None else contextlib.nullcontext()
        with kernels:
            return F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=attn_mask,
                dropout_p=dropout_p,
                is_causal=attn_mask is None,
                scale=self.scale,
                enable_gqa=k.shape[1] != q.shape[1],
            )

    def _math_attention(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        attn_mask: torch.Tensor | None,
        dropout_p: float,
    ) -> torch.Tensor:
        """The plain matmul-softmax-matmul path (attention_backend unfused / local)."""
        if k.shape[1] != q.shape[1]:
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        scores = q @ k.transpose(-2, -1)  # [batch, heads, seq_q, seq_k]
        if self.softmax_in_fp32:
            scores = scores.float()
        scores = scores * self.scale
        if attn_mask is None:
            s_q, s_k = scores.shape[-2:]
            attn_mask = torch.ones(s_q, s_k, dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~attn_mask, torch.finfo(scores.dtype).min)
        probs = F.dropout(torch.softmax(scores, dim=-1).to(v.dtype), dropout_p)
        return probs @ v
