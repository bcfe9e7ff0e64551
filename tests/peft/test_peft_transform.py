"""LoRA / DoRA as a model transform on tiny GPT models (CPU): matching, freezing, training only the
adapters, the forward formulas, merging, dtypes and the adapter state dict."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from viaduct.config import ConfigError, DType
from viaduct.models import GPTModelProvider
from viaduct.models.gpt.model import GPTModel
from viaduct.peft import DoRA, LoRA
from viaduct.peft.adapters import DoRALinear, LoRALinear

VOCAB = 64
SEQ = 16


def provider(**kw: object) -> GPTModelProvider:
    base: dict[str, object] = dict(
        num_layers=2,
        hidden_size=32,
        num_attention_heads=4,
        num_query_groups=2,
        ffn_hidden_size=48,
        gated_linear_unit=True,
        vocab_size=VOCAB,
        seq_length=SEQ,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        share_embeddings_and_output_weights=False,
    )
    base.update(kw)
    return GPTModelProvider(**base)  # type: ignore[arg-type]


def build(seed: int = 0, dtype: torch.dtype = torch.float32, **kw: object) -> nn.Module:
    torch.manual_seed(seed)
    return provider(**kw).provide().to(dtype)


def tokens(b: int = 2, s: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (b, s), generator=torch.Generator().manual_seed(seed))


def randomize_b(model: nn.Module, seed: int = 5) -> None:
    """Give every adapter a nonzero B (and DoRA a magnitude away from its start), so they matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("adapter.linear_out.weight"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            elif name.endswith("adapter.weight_magnitude"):
                p.mul_(1 + 0.1 * torch.rand(p.shape, generator=g))


def adapted_names(model: nn.Module) -> set[str]:
    return {n for n, m in model.named_modules() if isinstance(m, (LoRALinear, DoRALinear))}


# ------------------------------------------------------------------------------------------ matching


def test_default_targets_adapt_every_transformer_linear_but_not_the_output_layer():
    model = LoRA(dim=4)(build())
    parts = ("self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2")
    expected = {f"decoder.layers.{i}.{part}" for i in range(2) for part in parts}
    assert adapted_names(model) == expected


def test_wildcard_targets_select_exactly_the_matching_full_names():
    model = LoRA(dim=4, target_modules=["*.layers.0.*.linear_qkv", "linear_fc2"])(build())
    assert adapted_names(model) == {
        "decoder.layers.0.self_attention.linear_qkv",
        "decoder.layers.0.mlp.linear_fc2",
        "decoder.layers.1.mlp.linear_fc2",
    }
    # A full name matches as it is; `*` spans dots; nothing else is a wildcard.
    model = LoRA(dim=4, target_modules=["decoder.layers.1.mlp.linear_fc1", "decoder.*_proj"])(build())
    assert adapted_names(model) == {
        "decoder.layers.1.mlp.linear_fc1",
        "decoder.layers.0.self_attention.linear_proj",
        "decoder.layers.1.self_attention.linear_proj",
    }
    with pytest.raises(ConfigError, match="matches no linear layer"):
        LoRA(target_modules=["decoder.layers.?.mlp.linear_fc1"])(build())


def test_exclude_modules_adapt_every_other_transformer_linear():
    model = DoRA(dim=4, target_modules=[], exclude_modules=["linear_qkv", "*.layers.1.mlp.*"])(build())
    assert adapted_names(model) == {
        "decoder.layers.0.self_attention.linear_proj",
        "decoder.layers.0.mlp.linear_fc1",
        "decoder.layers.0.mlp.linear_fc2",
        "decoder.layers.1.self_attention.linear_proj",
    }
    # The output layer is read as a weight by the loss, never called: it takes no adapter.
    assert type(model.output_layer) is nn.Linear


def test_a_target_matching_nothing_is_a_clear_error_listing_the_names():
    model = build()
    with pytest.raises(ConfigError) as info:
        LoRA(target_modules=["linear_qkv", "linear_q", "*.layers.7.*"])(model)
    text = str(info.value)
    assert "peft.target_modules[1]" in text and "peft.target_modules[2]" in text
    assert "target_modules[0]" not in text
    assert "matches no linear layer" in text and "'linear_fc1'" in text and "linear_qkv" in text
    # Nothing happened to the model.
    assert not adapted_names(model) and all(p.requires_grad for p in model.parameters())
    with pytest.raises(ConfigError, match="output layer"):
        LoRA(target_modules=["output_layer"])(build())


def test_model_chunks_and_a_wrapped_model_are_adapted_alike():
    first, second = build(), build(seed=1)
    wrapper = nn.Module()
    wrapper._orig_mod = second  # as torch.compile wraps a model
    chunks = LoRA(dim=4, target_modules=[], exclude_modules=["linear_proj"])([first, wrapper])
    assert chunks[0] is first and len(adapted_names(first)) == 6
    assert {n.removeprefix("_orig_mod.") for n in adapted_names(wrapper)} == adapted_names(first)
    assert type(second.output_layer) is nn.Linear
    # A target needs to match in some chunk, not in each: pipeline stages hold some layers each.
    cfg = provider()
    cfg.finalize()
    first_stage = GPTModel(cfg, VOCAB, layers=[0], post_process=False)
    last_stage = GPTModel(cfg, VOCAB, layers=[1], pre_process=False)
    LoRA(dim=4, target_modules=["*.layers.1.*.linear_qkv"])([first_stage, last_stage])
    assert not adapted_names(first_stage)
    assert adapted_names(last_stage) == {"decoder.layers.1.self_attention.linear_qkv"}


def test_applying_twice_is_an_error():
    model = LoRA(dim=4)(build())
    with pytest.raises(ValueError, match="already has adapters"):
        LoRA(dim=4)(model)


# ------------------------------------------------------------------------------------------ LoRA


def test_lora_with_zero_b_equals_the_base_exactly_and_keeps_names():
    base = build().eval()
    x = tokens()
    with torch.no_grad():
        ref = base(x)
    names = {n: p for n, p in base.named_parameters()}
    model = LoRA(dim=4)(base, training=False)
    with torch.no_grad():
        assert torch.equal(model(x), ref)
    after = dict(model.named_parameters())
    # Base parameters keep their names and are the very same objects; adapters add Bridge's names.
    assert all(after[n] is p for n, p in names.items())
    extra = sorted(set(after) - set(names))
    assert "decoder.layers.0.self_attention.linear_qkv.adapter.linear_in.weight" in extra
    assert "decoder.layers.0.self_attention.linear_qkv.adapter.linear_out.weight" in extra
    assert all(re.search(r"\.adapter\.linear_(in|out)\.weight$", n) for n in extra)
    assert set(model.state_dict()) == set(after)
    # So a checkpoint of the base loads into the adapted model as it is.
    result = model.load_state_dict(build(seed=3).state_dict(), strict=False)
    assert not result.unexpected_keys and set(result.missing_keys) == set(extra)
    # training=False: everything frozen, eval mode.
    assert not any(p.requires_grad for p in model.parameters()) and not model.training


@pytest.mark.parametrize("method", [LoRA, DoRA])
def test_a_training_step_changes_only_the_adapters(method):
    model = method(dim=4, lora_B_init_method="zero")(build())
    assert model.training
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n in before if ".adapter." in n
    }
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    x = tokens()
    loss = model(x, labels=x.roll(-1, 1)).mean()
    loss.backward()
    opt.step()
    for n, p in model.named_parameters():
        if ".adapter." in n:
            assert p.grad is not None
            if n.endswith("linear_out.weight"):
                assert not torch.equal(p, before[n]), n  # B moved off zero
        else:
            assert p.grad is None, n
            assert torch.equal(p, before[n]), n


