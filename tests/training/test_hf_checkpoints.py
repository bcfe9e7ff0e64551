"""Hugging Face model directories in runs and checkpoints: `checkpoint.pretrained_checkpoint` naming one
(whole model, sharded, pipeline stages), the tokenizer following it, `import-hf` / `export-hf` (Python
and CLI) and the export of a model trained from scratch. transformers is the oracle."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from tests.models.conversion.conversion_helpers import VOCAB, load_hf, save_hf, tokens

from viaduct.models.conversion import AutoBridge
from viaduct.models.conversion.provider_config import hf_config_from_provider
from viaduct.testing import run_distributed, run_viaduct, tiny_pretrain_config
from viaduct.training.callbacks import CallbackContext
from viaduct.training.checkpoint.hf import export_hf_checkpoint, import_hf_checkpoint
from viaduct.training.config import ConfigContainer
from viaduct.training.pretrain import finetune, pretrain

transformers = pytest.importorskip("transformers")


def _run_config(pretrained: str, *overrides: str, hf: str | None = None) -> ConfigContainer:
    """A short run of the tiny Llama `save_hf` wrote to `hf` (default: `pretrained`), starting from
    `pretrained`, on synthetic tokens."""
    cfg = tiny_pretrain_config(
        "train.train_iters=2",
        "train.global_batch_size=4",
        "train.micro_batch_size=2",
        "train.eval_iters=0",
        f"checkpoint.pretrained_checkpoint={pretrained}",
        "tokenizer.tokenizer_type=NullTokenizer",
        f"tokenizer.vocab_size={VOCAB - 1}",  # NullTokenizer adds its end-of-document token
        *overrides,
    )
    provider = AutoBridge.from_hf_pretrained(hf or pretrained).to_megatron_provider(load_weights=False)
    provider.seq_length = 32
    cfg.model = provider
    return cfg


def _first_losses(
    rank: int, world: int, pretrained: str, overrides: tuple[str, ...], hf: str | None = None
) -> list[float]:
    """The losses of a fine-tuning run (`finetune()`: it must start from the weights)."""
    losses: list[float] = []

    def step_end(ctx: CallbackContext) -> None:
        if ctx.metrics["losses"]:
            losses.append(float(ctx.metrics["losses"]["lm loss"]))

    finetune(_run_config(pretrained, *overrides, hf=hf), callbacks=[{"on_train_step_end": step_end}])
    return losses


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("hf") / "llama"
    save_hf("llama", directory)
    return directory


@pytest.mark.slow
def test_a_run_starts_from_a_hugging_face_directory(hf_dir: Path, tmp_path: Path) -> None:
    """The Hugging Face directory itself, or its import: the same weights, so the same losses; fresh
    weights give others."""
    direct = _first_losses(0, 1, str(hf_dir), ())
    imported = import_hf_checkpoint(hf_dir, tmp_path / "ckpt")
    via_import = _first_losses(0, 1, str(imported), (), str(hf_dir))
    assert direct == via_import
    other = tmp_path / "other"
    save_hf("llama", other, seed=1)  # the same architecture, other weights
    assert _first_losses(0, 1, str(other), ()) != direct
    assert len(direct) == 2 and all(torch.isfinite(torch.tensor(direct)))


@pytest.mark.slow
def test_lora_starts_from_a_hugging_face_directory(hf_dir: Path, tmp_path: Path) -> None:
    """The base from the Hugging Face directory, the adapters (B = 0) on it: the first loss is the
    base model's, and the checkpoint holds the adapters only."""
    full = _first_losses(0, 1, str(hf_dir), ())
    save = tmp_path / "adapters"
    lora = _first_losses(0, 1, str(hf_dir), ("peft=lora", "peft.dim=4", f"checkpoint.save={save}"))
    assert lora[0] == full[0] and lora[1] != full[1]
    meta = json.loads((save / "iter_0000002" / "metadata.json").read_text())
    assert meta["contents"]["model"] == "adapters" and meta["peft_base"] == str(hf_dir)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize(
    "overrides",
    [("ddp.use_distributed_optimizer=true",), ("model.pipeline_model_parallel_size=2",)],
    ids=["fsdp", "pipeline"],
)
def test_sharded_and_pipelined_runs_load_their_part(hf_dir: Path, overrides: tuple[str, ...]) -> None:
    # Same global batch on 2 ranks: the losses of the one-process run.
    one = _first_losses(0, 1, str(hf_dir), ())
    got = run_distributed(_first_losses, 2, str(hf_dir), overrides, timeout=240, all_ranks=True, reuse=True)
    torch.testing.assert_close(torch.tensor(got[-1]), torch.tensor(one), rtol=1e-5, atol=1e-6)


def test_an_unset_tokenizer_follows_a_hugging_face_directory(hf_dir: Path, tmp_path: Path) -> None:
    with_tokenizer = tmp_path / "model"
    with_tokenizer.mkdir()
    for f in hf_dir.iterdir():
        (with_tokenizer / f.name).write_bytes(f.read_bytes())
    (with_tokenizer / "tokenizer.json").write_text("{}")
    cfg = tiny_pretrain_config(f"checkpoint.pretrained_checkpoint={with_tokenizer}")
    cfg.tokenizer.tokenizer_type = None
    cfg.validate()
    assert cfg.tokenizer.tokenizer_type == "HuggingFaceTokenizer"
    assert cfg.tokenizer.tokenizer_model == str(with_tokenizer)
    cfg.tokenizer.tokenizer_type = "NullTokenizer"  # a tokenizer set by the user stays
    cfg.tokenizer.vocab_size = 90
    cfg.validate()
    assert cfg.tokenizer.tokenizer_type == "NullTokenizer"


