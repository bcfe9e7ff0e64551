"""`T5ModelProvider`: configuration of a T5-style encoder-decoder language model, and the named sizes
`T5ModelProvider220M`, `T5ModelProvider3B` and `T5ModelProvider11B`.

Field names and defaults are Megatron Bridge's `megatron.bridge.models.t5_provider.T5ModelProvider`,
so its YAML files load here (`_target_` maps by class name). `provide()` builds a `T5Model` (see
`viaduct.models.t5.model`) from a `T5Spec` derived from the fields (`t5_spec()`).

`pretrain()` trains T5 models with data parallelism (plain or FSDP), tensor parallelism (with or
without sequence parallelism; `viaduct.distributed.t5_parallel`) and activation recompute (full or
selective, in both stacks). Not built yet, and refused by `finalize()`: context and pipeline
parallelism (Megatron splits T5's encoder and decoder over separate pipeline stages), virtual
pipeline stages, and the inherited architecture options `T5Model` has no place for (grouped-query
attention, QK norm, sliding windows, ...).

This module imports neither torch nor the model code until a model is built, so configurations
load without torch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from viaduct.config import ConfigError, FunctionRef, Problem, Problems, unsupported
from viaduct.config.types import ACTIVATIONS
from viaduct.models.enums import AttnBackend
from viaduct.models.provider import ModelProvider

if TYPE_CHECKING:
    from viaduct.models.t5.model import T5Model, T5Spec

T5PositionEmbeddingType = Literal["learned_absolute", "rope", "relative"]
"""How positions enter a T5 model (`T5ModelProvider.position_embedding_type`)."""
_POSITION_TYPES = ("learned_absolute", "rope", "relative")

# Inherited fields whose other values `T5Model` does not implement: name -> (is the value the one
# T5Model computes with, what the field asks for). Refused rather than silently ignored.
_NOT_IN_T5: dict[str, tuple[Callable[[Any], bool], str]] = {
    "add_qkv_bias": (lambda v: v is False, "a bias on the query/key/value projection alone"),
    "qk_layernorm": (lambda v: v is False, "query/key normalization"),
    "window_size": (lambda v: v is None, "sliding-window attention"),
    "fp32_residual_connection": (lambda v: v is False, "a float32 residual stream"),
    "apply_residual_connection_post_layernorm": (lambda v: v is False, "post-norm residuals"),
    "layernorm_zero_centered_gamma": (lambda v: v is False, "zero-centered norm scales"),
    "rotary_interleaved": (lambda v: v is False, "interleaved rotary pairs"),
    "rope_scaling": (lambda v: v is False, "Llama-3.1 rotary scaling"),
    "seq_len_interpolation_factor": (lambda v: v is None, "rotary position interpolation"),
    "attention_softmax_in_fp32": (lambda v: v is False, "a float32 softmax switch"),
    "apply_query_key_layer_scaling": (lambda v: v is False, "query-key layer scaling"),
    "attention_backend": (lambda v: v == AttnBackend.auto, "choosing the attention kernel"),
}


@dataclass(kw_only=True)
class T5ModelProvider(ModelProvider):
    """A T5-style encoder-decoder model: its architecture, precision and parallel sizes.

    `num_layers` is the decoder's depth and `encoder_num_layers` the encoder's (unset: the same).
    Both stacks share the token table, width, heads, MLP and norms. Standalone use:
    `T5ModelProvider(num_layers=12, hidden_size=768, num_attention_heads=12, vocab_size=32128)
    .provide()`.

    `position_embedding_type` takes Megatron's `learned_absolute` and `rope` and, as viaduct's
    extension, `relative`: Hugging Face T5's bucketed relative position bias
    (`relative_attention_num_buckets`, `relative_attention_max_distance`). With `relative`,
    `normalization="RMSNorm"`, `add_bias_linear=False`, `softmax_scale=1.0` and
    `activation_func="relu"` (T5 v1.0) or gated `gelu` (v1.1) the model has Hugging Face T5's layout.
    """

    _aliases_: ClassVar[tuple[str, ...]] = ("t5",)

    encoder_num_layers: int | None = None
    """Layers of the encoder; unset means num_layers (the decoder's depth)."""
    fp16_lm_cross_entropy: bool = unsupported("a half-precision cross entropy for T5", default=False)
    """Cross entropy in the logits' half precision (T5Model always computes it in float32)."""
    parallel_output: bool = True
    """Keep the logits split over tensor-parallel ranks (no effect: the loss never gathers the vocabulary)."""
    share_embeddings_and_output_weights: bool = True
    """Logits through the token table plus an output bias (Megatron's); false: own weight, no bias."""
    make_vocab_size_divisible_by: int = 128
    """Vocabulary padding multiple (only with should_pad_vocab)."""
    position_embedding_type: T5PositionEmbeddingType = "learned_absolute"  # type: ignore[assignment]
    """Positions: learned_absolute, rope, or relative (T5's bucketed bias; viaduct's, for Hugging Face T5)."""
    apply_rope_fusion: bool = True
    """Use a fused rotary-embedding kernel (a hint for torch.compile)."""
    max_position_embeddings: int = 512
    """Size of the position table; bounds both sequence lengths with learned_absolute or rope positions."""
    relative_attention_num_buckets: int = 32
    """Buckets of the relative position bias (relative positions only)."""
    relative_attention_max_distance: int = 128
    """Distance beyond which relative positions share the last bucket (relative positions only)."""
    rotary_percent: float = 1.0
    """Fraction of each head's dimensions that get rotary embeddings, in (0, 1] (rope only)."""
    seq_len_interpolation_factor: float | None = None
    """Linear rotary position interpolation (not built for T5: must stay unset)."""
    seq_length: int = 512
    """Encoder sequence length."""
    seq_length_dec: int = 128
    """Decoder sequence length."""
    encoder_pipeline_model_parallel_size: int = unsupported(
        "giving T5's encoder its own pipeline stages", default=0
    )
    """Pipeline stages of the encoder (Megatron splits encoder and decoder over separate stages)."""
    attention_softmax_in_fp32: bool = False
    """Softmax in float32 on the unfused attention path (not built for T5: must stay false)."""
    bias_activation_fusion: bool = True
    """Fuse bias add and activation (a hint for torch.compile)."""
    masked_softmax_fusion: bool = True
    """Fuse scale, mask and softmax (left to the attention kernel / torch.compile)."""
    persist_layer_norm: bool = True
    """Use the persistent layer-norm kernel (a Megatron kernel; no effect in viaduct)."""
    bias_dropout_fusion: bool = True
    """Fuse bias add, dropout and residual add (a hint for torch.compile)."""
    deallocate_pipeline_outputs: bool = True
    """Free a stage's output once it is sent (no effect: T5 has no pipeline parallelism yet)."""
    recompute_num_layers: int | None = 1
    """With full recompute: layers per chunk (uniform) or recomputed (block) in each stack; else inert."""
    distribute_saved_activations: bool = False
    """Shard recompute checkpoints over the tensor-parallel group (not supported)."""
    enable_autocast: bool = False
    """Run the forward pass under torch.autocast with autocast_dtype."""
    vocab_size: int | None = None
    """Unpadded vocabulary size (the tokenizer's); must be set before provide()."""
    should_pad_vocab: bool = False
    """Pad the vocabulary to a multiple of make_vocab_size_divisible_by x tensor_model_parallel_size."""

    # ------------------------------------------------------------------ finalize

    def _check_architecture(self, p: Problems, bad: set[str]) -> None:
        super()._check_architecture(p, bad)
        enc = self.encoder_num_layers
        if "encoder_num_layers" not in bad and enc is not None and enc <= 0:
            p.add(
                "encoder_num_layers",
                "must be > 0 when set",
                enc,
                fix="set model.encoder_num_layers > 0, or unset it to use num_layers",
            )
        for name in ("max_position_embeddings", "seq_length_dec"):
            value = getattr(self, name)
            if name not in bad and value <= 0:
                p.add(name, "must be > 0", value, fix=f"set model.{name} to a positive value")
        kind = self.position_embedding_type if "position_embedding_type" not in bad else None
        if kind in ("learned_absolute", "rope") and "max_position_embeddings" not in bad:
            limit = self.max_position_embeddings
            for name, stack in (("seq_length", "encoder"), ("seq_length_dec", "decoder")):
                value = getattr(self, name)
                if name not in bad and limit > 0 and value > limit:
                    p.add(
                        name,
                        f"the {stack} sequence is longer than max_position_embeddings ({limit}), which "
                        f"bounds every sequence with {kind} positions",
                        value,
                        fix=f"lower model.{name} or raise model.max_position_embeddings",
                    )
        if kind == "relative" and bad.isdisjoint(
            ("relative_attention_num_buckets", "relative_attention_max_distance")
        ):
            buckets, distance = self.relative_attention_num_buckets, self.relative_attention_max_distance
            # The encoder halves the buckets per direction and keeps half of those exact: at least one.
            if buckets < 4:
                p.add(
                    "relative_attention_num_buckets",
                    "must be at least 4 (each direction needs an exact and a logarithmic bucket)",
                    buckets,
                    fix="set model.relative_attention_num_buckets=32 as T5 does",
                )
            elif distance <= buckets // 2:
                p.add(
                    "relative_attention_max_distance",
                    f"must exceed relative_attention_num_buckets / 2 ({buckets // 2}): the logarithmic "
                    "buckets cover the distances between",
                    distance,
                    fix="set model.relative_attention_max_distance=128 as T5 does",
                )
        if "activation_func" not in bad and _activation_name(self.activation_func) is None:
            p.add(
                "activation_func",
                f"T5 models take a named activation ({', '.join(sorted(ACTIVATIONS))})",
                self.activation_func,
                fix="set model.activation_func=gelu (Megatron's T5) or relu (T5 v1.0)",
            )
        groups = self.num_query_groups
        if "num_query_groups" not in bad and groups is not None and groups != self.num_attention_heads:
            p.add(
                "num_query_groups",
                "grouped-query attention is not built for T5 yet: every head has its own keys and values",
                groups,
                fix="unset model.num_query_groups",
            )
        std, emb_std = self.init_method_std, self.embedding_init_method_std
        if bad.isdisjoint(("init_method_std", "embedding_init_method_std")) and emb_std not in (None, std):
            p.add(
                "embedding_init_method_std",
                "T5 initializes the embeddings with init_method_std; a separate value is not built yet",
                emb_std,
                fix="unset model.embedding_init_method_std",
            )
        for name, (is_built, what) in _NOT_IN_T5.items():
            value = getattr(self, name)
            if name not in bad and not is_built(value):
                p.add(
                    name,
                    f"{what} is not built for T5 models yet",
                    value,
                    fix=f"leave model.{name} at its default",
                )

    def _check_memory(self, p: Problems, bad: set[str]) -> None:
        # Bridge's T5 sets recompute_num_layers=1 without recompute; the value is inert then, so
        # the generic "only applies to full recompute" rule must not fire on the default.
        if self.recompute_granularity != "full" and self.recompute_num_layers == 1:
            bad = bad | {"recompute_num_layers"}
        layers = self.recompute_num_layers
        if (
            self.recompute_granularity == "full"
            and bad.isdisjoint(("recompute_granularity", "recompute_num_layers", "num_layers"))
            and layers is not None
            and "encoder_num_layers" not in bad
        ):
            # One value serves both stacks (applied to each, capped at its depth): it may reach the
            # deeper one's depth, which the generic rule (num_layers, the decoder's) does not know.
            deepest = max(self.num_layers, self.effective_encoder_num_layers, 1)
            if not 1 <= layers <= deepest:
                p.add(
                    "recompute_num_layers",
                    f"must be in [1, {deepest}] (the deeper stack's layers)",
                    layers,
                    fix="set model.recompute_num_layers",
                )
            bad = bad | {"recompute_num_layers"}
        super()._check_memory(p, bad)

    def _check_parallelism(self, p: Problems, bad: set[str]) -> None:
        super()._check_parallelism(p, bad)
        cp = self.context_parallel_size
        if "context_parallel_size" not in bad and cp > 1:
            p.add(
                "context_parallel_size",
                "context parallelism is not built for T5 models yet",
                cp,
                fix="set model.context_parallel_size=1",
            )
        tp = self.tensor_model_parallel_size
        if (
            self.sequence_parallel
            and bad.isdisjoint(("sequence_parallel", "tensor_model_parallel_size", "seq_length_dec"))
            and tp > 1
            and self.seq_length_dec % tp
        ):
            # The decoder's residual stream is split along its sequence too (the generic rule checks
            # seq_length, the encoder's).
            p.add(
                "sequence_parallel",
                f"splits the decoder's {self.seq_length_dec} tokens (seq_length_dec) over {tp} "
                "tensor-parallel ranks: not evenly",
                True,
                fix="use a seq_length_dec that divides, or set model.sequence_parallel=false",
            )
        pp = self.pipeline_model_parallel_size
        if "pipeline_model_parallel_size" not in bad and pp > 1:
            p.add(
                "pipeline_model_parallel_size",
                "T5's encoder pipeline split is not built yet",
                pp,
                fix="set model.pipeline_model_parallel_size=1",
            )
        vpp = self.virtual_pipeline_model_parallel_size
        if "virtual_pipeline_model_parallel_size" not in bad and vpp is not None:
            p.add(
                "virtual_pipeline_model_parallel_size",
                "virtual pipeline stages are not supported for T5 models",
                vpp,
                fix="unset model.virtual_pipeline_model_parallel_size",
            )

    # ------------------------------------------------------------------ building

    @property
    def effective_encoder_num_layers(self) -> int:
        """encoder_num_layers, or num_layers when it is unset."""
        return self.encoder_num_layers if self.encoder_num_layers is not None else self.num_layers

    def t5_spec(self) -> T5Spec:
        """Finalize, then the `T5Spec` of the model `provide()` builds (vocabulary padded)."""
        from viaduct.config.types import torch_dtype
        from viaduct.models.t5.model import T5Spec

        self.finalize()
        activation = _activation_name(self.activation_func)
        assert activation is not None and self.ffn_hidden_size is not None  # finalize() checked / derived
        return T5Spec(
            vocab_size=self.padded_vocab_size(),
            hidden_size=self.hidden_size,
            ffn_hidden_size=self.ffn_hidden_size,
            num_attention_heads=self.num_attention_heads,
            encoder_num_layers=self.effective_encoder_num_layers,
            decoder_num_layers=self.num_layers,
            kv_channels=self.kv_channels,
            max_position_embeddings=self.max_position_embeddings,
            position_embedding_type=self.position_embedding_type,
            relative_attention_num_buckets=self.relative_attention_num_buckets,
            relative_attention_max_distance=self.relative_attention_max_distance,
            rotary_base=self.rotary_base,
            rotary_percent=self.rotary_percent,
            normalization=self.normalization,
            layernorm_epsilon=self.layernorm_epsilon,
            activation=activation,
            gated_linear_unit=self.gated_linear_unit,
            hidden_dropout=self.hidden_dropout,
            attention_dropout=self.attention_dropout,
            add_bias_linear=self.add_bias_linear,
            share_embeddings_and_output_weights=self.share_embeddings_and_output_weights,
            softmax_scale=self.softmax_scale,
            init_method_std=self.init_method_std,
            cross_entropy_loss_fusion=self.cross_entropy_loss_fusion,
            params_dtype=torch_dtype(self.params_dtype),
            recompute_granularity=self.recompute_granularity,
            recompute_method=self.recompute_method if self.recompute_granularity == "full" else None,
            recompute_num_layers=self.recompute_num_layers if self.recompute_granularity == "full" else None,
            recompute_modules=tuple(self.recompute_modules or ("core_attn",)),
        )

    def provide(
        self,
        pre_process: bool | None = None,
        post_process: bool | None = None,
        vp_stage: int | None = None,
        *,
        device: Any = None,
        init_seed: int | None = None,
    ) -> T5Model:
        """Finalize, then build the whole `T5Model` as a plain `nn.Module` in this process.

        `pre_process`, `post_process` and `vp_stage` are Megatron's stage arguments: without
        pipeline parallelism the only stage is the whole model (None or True; vp_stage None).

        Weights are created in params_dtype on `device`: by default torch's current default device,
        the CPU with use_cpu_initialization, or `meta` with init_model_with_meta_device (call
        `model.to_empty(device=...)` and `model.init_weights()` afterwards). perform_initialization
        false leaves the weights uninitialized (they are about to be loaded). Initialization draws
        from generators seeded by `init_seed` and each part's name (see `T5Model.init_weights`);
        unset, one seed is drawn from torch's global generator for this call.
        """
        import torch

        from viaduct.models.t5.model import T5Model

        problems: list[Problem] = []
        for name, value in (("pre_process", pre_process), ("post_process", post_process)):
            if value is not None and value is not True:
                problems.append(
                    Problem(
                        name,
                        "T5 models are built whole (no pipeline stages yet)",
                        value,
                        fix=f"call provide() without {name}",
                    )
                )
        if vp_stage is not None:
            problems.append(
                Problem(
                    "vp_stage",
                    "T5 models have no virtual pipeline stages",
                    vp_stage,
                    fix="call provide() without vp_stage",
                )
            )
        if problems:
            raise ConfigError(problems, header="provide(): cannot build the T5 model")
        spec = self.t5_spec()
        if device is None:
            if self.init_model_with_meta_device:
                device = "meta"
            elif self.use_cpu_initialization:
                device = "cpu"
            else:
                device = torch.get_default_device()
        device = torch.device(device)
        # Build on meta (no memory, no throwaway init), then allocate and initialize once.
        model = T5Model(spec, device="meta")
        if device.type != "meta":
            model.to_empty(device=device)
            if self.perform_initialization:
                model.init_weights(init_seed)
            elif model.rotary_pos_emb is not None:
                # Not a weight: computed, never loaded, so it must be filled in here.
                model.rotary_pos_emb.reset_parameters()
        return model


def _activation_name(fn: Any) -> str | None:
    """The short name (T5Spec's `activation`) of an activation_func value, or None if it has none."""
    try:
        name = FunctionRef(fn).short_name
    except ValueError:
        return None
    return name if name in ACTIVATIONS else None


def t5_provider_num_parameters(provider: T5ModelProvider) -> int:
    """The number of parameters `provider.provide()` builds (each tied tensor counted once, the
    vocabulary padded as the model pads it). Finalizes the provider; needs vocab_size."""
    from viaduct.models.t5.model import t5_num_parameters

    return t5_num_parameters(provider.t5_spec())


# ---------------------------------------------------------------------------------------------- sizes
# NeMo 2's T5 sizes (`nemo.collections.llm.t5.model.t5.T5Config220M` / `3B` / `11B`; Megatron Bridge
# has no named T5 sizes): only the shape differs; the rest is T5ModelProvider's defaults (GELU MLP,
# biases, LayerNorm, learned positions, tied embeddings). Redeclared fields only change defaults;
# their help text is the `T5ModelProvider` field's.


@dataclass(kw_only=True)
class T5ModelProvider220M(T5ModelProvider):
    """NeMo's T5 220M: 12 + 12 layers, 768 wide, 3072 MLP, 12 heads of 64 (T5-base's shape)."""

    _aliases_ = ("t5_220m",)

    num_layers: int = 12
    encoder_num_layers: int | None = 12
    hidden_size: int = 768
    ffn_hidden_size: int | None = 3072
    num_attention_heads: int = 12


@dataclass(kw_only=True)
class T5ModelProvider3B(T5ModelProvider):
    """NeMo's T5 3B: 24 + 24 layers, 2048 wide, 5120 MLP, 32 heads of 64 (2.28B parameters with
    the GELU MLP, 2.79B with gated_linear_unit as in NeMo's launcher configuration)."""

    _aliases_ = ("t5_3b",)

    num_layers: int = 24
    encoder_num_layers: int | None = 24
    hidden_size: int = 2048
    ffn_hidden_size: int | None = 5120
    num_attention_heads: int = 32


@dataclass(kw_only=True)
class T5ModelProvider11B(T5ModelProvider):
    """NeMo's T5 11B: 24 + 24 layers, 4096 wide, 10240 MLP, 64 heads of 64 (9.0B parameters with
    the GELU MLP, 11.0B with gated_linear_unit as in NeMo's launcher configuration)."""

    _aliases_ = ("t5_11b",)

    num_layers: int = 24
    encoder_num_layers: int | None = 24
    hidden_size: int = 4096
    ffn_hidden_size: int | None = 10240
    num_attention_heads: int = 64


def t5_flops_per_sample(provider: T5ModelProvider) -> float:
    """Training FLOPs (forward + backward) of one sample: `seq_length` encoder and `seq_length_dec`
    decoder tokens, with the GPT family's convention (6 per matmul parameter and token; attention
    12 × heads × head width per query and key pair, unhalved).

    Per layer, the encoder's projections and MLP see the encoder tokens; the decoder's self-attention,
    cross-attention query and output projections, MLP and the output layer see the decoder tokens,
    its cross-attention key/value projection the encoder tokens. Attention pairs: encoder s_enc²,
    decoder self s_dec², cross s_dec × s_enc."""
    spec = provider.t5_spec()
    h, heads = spec.hidden_size, spec.num_attention_heads
    inner = heads * (spec.kv_channels or h // heads)
    mlp = spec.ffn_hidden_size * h * (3 if spec.gated_linear_unit else 2)
    self_attention = 4 * inner * h  # q, k, v and the output projection
    enc_tokens, dec_tokens = provider.seq_length, provider.seq_length_dec
    le, ld = spec.encoder_num_layers, spec.decoder_num_layers
    matmul = enc_tokens * (le * (self_attention + mlp) + ld * 2 * inner * h)
    matmul += dec_tokens * (ld * (self_attention + 2 * inner * h + mlp) + spec.vocab_size * h)
    pairs = le * enc_tokens**2 + ld * (dec_tokens**2 + dec_tokens * enc_tokens)
    return 6.0 * matmul + 12.0 * inner * pairs
