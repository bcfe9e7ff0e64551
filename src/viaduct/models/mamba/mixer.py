"""The Mamba-2 mixer: in_proj -> causal depthwise conv -> SSD scan -> gated RMSNorm -> out_proj.

Parameter names follow Megatron's `MambaMixer` and Hugging Face's `Mamba2Mixer`, so their checkpoints
map onto this module name for name:

- `in_proj` (hidden -> z, x, B, C, dt): the gate z and x have d_inner channels, B and C
  ngroups * d_state each, dt one per head. The rows are kept *by group* ([z_g | x_g | B_g | C_g |
  dt_g] for each B/C group g, the heads of a group being consecutive), so that a tensor-parallel
  split by rows gives each rank whole groups; with one group (every published Mamba-2 size) this is
  Hugging Face's [z | x | B | C | dt], with several the conversion reorders the rows;
- `conv1d`: depthwise over the x, B and C channels, weight [conv_dim, 1, kernel], channels by group
  ([x_g | B_g | C_g]) likewise;
- `dt_bias`, `A_log`, `D`: one value per head (A = -exp(A_log));
- `norm.weight` [d_inner]: RMSNorm of y * silu(z) over groups of d_inner / ngroups channels;
- `out_proj` (d_inner -> hidden).

Megatron fuses the block's pre-norm into its `in_proj` (`in_proj.layer_norm_weight`); here that norm
belongs to the block around the mixer, as in Hugging Face's `Mamba2Block`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from viaduct.models.mamba.kernel_shapes import conv_fits, norm_fits
from viaduct.models.mamba.ssd import ssd_chunked, ssd_recurrence, uses_kernels


@dataclass
class MambaCache:
    """What one Mamba layer carries from token to token in generation (its counterpart of a layer's
    keys and values): the state of the scan and the last inputs of the causal convolution.

    The tensors are updated in place by each `Mamba2Mixer.mix` call given the cache, so a compiled
    decode step keeps one graph. Zeros are the state before the first token.
    """

    conv: torch.Tensor
    """The convolution's last conv_kernel - 1 inputs [batch, conv_kernel - 1, conv_dim] (before it)."""
    ssm: torch.Tensor
    """The scan's state [batch, heads, head_dim, state_dim], float32."""
    valid: torch.Tensor
    """[batch, slots] bool, False on each row's left-padding slots (the generation cache's, shared):
    padding tokens are kept out of the state, so a row computes what it would alone."""

    @property
    def nbytes(self) -> int:
        """Memory the cache's own tensors take (`valid` belongs to the generation cache)."""
        return self.conv.nbytes + self.ssm.nbytes


