"""Checkpointer on the CPU: a tiny real GPT, a real MixedPrecisionOptimizer after real steps, both formats.

Round trips into fresh objects, the layout and tracker, retention, what each load setting restores,
crash leftovers, clear errors for missing or unsafe checkpoints, and a 2-process gloo save loaded by 1.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from viaduct.distributed.init import DistributedContext
from viaduct.models import GPTModelProvider
from viaduct.recipes import tiny_gpt_pretrain_config
from viaduct.testing import assert_identical
from viaduct.training.checkpoint.upgrade import inverse, row_permutations
from viaduct.training.checkpointing import Checkpointer, CheckpointError
from viaduct.training.config import CheckpointConfig, ConfigContainer, SchedulerConfig
from viaduct.training.optim import build_optimizer
from viaduct.training.scheduler import build_scheduler
from viaduct.training.state import TrainState

VOCAB, SEQ, GBS = 64, 16, 16
FORMATS = ["torch_dist", "torch"]


def make_cfg(world_size: int = 1, model: dict[str, Any] | None = None, **ckpt: Any) -> ConfigContainer:
    cfg = tiny_gpt_pretrain_config()
    cfg.model = GPTModelProvider(
        num_layers=1,
        hidden_size=32,
        num_attention_heads=4,
        vocab_size=VOCAB,
        seq_length=SEQ,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        **(model or {}),
    )
    cfg.train.train_iters = 20
    # Short warmup and decay: a few steps move the schedule (set whole, independent of the recipe's).
    cfg.scheduler = SchedulerConfig(lr_decay_style="cosine", lr_warmup_iters=2)
    cfg.checkpoint = CheckpointConfig(**ckpt)
    return cfg.validate(world_size=world_size)


def ctx1() -> DistributedContext:
    return DistributedContext()


class Run:
    """Model (bf16: the optimizer keeps float32 masters), optimizer, scheduler and train state."""

    def __init__(self, cfg: ConfigContainer, seed: int = 0) -> None:
        torch.manual_seed(seed)
        self.model = cfg.model.provide().to(torch.bfloat16)
        self.optimizer = build_optimizer(cfg.optimizer, self.model)
        self.scheduler = build_scheduler(cfg, self.optimizer)
        self.train_state = TrainState()
        self.losses: list[float] = []

    def objects(self) -> dict[str, Any]:
        return dict(
            model=self.model, optimizer=self.optimizer, scheduler=self.scheduler, train_state=self.train_state
        )

    def step(self, n: int = 1, data_seed: int = 0) -> Run:
        g = torch.Generator().manual_seed(data_seed + self.train_state.step)
        for _ in range(n):
            x = torch.randint(0, VOCAB, (2, SEQ), generator=g)
            self.optimizer.zero_grad()
            loss = self.model(x, labels=torch.roll(x, -1, 1)).float().mean()
            loss.backward()
            self.losses.append(loss.item())
            self.optimizer.step()
            self.scheduler.step(GBS)
            ts = self.train_state
            ts.step += 1
            ts.consumed_train_samples += GBS
            ts.floating_point_operations_so_far += 1.5e9
        return self

    def save(self, ckpt: Checkpointer) -> str:
        return ckpt.save(self.train_state.step, **self.objects())

    def load(self, ckpt: Checkpointer) -> int | None:
        return ckpt.load(**self.objects())


def assert_same_run(a: Run, b: Run) -> None:
    assert_identical(a.model.state_dict(), b.model.state_dict())
    oa, ob = a.optimizer.state_dict(), b.optimizer.state_dict()
    assert oa["state"] and oa["master"]
    assert_identical(oa, ob)
    assert a.scheduler.state_dict() == b.scheduler.state_dict()
    assert a.train_state == b.train_state


# ------------------------------------------------------------------------------------------- round trips


@pytest.mark.slow
@pytest.mark.parametrize("fmt", FORMATS)
def test_round_trip_restores_everything_and_training_continues_identically(tmp_path: Path, fmt: str) -> None:
    save = tmp_path / "ckpt"
    cfg = make_cfg(save=str(save), load=str(save), ckpt_format=fmt)
    a = Run(cfg).step(3)
    path = a.save(Checkpointer(cfg, ctx1()))
    after_save = torch.rand(3)  # the RNG stream right after the save

    it = save / "iter_0000003"
    assert path == str(it)
    assert (save / "latest_checkpointed_iteration.txt").read_text().strip() == "3"
    for name in ("common.pt", "train_state.pt", "metadata.json", "run_config.yaml", "rng/rank_00000.pt"):
        assert (it / name).is_file(), name
    assert (it / (".metadata" if fmt == "torch_dist" else "model_optim.pt")).is_file()
    meta = json.loads((it / "metadata.json").read_text())
    assert meta["format"] == fmt and meta["step"] == 3 and meta["contents"]["optimizer"] is True
    common = torch.load(it / "common.pt", weights_only=True)
    assert common["scheduler"]["num_steps"] == 3 * GBS
    assert common["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.95)
    assert ConfigContainer.from_yaml(it / "run_config.yaml").checkpoint.ckpt_format == fmt
    assert not [p for p in save.iterdir() if ".tmp" in p.name]

    b = Run(cfg, seed=1)
    ckpt = Checkpointer(cfg, ctx1())
    assert b.load(ckpt) == 3
    assert torch.equal(torch.rand(3), after_save)  # RNG restored
    assert_same_run(a, b)
    assert ckpt.last_load is not None
    assert set(ckpt.last_load.parts) == {"model", "optimizer", "scheduler", "train_state", "rng"}
    # Bitwise the same next step: masters, Adam moments, lr schedule all came back.
    a.step(1, data_seed=7)
    b.step(1, data_seed=7)
    assert_same_run(a, b)


def test_saving_the_same_step_again_replaces_it(tmp_path: Path) -> None:
    cfg = make_cfg(save=str(tmp_path))
    run = Run(cfg).step(1)
    ckpt = Checkpointer(cfg, ctx1())
    run.save(ckpt)
    run.train_state.consumed_valid_samples = 99
    run.save(ckpt)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "iter_0000001",
        "latest_checkpointed_iteration.txt",
        "latest_train_state.pt",
    ]
    for path in (tmp_path / "iter_0000001" / "train_state.pt", tmp_path / "latest_train_state.pt"):
        assert int(torch.load(path, weights_only=True)["consumed_valid_samples"]) == 99, path


@pytest.mark.slow
def test_bridge_tracker_alone_finds_the_checkpoint_and_a_torn_one_is_a_clear_error(tmp_path: Path) -> None:
    cfg = make_cfg(save=str(tmp_path))
    run = Run(cfg)
    ckpt = Checkpointer(cfg, ctx1())
    run.step(1).save(ckpt)
    run.step(1).save(ckpt)
    (tmp_path / "latest_checkpointed_iteration.txt").unlink()  # as a root written by Megatron Bridge
    (tmp_path / "iter_0000002").rename(tmp_path / "iter_0000009")  # the newest by name is not the tracked
    (tmp_path / "iter_0000001").rename(tmp_path / "iter_0000002")
    cfg2 = make_cfg(load=str(tmp_path))
    assert Run(cfg2).load(Checkpointer(cfg2, ctx1())) == 1  # iter_0000002 holds step 1's state
    (tmp_path / "latest_train_state.pt").write_bytes(b"PK\x03")
    with pytest.raises(CheckpointError, match="latest_train_state.pt is not a readable train state"):
        Run(cfg2).load(Checkpointer(cfg2, ctx1()))


@pytest.mark.slow
def test_constant_structure_reuses_plans_and_still_saves_new_values(tmp_path: Path) -> None:
    cfg = make_cfg(save=str(tmp_path), load=str(tmp_path), ckpt_assume_constant_structure=True)
    run = Run(cfg)
    ckpt = Checkpointer(cfg, ctx1())
    run.step(1).save(ckpt)
    run.step(1).save(ckpt)
    fresh = Run(cfg, seed=3)
    assert fresh.load(Checkpointer(cfg, ctx1())) == 2
    assert_same_run(run, fresh)


# ------------------------------------------------------------------------------------------- retention


@pytest.mark.slow
def test_retention_keeps_recent_k_and_interval_multiples(tmp_path: Path) -> None:
    cfg = make_cfg(save=str(tmp_path), most_recent_k=2, save_retain_interval=3)
    run = Run(cfg)
    ckpt = Checkpointer(cfg, ctx1())
    for _ in range(7):
        run.step(1).save(ckpt)
    # Old checkpoints are renamed at once (no longer loadable) and deleted in the background.
    steps = sorted(p.name for p in tmp_path.glob("iter_*") if not p.name.endswith(".deleting"))
    assert steps == ["iter_0000003", "iter_0000006", "iter_0000007"]
    ckpt.wait_for_pending_save()
    assert sorted(p.name for p in tmp_path.glob("iter_*")) == steps
    assert (tmp_path / "latest_checkpointed_iteration.txt").read_text().strip() == "7"


@pytest.mark.slow
def test_retention_never_deletes_the_checkpoint_loaded(tmp_path: Path) -> None:
    cfg = make_cfg(save=str(tmp_path))
    run = Run(cfg)
    first = Checkpointer(cfg, ctx1())
    run.step(1).save(first)
    run.step(1).save(first)
    cfg2 = make_cfg(save=str(tmp_path), load=str(tmp_path), ckpt_step=1, most_recent_k=1)
    resumed = Run(cfg2)
    ckpt = Checkpointer(cfg2, ctx1())
    assert resumed.load(ckpt) == 1
    resumed.step(1).save(ckpt)  # step 2 again: replaces the old step 2
    resumed.step(1).save(ckpt)
    ckpt.finalize()
    assert sorted(p.name for p in tmp_path.glob("iter_*")) == ["iter_0000001", "iter_0000003"]


@pytest.mark.slow
def test_retention_leaves_checkpoints_of_later_steps_alone_and_warns(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A run resumed from step 2 while a complete step 5 (another timeline) sits in the same directory."""
    cfg = make_cfg(save=str(tmp_path))
    run = Run(cfg)
    first = Checkpointer(cfg, ctx1())
    for _ in range(5):
        run.step(1).save(first)
    first.finalize()
    # As a crash between the rename of step 5 and the update of both trackers:
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("2\n")
    shutil.copy(tmp_path / "iter_0000002" / "train_state.pt", tmp_path / "latest_train_state.pt")
    cfg2 = make_cfg(save=str(tmp_path), load=str(tmp_path), most_recent_k=1)
    resumed = Run(cfg2)
    ckpt = Checkpointer(cfg2, ctx1())
    assert resumed.load(ckpt) == 2
    caplog.set_level("WARNING", logger="viaduct")
    resumed.step(1).save(ckpt)  # 3: the only candidate is 1 (2 was loaded, 4 and 5 are ahead)
    resumed.step(1).save(ckpt)  # 4: replaces the old 4; 3 goes
    ckpt.finalize()
    assert sorted(p.name for p in tmp_path.glob("iter_*")) == ["iter_0000002", "iter_0000004", "iter_0000005"]
    warnings = [r.getMessage() for r in caplog.records if "later steps" in r.getMessage()]
    assert len(warnings) == 1 and "iter_0000005" in warnings[0]  # once, naming the other timeline


