"""A CPU run keeps its freed host memory: its steps stop page-faulting fresh memory from the kernel."""

from __future__ import annotations

import resource

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


@pytest.mark.slow
@needs_glibc
def test_a_cpu_run_stops_page_faulting_after_its_first_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    kept = _faults_per_step()
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.check=0")  # opts out; changes nothing else
    returned = _faults_per_step()
    pages = (64 << 20) // 4096
    assert min(returned[2:]) > pages, returned  # every step maps its large tensors afresh
    assert max(kept[2:]) < min(returned[2:]) / 10, (kept, returned)
