"""Once torch is imported, dtype and function fields hold the torch objects themselves."""

import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from viaduct.config import DType, FunctionRef, apply_overrides
from viaduct.models.common.activations import squared_relu
from viaduct.recipes import DEFAULT_RECIPE, get_recipe
from viaduct.training.config import ConfigContainer

from .sample import Everything, Inner


def test_recipe_values_are_usable_by_torch():
    cfg = get_recipe("llama32_1b")()
    assert cfg.model.params_dtype is torch.float32 and cfg.model.activation_func is F.silu
    assert torch.zeros(2, dtype=cfg.model.params_dtype).dtype is torch.float32
    cfg.validate()  # the recipe's bf16_mixed sets the model's dtype
    assert cfg.model.params_dtype is torch.bfloat16 and cfg.optimizer.params_dtype is torch.bfloat16
    assert torch.zeros(2, dtype=cfg.model.params_dtype).dtype is torch.bfloat16


def test_assignment_overrides_and_yaml_give_torch_objects(tmp_path):
    cfg = get_recipe(DEFAULT_RECIPE)()
    cfg.model.params_dtype = torch.bfloat16
    assert cfg.model.params_dtype is torch.bfloat16
    cfg.model.params_dtype = "fp16"
    assert cfg.model.params_dtype is torch.float16
    apply_overrides(cfg, ["model.params_dtype=bf16", "model.activation_func=squared_relu"])
    assert cfg.model.params_dtype is torch.bfloat16 and cfg.model.activation_func is squared_relu
    path = tmp_path / "run.yaml"
    cfg.to_yaml(path)
    back = ConfigContainer.from_yaml(path)
    assert back.model.params_dtype is torch.bfloat16 and back.model.activation_func is squared_relu
    assert back == cfg
    assert back.model.source_of("params_dtype") == f"file {path}:{_line_of(path, 'params_dtype:')}"


def _line_of(path, needle: str) -> int:
    return next(i for i, line in enumerate(path.read_text().splitlines(), 1) if needle in line.strip()[:40])


def test_validate_turns_leftover_names_into_torch_objects():
    cfg = get_recipe(DEFAULT_RECIPE)()
    # Values stored before torch was imported look like this; validate() hands torch the real ones.
    object.__setattr__(cfg.model, "params_dtype", DType("bf16"))
    object.__setattr__(cfg.model, "activation_func", FunctionRef("silu"))
    cfg.validate()
    assert cfg.model.params_dtype is torch.bfloat16 and cfg.model.activation_func is F.silu


@pytest.mark.slow
def test_values_built_before_torch_is_imported():
    code = textwrap.dedent(
        """
        import sys
        from viaduct.recipes import get_recipe
        from viaduct.config import DType, FunctionRef
        cfg = get_recipe("llama32_1b")()
        cfg.validate()
        assert "torch" not in sys.modules
        assert type(cfg.model.params_dtype) is DType and type(cfg.model.activation_func) is FunctionRef
        import torch, torch.nn.functional as F
        assert cfg.model.params_dtype == torch.bfloat16  # equal already, and after validate() identical
        cfg.validate()
        assert cfg.model.params_dtype is torch.bfloat16 and cfg.model.activation_func is F.silu
        assert torch.zeros(1, dtype=cfg.model.params_dtype).dtype is torch.bfloat16
        print("ok")
        """
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_torch_functions_save_under_the_name_they_load_by():
    for fn in (F.softplus, torch.sigmoid, torch.tanh, F.gelu, F.silu):
        cfg = Everything(inner=Inner(), act=fn)
        back = Everything.from_dict(cfg.to_dict())
        assert back.act is fn, fn