def test_lora_forward_is_the_formula_with_pre_and_post_dropout():
    torch.manual_seed(0)
    lin = nn.Linear(8, 6)
    W, b = lin.weight.detach().clone(), lin.bias.detach().clone()
    for position in ("pre", "post"):
        m = LoRA(
            dim=3,
            alpha=6,
            dropout=0.5,
            dropout_position=position,
            lora_B_init_method="normal",
            target_modules=["linear_fc2"],
        )
        h = nn.Module()
        h.add_module("linear_fc2", nn.Linear(8, 6))
        h.linear_fc2.load_state_dict({"weight": W, "bias": b})
        m(h)
        layer = h.linear_fc2
        A, B = layer.adapter.linear_in.weight.detach(), layer.adapter.linear_out.weight.detach()
        x = torch.randn(5, 8)
        with torch.no_grad():
            torch.manual_seed(3)
            got = layer(x)
            torch.manual_seed(3)
            if position == "pre":
                want = F.linear(x, W, b) + 2.0 * F.dropout(x, 0.5) @ A.T @ B.T
            else:
                want = F.linear(x, W, b) + F.dropout(2.0 * x @ A.T @ B.T, 0.5)
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    ("method", "check"),
    [
        ("zero", lambda w: torch.equal(w, torch.zeros_like(w))),
        ("normal", lambda w: 0.15 < w.std().item() < 0.25),
        ("xavier", lambda w: abs(w.std().item() - (2 / (32 + 64)) ** 0.5) < 0.03),
        ("kaiming", lambda w: w.abs().max().item() <= 1 / 32**0.5 + 1e-6),
    ],
)
def test_init_methods(method, check):
    model = LoRA(dim=64, lora_A_init_method=method, target_modules=["linear_fc2"])(build(ffn_hidden_size=32))
    assert check(model.decoder.layers[0].mlp.linear_fc2.adapter.linear_in.weight.detach())


