"""The feed-forward block: fc1 -> activation (optionally gated) -> fc2."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from viaduct.config.types import as_function

if TYPE_CHECKING:
    from viaduct.models.transformer_config import TransformerConfig


class MLP(nn.Module):
    """Megatron's MLP. With a gated linear unit, fc1 produces the gate and up projections in one GEMM
    and the output is act(gate) * up (SwiGLU when the activation is silu).

    The gated fc1's rows are interleaved: row 2i is gate unit i, row 2i+1 is up unit i. Any contiguous
    even-sized share of the rows (a tensor-parallel shard, of any size) then holds matching pairs.
    """

    def __init__(
        self,
        cfg: TransformerConfig,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        assert cfg.ffn_hidden_size is not None, "finalize() the config first"
        ffn = cfg.ffn_hidden_size
        self.gated = cfg.gated_linear_unit
        self.linear_fc1 = nn.Linear(
            cfg.hidden_size,
            2 * ffn if self.gated else ffn,
            bias=cfg.add_bias_linear,
            device=device,
            dtype=dtype,
        )
        self.linear_fc2 = nn.Linear(
            ffn, cfg.hidden_size, bias=cfg.add_bias_linear, device=device, dtype=dtype
        )
        self.activation = as_function(cfg.activation_func)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.linear_fc1(x)
        if self.gated:
            # [..., unit, (gate, up)] -> [(gate, up), ..., unit]: one copy that de-interleaves, so the
            # activation and product run on contiguous memory (elementwise kernels on stride-2 views
            # are not vectorised on the CPU: twice the time of copy + contiguous ops).
            gate, up = h.unflatten(-1, (-1, 2)).movedim(-1, 0).contiguous()
            h = self.activation(gate) * up
        else:
            h = self.activation(h)
        return self.linear_fc2(h)
