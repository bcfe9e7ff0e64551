"""Synthetic GPT samples, resumable samplers and the DataLoaders built from a validated config."""

from __future__ import annotations

import itertools
import multiprocessing
import os
import signal

import pytest
import torch

from viaduct.config import ConfigError
from viaduct.data import (
    MockGPTDataset,
    PretrainingRandomSampler,
    PretrainingSampler,
    build_tokenizer,
    build_train_valid_test_data_iterators,
    get_sample_counts,
)
from viaduct.data.tokenizers import ByteLevelTokenizer, NullTokenizer
from viaduct.recipes import tiny_gpt_pretrain_config
from viaduct.training.config import (
    ConfigContainer,
    GPTDatasetConfig,
    MockGPTDatasetConfig,
    TokenizerConfig,
)

S = 64


def dataset(split: str = "train", n: int = 1000, tok=None, **flags) -> MockGPTDataset:
    cfg = MockGPTDatasetConfig(random_seed=1234, seq_length=S, **flags)
    return MockGPTDataset(n, S, tok or ByteLevelTokenizer(), cfg, split)


# ---------------------------------------------------------------------------------------- mock data


def test_sample_shapes_dtypes_and_shifted_labels():
    ds = dataset()
    assert len(ds) == 1000
    sample = ds[7]
    assert set(sample) == {"tokens", "labels", "loss_mask", "position_ids"}  # no mask: causal in-kernel
    for key, dtype in [("tokens", torch.int64), ("labels", torch.int64), ("position_ids", torch.int64)]:
        assert sample[key].shape == (S,) and sample[key].dtype == dtype
    assert sample["loss_mask"].dtype == torch.float32 and torch.all(sample["loss_mask"] == 1)
    assert torch.equal(sample["position_ids"], torch.arange(S))
    window = torch.from_numpy(ds.window(7))
    assert window.shape == (S + 1,)
    assert torch.equal(sample["tokens"], window[:-1]) and torch.equal(sample["labels"], window[1:])
    assert torch.equal(sample["tokens"][1:], sample["labels"][:-1])
    with pytest.raises(IndexError):
        ds[1000]


def test_huge_dataset_is_random_access():
    ds = dataset(n=10**9)
    assert ds[10**9 - 1]["tokens"].shape == (S,)


def test_deterministic_across_constructions_and_splits_differ():
    a, b = dataset(), dataset()
    for i in (0, 1, 999):
        assert all(torch.equal(a[i][k], b[i][k]) for k in a[i])
    assert not torch.equal(a[0]["tokens"], a[1]["tokens"])
    valid, test = dataset("validation"), dataset("test")
    assert not torch.equal(a[0]["tokens"], valid[0]["tokens"])
    assert not torch.equal(valid[0]["tokens"], test[0]["tokens"])
    other_seed = MockGPTDataset(10, S, ByteLevelTokenizer(), MockGPTDatasetConfig(random_seed=7), "train")
    assert not torch.equal(a[0]["tokens"], other_seed[0]["tokens"])


@pytest.mark.parametrize(
    "tok", [ByteLevelTokenizer(), NullTokenizer(1000), NullTokenizer(50, eod_id=0, pad_id=7)]
)
def test_learnable_pattern_with_eod(tok):
    ds = dataset(tok=tok)
    specials = {t for t in (tok.eod, tok.pad, tok.bos) if t is not None}
    ordinary = torch.tensor(sorted(set(range(tok.vocab_size)) - specials))
    rank = torch.full((tok.vocab_size,), -1, dtype=torch.long)
    rank[ordinary] = torch.arange(len(ordinary))  # id -> its place in the count
    eods = 0
    for i in range(50):
        x, y = ds[i]["tokens"], ds[i]["labels"]
        assert torch.all((x >= 0) & (x < tok.vocab_size)) and not any(
            t in specials - {tok.eod} for t in x.tolist()
        )
        eods += int((x == tok.eod).sum())
        inside = (x != tok.eod) & (y != tok.eod)  # both in the same document
        assert torch.equal(rank[y[inside]], (rank[x[inside]] + 1) % len(ordinary))
    assert eods >= 50  # about two documents per window


