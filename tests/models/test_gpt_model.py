"""GPTModel on the CPU: shapes, loss, causality, GQA, rotary, tied weights, init, recompute, compile,
attention backends and the config options with a visible effect (tiny models, a few seconds in all)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from viaduct.config import ConfigError
from viaduct.models import AttnBackend, GPTModelProvider
from viaduct.models.accounting import num_parameters
from viaduct.models.common.activations import fast_gelu, quick_gelu, squared_relu
from viaduct.models.compile import compile_model

VOCAB = 128
SEQ = 32


def provider(**kw: object) -> GPTModelProvider:
    base: dict[str, object] = dict(
        num_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        vocab_size=VOCAB,
        seq_length=SEQ,
        hidden_dropout=0.0,
        attention_dropout=0.0,
    )
    base.update(kw)
    return GPTModelProvider(**base)  # type: ignore[arg-type]


def build(seed: int = 0, dtype: torch.dtype = torch.float32, **kw: object):
    torch.manual_seed(seed)
    return provider(**kw).provide().to(dtype)


def tokens(b: int = 2, s: int = 16, vocab: int = VOCAB, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (b, s), generator=torch.Generator().manual_seed(seed))


def causal_mask(s: int) -> torch.Tensor:
    """Megatron's mask: True above the diagonal (masked out)."""
    return torch.ones(s, s, dtype=torch.bool).triu(1)


def final_norm(model: torch.nn.Module):
    """The final norm, wherever the model keeps it (Megatron: in the decoder)."""
    return getattr(model.decoder, "final_layernorm", None) or getattr(model, "final_layernorm", None)


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


# ---------------------------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("fusion", [True, False])
def test_logits_and_per_token_loss(fusion: bool) -> None:
    model = build(cross_entropy_loss_fusion=fusion)
    x, y = tokens(), tokens(seed=2)
    logits = model(x)
    assert logits.shape == (2, 16, VOCAB) and logits.dtype == torch.float32
    loss = model(x, labels=y)
    assert loss.shape == (2, 16) and loss.dtype == torch.float32
    ref = F.cross_entropy(logits.reshape(-1, VOCAB), y.reshape(-1), reduction="none").view(2, 16)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    assert (loss > 0).all()

    y_ignored = y.clone()
    y_ignored[0, :5] = -100
    y_ignored[1, -3:] = -100
    masked = model(x, labels=y_ignored)
    ignored = y_ignored == -100
    assert (masked[ignored] == 0).all()
    torch.testing.assert_close(masked[~ignored], loss[~ignored], rtol=1e-5, atol=1e-6)


def _autograd_nodes(t: torch.Tensor) -> set[str]:
    seen, todo = set(), [t.grad_fn]
    while todo:
        fn = todo.pop()
        if fn is not None and type(fn).__name__ not in seen:
            seen.add(type(fn).__name__)
            todo += [f for f, _ in fn.next_functions]
    return seen


def test_loss_path_rule_picks_plain_on_cpu_while_it_fits() -> None:
    from viaduct.models.common.loss import CPU_PLAIN_LOSS_BYTES, plain_loss_bytes, use_chunked_loss

    cpu = torch.device("cpu")
    assert use_chunked_loss(torch.device("cuda"), 16, VOCAB, torch.float32)  # accelerators: always chunked
    assert use_chunked_loss(torch.device("cuda", 1), 16, VOCAB, torch.bfloat16)
    assert plain_loss_bytes(8 * 256, 50304, torch.float32) == 8 * 256 * 50304 * 12
    assert plain_loss_bytes(10, 100, torch.bfloat16) == 10 * 100 * (2 + 8 + 4)  # + the float32 copy
    assert not use_chunked_loss(cpu, 8 * 256, 50304, torch.float32)  # GPT-2 vocabulary, a CPU batch
    assert use_chunked_loss(cpu, 16 * 2048, 128256, torch.bfloat16)  # Llama-3's: 59 GB of logits
    at_budget = CPU_PLAIN_LOSS_BYTES // 12
    assert not use_chunked_loss(cpu, at_budget, 1, torch.float32)
    assert use_chunked_loss(cpu, at_budget + 1, 1, torch.float32)
    assert use_chunked_loss(cpu, 16, VOCAB, torch.float32, plain_budget_bytes=0)


