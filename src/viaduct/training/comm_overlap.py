"""Communication-overlap settings (`cfg.comm_overlap`).

Every optional field defaults to None, meaning "let the policy decide"; an explicit value always
wins over the policy. The policy itself (pipeline send/receive style from the PP/VPP sizes,
data-parallel overlap and bucket size when the distributed optimizer is on) is not applied: unset
fields leave `ddp` and the model as they are. What applies: an explicit `overlap_grad_reduce`,
`overlap_param_gather` or `bucket_size` is copied onto `ddp`, and an explicit `overlap_p2p_comm` or
`batch_p2p_comm` onto the model, by `ConfigContainer.validate()` (as Bridge does); the model's
pipeline rules then check them (PyTorch's pipeline schedules always batch each step's sends and
receives, so under pipeline parallelism overlap_p2p_comm must be false and batch_p2p_comm true).
Settings of features that are not built (expert parallelism, the distributed optimizer's gather
tricks, Transformer Engine's tensor-parallel overlap presets) are reported.

Difference from Bridge: `tp_comm_overlap` is a required bool there; here it defaults to False. It
runs on PyTorch's asynchronous tensor parallelism (compiled, CUDA only) rather than Transformer
Engine's userbuffers, so `tp_comm_overlap_cfg` presets do not apply. `validate()` copies an explicit
value onto `model.tp_comm_overlap`, as Bridge does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from viaduct.config import ConfigBase, Problems, derived, fields_with_problems


@dataclass(kw_only=True)
class CommOverlapConfig(ConfigBase):
    """Which communication (tensor-, pipeline-, data- and expert-parallel) overlaps computation."""

    tp_comm_overlap: bool = False
    """Overlap tensor-parallel communication with GEMMs (needs TP > 1, sequence_parallel, CUDA, compile)."""
    tp_comm_overlap_cfg: str | dict[str, Any] | None = None
    """Per-GEMM overlap settings (a preset name or a mapping); only with tp_comm_overlap."""
    tp_comm_bootstrap_backend: Literal["nccl", "mpi", "gloo"] = "nccl"
    """Backend that bootstraps the tensor-parallel overlap buffers."""
    overlap_p2p_comm: bool | None = None
    """Overlap pipeline send/receive with compute (copied to model.overlap_p2p_comm); unset: the model's."""
    batch_p2p_comm: bool | None = None
    """Batch pipeline sends and receives (copied to model.batch_p2p_comm); unset: the model's."""
    overlap_grad_reduce: bool | None = None
    """Overlap the gradient reduce-scatter with the backward pass; unset: on when DP > 1."""
    overlap_param_gather: bool | None = None
    """Overlap the parameter all-gather with the forward pass; unset: on when DP > 1."""
    overlap_param_gather_with_optimizer_step: bool | None = None
    """Overlap the first chunk's parameter all-gather with the optimizer step; unset: off."""
    align_param_gather: bool | None = None
    """Launch all pipeline stages' parameter all-gathers together; unset: on with virtual pipelining."""
    bucket_size: int | None = None
    """Gradient bucket size in elements; unset: 128 Mi elements when overlapping, else one bucket."""
    defer_embedding_wgrad_compute: bool | None = None
    """Defer the embedding weight-gradient GEMM to the pipeline flush."""
    wgrad_deferral_limit: int | None = None
    """Micro-batches whose embedding weight gradients may be deferred (with defer_embedding_wgrad_compute)."""
    overlap_moe_expert_parallel_comm: bool | None = None
    """Overlap the MoE all-to-all with compute (expert parallelism)."""
    delay_wgrad_compute: bool | None = None
    """Delay weight-gradient GEMMs to overlap the MoE all-to-all (with overlap_moe_expert_parallel_comm)."""
    data_parallel_size: int | None = derived()
    """Data-parallel size, filled in by validate() (world size / (TP x PP x CP))."""

    def finalize(self) -> None:
        """Check the choices (all problems at once); nothing is derived here."""
        p = Problems()
        p.extend(self.check_types())
        bad = fields_with_problems(p.items)
        if self.overlap_p2p_comm is True and self.batch_p2p_comm is True:
            p.add(
                "overlap_p2p_comm",
                "cannot be combined with batch_p2p_comm",
                True,
                fix="set comm_overlap.batch_p2p_comm=false (or leave both unset)",
            )
        if "bucket_size" not in bad and self.bucket_size is not None and self.bucket_size <= 0:
            p.add(
                "bucket_size",
                "must be > 0 when set",
                self.bucket_size,
                fix="set comm_overlap.bucket_size to a number of elements, or leave it unset",
            )
        for name, what in (
            ("overlap_moe_expert_parallel_comm", "expert-parallel communication overlap"),
            ("delay_wgrad_compute", "delayed weight-gradient computation"),
            ("defer_embedding_wgrad_compute", "deferred embedding weight-gradient computation"),
            (
                "overlap_param_gather_with_optimizer_step",
                "overlapping the parameter gather with the optimizer",
            ),
            ("align_param_gather", "the distributed optimizer's parameter gather"),
        ):
            if getattr(self, name) is True:
                p.add(
                    name,
                    f"{what} is not supported yet",
                    True,
                    fix=f"set comm_overlap.{name}=false or unset it",
                )
        if "tp_comm_overlap_cfg" not in bad and self.tp_comm_overlap_cfg is not None and self.tp_comm_overlap:
            p.add(
                "tp_comm_overlap_cfg",
                "per-GEMM overlap presets are Transformer Engine's; asynchronous tensor parallelism (what "
                "tp_comm_overlap runs on) decides the overlap in torch.compile and takes no presets",
                self.tp_comm_overlap_cfg,
                fix="unset comm_overlap.tp_comm_overlap_cfg",
            )
        if (
            "tp_comm_overlap_cfg" not in bad
            and self.tp_comm_overlap_cfg is not None
            and not self.tp_comm_overlap
        ):
            p.add(
                "tp_comm_overlap_cfg",
                "only applies with tp_comm_overlap",
                self.tp_comm_overlap_cfg,
                fix="unset comm_overlap.tp_comm_overlap_cfg",
            )
        p.raise_if_any()