class GatedRMSNorm(nn.Module):
    """RMSNorm of y * silu(z), normalised over groups of `group_size` channels (one group per B/C group,
    so a tensor-parallel shard of whole groups normalises alone), gate applied before the norm (Mamba-2's
    `norm_before_gate=False`). Computed in float32; the result has the dtype of y.
    """

    def __init__(
        self,
        size: int,
        group_size: int,
        eps: float = 1e-5,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if group_size < 1 or size % group_size:
            raise ValueError(f"GatedRMSNorm: size {size} is not a multiple of group_size {group_size}")
        self.size, self.group_size, self.eps = size, group_size, eps
        self.weight = nn.Parameter(torch.empty(size, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.weight.fill_(1.0)

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return gated_rms_norm(y, z, self.weight, self.group_size, self.eps)

    def extra_repr(self) -> str:
        return f"{self.size}, group_size={self.group_size}, eps={self.eps}"


def gated_rms_norm(
    y: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, group_size: int, eps: float
) -> torch.Tensor:
    """`GatedRMSNorm` as a function of its weight (which may cover a tensor-parallel shard of whole
    groups)."""
    out_dtype = y.dtype
    compute = torch.promote_types(y.dtype, torch.float32)
    h = y.to(compute) * F.silu(z.to(compute))
    h = h.unflatten(-1, (-1, group_size))
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return (h.flatten(-2) * weight.to(compute)).to(out_dtype)


class Mamba2Mixer(nn.Module):
    """The Mamba-2 token mixer (a layer's replacement for self-attention): [b, s, hidden] -> [b, s, hidden].

    Sizes: d_inner = expand * hidden_size and num_heads = d_inner // head_dim, unless num_heads is
    given, which sets d_inner = num_heads * head_dim (Megatron's `mamba_num_heads`). num_heads must be a
    multiple of num_groups.

    The scan runs in float32 whatever the parameters' dtype (its decays are exponentials of sums);
    the projections and the convolution run in the parameters' dtype.
    """

    def __init__(
        self,
        hidden_size: int,
        *,
        state_dim: int = 128,
        head_dim: int = 64,
        num_heads: int | None = None,
        num_groups: int = 8,
        expand: int = 2,
        chunk_size: int = 128,
        conv_kernel: int = 4,
        conv_bias: bool = True,
        bias: bool = False,
        norm_eps: float = 1e-5,
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        dt_limit: tuple[float, float] = (0.0, math.inf),
        A_init_range: tuple[float, float] = (1.0, 16.0),
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        d_inner = expand * hidden_size if num_heads is None else num_heads * head_dim
        problems = []
        if min(hidden_size, state_dim, head_dim, num_groups, expand, chunk_size, conv_kernel) < 1:
            problems.append(
                "hidden_size, state_dim, head_dim, num_groups, expand, chunk_size and conv_kernel must be "
                f"positive (got {hidden_size}, {state_dim}, {head_dim}, {num_groups}, {expand}, "
                f"{chunk_size}, {conv_kernel})"
            )
        elif num_heads is None and d_inner % head_dim:
            problems.append(
                f"d_inner = expand x hidden_size = {d_inner} is not a multiple of head_dim {head_dim}: "
                "change head_dim or set num_heads"
            )
        else:
            heads = num_heads if num_heads is not None else d_inner // head_dim
            if heads < 1 or heads % num_groups:
                problems.append(f"num_heads {heads} must be a positive multiple of num_groups {num_groups}")
        if not 0 < dt_min <= dt_max:
            problems.append(f"need 0 < dt_min <= dt_max (got dt_min {dt_min}, dt_max {dt_max})")
        if not 0 < A_init_range[0] <= A_init_range[1]:
            problems.append(f"A_init_range {A_init_range} must be (low, high) with 0 < low <= high")
        if problems:
            raise ValueError("Mamba2Mixer: " + "; ".join(problems))

        self.hidden_size = hidden_size
        self.d_inner = d_inner
        self.head_dim = head_dim
        self.num_heads = d_inner // head_dim
        self.num_groups = num_groups
        self.state_dim = state_dim
        self.chunk_size = chunk_size
        self.conv_kernel = conv_kernel
        self.dt_min, self.dt_max, self.dt_init_floor = dt_min, dt_max, dt_init_floor
        self.dt_limit = dt_limit
        self.A_init_range = A_init_range
        self.conv_dim = d_inner + 2 * num_groups * state_dim
        self.recompute_scan = True
        """Keep only the scan's inputs for backward and run it again there (its intermediates are many
        times its inputs); False keeps what autograd saves instead (more memory, less time). The fused
        Triton scan always keeps only its inputs."""
        self.runner: Callable[[Mamba2Mixer, torch.Tensor], torch.Tensor] | None = None
        """Set from outside to run the mixer another way (context parallelism,
        `viaduct.distributed.mamba_context`), given the mixer and its input; None: `mix` here."""

        self.in_proj = nn.Linear(
            hidden_size, d_inner + self.conv_dim + self.num_heads, bias=bias, device=device, dtype=dtype
        )
        # No padding inside the module: forward pads on the left only, so position t sees t-k+1 .. t.
        self.conv1d = nn.Conv1d(
            self.conv_dim,
            self.conv_dim,
            conv_kernel,
            groups=self.conv_dim,
            bias=conv_bias,
            device=device,
            dtype=dtype,
        )
        self.dt_bias = nn.Parameter(torch.empty(self.num_heads, device=device, dtype=dtype))
        self.A_log = nn.Parameter(torch.empty(self.num_heads, device=device, dtype=dtype))
        self.D = nn.Parameter(torch.empty(self.num_heads, device=device, dtype=dtype))
        self.norm = GatedRMSNorm(d_inner, d_inner // num_groups, norm_eps, device=device, dtype=dtype)
        self.out_proj = nn.Linear(d_inner, hidden_size, bias=bias, device=device, dtype=dtype)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(
        self,
        generator: torch.Generator | None = None,
        *,
        init_std: float = 0.02,
        output_std: float | None = None,
    ) -> None:
        """Initialise as Mamba-2 does, drawing from `generator` (torch's global generator when None).

        in_proj ~ N(0, init_std) and out_proj ~ N(0, output_std or init_std) (a model passes its
        init_method_std and the depth-scaled std of projections into the residual stream), linear biases
        0; the convolution's weight and bias ~ U(-1/sqrt(k), 1/sqrt(k)), PyTorch's default for it;
        dt_bias = softplus^-1(dt) for dt log-uniform in [dt_min, dt_max] (floored at dt_init_floor);
        A_log = log(U(A_init_range)); D = 1; the norm's scale 1.
        """
        # A meta-device build has no values to draw; a generator would only clash with its device.
        gen = None if self.dt_bias.is_meta else generator
        nn.init.normal_(self.in_proj.weight, 0.0, init_std, generator=gen)
        nn.init.normal_(
            self.out_proj.weight, 0.0, init_std if output_std is None else output_std, generator=gen
        )
        for lin in (self.in_proj, self.out_proj):
            if lin.bias is not None:
                lin.bias.zero_()
        bound = 1.0 / math.sqrt(self.conv_kernel)  # fan_in of a depthwise kernel is its width
        nn.init.uniform_(self.conv1d.weight, -bound, bound, generator=gen)
        if self.conv1d.bias is not None:
            nn.init.uniform_(self.conv1d.bias, -bound, bound, generator=gen)

        # Drawn in float32 like the parameter (the same shards, if it is split), then stored in its
        # dtype; only elementwise steps, so a sharded parameter initializes shard by shard.
        u = torch.empty_like(self.dt_bias, dtype=torch.float32).uniform_(0.0, 1.0, generator=gen)
        log_lo, log_hi = math.log(self.dt_min), math.log(self.dt_max)
        dt = torch.exp(u * (log_hi - log_lo) + log_lo).clamp(min=self.dt_init_floor)
        # softplus^-1(dt) = log(exp(dt) - 1) = dt + log(1 - exp(-dt)), the latter exact for small dt.
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        a = torch.empty_like(self.A_log, dtype=torch.float32).uniform_(*self.A_init_range, generator=gen)
        self.A_log.copy_(torch.log(a))
        self.D.fill_(1.0)
        self.norm.reset_parameters()

    def forward(
        self,
        hidden: torch.Tensor,
        cache: MambaCache | None = None,
        cache_position: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Mix along the sequence: hidden [batch, seq, hidden_size] -> [batch, seq, hidden_size].

        With `cache` (generation): the tokens continue the sequence the cache holds (see `mix`)."""
        if self.runner is not None and cache is None:
            return self.runner(self, hidden)
        # The projections run as modules, so a PEFT adapter put on one (an `nn.Linear` subclass) acts.
        params = dict(self.named_parameters())
        return self.mix(hidden, params, cache, cache_position, in_proj=self.in_proj, out_proj=self.out_proj)

    def new_cache(
        self, batch_size: int, valid: torch.Tensor, *, dtype: torch.dtype, device: torch.device
    ) -> MambaCache:
        """An empty generation cache for `batch_size` rows (`valid`: see `MambaCache.valid`); the
        convolution's inputs in `dtype`, the scan's state in float32."""
        return MambaCache(
            conv=torch.zeros(batch_size, self.conv_kernel - 1, self.conv_dim, dtype=dtype, device=device),
            ssm=torch.zeros(
                batch_size, self.num_heads, self.head_dim, self.state_dim, dtype=torch.float32, device=device
            ),
            valid=valid,
        )

    def mix(
        self,
        hidden: torch.Tensor,
        params: Mapping[str, torch.Tensor],
        cache: MambaCache | None = None,
        cache_position: torch.Tensor | None = None,
        *,
        in_proj: Callable[[torch.Tensor], torch.Tensor] | None = None,
        out_proj: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """The forward pass with the given parameter tensors (keyed as `named_parameters()`; a missing
        bias is no bias). They may be a slice of whole B/C groups of this mixer's (tensor parallelism
        gives each rank some groups): the group count is read from them, so the output is then that
        slice's share of out_proj's output, a partial sum. `in_proj` / `out_proj`: callables to run the
        projections with instead of their tensors in `params` (the mixer's own modules, which may carry
        PEFT adapters; or, under context parallelism, ones that trade the sequence for groups).

        With `cache` (generation, whole parameters): the tokens, at the generation slots
        `cache_position` [seq], continue from the cache's state and convolution inputs, which are
        updated in place; tokens on padding slots leave both as they were (a zero time step, a zero
        convolution input), as if the row started at its first real token."""
        heads_per_group = self.num_heads // self.num_groups
        p, n = self.head_dim, self.state_dim
        d_group = heads_per_group * p  # channels of x (and z) per group
        groups = params["A_log"].shape[0] // heads_per_group
        heads, d_inner = groups * heads_per_group, groups * d_group

        if in_proj is not None:
            proj = in_proj(hidden)
        else:
            proj = F.linear(hidden, params["in_proj.weight"], params.get("in_proj.bias"))
        bsz, seq = proj.shape[:2]  # in_proj may hand over another stretch of the sequence (context parallel)
        z, xbc, dt = proj.unflatten(-1, (groups, -1)).split([d_group, d_group + 2 * n, heads_per_group], -1)
        conv_w, conv_b = params["conv1d.weight"], params.get("conv1d.bias")
        xbc = xbc.flatten(-2)
        valid = None
        # Training and prefill without a cache run the convolution, scan and norm as fused Triton
        # kernels where the scan's kernels run (CUDA); the PyTorch forms are the reference elsewhere.
        fused = cache is None and uses_kernels(xbc, self.chunk_size, n, head_dim=p)
        if cache is not None:
            if cache_position is None:
                raise ValueError("a Mamba layer with a generation cache needs cache_position")
            valid = cache.valid[:, cache_position]  # [batch, seq]
            xbc = xbc * valid[..., None].to(xbc.dtype)
            conv_in = torch.cat([cache.conv.to(xbc.dtype), xbc], dim=1)
            act = F.silu(_causal_depthwise_conv(conv_in, conv_w, conv_b)[:, -seq:])
            if self.conv_kernel > 1:
                cache.conv.copy_(conv_in[:, conv_in.shape[1] - (self.conv_kernel - 1) :])
        elif fused and conv_fits(self.conv_kernel):
            from viaduct.models.mamba.conv_triton import conv_silu

            act = conv_silu(xbc, conv_w, conv_b)
        else:
            act = F.silu(_causal_depthwise_conv(xbc, conv_w, conv_b))
        x, B, C = act.unflatten(-1, (groups, -1)).split([d_group, n, n], dim=-1)

        compute = torch.promote_types(hidden.dtype, torch.float32)
        dt = F.softplus(dt.reshape(bsz, seq, heads).to(compute) + params["dt_bias"].to(compute))
        if self.dt_limit != (0.0, math.inf):
            dt = dt.clamp(self.dt_limit[0], self.dt_limit[1])
        A = -torch.exp(params["A_log"].to(compute))
        x = x.reshape(bsz, seq, heads, p)
        if cache is not None:
            assert valid is not None
            dt = dt * valid[..., None]  # a zero step neither decays the state nor adds to it
            if seq == 1:  # a decode step: one step of the recurrence, no chunk padding
                y, state = ssd_recurrence(x, dt, A, B, C, initial_state=cache.ssm)
            else:
                y, state = ssd_chunked(x, dt, A, B, C, self.chunk_size, initial_state=cache.ssm)
            cache.ssm.copy_(state)
        elif torch.is_grad_enabled() and self.recompute_scan and not fused:
            # The PyTorch scan's float32 intermediates (a [chunk, chunk] decay matrix per head and
            # chunk, the states) are many times its inputs: keeping them for backward runs a 780M
            # model at sequence 4096 out of memory, so backward recomputes them from x, dt, B, C.
            # (The fused kernels keep only their inputs already.)
            y = checkpoint(_scan, x, dt, A, B, C, self.chunk_size, use_reentrant=False)
        else:
            # On the kernel path y comes in x's dtype: the norm reads it, and its gradient, in half
            # the bytes (the kernels accumulate in float32 and the norm computes in float32).
            y = _scan(x, dt, A, B, C, self.chunk_size, x.dtype if fused else None)
        out_w = params["out_proj.weight"]
        if fused and norm_fits(d_inner, self.norm.group_size, x.dtype):
            from viaduct.models.mamba.norm_triton import gated_norm_skip

            y = gated_norm_skip(
                y,
                x,
                params["D"],
                z.reshape(bsz, seq, d_inner),
                params["norm.weight"],
                self.norm.group_size,
                self.norm.eps,
                out_w.dtype,
            )
        else:
            y = y + x.to(compute) * params["D"].to(compute)[:, None]  # the skip connection, per head
            y = gated_rms_norm(
                y.reshape(bsz, seq, d_inner),
                z.reshape(bsz, seq, d_inner),
                params["norm.weight"],
                self.norm.group_size,
                self.norm.eps,
            )
        if out_proj is not None:
            return out_proj(y.to(out_w.dtype))
        return F.linear(y.to(out_w.dtype), out_w, params.get("out_proj.bias"))

    def extra_repr(self) -> str:
        return (
            f"hidden_size={self.hidden_size}, d_inner={self.d_inner}, num_heads={self.num_heads}, "
            f"head_dim={self.head_dim}, num_groups={self.num_groups}, state_dim={self.state_dim}, "
            f"chunk_size={self.chunk_size}, conv_kernel={self.conv_kernel}"
        )


def _causal_depthwise_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`nn.Conv1d`'s depthwise convolution of x [batch, seq, channels] over time, padded on the left
    only (position t sees t-k+1 .. t), with its weight [channels, 1, k]: a sum of k shifted copies,
    which torch.compile fuses into one elementwise pass in the channels-last layout the projections
    produce (cuDNN's depthwise kernel needs a transposed copy and is slower in backward)."""
    k, seq = weight.shape[-1], x.shape[1]
    w = weight[:, 0, :].to(x.dtype)
    out = x * w[:, k - 1]
    for shift in range(1, k):
        out = out + F.pad(x, (0, 0, shift, 0))[:, :seq] * w[:, k - 1 - shift]
    return out if bias is None else out + bias.to(x.dtype)


def _scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """`ssd_chunked`'s output alone (what the mixer keeps, and recomputes in backward)."""
    return ssd_chunked(x, dt, A, B, C, chunk_size, out_dtype=out_dtype)[0]
