"""Size, compute and memory of a model, computed from its provider (nothing is built).

FLOPs follow the PaLM / torchtitan MFU convention: per token,
6 x (matmul parameters) + 12 x layers x heads x head_dim x seq, where the matmul parameters are all
parameters except the input embedding tables, with the output layer counted even when it is tied to
the input embedding (its GEMM runs either way). The causal variant halves the attention term, since a
causal kernel skips the masked half of the scores.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from viaduct.models.gpt.provider import GPTModelProvider

H100_BF16_PEAK_FLOPS = 989e12
"""Dense bf16 peak of an H100 SXM (and H200), the MFU denominator."""


def _norm_params(provider: GPTModelProvider, size: int) -> int:
    return 2 * size if provider.normalization == "LayerNorm" else size


def _layer_params(p: GPTModelProvider) -> int:
    assert p.kv_channels is not None and p.num_query_groups is not None and p.ffn_hidden_size is not None
    h, d, ffn = p.hidden_size, p.kv_channels, p.ffn_hidden_size
    qkv_out = (p.num_attention_heads + 2 * p.num_query_groups) * d
    n = 2 * _norm_params(p, h)
    n += qkv_out * h + (qkv_out if p.add_bias_linear or p.add_qkv_bias else 0)
    if p.qk_layernorm:
        n += 2 * _norm_params(p, d)
    n += p.num_attention_heads * d * h + (h if p.add_bias_linear else 0)
    fc1_out = 2 * ffn if p.gated_linear_unit else ffn
    n += fc1_out * h + ffn * h + ((fc1_out + h) if p.add_bias_linear else 0)
    return n


def embedding_parameters(provider: GPTModelProvider) -> int:
    """Input embedding tables: tokens, plus learned positions when configured."""
    provider.finalize()
    n = provider.padded_vocab_size() * provider.hidden_size
    if provider.position_embedding_type == "learned_absolute":
        n += provider.seq_length * provider.hidden_size
    return n


def num_parameters(provider: GPTModelProvider, *, exclude_embeddings: bool = False) -> int:
    """Parameters of the model `provider.provide()` builds (each shared tensor once).

    `exclude_embeddings` leaves out the input embedding tables (the "non-embedding" count); a tied
    output layer shares the token table, so it is left out with it.
    """
    provider.finalize()
    h, vocab = provider.hidden_size, provider.padded_vocab_size()
    n = provider.num_layers * _layer_params(provider) + _norm_params(provider, h)
    if not provider.share_embeddings_and_output_weights:
        n += vocab * h
    return n if exclude_embeddings else n + embedding_parameters(provider)


def flops_per_token(
    provider: GPTModelProvider, seq_length: int | None = None, *, causal: bool = False
) -> float:
    """Training FLOPs (forward + backward) per token at `seq_length` (default: model.seq_length)."""
    provider.finalize()
    assert provider.kv_channels is not None
    seq = seq_length or provider.seq_length
    matmul_params = num_parameters(provider, exclude_embeddings=True)
    if provider.share_embeddings_and_output_weights:
        matmul_params += provider.padded_vocab_size() * provider.hidden_size
    attention = 12 * provider.num_layers * provider.num_attention_heads * provider.kv_channels * seq
    return 6.0 * matmul_params + (attention / 2 if causal else attention)


# Dense bf16 peaks (no sparsity) of the accelerators we measure on; MFU is only reported for these.
_PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "B200": 2250e12}


def peak_flops(device_name: str) -> float | None:
    """Dense bf16 peak FLOP/s of a GPU by its name (torch.cuda.get_device_name), None if unknown."""
    for key, value in _PEAK_BF16_FLOPS.items():
        if key in device_name.upper():
            return value
    return None


def mfu(tokens_per_second: float, flops_per_tok: float, peak_flops: float = H100_BF16_PEAK_FLOPS) -> float:
    """Model FLOPs utilization in [0, 1]."""
    return tokens_per_second * flops_per_tok / peak_flops


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes needed on one device for a training step (estimates; allocator overhead not included)."""

    parameters: int
    """The weights, in params_dtype."""
    gradients: int
    """One gradient per weight: float32 main grads with master weights, else params_dtype."""
    optimizer: int
    """Adam's two moments, plus float32 master weights when params_dtype is 16-bit."""
    activations: int
    """Tensors the transformer layers keep for the backward pass."""
    logits: int
    """The logits kept for the backward (none with the fused loss above its budget) and one chunk."""

    @property
    def total(self) -> int:
        return self.parameters + self.gradients + self.optimizer + self.activations + self.logits

    def as_gib(self) -> dict[str, float]:
        """Each part and the total in GiB, rounded to 0.01."""
        parts = {
            k: getattr(self, k) for k in ("parameters", "gradients", "optimizer", "activations", "logits")
        }
        parts["total"] = self.total
        return {k: round(v / 2**30, 2) for k, v in parts.items()}