# ------------------------------------------------------------------------------------------- load modes


def test_load_optim_false_keeps_a_fresh_optimizer_with_masters_from_the_weights(tmp_path: Path) -> None:
    cfg = make_cfg(save=str(tmp_path))
    a = Run(cfg).step(2)
    a.save(Checkpointer(cfg, ctx1()))
    cfg2 = make_cfg(load=str(tmp_path), load_optim=False, load_rng=False)
    b = Run(cfg2, seed=5)
    ckpt = Checkpointer(cfg2, ctx1())
    assert b.load(ckpt) == 2
    assert_identical(a.model.state_dict(), b.model.state_dict())
    assert b.optimizer.state_dict()["state"] == {}
    for s in b.optimizer.copies:  # masters follow the loaded 16-bit weights
        assert torch.equal(s.master, s.param.float())
    assert b.scheduler.state_dict() == a.scheduler.state_dict() and b.train_state == a.train_state
    assert "optimizer" not in ckpt.last_load.parts and "rng" not in ckpt.last_load.parts


def test_checkpoint_saved_without_optimizer_and_rng_resumes_with_fresh_ones(tmp_path: Path) -> None:
    cfg = make_cfg(save=str(tmp_path), load=str(tmp_path), save_optim=False, save_rng=False)
    a = Run(cfg).step(2)
    path = Path(a.save(Checkpointer(cfg, ctx1())))
    assert not (path / "rng").exists()
    assert "optimizer" not in torch.load(path / "common.pt", weights_only=True)
    b = Run(cfg, seed=5)
    ckpt = Checkpointer(cfg, ctx1())
    assert b.load(ckpt) == 2
    assert ckpt.last_load.parts == ["model", "scheduler", "train_state"]
    assert_identical(a.model.state_dict(), b.model.state_dict())
    assert b.optimizer.state_dict()["state"] == {}


