"""T5 span corruption: spans and sentinels that rebuild the input, Megatron's masking budget and
n-gram rules, the sample index over real indexed files, determinism and resumability, clear errors
for too few sentinels and bad settings, the index cache, and the synthetic variant."""

from __future__ import annotations

import itertools
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from viaduct.config import ConfigError
from viaduct.config.base import ConfigBase
from viaduct.data.index_cache import IndexCacheWarning
from viaduct.data.indexed import IndexedDataset, IndexedDatasetWriter
from viaduct.data.t5_dataset import (
    LONG_SENTENCE_LEN,
    MockT5Dataset,
    T5Dataset,
    build_t5_sample_index,
    t5_lengths,
)
from viaduct.data.t5_masking import MaskingSettings, choose_spans, short_target_length
from viaduct.data.tokenizers import ByteLevelTokenizer, NullTokenizer
from viaduct.training.config import DataloaderConfig, MockT5DatasetConfig, T5DatasetConfig

ENC, DEC = 64, 32
TOK = ByteLevelTokenizer(vocab_extra_ids=100)
EOD, PAD, BOS = TOK.eod, TOK.pad, TOK.bos
SENTINELS = TOK.additional_special_tokens_ids


def write_prefix(path: Path, seed: int = 0, docs: int = 60, max_sentences: int = 5, eod: bool = True) -> str:
    """Documents of 1..max_sentences sentences of random byte tokens; the last sentence ends in eod."""
    rng = np.random.default_rng(seed)
    prefix = str(path)
    with IndexedDatasetWriter(prefix, np.uint16) as w:
        for _ in range(docs):
            sentences = [
                rng.integers(0, 256, size=int(rng.integers(1, 40))).astype(np.uint16)
                for _ in range(int(rng.integers(1, max_sentences + 1)))
            ]
            if eod:
                sentences[-1] = np.append(sentences[-1], np.uint16(EOD))
            w.add_document(sentences)
    return prefix


def config(**kw) -> T5DatasetConfig:
    kw.setdefault("seq_length", ENC)
    kw.setdefault("sequence_length_decoder", DEC)
    return T5DatasetConfig(**kw)


def dataset(prefix: str, tmp_path: Path, num_samples: int | None = 200, cache: str = "c", **kw) -> T5Dataset:
    ix = IndexedDataset(prefix)
    docs = np.arange(ix.num_documents)
    return T5Dataset(ix, docs, num_samples, config(**kw), TOK, "train", cache_dir=tmp_path / cache)


def rebuild(sample: dict[str, torch.Tensor]) -> np.ndarray:
    """The original tokens: each sentinel of the encoder input replaced by its span of the target."""
    n_dec = int(sample["dec_mask"].sum())
    labels = sample["labels"][:n_dec].tolist()
    assert labels[-1] == TOK.eos
    spans: dict[int, list[int]] = {}
    current = None
    for t in labels[:-1]:
        if t in SENTINELS:
            current = t
            spans[t] = []
        else:
            assert current is not None, "the target starts with a sentinel"
            spans[current].append(t)
    out: list[int] = []
    for t in sample["text_enc"][: int(sample["enc_mask"].sum())].tolist():
        out.extend(spans.pop(t) if t in SENTINELS else [t])
    assert not spans, "every sentinel of the target appears in the encoder input"
    return np.array(out, dtype=np.int64)


def masked_spans(sample: dict[str, torch.Tensor]) -> list[int]:
    """Lengths of the masked spans of a sample, from its target."""
    n_dec = int(sample["dec_mask"].sum())
    lengths: list[int] = []
    for t in sample["labels"][: n_dec - 1].tolist():
        if t in SENTINELS:
            lengths.append(0)
        else:
            lengths[-1] += 1
    return lengths


# --------------------------------------------------------------------------------- span corruption


