"""Mamba-2 checkpoints in and out of viaduct: transformers' `Mamba2ForCausalLM` layout and the original
`state-spaces/mamba2-*` (mamba_ssm) layout. transformers' CPU path (pure PyTorch scan) is the oracle."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from viaduct.config import ConfigError, DType
from viaduct.models.conversion import AutoBridge
from viaduct.models.conversion.provider_config import hf_config_from_provider
from viaduct.models.mamba import MambaModelProvider

transformers = pytest.importorskip("transformers")

VOCAB = 64
# hidden 32, 8 heads of 8 channels (d_inner 64), chunks of 8 positions: a 21-token sequence spans three
# chunks, the last one partial, on both sides.
BASE: dict[str, Any] = dict(
    vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, state_size=8, head_dim=8, num_heads=8,
    expand=2, n_groups=2, chunk_size=8, tie_word_embeddings=False,
)  # fmt: skip
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def hf_mamba(seed: int = 0, **overrides: Any) -> Any:
    """A random float32 Mamba2ForCausalLM in eval mode; every tensor drawn so that a misplaced one
    changes the output (norm scales around 1, A_log around log(1..16), D around 1)."""
    config = transformers.Mamba2Config(**{**BASE, **overrides})
    torch.manual_seed(seed)
    return draw_weights(transformers.Mamba2ForCausalLM(config).eval(), std=0.1)


def draw_weights(model: Any, std: float) -> Any:
    """Draw every tensor of a Hugging Face Mamba-2 style model: norm scales and D around 1, A_log
    around log(1..16), dt_bias in softplus' steep part, the convolution uniform, the rest N(0, std)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("norm.weight", "norm_f.weight", ".D")):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith(".A_log"):
                p.copy_(torch.log(torch.empty_like(p).uniform_(1.0, 16.0)))
            elif name.endswith(".dt_bias"):
                p.copy_(torch.empty_like(p).uniform_(-4.0, -1.0))
            elif "conv1d" in name:
                p.uniform_(-0.5, 0.5)
            else:
                p.normal_(0.0, std)
    return model


def tokens(seq: int = 21, batch: int = 2) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(1))


def logits_of_hf(model: Any, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def logits_of(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(ids)


def test_config_maps_field_by_field() -> None:
    config = transformers.Mamba2Config(
        **{**BASE, "layer_norm_epsilon": 1e-6, "use_bias": True, "tie_word_embeddings": True,
           "residual_in_fp32": False, "initializer_range": 0.05, "time_step_min": 0.01}
    )  # fmt: skip
    bridge = AutoBridge.from_hf_config(config)  # a PretrainedConfig without `architectures`
    assert bridge.architecture == "Mamba2ForCausalLM" and AutoBridge.supports(config)
    p = bridge.to_megatron_provider(load_weights=False)
    assert type(p) is MambaModelProvider
    expected = dict(
        num_layers=2, hybrid_layer_pattern="MM", hidden_size=32, vocab_size=VOCAB, mamba_state_dim=8,
        mamba_head_dim=8, mamba_num_heads=8, mamba_num_groups=2, mamba_chunk_size=8, layernorm_epsilon=1e-6,
        add_bias_linear=True, share_embeddings_and_output_weights=True, fp32_residual_connection=False,
        init_method_std=0.05, normalization="RMSNorm", position_embedding_type="none", should_pad_vocab=False,
    )  # fmt: skip
    assert {k: getattr(p, k) for k in expected} == expected
    assert DType.canonical_name(p.params_dtype) == "float32" and not p.bf16
    assert p.padded_vocab_size() == VOCAB


@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param({}, id="untied-2-groups"),
        pytest.param({"tie_word_embeddings": True, "n_groups": 1}, id="tied-1-group"),
        pytest.param({"n_groups": 4, "use_bias": True, "layer_norm_epsilon": 1e-3}, id="biases-4-groups"),
    ],
)
def test_import_computes_the_same_logits_and_exports_bitwise(
    overrides: dict[str, Any], tmp_path: Path
) -> None:
    hf = hf_mamba(**overrides)
    hf.save_pretrained(tmp_path / "hf")
    ids = tokens()
    want = logits_of_hf(hf, ids)

    bridge = AutoBridge.from_hf_pretrained(tmp_path / "hf")
    model = bridge.to_megatron_provider().provide(device="cpu")
    torch.testing.assert_close(logits_of(model, ids), want, rtol=0, atol=1e-4)

    bridge.save_hf_pretrained(model, tmp_path / "out")
    before, after = (
        load_file(tmp_path / "hf" / "model.safetensors"),
        load_file(tmp_path / "out" / "model.safetensors"),
    )
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    again = transformers.Mamba2ForCausalLM.from_pretrained(tmp_path / "out").eval()
    torch.testing.assert_close(logits_of_hf(again, ids), want, rtol=0, atol=0)


