"""Blends, splits and the dataset builder: weights, data_path / blend / blend_per_split, errors."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from viaduct.config import ConfigError
from viaduct.data import build_train_valid_test_datasets
from viaduct.data.blended import BlendedDataset, blend_counts, blending_indices
from viaduct.data.builder import build_gpt_datasets
from viaduct.data.gpt_dataset import GPTDataset, IndexCacheWarning
from viaduct.data.indexed import IndexedDatasetWriter
from viaduct.data.tokenizers import NullTokenizer
from viaduct.recipes import tiny_gpt_pretrain_config
from viaduct.training.config import DataloaderConfig, GPTDatasetConfig

VOCAB = 1000
EOD = VOCAB - 1
S = 16


def write_prefix(path: Path, docs: int, lo: int, hi: int, seed: int = 0) -> str:
    """`docs` documents of tokens drawn from [lo, hi), each ending with EOD."""
    rng = np.random.default_rng(seed)
    with IndexedDatasetWriter(str(path), np.uint16) as w:
        for _ in range(docs):
            toks = rng.integers(lo, hi, size=int(rng.integers(2, 40))).astype(np.uint16)
            toks[-1] = EOD
            w.add_document(toks)
    return str(path)


@pytest.fixture
def data(tmp_path):
    """Two prefixes told apart by their token ranges: a in [0, 400), b in [400, 800)."""
    return write_prefix(tmp_path / "a", 300, 0, 400), write_prefix(tmp_path / "b", 200, 400, 800, seed=1)


def cfg_with(**dataset):
    cfg = tiny_gpt_pretrain_config()
    cfg.model.seq_length = S
    dataset.setdefault("random_seed", 1234)
    cfg.dataset = GPTDatasetConfig(seq_length=S, num_workers=0, **dataset)
    return cfg


def source(sample) -> str:
    real = sample["tokens"][sample["tokens"] != EOD]
    assert torch.all(real < 400) or torch.all(real >= 400), "a sample mixes two prefixes"
    return "a" if torch.all(real < 400) else "b"


# ----------------------------------------------------------------------------------- blend order


def test_blend_tracks_the_weights_on_every_prefix():
    weights = [0.2, 0.3, 0.5]
    ids, ranks = blending_indices(weights, 10_000)
    seen = np.cumsum(np.eye(3, dtype=np.int64)[ids], axis=0)  # [n, dataset] counts after n samples
    n = np.arange(1, 10_001)[:, None]
    assert np.abs(seen - n * np.array(weights)).max() <= 1.5
    for d in range(3):  # each component is read in order 0, 1, 2, ...
        assert np.array_equal(ranks[ids == d], np.arange((ids == d).sum()))
    again = blending_indices([2, 3, 5], 10_000)  # unnormalised weights, same blend
    assert np.array_equal(again[0], ids) and np.array_equal(again[1], ranks)
    assert blend_counts([0.0, 1.0], 7).tolist() == [0, 7]


def greedy_reference(weights: list[float], size: int) -> tuple[list[int], list[int]]:
    """Megatron's build_blending_indices, written out: each sample goes to the component whose
    weight·max(i, 1) - count is largest (the first one on ties)."""
    counts = [0] * len(weights)
    ids, ranks = [], []
    for i in range(size):
        t = float(max(i, 1))
        errors = [w * t - c for w, c in zip(weights, counts)]
        d = errors.index(max(errors))
        ids.append(d)
        ranks.append(counts[d])
        counts[d] += 1
    return ids, ranks


def test_the_blend_order_is_megatrons_greedy_rule():
    rng = np.random.default_rng(3)
    for trial in range(60):
        n = int(rng.integers(1, 9))
        raw = rng.random(n) if trial % 3 else rng.integers(1, 4, n).astype(float)  # integers: ties
        size = int(rng.integers(1, 3000))
        weights = (raw / raw.sum()).tolist()
        ids, ranks = blending_indices(raw, size)
        assert (ids.tolist(), ranks.tolist()) == greedy_reference(weights, size), (trial, raw, size)
    # The case a sort by (k + 1/2) / w got wrong: 0.3 / 0.7 starts b, a, b, b, a, ...
    assert blending_indices([0.3, 0.7], 10)[0].tolist() == greedy_reference([0.3, 0.7], 10)[0]


def test_a_blend_cached_in_the_earlier_sorted_order_is_not_reused(tmp_path, data, monkeypatch):
    from viaduct.data import blended
    from viaduct.data.indexed import IndexedDataset

    config = GPTDatasetConfig(random_seed=1)
    parts = [
        GPTDataset(IndexedDataset(p), np.arange(100), 300, S, config, NullTokenizer(VOCAB), "train")
        for p in data
    ]
    # A cache as the sorted-order code wrote it (format 1): valid indices, another order.
    monkeypatch.setattr(blended, "_FORMAT", 1)
    old = BlendedDataset(parts, [0.3, 0.7], 200, 1, tmp_path)
    b_first = np.argsort(np.where(old.dataset_index == 1, 0, 1), kind="stable")  # still valid indices
    for name in ("dataset_index", "dataset_sample_index"):
        np.save(next(tmp_path.glob(f"*-{name}.npy")), getattr(old, name)[b_first])
    monkeypatch.undo()
    new = BlendedDataset(parts, [0.3, 0.7], 200, 1, tmp_path)
    assert new.built_anew
    assert new.dataset_index.tolist() == greedy_reference(list(new.weights), 200)[0]


def test_blended_dataset_caches_and_checks_component_sizes(tmp_path, data):
    from viaduct.data.indexed import IndexedDataset

    parts = [
        GPTDataset(
            IndexedDataset(p),
            np.arange(100),
            400,
            S,
            GPTDatasetConfig(random_seed=1),
            NullTokenizer(VOCAB),
            "train",
        )
        for p in data
    ]
    first = BlendedDataset(parts, [0.25, 0.75], 500, 1, tmp_path / "blend")
    again = BlendedDataset(parts, [0.25, 0.75], 500, 1, tmp_path / "blend")
    assert first.built_anew and not again.built_anew
    assert np.array_equal(first.dataset_index, again.dataset_index)
    assert [source(first[i]) for i in range(8)] == ["a" if d == 0 else "b" for d in first.dataset_index[:8]]
    with pytest.raises(ValueError, match="runs short"):
        BlendedDataset(parts, [0.25, 0.75], 10 * len(parts[1]), 1)

    # A damaged cache file is rebuilt with a warning, never a crash.
    files = {
        n: next((tmp_path / "blend").glob(f"*-{n}.npy")) for n in ("dataset_index", "dataset_sample_index")
    }
    want = {n: np.load(f) for n, f in files.items()}
    for name, damage in [
        ("dataset_index", lambda a: np.save(files["dataset_index"], np.full_like(a, 7))),  # no component 7
        ("dataset_sample_index", lambda a: np.save(files["dataset_sample_index"], a + 10**6)),  # past the end
        ("dataset_index", lambda a: files["dataset_index"].write_bytes(b"\x93NUMPY garbage")),
        ("dataset_sample_index", lambda a: np.save(files["dataset_sample_index"], a[:-1])),  # wrong shape
    ]:
        damage(want[name])
        with pytest.warns(IndexCacheWarning, match="rebuilding it"):
            rebuilt = BlendedDataset(parts, [0.25, 0.75], 500, 1, tmp_path / "blend")
        assert rebuilt.built_anew and all(np.array_equal(np.load(f), want[n]) for n, f in files.items())


# ---------------------------------------------------------------------------------------- builder


def test_data_path_weights_are_honoured(data):
    a, b = data
    cfg = cfg_with(data_path=f"0.3 {a} 0.7 {b}", split="1,0,0")
    train, valid, test = build_gpt_datasets(cfg, NullTokenizer(VOCAB), (10_000, 0, 0))
    assert isinstance(train, BlendedDataset) and valid is None and test is None
    assert len(train) == 10_000
    share_b = float(np.mean(train.dataset_index == 1))
    assert abs(share_b - 0.7) < 0.02
    picks = [source(train[i]) for i in range(0, 10_000, 97)]
    expect = ["a" if train.dataset_index[i] == 0 else "b" for i in range(0, 10_000, 97)]
    assert picks == expect
    # Each component was sized num_samples × weight × (1 + surplus) at least.
    assert len(train.datasets[1]) >= 10_000 * 0.7 * 1.005


def test_unweighted_prefixes_are_weighted_by_size(data):
    a, b = data
    cfg = cfg_with(data_path=[a, b], split="1,0,0")
    train, _, _ = build_gpt_datasets(cfg, NullTokenizer(VOCAB), (2000, 0, 0))
    tokens = [int(ds.indexed.sequence_lengths.sum()) for ds in train.datasets]
    assert train.weights[0] == pytest.approx(tokens[0] / sum(tokens), abs=0.01)


def test_an_unweighted_blend_stops_after_one_epoch_unless_asked_to_repeat(data):
    a, b = data
    # Megatron's rule: one epoch of each prefix, weighed by its length; the blend is capped at them.
    train, _, _ = build_gpt_datasets(
        cfg_with(data_path=[a, b], split="1,0,0"), NullTokenizer(VOCAB), (2000, 0, 0)
    )
    epochs = [len(ds) for ds in train.datasets]
    assert len(train) == sum(epochs) < 2000
    assert np.bincount(train.dataset_index).tolist() == epochs  # every sample of each epoch, once
    # Opt-in: the epochs' sizes become weights and the components repeat epochs to give 2000 samples.
    cfg = cfg_with(data_path=[a, b], split="1,0,0", unweighted_blend_repeats_epochs=True)
    train, _, _ = build_gpt_datasets(cfg, NullTokenizer(VOCAB), (2000, 0, 0))
    assert len(train) >= 2000
    assert train.weights[0] == pytest.approx(epochs[0] / sum(epochs))
    assert all(len(ds) > n for ds, n in zip(train.datasets, epochs))


def test_split_cuts_each_prefix_by_documents(data):
    a, _ = data
    cfg = cfg_with(data_path=a, split="8,1,1")
    parts = build_gpt_datasets(cfg, NullTokenizer(VOCAB), (100, 20, 20))
    assert all(isinstance(d, GPTDataset) for d in parts)
    docs = [set(d.documents.tolist()) for d in parts]
    assert docs[0] == set(range(240)) and docs[1] == set(range(240, 270)) and docs[2] == set(range(270, 300))
    assert all(set(d.document_index.tolist()) == docs[i] for i, d in enumerate(parts))
    assert all(len(d) >= n for d, n in zip(parts, (100, 20, 20)))
    # A split with no samples, or no share, gets no dataset.
    assert build_gpt_datasets(cfg_with(data_path=a, split="1,1,0"), NullTokenizer(VOCAB), (10, 0, 5))[1:] == (
        None,
        None,
    )


def test_blend_per_split_gives_each_split_its_data(data):
    a, b = data
    cfg = cfg_with(blend_per_split=[([a, b], [0.5, 0.5]), ([b], None), None])
    train, valid, test = build_gpt_datasets(cfg, NullTokenizer(VOCAB), (400, 40, 10))
    assert isinstance(train, BlendedDataset) and isinstance(valid, GPTDataset) and test is None
    assert {source(valid[i]) for i in range(len(valid))} == {"b"}
    assert valid.documents.tolist() == list(range(200))  # the whole prefix
    assert abs(float(np.mean(train.dataset_index == 0)) - 0.5) < 0.02


def test_through_the_loader_and_deterministic_with_threads(data):
    a, b = data
    cfg = cfg_with(data_path=f"1 {a} 1 {b}", split="98,2,0", num_dataset_builder_threads=4)
    cfg.validate()
    train, valid, _ = build_train_valid_test_datasets(cfg, NullTokenizer(VOCAB), (300, 30, 0))
    cfg.dataset.num_dataset_builder_threads = 1
    train1, _, _ = build_train_valid_test_datasets(cfg, NullTokenizer(VOCAB), (300, 30, 0))
    assert isinstance(train, BlendedDataset) and isinstance(valid, BlendedDataset)
    assert not train1.built_anew  # the same blend: a cache hit
    assert all(torch.equal(train[i]["tokens"], train1[i]["tokens"]) for i in range(0, 300, 7))


def test_missing_prefixes_are_named_with_their_field(tmp_path, data):
    a, _ = data
    cfg = cfg_with(data_path=f"0.5 {a} 0.5 {tmp_path / 'nope'}", split="1,0,0")
    with pytest.raises(ConfigError) as exc:
        build_gpt_datasets(cfg, NullTokenizer(VOCAB), (10, 0, 0))
    (p,) = exc.value.problems
    assert p.path == "dataset.data_path" and str(tmp_path / "nope") in p.message
    cfg = cfg_with(blend_per_split=[([str(tmp_path / "x")], None), ([str(tmp_path / "y")], None), None])
    with pytest.raises(ConfigError) as exc:
        build_gpt_datasets(cfg, NullTokenizer(VOCAB), (10, 10, 0))
    assert [p.path for p in exc.value.problems] == [
        "dataset.blend_per_split[0]",
        "dataset.blend_per_split[1]",
    ]


def test_vocabulary_too_small_for_the_data(data):
    a, b = data
    cfg = cfg_with(data_path=[a, b], split="1,0,0")
    with pytest.raises(ConfigError) as exc:
        build_gpt_datasets(cfg, NullTokenizer(500), (10, 0, 0))
    assert [p.path for p in exc.value.problems] == [a + ".bin", b + ".bin"]  # both hold EOD 999
    p = exc.value.problems[0]
    assert "999" in p.message and "500" in p.message and "model.vocab_size" in p.message
    with pytest.raises(ConfigError, match="vocabulary has 900 ids"):
        build_gpt_datasets(cfg, NullTokenizer(900), (10, 0, 0))  # again: the max comes from the cache


def test_per_dataset_sequences_path(tmp_path, data):
    a, b = data
    table = tmp_path / "counts.json"
    table.write_text(json.dumps({a: [300, 300], b: [200, 200]}))
    cfg = cfg_with(data_path=f"0.5 {a} 0.5 {b}", split="9,1,0", per_dataset_sequences_path=str(table))
    train, valid, _ = build_gpt_datasets(cfg, NullTokenizer(VOCAB), (100, 10, 0))
    assert train.datasets[0].documents.tolist() == list(range(270))
    assert valid.datasets[1].documents.tolist() == list(range(180, 200))
    hit, _, _ = build_gpt_datasets(cfg, NullTokenizer(VOCAB), (100, 10, 0))
    assert all(d._indexed is None for d in hit.datasets)  # counts and caches: no index was opened
    assert torch.equal(hit[5]["tokens"], train[5]["tokens"])
    table.write_text(json.dumps({a: [300, 300]}))
    with pytest.raises(ConfigError, match="no entry for prefix") as exc:
        build_gpt_datasets(cfg, NullTokenizer(VOCAB), (100, 10, 0))
    assert exc.value.problems[0].path == "dataset.per_dataset_sequences_path"
    table.write_text(json.dumps({a: [300, 300], b: [150, 150]}))  # wrong: b holds 200
    with pytest.raises(ConfigError, match="holds 150 sequences, but its index holds 200"):
        build_gpt_datasets(cfg, NullTokenizer(VOCAB), (100, 10, 0))


def test_a_split_without_documents_is_an_error(data):
    a, _ = data
    cfg = cfg_with(data_path=a, split="1000,1,0")  # 300 documents: the validation share rounds to none
    with pytest.raises(ConfigError, match="gives the validation split no documents") as exc:
        build_gpt_datasets(cfg, NullTokenizer(VOCAB), (10, 10, 0))
    assert exc.value.problems[0].path == "dataset.split"


# ------------------------------------------------------------------------------- empty or damaged data


def test_empty_prefixes_are_named_with_their_field(tmp_path, data):
    a, _ = data
    with IndexedDatasetWriter(str(tmp_path / "none"), np.uint16):
        pass  # no documents at all
    with IndexedDatasetWriter(str(tmp_path / "blank"), np.uint16) as w:
        for _ in range(5):
            w.add_document(np.zeros(0, np.uint16))  # documents without tokens
    none, blank = str(tmp_path / "none"), str(tmp_path / "blank")
    cfg = cfg_with(data_path=[a, none, blank], split="1,0,0")
    with pytest.raises(ConfigError) as exc:
        build_gpt_datasets(cfg, NullTokenizer(VOCAB), (10, 0, 0))
    assert [(p.path, p.value) for p in exc.value.problems] == [
        ("dataset.data_path", none),
        ("dataset.data_path", blank),
    ]
    text = str(exc.value)
    assert f"{none}.idx holds no documents" in text and f"{blank}.idx holds 5 sequences but no tokens" in text
    cfg = cfg_with(blend_per_split=[([a], None), ([none], None), None])
    with pytest.raises(ConfigError, match="holds no documents") as exc:
        build_gpt_datasets(cfg, NullTokenizer(VOCAB), (10, 10, 0))
    assert exc.value.problems[0].path == "dataset.blend_per_split[1]"


def test_damaged_prefixes_are_named_with_their_field(tmp_path, data):
    a, b = data
    for prefix in (a, b):
        idx = bytearray(Path(prefix + ".idx").read_bytes())
        idx[34:38] = (-7).to_bytes(4, "little", signed=True)  # the first sequence's length
        Path(prefix + ".idx").write_bytes(bytes(idx))
    cfg = cfg_with(data_path=f"0.5 {a} 0.5 {b}", split="1,0,0")
    with pytest.raises(ConfigError) as exc:
        build_gpt_datasets(cfg, NullTokenizer(VOCAB), (10, 0, 0))
    assert [p.path for p in exc.value.problems] == ["dataset.data_path", "dataset.data_path"]
    assert all("negative length -7" in p.message for p in exc.value.problems)
    assert f"{a}.idx" in exc.value.problems[0].message and f"{b}.idx" in exc.value.problems[1].message


def test_a_split_too_small_for_a_sample_is_named(tmp_path, data):
    a, _ = data
    tiny = []
    for name in ("small", "smaller"):  # 6 tokens each: fewer than one sample
        with IndexedDatasetWriter(str(tmp_path / name), np.uint16) as w:
            w.add_document(np.array([1, 2, EOD], np.uint16))
            w.add_document(np.array([3, 4, EOD], np.uint16))
        tiny.append(str(tmp_path / name))
    small = tiny[0]
    cfg = cfg_with(data_path=tiny, split="1,0,0")
    with pytest.raises(ConfigError, match="too few tokens for one sample of 16") as exc:
        build_gpt_datasets(cfg, NullTokenizer(VOCAB), (10, 0, 0))  # weights by size: all 0
    assert exc.value.problems[0].path == "dataset.split"
    cfg = cfg_with(data_path=f"0.5 {a} 0.5 {small}", split="1,0,0", add_extra_token_to_sequence=True)
    train, _, _ = build_gpt_datasets(cfg, NullTokenizer(VOCAB), (10, 0, 0))  # repeated epochs suffice
    assert len(train) == 10
    with IndexedDatasetWriter(str(tmp_path / "tail"), np.uint16) as w:  # its last 2 documents are empty
        for k in range(20):
            w.add_document(np.array([1, 2, EOD] if k < 18 else [], np.uint16))
    cfg = cfg_with(data_path=f"0.5 {a} 0.5 {tmp_path / 'tail'}", split="90,10,0")
    with pytest.raises(
        ConfigError, match=r"tail\.idx: gives the validation split 2 documents holding 0"
    ) as exc:
        build_gpt_datasets(cfg, NullTokenizer(VOCAB), (10, 10, 0))
    assert exc.value.problems[0].path == "dataset.split"


@dataclass(kw_only=True)
class _OtherDataset(DataloaderConfig):
    """A dataset kind that names no indexed data."""

    _abstract_config_ = True  # kept out of DataloaderConfig.variants(), which other tests enumerate


def test_the_builder_refuses_a_dataset_kind_without_indexed_data():
    cfg = tiny_gpt_pretrain_config()
    cfg.dataset = _OtherDataset(num_workers=0)
    with pytest.raises(ConfigError) as exc:
        build_gpt_datasets(cfg, NullTokenizer(VOCAB), (10, 0, 0))
    (problem,) = exc.value.problems
    assert problem.path == "dataset" and "_OtherDataset names no indexed" in problem.message
    assert "GPTDatasetConfig" in (problem.fix or "")
