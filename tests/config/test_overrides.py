import signal

import pytest

from viaduct.config import ConfigError, ConfigWarning, DType, apply_overrides, process_config_with_overrides
from viaduct.config.types import function_path

from .sample import Color, Everything, Inner, PluginA, PluginB


def make() -> Everything:
    return Everything(inner=Inner(iters=3))


def test_set_and_coerce_each_kind():
    cfg = apply_overrides(
        make(),
        [
            "inner.iters=10",
            "inner.lr=1",  # an int for a float field becomes a float
            "inner.flag=yes",
            "inner.style=COSINE",
            "dtype=bf16",
            "act=silu",
            "color=green",
            "sig=SIGINT",
            "window=[4,0]",
            "path=/tmp/x",
            "names=[a,b]",
            "table={k: 1}",
        ],
    )
    assert cfg.inner.iters == 10
    assert cfg.inner.lr == 1.0 and isinstance(cfg.inner.lr, float)
    assert cfg.inner.flag is True and cfg.inner.style == "cosine"
    assert cfg.dtype == DType("bfloat16") and function_path(cfg.act) == "torch.nn.functional.silu"
    assert cfg.color is Color.green and cfg.sig is signal.SIGINT
    assert cfg.window == (4, 0) and str(cfg.path) == "/tmp/x" and cfg.names == ["a", "b"]
    assert cfg.table == {"k": 1}


@pytest.mark.parametrize("alias", ["bf16", "bfloat16", "torch.bfloat16", "BF16"])
def test_dtype_aliases(alias):
    assert apply_overrides(make(), [f"dtype={alias}"]).dtype == DType("bfloat16")


def test_numbers_from_yaml_1_1_strings():
    # PyYAML reads "1e-4" as a string (YAML 1.1 wants a dot); the annotation makes it a float.
    cfg = apply_overrides(make(), ["inner.lr=1e-4", "inner.iters=1e3"])
    assert cfg.inner.lr == 1e-4 and cfg.inner.iters == 1000 and isinstance(cfg.inner.iters, int)


def test_plus_forms_and_delete():
    cfg = make()
    apply_overrides(cfg, ["+table.a=1", "++table.a=2", "++table.b=3"])
    assert cfg.table == {"a": 2, "b": 3}
    with pytest.raises(ConfigError, match="key 'a' already exists"):
        apply_overrides(cfg, ["+table.a=5"])
    with pytest.raises(ConfigError, match="no key 'zz'.*use \\+table.zz"):
        apply_overrides(cfg, ["table.zz=5"])
    apply_overrides(cfg, ["~table.a"])
    assert cfg.table == {"b": 3}
    with pytest.raises(ConfigError, match="already has a value"):
        apply_overrides(cfg, ["+inner.iters=4"])
    apply_overrides(cfg, ["inner.lr=0.5", "~inner.lr"])
    assert cfg.inner.lr == 1e-3 and cfg.inner.source_of("lr") == "default"
    with pytest.raises(ConfigError, match="required and cannot be deleted"):
        apply_overrides(cfg, ["~inner"])


def test_setting_inside_a_none_subconfig_creates_it():
    cfg = make()
    assert cfg.optional is None
    apply_overrides(cfg, ["optional.iters=7"])
    assert isinstance(cfg.optional, Inner) and cfg.optional.iters == 7
    apply_overrides(cfg, ["~optional"])
    assert cfg.optional is None
    apply_overrides(cfg, ["+optional.lr=0.2"])
    assert cfg.optional.lr == 0.2


def test_switch_subconfig_by_name_mapping_and_target():
    cfg = make()
    apply_overrides(cfg, ["plugin=a"])
    assert isinstance(cfg.plugin, PluginA)
    apply_overrides(cfg, ["plugin.rank=16", "plugin._target_=tests.config.sample.PluginB"])
    assert isinstance(cfg.plugin, PluginB) and cfg.plugin.rank == 16  # user-set fields carry over
    apply_overrides(cfg, ["plugin={_target_: tests.config.sample.PluginA, alpha: 0.5}"])
    assert isinstance(cfg.plugin, PluginA) and cfg.plugin.alpha == 0.5 and cfg.plugin.rank == 8
    with pytest.raises(ConfigError, match="Plugin has several kinds"):
        apply_overrides(make(), ["plugin.rank=3"])


