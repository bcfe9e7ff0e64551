"""The `viaduct config` commands, run in a real subprocess (exit codes, stdout/stderr)."""

import json
import subprocess
import sys

import pytest
import yaml


def viaduct(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "viaduct", *args], capture_output=True, text=True, cwd=cwd, timeout=120
    )


def test_show_default_with_provenance():
    r = viaduct("config", "show", "--provenance")
    assert r.returncode == 0, r.stderr
    assert "num_layers: 4  # python viaduct/recipes/llama.py:" in r.stdout
    assert "train_iters: 200  # python viaduct/recipes/gpt.py:" in r.stdout


def test_show_applies_file_then_flags_then_overrides(tmp_path):
    over = tmp_path / "over.yaml"
    over.write_text("train:\n  train_iters: 40\noptimizer:\n  lr: 0.01\n")
    r = viaduct(
        "config",
        "show",
        "--config-file",
        str(over),
        "--optimizer.lr",
        "0.02",
        "train.train_iters=50",
        "--no-train.manual-gc",
    )
    assert r.returncode == 0, r.stderr
    data = yaml.safe_load(r.stdout)
    assert data["train"]["train_iters"] == 50 and data["optimizer"]["lr"] == 0.02
    assert data["train"]["manual_gc"] is False


@pytest.mark.slow
def test_full_yaml_file_round_trips_through_the_cli(tmp_path):
    out = tmp_path / "full.yaml"
    assert viaduct("config", "show", "--recipe", "llama32_1b", "--output", str(out)).returncode == 0
    r = viaduct("config", "diff", str(out), "llama32_1b")
    assert r.returncode == 0 and r.stdout.strip() == "no differences"
    r = viaduct("config", "validate", "--config-file", str(out), "--world-size", "8")
    assert r.returncode == 0, r.stderr
    assert "data-parallel 8" in r.stdout


def test_diff_lists_changed_fields(tmp_path):
    r = viaduct("config", "diff", "llama32_1b", "llama3_8b")
    assert r.returncode == 0
    assert "model.num_layers: 16 -> 32" in r.stdout


@pytest.mark.slow
def test_errors_exit_2_without_traceback(tmp_path):
    r = viaduct("config", "validate", "train.trian_iters=5", "train.global_batch_size=7")
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert (
        "train.trian_iters: no such field in TrainingConfig" in r.stderr
        and "did you mean train_iters" in r.stderr
    )
    r = viaduct("config", "validate", "train.global_batch_size=7")
    assert r.returncode == 2 and "train.global_batch_size" in r.stderr and "divisible" in r.stderr
    r = viaduct("config", "show", "--recipe", "nope")
    assert r.returncode == 2 and "no such recipe" in r.stderr
    r = viaduct("config", "show", "--config-file", str(tmp_path / "missing.yaml"))
    assert r.returncode == 2 and "config file not found" in r.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  train_iters: [1,\n")
    r = viaduct("config", "show", "--config-file", str(bad))
    assert r.returncode == 2 and f"{bad}:" in r.stderr and "YAML syntax error" in r.stderr
    r = viaduct("config", "show", "--train.train-iter", "5")
    assert r.returncode == 2 and "did you mean --train.train-iters" in r.stderr


@pytest.mark.slow
def test_schema_is_json_schema_for_the_container(tmp_path):
    r = viaduct("config", "schema")
    assert r.returncode == 0
    schema = json.loads(r.stdout)
    assert schema["title"] == "ConfigContainer"
    container = schema["$defs"]["ConfigContainer"]
    assert set(container["required"]) >= {"model", "train", "optimizer"}
    train_iters = schema["$defs"]["TrainingConfig"]["properties"]["train_iters"]
    assert train_iters["description"] and {"type": "integer"} in train_iters["anyOf"]


@pytest.mark.parametrize("args", [["config", "show", "--help-config"]])
def test_help_config_lists_generated_flags(args):
    r = viaduct(*args)
    assert r.returncode == 0
    assert "--train.train-iters" in r.stdout and "--no-train.manual-gc" in r.stdout
    assert "--model.normalization {LayerNorm,RMSNorm}" in r.stdout


def test_recipes_listed():
    r = viaduct("config", "recipes")
    assert r.returncode == 0 and "llama32_1b_pretrain_config" in r.stdout and "default" in r.stdout


def test_config_layer_does_not_import_torch():
    code = (
        "import sys; from viaduct.recipes import get_recipe;"
        "from viaduct.training.config import ConfigContainer;"
        "c = get_recipe('llama3_8b')(); c.validate(); ConfigContainer.from_dict(c.to_dict());"
        "print('torch' in sys.modules)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False"
