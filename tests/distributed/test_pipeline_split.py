"""`viaduct.distributed.pipeline_split` (how layers split into pipeline stages, schedules, bubbles) and
the pipeline part of `viaduct.distributed.layout`: pure arithmetic, no processes."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from viaduct.config import ConfigError, apply_overrides
from viaduct.distributed import pipeline_layout, pipeline_split
from viaduct.distributed.layout import MESH_DIMS, ParallelLayout, layout_of
from viaduct.distributed.pipeline_split import (
    bubble_fraction,
    effective_schedule,
    parse_layout,
    pipeline_stages,
    rank_layers,
    schedule_problems,
    split_problems,
    stage_of,
)
from viaduct.models import GPTModelProvider
from viaduct.recipes import tiny_gpt_pretrain_config


def model(num_layers: int = 8, pp: int = 2, vpp: int | None = None, **kw: object) -> GPTModelProvider:
    return GPTModelProvider(
        num_layers=num_layers,
        hidden_size=64,
        num_attention_heads=4,
        vocab_size=128,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp,
        **kw,  # type: ignore[arg-type]
    )


def counts(cfg: GPTModelProvider) -> list[int]:
    """Transformer layers of each stage, by stage index."""
    return [len(s.layers) for s in pipeline_stages(cfg)]


def messages(cfg: GPTModelProvider) -> dict[str, str]:
    return {p.path: p.message for p in split_problems(cfg)}


# ------------------------------------------------------------------------------------ the split


def test_even_split_and_megatrons_interleaving() -> None:
    stages = pipeline_stages(model(8, pp=2))
    assert [(s.pp_rank, s.vp_stage, s.stage_index, s.layers) for s in stages] == [
        (0, 0, 0, (0, 1, 2, 3)),
        (1, 0, 1, (4, 5, 6, 7)),
    ]
    assert [(s.pre_process, s.post_process) for s in stages] == [(True, False), (False, True)]
    # Megatron's example: 8 layers, 2 ranks, 2 chunks each: rank 0 holds [0, 1] and [4, 5].
    cfg = model(8, pp=2, vpp=2)
    assert [stage_of(cfg, 0, v).layers for v in (0, 1)] == [(0, 1), (4, 5)]
    assert [stage_of(cfg, 1, v).layers for v in (0, 1)] == [(2, 3), (6, 7)]
    # ... and with 4 chunks: rank 0 holds [0] [2] [4] [6].
    cfg = model(8, pp=2, vpp=4)
    assert [stage_of(cfg, 0, v).layers for v in range(4)] == [(0,), (2,), (4,), (6,)]
    assert stage_of(cfg, 1, 3).post_process and stage_of(cfg, 0, 0).pre_process
    assert rank_layers(cfg) == [4, 4]


def test_without_pipeline_parallelism_one_stage_holds_everything() -> None:
    (stage,) = pipeline_stages(model(6, pp=1))
    assert stage.layers == tuple(range(6)) and stage.pre_process and stage.post_process
    assert stage_of(model(6, pp=1), 0, None) == stage


def test_embedding_and_loss_can_count_as_layers() -> None:
    # 6 layers + embedding + loss = 8 places over 4 ranks: the first and last stage hold one layer less.
    assert counts(
        model(6, pp=4, account_for_embedding_in_pipeline_split=True, account_for_loss_in_pipeline_split=True)
    ) == [1, 2, 2, 1]
    assert counts(model(7, pp=4, account_for_embedding_in_pipeline_split=True)) == [1, 2, 2, 2]
    assert counts(model(7, pp=4, account_for_loss_in_pipeline_split=True)) == [2, 2, 2, 1]
    # As in Megatron, a stage may then hold only the embedding (or the loss).
    assert counts(
        model(2, pp=4, account_for_embedding_in_pipeline_split=True, account_for_loss_in_pipeline_split=True)
    ) == [0, 1, 1, 0]
    # With virtual stages the places are counted over all pp × vpp stages.
    both = dict(account_for_embedding_in_pipeline_split=True, account_for_loss_in_pipeline_split=True)
    assert counts(model(14, pp=2, vpp=2, **both)) == [3, 4, 4, 3]
    assert pipeline_stages(model(14, pp=2, vpp=2, **both))[0].layers == (0, 1, 2)


def test_uneven_first_and_last_ranks() -> None:
    assert counts(
        model(10, pp=4, num_layers_in_first_pipeline_stage=1, num_layers_in_last_pipeline_stage=3)
    ) == [1, 3, 3, 3]
    assert counts(model(10, pp=3, num_layers_in_last_pipeline_stage=2)) == [4, 4, 2]
    assert counts(
        model(10, pp=2, num_layers_in_first_pipeline_stage=3, num_layers_in_last_pipeline_stage=7)
    ) == [3, 7]
    # With virtual stages a rank's count is divided over its chunks (Megatron's offsets).
    cfg = model(14, pp=3, vpp=2, num_layers_in_first_pipeline_stage=2)
    assert counts(cfg) == [1, 3, 3, 1, 3, 3]
    assert [stage_of(cfg, 0, v).layers for v in (0, 1)] == [(0,), (7,)]
    assert [stage_of(cfg, 2, v).layers for v in (0, 1)] == [(4, 5, 6), (11, 12, 13)]
    assert rank_layers(cfg) == [2, 6, 6]


def test_impossible_splits_name_the_numbers() -> None:
    assert messages(model(7, pp=2)) == {
        "pipeline_model_parallel_size": "num_layers 7 cannot be split evenly over 2 pipeline ranks"
    }
    assert messages(model(8, pp=2, vpp=3)) == {
        "virtual_pipeline_model_parallel_size": "num_layers 8 cannot be split evenly over 2 pipeline ranks "
        "× 3 virtual stages = 6 slices"
    }
    (p,) = split_problems(model(8, pp=2, account_for_embedding_in_pipeline_split=True))
    assert p.message == (
        "num_layers 8 + 1 (the embedding, account_for_embedding_in_pipeline_split=true) = 9 layers cannot be "
        "split evenly over 2 pipeline ranks"
    )
    assert p.fix is not None and "dividing 9 (e.g. 3, 9)" not in p.fix and "dividing 9 (e.g. 3)" in p.fix
    found = messages(model(8, pp=2, num_layers_in_first_pipeline_stage=9))
    assert found == {
        "num_layers_in_first_pipeline_stage": "the first rank's 9 layers are more than num_layers (8)"
    }
    found = messages(
        model(10, pp=2, num_layers_in_first_pipeline_stage=3, num_layers_in_last_pipeline_stage=4)
    )
    assert (
        "add up to 7, but with 2 pipeline ranks (no middle ones) they must add up to num_layers (10)"
        in (found["num_layers_in_first_pipeline_stage"])
    )
    found = messages(
        model(8, pp=4, num_layers_in_first_pipeline_stage=4, num_layers_in_last_pipeline_stage=4)
    )
    assert (
        "leave none of the 8 for the 2 middle pipeline ranks" in found["num_layers_in_first_pipeline_stage"]
    )
    found = messages(
        model(10, pp=4, num_layers_in_first_pipeline_stage=1, num_layers_in_last_pipeline_stage=2)
    )
    assert (
        "the 7 layers left after the first rank's 1 and the last rank's 2 cannot be split evenly over the 2"
        in (found["num_layers_in_first_pipeline_stage"])
    )
    found = messages(model(12, pp=3, vpp=2, num_layers_in_first_pipeline_stage=3))
    assert (
        "3 layers cannot be divided evenly over the first rank's 2 virtual stages"
        in (found["num_layers_in_first_pipeline_stage"])
    )
    found = messages(model(12, pp=3, vpp=2, num_layers_in_first_pipeline_stage=2))
    assert (
        "each middle pipeline rank gets 5 layers, which cannot be divided evenly over its 2 virtual stages"
        in (found["num_layers_in_first_pipeline_stage"])
    )
    assert messages(model(8, pp=2, num_layers_in_last_pipeline_stage=0)) == {
        "num_layers_in_last_pipeline_stage": "must be > 0 when set"
    }
    found = messages(
        model(8, pp=2, num_layers_in_first_pipeline_stage=4, account_for_embedding_in_pipeline_split=True)
    )
    assert "Megatron refuses it too" in found["account_for_embedding_in_pipeline_split"]
    # pipeline_stages raises them all, under the model's path.
    with pytest.raises(
        ConfigError, match=r"model.pipeline_model_parallel_size: num_layers 7 cannot be split"
    ):
        pipeline_stages(model(7, pp=2))


# ------------------------------------------------------------------------------------ layouts


def test_layout_strings() -> None:
    assert parse_layout("Et*3|(tt|)*2,tL") == [["E", "t", "t", "t"], ["t", "t"], ["t", "t"], ["t", "L"]]
    assert parse_layout("E|t*4|L") == [["E"], ["t"] * 4, ["L"]]
    assert parse_layout("E,t,t|(|)*2tL") == [["E", "t", "t"], [], [], ["t", "L"]]  # commas are cosmetic
    assert parse_layout("Et|*2tL") == [["E", "t"], [], ["t", "L"]]  # a repeated '|' (Megatron's x*N)
    cfg = model(8, pp=2, pipeline_model_parallel_layout="Et*3|(tt|)*2,tL")
    assert counts(cfg) == [3, 2, 2, 1] and effective_schedule(cfg) == "interleaved_1f1b"
    assert [stage_of(cfg, 0, v).layers for v in (0, 1)] == [(0, 1, 2), (5, 6)]
    # Stages may hold no transformer layer, as Megatron allows: "E|t*4|L".
    assert counts(model(4, pp=3, pipeline_model_parallel_layout="E|t*4|L")) == [0, 4, 0]
    # The list form, with symbols or Megatron's layer names.
    listed = [["embedding", "decoder"], ["t", "T ".strip().lower(), "loss"]]
    assert counts(model(3, pp=2, pipeline_model_parallel_layout=listed)) == [1, 2]


@pytest.mark.parametrize(
    ("layout", "where"),
    [
        ("Ett|t)L", "at position 5 (Ett|t»)L): ')' without a matching '('"),
        ("E(tt|t", "at position 1 (E»(tt|t): '(' is never closed"),
        ("Et*|L", "at position 2 (Et»*|L): '*' must be followed by a repeat count"),
        ("E(tt)|L", "at position 5 (E(tt)»|L): a parenthesized group must be followed by '*N'"),
        ("E((t)*2)*2|L", "at position 2 (E(»(t)*2)*2|L): parentheses cannot nest"),
        ("Et x|L", "at position 2 (Et» x|L): unknown symbol ' '"),
        ("*2|L", "at position 0 (»*2|L): '*' must follow a symbol, '|' or a group"),
        ("t*12345678", "at position 2 (t*»12345678): repeat count 12345678 is too large"),
        ("(t*999999|)*999", "at position 0 (»(t*999999|): expands to more than 1000000 symbols"),
    ],
)
def test_malformed_layouts_say_where(layout: str, where: str) -> None:
    (p,) = split_problems(model(8, pp=2, pipeline_model_parallel_layout=layout))
    assert p.path == "pipeline_model_parallel_layout" and p.value == layout
    assert p.message.startswith("malformed " + where), p.message


def test_layout_rules() -> None:
    def problems(layout: object, **kw: object) -> dict[str, str]:
        return messages(model(8, pp=2, pipeline_model_parallel_layout=layout, **kw))

    assert problems("Et*8|L|tL") == {
        "pipeline_model_parallel_layout": "has 3 slices, not a multiple of pipeline_model_parallel_size (2)"
    }
    found = problems("t*4E|t*4L")
    assert found["pipeline_model_parallel_layout"].startswith(
        "must hold the embedding 'E' exactly once, first in the first slice, but it is elsewhere"
    )
    found = problems("Et*4|t*4")
    assert (
        "must hold the loss 'L' exactly once, last in the last slice, but holds it 0 times"
        in (found["pipeline_model_parallel_layout"])
    )
    assert problems("Et*4|t*3L") == {
        "pipeline_model_parallel_layout": "places 7 transformer layers ('t'), but num_layers is 8"
    }
    assert "multi-token-prediction" in problems("Et*4|t*4mL")["pipeline_model_parallel_layout"]
    assert (
        "slice 1, item 0: unknown layer 'encoder'"
        in problems([["E"], ["encoder"]])["pipeline_model_parallel_layout"]
    )
    # The layout places every layer: Megatron refuses the other split settings with it.
    found = problems(
        "Et*4|t*4L", num_layers_in_first_pipeline_stage=4, account_for_loss_in_pipeline_split=True
    )
    assert set(found) == {"num_layers_in_first_pipeline_stage", "account_for_loss_in_pipeline_split"}
    assert (
        "cannot be combined with pipeline_model_parallel_layout"
        in found["account_for_loss_in_pipeline_split"]
    )


# ------------------------------------------------------------------------------------ stage_of


def test_stage_of_checks_its_arguments() -> None:
    cfg = model(8, pp=2, vpp=2)
    assert stage_of(cfg, 1, 1).stage_index == 3
    with pytest.raises(ValueError, match="vp_stage is required: each pipeline rank holds 2 model chunks"):
        stage_of(cfg, 0, None)
    with pytest.raises(ValueError, match="pp_rank 2 is not a pipeline rank"):
        stage_of(cfg, 2, 0)
    with pytest.raises(ValueError, match="vp_stage 2 is not a model chunk"):
        stage_of(cfg, 0, 2)
    assert stage_of(model(8, pp=2, vpp=1), 1, 0) == stage_of(model(8, pp=2), 1, None)


# ------------------------------------------------------------------------------------ schedules


def test_schedule_defaults() -> None:
    assert effective_schedule(model(8, pp=2)) == "1f1b"
    assert effective_schedule(model(8, pp=2, vpp=1)) == "1f1b"
    assert effective_schedule(model(8, pp=2, vpp=2)) == "interleaved_1f1b"
    assert effective_schedule(model(8, pp=2, vpp=2, pipeline_schedule="interleaved_zero_bubble")) == (
        "interleaved_zero_bubble"
    )
    assert effective_schedule(model(8, pp=2, pipeline_schedule="gpipe")) == "gpipe"


def test_micro_batch_counts_each_schedule_runs() -> None:
    assert schedule_problems(model(8, pp=1), [1]) == []
    assert schedule_problems(model(8, pp=4), [4, 5, 7, 100]) == []
    (p,) = schedule_problems(model(8, pp=4), [3, 2, 5, 2], samples_per_microbatch=2)
    assert p.path == "train.global_batch_size" and p.value == [2, 3]
    assert p.message.startswith("gives 2, 3 micro-batches per step")
    assert "the 1f1b pipeline schedule needs at least 4" in p.message
    assert p.fix is not None and p.fix.startswith("raise train.global_batch_size to at least 8")
    assert schedule_problems(model(8, pp=4, pipeline_schedule="gpipe"), [1, 3]) == []
    interleaved = model(8, pp=4, vpp=2)
    assert schedule_problems(interleaved, [4, 8, 12]) == []
    (p,) = schedule_problems(interleaved, [2, 6, 8], samples_per_microbatch=3)
    assert p.value == [2, 6] and "needs a multiple of 4" in p.message
    assert (
        p.fix is not None
        and "to a multiple of 12 (pipeline size × micro batch × data-parallel size), e.g. 24" in p.fix
    )
    zero_bubble = model(8, pp=2, pipeline_schedule="interleaved_zero_bubble")
    assert [p.value for p in schedule_problems(zero_bubble, [3])] == [3]


def test_bubble_fraction() -> None:
    assert bubble_fraction("1f1b", 4, 1, 12) == pytest.approx(3 / 15)
    assert bubble_fraction("gpipe", 4, 1, 12) == bubble_fraction("1f1b", 4, 1, 12)
    # Virtual stages divide the bubble: (pp - 1) / (m × vpp + pp - 1).
    assert bubble_fraction("interleaved_1f1b", 4, 2, 12) == pytest.approx(3 / 27)
    assert bubble_fraction("interleaved_zero_bubble", 4, 2, 12) == pytest.approx(3 / 27 / 3)
    assert bubble_fraction("1f1b", 1, 1, 8) == 0.0
    assert pipeline_split.ZERO_BUBBLE_SHARE == pytest.approx(1 / 3)


# ------------------------------------------------------------------------------------ layout arithmetic


def test_layout_with_pipeline_parallelism() -> None:
    cfg = apply_overrides(
        tiny_gpt_pretrain_config(),
        [
            "model.pipeline_model_parallel_size=2",
            "model.virtual_pipeline_model_parallel_size=2",
            "model.tensor_model_parallel_size=2",
            "ddp.use_distributed_optimizer=true",
        ],
    )
    layout = layout_of(cfg, 16)
    assert (layout.pp, layout.vpp, layout.schedule, layout.tp, layout.dp) == (2, 2, "interleaved_1f1b", 2, 4)
    assert MESH_DIMS == ("pp", "dp_replicate", "dp_shard", "cp", "tp")
    assert layout.mesh_shape == (2, 1, 4, 1, 2)
    assert (
        layout.describe() == "pp 2 (interleaved_1f1b, 2 virtual stages) × dp 4 (sharded, optim) × cp 1 × tp 2"
    )
    # The pipeline's stages use FSDP2 for their data-parallel part, even unsharded, and their gradients
    # are reduced once per step whatever the strategy.
    plain = ParallelLayout(world_size=2, pp=2, schedule="1f1b")
    assert (
        plain.uses_fsdp
        and plain.grad_shards == 1
        and plain.describe() == "pp 2 (1f1b) × dp 1 (replicated) × cp 1 × tp 1"
    )
    zero3 = ParallelLayout(world_size=4, pp=2, dp_shard=2, strategy="optim_grads_params", schedule="1f1b")
    assert not zero3.sync_grads_every_microbatch and zero3.reshard_after_forward
    assert ParallelLayout(world_size=2, dp_shard=2, strategy="optim_grads_params").sync_grads_every_microbatch
    # Without pipeline parallelism nothing changes.
    assert layout_of(tiny_gpt_pretrain_config(), 4).describe() == "dp 4 (replicated) × cp 1 × tp 1"
    assert layout_of(tiny_gpt_pretrain_config(), 4).mesh_shape == (1, 4, 1, 1, 1)


def test_pipeline_split_does_not_import_torch() -> None:
    # validate() and the planner read it on machines without a GPU stack: only the standard library,
    # viaduct.config (itself torch-free) and the layout parser beside it may be imported.
    allowed = {"__future__", "collections.abc", "dataclasses", "typing", "viaduct.config.errors"}
    for module in (pipeline_split, pipeline_layout):
        tree = ast.parse(Path(module.__file__).read_text())
        imported = {
            node.module if isinstance(node, ast.ImportFrom) else alias.name
            for node in ast.walk(tree)
            if isinstance(node, (ast.Import, ast.ImportFrom))
            for alias in node.names
        }
        assert imported <= allowed | {"viaduct.distributed.pipeline_layout"}, module.__name__
