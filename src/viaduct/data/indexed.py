"""Megatron-LM's indexed dataset: a `.bin` file of tokens and an `.idx` file that says where each
sequence starts, byte-compatible with `megatron/core/datasets/indexed_dataset.py` both ways.

Layout of `<prefix>.idx` (little-endian)::

    9 bytes    magic b"MMIDIDX\\x00\\x00"
    uint64     version, always 1
    uint8      dtype code of the tokens (see DTYPE_CODES)
    uint64     S, the number of sequences
    uint64     D, the number of document boundaries (documents + 1)
    int32[S]   sequence lengths, in tokens
    int64[S]   sequence pointers: byte offset of each sequence in the .bin file
    int64[D]   document indices: sequence index where each document starts, then S

`<prefix>.bin` is every sequence's tokens, back to back, in the dtype of the index. A document is
one or more sequences (Megatron writes one per sentence when it splits sentences, else one per
document). Megatron's multimodal variant appends an int8 mode per sequence to the index; the reader
accepts and ignores it.

Opening a pair checks all of the index, vectorized, before any token is read: the header's counts
against the file size (so a small file cannot claim a huge allocation), every length >= 0, every
pointer at the running sum of the lengths (no gap, overlap or byte beyond the `.bin`), the `.bin`
size, and document indices that rise from 0 to S. A damaged pair raises `CorruptIndexError`
naming the file and what is wrong; about 25 ms per 10M sequences (see docs/data.md).
"""

from __future__ import annotations

import mmap
import os
import shutil
import struct
from array import array
from collections.abc import Callable, Sequence
from types import TracebackType

import numpy as np

from viaduct.config import ConfigError, Problem

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
# magic, version, dtype code, sequence count, document count
_HEADER = struct.Struct("<9sQBQQ")
HEADER_SIZE = _HEADER.size  # 34 bytes

DTYPE_CODES: dict[int, np.dtype] = {
    1: np.dtype(np.uint8),
    2: np.dtype(np.int8),
    3: np.dtype(np.int16),
    4: np.dtype(np.int32),
    5: np.dtype(np.int64),
    6: np.dtype(np.float64),
    7: np.dtype(np.float32),
    8: np.dtype(np.uint16),
}
_CODE_OF = {dt: code for code, dt in DTYPE_CODES.items()}

_INT32_MAX = 2**31 - 1
# Index entries checked per block at open: bounds the check's temporary memory (about 20 MB) however
# large the index, and keeps each block's temporaries in cache.
_CHECK_BLOCK = 1 << 20


