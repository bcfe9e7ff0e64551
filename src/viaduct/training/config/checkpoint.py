"""`checkpoint`: where and how often to save, what to load, and in which format.

Paths are plain strings, as in Megatron. A checkpoint path the user asked to load from must exist
(a typo must never silently start training from random weights), except `load` equal to `save`:
the "resume if a checkpoint is there" pattern, whose directory does not exist on the first run.
"""

import os
from dataclasses import dataclass
from typing import ClassVar, Literal

from viaduct.config import ConfigBase, Problems, unsupported
from viaduct.training.config._checks import file_must_exist, path_exists, positive

_NON_PERSISTENT = "non-persistent checkpoints"
_REPLICATION = "local checkpoint replication"


@dataclass(kw_only=True)
class CheckpointConfig(ConfigBase):
    """Checkpoint saving, loading and format."""

    _component_: ClassVar[str] = "checkpoint"

    save: str | None = None
    """Directory to save checkpoints to (iter_NNNNNNN subdirectories); None saves nothing."""

    save_interval: int | None = None
    """Save a checkpoint every this many steps (a final one is saved at the end when save is set)."""

    most_recent_k: int = -1
    """Keep only the k most recent checkpoints; -1 keeps all."""

    save_retain_interval: int | None = None
    """Never delete checkpoints whose step is divisible by this (with most_recent_k)."""

    save_optim: bool = True
    """Include the optimizer state in checkpoints."""

    save_rng: bool = True
    """Include the random-number-generator states in checkpoints."""

    load: str | None = None
    """Directory to resume from (its latest checkpoint, or ckpt_step)."""

    load_optim: bool = True
    """Restore the optimizer state when loading."""

    load_rng: bool = True
    """Restore the random-number-generator states when loading."""

    load_main_params_from_ckpt: bool = False
    """Reload fp32 master parameters from the checkpoint without optimizer state (needs load_optim=false)."""

    pretrained_checkpoint: str | None = None
    """Initial weights (no optimizer state): a checkpoint root or one iter_N directory, or a Hugging Face
    model directory (config.json and safetensors)."""

    ckpt_step: int | None = None
    """Load this step from load instead of the latest."""

    finetune: bool = False
    """Load only the weights and start counting steps from 0."""

    exit_on_missing_checkpoint: bool = False
    """Fail when load holds no checkpoint instead of starting from random weights."""

    ckpt_format: Literal["torch_dist", "torch"] = "torch_dist"
    """Format: "torch_dist" (sharded, torch.distributed.checkpoint) or "torch" (one file: small models)."""

    fully_parallel_save: bool = True
    """Spread the writing of replicated tensors over data-parallel ranks."""

    fully_parallel_load: bool = False
    """Spread the reading of replicated tensors over data-parallel ranks and exchange them."""

    async_save: bool = False
    """Write checkpoints in the background (torch_dist only); keeps this rank's share in host memory."""

    ckpt_assume_constant_structure: bool = False
    """Reuse the save plan of the previous save (the state structure must not change)."""

    dist_ckpt_strictness: Literal[
        "assume_ok_unexpected",
        "log_unexpected",
        "log_all",
        "raise_unexpected",
        "raise_all",
        "return_unexpected",
        "return_all",
        "ignore_all",
    ] = "assume_ok_unexpected"
    """What to do about keys missing from or unexpected in a torch_dist checkpoint."""

    save_tokenizer_assets: bool = True
    """Copy the tokenizer files into each checkpoint so it is self-contained."""

    non_persistent_save_interval: int | None = unsupported(_NON_PERSISTENT, default=None)
    """Save a non-persistent checkpoint every this many steps."""

    non_persistent_ckpt_type: Literal["global", "local", "in_memory"] | None = unsupported(
        _NON_PERSISTENT, default=None
    )
    """Kind of non-persistent checkpoint."""

    non_persistent_global_ckpt_dir: str | None = unsupported(_NON_PERSISTENT, default=None)
    """Directory of global non-persistent checkpoints."""

    non_persistent_local_ckpt_dir: str | None = unsupported(_NON_PERSISTENT, default=None)
    """Directory of node-local non-persistent checkpoints."""

    non_persistent_local_ckpt_algo: Literal["fully_parallel", "atomic"] = unsupported(
        _NON_PERSISTENT, default="fully_parallel"
    )
    """Algorithm of node-local non-persistent checkpoints."""

    replication: bool = unsupported(_REPLICATION, default=False)
    """Replicate node-local checkpoints to other nodes."""

    replication_jump: int | None = unsupported(_REPLICATION, default=None)
    """Rank spacing between replicas."""

    replication_factor: int = unsupported(_REPLICATION, default=2)
    """Number of machines holding each replica."""

    also_save_hf_checkpoint: bool = False
    """Also write a Hugging Face copy of the weights into each checkpoint (iter_N/hf/)."""

    _legacy_fields_: ClassVar[dict[str, str]] = {
        **{
            name: "the Hugging Face copy takes its config from the model (or model.hf_model_id), is "
            "written by rank 0 and never runs remote code"
            for name in (
                "hf_source_path",
                "hf_trust_remote_code",
                "hf_distributed_save",
                "hf_save_every_n_ranks",
            )
        },
        **{
            name: "Megatron-LM checkpoint conversion is not part of viaduct"
            for name in (
                "ckpt_convert_format",
                "ckpt_convert_save",
                "ckpt_convert_update_legacy_dist_opt_format",
            )
        },
        **{
            name: "viaduct has one background writer; its tuning is not configurable"
            for name in (
                "async_strategy",
                "use_persistent_ckpt_worker",
                "async_ckpt_cpu_priority",
                "async_ckpt_io_priority",
                "async_ckpt_use_cpu_shm",
                "storage_writers_per_rank",
                "dist_ckpt_workers",
            )
        },
        **{
            name: "Megatron Core fully-parallel checkpoint internals"
            for name in (
                "ckpt_fully_parallel_load_exchange_algo",
                "ckpt_fully_parallel_save_process_group",
                "ckpt_fully_parallel_load_process_group",
                "ckpt_fully_parallel_save_replicate_local",
                "ckpt_fully_parallel_load_replicate_local",
                "ckpt_load_validate_sharding_integrity",
                "dist_ckpt_save_pre_mcore_014",
            )
        },
        **{
            name: "viaduct reads the model settings from the checkpoint's run_config.yaml explicitly"
            for name in (
                "use_checkpoint_args",
                "use_mp_args_from_checkpoint_args",
                "use_tokenizer_model_from_checkpoint_args",
            )
        },
        **{
            name: "Megatron-LM debugging dumps"
            for name in (
                "save_params_interval",
                "save_activations_interval",
                "save_tokens_per_expert_interval",
                "save_wgrads_interval",
                "save_dgrads_interval",
            )
        },
        "dist_ckpt_optim_fully_reshardable": "belongs to the distributed optimizer, which is not built",
        "distrib_optim_fully_reshardable_mem_efficient": "belongs to the distributed optimizer (not built)",
        "strict_fsdp_dtensor_load": "the fsdp_dtensor format is not built",
        "auto_detect_ckpt_format": "the format is read from the checkpoint's metadata",
        "verify_integrity": "checkpoint hashing is not built",
        "custom_manager_class": "custom checkpoint managers are not built",
    }

    def finalize(self) -> None:
        """Check save/load settings and that requested checkpoint paths exist."""
        p = Problems()
        for name in ("save_interval", "save_retain_interval"):
            positive(p, self, name)
        positive(p, self, "ckpt_step", zero_ok=True)
        if self.most_recent_k is not None and self.most_recent_k != -1 and self.most_recent_k < 1:
            p.add(
                "most_recent_k",
                "must be -1 (keep all) or >= 1",
                self.most_recent_k,
                fix="set checkpoint.most_recent_k",
            )

        for name in ("save_interval", "async_save"):
            if getattr(self, name) and self.save is None:
                p.add(name, "needs a directory to save to", getattr(self, name), fix="set checkpoint.save")
        if self.async_save and self.ckpt_format != "torch_dist":
            p.add(
                "async_save",
                f"needs ckpt_format 'torch_dist' (got {self.ckpt_format!r})",
                True,
                fix="set checkpoint.ckpt_format to torch_dist, or checkpoint.async_save to false",
            )
        if self.ckpt_step is not None and self.load is None:
            p.add(
                "ckpt_step",
                "needs load (the directory holding that step)",
                self.ckpt_step,
                fix="set checkpoint.load",
            )
        if self.load_main_params_from_ckpt and self.load_optim:
            p.add(
                "load_main_params_from_ckpt",
                "reloads master parameters in place of the optimizer state, so it needs load_optim=false",
                True,
                fix="set checkpoint.load_optim to false",
            )
        if self.finetune and self.load is None and self.pretrained_checkpoint is None:
            p.add(
                "finetune",
                "has nothing to load: neither load nor pretrained_checkpoint is set",
                True,
                fix="set checkpoint.pretrained_checkpoint (or checkpoint.load)",
            )

        file_must_exist(p, self, "pretrained_checkpoint", "the pretrained checkpoint")
        if self.load is not None and not path_exists(self.load):
            resume_pattern = self.save is not None and _same_path(self.load, self.save)
            if not resume_pattern:
                p.add(
                    "load",
                    "the checkpoint directory does not exist",
                    self.load,
                    fix="check the path in checkpoint.load (only a load equal to save may be missing)",
                )
            elif self.exit_on_missing_checkpoint:
                p.add(
                    "load",
                    "does not exist yet and exit_on_missing_checkpoint is true",
                    self.load,
                    fix="check checkpoint.load, or set checkpoint.exit_on_missing_checkpoint to false",
                )
        p.raise_if_any()


def _same_path(a: str, b: str) -> bool:
    return os.path.abspath(os.path.expanduser(a)) == os.path.abspath(os.path.expanduser(b))


HF_CONFIG = "config.json"
"""The file that makes a directory a Hugging Face model directory (with its safetensors)."""


def is_hf_model_dir(path: str | os.PathLike[str]) -> bool:
    """Whether `path` is a Hugging Face model directory: a config.json and safetensors weights (one
    file, or shards with their index)."""
    directory = os.path.expanduser(os.fspath(path))
    if not os.path.isfile(os.path.join(directory, HF_CONFIG)):
        return False
    try:
        names = os.listdir(directory)
    except OSError:
        return False
    return any(name.endswith(".safetensors") or name == "model.safetensors.index.json" for name in names)
