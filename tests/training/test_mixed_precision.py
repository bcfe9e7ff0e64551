"""Mixed-precision recipes, their application to model/optimizer/ddp, and CommOverlapConfig."""

from dataclasses import dataclass

import pytest

from viaduct.config import ConfigBase, ConfigError, DType
from viaduct.config.codec import CoerceError
from viaduct.config.provenance import is_derived
from viaduct.models import GPTModelProvider
from viaduct.training.comm_overlap import CommOverlapConfig
from viaduct.training.mixed_precision import (
    MIXED_PRECISION_RECIPES,
    MixedPrecisionConfig,
    apply_mixed_precision,
    get_mixed_precision_config,
)


@dataclass(kw_only=True)
class FakeOptimizer(ConfigBase):
    """Stand-in with the optimizer fields a recipe touches."""

    bf16: bool = False
    """bf16."""
    fp16: bool = False
    """fp16."""
    params_dtype: DType = DType("float32")
    """Weight dtype."""
    loss_scale: float | None = None
    """Static loss scale."""
    initial_loss_scale: float = 2.0**32
    """Initial loss scale."""
    lr: float = 1e-4
    """Learning rate (no recipe field of that name)."""


@dataclass(kw_only=True)
class FakeDDP(ConfigBase):
    """Stand-in with the DDP fields a recipe touches."""

    grad_reduce_in_fp32: bool = False
    """Reduce in fp32."""
    fp8_param_gather: bool = False
    """FP8 gather."""


def model(**kw):
    return GPTModelProvider(num_layers=2, hidden_size=64, num_attention_heads=4, **kw)


def problems(cfg) -> dict[str, str]:
    try:
        cfg.finalize()
    except ConfigError as exc:
        return {p.path: p.message for p in exc.problems}
    return {}


# ------------------------------------------------------------------ recipes by name


def test_recipe_names_hyphens_and_fresh_objects():
    a = get_mixed_precision_config("bf16_mixed")
    b = get_mixed_precision_config("bf16-mixed")
    assert a == b and a is not b
    assert a.bf16 and a.params_dtype == DType("bfloat16") and a.pipeline_dtype == DType("bfloat16")
    assert a.grad_reduce_in_fp32 is True and a.autocast_enabled is False and a.fp16 is False
    fp16 = get_mixed_precision_config("FP16-Mixed")
    assert fp16.fp16 and fp16.params_dtype == DType("float16") and fp16.grad_reduce_in_fp32 is False
    fp32 = get_mixed_precision_config("fp32")
    assert fp32.fp32 and not fp32.bf16 and fp32.params_dtype == DType("float32")
    assert get_mixed_precision_config("fp32_mixed") == fp32
    obj = MixedPrecisionConfig(bf16=True)
    assert get_mixed_precision_config(obj) is obj


def test_unknown_recipe_lists_valid_names_with_a_suggestion():
    with pytest.raises(ConfigError) as exc:
        get_mixed_precision_config("bf16_mixd")
    assert isinstance(exc.value, ValueError)
    (p,) = exc.value.problems
    assert "bf16_mixd" in p.message
    assert "did you mean bf16_mixed" in p.fix and "fp16_mixed" in p.fix and "fp32" in p.fix


def test_from_string_returns_the_recipe_and_unknown_is_a_coerce_error():
    mp = MixedPrecisionConfig.from_string("bf16-mixed")
    assert mp == get_mixed_precision_config("bf16_mixed")
    with pytest.raises(CoerceError, match="unknown mixed-precision recipe"):
        MixedPrecisionConfig.from_string("nope")


def test_every_registered_recipe_builds_and_bf16_fp16_fp32_validate():
    for name in MIXED_PRECISION_RECIPES:
        get_mixed_precision_config(name)
    for name in ("bf16_mixed", "fp16_mixed", "fp32"):
        get_mixed_precision_config(name).finalize()


@pytest.mark.parametrize(
    "name",
    ["bf16_with_fp8_delayed_scaling_mixed", "bf16_with_mxfp8_mixed", "fp16_with_fp8_current_scaling_mixed"],
)
def test_fp8_recipes_are_registered_but_unsupported(name):
    found = problems(get_mixed_precision_config(name))
    assert "FP8 training is not supported yet" in found["fp8"]


