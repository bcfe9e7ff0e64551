"""`viaduct checkpoint inspect PATH [--json]`: describe a saved checkpoint without loading a model."""

from __future__ import annotations

import argparse
import json
import sys

from viaduct.config.errors import ConfigError

EXIT_ERROR = 2


def add_checkpoint_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add `checkpoint` (with its `inspect` action) to the `viaduct` command's subparsers."""
    ck = subparsers.add_parser(
        "checkpoint", help="look into saved checkpoints", description="Look into saved checkpoints."
    )
    csub = ck.add_subparsers(dest="checkpoint_action", required=True, metavar="ACTION")
    text = "print step, samples, FLOPs, config summary and the tensor table of a checkpoint"
    ins = csub.add_parser("inspect", help=text, description=text[0].upper() + text[1:] + ".")
    ins.add_argument(
        "path", metavar="PATH", help="a checkpoint root (with its tracker) or one iter_N directory"
    )
    ins.add_argument("--json", action="store_true", help="print machine-readable JSON instead of text")
    return ck


def run_checkpoint(args: argparse.Namespace) -> int:
    """Run a parsed `viaduct checkpoint ...` command; errors print one message to stderr and return 2."""
    from viaduct.training.checkpoint.inspect import format_inspection, inspect_checkpoint

    try:
        if args.checkpoint_action != "inspect":
            raise ConfigError(f"unknown checkpoint action {args.checkpoint_action}")
        info = inspect_checkpoint(args.path)
    except ConfigError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return EXIT_ERROR
    except OSError as exc:  # permissions, I/O errors: still one line, no traceback
        sys.stderr.write(f"error: cannot read {args.path}: {exc}\n")
        return EXIT_ERROR
    if args.json:
        sys.stdout.write(json.dumps(info, indent=2, default=str) + "\n")
    else:
        sys.stdout.write(format_inspection(info))
    return 0