def test_eod_mask_loss_masks_where_tokens_are_eod():
    ds = dataset(eod_mask_loss=True)
    for i in range(5):
        s = ds[i]
        assert torch.equal(s["loss_mask"] == 0, s["tokens"] == ds.eod)


def test_without_extra_token_last_label_is_masked_padding():
    ds = dataset(add_extra_token_to_sequence=False)
    s = ds[3]
    assert ds.window(3).shape == (S,)
    assert torch.equal(s["labels"][:-1], s["tokens"][1:]) and s["labels"][-1] == 0
    assert s["loss_mask"][-1] == 0 and torch.all(s["loss_mask"][:-1] == 1)


def test_reset_position_ids_restart_after_each_eod():
    ds = dataset(reset_position_ids=True)
    for i in range(10):
        x, pos = ds[i]["tokens"], ds[i]["position_ids"]
        expected, p = [], 0
        for t in x.tolist():
            expected.append(p)
            p = 0 if t == ds.eod else p + 1
        assert pos.tolist() == expected


def test_reset_attention_mask_is_block_diagonal_causal():
    ds = dataset(reset_attention_mask=True)
    for i in range(5):
        s = ds[i]
        mask = s["attention_mask"]
        assert mask.shape == (1, S, S) and mask.dtype == torch.bool
        eod_at = (s["tokens"] == ds.eod).nonzero().flatten().tolist()
        # Megatron's reference construction: causal, then cut after every eod.
        visible = torch.tril(torch.ones(S, S))
        for e in eod_at:
            visible[e + 1 :, : e + 1] = 0
        assert torch.equal(mask[0], visible < 0.5)
        assert eod_at, "the window should span several documents"


# ------------------------------------------------------------------------------------------- samplers


def flat(batches: list[list[int]]) -> list[int]:
    return list(itertools.chain.from_iterable(batches))


def _take(sampler, n: int) -> list[list[int]]:
    out = []
    for batch in sampler:
        out.append(batch)
        if len(out) == n:
            break
    return out


def test_single_sampler_union_over_ranks_is_the_global_order():
    mbs, dp, total = 2, 3, 40
    per_rank = [list(PretrainingSampler(total, 0, mbs, r, dp)) for r in range(dp)]
    assert [len(b) for b in per_rank] == [6, 6, 6] and len(PretrainingSampler(total, 0, mbs, 0, dp)) == 6
    single = list(PretrainingSampler(total, 0, mbs * dp, 0, 1))
    for step, whole in enumerate(single):
        assert flat([per_rank[r][step] for r in range(dp)]) == whole
    assert flat(single) == list(range(36))  # drop_last: the partial global batch is dropped


def test_single_sampler_keep_last():
    batches = [list(PretrainingSampler(10, 0, 2, r, 2, drop_last=False)) for r in range(2)]
    assert batches[0][-1] == [8, 9] and batches[1] == [[2, 3], [6, 7]]
    assert len(PretrainingSampler(10, 0, 2, 0, 2, drop_last=False)) == 3


@pytest.mark.parametrize("rank", [0, 1])
def test_single_sampler_resume_is_the_continuation(rank: int):
    full = list(PretrainingSampler(100, 0, 4, rank, 2))
    resumed = list(PretrainingSampler(100, 24, 4, rank, 2))
    assert resumed == full[3:]
    assert list(PretrainingSampler(100, 100, 4, rank, 2)) == []


def test_cyclic_sampler_without_sharding_union_is_the_global_order():
    mbs, dp, size = 2, 2, 23  # epoch = 20 samples (the 3 that do not fill a global batch wait)
    per_rank = [
        _take(PretrainingRandomSampler(size, None, 0, mbs, r, dp, False, seed=5), 15) for r in range(dp)
    ]
    single = _take(PretrainingRandomSampler(size, None, 0, mbs * dp, 0, 1, False, seed=5), 15)
    assert [per_rank[0][i] + per_rank[1][i] for i in range(15)] == single
    order = flat(single)
    assert sorted(order[:20]) == list(range(20)) and sorted(order[20:40]) == list(range(20))
    assert order[:20] != order[20:40]  # reshuffled per epoch
    assert order[:20] != list(range(20))


