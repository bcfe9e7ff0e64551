"""Main gradients: the float32 gradients the optimizer steps on, behind one interface.

The optimizer updates float32 master weights from float32 gradients, its *main gradients*. Where
those come from depends on the precision and on the data parallelism, and all of that sits behind
`MainGrads`, so neither the optimizer, nor the training step, nor the data-parallel wrapper needs to
know how it is done:

* `slots`: the parameters (with their float32 masters) whose gradients it provides;
* `begin_step()`: an optimizer step starts, the last step's gradients are dropped (no kernel);
* `accumulate_in_backward(active)`: whether the gradients of the next backward pass are taken into
  the main gradients as autograd produces them, or left for the data-parallel reduction;
* `bucket_to_reduce(bucket, ...)`: for the data-parallel communication hook, the tensor to
  all-reduce for one gradient bucket, and whether the result goes back into the bucket;
* `grads()`: the float32 gradients of the step, in slot order, for the optimizer to step on.

Two implementations:

* `AccumulatedMainGrads` (16-bit parameters with `ddp.grad_reduce_in_fp32`): a post-accumulate-grad
  hook takes each 16-bit gradient from its parameter as soon as autograd produces it, so
  micro-batches accumulate in float32. The gradients taken are widened into their float32 main
  gradients (copied, or added) in batches: whenever `flush_bytes` of them wait, and at the end of
  each backward pass. On CUDA one batch is one Triton kernel launch (`widen_triton`), instead of a
  slow mixed-dtype kernel per parameter; elsewhere, and where Triton is missing, PyTorch copies and
  adds them one by one. Under DDP the main gradients of one bucket are views into one flat float32
  buffer: the last micro-batch's 16-bit bucket is added into it with one kernel and the float32 sum
  is all-reduced in place (as Megatron does).
* `ParamGrads` (everything else): a parameter's own `.grad` is its gradient; a 16-bit one
  accumulates in its own dtype and is widened to float32 at the step.

Sharded data parallelism (FSDP2 `fully_shard` with `MixedPrecisionPolicy(param_dtype=bf16,
reduce_dtype=fp32)`) is meant to plug in here without touching the optimizer: FSDP keeps the sharded
parameters in float32, computes in bf16, accumulates and reduce-scatters the gradients in float32
itself, so the `.grad` of a sharded parameter already is its main gradient. That is `ParamGrads`
over parameters without a float32 copy: it takes `.grad` as it is, needs no hooks, and its
`bucket_to_reduce` is never called because FSDP does its own communication. Whatever new
bookkeeping sharding needs (e.g. gradients of parameters FSDP did not reduce) belongs in a
`MainGrads` of its own, not in the optimizer or the training step.
"""

from __future__ import annotations

import functools
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from viaduct.training.optim import ParamSlot


FLUSH_BYTES = 64 * 2**20
"""16-bit gradients held back at most (bytes) before they are widened into the main gradients."""


class _Widen(Protocol):
    def __call__(self, dsts: list[torch.Tensor], srcs: list[torch.Tensor], *, accumulate: bool) -> None: ...


@functools.cache
def _widen_kernel(device: torch.device) -> _Widen | None:
    """`widen_triton.widen_into` where Triton imports and the kernel gives the right sums on `device`
    (checked once per device), else None: PyTorch's kernels then do the work."""
    try:
        from viaduct.training.widen_triton import widen_into
    except ImportError:
        return None
    try:
        src = torch.arange(5, dtype=torch.bfloat16, device=device)
        dst = torch.ones(5, device=device)
        widen_into([dst], [src], accumulate=True)
        works = torch.equal(dst, src.float() + 1)
    except Exception as exc:  # a Triton that cannot build the kernel for this GPU
        warnings.warn(
            f"float32 main gradients: the Triton kernel fails ({exc}); using PyTorch's", stacklevel=2
        )
        return None
    if not works:
        warnings.warn("float32 main gradients: the Triton kernel sums wrongly; using PyTorch's", stacklevel=2)
    return widen_into if works else None


