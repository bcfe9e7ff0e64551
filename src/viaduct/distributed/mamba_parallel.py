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
tensors (the DTensors' local shards, through which gradients flow back to them), its two projections
as the modules on DTensors, as PyTorch's column- and row-parallel styles run a linear layer, so a
PEFT adapter on them, split with its layer (in_proj's B and DoRA magnitude by rows, out_proj's A by
columns), acts as well. Under context parallelism too, the rank's groups are traded over its context
ranks between the projections (`viaduct.distributed.mamba_context`).
"""

from __future__ import annotations

import operator
import types

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Placement, Replicate, Shard, distribute_tensor
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
    # A PEFT adapter splits with its layer's base: in_proj's B and DoRA magnitude by rows, out_proj's
    # A by input columns (the rest, A of in_proj and B of out_proj, replicated).
    "in_proj.adapter.linear_out.weight": Shard(0),
    "in_proj.adapter.weight_magnitude": Shard(0),
    "out_proj.adapter.linear_in.weight": Shard(1),
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
            replicated = full.redistribute(device_mesh, [Replicate()])
            params = {n: _local(operator.attrgetter(n)(mixer)) for n in names}

            # The projections run as the modules, on DTensors (as PyTorch's column- and row-parallel
            # styles run a linear layer), so a PEFT adapter split alike acts on them too.
            def project_in(x: torch.Tensor) -> torch.Tensor:
                return mixer.in_proj(x).to_local()  # this rank's groups' rows

            def project_out(y: torch.Tensor) -> torch.Tensor:
                split = DTensor.from_local(y, device_mesh, [Shard(y.ndim - 1)], run_check=False)
                # Partial sums over the ranks' groups, reduced (or reduce-scattered), the bias once.
                return mixer.out_proj(split).redistribute(device_mesh, [seq]).to_local()

            if isinstance(mixer.runner, MambaContextParallel):
                # Context parallelism too: this rank's groups, traded over its context ranks.
                return mixer.runner.run(
                    mixer, replicated, params, project_in=project_in, project_out=project_out
                )
            return mixer.mix(replicated, params, in_proj=project_in, out_proj=project_out)

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