def test_chunked_and_plain_loss_paths_agree() -> None:
    """The default model on a CPU takes the plain path; the chunked one (forced) gives the same loss
    and gradients."""
    plain, chunked = build(), build()
    chunked.loss_plain_bytes = 0  # always chunk
    chunked.loss_chunk_tokens = 8  # several chunks of the 32 tokens
    x, y = tokens(), tokens(seed=2)
    y[0, :3] = -100
    lp, lc = plain(x, labels=y), chunked(x, labels=y)
    assert "NllLossBackward0" in _autograd_nodes(lp)
    assert not any("LinearCrossEntropy" in n for n in _autograd_nodes(lp))
    assert any("LinearCrossEntropy" in n for n in _autograd_nodes(lc))
    torch.testing.assert_close(lc, lp, rtol=1e-5, atol=1e-6)
    upstream = torch.rand(lp.shape, generator=torch.Generator().manual_seed(3))
    (lp * upstream).sum().backward()
    (lc * upstream).sum().backward()
    gp, gc = grads(plain), grads(chunked)
    assert gp.keys() == gc.keys()
    for name in gp:
        torch.testing.assert_close(gc[name], gp[name], rtol=1e-4, atol=1e-6, msg=name)


def test_parameter_names_follow_megatron() -> None:
    names = set(build(share_embeddings_and_output_weights=False).state_dict())
    assert {
        "embedding.word_embeddings.weight",
        "embedding.position_embeddings.weight",
        "decoder.layers.1.self_attention.linear_qkv.weight",
        "decoder.layers.1.mlp.linear_fc2.weight",
        "output_layer.weight",
    } <= names
    assert "decoder.final_layernorm.weight" in names


def test_padded_vocab_shows_in_the_logits() -> None:
    p = provider(vocab_size=1000, should_pad_vocab=True, make_vocab_size_divisible_by=128)
    assert p.padded_vocab_size() == 1024
    model = p.provide()
    assert model.embedding.word_embeddings.weight.shape == (1024, 64)
    assert model(tokens(vocab=1000)).shape == (2, 16, 1024)
    unpadded = provider(vocab_size=1000).provide()
    assert unpadded(tokens(vocab=1000)).shape == (2, 16, 1000)


def test_pipeline_stages_compose_to_the_full_model() -> None:
    full = build(num_layers=2, share_embeddings_and_output_weights=True)
    torch.manual_seed(1)
    first = provider(num_layers=1).provide(post_process=False)
    last = provider(num_layers=1).provide(pre_process=False)
    assert first.output_layer is None and final_norm(first) is None
    # Tied: the last stage keeps its own copy of the token table (no position embeddings), read only
    # by the output layer.
    assert last.output_layer is None and last.embedding.position_embeddings is None
    assert last.tied_output_weight() is last.embedding.word_embeddings.weight
    assert first.tied_output_weight() is None and full.tied_output_weight() is None
    sd = full.state_dict()
    first.load_state_dict(
        {k: v for k, v in sd.items() if k.startswith(("embedding.", "decoder.layers.0."))}, strict=True
    )
    last_sd = {k.replace("layers.1.", "layers.0."): v for k, v in sd.items() if "layers.1." in k}
    last_sd.update({k: v for k, v in sd.items() if "final_layernorm" in k})
    last_sd["embedding.word_embeddings.weight"] = sd["embedding.word_embeddings.weight"]
    last.load_state_dict(last_sd, strict=True)

    x = tokens()
    with pytest.raises(RuntimeError, match="set_input_tensor"):
        last(x)
    hidden = first(x)
    assert hidden.shape == (2, 16, 64)
    last.set_input_tensor(hidden)
    torch.testing.assert_close(last(x), full(x), rtol=1e-5, atol=1e-5)


def test_sequence_longer_than_seq_length_raises() -> None:
    model = build()
    model(tokens(s=SEQ))
    with pytest.raises(ValueError, match="seq_length"):
        model(tokens(s=SEQ + 1))


def test_provide_errors_name_the_field() -> None:
    with pytest.raises(ConfigError) as exc:
        provider().provide(vp_stage=1)
    assert isinstance(exc.value, ValueError) and "vp_stage" in str(exc.value)
    with pytest.raises(ConfigError) as exc:
        provider(vocab_size=None).provide()
    assert isinstance(exc.value, ValueError) and "vocab_size" in str(exc.value)


# ---------------------------------------------------------------------------------------------- causality