def test_sentinels_and_target_rebuild_the_input_exactly(tmp_path):
    ds = dataset(write_prefix(tmp_path / "a"), tmp_path)
    spans_seen = 0
    for i in range(len(ds)):
        sample = ds[i]
        tokens, want = ds.tokens_of(i)
        np.testing.assert_array_equal(rebuild(sample), tokens[:want])
        assert bool(sample["truncated"]) == (len(tokens) > want)
        n_enc, n_dec = int(sample["enc_mask"].sum()), int(sample["dec_mask"].sum())
        # Sentinels in order from the tokenizer's extra ids, one per span.
        used = [t for t in sample["text_enc"][:n_enc].tolist() if t in SENTINELS]
        assert used == SENTINELS[: len(used)]
        spans_seen += len(used)
        # Decoder input = bos + target[:-1]; padding after the real tokens, with no loss.
        assert sample["text_dec"][0] == BOS
        assert torch.equal(sample["text_dec"][1:n_dec], sample["labels"][: n_dec - 1])
        assert (sample["text_enc"][n_enc:] == PAD).all() and (sample["text_dec"][n_dec:] == PAD).all()
        assert torch.equal(sample["loss_mask"], sample["dec_mask"].float())
        assert torch.equal(sample["enc_dec_mask"], sample["enc_mask"])
        assert sample["enc_mask"][:n_enc].all() and not sample["enc_mask"][n_enc:].any()
    assert spans_seen > len(ds)  # masking happened, more than one span per sample on average


def test_sample_dict_keys_shapes_and_dtypes(tmp_path):
    sample = dataset(write_prefix(tmp_path / "a"), tmp_path)[0]
    want = {
        "text_enc": ((ENC,), torch.int64),
        "text_dec": ((DEC,), torch.int64),
        "labels": ((DEC,), torch.int64),
        "loss_mask": ((DEC,), torch.float32),
        "enc_mask": ((ENC,), torch.bool),
        "dec_mask": ((DEC,), torch.bool),
        "enc_dec_mask": ((ENC,), torch.bool),
        "truncated": ((), torch.int64),
    }
    assert {k: (tuple(v.shape), v.dtype) for k, v in sample.items()} == want


def test_masked_fraction_is_close_to_the_masking_probability():
    # Long runs of ordinary tokens: the budget min(p·T, round(len·p)) is about 0.15 of each sample.
    rng = np.random.RandomState(0)
    settings = MaskingSettings(probability=0.15)
    masked = total = 0
    for _ in range(300):
        tokens = np.random.default_rng(rng.randint(2**31)).integers(0, 256, size=510)
        _, spans = choose_spans(tokens, 510, rng, settings)
        masked += sum(e - s for s, e in spans)
        total += tokens.size
    assert 0.13 < masked / total <= 0.15


@pytest.mark.parametrize(
    "settings",
    [
        MaskingSettings(max_ngram=3),
        MaskingSettings(max_ngram=4, use_geometric_distribution=False),
        MaskingSettings(max_ngram=2, use_geometric_distribution=False, use_longer_ngrams=True),
    ],
)
def test_span_lengths_respect_the_max_ngram(settings):
    rng = np.random.RandomState(1)
    lengths = []
    for _ in range(200):
        tokens = rng.randint(0, 256, size=200)
        _, spans = choose_spans(tokens, 200, rng, settings)
        lengths += [e - s for s, e in spans]
        # Sorted, disjoint spans inside the sample.
        for (_, end), (start, _) in itertools.pairwise(spans):
            assert end <= start
    assert max(lengths) == settings.max_ngram and min(lengths) >= 1


def test_longer_ngrams_favour_longer_spans():
    def mean_length(longer: bool) -> float:
        rng = np.random.RandomState(2)
        s = MaskingSettings(max_ngram=5, use_geometric_distribution=False, use_longer_ngrams=longer)
        out = [e - b for _ in range(100) for b, e in choose_spans(rng.randint(0, 256, 300), 300, rng, s)[1]]
        return float(np.mean(out))

    assert mean_length(True) > mean_length(False) + 0.5


