"""Megatron indexed dataset (.bin/.idx): round trips, the byte layout both ways, merging, clear errors,
and damaged index content refused when the pair is opened."""

from __future__ import annotations

import os
import pickle
import struct

import numpy as np
import pytest

from viaduct.config import ConfigError
from viaduct.data import indexed
from viaduct.data.indexed import (
    DTYPE_CODES,
    CorruptIndexError,
    IndexedDataset,
    IndexedDatasetWriter,
    token_dtype,
)

MAGIC = b"MMIDIDX\x00\x00"


def random_documents(seed: int, n: int, high: int) -> list[list[np.ndarray]]:
    """n documents of 1-3 sequences (a few empty ones too) with ids in [0, high)."""
    rng = np.random.default_rng(seed)
    docs = []
    for _ in range(n):
        k = int(rng.integers(1, 4))
        docs.append([rng.integers(0, high, int(rng.integers(0, 50))) for _ in range(k)])
    return docs


def write(prefix: str, docs: list[list[np.ndarray]], dtype: np.dtype) -> None:
    with IndexedDatasetWriter(prefix, dtype) as w:
        for d in docs:
            w.add_document(d)


def build_by_hand(prefix: str, code: int, fmt: str, docs: list[list[list[int]]]) -> None:
    """The layout written byte by byte with struct, independently of the writer."""
    itemsize = struct.calcsize("<" + fmt)
    lengths, pointers, doc_index, data = [], [], [0], b""
    for doc in docs:
        for seq in doc:
            pointers.append(len(data))
            lengths.append(len(seq))
            data += struct.pack(f"<{len(seq)}{fmt}", *seq)
        doc_index.append(len(lengths))
    assert len(data) == sum(lengths) * itemsize
    idx = MAGIC + struct.pack("<Q", 1) + struct.pack("<B", code)
    idx += struct.pack("<Q", len(lengths)) + struct.pack("<Q", len(doc_index))
    idx += struct.pack(f"<{len(lengths)}i", *lengths)
    idx += struct.pack(f"<{len(pointers)}q", *pointers)
    idx += struct.pack(f"<{len(doc_index)}q", *doc_index)
    with open(prefix + ".idx", "wb") as f:
        f.write(idx)
    with open(prefix + ".bin", "wb") as f:
        f.write(data)


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
@pytest.mark.parametrize("mmap", [True, False])
def test_round_trip_many_multi_sequence_documents(tmp_path, dtype, mmap):
    high = 65000 if dtype == np.uint16 else 2_000_000
    docs = random_documents(0, 400, high)
    prefix = str(tmp_path / "ds")
    write(prefix, docs, np.dtype(dtype))
    assert IndexedDataset.exists(prefix)

    ds = IndexedDataset(prefix, mmap=mmap)
    seqs = [s for d in docs for s in d]
    assert ds.dtype == np.dtype(dtype)
    assert len(ds) == len(seqs)
    assert ds.num_documents == len(docs)
    assert ds.sequence_lengths.dtype == np.int32 and ds.sequence_pointers.dtype == np.int64
    assert ds.document_indices.dtype == np.int64
    assert ds.document_indices.tolist() == [0, *np.cumsum([len(d) for d in docs]).tolist()]
    for i, s in enumerate(seqs):
        got = ds[i]
        assert got.dtype == np.dtype(dtype)
        np.testing.assert_array_equal(got, s)
    assert ds.num_tokens == sum(len(s) for s in seqs)
    # A slice is the same sequences, read in one go.
    for a, b in zip(ds[10:20], seqs[10:20]):
        np.testing.assert_array_equal(a, b)


