"""What a Hugging Face config maps to, field by field, and the bridge's entry points."""

from __future__ import annotations

import copy
import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conversion_helpers import hf_model, save_hf, tokens
from safetensors import safe_open
from safetensors.torch import save_file

import viaduct
from viaduct.config import DType, FunctionRef
from viaduct.models.conversion import SUPPORTED_ARCHITECTURES, AutoBridge
from viaduct.models.gpt2 import GPT2ModelProvider
from viaduct.models.llama import LlamaModelProvider
from viaduct.models.mistral import MistralModelProvider
from viaduct.models.qwen import Qwen3ModelProvider, Qwen25ModelProvider


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_llama31_config_maps_field_by_field() -> None:
    import transformers

    config = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=8,
        num_key_value_heads=2, head_dim=16, vocab_size=1000, max_position_embeddings=2048,
        rms_norm_eps=1e-5, tie_word_embeddings=True, rope_theta=500000.0, dtype="bfloat16",
        rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    )  # fmt: skip
    bridge = AutoBridge.from_hf_config(config)  # a PretrainedConfig, through to_dict()
    assert AutoBridge.supports(config) and bridge.architecture == "LlamaForCausalLM"
    p = bridge.to_megatron_provider(load_weights=False)
    assert type(p) is LlamaModelProvider
    expected = dict(
        num_layers=3, hidden_size=64, ffn_hidden_size=96, num_attention_heads=8, num_query_groups=2,
        kv_channels=16, vocab_size=1000, seq_length=2048, layernorm_epsilon=1e-5,
        share_embeddings_and_output_weights=True, rotary_base=500000, rope_scaling=True,
        rope_scaling_factor=32.0, normalization="RMSNorm", gated_linear_unit=True, add_bias_linear=False,
        add_qkv_bias=False, qk_layernorm=False, position_embedding_type="rope", should_pad_vocab=False,
        bf16=True, fp16=False, window_size=None, hidden_dropout=0.0,
    )  # fmt: skip
    assert {k: getattr(p, k) for k in expected} == expected
    assert DType.canonical_name(p.params_dtype) == "bfloat16" and p.activation_func == FunctionRef("silu")
    assert p.padded_vocab_size() == 1000