def test_every_problem_is_reported_with_path_value_and_source():
    with pytest.raises(ConfigError) as info:
        apply_overrides(
            make(), ["inner.iter=1", "inner.lr=fast", "nope", "colr=red", "dtype=fp7", "inner.style=x"]
        )
    problems = info.value.problems
    assert len(problems) == 6
    by_path = {p.path: p for p in problems}
    assert by_path["inner.iter"].fix == "did you mean iters?"
    assert by_path["inner.lr"].value == "fast" and by_path["inner.lr"].source == "CLI 'inner.lr=fast'"
    assert "has no value" in by_path["nope"].message
    assert by_path["colr"].fix == "did you mean color?"
    text = str(info.value)
    assert text.startswith("invalid overrides:")


def test_derived_fields_are_refused():
    with pytest.raises(ConfigError, match="inner.steps: is derived by validate"):
        apply_overrides(make(), ["inner.steps=3"])


def test_mapping_overrides_merge_like_a_partial_file():
    cfg = apply_overrides(make(), {"inner": {"lr": "2e-3"}, "table": {"x": 1}})
    assert cfg.inner.lr == 2e-3 and cfg.inner.iters == 3 and cfg.table == {"x": 1}


def test_process_config_precedence_and_file_lines(tmp_path):
    path = tmp_path / "over.yaml"
    path.write_text("inner:\n  iters: 20\n  lr: 0.5\nnames: [x]\n")
    cfg = process_config_with_overrides(make(), config_filepath=path, cli_overrides=["inner.lr=0.25"])
    assert cfg.inner.iters == 20 and cfg.inner.lr == 0.25 and cfg.names == ["x"]
    assert cfg.inner.source_of("iters") == f"file {path}:2"
    assert cfg.inner.source_of("lr") == "CLI 'inner.lr=0.25'"


def test_yaml_typos_are_errors_with_file_and_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("inner:\n  iters: 20\n  itres: 3\ncolour: red\n")
    with pytest.raises(ConfigError) as info:
        process_config_with_overrides(make(), config_filepath=path)
    by_path = {p.path: p for p in info.value.problems}
    assert (
        by_path["inner.itres"].source == f"file {path}:3"
        and by_path["inner.itres"].fix == "did you mean iters?"
    )
    assert by_path["colour"].source == f"file {path}:4"


def test_interpolation_in_yaml(tmp_path):
    path = tmp_path / "i.yaml"
    path.write_text("inner:\n  iters: 12\noptional:\n  iters: ${inner.iters}\n")
    cfg = process_config_with_overrides(make(), config_filepath=path)
    assert cfg.optional.iters == 12


def test_yaml_syntax_error_reports_file_line(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("inner:\n  iters: 3\n  lr: [1, 2\n")
    with pytest.raises(ConfigError, match=r"YAML syntax error.*s\.yaml:\d+:\d+"):
        process_config_with_overrides(make(), config_filepath=path)


def test_duplicate_yaml_keys_are_errors(tmp_path):
    path = tmp_path / "d.yaml"
    path.write_text("inner:\n  iters: 3\n  iters: 4\n")
    with pytest.raises(ConfigError, match=r"inner.iters: key appears twice.*d\.yaml:3"):
        process_config_with_overrides(make(), config_filepath=path)


def test_missing_file_is_a_config_error_and_file_not_found():
    with pytest.raises(FileNotFoundError):
        process_config_with_overrides(make(), config_filepath="/no/such.yaml")
    with pytest.raises(ConfigError, match="config file not found"):
        process_config_with_overrides(make(), config_filepath="/no/such.yaml")


def test_lenient_yaml_merge_drops_and_warns(tmp_path):
    path = tmp_path / "l.yaml"
    path.write_text("inner:\n  old: 1\n  iters: 9\n")
    with pytest.warns(ConfigWarning, match="inner.old"):
        cfg = process_config_with_overrides(make(), config_filepath=path, strict=False)
    assert cfg.inner.iters == 9
