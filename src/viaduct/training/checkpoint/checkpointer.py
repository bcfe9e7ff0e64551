"""Saving and loading training checkpoints: `Checkpointer(cfg, ctx)`.

One checkpoint is a directory ``<checkpoint.save>/iter_NNNNNNN/`` holding

* the model and optimizer tensors: torch.distributed.checkpoint shards (``ckpt_format="torch_dist"``)
  or one ``model_optim.pt`` (``"torch"``), keyed ``model.<name>`` / ``optimizer.<kind>.<name>``;
* ``common.pt``: everything that is not a tensor (scheduler state, optimizer hyperparameters, loss
  scaler), ``train_state.pt`` (step, consumed samples, FLOPs), ``rng/rank_NNNNN.pt`` (one per rank),
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

import datetime
import errno
import json
import logging
import os
import shutil
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
from torch.distributed.checkpoint.api import CheckpointException

from viaduct.config import ConfigError, Problem
from viaduct.training.checkpoint import layout
from viaduct.training.checkpoint.async_writer import AsyncWriter, snapshot
from viaduct.training.checkpoint.dcp_index import CheckpointIndexError
from viaduct.training.checkpoint.errors import (
    CheckpointError,
    CheckpointSaveError,
    checkpoint_problem,
    root_os_error,
)
from viaduct.training.checkpoint.flat import model_tensors, nbytes, optimizer_tensors
from viaduct.training.checkpoint.resolve import resolve
from viaduct.training.checkpoint.restore import (
    LoadReport,
    check_shapes,
    model_targets,
    optimizer_read_targets,
    restore_optimizer,
)
from viaduct.training.checkpoint.staging import StagingArena, StagingMemoryError
from viaduct.training.checkpoint.storage import TensorStorage, make_storage

if TYPE_CHECKING:
    from viaduct.distributed.init import DistributedContext
    from viaduct.training.config import ConfigContainer
    from viaduct.training.optim import MixedPrecisionOptimizer
    from viaduct.training.scheduler import OptimizerParamScheduler
    from viaduct.training.state import TrainState

__all__ = ["CheckpointError", "CheckpointSaveError", "Checkpointer", "LoadReport"]

log = logging.getLogger("viaduct")

# Files of a Hugging Face / SentencePiece / tiktoken tokenizer directory worth keeping with the weights
# (a tokenizer_model directory may also hold the model's weights, which must not be copied).
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
)


# DCP raises CheckpointException, a BaseException subclass that `except Exception` would let through
# as a raw traceback (a truncated shard, a missing file on another rank).
_READ_ERRORS: tuple[type[BaseException], ...] = (Exception, CheckpointException)


class Checkpointer:
    """Saves and loads checkpoints as `cfg.checkpoint` says; every rank calls every method."""

    def __init__(self, cfg: ConfigContainer, ctx: DistributedContext) -> None:
        # Every checkpoint setting validate() accepts is honoured here; what is found only now is
        # what the directories hold (no checkpoint, one of another run, a damaged one).
        self.cfg = cfg
        self.checkpoint_cfg = cfg.checkpoint
        self.ctx = ctx
        self.last_load: LoadReport | None = None
        self._loaded_dir: Path | None = None  # retention never deletes the checkpoint this run started from
        self._storages: dict[str, TensorStorage] = {}
        self._deleter = AsyncWriter("viaduct-checkpoint-retention")  # removes old checkpoints
        self._ahead_reported: set[str] = set()  # checkpoints of later steps, warned about once
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
    ) -> str:
        """Write the checkpoint of `step` under `checkpoint.save`; returns its directory.

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
        common: dict[str, Any] = {
            "checkpoint_version": layout.CHECKPOINT_VERSION,
            "step": int(step),
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
        }
        if with_optim:
            common["optimizer"] = optim_common
        storage = self._async_storage(ckpt.ckpt_format) if use_async else self._storage(ckpt.ckpt_format)
        share = storage.share(tensors)  # what this rank writes
        rng_state = _rng_module().get_rng_state() if ckpt.save_rng else None
        state = train_state.state_dict()
        run_config = self.cfg.to_yaml() if rank == 0 else ""
        size = nbytes(tensors)
        # Unique to this save: checked before the rename (see layout.commit_problem).
        token = f"{uuid.uuid4().hex} pid {os.getpid()} on {socket.gethostname()}"
        explain = _SaveErrors(step, root, tmp, size, nbytes(share))

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
                self._write_rank0_files(tmp, step, common, state, run_config, size, with_optim)

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
                self._apply_retention(root, final, step)

        if not use_async:

            def check_and_prepare() -> None:
                # First, before any file is touched: a NaN checkpoint must never become the newest.
                self._check_finite(model, explain)
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
            return str(final)

        # Async: stage (the only part that blocks the loop), then write and finish in the background.
        staged: dict[str, Any] = {}

        def stage_and_prepare() -> None:
            self._check_finite(model, explain)
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
            nbytes(share) / 1e9,
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

    @staticmethod
    def _check_finite(model: nn.Module, explain: _SaveErrors) -> None:
        """Refuse to save weights holding NaN or infinity (they would become the run's newest checkpoint).

        One fused max-norm per device over every parameter, so the only host synchronisation is the
        read of one flag, once per save; the training loop's steps pay nothing.
        """
        by_device: dict[torch.device, list[torch.Tensor]] = {}
        for p in model.parameters():
            if p.is_floating_point() and p.numel() > 0:  # the inf-norm of an empty tensor is undefined
                by_device.setdefault(p.device, []).append(p.detach())
        if not by_device:
            return
        # The inf-norm is NaN when any element is NaN and inf when any is infinite; unlike the 2-norm it
        # cannot overflow for large finite weights.
        flags = [
            torch.stack(torch._foreach_norm(ts, float("inf"))).isfinite().all() for ts in by_device.values()
        ]
        finite = flags[0] if len(flags) == 1 else torch.stack([f.cpu() for f in flags]).all()
        if not bool(finite):  # the one host read
            raise explain.refused(
                "the model holds NaN or infinite weights",
                fix="resume from the last good checkpoint with a lower optimizer.lr or a smaller "
                "optimizer.clip_grad, or check the data around this iteration",
            )

    def _discard(self, tmp: Path) -> None:
        """Rank 0 removes the directory of a failed save (every rank has stopped writing into it)."""
        if self.ctx.rank != 0:
            return
        try:
            layout.remove_dir(tmp)
        except OSError as exc:
            log.warning("could not remove %s after the failed save (%s); the next save tries again", tmp, exc)

    @staticmethod
    def _tensors(
        model: nn.Module, optimizer: MixedPrecisionOptimizer | None
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The flat tensors of a save, and the optimizer's non-tensor state (empty without one)."""
        tensors = model_tensors(model)
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
        self._deleter.wait()

    def _wait_for_write(self) -> None:
        # Not for the removal of old checkpoints: the next save's own retention waits for that, in the
        # background writer's thread.
        if self._writer is None:
            return
        waited = self._writer.wait()
        if waited > 0.001:
            self._info("waited %.3f s for the previous asynchronous checkpoint save", waited)

    def _write_rank0_files(
        self,
        directory: Path,
        step: int,
        common: dict[str, Any],
        train_state: dict[str, Any],
        run_config: str,
        size: int,
        optim: bool,
    ) -> None:
        ckpt = self.checkpoint_cfg
        layout.save_file(common, directory / layout.COMMON)
        layout.save_file(train_state, directory / layout.TRAIN_STATE)
        layout.write_text(directory / layout.RUN_CONFIG, run_config)
        tokenizer = self._copy_tokenizer_assets(directory) if ckpt.save_tokenizer_assets else False
        meta = {
            "checkpoint_version": layout.CHECKPOINT_VERSION,
            "format": ckpt.ckpt_format,
            "step": int(step),
            "world_size": self.ctx.world_size,
            "contents": {"model": True, "optimizer": optim, "rng": ckpt.save_rng, "tokenizer": tokenizer},
            "tensor_bytes": size,
            "torch_version": torch.__version__,
            "saved_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        # Written last by rank 0: its presence marks a directory as a checkpoint (see is_checkpoint_dir).
        layout.write_text(directory / layout.METADATA, json.dumps(meta, indent=2, sort_keys=True) + "\n")

    def _copy_tokenizer_assets(self, directory: Path) -> bool:
        """Copy the tokenizer's local files into `directory/tokenizer/`; False when there are none
        (byte-level / null tokenizers, or a Hugging Face hub id that is not on this disk)."""
        tok = getattr(self.cfg, "tokenizer", None)
        sources: list[Path] = []
        for name in ("tokenizer_model", "vocab_file", "merge_file"):
            value = getattr(tok, name, None)
            if not value:
                continue
            src = Path(value).expanduser()
            if src.is_file():
                sources.append(src)
            elif src.is_dir():
                sources += [src / f for f in _TOKENIZER_FILES if (src / f).is_file()]
        if not sources:
            return False
        dest = directory / layout.TOKENIZER_DIR
        dest.mkdir(exist_ok=True)
        for src in sources:
            shutil.copy2(src, dest / src.name)
        return True

    def _apply_retention(self, root: Path, just_saved: Path, step: int) -> None:
        """Remove leftovers and the checkpoints `most_recent_k` lets go. Never raises: the checkpoint
        is already committed, so a deletion that fails (a permission, a busy file) is a warning, and
        a symbolic link is removed itself, never what it points to."""
        try:
            self._deleter.wait()  # the previous removal (its leftovers are cleaned up below)
        except Exception as exc:
            log.warning("removing old checkpoints failed: %s", exc)
        # A crash while the tracker was being replaced leaves its temporary file (never read).
        stale = [
            p for name in (layout.TRACKER, layout.LATEST_TRAIN_STATE) for p in root.glob(f".{name}.tmp-*")
        ]
        for leftover in layout.leftovers(root) + [p for p in stale if p.is_symlink() or not p.is_dir()]:
            try:
                layout.remove_tree(leftover)
            except OSError as exc:
                log.warning("could not remove %s (%s); the next save tries again", leftover, exc)
        protected = [just_saved] + ([self._loaded_dir] if self._loaded_dir is not None else [])
        found = layout.list_checkpoints(root)
        ahead = [path.name for s, path in found if s > step and path.name not in self._ahead_reported]
        if ahead and (self.checkpoint_cfg.most_recent_k or 0) > 0:
            self._ahead_reported.update(ahead)
            log.warning(
                "%s in %s hold(s) later steps than this run's iteration %d (left by an earlier run or a "
                "crash before the tracker was updated): most_recent_k leaves them alone; a save of the "
                "same step replaces one",
                ahead,
                root,
                step,
            )
        victims = layout.retention_victims(
            found,
            keep_recent=self.checkpoint_cfg.most_recent_k,
            retain_interval=self.checkpoint_cfg.save_retain_interval,
            protected=protected,
            current_step=step,
        )
        if not victims:
            return
        doomed, names = [], []
        for v in victims:
            try:
                doomed.append(layout.retire(v))  # renamed at once: no longer loadable
                names.append(v.name)
            except OSError as exc:
                log.warning("could not retire old checkpoint %s (%s); the next save tries again", v, exc)
        if not doomed:
            return
        self._info(
            "removing old checkpoints (most_recent_k=%d): %s", self.checkpoint_cfg.most_recent_k, names
        )

        def delete() -> None:
            # Deleting tens of GB can take seconds on some file systems: nothing needs to wait for it
            # but the next save's clean-up (and the end of the run).
            t0 = time.perf_counter()
            for d in doomed:
                try:
                    layout.remove_tree(d)  # a retired symbolic link goes, its target stays
                except OSError as exc:
                    log.warning("could not remove %s (%s); the next save tries again", d, exc)
            self._info("removed old checkpoints %s in %.2f s", names, time.perf_counter() - t0)

        self._deleter.submit(f"removal of {names}", delete)

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
        directory, weights_only, fld = source.directory, source.weights_only, source.field
        if not weights_only and (directory / layout.RUN_CONFIG).is_file():
            from viaduct.training.checkpoint.config_check import check_resume_config

            # Compare the saved run's config with this one before any tensor is read: shape changes
            # are refused, the rest is reported.
            check_resume_config(directory / layout.RUN_CONFIG, self.cfg)
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
        except _READ_ERRORS as exc:
            raise checkpoint_problem(fld, "cannot read the checkpoint's index", directory, cause=exc) from exc
        contents = meta.get("contents", {})
        self._info(
            "loading checkpoint from %s (%s format%s)",
            directory,
            storage.name,
            ", weights only" * weights_only,
        )

        report = LoadReport(str(directory), 0, weights_only)
        targets = model_targets(model, available, ckpt.dist_ckpt_strictness, fld, directory, report)
        full_optim = not weights_only and ckpt.load_optim and optimizer is not None
        if full_optim and not contents.get("optimizer", True):
            self._info(
                "the checkpoint holds no optimizer state (saved with save_optim=false): fresh optimizer"
            )
            full_optim = False
        opt_targets: dict[str, torch.Tensor] = {}
        if optimizer is not None and (full_optim or ckpt.load_main_params_from_ckpt):
            opt_targets = optimizer_read_targets(
                optimizer, available, full_state=full_optim, fld=fld, directory=directory
            )
        check_shapes({**targets, **opt_targets}, available, fld, directory)
        common = {} if weights_only else self._read_pt(directory / layout.COMMON, fld)

        try:
            storage.read(directory, {**targets, **opt_targets})
        except _READ_ERRORS as exc:
            raise checkpoint_problem(fld, "cannot read its tensors", directory, cause=exc) from exc
        report.parts.append("model")
        if optimizer is not None:
            restore_optimizer(
                optimizer,
                opt_targets,
                common if full_optim else None,
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
            return torch.load(path, map_location="cpu", weights_only=True)
        except _READ_ERRORS as exc:  # missing, truncated, or holding objects weights_only refuses
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

    def _async_storage(self, fmt: str) -> TensorStorage:
        if fmt not in self._async_storages:  # its own object: DCP's plan cache is keyed per storage
            self._async_storages[fmt] = make_storage(
                fmt,
                rank=self.ctx.rank,
                world_size=self.ctx.world_size,
                group=self._async_group,
                cfg=self.checkpoint_cfg,
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
            )
        return self._storages[fmt]

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
        except _READ_ERRORS as exc:
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


class _SaveErrors:
    """Turns what stops a save (a full disk, non-finite weights, a foreign writer) into one
    `CheckpointSaveError` line that says what was lost and what was kept."""

    def __init__(self, step: int, root: Path, tmp: Path, total_bytes: int, share_bytes: int) -> None:
        self.step, self.root, self.tmp = step, root, tmp
        self.total_bytes, self.share_bytes = total_bytes, share_bytes

    def kept(self) -> str:
        try:
            last = layout.read_tracker(self.root)
        except (OSError, ValueError):
            last = None
        if last is None:
            return "no earlier checkpoint exists"
        kept = self.root / layout.iter_name(last)
        return f"the tracker still names {kept}, the last good checkpoint, which is kept"

    def refused(self, message: str, fix: str | None = None) -> CheckpointSaveError:
        return CheckpointSaveError(
            Problem(
                "checkpoint.save",
                f"{message} at iteration {self.step}: this checkpoint is not saved and {self.kept()}",
                fix=fix,
            ),
            header=f"cannot save the checkpoint of iteration {self.step}",
        )

    def run(self, fn: Callable[[], None], *, discarded: bool = False) -> None:
        """Run a stage of the save; a full disk becomes one clear error (the chain of DCP's wrapped
        tracebacks adds nothing to it). `discarded`: the caller removes the partial directory when
        this stage fails."""
        try:
            fn()
        except CheckpointSaveError:
            raise
        except _READ_ERRORS as exc:
            err = root_os_error(exc)
            if err is None or err.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            raise self.disk_full(err, discarded) from None

    def disk_full(self, err: OSError, discarded: bool = False) -> CheckpointSaveError:
        what = "no space left on the device" if err.errno == errno.ENOSPC else "the disk quota is exceeded"
        where = err.filename or self.tmp
        try:
            free = f"{shutil.disk_usage(self.root).free / 1e9:.3f} GB free there now"
        except OSError:
            free = "free space unknown"
        name = errno.errorcode.get(err.errno or 0, str(err.errno))
        exc = self.refused(
            f"{what} ({name}) while writing {where}: this rank was writing "
            f"{self.share_bytes / 1e9:.3f} GB of the checkpoint's {self.total_bytes / 1e9:.3f} GB tensors "
            f"({free}){'; its partial directory is removed' if discarded else ''}",
            fix="free space on that file system, point checkpoint.save at a larger one, or keep fewer "
            "checkpoints (checkpoint.most_recent_k)",
        )
        exc.os_error = err
        return exc


def _rate(size: int, seconds: float) -> str:
    gb = size / 1e9
    return f"{gb:.3f} GB in {seconds:.2f} s ({gb / max(seconds, 1e-9):.2f} GB/s)"


def _rng_module() -> ModuleType:
    # Imported when used: the RNG helpers pull in NumPy, which loading weights alone does not need.
    from viaduct.training import rng

    return rng