def test_fp4_recipe_is_unsupported():
    assert (
        "FP4 training is not supported yet"
        in problems(get_mixed_precision_config("bf16_with_nvfp4_mixed"))["fp4"]
    )


# ------------------------------------------------------------------ finalize rules


@pytest.mark.parametrize(
    ("kw", "path", "words"),
    [
        ({"fp16": True, "bf16": True}, "bf16", "cannot both be true"),
        ({"fp32": True, "bf16": True}, "fp32", "contradicts bf16"),
        ({"bf16": True, "params_dtype": "fp16"}, "params_dtype", "contradicts the precision mode (bfloat16)"),
        ({"loss_scale": 0.0}, "loss_scale", "must be > 0"),
        ({"initial_loss_scale": -1.0}, "initial_loss_scale", "must be > 0"),
        ({"min_loss_scale": 0.0}, "min_loss_scale", "must be > 0"),
        ({"loss_scale_window": 0}, "loss_scale_window", "must be > 0"),
        ({"hysteresis": 0}, "hysteresis", "must be >= 1"),
        ({"num_layers_at_start_in_bf16": -1}, "num_layers_at_start_in_bf16", "must be >= 0"),
        ({"fp8_amax_history_len": 0}, "fp8_amax_history_len", "must be > 0"),
        ({"fp8": "hybrid", "fp4": "e2m1"}, "fp4", "cannot both be set"),
        (
            {"fp8_param_gather": True, "fp8_recipe": "mxfp8"},
            "reuse_grad_buf_for_mxfp8_param_ag",
            "must be true",
        ),
        ({"fp8_recipe": "fancy"}, "fp8_recipe", "must be one of"),
    ],
)
def test_mixed_precision_rule(kw, path, words):
    found = problems(MixedPrecisionConfig(**kw))
    assert words in found[path], found


def test_all_problems_at_once_and_fp8_param_follows_gather():
    found = problems(MixedPrecisionConfig(fp16=True, bf16=True, hysteresis=0, loss_scale=-1.0))
    assert {"bf16", "hysteresis", "loss_scale"} <= set(found)
    mp = MixedPrecisionConfig(fp8="hybrid", fp8_param_gather=True)
    with pytest.raises(ConfigError):
        mp.finalize()
    assert mp.fp8_param is True and is_derived(mp.source_of("fp8_param"))


# ------------------------------------------------------------------ applying a recipe


def test_apply_sets_model_optimizer_and_ddp_as_derived_values():
    m, opt, ddp = model(), FakeOptimizer(), FakeDDP()
    notes = apply_mixed_precision(get_mixed_precision_config("bf16_mixed"), m, opt, ddp)
    assert notes == []
    assert m.bf16 and m.params_dtype == DType("bfloat16") and m.pipeline_dtype == DType("bfloat16")
    assert opt.bf16 and opt.params_dtype == DType("bfloat16") and opt.lr == 1e-4
    assert ddp.grad_reduce_in_fp32 is True
    assert m.source_of("bf16") == "derived (mixed_precision bf16_mixed)"
    assert is_derived(opt.source_of("params_dtype")) and is_derived(ddp.source_of("grad_reduce_in_fp32"))
    m.finalize()
    assert m.autocast_dtype == DType("bfloat16")  # finalize derives it from the recipe's params_dtype


def test_fp8_knobs_are_not_copied_when_the_recipe_leaves_fp8_off():
    m = model()
    apply_mixed_precision(get_mixed_precision_config("bf16_mixed"), m)
    assert m.fp8_recipe == "delayed" and m.num_layers_at_start_in_bf16 == 1  # the model's own defaults
    assert m.source_of("fp8_recipe") == "default"
    apply_mixed_precision(get_mixed_precision_config("bf16_with_fp8_current_scaling_mixed"), m)
    assert m.fp8_recipe == "tensorwise" and m.first_last_layers_bf16 is True


def test_apply_is_idempotent_after_reset():
    m = model()
    mp = get_mixed_precision_config("bf16_mixed")
    apply_mixed_precision(mp, m)
    m._reset_derived()
    assert m.bf16 is False and m.params_dtype == DType("float32")
    apply_mixed_precision(mp, m)
    apply_mixed_precision(mp, m)
    assert m.bf16 is True and m.params_dtype == DType("bfloat16")


