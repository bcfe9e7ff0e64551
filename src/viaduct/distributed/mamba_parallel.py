"""Tensor (and sequence) parallelism for Mamba-2 layers: the mixer split by whole B/C groups.

A Mamba mixer's groups are independent until out_proj: each group has its own heads (z, x, dt), its
own B and C, its own channels of the depthwise convolution and of the gated norm. So each
tensor-parallel rank keeps `num_groups / tp` whole groups: the rows of in_proj, the channels of
conv1d, dt_bias / A_log / D and the norm weight of its groups (the mixer keeps in_proj's and conv1d's
rows by group, so these are contiguous row blocks: `Shard(0)`), and the matching input columns of
out_proj (`Shard(1)`). The mixer reads replicated hidden states (gathered first under sequence
parallelism) and its out_proj gives partial sums, reduced over the ranks (reduce-scattered along the
sequence under sequence parallelism) before out_proj's bias, which is kept whole, is added once.

The layer's norm runs on sequence shards under sequence parallelism, as a transformer layer's do.
The mixer's model code is untouched: it runs `Mamba2Mixer.mix` on this rank's local parameter
tensors (the DTensors' local shards, through which gradients flow back to them).
"""

from __future__ import annotations

import operator
import types

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Placement, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import ParallelStyle, SequenceParallel, parallelize_module

from viaduct.distributed.mamba_context import MambaContextParallel
from viaduct.models.mamba.mixer import Mamba2Mixer

# How each mixer parameter is split: rows of the ranks' groups, out_proj by input columns; what is
# not listed (out_proj's bias) stays whole.
_MIXER_PLACEMENTS: dict[str, Placement] = {
    "in_proj.weight": Shard(0),
    "in_proj.bias": Shard(0),
    "conv1d.weight": Shard(0),
    "conv1d.bias": Shard(0),
    "dt_bias": Shard(0),
    "A_log": Shard(0),
    "D": Shard(0),
    "norm.weight": Shard(0),
    "out_proj.weight": Shard(1),
}


class MambaMixerParallel(ParallelStyle):
    """Split a `Mamba2Mixer` over the tensor-parallel mesh by whole groups (see the module docstring).

    `sequence_parallel`: the mixer's input arrives split along the sequence (dim 1) and its output
    leaves split the same way; otherwise both are replicated.
    """

    def __init__(self, *, sequence_parallel: bool) -> None:
        super().__init__()
        self.sequence_parallel = sequence_parallel

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        if not isinstance(module, Mamba2Mixer):
            raise TypeError(f"MambaMixerParallel splits a Mamba2Mixer, not a {type(module).__name__}")
        tp = device_mesh.size()
        if module.num_groups % tp:
            # The provider's validation refuses this first; a direct call gets the same rule.
            raise ValueError(
                f"a Mamba mixer with {module.num_groups} B/C groups cannot be split over {tp} "
                "tensor-parallel ranks: the groups must divide evenly"
            )
        names = [name for name, _ in module.named_parameters()]
        for name, param in list(module.named_parameters()):
            placement = _MIXER_PLACEMENTS.get(name, Replicate())
            owner_name, _, leaf = name.rpartition(".")
            owner = module.get_submodule(owner_name) if owner_name else module
            dist = distribute_tensor(param.detach(), device_mesh, [placement])
            owner.register_parameter(leaf, nn.Parameter(dist, requires_grad=param.requires_grad))
        seq: Placement = Shard(1) if self.sequence_parallel else Replicate()

        def forward(mixer: Mamba2Mixer, hidden: torch.Tensor) -> torch.Tensor:
            # Replicated input; backward sums the ranks' partial input gradients (or reduce-scatters
            # them back onto the sequence shards).
            full = DTensor.from_local(hidden, device_mesh, [seq], run_check=False)
            local_in = full.redistribute(device_mesh, [Replicate()]).to_local(grad_placements=[Partial()])
            params = {n: _local(operator.attrgetter(n)(mixer)) for n in names}
            bias = params.pop("out_proj.bias", None)
            if isinstance(mixer.runner, MambaContextParallel):
                # Context parallelism too: this rank's groups, split again over its context ranks.
                partial = mixer.runner.run(mixer, local_in, params)
            else:
                partial = mixer.mix(local_in, params)
            reduced = DTensor.from_local(partial, device_mesh, [Partial()], run_check=False)
            out = reduced.redistribute(device_mesh, [seq]).to_local()
            return out if bias is None else out + bias.to(out.dtype)

        module.forward = types.MethodType(forward, module)  # type: ignore[method-assign]
        return module


def _local(param: torch.Tensor) -> torch.Tensor:
    return param.to_local() if isinstance(param, DTensor) else param


def mamba_layer_plan(sequence_parallel: bool) -> dict[str, ParallelStyle]:
    """The plan of one `MambaLayer`: its mixer split by groups; under sequence parallelism its norm
    runs on the sequence shards."""
    plan: dict[str, ParallelStyle] = {"mixer": MambaMixerParallel(sequence_parallel=sequence_parallel)}
    if sequence_parallel:
        plan["norm"] = SequenceParallel(use_local_output=True)
    return plan


def apply_mamba_layer_parallel(layer: nn.Module, tp_mesh: DeviceMesh, *, sequence_parallel: bool) -> None:
    """Split one `MambaLayer` over `tp_mesh` (see `mamba_layer_plan`)."""
    parallelize_module(layer, tp_mesh, mamba_layer_plan(sequence_parallel))