def test_a_model_trained_from_scratch_exports_as_mamba2(tmp_path: Path) -> None:
    provider = MambaModelProvider(
        num_layers=3, hidden_size=32, vocab_size=VOCAB, mamba_state_dim=8, mamba_head_dim=8,
        mamba_num_groups=2, mamba_chunk_size=8, params_dtype=DType("float32"), bf16=False, seq_length=64,
    )  # fmt: skip
    model = provider.provide(device="cpu", init_seed=3)
    config = hf_config_from_provider(provider)
    assert (config["architectures"], config["num_heads"], config["expand"]) == (["Mamba2ForCausalLM"], 8, 2)
    AutoBridge.from_hf_config(config).save_hf_pretrained(model, tmp_path / "out")
    hf = transformers.Mamba2ForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = tokens()
    torch.testing.assert_close(logits_of_hf(hf, ids), logits_of(model, ids), rtol=0, atol=1e-4)

    hybrid = MambaModelProvider(
        hybrid_layer_pattern="M*M-", hidden_size=32, num_attention_heads=4, vocab_size=VOCAB, mamba_head_dim=8
    )
    assert hf_config_from_provider(hybrid)["architectures"] == ["NemotronHForCausalLM"]  # not Mamba-2


def test_an_all_mamba_run_may_save_a_hugging_face_copy() -> None:
    from viaduct.testing import tiny_pretrain_config

    cfg = tiny_pretrain_config(
        "checkpoint.save=/nonexistent/ckpt",
        "checkpoint.also_save_hf_checkpoint=true",
        "checkpoint.async_save=false",
    )
    cfg.model = MambaModelProvider(
        num_layers=2, hidden_size=32, vocab_size=VOCAB, mamba_head_dim=8, mamba_num_groups=2
    )
    cfg.validate()
    cfg.model.hybrid_layer_pattern = "M-"
    cfg.validate()  # a hybrid's copy is a NemotronHForCausalLM
    cfg.model.position_embedding_type = "rope"
    with pytest.raises(ConfigError, match="also_save_hf_checkpoint.*no position embeddings"):
        cfg.validate()


def test_bfloat16_with_a_float32_residual_stream_matches(tmp_path: Path) -> None:
    """bfloat16 weights load in bfloat16, and residual_in_fp32 (transformers' default) becomes
    fp32_residual_connection: the two models agree to bfloat16 rounding."""
    hf = hf_mamba().to(torch.bfloat16)
    hf.save_pretrained(tmp_path / "hf")
    ids = tokens()
    want = logits_of_hf(hf, ids).float()
    bridge = AutoBridge.from_hf_pretrained(tmp_path / "hf")
    provider = bridge.to_megatron_provider()
    assert provider.fp32_residual_connection and provider.bf16
    model = provider.provide(device="cpu")
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    got = logits_of(model, ids).float()
    assert (got - want).abs().max() < 0.05 * want.abs().max()


def test_unsupported_options_are_refused_with_the_field_named() -> None:
    bad = {**BASE, "architectures": ["Mamba2ForCausalLM"], "conv_kernel": 3, "use_conv_bias": False,
           "hidden_act": "gelu", "time_step_limit": [0.0, 10.0], "num_heads": 6, "n_groups": "2"}  # fmt: skip
    with pytest.raises(ConfigError) as err:
        AutoBridge.from_hf_config(bad)
    text = str(err.value)
    for field in ("conv_kernel", "use_conv_bias", "hidden_act", "time_step_limit", "num_heads", "n_groups"):
        assert f"{field}:" in text, field
    assert not AutoBridge.supports(bad)
    # transformers 5 writes infinity as {"__float__": "Infinity"}, earlier versions as a float.
    for unclamped in ([0.0, {"__float__": "Infinity"}], [0.0, math.inf]):
        assert AutoBridge.supports({**BASE, "model_type": "mamba2", "time_step_limit": unclamped})


