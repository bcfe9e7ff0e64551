"""Lists where tuples are annotated, and the finite-number rule of float fields."""

import math

import pytest

from viaduct.config import ConfigError, apply_overrides, process_config_with_overrides
from viaduct.recipes import DEFAULT_RECIPE, get_recipe
from viaduct.training.config import GPTDatasetConfig

from .sample import Everything, Inner


def test_a_list_is_accepted_wherever_a_tuple_is_annotated():
    d = GPTDatasetConfig(blend=[["path/prefix"], None], random_seed=1)
    assert d.blend == (["path/prefix"], None) and isinstance(d.blend, tuple)
    assert d.check_types() == []
    d.blend = [["a", "b"], [0.3, 0.7]]
    assert d.blend == (["a", "b"], [0.3, 0.7]) and isinstance(d.blend, tuple)
    d.blend_per_split = [[["x"], None], None, [["y"], [1.0]]]
    assert d.blend_per_split == [(["x"], None), None, (["y"], [1.0])]
    assert d.check_types() == []
    loaded = GPTDatasetConfig.from_dict({"blend": [["p"], None], "random_seed": 1})
    assert loaded.blend == (["p"], None) and isinstance(loaded.blend, tuple)
    cfg = Everything(inner=Inner(), window=[128, 0])
    assert cfg.window == (128, 0) and cfg.check_types() == []
    cfg.window = [1, 2, 3]  # converted, and the length is still reported
    assert [p.message for p in cfg.check_types()] == ["expected 2 items, got 3"]


def test_a_list_the_caller_holds_is_not_copied_when_no_tuple_is_inside():
    names = ["a"]
    cfg = Everything(inner=Inner(), names=names)
    assert cfg.names is names


@pytest.mark.parametrize(
    "override",
    ["optimizer.lr=.nan", "optimizer.lr=.inf", "model.init_method_std=.nan", "optimizer.clip_grad=.nan"],
)
def test_non_finite_overrides_are_refused_at_the_field(override):
    with pytest.raises(ConfigError) as info:
        apply_overrides(get_recipe(DEFAULT_RECIPE)(), [override])
    (problem,) = info.value.problems
    assert problem.path == override.split("=")[0]
    assert problem.message.startswith("must be a finite number")


def test_non_finite_values_from_python_and_files_are_refused(tmp_path):
    cfg = get_recipe(DEFAULT_RECIPE)()
    cfg.optimizer.lr = math.nan
    cfg.model.init_method_std = math.inf
    with pytest.raises(ConfigError) as info:
        cfg.validate()
    by_path = {p.path: p for p in info.value.problems}
    assert set(by_path) == {"optimizer.lr", "model.init_method_std"}
    assert "finite number" in by_path["optimizer.lr"].message
    path = tmp_path / "over.yaml"
    path.write_text("inner:\n  lr: .nan\n")
    with pytest.raises(ConfigError) as info:
        process_config_with_overrides(Everything(inner=Inner()), config_filepath=path)
    assert info.value.problems[0].path == "inner.lr" and info.value.problems[0].source == f"file {path}:2"


def test_infinity_where_it_means_never():
    cfg = get_recipe(DEFAULT_RECIPE)()
    assert cfg.optimizer.grad_norm_skip_threshold == math.inf
    apply_overrides(cfg, ["optimizer.grad_norm_skip_threshold=.inf"])
    cfg.validate()
    with pytest.raises(ConfigError, match="grad_norm_skip_threshold: must be a number, not NaN"):
        apply_overrides(cfg, ["optimizer.grad_norm_skip_threshold=.nan"])
