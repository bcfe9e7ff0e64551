"""Test kit for the Triton kernels: the devices a kernel test runs on, and a relative error.

A kernel test parametrised over `TRITON_DEVICES` runs on CUDA (marked `gpu`) where Triton and a GPU
are present, and on the CPU under Triton's interpreter where Triton is importable and
TRITON_INTERPRET=1 is set; elsewhere it is skipped. Imports pytest: for tests only.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

HAS_TRITON = importlib.util.find_spec("triton") is not None
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

TRITON_DEVICES = [
    pytest.param(
        "cpu",
        marks=pytest.mark.skipif(
            not (HAS_TRITON and INTERPRET), reason="needs Triton and TRITON_INTERPRET=1 on the CPU"
        ),
    ),
    pytest.param(
        "cuda",
        marks=[
            pytest.mark.gpu,
            pytest.mark.skipif(
                not (HAS_TRITON and torch.cuda.is_available()), reason="needs Triton and CUDA"
            ),
        ],
    ),
]
"""`pytest.mark.parametrize("device", TRITON_DEVICES)`: the devices that can run the kernels."""


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """|a - b| / |b| (Frobenius norms, in float64) of `a` against the reference `b`."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))
