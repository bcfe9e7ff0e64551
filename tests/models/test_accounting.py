"""viaduct.models.accounting against the models it describes: parameter counts, FLOPs and memory."""

from __future__ import annotations

import pytest
import torch

from viaduct.config import ConfigError
from viaduct.models import AttnBackend, GPTModelProvider
from viaduct.models.accounting import (
    embedding_parameters,
    estimate_memory,
    flops_per_token,
    mfu,
    num_parameters,
)
from viaduct.models.common.loss import default_chunk_tokens


def provider(**kw: object) -> GPTModelProvider:
    base: dict[str, object] = dict(
        num_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        vocab_size=128,
        seq_length=32,
        hidden_dropout=0.0,
        attention_dropout=0.0,
    )
    base.update(kw)
    return GPTModelProvider(**base)  # type: ignore[arg-type]


CONFIGS = {
    "gpt2-like": dict(),
    "llama-like": dict(
        normalization="RMSNorm",
        add_bias_linear=False,
        gated_linear_unit=True,
        activation_func="silu",
        position_embedding_type="rope",
        num_query_groups=2,
        share_embeddings_and_output_weights=False,
    ),
    "qwen3-like": dict(
        normalization="RMSNorm",
        add_bias_linear=False,
        qk_layernorm=True,
        kv_channels=32,
        gated_linear_unit=True,
        position_embedding_type="rope",
        num_query_groups=1,
    ),
    "qwen2-like": dict(
        normalization="RMSNorm", add_bias_linear=False, add_qkv_bias=True, position_embedding_type="rope"
    ),
    "layernorm-qk-untied": dict(qk_layernorm=True, share_embeddings_and_output_weights=False),
    "padded-vocab": dict(vocab_size=1000, should_pad_vocab=True, make_vocab_size_divisible_by=64),
    "no-positions": dict(position_embedding_type="none", ffn_hidden_size=96, num_layers=3),
    "zero-centered": dict(layernorm_zero_centered_gamma=True, normalization="RMSNorm", num_query_groups=2),
}


@pytest.mark.parametrize("kw", CONFIGS.values(), ids=CONFIGS.keys())
def test_num_parameters_matches_the_built_model(kw: dict) -> None:
    p = provider(**kw)
    model = p.provide()
    params = dict(model.named_parameters())
    assert num_parameters(p) == sum(t.numel() for t in params.values())
    tables = sum(t.numel() for n, t in params.items() if n.startswith("embedding."))
    assert embedding_parameters(p) == tables
    assert num_parameters(p, exclude_embeddings=True) == num_parameters(p) - tables
    expected_tables = p.padded_vocab_size() * 64
    if p.position_embedding_type == "learned_absolute":
        expected_tables += p.seq_length * 64
    assert tables == expected_tables


def test_flops_per_token_by_hand() -> None:
    p = provider(ffn_hidden_size=256)  # LayerNorm, biases, tied, learned positions
    L, h, heads, d, ffn, V, s = 2, 64, 4, 16, 256, 128, 32
    layer = (
        2 * 2 * h  # two LayerNorms (weight + bias)
        + (3 * heads * d) * h
        + 3 * heads * d  # linear_qkv
        + h * heads * d
        + h  # linear_proj
        + ffn * h
        + ffn  # linear_fc1
        + h * ffn
        + h  # linear_fc2
    )
    non_embedding = L * layer + 2 * h  # + final norm
    assert num_parameters(p, exclude_embeddings=True) == non_embedding == 100096
    attention = 12 * L * heads * d * s
    assert flops_per_token(p) == 6 * (non_embedding + V * h) + attention == 698880
    assert flops_per_token(p, causal=True) == 6 * (non_embedding + V * h) + attention / 2
    assert flops_per_token(p, 64) - flops_per_token(p) == 12 * L * heads * d * 32
    # The output GEMM counts once, tied or not.
    assert flops_per_token(provider(ffn_hidden_size=256, share_embeddings_and_output_weights=False)) == (
        flops_per_token(p)
    )
    assert mfu(1000.0, flops_per_token(p), peak_flops=698880e3) == pytest.approx(1.0)


# ---------------------------------------------------------------------------------------------- memory


def saved_bytes(p: GPTModelProvider, micro_batch_size: int) -> int:
    """Bytes of the non-parameter tensors a CPU float32 training forward saves for backward."""
    torch.manual_seed(0)
    model = p.provide()
    weights = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    x = torch.randint(0, p.vocab_size, (micro_batch_size, p.seq_length))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(x, labels=x)
    loss.mean().backward()  # the graph was real
    return sum(seen.values())


FULL_UNIFORM = dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
SELECTIVE = {m: dict(recompute_granularity="selective", recompute_modules=[m]) for m in ("core_attn", "mlp")}
MEMORY_CONFIGS = {
    "plain": dict(),
    "dropout": dict(hidden_dropout=0.1),
    "llama-like": CONFIGS["llama-like"],
    "wider": dict(hidden_size=128, num_layers=3, seq_length=64),
    "selective-mlp": SELECTIVE["mlp"],
    "selective-core_attn": SELECTIVE["core_attn"],
}


