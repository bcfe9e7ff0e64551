"""`viaduct data ...`: prepare training data.

    viaduct data preprocess --input data.jsonl --json-keys text [more keys] --tokenizer-type TYPE
                            [--tokenizer-model P] [--vocab-file F --merge-file F] [--vocab-size N]
                            --output-prefix out [--append-eod] [--workers N] [--log-interval N]

writes Megatron's `{output-prefix}_{key}_document.bin/.idx` for each json key. Also runnable as
`python -m viaduct.cli.data preprocess ...`. Errors (a missing file, a wrong key, bad lines, a bad
tokenizer setting) print one message to stderr and exit 2.
"""

from __future__ import annotations

import argparse
import sys
import typing
from collections.abc import Sequence

from viaduct.config import ConfigError, Problem

EXIT_ERROR = 2

# Config field names as they appear in problem paths -> the flag that sets them.
_FLAGS = {
    "input_path": "--input",
    "json_keys": "--json-keys",
    "output_prefix": "--output-prefix",
    "workers": "--workers",
    "tokenizer_type": "--tokenizer-type",
    "tokenizer_model": "--tokenizer-model",
    "vocab_file": "--vocab-file",
    "merge_file": "--merge-file",
    "vocab_size": "--vocab-size",
    "tiktoken_pattern": "--tiktoken-pattern",
}


def _tokenizer_types() -> list[str]:
    from viaduct.training.config.tokenizer import TokenizerType

    return list(typing.get_args(TokenizerType))


def _add_preprocess_args(p: argparse.ArgumentParser) -> None:
    inp = p.add_argument_group("input")
    inp.add_argument("--input", required=True, metavar="PATH", help="JSONL file: one JSON object per line")
    inp.add_argument(
        "--json-keys",
        nargs="+",
        default=["text"],
        metavar="KEY",
        help="keys whose text is tokenized, one output per key (default: text)",
    )
    tok = p.add_argument_group("tokenizer")
    types = _tokenizer_types()
    tok.add_argument(
        "--tokenizer-type", required=True, choices=types, metavar="TYPE", help="one of: " + ", ".join(types)
    )
    tok.add_argument(
        "--tokenizer-model", metavar="PATH", help="tokenizer.json or its directory, .model or tiktoken file"
    )
    tok.add_argument("--vocab-file", metavar="PATH", help="GPT-2 BPE vocab.json")
    tok.add_argument("--merge-file", metavar="PATH", help="GPT-2 BPE merges.txt")
    tok.add_argument("--vocab-size", type=int, metavar="N", help="vocabulary size (NullTokenizer)")
    tok.add_argument("--tiktoken-pattern", choices=["v1", "v2"], help="split pattern (TikTokenizer)")
    out = p.add_argument_group("output")
    out.add_argument(
        "--output-prefix",
        required=True,
        metavar="PREFIX",
        help="writes PREFIX_{key}_document.bin/.idx (the directory must exist)",
    )
    out.add_argument("--append-eod", action="store_true", help="end each document with the eod token")
    run = p.add_argument_group("runtime")
    run.add_argument("--workers", type=int, default=1, metavar="N", help="tokenizing processes (default: 1)")
    run.add_argument(
        "--log-interval",
        type=int,
        default=1000,
        metavar="N",
        help="update the progress bar every N documents (default: 1000)",
    )
    run.add_argument("--quiet", action="store_true", help="no progress bar and no summary")


def add_data_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add `data` (with its `preprocess` action) to the `viaduct` command's subparsers."""
    data = subparsers.add_parser("data", help="prepare training data", description="Prepare training data.")
    dsub = data.add_subparsers(dest="data_action", required=True, metavar="ACTION")
    text = "tokenize a JSONL file into Megatron indexed datasets (.bin/.idx)"
    pre = dsub.add_parser("preprocess", help=text, description=text[0].upper() + text[1:] + ".")
    _add_preprocess_args(pre)
    return data


def run_data(args: argparse.Namespace) -> int:
    """Run a parsed `viaduct data ...` command; errors print to stderr and return 2."""
    try:
        if args.data_action == "preprocess":
            return _preprocess(args)
        raise ConfigError(f"unknown data action {args.data_action}")
    except ConfigError as exc:
        sys.stderr.write(f"error: {_with_flags(exc)}\n")
        return EXIT_ERROR
    except KeyboardInterrupt:
        sys.stderr.write("interrupted; nothing was written\n")
        return 130


def _preprocess(args: argparse.Namespace) -> int:
    from viaduct.data.preprocess import preprocess_jsonl
    from viaduct.training.config.tokenizer import TokenizerConfig

    cfg = TokenizerConfig(
        tokenizer_type=args.tokenizer_type,
        tokenizer_model=args.tokenizer_model,
        vocab_file=args.vocab_file,
        merge_file=args.merge_file,
        vocab_size=args.vocab_size,
        tiktoken_pattern=args.tiktoken_pattern,
    )
    stats = preprocess_jsonl(
        args.input,
        args.output_prefix,
        args.json_keys,
        cfg,
        append_eod=args.append_eod,
        workers=args.workers,
        progress=not args.quiet,
        log_interval=args.log_interval,
    )
    if not args.quiet:
        sys.stdout.write(stats.summary() + "\n")
    return 0


def _with_flags(exc: ConfigError) -> ConfigError:
    """The error with field names replaced by their flags (tokenizer_model -> --tokenizer-model)."""

    def flag(problem: Problem) -> Problem:
        name = problem.path.removeprefix("tokenizer.")
        if name in _FLAGS:
            return Problem(_FLAGS[name], problem.message, problem.value, problem.fix, problem.source)
        return problem

    problems = [flag(p) for p in exc.problems]
    return ConfigError(problems, header=exc.header) if problems != exc.problems else exc


def build_parser() -> argparse.ArgumentParser:
    """The parser of `python -m viaduct.cli.data` (the same actions as `viaduct data`)."""
    parser = argparse.ArgumentParser(prog="viaduct")
    add_data_parser(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(["data", *(sys.argv[1:] if argv is None else argv)])
    return run_data(args)


if __name__ == "__main__":
    raise SystemExit(main())