def test_load_main_params_from_ckpt_restores_float32_masters(tmp_path: Path) -> None:
    cfg = make_cfg(save=str(tmp_path))
    a = Run(cfg).step(2)
    a.save(Checkpointer(cfg, ctx1()))
    masters = {s.name: s.master.clone() for s in a.optimizer.copies}
    assert any(not torch.equal(m, m.bfloat16().float()) for m in masters.values())  # more than bf16 holds

    cfg2 = make_cfg(load=str(tmp_path), load_optim=False, load_main_params_from_ckpt=True)
    b = Run(cfg2, seed=5)
    ckpt = Checkpointer(cfg2, ctx1())
    b.load(ckpt)
    assert b.optimizer.state_dict()["state"] == {}
    for s in b.optimizer.copies:
        assert torch.equal(s.master, masters[s.name])
        assert torch.equal(s.param, masters[s.name].bfloat16())
    assert "master_params" in ckpt.last_load.parts


@pytest.mark.parametrize("fmt", FORMATS)
def test_pretrained_checkpoint_loads_weights_only(tmp_path: Path, fmt: str) -> None:
    cfg = make_cfg(save=str(tmp_path / "base"), ckpt_format=fmt)
    a = Run(cfg).step(2)
    a.save(Checkpointer(cfg, ctx1()))
    for where in (tmp_path / "base", tmp_path / "base" / "iter_0000002"):  # a root, or one iteration
        cfg2 = make_cfg(pretrained_checkpoint=str(where))
        b = Run(cfg2, seed=5)
        assert b.load(Checkpointer(cfg2, ctx1())) == 0
        assert_identical(a.model.state_dict(), b.model.state_dict())
        assert b.train_state == TrainState() and b.scheduler.num_steps == 0
        assert b.optimizer.state_dict()["state"] == {}
        assert all(torch.equal(s.master, s.param.float()) for s in b.optimizer.copies)


