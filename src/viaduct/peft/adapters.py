"""The adapter modules LoRA and DoRA put on a linear layer (Megatron Bridge's names).

An adapted layer is a subclass of `nn.Linear` that holds the *same* `weight` / `bias` Parameters as
the layer it replaces, under the same names, plus an `adapter` child. So the base parameters keep
their names (`decoder.layers.0.self_attention.linear_qkv.weight`: a base checkpoint loads unchanged)
and the adapter's are `...linear_qkv.adapter.linear_in.weight` (A, [dim, in]),
`...linear_qkv.adapter.linear_out.weight` (B, [out, dim]) and, for DoRA,
`...linear_qkv.adapter.weight_magnitude` ([out]). Megatron Bridge instead wraps the base layer as
`to_wrap` and renames its parameters in `state_dict` only; keeping the layer in place gives the same
checkpoint names without that indirection.
"""

from __future__ import annotations

import math
from typing import Literal, cast

import torch
import torch.nn.functional as F
from torch import nn

InitMethod = Literal["xavier", "normal", "kaiming", "zero"]
DropoutPosition = Literal["pre", "post"]


def init_weight(weight: torch.Tensor, method: InitMethod, generator: torch.Generator | None = None) -> None:
    """Initialize an adapter matrix as Megatron Bridge does: xavier-normal, normal(0, std 0.2),
    kaiming-uniform with a = sqrt(5) (`nn.Linear`'s default), or zero.

    The values are drawn in float32 on the CPU from `generator` (torch's global one when None) and
    then copied in, so they are the same whatever the adapter's device and dtype (on the meta device
    nothing is copied)."""
    values = torch.empty(weight.shape, dtype=torch.float32)
    with torch.no_grad():
        if method == "xavier":
            nn.init.xavier_normal_(values, generator=generator)
        elif method == "normal":
            nn.init.normal_(values, mean=0.0, std=0.2, generator=generator)
        elif method == "kaiming":
            nn.init.kaiming_uniform_(values, a=math.sqrt(5), generator=generator)
        else:
            nn.init.zeros_(values)
        weight.copy_(values)


class LowRankAdapter(nn.Module):
    """The low-rank branch: (alpha / dim) * B(A(x)), with dropout before A (pre) or on the output (post).

    Runs in its own dtype (`lora_dtype`): the input is cast to it and the output back to the input's.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        dim: int,
        alpha: float,
        dropout: float,
        dropout_position: DropoutPosition,
        a_init: InitMethod,
        b_init: InitMethod,
        dtype: torch.dtype,
        device: torch.device | str,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        self.dim, self.alpha = dim, alpha
        self.scale = alpha / dim
        self.linear_in = nn.Linear(in_features, dim, bias=False, device=device, dtype=dtype)
        self.linear_out = nn.Linear(dim, out_features, bias=False, device=device, dtype=dtype)
        self.a_init, self.b_init = a_init, b_init
        self.reset_parameters(generator)
        self.dropout: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.dropout_position = dropout_position

    def reset_parameters(self, generator: torch.Generator | None) -> None:
        """Draw A and B afresh (per `lora_A_init_method` / `lora_B_init_method`) from `generator`."""
        init_weight(self.linear_in.weight, self.a_init, generator)
        init_weight(self.linear_out.weight, self.b_init, generator)

    def delta_weight(self) -> torch.Tensor:
        """The update (alpha / dim) B A as a [out, in] matrix, in float32."""
        return self.scale * (self.linear_out.weight.float() @ self.linear_in.weight.float())

    def low_rank(self, x: torch.Tensor) -> torch.Tensor:
        """(alpha / dim) B(A(x)) without dropout, in x's dtype."""
        w = self.linear_in.weight
        out = self.linear_out(self.linear_in(x.to(w.dtype))) * self.scale
        return out.to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dropout_position == "pre":
            return self.low_rank(self.dropout(x))
        return self.dropout(self.low_rank(x))


class DoRAAdapter(LowRankAdapter):
    """The low-rank branch plus DoRA's learned per-output-row magnitude `weight_magnitude`."""

    def __init__(self, in_features: int, out_features: int, **kw: object) -> None:
        super().__init__(in_features, out_features, **kw)  # type: ignore[arg-type]
        w = self.linear_in.weight
        self.weight_magnitude = nn.Parameter(torch.ones(out_features, device=w.device, dtype=w.dtype))


