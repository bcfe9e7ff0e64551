"""How pipeline parallelism cuts a model into stages, and which schedules can run a step: arithmetic
on the model's configuration alone (no torch), so `validate()`, the memory planner and the run (each
pipeline rank builds the stages this module gives it) read the same answer.

**Stages.** ``pp`` = `pipeline_model_parallel_size` ranks each hold ``vpp`` =
`virtual_pipeline_model_parallel_size` model chunks (virtual stages; 1 when unset). The model is cut
into ``pp × vpp`` consecutive slices; slice ``s = vp_stage × pp + pp_rank`` runs on pipeline rank
``pp_rank`` as its chunk ``vp_stage`` (Megatron's interleaving: with 2 ranks and 2 chunks, rank 0
holds slices 0 and 2, rank 1 slices 1 and 3). Slice 0 also holds the embedding (`pre_process`), the
last slice the final norm, the output layer and the loss (`post_process`). Transformer layers go to
the slices in order, so every slice holds a contiguous run of global layer indices. How many each
slice gets follows Megatron Core, in one of three ways:

1. *Even* (the default): ``num_layers`` divided by ``pp × vpp``. With
   `account_for_embedding_in_pipeline_split` (`account_for_loss_in_pipeline_split`) the embedding
   (the loss) counts as one more layer and takes a place on the first (last) slice, which then holds
   one transformer layer less, possibly none.
2. *Uneven*: `num_layers_in_first_pipeline_stage` / `num_layers_in_last_pipeline_stage` give the first
   / last pipeline *rank* its own count (> 0); the other layers are split evenly over the middle ranks
   (which must get some when there are middle ranks). With virtual stages each rank's count is
   divided evenly over its ``vpp`` chunks. Megatron refuses the `account_for_*` switches here.
3. *Layout*: `pipeline_model_parallel_layout` lists each slice's contents, slices separated by ``|``:
   ``E`` the embedding, ``t`` a transformer layer, ``L`` the loss (``m``, a multi-token-prediction
   layer, is not supported); ``x*N`` repeats a symbol (or ``|``) N times, ``(...)*N`` a group
   (one level of parentheses), commas are cosmetic. ``"Et*3|(tt|)*2,tL"`` is 4 slices of 3, 2, 2 and
   1 layers (``Ettt|tt|tt|tL``). ``E`` must open the first slice and ``L`` close the last, once
   each; a slice may hold nothing. The number of slices must be a multiple of ``pp``; it sets
   ``vpp`` when that is unset. The list form has one list per slice, of the same symbols or
   Megatron's names (``embedding``, ``decoder``, ``loss``).

**Schedules** (`model.pipeline_schedule`, PyTorch's `torch.distributed.pipelining` schedules): 1f1b and
gpipe run one slice per rank; interleaved_1f1b and interleaved_zero_bubble any number. Unset:
interleaved_1f1b with virtual stages, else 1f1b. A step's micro-batches must suit the schedule
(`schedule_problems`): 1f1b needs at least ``pp``; the interleaved ones run them in rounds of ``pp``,
so a multiple of ``pp``; gpipe takes any number. `bubble_fraction` is the idle share a schedule leaves.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal, Protocol

from viaduct.config.errors import ConfigError, Problem
from viaduct.distributed.pipeline_layout import LayoutError, layout_error_problem, parse_layout

PipelineSchedule = Literal["1f1b", "interleaved_1f1b", "gpipe", "interleaved_zero_bubble"]
"""PyTorch's pipeline schedules viaduct runs (`model.pipeline_schedule`)."""

SCHEDULES: tuple[PipelineSchedule, ...] = ("1f1b", "interleaved_1f1b", "gpipe", "interleaved_zero_bubble")
"""Every `PipelineSchedule`."""

SINGLE_STAGE_SCHEDULES: tuple[PipelineSchedule, ...] = ("1f1b", "gpipe")
"""Schedules that run one slice per pipeline rank (no virtual stages)."""