def test_finetune_from_load_and_pretrained_fallback_when_load_is_empty(tmp_path: Path) -> None:
    cfg = make_cfg(save=str(tmp_path / "base"))
    a = Run(cfg).step(2)
    a.save(Checkpointer(cfg, ctx1()))

    cfg2 = make_cfg(load=str(tmp_path / "base"), finetune=True)
    b = Run(cfg2, seed=5)
    assert b.load(Checkpointer(cfg2, ctx1())) == 0
    assert_identical(a.model.state_dict(), b.model.state_dict())
    assert b.train_state.step == 0 and b.optimizer.state_dict()["state"] == {}

    # Recipes point load at save: on the first run it is empty, so the pretrained weights are taken.
    run_dir = tmp_path / "run"
    cfg3 = make_cfg(save=str(run_dir), load=str(run_dir), pretrained_checkpoint=str(tmp_path / "base"))
    c = Run(cfg3, seed=6)
    assert c.load(Checkpointer(cfg3, ctx1())) == 0
    assert_identical(a.model.state_dict(), c.model.state_dict())


def test_ckpt_step_picks_that_step_and_a_missing_one_names_field_and_path(tmp_path: Path) -> None:
    cfg = make_cfg(save=str(tmp_path))
    run = Run(cfg)
    ckpt = Checkpointer(cfg, ctx1())
    run.step(2).save(ckpt)
    run.step(2).save(ckpt)
    assert Run(cfg).load(Checkpointer(make_cfg(load=str(tmp_path), ckpt_step=2), ctx1())) == 2
    with pytest.raises(CheckpointError) as info:
        Run(cfg).load(Checkpointer(make_cfg(load=str(tmp_path), ckpt_step=3), ctx1()))
    assert isinstance(info.value, ValueError)
    (p,) = info.value.problems
    assert p.path == "checkpoint.ckpt_step" and str(tmp_path / "iter_0000003") in str(info.value)
    assert "[2, 4]" in p.fix


