"""A CPU run keeps its freed host memory: its steps stop page-faulting fresh memory from the kernel."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from viaduct.testing import tiny_pretrain_config
from viaduct.training.callbacks import Callback, CallbackContext
from viaduct.training.host_memory import _glibc, keep_freed_host_memory
from viaduct.training.pretrain import pretrain

needs_glibc = pytest.mark.skipif(
    _glibc() is None, reason="needs glibc's malloc, not tuned by the environment"
)


@needs_glibc
def test_applies_on_glibc_unless_disabled_or_tuned_by_the_user(monkeypatch: pytest.MonkeyPatch) -> None:
    with keep_freed_host_memory() as active:
        assert active
    with keep_freed_host_memory(enabled=False) as active:
        assert not active
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=2")  # the user's own settings win
    with keep_freed_host_memory() as active:
        assert not active


def _faults_per_step() -> list[int]:
    """Minor page faults of each step of a run whose logits (and their gradient) take 64 MiB each."""
    faults: list[int] = []

    class Measure(Callback):
        def on_train_step_start(self, ctx: CallbackContext) -> None:
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt)

        def on_train_step_end(self, ctx: CallbackContext) -> None:
            faults[-1] = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults[-1]

    cfg = tiny_pretrain_config(
        "train.train_iters=4",
        "train.eval_iters=0",
        "train.global_batch_size=4",
        "tokenizer.tokenizer_type=NullTokenizer",
        "+tokenizer.vocab_size=16384",  # 4 × 256 tokens × 16384 × 4 bytes: 64 MiB of logits
        seq_length=256,
    )
    pretrain(cfg, callbacks=[Measure()])
    return faults


def _faults_in_a_fresh_process(extra_env: dict[str, str]) -> list[int]:
    """`_faults_per_step` in a new process, as `viaduct pretrain` runs: a long test session's heap is
    fragmented by everything that ran before, which is not what a training run starts from."""
    code = "import json, sys; sys.path.insert(0, sys.argv[1]); import test_host_memory as t; "
    code += "print(json.dumps(t._faults_per_step()))"
    proc = subprocess.run(
        [sys.executable, "-c", code, str(Path(__file__).parent)],
        env={**os.environ, **extra_env},
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@needs_glibc
def test_a_cpu_run_stops_page_faulting_after_its_first_steps() -> None:
    kept = _faults_in_a_fresh_process({})
    returned = _faults_in_a_fresh_process({"GLIBC_TUNABLES": "glibc.malloc.check=0"})  # opts out only
    pages = (64 << 20) // 4096
    assert min(returned[2:]) > pages, returned  # every step maps its large tensors afresh
    # Kept memory is reused; how much still faults depends on which thread allocates what, so the
    # check is on the total of the steady steps, which falls several-fold.
    assert sum(kept[2:]) < sum(returned[2:]) / 3, (kept, returned)
