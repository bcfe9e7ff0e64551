"""`dist` (process-group initialization) and `ddp` (data-parallel gradient reduction).

Plain data parallelism replicates the model and all-reduces gradients in buckets (DDP). The sharded
variants (the distributed optimizer, Megatron-FSDP, FSDP2) all run on PyTorch FSDP2; how each
Megatron setting maps onto it is documented in `viaduct.distributed.layout` and docs/parallelism.md.
"""

from dataclasses import dataclass
from typing import ClassVar, Literal

from viaduct.config import ConfigBase, Problems, unsupported
from viaduct.training.config._checks import positive

_DIST_OPT = "the distributed optimizer"


@dataclass(kw_only=True)
class DistributedInitConfig(ConfigBase):
    """How the processes form their process groups."""

    _component_: ClassVar[str] = "dist"

    distributed_backend: Literal["nccl", "gloo"] = "nccl"
    """Collective backend on GPUs; CPU-only runs use gloo whatever this says."""

    distributed_timeout_minutes: int = 10
    """Timeout of collectives during setup (and afterwards unless distributed_timeout_seconds_after_init)."""

    distributed_timeout_seconds_after_init: int | None = None
    """Shorter collective timeout applied once the first step has finished."""

    align_grad_reduce: bool = True
    """With pipeline parallelism, each stage starts its gradient reduction alone (False: all together)."""

    local_rank: int = 0
    """Rank within the node; the launcher's LOCAL_RANK environment variable takes precedence at runtime."""

    external_gpu_device_mapping: bool = False
    """GPU visibility is managed outside (CUDA_VISIBLE_DEVICES per process): use device 0, not local_rank."""

    use_gloo_process_groups: bool = True
    """Also create gloo (CPU) process groups, used for host-side collectives such as checkpoint metadata."""

    lazy_mpu_init: bool = unsupported(
        "lazy (externally completed) process-group initialization", default=False
    )
    """Skip process-group creation and return a function that completes it (for external managers)."""

    use_torch_fsdp2: bool = False
    """Shard parameters, gradients and optimizer state with PyTorch FSDP2 (strategy optim_grads_params)."""

    use_megatron_fsdp: bool = False
    """Megatron-FSDP's switch: viaduct runs it on FSDP2 too (strategy optim_grads_params)."""

    use_tp_pp_dp_mapping: bool = unsupported("the tp-cp-ep-pp-dp rank order", default=False)
    """Order ranks tensor-context-expert-pipeline-data instead of tensor-context-expert-data-pipeline."""

    nccl_communicator_config_path: str | None = unsupported(
        "per-communicator NCCL configuration", default=None
    )
    """YAML file with NCCL settings per communicator (CTAs, cluster size)."""

    use_sharp: bool = unsupported("SHARP in-network reductions", default=False)
    """Use InfiniBand SHARP for data-parallel collectives."""

    sharp_enabled_group: Literal["dp", "dp_replica"] | None = unsupported(
        "SHARP in-network reductions", default=None
    )
    """Process group that uses SHARP."""

    high_priority_stream_groups: list[str] = unsupported(  # noqa: RUF009
        "high-priority communication streams", default_factory=list
    )
    """Process groups whose NCCL streams get high priority."""

    eval_context_parallel_size: int | None = unsupported(
        "a separate context-parallel size for evaluation", default=None
    )
    """Context-parallel size used for evaluation instead of the training one."""

    flight_recorder_dump_path: str | None = None
    """NCCL flight-recorder dump file prefix (a directory gets "_dump_" appended); None leaves it off."""

    flight_recorder_trace_buffer_size: int = 2000
    """Collectives the NCCL flight recorder keeps per process group (TORCH_NCCL_TRACE_BUFFER_SIZE)."""

    flight_recorder_dump_on_timeout: bool = True
    """Dump the flight-recorder trace when a collective times out (TORCH_NCCL_DUMP_ON_TIMEOUT)."""

    flight_recorder_include_stack_trace: bool = False
    """Record Python stack traces with each collective (TORCH_INCLUDE_STACK_TRACE)."""

    flight_recorder_include_only_active: bool = True
    """Dump only collectives still in flight (TORCH_INCLUDE_ONLY_ACTIVE)."""

    flight_recorder_extra_dump_on_exec: bool = True
    """Also dump when the NCCL watchdog detects an exception (TORCH_NCCL_EXTRA_DUMP_ON_EXEC)."""

    _legacy_fields_: ClassVar[dict[str, str]] = {
        "lazy_init": "renamed lazy_mpu_init",
        "disable_jit_fuser": "viaduct uses no TorchScript fusers",
        "enable_megatron_core_experimental": "Megatron Core switch",
        "use_decentralized_pg": "viaduct always passes process groups explicitly",
    }

    def finalize(self) -> None:
        """Check timeouts, the local rank and the flight-recorder settings."""
        p = Problems()
        positive(p, self, "distributed_timeout_minutes")
        positive(p, self, "distributed_timeout_seconds_after_init")
        positive(p, self, "local_rank", zero_ok=True)
        positive(p, self, "flight_recorder_trace_buffer_size", zero_ok=True)
        if self.flight_recorder_dump_path is not None and not self.flight_recorder_dump_path.strip():
            p.add(
                "flight_recorder_dump_path",
                "is empty",
                self.flight_recorder_dump_path,
                fix="set dist.flight_recorder_dump_path to a file prefix or directory, or to None",
            )
        p.raise_if_any()


