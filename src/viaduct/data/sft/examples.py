"""From rendered records to token ids with an answer mask: tokenizing, special tokens, truncation.

Each piece of a record is tokenized on its own (as Megatron Bridge's GPTSFTDataset does), so a
token never straddles the prompt and the answer and the answer mask is exact. Then, per
`SFTOptions`: bos in front (`add_bos`), a separator between prompt and answer (`add_sep`, the eod
id), eod after the answer (`add_eos`); these three apply to input/output records only, a chat
template writes its own special tokens.

An example longer than `max_tokens` (seq_length + 1: inputs and labels are the ids shifted by one)
is truncated as Bridge does: the excess is cut from the `truncation_field` pieces, shared evenly
(`truncation_method` "right" cuts their end, "left" their start); what is still too long (or all of
a chat record's excess) is cut from the end. An example left with no answer token to learn is
dropped and counted: the caller warns with the count.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from viaduct.data.sft.records import Record
from viaduct.training.config.finetuning import SFTOptions

TOKENIZE_CHUNK = 1024
"""Records tokenized per batch call (and per worker task)."""


@dataclass
class Example:
    """Token ids of one example and which of them are answer (loss) tokens."""

    ids: np.ndarray
    """int64 [L]."""
    answer: np.ndarray
    """bool [L]: True where the token is part of the answer."""

    def __len__(self) -> int:
        return int(self.ids.size)


@dataclass
class BuildStats:
    """What building the examples of one file dropped or cut, for the warning."""

    records: int = 0
    truncated: int = 0
    dropped: list[str] = field(default_factory=list)
    """`file:line` of each record dropped because no answer token survived truncation."""


class TokenizerLike(Protocol):
    """What examples need of a tokenizer (part of the viaduct Tokenizer protocol)."""

    eod: int
    bos: int | None

    def tokenize(self, text: str) -> list[int]: ...


def tokenize_texts(tokenizer: TokenizerLike, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text, in one `tokenize_batch` call where the tokenizer offers it."""
    batch: Callable[[Sequence[str]], list[list[int]]] | None = getattr(tokenizer, "tokenize_batch", None)
    if batch is not None:
        return [list(ids) for ids in batch(list(texts))]
    return [list(tokenizer.tokenize(t)) for t in texts]


def build_examples(
    records: Sequence[Record],
    tokenizer: TokenizerLike,
    options: SFTOptions,
    max_tokens: int,
    *,
    workers: int = 1,
    progress: str | None = None,
) -> tuple[list[Example], BuildStats]:
    """Examples of `records` (same order, dropped ones left out) and what was cut or dropped.

    `workers` threads tokenize chunks of records at once (the native tokenizers release the GIL);
    `progress` shows a tqdm bar with that description on long inputs (pass None off rank 0).
    """
    chunks = [records[i : i + TOKENIZE_CHUNK] for i in range(0, len(records), TOKENIZE_CHUNK)]

    def tokenize_chunk(chunk: Sequence[Record]) -> list[list[list[int]]]:
        flat = tokenize_texts(tokenizer, [p.text for r in chunk for p in r.pieces])
        out, at = [], 0
        for r in chunk:
            out.append(flat[at : at + len(r.pieces)])
            at += len(r.pieces)
        return out

    bar = None
    if progress is not None and len(chunks) > 4:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(records), desc=progress, unit="rec", leave=False)
    stats = BuildStats(records=len(records))
    examples: list[Example] = []
    pool = concurrent.futures.ThreadPoolExecutor(max(1, workers)) if workers > 1 and len(chunks) > 1 else None
    try:
        results = pool.map(tokenize_chunk, chunks) if pool is not None else map(tokenize_chunk, chunks)
        for chunk, token_lists in zip(chunks, results):
            for record, piece_ids in zip(chunk, token_lists):
                ex = make_example(record, piece_ids, tokenizer, options, max_tokens, stats)
                if ex is not None:
                    examples.append(ex)
            if bar is not None:
                bar.update(len(chunk))
    finally:
        if pool is not None:
            pool.shutdown()
        if bar is not None:
            bar.close()
    return examples, stats


def make_example(
    record: Record,
    piece_ids: Sequence[Sequence[int]],
    tokenizer: TokenizerLike,
    options: SFTOptions,
    max_tokens: int,
    stats: BuildStats,
) -> Example | None:
    """One example from a record's tokenized pieces (see module docstring); None when dropped."""
    # Segments: (ids, answer, field). Special tokens are segments without a field: never truncated.
    segs: list[tuple[list[int], bool, str | None]] = []
    if not record.chat and options.add_bos and tokenizer.bos is not None:
        segs.append(([int(tokenizer.bos)], False, None))
    sep_done = False
    for piece, ids in zip(record.pieces, piece_ids):
        if not record.chat and options.add_sep and piece.answer and not sep_done:
            segs.append(([int(tokenizer.eod)], False, None))
            sep_done = True
        segs.append(([int(i) for i in ids], piece.answer, piece.field))
    if not record.chat and options.add_eos:
        segs.append(([int(tokenizer.eod)], True, None))

    total = sum(len(s[0]) for s in segs)
    if total > max_tokens:
        stats.truncated += 1
        excess = total - max_tokens
        if not record.chat:
            excess = _cut_fields(segs, options, excess)
        if excess > 0:  # still too long: cut the end
            keep = max_tokens
            out: list[tuple[list[int], bool, str | None]] = []
            for ids, answer, name in segs:
                out.append((ids[:keep], answer, name))
                keep = max(0, keep - len(ids))
            segs = out
    flat = np.fromiter((i for s in segs for i in s[0]), dtype=np.int64)
    mask = np.fromiter((s[1] for s in segs for _ in s[0]), dtype=np.bool_, count=flat.size)
    learn = mask[1:] if options.answer_only_loss else np.ones(max(0, flat.size - 1), dtype=np.bool_)
    if flat.size < 2 or not mask.any() or not learn.any():
        stats.dropped.append(record.where)
        return None
    return Example(flat, mask)


def _cut_fields(segs: list[tuple[list[int], bool, str | None]], options: SFTOptions, excess: int) -> int:
    """Cut `excess` tokens from the truncation-field segments in place, shared evenly; returns what
    could not be cut there."""
    fields = options.truncation_fields
    idx = [i for i, s in enumerate(segs) if s[2] in fields]
    if not idx:
        return excess
    left = options.truncation_method == "left"
    # Shares as Bridge computes them: excess // n each, the first `excess % n` fields one more; a
    # field too short for its share gives what it has and the rest moves on to the next fields.
    n = len(idx)
    shares = [excess // n + (1 if k < excess % n else 0) for k in range(n)]
    carry = 0
    for k, i in enumerate(idx):
        ids, answer, name = segs[i]
        want = shares[k] + carry
        cut = min(want, len(ids))
        carry = want - cut
        segs[i] = (ids[cut:] if left else ids[: len(ids) - cut], answer, name)
    return carry
