"""The optimizer: parameter groups, master weights, main gradients, loss scaling, checkpoint state."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

from viaduct.training.config import OptimizerConfig
from viaduct.training.loss_scaler import DynamicLossScaler
from viaduct.training.main_grads import AccumulatedMainGrads, ParamGrads
from viaduct.training.microbatches import MicroBatchCalculator
from viaduct.training.optim import MixedPrecisionOptimizer, build_optimizer
from viaduct.training.train_step import forward_backward


class Tiny(nn.Module):
    def __init__(self, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.embedding = nn.Module()
        self.embedding.word_embeddings = nn.Embedding(11, 8, dtype=dtype)
        self.proj = nn.Linear(8, 8, dtype=dtype)
        self.norm = nn.LayerNorm(8, dtype=dtype)
        self.output_layer = nn.Linear(8, 11, bias=False, dtype=dtype)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.norm(torch.tanh(self.proj(self.embedding.word_embeddings(x))))
        logits = self.output_layer(h).float()
        return nn.functional.cross_entropy(logits.view(-1, 11), y.view(-1), reduction="none")


def _cfg(**kw) -> OptimizerConfig:
    cfg = OptimizerConfig(lr=1e-2, weight_decay=0.1, clip_grad=0.0, **kw)
    cfg.finalize()
    return cfg


def _batches(n: int, b: int = 4, s: int = 6, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        {"x": torch.randint(0, 11, (b, s), generator=g), "y": torch.randint(0, 11, (b, s), generator=g)}
        for _ in range(n)
    ]


def _step_fn(data, model):
    batch = next(data)
    out = model(batch["x"], batch["y"])

    def loss_func(o):
        total = o.sum()
        n = torch.tensor(float(o.numel()))
        return total, n, {"lm loss": torch.stack([total.detach(), n])}

    return out, loss_func


def test_param_groups_follow_megatron_rules():
    model = Tiny()
    opt = build_optimizer(_cfg(decoupled_lr=5e-3, decoupled_min_lr=1e-4), model)
    by_param = {id(p): g for g in opt.param_groups for p in g["params"]}
    names = dict(model.named_parameters())
    assert by_param[id(names["proj.bias"])]["wd_mult"] == 0.0  # bias
    assert by_param[id(names["norm.weight"])]["wd_mult"] == 0.0  # 1-D
    assert by_param[id(names["proj.weight"])]["wd_mult"] == 1.0
    emb = by_param[id(names["embedding.word_embeddings.weight"])]
    assert emb["max_lr"] == 5e-3 and emb["min_lr"] == 1e-4
    assert "max_lr" not in by_param[id(names["proj.weight"])]
    assert by_param[id(names["output_layer.weight"])]["max_lr"] == 5e-3


def test_decoupled_min_lr_falls_back_to_min_lr():
    opt = build_optimizer(_cfg(decoupled_lr=5e-3, min_lr=2e-5), Tiny())
    assert [g["min_lr"] for g in opt.param_groups if "max_lr" in g] == [2e-5]


def test_adam_is_decoupled_weight_decay_and_sgd_works():
    assert isinstance(build_optimizer(_cfg(), Tiny()).optimizer, torch.optim.AdamW)
    assert type(build_optimizer(_cfg(decoupled_weight_decay=False), Tiny()).optimizer) is torch.optim.Adam
    sgd = build_optimizer(_cfg(optimizer="sgd", sgd_momentum=0.5), Tiny())
    assert isinstance(sgd.optimizer, torch.optim.SGD) and sgd.param_groups[0]["momentum"] == 0.5


def test_bf16_params_keep_fp32_masters_and_get_the_rounded_update():
    model = Tiny(torch.bfloat16)
    opt = build_optimizer(_cfg(), model)
    assert all(s.master.dtype == torch.float32 for s in opt.slots)
    data = iter(_batches(1))
    opt.zero_grad()
    forward_backward(_step_fn, data, model, opt, 1)
    before = {s.name: s.master.clone() for s in opt.slots}
    updated, norm, _ = opt.step()
    assert updated and math.isfinite(float(norm))
    for s in opt.slots:
        assert not torch.equal(s.master, before[s.name])  # the fp32 master moved
        assert torch.equal(s.param, s.master.to(torch.bfloat16))  # and the bf16 weight is its rounding


def test_main_grads_accumulate_micro_batches_in_fp32():
    """Two micro-batches through the hooks give the float32 sum of the 16-bit per-batch gradients."""
    torch.manual_seed(0)
    model = Tiny(torch.bfloat16)
    opt = build_optimizer(_cfg(), model, fp32_main_grads=True)
    batches = _batches(2)
    expected = {}
    opt.main_grads.accumulate_in_backward(False)
    for b in batches:  # reference: each micro-batch's bf16 grads, summed in fp32
        model.zero_grad()
        (model(b["x"], b["y"]).float().mean() / 2).backward()
        for n, p in model.named_parameters():
            expected[n] = expected.get(n, 0) + p.grad.float()
    opt.main_grads.accumulate_in_backward(True)
    opt.zero_grad()
    forward_backward(_step_fn, iter(batches), model, opt, 2)
    for s in opt.slots:
        assert s.param.grad is None  # 16-bit gradients are freed as soon as they are taken
        torch.testing.assert_close(s.master.grad, expected[s.name], rtol=0, atol=1e-6)


@pytest.mark.parametrize("flush_bytes", [1, 200, 2**30], ids=["each", "some", "at-the-end"])
def test_main_grads_are_widened_in_batches_by_the_end_of_each_backward(flush_bytes: int) -> None:
    """However many 16-bit gradients wait before they are widened, each backward pass ends with all of
    them in the main gradients, copied by the first micro-batch and added by the next."""
    torch.manual_seed(0)
    model = Tiny(torch.bfloat16)
    opt = build_optimizer(_cfg(), model, fp32_main_grads=False)  # no hooks of its own
    main = opt.main_grads = AccumulatedMainGrads(opt.slots, flush_bytes=flush_bytes)
    batches = _batches(2)
    expected: dict[str, torch.Tensor] = {}
    opt.zero_grad()
    for b in batches:
        main.accumulate_in_backward(False)
        for p in model.parameters():
            p.grad = None
        model(b["x"], b["y"]).float().mean().backward()
        for s in opt.slots:
            expected[s.name] = expected.get(s.name, 0) + s.param.grad.float()
            s.param.grad = None
        main.accumulate_in_backward(True)
        model(b["x"], b["y"]).float().mean().backward()
        for s in opt.slots:  # read straight after the backward pass: nothing waits any more
            assert s.param.grad is None
            torch.testing.assert_close(s.master.grad, expected[s.name], rtol=0, atol=0)


def test_main_grads_implementation_follows_the_precision():
    def kind(dtype: torch.dtype, fp32_main_grads: bool) -> type:
        return type(build_optimizer(_cfg(), Tiny(dtype), fp32_main_grads=fp32_main_grads).main_grads)

    assert kind(torch.bfloat16, True) is AccumulatedMainGrads
    assert kind(torch.bfloat16, False) is ParamGrads
    assert kind(torch.float32, True) is ParamGrads  # no 16-bit parameter: nothing to hold in float32


def test_float32_parameters_step_on_their_own_grad():
    """Without float32 copies the main gradient is `.grad` itself (what sharded data parallel gives)."""
    model = Tiny()
    opt = build_optimizer(_cfg(), model)
    opt.zero_grad()
    forward_backward(_step_fn, iter(_batches(1)), model, opt, 1)
    grads = opt.main_grads.grads()
    assert len(grads) == len(list(model.parameters()))
    assert all(g is p.grad for g, p in zip(grads, model.parameters()))


def test_a_micro_batch_left_to_the_reduction_stays_in_grad():
    """With accumulation off (the micro-batch DDP reduces) the 16-bit gradients stay in `.grad`, and
    a main gradient nothing was written into this step is zero, not the last step's."""
    model = Tiny(torch.bfloat16)
    opt = build_optimizer(_cfg(), model, fp32_main_grads=True)
    opt.zero_grad()
    forward_backward(_step_fn, iter(_batches(1)), model, opt, 1)
    assert any(bool(g.abs().sum() > 0) for g in opt.main_grads.grads())  # last step's main gradients
    opt.zero_grad()
    opt.main_grads.accumulate_in_backward(False)
    batch = _batches(1)[0]
    model(batch["x"], batch["y"]).float().mean().backward()
    opt.main_grads.accumulate_in_backward(True)
    assert all(s.param.grad is not None and s.param.grad.dtype == torch.bfloat16 for s in opt.slots)
    assert all(bool((g == 0).all()) for g in opt.main_grads.grads())