ZERO_BUBBLE_SHARE = 1 / 3
"""The part of the interleaved schedule's bubble interleaved_zero_bubble is taken to keep: splitting
each backward into its input- and weight-gradient halves and filling the bubble with the latter cuts
it to about a third (the ZB-H1 schedule of "Zero Bubble Pipeline Parallelism", Qi et al. 2024)."""


class PipelineModelConfig(Protocol):
    """The fields of a model configuration (`TransformerConfig`) this module reads."""

    num_layers: int
    pipeline_model_parallel_size: int
    virtual_pipeline_model_parallel_size: int | None
    num_layers_in_first_pipeline_stage: int | None
    num_layers_in_last_pipeline_stage: int | None
    account_for_embedding_in_pipeline_split: bool
    account_for_loss_in_pipeline_split: bool
    pipeline_model_parallel_layout: str | list[list[str]] | None

    def pipeline_layout(self) -> tuple[str | list[list[str]] | None, str]:
        """The layout the split follows (None: none) and the field it comes from (for messages)."""
        ...


@dataclass(frozen=True)
class StageSpec:
    """One slice of the model: where it runs and what it holds (see the module docstring)."""

    pp_rank: int
    """The pipeline rank that holds it."""
    vp_stage: int
    """Its model-chunk (virtual stage) index on that rank, 0 .. vpp - 1."""
    stage_index: int
    """Its position along the model: vp_stage × pp + pp_rank."""
    layers: tuple[int, ...]
    """The 0-based global indices of its transformer layers, in order (possibly none)."""
    pre_process: bool
    """Whether it holds the embedding (the first slice)."""
    post_process: bool
    """Whether it holds the final norm, the output layer and the loss (the last slice)."""


# ------------------------------------------------------------------------------------ sizes


def _pp(cfg: PipelineModelConfig) -> int:
    return max(1, int(getattr(cfg, "pipeline_model_parallel_size", 1) or 1))


def num_virtual_stages(model_cfg: PipelineModelConfig) -> int:
    """Model chunks per pipeline rank: virtual_pipeline_model_parallel_size, or, unset, what the
    layout's number of slices implies, else 1 (also 1 without pipeline parallelism)."""
    pp = _pp(model_cfg)
    if pp <= 1:
        return 1
    vpp = getattr(model_cfg, "virtual_pipeline_model_parallel_size", None)
    if isinstance(vpp, int) and not isinstance(vpp, bool) and vpp >= 1:
        return vpp
    layout, _ = model_cfg.pipeline_layout()
    if layout is not None:
        try:
            slices = parse_layout(layout)
        except LayoutError:
            return 1
        if len(slices) % pp == 0 and len(slices) >= pp:
            return len(slices) // pp
    return 1


# ------------------------------------------------------------------------------------ the split


@dataclass(frozen=True)
class _Plan:
    pp: int
    vpp: int
    counts: tuple[int, ...]
    """Transformer layers of each slice, by stage_index."""


