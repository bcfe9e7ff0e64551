"""`pretrain()` end to end on the CPU: loss falls, accumulation, data parallel, exits, logging, contract."""

from __future__ import annotations

import math

import pytest
import torch

from viaduct.config import ConfigError
from viaduct.testing import run_distributed, tiny_pretrain_config
from viaduct.training.callbacks import Callback, CallbackContext
from viaduct.training.gpt_step import forward_step as gpt_forward_step
from viaduct.training.pretrain import finetune, pretrain
from viaduct.training.state import GlobalState


class Recorder(Callback):
    """Keeps the step losses and the final weights (through the public callback API)."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.weights: dict[str, torch.Tensor] = {}
        self.events: list[str] = []
        self.eval_losses: list[dict] = []

    def on_train_start(self, ctx: CallbackContext) -> None:
        self.events.append("train_start")

    def on_train_step_end(self, ctx: CallbackContext) -> None:
        losses = ctx.metrics["losses"]  # empty for a skipped iteration
        if losses:
            self.losses.append(float(losses["lm loss"]))  # a host sync, fine in a test

    def on_eval_end(self, ctx: CallbackContext) -> None:
        self.eval_losses.append(ctx.metrics["losses"])

    def on_test_end(self, ctx: CallbackContext) -> None:
        self.events.append("test_end")

    def on_train_end(self, ctx: CallbackContext) -> None:
        self.events.append("train_end")
        model = ctx.model.module if hasattr(ctx.model, "module") else ctx.model
        self.weights = {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.slow
def test_loss_falls_on_cpu():
    rec = Recorder()
    state = pretrain(tiny_pretrain_config("train.train_iters=40", "optimizer.lr=3e-3"), callbacks=[rec])
    assert state.train_state.step == 40 and state.train_state.consumed_train_samples == 320
    assert len(rec.losses) == 40
    first, last = sum(rec.losses[:5]) / 5, sum(rec.losses[-5:]) / 5
    assert last < first - 1.0, (first, last)  # the count-up pattern of the mock data is learnable
    assert rec.events == ["train_start", "train_end", "test_end"]
    assert rec.eval_losses and math.isfinite(rec.eval_losses[-1]["lm loss"])
    assert state.train_state.floating_point_operations_so_far > 0


# SGD for the equality tests: Adam divides by sqrt(v) + eps, which turns float32 summation-order
# noise on near-zero gradients into visible weight differences and hides what is being tested.
SGD = ("optimizer.optimizer=sgd", "optimizer.lr=0.1")


@pytest.mark.slow
def test_accumulation_over_micro_batches_equals_one_large_batch():
    weights = []
    for mbs in (8, 2):
        rec = Recorder()
        cfg = tiny_pretrain_config("train.train_iters=3", f"train.micro_batch_size={mbs}", *SGD)
        pretrain(cfg, callbacks=[rec])
        weights.append(rec.weights)
    for name, w in weights[0].items():
        torch.testing.assert_close(weights[1][name], w, rtol=1e-5, atol=1e-6, msg=name)


def _dp_worker(rank: int, world_size: int) -> dict[str, torch.Tensor]:
    rec = Recorder()
    pretrain(tiny_pretrain_config("train.train_iters=3", "train.micro_batch_size=2", *SGD), callbacks=[rec])
    return rec.weights


@pytest.mark.slow
@pytest.mark.distributed
def test_data_parallel_matches_one_process():
    rec = Recorder()
    pretrain(tiny_pretrain_config("train.train_iters=3", "train.micro_batch_size=2", *SGD), callbacks=[rec])
    dp = run_distributed(_dp_worker, 2, timeout=120, reuse=True)
    for name, w in rec.weights.items():
        torch.testing.assert_close(dp[name], w, rtol=1e-5, atol=1e-6, msg=name)


class MasterRecorder(Callback):
    """How far training moved the optimizer's float32 master weights."""

    def on_train_start(self, ctx: CallbackContext) -> None:
        self.start = {s.name: s.master.detach().clone() for s in ctx.optimizer.slots}

    def on_train_end(self, ctx: CallbackContext) -> None:
        self.masters = {s.name: s.master.detach() - self.start[s.name] for s in ctx.optimizer.slots}


