"""The `viaduct` command.

    viaduct config show     [--recipe NAME | --config-file F] [--provenance] [--resolved] [overrides...]
    viaduct config validate [--recipe NAME | --config-file F] [--world-size N] [--gpu-memory GB]
                            [overrides...]
    viaduct config diff A B     (each a YAML file or a recipe name)
    viaduct config schema   [--output F]
    viaduct config recipes
    viaduct pretrain        [--recipe NAME | --config-file F] [overrides...]   (also under torchrun)
    viaduct finetune        [--recipe NAME | --config-file F] [overrides...]
    viaduct data preprocess --input F.jsonl --json-keys text --tokenizer-type T ... --output-prefix P
    viaduct checkpoint inspect PATH [--json]
    viaduct checkpoint import-hf HF_DIR OUT_DIR | export-hf CKPT_DIR OUT_DIR
    viaduct plot RUN_DIR [--output F]     (the loss curves as an HTML page)
    viaduct generate --checkpoint DIR --prompt TEXT [--prompt ...] [--max-new-tokens N ...]
    viaduct peft merge CKPT_DIR OUT_DIR [--hf] | export-adapter CKPT_DIR OUT_DIR [--base NAME]

Overrides are Hydra-style (`train.train_iters=10`, `+a.b=v`, `++a.b=v`, `~a.b`) or generated
flags (`--train.train-iters 10`). Configuration errors print one message to stderr and exit 2; a
training run stopped by its own checks (a NaN loss, replicas that drifted apart) prints its message
and exits 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from viaduct.config.errors import ConfigError

if TYPE_CHECKING:
    from viaduct.training.config import ConfigContainer

EXIT_CONFIG_ERROR = 2
EXIT_RUN_ERROR = 1
DEFAULT_GPU_MEMORY_GB = 80.0
"""The GPU memory `viaduct config validate --world-size N` checks against (an H100 / A100 80 GB)."""


def _add_source_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recipe", metavar="NAME", help="recipe to start from (default: the embedded default)")
    p.add_argument(
        "--config-file",
        metavar="PATH",
        help="YAML file: a full config (with _target_) or partial overrides on top of the recipe",
    )
    p.add_argument("--help-config", action="store_true", help="list every --component.field flag and exit")


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number of GiB, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="viaduct", description="viaduct: configuration-centred LLM training"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    cfg = sub.add_parser("config", help="show, validate, compare and describe configurations")
    csub = cfg.add_subparsers(dest="action", required=True, metavar="ACTION")

    show = csub.add_parser("show", help="print a configuration as YAML")
    _add_source_args(show)
    show.add_argument("--provenance", action="store_true", help="say where each value came from")
    show.add_argument("--resolved", action="store_true", help="validate first and show derived values too")
    show.add_argument("--output", metavar="PATH", help="write the YAML here instead of printing it")

    val = csub.add_parser("validate", help="check a configuration (exit 2 with every problem if invalid)")
    _add_source_args(val)
    val.add_argument(
        "--world-size",
        type=int,
        metavar="N",
        help="number of processes (GPUs) to validate for; also prints the parallel layout and the memory "
        f"estimate per GPU, and fails when it exceeds --gpu-memory (default {DEFAULT_GPU_MEMORY_GB:g})",
    )
    val.add_argument(
        "--gpu-memory",
        type=_positive_float,
        metavar="GB",
        help="memory of one GPU in GiB (2^30 bytes; 80 for an 80 GB H100 or A100): fail when the "
        "estimate per GPU exceeds it",
    )

    diff = csub.add_parser("diff", help="field-level differences between two configurations")
    diff.add_argument("a", help="YAML file or recipe name")
    diff.add_argument("b", help="YAML file or recipe name")

    schema = csub.add_parser("schema", help="JSON Schema of the YAML format (for editor completion)")
    schema.add_argument("--output", metavar="PATH", help="write the schema here instead of printing it")

    csub.add_parser("recipes", help="list the recipes")

    for name, text in (
        ("pretrain", "train a model (the embedded default without arguments); works under torchrun"),
        ("finetune", "train from checkpoint.pretrained_checkpoint (or resume checkpoint.load)"),
    ):
        run_p = sub.add_parser(name, help=text, description=text)
        _add_source_args(run_p)
    from viaduct.cli.checkpoint import add_checkpoint_parser
    from viaduct.cli.data import add_data_parser
    from viaduct.cli.generate import add_generate_parser
    from viaduct.cli.peft import add_peft_parser
    from viaduct.cli.plot import add_plot_parser

    add_data_parser(sub)
    add_checkpoint_parser(sub)
    add_plot_parser(sub)
    add_generate_parser(sub)
    add_peft_parser(sub)
    return parser


def _train(command: str, args: argparse.Namespace, extra: Sequence[str]) -> int:
    from viaduct.training.errors import TrainingRunError
    from viaduct.training.pretrain import finetune, pretrain

    if args.help_config:
        _print_config_help(args.recipe)
        return 0
    cfg = load_config(args.recipe, args.config_file, extra)
    from viaduct.training.run_report import report_run, resume_step

    resumed_from = resume_step(cfg)  # read before the run: a finished run resumed trains nothing
    try:
        state = (pretrain if command == "pretrain" else finetune)(cfg)
    except TrainingRunError as exc:
        # The run's own checks stopped it and the message says what to change: a traceback into
        # the training loop would only bury it.
        sys.stderr.write(f"error: {exc}\n")
        return EXIT_RUN_ERROR
    report_run(cfg, state, command=_command_line(command, args, extra), resumed_from=resumed_from)
    return 0


def _command_line(command: str, args: argparse.Namespace, extra: Sequence[str]) -> list[str]:
    """The command that started this run, as the closing lines' suggestions build on it."""
    source = (["--recipe", args.recipe] if args.recipe else []) + (
        ["--config-file", args.config_file] if args.config_file else []
    )
    return ["viaduct", command, *source, *extra]