@dataclass(kw_only=True)
class DistributedDataParallelConfig(ConfigBase):
    """Data-parallel gradient reduction: buckets, precision, checks."""

    _component_: ClassVar[str] = "ddp"

    grad_reduce_in_fp32: bool = False
    """Accumulate and reduce gradients in fp32 (recommended with bf16)."""

    overlap_grad_reduce: bool = False
    """Start reducing a gradient bucket as soon as backward has filled it."""

    bucket_size: int | None = None
    """Parameters per gradient bucket; None uses max(40M, 1M × data-parallel size)."""

    num_buckets: int | None = None
    """Number of gradient buckets (instead of bucket_size)."""

    average_in_collective: bool = False
    """Average inside the collective instead of dividing by the data-parallel size before it."""

    check_for_nan_in_grad: bool = False
    """Check gradients for NaN and Inf before reducing them."""

    check_for_large_grads: bool = False
    """Warn when the gradient norm exceeds 10 × the largest of the last 100 steps (reads it every step)."""

    use_distributed_optimizer: bool = False
    """Shard optimizer state over data-parallel ranks, on FSDP2 (strategy optim unless set otherwise)."""

    overlap_param_gather: bool = False
    """Sharded: gather the next layer's parameters while the current one computes (explicit prefetch)."""

    align_param_gather: bool = unsupported(_DIST_OPT, default=False)
    """Start the parameter all-gathers of all pipeline stages together."""

    num_distributed_optimizer_instances: int = 1
    """Sharded: shard within groups of DP / this ranks, replicate across this many groups (hybrid)."""

    reduce_scatter_with_fp32_accumulation: bool = unsupported(_DIST_OPT, default=False)
    """Reduce-scatter in low precision with fp32 accumulation."""

    param_name_patterns_for_fp32_local_accumulation: tuple[str, ...] = unsupported(
        "fp32 local gradient accumulation by parameter name", default=()
    )
    """fnmatch patterns of parameters whose gradients accumulate locally in fp32."""

    pad_buckets_for_high_nccl_busbw: bool = unsupported(
        "bucket padding for NCCL bus bandwidth", default=False
    )
    """Pad buckets to a multiple of 2**16 elements."""

    fp8_param_gather: bool = unsupported("FP8 training", default=False)
    """Keep parameters in fp8 and all-gather them in fp8."""

    fp4_param_gather: bool = unsupported("FP4 training", default=False)
    """Keep parameters in nvfp4 and all-gather them in nvfp4."""

    reuse_grad_buf_for_mxfp8_param_ag: bool = unsupported("MXFP8 parameter all-gather", default=False)
    """Reuse the gradient buffer for the MXFP8 parameter all-gather."""

    use_megatron_fsdp: bool = False
    """Use Megatron-FSDP: viaduct runs it on FSDP2 (strategy optim_grads_params unless set otherwise)."""

    data_parallel_sharding_strategy: Literal["no_shard", "optim", "optim_grads", "optim_grads_params"] = (
        "no_shard"
    )
    """What data-parallel ranks shard: optimizer state, + gradients, + parameters (ZeRO-1/2/3)."""

    delay_wgrad_compute: bool = unsupported("delayed weight-gradient computation", default=False)
    """Delay weight-gradient computation to overlap it with communication."""

    _legacy_fields_: ClassVar[dict[str, str]] = {
        **{
            name: "Megatron-FSDP internals (Megatron-FSDP is not built)"
            for name in (
                "use_custom_fsdp",
                "megatron_fsdp_version",
                "outer_dp_sharding_strategy",
                "suggested_communication_unit_size",
                "preserve_fp32_weights",
                "keep_fp8_transpose_cache",
                "nccl_ub",
                "fsdp_double_buffer",
                "fsdp_manual_registration",
                "disable_symmetric_registration",
            )
        },
        "gradient_reduce_div_fusion": "a kernel-fusion detail chosen by viaduct",
    }

    def finalize(self) -> None:
        """Check the bucket settings."""
        p = Problems()
        positive(p, self, "bucket_size")
        positive(p, self, "num_buckets")
        positive(p, self, "num_distributed_optimizer_instances")
        if self.bucket_size is not None and self.num_buckets is not None:
            p.add(
                "num_buckets",
                "bucket_size and num_buckets both set the bucketing",
                self.num_buckets,
                fix="remove ddp.num_buckets or ddp.bucket_size",
            )
        p.raise_if_any()
