"""Pipeline-parallel layouts train the same model as one process does: same losses, same final weights.

Each layout runs `pretrain()` on real gloo processes, with the same global batch as the one-process
reference (float32, no dropout), its stages built and run by PyTorch's pipeline schedules. The loss
curve comes from the last stage; the final weights are gathered from every stage's shards.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from tests.distributed.test_parallel_layouts import STEPS, _full
from tests.distributed.test_parallel_layouts import _config as layout_config

from viaduct.testing import run_distributed
from viaduct.training.callbacks import CallbackContext
from viaduct.training.config import ConfigContainer
from viaduct.training.pretrain import pretrain

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

PP2 = ("model.pipeline_model_parallel_size=2",)
LAYOUTS: dict[str, tuple[int, tuple[str, ...]]] = {
    # name: (world size, overrides)
    "pp2-1f1b": (2, PP2),
    "pp2-gpipe": (2, (*PP2, "model.pipeline_schedule=gpipe")),
    "pp2-untied": (2, (*PP2, "model.share_embeddings_and_output_weights=false")),
    "pp2-vpp2-interleaved": (2, (*PP2, "model.virtual_pipeline_model_parallel_size=2")),
    "pp2-vpp2-zero-bubble": (
        2,
        (
            *PP2,
            "model.virtual_pipeline_model_parallel_size=2",
            "model.pipeline_schedule=interleaved_zero_bubble",
        ),
    ),
    "pp2-uneven": (
        2,
        (*PP2, "model.num_layers_in_first_pipeline_stage=1", "model.num_layers_in_last_pipeline_stage=3"),
    ),
    "pp2-per-token": (2, (*PP2, "model.calculate_per_token_loss=true")),
    # Megatron's layout language: 4 slices on 2 ranks (2 virtual stages), the last one without layers.
    "pp2-layout-string": (2, (*PP2, "model.pipeline_model_parallel_layout='Et|tt|t|L'")),
    # The replicas of each stage compared every step.
    "pp2-dp2-replicated": (4, (*PP2, "train.check_weight_hash_across_dp_replicas_interval=1")),
    "pp2-dp2": (4, (*PP2, "ddp.use_distributed_optimizer=true")),
    "pp2-tp2-sp": (4, (*PP2, "model.tensor_model_parallel_size=2", "model.sequence_parallel=true")),
    "pp2-cp2": (4, (*PP2, "model.context_parallel_size=2")),
    "pp2-recompute-compiled": (
        2,
        (
            *PP2,
            "model.recompute_granularity=full",
            "model.recompute_method=uniform",
            "model.recompute_num_layers=1",
            "train.torch_compile=true",
        ),
    ),
}
# Overrides that change the model or its loss: the one-process reference run takes them too.
_MODEL_SETTINGS = ("model.share_embeddings_and_output_weights", "model.calculate_per_token_loss")


def _config(overrides: tuple[str, ...]) -> ConfigContainer:
    return layout_config(("model.num_layers=4", *overrides))  # 4 layers: enough for 4 stages


def _train(rank: int, world: int, overrides: tuple[str, ...], forward_step: Any = None) -> dict[str, Any]:
    cfg = _config(overrides)
    out: dict[str, Any] = {"losses": []}

    def step_end(ctx: CallbackContext) -> None:
        if ctx.metrics["losses"]:  # the last stage's ranks have them
            out["losses"].append({k: float(v) for k, v in ctx.metrics["losses"].items()})

    def train_end(ctx: CallbackContext) -> None:
        assert ctx.model is not None
        out["weights"] = {k: _full(v) for k, v in ctx.model.state_dict().items()}

    state = pretrain(
        cfg, forward_step, callbacks=[{"on_train_step_end": step_end, "on_train_end": train_end}]
    )
    out["validation"] = state.final_validation
    return out


def _merged(results: list[dict[str, Any]]) -> dict[str, Any]:
    """The losses of the last rank and the weights of every stage, as one process would report."""
    weights: dict[str, torch.Tensor] = {}
    for r in results:
        for k, v in r["weights"].items():
            if k in weights:  # a tied table held by the first and the last stage: the same values
                torch.testing.assert_close(weights[k], v, rtol=0, atol=0, msg=k)
            weights[k] = v
    return {"losses": results[-1]["losses"], "weights": weights, "validation": results[-1]["validation"]}


_reference: dict[tuple[str, ...], dict[str, Any]] = {}


def _one_process(overrides: tuple[str, ...]) -> dict[str, Any]:
    key = tuple(o for o in overrides if o.split("=")[0] in _MODEL_SETTINGS)
    if key not in _reference:
        _reference[key] = _train(0, 1, key)
    return _reference[key]


def _assert_same_run(got: dict[str, Any], ref: dict[str, Any], rtol: float = 1e-5) -> None:
    assert len(got["losses"]) == len(ref["losses"])
    for a, b in zip(got["losses"], ref["losses"]):
        assert a.keys() == b.keys()
        for name in a:
            torch.testing.assert_close(torch.tensor(a[name]), torch.tensor(b[name]), rtol=rtol, atol=1e-6)
    assert got["weights"].keys() == ref["weights"].keys()
    for key, value in ref["weights"].items():
        torch.testing.assert_close(got["weights"][key], value, rtol=1e-4, atol=1e-5, msg=key)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_pipeline_layout_matches_one_process(name: str) -> None:
    world, overrides = LAYOUTS[name]
    ref = _one_process(overrides)
    got = _merged(run_distributed(_train, world, overrides, timeout=300, all_ranks=True, reuse=True))
    assert len(got["losses"]) == STEPS
    _assert_same_run(got, ref)


def _custom_forward_step(state: Any, data_iterator: Any, model: torch.nn.Module) -> tuple[Any, Any]:
    """A user's forward step: its own loss (the mean over all tokens, no mask) and its own report."""
    batch = next(data_iterator)
    output = model(batch["tokens"], batch.get("position_ids"), None, labels=batch["labels"])

    def loss_func(per_token: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss = per_token.float().mean()
        return loss, {"mean token loss": loss.detach()}

    return output, loss_func


def test_a_custom_forward_step_and_evaluation_run_under_pipeline_parallelism() -> None:
    # Evaluation during training (iteration 3) and after it: the final validation pass.
    overrides = (*PP2, "train.eval_iters=2", "train.eval_interval=3")
    ref = _train(0, 1, ("train.eval_iters=2", "train.eval_interval=3"), _custom_forward_step)
    got = _merged(
        run_distributed(_train, 2, overrides, _custom_forward_step, timeout=300, all_ranks=True, reuse=True)
    )
    assert [set(x) for x in got["losses"]] == [{"mean token loss"}] * STEPS
    _assert_same_run(got, ref)
    assert got["validation"].keys() == {"mean token loss"}
    torch.testing.assert_close(
        torch.tensor(got["validation"]["mean token loss"]),
        torch.tensor(ref["validation"]["mean token loss"]),
        rtol=1e-5,
        atol=1e-6,
    )


def _resume(
    rank: int, world: int, overrides: tuple[str, ...], save: str, iters: int, stop: int
) -> dict[str, Any]:
    """A run of `iters` iterations (its learning-rate schedule) that stops after iteration `stop`,
    resuming from and saving into `save`."""
    return _train(
        rank,
        world,
        (
            *overrides,
            f"checkpoint.save={save}",
            f"checkpoint.load={save}",
            f"train.train_iters={iters}",
            f"train.exit_interval={stop}",
        ),
    )


def test_checkpoints_reshard_across_pipeline_sizes(tmp_path: Path) -> None:
    """PP 2 saves, PP 1 resumes and saves, PP 4 resumes: the same run as one process throughout."""
    ref = _train(0, 1, ("train.train_iters=6",))
    save = str(tmp_path / "ckpt")
    first = _merged(run_distributed(_resume, 2, PP2, save, 6, 2, timeout=300, all_ranks=True, reuse=True))
    second = _resume(0, 1, (), save, 6, 4)
    pp4 = ("model.pipeline_model_parallel_size=4",)
    third = _merged(run_distributed(_resume, 4, pp4, save, 6, 6, timeout=300, all_ranks=True, reuse=True))
    losses = first["losses"] + second["losses"] + third["losses"]
    _assert_same_run({"losses": losses, "weights": third["weights"]}, ref)


def test_resume_on_the_same_pipeline_layout_is_bitwise(tmp_path: Path) -> None:
    overrides = (*PP2, "model.virtual_pipeline_model_parallel_size=2")

    def run(save: str, stop: int) -> dict[str, Any]:
        return _merged(
            run_distributed(_resume, 2, overrides, save, 4, stop, timeout=300, all_ranks=True, reuse=True)
        )

    straight = run(str(tmp_path / "a"), 4)
    save = str(tmp_path / "b")
    half, rest = run(save, 2), run(save, 4)
    assert half["losses"] + rest["losses"] == straight["losses"]
    for key, value in straight["weights"].items():
        assert torch.equal(rest["weights"][key], value), key


def _logged(rank: int, world: int, overrides: tuple[str, ...], tb: str) -> None:
    cfg = _config(
        (
            *overrides,
            f"logger.tensorboard_dir={tb}",
            "logger.log_interval=3",
            "logger.log_params_norm=true",
            "logger.log_l2_norm_grad_to_tensorboard=true",
        )
    )
    pretrain(cfg)


def _scalars(tb: Path) -> dict[str, list[float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(tb))
    ea.Reload()
    return {tag: [e.value for e in ea.Scalars(tag)] for tag in ea.Tags()["scalars"]}


def test_logged_metrics_cover_every_stage(tmp_path: Path) -> None:
    """The last rank logs the whole model's figures: norms over every stage (the tied table once),
    the per-layer gradient norms of every stage's layers, the loss of every step."""
    _logged(0, 1, (), str(tmp_path / "one"))
    run_distributed(_logged, 2, PP2, str(tmp_path / "pp"), timeout=300, reuse=True)
    ref, got = _scalars(tmp_path / "one"), _scalars(tmp_path / "pp")
    assert len(got["lm loss"]) == STEPS
    layers = {t for t in ref if t.startswith("grad-norm/decoder.layers.")}
    assert len(layers) == 4 and layers <= set(got)
    for tag in ("lm loss", "grad-norm", "params-norm", *sorted(layers)):
        torch.testing.assert_close(
            torch.tensor(got[tag]), torch.tensor(ref[tag]), rtol=1e-5, atol=1e-6, msg=tag
        )
