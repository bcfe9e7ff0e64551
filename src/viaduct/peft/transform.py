"""Applying a PEFT method to a model: matching, freezing, wrapping, merging, adapter state and the
Hugging Face PEFT export. `PEFT.__call__` and its methods call these (see docs/peft.md)."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from viaduct.config import ConfigError, Problem
from viaduct.config.types import torch_dtype
from viaduct.peft.adapters import AdaptedLinear, DoRAAdapter, DoRALinear, LoRALinear, LowRankAdapter

if TYPE_CHECKING:
    from viaduct.models.conversion.mapping import ParamMapping
    from viaduct.models.gpt.provider import GPTModelProvider
    from viaduct.peft.dora import DoRA
    from viaduct.peft.lora import LoRA

ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"


def _chunks(model: nn.Module | list[nn.Module]) -> list[nn.Module]:
    """A model, or the chunks of a pipeline-parallel model (Megatron Bridge accepts both)."""
    return list(model) if isinstance(model, list) else [model]


def candidate_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """The linear layers an adapter may go on, by full name: every `nn.Linear` except the model's
    output layer, which `GPTModel` reads as a weight (the loss multiplies by it directly, fused or
    tensor parallel), never by calling the layer, so an adapter on it would be silently skipped."""
    outputs = _output_layers(model)
    return {
        name: m
        for name, m in model.named_modules()
        # an adapter's own linear_in / linear_out are never candidates
        if isinstance(m, nn.Linear) and id(m) not in outputs and name and ".adapter." not in f".{name}."
    }


def _output_layers(model: nn.Module) -> set[int]:
    """The output layers of the GPT models in `model` (wherever a wrapper put them), by id."""
    return {
        id(m.output_layer)
        for m in model.modules()
        if hasattr(m, "output_weight") and isinstance(getattr(m, "output_layer", None), nn.Linear)
    }


def _matches(pattern: str, name: str) -> bool:
    """Megatron Bridge's rule: a pattern equal to the last name component matches, and so does one
    matching the full name where `*` stands for any characters, dots included (nothing else is
    special, so `?` or `[` in a pattern are taken literally, as in Bridge)."""
    if name.rsplit(".", 1)[-1] == pattern:
        return True
    regex = ".*".join(re.escape(part) for part in pattern.split("*"))
    return re.fullmatch(regex, name) is not None


def layer_linears(provider: GPTModelProvider) -> dict[str, tuple[int, int]]:
    """The linear layers a GPT model of `provider` has for adapters, by full name, with their
    (in, out) features: the model as one process builds it, known without building it. A hybrid
    model's layers have their kind's: a Mamba layer its mixer's in_proj and out_proj, an attention
    layer linear_qkv and linear_proj, an MLP layer linear_fc1 and linear_fc2."""
    from viaduct.models.mamba.provider import HybridModelProvider

    provider.finalize()
    assert provider.kv_channels is not None and provider.num_query_groups is not None
    assert provider.ffn_hidden_size is not None
    h, d, ffn = provider.hidden_size, provider.kv_channels, provider.ffn_hidden_size
    qkv_out = (provider.num_attention_heads + 2 * provider.num_query_groups) * d
    fc1_out = 2 * ffn if provider.gated_linear_unit else ffn
    kinds = "T" * provider.num_layers  # T: a transformer layer
    if isinstance(provider, HybridModelProvider):
        kinds = provider.layer_pattern()
    out: dict[str, tuple[int, int]] = {}
    for i, kind in enumerate(kinds):
        layer = f"decoder.layers.{i}"
        if kind == "M":
            assert isinstance(provider, HybridModelProvider)
            d_inner = provider.mamba_heads() * provider.mamba_head_dim
            conv = d_inner + 2 * provider.mamba_num_groups * provider.mamba_state_dim
            out[f"{layer}.mixer.in_proj"] = (h, d_inner + conv + provider.mamba_heads())
            out[f"{layer}.mixer.out_proj"] = (d_inner, h)
        if kind in "T*":
            out[f"{layer}.self_attention.linear_qkv"] = (h, qkv_out)
            out[f"{layer}.self_attention.linear_proj"] = (provider.num_attention_heads * d, h)
        if kind in "T-":
            out[f"{layer}.mlp.linear_fc1"] = (h, fc1_out)
            out[f"{layer}.mlp.linear_fc2"] = (ffn, h)
    return out


def planned_adapters(peft: LoRA | DoRA, provider: GPTModelProvider) -> dict[str, tuple[int, int]]:
    """The layers `peft` would adapt on the whole model of `provider`, with their (in, out) features;
    `ConfigError` for a target that matches nothing (checked on the whole model, so that a pipeline
    stage holding none of a target's layers is fine)."""
    linears = layer_linears(provider)
    names = _choose(peft, [list(linears)], [])[0]
    return {n: linears[n] for n in names}


def adapter_parameter_count(peft: LoRA | DoRA, provider: GPTModelProvider) -> int:
    """Parameters of the adapters `peft` adds to the whole model of `provider`."""
    from viaduct.peft.dora import DoRA

    extra = isinstance(peft, DoRA)
    return sum(
        peft.dim * (fin + fout) + (fout if extra else 0)
        for fin, fout in planned_adapters(peft, provider).values()
    )


def select_modules(peft: LoRA | DoRA, chunks: list[nn.Module], *, whole: bool = True) -> list[list[str]]:
    """The full names of the linear layers `peft` adapts in each chunk of a model. A target that
    matches in none of the chunks (Megatron Bridge checks the whole model too), or an explicit
    target on the output layer, is a `ConfigError` listing the names there are. `whole=False`: the
    chunks are one pipeline rank's part of the model, whose targets were checked on the whole
    (`planned_adapters`), so a target matching none of them is fine."""
    linears = [candidate_linears(c) for c in chunks]
    outputs = [n for c in chunks for n, m in c.named_modules() if id(m) in _output_layers(c)]
    if not whole:
        return [[n for n in found if _selected(peft, n)] for found in linears]
    return _choose(peft, [list(found) for found in linears], outputs)


def _selected(peft: LoRA | DoRA, name: str) -> bool:
    """Whether `peft` adapts the layer `name`: a target matches it, or (no targets) no exclusion does."""
    if peft.target_modules:
        return any(_matches(p, name) for p in peft.target_modules)
    return not any(_matches(p, name) for p in peft.exclude_modules)


def _choose(peft: LoRA | DoRA, linears: list[list[str]], outputs: list[str]) -> list[list[str]]:
    """`select_modules` on the chunks' candidate layer names; `outputs`: the output layers' names."""
    every = [n for found in linears for n in found]
    problems: list[Problem] = []
    chosen = [[n for n in found if _selected(peft, n)] for found in linears]
    if peft.target_modules:
        bare = sorted({n.rsplit(".", 1)[-1] for n in every})
        for i, pattern in enumerate(peft.target_modules):
            if any(_matches(pattern, n) for n in every):
                continue
            if any(_matches(pattern, n) for n in outputs):
                msg = "names the output layer, which takes no adapter (the loss reads its weight directly)"
            else:
                msg = "matches no linear layer of the model"
            example = every[0] if every else "decoder.layers.0.self_attention.linear_qkv"
            problems.append(
                Problem(
                    f"peft.target_modules[{i}]",
                    msg,
                    pattern,
                    fix=f"use one of {bare} or a wildcard on full names such as {example!r}",
                )
            )
    elif not any(chosen):
        problems.append(Problem("peft.exclude_modules", "excludes every linear layer", peft.exclude_modules))
    if problems:
        raise ConfigError(problems, header="PEFT: the model does not have the modules to adapt")
    return chosen


def _is_adapted(model: nn.Module) -> bool:
    return any(isinstance(m, AdaptedLinear) for m in model.modules())


def _set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


ADAPTER_MARK = ".adapter."
"""What every adapter parameter's name contains (`<layer>.adapter.linear_in.weight`), and no base
parameter's: the one rule that tells adapter tensors from base tensors (checkpoints, conversion)."""


def is_adapter_name(name: str) -> bool:
    """Whether a parameter (or state dict key) of an adapted model belongs to an adapter."""
    return ADAPTER_MARK in name


def _adapter_generator(seed: int, name: str) -> torch.Generator:
    from viaduct.models.gpt.model import part_seed

    return torch.Generator().manual_seed(part_seed(seed, f"adapter/{name}"))


def init_adapters(model: nn.Module | list[nn.Module], seed: int) -> None:
    """Draw every adapter's A and B afresh, each from its own generator seeded by `seed` and the
    layer's full name: the same values whatever the pipeline split, sharding, device or dtype (a model
    built on the meta device calls this once its storage exists)."""
    for chunk in _chunks(model):
        for name, module in adapted_modules(chunk).items():
            module.adapter.reset_parameters(_adapter_generator(seed, name))


def reset_magnitudes(model: nn.Module | list[nn.Module]) -> int:
    """DoRA: set each magnitude to its layer's current weight norm (after base weights were loaded
    into a model whose adapters were added before); returns how many layers were reset."""
    count = 0
    for chunk in _chunks(model):
        for module in adapted_modules(chunk).values():
            if isinstance(module, DoRALinear):
                module.reset_magnitude()
                count += 1
    return count


def draw_adapter_seed() -> int:
    """One seed for `init_adapters`, drawn from torch's global CPU generator (so the run's seed
    decides it, and every data-parallel rank draws the same)."""
    return int(torch.randint(0, 2**62, (), device="cpu"))


def apply(
    peft: LoRA | DoRA,
    model: nn.Module | list[nn.Module],
    training: bool,
    init_seed: int | None = None,
    *,
    whole: bool = True,
) -> None:
    """Freeze every parameter of `model` and put an adapter on each selected linear layer (in place).
    With `training` the adapters are trainable and the model is put in train mode; without, they are
    frozen too and the model is in eval mode. The adapters are drawn from `init_seed` (see
    `init_adapters`; None draws one from torch's global generator). `whole=False`: `model` is one
    pipeline rank's chunks (see `select_modules`)."""
    from viaduct.peft.dora import DoRA

    peft.finalize()
    seed = draw_adapter_seed() if init_seed is None else init_seed
    chunks = _chunks(model)
    if any(_is_adapted(c) for c in chunks):
        raise ValueError(
            "PEFT: the model already has adapters (a PEFT method was applied to it before); apply it once, "
            "or merge() the adapters first"
        )
    selected = select_modules(peft, chunks, whole=whole)
    is_dora = isinstance(peft, DoRA)
    lora_dtype = getattr(peft, "lora_dtype", None)
    for chunk, names in zip(chunks, selected, strict=True):
        for p in chunk.parameters():
            p.requires_grad_(False)
        for name in names:
            base = chunk.get_submodule(name)
            assert isinstance(base, nn.Linear)
            dtype = torch_dtype(lora_dtype) if lora_dtype is not None else base.weight.dtype
            kw = dict(
                dim=peft.dim,
                alpha=peft.alpha,
                dropout=peft.dropout,
                dropout_position=peft.dropout_position,
                a_init=peft.lora_A_init_method,
                b_init=peft.lora_B_init_method,
                dtype=dtype,
                device=base.weight.device,
                generator=_adapter_generator(seed, name),
            )
            adapter_cls = DoRAAdapter if is_dora else LowRankAdapter
            adapter = adapter_cls(base.in_features, base.out_features, **kw)  # type: ignore[arg-type]
            wrapped = DoRALinear(base, adapter) if is_dora else LoRALinear(base, adapter)
            wrapped.train(base.training)
            for p in adapter.parameters():
                p.requires_grad_(training)
            _set_module(chunk, name, wrapped)
        chunk.train(training)


def adapted_modules(model: nn.Module) -> dict[str, AdaptedLinear]:
    """The adapted linear layers of `model`, by full name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, AdaptedLinear)}


def _require_adapted(model: nn.Module, what: str) -> dict[str, AdaptedLinear]:
    found = adapted_modules(model)
    if not found:
        raise ValueError(
            f"PEFT.{what}: the model has no adapters; apply the method first (model = peft(model))"
        )
    return found


def merge(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and put the plain linear layers back (in place)."""
    for name, module in _require_adapted(model, "merge").items():
        _set_module(model, name, module.unwrap(merge=True))
    return model


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter tensors, by full parameter name (`...linear_qkv.adapter.linear_in.weight`)."""
    out: dict[str, torch.Tensor] = {}
    for name, module in _require_adapted(model, "adapter_state_dict").items():
        for pname, p in module.adapter.named_parameters():
            out[f"{name}.adapter.{pname}"] = p.detach()
    return out


def load_adapter_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Copy adapter tensors into the model's adapters; every name must be there, with its shape."""
    own = adapter_state_dict(model)
    problems: list[Problem] = []
    for name in sorted(set(own) - set(state)):
        problems.append(
            Problem(name, "missing from the adapter state", fix="save it with adapter_state_dict")
        )
    for name in sorted(set(state) - set(own)):
        problems.append(
            Problem(name, "is not an adapter tensor of this model", fix="check the PEFT targets and dim")
        )
    for name in sorted(set(own) & set(state)):
        t = state[name]
        if not isinstance(t, torch.Tensor):
            problems.append(Problem(name, "is not a tensor", type(t).__name__))
        elif tuple(t.shape) != tuple(own[name].shape):
            problems.append(
                Problem(
                    name,
                    f"has shape {tuple(t.shape)}, the model's adapter needs {tuple(own[name].shape)}",
                    fix="use the same PEFT dim and target modules as when it was saved",
                )
            )
    if problems:
        raise ConfigError(problems, header="PEFT.load_adapter_state_dict: the adapter state does not fit")
    with torch.no_grad():
        for name, t in own.items():
            t.copy_(state[name])


# ---------------------------------------------------------------------------- Hugging Face PEFT export


def _hf_layout(model: nn.Module) -> dict[str, ParamMapping]:
    """viaduct weight name -> its Hugging Face mapping, for the Llama-style layouts."""
    from viaduct.models.conversion.mapping import param_mappings
    from viaduct.models.gpt.provider import GPTModelProvider
    from viaduct.models.gpt2.provider import GPT2ModelProvider

    cfg = getattr(model, "config", None)
    if not isinstance(cfg, GPTModelProvider):
        raise ValueError("PEFT.save_hf_adapter: the model is not a viaduct GPTModel (no provider config)")
    if isinstance(cfg, GPT2ModelProvider) or not cfg.gated_linear_unit:
        raise ConfigError(
            Problem(
                "model",
                "the Hugging Face PEFT export covers Llama-family models (gated MLP, separate q/k/v)",
                type(cfg).__name__,
                fix="merge() the adapters and export the whole model with AutoBridge.save_hf_pretrained",
            )
        )
    return param_mappings("LlamaForCausalLM", cfg)


def hf_adapter_tensors(peft: LoRA | DoRA, model: nn.Module) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The Hugging Face PEFT tensors of the model's adapters (`base_model.model.<hf module>.lora_A.weight`,
    `lora_B.weight`, DoRA's `lora_magnitude_vector`) and the Hugging Face module names adapted.

    A fused layer's single adapter becomes one adapter per Hugging Face projection: each part takes
    the same A and its own rows of B (and of the magnitude), in Hugging Face's row order."""
    from viaduct.peft.dora import DoRA

    layout = _hf_layout(model)
    tensors: dict[str, torch.Tensor] = {}
    hf_modules: list[str] = []
    for name, module in _require_adapted(model, "save_hf_adapter").items():
        pm = layout.get(f"{name}.weight")
        if pm is None or pm.kind not in ("copy", "qkv", "gated"):
            raise ValueError(f"PEFT.save_hf_adapter: {name} has no Hugging Face counterpart to adapt")
        a = module.adapter.linear_in.weight.detach()
        b = module.adapter.linear_out.weight.detach()
        parts_b = pm.to_hf(b)
        parts_m = None
        if isinstance(peft, DoRA) and isinstance(module.adapter, DoRAAdapter):
            parts_m = pm.to_hf(module.adapter.weight_magnitude.detach())
        for i, hf_weight in enumerate(pm.hf):
            hf_module = hf_weight.removesuffix(".weight")
            hf_modules.append(hf_module)
            prefix = f"base_model.model.{hf_module}"
            tensors[f"{prefix}.lora_A.weight"] = a.clone().contiguous()
            tensors[f"{prefix}.lora_B.weight"] = parts_b[i].contiguous()
            if parts_m is not None:
                tensors[f"{prefix}.lora_magnitude_vector"] = parts_m[i].contiguous()
    return tensors, hf_modules


def _hf_target_modules(model: nn.Module, hf_modules: list[str]) -> list[str] | str:
    """Hugging Face PEFT's `target_modules`: the short names when every layer has the same adapted
    projections, else a regex of exactly the adapted modules (so loading adapts nothing more)."""
    from viaduct.models.transformer_config import TransformerConfig

    short = sorted({m.rsplit(".", 1)[-1] for m in hf_modules})
    cfg = getattr(model, "config", None)
    num_layers = cfg.num_layers if isinstance(cfg, TransformerConfig) else -1
    if len(hf_modules) == len(short) * num_layers:
        return short
    alternatives = "|".join(m.replace(".", r"\.") for m in sorted(hf_modules))
    return f"^({alternatives})$"


def save_hf_adapter(
    peft: LoRA | DoRA, model: nn.Module, path: str | os.PathLike[str], base_model_name_or_path: str | None
) -> None:
    """Write `adapter_config.json` and `adapter_model.safetensors` as Hugging Face PEFT reads them."""
    from safetensors.torch import save_file

    from viaduct.peft.dora import DoRA

    tensors, hf_modules = hf_adapter_tensors(peft, model)
    config = {
        "peft_type": "LORA",
        "use_dora": isinstance(peft, DoRA),
        "task_type": "CAUSAL_LM",
        "r": peft.dim,
        "lora_alpha": peft.alpha,
        "lora_dropout": peft.dropout,
        "target_modules": _hf_target_modules(model, hf_modules),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
        "base_model_name_or_path": base_model_name_or_path,
    }
    target = Path(path)
    target.mkdir(parents=True, exist_ok=True)
    save_file({k: v.cpu() for k, v in tensors.items()}, str(target / ADAPTER_WEIGHTS_FILE))
    text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    (target / ADAPTER_CONFIG_FILE).write_text(text, encoding="utf-8")
