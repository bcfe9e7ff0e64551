"""Megatron-Core as an oracle: viaduct's indexed files, GPT datasets and blends give its samples in its
order, sample for sample (megatron-core is a test-only dependency, in the `dev` extra)."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch

with warnings.catch_warnings():  # "Transformer Engine and Apex are not installed": irrelevant here
    warnings.simplefilter("ignore")
    pytest.importorskip("megatron.core")
    from megatron.core.datasets import helpers as mcore_helpers
    from megatron.core.datasets.blended_dataset import BlendedDataset as McoreBlended
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset as McoreGPTDataset
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig as McoreGPTConfig
    from megatron.core.datasets.indexed_dataset import IndexedDataset as McoreIndexed
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder as McoreWriter

from viaduct.data.blended import BlendedDataset, blending_indices
from viaduct.data.builder import build_gpt_datasets
from viaduct.data.indexed import IndexedDataset, IndexedDatasetWriter
from viaduct.data.tokenizers import NullTokenizer
from viaduct.recipes import tiny_gpt_pretrain_config
from viaduct.training.config import GPTDatasetConfig

logging.getLogger("megatron").setLevel(logging.WARNING)

VOCAB = 1000
EOD = VOCAB - 1


class McoreTokenizer:
    """The few attributes Megatron's GPT dataset reads from a tokenizer (no files, no downloads)."""

    vocab_size = VOCAB
    eod = EOD
    pad = -1
    # Megatron writes this into its cache descriptions.
    unique_identifiers: ClassVar[dict[str, str]] = {"class": "McoreTokenizer"}


def mcore_write(path: Path, docs: int, lo: int, hi: int, seed: int) -> str:
    """A corpus written by Megatron-Core's own builder: `docs` documents of tokens in [lo, hi)."""
    rng = np.random.default_rng(seed)
    writer = McoreWriter(f"{path}.bin", dtype=np.uint16)
    for _ in range(docs):
        toks = rng.integers(lo, hi, size=int(rng.integers(2, 60))).astype(np.uint16)
        toks[-1] = EOD
        writer.add_document(toks, [len(toks)])
    writer.finalize(f"{path}.idx")
    return str(path)


@pytest.fixture(scope="module")
def corpora(tmp_path_factory) -> tuple[str, str]:
    root = tmp_path_factory.mktemp("mcore")
    return mcore_write(root / "a", 300, 0, 400, seed=0), mcore_write(root / "b", 200, 400, 800, seed=1)


def mcore_datasets(tmp: Path, sizes: list[int], **kw):
    kw.setdefault("reset_position_ids", False)
    kw.setdefault("reset_attention_mask", False)
    kw.setdefault("eod_mask_loss", False)
    kw.setdefault("create_attention_mask", True)
    # No cache: Megatron's cached blend asks torch.distributed for the rank.
    config = McoreGPTConfig(tokenizer=McoreTokenizer(), path_to_cache=None, **kw)
    return BlendedMegatronDatasetBuilder(McoreGPTDataset, sizes, lambda: True, config).build()


def viaduct_datasets(tmp: Path, sizes: list[int], *, sequence_length: int, random_seed: int, **kw):
    cfg = tiny_gpt_pretrain_config()
    cfg.model.seq_length = sequence_length
    kw.setdefault("num_workers", 0)
    kw.setdefault("create_attention_mask", True)  # Megatron's default
    cfg.dataset = GPTDatasetConfig(
        seq_length=sequence_length, random_seed=random_seed, path_to_cache=str(tmp / "viaduct-cache"), **kw
    )
    return build_gpt_datasets(cfg, NullTokenizer(VOCAB), tuple(sizes))


def assert_same_indices(ours, theirs) -> None:
    """The index arrays that fix every sample: the document, sample and shuffle indices of a GPT
    dataset, and the blend's indices plus those of each component."""
    if isinstance(theirs, McoreBlended):
        assert np.array_equal(ours.dataset_index, theirs.dataset_index)
        assert np.array_equal(ours.dataset_sample_index, theirs.dataset_sample_index)
        for oc, tc in zip(ours.datasets, theirs.datasets, strict=True):
            assert_same_indices(oc, tc)
        return
    assert np.array_equal(ours.document_index, theirs.document_index)
    assert np.array_equal(ours.sample_index, theirs.sample_index)
    assert np.array_equal(ours.shuffle_index, theirs.shuffle_index)


