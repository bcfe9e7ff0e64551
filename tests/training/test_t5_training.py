"""T5 models train through `pretrain()`: span-corruption data (synthetic or indexed), the T5 forward
step chosen for them, checkpoints that resume bitwise, data parallelism matching one process, and
clear refusals for what is not built."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch.distributed.tensor import DTensor

from viaduct.config import ConfigError
from viaduct.models.t5.provider import T5ModelProvider
from viaduct.testing import run_distributed, run_viaduct, tiny_pretrain_config
from viaduct.training.callbacks import CallbackContext
from viaduct.training.config import ConfigContainer
from viaduct.training.pretrain import pretrain

pytestmark = pytest.mark.slow

BUILTIN = (
    "dataset=t5",
    "dataset.data_path=builtin:pydoc",
    "dataset.split=90,5,5",
    "dataset.num_workers=0",
    "tokenizer.tokenizer_type=HuggingFaceTokenizer",
    "tokenizer.tokenizer_model=builtin:pydoc-bpe",
)


def tiny_t5(*overrides: str) -> ConfigContainer:
    """A 2 + 2 layer, 64-wide T5 on synthetic span corruption (encoder 64, decoder 16 tokens)."""
    cfg = tiny_pretrain_config(
        "train.train_iters=4",
        "train.eval_iters=0",
        "dataset=mock_t5",
        "dataset.num_workers=0",  # a new dataset section starts with 2 worker processes a rank
        "tokenizer.vocab_extra_ids=40",
    )
    cfg.model = T5ModelProvider(
        num_layers=2,
        encoder_num_layers=2,
        hidden_size=64,
        ffn_hidden_size=128,
        num_attention_heads=4,
        seq_length=64,
        seq_length_dec=16,
        max_position_embeddings=64,
        hidden_dropout=0.0,
        attention_dropout=0.0,
    )
    from viaduct.config import apply_overrides

    return apply_overrides(cfg, list(overrides))


def _run(rank: int, world: int, overrides: tuple[str, ...]) -> dict[str, Any]:
    out: dict[str, Any] = {"losses": []}

    def step_end(ctx: CallbackContext) -> None:
        if ctx.metrics["losses"]:
            out["losses"].append(float(ctx.metrics["losses"]["lm loss"]))

    def train_end(ctx: CallbackContext) -> None:
        assert ctx.model is not None
        out["params"] = {
            n.removeprefix("module."): (p.full_tensor() if isinstance(p, DTensor) else p)
            .detach()
            .float()
            .clone()
            for n, p in ctx.model.named_parameters()
        }

    pretrain(tiny_t5(*overrides), callbacks=[{"on_train_step_end": step_end, "on_train_end": train_end}])
    return out


def test_t5_trains_on_synthetic_and_indexed_span_corruption() -> None:
    mock = _run(0, 1, ("train.train_iters=12", "optimizer.lr=3e-3"))
    assert mock["losses"][-1] < mock["losses"][0] - 0.5
    indexed = _run(0, 1, BUILTIN)
    assert len(indexed["losses"]) == 4 and all(torch.isfinite(torch.tensor(indexed["losses"])))


def test_t5_checkpoints_resume_bitwise(tmp_path: Path) -> None:
    straight = _run(0, 1, ())
    save = f"checkpoint.save={tmp_path / 'run'}"
    first = _run(0, 1, (save, "checkpoint.save_interval=2", "train.exit_interval=2"))
    resumed = _run(0, 1, (save, f"checkpoint.load={tmp_path / 'run'}"))
    assert first["losses"] + resumed["losses"] == straight["losses"]
    for name, value in straight["params"].items():
        torch.testing.assert_close(resumed["params"][name], value, rtol=0, atol=0, msg=name)


@pytest.mark.distributed
@pytest.mark.parametrize("layout", [(), ("ddp.use_distributed_optimizer=true",)], ids=["ddp", "fsdp"])
def test_t5_under_data_parallelism_matches_one_process(layout: tuple[str, ...]) -> None:
    one = _run(0, 1, ())
    for rank in run_distributed(_run, 2, layout, timeout=240, all_ranks=True, reuse=True):
        torch.testing.assert_close(
            torch.tensor(rank["losses"]), torch.tensor(one["losses"]), rtol=1e-5, atol=1e-6
        )
        for name, value in one["params"].items():
            torch.testing.assert_close(rank["params"][name], value, rtol=1e-4, atol=1e-6, msg=name)


TP = "model.tensor_model_parallel_size=2"
RELATIVE = "model.position_embedding_type=relative"
# The tokenizer's 299 tokens, padded to a multiple of 2 for one process too: tensor parallelism pads
# the vocabulary to a multiple of its size, and a padding row (never a label) still enters the softmax.
EVEN_VOCAB = "model.vocab_size=300"


@pytest.mark.distributed
@pytest.mark.parametrize(
    ("model", "layout", "world"),
    [
        # Two ranks without sequence parallelism; four with it, sharding and relative positions.
        ((EVEN_VOCAB, "model.share_embeddings_and_output_weights=false"), (TP,), 2),
        (
            (EVEN_VOCAB, RELATIVE, "model.recompute_granularity=full", "model.recompute_method=uniform"),
            (TP, "model.sequence_parallel=true", "ddp.use_distributed_optimizer=true"),
            4,
        ),
    ],
    ids=["tp2-untied", "tp2-sp-fsdp2-relative-recompute"],
)
def test_t5_under_tensor_parallelism_matches_one_process(
    model: tuple[str, ...], layout: tuple[str, ...], world: int
) -> None:
    """Tensor parallelism (heads, MLP units, relative bias tables and vocabulary split; with sequence
    parallelism the residual streams too), alone or with sharded data parallelism, trains the same
    losses and weights as one process."""
    one = _run(0, 1, model)
    for rank in run_distributed(_run, world, model + layout, timeout=480, all_ranks=True, reuse=True):
        torch.testing.assert_close(
            torch.tensor(rank["losses"]), torch.tensor(one["losses"]), rtol=1e-5, atol=1e-6
        )
        assert rank["params"].keys() == one["params"].keys()
        for name, value in one["params"].items():
            # atol 1e-5: the key biases' gradient is zero in exact arithmetic (adding one number to
            # every score of a softmax row changes nothing), so Adam's steps on them follow rounding
            # noise, which differs when the heads' sums are split.
            torch.testing.assert_close(rank["params"][name], value, rtol=1e-4, atol=1e-5, msg=name)


def test_what_t5_cannot_run_is_refused() -> None:
    with pytest.raises(ConfigError) as info:
        tiny_t5(
            "dataset=mock", "model.context_parallel_size=2", "model.pipeline_model_parallel_size=2"
        ).validate(world_size=4)
    found = {p.path: p.message for p in info.value.problems}
    assert {"dataset", "model.context_parallel_size", "model.pipeline_model_parallel_size"} <= found.keys()
    assert "encoder pipeline split is not built yet" in found["model.pipeline_model_parallel_size"]
    # Sequence parallelism splits the decoder's sequence too: 15 tokens do not split over 2 ranks (the
    # encoder's 64 do).
    with pytest.raises(ConfigError) as info:
        tiny_t5(TP, "model.sequence_parallel=true", "model.seq_length_dec=15").validate(world_size=2)
    assert [p.path for p in info.value.problems] == ["model.sequence_parallel"]


def test_t5_tensor_parallel_and_recompute_layouts_validate() -> None:
    """What runs validates: tensor and sequence parallelism (with data parallelism) and recompute."""
    tiny_t5(TP, "model.sequence_parallel=true", "ddp.use_distributed_optimizer=true").validate(world_size=4)
    tiny_t5(TP, RELATIVE, "model.recompute_granularity=selective").validate(world_size=2)


def test_the_t5_recipe_runs_from_the_command_line(tmp_path: Path) -> None:
    done = run_viaduct(
        "pretrain",
        "--recipe",
        "t5_220m",
        "train.train_iters=2",
        "train.global_batch_size=4",
        "train.micro_batch_size=2",
        "train.eval_iters=0",
        "model.num_layers=2",
        "model.encoder_num_layers=2",
        "model.hidden_size=64",
        "model.ffn_hidden_size=128",
        "model.num_attention_heads=4",
        "model.kv_channels=16",
        "model.seq_length=128",
        "model.seq_length_dec=32",
        "mixed_precision=fp32",
        "scheduler.lr_warmup_iters=0",
        cwd=tmp_path,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "runs" / "t5_220m" / "checkpoints" / "iter_0000002").is_dir()
