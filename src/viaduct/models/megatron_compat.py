"""`MegatronCompatFields`: Megatron Core `TransformerConfig` fields that viaduct keeps, most of them
without acting on them.

Megatron Bridge YAML files and scripts set these, so they exist here with Megatron's names, types
and defaults: they load, save, round-trip and take overrides like any other field. They are

* the pipeline-parallel settings other than the size (virtual stages, how layers split into stages,
  the schedule, point-to-point options): these are acted on, by `viaduct.distributed.pipeline_split`
  and the pipeline runtime, and checked by `TransformerConfig.finalize()`; they stay here, among
  Megatron's pipeline fields, so that a configuration reads with the fields that shape the model first;
* the switches of features not built yet (mixture of experts, FP8/FP4, expert parallelism,
  activation offloading, CUDA graphs, Transformer Engine): a value other than the default fails
  `finalize()` with "... is not supported yet" (the rules live in `TransformerConfig.finalize()`);
* the settings that only tune such a feature (`moe_router_topk`, `fp8_margin`, ...): accepted, and
  without effect while the feature is not built;
* hints naming Megatron kernels (`masked_softmax_fusion`, `bias_dropout_fusion`, ...): here
  `torch.compile` fuses those operations whatever their value.

`TransformerConfig` inherits them. They are listed after its own fields (in YAML, `--help` and
problem lists: `_fields_listed_last_`), so a configuration reads with the fields that shape the model
first.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from viaduct.config import ConfigBase, DType, unsupported


@dataclass(kw_only=True)
class MegatronCompatFields(ConfigBase):
    """Megatron Core fields kept for compatibility; beyond the pipeline settings, viaduct does not act
    on them (module docstring)."""

    _abstract_config_ = True
    _fields_listed_last_: ClassVar[bool] = True

    # ------------------------------------------------------------------ mixture of experts
    num_moe_experts: int | None = unsupported("mixture-of-experts layers", default=None)
    """Number of experts per MoE layer; unset means dense MLPs."""
    moe_router_topk: int = 2
    """Experts each token is routed to (MoE only; inert while MoE is unsupported)."""
    moe_ffn_hidden_size: int | None = None
    """Hidden size of each expert MLP; unset means ffn_hidden_size (MoE only)."""
    moe_layer_freq: int | list[int] = 1
    """Which layers are MoE: every N-th layer, or a 0/1 pattern per layer (MoE only)."""
    moe_aux_loss_coeff: float = 0.0
    """Weight of the load-balancing auxiliary loss (MoE only)."""
    moe_router_load_balancing_type: str | list[str] = "aux_loss"
    """Load balancing: aux_loss, seq_aux_loss, global_aux_loss, sinkhorn or none (MoE only)."""
    moe_z_loss_coeff: float | None = None
    """Weight of the router z-loss (MoE only)."""
    moe_token_dispatcher_type: Literal["allgather", "alltoall", "flex"] = "allgather"
    """How tokens travel to their experts (MoE only)."""
    moe_grouped_gemm: bool = False
    """Run the experts of a rank as one grouped GEMM (MoE only)."""
    moe_shared_expert_intermediate_size: int | None = None
    """Total hidden size of the shared experts; unset means none (MoE only)."""
    moe_router_score_function: Literal["softmax", "sigmoid"] = "softmax"
    """Router score function (MoE only)."""
    moe_router_pre_softmax: bool = False
    """Apply the softmax before the top-k selection (MoE only)."""
    moe_expert_capacity_factor: float | None = None
    """Tokens per expert as a multiple of the even share; unset means no token dropping (MoE only)."""
    moe_router_enable_expert_bias: bool = False
    """Auxiliary-loss-free balancing with a per-expert bias (MoE only)."""

    # ---------------------------------------------------- pipeline schedules and layouts, expert parallelism
    virtual_pipeline_model_parallel_size: int | None = None
    """Model chunks (virtual stages) per pipeline rank, interleaved along the model; unset: 1, or what
    pipeline_model_parallel_layout implies (needs pipeline parallelism)."""
    expert_model_parallel_size: int = 1
    """Expert-parallel degree (MoE)."""
    expert_tensor_parallel_size: int | None = None
    """Tensor-parallel degree inside each expert; unset means tensor_model_parallel_size (1 with EP > 1)."""
    hierarchical_context_parallel_sizes: list[int] | None = None
    """Sizes of the levels of hierarchical context parallelism (cp_comm_type a2a+p2p)."""
    cp_comm_type: str | list[str] | None = None
    """Context-parallel communication: p2p, a2a, allgather or a2a+p2p (or one per layer)."""
    num_layers_in_first_pipeline_stage: int | None = None
    """Layers on the first pipeline stage (uneven split); unset means an even split."""
    num_layers_in_last_pipeline_stage: int | None = None
    """Layers on the last pipeline stage (uneven split); unset means an even split."""
    account_for_embedding_in_pipeline_split: bool = False
    """Count the embedding as a layer when splitting layers into pipeline stages."""
    account_for_loss_in_pipeline_split: bool = False
    """Count the loss as a layer when splitting layers into pipeline stages."""
    pipeline_model_parallel_layout: str | list[list[str]] | None = None
    """Explicit split of the layers into pipeline stages, e.g. "Et*3|(tt|)*2,tL" (docs/parallelism.md)."""
    pipeline_dtype: DType | None = None
    """Dtype of activations sent between pipeline stages; unset means params_dtype."""
    pipeline_schedule: Literal["1f1b", "interleaved_1f1b", "gpipe", "interleaved_zero_bubble"] | None = None
    """Pipeline schedule (PyTorch's): 1f1b, interleaved_1f1b, gpipe or interleaved_zero_bubble; unset:
    interleaved_1f1b with virtual stages, else 1f1b."""
    microbatch_group_size_per_vp_stage: int | None = None
    """Micro-batches run per virtual stage before switching; unset means pipeline_model_parallel_size
    (the only value PyTorch's interleaved schedules run)."""
    overlap_p2p_comm: bool = False
    """Overlap pipeline send/receive with compute (Megatron's; not available with PyTorch's schedules)."""
    batch_p2p_comm: bool = True
    """Batch pipeline sends and receives into one call (what PyTorch's schedules always do)."""
    variable_seq_lengths: bool = False
    """Send tensor shapes between pipeline stages (not available: stages exchange fixed shapes)."""
    deallocate_pipeline_outputs: bool = True
    """Free a stage's output once it is sent (Megatron's); no effect here: PyTorch's stages keep a sent
    output until its backward."""

    # ------------------------------------------------------------------ FP8 and FP4
    fp8: Literal["e4m3", "hybrid"] | None = unsupported("FP8 training", default=None)
    """FP8 format for the linear layers: e4m3, or hybrid (e4m3 forward, e5m2 gradients)."""
    fp8_recipe: Literal["tensorwise", "delayed", "mxfp8", "blockwise", "custom"] = "delayed"
    """FP8 scaling recipe (only with fp8)."""
    fp8_param: bool = unsupported("FP8 training", default=False)
    """Keep the weights themselves in FP8 (needs fp8)."""
    fp8_margin: int = 0
    """Margin of the FP8 scaling factor (only with fp8)."""
    fp8_amax_history_len: int = 1
    """Length of the amax history window (only with fp8)."""
    fp8_amax_compute_algo: Literal["most_recent", "max"] = "most_recent"
    """How the amax is picked from its history (only with fp8)."""
    fp8_wgrad: bool = True
    """Compute weight gradients in FP8 (only with fp8)."""
    fp8_dot_product_attention: bool = False
    """Run dot-product attention in FP8 (only with fp8)."""
    fp8_multi_head_attention: bool = False
    """Run the whole multi-head attention in FP8 (only with fp8)."""
    first_last_layers_bf16: bool = False
    """Keep the first and last layers in bf16 when training in FP8/FP4."""
    num_layers_at_start_in_bf16: int = 1
    """Layers at the start kept in bf16 (with first_last_layers_bf16)."""
    num_layers_at_end_in_bf16: int = 1
    """Layers at the end kept in bf16 (with first_last_layers_bf16)."""
    fp4: Literal["e2m1"] | None = unsupported("FP4 training", default=None)
    """FP4 format for the linear layers."""
    fp4_recipe: Literal["nvfp4", "custom"] = "nvfp4"
    """FP4 scaling recipe (only with fp4)."""
    fp4_param: bool = unsupported("FP4 training", default=False)
    """Keep the weights themselves in FP4 (needs fp4)."""

    # ------------------------------------------------------------------ activation offloading
    distribute_saved_activations: bool = False
    """Shard recompute checkpoints over the tensor-parallel group (needs tensor parallelism)."""
    cpu_offloading: bool = unsupported("activation offloading to CPU", default=False)
    """Offload activations (and optionally weights) to CPU memory."""
    cpu_offloading_num_layers: int = 0
    """Layers whose activations are offloaded (only with cpu_offloading)."""
    cpu_offloading_activations: bool = True
    """Offload activations (only with cpu_offloading)."""
    cpu_offloading_weights: bool = False
    """Offload weights (only with cpu_offloading)."""
    fine_grained_activation_offloading: bool = unsupported(
        "fine-grained activation offloading", default=False
    )
    """Offload the activations of selected submodules (offload_modules) to CPU."""
    offload_modules: list[str] | None = None
    """Submodules whose activations are offloaded (only with fine_grained_activation_offloading)."""

    # ---------------------------------------------------- Megatron kernels, Transformer Engine, CUDA graphs
    gradient_accumulation_fusion: bool = False
    """Fuse weight-gradient accumulation into the GEMM (a Megatron kernel; no effect in viaduct)."""
    masked_softmax_fusion: bool = True
    """Fuse scale, mask and softmax (viaduct: left to the attention kernel / torch.compile)."""
    cross_entropy_fusion_impl: Literal["native", "te"] = "native"
    """Implementation of the fused cross entropy (te = Transformer Engine, not supported)."""
    bias_activation_fusion: bool = False
    """Fuse bias add and activation (a hint for torch.compile)."""
    bias_dropout_fusion: bool = False
    """Fuse bias add, dropout and residual add (a hint for torch.compile)."""
    apply_rope_fusion: bool = False
    """Use a fused rotary-embedding kernel (a hint for torch.compile)."""
    persist_layer_norm: bool = False
    """Use the persistent layer-norm kernel (a Megatron kernel; no effect in viaduct)."""
    use_te_rng_tracker: bool = False
    """Use Transformer Engine's RNG tracker (kept in sync with rng.te_rng_tracker)."""
    cuda_graph_impl: Literal["none", "local", "transformer_engine", "full_iteration"] = "none"
    """Replay CUDA graphs: none, or local (torch.compile's CUDA graphs of the compiled model, one GPU)."""
    deterministic_mode: bool = unsupported("deterministic-only kernels", default=False)
    """Use deterministic kernels only (bitwise reproducible, slower)."""
