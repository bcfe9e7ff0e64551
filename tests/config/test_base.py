import copy
import io

import pytest

from viaduct.config import ConfigError, ConfigWarning, DType, FunctionRef
from viaduct.config.types import Partial

from .sample import Color, Everything, Inner, PluginA, PluginB, everything_full


def test_unknown_attribute_names_the_closest_field():
    cfg = Everything(inner=Inner())
    with pytest.raises(AttributeError, match="did you mean iters"):
        cfg.inner.iter = 5
    with pytest.raises(AttributeError, match="Everything.inerr: no such field; did you mean inner"):
        cfg.inerr = Inner()
    with pytest.raises(TypeError):
        Inner(itres=3)  # the dataclass constructor rejects unknown keywords itself


def test_derived_fields_cannot_be_assigned():
    cfg = Inner(iters=2)
    with pytest.raises(AttributeError, match="derived by validate"):
        cfg.steps = 3
    cfg.finalize()
    assert cfg.steps == 20


def test_round_trip_of_every_value_kind_is_exact():
    cfg = everything_full()
    back = Everything.from_dict(cfg.to_dict())
    assert back == cfg
    assert isinstance(back.window, tuple) and back.window == (128, 0)
    assert isinstance(back.table["t"], tuple)
    assert back.table["p"] == cfg.table["p"] and type(back.table["p"]) is type(cfg.table["p"])
    assert back.table["s"] == {3, 4}
    assert isinstance(back.init, Partial) and back.init.keywords == {"mean": 0.0, "std": 0.02}
    assert back.color is Color.green
    assert isinstance(back.plugin, PluginB) and back.plugin.beta == 5


def test_yaml_round_trip_through_a_file(tmp_path):
    cfg = everything_full()
    path = tmp_path / "sub" / "cfg.yaml"
    cfg.to_yaml(path)
    assert Everything.from_yaml(path) == cfg
    text = path.read_text()
    assert (
        text.startswith("_target_: tests.config.sample.Everything\n") or "_target_:" in text.splitlines()[0]
    )
    assert "_target_: torch.bfloat16" in text and "_call_: false" in text
    assert "- 128" in text  # a tuple field is written as a plain list; its annotation restores it


def test_equality_and_deepcopy_are_independent():
    a = everything_full()
    b = copy.deepcopy(a)
    assert a == b and a is not b and a.inner is not b.inner
    b.inner.iters = 99
    assert a != b and a.inner.iters == 3


def test_dtype_and_function_fields_hold_the_torch_objects_once_torch_is_imported():
    torch = pytest.importorskip("torch")
    import torch.nn.functional as F

    cfg = Everything(inner=Inner(), dtype=torch.bfloat16, act=F.silu)
    assert cfg.dtype is torch.bfloat16 and cfg.act is F.silu
    assert torch.zeros(2, dtype=cfg.dtype).dtype is torch.bfloat16
    x = torch.tensor([-1.0, 2.0])
    assert torch.equal(cfg.act(x), F.silu(x))
    cfg.dtype = "fp16"
    cfg.act = "gelu"
    assert cfg.dtype is torch.float16 and cfg.act is F.gelu
    cfg.act = FunctionRef("squared_relu")
    from viaduct.models.common.activations import squared_relu

    assert cfg.act is squared_relu
    default = Everything(inner=Inner())  # class defaults are DType / FunctionRef objects
    assert default.dtype is torch.float32 and default.act is F.gelu
    # Either form compares, saves and reloads the same way.
    assert default == Everything(inner=Inner(), dtype=DType("fp32"), act=FunctionRef("gelu"))
    back = Everything.from_dict(cfg.to_dict())
    assert back == cfg and back.dtype is torch.float16 and back.act is squared_relu
    assert cfg.to_dict()["dtype"] == {"_target_": "torch.float16", "_call_": False}
    assert cfg.source_of("dtype").startswith("python ")


def test_a_lambda_cannot_be_saved():
    cfg = Everything(inner=Inner(), table={"f": lambda x: x})
    with pytest.raises(ConfigError, match="table.*no importable name"):
        cfg.to_dict()


def test_from_dict_reports_every_unknown_key_with_suggestions():
    data = everything_full().to_dict()
    data["inner"]["iter"] = 3
    data["inner"]["lrr"] = 1
    data["colour"] = "red"
    with pytest.raises(ConfigError) as info:
        Everything.from_dict(data)
    text = str(info.value)
    assert len(info.value.problems) == 3
    assert "inner.iter: no such field in Inner" in text and "did you mean iters" in text
    assert "inner.lrr" in text and "did you mean lr" in text
    assert "colour" in text and "did you mean color" in text


