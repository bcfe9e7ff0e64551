"""Pipeline-parallel settings through `ConfigContainer.validate()`: what is accepted, what is refused
and how the refusal reads (field, numbers, fix)."""

from __future__ import annotations

import warnings

import pytest

from viaduct.config import ConfigError, ConfigWarning, Problem, apply_overrides
from viaduct.distributed.layout import layout_of
from viaduct.recipes import tiny_gpt_pretrain_config
from viaduct.training.comm_overlap import CommOverlapConfig
from viaduct.training.config import ConfigContainer


def tiny(*overrides: str) -> ConfigContainer:
    """The embedded default (4 layers, global batch 16 of micro-batches of 8) with `overrides`."""
    return apply_overrides(tiny_gpt_pretrain_config(), list(overrides))


def refused(cfg: ConfigContainer, world_size: int) -> dict[str, Problem]:
    """path -> the problem validate() reports there (exactly one per path here)."""
    with pytest.raises(ConfigError) as info:
        cfg.validate(world_size=world_size)
    found: dict[str, Problem] = {}
    for p in info.value.problems:
        assert p.path not in found, [str(q) for q in info.value.problems]
        found[p.path] = p
    return found


def test_pipeline_and_virtual_stages_validate() -> None:
    cfg = tiny("model.pipeline_model_parallel_size=2", "train.micro_batch_size=4").validate(world_size=2)
    assert (cfg.data_parallel_size, cfg.num_microbatches) == (1, 4)
    layout = layout_of(cfg, 2)
    assert (layout.pp, layout.vpp, layout.schedule, layout.dp) == (2, 1, "1f1b", 1)
    cfg = tiny(
        "model.pipeline_model_parallel_size=2", "model.virtual_pipeline_model_parallel_size=2"
    ).validate(world_size=2)
    assert layout_of(cfg, 2).schedule == "interleaved_1f1b"
    # One chunk per rank, said explicitly, is allowed.
    tiny("model.pipeline_model_parallel_size=2", "model.virtual_pipeline_model_parallel_size=1").validate(
        world_size=2
    )
    # The pipeline dtype follows params_dtype, as in Megatron.
    assert str(cfg.model.pipeline_dtype) == str(cfg.model.params_dtype)


def test_virtual_stages_need_pipeline_parallelism_and_a_positive_size() -> None:
    problems = refused(tiny("model.virtual_pipeline_model_parallel_size=2"), 1)
    p = problems["model.virtual_pipeline_model_parallel_size"]
    assert "virtual pipeline parallelism needs pipeline_model_parallel_size > 1" in p.message
    problems = refused(
        tiny("model.pipeline_model_parallel_size=2", "model.virtual_pipeline_model_parallel_size=0"), 2
    )
    assert "must be >= 1" in problems["model.virtual_pipeline_model_parallel_size"].message


def test_the_world_must_hold_every_pipeline_rank() -> None:
    problems = refused(tiny("model.pipeline_model_parallel_size=4"), 2)
    p = problems["model.pipeline_model_parallel_size"]
    assert "world size 2 is not divisible by tensor × pipeline × context parallel size (1 × 4 × 1 = 4)" in (
        p.message
    )
    assert "multiple of 4 processes" in (p.fix or "")
    # Pipeline × tensor parallel: the data-parallel size divides by both.
    cfg = tiny(
        "model.pipeline_model_parallel_size=2",
        "model.tensor_model_parallel_size=2",
        "train.micro_batch_size=4",
    ).validate(world_size=8)
    assert cfg.data_parallel_size == 2


def test_an_impossible_split_names_the_numbers() -> None:
    problems = refused(tiny("model.pipeline_model_parallel_size=3"), 3)
    p = problems["model.pipeline_model_parallel_size"]
    assert p.message == "num_layers 4 cannot be split evenly over 3 pipeline ranks"
    assert "num_layers_in_first_pipeline_stage" in (p.fix or "")
    problems = refused(
        tiny(
            "model.pipeline_model_parallel_size=2",
            "model.num_layers_in_first_pipeline_stage=1",
            "model.account_for_loss_in_pipeline_split=true",
        ),
        2,
    )
    assert "Megatron refuses it too" in problems["model.account_for_loss_in_pipeline_split"].message
    # Split fields without pipeline parallelism stay refused.
    problems = refused(tiny("model.num_layers_in_last_pipeline_stage=1"), 1)
    assert (
        "only applies with pipeline parallelism"
        in problems["model.num_layers_in_last_pipeline_stage"].message
    )