@pytest.mark.slow
@pytest.mark.parametrize("kw", MEMORY_CONFIGS.values(), ids=MEMORY_CONFIGS.keys())
def test_activation_estimate_is_close_to_the_saved_tensors(kw: dict) -> None:
    p = provider(**kw)
    estimate = estimate_memory(p, 2).activations
    measured = saved_bytes(p, 2)
    assert 0.5 <= estimate / measured <= 2, (estimate, measured)


def test_full_recompute_estimate_is_saved_inputs_plus_one_layer() -> None:
    # With uniform chunks of one layer the peak is the chunk inputs plus one recomputed layer.
    p = provider(**FULL_UNIFORM)
    per_layer = saved_bytes(provider(), 2) / 2
    measured = saved_bytes(p, 2)
    assert measured < 0.3 * saved_bytes(provider(), 2)
    estimate = estimate_memory(p, 2).activations
    assert 0.5 <= estimate / (measured + per_layer) <= 2


def test_recompute_shrinks_the_estimate_and_the_saved_tensors() -> None:
    none = provider()
    est = estimate_memory(none, 2).activations
    for kw in (FULL_UNIFORM, SELECTIVE["mlp"]):
        assert estimate_memory(provider(**kw), 2).activations < est, kw
    # The fused kernels keep only q, k, v and the output, so core_attn recompute frees nothing there.
    assert estimate_memory(provider(**SELECTIVE["core_attn"]), 2).activations == est
    measured = saved_bytes(none, 2)
    assert saved_bytes(provider(**FULL_UNIFORM), 2) < 0.3 * measured
    assert saved_bytes(provider(**SELECTIVE["mlp"]), 2) < 0.7 * measured
    # The unfused attention keeps its [heads, seq, seq] probabilities unless core_attn is recomputed.
    unfused = provider(attention_backend=AttnBackend.unfused)
    unfused_core = provider(attention_backend=AttnBackend.unfused, **SELECTIVE["core_attn"])
    assert saved_bytes(unfused_core, 2) < saved_bytes(unfused, 2) - 2 * 2 * 4 * 32 * 32 * 4


def test_block_recompute_never_costs_more_than_no_recompute() -> None:
    block = provider(recompute_granularity="full", recompute_method="block", recompute_num_layers=1)
    assert saved_bytes(block, 2) < saved_bytes(provider(), 2)  # what really happens
    assert estimate_memory(block, 2).activations < estimate_memory(provider(), 2).activations


def test_layernorm_recompute_is_refused_until_it_can_free_memory() -> None:
    p = provider(recompute_granularity="selective", recompute_modules=["layernorm"])
    with pytest.raises(ConfigError, match="recomputing 'layernorm' is not supported yet"):
        p.finalize()


def test_activations_grow_linearly_with_the_micro_batch() -> None:
    p = provider(**CONFIGS["llama-like"])
    one = estimate_memory(p, 1)
    for b in (2, 3, 8):
        est = estimate_memory(p, b)
        assert est.activations == b * one.activations
        assert (est.parameters, est.gradients, est.optimizer) == (
            one.parameters,
            one.gradients,
            one.optimizer,
        )
    assert saved_bytes(p, 3) == pytest.approx(3 * saved_bytes(p, 1), rel=0.02)
    assert estimate_memory(p, 1, seq_length=16).activations == one.activations // 2


def test_fused_loss_keeps_fewer_logits_when_they_do_not_fit() -> None:
    vocab, seq, b = 128000, 4096, 4
    fused = provider(vocab_size=vocab, seq_length=seq)
    unfused = provider(vocab_size=vocab, seq_length=seq, cross_entropy_loss_fusion=False)
    tokens = b * seq
    chunk = default_chunk_tokens(vocab)
    assert chunk == 8192 < tokens  # more than one chunk
    all_logits = tokens * vocab * 4
    unfused_logits = estimate_memory(unfused, b).logits
    assert unfused_logits == tokens * vocab * (2 * 4 + 4)  # logits, their gradient, a float32 copy
    over = estimate_memory(fused, b, keep_logits_bytes=all_logits - 1).logits
    assert over == 2 * chunk * vocab * 4 + tokens * 8  # two chunks + float32 loss and lse
    assert over < unfused_logits
    kept = estimate_memory(fused, b, keep_logits_bytes=all_logits).logits
    assert kept == all_logits + chunk * vocab * 4 + tokens * 8
    assert over < kept < unfused_logits
    assert estimate_memory(unfused, b, keep_logits_bytes=0).logits == unfused_logits  # fused only


def test_memory_estimate_parts() -> None:
    p = provider()
    n = num_parameters(p)
    est = estimate_memory(p, 1)
    assert (est.parameters, est.gradients, est.optimizer) == (4 * n, 4 * n, 8 * n)
    assert est.total == est.parameters + est.gradients + est.optimizer + est.activations + est.logits
    bf16 = provider().apply_overrides_and_finalize(dtype="bf16")
    est16 = estimate_memory(bf16, 1)
    assert (est16.parameters, est16.gradients, est16.optimizer) == (2 * n, 4 * n, 12 * n)
    assert est16.activations == est.activations // 2
    assert estimate_memory(bf16, 1, master_weights=False).gradients == 2 * n
    assert set(est.as_gib()) == {"parameters", "gradients", "optimizer", "activations", "logits", "total"}
