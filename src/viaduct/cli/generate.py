"""`viaduct generate`: write text with a trained model.

    viaduct generate --checkpoint runs/tiny_gpt/checkpoints --prompt "The list type" [--prompt ...]
                     [--max-new-tokens N] [--temperature T] [--top-k K] [--top-p P] [--seed S]
                     [--device cpu|cuda]
    viaduct generate --hf DIR --prompt ...      (a Hugging Face model directory, through viaduct.AutoBridge)

Each prompt is printed followed by its completion. Unlike the Python API (greedy unless asked), the
command samples by default (temperature 0.8, top-p 0.95, seed 0: the same text every time); pass
`--temperature 0` for greedy decoding. Problems print one `error: ...` line and exit 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import TYPE_CHECKING

from viaduct.config.errors import ConfigError, Problem

if TYPE_CHECKING:
    from viaduct.inference.generate import TextTokenizer
    from viaduct.models.gpt.model import GPTModel

EXIT_ERROR = 2


def add_generate_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add `generate` to the `viaduct` command's subparsers."""
    text = "write text with a trained model (a viaduct checkpoint or a Hugging Face directory)"
    p = subparsers.add_parser("generate", help=text, description=text[0].upper() + text[1:] + ".")
    p.add_argument(
        "--checkpoint",
        metavar="DIR",
        help="a viaduct checkpoint: the run's checkpoint.save directory (its latest checkpoint) or one "
        "iter_N directory, e.g. runs/tiny_gpt/checkpoints",
    )
    p.add_argument(
        "--hf", metavar="DIR", help="a Hugging Face model directory (config.json, weights, tokenizer)"
    )
    p.add_argument(
        "--prompt", action="append", metavar="TEXT", help="text to continue; repeat for several (batched)"
    )
    p.add_argument("--max-new-tokens", type=int, default=64, metavar="N", help="tokens to add (default 64)")
    p.add_argument(
        "--temperature",
        type=float,
        default=0.8,
        metavar="T",
        help="sampling temperature; 0: greedy (default 0.8)",
    )
    p.add_argument("--top-k", type=int, default=None, metavar="K", help="sample among the K likeliest tokens")
    p.add_argument(
        "--top-p",
        type=float,
        default=0.95,
        metavar="P",
        help="nucleus sampling mass in (0, 1] (default 0.95)",
    )
    p.add_argument("--seed", type=int, default=0, metavar="S", help="sampling seed (default 0)")
    p.add_argument(
        "--device", choices=("cpu", "cuda"), default=None, help="where to run (default: cuda when available)"
    )
    return p


def _check_args(args: argparse.Namespace) -> None:
    from viaduct.inference.sampling import check_sampling

    problems: list[Problem] = []
    if (args.checkpoint is None) == (args.hf is None):
        problems.append(
            Problem(
                "--checkpoint/--hf",
                "give exactly one model source" + (" (got both)" if args.checkpoint else ""),
                fix="--checkpoint runs/tiny_gpt/checkpoints, or --hf DIR",
            )
        )
    if not args.prompt:
        problems.append(
            Problem("--prompt", "at least one prompt is needed", fix='--prompt "Once upon a time"')
        )
    try:
        check_sampling(
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            max_new_tokens=args.max_new_tokens,
        )
    except ConfigError as exc:
        # Named as the flags are: top_p -> --top-p.
        problems += [dataclasses.replace(p, path="--" + p.path.replace("_", "-")) for p in exc.problems]
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            problems.append(Problem("--device", "CUDA is not available here", "cuda", fix="use --device cpu"))
    if problems:
        raise ConfigError(problems, header="invalid arguments")


def _load_hf(directory: str, device: str | None) -> tuple[GPTModel, TextTokenizer]:
    """A Hugging Face model directory, converted by `viaduct.AutoBridge`, with its tokenizer."""
    from pathlib import Path

    import torch

    path = Path(directory).expanduser()
    if not path.is_dir():
        raise ConfigError(
            Problem("--hf", "no such directory", str(path), fix="give a Hugging Face model directory"),
            header="cannot load the Hugging Face model",
        )
    try:
        import viaduct

        bridge_cls = viaduct.AutoBridge
    except (ImportError, AttributeError) as exc:
        raise ConfigError(
            Problem(
                "--hf",
                f"Hugging Face import is not available in this viaduct ({exc})",
                str(path),
                fix="load a viaduct checkpoint with --checkpoint",
            ),
            header="cannot load the Hugging Face model",
        ) from None
    from viaduct.data.tokenizers import build_tokenizer
    from viaduct.training.config import TokenizerConfig

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = bridge_cls.from_hf_pretrained(str(path)).to_megatron_provider().provide(device=dev)
    tokenizer = build_tokenizer(
        TokenizerConfig(tokenizer_type="HuggingFaceTokenizer", tokenizer_model=str(path))
    )
    return model.eval(), tokenizer


def run_generate(args: argparse.Namespace) -> int:
    """Run a parsed `viaduct generate`; errors print one message to stderr and return 2."""
    model: GPTModel
    tokenizer: TextTokenizer
    try:
        _check_args(args)
        if args.checkpoint is not None:
            from viaduct.inference.load import load_checkpoint

            loaded = load_checkpoint(args.checkpoint, device=args.device)
            model, tokenizer = loaded.model, loaded.tokenizer
            sys.stderr.write(f"loaded {loaded.directory}\n")
        else:
            model, tokenizer = _load_hf(args.hf, args.device)
        from viaduct.inference.generate import generate

        completions = generate(
            model,
            tokenizer,
            args.prompt,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k or None,
            top_p=args.top_p,
            seed=args.seed,
        )
    except ConfigError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return EXIT_ERROR
    except OSError as exc:  # permissions, I/O errors: still one line, no traceback
        sys.stderr.write(f"error: cannot read the model: {exc}\n")
        return EXIT_ERROR
    for i, (prompt, completion) in enumerate(zip(args.prompt, completions, strict=True)):
        if i:
            sys.stdout.write("\n")
        sys.stdout.write(f"{prompt}{completion}\n")
    return 0