class CorruptIndexError(ConfigError):
    """An indexed dataset's `.idx`/`.bin` pair is damaged or does not belong together; each problem
    names the file and what is wrong with it."""


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest dtype Megatron stores token ids in: uint16 below 65,500 ids, else int32."""
    return np.dtype(np.uint16) if vocab_size < 65500 else np.dtype(np.int32)


def idx_path(prefix: str) -> str:
    return prefix + ".idx"


def bin_path(prefix: str) -> str:
    return prefix + ".bin"


def _dtype_code(dtype: np.dtype | type) -> int:
    dt = np.dtype(dtype).newbyteorder("=")
    if dt not in _CODE_OF:
        names = ", ".join(str(d) for d in DTYPE_CODES.values())
        raise ValueError(f"dtype {dt} cannot be stored in an indexed dataset; use one of {names}")
    return _CODE_OF[dt]


def _little(dtype: np.dtype) -> np.dtype:
    return np.dtype(dtype).newbyteorder("<")


class IndexedDatasetWriter:
    """Writes `<prefix>.bin` / `<prefix>.idx`; tokens stream to disk, only the index stays in memory.

    Use it as a context manager: it finalizes on success and removes its partial files on error.
    Both files are written under temporary names and renamed by `finalize()`, so a crash never
    leaves a pair that looks complete.
    """

    def __init__(self, prefix: str, dtype: np.dtype | type) -> None:
        self.prefix = str(prefix)
        self.dtype = np.dtype(dtype)
        self._code = _dtype_code(self.dtype)
        self._file_dtype = _little(self.dtype)
        self._itemsize = self.dtype.itemsize
        suffix = f".tmp-{os.getpid()}"
        self._tmp_bin = bin_path(self.prefix) + suffix
        self._tmp_idx = idx_path(self.prefix) + suffix
        # Compact growable arrays: a Python list of ints would cost ~30 bytes per sequence.
        self._lengths = array("i")  # int32
        self._doc_index = array("q", [0])  # int64
        self._tokens = 0
        self._bin = open(self._tmp_bin, "wb", buffering=1 << 20)
        self._closed = False

    # ------------------------------------------------------------------ writing

    def add_document(self, sequences: Sequence[np.ndarray] | np.ndarray) -> None:
        """Append one document made of one array (one sequence) or a list of arrays (one sequence each)."""
        self._check_open()
        if isinstance(sequences, np.ndarray):
            sequences = [sequences]
        for seq in sequences:
            arr = np.asarray(seq)
            if arr.ndim != 1:
                raise ValueError(f"a sequence must be a 1-D array of token ids, got shape {arr.shape}")
            if arr.dtype != self.dtype:
                arr = self._cast(arr)
            if arr.size > _INT32_MAX:
                raise ValueError(f"a sequence of {arr.size} tokens does not fit the index (int32 lengths)")
            # Written straight from the array's buffer: no copy when it is already little-endian.
            self._bin.write(np.ascontiguousarray(arr, dtype=self._file_dtype).data)
            self._lengths.append(arr.size)
            self._tokens += arr.size
        self._doc_index.append(len(self._lengths))

    def _cast(self, arr: np.ndarray) -> np.ndarray:
        # A silent wrap-around (70000 -> 4464 in uint16) would corrupt the data: check the range.
        if arr.size and self.dtype.kind in "iu":
            if arr.dtype.kind not in "iub":
                raise ValueError(f"token ids must be integers, got an array of {arr.dtype}")
            info = np.iinfo(self.dtype)
            lo, hi = int(arr.min()), int(arr.max())
            if lo < info.min or hi > info.max:
                raise ValueError(
                    f"token id {hi if hi > info.max else lo} does not fit the dataset dtype {self.dtype} "
                    f"([{info.min}, {info.max}]); write with a wider dtype (token_dtype(vocab_size))"
                )
        return arr.astype(self.dtype)

    def add_index(self, other_prefix: str) -> None:
        """Append every document of another indexed dataset (same dtype), e.g. a worker's shard."""
        self._check_open()
        other = IndexedDataset(other_prefix, mmap=True)
        if other.dtype != self.dtype:
            raise ConfigError(
                Problem(
                    idx_path(other_prefix),
                    f"holds {other.dtype} tokens; cannot append it to a {self.dtype} dataset",
                    fix="write both with the same dtype",
                )
            )
        offset = len(self._lengths)
        self._lengths.frombytes(np.ascontiguousarray(other.sequence_lengths, dtype=np.int32).tobytes())
        docs = np.asarray(other.document_indices[1:], dtype=np.int64) + offset
        self._doc_index.frombytes(docs.tobytes())
        self._tokens += int(other.sequence_lengths.sum(dtype=np.int64))
        del other  # release its memory maps before copying the file
        with open(bin_path(other_prefix), "rb") as src:
            shutil.copyfileobj(src, self._bin, 1 << 22)

    # ------------------------------------------------------------------ finishing

    @property
    def num_sequences(self) -> int:
        return len(self._lengths)

    @property
    def num_documents(self) -> int:
        return len(self._doc_index) - 1

    @property
    def num_tokens(self) -> int:
        return self._tokens

    def finalize(self) -> None:
        """Write the index and move both files to their final names."""
        self._check_open()
        self._closed = True
        try:
            self._bin.close()
            lengths = np.frombuffer(self._lengths, dtype=np.int32)
            pointers = np.zeros(len(lengths), dtype=np.int64)
            if len(lengths) > 1:
                np.cumsum(lengths[:-1], dtype=np.int64, out=pointers[1:])
            pointers *= self._itemsize
            doc_index = np.frombuffer(self._doc_index, dtype=np.int64)
            with open(self._tmp_idx, "wb") as f:
                f.write(_HEADER.pack(MAGIC, VERSION, self._code, len(lengths), len(doc_index)))
                f.write(lengths.astype("<i4", copy=False).tobytes())
                f.write(pointers.astype("<i8", copy=False).tobytes())
                f.write(doc_index.astype("<i8", copy=False).tobytes())
            # .idx last: a reader that finds both names finds a complete pair (the size check
            # catches a .bin from a crash between the two renames).
            os.replace(self._tmp_bin, bin_path(self.prefix))
            os.replace(self._tmp_idx, idx_path(self.prefix))
        except BaseException:
            self._remove_temp()
            raise

    def abort(self) -> None:
        """Stop writing and remove the partial files (the final names are never touched)."""
        if not self._closed:
            self._closed = True
            self._bin.close()
        self._remove_temp()

    def _remove_temp(self) -> None:
        for path in (self._tmp_bin, self._tmp_idx):
            try:
                os.remove(path)
            except FileNotFoundError:
                pass

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"the writer of {self.prefix} is already finalized or aborted")

    def __enter__(self) -> IndexedDatasetWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            if not self._closed:
                self.finalize()
        else:
            self.abort()

    def __del__(self) -> None:
        # Never finalized nor aborted (dropped on the floor): leave no temporary file behind.
        if getattr(self, "_closed", True) is False:
            try:
                self.abort()
            except Exception:
                pass


