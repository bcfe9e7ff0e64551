"""GPTDataset: Megatron's document / sample / shuffle indices, sample contents, caching, epochs."""

from __future__ import annotations

import math
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from viaduct.data.gpt_dataset import (
    GPTDataset,
    build_document_index,
    build_sample_index,
    gpt_sample,
)
from viaduct.data.indexed import IndexedDataset, IndexedDatasetWriter
from viaduct.data.tokenizers import NullTokenizer
from viaduct.training.config.dataset import GPTDatasetConfig

VOCAB = 1000
EOD = VOCAB - 1
S = 16


def write_prefix(path: Path, lengths: list[int], base: int = 0) -> str:
    """Documents whose tokens count up through the file (mod EOD), each ending with EOD."""
    prefix = str(path)
    pos = base
    with IndexedDatasetWriter(prefix, np.uint16) as w:
        for n in lengths:
            toks = (np.arange(pos, pos + n) % EOD).astype(np.uint16)
            toks[-1] = EOD
            pos += n
            w.add_document(toks)
    return prefix


def lengths(n: int = 60, seed: int = 0, low: int = 1, high: int = 40) -> list[int]:
    return [int(x) for x in np.random.default_rng(seed).integers(low, high, size=n)]


def config(**kw) -> GPTDatasetConfig:
    kw.setdefault("random_seed", 1234)
    return GPTDatasetConfig(seq_length=S, **kw)


def dataset(prefix, docs=None, num_samples=50, split="train", cache=None, **kw) -> GPTDataset:
    ix = IndexedDataset(prefix) if isinstance(prefix, str) else prefix
    docs = np.arange(len(ix)) if docs is None else docs
    return GPTDataset(ix, docs, num_samples, S, config(**kw), NullTokenizer(VOCAB), split, cache_dir=cache)


def reference_sample_index(sizes, doc_index, seq, extra, drop_last):
    """Megatron's sample walk, one token count at a time (slow, for checking)."""
    total = int(sum(int(sizes[d]) for d in doc_index))
    n = (total - extra) // seq if drop_last else math.ceil((total - extra) / seq)
    rows, di, off = [(0, 0)], 0, 0
    while len(rows) <= n:
        remaining = seq + extra
        while remaining:
            length = int(sizes[doc_index[di]]) - off
            remaining -= length
            if remaining <= 0:
                off += remaining + length - extra
                remaining = 0
            elif di == len(doc_index) - 1:
                off = int(sizes[doc_index[di]]) - extra
                break
            else:
                di, off = di + 1, 0
        rows.append((di, off))
    return np.array(rows, dtype=np.int64)


def unshuffled(ds: GPTDataset, k: int) -> np.ndarray:
    return ds.tokens_of(int(np.argsort(ds.shuffle_index)[k]))


# --------------------------------------------------------------------------------------- indices


@pytest.mark.parametrize("extra", [0, 1])
@pytest.mark.parametrize("drop_last", [True, False])
@pytest.mark.parametrize("seq", [2, 7, 16, 100])
def test_sample_index_matches_megatron_walk(extra, drop_last, seq):
    rng = np.random.default_rng(seq)
    low = 0 if drop_last else 1  # empty documents too (a partial tail needs a non-empty last one)
    sizes = rng.integers(low, 30, size=80).astype(np.int32)
    doc_index = build_document_index(np.arange(80), 3, np.random.RandomState(5), False)
    got = build_sample_index(sizes, doc_index, seq, extra, drop_last)
    assert np.array_equal(got, reference_sample_index(sizes, doc_index, seq, extra, drop_last))


def test_document_index_epochs_and_separate_final_epoch():
    docs = np.arange(10, 30)
    rng = np.random.RandomState(0)
    index = build_document_index(docs, 3, rng, separate_final=True)
    assert index.size == 60
    assert sorted(index[40:]) == list(docs)  # the final epoch is shuffled on its own
    assert np.array_equal(np.bincount(index[:40], minlength=30)[10:], np.full(20, 2))
    again = build_document_index(docs, 3, np.random.RandomState(0), separate_final=True)
    assert np.array_equal(index, again)