def test_bf16_base_stays_bf16_with_fp32_adapters():
    model = build(dtype=torch.bfloat16)
    model = LoRA(dim=4, lora_dtype=DType("fp32"), lora_B_init_method="normal")(model)
    for n, p in model.named_parameters():
        assert p.dtype == (torch.float32 if ".adapter." in n else torch.bfloat16), n
        assert p.requires_grad == (".adapter." in n)
    x = tokens()
    loss = model(x, labels=x).mean()
    loss.backward()
    assert all(p.grad is None for n, p in model.named_parameters() if ".adapter." not in n)
    assert model.decoder.layers[0].mlp.linear_fc1.adapter.linear_out.weight.grad.dtype == torch.float32
    # Without lora_dtype the adapters take the base weight's dtype.
    plain = LoRA(dim=4)(build(dtype=torch.bfloat16))
    assert {p.dtype for p in plain.parameters()} == {torch.bfloat16}


# ------------------------------------------------------------------------------------------ DoRA


def test_dora_starts_equal_to_the_base_and_follows_the_paper_formula():
    base = build().eval()
    x = tokens()
    with torch.no_grad():
        ref = base(x)
    model = DoRA(dim=4, alpha=8)(base, training=False)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, atol=1e-5, rtol=0)
    randomize_b(model)
    layer = model.decoder.layers[1].mlp.linear_fc1
    assert isinstance(layer, DoRALinear)
    W, bias = layer.weight.detach(), layer.bias
    A, B = layer.adapter.linear_in.weight.detach(), layer.adapter.linear_out.weight.detach()
    m = layer.adapter.weight_magnitude.detach()
    V = W + (8 / 4) * B @ A
    W_prime = m[:, None] * V / V.norm(dim=1, keepdim=True)
    h = torch.randn(3, 32)
    with torch.no_grad():
        torch.testing.assert_close(layer(h), F.linear(h, W_prime, bias), atol=1e-5, rtol=0)


def test_dora_magnitude_starts_at_the_row_norms_and_the_norm_is_constant_in_backward():
    model = DoRA(dim=4, lora_B_init_method="zero")(build())
    layer = model.decoder.layers[0].self_attention.linear_qkv
    torch.testing.assert_close(layer.adapter.weight_magnitude.detach(), layer.weight.detach().norm(dim=1))
    randomize_b(model)
    h = torch.randn(3, 32)
    layer(h).sum().backward()
    # With the norm detached, d(sum y)/dm = (W' x summed) / m per row: (V x)/||V|| summed over the batch.
    A, B = layer.adapter.linear_in.weight.detach(), layer.adapter.linear_out.weight.detach()
    V = layer.weight.detach() + layer.adapter.scale * B @ A
    want = (h @ (V / V.norm(dim=1, keepdim=True)).T).sum(0)
    torch.testing.assert_close(layer.adapter.weight_magnitude.grad, want, atol=1e-5, rtol=1e-5)
    assert layer.weight.grad is None