def test_without_fp32_main_grads_gradients_are_widened_at_the_step():
    model = Tiny(torch.bfloat16)
    opt = build_optimizer(_cfg(), model, fp32_main_grads=False)
    opt.zero_grad()
    forward_backward(_step_fn, iter(_batches(2)), model, opt, 2)
    assert all(s.param.grad is not None and s.param.grad.dtype == torch.bfloat16 for s in opt.slots)
    updated, _, _ = opt.step()
    assert updated and all(s.param.grad is None for s in opt.slots)


def test_fp16_overflow_skips_the_update_and_backs_off_the_scale():
    model = Tiny(torch.float16)
    opt = build_optimizer(
        _cfg(fp16=True, initial_loss_scale=2.0**16, hysteresis=2, loss_scale_window=3), model
    )
    assert isinstance(opt.scaler, DynamicLossScaler)
    before = [p.detach().clone() for p in model.parameters()]
    for expected_scale in (2.0**16, 2.0**15):  # hysteresis 2: the first overflow keeps the scale
        opt.zero_grad()
        forward_backward(_step_fn, iter(_batches(1)), model, opt, 1)
        opt.slots[1].master.grad[0] = float("inf")
        updated, _, _ = opt.step()
        assert not updated
        assert float(opt.scaler.scale) == expected_scale
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # nothing applied
    for _ in range(3):  # a clean window of 3 steps doubles the scale again
        opt.zero_grad()
        forward_backward(_step_fn, iter(_batches(1)), model, opt, 1)
        assert opt.step()[0]
    assert float(opt.scaler.scale) == 2.0**16