def test_none_values_of_the_recipe_are_not_copied():
    m = model()
    m.autocast_dtype = "fp16"
    m.logit_dtype = "fp32"
    notes = apply_mixed_precision(get_mixed_precision_config("bf16_mixed"), m)
    assert m.autocast_dtype == DType("float16")  # recipe's autocast_dtype is None
    assert not any("autocast_dtype" in n for n in notes)


def test_autocast_enabled_maps_to_enable_autocast_and_fp32_goes_nowhere():
    m = model()
    mp = MixedPrecisionConfig(bf16=True, autocast_enabled=True, fp32=False)
    apply_mixed_precision(mp, m)
    assert m.enable_autocast is True


def test_overriding_a_user_value_returns_a_note():
    m, opt = model(), FakeOptimizer()
    m.params_dtype = "fp16"
    m.bf16 = False  # the default value, but set explicitly after construction
    opt.initial_loss_scale = 1024.0
    notes = apply_mixed_precision(get_mixed_precision_config("bf16-mixed"), m, opt, None)
    assert any(n.startswith("model.params_dtype=torch.float16") and "bf16_mixed" in n for n in notes)
    assert any(n.startswith("model.bf16=False") for n in notes)
    assert any(n.startswith("optimizer.initial_loss_scale=1024.0") for n in notes)
    assert all("mixed_precision." in n for n in notes)
    assert m.params_dtype == DType("bfloat16")
    assert apply_mixed_precision(get_mixed_precision_config("bf16_mixed"), m, opt, label="mine") == []


def test_label_argument_and_default_label():
    m = model()
    apply_mixed_precision(MixedPrecisionConfig(bf16=True), m, label="object")
    assert m.source_of("bf16") == "derived (mixed_precision object)"


def test_fp8_recipe_applied_to_the_model_is_reported_by_the_model():
    m = model()
    apply_mixed_precision(get_mixed_precision_config("bf16_with_fp8_delayed_scaling_mixed"), m)
    assert m.fp8 == "hybrid"
    assert "FP8 training is not supported yet" in problems(m)["fp8"]


def test_yaml_round_trip():
    for mp in (
        MixedPrecisionConfig(),
        get_mixed_precision_config("bf16_mixed"),
        get_mixed_precision_config("fp16_mixed"),
    ):
        assert MixedPrecisionConfig.from_dict(mp.to_dict()) == mp


# ------------------------------------------------------------------ comm overlap


def test_comm_overlap_defaults_validate_and_round_trip():
    c = CommOverlapConfig()
    c.finalize()
    assert c.tp_comm_overlap is False and c.overlap_grad_reduce is None and c.data_parallel_size is None
    c2 = CommOverlapConfig(overlap_grad_reduce=True, bucket_size=1 << 20, batch_p2p_comm=False)
    c2.finalize()
    assert CommOverlapConfig.from_dict(c2.to_dict()) == c2


@pytest.mark.parametrize(
    ("kw", "path", "words"),
    [
        (
            {"tp_comm_overlap": True, "tp_comm_overlap_cfg": "preset"},
            "tp_comm_overlap_cfg",
            "per-GEMM overlap presets are Transformer Engine's",
        ),
        ({"overlap_p2p_comm": True, "batch_p2p_comm": True}, "overlap_p2p_comm", "cannot be combined"),
        ({"bucket_size": 0}, "bucket_size", "must be > 0"),
        ({"overlap_moe_expert_parallel_comm": True}, "overlap_moe_expert_parallel_comm", "not supported yet"),
        ({"delay_wgrad_compute": True}, "delay_wgrad_compute", "not supported yet"),
        ({"tp_comm_overlap_cfg": "preset"}, "tp_comm_overlap_cfg", "only applies with tp_comm_overlap"),
        ({"tp_comm_bootstrap_backend": "ucc"}, "tp_comm_bootstrap_backend", "must be one of"),
    ],
)
def test_comm_overlap_rule(kw, path, words):
    assert words in problems(CommOverlapConfig(**kw))[path]


def test_comm_overlap_data_parallel_size_is_derived_only():
    c = CommOverlapConfig()
    with pytest.raises(AttributeError, match="derived"):
        c.data_parallel_size = 4
    c.derive("data_parallel_size", 4, "validate")
    assert c.data_parallel_size == 4
