"""Megatron-Core as an oracle for the T5 span-corruption dataset: the same sample index (rows and
their shuffled order) and the same masked samples, on a corpus written by Megatron's own builder.

Megatron's T5 dataset needs only a tokenizer object with a few ids (no files or downloads), but it
asks torch.distributed for the rank while building its index, so these tests hold a one-process
gloo group for their duration."""

from __future__ import annotations

import logging
import warnings
from typing import ClassVar

import numpy as np
import pytest
import torch
import torch.distributed as dist

with warnings.catch_warnings():  # "Transformer Engine and Apex are not installed": irrelevant here
    warnings.simplefilter("ignore")
    pytest.importorskip("megatron.core")
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder as McoreWriter
    from megatron.core.datasets.t5_dataset import T5MaskedWordPieceDataset, T5MaskedWordPieceDatasetConfig

from viaduct.data.indexed import IndexedDataset
from viaduct.data.t5_dataset import T5Dataset, megatron_shuffle_order, mt19937_64
from viaduct.training.config import T5DatasetConfig

logging.getLogger("megatron").setLevel(logging.WARNING)

VOCAB = 1000
SENTINELS = list(range(900, 1000))


class McoreTokenizer:
    """What Megatron's T5 dataset reads from a tokenizer. No token of the corpus is a `##` word
    piece, so every token is a masking candidate, as in viaduct (which has no word pieces)."""

    vocab_size = VOCAB
    eod, eos, bos, pad, cls, sep, mask = 1, 2, 3, 0, 4, 5, 6
    additional_special_tokens_ids = SENTINELS
    inv_vocab: ClassVar[dict[int, str]] = {i: f"t{i}" for i in range(VOCAB)}
    unique_identifiers: ClassVar[dict[str, str]] = {"class": "McoreTokenizer"}


class ViaductTokenizer:
    """The same ids as viaduct's T5 dataset reads them."""

    vocab_size = VOCAB
    eod, eos, bos, pad = 1, 2, 3, 0
    additional_special_tokens_ids = SENTINELS


@pytest.fixture(scope="module")
def process_group(tmp_path_factory):
    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    store = tmp_path_factory.mktemp("store") / "store"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    """Documents of 1 to 5 sentences (tokens in [10, 890): none special), by Megatron's writer."""
    prefix = tmp_path_factory.mktemp("t5") / "corpus"
    rng = np.random.default_rng(0)
    writer = McoreWriter(f"{prefix}.bin", dtype=np.uint16)
    for _ in range(200):
        lengths = [int(rng.integers(5, 60)) for _ in range(int(rng.integers(1, 6)))]
        writer.add_document(rng.integers(10, 890, size=sum(lengths)).astype(np.uint16), lengths)
    writer.finalize(f"{prefix}.idx")
    return str(prefix)


def test_mt19937_64_is_cpps():
    # The C++ standard fixes this: the 10000th output of a default-constructed std::mt19937_64.
    assert int(mt19937_64(5489, 10_000)[-1]) == 9981545732273789042


def test_the_shuffle_is_a_permutation_for_any_count():
    for count in (0, 1, 2, 3, 311, 312, 313, 1000):
        order = megatron_shuffle_order(count, 7)
        assert sorted(order.tolist()) == list(range(count))


CASES = [
    dict(random_seed=1234, encoder=128, decoder=64, short=0.1, geometric=True, longer=False, ngram=10),
    dict(random_seed=7, encoder=64, decoder=32, short=0.0, geometric=False, longer=False, ngram=3),
    dict(random_seed=99, encoder=96, decoder=48, short=0.3, geometric=False, longer=True, ngram=5),
    dict(random_seed=5, encoder=128, decoder=64, short=0.1, geometric=True, longer=False, ngram=10, p=0.3),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"seed{c['random_seed']}")
def test_t5_samples_are_megatrons(tmp_path, process_group, corpus, case):
    num_samples = 300
    masking = dict(
        masking_probability=case.get("p", 0.15),
        short_sequence_probability=case["short"],
        masking_max_ngram=case["ngram"],
        masking_do_permutation=False,
        masking_use_longer_ngrams=case["longer"],
        masking_use_geometric_distribution=case["geometric"],
    )
    config = T5MaskedWordPieceDatasetConfig(
        random_seed=case["random_seed"],
        sequence_length=case["encoder"],
        sequence_length_decoder=case["decoder"],
        blend=([corpus], None),
        split="1,0,0",
        path_to_cache=str(tmp_path / "mcore"),
        tokenizer=McoreTokenizer(),
        masking_do_full_word=False,
        **masking,
    )
    theirs = BlendedMegatronDatasetBuilder(
        T5MaskedWordPieceDataset, [num_samples, 0, 0], lambda: True, config
    ).build()[0]
    ours = T5Dataset(
        IndexedDataset(corpus),
        np.arange(200),
        num_samples,
        T5DatasetConfig(
            random_seed=case["random_seed"],
            seq_length=case["encoder"],
            sequence_length_encoder=case["encoder"],
            sequence_length_decoder=case["decoder"],
            data_path=[corpus],
            path_to_cache=str(tmp_path / "viaduct"),
            **masking,
        ),
        ViaductTokenizer(),
        "train",
    )
    assert np.array_equal(ours.sample_index, theirs.sample_index)  # the rows, in Megatron's order
    for i in range(len(theirs)):
        a, b = ours[i], theirs[i]
        for key in ("text_enc", "text_dec", "labels", "loss_mask", "enc_mask", "dec_mask", "truncated"):
            assert torch.equal(a[key], torch.as_tensor(np.asarray(b[key])).to(a[key].dtype)), (i, key)
