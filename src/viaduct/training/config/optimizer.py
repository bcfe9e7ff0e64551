"""`optimizer`: optimizer kind, learning rate, weight decay, precision and loss scaling.

Field names and defaults follow Megatron Core's `OptimizerConfig`. Viaduct builds Adam/AdamW and
SGD from `torch.optim`; the emerging optimizers (Muon, Lion, SOAP) are left out.
"""

import math
from dataclasses import dataclass
from typing import ClassVar, Literal

from viaduct.config import ConfigBase, DType, Problems, allow_infinity, unsupported
from viaduct.training.config._checks import in_range, positive

_FP32_ONLY = "non-fp32 optimizer state and gradients (the precision-aware optimizer)"


@dataclass(kw_only=True)
class OptimizerConfig(ConfigBase):
    """Optimizer kind and hyperparameters; the schedule of lr and weight decay lives in `scheduler`."""

    _component_: ClassVar[str] = "optimizer"

    optimizer: Literal["adam", "sgd"] = "adam"
    """Optimizer: "adam" (AdamW when decoupled_weight_decay) or "sgd"."""

    lr: float | None = None
    """Peak learning rate (required); the scheduler warms up to it and decays from it."""

    min_lr: float | None = None
    """Learning-rate floor of the decay; None means 0."""

    decoupled_lr: float | None = None
    """Separate peak learning rate for the input embedding and output layer; None uses lr."""

    decoupled_min_lr: float | None = None
    """Learning-rate floor for the input embedding and output layer; needs decoupled_lr."""

    weight_decay: float = 0.01
    """Weight-decay coefficient (scheduler.start_weight_decay/end_weight_decay schedule it when set)."""

    fp16: bool = False
    """Train with fp16 parameters and dynamic loss scaling (kept in sync by mixed_precision)."""

    bf16: bool = False
    """Train with bf16 parameters (kept in sync by mixed_precision)."""

    params_dtype: DType = DType("float32")
    """Dtype of the model parameters the optimizer sees (kept in sync by mixed_precision)."""

    loss_scale: float | None = None
    """Static loss scale for fp16; None uses dynamic loss scaling."""

    initial_loss_scale: float = 2.0**32
    """Starting loss scale of dynamic loss scaling."""

    min_loss_scale: float = 1.0
    """Smallest loss scale dynamic loss scaling may reach."""

    loss_scale_window: float = 1000.0
    """Steps without overflow after which dynamic loss scaling doubles the scale."""

    hysteresis: int = 2
    """Overflows tolerated before dynamic loss scaling halves the scale."""

    adam_beta1: float = 0.9
    """Adam's decay rate of the running gradient mean."""

    adam_beta2: float = 0.999
    """Adam's decay rate of the running squared-gradient mean."""

    adam_eps: float = 1e-8
    """Adam's term added to the denominator for numerical stability."""

    decoupled_weight_decay: bool = True
    """Decouple weight decay from the gradient (AdamW); False adds it to the gradient (Adam with L2)."""

    sgd_momentum: float = 0.9
    """Momentum of SGD."""

    clip_grad: float = 1.0
    """Clip gradients to this global L2 norm; 0 disables clipping."""

    grad_norm_skip_threshold: float = allow_infinity(math.inf)
    """Skip the optimizer step when the gradient norm exceeds this value."""

    log_num_zeros_in_grad: bool = False
    """Count the zero entries of the gradients and log them."""

    use_distributed_optimizer: bool = False
    """Shard optimizer state over data-parallel ranks (the twin of ddp.use_distributed_optimizer)."""

    overlap_param_gather: bool = False
    """The twin of ddp.overlap_param_gather (either one turns it on)."""

    overlap_param_gather_with_optimizer_step: bool = unsupported(
        "the distributed optimizer's parameter all-gather", default=False
    )
    """Overlap the first bucket's parameter all-gather with the optimizer step."""

    use_precision_aware_optimizer: bool = unsupported("the precision-aware optimizer", default=False)
    """Keep master weights, gradients and optimizer state in low precision (Transformer Engine FusedAdam)."""

    main_grads_dtype: DType = unsupported(_FP32_ONLY, default=DType("float32"))
    """Dtype of the main (accumulated) gradients."""

    main_params_dtype: DType = unsupported(_FP32_ONLY, default=DType("float32"))
    """Dtype of the master copy of the parameters."""

    exp_avg_dtype: DType = unsupported(_FP32_ONLY, default=DType("float32"))
    """Dtype of Adam's first-moment state."""

    exp_avg_sq_dtype: DType = unsupported(_FP32_ONLY, default=DType("float32"))
    """Dtype of Adam's second-moment state."""

    fp8_recipe: str | None = unsupported("FP8 training", default=None)
    """FP8 recipe the distributed optimizer must account for."""

    reuse_grad_buf_for_mxfp8_param_ag: bool = unsupported("MXFP8 parameter all-gather", default=False)
    """Reuse the gradient buffer for the MXFP8 parameter all-gather."""

    optimizer_cpu_offload: bool = unsupported("optimizer CPU offload", default=False)
    """Keep optimizer state on the CPU and run the step there."""

    optimizer_offload_fraction: float = unsupported("optimizer CPU offload", default=0.0)
    """Fraction of optimizer state offloaded to the CPU."""

    optimizer_cuda_graph: bool = unsupported("a CUDA-graphed optimizer step", default=False)
    """Capture the optimizer step in a CUDA graph."""

    _legacy_fields_: ClassVar[dict[str, str]] = {
        **{
            name: "only the adam and sgd optimizers are built"
            for name in (
                "muon_momentum",
                "muon_split_qkv",
                "muon_nesterov",
                "muon_scale_mode",
                "muon_fp32_matmul_prec",
                "muon_coefficient_type",
                "muon_num_ns_steps",
                "muon_tp_mode",
                "muon_extra_scale_factor",
                "muon_scalar_optimizer",
                "adaptive_muon_moment2_method",
                "adaptive_muon_beta2",
                "adaptive_muon_eps",
                "soap_shampoo_beta",
                "soap_precondition_frequency",
                "soap_use_kl_shampoo",
                "lion_beta1",
                "lion_beta2",
            )
        },
        **{
            name: "part of optimizer CPU offload, which is not built"
            for name in (
                "use_torch_optimizer_for_cpu_offload",
                "overlap_cpu_optimizer_d2h_h2d",
                "pin_cpu_grads",
                "pin_cpu_params",
                "offload_optimizer_states",
            )
        },
        "store_param_remainders": "part of the precision-aware optimizer, which is not built",
        "use_layer_wise_distributed_optimizer": "layer-wise distributed optimizer (for Muon) is not built",
        "apply_wd_to_qk_layernorm": "weight-decay rules are fixed: no decay on biases and 1-D parameters",
        "barrier_with_L1_time": "timer barriers are set by logger.barrier_with_L1_time",
        "timers": "a runtime object, not configuration",
        "config_logger_dir": "Megatron debugging dump; see logger.save_config_filepath",
    }

    def finalize(self) -> None:
        """Check rates, coefficients and loss-scaling settings."""
        p = Problems()
        if self.lr is None:
            p.add("lr", "must be set (the peak learning rate)", None, fix="set optimizer.lr, e.g. 3e-4")
        for name in ("lr", "min_lr", "decoupled_lr", "decoupled_min_lr", "weight_decay", "clip_grad"):
            positive(p, self, name, zero_ok=True)
        _not_above(p, "min_lr", self.min_lr, "lr", self.lr)
        _not_above(p, "decoupled_min_lr", self.decoupled_min_lr, "decoupled_lr", self.decoupled_lr)
        if self.decoupled_min_lr is not None and self.decoupled_lr is None:
            p.add(
                "decoupled_min_lr",
                "has no effect without decoupled_lr",
                self.decoupled_min_lr,
                fix="set optimizer.decoupled_lr too, or remove optimizer.decoupled_min_lr",
            )

        in_range(p, self, "adam_beta1", 0.0, 1.0, hi_open=True)
        in_range(p, self, "adam_beta2", 0.0, 1.0, hi_open=True)
        in_range(p, self, "sgd_momentum", 0.0, 1.0)
        for name in ("adam_eps", "grad_norm_skip_threshold"):
            positive(p, self, name)

        if self.fp16 and self.bf16:
            p.add(
                "bf16",
                "fp16 and bf16 are both True",
                True,
                fix="set only one of optimizer.fp16 / optimizer.bf16",
            )
        for name in ("loss_scale", "initial_loss_scale", "min_loss_scale", "loss_scale_window", "hysteresis"):
            positive(p, self, name)
        _not_above(p, "min_loss_scale", self.min_loss_scale, "initial_loss_scale", self.initial_loss_scale)
        p.raise_if_any()


def _not_above(p: Problems, low_name: str, low: float | None, high_name: str, high: float | None) -> None:
    if low is not None and high is not None and low > high:
        p.add(
            low_name,
            f"({low}) is above {high_name} ({high})",
            low,
            fix=f"set optimizer.{low_name} <= optimizer.{high_name}",
        )
