"""`T5Model`: an encoder-decoder language model in plain PyTorch (Megatron Core's module names).

The encoder embeds the input tokens and runs pre-norm layers of bidirectional self-attention and
MLP, then a final norm. The decoder embeds its tokens with the same table and runs pre-norm layers
of causal self-attention, cross-attention to the encoder output and MLP, then a final norm and the
output layer. Positions enter as learned absolute embeddings (shared by encoder and decoder, as in
Megatron's T5), rotary embeddings (self-attention only), or T5's bucketed relative position bias
(one table per stack, shared by its layers: bidirectional in the encoder, causal in the decoder).

Parameter names (L = encoder layer index, M = decoder layer index; "[bias]" only with
add_bias_linear; LayerNorm norms also have a `.bias`, RMSNorm ones do not; max_positions is
max_position_embeddings)::

    embedding.word_embeddings.weight                       [vocab, hidden]
    embedding.position_embeddings.weight                   [max_positions, hidden]  (learned_absolute)
    encoder_relative_pos_emb.relative_attention_bias.weight  [num_buckets, heads]  (relative)
    decoder_relative_pos_emb.relative_attention_bias.weight  [num_buckets, heads]  (relative)
    encoder.layers.L.input_layernorm.weight                [hidden]
    encoder.layers.L.self_attention.linear_qkv.weight      [3 x heads x kv_channels, hidden]  [bias]
    encoder.layers.L.self_attention.linear_proj.weight     [hidden, heads x kv_channels]      [bias]
    encoder.layers.L.pre_mlp_layernorm.weight              [hidden]
    encoder.layers.L.mlp.linear_fc1.weight                 [ffn (x2 gated), hidden]           [bias]
    encoder.layers.L.mlp.linear_fc2.weight                 [hidden, ffn]                      [bias]
    encoder.final_layernorm.weight                         [hidden]
    decoder.layers.M.input_layernorm.weight                [hidden]
    decoder.layers.M.self_attention.linear_qkv.weight      [3 x heads x kv_channels, hidden]  [bias]
    decoder.layers.M.self_attention.linear_proj.weight     [hidden, heads x kv_channels]      [bias]
    decoder.layers.M.pre_cross_attn_layernorm.weight       [hidden]
    decoder.layers.M.cross_attention.linear_q.weight       [heads x kv_channels, hidden]      [bias]
    decoder.layers.M.cross_attention.linear_kv.weight      [2 x heads x kv_channels, hidden]  [bias]
    decoder.layers.M.cross_attention.linear_proj.weight    [hidden, heads x kv_channels]      [bias]
    decoder.layers.M.pre_mlp_layernorm.weight              [hidden]
    decoder.layers.M.mlp.linear_fc1.weight / linear_fc2.weight  (as in the encoder)
    decoder.final_layernorm.weight                         [hidden]
    output_layer.bias                                      [vocab]  (tied: logits use the token table)
    output_layer.weight                                    [vocab, hidden]  (untied; no bias then)

Row layouts follow Megatron Core: `linear_qkv` rows are grouped per head as [q | k | v],
`linear_kv` rows per head as [k | v], a gated `linear_fc1` interleaves gate and up rows (see
`viaduct.models.common.mlp.MLP`). The tied output bias is Megatron's T5 LM-head bias.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from viaduct.config import FunctionRef, Problems
from viaduct.config.types import ACTIVATIONS
from viaduct.models.common.attention import Rope, SelfAttention
from viaduct.models.common.loss import IGNORE_INDEX, cross_entropy, linear_cross_entropy, use_chunked_loss
from viaduct.models.common.mlp import MLP
from viaduct.models.common.norms import Norm, hidden_norm
from viaduct.models.common.rotary import RotaryEmbedding
from viaduct.models.common.transformer import LayerStack, TransformerBlock, _maybe_checkpoint
from viaduct.models.gpt.model import VocabOutput, draw_init_seed, part_seed
from viaduct.models.t5.attention import CrossAttention, RelativePositionBias
from viaduct.models.transformer_config import TransformerConfig

T5PositionEmbeddingType = Literal["learned_absolute", "rope", "relative"]
"""How positions enter a T5 model (`T5Spec.position_embedding_type`)."""
_POSITION_TYPES = ("learned_absolute", "rope", "relative")
_NORMS = ("LayerNorm", "RMSNorm")
_RECOMPUTE_MODULES = ("core_attn", "mlp")


@dataclass(frozen=True, kw_only=True)
class T5Spec:
    """The shape of a `T5Model` (what its provider derives from the config). Raises `ConfigError`
    naming every bad field at once."""

    vocab_size: int
    """Rows of the token table and of the logits (already padded)."""
    hidden_size: int
    """Width of the residual stream."""
    ffn_hidden_size: int
    """Inner width of the MLP (of each half, with a gated linear unit)."""
    num_attention_heads: int
    """Attention heads of every attention (self and cross)."""
    encoder_num_layers: int
    """Layers of the encoder."""
    decoder_num_layers: int
    """Layers of the decoder."""
    kv_channels: int | None = None
    """Width of one attention head; None: hidden_size / num_attention_heads."""
    max_position_embeddings: int = 512
    """Longest encoder or decoder sequence (learned_absolute and rope); the size of the position table."""
    position_embedding_type: T5PositionEmbeddingType = "learned_absolute"
    """learned_absolute (Megatron's T5), rope, or relative (T5's bucketed relative position bias)."""
    relative_attention_num_buckets: int = 32
    """Buckets of the relative position bias (split between the two directions in the encoder)."""
    relative_attention_max_distance: int = 128
    """Distance beyond which relative positions share the last bucket."""
    rotary_base: int = 10000
    """Base of the rotary frequencies (rope)."""
    rotary_percent: float = 1.0
    """Share of each head's channels that rotate (rope)."""
    normalization: Literal["LayerNorm", "RMSNorm"] = "LayerNorm"
    """The norm layers' kind."""
    layernorm_epsilon: float = 1e-5
    """Epsilon of every norm."""
    activation: str = "gelu"
    """MLP activation, by short name (gelu, relu, silu, fast_gelu, ...)."""
    gated_linear_unit: bool = False
    """MLP output act(gate) * up (GeGLU with gelu, SwiGLU with silu)."""
    hidden_dropout: float = 0.1
    """Dropout after the embeddings and on each residual branch."""
    attention_dropout: float = 0.1
    """Dropout of the attention probabilities."""
    add_bias_linear: bool = True
    """Biases on every linear layer of the attentions and MLPs."""
    share_embeddings_and_output_weights: bool = True
    """Logits use the token table (plus a learned output bias); False: a separate output weight, no bias."""
    softmax_scale: float | None = None
    """Scale of the attention scores; None: 1 / sqrt(kv_channels). Hugging Face T5 uses 1.0."""
    init_method_std: float = 0.02
    """Standard deviation of the normal initialization."""
    cross_entropy_loss_fusion: bool = True
    """Compute the loss without holding all logits where that pays (see `viaduct.models.common.loss`)."""
    params_dtype: torch.dtype = torch.float32
    """Dtype the parameters are created in."""
    recompute_granularity: Literal["full", "selective"] | None = None
    """Activation recompute of both stacks: whole layers (full), the parts in recompute_modules, or none."""
    recompute_method: Literal["uniform", "block"] | None = None
    """With full recompute: chunks of recompute_num_layers layers (uniform), or the first that many."""
    recompute_num_layers: int | None = None
    """With full recompute: layers per chunk (uniform) or recomputed layers (block), in each stack."""
    recompute_modules: tuple[str, ...] = ("core_attn",)
    """With selective recompute: what each layer recomputes, of core_attn (every attention kernel) and mlp."""

    def __post_init__(self) -> None:
        p = Problems()
        for name in (
            "vocab_size",
            "hidden_size",
            "ffn_hidden_size",
            "num_attention_heads",
            "encoder_num_layers",
            "decoder_num_layers",
            "max_position_embeddings",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                p.add(name, "must be a positive integer", value, fix=f"set {name} to a number > 0")
        heads, hidden = self.num_attention_heads, self.hidden_size
        if self.kv_channels is None:
            if isinstance(heads, int) and isinstance(hidden, int) and heads > 0 and hidden % heads:
                p.add(
                    "kv_channels",
                    f"unset, and hidden_size ({hidden}) is not divisible by num_attention_heads ({heads})",
                    None,
                    fix="set kv_channels, or make hidden_size a multiple of num_attention_heads",
                )
        elif not isinstance(self.kv_channels, int) or self.kv_channels <= 0:
            p.add("kv_channels", "must be a positive integer or None", self.kv_channels, fix="set it > 0")
        if self.position_embedding_type not in _POSITION_TYPES:
            p.add(
                "position_embedding_type",
                f"must be one of {', '.join(_POSITION_TYPES)}",
                self.position_embedding_type,
                fix="pick one of those",
            )
        if self.position_embedding_type == "relative":
            buckets, distance = self.relative_attention_num_buckets, self.relative_attention_max_distance
            # The encoder halves the buckets per direction and keeps half of those exact: at least one.
            if buckets < 4:
                p.add(
                    "relative_attention_num_buckets",
                    "must be at least 4 (each direction needs an exact and a logarithmic bucket)",
                    buckets,
                    fix="use 32 as T5 does",
                )
            elif distance <= buckets // 2:
                p.add(
                    "relative_attention_max_distance",
                    f"must exceed relative_attention_num_buckets / 2 ({buckets // 2}): the logarithmic "
                    "buckets cover the distances between",
                    distance,
                    fix="use 128 as T5 does",
                )
        if self.normalization not in _NORMS:
            p.add("normalization", "must be LayerNorm or RMSNorm", self.normalization, fix="pick one")
        if self.activation not in ACTIVATIONS:
            p.add(
                "activation",
                f"unknown activation; known: {', '.join(sorted(ACTIVATIONS))}",
                self.activation,
                fix="use one of the known names (gelu as Megatron's T5)",
            )
        for name in ("hidden_dropout", "attention_dropout"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                p.add(name, "must be in [0, 1)", value, fix=f"set {name} to e.g. 0.1")
        if self.rotary_percent <= 0 or self.rotary_percent > 1:
            p.add("rotary_percent", "must be in (0, 1]", self.rotary_percent, fix="use 1.0")
        if self.layernorm_epsilon <= 0:
            p.add("layernorm_epsilon", "must be > 0", self.layernorm_epsilon, fix="use 1e-5")
        if self.init_method_std <= 0:
            p.add("init_method_std", "must be > 0", self.init_method_std, fix="use 0.02")
        self._check_recompute(p)
        p.raise_if_any("invalid T5 model shape")

    def _check_recompute(self, p: Problems) -> None:
        granularity = self.recompute_granularity
        if granularity not in (None, "full", "selective"):
            p.add("recompute_granularity", "must be full, selective or None", granularity, fix="pick one")
        elif granularity == "full":
            if self.recompute_method not in ("uniform", "block"):
                p.add(
                    "recompute_method",
                    "must be uniform or block with full recompute",
                    self.recompute_method,
                    fix="use uniform",
                )
            n = self.recompute_num_layers
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                p.add(
                    "recompute_num_layers",
                    "must be a positive integer with full recompute",
                    n,
                    fix="use 1",
                )
        elif granularity == "selective":
            unknown = [m for m in self.recompute_modules if m not in _RECOMPUTE_MODULES]
            if unknown:
                p.add(
                    "recompute_modules",
                    f"T5 layers recompute only {' and '.join(_RECOMPUTE_MODULES)}; unknown: {unknown}",
                    self.recompute_modules,
                    fix="recompute core_attn or mlp",
                )

    @property
    def head_dim(self) -> int:
        """kv_channels, or hidden_size / num_attention_heads when unset."""
        return (
            self.kv_channels if self.kv_channels is not None else self.hidden_size // self.num_attention_heads
        )

    def layer_config(self, num_layers: int) -> TransformerConfig:
        """A finalized `TransformerConfig` of one stack, for the shared building blocks (attention, MLP)."""
        cfg = TransformerConfig(
            num_layers=num_layers,
            hidden_size=self.hidden_size,
            num_attention_heads=self.num_attention_heads,
            num_query_groups=self.num_attention_heads,
            ffn_hidden_size=self.ffn_hidden_size,
            kv_channels=self.head_dim,
            hidden_dropout=self.hidden_dropout,
            attention_dropout=self.attention_dropout,
            normalization=self.normalization,
            layernorm_epsilon=self.layernorm_epsilon,
            add_bias_linear=self.add_bias_linear,
            gated_linear_unit=self.gated_linear_unit,
            activation_func=FunctionRef(self.activation),
            softmax_scale=self.softmax_scale,
            init_method_std=self.init_method_std,
            seq_length=self.max_position_embeddings,
            # Only rope is something the shared blocks act on; T5's relative bias is applied here.
            position_embedding_type="rope" if self.position_embedding_type == "rope" else "none",
            rotary_base=self.rotary_base,
            rotary_percent=self.rotary_percent,
            recompute_granularity=self.recompute_granularity,
        )
        if self.recompute_granularity == "full":
            # One setting serves both stacks: in the shallower one a chunk (or the recomputed
            # block) cannot be longer than the stack.
            cfg.recompute_method = self.recompute_method
            cfg.recompute_num_layers = min(self.recompute_num_layers or 1, num_layers)
        elif self.recompute_granularity == "selective":
            cfg.recompute_modules = list(self.recompute_modules)
        cfg.finalize()
        return cfg


def t5_num_parameters(spec: T5Spec) -> int:
    """The number of parameters a `T5Model` of this shape holds (each tied tensor counted once)."""
    h, inner, ffn = spec.hidden_size, spec.num_attention_heads * spec.head_dim, spec.ffn_hidden_size
    bias = spec.add_bias_linear

    def linear(n_in: int, n_out: int) -> int:
        return n_in * n_out + (n_out if bias else 0)

    norm = h * (2 if spec.normalization == "LayerNorm" else 1)
    self_attn = linear(h, 3 * inner) + linear(inner, h)
    cross_attn = linear(h, inner) + linear(h, 2 * inner) + linear(inner, h)
    mlp = linear(h, ffn * (2 if spec.gated_linear_unit else 1)) + linear(ffn, h)
    encoder = spec.encoder_num_layers * (2 * norm + self_attn + mlp) + norm
    decoder = spec.decoder_num_layers * (3 * norm + self_attn + cross_attn + mlp) + norm
    total = spec.vocab_size * h + encoder + decoder
    if spec.position_embedding_type == "learned_absolute":
        total += spec.max_position_embeddings * h
    elif spec.position_embedding_type == "relative":
        total += 2 * spec.relative_attention_num_buckets * spec.num_attention_heads
    total += spec.vocab_size if spec.share_embeddings_and_output_weights else spec.vocab_size * h
    return total


class T5Embedding(nn.Module):
    """Token embeddings (plus learned absolute position embeddings), then dropout; one instance
    serves both the encoder and the decoder."""

    def __init__(
        self,
        spec: T5Spec,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(spec.vocab_size, spec.hidden_size, device=device, dtype=dtype)
        self.position_embeddings: nn.Embedding | None = None
        if spec.position_embedding_type == "learned_absolute":
            self.position_embeddings = nn.Embedding(
                spec.max_position_embeddings, spec.hidden_size, device=device, dtype=dtype
            )
        self.dropout = spec.hidden_dropout

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.word_embeddings(input_ids)  # [batch, seq, hidden]
        if self.position_embeddings is not None:
            h = h + self.position_embeddings(torch.arange(input_ids.shape[1], device=input_ids.device))
        return F.dropout(h, self.dropout, self.training)


class T5DecoderLayer(nn.Module):
    """x + self_attn(norm(x)), x + cross_attn(norm(x), encoder output), x + mlp(norm(x)); dropout on
    each branch (Megatron Core's decoder `TransformerLayer` with cross-attention).

    Selective recompute (`cfg.recompute_modules`), as in the encoder's `TransformerLayer`: core_attn
    re-runs both attention kernels (self and cross) in the backward pass, mlp the MLP.
    """

    def __init__(
        self,
        spec: T5Spec,
        cfg: TransformerConfig,
        layer_number: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.layer_number = layer_number  # 1-based, as in Megatron
        selective = set(cfg.recompute_modules or ()) if cfg.recompute_granularity == "selective" else set()
        core_attn = "core_attn" in selective

        self.input_layernorm = hidden_norm(cfg, device=device, dtype=dtype)
        self.self_attention = SelfAttention(
            cfg, recompute_core_attention=core_attn, device=device, dtype=dtype
        )
        self.pre_cross_attn_layernorm = hidden_norm(cfg, device=device, dtype=dtype)
        self.cross_attention = CrossAttention(
            spec.hidden_size,
            spec.num_attention_heads,
            spec.head_dim,
            bias=spec.add_bias_linear,
            attention_dropout=spec.attention_dropout,
            softmax_scale=spec.softmax_scale,
            recompute_core_attention=core_attn,
            device=device,
            dtype=dtype,
        )
        self.pre_mlp_layernorm = hidden_norm(cfg, device=device, dtype=dtype)
        self.mlp = MLP(cfg, device=device, dtype=dtype)
        self.hidden_dropout = spec.hidden_dropout
        self.recompute_mlp = "mlp" in selective

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor,
        rope: Rope | None,
        self_mask: torch.Tensor | None,
        cross_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        h = self.self_attention(self.input_layernorm(x), rope, self_mask)
        x = x + F.dropout(h, self.hidden_dropout, self.training)
        h = self.cross_attention(self.pre_cross_attn_layernorm(x), context, cross_mask)
        x = x + F.dropout(h, self.hidden_dropout, self.training)
        h = _maybe_checkpoint(self.recompute_mlp, self.mlp, self.pre_mlp_layernorm(x))
        return x + F.dropout(h, self.hidden_dropout, self.training)


class T5Decoder(nn.Module):
    """The decoder layers (in a `LayerStack` keyed by index, so names read `decoder.layers.<i>`),
    then the final norm.

    Full recompute as the encoder's `TransformerBlock`: uniform keeps only the input of each chunk of
    recompute_num_layers layers, block recomputes the first recompute_num_layers layers one by one.
    """

    def __init__(
        self,
        spec: T5Spec,
        cfg: TransformerConfig,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.layers = LayerStack(
            {
                str(i): T5DecoderLayer(spec, cfg, i + 1, device=device, dtype=dtype)
                for i in range(spec.decoder_num_layers)
            }
        )
        self.final_layernorm = hidden_norm(cfg, device=device, dtype=dtype)
        full = cfg.recompute_granularity == "full"
        self.recompute_method = cfg.recompute_method if full else None
        self.recompute_num_layers = cfg.recompute_num_layers or 0

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor,
        rope: Rope | None,
        self_mask: torch.Tensor | None,
        cross_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        # A plain list: torch.compile unpacks a ModuleDict (subclass) into its keys, not its layers.
        layers = list(self.layers.values())
        n = self.recompute_num_layers
        if self.recompute_method == "uniform" and torch.is_grad_enabled():
            for start in range(0, len(layers), n):
                x = checkpoint(
                    _run_decoder_layers,
                    layers[start : start + n],
                    x,
                    context,
                    rope,
                    self_mask,
                    cross_mask,
                    use_reentrant=False,
                )
        else:
            for i, layer in enumerate(layers):
                recompute = self.recompute_method == "block" and i < n
                x = _maybe_checkpoint(recompute, layer, x, context, rope, self_mask, cross_mask)
        return self.final_layernorm(x)


def _run_decoder_layers(
    layers: list[nn.Module],
    x: torch.Tensor,
    context: torch.Tensor,
    rope: Rope | None,
    self_mask: torch.Tensor | None,
    cross_mask: torch.Tensor | None,
) -> torch.Tensor:
    for layer in layers:
        x = layer(x, context, rope, self_mask, cross_mask)
    return x


class OutputLayer(nn.Module):
    """The output layer's own parameters: `weight` [vocab, hidden] when untied, else only the
    LM-head `bias` [vocab] (the weight is then the token table)."""

    def __init__(
        self,
        vocab_size: int,
        hidden_size: int,
        *,
        tied: bool,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.weight: nn.Parameter | None = None
        self.bias: nn.Parameter | None = None
        if tied:
            self.bias = nn.Parameter(torch.zeros(vocab_size, device=device, dtype=dtype))
        else:
            self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size, device=device, dtype=dtype))


class T5Model(nn.Module):
    """Encoder-decoder language model (see the module docstring for the structure and names).

    `forward(encoder_input_ids, decoder_input_ids, encoder_attn_mask, decoder_attn_mask,
    encoder_decoder_attn_mask, labels)` returns the logits [batch, dec_seq, vocab], or the per-token
    loss [batch, dec_seq] (float32) when `labels` are given. The masks are padding masks over keys,
    bool [batch, seq] with True = a real token (None: every token is real): `encoder_attn_mask` over
    the encoder tokens (encoder self-attention), `decoder_attn_mask` over the decoder tokens (decoder
    self-attention, on top of causality), `encoder_decoder_attn_mask` over the encoder tokens for
    cross-attention (None: `encoder_attn_mask`). Outputs at padded positions are computed but mean
    nothing (give them the label -100).
    """

    def __init__(self, spec: T5Spec, *, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.spec = spec
        dtype = spec.params_dtype
        self.vocab_size = spec.vocab_size
        self.embedding = T5Embedding(spec, device=device, dtype=dtype)
        self.rotary_pos_emb: RotaryEmbedding | None = None
        if spec.position_embedding_type == "rope":
            self.rotary_pos_emb = RotaryEmbedding(
                spec.head_dim,
                spec.max_position_embeddings,
                base=spec.rotary_base,
                percent=spec.rotary_percent,
                device=device,
            )
        self.encoder_relative_pos_emb: RelativePositionBias | None = None
        self.decoder_relative_pos_emb: RelativePositionBias | None = None
        if spec.position_embedding_type == "relative":

            def relative(bidirectional: bool) -> RelativePositionBias:
                return RelativePositionBias(
                    spec.num_attention_heads,
                    bidirectional=bidirectional,
                    num_buckets=spec.relative_attention_num_buckets,
                    max_distance=spec.relative_attention_max_distance,
                    device=device,
                    dtype=dtype,
                )

            self.encoder_relative_pos_emb = relative(True)
            self.decoder_relative_pos_emb = relative(False)
        self.encoder = TransformerBlock(
            spec.layer_config(spec.encoder_num_layers), device=device, dtype=dtype
        )
        self.decoder = T5Decoder(spec, spec.layer_config(spec.decoder_num_layers), device=device, dtype=dtype)
        self.tied = spec.share_embeddings_and_output_weights
        self.output_layer = OutputLayer(
            spec.vocab_size, spec.hidden_size, tied=self.tied, device=device, dtype=dtype
        )
        self.vocab_output: VocabOutput | None = None
        """Set from outside to replace the output layer and loss (see `VocabOutput`); None: local.
        With the tied output bias it gets the hidden states and weight extended by one column (see
        `_fold_bias`), so it needs no notion of a bias."""
        # Tuning of the fused loss, as on `GPTModel` (None: the defaults of viaduct.models.common.loss).
        self.loss_chunk_tokens: int | None = None
        self.loss_keep_logits_bytes: int | None = None
        self.loss_plain_bytes: int | None = None

    # ------------------------------------------------------------------ weights

    def output_weight(self) -> torch.Tensor:
        """The output layer's weight [vocab, hidden]: the token table when tied."""
        if self.output_layer.weight is not None:
            return self.output_layer.weight
        return self.embedding.word_embeddings.weight

    def output_bias(self) -> torch.Tensor | None:
        """The output layer's bias [vocab] (tied output only), else None."""
        return self.output_layer.bias

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """(Re)initialize every parameter and buffer (also after building on `meta`).

        Linear weights, embeddings (tokens, positions, relative bias tables) and an untied output
        weight ~ N(0, init_method_std); the projections back into the residual stream (attention
        output, fc2) ~ N(0, init_method_std / sqrt(2 x layers of their stack)); biases (the output
        bias included) 0; norm scales 1.

        Each part (`embedding.word_embeddings`, each `encoder.layers.<i>` / `decoder.layers.<i>`,
        `output_layer`, or any other module by its name) draws from its own generator, seeded from
        `seed` and the part's name (as `GPTModel.init_weights`), so a part's values do not depend on
        which other parts exist. `seed` None draws one from torch's global generator.
        """
        if seed is None:
            seed = draw_init_seed()
        spec = self.spec
        std = spec.init_method_std
        out_std = {
            "encoder": std / math.sqrt(2.0 * spec.encoder_num_layers),
            "decoder": std / math.sqrt(2.0 * spec.decoder_num_layers),
        }
        generators: dict[tuple[str, torch.device], torch.Generator] = {}

        def generator(part: str, t: torch.Tensor) -> torch.Generator | None:
            if t.is_meta:
                return None
            key = (part, t.device)
            if key not in generators:
                generators[key] = torch.Generator(device=t.device).manual_seed(part_seed(seed, part))
            return generators[key]

        for name, module in self.named_modules():
            part = _init_part(name)
            if isinstance(module, nn.Linear):
                last = name.rsplit(".", 1)[-1]
                stack = name.split(".", 1)[0]
                w_std = out_std.get(stack, std) if last in ("linear_proj", "linear_fc2") else std
                nn.init.normal_(module.weight, 0.0, w_std, generator=generator(part, module.weight))
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, 0.0, std, generator=generator(part, module.weight))
            elif isinstance(module, OutputLayer):
                if module.weight is not None:
                    nn.init.normal_(module.weight, 0.0, std, generator=generator(part, module.weight))
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, (Norm, RotaryEmbedding)):
                module.reset_parameters()

    # ------------------------------------------------------------------ forward

    def encode(
        self, encoder_input_ids: torch.Tensor, encoder_attn_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The encoder output [batch, enc_seq, hidden] (after its final norm)."""
        b, s = encoder_input_ids.shape
        self._check_length("encoder_input_ids", s)
        keep = _key_mask("encoder_attn_mask", encoder_attn_mask, b, s)
        h = self.embedding(encoder_input_ids)
        bias = self.encoder_relative_pos_emb(s, s) if self.encoder_relative_pos_emb is not None else None
        if keep is None and bias is None:
            # An explicit all-true mask: no mask means causal to the shared attention.
            mask: torch.Tensor = torch.ones(1, 1, 1, 1, dtype=torch.bool, device=h.device)
        else:
            mask = _additive_mask(keep, bias, h.dtype, h.device)
        rope = self.rotary_pos_emb(s) if self.rotary_pos_emb is not None else None
        return self.encoder(h, rope, mask)

    def forward(
        self,
        encoder_input_ids: torch.Tensor,
        decoder_input_ids: torch.Tensor,
        encoder_attn_mask: torch.Tensor | None = None,
        decoder_attn_mask: torch.Tensor | None = None,
        encoder_decoder_attn_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits [batch, dec_seq, vocab], or with `labels` [batch, dec_seq] the per-token loss.

        `encoder_hidden_states`: an earlier `encode` output to reuse (generation); the encoder then
        does not run and `encoder_input_ids` is only read for its shape.
        """
        b, s_enc = encoder_input_ids.shape
        if encoder_hidden_states is None:
            encoder_hidden_states = self.encode(encoder_input_ids, encoder_attn_mask)
        elif encoder_hidden_states.shape[:2] != (b, s_enc):
            raise ValueError(
                f"encoder_hidden_states has shape {tuple(encoder_hidden_states.shape)}, expected "
                f"[{b}, {s_enc}, hidden] (the encoder_input_ids' batch and length)"
            )
        b_dec, s_dec = decoder_input_ids.shape
        if b_dec != b:
            raise ValueError(
                f"decoder_input_ids has batch size {b_dec} but encoder_input_ids has {b}; they must match"
            )
        self._check_length("decoder_input_ids", s_dec)
        if labels is not None and labels.shape != decoder_input_ids.shape:
            raise ValueError(
                f"labels have shape {tuple(labels.shape)}, expected {tuple(decoder_input_ids.shape)} "
                "(one per decoder token)"
            )
        dec_keep = _key_mask("decoder_attn_mask", decoder_attn_mask, b, s_dec)
        cross = encoder_attn_mask if encoder_decoder_attn_mask is None else encoder_decoder_attn_mask
        cross_keep = _key_mask("encoder_decoder_attn_mask", cross, b, s_enc)
        h = self.embedding(decoder_input_ids)
        bias = (
            self.decoder_relative_pos_emb(s_dec, s_dec) if self.decoder_relative_pos_emb is not None else None
        )
        self_mask: torch.Tensor | None = None  # None: causal, which lets the attention take its fast path
        if dec_keep is not None or bias is not None:
            causal = torch.ones(s_dec, s_dec, dtype=torch.bool, device=h.device).tril()
            keep = causal if dec_keep is None else causal & dec_keep
            self_mask = _additive_mask(keep, bias, h.dtype, h.device)
        cross_mask = _additive_mask(cross_keep, None, h.dtype, h.device) if cross_keep is not None else None
        rope = self.rotary_pos_emb(s_dec) if self.rotary_pos_emb is not None else None
        h = self.decoder(h, encoder_hidden_states, rope, self_mask, cross_mask)
        if labels is None:
            if self.vocab_output is not None:
                return self.vocab_output.logits(*_fold_bias(h, self.output_weight(), self.output_bias()))
            return F.linear(h, self.output_weight(), self.output_bias())
        return self.loss(h, labels)

    def loss(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Per-token cross entropy [batch, seq] (float32) of the decoder's final hidden states; a
        negative label (Megatron's T5 data pads with -1, Hugging Face's with -100) gives loss 0."""
        labels = torch.where(labels < 0, IGNORE_INDEX, labels)
        weight, bias = self.output_weight(), self.output_bias()
        if self.vocab_output is not None:
            folded_hidden, folded_weight = _fold_bias(hidden, weight, bias)
            return self.vocab_output.loss(folded_hidden, folded_weight, labels)
        if self.spec.cross_entropy_loss_fusion and use_chunked_loss(
            hidden.device,
            labels.numel(),
            weight.shape[0],
            hidden.dtype,
            plain_budget_bytes=self.loss_plain_bytes,
        ):
            folded_hidden, folded_weight = _fold_bias(hidden, weight, bias)
            return linear_cross_entropy(
                folded_hidden,
                folded_weight,
                labels,
                chunk_tokens=self.loss_chunk_tokens,
                keep_logits_bytes=self.loss_keep_logits_bytes,
            )
        return cross_entropy(F.linear(hidden, weight, bias), labels)

    def _check_length(self, name: str, seq_len: int) -> None:
        spec = self.spec
        if spec.position_embedding_type != "relative" and seq_len > spec.max_position_embeddings:
            raise ValueError(
                f"{name} has {seq_len} tokens, more than max_position_embeddings "
                f"({spec.max_position_embeddings}) with {spec.position_embedding_type} positions; "
                "feed shorter sequences or raise max_position_embeddings"
            )


def _key_mask(name: str, mask: torch.Tensor | None, batch: int, seq: int) -> torch.Tensor | None:
    """A [batch, seq] padding mask (True = real token) as bool [batch, 1, 1, seq], or None."""
    if mask is None:
        return None
    if tuple(mask.shape) != (batch, seq):
        raise ValueError(
            f"{name} has shape {tuple(mask.shape)}, expected [{batch}, {seq}]: a padding mask over "
            "the tokens, True (or 1) for a real token"
        )
    return mask.bool()[:, None, None, :]


def _additive_mask(
    keep: torch.Tensor | None, bias: torch.Tensor | None, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """The float mask added to the attention scores: the position bias (or 0) where attending is
    allowed, the dtype's lowest value where not.

    The lowest finite value rather than -inf: a query row with every key masked (a padded position
    whose keys are all padding) then gets uniform weights instead of NaN, which would otherwise
    reach real positions through the backward pass.
    """
    base = bias.to(dtype) if bias is not None else torch.zeros((), dtype=dtype, device=device)
    if keep is None:
        return base
    return torch.where(keep, base, torch.tensor(torch.finfo(dtype).min, dtype=dtype, device=device))


def _fold_bias(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden @ weight.T + bias as one matrix product, for the loss paths that take no bias: a column
    of ones appended to the hidden states and the bias appended to the weight as a column.

    Zero columns follow on both sides up to a multiple of 8: a row length of hidden + 1 would leave
    the GEMMs misaligned for tensor cores, and cuBLAS then falls back to kernels several times slower.
    """
    if bias is None:
        return hidden, weight
    pad = -(hidden.shape[-1] + 1) % 8
    column = bias[:, None].to(weight.dtype)
    # zeros_like keeps the bias's kind: under tensor parallelism it is a DTensor, like the weight.
    weight_parts = (
        (weight, column) if pad == 0 else (weight, column, torch.zeros_like(column).expand(-1, pad))
    )
    ones = torch.ones(*hidden.shape[:-1], 1, dtype=hidden.dtype, device=hidden.device)
    zeros = torch.zeros(*hidden.shape[:-1], pad, dtype=hidden.dtype, device=hidden.device)
    return torch.cat((hidden, ones, zeros), dim=-1), torch.cat(weight_parts, dim=-1)


def _init_part(module_name: str) -> str:
    """The part a module's initialization belongs to: its layer (`encoder.layers.<i>` or
    `decoder.layers.<i>`), else the module itself."""
    parts = module_name.split(".")
    if parts[0] in ("encoder", "decoder") and parts[1:2] == ["layers"] and len(parts) > 2:
        return ".".join(parts[:3])
    return module_name


__all__ = [
    "OutputLayer",
    "T5Decoder",
    "T5DecoderLayer",
    "T5Embedding",
    "T5Model",
    "T5PositionEmbeddingType",
    "T5Spec",
    "t5_num_parameters",
]
