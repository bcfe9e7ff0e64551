"""`viaduct peft merge` and `viaduct peft export-adapter` on a real fine-tuning run's adapter
checkpoint, checked against the adapted model itself, `transformers` and Hugging Face `peft`."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from viaduct.inference import load_checkpoint
from viaduct.inference.load import build_adapted_model
from viaduct.testing import run_viaduct, tiny_pretrain_config
from viaduct.training.checkpoint.hf import export_hf_checkpoint
from viaduct.training.pretrain import finetune, pretrain

pytestmark = pytest.mark.slow
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(base checkpoint, adapter checkpoints) of a tiny pretrain + LoRA run whose adapters moved."""
    root = tmp_path_factory.mktemp("peft")
    base, adapters = root / "base", root / "adapters"
    pretrain(tiny_pretrain_config("train.train_iters=2", "train.eval_iters=0", f"checkpoint.save={base}"))
    finetune(
        tiny_pretrain_config(
            "train.train_iters=3",
            "train.eval_iters=0",
            "peft=lora",
            "peft.dim=4",
            "peft.alpha=8",
            "optimizer.lr=0.05",
            f"checkpoint.pretrained_checkpoint={base}",
            f"checkpoint.save={adapters}",
        )
    )
    return base, adapters


def _ids(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(0))


def _adapted_logits(adapters: Path) -> tuple[torch.Tensor, torch.Tensor]:
    model, cfg = build_adapted_model(adapters)
    ids = _ids(cfg.model.vocab_size)
    with torch.no_grad():
        return ids, model(ids)


def test_merge_writes_a_checkpoint_equal_to_the_adapted_model(run: tuple[Path, Path], tmp_path: Path) -> None:
    base, adapters = run
    ids, want = _adapted_logits(adapters)
    with torch.no_grad():
        plain = load_checkpoint(base, device="cpu").model(ids)
    assert not torch.allclose(plain, want, atol=1e-4)  # the adapters changed the function

    done = run_viaduct("peft", "merge", str(adapters), str(tmp_path / "merged"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    merged = load_checkpoint(tmp_path / "merged", device="cpu")
    assert merged.config.peft is None
    assert not any(".adapter." in n for n, _ in merged.model.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(merged.model(ids), want, rtol=1e-5, atol=1e-5)

    # Merging never writes over a model.
    again = run_viaduct("peft", "merge", str(adapters), str(tmp_path / "merged"), cwd=tmp_path)
    assert again.returncode == 2 and "already holds a model" in again.stderr


def test_merge_to_hugging_face_matches_transformers(run: tuple[Path, Path], tmp_path: Path) -> None:
    _, adapters = run
    ids, want = _adapted_logits(adapters)
    done = run_viaduct("peft", "merge", str(adapters), str(tmp_path / "hf"), "--hf", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", torch_dtype=torch.float32).eval()
    with torch.no_grad():
        got = hf(ids).logits
    torch.testing.assert_close(got, want[..., : got.shape[-1]], rtol=1e-5, atol=1e-5)


def test_export_adapter_loads_in_hugging_face_peft(run: tuple[Path, Path], tmp_path: Path) -> None:
    peft_lib = pytest.importorskip("peft")
    base, adapters = run
    ids, want = _adapted_logits(adapters)
    hf_base = export_hf_checkpoint(base, tmp_path / "base_hf")
    done = run_viaduct("peft", "export-adapter", str(adapters), str(tmp_path / "adapter"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_base, torch_dtype=torch.float32)
    hf = peft_lib.PeftModel.from_pretrained(model, tmp_path / "adapter").eval()
    with torch.no_grad():
        got = hf(ids).logits
    torch.testing.assert_close(got, want[..., : got.shape[-1]], rtol=1e-5, atol=1e-5)


def test_a_full_checkpoint_is_not_an_adapter_checkpoint(run: tuple[Path, Path], tmp_path: Path) -> None:
    base, _ = run
    done = run_viaduct("peft", "export-adapter", str(base), str(tmp_path / "x"), cwd=tmp_path)
    assert done.returncode == 2 and "is not a PEFT adapter checkpoint" in done.stderr