def test_damaged_or_missing_tensors_are_reported(tmp_path: Path) -> None:
    hf_mamba().save_pretrained(tmp_path / "hf")
    file = tmp_path / "hf" / "model.safetensors"
    tensors = load_file(file)
    del tensors["backbone.layers.1.mixer.A_log"]
    tensors["backbone.layers.0.mixer.conv1d.weight"] = torch.zeros(96, 1, 3)
    tensors["backbone.layers.0.mixer.stray"] = torch.zeros(2)
    save_file(tensors, file)
    bridge = AutoBridge.from_hf_pretrained(tmp_path / "hf")
    with pytest.raises(ConfigError) as err:
        bridge.to_megatron_provider().provide(device="cpu")
    text = str(err.value)
    assert "backbone.layers.1.mixer.A_log: is missing from the checkpoint" in text
    conv = "backbone.layers.0.mixer.conv1d.weight"
    assert f"{conv}: in model.safetensors has shape (96, 1, 3); this config.json needs (96, 1, 4)" in text
    assert "backbone.layers.0.mixer.stray: is in the checkpoint" in text

    file.write_bytes(file.read_bytes()[:1000])  # truncated
    with pytest.raises(ConfigError, match="model.safetensors"):
        AutoBridge.from_hf_pretrained(tmp_path / "hf").to_megatron_provider().provide(device="cpu")


# ---------------------------------------------------------------------------- state-spaces layout


def state_spaces_dir(hf: Any, directory: Path, *, vocab: int, tie: bool) -> None:
    """What a `state-spaces/mamba2-*` directory holds (config.json of mamba_ssm's MambaConfig), with
    the weights as safetensors: the same model as `hf` under mamba_ssm's names."""
    c = hf.config
    directory.mkdir()
    config = {
        "d_model": c.hidden_size, "d_intermediate": 0, "n_layer": c.num_hidden_layers, "vocab_size": vocab,
        "ssm_cfg": {"layer": "Mamba2", "d_state": c.state_size, "headdim": c.head_dim, "ngroups": c.n_groups,
                    "chunk_size": c.chunk_size, "expand": c.expand},
        "attn_layer_idx": [], "attn_cfg": {}, "rms_norm": True, "residual_in_fp32": True,
        "fused_add_norm": True, "pad_vocab_size_multiple": 16, "tie_embeddings": tie,
    }  # fmt: skip
    (directory / "config.json").write_text(json.dumps(config))
    weights = {
        k.replace("backbone.embeddings.", "backbone.embedding."): v.clone()
        for k, v in hf.state_dict().items()
    }
    if tie:
        weights["lm_head.weight"] = weights["backbone.embedding.weight"].clone()  # mamba_ssm saves both
    save_file(weights, directory / "model.safetensors")