def read_header(prefix: str) -> tuple[np.dtype, int, int]:
    """(token dtype, sequence count, document boundary count) from the 34-byte header of
    `<prefix>.idx` alone, unchecked against the rest of the file; CorruptIndexError when unreadable."""
    path = idx_path(prefix)
    with open(path, "rb") as f:
        head = f.read(HEADER_SIZE)
    if len(head) < HEADER_SIZE:
        _fail(path, f"is {len(head)} bytes, shorter than the {HEADER_SIZE}-byte header (truncated?)")
    magic, version, code, n_seq, n_doc = _HEADER.unpack(head)
    if magic != MAGIC or version != VERSION or code not in DTYPE_CODES:
        _fail(path, "does not start with a Megatron index header (magic, version 1, a known dtype code)")
    return DTYPE_CODES[code], n_seq, n_doc


class IndexedDataset:
    """Reads `<prefix>.bin` / `<prefix>.idx`: memory-mapped (`mmap=True`) or loaded into memory.

    `ds[i]` / `ds.get(i, offset, length)` return the tokens of sequence `i` as a read-only array of
    the file's dtype. Pickling keeps only the prefix, so DataLoader workers map the files themselves.
    """

    def __init__(self, prefix: str, mmap: bool = True) -> None:
        self._open(str(prefix), mmap)

    def _open(self, prefix: str, use_mmap: bool) -> None:
        self.prefix = prefix
        self.mmap = use_mmap
        ipath, bpath = idx_path(prefix), bin_path(prefix)
        missing = [
            Problem(p, "file not found", fix=_FIX_MISSING) for p in (ipath, bpath) if not os.path.isfile(p)
        ]
        if missing:
            raise ConfigError(missing, header=f"indexed dataset {prefix!r} cannot be read")

        idx_buf = _read_buffer(ipath, use_mmap)
        if len(idx_buf) < HEADER_SIZE:
            _fail(ipath, f"is {len(idx_buf)} bytes, shorter than the {HEADER_SIZE}-byte header (truncated?)")
        magic, version, code, n_seq, n_doc = _HEADER.unpack_from(idx_buf, 0)
        if magic != MAGIC:
            _fail(ipath, f"is not a Megatron index: starts with {bytes(magic)!r}, expected {MAGIC!r}")
        if version != VERSION:
            _fail(ipath, f"has index version {version}; only version {VERSION} is known")
        if code not in DTYPE_CODES:
            _fail(ipath, f"has unknown dtype code {code}; known codes are {sorted(DTYPE_CODES)}")
        self.dtype: np.dtype = DTYPE_CODES[code]
        self._file_dtype = _little(self.dtype)

        expected = HEADER_SIZE + 4 * n_seq + 8 * n_seq + 8 * n_doc
        # Megatron's multimodal index adds one int8 mode per sequence; nothing else may follow.
        if len(idx_buf) not in (expected, expected + n_seq):
            _fail(
                ipath,
                f"is {len(idx_buf)} bytes but its header ({n_seq} sequences, {n_doc} document "
                f"boundaries) needs {expected} (truncated or corrupt)",
            )
        off = HEADER_SIZE
        self.sequence_lengths: np.ndarray = np.frombuffer(idx_buf, "<i4", n_seq, off)
        off += 4 * n_seq
        self.sequence_pointers: np.ndarray = np.frombuffer(idx_buf, "<i8", n_seq, off)
        off += 8 * n_seq
        self.document_indices: np.ndarray = np.frombuffer(idx_buf, "<i8", n_doc, off)
        problems = check_index(
            ipath,
            bpath,
            self.sequence_lengths,
            self.sequence_pointers,
            self.document_indices,
            self.dtype,
            os.path.getsize(bpath),
        )
        if problems:
            raise CorruptIndexError(problems, header=f"indexed dataset {prefix!r} is damaged")
        self._bin = _read_buffer(bpath, use_mmap)

    # ------------------------------------------------------------------ reading

    def __len__(self) -> int:
        """Number of sequences."""
        return len(self.sequence_lengths)

    @property
    def num_documents(self) -> int:
        return len(self.document_indices) - 1

    @property
    def num_tokens(self) -> int:
        return int(self.sequence_lengths.sum(dtype=np.int64))

    def get(self, idx: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens `offset : offset + length` of sequence `idx` (to its end when `length` is None)."""
        n = len(self.sequence_lengths)
        i = int(idx)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"sequence {idx} out of range for {n} sequences")
        size = int(self.sequence_lengths[i])
        if length is None:
            length = size - offset
        if offset < 0 or length < 0 or offset + length > size:
            raise IndexError(
                f"tokens [{offset}, {offset}+{length}) out of range for sequence {i} of {size} tokens"
            )
        start = int(self.sequence_pointers[i]) + offset * self.dtype.itemsize
        return np.frombuffer(self._bin, self._file_dtype, length, start)

    def __getitem__(self, idx: int | np.integer | slice) -> np.ndarray | list[np.ndarray]:
        """One sequence, or a list of them for a contiguous slice."""
        if isinstance(idx, (int, np.integer)):
            return self.get(int(idx))
        if isinstance(idx, slice):
            start, stop, step = idx.indices(len(self))
            if step != 1:
                raise ValueError("slices of an indexed dataset must be contiguous (step 1)")
            if stop <= start:
                return []
            lengths = self.sequence_lengths[start:stop]
            flat = np.frombuffer(
                self._bin,
                self._file_dtype,
                int(lengths.sum(dtype=np.int64)),
                int(self.sequence_pointers[start]),
            )
            return np.split(flat, np.cumsum(lengths[:-1], dtype=np.int64))
        raise TypeError(f"indexed dataset indices must be integers or slices, not {type(idx).__name__}")

    @staticmethod
    def exists(prefix: str) -> bool:
        """Whether both `<prefix>.idx` and `<prefix>.bin` exist."""
        return os.path.isfile(idx_path(prefix)) and os.path.isfile(bin_path(prefix))

    def __getstate__(self) -> tuple[str, bool]:
        return (self.prefix, self.mmap)

    def __setstate__(self, state: tuple[str, bool]) -> None:
        self._open(*state)

    def __repr__(self) -> str:
        return (
            f"IndexedDataset({self.prefix!r}, {len(self)} sequences, {self.num_documents} documents, "
            f"{self.dtype})"
        )


_FIX_MISSING = "check the path prefix (without .bin/.idx); build the files with `viaduct data preprocess`"


_FIX_DAMAGED = (
    "the file is damaged or was not written as a Megatron index; rebuild it (viaduct data preprocess)"
)


def _fail(path: str, message: str, fix: str | None = None) -> None:
    raise CorruptIndexError(Problem(path, message, fix=fix or _FIX_DAMAGED))


def check_index(
    ipath: str,
    bpath: str,
    lengths: np.ndarray,
    pointers: np.ndarray,
    document_indices: np.ndarray,
    dtype: np.dtype,
    bin_size: int,
) -> list[Problem]:
    """Everything wrong with an index's arrays (empty when they are consistent), checked in blocks.

    Megatron writes each pointer as the running sum of the previous lengths times the item size;
    requiring exactly that (with every length >= 0 and the `.bin` exactly as long as the last
    sequence's end) rules out overlaps, gaps and bytes beyond the `.bin` in one pass.
    Document indices must rise (equal neighbours are documents without sequences) from 0 to the
    sequence count, or documents would silently gain, lose or repeat sequences.
    """
    problems: list[Problem] = []
    n, itemsize = len(lengths), dtype.itemsize
    negative = _first_where(lengths, lambda block: block < 0)
    if negative is not None:
        problems.append(
            Problem(
                ipath,
                f"gives sequence {negative} the negative length {int(lengths[negative])}",
                fix=_FIX_DAMAGED,
            )
        )
    else:
        bad = _first_bad_pointer(lengths, pointers, itemsize)
        if bad is not None:
            got = int(pointers[bad])
            want = 0 if bad == 0 else int(pointers[bad - 1]) + int(lengths[bad - 1]) * itemsize
            if got >= bin_size:
                where = f"beyond the {bin_size}-byte {os.path.basename(bpath)}"
            else:
                where = "before the end of the previous sequence" if got < want else "after a gap"
            problems.append(
                Problem(
                    ipath,
                    f"points sequence {bad} at byte {got}, {where}; it must start at byte {want}, "
                    "where the sequences before it end (pointers overlap, skip or are out of order)",
                    fix=_FIX_DAMAGED,
                )
            )
        else:
            # Pointers are the running sum from 0, so the last sequence's end is the data's size.
            end = int(pointers[-1]) + int(lengths[-1]) * itemsize if n else 0
            if bin_size != end:
                problems.append(
                    Problem(
                        bpath,
                        f"is {bin_size} bytes but its index says {end} ({n} sequences of {dtype})"
                        + (" (truncated?)" if bin_size < end else ""),
                        fix="the .bin and .idx files do not belong together; rebuild "
                        + bpath.removesuffix(".bin"),
                    )
                )
    d = document_indices
    if len(d) == 0 or d[0] != 0 or d[-1] != n:
        first_last = (int(d[0]), int(d[-1])) if len(d) else "none"
        problems.append(
            Problem(
                ipath,
                f"has document indices {first_last} (first, last); they must start at 0 and end at "
                f"the sequence count {n}",
                fix=_FIX_DAMAGED,
            )
        )
    # Compared with overlapping blocks, so the step across a block boundary is checked too.
    falls = _first_where(d, lambda block: block[1:] < block[:-1], overlap=1)
    if falls is not None:
        problems.append(
            Problem(
                ipath,
                f"has document index {falls + 1} = {int(d[falls + 1])} below index {falls} = "
                f"{int(d[falls])}; document indices must never decrease",
                fix=_FIX_DAMAGED,
            )
        )
    return problems


def _first_bad_pointer(lengths: np.ndarray, pointers: np.ndarray, itemsize: int) -> int | None:
    """The first sequence whose pointer is not where the previous one ends (the first at 0), or None.

    Compares each step between neighbouring pointers with the previous length in bytes, into
    buffers reused block after block: about half the time of a running sum, and no allocation.
    """
    n = len(pointers)
    if n == 0:
        return None
    if pointers[0] != 0:
        return 0
    step = np.empty(min(n, _CHECK_BLOCK), dtype=np.int64)
    want = np.empty_like(step)
    same = np.empty(step.shape, dtype=np.bool_)
    for a in range(0, n - 1, _CHECK_BLOCK):
        m = min(_CHECK_BLOCK, n - 1 - a)
        block = pointers[a : a + m + 1]
        np.subtract(block[1:], block[:-1], out=step[:m])
        np.multiply(lengths[a : a + m], itemsize, out=want[:m], dtype=np.int64)
        np.equal(step[:m], want[:m], out=same[:m])
        if not same[:m].all():
            return a + 1 + int(np.argmin(same[:m]))
    return None


def _first_where(array: np.ndarray, test: Callable[[np.ndarray], np.ndarray], overlap: int = 0) -> int | None:
    """The first position where the boolean `test` of a block is true (blocks of _CHECK_BLOCK entries,
    each extended by `overlap`), or None."""
    for a in range(0, max(len(array) - overlap, 0), _CHECK_BLOCK):
        hit = test(array[a : a + _CHECK_BLOCK + overlap])
        if hit.any():
            return a + int(np.argmax(hit))
    return None


def _read_buffer(path: str, use_mmap: bool) -> memoryview | bytes:
    """A read-only buffer of the whole file: a memory map, or its bytes."""
    with open(path, "rb") as f:
        if not use_mmap:
            return f.read()
        if os.fstat(f.fileno()).st_size == 0:
            return b""  # an empty file cannot be mapped
        # The map stays valid after the file is closed.
        return memoryview(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ))


__all__ = [
    "DTYPE_CODES",
    "CorruptIndexError",
    "IndexedDataset",
    "IndexedDatasetWriter",
    "bin_path",
    "idx_path",
    "read_header",
    "token_dtype",
]
