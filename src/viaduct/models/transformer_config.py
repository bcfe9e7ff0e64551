"""`TransformerConfig`: the architecture, parallelism and precision fields every model family shares.

Names follow Megatron Core's `TransformerConfig` / `ModelParallelConfig`; defaults are the
*effective `GPTModelProvider` defaults* (spec §1.1), so a Megatron Bridge YAML means the same here.
Fields that only make sense for Transformer Engine or that hold runtime callables are left out and
listed in `_legacy_fields_` (loading a Megatron YAML that has them drops them with a note).

`finalize()` derives what Megatron fills in place (`ffn_hidden_size = 4 * hidden_size`, ...) but only
where the user left the field unset, and it remembers what it derived: editing `hidden_size` and
finalizing again recomputes `ffn_hidden_size`, while a value the user set is never overwritten.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from viaduct.config import ConfigBase, DType, FunctionRef, Problems, derived, unsupported
from viaduct.config import provenance as prov
from viaduct.models.enums import AttnBackend

# What `recompute_modules` may name (Megatron Core's choices).
RECOMPUTE_MODULES = ("core_attn", "mlp", "layernorm", "moe", "moe_act", "shared_experts", "mla_up_proj")
_MOE_RECOMPUTE_MODULES = ("moe", "moe_act", "shared_experts", "mla_up_proj")
# Recomputing a norm only pays if its output is discarded after the next GEMM reads it (Megatron's
# CheckpointWithoutOutput); plain checkpointing would keep both and save nothing.
_UNSUPPORTED_RECOMPUTE = ("layernorm",)
_FLOAT_DTYPES = ("float32", "bfloat16", "float16")


@dataclass(kw_only=True)
class TransformerConfig(ConfigBase):
    """Transformer architecture, parallel sizes and precision shared by GPT, T5 and Mamba models."""

    _abstract_config_ = True

    # ------------------------------------------------------------------ architecture
    num_layers: int = 0
    """Number of transformer layers (must be set)."""
    hidden_size: int = 0
    """Model width: the size of the hidden states (must be set)."""
    num_attention_heads: int = 0
    """Number of query attention heads (must be set)."""
    num_query_groups: int | None = None
    """Key/value head groups for grouped-query attention; unset means one per head (plain multi-head)."""
    ffn_hidden_size: int | None = None
    """Hidden size of the MLP; unset means 4 x hidden_size."""
    kv_channels: int | None = None
    """Size of each attention head; unset means hidden_size / num_attention_heads."""
    hidden_dropout: float = 0.1
    """Dropout probability on the hidden states (after attention and after the MLP)."""
    attention_dropout: float = 0.1
    """Dropout probability on the attention weights."""
    fp32_residual_connection: bool = False
    """Keep the residual stream in float32."""
    apply_residual_connection_post_layernorm: bool = False
    """Take the residual after the layer norm (original BERT ordering) instead of before it."""
    normalization: Literal["LayerNorm", "RMSNorm"] = "LayerNorm"
    """Normalization layer type."""
    layernorm_epsilon: float = 1e-5
    """Epsilon of every LayerNorm / RMSNorm."""
    layernorm_zero_centered_gamma: bool = False
    """Store the norm scale as (gamma - 1) ("1p" layer norm), which helps weight decay."""
    add_bias_linear: bool = True
    """Give every linear layer a bias."""
    add_qkv_bias: bool = False
    """Give only the query/key/value projection a bias."""
    gated_linear_unit: bool = False
    """Gated MLP: fc1 produces two halves, act(a) * b (with silu this is SwiGLU)."""
    activation_func: FunctionRef = FunctionRef("gelu")
    """MLP activation: gelu, silu, relu, squared_relu, fast_gelu, quick_gelu, ... or a dotted path."""
    qk_layernorm: bool = False
    """Normalize queries and keys (with `normalization`) before attention."""
    window_size: tuple[int, int] | None = None
    """Sliding-window attention as (left, right) tokens; -1 means unbounded on that side; unset = full."""
    softmax_scale: float | None = None
    """Attention score scale; unset means 1 / sqrt(kv_channels)."""
    attention_softmax_in_fp32: bool = False
    """Softmax in float32 on the unfused attention path (the fused kernels always accumulate in float32)."""
    apply_query_key_layer_scaling: bool = False
    """fp16 stabilizer: implies attention_softmax_in_fp32 (fused kernels never hold scores in fp16)."""
    attention_backend: AttnBackend = AttnBackend.auto
    """Attention kernel: flash, fused (cuDNN/efficient), unfused, local (math) or auto (PyTorch picks)."""
    calculate_per_token_loss: bool = False
    """Normalize the loss by the number of non-padded tokens in the global batch, not per micro-batch."""
    init_method_std: float = 0.02
    """Standard deviation of the normal weight init (output layers are scaled by 1/sqrt(2 x num_layers))."""
    embedding_init_method_std: float | None = None
    """Standard deviation of the embedding init; unset means init_method_std."""

    # ------------------------------------------------------------------ language-model input/output
    vocab_size: int | None = None
    """Unpadded vocabulary size; filled from the tokenizer when unset."""
    should_pad_vocab: bool = False
    """Pad the vocabulary to a multiple of make_vocab_size_divisible_by x tensor_model_parallel_size."""
    make_vocab_size_divisible_by: int = 128
    """Vocabulary padding multiple (only with should_pad_vocab)."""
    seq_length: int = 1024
    """Maximum sequence length; must match dataset.seq_length (the container syncs them)."""
    position_embedding_type: Literal["learned_absolute", "rope", "yarn", "none"] = "learned_absolute"
    """Positions: learned absolute embeddings, rotary (rope), YaRN-scaled rotary, or none."""
    rotary_base: int = 10000
    """Rotary embedding base (theta)."""
    rotary_percent: float = 1.0
    """Fraction of each head's dimensions that get rotary embeddings, in (0, 1]."""
    rotary_interleaved: bool = False
    """Rotate interleaved (even, odd) pairs (RoFormer) instead of the two halves (Llama)."""
    rope_scaling: bool = False
    """Llama-3.1-style rotary frequency scaling (needs position_embedding_type rope)."""
    rope_scaling_factor: float = 1.0
    """Factor of the Llama-3.1-style rotary scaling."""
    seq_len_interpolation_factor: float | None = None
    """Linear position interpolation: positions are divided by this factor."""

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

    # ------------------------------------------------------------------ parallelism
    tensor_model_parallel_size: int = 1
    """Tensor-parallel degree: attention heads and MLP columns split over this many GPUs."""
    pipeline_model_parallel_size: int = 1
    """Pipeline-parallel degree: layers split into this many stages."""
    virtual_pipeline_model_parallel_size: int | None = None
    """Interleaved model chunks per pipeline rank (needs pipeline parallelism)."""
    context_parallel_size: int = 1
    """Context-parallel degree: the sequence split over this many GPUs for attention."""
    sequence_parallel: bool = False
    """Shard norms/dropout activations along the sequence inside the tensor-parallel group."""
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
    """Explicit pipeline layout, e.g. "Et*3|(tt|)*29,m|L"."""
    pipeline_dtype: DType | None = None
    """Dtype of activations sent between pipeline stages; unset means params_dtype."""
    microbatch_group_size_per_vp_stage: int | None = None
    """Micro-batches run per virtual stage before switching; unset means pipeline_model_parallel_size."""
    overlap_p2p_comm: bool = False
    """Overlap pipeline send/receive with compute (excludes batch_p2p_comm)."""
    batch_p2p_comm: bool = True
    """Batch pipeline sends and receives into one call."""
    variable_seq_lengths: bool = False
    """Send tensor shapes between pipeline stages (sequence length varies between batches)."""
    deallocate_pipeline_outputs: bool = True
    """Free a stage's output activations once they are sent."""

    # ------------------------------------------------------------------ precision
    fp16: bool = False
    """Train in float16 (with loss scaling); excludes bf16."""
    bf16: bool = False
    """Train in bfloat16; excludes fp16."""
    params_dtype: DType = DType("float32")
    """Dtype of the weights when they are created."""
    autocast_dtype: DType | None = None
    """Dtype of autocast regions; unset means params_dtype."""
    enable_autocast: bool = False
    """Run the forward pass under torch.autocast with autocast_dtype."""
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

    # ------------------------------------------------------------------ memory
    recompute_granularity: Literal["full", "selective"] | None = None
    """Activation recompute: full layers, selected submodules (recompute_modules), or none."""
    recompute_method: Literal["uniform", "block"] | None = None
    """With full recompute: uniform chunks of recompute_num_layers, or the first N layers per stage."""
    recompute_num_layers: int | None = None
    """With full recompute: layers per recompute chunk (uniform) or recomputed per stage (block)."""
    recompute_modules: list[str] | None = None
    """Submodules recomputed with selective recompute; unset means ["core_attn"]."""
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

    # ------------------------------------------------------------------ kernels and initialization
    gradient_accumulation_fusion: bool = False
    """Fuse weight-gradient accumulation into the GEMM (a Megatron kernel; no effect in viaduct)."""
    masked_softmax_fusion: bool = True
    """Fuse scale, mask and softmax (viaduct: left to the attention kernel / torch.compile)."""
    cross_entropy_loss_fusion: bool = True
    """Fuse output layer and cross entropy in chunks, not holding all logits (CPU: only past 4 GiB)."""
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
    use_cpu_initialization: bool = False
    """Create the weights on the CPU, then move them."""
    perform_initialization: bool = True
    """Initialize the weights (off when they are loaded right after)."""
    init_model_with_meta_device: bool = False
    """Build the model on the meta device and materialize it after sharding."""
    use_te_rng_tracker: bool = False
    """Use Transformer Engine's RNG tracker (kept in sync with rng.te_rng_tracker)."""
    cuda_graph_impl: Literal["none", "local", "transformer_engine", "full_iteration"] = unsupported(
        "CUDA graphs", default="none"
    )
    """Capture CUDA graphs: none, per layer (local / transformer_engine) or the whole iteration."""
    tp_comm_overlap: bool = unsupported("tensor-parallel communication overlap", default=False)
    """Overlap tensor-parallel communication with GEMMs (set through comm_overlap)."""
    deterministic_mode: bool = False
    """Use deterministic kernels only (bitwise reproducible, slower)."""

    # ------------------------------------------------------------------ derived
    effective_attention_softmax_in_fp32: bool = derived(False)
    """Whether the softmax runs in float32: attention_softmax_in_fp32 or apply_query_key_layer_scaling."""

    _legacy_fields_: ClassVar[dict[str, str]] = {
        "transformer_layer_spec": "viaduct builds its own layers; no Transformer Engine layer specs",
        "transformer_impl": "viaduct has one pure-PyTorch implementation",
        "use_transformer_engine_full_layer_spec": "no Transformer Engine layers",
        "use_transformer_engine_op_fuser": "no Transformer Engine layers",
        "use_kitchen": "no Transformer Engine / kitchen quantization",
        "timers": "runtime object, never configuration",
        "finalize_model_grads_func": "runtime hook installed by the training loop",
        "grad_scale_func": "runtime hook installed by the training loop",
        "moe_grad_scale_func": "runtime hook installed by the training loop",
        "no_sync_func": "runtime hook installed by the training loop",
        "grad_sync_func": "runtime hook installed by the training loop",
        "param_sync_func": "runtime hook installed by the training loop",
        "init_method": "derived from init_method_std",
        "output_layer_init_method": "derived from init_method_std and num_layers",
        "embedding_init_method": "derived from embedding_init_method_std",
        "tp_comm_overlap_cfg": "tensor-parallel overlap (Transformer Engine userbuffers) is not supported",
        "tp_comm_bootstrap_backend": "tensor-parallel overlap is not supported",
        "tp_only_amax_red": "FP8 is not supported",
        "fp8_interval": "deprecated in Transformer Engine, ignored",
        "activation_func_fp8_input_store": "FP8 is not supported",
        "enable_cuda_graph": "CUDA graphs are not supported (see cuda_graph_impl)",
        "cuda_graph_scope": "CUDA graphs are not supported",
        "cuda_graph_warmup_steps": "CUDA graphs are not supported",
        "restore_modelopt_state": "no ModelOpt integration",
        "generation_config": "Hugging Face generation settings are not training configuration",
        "mtp_enabled": "multi-token prediction is not supported (see mtp_num_layers)",
        "rotary_scaling_factor": "multi-latent-attention rotary scaling is not supported",
        "yarn_rotary_scaling_factor": "YaRN is not supported",
        "yarn_original_max_position_embeddings": "YaRN is not supported",
        "yarn_beta_fast": "YaRN is not supported",
        "yarn_beta_slow": "YaRN is not supported",
        "yarn_mscale": "YaRN is not supported",
        "yarn_mscale_all_dim": "YaRN is not supported",
        "yarn_correction_range_round_to_int": "YaRN is not supported",
        "memory_efficient_layer_norm": "Apex kernel; viaduct uses torch's norms",
        "bias_dropout_add_fusion": "older name of bias_dropout_fusion; a torch.compile hint",
        "barrier_with_L1_time": "Megatron timer option",
        "test_mode": "Megatron internal test switch",
    }

    # ------------------------------------------------------------------ finalize

    def finalize(self) -> None:
        """Derive unset sizes and dtypes, then check every rule; raise `ConfigError` with all problems."""
        self._undo_own_derivations()
        p = Problems()
        p.extend(self.check_types())
        bad = {q.path.split(".", 1)[0].split("[", 1)[0] for q in p.items}
        self._derive_defaults(bad)
        self._check_architecture(p, bad)
        self._check_precision(p, bad)
        self._check_memory(p, bad)
        self._check_parallelism(p, bad)
        p.raise_if_any()

    def _derive_defaults(self, bad: set[str]) -> None:
        def ok(*names: str) -> bool:
            return not bad.intersection(names)

        h, heads = self.hidden_size, self.num_attention_heads
        if ok("num_query_groups", "num_attention_heads") and self.num_query_groups is None and heads > 0:
            self._derive("num_query_groups", heads, "= num_attention_heads", own=True)
        if ok("kv_channels", "hidden_size", "num_attention_heads") and self.kv_channels is None:
            if h > 0 and heads > 0 and h % heads == 0:
                self._derive("kv_channels", h // heads, "= hidden_size / num_attention_heads", own=True)
        if ok("ffn_hidden_size", "hidden_size") and self.ffn_hidden_size is None and h > 0:
            self._derive("ffn_hidden_size", 4 * h, "= 4 x hidden_size", own=True)
        if ok("autocast_dtype", "params_dtype") and self.autocast_dtype is None:
            self._derive("autocast_dtype", self.params_dtype, "= params_dtype", own=True)
        if ok("embedding_init_method_std", "init_method_std") and self.embedding_init_method_std is None:
            self._derive("embedding_init_method_std", self.init_method_std, "= init_method_std", own=True)
        if ok("recompute_modules") and self.recompute_modules is None:
            self._derive("recompute_modules", ["core_attn"], "default selective recompute", own=True)
        tp, pp, ep = (
            self.tensor_model_parallel_size,
            self.pipeline_model_parallel_size,
            self.expert_model_parallel_size,
        )
        if ok("expert_tensor_parallel_size", "tensor_model_parallel_size", "expert_model_parallel_size"):
            if self.expert_tensor_parallel_size is None:
                etp, why = (
                    (1, "1 with expert parallelism") if ep > 1 else (tp, "= tensor_model_parallel_size")
                )
                self._derive("expert_tensor_parallel_size", etp, why, own=True)
        if ok("microbatch_group_size_per_vp_stage", "pipeline_model_parallel_size"):
            if self.microbatch_group_size_per_vp_stage is None:
                self._derive(
                    "microbatch_group_size_per_vp_stage", pp, "= pipeline_model_parallel_size", own=True
                )
        if ok("pipeline_dtype", "params_dtype", "pipeline_model_parallel_size"):
            if self.pipeline_dtype is None and pp > 1:
                self._derive(
                    "pipeline_dtype", self.params_dtype, "= params_dtype with pipeline parallelism", own=True
                )
        fp32_softmax = bool(self.attention_softmax_in_fp32 or self.apply_query_key_layer_scaling)
        self._derive(
            "effective_attention_softmax_in_fp32",
            fp32_softmax,
            "attention_softmax_in_fp32 or apply_query_key_layer_scaling",
        )

    def _rule(
        self, p: Problems, bad: set[str], name: str, test: Any, rule: str, fix: str, *deps: str
    ) -> None:
        """Report `name` when `test(value)` holds; skipped when it or `deps` already have a type problem."""
        if not bad.intersection((name, *deps)):
            value = getattr(self, name)
            if test(value):
                p.add(name, rule, value, fix=fix)

    def _check_architecture(self, p: Problems, bad: set[str]) -> None:
        def r(name: str, test: Any, rule: str, fix: str, *deps: str) -> None:
            self._rule(p, bad, name, test, rule, fix, *deps)

        for name in ("num_layers", "hidden_size", "num_attention_heads"):
            r(name, lambda v: v <= 0, "must be set (> 0)", f"set model.{name} to a positive number")
        heads = self.num_attention_heads if "num_attention_heads" not in bad else 0
        hidden = self.hidden_size if "hidden_size" not in bad else 0
        r(
            "num_query_groups",
            lambda g: g is not None and g <= 0,
            "must be > 0",
            "set model.num_query_groups to a divisor of model.num_attention_heads, or unset it",
        )
        r(
            "num_query_groups",
            lambda g: g is not None and g > 0 and heads > 0 and heads % g,
            f"must divide num_attention_heads ({heads})",
            "set model.num_query_groups to a divisor of model.num_attention_heads",
        )
        r(
            "num_attention_heads",
            lambda n: self.kv_channels is None and n > 0 and hidden > 0 and hidden % n,
            f"must divide hidden_size ({hidden}) when kv_channels is unset",
            "change model.num_attention_heads or model.hidden_size, or set model.kv_channels (head size)",
            "kv_channels",
        )
        for name in (
            "ffn_hidden_size",
            "kv_channels",
            "vocab_size",
            "softmax_scale",
            "seq_len_interpolation_factor",
            "embedding_init_method_std",
        ):
            r(
                name,
                lambda v: v is not None and v <= 0,
                "must be > 0 when set",
                f"set model.{name} > 0 or unset it",
            )
        for name in (
            "seq_length",
            "make_vocab_size_divisible_by",
            "layernorm_epsilon",
            "init_method_std",
            "rotary_base",
            "rope_scaling_factor",
        ):
            r(name, lambda v: v <= 0, "must be > 0", f"set model.{name} to a positive value")
        for name in ("hidden_dropout", "attention_dropout"):
            r(name, lambda v: not 0.0 <= v < 1.0, "must be in [0, 1)", f"set model.{name} to e.g. 0.0 or 0.1")
        r(
            "rotary_percent",
            lambda v: not 0.0 < v <= 1.0,
            "must be in (0, 1]",
            "set model.rotary_percent to the fraction of each head to rotate, e.g. 1.0",
        )
        r(
            "position_embedding_type",
            lambda v: v == "yarn",
            "YaRN rotary scaling is not supported yet",
            "set model.position_embedding_type=rope (with model.rope_scaling for long context)",
        )
        r(
            "rope_scaling",
            lambda v: v and self.position_embedding_type != "rope",
            "needs position_embedding_type 'rope'",
            "set model.position_embedding_type=rope or model.rope_scaling=false",
            "position_embedding_type",
        )
        r(
            "window_size",
            lambda v: v is not None and any(w < -1 for w in v),
            "entries must be >= 0 (or -1 for unbounded)",
            "set model.window_size to (left, right) or unset it",
        )
        r(
            "window_size",
            lambda v: v is not None and all(w >= -1 for w in v) and v[1] not in (0, -1),
            "the right side must be 0 or -1: decoder attention is causal, it never looks ahead",
            "set model.window_size to (left, 0)",
        )

    def _check_precision(self, p: Problems, bad: set[str]) -> None:
        def r(name: str, test: Any, rule: str, fix: str, *deps: str) -> None:
            self._rule(p, bad, name, test, rule, fix, *deps)

        r(
            "bf16",
            lambda v: v and self.fp16,
            "fp16 and bf16 cannot both be true",
            "set model.fp16 or model.bf16 to false (or use mixed_precision=bf16_mixed)",
        )
        for name in ("params_dtype", "pipeline_dtype", "autocast_dtype"):
            r(
                name,
                lambda v: v is not None and DType.canonical_name(v) not in _FLOAT_DTYPES,
                "must be float32, bfloat16 or float16",
                f"set model.{name}=bf16 (or fp32)",
            )
        r(
            "params_dtype",
            lambda v: (self.fp16 and v == DType("bfloat16")) or (self.bf16 and v == DType("float16")),
            "contradicts fp16/bf16",
            "make model.params_dtype match model.fp16/bf16 (or use mixed_precision)",
        )
        r(
            "cross_entropy_fusion_impl",
            lambda v: v == "te",
            "Transformer Engine cross entropy is not supported yet",
            "set model.cross_entropy_fusion_impl=native",
        )

    def _check_memory(self, p: Problems, bad: set[str]) -> None:
        def r(name: str, test: Any, rule: str, fix: str, *deps: str) -> None:
            self._rule(p, bad, name, test, rule, fix, "recompute_granularity", *deps)

        full = self.recompute_granularity == "full"
        r(
            "recompute_method",
            lambda v: full and v is None,
            "must be set with recompute_granularity 'full'",
            "set model.recompute_method=uniform (or block)",
        )
        r(
            "recompute_num_layers",
            lambda v: full and v is None,
            "must be set with recompute_granularity 'full'",
            "set model.recompute_num_layers (e.g. 1)",
        )
        r(
            "recompute_num_layers",
            lambda v: full and v is not None and not 1 <= v <= max(self.num_layers, 1),
            f"must be in [1, num_layers ({self.num_layers})]",
            "set model.recompute_num_layers",
            "num_layers",
        )
        for name in ("recompute_method", "recompute_num_layers"):
            r(
                name,
                lambda v: not full and v is not None,
                "only applies to recompute_granularity 'full'",
                f"unset model.{name}, or set model.recompute_granularity=full",
            )
        modules = self.recompute_modules if "recompute_modules" not in bad else None
        unknown = [m for m in modules or () if m not in RECOMPUTE_MODULES]
        r(
            "recompute_modules",
            lambda v: unknown,
            f"unknown module(s): {', '.join(map(repr, unknown))}",
            f"choose from {', '.join(RECOMPUTE_MODULES)}",
        )
        r(
            "distribute_saved_activations",
            lambda v: v and self.sequence_parallel,
            "cannot be combined with sequence_parallel",
            "set model.distribute_saved_activations=false",
        )
        r(
            "distribute_saved_activations",
            lambda v: v and not self.sequence_parallel,
            "needs tensor parallelism, which is not supported yet",
            "set model.distribute_saved_activations=false",
        )
        norms = [m for m in modules or () if m in _UNSUPPORTED_RECOMPUTE]
        r(
            "recompute_modules",
            lambda v: self.recompute_granularity == "selective" and norms,
            "recomputing 'layernorm' is not supported yet (it would save no memory here)",
            "recompute core_attn or mlp, or use recompute_granularity=full",
        )
        moe_only = [m for m in modules or () if m in _MOE_RECOMPUTE_MODULES]
        r(
            "recompute_modules",
            lambda v: self.recompute_granularity == "selective" and moe_only,
            f"{', '.join(map(repr, moe_only))} recompute mixture-of-experts or multi-latent attention "
            "parts, which are not supported yet",
            "recompute core_attn or mlp",
        )

    def _check_parallelism(self, p: Problems, bad: set[str]) -> None:
        def r(name: str, test: Any, rule: str, fix: str, *deps: str) -> None:
            self._rule(p, bad, name, test, rule, fix, *deps)

        for name, what in (
            ("tensor_model_parallel_size", "tensor parallelism"),
            ("pipeline_model_parallel_size", "pipeline parallelism"),
            ("context_parallel_size", "context parallelism"),
            ("expert_model_parallel_size", "expert parallelism"),
        ):
            r(name, lambda v: v < 1, "must be >= 1", f"set model.{name}=1")
            r(name, lambda v: v > 1, f"{what} is not supported yet", f"set model.{name}=1")
        pp = self.pipeline_model_parallel_size if "pipeline_model_parallel_size" not in bad else 1
        vpp_rule = "needs pipeline_model_parallel_size > 1" if pp <= 1 else "is not supported yet"
        r(
            "virtual_pipeline_model_parallel_size",
            lambda v: v is not None,
            f"virtual pipeline parallelism {vpp_rule}",
            "unset model.virtual_pipeline_model_parallel_size",
        )
        r(
            "expert_tensor_parallel_size",  # a derived value follows TP, which is reported itself
            lambda v: (
                v not in (None, 1) and not prov.is_derived(self.source_of("expert_tensor_parallel_size"))
            ),
            "expert tensor parallelism is not supported yet",
            "unset model.expert_tensor_parallel_size",
        )
        tp = self.tensor_model_parallel_size
        sp_rule = "needs tensor_model_parallel_size > 1" if tp == 1 else "is not supported yet"
        r("sequence_parallel", bool, f"sequence parallelism {sp_rule}", "set model.sequence_parallel=false")
        for name in (
            "num_layers_in_first_pipeline_stage",
            "num_layers_in_last_pipeline_stage",
            "pipeline_model_parallel_layout",
            "account_for_embedding_in_pipeline_split",
            "account_for_loss_in_pipeline_split",
        ):
            r(
                name,
                lambda v: pp <= 1 and v not in (None, False),
                "only applies with pipeline parallelism (pipeline_model_parallel_size > 1)",
                f"unset model.{name}",
            )
        r(
            "overlap_p2p_comm",
            lambda v: v and self.batch_p2p_comm,
            "cannot be combined with batch_p2p_comm",
            "set model.batch_p2p_comm=false (or model.overlap_p2p_comm=false)",
        )
