"""Synthetic GPT samples that a model can actually learn, deterministic and random-access.

Each sample is a window into its own packed token stream: documents of pseudo-random length are
laid back to back, each ending with the tokenizer's eod. Inside a document the tokens count up
(a random start, then +1 per token, modulo the non-special part of the vocabulary), so "next token
= this token + 1" is a pattern a model learns within a few hundred steps: the loss falls, which is
what a smoke test of the training loop needs to see. Only the first token of each document is
unpredictable.

Sample `i` of split `s` depends on (config.random_seed, s, i) alone: no index is precomputed, so
`num_samples` can be 10**9, any sample costs O(seq_length) numpy work, and two constructions (or
two data-loader workers) agree exactly. Samples are independent of each other, so neighbouring
indices do not share documents.

The sample dict is the batch a GPT step reads (Megatron's GPTDataset layout): tokens, labels,
loss_mask, position_ids, and attention_mask only with `reset_attention_mask` (otherwise the
attention kernel applies the causal mask itself, far faster than a materialised [S, S] mask).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.utils.data import Dataset

if TYPE_CHECKING:
    from viaduct.data.tokenizers import Tokenizer
    from viaduct.training.config.dataset import GPTDatasetConfig

# Split name -> stream id mixed into the seed, so the splits never share samples.
SPLIT_IDS = {"train": 0, "validation": 1, "valid": 1, "test": 2}


class MockGPTDataset(Dataset[dict[str, torch.Tensor]]):
    """`num_samples` synthetic samples of `seq_length` tokens for one split (see module docstring)."""

    def __init__(
        self,
        num_samples: int,
        seq_length: int,
        tokenizer: Tokenizer,
        config: GPTDatasetConfig,
        split: str,
        *,
        max_document_length: int | None = None,
    ) -> None:
        """`max_document_length`: longest document content (eod excluded); None means seq_length,
        so a window holds about two documents on average and always exercises the eod handling.
        """
        if num_samples < 0:
            raise ValueError(f"num_samples must be >= 0, got {num_samples}")
        if seq_length < 1:
            raise ValueError(f"seq_length must be > 0, got {seq_length}")
        if split not in SPLIT_IDS:
            raise ValueError(f"unknown split {split!r}; expected one of {sorted(SPLIT_IDS)}")
        self.num_samples = int(num_samples)
        self.seq_length = int(seq_length)
        self.split = split
        self.seed = int(config.random_seed)
        self.eod = int(tokenizer.eod)
        self.max_document_length = max(1, int(max_document_length or seq_length))
        self.add_extra_token = bool(config.add_extra_token_to_sequence)
        self.eod_mask_loss = bool(config.eod_mask_loss)
        self.reset_position_ids = bool(config.reset_position_ids)
        self.reset_attention_mask = bool(config.reset_attention_mask)
        self._split_id = SPLIT_IDS[split]

        # Document tokens count through the ordinary (non-special) ids only, so a special id never
        # appears inside a document. When the specials sit at the top of the vocabulary (byte-level,
        # null with the default eod) the n-th ordinary id is n itself and no table is needed.
        vocab = int(tokenizer.vocab_size)
        extra = getattr(tokenizer, "additional_special_tokens_ids", None) or []
        specials = {int(t) for t in (tokenizer.eod, tokenizer.pad, tokenizer.bos, *extra) if t is not None}
        specials = {t for t in specials if 0 <= t < vocab}
        self.num_ordinary = vocab - len(specials)
        if self.num_ordinary < 1:
            raise ValueError(f"no ordinary token ids (vocab_size {vocab}, special ids {sorted(specials)})")
        self._ordinary: np.ndarray | None = None
        if any(t < self.num_ordinary for t in specials):
            self._ordinary = np.setdiff1d(np.arange(vocab, dtype=np.int64), np.fromiter(specials, np.int64))

    def __len__(self) -> int:
        return self.num_samples

    def window(self, idx: int) -> np.ndarray:
        """The raw int64 tokens of sample `idx`: seq_length (+1 with add_extra_token_to_sequence)."""
        width = self.seq_length + int(self.add_extra_token)
        rng = np.random.default_rng((self.seed, self._split_id, idx))
        longest = self.max_document_length
        # Document sizes including their eod, drawn in chunks until the stream covers the window.
        # The chunk is sized so that one draw nearly always suffices (mean size is longest/2 + 1.5).
        chunk = 2 + (2 * width) // (longest + 3)
        sizes = rng.integers(2, longest + 2, size=chunk)
        offset = int(rng.integers(0, sizes[0]))  # the window starts inside the first document
        while sizes.sum() - offset < width:
            sizes = np.concatenate([sizes, rng.integers(2, longest + 2, size=chunk)])
        first = rng.integers(0, self.num_ordinary, size=sizes.size)  # each document's first count

        ends = np.cumsum(sizes)  # exclusive end of each document in stream coordinates
        pos = offset + np.arange(width)
        doc = np.searchsorted(ends, pos, side="right")
        within = pos - (ends[doc] - sizes[doc])  # position inside its document
        tokens = (first[doc] + within) % self.num_ordinary
        if self._ordinary is not None:
            tokens = self._ordinary[tokens]
        tokens[within == sizes[doc] - 1] = self.eod  # the last position of every document
        return tokens.astype(np.int64, copy=False)

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        idx = int(idx)
        if not 0 <= idx < self.num_samples:
            raise IndexError(f"sample {idx} out of range for {self.num_samples} samples")
        text = self.window(idx)
        s = self.seq_length
        if self.add_extra_token:
            tokens, labels = text[:-1], text[1:]
        else:
            # Megatron: the last label is unknown, so it is padding (id 0) and carries no loss.
            tokens, labels = text, np.append(text[1:], 0)

        loss_mask = np.ones(s, dtype=np.float32)
        is_eod = tokens == self.eod
        if self.eod_mask_loss:
            loss_mask[is_eod] = 0.0  # Megatron masks where the *input* is eod
        if not self.add_extra_token:
            loss_mask[-1] = 0.0

        positions = np.arange(s, dtype=np.int64)
        out = {
            "tokens": torch.from_numpy(np.ascontiguousarray(tokens)),
            "labels": torch.from_numpy(np.ascontiguousarray(labels)),
            "loss_mask": torch.from_numpy(loss_mask),
        }
        if self.reset_position_ids:
            # Each position minus the start of its document; a document starts after each eod.
            starts_here = np.concatenate(([True], is_eod[:-1]))
            doc_start = np.maximum.accumulate(np.where(starts_here, positions, 0))
            out["position_ids"] = torch.from_numpy(positions - doc_start)
        else:
            out["position_ids"] = torch.from_numpy(positions)
        if self.reset_attention_mask:
            out["attention_mask"] = _document_causal_mask(is_eod)
        return out

    def __repr__(self) -> str:
        return (
            f"MockGPTDataset(split={self.split!r}, num_samples={self.num_samples}, "
            f"seq_length={self.seq_length}, seed={self.seed})"
        )


def _document_causal_mask(is_eod: np.ndarray) -> torch.Tensor:
    """[1, S, S] bool, True = masked out: causal, and no attention across document boundaries.

    An eod belongs to the document it ends, so document ids count the eods strictly before each
    position (Megatron's `attention_mask[0, i+1:, :i+1] = 0` for each eod at i).
    """
    doc = torch.from_numpy(np.concatenate(([0], np.cumsum(is_eod[:-1]))))  # [S]
    s = doc.numel()
    visible = torch.ones(s, s, dtype=torch.bool).tril_() & (doc[:, None] == doc[None, :])  # [S(q), S(k)]
    return (~visible).unsqueeze(0)