def test_cyclic_sampler_with_sharding_keeps_each_rank_in_its_bucket():
    mbs, dp, size = 2, 2, 20
    per_rank = [
        _take(PretrainingRandomSampler(size, None, 0, mbs, r, dp, True, seed=5), 10) for r in range(dp)
    ]
    epochs = [flat(per_rank[r][:5]) for r in range(dp)], [flat(per_rank[r][5:]) for r in range(dp)]
    for epoch in epochs:
        assert sorted(epoch[0]) == list(range(10)) and sorted(epoch[1]) == list(range(10, 20))
    assert epochs[0][0] != epochs[1][0]


@pytest.mark.parametrize("sharding", [True, False])
@pytest.mark.parametrize("consumed", [0, 8, 16, 40, 56])
def test_cyclic_sampler_resume_is_the_continuation(sharding: bool, consumed: int):
    mbs, dp, size = 2, 2, 18  # 16-sample epochs: resumes inside and across epochs
    for rank in range(dp):
        full = _take(PretrainingRandomSampler(size, None, 0, mbs, rank, dp, sharding, seed=3), 40)
        resumed = _take(PretrainingRandomSampler(size, None, consumed, mbs, rank, dp, sharding, seed=3), 10)
        skip = consumed // (mbs * dp)
        assert resumed == full[skip : skip + 10]


def test_cyclic_sampler_total_samples_bounds_and_bad_resume():
    assert len(list(PretrainingRandomSampler(10, 24, 8, 2, 0, 2, True))) == 4  # (24 - 8) / 4 global batches
    with pytest.raises(ValueError, match="multiple"):
        PretrainingRandomSampler(10, None, 6, 2, 0, 2, True)
    with pytest.raises(ValueError, match="smaller than one global micro-batch"):
        PretrainingRandomSampler(3, None, 0, 2, 0, 2, True)


# -------------------------------------------------------------------------------------------- loaders


def tiny(**dataset_fields) -> ConfigContainer:
    cfg = tiny_gpt_pretrain_config()
    cfg.dataset = MockGPTDatasetConfig(random_seed=1234, num_workers=0)  # the default trains on pydoc
    cfg.tokenizer = TokenizerConfig(tokenizer_type="ByteLevelTokenizer")
    cfg.model.seq_length = 32
    cfg.train.train_iters = 6
    cfg.train.eval_interval = 3
    cfg.train.eval_iters = 2
    cfg.scheduler.lr_warmup_fraction, cfg.scheduler.lr_warmup_iters = None, 1
    for name, value in dataset_fields.items():
        setattr(cfg.dataset, name, value)
    return cfg.validate(world_size=2)


def iterators(cfg: ConfigContainer, rank: int = 0, consumed_train: int = 0, consumed_valid: int = 0, **kw):
    train, valid, test = get_sample_counts(cfg)
    kw = {"train_samples": train, "valid_samples": valid, "test_samples": test, **kw}
    return build_train_valid_test_data_iterators(
        cfg,
        build_tokenizer(cfg.tokenizer),
        dp_rank=rank,
        dp_size=cfg.data_parallel_size,
        consumed_train_samples=consumed_train,
        consumed_valid_samples=consumed_valid,
        **kw,
    )


def _batches(it, n: int) -> list[dict[str, torch.Tensor]]:
    return [next(it) for _ in range(n)]


def _same(a: list[dict[str, torch.Tensor]], b: list[dict[str, torch.Tensor]]) -> bool:
    return len(a) == len(b) and all(
        x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x) for x, y in zip(a, b)
    )