def load_config(recipe: str | None, config_file: str | None, extra: Sequence[str]) -> ConfigContainer:
    """recipe < YAML file < CLI flags and overrides, in that order; then `${...}` interpolations,
    once, over the merged configuration (a file's `${train.train_iters}` sees the command line's)."""
    from viaduct.config.arguments import add_config_arguments, apply_parsed_args
    from viaduct.config.interpolation import resolve_interpolations
    from viaduct.config.overrides import process_config_with_overrides
    from viaduct.config.yaml_io import load_yaml_file
    from viaduct.recipes import DEFAULT_RECIPE, get_recipe
    from viaduct.training.config import ConfigContainer

    flags, overrides = split_flags(extra)
    bad = [o for o in overrides if "=" not in o and not o.startswith("~")]
    if bad:
        raise ConfigError(
            f"not an override: {' '.join(bad)} (write key.path=value, or --component.field VALUE)"
        )

    cfg = None
    file_is_full = False
    if config_file is not None:
        data, _ = load_yaml_file(config_file)
        file_is_full = isinstance(data, dict) and "_target_" in data
    if file_is_full and recipe is None:
        cfg = ConfigContainer.from_yaml(config_file)  # type: ignore[arg-type]
    else:
        cfg = get_recipe(recipe or DEFAULT_RECIPE)()
        if config_file is not None:
            cfg = process_config_with_overrides(cfg, config_filepath=config_file, resolve=False)
    if flags:
        parser = argparse.ArgumentParser(prog="viaduct", add_help=False, allow_abbrev=False)
        add_config_arguments(parser, cfg)
        namespace, unknown = parser.parse_known_args(flags)
        if unknown:
            from viaduct.config.errors import did_you_mean

            names = [a for action in parser._actions for a in action.option_strings]
            problems = [
                f"unknown flag {u}" + (f"; {did_you_mean(u, names)}" if did_you_mean(u, names) else "")
                for u in unknown
                if u.startswith("--")
            ]
            raise ConfigError("; ".join(problems) or f"unexpected arguments: {' '.join(unknown)}")
        apply_parsed_args(cfg, namespace)
    if overrides:
        process_config_with_overrides(cfg, cli_overrides=overrides, resolve=False)
    resolve_interpolations(cfg)
    return cfg


