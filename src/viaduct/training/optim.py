"""The optimizer of a training run, built from `OptimizerConfig` (Megatron's `MegatronOptimizer`).

`build_optimizer(cfg, model, ...)` returns a `MixedPrecisionOptimizer`:

* **Parameter groups** as Megatron makes them: no weight decay for biases and 1-D parameters
  (norms), and, with `decoupled_lr`, the input embedding and output layer in groups of their own
  carrying `max_lr` / `min_lr` for the scheduler.
* **Master weights.** 16-bit parameters (bf16 / fp16) get float32 copies; the torch optimizer
  (fused AdamW / Adam / SGD on CUDA) updates those, and the result is copied back. float32
  parameters are updated in place, with no copy.
* **Main gradients.** The float32 gradients the step uses come from `self.main_grads`, a
  `viaduct.training.main_grads.MainGrads`: with 16-bit parameters and `fp32_main_grads`
  (ddp.grad_reduce_in_fp32) micro-batches accumulate in float32 main gradients, which DDP's
  communication hook all-reduces in float32; without it, gradients accumulate in the parameter
  dtype and are widened at the step. The optimizer only reads them.
* **fp16 loss scaling**, gradient clipping, `grad_norm_skip_threshold`, and zero counting.

Nothing in `step()` waits for the device, except where a decision must be taken on the host:
fp16 overflow checks and a finite `grad_norm_skip_threshold` (both read one scalar per step).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from viaduct.training.config.optimizer import OptimizerConfig
from viaduct.training.loss_scaler import ConstantLossScaler, DynamicLossScaler
from viaduct.training.main_grads import MainGrads, make_main_grads

# Megatron's names for the parameters that decoupled_lr applies to.
_EMBEDDING_OR_OUTPUT = ("embedding.word_embeddings.weight", "output_layer.weight")


def _is_embedding_or_output(name: str) -> bool:
    return name.removeprefix("module.").removeprefix("_orig_mod.") in _EMBEDDING_OR_OUTPUT


def _no_weight_decay(name: str, p: nn.Parameter) -> bool:
    return name.endswith(".bias") or p.ndim == 1


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a sharded (DTensor) tensor; a plain tensor as it is."""
    return t.to_local() if isinstance(t, DTensor) else t


def total_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The L2 norm of all `tensors` together, as a plain device tensor, on every rank.

    Sharded (DTensor) tensors count each element once, whatever their layout: their norms are taken
    per device mesh by DTensor (which sums the shards and skips the replicas) and combined here.
    """
    if not tensors:
        return torch.zeros(())
    by_mesh: dict[object, list[torch.Tensor]] = {}
    for t in tensors:
        by_mesh.setdefault(t.device_mesh if isinstance(t, DTensor) else None, []).append(t)
    norms = []
    for group in by_mesh.values():
        norm = nn.utils.get_total_norm(group, foreach=True)
        norms.append(norm.full_tensor() if isinstance(norm, DTensor) else norm)
    if len(norms) == 1:
        return norms[0]
    return torch.stack([n.float().square() for n in norms]).sum().sqrt()


@dataclass
class ParamSlot:
    """One trainable parameter and what the optimizer keeps for it."""

    name: str
    """The parameter's name in the (unwrapped) model; checkpoints key by it."""
    param: nn.Parameter
    """The model's parameter (any dtype)."""
    master: torch.Tensor
    """Float32 copy that the torch optimizer updates (the parameter itself if float32)."""

    @property
    def has_copy(self) -> bool:
        """Whether the master is a float32 copy (the parameter is 16-bit)."""
        return self.master is not self.param


