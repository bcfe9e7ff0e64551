"""Generation with a KV cache on the CPU: the cached forward against the full one, greedy and sampled
decoding, batching of prompts of different lengths, EOS, and the sampling filters (tiny models)."""

from __future__ import annotations

import pytest
import torch

from viaduct.config import ConfigError
from viaduct.data.tokenizers import ByteLevelTokenizer
from viaduct.inference import KVCache, filter_logits, generate, generate_tokens, sample
from viaduct.models import AttnBackend, GPTModelProvider
from viaduct.models.gpt.model import GPTModel

VOCAB = 96
SEQ = 40

# The architectures whose position handling or attention differ: Llama-style (RoPE, GQA, SwiGLU,
# RMSNorm), GPT-2 style (learned absolute positions, LayerNorm, biases), QK norm, a sliding window,
# and the unfused attention path.
VARIANTS: dict[str, dict[str, object]] = {
    "llama_rope_gqa": dict(
        normalization="RMSNorm",
        gated_linear_unit=True,
        activation_func="silu",
        add_bias_linear=False,
        position_embedding_type="rope",
        num_query_groups=2,
        share_embeddings_and_output_weights=False,
    ),
    "gpt2_learned": dict(
        normalization="LayerNorm",
        add_bias_linear=True,
        position_embedding_type="learned_absolute",
        share_embeddings_and_output_weights=True,
    ),
    "qk_norm": dict(position_embedding_type="rope", qk_layernorm=True, num_query_groups=1),
    "window": dict(position_embedding_type="rope", window_size=(3, 0)),
    "unfused": dict(
        position_embedding_type="rope", num_query_groups=2, attention_backend=AttnBackend.unfused
    ),
}


def build(variant: str, seed: int = 0, **kw: object) -> GPTModel:
    base: dict[str, object] = dict(
        num_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        vocab_size=VOCAB,
        seq_length=SEQ,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        # Larger weights than training's init: peaked distributions, so greedy choices are clear-cut.
        init_method_std=0.2,
        make_vocab_size_divisible_by=128,  # padded output rows, which generation must never pick
    )
    base.update(VARIANTS[variant])
    base.update(kw)
    torch.manual_seed(seed)
    return GPTModelProvider(**base).provide().eval()  # type: ignore[arg-type]


def prompt(n: int, seed: int) -> list[int]:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def greedy_without_cache(model: GPTModel, ids: list[int], n: int, vocab: int = VOCAB) -> list[int]:
    """The reference: the full forward over the whole sequence again for every new token (the padding
    rows of the output layer, from `vocab` on, left out)."""
    seq = list(ids)
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([seq]))[0, -1, :vocab]
            seq.append(int(logits.argmax()))
    return seq[len(ids) :]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_prefill_and_decode_logits_equal_the_full_forward(variant: str) -> None:
    model = build(variant)
    tokens = torch.randint(0, VOCAB, (2, 14), generator=torch.Generator().manual_seed(3))
    prefill = 5
    with torch.no_grad():
        full = model(tokens)
        cache = KVCache(model, 2, tokens.shape[1])
        got = [model(tokens[:, :prefill], kv_cache=cache, cache_position=torch.arange(prefill))]
        for i in range(prefill, tokens.shape[1]):
            got.append(model(tokens[:, i : i + 1], kv_cache=cache, cache_position=torch.tensor([i])))
    torch.testing.assert_close(torch.cat(got, dim=1), full, rtol=1e-5, atol=1e-5)


def test_cache_holds_only_the_kv_heads_in_the_model_dtype() -> None:
    model = build("llama_rope_gqa").to(torch.bfloat16)
    cache = KVCache(model, 3, 17)
    assert len(cache.layers) == 2
    for k, v in cache.layers:
        assert k.shape == v.shape == (3, 2, 17, 16)  # 2 query groups, not 4 heads
        assert k.dtype == v.dtype == torch.bfloat16
    assert cache.nbytes == 2 * 2 * 3 * 2 * 17 * 16 * 2


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_greedy_with_cache_equals_greedy_without(variant: str) -> None:
    model = build(variant)
    ids = prompt(6, seed=1)
    got = generate_tokens(model, [ids], max_new_tokens=12)[0]
    assert got == greedy_without_cache(model, ids, 12)
    assert all(t < VOCAB for t in got)  # the padded rows of the output layer are never chosen


@pytest.mark.parametrize("variant", ["llama_rope_gqa", "gpt2_learned", "window"])
def test_batched_prompts_of_different_lengths_equal_each_alone(variant: str) -> None:
    model = build(variant)
    prompts = [prompt(n, seed=n) for n in (3, 9, 1, 6)]
    batched = generate_tokens(model, prompts, max_new_tokens=10)
    alone = [generate_tokens(model, [p], max_new_tokens=10)[0] for p in prompts]
    assert batched == alone
    assert batched[1] == greedy_without_cache(model, prompts[1], 10)


def test_a_row_stops_at_eos_and_the_loop_when_every_row_has() -> None:
    model = build("llama_rope_gqa")
    a, b = prompt(4, seed=11), prompt(7, seed=12)
    free = generate_tokens(model, [a, b], max_new_tokens=12)
    eos = free[0][3]
    assert eos not in free[0][:3]
    stopped = generate_tokens(model, [a, b], max_new_tokens=12, eos_id=eos)
    assert stopped[0] == free[0][:4]  # ends with its EOS
    cut = free[1].index(eos) + 1 if eos in free[1] else 12
    assert stopped[1] == free[1][:cut]
    # Every row ends at once: nothing more is generated.
    both = generate_tokens(model, [a, a], max_new_tokens=12, eos_id=eos)
    assert both == [free[0][:4], free[0][:4]]


