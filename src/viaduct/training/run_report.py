"""What `viaduct pretrain` says when a run ends: where its outputs are and what to do next.

The last rank (which owns the TensorBoard writer, closed by then) draws the loss curves into the run
directory; rank 0 prints the closing lines: the run directory, the checkpoint, the TensorBoard logs
and the plot, then the exact commands to train further (or resume a stopped run), to let the model
write text, to merge a PEFT run's adapters, to look at the curves and to start afresh. Nothing is
printed for an output that is off, beyond saying it is off and which setting turns it on.

The run directory is the recipes' layout (`viaduct.recipes.common.set_run_dir`):
`<run>/checkpoints` and `<run>/tb_logs`, with the page `<run>/loss_curves.html` beside them.
"""

from __future__ import annotations

import os
import re
import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from viaduct.config.errors import ConfigError
from viaduct.training.curves import PLOT_FILE, TB_SUBDIR, Curves, default_output, read_curves, save_page

if TYPE_CHECKING:
    from viaduct.training.config import ConfigContainer
    from viaduct.training.state import GlobalState

CHECKPOINTS_SUBDIR = "checkpoints"
"""The run directory's checkpoint folder (`viaduct.recipes.common.set_run_dir`)."""
MAX_EVENTS_BYTES_AT_END = 64 * 2**20
"""Event files larger than this (about 140,000 steps of the default metrics) are not drawn at the end
of the run: reading them takes a while, and `viaduct plot` does it when wanted."""


@dataclass(frozen=True)
class RunPaths:
    """Where a run's outputs go, as the configuration says (paths as written there, normalised)."""

    run_dir: str | None
    """The directory holding `checkpoints/` and `tb_logs/` (None when the outputs are elsewhere)."""
    checkpoints: str | None
    """checkpoint.save."""
    tensorboard: str | None
    """logger.tensorboard_dir."""
    plot: str | None
    """The loss-curves page (None without TensorBoard logs to draw it from)."""


def run_paths(cfg: ConfigContainer) -> RunPaths:
    """The run's output paths; `run_dir` only for the recipes' layout (`<run>/checkpoints`,
    `<run>/tb_logs`), where every output lives under one directory."""
    save = os.path.normpath(cfg.checkpoint.save) if cfg.checkpoint.save else None
    tb = os.path.normpath(cfg.logger.tensorboard_dir) if cfg.logger.tensorboard_dir else None
    parents = set()
    for path, name in ((save, CHECKPOINTS_SUBDIR), (tb, TB_SUBDIR)):
        if path is not None:
            parents.add(os.path.dirname(path) if os.path.basename(path) == name else None)
    run_dir = parents.pop() if len(parents) == 1 else None
    plot = str(default_output(Path(tb))) if tb is not None else None
    return RunPaths(run_dir or None, save, tb, plot)


def resume_step(cfg: ConfigContainer) -> int | None:
    """The step the run will resume from, read from its checkpoint directory before it starts (None:
    a fresh start, weights only, or unknown). Never raises: the run itself reports a bad checkpoint."""
    from viaduct.training.checkpoint.resolve import resolve

    try:
        source = resolve(cfg.checkpoint, verbose=False)
        if source is None or source.weights_only:
            return None
        return _step_of(source.directory)
    except (ConfigError, OSError, ValueError):
        return None


def _step_of(directory: Path) -> int | None:
    m = re.match(r"^iter_(\d+)$", directory.name)
    if m:
        return int(m.group(1))
    from viaduct.training.checkpoint.layout import metadata_of

    step = metadata_of(directory).get("step")
    return int(step) if isinstance(step, int) else None


def _latest_checkpoint(save: str) -> str | None:
    from viaduct.training.checkpoint.resolve import find_checkpoint

    try:
        found = find_checkpoint(Path(save), "checkpoint.save", None, verbose=False)
    except (ConfigError, OSError, ValueError):
        return None
    return os.path.join(save, found.name) if found is not None else None


