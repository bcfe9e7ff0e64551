"""LayerNorm and RMSNorm with Megatron's options (epsilon, zero-centred gamma)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from viaduct.models.transformer_config import Normalization

if TYPE_CHECKING:
    from viaduct.models.transformer_config import TransformerConfig


class Norm(nn.Module):
    """LayerNorm (with bias) or RMSNorm over the last dimension.

    With `zero_centered_gamma` the stored weight is gamma - 1 (initialized to 0), so weight decay
    pulls the scale towards 1 instead of 0. The output has the weight's dtype even when the input is
    float32 (`fp32_residual_connection`), so the layers after it run in the compute dtype.
    """

    def __init__(
        self,
        size: int,
        kind: Normalization,
        eps: float,
        *,
        zero_centered_gamma: bool = False,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.size, self.kind, self.eps = size, kind, eps
        self.zero_centered_gamma = zero_centered_gamma
        self.weight = nn.Parameter(torch.empty(size, dtype=dtype, device=device))
        self.bias = (
            nn.Parameter(torch.empty(size, dtype=dtype, device=device)) if kind == "LayerNorm" else None
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.weight.fill_(0.0 if self.zero_centered_gamma else 1.0)
            if self.bias is not None:
                self.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Locals typed as plain tensors: the arithmetic below turns the parameters into non-leaf tensors.
        w: torch.Tensor = self.weight
        b: torch.Tensor | None = self.bias
        if self.zero_centered_gamma:
            w = w + 1
        if x.dtype != w.dtype:  # float32 residual stream with half-precision weights
            w = w.to(x.dtype)
            b = b.to(x.dtype) if b is not None else None
        if self.kind == "RMSNorm":
            y = F.rms_norm(x, (self.size,), w, self.eps)
        else:
            y = F.layer_norm(x, (self.size,), w, b, self.eps)
        return y.to(self.weight.dtype)

    def extra_repr(self) -> str:
        return f"{self.kind}({self.size}, eps={self.eps}, zero_centered_gamma={self.zero_centered_gamma})"


def hidden_norm(
    cfg: TransformerConfig, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> Norm:
    """The norm over the hidden size a layer of `cfg` applies (its kind, epsilon, zero-centred gamma)."""
    return Norm(
        cfg.hidden_size,
        cfg.normalization,
        cfg.layernorm_epsilon,
        zero_centered_gamma=cfg.layernorm_zero_centered_gamma,
        device=device,
        dtype=dtype,
    )