def test_special_tokens_are_never_masked_and_spans_do_not_cross_them():
    rng = np.random.RandomState(3)
    settings = MaskingSettings(probability=0.5, max_ngram=10)
    for _ in range(50):
        tokens = rng.randint(0, 256, size=100)
        tokens[::7] = EOD
        _, spans = choose_spans(tokens, 100, rng, settings, frozenset({EOD}))
        for s, e in spans:
            assert (tokens[s:e] != EOD).all()


def test_the_decoder_length_bounds_the_spans():
    rng = np.random.RandomState(4)
    for _ in range(50):
        tokens = rng.randint(0, 256, size=500)
        _, spans = choose_spans(tokens, 500, rng, MaskingSettings(max_ngram=1), decoder_length=20)
        assert 1 + sum(e - s + 1 for s, e in spans) <= 20


def test_permutation_shuffles_only_unmasked_tokens():
    rng = np.random.RandomState(5)
    settings = MaskingSettings(do_permutation=True, use_geometric_distribution=False, max_ngram=3)
    changed = False
    for _ in range(20):
        tokens = np.arange(100, dtype=np.int64)
        out, spans = choose_spans(tokens, 100, rng, settings)
        masked = np.zeros(100, dtype=bool)
        for s, e in spans:
            masked[s:e] = True
        np.testing.assert_array_equal(out[masked], tokens[masked])
        assert sorted(out[~masked].tolist()) == tokens[~masked].tolist()
        changed |= not np.array_equal(out, tokens)
    assert changed


# ------------------------------------------------------------------------------------ sample index


def test_sample_index_follows_megatrons_walk():
    # Documents: [0, 3) with sentences of 10, 10, 10; [3, 4) one sentence of 50; [4, 6) where the
    # second sentence is too long (the document is skipped); [6, 6) empty.
    lengths = np.array([10, 10, 10, 50, 5, LONG_SENTENCE_LEN + 1], dtype=np.int32)
    starts, ends = np.array([0, 3, 4, 6]), np.array([3, 4, 6, 6])
    index = build_t5_sample_index(starts, ends, lengths, None, 15, 0.0, 7)
    rows = sorted(map(tuple, index.tolist()))
    # 10 < 15, then 20 >= 15 but closing would leave one sentence alone: all three form one sample.
    assert rows == [(0, 3, 15), (3, 4, 15)]
    # Sentences of 20: each closes a sample, except where only one sentence would be left over.
    index = build_t5_sample_index(starts[:1], ends[:1], np.array([20, 20, 20, 1]), None, 15, 0.0, 7)
    assert sorted(map(tuple, index.tolist())) == [(0, 1, 15), (1, 3, 15)]
    index = build_t5_sample_index(np.array([0]), np.array([4]), np.array([20, 20, 20, 1]), None, 15, 0.0, 7)
    assert sorted(map(tuple, index.tolist())) == [(0, 1, 15), (1, 2, 15), (2, 4, 15)]


def test_sample_index_epochs_targets_and_short_samples():
    lengths = np.full(100, 30, dtype=np.int32)
    starts, ends = np.arange(100), np.arange(1, 101)
    index = build_t5_sample_index(starts, ends, lengths, 250, 62, 0.5, 11)
    assert index.shape == (300, 3)  # whole epochs of 100 samples
    assert sorted(index[:, 0].tolist()) == sorted(list(range(100)) * 3)
    short = index[:, 2] < 62
    assert 0.3 < short.mean() < 0.7 and index[:, 2].min() >= 2
    # The target lengths are Megatron's draws from the Mersenne Twister stream of the seed.
    draws = np.random.RandomState(11).randint(0, 2**32, size=2, dtype=np.uint64)
    first_doc = index[index[:, 0] == 0][0]
    # Every document takes two draws (its sample's target, then the next target it never uses).
    assert first_doc[2] == short_target_length(int(draws[0]), 62, 2)
    np.testing.assert_array_equal(index, build_t5_sample_index(starts, ends, lengths, 250, 62, 0.5, 11))
    # The shortest encoder (3 tokens: a target of 1) never draws a length from an empty range.
    assert (build_t5_sample_index(starts, ends, lengths, None, 1, 1.0, 11)[:, 2] == 1).all()
    assert not np.array_equal(index, build_t5_sample_index(starts, ends, lengths, 250, 62, 0.5, 12))


