"""Activation functions that torch does not ship under these names (named in configs by short name)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def squared_relu(x: torch.Tensor) -> torch.Tensor:
    """relu(x)² (Primer; "relu2" in Megatron)."""
    return torch.square(F.relu(x))


def fast_gelu(x: torch.Tensor) -> torch.Tensor:
    """GELU with the tanh approximation (GPT-2's "gelu_new", Hugging Face's "gelu_pytorch_tanh")."""
    return F.gelu(x, approximate="tanh")


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """x · sigmoid(1.702 x), the sigmoid approximation of GELU used by CLIP."""
    return x * torch.sigmoid(1.702 * x)