def test_file_built_byte_by_byte_is_read(tmp_path):
    docs = [[[1, 2, 3], [65535]], [[7, 8]], [[]], [[0, 4, 5, 6]]]
    prefix = str(tmp_path / "hand")
    build_by_hand(prefix, 8, "H", docs)  # 8 = uint16
    ds = IndexedDataset(prefix)
    assert ds.dtype == np.uint16
    assert [ds[i].tolist() for i in range(len(ds))] == [[1, 2, 3], [65535], [7, 8], [], [0, 4, 5, 6]]
    assert ds.document_indices.tolist() == [0, 2, 3, 4, 5]
    assert ds.sequence_pointers.tolist() == [0, 6, 8, 12, 12]
    assert ds.get(4, offset=1, length=2).tolist() == [4, 5]
    assert ds.get(0, offset=1).tolist() == [2, 3]
    assert ds[-1].tolist() == [0, 4, 5, 6]

    build_by_hand(prefix, 4, "i", [[[-5, 2**31 - 1]], [[3]]])  # 4 = int32
    ds = IndexedDataset(prefix, mmap=False)
    assert ds.dtype == np.int32 and ds[0].tolist() == [-5, 2**31 - 1] and ds[1].tolist() == [3]


def test_writer_output_decoded_byte_by_byte(tmp_path):
    prefix = str(tmp_path / "w")
    with IndexedDatasetWriter(prefix, np.uint16) as w:
        w.add_document(np.array([10, 11, 12]))
        w.add_document([np.array([1]), np.array([2, 3])])
    idx = (tmp_path / "w.idx").read_bytes()
    assert idx[:9] == MAGIC
    version, code, n_seq, n_doc = struct.unpack_from("<QBQQ", idx, 9)
    assert (version, code, n_seq, n_doc) == (1, 8, 3, 3)
    off = 34
    assert struct.unpack_from("<3i", idx, off) == (3, 1, 2)
    assert struct.unpack_from("<3q", idx, off + 12) == (0, 6, 8)
    assert struct.unpack_from("<3q", idx, off + 36) == (0, 1, 3)
    assert len(idx) == off + 12 + 24 + 24
    assert (tmp_path / "w.bin").read_bytes() == struct.pack("<6H", 10, 11, 12, 1, 2, 3)


def test_dtype_codes_and_token_dtype():
    assert {c: str(d) for c, d in DTYPE_CODES.items()} == {
        1: "uint8",
        2: "int8",
        3: "int16",
        4: "int32",
        5: "int64",
        6: "float64",
        7: "float32",
        8: "uint16",
    }
    assert token_dtype(32000) == np.uint16
    assert token_dtype(65499) == np.uint16
    assert token_dtype(65500) == np.int32
    assert token_dtype(128256) == np.int32


def test_add_index_merges_shards_byte_identically(tmp_path):
    docs = random_documents(1, 90, 1000)
    write(str(tmp_path / "all"), docs, np.uint16)
    write(str(tmp_path / "a"), docs[:30], np.uint16)
    write(str(tmp_path / "b"), docs[30:], np.uint16)
    with IndexedDatasetWriter(str(tmp_path / "merged"), np.uint16) as w:
        w.add_document(docs[0])  # documents written directly and shards mix freely
        w.add_index(str(tmp_path / "a"))
        w.add_index(str(tmp_path / "b"))
    write(str(tmp_path / "expected"), [docs[0], *docs], np.uint16)
    for ext in ("bin", "idx"):
        assert (tmp_path / f"merged.{ext}").read_bytes() == (tmp_path / f"expected.{ext}").read_bytes()

    write(str(tmp_path / "wide"), docs[:2], np.int32)
    with (
        IndexedDatasetWriter(str(tmp_path / "mixed"), np.uint16) as w,
        pytest.raises(ConfigError, match="int32"),
    ):
        w.add_index(str(tmp_path / "wide"))


def test_writer_leaves_nothing_behind_on_error(tmp_path):
    with pytest.raises(RuntimeError), IndexedDatasetWriter(str(tmp_path / "x"), np.uint16) as w:
        w.add_document(np.arange(10))
        raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []
    w = IndexedDatasetWriter(str(tmp_path / "y"), np.uint16)
    w.add_document(np.arange(3))
    assert not IndexedDataset.exists(str(tmp_path / "y"))  # temporary names until finalize
    w.finalize()
    assert sorted(os.listdir(tmp_path)) == ["y.bin", "y.idx"]
    with pytest.raises(RuntimeError, match="finalized"):
        w.add_document(np.arange(3))