# --------------------------------------------------------------------------------------- samples


@pytest.mark.parametrize("extra", [True, False])
def test_samples_are_consecutive_windows_of_the_document_stream(tmp_path, extra):
    prefix = write_prefix(tmp_path / "a", lengths())
    ds = dataset(prefix, num_samples=30, add_extra_token_to_sequence=extra)
    stream = np.concatenate([ds.indexed.get(int(d)) for d in ds.document_index])
    width = S + int(extra)
    for k in range(len(ds)):
        assert np.array_equal(unshuffled(ds, k), stream[k * S : k * S + width])
    if extra:  # sample k + 1 starts at sample k's last input... label, shared by both
        assert unshuffled(ds, 3)[-1] == unshuffled(ds, 4)[0]
    item = ds[5]
    text = torch.from_numpy(ds.tokens_of(5).astype(np.int64))
    assert torch.equal(item["tokens"], text[:S])
    if extra:
        assert torch.equal(item["labels"], text[1:])
        assert torch.all(item["loss_mask"] == 1)
    else:  # the label after the last token is unknown: 0, no loss
        assert torch.equal(item["labels"][:-1], text[1:]) and item["labels"][-1] == 0
        assert item["loss_mask"][-1] == 0 and torch.all(item["loss_mask"][:-1] == 1)
    assert set(item) == {"tokens", "labels", "loss_mask", "position_ids"}
    assert torch.equal(item["position_ids"], torch.arange(S))


def test_eod_loss_mask_position_ids_and_document_mask(tmp_path):
    prefix = write_prefix(tmp_path / "a", [5, 3, 20, 9, 30])
    ds = dataset(
        prefix, num_samples=4, eod_mask_loss=True, reset_position_ids=True, reset_attention_mask=True
    )
    for i in range(len(ds)):
        item = ds[i]
        tokens = item["tokens"]
        is_eod = tokens == EOD
        assert torch.equal(item["loss_mask"], (~is_eod).float())  # masked where the *input* is eod
        pos, expect = item["position_ids"], 0
        for j in range(S):
            assert pos[j] == expect
            expect = 0 if is_eod[j] else expect + 1
        mask = item["attention_mask"]
        assert mask.shape == (1, S, S) and mask.dtype == torch.bool
        doc = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(is_eod[:-1].long(), 0)])
        visible = torch.tril(torch.ones(S, S, dtype=torch.bool)) & (doc[:, None] == doc[None, :])
        assert torch.equal(mask[0], ~visible)


def test_gpt_sample_pads_a_partial_sample_without_loss():
    text = np.array([3, 4, EOD, 5, 6], dtype=np.uint16)
    out = gpt_sample(text, 8, EOD, eod_mask_loss=True, reset_position_ids=True, reset_attention_mask=False)
    assert out["tokens"].tolist() == [3, 4, EOD, 5, 6, 0, 0, 0]
    assert out["labels"].tolist() == [4, EOD, 5, 6, 0, 0, 0, 0]
    assert out["loss_mask"].tolist() == [1, 1, 0, 1, 0, 0, 0, 0]
    assert out["position_ids"].tolist()[:5] == [0, 1, 2, 0, 1]


def test_partial_validation_sequence_is_kept_or_dropped(tmp_path):
    prefix = write_prefix(tmp_path / "a", [10, 10, 10])  # 30 tokens: 1 full sample of 16 (+1)
    kept = dataset(prefix, num_samples=1, split="validation", drop_last_partial_validation_sequence=False)
    dropped = dataset(prefix, num_samples=1, split="validation")
    train = dataset(prefix, num_samples=1, split="train", drop_last_partial_validation_sequence=False)
    assert (len(kept), len(dropped), len(train)) == (2, 1, 1)
    partial = next(kept[i] for i in range(2) if kept[i]["loss_mask"].sum() < S)
    assert partial["loss_mask"].sum() == 30 - 16 - 1  # 14 real tokens: 13 known labels


# ------------------------------------------------------------------------------------ determinism