def widen(dsts: list[torch.Tensor], srcs: list[torch.Tensor], *, accumulate: bool) -> None:
    """dst += src (accumulate) or dst = src for each pair of float32 `dsts` and 16-bit `srcs`: CUDA
    tensors of plain layout in one Triton launch per device and dtype, the others one PyTorch kernel
    each."""
    fused: dict[tuple[torch.device, torch.dtype], tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
    for d, s in zip(dsts, srcs, strict=True):
        plain = type(d) is torch.Tensor and type(s) is torch.Tensor
        if plain and d.is_cuda and d.is_contiguous() and s.is_contiguous() and _widen_kernel(d.device):
            pairs = fused.setdefault((d.device, s.dtype), ([], []))
            pairs[0].append(d)
            pairs[1].append(s)
        elif accumulate:
            d.add_(s)
        else:
            d.copy_(s)
    for (device, _), pairs in fused.items():
        kernel = _widen_kernel(device)
        assert kernel is not None  # only pairs it takes were gathered
        kernel(*pairs, accumulate=accumulate)


@dataclass
class BucketReduction:
    """What the data-parallel communication hook does with one gradient bucket."""

    tensor: torch.Tensor
    """The tensor to all-reduce in place."""
    write_back: bool
    """Copy the reduced values back into the bucket (False: they landed in the main gradients)."""


class MainGrads(ABC):
    """Owns the float32 gradients the optimizer steps on; see the module docstring."""

    slots: list[ParamSlot]
    """Every trainable parameter of the optimizer, in its order."""

    @abstractmethod
    def begin_step(self) -> None:
        """Start an optimizer step: forget the gradients of the last one."""

    @abstractmethod
    def accumulate_in_backward(self, active: bool) -> None:
        """Whether the next backward's gradients go into the main gradients while it runs (True), or are
        left in `.grad` for the data-parallel reduction, which hands them over in `bucket_to_reduce`."""

    @abstractmethod
    def grads(self) -> list[torch.Tensor]:
        """The float32 gradients of this step, one per parameter that got one, in slot order.

        Parameters with a float32 copy get their gradient on the copy's `.grad`, which is where the
        torch optimizer reads it.
        """

    @abstractmethod
    def bucket_to_reduce(
        self, bucket: dist.GradBucket, buffer: torch.Tensor, *, reduce_in_fp32: bool
    ) -> BucketReduction:
        """For DDP's communication hook: what to all-reduce for `bucket` (whose flat gradients are
        `buffer`); with `reduce_in_fp32`, 16-bit gradients are reduced in float32."""


def _plain_bucket(buffer: torch.Tensor, reduce_in_fp32: bool) -> BucketReduction:
    """Reduce the bucket's own gradients: in float32 if asked (a widened copy), else in place."""
    if reduce_in_fp32 and buffer.dtype != torch.float32:
        return BucketReduction(buffer.float(), write_back=True)
    return BucketReduction(buffer, write_back=True)


class ParamGrads(MainGrads):
    """Each parameter's `.grad` is its gradient; 16-bit ones are widened to float32 at the step."""

    def __init__(self, slots: list[ParamSlot]) -> None:
        self.slots = slots

    def begin_step(self) -> None:
        for s in self.slots:
            s.param.grad = None
            if s.has_copy:
                s.master.grad = None

    def accumulate_in_backward(self, active: bool) -> None:
        pass  # `.grad` is the gradient: autograd and DDP accumulate into it either way

    def grads(self) -> list[torch.Tensor]:
        out = []
        for s in self.slots:
            if s.has_copy and s.param.grad is not None:
                s.master.grad = s.param.grad.float()
                s.param.grad = None
            if s.master.grad is not None:
                out.append(s.master.grad)
        return out

    def bucket_to_reduce(
        self, bucket: dist.GradBucket, buffer: torch.Tensor, *, reduce_in_fp32: bool
    ) -> BucketReduction:
        return _plain_bucket(buffer, reduce_in_fp32)


@dataclass
class _MainGrad:
    """The float32 main gradient of one 16-bit parameter."""

    slot: ParamSlot
    grad: torch.Tensor
    """The float32 gradient; also the master's `.grad`, and a view into a bucket's flat buffer under DDP."""
    fresh: bool = True
    """Not written yet this step: the first write copies, later ones add."""


def _widen_into_mains(pairs: list[tuple[_MainGrad, torch.Tensor]]) -> None:
    """Widen each 16-bit gradient into its main gradient: one `widen` call for the first writes of
    the step (copies) and one for the rest (adds)."""
    copies: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])
    adds: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])
    for main, grad in pairs:
        into = copies if main.fresh else adds
        into[0].append(main.grad)
        into[1].append(grad)
        main.fresh = False
    widen(*copies, accumulate=False)
    widen(*adds, accumulate=True)