def _even_counts(cfg: PipelineModelConfig, pp: int, vpp: int, problems: list[Problem]) -> list[int]:
    n = cfg.num_layers
    emb, loss = (
        bool(cfg.account_for_embedding_in_pipeline_split),
        bool(cfg.account_for_loss_in_pipeline_split),
    )
    total, slices = n + emb + loss, pp * vpp
    if total % slices:
        extra = "".join(
            f" + 1 ({what}, {name}=true)"
            for flag, what, name in (
                (emb, "the embedding", "account_for_embedding_in_pipeline_split"),
                (loss, "the loss", "account_for_loss_in_pipeline_split"),
            )
            if flag
        )
        counted = f"num_layers {n}{extra} = {total} layers" if extra else f"num_layers {n}"
        over = (
            f"{pp} pipeline ranks × {vpp} virtual stages = {slices} slices"
            if vpp > 1
            else f"{pp} pipeline ranks"
        )
        culprit = (
            "virtual_pipeline_model_parallel_size"
            if vpp > 1 and total % pp == 0
            else "pipeline_model_parallel_size"
        )
        divisors = [d for d in range(2, min(total - 1, 64) + 1) if total % d == 0]
        hint = (
            f"pipeline ranks × virtual stages dividing {total} (e.g. {', '.join(map(str, divisors[:6]))})"
            if divisors
            else f"pipeline ranks × virtual stages dividing {total}"
        )
        problems.append(
            Problem(
                culprit,
                f"{counted} cannot be split evenly over {over}",
                getattr(cfg, culprit),
                fix=f"choose {hint}, or give the first/last rank its own count "
                "(num_layers_in_first_pipeline_stage, num_layers_in_last_pipeline_stage), "
                "or write a pipeline_model_parallel_layout",
            )
        )
        return []
    counts = [total // slices] * slices
    counts[0] -= emb
    counts[-1] -= loss
    return counts


def _uneven_counts(cfg: PipelineModelConfig, pp: int, vpp: int, problems: list[Problem]) -> list[int]:
    n = cfg.num_layers
    first, last = cfg.num_layers_in_first_pipeline_stage, cfg.num_layers_in_last_pipeline_stage
    before = len(problems)
    for name in ("account_for_embedding_in_pipeline_split", "account_for_loss_in_pipeline_split"):
        if getattr(cfg, name):
            problems.append(
                Problem(
                    name,
                    "cannot be combined with num_layers_in_first_pipeline_stage / "
                    "num_layers_in_last_pipeline_stage (Megatron refuses it too): those already say how "
                    "many layers the first and last ranks hold",
                    True,
                    fix=f"unset model.{name}, or the uneven counts",
                )
            )
    given = [(name, value) for name, value in (("first", first), ("last", last)) if value is not None]
    for which, value in given:
        name = f"num_layers_in_{which}_pipeline_stage"
        if value <= 0:
            problems.append(
                Problem(name, "must be > 0 when set", value, fix=f"set model.{name} >= 1, or unset it")
            )
        elif vpp > 1 and value % vpp:
            problems.append(
                Problem(
                    name,
                    f"{value} layers cannot be divided evenly over the {which} rank's {vpp} virtual stages "
                    f"(virtual_pipeline_model_parallel_size)",
                    value,
                    fix=f"use a multiple of {vpp}",
                )
            )
    if len(problems) > before:
        return []
    path = f"num_layers_in_{given[0][0]}_pipeline_stage"
    middle = pp - len(given)
    fixed = sum(v for _, v in given)
    rest = n - fixed
    described = " and ".join(f"the {w} rank's {v}" for w, v in given)
    if rest < 0 and middle:
        problems.append(
            Problem(
                path,
                f"{described} layers are more than num_layers ({n})",
                given[0][1],
                fix=f"make the first/last counts add up to less than {n}",
            )
        )
        return []
    if middle == 0 and rest != 0:
        problems.append(
            Problem(
                path,
                f"{described} layers add up to {fixed}, but with {pp} pipeline ranks (no middle ones) they "
                f"must add up to num_layers ({n})",
                given[0][1],
                fix=f"make the first and last counts add up to {n}",
            )
        )
        return []
    if rest == 0 and middle > 0:
        problems.append(
            Problem(
                path,
                f"{described} layers leave none of the {n} for the {middle} middle pipeline rank"
                f"{'s' * (middle > 1)}",
                given[0][1],
                fix="lower the first/last counts, or use fewer pipeline ranks",
            )
        )
        return []
    per_middle = rest // middle if middle else 0
    if middle and rest % middle:
        problems.append(
            Problem(
                path,
                f"the {rest} layers left after {described} cannot be split evenly over the {middle} middle "
                f"pipeline rank{'s' * (middle > 1)}",
                given[0][1],
                fix=f"change the first/last counts so that num_layers minus them is a multiple of {middle}",
            )
        )
        return []
    if middle and vpp > 1 and per_middle % vpp:
        problems.append(
            Problem(
                path,
                f"each middle pipeline rank gets {per_middle} layers, which cannot be divided evenly "
                f"over its {vpp} virtual stages",
                given[0][1],
                fix=f"change the first/last counts so that each middle rank gets a multiple of {vpp}",
            )
        )
        return []
    per_rank = [per_middle] * pp
    if first is not None:
        per_rank[0] = first
    if last is not None:
        per_rank[-1] = last
    return [per_rank[s % pp] // vpp for s in range(pp * vpp)]


def _layout_counts(
    cfg: PipelineModelConfig, layout: str | list[list[str]], path: str, pp: int, problems: list[Problem]
) -> tuple[list[int], int]:
    """(layers of each slice, vpp) of a layout, read from field `path`; ([], 1) after a problem."""
    before = len(problems)
    for name in (
        "num_layers_in_first_pipeline_stage",
        "num_layers_in_last_pipeline_stage",
        "account_for_embedding_in_pipeline_split",
        "account_for_loss_in_pipeline_split",
    ):
        value = getattr(cfg, name)
        if value not in (None, False):
            problems.append(
                Problem(
                    name,
                    f"cannot be combined with {path} (Megatron refuses it too): it already places every "
                    "layer",
                    value,
                    fix=f"unset model.{name}, or the layout",
                )
            )
    try:
        slices = parse_layout(layout)
    except LayoutError as exc:
        problems.append(layout_error_problem(layout, exc))
        return [], 1
    n_slices = len(slices)
    if n_slices % pp:
        problems.append(
            Problem(
                path,
                f"has {n_slices} slices, not a multiple of pipeline_model_parallel_size ({pp})",
                layout,
                fix=f"write {pp} × (virtual stages) slices separated by '|'",
            )
        )
        return [], 1
    vpp = n_slices // pp
    set_vpp = cfg.virtual_pipeline_model_parallel_size
    if set_vpp is not None and set_vpp != vpp and set_vpp >= 1:
        problems.append(
            Problem(
                "virtual_pipeline_model_parallel_size",
                f"conflicts with {path}: its {n_slices} slices over {pp} "
                f"pipeline ranks make {vpp} virtual stage{'s' * (vpp > 1)} per rank",
                set_vpp,
                fix="unset model.virtual_pipeline_model_parallel_size (the layout sets it), "
                f"or set it to {vpp}",
            )
        )
    flat = [s for stage in slices for s in stage]
    if "m" in flat:
        problems.append(
            Problem(
                path,
                "places multi-token-prediction layers ('m'), which are not supported",
                layout,
                fix="remove the 'm' symbols",
            )
        )
    for symbol, what, ok, where, fix in (
        ("E", "embedding", slices[0][:1] == ["E"], "first in the first slice", "start the layout with E"),
        ("L", "loss", slices[-1][-1:] == ["L"], "last in the last slice", "end the layout with L"),
    ):
        found = flat.count(symbol)
        if found != 1 or not ok:
            problems.append(
                Problem(
                    path,
                    f"must hold the {what} {symbol!r} exactly once, {where}, "
                    + (f"but holds it {found} times" if found != 1 else "but it is elsewhere"),
                    layout,
                    fix=fix + " (once)",
                )
            )
    layers = flat.count("t")
    if layers != cfg.num_layers:
        problems.append(
            Problem(
                path,
                f"places {layers} transformer layers ('t'), but num_layers is {cfg.num_layers}",
                layout,
                fix=f"place exactly {cfg.num_layers} 't' symbols, or change model.num_layers",
            )
        )
    if len(problems) > before:
        return [], 1
    return [stage.count("t") for stage in slices], vpp


def _plan(model_cfg: PipelineModelConfig) -> tuple[_Plan | None, list[Problem]]:
    problems: list[Problem] = []
    pp = _pp(model_cfg)
    n = model_cfg.num_layers
    if not isinstance(n, int) or n <= 0:
        problems.append(Problem("num_layers", "must be set (> 0)", n, fix="set model.num_layers"))
        return None, problems
    if pp <= 1:
        return _Plan(1, 1, (n,)), problems
    layout, layout_path = model_cfg.pipeline_layout()
    vpp_field = model_cfg.virtual_pipeline_model_parallel_size
    if vpp_field is not None and vpp_field < 1:
        problems.append(
            Problem(
                "virtual_pipeline_model_parallel_size",
                "must be >= 1 when set",
                vpp_field,
                fix="set model.virtual_pipeline_model_parallel_size >= 1, or unset it",
            )
        )
        return None, problems
    if layout is not None:
        counts, vpp = _layout_counts(model_cfg, layout, layout_path, pp, problems)
    else:
        vpp = vpp_field or 1
        uneven = (
            model_cfg.num_layers_in_first_pipeline_stage is not None
            or model_cfg.num_layers_in_last_pipeline_stage is not None
        )
        counts = (_uneven_counts if uneven else _even_counts)(model_cfg, pp, vpp, problems)
    if problems:
        return None, problems
    return _Plan(pp, vpp, tuple(counts)), problems


def split_problems(model_cfg: PipelineModelConfig) -> list[Problem]:
    """Why the layers of `model_cfg` cannot be split into its pipeline stages (empty: they can).
    Paths are relative to the model ("num_layers_in_first_pipeline_stage"); each problem names the
    numbers and a fix."""
    return _plan(model_cfg)[1]


def pipeline_stages(model_cfg: PipelineModelConfig) -> list[StageSpec]:
    """Every slice of the model, by stage_index (one slice holding everything without pipeline
    parallelism). Raises `ConfigError` with every problem of an impossible split."""
    plan, problems = _plan(model_cfg)
    if plan is None:
        raise ConfigError([p.prefixed("model") for p in problems], header="impossible pipeline split")
    stages, start, last = [], 0, len(plan.counts) - 1
    for s, count in enumerate(plan.counts):
        stages.append(
            StageSpec(
                pp_rank=s % plan.pp,
                vp_stage=s // plan.pp,
                stage_index=s,
                layers=tuple(range(start, start + count)),
                pre_process=s == 0,
                post_process=s == last,
            )
        )
        start += count
    return stages


def stage_of(model_cfg: PipelineModelConfig, pp_rank: int, vp_stage: int | None) -> StageSpec:
    """The slice pipeline rank `pp_rank` runs as its chunk `vp_stage` (None: its only chunk).
    Raises `ValueError` for a rank or chunk outside the pipeline sizes, `ConfigError` for an
    impossible split."""
    stages = pipeline_stages(model_cfg)
    pp = _pp(model_cfg)
    vpp = len(stages) // pp
    if not 0 <= pp_rank < pp:
        raise ValueError(f"pp_rank {pp_rank} is not a pipeline rank (pipeline_model_parallel_size = {pp})")
    if vp_stage is None:
        if vpp > 1:
            raise ValueError(f"vp_stage is required: each pipeline rank holds {vpp} model chunks")
        vp_stage = 0
    if not 0 <= vp_stage < vpp:
        raise ValueError(f"vp_stage {vp_stage} is not a model chunk (each pipeline rank holds {vpp})")
    return stages[vp_stage * pp + pp_rank]


def rank_layers(model_cfg: PipelineModelConfig) -> list[int]:
    """Transformer layers each pipeline rank holds (all its chunks together), by pipeline rank."""
    stages = pipeline_stages(model_cfg)
    per_rank = [0] * _pp(model_cfg)
    for stage in stages:
        per_rank[stage.pp_rank] += len(stage.layers)
    return per_rank


# ------------------------------------------------------------------------------------ schedules


def effective_schedule(model_cfg: PipelineModelConfig) -> PipelineSchedule:
    """model.pipeline_schedule if set; else interleaved_1f1b with virtual stages, else 1f1b."""
    schedule = getattr(model_cfg, "pipeline_schedule", None)
    if schedule in SCHEDULES:
        return schedule
    return "interleaved_1f1b" if num_virtual_stages(model_cfg) > 1 else "1f1b"


def schedule_problems(
    model_cfg: PipelineModelConfig,
    num_microbatches: Iterable[int],
    *,
    samples_per_microbatch: int | None = None,
) -> list[Problem]:
    """The micro-batch counts (per step) the pipeline schedule of `model_cfg` cannot run, as one
    problem at "train.global_batch_size" (nothing without pipeline parallelism).

    1f1b needs at least pipeline_model_parallel_size micro-batches (every stage must be busy before
    the first backward); interleaved_1f1b and interleaved_zero_bubble a multiple of it (PyTorch's run
    them in rounds of that size, and Megatron requires at least one round); gpipe any number.
    `samples_per_microbatch` (micro batch × data-parallel size) lets the fix name global batch sizes.
    """
    pp = _pp(model_cfg)
    if pp <= 1:
        return []
    schedule = effective_schedule(model_cfg)
    counts = sorted({int(m) for m in num_microbatches if m > 0})
    if schedule == "gpipe":
        return []
    if schedule == "1f1b":
        bad = [m for m in counts if m < pp]
        rule = f"needs at least {pp} (pipeline_model_parallel_size) so that every stage is busy"
    else:
        bad = [m for m in counts if m < pp or m % pp]
        rule = (
            f"needs a multiple of {pp} (pipeline_model_parallel_size): PyTorch's interleaved schedules run "
            "micro-batches in rounds of one per pipeline rank"
        )
    if not bad:
        return []
    interleaved = schedule != "1f1b"
    if samples_per_microbatch:
        unit = pp * samples_per_microbatch
        fix = (
            f"raise train.global_batch_size to a multiple of {unit} (pipeline size × micro batch × "
            f"data-parallel size), e.g. {max(unit, -(-bad[-1] // pp) * unit)}"
            if interleaved
            else f"raise train.global_batch_size to at least {unit} (pipeline size × micro batch × "
            "data-parallel size)"
        )
    else:
        fix = f"use a global batch giving {'a multiple of' if interleaved else 'at least'} {pp} micro-batches"
    fix += ", or lower train.micro_batch_size"
    if num_virtual_stages(model_cfg) == 1:
        fix += ", or set model.pipeline_schedule=gpipe"
    return [
        Problem(
            "train.global_batch_size",
            f"gives {', '.join(map(str, bad))} micro-batch{'' if bad == [1] else 'es'} per step "
            f"(global batch / (micro batch × data-parallel size)), but the {schedule} pipeline schedule "
            f"{rule}",
            bad[0] if len(bad) == 1 else bad,
            fix=fix,
        )
    ]


def bubble_fraction(schedule: str, pp: int, vpp: int, num_microbatches: int) -> float:
    """The share of a step a pipeline rank idles, in theory (equal stage times, no communication):
    (pp - 1) / (m × v + pp - 1) for m micro-batches, with v = vpp for interleaved_1f1b and v = 1 for
    1f1b and gpipe; interleaved_zero_bubble keeps `ZERO_BUBBLE_SHARE` of the interleaved figure.
    0 without pipeline parallelism."""
    if pp <= 1 or num_microbatches <= 0:
        return 0.0
    v = max(1, vpp) if schedule in ("interleaved_1f1b", "interleaved_zero_bubble") else 1
    bubble = (pp - 1) / (num_microbatches * v + pp - 1)
    return bubble * ZERO_BUBBLE_SHARE if schedule == "interleaved_zero_bubble" else bubble


__all__ = [
    "SCHEDULES",
    "PipelineSchedule",
    "StageSpec",
    "bubble_fraction",
    "effective_schedule",
    "num_virtual_stages",
    "parse_layout",
    "pipeline_stages",
    "rank_layers",
    "schedule_problems",
    "split_problems",
    "stage_of",
]