def test_fp16_gradients_are_unscaled_before_clipping_and_the_norm():
    """The reported grad norm is the norm of the true gradients, whatever the loss scale."""
    norms = []
    for scale in (1.0, 1024.0):
        torch.manual_seed(0)
        model = Tiny(torch.float16)
        opt = build_optimizer(_cfg(fp16=True, loss_scale=scale), model)
        opt.zero_grad()
        forward_backward(_step_fn, iter(_batches(1)), model, opt, 1)
        norms.append(float(opt.step()[1]))
    assert norms[0] == pytest.approx(norms[1], rel=1e-2)


def test_grad_norm_skip_threshold_skips_large_steps():
    model = Tiny()
    opt = build_optimizer(_cfg(grad_norm_skip_threshold=1e-9), model)
    before = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    forward_backward(_step_fn, iter(_batches(1)), model, opt, 1)
    updated, norm, _ = opt.step()
    assert not updated and float(norm) > 1e-9
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_clipping_caps_the_update_norm_and_reports_the_unclipped_norm():
    model = Tiny()
    cfg = OptimizerConfig(optimizer="sgd", lr=1.0, sgd_momentum=0.0, weight_decay=0.0, clip_grad=1e-3)
    opt = build_optimizer(cfg, model)
    for g in opt.param_groups:
        g["lr"], g["weight_decay"] = 1.0, 0.0
    before = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    forward_backward(_step_fn, iter(_batches(1)), model, opt, 1)
    _, norm, _ = opt.step()
    moved = torch.sqrt(sum(((a - b) ** 2).sum() for a, b in zip(before, model.parameters())))
    assert float(norm) > 1e-2
    assert float(moved) == pytest.approx(1e-3, rel=1e-3)  # SGD with lr 1 moves by the clipped gradient


def test_zero_counting():
    model = Tiny()
    opt = build_optimizer(_cfg(log_num_zeros_in_grad=True), model)
    opt.zero_grad()
    forward_backward(_step_fn, iter(_batches(1)), model, opt, 1)
    grads = [p.grad.clone() for p in model.parameters()]
    _, _, zeros = opt.step()
    assert int(zeros) == sum(int((g == 0).sum()) for g in grads)


def test_state_dict_round_trips_through_weights_only_load():
    torch.manual_seed(0)
    model = Tiny(torch.bfloat16)
    opt = build_optimizer(_cfg(fp16=False), model)
    for _ in range(2):
        opt.zero_grad()
        forward_backward(_step_fn, iter(_batches(1)), model, opt, 1)
        opt.step()
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    assert set(state["state"]) == {n for n, _ in model.named_parameters()}

    torch.manual_seed(1)
    other = Tiny(torch.bfloat16)
    opt2 = MixedPrecisionOptimizer(_cfg(), other.named_parameters())
    opt2.load_state_dict(state)
    for s, s2 in zip(opt.slots, opt2.slots):
        assert torch.equal(s.master, s2.master) and torch.equal(s2.param, s.param)
        a, b = opt.optimizer.state[s.master], opt2.optimizer.state[s2.master]
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])


def test_microbatch_calculator_rampup_and_rounding():
    calc = MicroBatchCalculator(32, 2, 2, rampup_batch_size=[8, 8, 300])
    seen = []
    consumed = 0
    while consumed < 400:
        calc.update(consumed)
        seen.append(calc.current_global_batch_size)
        consumed += calc.current_global_batch_size
    # 3 increments over 300 samples: 8 until 100, 16 until 200, 24 until 300, then 32.
    assert seen[:13] == [8] * 13 and seen[13] == 16 and 32 in seen
    assert seen == sorted(seen) and set(seen) == {8, 16, 24, 32}
    calc = MicroBatchCalculator(30, 4, 2, decrease_batch_size_if_needed=True)
    assert calc.current_global_batch_size == 24 and calc.num_microbatches == 3