def test_lenient_mode_drops_and_reports_unknown_keys():
    data = everything_full().to_dict()
    data["inner"]["old_knob"] = 3
    data["gone"] = True
    with pytest.warns(ConfigWarning, match=r"dropped 2 unknown key\(s\): inner.old_knob, gone"):
        cfg = Everything.from_dict(data, strict=False)
    assert cfg == everything_full()


def test_wrong_types_and_missing_required_fields_are_all_reported():
    with pytest.raises(ConfigError) as info:
        Everything.from_dict({"inner": {"iters": "many", "style": "cosin", "flag": "maybe"}, "dtype": "fp7"})
    text = str(info.value)
    assert "inner.iters: expected an integer, got str 'many'" in text
    assert "inner.style: must be one of 'linear', 'cosine'" in text and "did you mean cosine" in text
    assert "inner.flag: expected true or false" in text
    assert "dtype: 'fp7' is not a dtype" in text
    with pytest.raises(ConfigError, match="inner: required field of Everything is missing"):
        Everything.from_dict({})


def test_abstract_union_needs_a_target_or_name():
    with pytest.raises(ConfigError, match="Plugin has several kinds"):
        Everything.from_dict({"inner": {}, "plugin": {"rank": 4}})
    cfg = Everything.from_dict({"inner": {}, "plugin": "a"})
    assert isinstance(cfg.plugin, PluginA)
    with pytest.raises(ConfigError, match="does not name a Plugin.*did you mean a"):
        Everything.from_dict({"inner": {}, "plugin": "aa"})


def test_provenance_records_defaults_python_and_loader():
    cfg = Everything(inner=Inner(iters=3))
    assert cfg.inner.source_of("lr") == "default"
    assert cfg.inner.source_of("iters").startswith("python ") and "test_base.py" in cfg.inner.source_of(
        "iters"
    )
    cfg.inner.lr = 0.1
    line = cfg.inner.source_of("lr")
    assert line.startswith("python ") and line.endswith(str(_lineno() - 2))


def _lineno() -> int:
    import inspect

    return inspect.currentframe().f_back.f_lineno


def test_print_yaml_with_provenance(tmp_path):
    path = tmp_path / "c.yaml"
    everything_full().to_yaml(path)
    cfg = Everything.from_yaml(path)
    buf = io.StringIO()
    cfg.print_yaml(provenance=True, file=buf)
    text = buf.getvalue()
    iters_line = next(i for i, line in enumerate(path.read_text().splitlines(), 1) if "iters: 3" in line)
    assert f"iters: 3  # file {path}:{iters_line}" in text
    buf = io.StringIO()
    Everything(inner=Inner(iters=3)).print_yaml(provenance=True, file=buf)
    assert "fp8: null  # default" in buf.getvalue()
    assert "iters: 3  # python " in buf.getvalue()


def test_check_types_flags_python_assignments_and_unsupported_settings():
    cfg = Everything(inner=Inner())
    cfg.inner.iters = "5"
    cfg.fp8 = "e4m3"
    cfg.window = (1, 2, 3)
    problems = {p.path: p for p in cfg.check_types()}
    assert problems["inner.iters"].message.startswith("expected int")
    assert problems["fp8"].message == "FP8 training is not supported yet"
    assert "leave fp8 at its default" in problems["fp8"].fix
    assert problems["window"].message == "expected 2 items, got 3"


def test_fields_with_problems_names_the_field_of_each_problem():
    from viaduct.config import Problem, fields_with_problems

    problems = [
        Problem("num_layers", "expected int, got str 'x'"),
        Problem("model.hidden_size", "must be set"),
        Problem("target_modules[0]", "must be a module name, not empty"),
    ]
    assert fields_with_problems(problems) == {"num_layers", "model", "target_modules"}
    assert fields_with_problems([]) == set()


def test_fields_of_a_compatibility_base_are_listed_last():
    import dataclasses
    from typing import ClassVar

    from viaduct.config import ConfigBase

    @dataclasses.dataclass(kw_only=True)
    class ListingCompat(ConfigBase):
        _fields_listed_last_: ClassVar[bool] = True
        old_knob: int = 0
        """Kept for compatibility."""

    @dataclasses.dataclass(kw_only=True)
    class ListingReal(ListingCompat):
        width: int = 1
        """Used."""

    @dataclasses.dataclass(kw_only=True)
    class ListingMoreReal(ListingReal):
        depth: int = 2
        """Used too."""

    # A dataclass lists a base's fields first; the listing puts the compatibility ones at the end.
    assert [f.name for f in dataclasses.fields(ListingMoreReal)] == ["old_knob", "width", "depth"]
    assert list(ListingMoreReal.spec().fields) == ["width", "depth", "old_knob"]
    assert list(ListingMoreReal().to_dict()) == ["_target_", "width", "depth", "old_knob"]
