"""`${...}` interpolation: resolved once, over the merged configuration."""

import pytest

from viaduct.cli.main import load_config
from viaduct.config import ConfigError, apply_overrides, process_config_with_overrides
from viaduct.training.config import ConfigContainer

from .sample import Everything, Inner


def make() -> Everything:
    return Everything(inner=Inner(iters=3))


def test_a_file_reference_follows_a_later_command_line_override(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  eval_iters: ${train.train_iters}\n")
    cfg = load_config(None, str(path), ["train.train_iters=99"])
    assert cfg.train.train_iters == 99 and cfg.train.eval_iters == 99
    assert cfg.train.source_of("eval_iters") == f"file {path}:2"
    cfg = load_config(None, str(path), ["--train.train-iters", "7"])
    assert cfg.train.eval_iters == 7


def test_references_on_the_command_line():
    cfg = load_config(None, None, ["train.train_iters=42", "train.eval_iters=${train.train_iters}"])
    assert cfg.train.eval_iters == 42
    cfg = load_config(None, None, ["--train.eval-iters", "${train.train_iters}", "train.train_iters=8"])
    assert cfg.train.eval_iters == 8
    cfg = apply_overrides(
        make(), ["inner.lr=0.5", "optional.lr=${inner.lr}", "+table.name=run-${inner.iters}"]
    )
    assert cfg.optional.lr == 0.5 and cfg.table == {"name": "run-3"}


def test_process_config_resolves_after_the_cli(tmp_path):
    path = tmp_path / "over.yaml"
    path.write_text("optional:\n  iters: ${inner.iters}\ntable:\n  a: 1\n  b: ${.a}\n  c: x-${inner.style}\n")
    cfg = process_config_with_overrides(make(), config_filepath=path, cli_overrides=["inner.iters=12"])
    assert cfg.optional.iters == 12
    assert cfg.table == {"a": 1, "b": 1, "c": "x-linear"}


def test_a_binding_stays_live_until_its_field_is_assigned(tmp_path):
    path = tmp_path / "full.yaml"
    make().to_yaml(path)
    path.write_text(path.read_text().replace("optional: null", "optional:\n  iters: ${inner.iters}"))
    cfg = Everything.from_yaml(path)
    assert cfg.optional.iters == 3
    apply_overrides(cfg, ["inner.iters=30"])  # a full file loaded, then the command line
    assert cfg.optional.iters == 30
    apply_overrides(cfg, ["optional.iters=4", "inner.iters=31"])  # assigned: the binding is over
    assert cfg.optional.iters == 4
    cfg2 = Everything.from_yaml(path)
    cfg2.optional.iters = 5  # from Python, likewise
    apply_overrides(cfg2, ["inner.iters=50"])
    assert cfg2.optional.iters == 5


def test_full_container_yaml_with_a_reference(tmp_path):
    from viaduct.recipes import DEFAULT_RECIPE, get_recipe

    path = tmp_path / "run.yaml"
    get_recipe(DEFAULT_RECIPE)().to_yaml(path)
    text = path.read_text()
    line = next(x for x in text.splitlines() if x.strip().startswith("eval_iters:"))
    path.write_text(text.replace(line, "  eval_iters: ${train.train_iters}"))
    cfg = load_config(None, str(path), ["train.train_iters=64"])
    assert isinstance(cfg, ConfigContainer) and cfg.train.eval_iters == 64


def test_problems_name_the_value_and_where_it_was_written(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(
        "inner:\n  iters: ${inner.itres}\n"
        "optional:\n  iters: ${oc.env:HOME}\n"
        "table:\n  a: ${table.b}\n  b: ${table.a}\n  c: ${inner}\n  d: '\\${literal}'\n"
    )
    with pytest.raises(ConfigError) as info:
        process_config_with_overrides(make(), config_filepath=path)
    by_path = {p.path: p for p in info.value.problems}
    assert "no field 'itres'" in by_path["inner.iters"].message
    assert by_path["inner.iters"].fix == "did you mean iters?"
    assert by_path["inner.iters"].source == f"file {path}:2"
    assert "resolvers are not supported" in by_path["optional.iters"].message
    assert "interpolation cycle" in str(info.value)
    assert "whole Inner" in by_path["table.c"].message
    assert "table.d" not in by_path


def test_an_escaped_reference_is_text(tmp_path):
    path = tmp_path / "lit.yaml"
    path.write_text("table:\n  d: '\\${literal}'\n")
    cfg = process_config_with_overrides(make(), config_filepath=path)
    assert cfg.table == {"d": "${literal}"}
    cfg.to_yaml(path)  # saved escaped, so that it reads back as the same text
    assert Everything.from_yaml(path) == cfg


def test_a_reference_is_coerced_to_the_field_type():
    cfg = apply_overrides(
        make(), ["+table.n=7", "inner.lr=${table.n}", "names=[${table.n}, x]", "window=[${table.n}, 0]"]
    )
    assert cfg.inner.lr == 7.0 and isinstance(cfg.inner.lr, float)
    assert cfg.names == ["7", "x"] and cfg.window == (7, 0)
    with pytest.raises(ConfigError, match="inner.iters: expected an integer"):
        apply_overrides(make(), ["inner.iters=${inner.style}"])