def draw_curves(cfg: ConfigContainer) -> tuple[str | None, str | None, Curves | None]:
    """Write the loss-curves page of a finished run: (its path, None, the curves drawn) or
    (None, why not, None).

    Never raises: the run has succeeded, and a plot that cannot be drawn is only worth a line.
    """
    paths = run_paths(cfg)
    if paths.tensorboard is None or paths.plot is None:
        return None, "TensorBoard logging is off (logger.tensorboard_dir)", None
    tb = Path(paths.tensorboard)
    try:
        size = sum(f.stat().st_size for f in tb.iterdir() if "tfevents" in f.name and f.is_file())
    except OSError:
        size = 0
    if size > MAX_EVENTS_BYTES_AT_END:
        return (
            None,
            f"not drawn at the end of a run with {size / 2**20:.0f} MB of event files; "
            f"draw it with: {_plot_command(paths)}",
            None,
        )
    try:
        curves = read_curves(tb)
        return str(save_page(curves, paths.plot)), None, curves
    except ConfigError as exc:
        return None, f"not written: {exc}", None
    except Exception as exc:  # the training succeeded: a failed drawing must not turn it into an error
        return None, f"not written: {type(exc).__name__}: {exc}", None


def _plot_command(paths: RunPaths) -> str:
    # `viaduct plot` on the run directory (or the event directory itself) writes the page where the
    # run did: both resolve to the same default output.
    target = paths.run_dir if paths.run_dir is not None and paths.tensorboard else paths.tensorboard
    return shlex.join(["viaduct", "plot", str(target)])


def _without(args: Sequence[str], keys: Sequence[str]) -> list[str]:
    """`args` less the overrides and flags that set one of `keys` (dotted field paths)."""
    flags = {"--" + k for k in keys} | {"--" + k.replace("_", "-") for k in keys}
    out: list[str] = []
    skip_value = False
    for a in args:
        if skip_value:
            skip_value = False
            if not a.startswith("--") and "=" not in a:
                continue
        key = a.lstrip("+~").split("=", 1)[0]
        if not a.startswith("--") and key in keys:
            continue
        if a in flags:
            skip_value = True
            continue
        if a.split("=", 1)[0] in flags:
            continue
        out.append(a)
    return out


def _free_dir(base: str) -> str:
    n = 2
    while os.path.exists(f"{base}_{n}"):
        n += 1
    return f"{base}_{n}"