def test_nothing_to_load(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    cfg = make_cfg(save=str(run_dir), load=str(run_dir))  # first run of the resume pattern
    run = Run(cfg)
    assert run.load(Checkpointer(cfg, ctx1())) is None
    assert Run(make_cfg()).load(Checkpointer(make_cfg(), ctx1())) is None

    run_dir.mkdir()  # exists, but holds no checkpoint
    cfg2 = make_cfg(save=str(run_dir), load=str(run_dir), exit_on_missing_checkpoint=True)
    with pytest.raises(CheckpointError, match="checkpoint.load: holds no checkpoint") as info:
        run.load(Checkpointer(cfg2, ctx1()))
    assert str(run_dir) in str(info.value)

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="checkpoint.pretrained_checkpoint: holds no checkpoint"):
        run.load(Checkpointer(make_cfg(pretrained_checkpoint=str(empty)), ctx1()))


def test_leftover_tmp_dirs_are_ignored_and_cleaned_up(tmp_path: Path) -> None:
    cfg = make_cfg(save=str(tmp_path), load=str(tmp_path))
    run = Run(cfg).step(2)
    ckpt = Checkpointer(cfg, ctx1())
    run.save(ckpt)
    # A crash while writing step 5: a half-written directory, even with DCP's index and a tracker update.
    crashed = tmp_path / "iter_0000005.tmp"
    crashed.mkdir()
    (crashed / ".metadata").write_bytes(b"garbage")
    assert Run(cfg, seed=3).load(Checkpointer(cfg, ctx1())) == 2
    (tmp_path / "latest_checkpointed_iteration.txt").unlink()  # no tracker: the newest complete one
    assert Run(cfg, seed=3).load(Checkpointer(cfg, ctx1())) == 2
    run.step(1).save(ckpt)
    assert not crashed.exists()


# ------------------------------------------------------------------------------------------- safety


def test_unreadable_or_unsafe_files_give_clear_errors(tmp_path: Path) -> None:
    cfg = make_cfg(save=str(tmp_path), load=str(tmp_path))
    run = Run(cfg).step(1)
    run.save(Checkpointer(cfg, ctx1()))
    common = tmp_path / "iter_0000001" / "common.pt"
    # A pickle that would run code: weights_only loading refuses it.
    torch.save({"scheduler": Path("/etc/passwd")}, common)
    with pytest.raises(CheckpointError, match="checkpoint.load: cannot read common.pt") as info:
        Run(cfg).load(Checkpointer(cfg, ctx1()))
    assert str(common) in str(info.value)
    common.write_bytes(b"truncated")
    with pytest.raises(CheckpointError, match="cannot read common.pt"):
        Run(cfg).load(Checkpointer(cfg, ctx1()))
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("release\n")
    with pytest.raises(CheckpointError, match="unreadable tracker"):
        Run(cfg).load(Checkpointer(cfg, ctx1()))


