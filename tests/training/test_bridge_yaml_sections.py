"""Megatron Bridge's newer YAML sections: `validation:` (moved onto `train`) and `env_vars`."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from viaduct.config import ConfigError, ConfigWarning, apply_overrides, process_config_with_overrides
from viaduct.recipes import tiny_gpt_pretrain_config
from viaduct.training.config import ConfigContainer
from viaduct.training.pretrain import apply_env_vars, pretrain


def _bridge_head_yaml(tmp_path: Path) -> Path:
    """The default recipe written as Bridge's newer versions write it: the evaluation settings in a
    `validation:` section, null copies left in `train`, and an `env_vars` mapping."""
    text = tiny_gpt_pretrain_config().to_yaml()
    text = re.sub(r"\n  eval_iters: \d+\n", "\n  eval_iters: null\n", text)
    text = re.sub(r"\n  eval_interval: \d+\n", "\n  eval_interval: null\n", text)
    text = text.replace("env_vars: {}\n", "env_vars:\n  CUDA_DEVICE_MAX_CONNECTIONS: 1\n  NCCL_DEBUG: WARN\n")
    section = (
        "validation:\n"
        "  _target_: megatron.bridge.training.config.ValidationConfig\n"
        "  eval_iters: 7\n"
        "  eval_interval: 20\n"
        "  start_eval_at_iter: null\n"
        "  eval_global_batch_size: null\n"
        "  eval_micro_batch_size: 4\n"
        "  skip_train: false\n"
        "  test_mode: false\n"
        "  full_validation: false\n"
        "  multiple_validation_sets: false\n"
        "  validation_set_names: null\n"
    )
    text = text.replace("\ntrain:\n", "\n" + section + "train:\n", 1)
    path = tmp_path / "bridge_head.yaml"
    path.write_text(text)
    return path


def test_validation_section_moves_onto_train(tmp_path: Path) -> None:
    path = _bridge_head_yaml(tmp_path)
    with pytest.warns(ConfigWarning, match="validation.full_validation") as caught:
        cfg = ConfigContainer.from_yaml(path)
    dropped = " ".join(str(w.message) for w in caught)
    for name in ("start_eval_at_iter", "test_mode", "multiple_validation_sets", "validation_set_names"):
        assert f"validation.{name}" in dropped
    t = cfg.train
    assert (t.eval_iters, t.eval_interval, t.eval_micro_batch_size, t.skip_train) == (7, 20, 4, False)
    assert t.eval_global_batch_size is None
    line = path.read_text().splitlines().index("  eval_iters: 7") + 1
    assert t.source_of("eval_iters") == f"file {path}:{line}"  # the section's line, not train's
    cfg.validate()
    # Written back under train, where Bridge reads them too: the round trip is exact.
    again = tmp_path / "again.yaml"
    cfg.to_yaml(again)
    assert "validation" not in yaml.safe_load(again.read_text())
    assert ConfigContainer.from_yaml(again) == cfg


def test_partial_file_and_override_use_the_section_names(tmp_path: Path) -> None:
    partial = tmp_path / "eval.yaml"
    partial.write_text("validation:\n  eval_iters: 3\n  eval_interval: 10\n")
    cfg = process_config_with_overrides(tiny_gpt_pretrain_config(), config_filepath=partial)
    assert (cfg.train.eval_iters, cfg.train.eval_interval) == (3, 10)
    assert cfg.train.source_of("eval_iters") == f"file {partial}:2"
    apply_overrides(cfg, ["validation.eval_interval=null", "validation.skip_train=true"])
    assert cfg.train.eval_interval is None and cfg.train.skip_train is True
    with pytest.raises(ConfigError, match="validation.full_validation: is left out of viaduct"):
        apply_overrides(cfg, ["validation.full_validation=true"])


def test_section_and_train_disagreeing_is_an_error(tmp_path: Path) -> None:
    both = tmp_path / "both.yaml"
    both.write_text("validation:\n  eval_iters: 3\ntrain:\n  eval_iters: 4\n")
    with pytest.raises(ConfigError) as info:
        process_config_with_overrides(tiny_gpt_pretrain_config(), config_filepath=both)
    (p,) = info.value.problems
    assert p.path == "train.eval_iters" and "conflicts with validation.eval_iters (3)" in p.message
    assert p.source == f"file {both}:4"
    same = tmp_path / "same.yaml"
    same.write_text("validation:\n  eval_iters: 3\ntrain:\n  eval_iters: 3\n")
    assert (
        process_config_with_overrides(tiny_gpt_pretrain_config(), config_filepath=same).train.eval_iters == 3
    )


def test_section_values_are_checked_with_their_lines(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("validation:\n  eval_iters: three\n  eval_itres: 1\n")
    with pytest.raises(ConfigError) as info:
        process_config_with_overrides(tiny_gpt_pretrain_config(), config_filepath=bad)
    found = {p.path: p for p in info.value.problems}
    assert found["validation.eval_iters"].source == f"file {bad}:2"
    assert "eval_iters" in (found["validation.eval_itres"].fix or "")


@pytest.mark.slow
def test_cli_reads_the_validation_section(tmp_path: Path) -> None:
    partial = tmp_path / "eval.yaml"
    partial.write_text("validation:\n  eval_iters: 3\n")
    r = subprocess.run(
        [sys.executable, "-m", "viaduct", "config", "show", "--config-file", str(partial)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert yaml.safe_load(r.stdout)["train"]["eval_iters"] == 3


# ------------------------------------------------------------------ env_vars


def test_env_vars_load_and_validate(tmp_path: Path) -> None:
    with pytest.warns(ConfigWarning, match="dropped 5 unknown key"):
        cfg = ConfigContainer.from_yaml(_bridge_head_yaml(tmp_path))
    assert cfg.env_vars == {"CUDA_DEVICE_MAX_CONNECTIONS": 1, "NCCL_DEBUG": "WARN"}
    cfg.validate()
    apply_overrides(cfg, ["++env_vars={'': 1, 'A=B': 2}"])
    with pytest.raises(ConfigError) as info:
        cfg.validate()
    assert [p.message for p in info.value.problems] == [
        "'' is not an environment variable name",
        "'A=B' is not an environment variable name",
    ]
    with pytest.raises(ConfigError, match="env_vars"):
        apply_overrides(tiny_gpt_pretrain_config(), ["env_vars={X: [1, 2]}"]).validate()


def test_apply_env_vars_keeps_what_is_already_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VIADUCT_TEST_NEW", raising=False)
    monkeypatch.setenv("VIADUCT_TEST_SET", "launcher")
    added = apply_env_vars({"VIADUCT_TEST_NEW": 8, "VIADUCT_TEST_SET": "config", "VIADUCT_TEST_FLAG": True})
    monkeypatch.delenv("VIADUCT_TEST_FLAG")  # registered with monkeypatch so the test leaves no trace
    assert added == {"VIADUCT_TEST_NEW": "8", "VIADUCT_TEST_FLAG": "True"}
    assert os.environ["VIADUCT_TEST_NEW"] == "8" and os.environ["VIADUCT_TEST_SET"] == "launcher"


@pytest.mark.slow
def test_pretrain_sets_env_vars_before_the_run(monkeypatch: pytest.MonkeyPatch) -> None:
    from viaduct.testing import tiny_pretrain_config

    monkeypatch.delenv("VIADUCT_TEST_RUN_VAR", raising=False)
    monkeypatch.setenv("VIADUCT_TEST_RUN_KEPT", "outer")
    seen: dict[str, str | None] = {}

    def on_train_start(*_args: object, **_kwargs: object) -> None:
        seen["run"] = os.environ.get("VIADUCT_TEST_RUN_VAR")
        seen["kept"] = os.environ.get("VIADUCT_TEST_RUN_KEPT")

    cfg = tiny_pretrain_config("train.train_iters=1", "train.eval_iters=0")
    cfg.env_vars = {"VIADUCT_TEST_RUN_VAR": "on", "VIADUCT_TEST_RUN_KEPT": "inner"}
    try:
        state = pretrain(cfg, callbacks=[{"on_train_start": on_train_start}])
    finally:
        os.environ.pop("VIADUCT_TEST_RUN_VAR", None)
    assert state.train_state.step == 1
    assert seen == {"run": "on", "kept": "outer"}