def test_import_then_export_gives_the_hugging_face_model_back(hf_dir: Path, tmp_path: Path) -> None:
    # Megatron Bridge's names for the two conversions.
    ckpt = AutoBridge.import_ckpt(hf_dir, tmp_path / "ckpt")
    bridge = AutoBridge.from_hf_pretrained(hf_dir)
    out = bridge.export_ckpt(ckpt.parent, tmp_path / "hf", max_shard_size=20_000)
    assert json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    ids = tokens()
    with torch.no_grad():
        want, got = load_hf(hf_dir)(ids).logits, load_hf(out)(ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def _train_tiny(rank: int, world: int, save: str) -> None:
    pretrain(tiny_pretrain_config("train.train_iters=2", "train.eval_iters=0", f"checkpoint.save={save}"))


@pytest.mark.slow
def test_a_model_trained_from_scratch_exports_to_transformers(tmp_path: Path) -> None:
    from viaduct.inference.load import load_checkpoint

    save = str(tmp_path / "run")
    _train_tiny(0, 1, save)
    out = export_hf_checkpoint(save, tmp_path / "hf")
    loaded = load_checkpoint(save, device="cpu")
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config == {**config, **hf_config_from_provider(loaded.config.model)} | {"torch_dtype": "float32"}
    ids = torch.randint(
        0, loaded.config.model.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        want = loaded.model(ids)[..., : config["vocab_size"]]
        got = load_hf(out)(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return run_viaduct("checkpoint", *args, cwd=cwd)


@pytest.mark.slow
def test_cli_import_and_export(hf_dir: Path, tmp_path: Path) -> None:
    done = _cli("import-hf", str(hf_dir), "ckpt", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "iter_0000000" in done.stdout
    done = _cli("export-hf", "ckpt", "hf", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    ids = tokens()
    with torch.no_grad():
        torch.testing.assert_close(load_hf(tmp_path / "hf")(ids).logits, load_hf(hf_dir)(ids).logits)
    again = _cli("import-hf", str(hf_dir), "ckpt", cwd=tmp_path)
    assert again.returncode == 2 and "already holds a checkpoint" in again.stderr
    missing = _cli("export-hf", "nowhere", "out", cwd=tmp_path)
    assert missing.returncode == 2 and missing.stderr.startswith("error:")
    assert "Traceback" not in missing.stderr + again.stderr


def test_no_hugging_face_architecture_is_invented() -> None:
    from viaduct.config import ConfigError
    from viaduct.models.gpt.provider import GPTModelProvider

    provider = GPTModelProvider(
        num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=64, seq_length=32
    )  # LayerNorm with rotary positions: no Hugging Face architecture computes it
    provider.position_embedding_type = "rope"
    with pytest.raises(ConfigError, match="no Hugging Face architecture computes this model"):
        hf_config_from_provider(provider)


def _train_with_hf_copy(rank: int, world: int, save: str, overrides: tuple[str, ...]) -> None:
    cfg = tiny_pretrain_config(
        "train.train_iters=2",
        "train.eval_iters=0",
        f"checkpoint.save={save}",
        "checkpoint.save_interval=1",
        "checkpoint.also_save_hf_checkpoint=true",
        *overrides,
    )
    pretrain(cfg)


@pytest.mark.slow
@pytest.mark.distributed
def test_each_checkpoint_carries_a_hugging_face_copy(tmp_path: Path) -> None:
    """One process and a sharded pair write the same copy into every iter_N/hf; it computes what the
    checkpoint's model computes, and the checkpoint still resumes."""
    from viaduct.inference.load import load_checkpoint

    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    _train_with_hf_copy(0, 1, one, ())
    run_distributed(
        _train_with_hf_copy, 2, two, ("ddp.use_distributed_optimizer=true",), timeout=240, reuse=True
    )
    for step in (1, 2):
        copy = Path(one) / f"iter_{step:07d}" / "hf"
        assert (copy / "config.json").is_file()
        sharded = load_hf(Path(two) / f"iter_{step:07d}" / "hf").state_dict()
        for name, value in load_hf(copy).state_dict().items():
            torch.testing.assert_close(sharded[name], value, rtol=1e-5, atol=1e-6, msg=name)
    loaded = load_checkpoint(one, device="cpu")
    config = json.loads((Path(one) / "iter_0000002" / "hf" / "config.json").read_text())
    ids = torch.randint(0, config["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = loaded.model(ids)[..., : config["vocab_size"]]
        got = load_hf(Path(one) / "iter_0000002" / "hf")(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    resumed = pretrain(
        tiny_pretrain_config("train.train_iters=3", "train.eval_iters=0", f"checkpoint.load={one}")
    )
    assert resumed.train_state.step == 3


def test_the_hugging_face_copy_is_refused_where_it_cannot_be_written(tmp_path: Path) -> None:
    from viaduct.config import ConfigError

    cases = {
        "checkpoint.save is unset": (),
        "synchronously": (f"checkpoint.save={tmp_path}", "checkpoint.async_save=true"),
        "pipeline parallelism": (
            f"checkpoint.save={tmp_path}",
            "model.pipeline_model_parallel_size=2",
        ),
        "no Hugging Face architecture": (f"checkpoint.save={tmp_path}", "model.normalization=LayerNorm"),
    }
    for expected, overrides in cases.items():
        cfg = tiny_pretrain_config("checkpoint.also_save_hf_checkpoint=true", *overrides)
        with pytest.raises(ConfigError, match=expected):
            cfg.validate(world_size=2)