def test_transformers_4_style_rope_keys_and_each_family_map() -> None:
    base = {"hidden_size": 32, "intermediate_size": 40, "num_hidden_layers": 2, "num_attention_heads": 4,
            "vocab_size": 96, "max_position_embeddings": 64}  # fmt: skip
    llama = AutoBridge.from_hf_config(
        {
            **base,
            "architectures": ["LlamaForCausalLM"],
            "rope_theta": 10000.0,
            "torch_dtype": "float16",
            "rope_scaling": {"type": "linear", "factor": 2.0},
        }
    ).to_megatron_provider(load_weights=False)
    assert llama.seq_len_interpolation_factor == 2.0 and llama.rope_scaling is False and llama.fp16
    assert llama.num_query_groups == 4 and llama.kv_channels == 8  # unset: multi-head, hidden / heads
    families = {
        "MistralForCausalLM": (MistralModelProvider, {"sliding_window": 7}, {"window_size": (6, 0)}),
        "Qwen2ForCausalLM": (Qwen25ModelProvider, {}, {"add_qkv_bias": True, "add_bias_linear": False}),
        "Qwen3ForCausalLM": (Qwen3ModelProvider, {"head_dim": 16}, {"qk_layernorm": True, "kv_channels": 16}),
    }
    for arch, (cls, extra, fields) in families.items():
        p = AutoBridge.from_hf_config({**base, "architectures": [arch], **extra}).to_megatron_provider(
            load_weights=False
        )
        assert type(p) is cls and {k: getattr(p, k) for k in fields} == fields, arch
    mistral_full = AutoBridge.from_hf_config(
        {**base, "architectures": ["MistralForCausalLM"], "sliding_window": None}
    ).to_megatron_provider(load_weights=False)
    assert mistral_full.window_size is None
    gpt2 = AutoBridge.from_hf_config(
        {
            "architectures": ["GPT2LMHeadModel"],
            "n_embd": 32,
            "n_layer": 2,
            "n_head": 4,
            "n_positions": 16,
            "vocab_size": 50,
            "activation_function": "gelu_new",
            "resid_pdrop": 0.0,
            "attn_pdrop": 0.0,
        }
    ).to_megatron_provider(load_weights=False)
    assert type(gpt2) is GPT2ModelProvider
    assert (gpt2.ffn_hidden_size, gpt2.normalization) == (128, "LayerNorm")
    assert gpt2.activation_func == FunctionRef("fast_gelu")
    assert gpt2.position_embedding_type == "learned_absolute" and gpt2.share_embeddings_and_output_weights
    assert set(SUPPORTED_ARCHITECTURES) == {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM",
                                            "Qwen3ForCausalLM", "GPT2LMHeadModel", "Mamba2ForCausalLM",
                                            "MambaLMHeadModel", "NemotronHForCausalLM"}  # fmt: skip


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_bfloat16_weights_load_in_bfloat16_and_export_bitwise(tmp_path: Path) -> None:
    hf = hf_model("qwen3").to(torch.bfloat16)
    hf.save_pretrained(tmp_path / "hf")
    bridge = AutoBridge.from_hf_pretrained(tmp_path / "hf")
    model = bridge.to_megatron_provider().provide()
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    bridge.save_hf_pretrained(model, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    with (
        safe_open(str(tmp_path / "hf" / "model.safetensors"), "pt") as a,
        safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as b,
    ):
        assert sorted(a.keys()) == sorted(b.keys())
        assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())
    # torch_dtype overrides the config's dtype: the same bfloat16 file loads into float32 weights.
    fp32 = AutoBridge.from_hf_pretrained(tmp_path / "hf", torch_dtype=torch.float32).to_megatron_provider()
    assert all(p.dtype == torch.float32 for p in fp32.provide().parameters())


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_original_gpt2_checkpoints_without_prefix_and_with_mask_buffers_load(tmp_path: Path) -> None:
    # openai-community/gpt2's file names its tensors "h.0...." and stores the causal-mask buffers.
    hf = save_hf("gpt2", tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        tensors = {k.removeprefix("transformer."): f.get_tensor(k) for k in f.keys()}
    tensors["h.0.attn.bias"] = torch.ones(1, 1, 64, 64)
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    model = AutoBridge.from_hf_pretrained(tmp_path).to_megatron_provider().provide().eval()
    with torch.no_grad():
        torch.testing.assert_close(model(tokens()), hf(tokens()).logits, atol=1e-5, rtol=0)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_the_loading_provide_survives_deepcopy_and_keeps_its_arguments(tmp_path: Path) -> None:
    save_hf("llama", tmp_path)
    provider = AutoBridge.from_hf_pretrained(tmp_path).to_megatron_provider()
    twin = copy.deepcopy(provider)
    twin.seq_length = 32  # the copy's own config is the one used
    assert twin.provide.provider is twin  # type: ignore[attr-defined]
    a, b = provider.provide(init_seed=1), twin.provide(init_seed=2)
    assert (a.seq_length, b.seq_length) == (64, 32)
    assert all(torch.equal(p, dict(b.named_parameters())[k]) for k, p in a.named_parameters())
    # The YAML-visible fields are only the provider's: the hook is not a config field.
    assert "provide" not in type(provider).spec().fields and "provide" not in provider.to_dict()
    # A pickled provider (sent to a spawned process) still loads the weights.
    again = pickle.loads(pickle.dumps(provider))
    c = again.provide(init_seed=3)
    assert all(torch.equal(p, dict(c.named_parameters())[k]) for k, p in a.named_parameters())


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_a_meta_device_build_cannot_take_the_weights_and_says_how_to_load_them(tmp_path: Path) -> None:
    save_hf("gpt2", tmp_path)
    provider = AutoBridge.from_hf_pretrained(tmp_path).to_megatron_provider()
    provider.init_model_with_meta_device = True
    with pytest.raises(ValueError, match=r"meta device.*fix: materialize it .*load_hf_weights"):
        provider.provide()


@pytest.mark.slow
def test_import_viaduct_stays_cheap_and_exports_autobridge_lazily() -> None:
    code = (
        "import sys, viaduct; assert 'torch' not in sys.modules, 'torch imported'; "
        "b = viaduct.AutoBridge; assert b.__module__ == 'viaduct.models.conversion.auto_bridge'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    assert viaduct.AutoBridge is AutoBridge