@pytest.mark.parametrize(
    "kw",
    [
        dict(position_embedding_type="learned_absolute"),
        dict(position_embedding_type="rope"),
        dict(position_embedding_type="none"),
        dict(position_embedding_type="rope", num_query_groups=2),
        dict(position_embedding_type="rope", num_query_groups=1, attention_backend=AttnBackend.unfused),
        dict(window_size=(3, 0)),
        dict(window_size=(3, 0), attention_backend=AttnBackend.unfused),
    ],
    ids=lambda kw: "-".join(f"{k}={getattr(v, 'name', v)}" for k, v in kw.items()),
)
def test_future_tokens_never_change_past_logits(kw: dict) -> None:
    model = build(**kw)
    x = tokens(s=24)
    base = model(x)
    for t in (1, 7, 16, 23):
        x2 = x.clone()
        x2[:, t:] = (x2[:, t:] + 1 + tokens(s=24 - t, seed=t) % (VOCAB - 1)) % VOCAB
        out = model(x2)
        torch.testing.assert_close(out[:, :t], base[:, :t], rtol=0, atol=1e-6)
        assert not torch.allclose(out[:, t], base[:, t], atol=1e-4)


# ---------------------------------------------------------------------------------------------- GQA


def test_groups_equal_to_heads_is_plain_multi_head() -> None:
    a, b = build(num_query_groups=4), build(num_query_groups=None)
    assert a.state_dict().keys() == b.state_dict().keys()
    x = tokens()
    assert torch.equal(a(x), b(x))


