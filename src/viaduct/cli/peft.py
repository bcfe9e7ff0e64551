"""`viaduct peft merge CKPT_DIR OUT_DIR [--hf]` and `viaduct peft export-adapter CKPT_DIR OUT_DIR`: turn a
PEFT run's adapter checkpoint into a merged model (a viaduct checkpoint, or a Hugging Face directory)
or a Hugging Face PEFT adapter directory (see `viaduct.peft.export`)."""

from __future__ import annotations

import argparse
import sys

from viaduct.config.errors import ConfigError

EXIT_ERROR = 2


def add_peft_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add `peft` (merge, export-adapter) to the `viaduct` command's subparsers."""
    text = "merge or export the adapters of a LoRA / DoRA fine-tuning run"
    pp = subparsers.add_parser("peft", help=text, description=text[0].upper() + text[1:] + ".")
    psub = pp.add_subparsers(dest="peft_action", required=True, metavar="ACTION")
    ckpt_help = "the run's adapter checkpoints (checkpoint.save: its latest) or one iter_N directory"
    text = "fold the adapters into the base weights and write the merged model"
    merge = psub.add_parser("merge", help=text, description=text[0].upper() + text[1:] + ".")
    merge.add_argument("ckpt_dir", metavar="CKPT_DIR", help=ckpt_help)
    merge.add_argument("out_dir", metavar="OUT_DIR", help="where to write the merged model (new or empty)")
    merge.add_argument(
        "--hf",
        action="store_true",
        help="write a Hugging Face model directory instead of a viaduct checkpoint",
    )
    text = "write the adapters alone in the Hugging Face PEFT layout"
    exp = psub.add_parser("export-adapter", help=text, description=text[0].upper() + text[1:] + ".")
    exp.add_argument("ckpt_dir", metavar="CKPT_DIR", help=ckpt_help)
    exp.add_argument("out_dir", metavar="OUT_DIR", help="the adapter directory to write")
    exp.add_argument(
        "--base",
        metavar="NAME",
        help="base_model_name_or_path for adapter_config.json (default: the run's pretrained_checkpoint)",
    )
    return pp


def run_peft(args: argparse.Namespace) -> int:
    """Run a parsed `viaduct peft ...` command: one line on success, one `error:` line (exit 2) on a
    problem."""
    from viaduct.peft.export import export_adapter, merge_checkpoint

    try:
        if args.peft_action == "merge":
            where = merge_checkpoint(args.ckpt_dir, args.out_dir, hf=args.hf)
            sys.stdout.write(f"merged model written to {where}\n")
        else:
            where = export_adapter(args.ckpt_dir, args.out_dir, base_model_name_or_path=args.base)
            sys.stdout.write(f"adapter written to {where}\n")
    except ConfigError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return EXIT_ERROR
    except OSError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return EXIT_ERROR
    return 0
