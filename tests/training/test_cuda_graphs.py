"""model.cuda_graph_impl=local: torch.compile's CUDA graphs of the compiled model, on one GPU.

Validation refuses what is not built (no compilation, float32 parameters, several processes,
Transformer Engine's graphs) and a CPU run refuses at setup; on a GPU a graphed run trains like the
same run without graphs.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from viaduct.config import ConfigError
from viaduct.testing import tiny_pretrain_config
from viaduct.training.callbacks import CallbackContext
from viaduct.training.pretrain import pretrain

BF16 = "mixed_precision=bf16_mixed"  # 16-bit parameters, float32 main gradients


def test_validation_refuses_what_graphs_cannot_run_yet() -> None:
    cfg = tiny_pretrain_config(BF16, "model.cuda_graph_impl=local", "train.torch_compile=false")
    with pytest.raises(ConfigError) as err:
        cfg.validate()
    assert "model.cuda_graph_impl" in str(err.value) and "train.torch_compile is false" in str(err.value)
    cfg = tiny_pretrain_config(BF16, "model.cuda_graph_impl=local")
    with pytest.raises(ConfigError) as err:
        cfg.validate(world_size=2)
    assert "one unsharded process" in str(err.value) and "dp 2" in str(err.value)
    cfg.validate(world_size=1)  # one process that compiles (unset: on the GPU): accepted
    # float32 parameters keep their gradients in .grad, in the graphs' memory across micro-batches
    cfg = tiny_pretrain_config("model.cuda_graph_impl=local")
    with pytest.raises(ConfigError, match="params_dtype is float32"):
        cfg.validate()
    cfg = tiny_pretrain_config("model.cuda_graph_impl=transformer_engine")
    with pytest.raises(ConfigError, match="transformer_engine CUDA graphs are not supported yet"):
        cfg.validate()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU refusal; a GPU runs the graphs")
def test_a_cpu_run_refuses_graphs_at_setup_naming_the_field() -> None:
    with pytest.raises(ConfigError) as err:
        pretrain(tiny_pretrain_config(BF16, "model.cuda_graph_impl=local", "train.train_iters=1"))
    text = str(err.value)
    assert "model.cuda_graph_impl" in text and "need a CUDA device" in text and "cuda_graph_impl=none" in text


def _losses(cfg: Any) -> list[float]:
    losses: list[float] = []

    def step_end(ctx: CallbackContext) -> None:
        losses.append(float(ctx.metrics["losses"]["lm loss"]))

    pretrain(cfg, callbacks=[{"on_train_step_end": step_end}])
    return losses


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("family", ["gpt", "t5"])
def test_a_graphed_run_trains_like_the_same_run_without_graphs(family: str) -> None:
    from torch._dynamo.utils import counters

    if family == "t5":
        from tests.training.test_t5_training import tiny_t5

        make = tiny_t5
    else:
        make = tiny_pretrain_config
    # Two micro-batches a step and an evaluation: graphs replayed across micro-batches, steps and
    # forward-only passes.
    common = (
        BF16,
        "train.train_iters=6",
        "train.eval_interval=3",
        "train.eval_iters=1",
        "logger.log_interval=1",
    )
    plain = _losses(make(*common))
    counters.clear()
    graphed = _losses(make(*common, "model.cuda_graph_impl=local"))
    assert not counters["inductor"]["cudagraph_skips"], dict(counters["inductor"])
    assert len(graphed) == 6
    # The same kernels, replayed: only the order of float additions may differ.
    torch.testing.assert_close(torch.tensor(graphed), torch.tensor(plain), rtol=1e-3, atol=1e-4)