class MixedPrecisionOptimizer:
    """Megatron-style optimizer over a model's parameters; see the module docstring."""

    def __init__(
        self,
        cfg: OptimizerConfig,
        named_params: Iterable[tuple[str, nn.Parameter]],
        *,
        fp32_main_grads: bool = True,
        device: torch.device | None = None,
    ) -> None:
        self.cfg = cfg
        self.slots: list[ParamSlot] = []
        for name, p in named_params:
            if not p.requires_grad:
                continue
            master: torch.Tensor = p
            if p.dtype != torch.float32:
                master = p.detach().float().requires_grad_(True)
            self.slots.append(ParamSlot(name, p, master))
        if not self.slots:
            raise ValueError("the model has no trainable parameters")
        device = device or self.slots[0].param.device
        self._name_of_master = {id(s.master): s.name for s in self.slots}  # checkpoints key by name
        self.copies = [s for s in self.slots if s.has_copy]
        self.main_grads: MainGrads = make_main_grads(self.slots, fp32_main_grads=fp32_main_grads)
        """Where the float32 gradients of each step come from (the data-parallel wrapper feeds it)."""

        self.optimizer = self._make_torch_optimizer(device)
        self.scaler: ConstantLossScaler | None = None
        if cfg.fp16:
            if cfg.loss_scale is not None:
                self.scaler = ConstantLossScaler(cfg.loss_scale, device)
            else:
                self.scaler = DynamicLossScaler(
                    cfg.initial_loss_scale,
                    cfg.min_loss_scale,
                    int(cfg.loss_scale_window),
                    cfg.hysteresis,
                    device,
                )
        self._grad_scale: torch.Tensor | float | None = None  # extra factor applied to grads at the step
        self.pipeline_group: dist.ProcessGroup | None = None
        """With pipeline stages: the ranks holding the other stages, over which norms and counts add up."""
        self.counted_elsewhere: set[str] = set()
        """Parameters another stage also holds (a tied embedding table's second copy), left out of
        norms and counts so that the whole model counts each once."""

    # ------------------------------------------------------------------ construction

    def _make_torch_optimizer(self, device: torch.device) -> torch.optim.Optimizer:
        cfg = self.cfg
        groups: dict[tuple[bool, bool], list[torch.Tensor]] = {}
        for s in self.slots:
            decoupled = cfg.decoupled_lr is not None and _is_embedding_or_output(s.name)
            groups.setdefault((_no_weight_decay(s.name, s.param), decoupled), []).append(s.master)
        param_groups = []
        for (no_wd, decoupled), params in sorted(groups.items()):
            group: dict[str, Any] = {
                "params": params,
                "wd_mult": 0.0 if no_wd else 1.0,
                "lr_mult": 1.0,
                "weight_decay": 0.0 if no_wd else cfg.weight_decay,
            }
            if decoupled:
                group["max_lr"] = cfg.decoupled_lr
                # Megatron: an unset decoupled_min_lr falls back to min_lr.
                floor = cfg.decoupled_min_lr if cfg.decoupled_min_lr is not None else cfg.min_lr
                group["min_lr"] = floor or 0.0
            param_groups.append(group)
        lr = cfg.lr if cfg.lr is not None else 0.0
        # Fused kernels run on CUDA only; on CPU foreach is the fast path.
        fast = {"fused": True} if device.type == "cuda" else {"foreach": True}
        if cfg.optimizer == "sgd":
            return torch.optim.SGD(param_groups, lr=lr, momentum=cfg.sgd_momentum, **fast)
        adam_cls = torch.optim.AdamW if cfg.decoupled_weight_decay else torch.optim.Adam
        return adam_cls(
            param_groups,
            lr=lr,
            betas=(cfg.adam_beta1, cfg.adam_beta2),
            eps=cfg.adam_eps,
            **fast,
        )

    # ------------------------------------------------------------------ the loop's interface

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """The torch optimizer's groups (the scheduler writes lr and weight_decay here)."""
        return self.optimizer.param_groups

    def zero_grad(self) -> None:
        """Start a step: the gradients of the last one (and a pending `scale_grads` factor) are dropped.

        A step re-run in place (rerun_state_machine) starts over from here, so nothing may carry over."""
        self.main_grads.begin_step()
        self._grad_scale = None

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss to call backward on: multiplied by the fp16 loss scale, if any."""
        return loss if self.scaler is None else loss * self.scaler.scale

    def scale_grads(self, factor: torch.Tensor | float) -> None:
        """Multiply the gradients by `factor` at the next step (per-token loss normalization)."""
        self._grad_scale = factor if self._grad_scale is None else self._grad_scale * factor

    @torch.no_grad()
    def step(self) -> tuple[bool, torch.Tensor, torch.Tensor | None]:
        """Unscale, check, clip and apply the gradients; returns (updated, grad norm, zero count).

        The grad norm (before clipping) and the zero count are device tensors. `updated` is False
        when fp16 gradients overflowed or the norm exceeded `grad_norm_skip_threshold`.
        """
        grads = self.main_grads.grads()
        # In-place arithmetic runs on each rank's own part of sharded gradients; norms and counts
        # are taken over the whole model.
        local = [_local(g) for g in grads]
        sharded = len(local) > 0 and any(isinstance(g, DTensor) for g in grads)
        factor = self._grad_scale
        self._grad_scale = None
        found_inf = None
        if self.scaler is not None:
            inv = self.scaler.inv_scale
            if factor is not None:
                inv = inv * factor
            found_inf = torch.zeros(1, device=inv.device)
            torch._amp_foreach_non_finite_check_and_unscale_(local, found_inf, inv)
            if sharded:  # an overflow on any rank's shard skips the step everywhere
                dist.all_reduce(found_inf, op=dist.ReduceOp.MAX)
        elif factor is not None:
            torch._foreach_mul_(local, factor)

        grad_norm = self._model_norm(grads)
        if self.cfg.clip_grad > 0:
            # Scale by min(1, clip / norm) on the device: no host round trip to decide.
            coef = (self.cfg.clip_grad / (grad_norm + 1e-6)).clamp(max=1.0)
            torch._foreach_mul_(local, coef)
        num_zeros = None
        if self.cfg.log_num_zeros_in_grad:
            counts = [(g == 0).sum() for g in self._counted(grads)]
            full = [c.full_tensor() if isinstance(c, DTensor) else c for c in counts]
            num_zeros = torch.stack(full).sum() if full else grad_norm.new_zeros((), dtype=torch.int64)
            if self.pipeline_group is not None:
                dist.all_reduce(num_zeros, group=self.pipeline_group)

        updated = True
        if self.scaler is not None and found_inf is not None:
            overflow = bool(found_inf.item())  # host decision: skip and shrink the scale
            self.scaler.update(overflow)
            updated = not overflow
        if updated and math.isfinite(self.cfg.grad_norm_skip_threshold):
            updated = bool(grad_norm <= self.cfg.grad_norm_skip_threshold)
        if updated:
            self.optimizer.step()
            if self.copies:
                torch._foreach_copy_([s.param for s in self.copies], [s.master for s in self.copies])
        return updated, grad_norm, num_zeros

    @torch.no_grad()
    def layer_grad_norms(self) -> tuple[list[str], torch.Tensor]:
        """L2 norm of the gradients per layer, as applied (unscaled and clipped): names and a device tensor.

        A "layer" is `decoder.layers.N`; other parameters group by their module (`embedding`, ...).
        Read after `step()`, before the next `zero_grad()`.
        """
        groups: dict[str, list[torch.Tensor]] = {}
        for s in self.slots:
            g = s.master.grad
            if g is None:
                continue
            parts = s.name.split(".")
            key = ".".join(parts[:3]) if parts[:2] == ["decoder", "layers"] else parts[0]
            groups.setdefault(key, []).append(g)
        names = list(groups)
        norms = [total_norm(groups[n]) for n in names]
        return names, torch.stack(norms) if norms else torch.zeros(0)

    @torch.no_grad()
    def params_norm(self) -> torch.Tensor:
        """L2 norm of all trainable parameters (float32 masters), as a device tensor."""
        return self._model_norm([s.master for s in self.slots])

    def _counted(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """`tensors` (one per slot) without those of parameters another pipeline stage counts."""
        if not self.counted_elsewhere:
            return tensors
        return [t for s, t in zip(self.slots, tensors) if s.name not in self.counted_elsewhere]

    def _model_norm(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        """The L2 norm over the whole model of `tensors` (one per slot): every pipeline stage's."""
        norm = total_norm(self._counted(tensors))
        if self.pipeline_group is None:
            return norm
        square = norm.float().square().to(tensors[0].device if tensors else norm.device)
        dist.all_reduce(square, group=self.pipeline_group)
        return square.sqrt()

    # ------------------------------------------------------------------ checkpointing

    def state_dict(self) -> dict[str, Any]:
        """Optimizer state keyed by parameter name (not by position), plus the loss scaler.

        {"state": {name: {"exp_avg": ..., "step": ...}}, "master": {name: fp32 tensor} (16-bit
        params only), "param_groups": [hyperparameters without params], "loss_scaler": {...}}.
        """
        inner = self.optimizer.state_dict()
        index_to_name = {}
        i = 0
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                index_to_name[i] = self._name_of_master[id(p)]
                i += 1
        state = {index_to_name[k]: v for k, v in inner["state"].items()}
        groups = [
            {k: v for k, v in g.items() if k != "params"}
            | {"param_names": [index_to_name[j] for j in g["params"]]}
            for g in inner["param_groups"]
        ]
        out: dict[str, Any] = {
            "state": state,
            "param_groups": groups,
            "master": {s.name: s.master for s in self.copies},
        }
        if self.scaler is not None:
            out["loss_scaler"] = self.scaler.state_dict()
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict()` produced (names must match; the groups' lr/wd come back too)."""
        name_to_index = {}
        i = 0
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                name_to_index[self._name_of_master[id(p)]] = i
                i += 1
        unknown = sorted(set(state["state"]) - set(name_to_index))
        if unknown:
            raise ValueError(f"optimizer checkpoint has state for parameters this model lacks: {unknown[:5]}")
        # One pipeline stage holds part of the model: each of its groups must be (part of) a saved one.
        partial = self.pipeline_group is not None
        if not partial and len(state["param_groups"]) != len(self.optimizer.param_groups):
            raise ValueError("optimizer checkpoint has different parameter groups than this model")
        groups = []
        for live in self.optimizer.param_groups:
            live_names = [self._name_of_master[id(p)] for p in live["params"]]
            saved = next((g for g in state["param_groups"] if set(live_names) <= set(g["param_names"])), None)
            if saved is None or (not partial and set(saved["param_names"]) != set(live_names)):
                raise ValueError("optimizer checkpoint groups its parameters differently than this model")
            g = {k: v for k, v in saved.items() if k != "param_names"}
            g["params"] = [name_to_index[n] for n in live_names]  # positional, in the live order
            groups.append(g)
        inner = {"state": {name_to_index[n]: v for n, v in state["state"].items()}, "param_groups": groups}
        self.optimizer.load_state_dict(inner)
        with torch.no_grad():
            for s in self.copies:
                if s.name in state["master"]:
                    s.master.copy_(state["master"][s.name])
                    s.param.copy_(s.master)
        if self.scaler is not None and "loss_scaler" in state:
            self.scaler.load_state_dict(state["loss_scaler"])


def build_optimizer(
    cfg: OptimizerConfig,
    model: nn.Module,
    *,
    fp32_main_grads: bool = True,
) -> MixedPrecisionOptimizer:
    """The optimizer for `model` (unwrapped: parameter names as the model has them)."""
    return MixedPrecisionOptimizer(cfg, model.named_parameters(), fp32_main_grads=fp32_main_grads)