@pytest.mark.parametrize("backend", [AttnBackend.auto, AttnBackend.unfused])
def test_gqa_equals_multi_head_with_repeated_kv(backend: AttnBackend) -> None:
    heads, groups, d = 4, 2, 16
    kw = dict(position_embedding_type="rope", add_qkv_bias=True, attention_backend=backend)
    gqa = build(dtype=torch.float64, num_query_groups=groups, **kw)
    mha = build(seed=5, dtype=torch.float64, num_query_groups=heads, **kw)
    rep = heads // groups

    def expand(t: torch.Tensor) -> torch.Tensor:  # per group [q heads | k | v] -> MHA: per head [q | k | v]
        t = t.unflatten(0, (groups, rep + 2, d))
        q, k, v = t.split([rep, 1, 1], dim=1)
        q = q.unflatten(1, (rep, 1))  # [groups, rep, 1, d]: one head per MHA group
        k, v = (x[:, None].expand(groups, rep, *x.shape[1:]) for x in (k, v))
        return torch.cat([q, k, v], dim=2).flatten(0, 3)

    sd = gqa.state_dict()
    new = {k: expand(v) if "linear_qkv" in k else v for k, v in sd.items()}
    assert new["decoder.layers.0.self_attention.linear_qkv.weight"].shape == (3 * heads * d, 64)
    mha.load_state_dict(new)
    x = tokens()
    torch.testing.assert_close(mha(x), gqa(x), rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------- rotary


@pytest.mark.parametrize("pe", ["rope", "learned_absolute", "none"])
def test_explicit_arange_positions_equal_default(pe: str) -> None:
    model = build(position_embedding_type=pe)
    x = tokens()
    pos = torch.arange(16).expand(2, 16)
    torch.testing.assert_close(model(x, position_ids=pos), model(x), rtol=0, atol=1e-6)
    torch.testing.assert_close(model(x, position_ids=torch.arange(16)), model(x), rtol=0, atol=1e-6)


def test_rope_positions_matter_only_relatively() -> None:
    model = build(position_embedding_type="rope", rotary_percent=0.5, seq_length=64)
    x = tokens()
    base = model(x)
    # A uniform shift leaves every q.k (relative position) unchanged: same output.
    shifted = torch.stack([torch.arange(16) + 10, torch.arange(16) + 40])
    torch.testing.assert_close(model(x, position_ids=shifted), base, rtol=1e-5, atol=1e-5)
    # Changing the spacing changes the relative positions, hence the output (small at init: the
    # attention logits are small, but far above the float noise of the shift).
    spread = (2 * torch.arange(16)).expand(2, 16)
    assert (model(x, position_ids=spread) - base).abs().max() > 5e-4
    # Learned absolute positions are not shift invariant.
    learned = build(position_embedding_type="learned_absolute", seq_length=64)
    assert (learned(x, position_ids=shifted) - learned(x)).abs().max() > 1e-2


def test_rope_scaling_and_interpolation_change_the_model() -> None:
    x = tokens()
    plain = build(position_embedding_type="rope")
    scaled = build(position_embedding_type="rope", seq_len_interpolation_factor=4.0)
    assert (scaled(x) - plain(x)).abs().max() > 1e-3
    torch.testing.assert_close(scaled.rotary.cos[8], plain.rotary.cos[2])


# ---------------------------------------------------------------------------------------------- tied weights


def test_tied_output_layer_is_the_embedding_and_gets_both_gradients() -> None:
    p = provider(share_embeddings_and_output_weights=True)
    torch.manual_seed(0)
    tied = p.provide().double()
    names = dict(tied.named_parameters())
    assert tied.output_layer is None and not any(n.startswith("output_layer") for n in names)
    assert tied.output_weight() is tied.embedding.word_embeddings.weight
    assert sum(t.numel() for t in tied.parameters()) == num_parameters(p)

    untied = build(dtype=torch.float64, share_embeddings_and_output_weights=False)
    assert untied.output_weight() is untied.output_layer.weight
    assert untied.output_weight() is not untied.embedding.word_embeddings.weight
    sd = tied.state_dict()
    sd["output_layer.weight"] = sd["embedding.word_embeddings.weight"].clone()
    untied.load_state_dict(sd)

    x, y = tokens(), tokens(seed=2)
    tied(x, labels=y).sum().backward()
    untied(x, labels=y).sum().backward()
    g_in = untied.embedding.word_embeddings.weight.grad
    g_out = untied.output_layer.weight.grad
    assert g_in.abs().sum() > 0 and g_out.abs().sum() > 0
    torch.testing.assert_close(tied.embedding.word_embeddings.weight.grad, g_in + g_out)


def test_untied_model_has_its_own_output_layer() -> None:
    p = provider(share_embeddings_and_output_weights=False)
    model = p.provide()
    names = dict(model.named_parameters())
    assert names["output_layer.weight"].shape == (VOCAB, 64)
    assert sum(t.numel() for t in model.parameters()) == num_parameters(p)
    assert num_parameters(p) == num_parameters(provider()) + VOCAB * 64


# ---------------------------------------------------------------------------------------------- init

BIG = dict(
    num_layers=4,
    hidden_size=256,
    num_attention_heads=4,
    ffn_hidden_size=1024,
    vocab_size=512,
    seq_length=64,
    init_method_std=0.02,
    embedding_init_method_std=0.05,
    share_embeddings_and_output_weights=False,
)


def check_init(model: torch.nn.Module, num_layers: int = 4) -> None:
    std, out_std, emb_std = 0.02, 0.02 / math.sqrt(2 * num_layers), 0.05
    seen = set()
    for name, p in model.named_parameters():
        p = p.detach()
        assert torch.isfinite(p).all(), name
        last = name.rsplit(".", 2)[-2:]
        if last[1] == "bias":
            assert (p == 0).all(), name
            seen.add("bias")
            continue
        if "layernorm" in last[0]:
            assert (p == 1).all(), name
            seen.add("norm")
            continue
        expected = {
            "linear_qkv": std,
            "linear_fc1": std,
            "output_layer": std,
            "linear_proj": out_std,
            "linear_fc2": out_std,
            "word_embeddings": emb_std,
            "position_embeddings": emb_std,
        }[last[0]]
        assert abs(float(p.std()) / expected - 1) < 0.1, (name, float(p.std()), expected)
        assert abs(float(p.mean())) < expected * 0.05, name
        seen.add(last[0])
    expected_kinds = {"bias", "norm", "linear_qkv", "linear_fc1", "linear_fc2", "linear_proj"}
    expected_kinds |= {"output_layer", "word_embeddings"}
    if model.embedding.position_embeddings is not None:
        expected_kinds.add("position_embeddings")
    assert seen == expected_kinds


def test_initialization_stds() -> None:
    torch.manual_seed(0)
    check_init(provider(**BIG).provide())


def test_zero_centered_gamma_stores_gamma_minus_one() -> None:
    kw = dict(qk_layernorm=True, normalization="RMSNorm", position_embedding_type="rope")
    zc = build(layernorm_zero_centered_gamma=True, **kw)
    norms = [n for n in zc.state_dict() if "layernorm.weight" in n]
    assert len(norms) == 2 * 4 + 1
    assert all((zc.state_dict()[n] == 0).all() for n in norms)
    with torch.no_grad():
        for n, p in zc.named_parameters():
            if "layernorm.weight" in n:
                p.normal_(0.0, 0.2)
    normal = build(seed=3, **kw)
    assert (final_norm(normal).weight == 1).all()
    sd = {k: v + 1 if "layernorm.weight" in k else v for k, v in zc.state_dict().items()}
    normal.load_state_dict(sd)
    x = tokens()
    out = zc(x)
    torch.testing.assert_close(out, normal(x), rtol=1e-5, atol=1e-5)
    assert (out - build(seed=0, **kw)(x)).abs().max() > 1e-3  # the random gammas mattered


@pytest.mark.parametrize("how", ["flag", "device"])
def test_meta_device_build_then_materialize(how: str) -> None:
    kw = dict(BIG, position_embedding_type="rope", num_layers=2, hidden_size=128, ffn_hidden_size=512)
    p = provider(**kw, init_model_with_meta_device=how == "flag")
    torch.manual_seed(0)
    model = p.provide() if how == "flag" else p.provide(device="meta")
    assert all(t.is_meta for t in model.parameters()) and model.rotary.cos.is_meta
    model.to_empty(device="cpu")
    model.init_weights()
    check_init(model, num_layers=2)

    torch.manual_seed(1)
    ref = provider(**kw).provide()
    assert torch.equal(model.rotary.cos, ref.rotary.cos) and torch.equal(model.rotary.sin, ref.rotary.sin)
    assert "rotary.cos" not in ref.state_dict()  # non-persistent: load_state_dict cannot restore it
    model.load_state_dict(ref.state_dict())
    x = tokens(vocab=512)
    torch.testing.assert_close(model(x), ref(x), rtol=0, atol=0)


def test_without_initialization_the_model_runs_after_loading() -> None:
    kw = dict(position_embedding_type="rope", rotary_percent=0.5)
    ref = build(**kw)
    p = provider(**kw, perform_initialization=False)
    model = p.provide()
    assert model.rotary is not None and torch.equal(model.rotary.cos, ref.rotary.cos)
    model.load_state_dict(ref.state_dict())
    x = tokens()
    assert torch.equal(model(x), ref(x))


# ---------------------------------------------------------------------------------------------- recompute

RECOMPUTE = [
    dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1),
    dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=2),
    dict(recompute_granularity="full", recompute_method="block", recompute_num_layers=1),
    dict(recompute_granularity="selective", recompute_modules=["core_attn"]),
    dict(recompute_granularity="selective", recompute_modules=["mlp"]),
    dict(recompute_granularity="selective", recompute_modules=["core_attn", "mlp"]),
]


