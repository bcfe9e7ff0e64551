"""Loading a trained model for generation: `load_checkpoint(path)` -> `LoadedModel`.

`path` is a checkpoint root (the run's `checkpoint.save`, with its tracker: the latest checkpoint) or
one ``iter_NNNNNNN`` directory. The model is built from the run's saved ``run_config.yaml`` (read
through the allowlist of `load_saved_config`: no code runs) and its weights are read by the training
`Checkpointer` itself, weights only, in this one process: the same index checks, ``weights_only``
unpickling and upgrades of older layouts as a resume, and any parallel layout the run saved with
(torch.distributed.checkpoint reshards). The tokenizer is the run's (`build_tokenizer` of the saved
`tokenizer` section); when its files have moved, the copy saved in the checkpoint's ``tokenizer/``
directory is used.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch

from viaduct.config import ConfigError, Problem
from viaduct.data.tokenizers import Tokenizer, build_tokenizer
from viaduct.models.gpt.model import GPTModel
from viaduct.models.gpt.provider import GPTModelProvider
from viaduct.training.checkpoint import layout as L
from viaduct.training.checkpoint.resolve import find_checkpoint
from viaduct.training.config import ConfigContainer

log = logging.getLogger("viaduct")

_FIELD = "checkpoint"


@dataclasses.dataclass
class LoadedModel:
    """A trained model ready to generate, with its tokenizer and the run's configuration."""

    model: GPTModel
    """The whole model, in eval mode, on the device asked for."""
    tokenizer: Tokenizer
    """The run's tokenizer."""
    config: ConfigContainer
    """The configuration the run saved (its model section as built here: one process, no pipeline)."""
    directory: Path
    """The iter_N directory the weights came from."""


def _error(message: str, value: object, fix: str) -> ConfigError:
    return ConfigError(Problem(_FIELD, message, str(value), fix=fix), header="cannot load the checkpoint")


def find_checkpoint_directory(path: str | Path) -> Path:
    """The iter_N directory `path` designates (itself, or its root's latest); `ConfigError` otherwise."""
    p = Path(path).expanduser()
    fix = (
        "give a checkpoint root (the run's checkpoint.save, e.g. runs/tiny_gpt/checkpoints) "
        "or one iter_N directory"
    )
    if not p.exists():
        raise _error("no such directory", p, fix)
    if not p.is_dir():
        raise _error("not a directory", p, fix)
    found = find_checkpoint(p, _FIELD, None, verbose=False)  # CheckpointError when its tracker is broken
    if found is None:
        raise _error("holds no checkpoint (no iter_N directory, no tracker)", p, fix)
    return found


def _single_process(model: GPTModelProvider) -> None:
    """Build the whole model in one process: no pipeline stages, no context parallelism.

    Tensor parallelism needs no change: `provide()` builds full-size layers either way, and keeping
    its size keeps the vocabulary padding (hence the embedding's shape) the run saved.
    """
    model.pipeline_model_parallel_size = 1
    model.virtual_pipeline_model_parallel_size = None
    model.pipeline_model_parallel_layout = None
    model.microbatch_group_size_per_vp_stage = None
    model.context_parallel_size = 1
    model.sequence_parallel = False
    # The weights are about to be read: no meta-device build and no initialisation to throw away.
    model.init_model_with_meta_device = False
    model.perform_initialization = False


def _tokenizer_from(cfg: ConfigContainer, directory: Path) -> Tokenizer:
    """The run's tokenizer; local files that are gone are taken from the checkpoint's own copy."""
    from viaduct.training.checkpoint.rank0_files import with_saved_tokenizer_files

    for name in with_saved_tokenizer_files(cfg.tokenizer, directory):
        log.info("tokenizer.%s is gone: using the checkpoint's copy in %s", name, directory / L.TOKENIZER_DIR)
    return build_tokenizer(cfg.tokenizer)


