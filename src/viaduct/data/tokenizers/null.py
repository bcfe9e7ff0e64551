"""Megatron's NullTokenizer: the "text" is already token ids, written as whitespace-separated integers.

Used with synthetic data, where only the vocabulary size and the end-of-document id matter.
"""

from __future__ import annotations

from collections.abc import Sequence


class NullTokenizer:
    """Token ids in, token ids out; `vocab_size` given, eod defaults to the last id, no bos."""

    name = "NullTokenizer"

    def __init__(self, vocab_size: int, eod_id: int | None = None, pad_id: int = -1) -> None:
        if vocab_size < 1:
            raise ValueError(f"vocab_size must be > 0, got {vocab_size}")
        eod = vocab_size - 1 if eod_id is None else eod_id
        if not 0 <= eod < vocab_size:
            raise ValueError(f"eod id {eod} is outside the vocabulary [0, {vocab_size})")
        if pad_id != -1 and not 0 <= pad_id < vocab_size:
            raise ValueError(f"pad id {pad_id} is outside the vocabulary [0, {vocab_size}) (-1 means none)")
        self.vocab_size: int = vocab_size
        self.eod: int = eod
        self.eos: int = eod
        self.unk: int | None = None
        self.additional_special_tokens_ids: list[int] = []
        self.pad: int | None = None if pad_id == -1 else pad_id
        self.bos: int | None = None

    def tokenize(self, text: str) -> list[int]:
        """ "3 1 4" -> [3, 1, 4]; every id must lie in the vocabulary."""
        ids: list[int] = []
        for word in text.split():
            try:
                i = int(word)
            except ValueError:
                raise ValueError(f"NullTokenizer reads whitespace-separated integers, got {word!r}") from None
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"token id {i} is outside the vocabulary [0, {self.vocab_size})")
            ids.append(i)
        return ids

    def tokenize_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """`tokenize` of each text."""
        return [self.tokenize(t) for t in texts]

    def detokenize(self, ids: Sequence[int]) -> str:
        """[3, 1, 4] -> "3 1 4" (special ids included, as in Megatron)."""
        return " ".join(str(int(i)) for i in ids)

    def __repr__(self) -> str:
        return f"NullTokenizer(vocab_size={self.vocab_size}, eod={self.eod}, pad={self.pad})"
