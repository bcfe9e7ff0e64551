"""`viaduct checkpoint inspect` on real checkpoints of a tiny pretrain run: text, JSON, clear errors."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import pytest

from viaduct.cli.checkpoint import add_checkpoint_parser, run_checkpoint
from viaduct.config import ConfigError
from viaduct.testing import tiny_pretrain_config
from viaduct.training.checkpoint.inspect import inspect_checkpoint
from viaduct.training.pretrain import pretrain


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One checkpoint root per format, each from a 2-step run."""
    base = tmp_path_factory.mktemp("ckpts")
    roots = {}
    for fmt in ("torch_dist", "torch"):
        root = base / fmt
        pretrain(
            tiny_pretrain_config(
                "train.train_iters=2",
                "train.eval_iters=0",
                f"checkpoint.save={root}",
                f"checkpoint.ckpt_format={fmt}",
            )
        )
        roots[fmt] = root
    return roots


def _cli(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    add_checkpoint_parser(parser.add_subparsers(dest="command"))
    return run_checkpoint(parser.parse_args(["checkpoint", "inspect", *argv]))


def _copy(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest / "iter_0000002"


@pytest.mark.parametrize("fmt", ["torch_dist", "torch"])
def test_inspect_json_lists_model_tensors_with_shapes(saved, fmt, capsys) -> None:
    assert _cli(str(saved[fmt]), "--json") == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format"] == fmt and info["step"] == 2 and info["consumed_train_samples"] == 16
    assert info["floating_point_operations_so_far"] > 0
    shapes = {r["name"]: r["shape"] for r in info["tensors"]}
    # tiny config: 2 layers, hidden 64, ffn 128 (gated: fc1 is 2 x 128), 4 heads, byte vocab 259, tied
    assert shapes["model.embedding.word_embeddings.weight"] == [259, 64]
    assert shapes["model.decoder.layers.1.mlp.linear_fc1.weight"] == [256, 64]
    assert shapes["model.decoder.layers.0.self_attention.linear_qkv.weight"] == [192, 64]
    assert "model.output_layer.weight" not in shapes
    assert info["config"]["hidden_size"] == 64 and info["config"]["global_batch_size"] == 8
    assert info["parameters"] == sum(r["numel"] for r in info["tensors"] if r["name"].startswith("model."))
    assert info["totals_mb"]["all"] > info["totals_mb"]["model"] > 0


def test_inspect_text_shows_summary_and_table(saved, capsys) -> None:
    assert _cli(str(saved["torch_dist"] / "iter_0000002")) == 0
    out = capsys.readouterr().out
    assert "step 2, consumed samples 16" in out and "hidden 64" in out
    assert "model.embedding.word_embeddings.weight" in out and "259x64" in out
    assert "total:" in out and "MB" in out


def test_inspect_shows_the_checkpoint_version(saved, tmp_path, capsys) -> None:
    assert inspect_checkpoint(saved["torch"])["checkpoint_version"] == 2
    d = _copy(saved["torch"], tmp_path / "c")
    meta = json.loads((d / "metadata.json").read_text())
    del meta["checkpoint_version"]  # as before versions were recorded: version 1
    (d / "metadata.json").write_text(json.dumps(meta))
    assert _cli(str(d)) == 0
    out = capsys.readouterr().out
    assert "checkpoint version 1 (older row layout of the fused weights: converted when loaded)" in out
    assert _cli(str(saved["torch"])) == 0
    out = capsys.readouterr().out
    assert "checkpoint version 2\n" in out


def test_not_a_checkpoint(tmp_path, capsys) -> None:
    assert _cli(str(tmp_path)) == 2
    err = capsys.readouterr().err
    assert "not a checkpoint" in err and "Traceback" not in err
    assert _cli(str(tmp_path / "missing")) == 2


def test_truncated_distcp_shard(saved, tmp_path) -> None:
    d = _copy(saved["torch_dist"], tmp_path / "c")
    shard = next(d.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(ConfigError, match="truncated"):
        inspect_checkpoint(d)


def test_missing_dcp_index(saved, tmp_path) -> None:
    d = _copy(saved["torch_dist"], tmp_path / "c")
    (d / ".metadata").unlink()
    with pytest.raises(ConfigError, match=r"\.metadata is missing"):
        inspect_checkpoint(tmp_path / "c")


def test_garbage_train_state_and_truncated_torch_file(saved, tmp_path, capsys) -> None:
    d = _copy(saved["torch"], tmp_path / "c")
    (d / "train_state.pt").write_bytes(b"not a torch file")
    assert _cli(str(d)) == 2
    err = capsys.readouterr().err
    assert "train_state.pt is corrupt" in err and "Traceback" not in err
    d2 = _copy(saved["torch"], tmp_path / "c2")
    f = d2 / "model_optim.pt"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(ConfigError, match="model_optim.pt is corrupt or truncated"):
        inspect_checkpoint(d2)


def test_unsafe_run_config_is_reported_not_run(saved, tmp_path) -> None:
    d = _copy(saved["torch"], tmp_path / "c")
    (d / "run_config.yaml").write_text("_target_: os.system\n_args_: ['touch pwned']\n")
    info = inspect_checkpoint(d)
    assert "not allowed" in info["config"]["error"]
    assert not Path("pwned").exists()
