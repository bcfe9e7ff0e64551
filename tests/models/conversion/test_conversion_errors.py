"""Clear errors for untrusted or unsupported Hugging Face files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conversion_helpers import save_hf
from safetensors.torch import save_file

from viaduct import AutoBridge
from viaduct.config import ConfigError


def _config(directory: Path) -> dict:
    return json.loads((directory / "config.json").read_text())


def _write_config(directory: Path, cfg: dict) -> None:
    (directory / "config.json").write_text(json.dumps(cfg))


def test_a_missing_directory_or_config_says_what_is_missing(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"path: does not exist .*nope"):
        AutoBridge.from_hf_pretrained(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"empty/config\.json: does not exist"):
        AutoBridge.from_hf_pretrained(tmp_path / "empty")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="path: is not a directory"):
        AutoBridge.from_hf_pretrained(tmp_path / "file")


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_missing_weight_files_and_pickled_weights_are_refused(tmp_path: Path) -> None:
    save_hf("llama", tmp_path)
    (tmp_path / "model.safetensors").unlink()
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickle")
    bridge = AutoBridge.from_hf_pretrained(tmp_path)
    with pytest.raises(
        ConfigError, match=r"has neither model\.safetensors nor .*only pickled weights: pytorch"
    ):
        bridge.to_megatron_provider().provide()


def test_a_hub_id_that_cannot_be_downloaded_says_how_to_download_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("huggingface_hub")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(
        ConfigError, match=r"downloading it from the Hugging Face Hub failed.*huggingface-cli download"
    ):
        AutoBridge.from_hf_pretrained("no-such-owner/no-such-model")


def test_an_unknown_architecture_lists_the_supported_ones() -> None:
    cfg = {"architectures": ["BertForMaskedLM"], "hidden_size": 8}
    with pytest.raises(ConfigError, match=r"architectures: .*LlamaForCausalLM, .*GPT2LMHeadModel") as e:
        AutoBridge.from_hf_config(cfg)
    assert "BertForMaskedLM" in str(e.value)
    assert not AutoBridge.supports(cfg)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_config_values_of_the_wrong_type_are_all_named_with_the_file(tmp_path: Path) -> None:
    save_hf("llama", tmp_path)
    cfg = _config(tmp_path)
    cfg.update(hidden_size="32", rms_norm_eps=-1, tie_word_embeddings="no", hidden_act="tanh")
    _write_config(tmp_path, cfg)
    with pytest.raises(ConfigError) as e:
        AutoBridge.from_hf_pretrained(tmp_path)
    text = str(e.value)
    for field in ("hidden_size", "rms_norm_eps", "tie_word_embeddings", "hidden_act"):
        assert f"{field}: " in text, field
    assert str(tmp_path / "config.json") in text and "'32'" in text
    (tmp_path / "config.json").write_text('{"architectures": ["LlamaForCausalLM"],\n "hidden_size": }')
    with pytest.raises(ConfigError, match=r"config\.json:2: is not valid JSON"):
        AutoBridge.from_hf_pretrained(tmp_path)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (
            {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}},
            r"rope_type: .*default, linear and llama3",
        ),
        (
            {"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 2.0,
             "high_freq_factor": 4.0, "original_max_position_embeddings": 8192, "rope_theta": 5e5}},
            r"low_freq_factor: .*= 1\.0",
        ),
        ({"attention_bias": True}, r"mlp_bias: .*must be equal"),
        ({"num_key_value_heads": 3}, r"num_key_value_heads: must divide num_attention_heads \(4\)"),
    ],
)  # fmt: skip
def test_values_viaduct_cannot_reproduce_are_refused(change: dict, match: str) -> None:
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": 32,
        "intermediate_size": 40,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 96,
        "max_position_embeddings": 64,
        **change,
    }
    with pytest.raises(ConfigError, match=match):
        AutoBridge.from_hf_config(cfg)


def test_qwen_layer_dependent_sliding_window_is_refused() -> None:
    cfg = {"architectures": ["Qwen2ForCausalLM"], "hidden_size": 32, "intermediate_size": 40,
           "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 96,
           "max_position_embeddings": 64, "use_sliding_window": True, "sliding_window": 8}  # fmt: skip
    with pytest.raises(ConfigError, match="use_sliding_window: a sliding window on some layers only"):
        AutoBridge.from_hf_config(cfg)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_shape_mismatch_names_the_tensor_file_and_shapes(tmp_path: Path) -> None:
    save_hf("llama", tmp_path)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors["model.layers.1.self_attn.k_proj.weight"] = torch.zeros(8, 32)
    tensors["model.layers.0.mlp.up_proj.weight"] = tensors["model.layers.0.mlp.up_proj.weight"].to(
        torch.int32
    )
    del tensors["model.norm.weight"]
    tensors["model.layers.7.extra.weight"] = torch.zeros(1)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(ConfigError) as e:
        AutoBridge.from_hf_pretrained(tmp_path).to_megatron_provider().provide()
    text = str(e.value)
    assert (
        "model.layers.1.self_attn.k_proj.weight: in model.safetensors has shape (8, 32); "
        "this config.json needs (16, 32)" in text
    )
    assert "model.layers.0.mlp.up_proj.weight: in model.safetensors has dtype I32" in text
    assert (
        "model.norm.weight: is missing from the checkpoint (needed for decoder.final_layernorm.weight)"
        in text
    )
    assert "model.layers.7.extra.weight: is in the checkpoint (model.safetensors) but no parameter" in text


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_a_model_of_another_shape_is_refused_before_anything_is_copied(tmp_path: Path) -> None:
    save_hf("llama", tmp_path)
    bridge = AutoBridge.from_hf_pretrained(tmp_path)
    provider = bridge.to_megatron_provider(load_weights=False)
    provider.ffn_hidden_size = 48
    model = provider.provide(init_seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(
        ConfigError,
        match=r"decoder\.layers\.0\.mlp\.linear_fc1\.weight: model parameter has shape \(96, 32\)",
    ):
        bridge.load_hf_weights(model)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize(
    "bad", ["../outside.safetensors", "/tmp/abs.safetensors", "sub/x.safetensors", "x.bin"]
)
def test_an_index_may_only_name_files_inside_the_directory(tmp_path: Path, bad: str) -> None:
    model_dir = tmp_path / "model"
    save_hf("llama", model_dir)
    (tmp_path / "outside.safetensors").write_bytes((model_dir / "model.safetensors").read_bytes())
    index = {"weight_map": {"model.norm.weight": bad, "model.embed_tokens.weight": "model.safetensors"}}
    (model_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(
        ConfigError, match=r"weight_map\.model\.norm\.weight: must name a \.safetensors file directly inside"
    ):
        AutoBridge.from_hf_pretrained(model_dir).to_megatron_provider().provide()


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_a_corrupt_safetensors_file_is_a_clear_error(tmp_path: Path) -> None:
    save_hf("gpt2", tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\xff" * 8 + b"{not json")
    with pytest.raises(ConfigError, match=r"model\.safetensors: is not a valid safetensors file"):
        AutoBridge.from_hf_pretrained(tmp_path).to_megatron_provider().provide()


def test_weights_need_a_directory() -> None:
    cfg = {
        "architectures": ["GPT2LMHeadModel"],
        "n_embd": 32,
        "n_layer": 1,
        "n_head": 4,
        "n_positions": 16,
        "vocab_size": 50,
    }
    with pytest.raises(ConfigError, match="load_weights: this bridge has a config only"):
        AutoBridge.from_hf_config(cfg).to_megatron_provider()
