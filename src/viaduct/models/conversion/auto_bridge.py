"""`AutoBridge`: Hugging Face checkpoints in and out of viaduct's GPT model (Megatron Bridge's API).

    bridge = AutoBridge.from_hf_pretrained("path/to/Llama-3.2-1B")
    provider = bridge.to_megatron_provider()     # the viaduct provider, field by field from config.json
    model = provider.provide()                   # built, then the Hugging Face weights copied in
    bridge.save_hf_pretrained(model, "out/")     # back to a Hugging Face directory

Weights stream tensor by tensor (one Hugging Face tensor set in memory at a time), into a whole model, a
pipeline stage (only its layers' tensors are read) or DTensor-sharded parameters (only the local
shard is written).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from viaduct.config import ConfigError, DType, FunctionRef, Problem
from viaduct.models.conversion.hf_config import (
    HFModelSpec,
    parse_hf_config,
)
from viaduct.models.conversion.mamba_config import STATE_SPACES
from viaduct.models.conversion.mamba_mapping import refuse_pickled_only
from viaduct.models.conversion.mapping import (
    ParamMapping,
    hf_name_candidates,
    is_ignored,
    param_mappings,
)
from viaduct.models.conversion.safetensors_io import (
    FLOAT_DTYPES,
    INDEX_FILE,
    SINGLE_FILE,
    SafetensorsReader,
    ShardedWriter,
    publish,
    staging_directory,
)
from viaduct.models.gpt.provider import GPTModelProvider
from viaduct.peft.transform import is_adapter_name

CONFIG_FILE = "config.json"
TOKENIZER_FILES: tuple[str, ...] = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)
"""Files copied from the source directory into an exported one (tokenizer and generation defaults)."""
_MAX_CONFIG_BYTES = 16 * 2**20
# A Hub model id: "name" or "owner/name" (what snapshot_download accepts).
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


class AutoBridge:
    """A Hugging Face model's config (and, from a directory, its weights) and how it maps to viaduct.

    Make one with `from_hf_pretrained` (a directory or Hub id: config and weights) or `from_hf_config`
    (a config only: `to_megatron_provider(load_weights=False)` and exports).
    """

    def __init__(
        self,
        hf_config: Mapping[str, Any],
        *,
        hf_path: Path | None = None,
        torch_dtype: torch.dtype | str | None = None,
        source: str = "config",
    ) -> None:
        self.hf_config: dict[str, Any] = dict(hf_config)
        """The Hugging Face config (plain dict), as read."""
        self.hf_path: Path | None = hf_path
        """The Hugging Face model directory the weights come from (None: config only)."""
        self._spec: HFModelSpec = parse_hf_config(self.hf_config, source)
        if torch_dtype is not None:
            name = DType.canonical_name(torch_dtype)
            if name not in ("float32", "bfloat16", "float16"):
                raise ConfigError(
                    Problem("torch_dtype", "must be float32, bfloat16 or float16", torch_dtype),
                    header="AutoBridge",
                )
            self._spec.fields.update(params_dtype=name, bf16=name == "bfloat16", fp16=name == "float16")

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_hf_pretrained(
        cls, path: str | os.PathLike[str], torch_dtype: torch.dtype | str | None = None
    ) -> AutoBridge:
        """A local Hugging Face model directory (config.json, *.safetensors, optional index and
        tokenizer files), or a Hub id that is not a local directory (downloaded with
        `huggingface_hub.snapshot_download`; never remote code). `torch_dtype` overrides the config's
        dtype as the provider's params_dtype."""
        directory = Path(path)
        if not directory.is_dir():
            if directory.exists():
                raise ConfigError(
                    Problem("path", "is not a directory", str(path), fix="pass the model directory"),
                    header="AutoBridge.from_hf_pretrained",
                )
            if isinstance(path, str) and _HUB_ID.match(path) and "/" in path:
                directory = _download(path)
            else:
                raise ConfigError(
                    Problem(
                        "path",
                        "does not exist (neither a local directory nor a Hub id owner/name)",
                        str(path),
                        fix="pass a Hugging Face model directory",
                    ),
                    header="AutoBridge.from_hf_pretrained",
                )
        config_path = directory / CONFIG_FILE
        return cls(
            read_config_json(config_path),
            hf_path=directory,
            torch_dtype=torch_dtype,
            source=f"file {config_path}",
        )

    @classmethod
    def from_hf_config(cls, config: Mapping[str, Any] | object) -> AutoBridge:
        """From a config alone: a dict, or an object with `to_dict()` (a transformers PretrainedConfig)."""
        return cls(
            _config_dict(config), source=f"the config given to from_hf_config ({type(config).__name__})"
        )

    @staticmethod
    def supports(config: Mapping[str, Any] | object) -> bool:
        """Whether the config converts: a supported architecture with values viaduct reproduces."""
        try:
            parse_hf_config(_config_dict(config))
        except ValueError:
            return False
        return True

    # ------------------------------------------------------------------ provider

    @property
    def architecture(self) -> str:
        """The Hugging Face architecture (one of SUPPORTED_ARCHITECTURES)."""
        return self._spec.architecture

    def _provider(self) -> GPTModelProvider:
        fields = dict(self._spec.fields)
        fields["activation_func"] = FunctionRef(fields["activation_func"])
        fields["params_dtype"] = DType(fields["params_dtype"])
        if self.hf_path is not None and "hf_model_id" not in fields:
            fields["hf_model_id"] = str(self.hf_path)
        provider = self._spec.provider_cls(**fields)
        provider.finalize()
        return provider

    def to_megatron_provider(self, load_weights: bool = True) -> GPTModelProvider:
        """The viaduct provider of this model's family, every architecture field set from the config.

        With `load_weights`, this provider's `provide()` (same arguments, pipeline stages included)
        returns the model with the Hugging Face weights copied in (vocabulary padding rows keep their
        initialization). The loading is attached to this provider object: a copy made with
        `dataclasses.replace` or through YAML builds randomly initialized weights (call
        `load_hf_weights` on its model).
        """
        provider = self._provider()
        if load_weights:
            if self.hf_path is None:
                raise ConfigError(
                    Problem(
                        "load_weights",
                        "this bridge has a config only (from_hf_config): there are no weights to load",
                        True,
                        fix="use AutoBridge.from_hf_pretrained(directory), or load_weights=False",
                    ),
                    header="AutoBridge.to_megatron_provider",
                )
            # An instance attribute shadows the class's provide() (it is not a config field: YAML and
            # to_dict() do not see it).
            object.__setattr__(provider, "provide", ProvideWithHFWeights(provider, self))
        return provider

    # ------------------------------------------------------------------ import

    def load_hf_weights(self, model: nn.Module, hf_path: str | os.PathLike[str] | None = None) -> None:
        """Copy the Hugging Face weights into `model`'s parameters in place, tensor by tensor.

        `model`: a whole GPTModel, a pipeline stage of one (only its parameters are read), or one whose
        parameters are DTensors (each process copies its local shard). Every parameter must have its
        tensors, every tensor of the checkpoint must belong to the model, and shapes and dtypes must
        match; otherwise a `ConfigError` lists every missing, unexpected and mismatched tensor.
        """
        directory = Path(hf_path) if hf_path is not None else self.hf_path
        if directory is None:
            raise ConfigError(
                Problem("hf_path", "is required: this bridge was made from a config only", None),
                header="AutoBridge.load_hf_weights",
            )
        if not directory.is_dir():
            raise ConfigError(
                Problem("hf_path", "is not a directory", str(directory)), header="AutoBridge.load_hf_weights"
            )
        arch = self.architecture
        cfg = self._provider()
        mappings = param_mappings(arch, cfg)
        # PEFT adapters are not base weights: they keep their own initialization.
        params = {n: p for n, p in _named_parameters(model).items() if not is_adapter_name(n)}
        refuse_pickled_only(arch, directory)
        with SafetensorsReader(directory) as reader:
            available = set(reader.names())
            problems: list[Problem] = []
            resolved: dict[str, str] = {}  # expected Hugging Face name -> name in the checkpoint
            for pm in mappings.values():
                for hf in pm.hf:
                    found = next((c for c in hf_name_candidates(arch, hf) if c in available), None)
                    if found is not None:
                        resolved[hf] = found
            used = set(resolved.values())
            extra = "lm_head.weight" if cfg.share_embeddings_and_output_weights else None
            unexpected = sorted(
                n for n in available if n not in used and n != extra and not is_ignored(arch, n)
            )
            for n in unexpected:
                problems.append(
                    Problem(
                        n,
                        f"is in the checkpoint ({reader.file_of(n).name}) but no parameter of a "
                        f"{arch} with this config.json takes it",
                        fix="check that config.json belongs to these weights",
                    )
                )
            for name, param in params.items():
                found_pm = mappings.get(name)
                if found_pm is None:
                    problems.append(
                        Problem(
                            name,
                            f"model parameter {tuple(param.shape)} has no Hugging Face tensor in a {arch} "
                            "with this config.json",
                            fix="build the model from this bridge's provider (to_megatron_provider())",
                        )
                    )
                    continue
                problems += _check_param(found_pm, param, reader, resolved)
            if problems:
                raise ConfigError(problems, header=f"AutoBridge: cannot load the weights in {directory}")
            with torch.no_grad():
                for name, param in params.items():
                    pm = mappings[name]
                    views = pm.megatron_views(param)
                    if views is not None:
                        # Straight from the file into the parameter's rows: no merged copy, no
                        # memory-mapped pages left resident (see SafetensorsReader.read_into).
                        for hf, view in zip(pm.hf, views, strict=True):
                            reader.read_into(resolved[hf], view)
                        continue
                    merged = pm.to_megatron([reader.tensor(resolved[hf]) for hf in pm.hf])
                    _copy_into(param, merged)

    # ------------------------------------------------------------------ export

    def export_hf_weights(self, model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
        """(Hugging Face name, tensor) for each of `model`'s parameters, one at a time: fused QKV and
        gate/up split back, vocabulary padding stripped, DTensors gathered parameter by parameter. A
        pipeline stage yields its own tensors (the last stage's copy of a tied embedding is skipped)."""
        mappings = param_mappings(self.architecture, self._provider())
        inner = _unwrap(model)
        tied_copy = getattr(inner, "tied_output_weight", None)
        skip = tied_copy() if callable(tied_copy) else None
        for name, param in _named_parameters(model).items():
            if skip is not None and param is skip:
                continue
            if is_adapter_name(name):
                raise ConfigError(
                    Problem(
                        name,
                        "is a PEFT adapter tensor, which a Hugging Face model has no place for",
                        fix="merge the adapters first (peft.merge(model), or viaduct peft merge), or export "
                        "them alone with peft.save_hf_adapter",
                    ),
                    header="AutoBridge.export_hf_weights",
                )
            pm = mappings.get(name)
            if pm is None:
                raise ConfigError(
                    Problem(name, f"model parameter has no Hugging Face tensor in a {self.architecture}"),
                    header="AutoBridge.export_hf_weights",
                )
            full = _full_tensor(param).detach()
            expected = pm.megatron_shape()
            if pm.vocab_rows and full.shape[0] >= expected[0]:
                full = full[: expected[0]]
            if tuple(full.shape) != expected:
                raise ConfigError(
                    Problem(name, f"has shape {tuple(full.shape)}, the Hugging Face config needs {expected}"),
                    header="AutoBridge.export_hf_weights",
                )
            yield from zip(pm.hf, pm.to_hf(full), strict=True)

    # ------------------------------------------------------------------ checkpoints

    @classmethod
    def import_ckpt(
        cls,
        hf_model_id: str | os.PathLike[str],
        megatron_path: str | os.PathLike[str],
        torch_dtype: torch.dtype | str | None = None,
    ) -> Path:
        """Convert a Hugging Face model (directory or Hub id) into a viaduct checkpoint under
        `megatron_path`; returns its iter_0000000 directory (`viaduct checkpoint import-hf`)."""
        from viaduct.training.checkpoint.hf import import_hf_checkpoint

        return import_hf_checkpoint(hf_model_id, megatron_path, torch_dtype=torch_dtype)

    def export_ckpt(
        self,
        megatron_path: str | os.PathLike[str],
        hf_path: str | os.PathLike[str],
        *,
        max_shard_size: int = 5 * 2**30,
    ) -> Path:
        """Write the weights of the viaduct checkpoint `megatron_path` (a root: its latest; or one
        iter_N directory) as a Hugging Face directory with this bridge's config (`viaduct checkpoint
        export-hf` picks the config itself)."""
        from viaduct.training.checkpoint.hf import export_hf_checkpoint

        return export_hf_checkpoint(megatron_path, hf_path, max_shard_size=max_shard_size, bridge=self)

    def save_hf_pretrained(
        self, model: nn.Module, path: str | os.PathLike[str], *, max_shard_size: int = 5 * 2**30
    ) -> None:
        """Write `model` as a Hugging Face model directory: config.json (this bridge's config with the
        weights' dtype), safetensors shards of at most `max_shard_size` bytes named like Hugging Face's
        plus model.safetensors.index.json (a single model.safetensors when it fits), and the tokenizer
        files of the source directory. Written in a temporary directory next to `path`, then renamed
        into place (an existing directory is replaced only once the new one is complete)."""
        target = Path(path)
        mappings = param_mappings(self.architecture, self._provider())
        expected = {hf for pm in mappings.values() for hf in pm.hf}
        staging = staging_directory(target)
        try:
            writer = ShardedWriter(staging, max_shard_size)
            written: set[str] = set()
            dtype: torch.dtype | None = None
            for name, tensor in self.export_hf_weights(model):
                writer.add(name, tensor)
                written.add(name)
                dtype = dtype or tensor.dtype
            missing = sorted(expected - written)
            if missing:
                raise ConfigError(
                    [Problem(n, "the model has no parameter for this tensor") for n in missing],
                    header="AutoBridge.save_hf_pretrained: the model is not whole (a pipeline stage?); "
                    "export needs every parameter",
                )
            writer.finish()
            config = dict(self.hf_config)
            # mamba_ssm builds its config class from every key: it takes no dtype.
            if dtype is not None and self.architecture != STATE_SPACES:
                name = str(dtype).removeprefix("torch.")
                config["torch_dtype"] = name
                if "dtype" in config:
                    config["dtype"] = name
            (staging / CONFIG_FILE).write_text(
                json.dumps(config, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8"
            )
            if self.hf_path is not None:
                for file in TOKENIZER_FILES:
                    src = self.hf_path / file
                    if src.is_file():
                        shutil.copyfile(src, staging / file)
            publish(staging, target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise


# ---------------------------------------------------------------------------- helpers


def read_config_json(path: Path) -> dict[str, Any]:
    """A Hugging Face config.json as a dict (size-limited, JSON only), or a `ConfigError` naming it."""
    header = "AutoBridge: cannot read the Hugging Face config"
    if not path.is_file():
        raise ConfigError(
            Problem(
                str(path), "does not exist", fix="point at a Hugging Face model directory (with config.json)"
            ),
            header=header,
        )
    if path.stat().st_size > _MAX_CONFIG_BYTES:
        raise ConfigError(Problem(str(path), f"is larger than {_MAX_CONFIG_BYTES} bytes"), header=header)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ConfigError(
            Problem(f"{path}:{e.lineno}", f"is not valid JSON: {e.msg}"), header=header
        ) from None
    except UnicodeDecodeError as e:
        raise ConfigError(Problem(str(path), f"is not UTF-8 text: {e}"), header=header) from None
    if not isinstance(data, dict):
        raise ConfigError(Problem(str(path), "must hold a JSON object", type(data).__name__), header=header)
    return data


def _config_dict(config: Mapping[str, Any] | object) -> dict[str, Any]:
    if isinstance(config, Mapping):
        return dict(config)
    to_dict = getattr(config, "to_dict", None)
    if callable(to_dict):
        data = to_dict()
        if isinstance(data, Mapping):
            return dict(data)
    raise ConfigError(
        Problem(
            "config",
            "must be a dict or have to_dict() (a transformers PretrainedConfig)",
            type(config).__name__,
        ),
        header="AutoBridge",
    )


def _download(repo_id: str) -> Path:
    """snapshot_download of the files a conversion reads; any failure becomes one clear error."""
    fix = (
        f"download it first, e.g. `huggingface-cli download {repo_id} --local-dir DIR`, "
        "and pass DIR (or check the name)"
    )
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ConfigError(
            Problem(
                "path",
                "is not a local directory, and huggingface_hub is not installed to fetch it",
                repo_id,
                fix=fix,
            ),
            header="AutoBridge.from_hf_pretrained",
        ) from None
    try:
        local = snapshot_download(
            repo_id,
            allow_patterns=[CONFIG_FILE, SINGLE_FILE, INDEX_FILE, "*.safetensors", *TOKENIZER_FILES],
        )
    except Exception as e:  # network, authentication, offline mode, unknown repository
        raise ConfigError(
            Problem(
                "path",
                f"is not a local directory, and downloading it from the Hugging Face Hub failed "
                f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})",
                repo_id,
                fix=fix,
            ),
            header="AutoBridge.from_hf_pretrained",
        ) from None
    return Path(local)


class ProvideWithHFWeights:
    """The `provide` of a provider from `to_megatron_provider(load_weights=True)`: the class's
    `GPTModelProvider.provide` (same arguments), then the bridge's weights copied into the model.

    It pickles and deep-copies along with its provider (the copy's own fields build the copy's model);
    a shallow `copy.copy` of the provider would share it, still bound to the original.
    """

    def __init__(self, provider: GPTModelProvider, bridge: AutoBridge) -> None:
        self.provider, self.bridge = provider, bridge

    def __call__(
        self,
        pre_process: bool | None = None,
        post_process: bool | None = None,
        vp_stage: int | None = None,
        *,
        pp_rank: int | None = None,
        device: Any = None,
        init_seed: int | None = None,
    ) -> nn.Module:
        provider = self.provider
        model = type(provider).provide(
            provider, pre_process, post_process, vp_stage, pp_rank=pp_rank, device=device, init_seed=init_seed
        )
        if any(p.is_meta for p in model.parameters()):
            raise ConfigError(
                Problem(
                    "init_model_with_meta_device",
                    "the model was built on the meta device, which holds no values to load weights into",
                    True,
                    fix="materialize it (model.to_empty(...)) and call bridge.load_hf_weights(model), "
                    "or use to_megatron_provider(load_weights=False) for that flow",
                ),
                header="AutoBridge: provide() with Hugging Face weights",
            )
        self.bridge.load_hf_weights(model)
        return model

    def __reduce__(self) -> tuple[type[ProvideWithHFWeights], tuple[GPTModelProvider, AutoBridge]]:
        # Rebuilt from its parts, so deepcopy and pickle rebind it to the copied provider.
        return (ProvideWithHFWeights, (self.provider, self.bridge))


def _check_param(
    pm: ParamMapping, param: torch.Tensor, reader: SafetensorsReader, resolved: dict[str, str]
) -> list[Problem]:
    """Every problem with loading `pm`'s tensors into `param`, from the file headers alone."""
    problems: list[Problem] = []
    for hf, shape in zip(pm.hf, pm.hf_shapes, strict=True):
        name = resolved.get(hf)
        if name is None:
            problems.append(
                Problem(
                    hf,
                    f"is missing from the checkpoint (needed for {pm.megatron})",
                    fix="check the model files",
                )
            )
            continue
        dtype, got = reader.info(name)
        file = reader.file_of(name).name
        if got != shape:
            problems.append(
                Problem(
                    name,
                    f"in {file} has shape {got}; this config.json needs {shape}",
                    fix="check config.json",
                )
            )
        if dtype not in FLOAT_DTYPES:
            problems.append(
                Problem(name, f"in {file} has dtype {dtype}; weights must be {'/'.join(FLOAT_DTYPES)}")
            )
    expected = pm.megatron_shape()
    got_param = tuple(param.shape)
    ok = (
        got_param[0] >= expected[0] and got_param[1:] == expected[1:]
        if pm.vocab_rows and len(got_param) == len(expected)
        else got_param == expected
    )
    if not ok:
        problems.append(
            Problem(
                pm.megatron,
                f"model parameter has shape {got_param}; the Hugging Face tensors "
                f"{', '.join(pm.hf)} make {expected}",
                fix="build the model from this bridge's provider (to_megatron_provider())",
            )
        )
    return problems


# Wrappers that prefix parameter names: DistributedDataParallel ("module.") and torch.compile
# ("_orig_mod.").
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def _unwrap(model: nn.Module) -> nn.Module:
    while True:
        inner = getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            inner = getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def _named_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's parameters by their names in the bare model (wrapper prefixes removed)."""
    out: dict[str, torch.Tensor] = {}
    for name, param in model.named_parameters():
        while name.startswith(_WRAPPER_PREFIXES):
            name = name.split(".", 1)[1]
        out[name] = param
    return out


def _is_dtensor(t: torch.Tensor) -> bool:
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)


def _full_tensor(param: torch.Tensor) -> torch.Tensor:
    return param.full_tensor() if _is_dtensor(param) else param  # type: ignore[attr-defined]


def _copy_into(param: torch.Tensor, full: torch.Tensor) -> None:
    """Copy `full` (the whole Hugging Face-shaped tensor, maybe fewer rows than a vocabulary-padded
    parameter) into the part of `param` this process holds (its local shard for a DTensor)."""
    if not _is_dtensor(param):
        param[: full.shape[0]].copy_(full)
        return
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    local: torch.Tensor = param.to_local()  # type: ignore[attr-defined]
    shape, offset = compute_local_shape_and_global_offset(
        param.shape,
        param.device_mesh,  # type: ignore[attr-defined]
        param.placements,  # type: ignore[attr-defined]
    )
    src, dst = full, local
    for dim, (start, length) in enumerate(zip(offset, shape, strict=True)):
        # Rows past the Hugging Face tensor (vocabulary padding) keep their initialization.
        stop = min(start + length, src.shape[dim]) if dim == 0 else start + length
        n = max(stop - start, 0)
        src, dst = src.narrow(dim, min(start, src.shape[dim]), n), dst.narrow(dim, 0, n)
    dst.copy_(src)
