"""End-to-end fine-tuning on CPU: `viaduct finetune` on the embedded instruction data, padded and packed."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest

from viaduct.testing import run_viaduct, tiny_pretrain_config, torchrun_viaduct

SEQ = 64


@pytest.fixture
def base(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """(tiny config YAML, checkpoint of a 4-step pretraining run); the built-in data cached in tmp."""
    from viaduct.training.pretrain import pretrain

    monkeypatch.setenv("VIADUCT_CACHE", str(tmp_path / "cache"))
    ckpt = tmp_path / "base"
    pretrain(tiny_pretrain_config("train.train_iters=4", f"checkpoint.save={ckpt}", seq_length=SEQ))
    yaml = tmp_path / "tiny.yaml"
    tiny_pretrain_config(seq_length=SEQ).to_yaml(yaml)
    return yaml, ckpt


def _finetune_args(yaml: Path, ckpt: Path, *extra: str) -> list[str]:
    return [
        "finetune",
        "--config-file",
        str(yaml),
        "dataset=finetuning",
        "dataset.dataset_root=builtin:pydoc-sft",
        "dataset.num_workers=0",
        f"checkpoint.pretrained_checkpoint={ckpt}",
        "train.train_iters=30",
        "train.eval_interval=15",
        "train.eval_iters=2",
        "logger.log_interval=5",
        "optimizer.lr=3e-3",
        *extra,
    ]


def _losses(out: str) -> list[float]:
    return [float(x) for x in re.findall(r"iteration\s+\d+/\s*\d+ .*?\| lm loss: ([0-9.E+-]+)", out)]


@pytest.mark.slow
def test_cli_finetune_on_the_embedded_instruction_data(base, tmp_path):
    yaml, ckpt = base
    proc = run_viaduct(*_finetune_args(yaml, ckpt), cwd=tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "loading checkpoint from" in out and "weights only" in out
    losses = _losses(out)
    assert len(losses) == 6 and all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0] - 0.5  # it learns the answers
    assert "run finished at iteration 30 of 30" in out


@pytest.mark.slow
def test_cli_finetune_with_packing_builds_then_reuses_the_pack_cache(base, tmp_path):
    yaml, ckpt = base
    args = _finetune_args(yaml, ckpt, "+dataset.packed_sequence_specs.packed_sequence_size=-1")
    proc = run_viaduct(*args, cwd=tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    losses = _losses(out)
    assert len(losses) == 6 and all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    packs = sorted(p.name for p in (tmp_path / "cache").rglob("packed/*/*"))
    assert packs == [f"{s}_{SEQ}.{e}" for s in ("test", "train", "validation") for e in ("json", "npy")]
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "cache").rglob("packed/*/*")}
    again = run_viaduct(*args, "train.train_iters=2", "train.eval_iters=0", cwd=tmp_path)
    assert again.returncode == 0, (again.stdout + again.stderr)[-3000:]
    assert "rebuilding" not in again.stderr
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # loaded, not written again


@pytest.mark.slow
@pytest.mark.distributed
def test_torchrun_finetune_with_packing_builds_the_cache_once(base, tmp_path):
    """Rank 0 packs and caches first; the other rank loads what it wrote (no warning, no race)."""
    yaml, ckpt = base
    args = _finetune_args(
        yaml, ckpt, "+dataset.packed_sequence_specs.packed_sequence_size=-1", "train.train_iters=4"
    )
    proc = torchrun_viaduct(2, *args, cwd=tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "rebuilding" not in out and "Traceback" not in out
    assert out.count("run finished at iteration 4 of 4") == 1


@pytest.mark.slow
def test_torch_compile_runs_micro_batches_of_changing_length(base, tmp_path):
    """torch.compile recompiles for the first new length and then treats the length as dynamic."""
    yaml, ckpt = base
    args = _finetune_args(
        yaml, ckpt, "train.torch_compile=true", "model.seq_length=256", "train.train_iters=5"
    )
    proc = run_viaduct(*args, "train.eval_iters=0", "logger.log_interval=1", cwd=tmp_path, timeout=400)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    losses = _losses(out)
    assert len(losses) == 5 and all(math.isfinite(x) for x in losses)
