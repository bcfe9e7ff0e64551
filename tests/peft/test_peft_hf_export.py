"""The Hugging Face PEFT export of LoRA / DoRA adapters on a Llama-style model (grouped-query
attention, gated MLP): the exported adapter on the transformers model gives viaduct's logits, checked
by rebuilding the adapted weights by hand from the exported tensors and, where the `peft` package is
installed, by loading the directory with it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from viaduct import AutoBridge
from viaduct.config import ConfigError
from viaduct.models import GPTModelProvider
from viaduct.peft import DoRA, LoRA

transformers = pytest.importorskip("transformers")

VOCAB = 96


def save_llama(directory: Path) -> None:
    """A random fp32 Llama with 4 query heads in 2 groups and a gated MLP, saved with transformers."""
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=40,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0.0, 0.1)
            if p.ndim == 1 and "norm" in name:
                p.add_(1.0)
    model.save_pretrained(directory)


def load_hf(directory: Path):
    return transformers.AutoModelForCausalLM.from_pretrained(directory, attn_implementation="eager").eval()


def tokens() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))


def adapted_viaduct(src: Path, peft: LoRA | DoRA) -> torch.nn.Module:
    model = AutoBridge.from_hf_pretrained(src).to_megatron_provider().provide()
    model = peft(model, training=False)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("adapter.linear_out.weight"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
            elif name.endswith("adapter.weight_magnitude"):
                p.mul_(1 + 0.2 * torch.rand(p.shape, generator=g))
    return model


def hand_built_hf(src: Path, adapter_dir: Path) -> torch.nn.Module:
    """The transformers model with each adapted projection's weight replaced by hand from the
    exported tensors: W + s B A (LoRA) or m (W + s B A) / ||W + s B A|| (DoRA)."""
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    tensors = load_file(adapter_dir / "adapter_model.safetensors")
    scale = config["lora_alpha"] / config["r"]
    hf = load_hf(src)
    modules = {k.removeprefix("base_model.model.").rsplit(".lora_A", 1)[0] for k in tensors if "lora_A" in k}
    with torch.no_grad():
        for name in modules:
            layer = hf.get_submodule(name)
            prefix = f"base_model.model.{name}"
            v = layer.weight + scale * tensors[f"{prefix}.lora_B.weight"] @ tensors[f"{prefix}.lora_A.weight"]
            if config["use_dora"]:
                m = tensors[f"{prefix}.lora_magnitude_vector"]
                v = m[:, None] * v / v.norm(dim=1, keepdim=True)
            layer.weight.copy_(v)
    return hf


@pytest.mark.slow
@pytest.mark.parametrize("method", [LoRA, DoRA])
def test_exported_adapter_gives_viaduct_logits_on_the_transformers_model(method, tmp_path: Path):
    src, out = tmp_path / "hf", tmp_path / "adapter"
    save_llama(src)
    peft = method(dim=4, alpha=8, lora_A_init_method="normal")
    model = adapted_viaduct(src, peft)
    peft.save_hf_adapter(model, out, base_model_name_or_path=str(src))

    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["use_dora"] is (method is DoRA)
    assert config["task_type"] == "CAUSAL_LM" and config["bias"] == "none"
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (4, 8, 0.0)
    assert config["target_modules"] == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    assert config["base_model_name_or_path"] == str(src)
    tensors = load_file(out / "adapter_model.safetensors")
    per_module = 3 if method is DoRA else 2
    assert len(tensors) == 2 * 7 * per_module
    q = "base_model.model.model.layers.0.self_attn.q_proj"
    assert tensors[f"{q}.lora_A.weight"].shape == (4, 32) and tensors[f"{q}.lora_B.weight"].shape == (32, 4)
    k = "base_model.model.model.layers.0.self_attn.k_proj"
    assert tensors[f"{k}.lora_B.weight"].shape == (16, 4)
    # q, k and v share the fused layer's A.
    assert torch.equal(tensors[f"{q}.lora_A.weight"], tensors[f"{k}.lora_A.weight"])
    if method is DoRA:
        assert tensors[f"{q}.lora_magnitude_vector"].shape == (32,)

    x = tokens()
    with torch.no_grad():
        ours = model(x)
        torch.testing.assert_close(hand_built_hf(src, out)(x).logits, ours, atol=1e-5, rtol=0)
        # The adapters matter: the plain transformers model gives other logits.
        assert not torch.allclose(load_hf(src)(x).logits, ours, atol=1e-3)


@pytest.mark.slow
@pytest.mark.parametrize("method", [LoRA, DoRA])
def test_hf_peft_loads_the_export_and_matches(method, tmp_path: Path):
    peft_lib = pytest.importorskip("peft")
    src, out = tmp_path / "hf", tmp_path / "adapter"
    save_llama(src)
    peft = method(dim=4, alpha=8, lora_A_init_method="normal")
    model = adapted_viaduct(src, peft)
    peft.save_hf_adapter(model, out)
    hf = peft_lib.PeftModel.from_pretrained(load_hf(src), out).eval()
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=x).logits, model(x), atol=1e-5, rtol=0)


@pytest.mark.slow
def test_partial_targets_export_a_regex_that_adapts_only_those_modules(tmp_path: Path):
    src, out = tmp_path / "hf", tmp_path / "adapter"
    save_llama(src)
    peft = DoRA(dim=4, alpha=4, target_modules=["*.layers.1.*.linear_qkv", "*.layers.0.*.linear_fc1"])
    model = adapted_viaduct(src, peft)
    peft.save_hf_adapter(model, out)
    config = json.loads((out / "adapter_config.json").read_text())
    assert isinstance(config["target_modules"], str)
    tensors = load_file(out / "adapter_model.safetensors")
    assert {k.rsplit(".lora_", 1)[0] for k in tensors} == {
        "base_model.model.model.layers.1.self_attn.q_proj",
        "base_model.model.model.layers.1.self_attn.k_proj",
        "base_model.model.model.layers.1.self_attn.v_proj",
        "base_model.model.model.layers.0.mlp.gate_proj",
        "base_model.model.model.layers.0.mlp.up_proj",
    }
    x = tokens()
    with torch.no_grad():
        ours = model(x)
        torch.testing.assert_close(hand_built_hf(src, out)(x).logits, ours, atol=1e-5, rtol=0)
    peft_lib = pytest.importorskip("peft")
    hf = peft_lib.PeftModel.from_pretrained(load_hf(src), out).eval()
    adapted = {n for n, m in hf.named_modules() if hasattr(m, "lora_A") and len(m.lora_A) > 0}
    assert len(adapted) == 5
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=x).logits, ours, atol=1e-5, rtol=0)


def test_export_refuses_a_model_without_the_llama_layout(tmp_path: Path):
    provider = GPTModelProvider(
        num_layers=1, hidden_size=16, num_attention_heads=2, vocab_size=32, seq_length=8
    )  # not gated: no gate_proj / up_proj
    peft = LoRA(dim=2)
    model = peft(provider.provide())
    with pytest.raises(ConfigError, match="Llama-family"):
        peft.save_hf_adapter(model, tmp_path / "a")
    with pytest.raises(ValueError, match="no adapters"):
        LoRA().save_hf_adapter(GPTModelProvider(
            num_layers=1, hidden_size=16, num_attention_heads=2, vocab_size=32, seq_length=8,
            gated_linear_unit=True).provide(), tmp_path / "b")  # fmt: skip
