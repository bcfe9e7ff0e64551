"""Saving and loading training checkpoints: `Checkpointer(cfg, ctx)`.

One checkpoint is a directory ``<checkpoint.save>/iter_NNNNNNN/`` holding

* the model and optimizer tensors: torch.distributed.checkpoint shards (``ckpt_format="torch_dist"``)
  or one ``model_optim.pt`` (``"torch"``), keyed ``model.<name>`` / ``optimizer.<kind>.<name>``;
* ``common.pt``: everything that is not a tensor (scheduler state, optimizer hyperparameters, loss
  scaler, and the rerun state machine's JSON record when it asked for a restart),
  ``train_state.pt`` (step, consumed samples, FLOPs), ``rng/rank_NNNNN.pt`` (one per rank),
  ``metadata.json`` (format, step, world size, contents), ``run_config.yaml`` and ``tokenizer/``;

and ``<checkpoint.save>/latest_checkpointed_iteration.txt`` (Megatron-LM's tracker) and
``latest_train_state.pt`` (Megatron Bridge's: a copy of its ``train_state.pt``) name the newest one.

Crash safety: all ranks write into ``iter_NNNNNNN.tmp``; once every rank reports success, rank 0
checks that the directory still carries this save's writer token and holds every file, renames it to
its final name and then replaces the tracker atomically. A directory with a final name is therefore
always complete, and loading never looks at anything else. Every ``.pt`` file is read back with
``torch.load(weights_only=True)`` and the torch_dist index through an allowlist unpickler
(`checkpoint.dcp_index`): a checkpoint can never run code.

A save never writes non-finite weights: it first checks the model's parameters on their device (one
fused reduction, one host read per save) and refuses with `CheckpointSaveError`, leaving the tracker
on the last good checkpoint. A full disk is reported the same way, in one line.

Each rank writes a share of the replicated tensors (`TensorStorage.share`) and copies only that.
Async saves (``checkpoint.async_save``): `save()` copies its share into a host-memory arena
(`StagingArena`, pinned for GPU tensors; the training loop builds it in the background after its
first step) and snapshots the rest, which is all the loop waits for; a background thread then writes
the files and does the same crash-safe finish, agreeing on success over a gloo group of its own. The
next `save()` and `finalize()` wait for it and raise its error. Synchronous saves of GPU tensors
stage through the same arena (freed afterwards): that writes twice as fast as DCP's own copies.
Retention renames old checkpoints out of the way and deletes them in the background.

Which checkpoint is loaded: ``checkpoint.load`` (its tracker, or ``ckpt_step``; or the
directory itself when it is one checkpoint) for a full resume, or weights only with ``finetune``; when
``load`` holds nothing, ``pretrained_checkpoint`` (weights only); otherwise nothing.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

from viaduct.config import ConfigError, Problem
from viaduct.distributed.layout import ParallelLayout, layout_of
from viaduct.peft.transform import is_adapter_name
from viaduct.training.checkpoint import layout, upgrade
from viaduct.training.checkpoint.async_writer import AsyncWriter, snapshot
from viaduct.training.checkpoint.dcp_index import CheckpointIndexError
from viaduct.training.checkpoint.errors import CheckpointError, CheckpointSaveError, checkpoint_problem
from viaduct.training.checkpoint.flat import model_tensors, nbytes, optimizer_tensors
from viaduct.training.checkpoint.rank0_files import write_rank0_files
from viaduct.training.checkpoint.resolve import Source, resolve, resolve_pretrained
from viaduct.training.checkpoint.restore import (
    LoadReport,
    check_shapes,
    float32_targets,
    model_targets,
    optimizer_read_targets,
    restore_optimizer,
)
from viaduct.training.checkpoint.retention import Retention
from viaduct.training.checkpoint.safe_load import load_weights_only
from viaduct.training.checkpoint.save_guard import SaveErrors, check_finite
from viaduct.training.checkpoint.stages import merge_stage_optimizer_common, without_other_stages
from viaduct.training.checkpoint.staging import StagingArena, StagingMemoryError
from viaduct.training.checkpoint.storage import STORAGE_ERRORS, TensorStorage, make_storage

if TYPE_CHECKING:
    from viaduct.distributed.init import DistributedContext
    from viaduct.training.config import ConfigContainer
    from viaduct.training.optim import MixedPrecisionOptimizer
    from viaduct.training.scheduler import OptimizerParamScheduler
    from viaduct.training.state import TrainState

__all__ = ["CheckpointError", "CheckpointSaveError", "Checkpointer", "LoadReport"]

log = logging.getLogger("viaduct")


class Checkpointer:
    """Saves and loads checkpoints as `cfg.checkpoint` says; every rank calls every method."""

    def __init__(self, cfg: ConfigContainer, ctx: DistributedContext) -> None:
        # Every checkpoint setting validate() accepts is honoured here; what is found only now is
        # what the directories hold (no checkpoint, one of another run, a damaged one).
        self.cfg = cfg
        self.checkpoint_cfg = cfg.checkpoint
        self.ctx = ctx
        self.last_load: LoadReport | None = None
        self.loaded_rerun_state: object = None
        """The rerun state machine's JSON record of the loaded checkpoint (None when it holds none)."""
        # PEFT: checkpoints hold the adapters; the base comes from checkpoint.pretrained_checkpoint.
        self._adapters_only = cfg.peft is not None
        self._loaded_dir: Path | None = None  # retention never deletes the checkpoint this run started from
        self._storages: dict[str, TensorStorage] = {}
        self._retention = Retention(self.checkpoint_cfg, verbose=ctx.rank == 0)
        # Async saves: CPU staging buffers, the background writer, and its own gloo group. Collectives
        # of one group must not interleave between threads, and the training loop keeps using the
        # host group, so the writer thread gets a group of its own (created here: on every rank, at
        # the same point, as group creation requires).
        self._writer: AsyncWriter | None = None
        self._staging = StagingArena(verbose=ctx.rank == 0)
        self._async_group: dist.ProcessGroup | None = None
        self._async_storages: dict[str, TensorStorage] = {}
        if self.checkpoint_cfg.async_save:
            self._writer = AsyncWriter()
            if self._distributed:
                self._async_group = dist.new_group(backend="gloo")

    # ------------------------------------------------------------------------------------------ save

    def save(
        self,
        step: int,
        *,
        model: nn.Module,
        optimizer: MixedPrecisionOptimizer | None,
        scheduler: OptimizerParamScheduler | None,
        train_state: TrainState,
        rerun_state: str | None = None,
    ) -> str:
        """Write the checkpoint of `step` under `checkpoint.save`; returns its directory.

        `rerun_state`: the rerun state machine's JSON record (the iteration a resumed run must re-run),
        kept in common.pt as a string.

        With `checkpoint.async_save` this returns once the state is staged in CPU memory: the directory
        appears (complete, with the tracker updated) when the background write finishes. It first waits
        for the previous async save, raising its error if it failed.
        """
        ckpt = self.checkpoint_cfg
        if ckpt.save is None:
            raise ConfigError(
                Problem(
                    "checkpoint.save", "is not set: there is nowhere to save to", fix="set checkpoint.save"
                )
            )
        root = Path(ckpt.save).expanduser()
        final, tmp = root / layout.iter_name(step), layout.tmp_path(root, step)
        rank = self.ctx.rank
        t0 = time.perf_counter()
        use_async = self._writer is not None and (self._async_group is not None or not self._distributed)
        if use_async:
            self._wait_for_write()  # its buffers are about to be reused; raises its error
        self._info(
            "saving checkpoint at iteration %d to %s in %s format%s",
            step,
            root,
            ckpt.ckpt_format,
            " (async)" * use_async,
        )

        # Collect everything before the first collective: an error here must not strand the other ranks.
        with_optim = bool(ckpt.save_optim and optimizer is not None)
        tensors, optim_common = self._tensors(model, optimizer if with_optim else None)
        if with_optim and self._pipeline_group is not None:
            optim_common = merge_stage_optimizer_common(optim_common, self._pipeline_group)
        common: dict[str, Any] = {
            "checkpoint_version": layout.CHECKPOINT_VERSION,
            "step": int(step),
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
        }
        if with_optim:
            common["optimizer"] = optim_common
        if rerun_state is not None:
            common["rerun_state_machine"] = rerun_state
        storage = self._async_storage(ckpt.ckpt_format) if use_async else self._storage(ckpt.ckpt_format)
        share = storage.share(tensors)  # what this rank writes
        rng_state = _rng_module().get_rng_state() if ckpt.save_rng else None
        state = train_state.state_dict()
        run_config = self.cfg.to_yaml() if rank == 0 else ""
        size = nbytes(tensors)
        # Unique to this save: checked before the rename (see layout.commit_problem).
        token = f"{uuid.uuid4().hex} pid {os.getpid()} on {socket.gethostname()}"
        explain = SaveErrors(step, root, tmp, size, nbytes(share, local=True))

        def prepare() -> None:
            if rank == 0:
                layout.remove_dir(tmp)  # a stale one from a crashed save of the same step
                tmp.mkdir(parents=True)
                layout.write_marker(tmp, token)

        def write(storage: TensorStorage, tensors: dict[str, torch.Tensor]) -> None:
            storage.write(tmp, tensors)
            if rng_state is not None:
                layout.save_file(rng_state, layout.rng_file(tmp, rank))
            if rank == 0:
                write_rank0_files(
                    tmp,
                    ckpt=ckpt,
                    tokenizer=getattr(self.cfg, "tokenizer", None),
                    world_size=self.ctx.world_size,
                    step=step,
                    common=common,
                    train_state=state,
                    run_config=run_config,
                    size=size,
                    optim=with_optim,
                    parallel=self.parallel_layout,
                    adapters_of=ckpt.pretrained_checkpoint if self._adapters_only else None,
                )

        def finish() -> None:
            if rank == 0:
                why = layout.commit_problem(tmp, token, ckpt.ckpt_format)
                if why is not None:
                    raise explain.refused(f"{why}: it is not committed")
                (tmp / layout.WRITER_MARKER).unlink()
                for d in (tmp / layout.RNG_DIR, tmp):
                    layout.fsync_dir(d)
                layout.commit(tmp, final)
                layout.write_tracker(
                    root, step, state
                )  # last: a tracker never names an incomplete checkpoint
                self._retention.apply(root, final, step, self._loaded_dir)

        if not use_async:

            def check_and_prepare() -> None:
                # First, before any file is touched: a NaN checkpoint must never become the newest.
                check_finite(model, explain)
                explain.run(prepare)

            self._collectively("save", check_and_prepare)
            try:
                self._collectively(
                    "save",
                    lambda: explain.run(
                        lambda: write(storage, self._stage_for_sync_write(share)), discarded=True
                    ),
                )
            except BaseException:
                self._discard(tmp)
                raise
            finally:
                if self._writer is None:  # the memory is kept for the next save only with async_save
                    self._staging.release()
            self._collectively("save", lambda: explain.run(finish))
            self._info(
                "successfully saved checkpoint from iteration %d to %s: %s",
                step,
                final,
                _rate(size, time.perf_counter() - t0),
            )
            if ckpt.also_save_hf_checkpoint:
                self._save_hf_copy(model, final)
            return str(final)

        # Async: stage (the only part that blocks the loop), then write and finish in the background.
        staged: dict[str, Any] = {}

        def stage_and_prepare() -> None:
            check_finite(model, explain)
            try:
                staged["tensors"] = self._staging.stage(share)
            except StagingMemoryError as exc:
                raise ConfigError(
                    Problem(
                        "checkpoint.async_save",
                        f"this rank cannot hold its share of the checkpoint in host memory: {exc}",
                        True,
                        fix="free host memory (fewer DataLoader workers), or set checkpoint.async_save=false",
                    ),
                    header=f"cannot save the checkpoint of iteration {step}",
                ) from exc
            # Non-tensor state may share objects (or hold tensors) that training keeps changing.
            staged["common"], staged["rng"] = snapshot(common), snapshot(rng_state)
            explain.run(prepare)

        self._collectively("save", stage_and_prepare)  # over the host group, on this thread
        common, rng_state = staged["common"], staged["rng"]
        group = self._async_group
        blocked = time.perf_counter() - t0
        self._info(
            "checkpoint at iteration %d staged in CPU memory: the loop was blocked %.3f s "
            "(rank 0 staged %.3f GB%s)",
            step,
            blocked,
            nbytes(share, local=True) / 1e9,
            self._staging_note(),
        )

        def background() -> None:
            t1 = time.perf_counter()
            try:
                self._collectively(
                    "save",
                    lambda: explain.run(lambda: write(storage, staged["tensors"]), discarded=True),
                    group=group,
                )
            except BaseException:
                self._discard(tmp)
                raise
            self._collectively("save", lambda: explain.run(finish), group=group)
            self._info(
                "successfully saved checkpoint from iteration %d to %s (async; written in the background: "
                "%s; loop blocked %.3f s)",
                step,
                final,
                _rate(size, time.perf_counter() - t1),
                blocked,
            )

        assert self._writer is not None
        self._writer.submit(f"checkpoint save of iteration {step} to {final}", background)
        return str(final)

    def prepare_staging(self, *, model: nn.Module, optimizer: MixedPrecisionOptimizer | None) -> None:
        """With `async_save`, build the host memory the saves stage into, in a background thread.

        Called by the training loop once its first step has created the optimizer state, so that the
        first save does not spend seconds allocating and pinning memory while the loop waits.
        """
        if self._writer is None or self.checkpoint_cfg.save is None:
            return
        tensors, _ = self._tensors(model, optimizer if self.checkpoint_cfg.save_optim else None)
        self._staging.prepare(
            self._async_storage(self.checkpoint_cfg.ckpt_format).share(tensors), background=True
        )

    def _stage_for_sync_write(self, share: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Device tensors are copied to host memory in one pass first: writing them straight from the
        GPU, DCP copies them one at a time in its writer threads, at half the speed (see docs)."""
        if not any(t.device.type == "cuda" for t in share.values()):
            return share
        try:
            return self._staging.stage(share)
        except StagingMemoryError as exc:
            log.warning("%s: writing straight from the GPU instead (slower)", exc)
            return share

    def _discard(self, tmp: Path) -> None:
        """Rank 0 removes the directory of a failed save (every rank has stopped writing into it)."""
        if self.ctx.rank != 0:
            return
        try:
            layout.remove_dir(tmp)
        except OSError as exc:
            log.warning("could not remove %s after the failed save (%s); the next save tries again", tmp, exc)

    def _tensors(
        self, model: nn.Module, optimizer: MixedPrecisionOptimizer | None
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The flat tensors of a save, and the optimizer's non-tensor state (empty without one). With
        PEFT, the model's adapter tensors only: the frozen base is named, not copied."""
        tensors = model_tensors(model)
        if self._adapters_only:
            tensors = {k: t for k, t in tensors.items() if is_adapter_name(k)}
        if optimizer is None:
            return tensors, {}
        opt_tensors, optim_common = optimizer_tensors(optimizer.state_dict())
        tensors.update(opt_tensors)
        return tensors, optim_common

    def _staging_note(self) -> str:
        staging = self._staging
        if staging.allocated_bytes:
            gigabytes = staging.allocated_bytes / 1e9
            return f", of which {gigabytes:.3f} GB newly allocated in {staging.build_seconds:.2f} s"
        if staging.waited_seconds > 0.01:
            return f", after waiting {staging.waited_seconds:.2f} s for its memory to be ready"
        return ""

    def wait_for_pending_save(self) -> None:
        """Block until the async save in flight (if any) is complete and old checkpoints are removed;
        raise the save's error if it failed."""
        self._wait_for_write()
        self._retention.wait()

    def _wait_for_write(self) -> None:
        # Not for the removal of old checkpoints: the next save's own retention waits for that, in the
        # background writer's thread.
        if self._writer is None:
            return
        waited = self._writer.wait()
        if waited > 0.001:
            self._info("waited %.3f s for the previous asynchronous checkpoint save", waited)

    # ------------------------------------------------------------------------------------------ load

    def load(
        self,
        *,
        model: nn.Module,
        optimizer: MixedPrecisionOptimizer | None,
        scheduler: OptimizerParamScheduler | None,
        train_state: TrainState,
    ) -> int | None:
        """Load what the config asks for; returns the loaded step (0 for weights only) or None."""
        source = resolve(self.checkpoint_cfg, verbose=self.ctx.rank == 0)
        if source is None:
            return None
        if self._adapters_only:
            return self._load_with_adapters(source, model, optimizer, scheduler, train_state)
        if source.hf:
            return self._load_hf(source.directory, source.field, model, optimizer)
        return self._load_dir(source, model, optimizer, scheduler, train_state)

    def _load_with_adapters(
        self,
        source: Source,
        model: nn.Module,
        optimizer: MixedPrecisionOptimizer | None,
        scheduler: OptimizerParamScheduler | None,
        train_state: TrainState,
    ) -> int:
        """PEFT: the base weights from `checkpoint.pretrained_checkpoint` (a viaduct checkpoint or a
        Hugging Face directory), then, when `source` is an adapter checkpoint of `checkpoint.load`,
        the adapters with their optimizer and train state from it."""
        adapters: Source | None = None
        base = source
        if source.field == "checkpoint.load":
            if source.hf or not _holds_adapters(source.directory):
                raise checkpoint_problem(
                    "checkpoint.load",
                    "holds a full-model checkpoint, but this run trains PEFT adapters, whose checkpoints "
                    "hold the adapters only",
                    source.directory,
                    fix="name the base model in checkpoint.pretrained_checkpoint and point checkpoint.load "
                    "at the directory of this run's adapter checkpoints (or leave it unset)",
                )
            adapters = source
            pretrained = resolve_pretrained(self.checkpoint_cfg, verbose=self.ctx.rank == 0)
            if pretrained is None:  # validate() requires pretrained_checkpoint with peft
                raise ValueError("PEFT needs checkpoint.pretrained_checkpoint: call cfg.validate() first")
            base = pretrained
            _check_same_base(source.directory, self.checkpoint_cfg.pretrained_checkpoint)
        if not base.hf and _holds_adapters(base.directory):
            raise checkpoint_problem(
                base.field,
                "is an adapter checkpoint (it holds PEFT adapters only, not a base model)",
                base.directory,
                fix="point checkpoint.pretrained_checkpoint at the base model the adapters were trained on "
                "(and checkpoint.load at the adapter checkpoints to resume them)",
            )
        if base.hf:
            self._load_hf(base.directory, base.field, model, None)
        else:
            self._load_dir(base, model, None, None, train_state, keep=_is_base_name)
        if adapters is None:
            from viaduct.peft.transform import reset_magnitudes

            if reset_magnitudes(model):  # DoRA starts at the loaded base's norms
                self._info("set the DoRA magnitudes to the loaded base weights' row norms")
            if optimizer is not None:  # float32 masters of 16-bit adapters follow the model
                restore_optimizer(
                    optimizer,
                    {},
                    None,
                    float32_read=set(),
                    fld=base.field,
                    directory=base.directory,
                    report=LoadReport(str(base.directory), 0, True),
                )
            return 0
        return self._load_dir(adapters, model, optimizer, scheduler, train_state, keep=is_adapter_name)

    def _load_dir(
        self,
        source: Source,
        model: nn.Module,
        optimizer: MixedPrecisionOptimizer | None,
        scheduler: OptimizerParamScheduler | None,
        train_state: TrainState,
        *,
        keep: Callable[[str], bool] | None = None,
    ) -> int:
        """Load one viaduct checkpoint directory (the model tensors `keep` accepts; all when None)."""
        directory, weights_only, fld = source.directory, source.weights_only, source.field
        if not weights_only and (directory / layout.RUN_CONFIG).is_file():
            from viaduct.training.checkpoint.config_check import check_resume_config

            # Compare the saved run's config with this one before any tensor is read: shape changes
            # are refused, the rest is reported.
            check_resume_config(
                directory / layout.RUN_CONFIG,
                self.cfg,
                saved_world_size=_saved_world_size(directory),
                world_size=self.ctx.world_size,
            )
        ckpt = self.checkpoint_cfg
        t0 = time.perf_counter()
        try:
            meta = layout.metadata_of(directory)
            storage = self._storage(meta.get("format", "torch_dist"))
            available = storage.describe(directory)
        except CheckpointIndexError as exc:  # unsafe, corrupt, or a shard missing or truncated
            raise checkpoint_problem(
                fld,
                exc.reason,
                exc.path,
                fix="load an intact copy of this checkpoint, or another step (checkpoint.ckpt_step)",
            ) from None
        except STORAGE_ERRORS as exc:
            raise checkpoint_problem(fld, "cannot read the checkpoint's index", directory, cause=exc) from exc
        contents = meta.get("contents", {})
        self._info(
            "loading checkpoint from %s (%s format%s)",
            directory,
            storage.name,
            ", weights only" * weights_only,
        )

        if self._pipeline_group is not None:
            available = without_other_stages(available, model, optimizer, self._pipeline_group)
        report = LoadReport(str(directory), 0, weights_only)
        targets = model_targets(model, available, ckpt.dist_ckpt_strictness, fld, directory, report, keep)
        full_optim = not weights_only and ckpt.load_optim and optimizer is not None
        if full_optim and not contents.get("optimizer", True):
            self._info(
                "the checkpoint holds no optimizer state (saved with save_optim=false): fresh optimizer"
            )
            full_optim = False
        opt_targets: dict[str, torch.Tensor] = {}
        float32_read: set[str] = set()
        if optimizer is not None and full_optim:
            opt_targets = optimizer_read_targets(optimizer, available, fld=fld, directory=directory)
        if optimizer is not None and (full_optim or ckpt.load_main_params_from_ckpt):
            float32_read = float32_targets(optimizer, targets, available)
        check_shapes({**targets, **opt_targets}, available, fld, directory)
        common = {} if weights_only else self._read_pt(directory / layout.COMMON, fld)
        version = upgrade.checkpoint_version(meta, common, fld, directory)
        if version < 2:
            upgrade.check_upgradable({**targets, **opt_targets}, self.cfg.model, fld, directory)

        try:
            storage.read(directory, {**targets, **opt_targets})
        except STORAGE_ERRORS as exc:
            raise checkpoint_problem(fld, "cannot read its tensors", directory, cause=exc) from exc
        if version < 2:  # older row layouts of the fused weights (see checkpoint.upgrade)
            changed = upgrade.upgrade_v1({**targets, **opt_targets}, self.cfg.model, fld, directory)
            self._info(
                "upgraded checkpoint %s from version %d: reordered the rows of %d fused tensor(s) "
                "(linear_qkv, gated linear_fc1) to the current layout",
                directory,
                version,
                changed,
            )
        report.parts.append("model")
        if optimizer is not None:
            restore_optimizer(
                optimizer,
                opt_targets,
                common if full_optim else None,
                float32_read=float32_read,
                fld=fld,
                directory=directory,
                report=report,
            )
        if not weights_only:
            if scheduler is not None and common.get("scheduler") is not None:
                scheduler.load_state_dict(common["scheduler"])  # ConfigError on a schedule mismatch
                report.parts.append("scheduler")
            train_state.load_state_dict(self._read_pt(directory / layout.TRAIN_STATE, fld))
            report.parts.append("train_state")
            self.loaded_rerun_state = common.get("rerun_state_machine")
            if ckpt.load_rng:
                self._restore_rng(directory, contents, fld, report)
            report.step = train_state.step

        self._loaded_dir = directory
        self.last_load = report
        self._info(
            "loaded checkpoint from %s at iteration %d (%s): %s",
            directory,
            int(meta.get("step", report.step)),
            ", ".join(report.parts),
            _rate(nbytes({**targets, **opt_targets}), time.perf_counter() - t0),
        )
        return report.step

    def _save_hf_copy(self, model: nn.Module, final: Path) -> None:
        """checkpoint.also_save_hf_checkpoint: the weights as a Hugging Face directory, `final/hf`.
        Every rank takes part (sharded parameters are gathered one at a time); rank 0 writes."""
        from viaduct.training.checkpoint.hf import HF_COPY, bridge_for

        t0 = time.perf_counter()
        bridge = bridge_for(self.cfg.model)
        if self.ctx.rank == 0:
            bridge.save_hf_pretrained(model, final / HF_COPY)
        else:
            for _ in bridge.export_hf_weights(model):
                pass
        self._info("wrote its Hugging Face copy to %s in %.2f s", final / HF_COPY, time.perf_counter() - t0)

    def _load_hf(
        self, directory: Path, fld: str, model: nn.Module, optimizer: MixedPrecisionOptimizer | None
    ) -> int:
        """Initial weights from a Hugging Face model directory, converted tensor by tensor into this
        model's parameters (each rank reads only what it holds); returns 0 (weights only)."""
        from viaduct.models.conversion import AutoBridge

        t0 = time.perf_counter()
        self._info("loading Hugging Face weights from %s", directory)
        try:
            AutoBridge.from_hf_pretrained(directory).load_hf_weights(model)
        except ConfigError:
            raise
        except (OSError, ValueError) as exc:
            raise checkpoint_problem(
                fld, "cannot load its Hugging Face weights", directory, cause=exc
            ) from exc
        report = LoadReport(str(directory), 0, True)
        report.parts.append("model")
        if optimizer is not None:  # float32 masters of 16-bit parameters follow the loaded weights
            restore_optimizer(
                optimizer, {}, None, float32_read=set(), fld=fld, directory=directory, report=report
            )
        self.last_load = report
        self._info("loaded Hugging Face weights from %s in %.2f s", directory, time.perf_counter() - t0)
        return 0

    def _restore_rng(self, directory: Path, contents: dict[str, Any], fld: str, report: LoadReport) -> None:
        path = layout.rng_file(directory, self.ctx.rank)
        if not contents.get("rng", False):
            self._info(
                "the checkpoint holds no RNG state (saved with save_rng=false): keeping the seeded ones"
            )
            return
        if not path.is_file():  # saved by fewer ranks than this run has
            log.warning(
                "no RNG state for rank %d in %s: it keeps its seeded generators", self.ctx.rank, directory
            )
            return
        _rng_module().set_rng_state(self._read_pt(path, fld))
        report.parts.append("rng")

    @staticmethod
    def _read_pt(path: Path, fld: str) -> Any:
        try:
            return load_weights_only(path)
        except STORAGE_ERRORS as exc:  # missing, truncated, or holding objects weights_only refuses
            raise checkpoint_problem(fld, f"cannot read {path.name}", path, cause=exc) from exc

    # ------------------------------------------------------------------------------------------ misc

    def finalize(self) -> None:
        """Wait for the async checkpoint write still in flight; raise its error if it failed.

        Also releases the writer's process group (a group still referenced when the interpreter exits
        aborts the process); later saves are then synchronous.
        """
        try:
            self.wait_for_pending_save()
        finally:
            self._staging.release()
            self._writer = None
            self._async_group = None
            self._async_storages.clear()

    @property
    def parallel_layout(self) -> ParallelLayout:
        """The layout this run trains in (the run's mesh; from the config when there is none)."""
        pmesh = self.ctx.parallel
        return pmesh.layout if pmesh is not None else layout_of(self.cfg, self.ctx.world_size)

    def _async_storage(self, fmt: str) -> TensorStorage:
        if fmt not in self._async_storages:  # its own object: DCP's plan cache is keyed per storage
            self._async_storages[fmt] = make_storage(
                fmt,
                rank=self.ctx.rank,
                world_size=self.ctx.world_size,
                group=self._async_group,
                cfg=self.checkpoint_cfg,
                peers=self._stage_ranks,
            )
        return self._async_storages[fmt]

    def _storage(self, fmt: str) -> TensorStorage:
        if fmt not in self._storages:  # kept per format so DCP's plan cache survives between saves
            self._storages[fmt] = make_storage(
                fmt,
                rank=self.ctx.rank,
                world_size=self.ctx.world_size,
                group=self._group,
                cfg=self.checkpoint_cfg,
                peers=self._stage_ranks,
            )
        return self._storages[fmt]

    @property
    def _stage_ranks(self) -> list[int] | None:
        """The ranks of this rank's pipeline stage (None: every rank holds the same plain tensors)."""
        pmesh = self.ctx.parallel
        return pmesh.stage_ranks if pmesh is not None and pmesh.layout.pp > 1 else None

    @property
    def _pipeline_group(self) -> dist.ProcessGroup | None:
        """The ranks holding the other pipeline stages (None without pipeline parallelism)."""
        pmesh = self.ctx.parallel
        return pmesh.pp_group if pmesh is not None and pmesh.layout.pp > 1 else None

    @property
    def _group(self) -> dist.ProcessGroup | None:
        return self.ctx.host_group if self._distributed else None

    @property
    def _distributed(self) -> bool:
        return self.ctx.world_size > 1 and dist.is_available() and dist.is_initialized()

    def _collectively(
        self, what: str, fn: Callable[[], None], group: dist.ProcessGroup | None = None
    ) -> None:
        """Run `fn` on every rank, then agree on success (a barrier that also spreads failures).

        Over the host group, or `group` (a gloo group: the async writer's, from its own thread).
        """
        error: BaseException | None = None
        try:
            fn()
        except STORAGE_ERRORS as exc:
            error = exc
        if not self._distributed:
            if error is not None:
                raise error
            return
        # A host tensor over the gloo group; on the default (NCCL) group when there is none.
        device = self.ctx.host_device if group is None else torch.device("cpu")
        ok = torch.tensor([0 if error is not None else 1], dtype=torch.int32, device=device)
        dist.all_reduce(ok, op=dist.ReduceOp.MIN, group=self.ctx.host_group if group is None else group)
        if error is not None:
            raise error
        if not bool(ok.item()):
            raise CheckpointSaveError(
                Problem(
                    "checkpoint.save", f"the checkpoint {what} failed on another rank; see that rank's error"
                ),
                header=f"cannot {what} the checkpoint",
            )

    def _info(self, msg: str, *args: Any) -> None:
        if self.ctx.rank == 0:
            log.info(msg, *args)


def _holds_adapters(directory: Path) -> bool:
    """Whether a checkpoint was saved by a PEFT run (adapter tensors only; see `write_rank0_files`)."""
    try:
        contents = layout.metadata_of(directory).get("contents", {})
    except (OSError, ValueError, AttributeError):
        return False  # the load itself reports an unreadable metadata.json
    return isinstance(contents, dict) and contents.get("model") == "adapters"


def _is_base_name(name: str) -> bool:
    return not is_adapter_name(name)


def _check_same_base(directory: Path, base: str | None) -> None:
    """Warn when the adapters being resumed were trained on another base than the one named now."""
    try:
        saved = layout.metadata_of(directory).get("peft_base")
    except (OSError, ValueError, AttributeError):
        return
    if (
        isinstance(saved, str)
        and base is not None
        and Path(saved).expanduser().resolve() != Path(base).expanduser().resolve()
    ):
        log.warning(
            "the adapters in %s were trained on the base %s; checkpoint.pretrained_checkpoint now names %s",
            directory,
            saved,
            base,
        )


def _saved_world_size(directory: Path) -> int | None:
    """The world size metadata.json records (None when unreadable: the load reports that itself)."""
    try:
        size = layout.metadata_of(directory).get("world_size")
    except (OSError, ValueError, AttributeError):
        return None
    return size if isinstance(size, int) else None


def _rate(size: int, seconds: float) -> str:
    gb = size / 1e9
    return f"{gb:.3f} GB in {seconds:.2f} s ({gb / max(seconds, 1e-9):.2f} GB/s)"


def _rng_module() -> ModuleType:
    # Imported when used: the RNG helpers pull in NumPy, which loading weights alone does not need.
    from viaduct.training import rng

    return rng
