"""`viaduct config` on interpolating and hostile input, in a real subprocess."""

import subprocess
import sys

import pytest
import yaml


def viaduct(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "viaduct", *args], capture_output=True, text=True, timeout=120
    )


@pytest.mark.slow
def test_interpolations_resolve_after_the_command_line(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  eval_iters: ${train.train_iters}\n")
    r = viaduct("config", "show", "--provenance", "--config-file", str(path), "train.train_iters=99")
    assert r.returncode == 0, r.stderr
    assert f"eval_iters: 99  # file {path}:2" in r.stdout
    r = viaduct("config", "show", "train.train_iters=12", "train.eval_iters=${train.train_iters}")
    assert r.returncode == 0, r.stderr
    assert yaml.safe_load(r.stdout)["train"]["eval_iters"] == 12
    r = viaduct("config", "validate", "train.eval_iters=${train.train_iter}")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "train.eval_iters: TrainingConfig at train has no field 'train_iter'" in r.stderr


@pytest.mark.slow
def test_unsafe_values_exit_2_naming_the_field():
    r = viaduct(
        "config",
        "validate",
        "model.activation_func=viaduct.cli.main.os.system",
        "optimizer.lr=.nan",
        "optimizer.clip_grad=.inf",
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "model.activation_func: 'viaduct.cli.main.os.system' is not a known function" in r.stderr
    assert "optimizer.lr: must be a finite number" in r.stderr
    assert "optimizer.clip_grad: must be a finite number" in r.stderr
