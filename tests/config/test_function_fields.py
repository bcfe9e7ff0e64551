"""A function field names a function on the allowlist, not any attribute a viaduct module exposes."""

import sys
import textwrap

import pytest

from viaduct.config import ConfigError, FunctionRef, apply_overrides, register_target_prefix
from viaduct.config import targets as targets_module
from viaduct.config.targets import TargetError, is_allowed_function, resolve_function
from viaduct.recipes import DEFAULT_RECIPE, get_recipe

from .sample import Everything, Inner

REEXPORTED = [
    "viaduct.cli.main.os.system",
    "viaduct.config.types.importlib.import_module",
    "viaduct.cli.main.main",
]


@pytest.mark.parametrize("path", REEXPORTED)
def test_override_naming_a_module_attribute_is_refused_at_the_field(path):
    with pytest.raises(ConfigError) as info:
        apply_overrides(get_recipe(DEFAULT_RECIPE)(), [f"model.activation_func={path}"])
    (problem,) = info.value.problems
    assert problem.path == "model.activation_func" and "is not a known function" in problem.message


def test_yaml_and_python_values_are_checked_too(tmp_path):
    cfg = get_recipe(DEFAULT_RECIPE)()
    data = cfg.to_dict()
    data["model"]["activation_func"] = {"_target_": "viaduct.cli.main.os.system", "_call_": False}
    path = tmp_path / "run.yaml"
    cfg.to_yaml(path)
    path.write_text(path.read_text().replace("torch.nn.functional.silu", "viaduct.cli.main.os.system"))
    with pytest.raises(
        ConfigError, match="model.activation_func: 'viaduct.cli.main.os.system' is not a known"
    ):
        type(cfg).from_yaml(path)
    with pytest.raises(ConfigError, match="model.activation_func"):
        type(cfg).from_dict(data)
    cfg.model.activation_func = FunctionRef("viaduct.cli.main.os.system")  # from Python, unchecked until...
    with pytest.raises(ConfigError) as info:
        cfg.validate()
    assert [p.path for p in info.value.problems] == ["model.activation_func"]


def test_allowed_functions_still_resolve():
    import torch.nn.functional as F

    from viaduct.models.common.activations import squared_relu

    cfg = apply_overrides(get_recipe(DEFAULT_RECIPE)(), ["model.activation_func=squared_relu"])
    assert cfg.model.activation_func is squared_relu
    cfg = apply_overrides(cfg, ["model.activation_func=torch.nn.functional.gelu"])
    assert cfg.model.activation_func is F.gelu
    assert resolve_function("torch.nn.init.normal_") is torch_init_normal()


def torch_init_normal():
    import torch.nn.init

    return torch.nn.init.normal_


@pytest.fixture
def user_package(tmp_path, monkeypatch):
    """`vdpkg.acts` defines `my_act` and imports `os`; `vdpkg.` is registered as trusted."""
    pkg = tmp_path / "vdpkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "acts.py").write_text(
        textwrap.dedent(
            """
            import os

            def my_act(x):
                return x
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(targets_module, "_user_prefixes", [])
    register_target_prefix("vdpkg.")
    yield
    for name in ("vdpkg", "vdpkg.acts"):
        sys.modules.pop(name, None)


def test_registered_prefix_admits_its_functions_but_not_what_they_import(user_package):
    assert is_allowed_function("vdpkg.acts.my_act")
    cfg = Everything(inner=Inner(), act="vdpkg.acts.my_act")
    assert cfg.check_types() == []
    assert cfg.act.__name__ == "my_act"
    with pytest.raises(TargetError, match="defined outside the registered prefixes"):
        resolve_function("vdpkg.acts.os.system")
    bad = Everything(inner=Inner(), act=FunctionRef("vdpkg.acts.os.system"))
    assert bad.act == FunctionRef("vdpkg.acts.os.system")  # never resolved: it stays a name
    (problem,) = bad.check_types()
    assert problem.path == "act" and "defined outside the registered prefixes" in problem.message
    with pytest.raises(TargetError):
        bad.act("echo pwned")
    with pytest.raises(ConfigError, match="act: .*defined outside the registered prefixes"):
        apply_overrides(Everything(inner=Inner()), ["act=vdpkg.acts.os.system"])