def test_dora_with_dropout_keeps_the_base_path_undropped_as_hf_peft():
    torch.manual_seed(0)
    h = nn.Module()
    h.add_module("linear_proj", nn.Linear(8, 6))
    DoRA(dim=3, alpha=3, dropout=0.5, lora_B_init_method="normal", target_modules=["linear_proj"])(h)
    layer = h.linear_proj
    W, b = layer.weight.detach(), layer.bias.detach()
    A, B = layer.adapter.linear_in.weight.detach(), layer.adapter.linear_out.weight.detach()
    m = layer.adapter.weight_magnitude.detach()
    x = torch.randn(4, 8)
    with torch.no_grad():
        torch.manual_seed(7)
        got = layer(x)
        torch.manual_seed(7)
        xd = F.dropout(x, 0.5)
        scale = m / (W + B @ A).norm(dim=1)
        want = F.linear(x, W, b) + (scale - 1) * (xd @ W.T) + scale * (xd @ A.T @ B.T)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------------------ merge


@pytest.mark.parametrize("method", [LoRA, DoRA])
def test_merge_equals_the_adapted_model_and_leaves_a_plain_model(method):
    base = build()
    base_names = [n for n, _ in base.named_parameters()]
    peft = method(dim=4, alpha=8, lora_A_init_method="normal")
    model = peft(base, training=False)
    randomize_b(model)
    x = tokens()
    with torch.no_grad():
        adapted = model(x)
    merged = peft.merge(model)
    assert merged is model and not adapted_names(merged)
    assert [n for n, _ in merged.named_parameters()] == base_names
    assert all(type(m) is nn.Linear for m in merged.modules() if isinstance(m, nn.Linear))
    with torch.no_grad():
        torch.testing.assert_close(merged(x), adapted, atol=1e-5, rtol=1e-5)
        assert not torch.equal(merged(x), build()(x))  # the adapters did change the model
    with pytest.raises(ValueError, match="no adapters"):
        peft.merge(merged)


# ------------------------------------------------------------------------------------------ adapter state


@pytest.mark.parametrize("method", [LoRA, DoRA])
def test_adapter_state_dict_holds_only_adapters_and_round_trips(method):
    peft = method(dim=4, target_modules=["linear_qkv", "linear_fc1"])
    model = peft(build())
    randomize_b(model)
    sd = peft.adapter_state_dict(model)
    per_layer = 3 if method is DoRA else 2
    assert len(sd) == 2 * 2 * per_layer and all(".adapter." in n for n in sd)
    assert all(n in dict(model.named_parameters()) for n in sd)
    fresh = peft(build(seed=9))
    x = tokens()
    with torch.no_grad():
        assert not torch.allclose(fresh(x), model(x))
        peft.load_adapter_state_dict(fresh, {k: v.clone() for k, v in sd.items()})
        for k, v in peft.adapter_state_dict(fresh).items():
            assert torch.equal(v, sd[k])


def test_loading_a_wrong_adapter_state_names_every_problem():
    peft = LoRA(dim=4, target_modules=["linear_qkv"])
    model = peft(build())
    sd = dict(peft.adapter_state_dict(model))
    first = "decoder.layers.0.self_attention.linear_qkv.adapter.linear_in.weight"
    missing = "decoder.layers.1.self_attention.linear_qkv.adapter.linear_out.weight"
    sd[first] = torch.zeros(5, 32)
    del sd[missing]
    sd["decoder.layers.0.mlp.linear_fc1.adapter.linear_in.weight"] = torch.zeros(4, 32)
    before = peft.adapter_state_dict(model)[first].clone()
    with pytest.raises(ConfigError) as info:
        peft.load_adapter_state_dict(model, sd)
    text = str(info.value)
    assert "missing" in text and missing in text
    assert "not an adapter tensor" in text and "mlp.linear_fc1" in text
    assert "(5, 32)" in text and "(4, 32)" in text
    assert torch.equal(peft.adapter_state_dict(model)[first], before)  # nothing copied
