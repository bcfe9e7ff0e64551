"""NVIDIA's Nemotron-H hybrids through `AutoBridge`, with transformers' `NemotronHForCausalLM` as the
oracle: a random model's logits, a bitwise round trip of its files, an export transformers loads, and
the config fields viaduct cannot compute refused by name."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from tests.models.conversion.test_mamba_hf import draw_weights

from viaduct.config import ConfigError
from viaduct.models.conversion import AutoBridge
from viaduct.models.conversion.provider_config import hf_config_from_provider
from viaduct.models.mamba import HybridModelProvider

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

VOCAB = 64
# 8 Mamba heads of 8 channels in 2 B/C groups, chunks of 4; 4 attention heads of 8 in 2 KV groups; a
# squared-ReLU MLP of 48. A 13-token sequence spans several chunks, the last one partial.
BASE: dict[str, Any] = dict(
    vocab_size=VOCAB, hidden_size=32, hybrid_override_pattern="M*M-", num_attention_heads=4,
    num_key_value_heads=2, head_dim=8, mamba_num_heads=8, mamba_head_dim=8, n_groups=2, ssm_state_size=8,
    intermediate_size=48, chunk_size=4, tie_word_embeddings=False,
)  # fmt: skip


def hf_nemotron(seed: int = 0, **overrides: Any) -> Any:
    """A random float32 NemotronHForCausalLM in eval mode; every tensor drawn so that a misplaced one
    changes the output."""
    config = transformers.NemotronHConfig(**{**BASE, **overrides})
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    return draw_weights(transformers.NemotronHForCausalLM(config).eval(), std=0.2)


def tokens(seq: int = 13, batch: int = 2) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(1))


def hf_logits(model: Any, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def our_logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(ids)


def test_config_maps_to_a_hybrid_provider() -> None:
    bridge = AutoBridge.from_hf_config(transformers.NemotronHConfig(**BASE))
    assert bridge.architecture == "NemotronHForCausalLM"
    p = bridge.to_megatron_provider(load_weights=False)
    assert type(p) is HybridModelProvider
    p.finalize()
    assert (p.layer_pattern(), p.num_layers, p.hidden_size, p.num_attention_heads, p.num_query_groups) == (
        "M*M-",
        4,
        32,
        4,
        2,
    )
    assert (p.kv_channels, p.ffn_hidden_size, p.gated_linear_unit, p.position_embedding_type) == (
        8,
        48,
        False,
        "none",
    )
    assert (p.mamba_heads(), p.mamba_head_dim, p.mamba_num_groups, p.mamba_state_dim, p.mamba_chunk_size) == (
        8,
        8,
        2,
        8,
        4,
    )
    assert p.activation_func.__name__ == "squared_relu" and p.add_bias_linear is False


@pytest.mark.parametrize("tie", [False, True])
def test_import_computes_the_same_logits_and_exports_bitwise(tie: bool, tmp_path: Path) -> None:
    # transformers' Nemotron-H keeps its own lm_head even with tie_word_embeddings: so does the import.
    hf = hf_nemotron(tie_word_embeddings=tie)
    hf.save_pretrained(tmp_path / "hf")
    ids = tokens()
    want = hf_logits(hf, ids)

    bridge = AutoBridge.from_hf_pretrained(tmp_path / "hf")
    model = bridge.to_megatron_provider().provide(device="cpu")
    torch.testing.assert_close(our_logits(model, ids), want, rtol=0, atol=1e-4)

    bridge.save_hf_pretrained(model, tmp_path / "out")
    before = load_file(tmp_path / "hf" / "model.safetensors")
    after = load_file(tmp_path / "out" / "model.safetensors")
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    again = transformers.NemotronHForCausalLM.from_pretrained(
        tmp_path / "out", attn_implementation="eager"
    ).eval()
    torch.testing.assert_close(hf_logits(again, ids), want, rtol=0, atol=0)


def test_module_names_load_too(tmp_path: Path) -> None:
    # A file written from the module's state dict holds `model.*` where transformers saves `backbone.*`.
    hf = hf_nemotron()
    hf.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    assert any(k.startswith("backbone.") for k in weights)
    save_file(
        {k.replace("backbone.", "model.", 1): v for k, v in weights.items()}, tmp_path / "model.safetensors"
    )
    model = AutoBridge.from_hf_pretrained(tmp_path).to_megatron_provider().provide(device="cpu")
    ids = tokens()
    torch.testing.assert_close(our_logits(model, ids), hf_logits(hf, ids), rtol=0, atol=1e-4)


def test_a_hybrid_trained_from_scratch_exports_as_nemotron_h(tmp_path: Path) -> None:
    provider = HybridModelProvider(
        hybrid_layer_pattern="M-*M", hidden_size=32, num_attention_heads=4, num_query_groups=2, kv_channels=8,
        ffn_hidden_size=48, activation_func="squared_relu", vocab_size=VOCAB, mamba_state_dim=8,
        mamba_head_dim=8, mamba_num_groups=2, mamba_chunk_size=4, params_dtype="float32", bf16=False,
        seq_length=64,
    )  # fmt: skip
    model = provider.provide(device="cpu", init_seed=3)
    config = hf_config_from_provider(provider)
    assert (config["architectures"], config["hybrid_override_pattern"]) == (["NemotronHForCausalLM"], "M-*M")
    AutoBridge.from_hf_config(config).save_hf_pretrained(model, tmp_path / "out")
    hf = transformers.NemotronHForCausalLM.from_pretrained(
        tmp_path / "out", attn_implementation="eager"
    ).eval()
    ids = tokens()
    torch.testing.assert_close(hf_logits(hf, ids), our_logits(model, ids), rtol=0, atol=1e-4)

    rotary = HybridModelProvider(
        hybrid_layer_pattern="M*", hidden_size=32, num_attention_heads=4, vocab_size=VOCAB, mamba_head_dim=8,
        position_embedding_type="rope", gated_linear_unit=True, share_embeddings_and_output_weights=True,
    )  # fmt: skip
    with pytest.raises(ConfigError) as info:
        hf_config_from_provider(rotary)
    paths = {p.path for p in info.value.problems}
    for field in ("position_embedding_type", "gated_linear_unit", "share_embeddings_and_output_weights"):
        assert f"model.{field}" in paths


def test_unsupported_options_are_refused_with_the_field_named() -> None:
    config = {
        **BASE,
        "architectures": ["NemotronHForCausalLM"],
        "hybrid_override_pattern": "M*ME",
        "conv_kernel": 3,
        "mlp_bias": True,
        "sliding_window": 16,
        "num_nextn_predict_layers": 1,
    }
    with pytest.raises(ConfigError) as info:
        AutoBridge.from_hf_config(config)
    problems = {p.path: p.message for p in info.value.problems}
    assert "mixture-of-experts" in problems["hybrid_override_pattern"]
    assert {"conv_kernel", "mlp_bias", "sliding_window", "num_nextn_predict_layers"} <= problems.keys()
    types = {**BASE, "architectures": ["NemotronHForCausalLM"], "layers_block_type": ["mamba", "moe"]}
    with pytest.raises(ConfigError, match="mixture-of-experts"):
        AutoBridge.from_hf_config(types)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("layers_block_type", [{"mamba": 1}, None]),
        ("layers_block_type", "M*M-"),
        ("hybrid_override_pattern", 42),
        ("mamba_num_heads", "eight"),
        ("n_groups", 3),
    ],
)
def test_a_damaged_config_is_a_clear_error(key: str, value: object) -> None:
    config = {k: v for k, v in BASE.items() if k != "hybrid_override_pattern" or key != "layers_block_type"}
    with pytest.raises(ConfigError) as info:
        AutoBridge.from_hf_config({**config, "architectures": ["NemotronHForCausalLM"], key: value})
    assert key in {p.path for p in info.value.problems}


@pytest.mark.slow
def test_a_hybrid_run_saves_a_copy_transformers_loads(tmp_path: Path) -> None:
    from viaduct.inference import load_checkpoint
    from viaduct.testing import tiny_pretrain_config
    from viaduct.training.pretrain import pretrain

    save = tmp_path / "ckpt"
    cfg = tiny_pretrain_config(
        "train.train_iters=2", "train.eval_iters=0", f"checkpoint.save={save}", "checkpoint.async_save=false",
        "checkpoint.also_save_hf_checkpoint=true",
    )  # fmt: skip
    cfg.model = HybridModelProvider(
        hybrid_layer_pattern="M*-M", hidden_size=32, num_attention_heads=4, ffn_hidden_size=48,
        activation_func="squared_relu", mamba_state_dim=8, mamba_head_dim=8, mamba_num_groups=2,
        mamba_chunk_size=4, params_dtype="float32", bf16=False, seq_length=32,
    )  # fmt: skip
    pretrain(cfg)
    copy = save / "iter_0000002" / "hf"
    hf = transformers.NemotronHForCausalLM.from_pretrained(copy, attn_implementation="eager").eval()
    trained = load_checkpoint(save, device="cpu").model
    ids = torch.randint(0, hf.config.vocab_size, (2, 13), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = trained(ids)[..., : hf.config.vocab_size]
    torch.testing.assert_close(hf_logits(hf, ids), want, rtol=1e-5, atol=1e-5)


def _finetune_losses(hf: Path, *overrides: str) -> list[float]:
    """The first two losses of `finetune()` from the Hugging Face directory `hf`, on synthetic tokens."""
    from viaduct.testing import tiny_pretrain_config
    from viaduct.training.pretrain import finetune

    cfg = tiny_pretrain_config(
        "train.train_iters=2", "train.global_batch_size=4", "train.micro_batch_size=2", "train.eval_iters=0",
        f"checkpoint.pretrained_checkpoint={hf}", "tokenizer.tokenizer_type=NullTokenizer",
        f"tokenizer.vocab_size={VOCAB - 1}",  # NullTokenizer adds its end-of-document token
    )  # fmt: skip
    provider = AutoBridge.from_hf_pretrained(hf).to_megatron_provider(load_weights=False)
    provider.seq_length = 32
    cfg.model = provider
    from viaduct.config import apply_overrides

    apply_overrides(cfg, list(overrides))
    losses: list[float] = []
    finetune(
        cfg,
        callbacks=[{"on_train_step_end": lambda ctx: losses.append(float(ctx.metrics["losses"]["lm loss"]))}],
    )
    return losses


@pytest.mark.slow
def test_lora_finetuning_starts_from_a_nemotron_h_directory(tmp_path: Path) -> None:
    # Megatron Bridge's Nemotron-H LoRA targets: every linear layer of every block kind.
    hf_nemotron().save_pretrained(tmp_path)
    full = _finetune_losses(tmp_path)
    lora = _finetune_losses(
        tmp_path,
        "peft=lora",
        "peft.target_modules=['in_proj','out_proj','linear_qkv','linear_proj','linear_fc1','linear_fc2']",
    )
    assert lora[0] == full[0]  # B = 0: the imported model's own loss
    assert len(lora) == 2 and lora[1] != full[1]