def test_a_layout_sets_the_virtual_stages_as_megatron_does() -> None:
    cfg = tiny("model.pipeline_model_parallel_size=2", "model.pipeline_model_parallel_layout=Et|t|t|tL")
    cfg.validate(world_size=2)
    assert cfg.model.virtual_pipeline_model_parallel_size == 2
    assert cfg.model.source_of("virtual_pipeline_model_parallel_size").startswith("derived")
    # An edit is followed: a two-slice layout means one chunk per rank again.
    cfg.model.pipeline_model_parallel_layout = "Ett|ttL"
    cfg.validate(world_size=2)
    assert cfg.model.virtual_pipeline_model_parallel_size is None
    problems = refused(
        tiny(
            "model.pipeline_model_parallel_size=2",
            "model.virtual_pipeline_model_parallel_size=3",
            "model.pipeline_model_parallel_layout=Et|t|t|tL",
        ),
        2,
    )
    assert "make 2 virtual stages per rank" in problems["model.virtual_pipeline_model_parallel_size"].message
    problems = refused(
        tiny("model.pipeline_model_parallel_size=2", "model.pipeline_model_parallel_layout=Et|t(L"), 2
    )
    assert "malformed at position 4" in problems["model.pipeline_model_parallel_layout"].message


def test_schedule_rules() -> None:
    problems = refused(tiny("model.pipeline_schedule=gpipe"), 1)
    assert "only applies with pipeline parallelism" in problems["model.pipeline_schedule"].message
    problems = refused(
        tiny(
            "model.pipeline_model_parallel_size=2",
            "model.virtual_pipeline_model_parallel_size=2",
            "model.pipeline_schedule=1f1b",
        ),
        2,
    )
    p = problems["model.pipeline_schedule"]
    assert "1f1b runs one stage per pipeline rank, but each rank holds 2 model chunks" in p.message
    assert "interleaved_1f1b" in (p.fix or "")
    for schedule in ("gpipe", "1f1b", "interleaved_1f1b", "interleaved_zero_bubble"):
        tiny("model.pipeline_model_parallel_size=2", f"model.pipeline_schedule={schedule}").validate(
            world_size=2
        )


def test_megatron_point_to_point_options_under_pipeline_parallelism() -> None:
    pp = "model.pipeline_model_parallel_size=2"
    problems = refused(
        tiny(
            pp,
            "model.overlap_p2p_comm=true",
            "model.batch_p2p_comm=false",
            "model.variable_seq_lengths=true",
            "model.microbatch_group_size_per_vp_stage=3",
        ),
        2,
    )
    assert (
        "PyTorch's schedules batch each step's sends and receives"
        in problems["model.overlap_p2p_comm"].message
    )
    assert "cannot be turned off" in problems["model.batch_p2p_comm"].message
    assert "fixed shape" in problems["model.variable_seq_lengths"].message
    group = problems["model.microbatch_group_size_per_vp_stage"]
    assert "must equal pipeline_model_parallel_size (2)" in group.message
    assert "group micro-batches by the pipeline size" in group.message
    # Accepted as they are: Megatron's defaults, and the deallocation switch (without effect here).
    tiny(pp, "model.deallocate_pipeline_outputs=false").validate(world_size=2)
    # Without pipeline parallelism the old rule stays.
    problems = refused(tiny("model.overlap_p2p_comm=true"), 1)
    assert "cannot be combined with batch_p2p_comm" in problems["model.overlap_p2p_comm"].message