def assert_same_samples(ours, theirs, n: int) -> None:
    """Equal indices (so every sample's place) and equal tensors for `n` samples spread evenly."""
    assert ours is not None and theirs is not None
    assert len(ours) == len(theirs)
    assert_same_indices(ours, theirs)
    for i in np.unique(np.linspace(0, len(theirs) - 1, min(n, len(theirs))).astype(np.int64)).tolist():
        a, b = ours[i], theirs[i]
        for key in ("tokens", "labels", "loss_mask", "position_ids"):
            assert torch.equal(torch.as_tensor(a[key]).to(b[key].dtype), b[key]), (i, key)
        if "attention_mask" in a:
            assert torch.equal(a["attention_mask"].bool(), b["attention_mask"].bool()), i
        elif "attention_mask" in b:
            # viaduct builds a mask only for reset_attention_mask: the plain causal one is implied.
            n = b["tokens"].numel()
            assert torch.equal(b["attention_mask"].bool()[0], torch.ones(n, n).triu(1).bool()), i


# ------------------------------------------------------------------------------ indexed format


def test_megatron_reads_what_viaduct_writes(tmp_path):
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 60000, size=int(rng.integers(1, 50))).astype(np.uint16) for _ in range(40)]
    with IndexedDatasetWriter(str(tmp_path / "v"), np.uint16) as w:
        for d in docs:
            w.add_document(d)
    theirs = McoreIndexed(str(tmp_path / "v"))
    assert len(theirs) == len(docs)
    assert theirs.index.dtype == np.uint16
    for i, d in enumerate(docs):
        assert np.array_equal(theirs[i], d)
    assert np.array_equal(theirs.document_indices, np.arange(len(docs) + 1))


def test_viaduct_reads_what_megatron_writes(tmp_path):
    prefix = mcore_write(tmp_path / "m", 50, 0, 999, seed=3)
    theirs, ours = McoreIndexed(prefix), IndexedDataset(prefix)
    assert len(ours) == len(theirs)
    assert np.array_equal(ours.sequence_lengths, theirs.sequence_lengths)
    for i in range(len(theirs)):
        assert np.array_equal(np.asarray(ours[i]), theirs[i])


# --------------------------------------------------------------------------- blending indices


