"""`viaduct generate` and `load_checkpoint` on a checkpoint a real (shortened) `viaduct pretrain`
wrote, and the command's errors: one `error:` line, exit 2, no traceback."""

from __future__ import annotations

import os
import pickle
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from viaduct.cli.main import main
from viaduct.config import ConfigError
from viaduct.inference import generate, load_checkpoint
from viaduct.testing import run_viaduct


def _cli(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return run_viaduct(*args, cwd=cwd, timeout=timeout)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The directory of a `viaduct pretrain` of the embedded default, shortened to 2 steps."""
    cwd = tmp_path_factory.mktemp("run")
    proc = _cli("pretrain", "train.train_iters=2", "train.global_batch_size=8", "train.eval_iters=1", cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return cwd


@pytest.mark.slow
def test_generate_prints_the_trained_models_text(trained: Path) -> None:
    # The README's first run ends with this command, in the directory `viaduct pretrain` ran in.
    proc = _cli(
        "generate",
        "--checkpoint",
        "runs/tiny_gpt/checkpoints",
        "--prompt",
        "The list type",
        "--prompt",
        "import",
        "--max-new-tokens",
        "12",
        "--temperature",
        "0",
        cwd=trained,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    loaded = load_checkpoint(trained / "runs/tiny_gpt/checkpoints", device="cpu")
    expected = generate(loaded.model, loaded.tokenizer, ["The list type", "import"], max_new_tokens=12)
    assert all(expected)
    assert proc.stdout == f"The list type{expected[0]}\n\nimport{expected[1]}\n"


@pytest.mark.slow
def test_load_checkpoint_reads_the_saved_weights(trained: Path) -> None:
    root = trained / "runs/tiny_gpt/checkpoints"
    loaded = load_checkpoint(root / "iter_0000002", device="cpu")
    assert loaded.directory == root / "iter_0000002"
    assert load_checkpoint(root, device="cpu").directory == loaded.directory  # the tracker's latest
    assert not loaded.model.training
    assert loaded.tokenizer.vocab_size == loaded.config.model.vocab_size
    _assert_loads_saved_weights(root, trained)


def _assert_loads_saved_weights(root: Path, scratch: Path) -> None:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    loaded = load_checkpoint(root, device="cpu")
    # The reference: the same files converted by torch's own tool (trusted here: this test wrote them).
    ref_file = scratch / "ref.pt"
    dcp_to_torch_save(loaded.directory, ref_file)
    ref = torch.load(ref_file, weights_only=False)
    state = loaded.model.state_dict()
    assert state
    for name, param in state.items():
        torch.testing.assert_close(param, ref[f"model.{name}"], rtol=0, atol=0)
    assert generate(loaded.model, loaded.tokenizer, "import", max_new_tokens=4)[0]


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize(
    "layout",
    [
        ("model.pipeline_model_parallel_size=2", "train.micro_batch_size=4"),
        ("model.tensor_model_parallel_size=2",),
    ],
    ids=["pipeline2", "tensor2"],
)
def test_a_checkpoint_saved_by_two_processes_loads_in_one(layout: tuple[str, ...], tmp_path: Path) -> None:
    from viaduct.testing import torchrun_viaduct

    proc = torchrun_viaduct(
        2,
        "pretrain",
        "train.train_iters=2",
        "train.global_batch_size=8",
        "train.eval_iters=1",
        *layout,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    _assert_loads_saved_weights(tmp_path / "runs/tiny_gpt/checkpoints", tmp_path)


@pytest.mark.slow
def test_a_checkpoint_index_that_would_run_code_is_refused(trained: Path, tmp_path: Path) -> None:
    bad = tmp_path / "iter_0000002"
    shutil.copytree(trained / "runs/tiny_gpt/checkpoints/iter_0000002", bad)

    class Exploit:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (os.system, ("touch pwned",))

    (bad / ".metadata").write_bytes(pickle.dumps(Exploit()))
    proc = _cli("generate", "--checkpoint", str(bad), "--prompt", "x", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error:") and "Traceback" not in proc.stderr
    assert not (tmp_path / "pwned").exists()


def _run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = main(["generate", *args])
    out = capsys.readouterr()
    assert out.out == ""
    return code, out.err


def test_missing_checkpoint_is_one_error_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, err = _run(capsys, "--checkpoint", str(tmp_path / "nope"), "--prompt", "x")
    assert code == 2 and err.startswith("error:") and "no such directory" in err and "nope" in err
    code, err = _run(capsys, "--checkpoint", str(tmp_path), "--prompt", "x")  # a directory, no checkpoint
    assert code == 2 and "holds no checkpoint" in err
    with pytest.raises(ConfigError, match="no such directory"):
        load_checkpoint(tmp_path / "nope")


def test_bad_arguments_are_reported_together(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, err = _run(
        capsys,
        "--prompt",
        "x",
        "--top-p",
        "1.5",
        "--max-new-tokens",
        "-1",
        "--temperature",
        "-2",
        "--top-k",
        "-3",
    )
    assert code == 2 and err.startswith("error: invalid arguments")
    for flag in ("--checkpoint/--hf", "--top-p", "--max-new-tokens", "--temperature", "--top-k"):
        assert flag in err
    code, err = _run(capsys, "--checkpoint", str(tmp_path), "--hf", str(tmp_path), "--prompt", "x")
    assert code == 2 and "got both" in err
    code, err = _run(capsys, "--checkpoint", str(tmp_path), "--top-p", "0")
    assert code == 2 and "--prompt" in err and "--top-p" in err


def test_hf_directory_that_does_not_exist(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, err = _run(capsys, "--hf", str(tmp_path / "nope"), "--prompt", "x")
    assert code == 2 and err.startswith("error: cannot load the Hugging Face model") and "nope" in err


@pytest.mark.slow
def test_the_checkpoints_tokenizer_copy_stands_in_for_moved_files(tmp_path: Path) -> None:
    from viaduct.data import builtin

    own = tmp_path / "my_tokenizer"
    shutil.copytree(builtin.resolve_tokenizer("builtin:pydoc-bpe"), own)
    proc = _cli(
        "pretrain",
        "train.train_iters=1",
        "train.global_batch_size=8",
        "train.eval_iters=1",
        f"tokenizer.tokenizer_model={own}",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    root = tmp_path / "runs/tiny_gpt/checkpoints"
    before = load_checkpoint(root, device="cpu")
    shutil.rmtree(own)  # the run's tokenizer files are gone: the checkpoint keeps a copy
    after = load_checkpoint(root, device="cpu")
    assert str(root) in after.config.tokenizer.tokenizer_model
    text = "The list type"
    assert after.tokenizer.tokenize(text) == before.tokenizer.tokenize(text)