def _layer_activation_elements(p: GPTModelProvider) -> int:
    """Elements per token one layer keeps for backward (compute dtype), without recompute."""
    assert p.kv_channels is not None and p.num_query_groups is not None and p.ffn_hidden_size is not None
    h, d, ffn = p.hidden_size, p.kv_channels, p.ffn_hidden_size
    q, kv = p.num_attention_heads * d, p.num_query_groups * d
    norms = 4 * h  # each norm keeps its input and the next GEMM keeps its output
    attention = (q + 2 * kv) + q  # q, k, v for the kernel + its output (input of linear_proj)
    mlp = 3 * ffn if p.gated_linear_unit else 2 * ffn  # fc1 output(s) + activation output
    return norms + attention + mlp


def estimate_memory(
    provider: GPTModelProvider,
    micro_batch_size: int,
    seq_length: int | None = None,
    *,
    master_weights: bool | None = None,
    keep_logits_bytes: int = 4 << 30,
) -> MemoryEstimate:
    """Memory of one training step with Adam for `micro_batch_size` x `seq_length` tokens.

    Counts activation recompute (full: one saved input per recompute chunk plus one layer's
    activations; selective: the recomputed parts dropped), dropout masks, and the loss path
    (cross_entropy_loss_fusion: one chunk of logits, plus all of them when they fit in
    `keep_logits_bytes`, see `viaduct.models.common.loss`; otherwise the full logits in the compute
    dtype plus a float32 copy). `master_weights` defaults to "params_dtype is 16-bit"; they come with
    float32 main grads.
    """
    from viaduct.models.common.loss import default_chunk_tokens

    provider.finalize()
    p = provider
    tokens = micro_batch_size * (seq_length or p.seq_length)
    pbytes = p.params_dtype.itemsize
    n = num_parameters(p)
    if master_weights is None:
        master_weights = pbytes < 4
    optimizer = n * (8 + (4 if master_weights else 0))
    act_dtype = p.autocast_dtype.itemsize if p.enable_autocast and p.autocast_dtype else pbytes
    per_layer = _layer_activation_elements(p) * act_dtype
    if p.hidden_dropout > 0:
        per_layer += 2 * p.hidden_size  # two bool masks
    if p.recompute_granularity == "selective" and "mlp" in (p.recompute_modules or ()):
        # The fused attention kernels keep only q, k, v and the output, so core_attn frees nothing here.
        assert p.ffn_hidden_size is not None
        per_layer -= (3 if p.gated_linear_unit else 2) * p.ffn_hidden_size * act_dtype
    residual_bytes = 4 if p.fp32_residual_connection else act_dtype
    if p.recompute_granularity == "full":
        k = p.recompute_num_layers or 1
        if p.recompute_method == "uniform":
            kept = -(-p.num_layers // k) * p.hidden_size * residual_bytes + k * per_layer
        else:  # the kept layers' activations are gone by the time the first k are recomputed
            kept = k * p.hidden_size * residual_bytes + max((p.num_layers - k) * per_layer, per_layer)
    else:
        kept = p.num_layers * per_layer
    activations = tokens * (kept + 2 * p.hidden_size * act_dtype)  # + final norm input/output
    vocab = p.padded_vocab_size()
    if p.cross_entropy_loss_fusion:
        chunk = min(tokens, default_chunk_tokens(vocab))
        logits = chunk * vocab * act_dtype + tokens * 8
        all_logits = tokens * vocab * act_dtype
        logits += all_logits if all_logits <= keep_logits_bytes else chunk * vocab * act_dtype
    else:
        logits = tokens * vocab * (2 * act_dtype + 4)
    return MemoryEstimate(
        parameters=n * pbytes,
        gradients=n * (4 if master_weights else pbytes),
        optimizer=optimizer,
        activations=activations,
        logits=logits,
    )
