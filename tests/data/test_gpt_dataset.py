"""GPTDataset: Megatron's document / sample / shuffle indices, sample contents, caching, epochs,
damaged caches rebuilt, and data too small for a sample refused."""

from __future__ import annotations

import math
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from viaduct.config import ConfigError
from viaduct.data.gpt_dataset import (
    GPTDataset,
    IndexCacheWarning,
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


# -------------------------------------------------------------------------------- damaged caches


def _index_files(ds: GPTDataset) -> dict[str, Path]:
    return ds._paths()


class _TouchOnUnpickle:
    """Unpickling it creates a file: proof that a cache load ran code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _damage(path: Path, how: str, tmp_path: Path) -> None:
    good = np.load(path)
    if how == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "garbage":
        path.write_bytes(os.urandom(300))
    elif how == "wrong dtype":
        np.save(path, good.astype(np.float64))
    elif how == "wrong shape":
        np.save(path, good.reshape(-1))
    elif how == "pickled objects":
        payload = np.empty(2, dtype=object)
        payload[0] = _TouchOnUnpickle(tmp_path / "ran")
        np.save(path, payload, allow_pickle=True)
    elif how == "out of bounds":
        bad = good.copy()
        bad.reshape(-1)[len(bad.reshape(-1)) // 2] = 10**9
        np.save(path, bad)
    elif how == "negative":
        bad = good.copy()
        bad.reshape(-1)[-1] = -3
        np.save(path, bad)
    else:
        raise AssertionError(how)


@pytest.mark.parametrize("lazy", [False, True])
@pytest.mark.parametrize("name", ["document_index", "sample_index", "shuffle_index"])
@pytest.mark.parametrize(
    "how",
    [
        "truncated",
        "empty",
        "garbage",
        "wrong dtype",
        "wrong shape",
        "pickled objects",
        "out of bounds",
        "negative",
    ],
)
def test_a_damaged_cache_file_is_rebuilt_with_a_warning(tmp_path, name, how, lazy):
    prefix = write_prefix(tmp_path / "a", lengths())
    first = dataset(prefix)
    expected = {n: np.array(getattr(first, n)) for n in ("document_index", "sample_index", "shuffle_index")}
    tokens = [first[i]["tokens"] for i in range(len(first))]
    path = _index_files(first)[name]
    if how == "wrong shape" and name != "sample_index":
        np.save(path, np.array(expected[name]).reshape(1, -1))  # 1-D arrays made 2-D
    else:
        _damage(path, how, tmp_path)
    with pytest.warns(IndexCacheWarning, match="rebuilding it"):
        if lazy:  # a cache hit without an open index checks structure and bounds alone
            again = GPTDataset(prefix, np.arange(60), 50, S, config(), NullTokenizer(VOCAB), "train")
        else:
            again = dataset(prefix)
    assert again.built_anew and not (tmp_path / "ran").exists()
    for n, want in expected.items():
        assert np.array_equal(getattr(again, n), want)
    assert all(torch.equal(again[i]["tokens"], t) for i, t in enumerate(tokens))
    assert np.array_equal(np.load(path, allow_pickle=False), expected[name])  # the file is whole again
    hit = dataset(prefix)
    assert not hit.built_anew  # and a plain cache hit afterwards


def test_a_cache_that_does_not_match_the_data_is_rebuilt(tmp_path):
    prefix = write_prefix(tmp_path / "a", lengths())
    first = dataset(prefix)
    files = _index_files(first)
    # Well-formed arrays of another dataset (more samples, another seed) under this dataset's names.
    other = dataset(prefix, num_samples=120, random_seed=7)
    for n in ("document_index", "sample_index", "shuffle_index"):
        np.save(files[n], np.array(getattr(other, n)))
    with pytest.warns(IndexCacheWarning, match="epochs and .* samples; the data gives"):
        again = dataset(prefix)
    assert np.array_equal(again.shuffle_index, first.shuffle_index)

    # Offsets past the end of their document: found once the data's lengths are known.
    sample = np.array(first.sample_index)
    sample[5, 1] += 1000
    np.save(files["sample_index"], sample)
    with pytest.warns(IndexCacheWarning, match=r"sample_index row 5 = .* does not point into the documents"):
        again = dataset(prefix)
    assert np.array_equal(again.sample_index, first.sample_index)

    files["description"].write_text("something else")
    with pytest.warns(IndexCacheWarning, match="does not describe this dataset"):
        assert dataset(prefix).built_anew


def _build_after(start: object, prefix: str, cache: str, out: object) -> None:
    start.wait()  # type: ignore[attr-defined]
    try:
        ds = dataset(prefix, cache=cache)
        out.put((ds.built_anew, np.array(ds.shuffle_index).tolist()))  # type: ignore[attr-defined]
    except BaseException as err:  # reported to the test, which fails on it
        out.put(("error", repr(err)))  # type: ignore[attr-defined]


@pytest.mark.slow
def test_ranks_rebuilding_a_damaged_cache_at_once_agree(tmp_path):
    import multiprocessing as mp

    prefix = write_prefix(tmp_path / "a", lengths(400))
    first = dataset(prefix, cache=tmp_path / "c")
    for n in ("document_index", "sample_index", "shuffle_index"):
        _damage(_index_files(first)[n], "truncated", tmp_path)
    ctx = mp.get_context("fork")
    start, out = ctx.Event(), ctx.Queue()
    procs = [
        ctx.Process(target=_build_after, args=(start, prefix, str(tmp_path / "c"), out)) for _ in range(4)
    ]
    for p in procs:
        p.start()
    start.set()
    results = [out.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(30)
    assert all(r[0] in (True, False) for r in results), results  # no process failed
    assert any(r[0] for r in results)  # the damage was seen (later ones may find the rebuilt files)
    assert all(r[1] == np.array(first.shuffle_index).tolist() for r in results)
    assert not [f for f in os.listdir(tmp_path / "c") if f.endswith(".tmp")]
    assert not dataset(prefix, cache=tmp_path / "c").built_anew  # what they left is a valid cache


# ------------------------------------------------------------------------------------ empty data


def test_too_few_tokens_for_a_sample_is_a_clear_error(tmp_path):
    prefix = write_prefix(tmp_path / "a", [3, 4, 5])  # 12 tokens, a sample needs 17
    with pytest.raises(
        ConfigError, match=r"a\.idx: gives the train split 3 documents holding 12 tokens: too few"
    ):
        dataset(prefix, num_samples=None)  # one epoch: no full sample
    with pytest.raises(ConfigError, match="gives the validation split no documents"):
        dataset(prefix, docs=np.arange(0), num_samples=10, split="validation")
    empty = write_prefix(tmp_path / "e", [])
    with pytest.raises(ConfigError, match=r"e\.idx: gives the train split no documents"):
        dataset(empty)


def test_cached_offsets_that_do_not_fit_the_data_fail_clearly_when_read(tmp_path):
    prefix = write_prefix(tmp_path / "a", lengths())
    first = dataset(prefix)
    sample = np.array(first.sample_index)
    k = int(first.shuffle_index[0])
    sample[k, 1] = 45  # inside the data's token count (what a cache hit without the index can check)
    np.save(first._paths()["sample_index"], sample)
    lazy = GPTDataset(prefix, np.arange(60), 50, S, config(), NullTokenizer(VOCAB), "train")
    with pytest.raises(ConfigError, match=r"sample_index\.npy: sample 0 reads outside its documents.*delete"):
        lazy[0]
    with pytest.warns(IndexCacheWarning, match=f"sample_index row {k} "):  # with the index open: rebuilt
        assert dataset(prefix).built_anew


def test_a_missing_prefix_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"nothing\.idx: file not found"):
        GPTDataset(str(tmp_path / "nothing"), np.arange(3), 5, S, config(), NullTokenizer(VOCAB), "train")
