"""Mamba-2 layers in plain PyTorch: the SSD chunked scan (`ssd_chunked`, with the step-by-step
`ssd_recurrence` as its reference) and the `Mamba2Mixer` token mixer with Megatron / Hugging Face
parameter names. Like the other model code, nothing here knows of `torch.distributed`."""

from viaduct.models.mamba.mixer import GatedRMSNorm, Mamba2Mixer
from viaduct.models.mamba.ssd import segsum, ssd_chunked, ssd_recurrence

__all__ = ["GatedRMSNorm", "Mamba2Mixer", "segsum", "ssd_chunked", "ssd_recurrence"]
