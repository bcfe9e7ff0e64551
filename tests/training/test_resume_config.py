"""check_resume_config: a checkpoint's run_config.yaml against the config that resumes from it."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from viaduct.config import ConfigError
from viaduct.testing import tiny_pretrain_config
from viaduct.training.checkpoint.config_check import check_resume_config
from viaduct.training.pretrain import pretrain

COMMON = ("train.train_iters=2", "train.eval_iters=0")


@pytest.fixture(scope="module")
def run_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ck")
    pretrain(tiny_pretrain_config(*COMMON, f"checkpoint.save={root}"))
    return root / "iter_0000002" / "run_config.yaml"


def _current(run_config: Path, *overrides: str):
    root = run_config.parent.parent
    cfg = tiny_pretrain_config(*COMMON, f"checkpoint.save={root}", f"checkpoint.load={root}", *overrides)
    cfg = cfg.validate(world_size=1)
    if cfg.model.vocab_size is None:  # pretrain() fills it from the tokenizer before loading
        cfg.model.vocab_size = 259
    return cfg


def test_same_config_has_no_changes(run_config) -> None:
    assert check_resume_config(run_config, _current(run_config)) == []


def test_lr_and_iterations_are_accepted_and_reported(run_config, caplog) -> None:
    with caplog.at_level(logging.INFO, logger="viaduct"):
        lines = check_resume_config(
            run_config, _current(run_config, "optimizer.lr=3e-4", "train.train_iters=5")
        )
    assert any(line.startswith("optimizer.lr: 0.001 -> 0.0003") for line in lines)
    assert any(line.startswith("train.train_iters: 2 -> 5") for line in lines)
    assert "optimizer.lr" in caplog.text


def test_hidden_size_change_is_refused_naming_the_field(run_config) -> None:
    with pytest.raises(ConfigError) as exc:
        check_resume_config(run_config, _current(run_config, "model.hidden_size=32", "optimizer.lr=3e-4"))
    paths = {p.path for p in exc.value.problems}
    assert "model.hidden_size" in paths and "optimizer.lr" not in paths
    assert "model.hidden_size" in str(exc.value)
    # The way out when the new shape is meant: a new run elsewhere (the recipes resume their directory).
    assert "to start a new run instead, point checkpoint.save, checkpoint.load" in str(exc.value)


def test_tokenizer_and_vocab_changes_are_refused(run_config) -> None:
    cur = _current(run_config)
    cur.model.vocab_size = 300
    with pytest.raises(ConfigError, match="model.vocab_size"):
        check_resume_config(run_config, cur)


def test_disallowed_target_is_refused_before_running(run_config, tmp_path) -> None:
    bad = tmp_path / "run_config.yaml"
    marker = tmp_path / "pwned"
    bad.write_text(f"_target_: os.system\n_args_: ['touch {marker}']\n")
    with pytest.raises(ConfigError, match="not allowed"):
        check_resume_config(bad, _current(run_config))
    nested = run_config.read_text().replace(
        "_target_: viaduct.training.config.tokenizer.TokenizerConfig", "_target_: subprocess.call", 1
    )
    bad.write_text(nested)
    with pytest.raises(ConfigError, match="subprocess.call"):
        check_resume_config(bad, _current(run_config))
    assert not marker.exists()


def test_missing_run_config_is_a_clear_error(tmp_path, run_config) -> None:
    with pytest.raises(ConfigError, match="no run_config.yaml"):
        check_resume_config(tmp_path / "run_config.yaml", _current(run_config))
