"""Context parallelism for Mamba-2 layers: the sequence traded for B/C groups around the scan.

Under context parallelism each rank holds two chunks of every sequence (the `cp_positions` layout of
`viaduct.distributed.context_parallel`). A Mamba mixer's scan and convolution run along the whole
sequence, but its B/C groups are independent from in_proj to out_proj (the fact tensor parallelism
uses too). So, as Megatron does, each rank projects its own tokens with the whole in_proj, then one
all-to-all over the group trades "my tokens, every group" for "every token, my groups"
(`num_groups / cp` of them, in global sequence order); the convolution, scan and gated norm run on
those groups; a second all-to-all trades back, and out_proj (whole) maps the rank's own tokens. Each
all-to-all's backward is the other one. The weights stay whole on every rank; a rank's gradient of
the per-group ones (convolution, dt_bias, A_log, D, the norm) covers its groups only, and of
in_proj / out_proj its tokens only: both are partial sums, reduced over the group with the rest.

Everything runs under gloo as under NCCL; the model code never sees `torch.distributed` (the mixer
calls its `runner` hook).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.distributed as dist

from viaduct.models.mamba.mixer import Mamba2Mixer


def _exchange(send: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """all_to_all over dim 0 of `send` [cp, ...]: part j goes to rank j, part i of the result came
    from rank i."""
    send = send.contiguous()  # (empty_like of a permuted view would keep its strides)
    out = torch.empty_like(send)
    dist.all_to_all_single(out, send, group=group)
    return out


def _tokens_to_groups(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """[b, local tokens, cp blocks of channels] -> [b, all tokens in global order, this rank's block]."""
    cp = dist.get_world_size(group)
    b, local, channels = x.shape
    half = local // 2
    got = _exchange(x.reshape(b, local, cp, channels // cp).permute(2, 0, 1, 3), group)  # [cp, b, local, c]
    halves = got.reshape(cp, b, 2, half, -1)
    # Rank r sent chunks r and 2cp-1-r: the first halves in rank order, then the second ones reversed.
    chunks = torch.cat((halves[:, :, 0], halves[:, :, 1].flip(0)))  # [2cp, b, half, c], global order
    return chunks.permute(1, 0, 2, 3).reshape(b, 2 * cp * half, -1)


def _groups_to_tokens(y: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """The inverse (and adjoint) of `_tokens_to_groups`: [b, all tokens, this rank's block] ->
    [b, this rank's tokens, every block]."""
    cp = dist.get_world_size(group)
    b, total, block = y.shape
    half = total // (2 * cp)
    chunks = y.reshape(b, 2 * cp, half, block)
    # Rank r's tokens: chunks r and 2cp-1-r, in that order.
    mine = torch.stack((chunks[:, :cp], chunks[:, cp:].flip(1)), dim=2)  # [b, cp, 2, half, c]
    got = _exchange(mine.reshape(b, cp, 2 * half, block).permute(1, 0, 2, 3), group)  # [cp, b, local, c]
    return got.permute(1, 2, 0, 3).reshape(b, 2 * half, cp * block)


class _TokensToGroups(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return _tokens_to_groups(x, group)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _groups_to_tokens(grad, ctx.group), None


class _GroupsToTokens(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, y: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return _groups_to_tokens(y, group)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _tokens_to_groups(grad, ctx.group), None


class MambaContextParallel:
    """A `Mamba2Mixer.runner` for a sequence split over `group` (see the module docstring). The
    mixer's group count must be a multiple of the group's size."""

    def __init__(self, group: dist.ProcessGroup) -> None:
        self.group = group
        self.cp = dist.get_world_size(group)
        self.rank = dist.get_rank(group)

    def __call__(self, mixer: Mamba2Mixer, hidden: torch.Tensor) -> torch.Tensor:
        # The projections run as the mixer's modules, so PEFT adapters on them act.
        params = dict(mixer.named_parameters())
        return self.run(mixer, hidden, params, project_in=mixer.in_proj, project_out=mixer.out_proj)

    def run(
        self,
        mixer: Mamba2Mixer,
        hidden: torch.Tensor,
        params: Mapping[str, torch.Tensor],
        *,
        project_in: Callable[[torch.Tensor], torch.Tensor],
        project_out: Callable[[torch.Tensor], torch.Tensor],
    ) -> torch.Tensor:
        """The mixer on this rank's tokens: `params` are the mixer's own, or a tensor-parallel rank's
        whole groups; `project_in` / `project_out` compute in_proj on the rank's tokens and out_proj
        on its tokens' mixed values (`viaduct.distributed.mamba_parallel` gives tensor-parallel ones)."""
        per_head = mixer.num_heads // mixer.num_groups
        groups, cp = params["A_log"].shape[0] // per_head, self.cp
        if groups % cp:
            raise ValueError(
                f"{groups} B/C groups of a Mamba mixer cannot be split over {cp} context-parallel ranks: "
                "set model.context_parallel_size to a divisor of model.mamba_num_groups (divided by "
                "tensor_model_parallel_size)"
            )
        mine = groups // cp
        first = self.rank * mine
        d_group = per_head * mixer.head_dim
        conv_group = d_group + 2 * mixer.state_dim
        # This rank's groups of the per-group parameters (rows kept by group, see `Mamba2Mixer`).
        rows = {
            "conv1d.weight": conv_group,
            "conv1d.bias": conv_group,
            "dt_bias": per_head,
            "A_log": per_head,
            "D": per_head,
            "norm.weight": d_group,
        }
        local = {
            name: params[name][first * size : (first + mine) * size]
            for name, size in rows.items()
            if name in params  # conv1d.bias only with conv_bias
        }
        local["out_proj.weight"] = params["out_proj.weight"]  # whole: it maps this rank's tokens

        def trade_in(h: torch.Tensor) -> torch.Tensor:
            return _TokensToGroups.apply(project_in(h), self.group)

        def trade_out(y: torch.Tensor) -> torch.Tensor:
            return project_out(_GroupsToTokens.apply(y, self.group))

        return mixer.mix(hidden, local, in_proj=trade_in, out_proj=trade_out)


def apply_mamba_context_parallel(model: torch.nn.Module, group: dist.ProcessGroup) -> int:
    """Install `MambaContextParallel(group)` on every `Mamba2Mixer` of `model`; returns how many."""
    runner = MambaContextParallel(group)
    count = 0
    for module in model.modules():
        if isinstance(module, Mamba2Mixer):
            module.runner = runner
            count += 1
    return count
