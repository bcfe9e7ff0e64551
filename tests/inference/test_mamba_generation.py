"""Generation with Mamba-2 and hybrid models: each Mamba layer carries its scan state and convolution
inputs from token to token, and the result is what the full forward over the whole sequence gives."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tests.inference.test_generation import greedy_without_cache

from viaduct.inference import KVCache, generate, generate_tokens, load_checkpoint
from viaduct.models import MambaModelProvider
from viaduct.models.mamba.mixer import MambaCache
from viaduct.models.mamba.model import MambaModel
from viaduct.testing import run_viaduct, tiny_pretrain_config
from viaduct.training.pretrain import pretrain

VOCAB = 97
SEQ = 40
PATTERNS = ["MMM", "M*M-"]  # Mamba alone, and mixed with attention and MLP layers


def build(pattern: str, seed: int = 0) -> MambaModel:
    """A small float32 model: 64 wide, 8 heads of 16 in 2 groups, state 16, chunks of 4 (prompts span
    several chunks and end inside one)."""
    provider = MambaModelProvider(
        hybrid_layer_pattern=pattern,
        hidden_size=64,
        num_attention_heads=4,
        ffn_hidden_size=128,
        mamba_num_groups=2,
        mamba_head_dim=16,
        mamba_state_dim=16,
        mamba_chunk_size=4,
        seq_length=SEQ,
        vocab_size=VOCAB,
        params_dtype="float32",
        bf16=False,
        make_vocab_size_divisible_by=64,  # padded output rows, which generation must never pick
        # Larger weights than training's init: peaked distributions, so greedy choices are clear-cut.
        init_method_std=0.2,
    )
    return provider.provide(device="cpu", init_seed=seed).eval()


def prompt(n: int, seed: int) -> list[int]:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("pattern", PATTERNS)
def test_prefill_continuation_and_decode_logits_equal_the_full_forward(pattern: str) -> None:
    model = build(pattern)
    tokens = torch.randint(0, VOCAB, (2, 19), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(tokens)
        cache = KVCache(model, 2, tokens.shape[1])
        # A prefill of 7 tokens (chunks 4 + 3), a continuation of 6 from the state (chunks 4 + 2),
        # then one token at a time.
        got = [model(tokens[:, :7], kv_cache=cache, cache_position=torch.arange(7))]
        got.append(model(tokens[:, 7:13], kv_cache=cache, cache_position=torch.arange(7, 13)))
        for i in range(13, tokens.shape[1]):
            got.append(model(tokens[:, i : i + 1], kv_cache=cache, cache_position=torch.tensor([i])))
    torch.testing.assert_close(torch.cat(got, dim=1), full, rtol=1e-4, atol=1e-4)


def test_each_layer_gets_the_cache_of_its_kind() -> None:
    model = build("M*M-")
    cache = KVCache(model, 3, 17)
    mamba, attention, _, mlp = cache.layers
    assert isinstance(mamba, MambaCache) and isinstance(cache.layers[2], MambaCache)
    assert mamba.conv.shape == (3, 3, 128 + 2 * 2 * 16)  # conv_kernel - 1 inputs of x, B and C
    assert mamba.ssm.shape == (3, 8, 16, 16) and mamba.ssm.dtype == torch.float32
    assert isinstance(attention, tuple) and attention[0].shape == (3, 4, 17, 16)
    assert mlp is None
    assert cache.nbytes == 2 * (mamba.conv.nbytes + mamba.ssm.nbytes) + 2 * attention[0].nbytes


@pytest.mark.parametrize("pattern", PATTERNS)
def test_greedy_with_cache_equals_greedy_without(pattern: str) -> None:
    model = build(pattern)
    ids = prompt(9, seed=1)
    got = generate_tokens(model, [ids], max_new_tokens=12)[0]
    assert got == greedy_without_cache(model, ids, 12, VOCAB)
    assert all(t < VOCAB for t in got)


def test_batched_prompts_of_different_lengths_equal_each_alone() -> None:
    # Left padding: a row's padding tokens must leave its scan state and convolution untouched.
    model = build("M*M-")
    prompts = [prompt(n, seed=n) for n in (3, 10, 1, 6)]
    batched = generate_tokens(model, prompts, max_new_tokens=10)
    alone = [generate_tokens(model, [p], max_new_tokens=10)[0] for p in prompts]
    assert batched == alone
    assert batched[1] == greedy_without_cache(model, prompts[1], 10, VOCAB)


def test_left_padding_leaves_each_rows_logits_as_alone() -> None:
    model = build("M*M-")
    prompts = [prompt(n, seed=n) for n in (3, 10, 6)]
    longest = max(len(p) for p in prompts)
    pads = [longest - len(p) for p in prompts]
    ids = torch.tensor([[5] * pad + p for pad, p in zip(pads, prompts, strict=True)])
    nxt = torch.tensor([[7], [8], [9]])
    with torch.no_grad():
        cache = KVCache(model, len(prompts), longest + 1, pad_lengths=pads)
        batched = model(ids, kv_cache=cache, cache_position=torch.arange(longest))
        step = model(nxt, kv_cache=cache, cache_position=torch.tensor([longest]))
        for row, (pad, p) in enumerate(zip(pads, prompts, strict=True)):
            alone = model(torch.tensor([[*p, int(nxt[row])]]))[0]
            torch.testing.assert_close(batched[row, pad:], alone[:-1], rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(step[row, 0], alone[-1], rtol=1e-4, atol=1e-4)


def test_compiled_decode_step_gives_the_eager_tokens() -> None:
    model = build("M*M-")
    prompts = [prompt(5, seed=2), prompt(8, seed=3)]
    eager = generate_tokens(model, prompts, max_new_tokens=6, compile=False)
    assert generate_tokens(model, prompts, max_new_tokens=6, compile=True) == eager


@pytest.mark.slow
def test_generate_command_on_a_trained_hybrid_checkpoint(tmp_path: Path) -> None:
    cfg = tiny_pretrain_config(
        "train.train_iters=2", "train.eval_iters=0", f"checkpoint.save={tmp_path / 'ckpt'}"
    )
    cfg.model = build("M*M-").config
    cfg.model.vocab_size = None  # the tokenizer's, as a run sets it
    pretrain(cfg)
    proc = run_viaduct(
        "generate",
        "--checkpoint",
        str(tmp_path / "ckpt"),
        "--prompt",
        "def main",
        "--max-new-tokens",
        "8",
        "--temperature",
        "0",
        cwd=tmp_path,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    loaded = load_checkpoint(tmp_path / "ckpt", device="cpu")
    assert isinstance(loaded.model, MambaModel)
    expected = generate(loaded.model, loaded.tokenizer, ["def main"], max_new_tokens=8)
    assert proc.stdout == f"def main{expected[0]}\n"