def summary_lines(
    cfg: ConfigContainer,
    state: GlobalState,
    *,
    command: Sequence[str],
    resumed_from: int | None,
    plot: str | None,
    plot_note: str | None,
    curves: Curves | None = None,
) -> list[str]:
    """The closing lines: what happened, where everything is, and the next commands.

    `command` is how the run was started (`["viaduct", "pretrain", ...overrides]`), the base of every
    command suggested; `resumed_from` the checkpoint step the run started from; `curves` what the
    event files hold (for the last training and validation losses), when this rank read them.
    """
    t = cfg.train
    paths = run_paths(cfg)
    step = state.train_state.step
    target = t.effective_train_iters or t.train_iters or 0
    exit_reason = state.exit_reason
    finals = [f"training {s.tag} {s.values[-1]:.4g}" for s in (curves.training if curves else []) if len(s)]
    final_validation = state.final_validation or {}
    for name, value in final_validation.items():
        finals.append(f"validation {name} {value:.4g}")
    if not final_validation and curves is not None:  # evaluated by the loop, at its last eval_interval
        for s in curves.validation:
            at = f" at iteration {s.steps[-1]}" if s.steps[-1] != step else ""
            finals.append(f"validation {s.tag.removesuffix(' validation')} {s.values[-1]:.4g}{at}")
    for name, value in (state.final_test or {}).items():
        finals.append(f"test {name} {value:.4g}")
    results = f" ({', '.join(finals)})" if finals else ""

    lines = ["", "-" * 100]
    nothing_trained = resumed_from is not None and resumed_from == step and step >= target > 0
    if nothing_trained:
        lines.append(
            f"nothing to train: the checkpoint in {paths.checkpoints} is already at iteration {step} of "
            f"{target}: this command resumes the run saved there, and that run had finished{results}"
        )
    elif exit_reason:
        lines.append(f"run stopped at iteration {step} of {target} ({exit_reason}){results}")
    elif step >= target:
        lines.append(f"run finished at iteration {step} of {target}{results}")
    else:
        lines.append(f"run ended at iteration {step} of {target}{results}")

    rows: list[tuple[str, str]] = []
    if paths.run_dir is not None:
        rows.append(("run directory", paths.run_dir))
    checkpoint = _latest_checkpoint(paths.checkpoints) if paths.checkpoints else None
    if paths.checkpoints is None:
        rows.append(("checkpoint", "not saved (set checkpoint.save to keep the weights and resume)"))
    elif checkpoint is None:
        rows.append(("checkpoint", f"none in {paths.checkpoints}"))
    else:
        rows.append(("checkpoint", checkpoint))
    if paths.tensorboard is None:
        rows.append(("TensorBoard logs", "off (set logger.tensorboard_dir to record the curves)"))
    else:
        rows.append(("TensorBoard logs", paths.tensorboard))
        if plot is not None:
            rows.append(("loss curves", f"{plot} (open it in a browser)"))
        elif plot_note is not None:
            rows.append(("loss curves", plot_note))

    nxt: list[tuple[str, str]] = []
    if checkpoint is not None and paths.checkpoints is not None:
        base = list(command)
        load = []
        if cfg.checkpoint.load is None or os.path.normpath(cfg.checkpoint.load) != paths.checkpoints:
            load = [f"checkpoint.load={paths.checkpoints}"]
        if step < target and not nothing_trained:
            nxt.append(
                (
                    "resume",
                    shlex.join([*_without(base, ["checkpoint.load"]), *load]) + f"  (to iteration {target})",
                )
            )
        else:
            samples = t.train_samples is not None and t.train_iters is None
            key = "train.train_samples" if samples else "train.train_iters"
            more = 2 * (t.train_samples if samples else target)  # type: ignore[operator]
            cmd = shlex.join([*_without(base, [key, "checkpoint.load"]), *load, f"{key}={more}"])
            nxt.append(("train further", f"{cmd}  (resumes at iteration {step})"))
        text = ["viaduct", "generate", "--checkpoint", paths.checkpoints, "--prompt", "The"]
        nxt.append(("write text", shlex.join(text) + "  (one process, also after torchrun)"))
        if cfg.peft is not None:
            merged = f"{paths.run_dir or os.path.dirname(paths.checkpoints)}_merged"
            merge = ["viaduct", "peft", "merge", paths.checkpoints, merged]
            nxt.append(("merge adapters", shlex.join(merge) + "  (add --hf for a Hugging Face model)"))
    if paths.tensorboard is not None:
        nxt.append(("look at curves", shlex.join(["tensorboard", "--logdir", paths.tensorboard])))
        nxt.append(("redraw the plot", _plot_command(paths)))
    if checkpoint is not None and paths.run_dir is not None:
        # Another directory keeps this run; every output of the new one moves with it.
        fresh = _free_dir(paths.run_dir)
        moved = [f"checkpoint.save={os.path.join(fresh, CHECKPOINTS_SUBDIR)}"]
        if cfg.checkpoint.load is not None:
            moved.append(f"checkpoint.load={os.path.join(fresh, CHECKPOINTS_SUBDIR)}")
        if paths.tensorboard is not None:
            moved.append(f"logger.tensorboard_dir={os.path.join(fresh, TB_SUBDIR)}")
        keys = ["checkpoint.save", "checkpoint.load", "logger.tensorboard_dir"]
        cmd = shlex.join([*_without(command, keys), *moved])
        nxt.append(("start afresh", f"{cmd}  (or delete {paths.run_dir} and run the same command again)"))
    world = state.dist.world_size if state.dist is not None else 1
    width = max(len(k) for k, _ in rows + nxt)
    lines += [f"  {k:<{width}}  {v}" for k, v in rows]
    if nxt:
        lines.append("next:" + (" (launch under torchrun as this run was)" if world > 1 else ""))
        lines += [f"  {k:<{width}}  {v}" for k, v in nxt]
    lines.append("-" * 100)
    return lines


def report_run(
    cfg: ConfigContainer,
    state: GlobalState,
    *,
    command: Sequence[str],
    resumed_from: int | None,
    out: TextIO | None = None,
) -> None:
    """After a run: the last rank draws the loss curves, rank 0 prints the closing lines."""
    rank = state.dist.rank if state.dist is not None else 0
    world = state.dist.world_size if state.dist is not None else 1
    plot, note, curves = None, None, None
    if rank == world - 1:
        plot, note, curves = draw_curves(cfg)
    elif cfg.logger.tensorboard_dir:
        # The last rank draws it (it owns the event files); rank 0 names where it goes.
        plot = run_paths(cfg).plot
    if rank != 0:
        if note is not None and cfg.logger.tensorboard_dir:
            (out or sys.stderr).write(f"warning: loss curves {note}\n")
        return
    lines = summary_lines(
        cfg, state, command=command, resumed_from=resumed_from, plot=plot, plot_note=note, curves=curves
    )
    stream = out or sys.stdout
    stream.write("\n".join(lines) + "\n")
    stream.flush()


__all__ = ["PLOT_FILE", "RunPaths", "draw_curves", "report_run", "resume_step", "run_paths", "summary_lines"]