@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize(
    "recompute", RECOMPUTE, ids=lambda kw: "-".join(str(v) for v in kw.values()).replace("'", "")
)
def test_recompute_gives_the_same_loss_and_gradients(recompute: dict, dropout: float) -> None:
    kw = dict(
        hidden_dropout=dropout,
        attention_dropout=dropout,
        position_embedding_type="rope",
        num_query_groups=2,
        num_layers=3 if recompute.get("recompute_num_layers") == 2 else 2,
    )
    ref = build(dtype=torch.float64, **kw)
    model = build(dtype=torch.float64, **kw, **recompute)
    model.load_state_dict(ref.state_dict())
    x, y = tokens(), tokens(seed=2)
    losses = []
    for m in (ref, model):
        torch.manual_seed(123)
        loss = m(x, labels=y)
        loss.mean().backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-12, atol=1e-12)
    g_ref, g = grads(ref), grads(model)
    assert g.keys() == g_ref.keys() and len(g) == len(list(ref.parameters()))
    for name in g_ref:
        torch.testing.assert_close(g[name], g_ref[name], rtol=1e-10, atol=1e-12, msg=name)
    if dropout:  # the dropout masks really are random: another seed gives another loss
        torch.manual_seed(124)
        assert not torch.allclose(model(x, labels=y), losses[0])


# ---------------------------------------------------------------------------------------------- compile