def split_flags(extra: Sequence[str]) -> tuple[list[str], list[str]]:
    """(generated flags with their values, Hydra-style overrides) from the trailing arguments."""
    flags: list[str] = []
    overrides: list[str] = []
    items = list(extra)
    i = 0
    while i < len(items):
        a = items[i]
        if a.startswith("--"):
            flags.append(a)
            # A flag's values follow it: anything that is neither a flag nor an override.
            while i + 1 < len(items) and not items[i + 1].startswith(("--", "~")) and "=" not in items[i + 1]:
                flags.append(items[i + 1])
                i += 1
        else:
            overrides.append(a)
        i += 1
    return flags, overrides


def _print_config_help(recipe: str | None) -> None:
    from viaduct.config.arguments import add_config_arguments
    from viaduct.recipes import DEFAULT_RECIPE, get_recipe

    parser = argparse.ArgumentParser(
        prog="viaduct config {show,validate}",
        add_help=False,
        description="Every field of the configuration as a flag.",
    )
    add_config_arguments(parser, get_recipe(recipe or DEFAULT_RECIPE)())
    parser.print_help()


def _config_from_operand(operand: str) -> ConfigContainer:
    if Path(operand).is_file():
        return load_config(None, operand, [])
    return load_config(operand, None, [])


def _summary(cfg: ConfigContainer) -> str:
    t, s = cfg.train, cfg.scheduler
    parts = [
        f"world size {cfg.world_size}, data-parallel {cfg.data_parallel_size}",
        f"global batch {t.global_batch_size} = {cfg.num_microbatches} micro-batches of {t.micro_batch_size}"
        f" × {cfg.data_parallel_size} ranks",
        f"{t.train_iters} iterations",
        f"LR warmup {s.lr_warmup_steps} samples, decay {s.lr_decay_steps} samples ({s.lr_decay_style})",
    ]
    return "configuration is valid: " + "; ".join(parts)


def _print_memory_plan(cfg: ConfigContainer, gpu_memory: float | None) -> None:
    """The layout and the memory estimate per GPU of a validated `cfg` (under pipeline parallelism
    also how the layers split, the schedule's bubble and each pipeline rank's estimate); raises
    `MemoryBudgetError` when the estimate exceeds `gpu_memory` GiB (default `DEFAULT_GPU_MEMORY_GB`)."""
    from viaduct.distributed.layout import layout_of
    from viaduct.models.accounting import check_memory, estimate_config_pipeline_memory

    world = cfg.world_size or 1
    budget = DEFAULT_GPU_MEMORY_GB if gpu_memory is None else gpu_memory
    layout = layout_of(cfg, world)
    sys.stdout.write(f"layout: {layout.describe()}\n")
    if layout.pp > 1:
        sys.stdout.write(_pipeline_plan(cfg) + "\n")
    try:
        if layout.pp > 1:
            ranks = estimate_config_pipeline_memory(cfg, world)
            per_rank = ", ".join(f"rank {e.pipeline_rank} {e.total / 2**30:.2f}" for e in ranks)
            sys.stdout.write(f"memory per pipeline rank (estimate, GiB): {per_rank}\n")
        estimate = check_memory(cfg, world, budget)
    except ConfigError as exc:
        if gpu_memory is None and exc.problems and exc.problems[0].path == "model":
            # A model family the estimate does not cover: say so, nothing to fail on.
            sys.stdout.write(f"memory per GPU: not estimated: {exc.problems[0].message}\n")
            return
        if gpu_memory is not None or not exc.problems or exc.problems[0].path != "model.vocab_size":
            raise
        # Only the run knows the vocabulary (from its tokenizer): no estimate, and nothing to fail on.
        sys.stdout.write(
            "memory per GPU: not estimated: model.vocab_size is unset (a run takes it from its "
            "tokenizer); set it to get the estimate\n"
        )
        return
    which = "" if estimate.pipeline_rank is None else f", pipeline rank {estimate.pipeline_rank}: the most"
    sys.stdout.write(f"memory per GPU (estimate{which}): {estimate.describe()} (one GPU: {budget:g} GiB)\n")


