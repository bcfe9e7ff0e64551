"""`TransformerConfig`: the architecture, parallelism and precision fields every model family shares.

Names follow Megatron Core's `TransformerConfig` / `ModelParallelConfig`; defaults are Megatron
Bridge's effective `GPTModelProvider` defaults, so a Megatron Bridge YAML means the same here.
The fields viaduct does not act on (mixture of experts, FP8, kernel-fusion hints, ...) live in the
base class `MegatronCompatFields` (`viaduct.models.megatron_compat`); this module declares the ones
that shape the model and its run, and the rules for all of them. Fields that only make sense for
Transformer Engine or that hold runtime callables are left out and listed in `_legacy_fields_`
(loading a Megatron YAML that has them drops them with a note).

`finalize()` derives what Megatron fills in place (`ffn_hidden_size = 4 * hidden_size`, ...) but only
where the user left the field unset, and it remembers what it derived: editing `hidden_size` and
finalizing again recomputes `ffn_hidden_size`, while a value the user set is never overwritten.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from viaduct.config import DType, FunctionRef, Problems, derived, fields_with_problems
from viaduct.config import provenance as prov
from viaduct.distributed.pipeline_split import SINGLE_STAGE_SCHEDULES, num_virtual_stages, split_problems
from viaduct.models.enums import AttnBackend
from viaduct.models.megatron_compat import MegatronCompatFields

Normalization = Literal["LayerNorm", "RMSNorm"]
"""The norm layer types (`normalization`)."""
PositionEmbeddingType = Literal["learned_absolute", "rope", "yarn", "none"]
"""How positions enter the model (`position_embedding_type`)."""

# What `recompute_modules` may name (Megatron Core's choices).
RECOMPUTE_MODULES = ("core_attn", "mlp", "layernorm", "moe", "moe_act", "shared_experts", "mla_up_proj")
_MOE_RECOMPUTE_MODULES = ("moe", "moe_act", "shared_experts", "mla_up_proj")
# Recomputing a norm only pays if its output is discarded after the next GEMM reads it (Megatron's
# CheckpointWithoutOutput); plain checkpointing would keep both and save nothing.
_UNSUPPORTED_RECOMPUTE = ("layernorm",)
_FLOAT_DTYPES = ("float32", "bfloat16", "float16")
_PARALLEL_SIZES = (
    ("tensor_model_parallel_size", "tensor parallelism"),
    ("pipeline_model_parallel_size", "pipeline parallelism"),
    ("context_parallel_size", "context parallelism"),
    ("expert_model_parallel_size", "expert parallelism"),
)
# Sizes that must still be 1 (the others are built).
_UNBUILT_PARALLEL_SIZES = ("expert_model_parallel_size",)
# Pipeline-split fields: they only mean something with more than one pipeline stage.
_PIPELINE_SPLIT_FIELDS = (
    "num_layers_in_first_pipeline_stage",
    "num_layers_in_last_pipeline_stage",
    "pipeline_model_parallel_layout",
    "account_for_embedding_in_pipeline_split",
    "account_for_loss_in_pipeline_split",
)


@dataclass(kw_only=True)
class TransformerConfig(MegatronCompatFields):
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
    normalization: Normalization = "LayerNorm"
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
    position_embedding_type: PositionEmbeddingType = "learned_absolute"
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

    # ------------------------------------------------------------------ parallel sizes
    tensor_model_parallel_size: int = 1
    """Tensor-parallel degree: attention heads and MLP columns split over this many GPUs."""
    pipeline_model_parallel_size: int = 1
    """Pipeline-parallel degree: layers split into this many stages."""
    context_parallel_size: int = 1
    """Context-parallel degree: the sequence split over this many GPUs for attention."""
    sequence_parallel: bool = False
    """Shard norms/dropout activations along the sequence inside the tensor-parallel group."""
    tp_comm_overlap: bool = False
    """Overlap tensor-parallel communication with the GEMMs (PyTorch's asynchronous tensor parallel:
    CUDA, sequence_parallel and torch.compile); usually set through comm_overlap.tp_comm_overlap."""

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

    # ------------------------------------------------------------------ memory
    recompute_granularity: Literal["full", "selective"] | None = None
    """Activation recompute: full layers, selected submodules (recompute_modules), or none."""
    recompute_method: Literal["uniform", "block"] | None = None
    """With full recompute: uniform chunks of recompute_num_layers, or the first N layers per stage."""
    recompute_num_layers: int | None = None
    """With full recompute: layers per recompute chunk (uniform) or recomputed per stage (block)."""
    recompute_modules: list[str] | None = None
    """Submodules recomputed with selective recompute; unset means ["core_attn"]."""

    # ------------------------------------------------------------------ loss and initialization
    cross_entropy_loss_fusion: bool = True
    """Fuse output layer and cross entropy in chunks, not holding all logits (CPU: only past 4 GiB)."""
    use_cpu_initialization: bool = False
    """Create the weights on the CPU, then move them."""
    perform_initialization: bool = True
    """Initialize the weights (off when they are loaded right after)."""
    init_model_with_meta_device: bool = False
    """Build the model on the meta device and materialize it after sharding."""

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
        "enable_cuda_graph": "Transformer Engine's CUDA graphs are not supported (see cuda_graph_impl=local)",
        "cuda_graph_scope": "cuda_graph_impl=local graphs the whole compiled model, not chosen parts",
        "cuda_graph_warmup_steps": "with cuda_graph_impl=local, torch.compile decides when to record",
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

    def pipeline_layout(self) -> tuple[str | list[list[str]] | None, str]:
        """The layout the pipeline split follows (`viaduct.distributed.pipeline_split`; None: an even
        or uneven split) and the field it comes from: pipeline_model_parallel_layout here (a family may
        derive one from another field)."""
        return self.pipeline_model_parallel_layout, "pipeline_model_parallel_layout"

    # ------------------------------------------------------------------ finalize

    def finalize(self) -> None:
        """Derive unset sizes and dtypes, then check every rule; raise `ConfigError` with all problems."""
        self._undo_own_derivations()
        p = Problems()
        p.extend(self.check_types())
        # The rules below skip a field that has a type problem, and every rule that reads it.
        bad = fields_with_problems(p.items)
        self._derive_defaults(bad)
        self._check_architecture(p, bad)
        self._check_precision(p, bad)
        self._check_memory(p, bad)
        self._check_parallelism(p, bad)
        p.raise_if_any()

    def _derive_defaults(self, bad: set[str]) -> None:
        h, heads = self.hidden_size, self.num_attention_heads
        if bad.isdisjoint(("num_query_groups", "num_attention_heads")):
            if self.num_query_groups is None and heads > 0:
                self.derive("num_query_groups", heads, "= num_attention_heads", own=True)
        if bad.isdisjoint(("kv_channels", "hidden_size", "num_attention_heads")) and self.kv_channels is None:
            if h > 0 and heads > 0 and h % heads == 0:
                self.derive("kv_channels", h // heads, "= hidden_size / num_attention_heads", own=True)
        if bad.isdisjoint(("ffn_hidden_size", "hidden_size")) and self.ffn_hidden_size is None and h > 0:
            self.derive("ffn_hidden_size", 4 * h, "= 4 x hidden_size", own=True)
        if bad.isdisjoint(("autocast_dtype", "params_dtype")) and self.autocast_dtype is None:
            self.derive("autocast_dtype", self.params_dtype, "= params_dtype", own=True)
        if bad.isdisjoint(("embedding_init_method_std", "init_method_std")):
            if self.embedding_init_method_std is None:
                self.derive("embedding_init_method_std", self.init_method_std, "= init_method_std", own=True)
        if "recompute_modules" not in bad and self.recompute_modules is None:
            self.derive("recompute_modules", ["core_attn"], "default selective recompute", own=True)
        tp, pp, ep = (
            self.tensor_model_parallel_size,
            self.pipeline_model_parallel_size,
            self.expert_model_parallel_size,
        )
        etp_inputs = (
            "expert_tensor_parallel_size",
            "tensor_model_parallel_size",
            "expert_model_parallel_size",
        )
        if bad.isdisjoint(etp_inputs) and self.expert_tensor_parallel_size is None:
            etp, why = (1, "1 with expert parallelism") if ep > 1 else (tp, "= tensor_model_parallel_size")
            self.derive("expert_tensor_parallel_size", etp, why, own=True)
        if bad.isdisjoint(("microbatch_group_size_per_vp_stage", "pipeline_model_parallel_size")):
            if self.microbatch_group_size_per_vp_stage is None:
                self.derive(
                    "microbatch_group_size_per_vp_stage", pp, "= pipeline_model_parallel_size", own=True
                )
        if bad.isdisjoint(("pipeline_dtype", "params_dtype", "pipeline_model_parallel_size")):
            if self.pipeline_dtype is None and pp > 1:
                self.derive(
                    "pipeline_dtype", self.params_dtype, "= params_dtype with pipeline parallelism", own=True
                )
        vpp_inputs = (
            "virtual_pipeline_model_parallel_size",
            "pipeline_model_parallel_layout",
            "pipeline_model_parallel_size",
        )
        if bad.isdisjoint(vpp_inputs) and self.virtual_pipeline_model_parallel_size is None and pp > 1:
            # As Megatron does: a layout of pp × v slices means v model chunks per pipeline rank.
            vpp = num_virtual_stages(self)
            if vpp > 1:
                self.derive(
                    "virtual_pipeline_model_parallel_size",
                    vpp,
                    "= pipeline_model_parallel_layout's slices / pipeline_model_parallel_size",
                    own=True,
                )
        fp32_softmax = bool(self.attention_softmax_in_fp32 or self.apply_query_key_layer_scaling)
        self.derive(
            "effective_attention_softmax_in_fp32",
            fp32_softmax,
            "attention_softmax_in_fp32 or apply_query_key_layer_scaling",
        )

    def _check_architecture(self, p: Problems, bad: set[str]) -> None:
        for name in ("num_layers", "hidden_size", "num_attention_heads"):
            value = getattr(self, name)
            if name not in bad and value <= 0:
                p.add(name, "must be set (> 0)", value, fix=f"set model.{name} to a positive number")
        heads = self.num_attention_heads if "num_attention_heads" not in bad else 0
        hidden = self.hidden_size if "hidden_size" not in bad else 0
        groups = self.num_query_groups
        if "num_query_groups" not in bad and groups is not None:
            if groups <= 0:
                p.add(
                    "num_query_groups",
                    "must be > 0",
                    groups,
                    fix="set model.num_query_groups to a divisor of model.num_attention_heads, or unset it",
                )
            elif heads > 0 and heads % groups:
                p.add(
                    "num_query_groups",
                    f"must divide num_attention_heads ({heads})",
                    groups,
                    fix="set model.num_query_groups to a divisor of model.num_attention_heads",
                )
        if bad.isdisjoint(("num_attention_heads", "kv_channels")) and self.kv_channels is None:
            n = self.num_attention_heads
            if n > 0 and hidden > 0 and hidden % n:
                p.add(
                    "num_attention_heads",
                    f"must divide hidden_size ({hidden}) when kv_channels is unset",
                    n,
                    fix=(
                        "change model.num_attention_heads or model.hidden_size, "
                        "or set model.kv_channels (head size)"
                    ),
                )
        for name in (
            "ffn_hidden_size",
            "kv_channels",
            "vocab_size",
            "softmax_scale",
            "seq_len_interpolation_factor",
            "embedding_init_method_std",
        ):
            value = getattr(self, name)
            if name not in bad and value is not None and value <= 0:
                p.add(name, "must be > 0 when set", value, fix=f"set model.{name} > 0 or unset it")
        for name in (
            "seq_length",
            "make_vocab_size_divisible_by",
            "layernorm_epsilon",
            "init_method_std",
            "rotary_base",
            "rope_scaling_factor",
        ):
            value = getattr(self, name)
            if name not in bad and value <= 0:
                p.add(name, "must be > 0", value, fix=f"set model.{name} to a positive value")
        for name in ("hidden_dropout", "attention_dropout"):
            value = getattr(self, name)
            if name not in bad and not 0.0 <= value < 1.0:
                p.add(name, "must be in [0, 1)", value, fix=f"set model.{name} to e.g. 0.0 or 0.1")
        if "rotary_percent" not in bad and not 0.0 < self.rotary_percent <= 1.0:
            p.add(
                "rotary_percent",
                "must be in (0, 1]",
                self.rotary_percent,
                fix="set model.rotary_percent to the fraction of each head to rotate, e.g. 1.0",
            )
        if "position_embedding_type" not in bad and self.position_embedding_type == "yarn":
            p.add(
                "position_embedding_type",
                "YaRN rotary scaling is not supported yet",
                self.position_embedding_type,
                fix="set model.position_embedding_type=rope (with model.rope_scaling for long context)",
            )
        if bad.isdisjoint(("rope_scaling", "position_embedding_type")):
            if self.rope_scaling and self.position_embedding_type != "rope":
                p.add(
                    "rope_scaling",
                    "needs position_embedding_type 'rope'",
                    self.rope_scaling,
                    fix="set model.position_embedding_type=rope or model.rope_scaling=false",
                )
        window = self.window_size
        if "window_size" not in bad and window is not None:
            if any(w < -1 for w in window):
                p.add(
                    "window_size",
                    "entries must be >= 0 (or -1 for unbounded)",
                    window,
                    fix="set model.window_size to (left, right) or unset it",
                )
            elif window[1] not in (0, -1):
                p.add(
                    "window_size",
                    "the right side must be 0 or -1: decoder attention is causal, it never looks ahead",
                    window,
                    fix="set model.window_size to (left, 0)",
                )

    def _check_precision(self, p: Problems, bad: set[str]) -> None:
        if "bf16" not in bad and self.bf16 and self.fp16:
            p.add(
                "bf16",
                "fp16 and bf16 cannot both be true",
                self.bf16,
                fix="set model.fp16 or model.bf16 to false (or use mixed_precision=bf16_mixed)",
            )
        for name in ("params_dtype", "pipeline_dtype", "autocast_dtype"):
            value = getattr(self, name)
            if name not in bad and value is not None and DType.canonical_name(value) not in _FLOAT_DTYPES:
                p.add(
                    name,
                    "must be float32, bfloat16 or float16",
                    value,
                    fix=f"set model.{name}=bf16 (or fp32)",
                )
        dtype = self.params_dtype
        if "params_dtype" not in bad and (
            (self.fp16 and dtype == DType("bfloat16")) or (self.bf16 and dtype == DType("float16"))
        ):
            p.add(
                "params_dtype",
                "contradicts fp16/bf16",
                dtype,
                fix="make model.params_dtype match model.fp16/bf16 (or use mixed_precision)",
            )
        if "cuda_graph_impl" not in bad and self.cuda_graph_impl in ("transformer_engine", "full_iteration"):
            p.add(
                "cuda_graph_impl",
                f"{self.cuda_graph_impl} CUDA graphs are not supported yet",
                self.cuda_graph_impl,
                fix="set model.cuda_graph_impl=local (torch.compile's CUDA graphs) or none",
            )
        if "cross_entropy_fusion_impl" not in bad and self.cross_entropy_fusion_impl == "te":
            p.add(
                "cross_entropy_fusion_impl",
                "Transformer Engine cross entropy is not supported yet",
                self.cross_entropy_fusion_impl,
                fix="set model.cross_entropy_fusion_impl=native",
            )

    def _check_memory(self, p: Problems, bad: set[str]) -> None:
        if "recompute_granularity" in bad:
            # The recompute rules read it; distribute_saved_activations, checked here too, waits as well.
            return
        full = self.recompute_granularity == "full"
        method, layers = self.recompute_method, self.recompute_num_layers
        if full and "recompute_method" not in bad and method is None:
            p.add(
                "recompute_method",
                "must be set with recompute_granularity 'full'",
                method,
                fix="set model.recompute_method=uniform (or block)",
            )
        if full and "recompute_num_layers" not in bad:
            if layers is None:
                p.add(
                    "recompute_num_layers",
                    "must be set with recompute_granularity 'full'",
                    layers,
                    fix="set model.recompute_num_layers (e.g. 1)",
                )
            elif "num_layers" not in bad and not 1 <= layers <= max(self.num_layers, 1):
                p.add(
                    "recompute_num_layers",
                    f"must be in [1, num_layers ({self.num_layers})]",
                    layers,
                    fix="set model.recompute_num_layers",
                )
        for name in ("recompute_method", "recompute_num_layers"):
            value = getattr(self, name)
            if not full and name not in bad and value is not None:
                p.add(
                    name,
                    "only applies to recompute_granularity 'full'",
                    value,
                    fix=f"unset model.{name}, or set model.recompute_granularity=full",
                )
        modules = self.recompute_modules if "recompute_modules" not in bad else None
        unknown = [m for m in modules or () if m not in RECOMPUTE_MODULES]
        if unknown:
            p.add(
                "recompute_modules",
                f"unknown module(s): {', '.join(map(repr, unknown))}",
                modules,
                fix=f"choose from {', '.join(RECOMPUTE_MODULES)}",
            )
        if "distribute_saved_activations" not in bad and self.distribute_saved_activations:
            # Megatron shards the recompute checkpoints over the tensor-parallel group.
            rule = (
                "cannot be combined with sequence_parallel"
                if self.sequence_parallel
                else "sharding recompute checkpoints over the tensor-parallel group is not supported yet"
            )
            p.add(
                "distribute_saved_activations",
                rule,
                self.distribute_saved_activations,
                fix="set model.distribute_saved_activations=false",
            )
        if self.recompute_granularity == "selective":
            norms = [m for m in modules or () if m in _UNSUPPORTED_RECOMPUTE]
            if norms:
                p.add(
                    "recompute_modules",
                    "recomputing 'layernorm' is not supported yet (it would save no memory here)",
                    modules,
                    fix="recompute core_attn or mlp, or use recompute_granularity=full",
                )
            moe_only = [m for m in modules or () if m in _MOE_RECOMPUTE_MODULES]
            if moe_only:
                p.add(
                    "recompute_modules",
                    f"{', '.join(map(repr, moe_only))} recompute mixture-of-experts or multi-latent "
                    "attention parts, which are not supported yet",
                    modules,
                    fix="recompute core_attn or mlp",
                )

    def _check_tensor_parallel(self, p: Problems, bad: set[str]) -> None:
        """Tensor parallelism splits heads, query groups and MLP columns evenly over the ranks."""
        if "tensor_model_parallel_size" in bad:
            return
        tp = self.tensor_model_parallel_size
        if tp <= 1:
            if "tp_comm_overlap" not in bad and self.tp_comm_overlap:
                p.add(
                    "tp_comm_overlap",
                    "overlaps tensor-parallel communication, but tensor_model_parallel_size is 1",
                    True,
                    fix="set tp_comm_overlap=false, or model.tensor_model_parallel_size > 1",
                )
            return
        fix = "choose a tensor_model_parallel_size that divides it"
        for name, what in (
            ("num_attention_heads", "attention heads"),
            ("num_query_groups", "query groups (key/value heads)"),
            ("ffn_hidden_size", "MLP hidden units"),
        ):
            value = getattr(self, name)
            if name not in bad and value is not None and value > 0 and value % tp:
                p.add(
                    "tensor_model_parallel_size",
                    f"{value} {what} (model.{name}) cannot be split evenly over {tp} tensor-parallel ranks",
                    tp,
                    fix=fix,
                )
        if "tp_comm_overlap" not in bad and self.tp_comm_overlap and not self.sequence_parallel:
            p.add(
                "tp_comm_overlap",
                "overlaps the all-gathers and reduce-scatters of sequence parallelism with the GEMMs, "
                "so it needs model.sequence_parallel",
                True,
                fix="set model.sequence_parallel=true, or tp_comm_overlap=false",
            )
        if self.sequence_parallel and "seq_length" not in bad:
            local = self.seq_length // max(self.context_parallel_size, 1)
            if local % tp:
                p.add(
                    "sequence_parallel",
                    f"splits each rank's {local} tokens over {tp} tensor-parallel ranks: not evenly",
                    True,
                    fix="use a seq_length that divides, or set model.sequence_parallel=false",
                )

    def _check_context_parallel(self, p: Problems, bad: set[str]) -> None:
        """Context parallelism cuts each sequence into 2 x cp chunks (causal load balancing)."""
        if "context_parallel_size" in bad:
            return
        cp = self.context_parallel_size
        if cp <= 1:
            return
        if "seq_length" not in bad and self.seq_length % (2 * cp):
            p.add(
                "context_parallel_size",
                f"cuts the sequence into 2 x {cp} equal chunks, but seq_length {self.seq_length} "
                f"is not divisible by {2 * cp}",
                cp,
                fix=f"use a seq_length that is a multiple of {2 * cp}",
            )

    def _check_parallelism(self, p: Problems, bad: set[str]) -> None:
        for name, what in _PARALLEL_SIZES:
            if name in bad:
                continue
            size = getattr(self, name)
            if size < 1:
                p.add(name, "must be >= 1", size, fix=f"set model.{name}=1")
            elif size > 1 and name in _UNBUILT_PARALLEL_SIZES:
                p.add(name, f"{what} is not supported yet", size, fix=f"set model.{name}=1")
        self._check_tensor_parallel(p, bad)
        self._check_context_parallel(p, bad)
        pp = self.pipeline_model_parallel_size if "pipeline_model_parallel_size" not in bad else 1
        vpp = self.virtual_pipeline_model_parallel_size
        if "virtual_pipeline_model_parallel_size" not in bad and vpp is not None and pp <= 1:
            p.add(
                "virtual_pipeline_model_parallel_size",
                "virtual pipeline parallelism needs pipeline_model_parallel_size > 1",
                vpp,
                fix="unset model.virtual_pipeline_model_parallel_size, or raise "
                "model.pipeline_model_parallel_size",
            )
        self._check_pipeline(p, bad, pp)
        etp = self.expert_tensor_parallel_size
        # A value equal to tensor_model_parallel_size (the default it is derived from) changes nothing.
        if (
            "expert_tensor_parallel_size" not in bad
            and etp not in (None, 1, self.tensor_model_parallel_size)
            and not prov.is_derived(self.source_of("expert_tensor_parallel_size"))
        ):
            p.add(
                "expert_tensor_parallel_size",
                "expert tensor parallelism is not supported yet",
                etp,
                fix="unset model.expert_tensor_parallel_size",
            )
        if "sequence_parallel" not in bad and self.sequence_parallel and self.tensor_model_parallel_size == 1:
            p.add(
                "sequence_parallel",
                "sequence parallelism needs tensor_model_parallel_size > 1",
                self.sequence_parallel,
                fix="set model.sequence_parallel=false, or model.tensor_model_parallel_size > 1",
            )
        for name in _PIPELINE_SPLIT_FIELDS:
            value = getattr(self, name)
            if name not in bad and pp <= 1 and value not in (None, False):
                p.add(
                    name,
                    "only applies with pipeline parallelism (pipeline_model_parallel_size > 1)",
                    value,
                    fix=f"unset model.{name}",
                )
        if "overlap_p2p_comm" not in bad and self.overlap_p2p_comm and self.batch_p2p_comm and pp <= 1:
            p.add(
                "overlap_p2p_comm",
                "cannot be combined with batch_p2p_comm",
                self.overlap_p2p_comm,
                fix="set model.batch_p2p_comm=false (or model.overlap_p2p_comm=false)",
            )

    def _check_pipeline(self, p: Problems, bad: set[str], pp: int) -> None:
        """Pipeline parallelism runs on PyTorch's schedules (`viaduct.distributed.pipeline_split`)."""
        schedule = self.pipeline_schedule
        if "pipeline_schedule" not in bad and schedule is not None and pp <= 1:
            p.add(
                "pipeline_schedule",
                "only applies with pipeline parallelism (pipeline_model_parallel_size > 1)",
                schedule,
                fix="unset model.pipeline_schedule",
            )
        if pp <= 1:
            return
        split_inputs = ("num_layers", "virtual_pipeline_model_parallel_size", *_PIPELINE_SPLIT_FIELDS)
        if bad.isdisjoint(split_inputs) and self.num_layers > 0:
            p.extend(split_problems(self))
        vpp = num_virtual_stages(self) if bad.isdisjoint(split_inputs) else 1
        if "pipeline_schedule" not in bad and schedule in SINGLE_STAGE_SCHEDULES and vpp > 1:
            p.add(
                "pipeline_schedule",
                f"{schedule} runs one stage per pipeline rank, but each rank holds {vpp} model chunks "
                "(virtual_pipeline_model_parallel_size)",
                schedule,
                fix="set model.pipeline_schedule=interleaved_1f1b (or interleaved_zero_bubble), or unset "
                "model.virtual_pipeline_model_parallel_size",
            )
        group = self.microbatch_group_size_per_vp_stage
        if "microbatch_group_size_per_vp_stage" not in bad and group is not None and group != pp:
            p.add(
                "microbatch_group_size_per_vp_stage",
                f"must equal pipeline_model_parallel_size ({pp}): PyTorch's interleaved schedules group "
                "micro-batches by the pipeline size",
                group,
                fix="unset model.microbatch_group_size_per_vp_stage",
            )
        if "overlap_p2p_comm" not in bad and self.overlap_p2p_comm:
            p.add(
                "overlap_p2p_comm",
                "is not supported: PyTorch's schedules batch each step's sends and receives",
                True,
                fix="set model.overlap_p2p_comm=false (and comm_overlap.overlap_p2p_comm, where set)",
            )
        if "batch_p2p_comm" not in bad and not self.batch_p2p_comm:
            p.add(
                "batch_p2p_comm",
                "cannot be turned off: PyTorch's schedules always send and receive each step's "
                "activations in one batched call",
                False,
                fix="set model.batch_p2p_comm=true (and comm_overlap.batch_p2p_comm, where set)",
            )
        if "variable_seq_lengths" not in bad and self.variable_seq_lengths:
            p.add(
                "variable_seq_lengths",
                "is not supported with pipeline parallelism: stages exchange activations of one fixed "
                "shape (micro batch × seq_length × hidden_size)",
                True,
                fix="set model.variable_seq_lengths=false (pad batches to seq_length)",
            )
