"""A byte-level tokenizer: UTF-8 bytes are the tokens, so any text round-trips with nothing to download.

Ids 0..255 are the bytes; then come the special ids eod (256), pad (257) and bos (258), then the
`vocab_extra_ids` sentinels (T5 span masking) if any. The embedded default recipe trains on it.
"""

from __future__ import annotations

from collections.abc import Sequence

NUM_BYTES = 256


class ByteLevelTokenizer:
    """UTF-8 bytes as token ids 0..255, plus eod, pad, bos and optional sentinel ids after them."""

    name = "ByteLevelTokenizer"

    def __init__(self, vocab_extra_ids: int = 0) -> None:
        if vocab_extra_ids < 0:
            raise ValueError(f"vocab_extra_ids must be >= 0, got {vocab_extra_ids}")
        self.eod: int = NUM_BYTES
        self.eos: int = NUM_BYTES
        self.unk: int | None = None  # every text is bytes: nothing is unknown
        self.pad: int | None = NUM_BYTES + 1
        self.bos: int | None = NUM_BYTES + 2
        first_extra = NUM_BYTES + 3
        extra = range(first_extra, first_extra + vocab_extra_ids)
        self.additional_special_tokens_ids: list[int] = list(extra)
        self.vocab_size: int = first_extra + vocab_extra_ids

    def tokenize(self, text: str) -> list[int]:
        """The UTF-8 bytes of `text` (no special ids are added)."""
        return list(text.encode("utf-8"))

    def tokenize_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """`tokenize` of each text."""
        return [list(t.encode("utf-8")) for t in texts]

    def detokenize(self, ids: Sequence[int]) -> str:
        """Text of the byte ids; special ids are dropped, invalid UTF-8 becomes U+FFFD."""
        out = bytearray()
        for raw in ids:
            i = int(raw)  # accepts numpy and torch integers too
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"token id {i} is outside the vocabulary [0, {self.vocab_size})")
            if i < NUM_BYTES:
                out.append(i)
        return out.decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return f"ByteLevelTokenizer(vocab_size={self.vocab_size})"