def test_deterministic_in_the_seed(tmp_path):
    prefix = write_prefix(tmp_path / "a", lengths())
    a = dataset(prefix, cache=tmp_path / "c1")
    b = dataset(prefix, cache=tmp_path / "c2")
    assert a.built_anew and b.built_anew
    for x, y in zip(
        (a.document_index, a.sample_index, a.shuffle_index),
        (b.document_index, b.sample_index, b.shuffle_index),
    ):
        assert np.array_equal(x, y)
    assert all(torch.equal(a[i]["tokens"], b[i]["tokens"]) for i in range(len(a)))
    other = dataset(prefix, cache=tmp_path / "c1", random_seed=99)
    assert other.built_anew and not np.array_equal(other.shuffle_index, a.shuffle_index)


def test_cache_hit_then_rebuild_when_the_index_changes(tmp_path):
    prefix = write_prefix(tmp_path / "a", lengths())
    first = dataset(prefix)
    assert first.built_anew and first.cache_dir == tmp_path / "cache" / "GPTDataset_indices"
    files = sorted(first.cache_dir.iterdir())
    assert len(files) == 4 and not [f for f in files if f.name.endswith(".tmp")]
    stamps = {f: f.stat().st_mtime_ns for f in files}
    hit = dataset(prefix)
    assert not hit.built_anew and {f: f.stat().st_mtime_ns for f in files} == stamps
    assert all(torch.equal(first[i]["tokens"], hit[i]["tokens"]) for i in range(len(first)))
    # Different request -> different files; changed data -> rebuilt.
    assert dataset(prefix, num_samples=51).built_anew
    write_prefix(tmp_path / "a", lengths(seed=1))
    changed = dataset(prefix)
    assert changed.built_anew
    st = os.stat(prefix + ".idx")
    os.utime(prefix + ".idx", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # same bytes, new mtime
    assert dataset(prefix).built_anew


def test_path_to_cache_and_lazy_open_by_prefix(tmp_path):
    prefix = write_prefix(tmp_path / "a", lengths())
    built = dataset(prefix, path_to_cache=str(tmp_path / "idx"))
    assert built.cache_dir == tmp_path / "idx"
    lazy = GPTDataset(
        prefix,
        np.arange(60),
        50,
        S,
        config(path_to_cache=str(tmp_path / "idx")),
        NullTokenizer(VOCAB),
        "train",
    )
    assert not lazy.built_anew and lazy._indexed is None  # a cache hit opens no index
    assert torch.equal(lazy[3]["tokens"], built[3]["tokens"])
    clone = pickle.loads(pickle.dumps(lazy))  # what a spawned DataLoader worker receives
    assert torch.equal(clone[7]["labels"], built[7]["labels"])


def test_epochs_when_samples_exceed_one_pass(tmp_path):
    sizes = lengths(20)
    prefix = write_prefix(tmp_path / "a", sizes)
    ds = dataset(prefix, num_samples=3 * sum(sizes) // S + 1)  # needs more tokens than 3 epochs hold
    assert len(ds) >= 3 * sum(sizes) // S + 1
    counts = np.bincount(ds.document_index, minlength=20)
    assert np.all(counts == counts[0]) and counts[0] == 4  # 4 epochs, every document each time
    assert sorted(ds.shuffle_index) == list(range(len(ds)))
    # Two epochs and a bit: the small final epoch is shuffled on its own, after the others.
    small = dataset(prefix, num_samples=2 * sum(sizes) // S + 1)
    before = (2 * sum(sizes) - 1) // S  # samples of the first two epochs
    assert before < len(small) and np.bincount(small.document_index)[0] == 3
    assert small.shuffle_index[:before].max() < before <= small.shuffle_index[before:].min()
    assert sorted(small.document_index[-20:]) == list(range(20))


def test_cache_falls_back_to_the_user_cache_when_beside_the_data_is_unwritable(tmp_path, monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    prefix = write_prefix(data / "a", lengths())
    (data / "cache").write_text("a file where the cache directory would go")  # mkdir fails there
    monkeypatch.setenv("VIADUCT_CACHE", str(tmp_path / "user"))
    ds = dataset(prefix)
    assert ds.cache_dir == tmp_path / "user" / "dataset_indices" and ds.built_anew
    assert not dataset(prefix).built_anew