@pytest.mark.parametrize("tie", [True, False])
def test_state_spaces_layout_imports_and_round_trips(tie: bool, tmp_path: Path) -> None:
    hf = hf_mamba(tie_word_embeddings=tie)  # 64 rows: the vocabulary of 60 padded to a multiple of 16
    state_spaces_dir(hf, tmp_path / "ss", vocab=60, tie=tie)
    bridge = AutoBridge.from_hf_pretrained(tmp_path / "ss")
    assert bridge.architecture == "MambaLMHeadModel"
    provider = bridge.to_megatron_provider()
    assert (provider.vocab_size, provider.share_embeddings_and_output_weights) == (VOCAB, tie)
    assert (provider.mamba_num_heads, provider.mamba_num_groups, provider.layernorm_epsilon) == (8, 2, 1e-5)
    model = provider.provide(device="cpu")
    ids = tokens()
    torch.testing.assert_close(logits_of(model, ids), logits_of_hf(hf, ids), rtol=0, atol=1e-4)

    bridge.save_hf_pretrained(model, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "torch_dtype" not in config  # mamba_ssm's MambaConfig(**config) takes no such key
    with safe_open(tmp_path / "out" / "model.safetensors", "pt") as f:
        assert "backbone.embedding.weight" in f.keys() and ("lm_head.weight" in f.keys()) != tie

    # And as a transformers directory, through the config the model maps to.
    AutoBridge.from_hf_config(hf_config_from_provider(provider)).save_hf_pretrained(model, tmp_path / "as_hf")
    again = transformers.Mamba2ForCausalLM.from_pretrained(tmp_path / "as_hf").eval()
    torch.testing.assert_close(logits_of_hf(again, ids), logits_of(model, ids), rtol=0, atol=1e-4)


def test_state_spaces_pickled_weights_and_other_layers_are_refused(tmp_path: Path) -> None:
    hf = hf_mamba()
    state_spaces_dir(hf, tmp_path / "ss", vocab=VOCAB, tie=False)
    (tmp_path / "ss" / "model.safetensors").unlink()
    # Not a pickle at all: were it unpickled, the error would be an UnpicklingError, not ours.
    (tmp_path / "ss" / "pytorch_model.bin").write_bytes(b"not a pickle")
    bridge = AutoBridge.from_hf_pretrained(tmp_path / "ss")
    with pytest.raises(ConfigError, match=r"pytorch_model\.bin.*never loaded.*save_file.*weights_only=True"):
        bridge.to_megatron_provider().provide(device="cpu")

    config = json.loads((tmp_path / "ss" / "config.json").read_text())
    mamba1 = {**config, "ssm_cfg": {}}
    with pytest.raises(ConfigError, match=r"ssm_cfg\.layer: only Mamba-2 layers"):
        AutoBridge.from_hf_config(mamba1)
    other = {
        **config,
        "d_intermediate": 128,
        "attn_layer_idx": [1],
        "ssm_cfg": {**config["ssm_cfg"], "d_conv": 2, "norm_before_gate": True, "D_has_hdim": True, "odd": 1},
    }
    with pytest.raises(ConfigError) as err:
        AutoBridge.from_hf_config(other)
    for field in ("d_intermediate", "attn_layer_idx", "ssm_cfg.d_conv", "ssm_cfg.norm_before_gate",
                  "ssm_cfg.D_has_hdim", "ssm_cfg.odd"):  # fmt: skip
        assert f"{field}:" in str(err.value), field


@pytest.mark.slow
def test_import_ckpt_and_export_ckpt_round_trip(tmp_path: Path) -> None:
    """`viaduct checkpoint import-hf` / `export-hf` (their Python entry points) carry a Mamba-2 model."""
    hf = hf_mamba()
    hf.save_pretrained(tmp_path / "hf")
    ckpt = AutoBridge.import_ckpt(tmp_path / "hf", tmp_path / "ckpt")
    assert ckpt.name == "iter_0000000"
    bridge = AutoBridge.from_hf_pretrained(tmp_path / "hf")
    bridge.export_ckpt(tmp_path / "ckpt", tmp_path / "out")
    before, after = (
        load_file(tmp_path / "hf" / "model.safetensors"),
        load_file(tmp_path / "out" / "model.safetensors"),
    )
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def _finetune_losses(pretrained: Path, hf: Path) -> list[float]:
    """The first two losses of `finetune()` starting from `pretrained` (a Hugging Face directory or an
    imported checkpoint of the model in `hf`), on synthetic tokens."""
    from viaduct.testing import tiny_pretrain_config
    from viaduct.training.callbacks import CallbackContext
    from viaduct.training.pretrain import finetune

    cfg = tiny_pretrain_config(
        "train.train_iters=2",
        "train.global_batch_size=4",
        "train.micro_batch_size=2",
        "train.eval_iters=0",
        f"checkpoint.pretrained_checkpoint={pretrained}",
        "tokenizer.tokenizer_type=NullTokenizer",
        f"tokenizer.vocab_size={VOCAB - 1}",  # NullTokenizer adds its end-of-document token
    )
    provider = AutoBridge.from_hf_pretrained(hf).to_megatron_provider(load_weights=False)
    provider.seq_length = 32
    cfg.model = provider
    losses: list[float] = []

    def step_end(ctx: CallbackContext) -> None:
        if ctx.metrics["losses"]:
            losses.append(float(ctx.metrics["losses"]["lm loss"]))

    finetune(cfg, callbacks=[{"on_train_step_end": step_end}])
    return losses


@pytest.mark.slow
def test_finetuning_starts_from_a_mamba2_directory(tmp_path: Path) -> None:
    """checkpoint.pretrained_checkpoint names the Hugging Face directory or its import: the same weights,
    so the same losses; other weights give others."""
    hf_mamba().save_pretrained(tmp_path / "hf")
    direct = _finetune_losses(tmp_path / "hf", tmp_path / "hf")
    imported = AutoBridge.import_ckpt(tmp_path / "hf", tmp_path / "ckpt")
    assert _finetune_losses(imported, tmp_path / "hf") == direct
    hf_mamba(seed=1).save_pretrained(tmp_path / "other")
    assert _finetune_losses(tmp_path / "other", tmp_path / "other") != direct
    assert len(direct) == 2 and all(math.isfinite(x) for x in direct)