def load_checkpoint(
    path: str | Path,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> LoadedModel:
    """The model, tokenizer and configuration of a viaduct checkpoint (see the module docstring).

    `device`: default CUDA when available, else the CPU. `dtype`: cast the loaded weights to it
    (default: as trained, the run's params_dtype). A PEFT run's adapter checkpoint gives its base
    with the adapters folded in. Every problem is a `ConfigError`.
    """
    directory = find_checkpoint_directory(path)
    dev = torch.device(device) if device is not None else _default_device()
    model, cfg, tokenizer = _build_and_load(directory, dev)
    if cfg.peft is not None:
        cfg.peft.merge(model)  # one weight per layer again: generation runs at the base model's speed
    if dtype is not None:
        model = model.to(dtype)
    model.eval()
    return LoadedModel(model=model, tokenizer=tokenizer, config=cfg, directory=directory)


def build_adapted_model(
    directory: Path, device: torch.device | str = "cpu"
) -> tuple[GPTModel, ConfigContainer]:
    """The model of a PEFT adapter checkpoint `directory` with its adapters in place (not merged), in
    eval mode, and the run's configuration."""
    model, cfg, _ = _build_and_load(find_checkpoint_directory(directory), torch.device(device))
    model.eval()
    return model, cfg


def _build_and_load(directory: Path, dev: torch.device) -> tuple[GPTModel, ConfigContainer, Tokenizer]:
    """Build the run's model on `dev` and read the checkpoint's weights into it (a PEFT run's: its
    base, then its adapters, left unmerged)."""
    from viaduct.distributed.init import DistributedContext
    from viaduct.training.checkpoint.checkpointer import Checkpointer
    from viaduct.training.checkpoint.config_check import load_saved_config
    from viaduct.training.state import TrainState

    run_config = directory / L.RUN_CONFIG
    if not run_config.is_file():
        raise _error(
            f"has no {L.RUN_CONFIG} to build the model from",
            directory,
            "load a checkpoint saved by viaduct (every save writes its run configuration)",
        )
    cfg = load_saved_config(run_config)
    provider = cfg.model
    if not isinstance(provider, GPTModelProvider):
        raise _error(
            f"its model ({type(provider).__name__}) is not a GPT decoder, the only model generation runs",
            directory,
            "load the checkpoint of a GPT-family model",
        )
    tokenizer = _tokenizer_from(cfg, directory)
    _single_process(provider)
    if provider.vocab_size is None:
        provider.derive("vocab_size", tokenizer.vocab_size, f"tokenizer ({cfg.tokenizer.tokenizer_type})")
    model = provider.provide(device=dev)
    peft = cfg.peft
    if peft is not None:
        # An adapter checkpoint: the adapters go on the base the run named.
        if not cfg.checkpoint.pretrained_checkpoint:
            raise _error(
                "is a PEFT adapter checkpoint whose run names no base model (pretrained_checkpoint)",
                directory,
                "load the checkpoint of a run that fine-tuned a named base model",
            )
        peft(model, training=False)

    # The run's own checkpoint reader, told to read exactly this directory's weights and nothing else
    # (with PEFT, the base it was trained on first).
    ck = cfg.checkpoint
    ck.load, ck.ckpt_step = str(directory), None
    if peft is None:
        ck.pretrained_checkpoint = None
    ck.finetune = True  # weights only
    ck.async_save = False
    ck.dist_ckpt_strictness = "assume_ok_unexpected"  # every tensor of the model must be there
    try:
        Checkpointer(cfg, DistributedContext(device=dev)).load(
            model=model, optimizer=None, scheduler=None, train_state=TrainState()
        )
    except ConfigError as exc:
        # The reader names the training field it was told to read; here the path came from the caller.
        problems = [
            dataclasses.replace(p, path=_FIELD) if p.path == "checkpoint.load" else p for p in exc.problems
        ]
        raise ConfigError(problems, header="cannot load the checkpoint") from None
    return model, cfg, tokenizer


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