BF16_DP = (
    *SGD,
    "mixed_precision=bf16_mixed",
    "train.train_iters=2",
    "train.micro_batch_size=1",
    "optimizer.clip_grad=0",
)


def _dp_bf16_worker(rank: int, world_size: int) -> dict[str, torch.Tensor]:
    rec = MasterRecorder()
    pretrain(tiny_pretrain_config(*BF16_DP), callbacks=[rec])
    return rec.masters


@pytest.mark.slow
@pytest.mark.distributed
def test_data_parallel_bf16_accumulates_and_reduces_in_fp32():
    """bf16 weights, fp32 main grads: 4 micro-batches per rank under DDP equal 8 in one process.

    Each micro-batch's bf16 gradients are the same in both runs; only the order of the float32
    additions differs, so the updates of the float32 master weights agree to float32 rounding.
    """
    rec = MasterRecorder()
    pretrain(tiny_pretrain_config(*BF16_DP), callbacks=[rec])
    dp = run_distributed(_dp_bf16_worker, 2, timeout=120, reuse=True)
    for name, delta in rec.masters.items():
        assert delta.abs().max() > 0, name
        torch.testing.assert_close(dp[name], delta, rtol=1e-5, atol=1e-9, msg=name)


@pytest.mark.slow
def test_forward_step_contract_variants():
    """Both signatures and both loss-function return forms train."""
    seen = {}

    def plain(data_iterator, model):
        seen["plain"] = True
        batch = next(data_iterator)
        out = model(batch["tokens"], batch["position_ids"], labels=batch["labels"])

        def loss_func(o):  # legacy form: (mean loss, {name: value})
            loss = (o * batch["loss_mask"]).sum() / batch["loss_mask"].sum()
            return loss, {"lm loss": loss.detach()}

        return out, loss_func

    def with_state(state: GlobalState, data_iterator, model):
        seen.setdefault("steps", []).append(state.train_state.step)
        return gpt_forward_step(state, data_iterator, model)

    rec = Recorder()
    pretrain(tiny_pretrain_config("train.train_iters=2"), plain, callbacks=[rec])
    assert seen["plain"] and len(rec.losses) == 2
    pretrain(tiny_pretrain_config("train.train_iters=2"), with_state)
    # The state is live: micro-batches of the first step see 0, of the second 1, evaluation 2.
    assert seen["steps"][:4] == [0, 0, 1, 1] and seen["steps"][-1] == 2


def test_bad_loss_func_return_is_a_clear_error():
    def bad(data_iterator, model):
        batch = next(data_iterator)
        return model(batch["tokens"], labels=batch["labels"]), lambda o: o.sum()

    with pytest.raises(TypeError, match="loss_func must return"):
        pretrain(tiny_pretrain_config("train.train_iters=1"), bad)


def test_unsupported_settings_fail_before_anything_runs(tmp_path):
    cfg = tiny_pretrain_config(
        "model.tensor_model_parallel_size=2", f"logger.save_config_filepath={tmp_path}/cfg.yaml"
    )
    with pytest.raises(ConfigError) as err:
        pretrain(cfg)
    assert "model.tensor_model_parallel_size" in str(err.value)
    assert not (tmp_path / "cfg.yaml").exists()


def test_invalid_config_reports_every_problem_before_setup(tmp_path):
    cfg = tiny_pretrain_config(f"logger.save_config_filepath={tmp_path}/cfg.yaml")
    cfg.train.micro_batch_size = 3  # 8 is not divisible by 3
    cfg.optimizer.lr = -1.0
    with pytest.raises(ConfigError) as err:
        pretrain(cfg)
    text = str(err.value)
    assert "train.global_batch_size" in text and "optimizer.lr" in text
    assert not (tmp_path / "cfg.yaml").exists()


@pytest.mark.slow
def test_save_config_filepath_writes_the_resolved_yaml(tmp_path):
    from viaduct.training.config import ConfigContainer

    path = tmp_path / "run.yaml"
    pretrain(tiny_pretrain_config("train.train_iters=1", f"logger.save_config_filepath={path}"))
    loaded = ConfigContainer.from_yaml(path)
    assert loaded.train.train_iters == 1 and loaded.model.num_layers == 2