def test_writer_refuses_ids_that_do_not_fit(tmp_path):
    with IndexedDatasetWriter(str(tmp_path / "x"), np.uint16) as w:
        with pytest.raises(ValueError, match="70000 does not fit"):
            w.add_document(np.array([1, 70000]))
        with pytest.raises(ValueError, match="1-D"):
            w.add_document(np.zeros((2, 2), dtype=np.uint16))
    assert len(IndexedDataset(str(tmp_path / "x"))) == 0


def test_missing_files_are_named(tmp_path):
    with pytest.raises(ConfigError) as e:
        IndexedDataset(str(tmp_path / "nothing"))
    assert "nothing.idx: file not found" in str(e.value) and "nothing.bin: file not found" in str(e.value)
    write(str(tmp_path / "half"), [[np.arange(3)]], np.uint16)
    os.remove(tmp_path / "half.bin")
    with pytest.raises(ConfigError, match=r"half\.bin: file not found") as e:
        IndexedDataset(str(tmp_path / "half"))
    assert "half.idx" not in str(e.value)


def test_corrupt_files_give_clear_errors(tmp_path):
    prefix = str(tmp_path / "ds")
    write(prefix, [[np.arange(100)], [np.arange(5)]], np.uint16)
    idx = (tmp_path / "ds.idx").read_bytes()
    data = (tmp_path / "ds.bin").read_bytes()

    def check(idx_bytes: bytes, bin_bytes: bytes, pattern: str) -> None:
        (tmp_path / "ds.idx").write_bytes(idx_bytes)
        (tmp_path / "ds.bin").write_bytes(bin_bytes)
        with pytest.raises(ConfigError, match=pattern):
            IndexedDataset(prefix)

    check(idx, data[:-10], r"ds\.bin: is 200 bytes but its index says 210 .*truncated")
    check(idx, data + b"\0\0", r"ds\.bin: is 212 bytes but its index says 210")
    check(b"NOTANIDX\x00" + idx[9:], data, r"ds\.idx: is not a Megatron index")
    check(idx[:9] + struct.pack("<Q", 2) + idx[17:], data, "index version 2")
    check(idx[:17] + bytes([9]) + idx[18:], data, "unknown dtype code 9")
    check(idx[:-8], data, r"ds\.idx: is \d+ bytes but its header .* needs \d+")
    check(idx[:20], data, "shorter than the 34-byte header")
    (tmp_path / "ds.idx").write_bytes(idx)  # restored: reads again
    (tmp_path / "ds.bin").write_bytes(data)
    assert IndexedDataset(prefix)[1].tolist() == [0, 1, 2, 3, 4]


def test_get_bounds_pickle_and_empty_dataset(tmp_path):
    prefix = str(tmp_path / "ds")
    write(prefix, [[np.arange(10)]], np.uint16)
    ds = IndexedDataset(prefix)
    with pytest.raises(IndexError):
        ds[1]
    with pytest.raises(IndexError):
        ds.get(0, offset=8, length=3)
    with pytest.raises(ValueError, match="contiguous"):
        ds[0:1:2]
    with pytest.raises(TypeError):
        ds["0"]  # type: ignore[index]
    again = pickle.loads(pickle.dumps(ds))
    assert again[0].tolist() == list(range(10)) and "1 sequences" in repr(again)

    write(str(tmp_path / "empty"), [], np.uint16)
    empty = IndexedDataset(str(tmp_path / "empty"))
    assert len(empty) == 0 and empty.num_documents == 0 and empty[0:0] == []


# ------------------------------------------------------------------------------ damaged index content


def _damaged(tmp_path, patch) -> str:
    """A valid 3-document uint16 pair whose .idx then gets `patch(bytearray)`; returns the prefix."""
    prefix = str(tmp_path / "ds")
    write(prefix, [[np.arange(10)], [np.arange(20), np.arange(5)], [np.arange(30)]], np.uint16)
    idx = bytearray((tmp_path / "ds.idx").read_bytes())
    patch(idx)
    (tmp_path / "ds.idx").write_bytes(bytes(idx))
    return prefix


# Offsets in the .idx of _damaged's pair: 4 sequences, 4 document boundaries.
_LENGTHS, _POINTERS, _DOCS = 34, 34 + 4 * 4, 34 + 4 * 4 + 8 * 4