def _pipeline_plan(cfg: ConfigContainer) -> str:
    """One line: how the layers split into stages, the schedule and its bubble."""
    from viaduct.distributed.pipeline_split import bubble_fraction, effective_schedule, pipeline_stages

    model = cfg.model
    stages = pipeline_stages(model)
    pp = model.pipeline_model_parallel_size
    counts = [len(s.layers) for s in stages]
    split = (
        f"{len(stages)} stages of {counts[0]} layers"
        if len(set(counts)) == 1
        else f"{len(stages)} stages of {', '.join(map(str, counts))} layers"
    )
    chunks = f" ({pp} ranks × {len(stages) // pp} virtual stages)" if len(stages) > pp else ""
    schedule = effective_schedule(model)
    m = cfg.num_microbatches or 1
    bubble = bubble_fraction(schedule, pp, len(stages) // pp, m)
    return (
        f"pipeline: {model.num_layers} layers in {split}{chunks}; {schedule} schedule, {m} micro-batches "
        f"per step, bubble {bubble:.1%}"
    )


def run(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command in ("pretrain", "finetune"):
        return _train(args.command, args, extra)
    if args.command in ("data", "checkpoint", "plot", "generate", "peft"):
        if extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        if args.command == "peft":
            from viaduct.cli.peft import run_peft

            return run_peft(args)
        if args.command == "generate":
            from viaduct.cli.generate import run_generate

            return run_generate(args)
        if args.command == "plot":
            from viaduct.cli.plot import run_plot

            return run_plot(args)
        if args.command == "data":
            from viaduct.cli.data import run_data

            return run_data(args)
        from viaduct.cli.checkpoint import run_checkpoint

        return run_checkpoint(args)
    if args.command != "config":
        parser.error(f"unknown command {args.command}")
    if args.action in ("diff", "schema", "recipes") and extra:
        parser.error(f"unexpected arguments: {' '.join(extra)}")
    out = sys.stdout
    if args.action == "recipes":
        from viaduct.recipes import list_recipes

        for name, doc in list_recipes().items():
            out.write(f"{name:32s} {doc}\n")
        return 0
    if args.action == "schema":
        from viaduct.config.schema import json_schema
        from viaduct.training.config import ConfigContainer

        text = json.dumps(json_schema(ConfigContainer), indent=2) + "\n"
        if args.output:
            Path(args.output).write_text(text)
        else:
            out.write(text)
        return 0
    if args.action == "diff":
        from viaduct.config.diff import diff

        changes = diff(_config_from_operand(args.a), _config_from_operand(args.b))
        for c in changes:
            out.write(f"{c}\n")
        if not changes:
            out.write("no differences\n")
        return 0
    if args.help_config:
        _print_config_help(args.recipe)
        return 0
    cfg = load_config(args.recipe, args.config_file, extra)
    if args.action == "validate":
        cfg.validate(world_size=args.world_size)
        if args.world_size is not None or args.gpu_memory is not None:
            _print_memory_plan(cfg, args.gpu_memory)
        out.write(_summary(cfg) + "\n")
        return 0
    # show
    if args.resolved:
        cfg.validate()
    if args.output:
        cfg.to_yaml(args.output)
        return 0
    cfg.print_yaml(provenance=args.provenance)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    import warnings

    from viaduct.config.errors import ConfigWarning

    # Under torchrun every rank validates the same config: rank 0 alone reports the warnings.
    rank = os.environ.get("RANK", "0")
    warnings.simplefilter("always" if rank in ("", "0") else "ignore", ConfigWarning)
    warnings.formatwarning = lambda msg, cat, *a, **k: f"warning: {msg}\n"
    try:
        return run(argv)
    except ConfigError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return EXIT_CONFIG_ERROR
    except BrokenPipeError:  # `viaduct config show | head`
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
