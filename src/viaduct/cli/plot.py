"""`viaduct plot RUN_DIR [--output F]`: draw a run's loss curves into a self-contained HTML page."""

from __future__ import annotations

import argparse
import sys

from viaduct.config.errors import ConfigError

EXIT_ERROR = 2


def add_plot_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add `plot` to the `viaduct` command's subparsers."""
    text = "draw a run's training and validation loss (and learning rate) into an HTML page"
    p = subparsers.add_parser("plot", help=text, description=text[0].upper() + text[1:] + ".")
    p.add_argument(
        "run_dir",
        metavar="RUN_DIR",
        help="a run directory (holding tb_logs/) or a run's logger.tensorboard_dir",
    )
    p.add_argument(
        "--output",
        metavar="F",
        help="where to write the page (default: RUN_DIR/loss_curves.html for a run directory, "
        "else loss_curves.html in the event directory)",
    )
    return p


def run_plot(args: argparse.Namespace) -> int:
    """Run a parsed `viaduct plot`; errors print one message to stderr and return 2."""
    from viaduct.training.curves import read_curves, save_page

    try:
        curves = read_curves(args.run_dir)
        out = save_page(curves, args.output)
    except ConfigError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return EXIT_ERROR
    for note in curves.notes:
        sys.stderr.write(f"note: {note}\n")
    drawn = [*curves.training, *curves.validation]
    if curves.learning_rate is not None:
        drawn.append(curves.learning_rate)
    what = ", ".join(f"{s.tag} ({len(s)} points)" for s in drawn)
    sys.stdout.write(f"wrote {out}: {what}\n")
    return 0
