"""The fine-tuning recipes (Megatron Bridge's names and keywords) and the embedded example that runs
the whole path on CPU: pretrain, LoRA on the built-in instruction set, generate, merge."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from viaduct.peft import DoRA, LoRA
from viaduct.recipes import get_recipe
from viaduct.testing import run_viaduct
from viaduct.training.config import FinetuningDatasetConfig

NAMES = [
    f"{model}_{kind}_config"
    for model in ("llama32_1b", "llama3_8b", "qwen3_600m", "qwen3_8b", "tiny_gpt")
    for kind in ("sft", "peft")
]


@pytest.mark.parametrize("name", NAMES)
def test_sft_trains_everything_and_peft_trains_lora(name: str) -> None:
    cfg = get_recipe(name)()
    assert isinstance(cfg.dataset, FinetuningDatasetConfig)
    assert cfg.dataset.dataset_root == "builtin:pydoc-sft"
    if name.endswith("_peft_config"):
        assert isinstance(cfg.peft, LoRA)
    else:
        assert cfg.peft is None
    assert cfg.checkpoint.save == f"./runs/{name.removesuffix('_config')}/checkpoints"


@pytest.mark.parametrize("name", ["llama32_1b_peft_config", "qwen3_8b_sft_config"])
def test_finetune_keywords(name: str) -> None:
    cfg = get_recipe(name)(
        pretrained_checkpoint="/models/base",
        peft="dora",
        packed_sequence=True,
        finetune_lr=3e-5,
        dataset_root="/data/sft",
        seq_length=1024,
        train_iters=12,
        name="mine",
    )
    assert cfg.checkpoint.pretrained_checkpoint == "/models/base"
    assert isinstance(cfg.peft, DoRA)
    assert isinstance(cfg.dataset, FinetuningDatasetConfig)
    assert cfg.dataset.packed_sequence_specs is not None and cfg.train.micro_batch_size == 1
    assert (cfg.optimizer.lr, cfg.dataset.dataset_root) == (3e-5, "/data/sft")
    assert (cfg.model.seq_length, cfg.train.train_iters) == (1024, 12)
    assert cfg.checkpoint.save == "./runs/mine/checkpoints"
    assert get_recipe(name)(peft=None).peft is None


def test_pretraining_data_keywords_are_refused() -> None:
    with pytest.raises(TypeError, match="takes no data_paths"):
        get_recipe("llama32_1b_sft_config")(data_paths=["/data/x"])


@pytest.mark.slow
def test_the_embedded_example_runs_the_whole_path_on_cpu(tmp_path: Path) -> None:
    """As the README shows it: pretrain the default model, fine-tune it with LoRA on the built-in
    instruction set, write text with the adapter checkpoint, merge it."""
    done = run_viaduct("pretrain", "train.train_iters=4", "train.eval_iters=0", cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    done = run_viaduct(
        "finetune", "--recipe", "tiny_gpt_peft_config", "train.train_iters=4", cwd=tmp_path, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    adapters = tmp_path / "runs" / "tiny_gpt_peft" / "checkpoints"
    meta = json.loads((adapters / "iter_0000004" / "metadata.json").read_text())
    assert meta["contents"]["model"] == "adapters"
    done = run_viaduct(
        "generate",
        "--checkpoint",
        str(adapters),
        "--prompt",
        "The list type",
        "--max-new-tokens",
        "4",
        cwd=tmp_path,
    )
    assert done.returncode == 0 and "The list type" in done.stdout, done.stderr[-3000:]
    done = run_viaduct("peft", "merge", str(adapters), str(tmp_path / "merged"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
