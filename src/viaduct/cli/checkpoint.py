"""`viaduct checkpoint inspect PATH [--json]`: describe a saved checkpoint without loading a model.
`viaduct checkpoint import-hf HF_DIR OUT_DIR` / `export-hf CKPT_DIR OUT_DIR`: convert Hugging Face model
directories to viaduct checkpoints and back."""

from __future__ import annotations

import argparse
import json
import sys

from viaduct.config.errors import ConfigError, Problem

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
    text = "convert a Hugging Face model directory (or Hub id) into a viaduct checkpoint"
    imp = csub.add_parser("import-hf", help=text, description=text[0].upper() + text[1:] + ".")
    imp.add_argument(
        "hf_path", metavar="HF_DIR", help="a Hugging Face model directory, or a Hub id owner/name"
    )
    imp.add_argument("out_dir", metavar="OUT_DIR", help="where to write the checkpoint (iter_0000000)")
    imp.add_argument(
        "--torch-dtype",
        choices=("float32", "bfloat16", "float16"),
        help="weights' dtype (default: the config's)",
    )
    text = "write a viaduct checkpoint's weights as a Hugging Face model directory"
    exp = csub.add_parser("export-hf", help=text, description=text[0].upper() + text[1:] + ".")
    exp.add_argument(
        "ckpt_dir", metavar="CKPT_DIR", help="a checkpoint root (its latest) or one iter_N directory"
    )
    exp.add_argument("out_dir", metavar="OUT_DIR", help="the Hugging Face directory to write")
    exp.add_argument(
        "--max-shard-size",
        type=float,
        default=5.0,
        metavar="GB",
        help="largest safetensors file (default 5 GB)",
    )
    return ck


def run_checkpoint(args: argparse.Namespace) -> int:
    """Run a parsed `viaduct checkpoint ...` command; errors print one message to stderr and return 2."""
    from viaduct.training.checkpoint.inspect import format_inspection, inspect_checkpoint

    if args.checkpoint_action in ("import-hf", "export-hf"):
        return _convert(args)
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


def _convert(args: argparse.Namespace) -> int:
    """`import-hf` / `export-hf`: one line on success, one `error:` line (exit 2) on a problem."""
    from viaduct.training.checkpoint.hf import export_hf_checkpoint, import_hf_checkpoint

    try:
        if args.checkpoint_action == "import-hf":
            where = import_hf_checkpoint(args.hf_path, args.out_dir, torch_dtype=args.torch_dtype)
        else:
            if not args.max_shard_size > 0:
                raise ConfigError(
                    Problem(
                        "--max-shard-size", "must be positive", args.max_shard_size, fix="give GB, e.g. 5"
                    ),
                    header="export-hf",
                )
            where = export_hf_checkpoint(
                args.ckpt_dir, args.out_dir, max_shard_size=int(args.max_shard_size * 1e9)
            )
    except ValueError as exc:  # ConfigError and the other user-facing errors
        sys.stderr.write(f"error: {exc}\n")
        return EXIT_ERROR
    except OSError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return EXIT_ERROR
    sys.stdout.write(f"wrote {where}\n")
    return 0