def _plain_linear(weight: nn.Parameter, bias: nn.Parameter | None) -> nn.Linear:
    """An `nn.Linear` around existing Parameters (nothing allocated or initialized)."""
    lin = nn.Linear.__new__(nn.Linear)
    nn.Module.__init__(lin)
    lin.in_features, lin.out_features = weight.shape[1], weight.shape[0]
    lin.register_parameter("weight", weight)
    lin.register_parameter("bias", bias)
    return lin


class AdaptedLinear(nn.Linear):
    """A linear layer with an adapter: the base layer's own weight and bias Parameters (same objects,
    same names) and an `adapter` child. Built with `wrap`; `unwrap` gives the plain layer back."""

    adapter: LowRankAdapter

    def __init__(self, base: nn.Linear, adapter: LowRankAdapter) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        # The same Parameter objects: the optimizer, a checkpoint or tied references see no change.
        self.register_parameter("weight", cast(nn.Parameter, base.weight))
        self.register_parameter("bias", cast("nn.Parameter | None", base.bias))
        self.adapter = adapter

    def merged_weight(self) -> torch.Tensor:
        """The base weight with the adapter folded in, in the base weight's dtype."""
        raise NotImplementedError

    def unwrap(self, merge: bool) -> nn.Linear:
        """The plain layer (same Parameter objects); with `merge` its weight first takes the adapter."""
        if merge:
            with torch.no_grad():
                self.weight.copy_(self.merged_weight())
        return _plain_linear(cast(nn.Parameter, self.weight), cast("nn.Parameter | None", self.bias))


class LoRALinear(AdaptedLinear):
    """y = W x + b + (alpha / dim) B(A(dropout(x)))."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias) + self.adapter(x)

    def merged_weight(self) -> torch.Tensor:
        return (self.weight.float() + self.adapter.delta_weight()).to(self.weight.dtype)


class DoRALinear(AdaptedLinear):
    """DoRA as Hugging Face PEFT computes it: with V = W + (alpha / dim) B A and n = ||V|| per output
    row (treated as a constant in backward), y = m / n * (W x + (alpha / dim) B A x) + b.

    With dropout before A (training), W x keeps the undropped input as in Hugging Face PEFT:
    y = W x + b + (m / n - 1) W x' + m / n (alpha / dim) B A x', x' = dropout(x). With dropout on the
    output ("post"), y = m / n * (W x + dropout((alpha / dim) B A x)) + b.
    """

    adapter: DoRAAdapter

    def __init__(self, base: nn.Linear, adapter: LowRankAdapter) -> None:
        super().__init__(base, adapter)
        self.reset_magnitude()

    def reset_magnitude(self) -> None:
        """m = the row norms of the adapted weight, so the layer equals W + s B A (DoRA's start).
        Called again when the base weights are loaded after the adapters were added."""
        with torch.no_grad():
            self.adapter.weight_magnitude.copy_(self.weight_norm())

    def weight_norm(self) -> torch.Tensor:
        """||W + (alpha / dim) B A|| per output row, in float32, detached (DoRA's constant norm)."""
        with torch.no_grad():
            return torch.linalg.vector_norm(self.weight.float() + self.adapter.delta_weight(), dim=1)

    def _mag_scale(self, dtype: torch.dtype) -> torch.Tensor:
        return (self.adapter.weight_magnitude.float() / self.weight_norm()).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = F.linear(x, self.weight)
        adapter = self.adapter
        dropout_active = self.training and not isinstance(adapter.dropout, nn.Identity)
        if adapter.dropout_position == "pre" and dropout_active:
            xd = adapter.dropout(x)
            scale = self._mag_scale(base.dtype)
            out = base + (scale - 1) * F.linear(xd, self.weight) + scale * adapter.low_rank(xd)
        else:
            low = adapter.low_rank(x)
            if adapter.dropout_position == "post":
                low = adapter.dropout(low)
            scale = self._mag_scale(base.dtype)
            out = scale * (base + low)
        return out if self.bias is None else out + self.bias

    def merged_weight(self) -> torch.Tensor:
        v = self.weight.float() + self.adapter.delta_weight()
        m = self.adapter.weight_magnitude.float()
        return (m[:, None] * v / torch.linalg.vector_norm(v, dim=1, keepdim=True)).to(self.weight.dtype)