def test_strictness_and_shape_mismatches(tmp_path: Path) -> None:
    cfg = make_cfg(save=str(tmp_path))
    a = Run(cfg).step(1)
    a.save(Checkpointer(cfg, ctx1()))

    def extra_model(policy: str) -> Run:
        run = Run(make_cfg(pretrained_checkpoint=str(tmp_path), dist_ckpt_strictness=policy), seed=4)
        run.model.register_buffer("extra", torch.full((3,), 7.0))
        return run

    with pytest.raises(CheckpointError, match=r"lacks 1 tensor\(s\) of this model: \['extra'\]"):
        extra_model("assume_ok_unexpected").load(
            Checkpointer(make_cfg(pretrained_checkpoint=str(tmp_path)), ctx1())
        )
    lenient = make_cfg(pretrained_checkpoint=str(tmp_path), dist_ckpt_strictness="return_all")
    run = extra_model("return_all")
    ckpt = Checkpointer(lenient, ctx1())
    assert run.load(ckpt) == 0
    assert ckpt.last_load.missing_keys == ["extra"] and torch.equal(run.model.extra, torch.full((3,), 7.0))
    assert torch.equal(run.model.embedding.word_embeddings.weight, a.model.embedding.word_embeddings.weight)

    wide = make_cfg(pretrained_checkpoint=str(tmp_path))
    wide.model.hidden_size = 64
    wide.model.ffn_hidden_size = None
    with pytest.raises(CheckpointError, match="tensor shape"):
        Run(wide.validate(world_size=1)).load(Checkpointer(wide, ctx1()))


def test_tokenizer_files_are_copied(tmp_path: Path) -> None:
    vocab, merges = tmp_path / "vocab.json", tmp_path / "merges.txt"
    vocab.write_text("{}")
    merges.write_text("#version: 0.2\n")
    cfg = make_cfg(save=str(tmp_path / "ckpt"))
    cfg.tokenizer.tokenizer_type = "GPT2BPETokenizer"
    cfg.tokenizer.vocab_file, cfg.tokenizer.merge_file = str(vocab), str(merges)
    path = Path(Run(cfg).save(Checkpointer(cfg, ctx1())))
    assert sorted(p.name for p in (path / "tokenizer").iterdir()) == ["merges.txt", "vocab.json"]
    assert json.loads((path / "metadata.json").read_text())["contents"]["tokenizer"] is True


# ------------------------------------------------------------------------------------- older versions

# Models whose fused weights version 2 lays out differently: grouped-query attention (with a QKV
# bias), and the same with a gated MLP (SwiGLU, fc1 with a bias).
LAYOUT_MODELS = {
    "gqa": dict(num_query_groups=2, add_qkv_bias=True),
    "gqa-gated": dict(
        num_query_groups=2,
        add_qkv_bias=True,
        gated_linear_unit=True,
        activation_func="silu",
        ffn_hidden_size=48,
    ),
}


def _as_version_1(directory: Path, cfg: ConfigContainer) -> list[str]:
    """Rewrite a "torch"-format checkpoint as version 1 saved it: the old rows of linear_qkv ([q heads |
    k groups | v groups]) and of a gated linear_fc1 ([gate | up]), for the weights and their optimizer
    state, and checkpoint_version 1. Returns the keys rewritten."""
    old = {name: inverse(index) for name, index in row_permutations(cfg.model).items()}
    path = directory / "model_optim.pt"
    tensors = torch.load(path, weights_only=True)
    rewritten = []
    for key, t in tensors.items():
        param = key.removeprefix("model.") if key.startswith("model.") else key.split(".", 2)[2]
        module = param.rsplit(".", 2)[-2]  # decoder.layers.0.mlp.linear_fc1.weight -> linear_fc1
        if module in old and t.ndim > 0:
            tensors[key] = t[old[module]]
            rewritten.append(key)
    torch.save(tensors, path)
    meta = json.loads((directory / "metadata.json").read_text())
    assert meta["checkpoint_version"] == 2
    meta["checkpoint_version"] = 1
    (directory / "metadata.json").write_text(json.dumps(meta))
    common = torch.load(directory / "common.pt", weights_only=True)
    common["checkpoint_version"] = 1
    torch.save(common, directory / "common.pt")
    return rewritten