@pytest.mark.slow
@pytest.mark.parametrize(
    "scope,recompute",
    [
        ("model", {}),
        ("layers", {}),
        ("layers", dict(recompute_granularity="selective", recompute_modules=["core_attn", "mlp"])),
        ("model", RECOMPUTE[0]),
    ],
    ids=["model", "layers", "layers-selective", "model-full"],
)
def test_compiled_model_matches_eager(scope: str, recompute: dict) -> None:
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    kw = dict(num_layers=2, hidden_size=32, position_embedding_type="rope", num_query_groups=2, **recompute)
    eager = build(**kw)
    compiled = build(**kw)
    x, y = tokens(s=8), tokens(s=8, seed=2)
    eager(x, labels=y).mean().backward()
    assert compile_model(compiled, scope, backend="aot_eager") is compiled
    assert compiled.state_dict().keys() == eager.state_dict().keys()
    loss = compiled(x, labels=y)
    assert counters["stats"]["unique_graphs"] >= 1  # dynamo really traced something
    torch.testing.assert_close(loss, eager(x, labels=y), rtol=1e-5, atol=1e-5)
    loss.mean().backward()
    g_ref, g = grads(eager), grads(compiled)
    assert g.keys() == g_ref.keys()
    for name in g_ref:
        torch.testing.assert_close(g[name], g_ref[name], rtol=1e-5, atol=1e-5, msg=name)
    torch._dynamo.reset()


def test_compile_rejects_an_unknown_scope() -> None:
    with pytest.raises(ValueError, match="scope"):
        compile_model(build(), "blocks")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------- training