def test_generation_stops_at_the_models_seq_length() -> None:
    model = build("gpt2_learned")  # learned positions: no position past seq_length exists
    long, short = prompt(SEQ - 3, seed=5), prompt(4, seed=6)
    out = generate_tokens(model, [long, short], max_new_tokens=10)
    assert len(out[0]) == 3 and len(out[1]) == 10
    assert out == [generate_tokens(model, [p], max_new_tokens=10)[0] for p in (long, short)]


def test_seeded_sampling_is_reproducible() -> None:
    model = build("llama_rope_gqa")
    prompts = [prompt(5, seed=1), prompt(2, seed=2)]
    kw = dict(max_new_tokens=16, temperature=1.0, top_k=20, top_p=0.9)
    first = generate_tokens(model, prompts, seed=7, **kw)  # type: ignore[arg-type]
    assert generate_tokens(model, prompts, seed=7, **kw) == first  # type: ignore[arg-type]
    assert generate_tokens(model, prompts, seed=8, **kw) != first  # type: ignore[arg-type]


def test_training_mode_is_restored_after_generation() -> None:
    model = build("gpt2_learned").train()
    generate_tokens(model, [prompt(3, seed=0)], max_new_tokens=2)
    assert model.training


KNOWN = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()


def draws(n: int = 4000, seed: int = 0, **kw: object) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return sample(KNOWN.expand(n, 4), generator=g, **kw)  # type: ignore[arg-type]


def test_temperature_zero_is_argmax() -> None:
    logits = torch.tensor([[0.1, 2.0, -1.0], [3.0, 0.0, 2.9]])
    assert sample(logits, temperature=0.0).tolist() == [1, 0]


def test_sampling_follows_the_distribution() -> None:
    counts = torch.bincount(draws(), minlength=4).float() / 4000
    torch.testing.assert_close(counts, KNOWN.exp(), atol=0.03, rtol=0)
    assert torch.equal(draws(seed=3), draws(seed=3))


def test_top_k_restricts_the_support() -> None:
    assert set(draws(top_k=2).tolist()) == {0, 1}
    assert set(draws(top_k=1).tolist()) == {0}
    assert set(draws(top_k=0).tolist()) == {0, 1, 2, 3}  # 0: no limit
    kept = filter_logits(KNOWN[None], top_k=3)
    assert torch.isinf(kept[0, 3]) and torch.isfinite(kept[0, :3]).all()


def test_top_p_keeps_the_smallest_set_reaching_p() -> None:
    assert set(draws(top_p=0.7).tolist()) == {0, 1}  # 0.5 < 0.7 <= 0.5 + 0.3
    assert set(draws(top_p=0.5).tolist()) == {0}  # the first token alone reaches 0.5
    assert set(draws(top_p=0.81).tolist()) == {0, 1, 2}
    assert set(draws(top_p=1.0).tolist()) == {0, 1, 2, 3}
    # The support is that of the renormalised distribution: 0 and 1 in ratio 5 : 3.
    counts = torch.bincount(draws(top_p=0.7), minlength=4).float() / 4000
    torch.testing.assert_close(counts[:2], torch.tensor([5 / 8, 3 / 8]), atol=0.03, rtol=0)


def test_invalid_settings_are_reported_together() -> None:
    model = build("gpt2_learned")
    with pytest.raises(ConfigError) as info:
        generate_tokens(model, [[1]], temperature=-1.0, top_k=-2, top_p=0.0, max_new_tokens=-3)
    text = str(info.value)
    for name in ("temperature", "top_k", "top_p", "max_new_tokens"):
        assert name in text
    with pytest.raises(ConfigError, match=r"input_ids\[1\].*empty"):
        generate_tokens(model, [[1], []])
    with pytest.raises(ConfigError, match="seq_length"):
        generate_tokens(model, [[1] * (SEQ + 1)])
    with pytest.raises(ConfigError, match="outside"):
        generate_tokens(model, [[VOCAB + 5]])


def test_generate_text_batches_prompts_and_stops_at_eos() -> None:
    tok = ByteLevelTokenizer()
    model = build("llama_rope_gqa", vocab_size=tok.vocab_size)
    prompts = ["ab", "hello there", ""]
    texts = generate(model, tok, prompts, max_new_tokens=8, stop_at_eos=False)
    assert len(texts) == 3
    for p, text in zip(prompts, texts, strict=True):
        ids = tok.tokenize(p) or [tok.eod]
        new = generate_tokens(model, [ids], max_new_tokens=8, vocab_size=tok.vocab_size)[0]
        assert text == tok.detokenize(new)
    assert generate(model, tok, "ab", max_new_tokens=8, stop_at_eos=False) == texts[:1]
    # With the first generated token as the end of sequence, the completion is empty.
    first = generate_tokens(model, [tok.tokenize("ab")], max_new_tokens=1, vocab_size=tok.vocab_size)[0][0]
    assert generate(model, tok, "ab", max_new_tokens=8, eos_id=first) == [""]


@pytest.mark.slow
def test_compiled_decode_step_gives_the_eager_tokens() -> None:
    # What a GPU run does by default, here with the CPU's compiler: one static-shape graph per step.
    model = build("llama_rope_gqa")
    prompts = [prompt(3, seed=1), prompt(7, seed=2)]
    eager = generate_tokens(model, prompts, max_new_tokens=8)
    assert generate_tokens(model, prompts, max_new_tokens=8, compile=True) == eager