@pytest.mark.slow
def test_exit_interval_stops_early_and_skips_final_evaluation():
    rec = Recorder()
    state = pretrain(tiny_pretrain_config("train.train_iters=10", "train.exit_interval=3"), callbacks=[rec])
    assert state.train_state.step == 3
    assert state.exit_reason is not None and "exit_interval" in state.exit_reason
    assert "test_end" not in rec.events
    assert state.final_validation is None and state.final_test is None
    assert state.user_state == {}  # the framework keeps its own state out of the user's dict


@pytest.mark.slow
def test_iterations_to_skip_consume_data_without_updates():
    rec = Recorder()
    state = pretrain(
        tiny_pretrain_config("train.train_iters=4", "train.iterations_to_skip=[2, 3]"), callbacks=[rec]
    )
    ts = state.train_state
    assert ts.step == 4 and ts.consumed_train_samples == 32 and ts.skipped_train_samples == 16
    assert len(rec.losses) == 2  # only steps 1 and 4 ran forward


@pytest.mark.slow
def test_rampup_batch_size_grows_the_batch():
    state = pretrain(
        tiny_pretrain_config(
            "train.train_iters=6", "train.rampup_batch_size=[4, 4, 16]", "train.micro_batch_size=4"
        )
    )
    # One increment over 16 samples: batches of 4 until 16 samples are consumed, then 8: 4·4 + 2·8.
    assert state.train_state.consumed_train_samples == 32


def test_finetune_needs_a_checkpoint(tmp_path):
    with pytest.raises(ConfigError, match="pretrained_checkpoint"):
        finetune(tiny_pretrain_config())
    empty = tmp_path / "none_yet"  # load == save may be missing for pretrain, not for finetune
    with pytest.raises(ConfigError, match="checkpoint.load: finetune"):
        finetune(tiny_pretrain_config(f"checkpoint.load={empty}", f"checkpoint.save={empty}"))


@pytest.mark.slow
def test_per_token_loss_trains():
    rec = Recorder()
    pretrain(
        tiny_pretrain_config("train.train_iters=3", "model.calculate_per_token_loss=true"), callbacks=[rec]
    )
    assert len(rec.losses) == 3 and all(math.isfinite(v) for v in rec.losses)


def _nan_on_rank_1(rank: int, world_size: int) -> None:
    def forward_step(state: GlobalState, data_iterator, model):
        output, loss_func = gpt_forward_step(state, data_iterator, model)
        if rank == 1:
            output = output * float("nan")
        return output, loss_func

    pretrain(tiny_pretrain_config("ddp.check_for_nan_in_grad=true"), forward_step)


@pytest.mark.slow
@pytest.mark.distributed
def test_nan_gradients_are_caught_before_the_all_reduce_and_name_the_rank():
    with pytest.raises(RuntimeError, match=r"rank 1: NaN or infinite gradients"):
        run_distributed(_nan_on_rank_1, 2, timeout=120)


def _weight_hash_worker(rank: int, world_size: int) -> int:
    state = pretrain(
        tiny_pretrain_config("train.train_iters=2", "train.check_weight_hash_across_dp_replicas_interval=1")
    )
    return state.train_state.step


def _hash_detects(rank: int, world_size: int) -> tuple[bool, bool]:
    import torch.distributed as dist

    from viaduct.training.step_checks import weights_match_across_ranks

    dist.init_process_group("gloo")
    try:
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 4)
        same = weights_match_across_ranks(model)
        if rank == 1:
            with torch.no_grad():
                model.weight[0, 0] += 1e-6  # one replica drifts by one small step
        return same, weights_match_across_ranks(model)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.distributed
def test_weight_hash_check_tells_equal_from_drifted_replicas():
    assert run_distributed(_hash_detects, 2, timeout=60) == (True, False)


@pytest.mark.slow
@pytest.mark.distributed
def test_weight_hash_check_passes_for_healthy_replicas():
    assert run_distributed(_weight_hash_worker, 2, timeout=120, reuse=True) == 2


