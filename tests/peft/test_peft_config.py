"""PEFT configs: LoRA / DoRA defaults, finalize() rules, selection by name, YAML round trip."""

import pytest

from viaduct.config import ConfigError, DType
from viaduct.peft import PEFT, DoRA, LoRA, ModuleMatcher

DEFAULT_TARGETS = ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]


def problems(cfg) -> dict[str, str]:
    try:
        cfg.finalize()
    except ConfigError as exc:
        return {p.path: p.message for p in exc.problems}
    return {}


def test_lora_defaults():
    lora = LoRA()
    assert lora.target_modules == DEFAULT_TARGETS and lora.exclude_modules == []
    assert (lora.dim, lora.alpha, lora.dropout) == (32, 32, 0.0)
    assert lora.dropout_position == "pre"
    assert (lora.lora_A_init_method, lora.lora_B_init_method) == ("xavier", "zero")
    assert lora.lora_dtype is None
    assert lora.share_expert_adapters is True and lora.a2a_experimental is False
    lora.finalize()


def test_dora_defaults():
    dora = DoRA()
    assert dora.target_modules == DEFAULT_TARGETS
    assert (dora.dim, dora.alpha, dora.dropout, dora.dropout_position) == (32, 64, 0.0, "pre")
    dora.finalize()


def test_defaults_are_not_shared_between_instances():
    a, b = LoRA(), LoRA()
    a.target_modules.append("linear_x")
    assert b.target_modules == DEFAULT_TARGETS


def test_selection_by_name_and_abstract_base():
    assert PEFT._abstract_config_ and ModuleMatcher._abstract_config_
    assert isinstance(PEFT.from_string("lora"), LoRA)
    assert isinstance(PEFT.from_string("DoRA"), DoRA)
    assert not isinstance(DoRA(), LoRA)
    with pytest.raises(ConfigError, match="_target_"):
        PEFT.from_dict({"dim": 8})


@pytest.mark.parametrize("cls", [LoRA, DoRA])
@pytest.mark.parametrize(
    ("kw", "path", "words"),
    [
        ({"dim": 0}, "dim", "must be > 0"),
        ({"alpha": 0}, "alpha", "must be > 0"),
        ({"dropout": 1.0}, "dropout", "must be in [0, 1)"),
        ({"dropout": -0.5}, "dropout", "must be in [0, 1)"),
        ({"dropout_position": "middle"}, "dropout_position", "must be one of"),
        ({"lora_A_init_method": "uniform"}, "lora_A_init_method", "must be one of"),
        ({"exclude_modules": ["linear_fc2"]}, "exclude_modules", "needs an empty target_modules"),
        ({"target_modules": []}, "target_modules", "nothing would be adapted"),
        ({"target_modules": ["linear_qkv", " "]}, "target_modules[1]", "must be a module name"),
    ],
)
def test_rule(cls, kw, path, words):
    found = problems(cls(**kw))
    assert path in found and words in found[path], found


def test_all_problems_at_once_with_fix_text():
    with pytest.raises(ConfigError) as exc:
        LoRA(dim=0, alpha=-1, dropout=2.0).finalize()
    paths = {p.path for p in exc.value.problems}
    assert paths == {"dim", "alpha", "dropout"}
    assert all(p.fix and "peft." in p.fix for p in exc.value.problems)


def test_exclude_modules_with_empty_targets_is_valid():
    LoRA(target_modules=[], exclude_modules=["output_layer"]).finalize()
    LoRA(target_modules=["*.layers.0.*.linear_qkv"], lora_dtype="bf16").finalize()


@pytest.mark.parametrize(
    "field",
    [
        "a2a_experimental",
        "normalize_moe_lora",
        "experts_shared_outer_loras",
        "sequence_parallel_input_regather",
    ],
)
def test_moe_and_sequence_parallel_knobs_are_unsupported(field):
    found = problems(LoRA(**{field: True}))
    assert "not supported yet" in found[field]


def test_share_expert_adapters_off_is_unsupported():
    assert "not supported yet" in problems(LoRA(share_expert_adapters=False))["share_expert_adapters"]


@pytest.mark.parametrize(
    "cfg",
    [
        LoRA(),
        LoRA(
            dim=8,
            alpha=16,
            dropout=0.1,
            dropout_position="post",
            lora_dtype=DType("bf16"),
            target_modules=["a"],
        ),
        DoRA(),
        DoRA(dim=4, exclude_modules=["x"], target_modules=[]),
    ],
)
def test_yaml_round_trip(cfg):
    back = type(cfg).from_dict(cfg.to_dict())
    assert back == cfg
    assert PEFT.from_dict(cfg.to_dict()) == cfg


def test_bridge_fields_that_are_runtime_bookkeeping_load_as_legacy():
    data = LoRA().to_dict()
    data["_target_"] = "megatron.bridge.peft.lora.LoRA"
    data["canonical_mapping"] = {}
    data["params_to_save"] = []
    with pytest.warns(UserWarning, match="dropped"):
        assert PEFT.from_dict(data) == LoRA()
