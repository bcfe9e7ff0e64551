import sys
import textwrap

import pytest

from viaduct.config import ConfigError, register_target
from viaduct.config.targets import is_allowed, resolve_target

from .sample import Everything, Inner


@pytest.fixture
def booby_trap(tmp_path, monkeypatch):
    """A module that, if ever imported or called, leaves a file behind."""
    marker = tmp_path / "ran"
    (tmp_path / "vd_booby_trap.py").write_text(
        textwrap.dedent(
            f"""
            open({str(marker)!r}, "w").write("imported")
            def boom(*a, **k):
                open({str(marker)!r}, "w").write("called")
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield marker
    sys.modules.pop("vd_booby_trap", None)


@pytest.mark.parametrize(
    "target",
    [
        "os.system",
        "subprocess.run",
        "subprocess.Popen",
        "builtins.eval",
        "builtins.exec",
        "torch.load",
        "torch.hub.load",
        "numpy.load",
        "pickle.loads",
        "vd_booby_trap.boom",
        "viaduct.cli.main.main",
        "viaduct._private.thing",
        "torch._C._nn.linear",
    ],
)
def test_dangerous_targets_are_refused_before_anything_runs(target, booby_trap, tmp_path):
    data = Everything(inner=Inner()).to_dict()
    data["table"] = {"x": {"_target_": target, "_args_": [f"touch {tmp_path}/pwned"]}}
    data["init"] = {"_target_": target, "_partial_": True}
    with pytest.raises(ConfigError, match="not allowed"):
        Everything.from_dict(data)
    assert not booby_trap.exists()
    assert "vd_booby_trap" not in sys.modules
    assert not (tmp_path / "pwned").exists()


def test_refused_in_yaml_files_too(tmp_path, booby_trap):
    path = tmp_path / "evil.yaml"
    path.write_text(
        "_target_: tests.config.sample.Everything\ninner: {}\ninit:\n  _target_: vd_booby_trap.boom\n"
    )
    with pytest.raises(ConfigError, match="vd_booby_trap.boom' is not allowed"):
        Everything.from_yaml(path)
    assert not booby_trap.exists()


def test_allowlist_admits_dtypes_activations_and_config_classes():
    assert is_allowed("torch.bfloat16") and is_allowed("torch.nn.functional.silu")
    assert is_allowed("torch.nn.init.normal_") and is_allowed("signal.Signals")
    assert is_allowed("tests.config.sample.Inner")  # a config class already defined by trusted code
    assert not is_allowed("torch.nn.functional.__builtins__")
    assert not is_allowed("os.path.join")


def test_register_target_opens_one_name():
    def my_act(x):
        return x

    assert not is_allowed(f"{__name__}.test_register_target_opens_one_name.<locals>.my_act")
    register_target(my_act, name="mypkg.my_act")
    assert resolve_target("mypkg.my_act") is my_act


def test_megatron_bridge_targets_map_to_viaduct_classes():
    cls = resolve_target("megatron.bridge.training.config.TrainingConfig")
    from viaduct.training.config import TrainingConfig

    assert cls is TrainingConfig
    from viaduct.models import AttnBackend, GPTModelProvider

    assert resolve_target("megatron.bridge.models.gpt_provider.GPTModelProvider") is GPTModelProvider
    assert resolve_target("megatron.core.transformer.enums.AttnBackend") is AttnBackend


def test_megatron_target_without_a_viaduct_class_names_that_class():
    # A Megatron class viaduct does not build is refused under its own name, not mapped onto
    # another name that does not exist either.
    from viaduct.config.targets import TargetError

    with pytest.raises(TargetError, match=r"no config class named DeepSeekV3ModelProvider\)"):
        resolve_target("megatron.bridge.models.deepseek.DeepSeekV3ModelProvider")