@pytest.mark.slow
@pytest.mark.parametrize("model", LAYOUT_MODELS.values(), ids=list(LAYOUT_MODELS))
def test_version_1_checkpoint_is_upgraded_and_resumes_to_the_same_losses(
    tmp_path: Path, model: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    v2, v1 = tmp_path / "v2", tmp_path / "v1"
    cfg = make_cfg(save=str(v2), ckpt_format="torch", model=model)
    a = Run(cfg).step(3)
    a.save(Checkpointer(cfg, ctx1()))
    shutil.copytree(v2, v1)
    rewritten = _as_version_1(v1 / "iter_0000003", cfg)
    # Of the weight and the bias of each fused module: itself, Adam's two moments, the float32 master.
    fused = 2 if model.get("gated_linear_unit") else 1
    assert len(rewritten) == 2 * 4 * fused, rewritten
    qkv = "model.decoder.layers.0.self_attention.linear_qkv.weight"
    assert not torch.equal(
        torch.load(v1 / "iter_0000003" / "model_optim.pt")[qkv], a.model.state_dict()[qkv[6:]]
    )

    caplog.set_level("INFO", logger="viaduct")
    resumed = [Run(cfg, seed=1), Run(cfg, seed=2)]
    for run, root in zip(resumed, (v2, v1), strict=True):
        assert run.load(Checkpointer(make_cfg(load=str(root), model=model), ctx1())) == 3
        assert_same_run(a, run)
    upgraded = [r.getMessage() for r in caplog.records if "upgraded checkpoint" in r.getMessage()]
    assert len(upgraded) == 1 and "from version 1" in upgraded[0] and str(v1) in upgraded[0]
    a.step(3, data_seed=11)
    for run in resumed:
        run.step(3, data_seed=11)
        assert run.losses == a.losses[-3:]
        assert_same_run(a, run)


def test_version_1_weights_only_load_is_upgraded(tmp_path: Path) -> None:
    model = LAYOUT_MODELS["gqa-gated"]
    cfg = make_cfg(save=str(tmp_path), ckpt_format="torch", model=model)
    a = Run(cfg).step(1)
    a.save(Checkpointer(cfg, ctx1()))
    _as_version_1(tmp_path / "iter_0000001", cfg)
    b = Run(make_cfg(pretrained_checkpoint=str(tmp_path), model=model), seed=3)
    assert b.load(Checkpointer(make_cfg(pretrained_checkpoint=str(tmp_path), model=model), ctx1())) == 0
    assert_identical(a.model.state_dict(), b.model.state_dict())


def test_a_newer_or_broken_checkpoint_version_is_refused(tmp_path: Path) -> None:
    cfg = make_cfg(save=str(tmp_path), load=str(tmp_path))
    Run(cfg).step(1).save(Checkpointer(cfg, ctx1()))
    meta_path = tmp_path / "iter_0000001" / "metadata.json"
    meta = json.loads(meta_path.read_text())
    for version, message in ((99, "saved as checkpoint version 99 by a newer viaduct"), ("2", "'2'")):
        meta_path.write_text(json.dumps({**meta, "checkpoint_version": version}))
        with pytest.raises(CheckpointError, match=message) as info:
            Run(cfg).load(Checkpointer(cfg, ctx1()))
        assert str(meta_path.parent) in str(info.value) and "checkpoint.load" in str(info.value)


def test_version_1_checkpoint_into_sharded_weights_is_refused_with_the_fix(tmp_path: Path) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    model = LAYOUT_MODELS["gqa"]
    cfg = make_cfg(save=str(tmp_path), ckpt_format="torch", model=model)
    Run(cfg).step(1).save(Checkpointer(cfg, ctx1()))
    _as_version_1(tmp_path / "iter_0000001", cfg)
    load = make_cfg(pretrained_checkpoint=str(tmp_path), model=model)
    run = Run(load, seed=3)
    # A real one-process gloo group: linear_qkv becomes a DTensor, as tensor parallelism makes it.
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        attn = run.model.decoder.layers[0].self_attention
        parallelize_module(attn, init_device_mesh("cpu", (1,)), {"linear_qkv": ColwiseParallel()})
        before = attn.linear_qkv.weight.full_tensor().clone()
        with pytest.raises(CheckpointError, match="version-1 checkpoint") as info:
            run.load(Checkpointer(load, ctx1()))
        assert "single process" in str(info.value) and "save it again" in str(info.value)
        assert torch.equal(attn.linear_qkv.weight.full_tensor(), before)  # refused before reading
    finally:
        dist.destroy_process_group()


# ------------------------------------------------------------------------------------------- 2 processes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, root: str, parallel_save: bool) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        ctx = DistributedContext(rank=rank, world_size=world, backend="gloo", host_group=dist.group.WORLD)
        save = os.path.join(root, "ckpt")
        cfg = make_cfg(
            world_size=world,
            save=save,
            load=save,
            fully_parallel_load=True,
            fully_parallel_save=parallel_save,
        )
        run = Run(cfg).step(2)  # same seed and data on both ranks: replicas, as under DDP
        run.save(Checkpointer(cfg, ctx))
        if rank == 0:
            torch.save(
                {"model": run.model.state_dict(), "optimizer": run.optimizer.state_dict()}, f"{root}/ref.pt"
            )
        fresh = Run(cfg, seed=9)  # fully_parallel_load: each rank reads half, then they exchange
        assert fresh.load(Checkpointer(cfg, ctx)) == 2
        assert_same_run(run, fresh)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("parallel_save", [True, False])
def test_two_ranks_save_one_rank_loads(tmp_path: Path, parallel_save: bool) -> None:
    world = 2
    procs = mp.start_processes(
        _worker,
        args=(world, _free_port(), str(tmp_path), parallel_save),
        nprocs=world,
        join=False,
        start_method="spawn",
    )
    try:
        for _ in range(60):  # hard limit: 60 s
            if procs.join(timeout=1):
                break
        else:
            raise TimeoutError("the 2-process checkpoint test did not finish in 60 s")
    finally:
        for p in procs.processes:
            if p.is_alive():
                p.kill()
    directory = tmp_path / "ckpt" / "iter_0000002"
    shards = sorted(p.name for p in directory.glob("*.distcp") if p.stat().st_size > 0)  # DCP: empty ones too
    # With fully_parallel_save both ranks wrote a share, else rank 0 all of it; DCP names files
    # __<rank>_<file>.distcp.
    assert {name.split("_")[2] for name in shards} == ({"0", "1"} if parallel_save else {"0"})
    assert sorted(p.name for p in (tmp_path / "ckpt" / "iter_0000002" / "rng").iterdir()) == [
        "rank_00000.pt",
        "rank_00001.pt",
    ]

    cfg = make_cfg(load=str(tmp_path / "ckpt"))
    run = Run(cfg, seed=9)
    assert run.load(Checkpointer(cfg, ctx1())) == 2
    ref = torch.load(tmp_path / "ref.pt", weights_only=True)
    assert_identical(ref["model"], run.model.state_dict())
    assert_identical(ref["optimizer"], run.optimizer.state_dict())


def test_classes_another_library_allowed_are_still_refused(tmp_path: Path) -> None:
    # Importing megatron-core (among others) adds PosixPath and friends to torch's process-wide
    # weights_only allowlist; a checkpoint file is read with torch's own list regardless.
    cfg = make_cfg(save=str(tmp_path), load=str(tmp_path))
    Run(cfg).step(1).save(Checkpointer(cfg, ctx1()))
    common = tmp_path / "iter_0000001" / "common.pt"
    torch.save({"scheduler": Path("/etc/passwd")}, common)
    before = torch.serialization.get_safe_globals()
    torch.serialization.add_safe_globals([type(Path("/"))])
    try:
        with pytest.raises(CheckpointError, match="checkpoint.load: cannot read common.pt"):
            Run(cfg).load(Checkpointer(cfg, ctx1()))
        assert type(Path("/")) in torch.serialization.get_safe_globals()  # put back after the read
    finally:
        torch.serialization.clear_safe_globals()
        torch.serialization.add_safe_globals(before)