def test_sample_counts():
    cfg = tiny()  # 6 iterations × 16, evaluations after steps 3 and 6 plus one more, 2 × 16 each
    assert get_sample_counts(cfg) == (96, 2 * 16 * 3, 2 * 16)
    cfg.train.eval_interval = None
    cfg.train.eval_global_batch_size = 32
    cfg.validate(world_size=2)
    assert get_sample_counts(cfg) == (96, 64, 64)
    cfg.train.eval_iters = 0
    cfg.validate(world_size=2)
    assert get_sample_counts(cfg) == (96, 0, 0)
    cfg.train.train_iters, cfg.train.train_samples = None, 100
    cfg.scheduler.lr_warmup_iters, cfg.scheduler.lr_warmup_samples = 0, 16
    cfg.scheduler.lr_warmup_fraction = None
    cfg.validate(world_size=2)
    assert get_sample_counts(cfg)[0] == 100


@pytest.mark.slow
@pytest.mark.parametrize("kind", [None, "cyclic"])
def test_workers_0_and_2_give_identical_batches(kind):
    runs = []
    for workers in (0, 2):
        cfg = tiny(num_workers=workers, dataloader_type=kind, reset_attention_mask=True)
        train, valid, test = iterators(cfg, rank=1)
        runs.append((_batches(train, 6), _batches(valid, 5), _batches(test, 3)))
    for a, b in zip(*runs):
        assert _same(a, b)
    train_batch = runs[0][0][0]
    assert train_batch["tokens"].shape == (8, 32) and train_batch["attention_mask"].shape == (8, 1, 32, 32)
    assert runs[0][0][0]["loss_mask"].dtype == torch.float32


def test_single_train_iterator_is_finite_and_resumes():
    cfg = tiny(num_workers=0)
    train, *_ = iterators(cfg)
    full = list(train)
    assert len(full) == 6  # 96 samples / (8 × 2 ranks)
    resumed, *_ = iterators(cfg, consumed_train=48)
    assert _same(list(resumed), full[3:])


def test_validation_resumes_and_cycles():
    cfg = tiny(num_workers=0)
    cfg.train.eval_micro_batch_size = 4
    cfg.validate(world_size=2)
    _, valid, test = iterators(cfg)
    full = _batches(valid, 30)  # 96 valid samples / (4 × 2 ranks) = 12 per epoch: cycles
    assert full[0]["tokens"].shape == (4, 32)
    _, resumed, _ = iterators(cfg, consumed_valid=32)
    assert _same(_batches(resumed, 10), full[4:14])
    assert _batches(test, 11)[10]["tokens"].shape == (4, 32)  # 32 test samples, still going


def test_split_with_no_samples_gives_no_iterator():
    cfg = tiny(num_workers=0)
    train, valid, test = iterators(cfg, test_samples=0)
    assert train is not None and valid is not None and test is None
    cfg = tiny(num_workers=0, split="1,0,1")
    assert iterators(cfg)[1] is None


def test_unsupported_settings_and_missing_data_raise():
    cfg = tiny(num_workers=0)
    cfg.dataset.dataloader_type = "batch"
    with pytest.raises(ConfigError, match="batch is not supported yet") as exc:
        iterators(cfg)
    assert exc.value.problems[0].path == "dataset.dataloader_type"
    cfg.dataset = GPTDatasetConfig(
        random_seed=1, seq_length=32, data_path="/data/corpus_text_document", split="9,1,0"
    )
    with pytest.raises(ConfigError) as exc:
        iterators(cfg)
    (p,) = exc.value.problems
    assert p.path == "dataset.data_path" and "do not exist" in p.message
    cfg.dataset = GPTDatasetConfig(random_seed=1, seq_length=32, num_workers=0)  # names no data: mock
    cfg.validate(world_size=2)
    assert next(iterators(cfg)[0])["tokens"].shape == (8, 32)


def test_exit_signal_does_not_kill_workers():
    cfg = tiny(num_workers=1, dataloader_type="cyclic")
    cfg.train.exit_signal_handler_for_dataloader = True
    before = set(multiprocessing.active_children())
    train, _, _ = iterators(cfg, exit_signal=signal.SIGUSR1, valid_samples=0, test_samples=0)
    next(train)
    workers = [p for p in multiprocessing.active_children() if p not in before]
    assert workers
    for w in workers:
        os.kill(w.pid, signal.SIGUSR1)  # the default action would terminate the worker
    _batches(train, 4)
    assert all(w.is_alive() for w in workers)