@pytest.mark.parametrize("mmap", [True, False])
@pytest.mark.parametrize(
    ("patch", "pattern"),
    [
        (
            lambda b: struct.pack_into("<i", b, _LENGTHS + 4, -5),
            r"ds\.idx: gives sequence 1 the negative length -5",
        ),
        (
            lambda b: struct.pack_into("<q", b, _POINTERS + 8, 10**12),
            r"ds\.idx: points sequence 1 at byte 1000000000000, beyond the 130-byte ds\.bin",
        ),
        (lambda b: struct.pack_into("<q", b, _POINTERS + 16, 4), r"sequence 2 at byte 4, before the end"),
        (lambda b: struct.pack_into("<q", b, _POINTERS + 8, 22), r"sequence 1 at byte 22, after a gap"),
        (
            lambda b: struct.pack_into("<q", b, _POINTERS, 2),
            r"sequence 0 at byte 2, after a gap.*start at byte 0",
        ),
        (
            lambda b: struct.pack_into("<qq", b, _DOCS + 8, 3, 1),
            r"document index 2 = 1 below index 1 = 3; document indices must never decrease",
        ),
        (lambda b: struct.pack_into("<q", b, _DOCS + 24, 3), r"document indices \(0, 3\).*sequence count 4"),
        # Lengths that still add up to the .bin's size but move the sequences' starts.
        (lambda b: struct.pack_into("<ii", b, _LENGTHS, 12, 18), r"sequence 1 at byte 20.*start at byte 24"),
    ],
)
def test_damaged_index_content_is_refused_at_open(tmp_path, patch, pattern, mmap):
    prefix = _damaged(tmp_path, patch)
    with pytest.raises(CorruptIndexError, match=pattern) as e:
        IndexedDataset(prefix, mmap=mmap)
    assert isinstance(e.value, ValueError) and "is damaged" in str(e.value)


def test_every_problem_of_a_damaged_index_is_reported_at_once(tmp_path):
    def patch(b: bytearray) -> None:
        struct.pack_into("<i", b, _LENGTHS + 8, -1)
        struct.pack_into("<qq", b, _DOCS + 8, 3, 1)

    with pytest.raises(CorruptIndexError) as e:
        IndexedDataset(_damaged(tmp_path, patch))
    assert len(e.value.problems) == 2
    assert "negative length -1" in str(e.value) and "must never decrease" in str(e.value)


def test_damage_found_across_check_blocks(tmp_path, monkeypatch):
    monkeypatch.setattr(indexed, "_CHECK_BLOCK", 3)  # many blocks over a small file
    prefix = str(tmp_path / "ds")
    write(prefix, [[np.arange(k % 7)] for k in range(40)], np.uint16)
    good = (tmp_path / "ds.idx").read_bytes()
    assert len(IndexedDataset(prefix)) == 40  # a valid file passes block by block
    n = 40
    pointers, docs = 34 + 4 * n, 34 + 12 * n
    for offset, fmt, value, pattern in [
        (pointers + 8 * 3, "<q", 1, "sequence 3 at byte 1"),  # the first entry of a block
        (pointers + 8 * 7, "<q", 10**6, "sequence 7 at byte 1000000"),
        (docs + 8 * 6, "<q", 1, "document index 6 = 1 below index 5 = 5"),  # across a block boundary
        (34 + 4 * 37, "<i", -2, "sequence 37 the negative length -2"),
    ]:
        bad = bytearray(good)
        struct.pack_into(fmt, bad, offset, value)
        (tmp_path / "ds.idx").write_bytes(bytes(bad))
        with pytest.raises(CorruptIndexError, match=pattern):
            IndexedDataset(prefix)


def test_a_small_header_cannot_claim_a_huge_index(tmp_path):
    prefix = _damaged(tmp_path, lambda b: struct.pack_into("<QQ", b, 18, 2**60, 2**60))
    with pytest.raises(CorruptIndexError, match=r"ds\.idx: is 114 bytes but its header .* needs \d+"):
        IndexedDataset(prefix, mmap=False)