@pytest.mark.slow
def test_tiny_model_overfits_one_batch() -> None:
    model = build(num_layers=2, hidden_size=64)
    x = tokens(b=2, s=32)
    y = torch.roll(x, -1, dims=1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(100):
        loss = model(x, labels=y).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = loss.item() if first is None else first
    assert first is not None and first > 0.8 * math.log(VOCAB)
    with torch.no_grad():
        assert model(x, labels=y).mean().item() < 0.1 * first


# ---------------------------------------------------------------------------------------------- attention


@pytest.mark.parametrize(
    "kw",
    [
        dict(),
        dict(position_embedding_type="rope", num_query_groups=2),
        dict(num_query_groups=1, window_size=(4, 0)),
    ],
    ids=["mha", "gqa-rope", "mqa-window"],
)
def test_attention_backends_agree(kw: dict) -> None:
    x = tokens()
    ref = build(attention_backend=AttnBackend.auto, **kw)(x)
    for backend in (AttnBackend.flash, AttnBackend.unfused, AttnBackend.local):
        torch.testing.assert_close(build(attention_backend=backend, **kw)(x), ref, rtol=1e-5, atol=1e-5)
    for extra in (dict(attention_softmax_in_fp32=True), dict(apply_query_key_layer_scaling=True)):
        out = build(attention_backend=AttnBackend.unfused, **kw, **extra)(x)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_fused_backend_needs_cuda() -> None:
    with pytest.raises(ValueError, match="CUDA"):
        build(attention_backend=AttnBackend.fused)(tokens())


@pytest.mark.parametrize("backend", [AttnBackend.auto, AttnBackend.unfused])
def test_softmax_scale_changes_the_output(backend: AttnBackend) -> None:
    x = tokens()
    default = build(attention_backend=backend)(x)
    explicit = build(attention_backend=backend, softmax_scale=1 / 4)(x)  # head_dim 16: the default
    torch.testing.assert_close(explicit, default, rtol=1e-6, atol=1e-6)
    assert (build(attention_backend=backend, softmax_scale=1.0)(x) - default).abs().max() > 1e-3


@pytest.mark.parametrize("backend", [AttnBackend.auto, AttnBackend.unfused])
def test_explicit_causal_mask_equals_default(backend: AttnBackend) -> None:
    model = build(attention_backend=backend, num_query_groups=2, position_embedding_type="rope")
    x = tokens()
    ref = model(x)
    torch.testing.assert_close(model(x, attention_mask=causal_mask(16)), ref, rtol=1e-5, atol=1e-5)
    mask4 = causal_mask(16).expand(2, 1, 16, 16)
    torch.testing.assert_close(model(x, attention_mask=mask4), ref, rtol=1e-5, atol=1e-5)
    # The mask really is applied: letting position 0 see everything changes it.
    open_first = causal_mask(16).clone()
    open_first[0] = False
    assert (model(x, attention_mask=open_first)[:, 0] - ref[:, 0]).abs().max() > 1e-4


@pytest.mark.parametrize("backend", [AttnBackend.auto, AttnBackend.unfused])
@pytest.mark.parametrize("pe", ["rope", "learned_absolute"])
def test_document_mask_isolates_documents(backend: AttnBackend, pe: str) -> None:
    model = build(attention_backend=backend, position_embedding_type=pe)
    split = 6
    doc = torch.zeros(16, dtype=torch.long)
    doc[split:] = 1
    mask = causal_mask(16) | (doc[:, None] != doc[None, :])  # block-diagonal causal
    x = tokens()
    x2 = x.clone()
    x2[:, :split] = (x2[:, :split] + 3) % VOCAB
    a, b = model(x, attention_mask=mask), model(x2, attention_mask=mask)
    torch.testing.assert_close(b[:, split:], a[:, split:], rtol=0, atol=1e-6)
    assert (b[:, :split] - a[:, :split]).abs().max() > 1e-3
    # Without the document mask the second document does see the first.
    assert (model(x2)[:, split:] - model(x)[:, split:]).abs().max() > 1e-3


def test_sliding_window_differs_only_past_the_window() -> None:
    x = tokens()
    full = build()(x)
    windowed = build(window_size=(2, 0))(x)
    torch.testing.assert_close(windowed[:, :3], full[:, :3], rtol=1e-6, atol=1e-6)
    diff = (windowed[:, 3:] - full[:, 3:]).abs().amax(dim=-1)
    assert (diff > 1e-5).all()


# ---------------------------------------------------------------------------------------------- options


def test_layernorm_and_rmsnorm_parameters() -> None:
    ln = dict(build(normalization="LayerNorm").named_parameters())
    rms = dict(build(normalization="RMSNorm").named_parameters())
    norm_biases = {n for n in ln if "layernorm.bias" in n}
    assert norm_biases == {
        "decoder.layers.0.input_layernorm.bias",
        "decoder.layers.0.pre_mlp_layernorm.bias",
        "decoder.layers.1.input_layernorm.bias",
        "decoder.layers.1.pre_mlp_layernorm.bias",
    } | {n for n in ln if n.endswith("final_layernorm.bias")}
    assert len(norm_biases) == 5
    assert set(ln) - set(rms) == norm_biases and set(rms) <= set(ln)


def test_rmsnorm_normalizes_by_root_mean_square() -> None:
    model = build(normalization="RMSNorm", layernorm_epsilon=1e-6)
    h = torch.randn(3, 64) * 3 + 1
    expected = h / h.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()
    torch.testing.assert_close(final_norm(model)(h), expected, rtol=1e-5, atol=1e-5)
    ln = final_norm(build(normalization="LayerNorm"))(h)
    torch.testing.assert_close(ln, F.layer_norm(h, (64,)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "bias_linear,qkv_bias,expected",
    [
        (True, False, {"linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"}),
        (False, True, {"linear_qkv"}),
        (False, False, set()),
    ],
)
def test_linear_biases(bias_linear: bool, qkv_bias: bool, expected: set) -> None:
    model = build(add_bias_linear=bias_linear, add_qkv_bias=qkv_bias, normalization="RMSNorm")
    biases = {n for n, _ in model.named_parameters() if n.endswith(".bias")}
    assert {n.split(".")[-2] for n in biases} == expected
    assert len(biases) == 2 * len(expected)  # one per layer
    for name in biases:
        assert (dict(model.named_parameters())[name] == 0).all()


def test_qk_layernorm_has_head_sized_norms() -> None:
    model = build(qk_layernorm=True, kv_channels=24, normalization="RMSNorm")
    attn = model.decoder.layers[0].self_attention
    assert attn.q_layernorm.weight.shape == (24,) and attn.k_layernorm.weight.shape == (24,)
    assert attn.linear_qkv.weight.shape == (3 * 4 * 24, 64)
    assert build().decoder.layers[0].self_attention.q_layernorm is None
    model(tokens())


def test_gated_linear_unit_doubles_fc1() -> None:
    plain = build(ffn_hidden_size=96).decoder.layers[0].mlp
    gated = build(ffn_hidden_size=96, gated_linear_unit=True, activation_func="silu").decoder.layers[0].mlp
    assert plain.linear_fc1.weight.shape == (96, 64) and gated.linear_fc1.weight.shape == (192, 64)
    assert gated.linear_fc2.weight.shape == (64, 96)
    x = torch.randn(3, 64)
    h = F.linear(x, gated.linear_fc1.weight, gated.linear_fc1.bias)
    gate, up = h[:, 0::2], h[:, 1::2]  # interleaved rows: 2i gate, 2i + 1 up of unit i
    expected = F.linear(F.silu(gate) * up, gated.linear_fc2.weight, gated.linear_fc2.bias)
    torch.testing.assert_close(gated(x), expected)


ACTIVATIONS = {
    "gelu": F.gelu,
    "silu": F.silu,
    "relu": F.relu,
    "squared_relu": lambda x: F.relu(x) ** 2,
    "fast_gelu": lambda x: 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3))),
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
}