@pytest.mark.slow
def test_nan_loss_stops_the_run_with_the_iteration():
    from viaduct.training.step_checks import NonFiniteLossError

    def forward_step(state: GlobalState, data_iterator, model):
        output, loss_func = gpt_forward_step(state, data_iterator, model)
        return (output * float("nan") if state.train_state.step == 2 else output), loss_func

    with pytest.raises(NonFiniteLossError, match="iteration 3"):
        pretrain(tiny_pretrain_config("logger.log_interval=2"), forward_step)


@pytest.mark.slow
def test_exit_duration_in_mins_exits_after_the_step():
    class OldJob(Callback):
        def on_train_start(self, ctx: CallbackContext) -> None:
            ctx.state.start_time -= 3600  # as if the job had run for an hour

    state = pretrain(tiny_pretrain_config("train.exit_duration_in_mins=30"), callbacks=[OldJob()])
    assert state.train_state.step == 1
    assert state.exit_reason is not None and "exit_duration_in_mins" in state.exit_reason


@pytest.mark.slow
def test_skip_train_only_evaluates():
    rec = Recorder()
    state = pretrain(tiny_pretrain_config("train.skip_train=true"), callbacks=[rec])
    assert state.train_state.step == 0 and not rec.losses
    assert state.final_validation is not None and "lm loss" in state.final_validation
    assert state.final_test is not None and "lm loss" in state.final_test
    assert state.exit_reason is None and state.user_state == {}


def test_large_gradient_warning(caplog):
    from viaduct.training.step_checks import check_large_grads

    recent: list[float] = []
    with caplog.at_level("WARNING", logger="viaduct"):
        for step, norm in enumerate([1.0] * 10 + [50.0], start=1):
            check_large_grads(step, norm, recent)
    assert "unexpectedly large gradients at iteration 11" in caplog.text


def test_step_metrics_are_read_back_by_name():
    from viaduct.training.train import _DeviceMetrics, _Pending, _to_records

    scale = torch.tensor(1024.0)
    first = _DeviceMetrics.stack(
        # a loss may share its name with a step metric: each is read back where it belongs
        {"lm loss": torch.tensor(2.5), "grad_norm": torch.tensor(0.25)},
        grad_norm=torch.tensor(3.0),
        loss_scale=scale,
        layer_grad_norms=(["embedding", "decoder.layers.0"], torch.tensor([0.5, 1.5])),
    )
    scale.fill_(2048.0)  # later steps change the loss scale in place: the step keeps its own value
    third = _DeviceMetrics.stack({"lm loss": torch.tensor(float("nan"))}, params_norm=torch.tensor(7.0))
    assert _DeviceMetrics.stack({}) is None
    records, layers = _to_records(
        [
            _Pending(1, 8, 1e-3, None, 8, False, first),
            _Pending(2, 16, 1e-3, None, 8, True),  # consumed by iterations_to_skip: nothing on the device
            _Pending(3, 24, 1e-3, 2e-3, 8, False, third),
        ]
    )
    assert records[0].losses == {"grad_norm": 0.25, "lm loss": 2.5}
    assert (records[0].grad_norm, records[0].num_zeros, records[0].params_norm) == (3.0, None, None)
    assert records[0].loss_scale == 1024.0 and not records[0].nan
    assert records[1].losses == {} and records[1].skipped and records[1].grad_norm is None
    assert math.isnan(records[2].losses["lm loss"]) and records[2].nan
    assert records[2].params_norm == 7.0 and records[2].loss_scale is None
    assert layers == {1: {"grad-norm/embedding": 0.5, "grad-norm/decoder.layers.0": 1.5}}


def test_comm_overlap_choices_land_on_ddp():
    from viaduct.training.comm_overlap import CommOverlapConfig

    cfg = tiny_pretrain_config()
    cfg.comm_overlap = CommOverlapConfig(overlap_grad_reduce=True, bucket_size=12345)
    cfg.validate()
    assert cfg.ddp.overlap_grad_reduce is True and cfg.ddp.bucket_size == 12345
    cfg.comm_overlap = None
    cfg.validate()
    assert cfg.ddp.overlap_grad_reduce is False and cfg.ddp.bucket_size is None
