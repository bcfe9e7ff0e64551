"""A pre-norm transformer layer and the stack of them, with activation recompute."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from viaduct.models.common.attention import Rope, SelfAttention
from viaduct.models.common.mlp import MLP
from viaduct.models.common.norms import Norm

if TYPE_CHECKING:
    from viaduct.models.transformer_config import TransformerConfig


def _maybe_checkpoint(
    on: bool, fn: Callable[..., torch.Tensor], *args: torch.Tensor | Rope | None
) -> torch.Tensor:
    if on and torch.is_grad_enabled():
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


class TransformerLayer(nn.Module):
    """x + attn(norm(x)), then x + mlp(norm(x)); dropout on each branch (Megatron's `TransformerLayer`).

    Selective recompute (`recompute_modules`) re-runs the named parts in the backward pass instead of
    keeping their activations: core_attn (the attention kernel; the fused kernels keep nothing
    beyond q, k, v and the output, so this frees the score matrices of the unfused path), mlp.
    """

    def __init__(
        self,
        cfg: TransformerConfig,
        layer_number: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.layer_number = layer_number  # 1-based, as in Megatron
        selective = set(cfg.recompute_modules or ()) if cfg.recompute_granularity == "selective" else set()

        def norm() -> Norm:
            return Norm(
                cfg.hidden_size,
                cfg.normalization,
                cfg.layernorm_epsilon,
                zero_centered_gamma=cfg.layernorm_zero_centered_gamma,
                device=device,
                dtype=dtype,
            )

        self.input_layernorm = norm()
        self.self_attention = SelfAttention(
            cfg, recompute_core_attention="core_attn" in selective, device=device, dtype=dtype
        )
        self.pre_mlp_layernorm = norm()
        self.mlp = MLP(cfg, device=device, dtype=dtype)
        self.hidden_dropout = cfg.hidden_dropout
        self.residual_post_norm = cfg.apply_residual_connection_post_layernorm
        self.recompute_mlp = "mlp" in selective

    def forward(
        self, x: torch.Tensor, rope: Rope | None = None, attn_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        h = self.input_layernorm(x)
        residual = h if self.residual_post_norm else x
        h = self.self_attention(h, rope, attn_mask)
        x = residual + F.dropout(h, self.hidden_dropout, self.training)
        h = self.pre_mlp_layernorm(x)
        residual = h if self.residual_post_norm else x
        h = _maybe_checkpoint(self.recompute_mlp, self.mlp, h)
        return residual + F.dropout(h, self.hidden_dropout, self.training)


class TransformerBlock(nn.Module):
    """The layers in order (then the final norm, with post_process), with full-layer recompute.

    recompute_method "uniform": the layers are cut into chunks of recompute_num_layers and only each
    chunk's input is kept. "block": the first recompute_num_layers layers are recomputed one by one,
    the rest keep their activations (trades memory for speed more finely).
    """

    def __init__(
        self,
        cfg: TransformerConfig,
        *,
        post_process: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            TransformerLayer(cfg, i + 1, device=device, dtype=dtype) for i in range(cfg.num_layers)
        )
        self.final_layernorm: Norm | None = None
        if post_process:
            self.final_layernorm = Norm(
                cfg.hidden_size,
                cfg.normalization,
                cfg.layernorm_epsilon,
                zero_centered_gamma=cfg.layernorm_zero_centered_gamma,
                device=device,
                dtype=dtype,
            )
        full = cfg.recompute_granularity == "full"
        self.recompute_method = cfg.recompute_method if full else None
        self.recompute_num_layers = cfg.recompute_num_layers or 0

    def forward(
        self, x: torch.Tensor, rope: Rope | None = None, attn_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        layers = self.layers
        n = self.recompute_num_layers
        if self.recompute_method == "uniform" and torch.is_grad_enabled():
            for start in range(0, len(layers), n):
                x = checkpoint(
                    _run_layers, layers[start : start + n], x, rope, attn_mask, use_reentrant=False
                )
        else:
            for i, layer in enumerate(layers):
                recompute = self.recompute_method == "block" and i < n
                x = _maybe_checkpoint(recompute, layer, x, rope, attn_mask)
        return self.final_layernorm(x) if self.final_layernorm is not None else x


def _run_layers(
    layers: Iterable[nn.Module], x: torch.Tensor, rope: Rope | None, attn_mask: torch.Tensor | None
) -> torch.Tensor:
    for layer in layers:
        x = layer(x, rope, attn_mask)
    return x