def test_comm_overlap_pipeline_choices_land_on_the_model() -> None:
    cfg = tiny("model.pipeline_model_parallel_size=2")
    cfg.comm_overlap = CommOverlapConfig(overlap_p2p_comm=True, batch_p2p_comm=False)
    problems = refused(cfg, 2)
    assert problems["model.overlap_p2p_comm"].source == "derived (comm_overlap.overlap_p2p_comm)"
    assert "comm_overlap.overlap_p2p_comm" in (problems["model.overlap_p2p_comm"].fix or "")
    assert "model.batch_p2p_comm" in problems
    # A value the user set on the model is overridden, with a warning, as for ddp.
    cfg = tiny("model.pipeline_model_parallel_size=2", "model.batch_p2p_comm=false")
    cfg.comm_overlap = CommOverlapConfig(batch_p2p_comm=True)
    with pytest.warns(ConfigWarning, match="model.batch_p2p_comm=False .* is overridden by comm_overlap"):
        cfg.validate(world_size=2)
    assert cfg.model.batch_p2p_comm is True


def test_zero_bubble_cannot_run_compiled_stages() -> None:
    base = ("model.pipeline_model_parallel_size=2", "model.pipeline_schedule=interleaved_zero_bubble")
    problems = refused(tiny(*base, "train.torch_compile=true"), 2)
    assert "PyTorch refuses for compiled stage modules" in problems["train.torch_compile"].message
    tiny(*base, "train.torch_compile=false").validate(world_size=2)


def test_pipeline_stages_need_sharded_checkpoints() -> None:
    problems = refused(tiny("model.pipeline_model_parallel_size=2", "checkpoint.ckpt_format=torch"), 2)
    p = problems["checkpoint.ckpt_format"]
    assert "pp 2 (1f1b)" in p.message and p.fix == "set checkpoint.ckpt_format=torch_dist"


def test_pipeline_dtype_must_be_a_float_dtype() -> None:
    problems = refused(tiny("model.pipeline_model_parallel_size=2", "model.pipeline_dtype=int8"), 2)
    assert "float32, bfloat16 or float16" in problems["model.pipeline_dtype"].message


def test_micro_batches_per_step_must_suit_the_schedule() -> None:
    # 16 samples of micro-batches of 8 on one data-parallel rank: 2 micro-batches, fewer than 4 stages.
    problems = refused(tiny("model.pipeline_model_parallel_size=4", "model.num_layers=8"), 4)
    p = problems["train.global_batch_size"]
    assert "gives 2 micro-batches per step" in p.message
    assert "the 1f1b pipeline schedule needs at least 4" in p.message
    assert p.fix is not None and "at least 32 (pipeline size × micro batch × data-parallel size)" in p.fix
    assert "model.pipeline_schedule=gpipe" in p.fix
    # gpipe runs any number.
    tiny(
        "model.pipeline_model_parallel_size=4", "model.num_layers=8", "model.pipeline_schedule=gpipe"
    ).validate(world_size=4)
    # The interleaved schedules need a multiple of the pipeline size: 6 is not one of 4.
    interleaved = (
        "model.pipeline_model_parallel_size=4",
        "model.num_layers=8",
        "model.virtual_pipeline_model_parallel_size=2",
        "train.micro_batch_size=1",
    )
    problems = refused(tiny(*interleaved, "train.global_batch_size=6"), 4)
    p = problems["train.global_batch_size"]
    assert "gives 6 micro-batches per step" in p.message and "needs a multiple of 4" in p.message
    assert (
        p.fix is not None
        and "a multiple of 4 (pipeline size × micro batch × data-parallel size), e.g. 8" in p.fix
    )
    assert "gpipe" not in p.fix  # gpipe cannot run two chunks per rank
    tiny(*interleaved, "train.global_batch_size=8").validate(world_size=4)


def test_every_ramp_up_batch_must_suit_the_schedule() -> None:
    pp = ("model.pipeline_model_parallel_size=2", "train.micro_batch_size=1")
    # Batches 1, 2, 3, then 4: the 1f1b schedule over 2 stages cannot run a step of 1 micro-batch.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        problems = refused(tiny(*pp, "train.global_batch_size=4", "train.rampup_batch_size=[1,1,100]"), 2)
    p = problems["train.rampup_batch_size"]
    assert p.message.startswith(
        "during the batch-size ramp-up, the global batch gives 1 micro-batch per step"
    )
    assert "train.global_batch_size" not in problems
    # Starting at 2, every ramp-up step runs.
    tiny(*pp, "train.global_batch_size=4", "train.rampup_batch_size=[2,1,100]").validate(world_size=2)
