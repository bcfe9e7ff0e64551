"""Mamba-2 and hybrid models in plain PyTorch: the configuration (`HybridModelProvider`, its v0.2.0
name `MambaModelProvider`, and Megatron Bridge's named sizes), the model (`MambaModel`, in
`viaduct.models.mamba.model`), the SSD chunked scan (`ssd_chunked`, with the step-by-step
`ssd_recurrence` as its reference) and the `Mamba2Mixer` token mixer with Megatron / Hugging Face
parameter names. Like the other model code, nothing here knows of `torch.distributed`.

The providers import without torch (a configuration loads without it); the modules are loaded on
first use of their names.
"""

from typing import Any

from viaduct.models.mamba.provider import (
    HybridModelProvider,
    MambaModelProvider,
    MambaModelProvider1P3B,
    MambaModelProvider2P7B,
    MambaModelProvider130M,
    MambaModelProvider370M,
    MambaModelProvider780M,
    NVIDIAMambaHybridModelProvider8B,
    NVIDIAMambaModelProvider8B,
)

_LAZY = {
    "GatedRMSNorm": "viaduct.models.mamba.mixer",
    "Mamba2Mixer": "viaduct.models.mamba.mixer",
    "MambaModel": "viaduct.models.mamba.model",
    "segsum": "viaduct.models.mamba.ssd",
    "ssd_chunked": "viaduct.models.mamba.ssd",
    "ssd_recurrence": "viaduct.models.mamba.ssd",
}


def __getattr__(name: str) -> Any:
    # The torch modules load on first use, so importing the providers does not import torch.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "GatedRMSNorm",
    "HybridModelProvider",
    "Mamba2Mixer",
    "MambaModel",
    "MambaModelProvider",
    "MambaModelProvider1P3B",
    "MambaModelProvider2P7B",
    "MambaModelProvider130M",
    "MambaModelProvider370M",
    "MambaModelProvider780M",
    "NVIDIAMambaHybridModelProvider8B",
    "NVIDIAMambaModelProvider8B",
    "segsum",
    "ssd_chunked",
    "ssd_recurrence",
]