class AccumulatedMainGrads(MainGrads):
    """Float32 main gradients for the 16-bit parameters, accumulated by post-accumulate-grad hooks.

    Parameters without a float32 copy (float32 ones in a mixed model) keep their own `.grad`.
    `flush_bytes`: how many bytes of 16-bit gradients may wait to be widened (see the module
    docstring); they wait at most until the end of their backward pass.
    """

    def __init__(self, slots: list[ParamSlot], *, flush_bytes: int = FLUSH_BYTES) -> None:
        self.slots = slots
        self.flush_bytes = flush_bytes
        self._waiting: list[tuple[_MainGrad, torch.Tensor]] = []
        self._waiting_bytes = 0
        self._flush_queued = False
        # Aligned with `slots`: None for a parameter that is its own master (float32).
        self._of_slot: list[_MainGrad | None] = []
        self._by_param: dict[int, _MainGrad] = {}
        for s in slots:
            main = _MainGrad(s, torch.zeros_like(s.master)) if s.has_copy else None
            self._of_slot.append(main)
            if main is not None:
                s.master.grad = main.grad
                self._by_param[id(s.param)] = main
                s.param.register_post_accumulate_grad_hook(self._hook(main))
        self._active = True
        # DDP bucket index -> (the bucket's main gradients, by identity; their flat float32 buffer).
        self._flats: dict[int, tuple[tuple[int, ...], torch.Tensor]] = {}

    def _hook(self, main: _MainGrad) -> Callable[[torch.Tensor], None]:
        def hook(p: torch.Tensor) -> None:
            if not self._active or p.grad is None:
                return
            grad, p.grad = p.grad, None  # the 16-bit gradient is freed once widened
            self._waiting.append((main, grad))
            self._waiting_bytes += grad.numel() * grad.element_size()
            if not self._flush_queued:  # the rest waits until this backward pass ends at most
                self._flush_queued = True
                torch.autograd.Variable._execution_engine.queue_callback(self._end_of_backward)
            if self._waiting_bytes >= self.flush_bytes:
                self._flush()

        return hook

    def _end_of_backward(self) -> None:
        self._flush_queued = False
        self._flush()

    def _flush(self) -> None:
        """Widen the waiting 16-bit gradients into their main gradients."""
        waiting, self._waiting, self._waiting_bytes = self._waiting, [], 0
        _widen_into_mains(waiting)

    def begin_step(self) -> None:
        # What a failed backward pass left: its gradients and its end-of-pass callback (never run).
        self._waiting, self._waiting_bytes, self._flush_queued = [], 0, False
        for s in self.slots:
            s.param.grad = None
        for main in self._by_param.values():
            main.fresh = True

    def accumulate_in_backward(self, active: bool) -> None:
        self._active = active

    def grads(self) -> list[torch.Tensor]:
        self._flush()
        out = []
        for s, main in zip(self.slots, self._of_slot):
            if main is not None and main.fresh:
                main.grad.zero_()  # a parameter that got no gradient this step
                main.fresh = False
            if s.master.grad is not None:
                out.append(s.master.grad)
        return out

    def bucket_to_reduce(
        self, bucket: dist.GradBucket, buffer: torch.Tensor, *, reduce_in_fp32: bool
    ) -> BucketReduction:
        self._flush()
        params = bucket.parameters()
        mains = [m for m in (self._by_param.get(id(p)) for p in params) if m is not None]
        if len(mains) != len(params):
            return _plain_bucket(buffer, reduce_in_fp32)
        # The bucket's main gradients live in one flat float32 buffer, so the 16-bit bucket is added
        # into it with one kernel and all-reduced in place.
        flat = self._flat_buffer(bucket.index(), mains, buffer)
        fresh = [m.fresh for m in mains]
        if flat.numel() == buffer.numel() and all(fresh):
            flat.copy_(buffer)
        elif flat.numel() == buffer.numel() and not any(fresh):
            flat.add_(buffer)
        else:
            _widen_into_mains(list(zip(mains, bucket.gradients(), strict=True)))
        for m in mains:
            m.fresh = False
        return BucketReduction(flat, write_back=False)

    def _flat_buffer(self, index: int, mains: list[_MainGrad], buffer: torch.Tensor) -> torch.Tensor:
        """The flat float32 buffer behind the main gradients of one DDP bucket (made on first use).

        The main gradients (and the masters' `.grad`) become views into it, in the bucket's parameter
        order. DDP may rebuild its buckets after the first iteration, so a bucket whose parameters
        changed gets a new buffer, and the gradients accumulated so far are carried over.
        """
        ids = tuple(id(m) for m in mains)
        entry = self._flats.get(index)
        if entry is not None and entry[0] == ids:
            return entry[1]
        total = max(buffer.numel(), sum(m.grad.numel() for m in mains))
        flat = torch.zeros(total, dtype=torch.float32, device=buffer.device)
        offset = 0
        for m in mains:
            n = m.grad.numel()
            view = flat[offset : offset + n].view_as(m.grad)
            if not m.fresh:
                view.copy_(m.grad)
            m.grad = view
            m.slot.master.grad = view
            offset += n
        self._flats[index] = (ids, flat)
        return flat


def make_main_grads(slots: list[ParamSlot], *, fp32_main_grads: bool) -> MainGrads:
    """Float32 main gradients accumulated in backward when asked and some parameter is 16-bit (it has a
    float32 copy to hold them); otherwise the parameters' own gradients."""
    if fp32_main_grads and any(s.has_copy for s in slots):
        return AccumulatedMainGrads(slots)
    return ParamGrads(slots)