def mcore_blending(weights: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    ids, ranks = np.zeros(size, np.int16), np.zeros(size, np.int64)
    mcore_helpers.build_blending_indices(ids, ranks, weights, weights.size, size, False)
    return ids, ranks


def test_blending_indices_are_megatrons_greedy_order():
    rng = np.random.default_rng(7)
    kinds = [
        lambda d: rng.random(d),
        lambda d: rng.integers(1, 5, d).astype(float),  # small integers: many exact ties
        lambda d: rng.random(d) ** 6,  # very unequal
        lambda d: np.ones(d),  # equal weights: ties at every round
    ]
    for trial in range(120):
        d = int(rng.integers(1, 30))
        size = int(rng.integers(1, 20_000))
        raw = kinds[trial % len(kinds)](d)
        weights = raw / raw.sum()
        ids, ranks = mcore_blending(weights, size)
        ours = blending_indices(raw, size)
        assert np.array_equal(ours[0], ids) and np.array_equal(ours[1], ranks), (trial, d, size)


def test_blending_indices_of_ten_million_samples_match_and_are_fast():
    import time

    weights = np.array([0.2, 0.05, 0.3, 0.45])
    start = time.perf_counter()
    ours = blending_indices(weights, 10_000_000)
    took = time.perf_counter() - start
    theirs = mcore_blending(weights / weights.sum(), 10_000_000)
    assert np.array_equal(ours[0], theirs[0]) and np.array_equal(ours[1], theirs[1])
    assert took < 10, f"10M blended samples took {took:.1f} s"


# ------------------------------------------------------------------------------- GPT datasets

GPT_CASES = [
    dict(random_seed=1234, sequence_length=32, split="1,0,0"),
    dict(random_seed=7, sequence_length=16, split="90,8,2"),
    dict(random_seed=99, sequence_length=64, split="60,30,10", eod_mask_loss=True),
    dict(
        random_seed=5,
        sequence_length=24,
        split="80,20,0",
        reset_position_ids=True,
        reset_attention_mask=True,
        eod_mask_loss=True,
    ),
    dict(random_seed=11, sequence_length=20, split="1,0,0", add_extra_token_to_sequence=False),
    dict(random_seed=3, sequence_length=32, split="70,20,10", create_attention_mask=False),
]


@pytest.mark.parametrize("case", GPT_CASES)
def test_one_prefix_gives_megatrons_samples(tmp_path, corpora, case):
    sizes = [300, 40, 20]
    theirs = mcore_datasets(tmp_path, sizes, blend=([corpora[0]], None), **case)
    kw = {k: v for k, v in case.items() if k not in ("random_seed", "sequence_length")}
    ours = viaduct_datasets(
        tmp_path,
        sizes,
        sequence_length=case["sequence_length"],
        random_seed=case["random_seed"],
        data_path=[corpora[0]],
        **kw,
    )
    for o, t in zip(ours, theirs):
        if t is None or len(t) == 0:
            continue
        assert_same_samples(o, t, 120)


BLEND_CASES = [
    dict(random_seed=1234, sequence_length=32, split="1,0,0", weights=[0.3, 0.7]),
    dict(random_seed=42, sequence_length=16, split="80,15,5", weights=[2.0, 1.0]),
    dict(random_seed=3, sequence_length=24, split="90,10,0", weights=[0.5, 0.5], eod_mask_loss=True),
    dict(random_seed=1234, sequence_length=32, split="1,0,0", weights=None),  # weighed by size
    dict(random_seed=8, sequence_length=16, split="70,20,10", weights=None, reset_position_ids=True),
]


@pytest.mark.parametrize("case", BLEND_CASES)
def test_a_blend_gives_megatrons_samples_in_megatrons_order(tmp_path, corpora, case):
    case = dict(case)
    weights = case.pop("weights")
    sizes = [400, 50, 30]
    theirs = mcore_datasets(tmp_path, sizes, blend=(list(corpora), weights), **case)
    if weights is None:
        blend = list(corpora)
    else:
        blend = [x for w, p in zip(weights, corpora) for x in (str(w), p)]
    kw = {k: v for k, v in case.items() if k not in ("random_seed", "sequence_length")}
    ours = viaduct_datasets(
        tmp_path,
        sizes,
        sequence_length=case["sequence_length"],
        random_seed=case["random_seed"],
        data_path=blend,
        **kw,
    )
    for o, t in zip(ours, theirs):
        if t is None or len(t) == 0:
            continue
        assert isinstance(o, BlendedDataset) and isinstance(t, McoreBlended)
        assert np.array_equal(o.dataset_index, t.dataset_index)
        assert np.array_equal(o.dataset_sample_index, t.dataset_sample_index)
        for oc, tc in zip(o.datasets, t.datasets):
            assert len(oc) == len(tc)  # the same per-dataset sample counts (surplus, one-epoch cap)
        assert_same_samples(o, t, 120)


def test_one_weighted_prefix_is_blended_with_the_surplus_as_in_megatron(tmp_path, corpora):
    sizes = [300, 0, 0]
    theirs = mcore_datasets(
        tmp_path, sizes, blend=([corpora[0]], [1.0]), random_seed=5, sequence_length=16, split="1,0,0"
    )
    ours = viaduct_datasets(
        tmp_path, sizes, sequence_length=16, random_seed=5, data_path=["1.0", corpora[0]], split="1,0,0"
    )
    assert isinstance(ours[0], BlendedDataset)
    assert_same_samples(ours[0], theirs[0], 120)


@pytest.mark.parametrize("weights", [[0.25, 0.75], None])
def test_blend_per_split_gives_megatrons_samples(tmp_path, corpora, weights):
    sizes = [200, 40, 30]
    a, b = corpora
    per_split = [(list(corpora), weights), ([b], None), ([a, b], weights)]
    theirs = mcore_datasets(tmp_path, sizes, blend_per_split=per_split, random_seed=21, sequence_length=16)
    ours = viaduct_datasets(
        tmp_path, sizes, sequence_length=16, random_seed=21, blend_per_split=[(p, w) for p, w in per_split]
    )
    for o, t in zip(ours, theirs):
        assert_same_samples(o, t, 120)
