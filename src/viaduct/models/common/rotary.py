"""Rotary position embeddings (RoFormer), with rotary percent, interleaving and Llama-3.1 scaling."""

from __future__ import annotations

import math

import torch
from torch import nn

# Llama 3.1's frequency scaling constants (Megatron hard-codes the same values).
LLAMA3_LOW_FREQ_FACTOR = 1.0
LLAMA3_HIGH_FREQ_FACTOR = 4.0
LLAMA3_ORIGINAL_CONTEXT = 8192


def inverse_frequencies(rot_dim: int, base: float) -> torch.Tensor:
    """theta_i = base^(-2i / rot_dim) for i < rot_dim / 2, in float32."""
    return 1.0 / (base ** (torch.arange(0, rot_dim, 2, dtype=torch.float64) / rot_dim)).float()


def llama3_scale_frequencies(inv_freq: torch.Tensor, factor: float) -> torch.Tensor:
    """Llama 3.1 scaling: long wavelengths divided by `factor`, short ones kept, a smooth ramp between."""
    low_wavelen = LLAMA3_ORIGINAL_CONTEXT / LLAMA3_LOW_FREQ_FACTOR
    high_wavelen = LLAMA3_ORIGINAL_CONTEXT / LLAMA3_HIGH_FREQ_FACTOR
    wavelen = 2 * math.pi / inv_freq
    smooth = (LLAMA3_ORIGINAL_CONTEXT / wavelen - LLAMA3_LOW_FREQ_FACTOR) / (
        LLAMA3_HIGH_FREQ_FACTOR - LLAMA3_LOW_FREQ_FACTOR
    )
    ramp = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    out = torch.where(wavelen > low_wavelen, inv_freq / factor, ramp)
    return torch.where(wavelen < high_wavelen, inv_freq, out)


class RotaryEmbedding(nn.Module):
    """Holds the cos/sin tables for positions [0, max_positions) and hands out the rows asked for.

    The tables are float32 buffers (not saved in checkpoints: they are recomputed from the config).
    """

    # Declared here because `register_buffer` sets them dynamically (nn.Module's __getattr__ would
    # otherwise type them as `Tensor | Module`).
    cos: torch.Tensor
    sin: torch.Tensor

    def __init__(
        self,
        head_dim: int,
        max_positions: int,
        *,
        base: float = 10000.0,
        percent: float = 1.0,
        interleaved: bool = False,
        llama3_scaling_factor: float | None = None,
        interpolation_factor: float | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        rot_dim = int(head_dim * percent)
        self.rot_dim = rot_dim - rot_dim % 2
        self.head_dim, self.max_positions = head_dim, max_positions
        self.base, self.interleaved = base, interleaved
        self.llama3_scaling_factor = llama3_scaling_factor
        self.interpolation_factor = interpolation_factor
        shape = (max_positions, self.rot_dim)
        self.register_buffer("cos", torch.empty(shape, device=device), persistent=False)
        self.register_buffer("sin", torch.empty(shape, device=device), persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.cos.is_meta:
            return
        dev = self.cos.device
        inv_freq = inverse_frequencies(self.rot_dim, self.base)
        if self.llama3_scaling_factor is not None:
            inv_freq = llama3_scale_frequencies(inv_freq, self.llama3_scaling_factor)
        pos = torch.arange(self.max_positions, dtype=torch.float32)
        if self.interpolation_factor is not None:
            pos = pos / self.interpolation_factor
        angles = torch.outer(pos, inv_freq)  # [positions, rot_dim / 2]
        if self.interleaved:
            angles = angles.repeat_interleave(2, dim=-1)
        else:
            angles = torch.cat((angles, angles), dim=-1)
        self.cos.copy_(angles.cos().to(dev))
        self.sin.copy_(angles.sin().to(dev))

    def forward(
        self, seq_len: int, position_ids: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin shaped to broadcast over [batch, seq, heads, head_dim]."""
        if position_ids is None:
            return self.cos[:seq_len, None, :], self.sin[:seq_len, None, :]  # [seq, 1, rot]
        return self.cos[position_ids, None, :], self.sin[position_ids, None, :]  # [batch, seq, 1, rot]

    def extra_repr(self) -> str:
        return (
            f"rot_dim={self.rot_dim}, head_dim={self.head_dim}, base={self.base}, "
            f"interleaved={self.interleaved}, llama3_scaling_factor={self.llama3_scaling_factor}"
        )


def _rotate(x: torch.Tensor, interleaved: bool) -> torch.Tensor:
    if interleaved:  # pairs (0, 1), (2, 3), ... -> (-x1, x0), (-x3, x2), ...
        x = x.unflatten(-1, (-1, 2))
        return torch.stack((-x[..., 1], x[..., 0]), dim=-1).flatten(-2)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, interleaved: bool = False
) -> torch.Tensor:
    """Rotate the first cos.shape[-1] channels of x [batch, seq, heads, head_dim]; math in float32."""
    rot_dim = cos.shape[-1]
    x_rot, x_pass = x[..., :rot_dim], x[..., rot_dim:]
    xf = x_rot.float()
    out = (xf * cos + _rotate(xf, interleaved) * sin).to(x.dtype)
    if x_pass.shape[-1] == 0:
        return out
    return torch.cat((out, x_pass), dim=-1)