def test_split_without_usable_documents_is_a_clear_error(tmp_path):
    prefix = str(tmp_path / "long")
    with IndexedDatasetWriter(prefix, np.uint16) as w:
        w.add_document([np.zeros(600, np.uint16), np.zeros(5, np.uint16)])
    with pytest.raises(ConfigError, match="gives no T5 samples"):
        dataset(prefix, tmp_path)


def test_documents_outside_the_file_are_a_clear_error(tmp_path):
    ix = IndexedDataset(write_prefix(tmp_path / "a", docs=5))
    with pytest.raises(ConfigError, match="holds 5 documents"):
        T5Dataset(ix, np.arange(3, 9), 10, config(), TOK, "train", cache_dir=tmp_path / "c")


# ------------------------------------------------------------------------- determinism and caching


def test_samples_are_deterministic_and_independent_of_access_order(tmp_path):
    prefix = write_prefix(tmp_path / "a")
    a = dataset(prefix, tmp_path, cache="c1")
    b = dataset(prefix, tmp_path, cache="c2")
    assert a.built_anew and b.built_anew
    order = list(range(len(a)))
    forward = [a[i] for i in order]
    backward = {i: b[i] for i in reversed(order)}
    for i in order:
        for key in forward[i]:
            assert torch.equal(forward[i][key], backward[i][key]), (i, key)
    # A resumed run (a new object, a loaded cache, a data-loader worker) sees the same sample i.
    resumed = pickle.loads(pickle.dumps(dataset(prefix, tmp_path, cache="c1")))
    assert torch.equal(resumed[37]["text_enc"], forward[37]["text_enc"])
    other = dataset(prefix, tmp_path, cache="c3", random_seed=99)
    assert any(not torch.equal(other[i]["text_enc"], forward[i]["text_enc"]) for i in range(10))


def test_cache_hit_and_a_damaged_cache_is_rebuilt(tmp_path):
    prefix = write_prefix(tmp_path / "a")
    first = dataset(prefix, tmp_path)
    second = dataset(prefix, tmp_path)
    assert first.built_anew and not second.built_anew
    np.testing.assert_array_equal(first.sample_index, second.sample_index)
    path = second._paths()["sample_index"]
    bad = np.array(first.sample_index)
    bad[3, 1] = len(first.indexed) + 5  # reads past the data
    del first, second
    np.save(path, bad)
    with pytest.warns(IndexCacheWarning, match="does not lie within one document"):
        again = dataset(prefix, tmp_path)
    assert again.built_anew
    assert (np.asarray(again.sample_index)[:, 1] <= len(again.indexed)).all()


# ------------------------------------------------------------------------------------------ errors


def test_too_few_sentinels_names_tokenizer_vocab_extra_ids(tmp_path):
    prefix = write_prefix(tmp_path / "a", docs=5)
    with pytest.raises(ConfigError, match=r"tokenizer\.vocab_extra_ids") as err:
        T5Dataset(prefix, np.arange(5), 10, config(), ByteLevelTokenizer(vocab_extra_ids=3), "train")
    assert "up to 9 spans" in str(err.value)  # min(int(0.15 * 62), (32 - 1) // 2)
    with pytest.raises(ConfigError, match=r"tokenizer\.vocab_extra_ids"):
        MockT5Dataset(4, ByteLevelTokenizer(), config(), "train")


def test_a_tokenizer_without_bos_is_a_clear_error():
    with pytest.raises(ConfigError) as err:
        MockT5Dataset(4, NullTokenizer(1000), config(), "train")
    text = str(err.value)
    assert "no bos token" in text and "tokenizer.vocab_extra_ids" in text  # every problem at once