@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_activation_names(name: str) -> None:
    model = build(activation_func=name)
    act = model.decoder.layers[0].mlp.activation
    x = torch.linspace(-4, 4, 101, dtype=torch.float64)
    torch.testing.assert_close(act(x), ACTIVATIONS[name](x), rtol=1e-12, atol=1e-12)
    assert {"squared_relu": squared_relu, "fast_gelu": fast_gelu, "quick_gelu": quick_gelu}.get(
        name, act
    ) is act
    if name != "gelu":
        assert not torch.allclose(act(x), F.gelu(x), atol=1e-5)
    loss = model(tokens(), labels=tokens(seed=2))
    assert torch.isfinite(loss).all()
    loss.mean().backward()
    assert model.decoder.layers[0].mlp.linear_fc1.weight.grad.abs().sum() > 0


def test_fp32_residual_connection_with_bf16_params() -> None:
    p = provider(fp32_residual_connection=True).apply_overrides_and_finalize(dtype="bf16")
    torch.manual_seed(0)
    model = p.provide()
    assert model.embedding.word_embeddings.weight.dtype == torch.bfloat16
    dtypes = []
    model.decoder.layers[0].register_forward_hook(lambda m, i, o: dtypes.append((i[0].dtype, o.dtype)))
    loss = model(tokens(), labels=tokens(seed=2))
    assert dtypes == [(torch.float32, torch.float32)]  # the residual stream is float32
    assert loss.dtype == torch.float32 and torch.isfinite(loss).all()
    loss.mean().backward()
    assert model.embedding.word_embeddings.weight.grad.dtype == torch.bfloat16


def test_autocast_runs_in_bf16_on_float32_weights() -> None:
    model = build(enable_autocast=True, autocast_dtype="bf16")
    assert model.embedding.word_embeddings.weight.dtype == torch.float32
    x = tokens()
    logits = model(x)
    assert logits.dtype == torch.bfloat16
    ref = build()(x)
    assert float((logits.detach().float() - ref.detach()).norm() / ref.detach().norm()) < 5e-2
    loss = model(x, labels=tokens(seed=2))
    assert loss.dtype == torch.float32 and torch.isfinite(loss).all()
    loss.mean().backward()
    assert model.embedding.word_embeddings.weight.grad.dtype == torch.float32


def test_logit_dtype() -> None:
    p = provider(logit_dtype="fp32").apply_overrides_and_finalize(dtype="bf16")
    assert p.provide()(tokens()).dtype == torch.float32
    bf16 = provider().apply_overrides_and_finalize(dtype="bf16").provide()
    assert bf16(tokens()).dtype == torch.bfloat16


def test_hidden_dropout_is_random_in_training_only() -> None:
    model = build(hidden_dropout=0.2)
    x = tokens()
    model.train()
    assert not torch.equal(model(x), model(x))
    model.eval()
    out = model(x)
    assert torch.equal(out, model(x))
    torch.testing.assert_close(out, build()(x), rtol=0, atol=0)  # same weights, no dropout


@pytest.mark.slow
def test_attention_dropout_is_random_in_training_only() -> None:
    for backend in (AttnBackend.auto, AttnBackend.unfused):
        model = build(attention_dropout=0.3, attention_backend=backend)
        x = tokens()
        assert not torch.equal(model(x), model(x))
        model.eval()
        torch.testing.assert_close(model(x), build(attention_backend=backend)(x), rtol=0, atol=0)


def test_residual_after_layernorm_changes_the_output() -> None:
    x = tokens()
    pre = build()(x)
    post = build(apply_residual_connection_post_layernorm=True)(x)
    assert (post - pre).abs().max() > 1e-3