def test_config_problems_are_reported_together():
    cfg = T5DatasetConfig(
        seq_length=64,
        sequence_length_encoder=32,
        masking_probability=1.5,
        short_sequence_probability=-0.1,
        masking_max_ngram=0,
        masking_do_permutation=True,
        sequence_length_decoder=2,
    )
    with pytest.raises(ConfigError) as err:
        cfg.finalize()
    paths = {p.path for p in err.value.problems}
    assert paths == {
        "masking_probability",
        "short_sequence_probability",
        "masking_max_ngram",
        "masking_do_permutation",
        "sequence_length_encoder",
        "sequence_length_decoder",
    }
    config(masking_do_permutation=True, masking_use_geometric_distribution=False).finalize()  # allowed


def test_whole_word_masking_is_refused():
    cfg = config(masking_do_full_word=True)
    assert any("not supported yet" in p.message for p in cfg.check_types())
    with pytest.raises(ConfigError, match="masking_do_full_word"):
        MockT5Dataset(4, TOK, cfg, "train")


def test_defaults_aliases_and_lengths():
    cfg = T5DatasetConfig()
    assert (cfg.masking_probability, cfg.short_sequence_probability, cfg.masking_max_ngram) == (0.15, 0.1, 10)
    assert cfg.masking_use_geometric_distribution and not cfg.masking_do_permutation
    assert DataloaderConfig.variant("t5") is T5DatasetConfig
    assert DataloaderConfig.variant("mock_t5") is MockT5DatasetConfig
    assert isinstance(cfg, ConfigBase)
    assert t5_lengths(cfg, 512) == (512, 128)
    assert t5_lengths(cfg, 512, 114) == (512, 114)
    assert t5_lengths(config(), 512, 114) == (ENC, DEC)
    with pytest.raises(ConfigError, match="encoder length is unknown"):
        t5_lengths(cfg)
    with pytest.raises(ConfigError) as err:
        MockT5DatasetConfig(data_path="x", split="1").finalize()
    assert "synthetic tokens" in str(err.value)


# -------------------------------------------------------------------------------------------- mock


def test_mock_dataset_shapes_determinism_and_reconstruction():
    cfg = config()
    a = MockT5Dataset(50, TOK, cfg, "train")
    b = MockT5Dataset(50, TOK, cfg, "train")
    val = MockT5Dataset(50, TOK, cfg, "validation")
    assert len(a) == 50
    for i in (49, 0, 17):
        s = a[i]
        assert (
            s["text_enc"].shape == (ENC,) and s["labels"].shape == (DEC,) and s["loss_mask"].shape == (DEC,)
        )
        for key in s:
            assert torch.equal(s[key], b[i][key])
        tokens = rebuild(s)
        assert ((np.diff(tokens) == 1) | (tokens[1:] == 0)).all()  # counting tokens, wrapping at 256
    assert any(not torch.equal(a[i]["text_enc"], val[i]["text_enc"]) for i in range(5))
    with pytest.raises(IndexError):
        a[50]


def test_selected_by_override_and_round_trips_through_yaml(tmp_path):
    from viaduct.config.overrides import apply_overrides
    from viaduct.recipes.gpt import tiny_gpt_pretrain_config
    from viaduct.training.config import ConfigContainer

    cfg = apply_overrides(
        tiny_gpt_pretrain_config(),
        ["dataset=t5", "dataset.masking_probability=0.2", "dataset.masking_max_ngram=3"],
    )
    assert isinstance(cfg.dataset, T5DatasetConfig) and cfg.dataset.masking_probability == 0.2
    path = tmp_path / "run.yaml"
    path.write_text(cfg.to_yaml())
    loaded = ConfigContainer.from_yaml(path)
    assert isinstance(loaded.dataset, T5DatasetConfig)
    assert (loaded.dataset.masking_probability, loaded.dataset.masking_max_ngram) == (0.2, 3)
