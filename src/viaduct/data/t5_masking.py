"""T5 span corruption of one sample: which spans to mask (Megatron's n-gram rules) and the sample dict.

Facts from Megatron Core's `masked_dataset.py` (`_create_masked_lm_predictions`) and `t5_dataset.py`;
the code is ours. For a sample of `len(tokens)` tokens and a target length T:

- every token that is not a special id (eod, eos, bos, pad, a sentinel) is a masking candidate
  (whole-word masking is not built: every token is its own candidate);
- at most `min(p·T, max(1, round(len·p)))` tokens are masked (p = masking_probability);
- the candidates are visited in a random order; at each, a span length n is drawn: from a geometric
  distribution with p=0.2 clipped at masking_max_ngram (SpanBERT), or with probability ∝ 1/n
  (reversed with masking_use_longer_ngrams); when the span would mask too many tokens, n - 1 is
  tried, down to 1; a span overlapping a masked token is skipped;
- with masking_do_permutation, a further set of unmasked n-grams is chosen the same way and their
  tokens shuffled among themselves (they stay in the encoder input, shuffled).

Two deliberate differences: a span never crosses a special token (Megatron's spans may jump over
one, which then vanishes from both the encoder input and the target), and a span is only taken
while the decoder still has room for it (Megatron fails with an assertion instead). The permutation
draws its n-gram lengths from the sample's own generator (Megatron uses numpy's global one, so its
samples are not reproducible there).

Each masked span becomes one sentinel (in order from the tokenizer's additional special tokens) in
the encoder input; the decoder target is `sentinel_0 span_0 sentinel_1 span_1 ... eos` and the
decoder input is `bos` followed by the target without its last token.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from viaduct.config import ConfigError, Problem
from viaduct.training.config.t5_dataset import GEOMETRIC_P

if TYPE_CHECKING:
    from viaduct.data.tokenizers import Tokenizer
    from viaduct.training.config.t5_dataset import T5DatasetConfig

DEFAULT_DECODER_LENGTH = 128
"""Decoder length when neither the dataset nor the model names one (Megatron's --decoder-seq-length)."""


@dataclass(frozen=True)
class MaskingSettings:
    """The masking fields of a T5DatasetConfig, as one sample's masking needs them."""

    probability: float = 0.15
    max_ngram: int = 10
    do_permutation: bool = False
    use_longer_ngrams: bool = False
    use_geometric_distribution: bool = True

    @classmethod
    def of(cls, config: T5DatasetConfig) -> MaskingSettings:
        if config.masking_do_full_word:  # checked by validation too; never ignored silently here
            raise ConfigError(
                Problem(
                    "dataset.masking_do_full_word",
                    "whole-word masking is not supported yet (viaduct's tokenizers do not mark word pieces)",
                    True,
                    fix="leave dataset.masking_do_full_word at False",
                )
            )
        return cls(
            probability=float(config.masking_probability),
            max_ngram=int(config.masking_max_ngram),
            do_permutation=bool(config.masking_do_permutation),
            use_longer_ngrams=bool(config.masking_use_longer_ngrams),
            use_geometric_distribution=bool(config.masking_use_geometric_distribution),
        )

    def ngram_probabilities(self) -> np.ndarray:
        """P(n) for n = 1..max_ngram without the geometric distribution: ∝ 1/n (reversed for longer)."""
        p = 1.0 / np.arange(1, self.max_ngram + 1, dtype=np.float64)
        p /= p.sum()
        return p[::-1].copy() if self.use_longer_ngrams else p


@dataclass(frozen=True)
class SpecialTokens:
    """The ids a T5 sample is built with, taken from the tokenizer once."""

    bos: int
    eos: int
    pad: int
    sentinels: tuple[int, ...]
    excluded: frozenset[int]
    """Ids never masked: the tokenizer's special ids."""

    @classmethod
    def of(cls, tokenizer: Tokenizer, spans_needed: int) -> SpecialTokens:
        """The tokenizer's ids; ConfigError naming tokenizer.vocab_extra_ids when it has fewer than
        `spans_needed` sentinels, or naming the tokenizer when it has no bos."""
        problems = []
        sentinels = tuple(int(t) for t in (getattr(tokenizer, "additional_special_tokens_ids", None) or []))
        if len(sentinels) < spans_needed:
            problems.append(
                Problem(
                    "tokenizer.vocab_extra_ids",
                    f"gives {len(sentinels)} sentinel tokens, but a T5 sample can mask up to {spans_needed} "
                    "spans and each span is replaced by its own sentinel",
                    len(sentinels),
                    fix=f"set tokenizer.vocab_extra_ids to {spans_needed} or more (T5 uses 100), or shorten "
                    "dataset.sequence_length_decoder / lower dataset.masking_probability",
                )
            )
        bos = tokenizer.bos
        if bos is None:
            problems.append(
                Problem(
                    "tokenizer",
                    f"{type(tokenizer).__name__} has no bos token; the T5 decoder input starts with one",
                    fix="use a tokenizer with a bos token (e.g. ByteLevelTokenizer, or a SentencePiece / "
                    "Hugging Face tokenizer that defines one)",
                )
            )
        if bos is None or problems:
            raise ConfigError(problems, header="the T5 dataset cannot be built with this tokenizer")
        eos = getattr(tokenizer, "eos", None)
        eos = int(tokenizer.eod if eos is None else eos)
        # Without a pad id, padding uses id 0: every padded position is marked by the masks and
        # carries no loss, so its id never matters.
        pad = 0 if tokenizer.pad is None else int(tokenizer.pad)
        specials = {int(bos), eos, int(tokenizer.eod), *sentinels}
        if tokenizer.pad is not None:
            specials.add(pad)
        return cls(int(bos), eos, pad, sentinels, frozenset(specials))


def max_spans(encoder_length: int, decoder_length: int, probability: float) -> int:
    """Most spans one sample can mask: at most p·(encoder_length - 2) tokens are masked, one span
    each at worst, and the decoder holds bos plus a sentinel and at least one token per span."""
    return max(0, min(int(probability * (encoder_length - 2)), (decoder_length - 1) // 2))


def max_target_length(encoder_length: int) -> int:
    """Longest raw token run of a sample: the encoder length less 2 (Megatron keeps room for bos/eos)."""
    return encoder_length - 2


def short_target_length(draw: int, max_length: int, short_ratio: int) -> int:
    """Megatron's target length from one uint32 draw: with probability 1/short_ratio a length in
    [2, max_length], else max_length (short_ratio 0: always max_length)."""
    if short_ratio == 0 or max_length < 2 or draw % short_ratio != 0:
        return max_length
    return 2 + draw % (max_length - 1)


def short_ratio(short_sequence_probability: float) -> int:
    """1 / probability rounded, as Megatron turns the probability into a ratio (0: never short)."""
    return round(1.0 / short_sequence_probability) if short_sequence_probability > 0 else 0


def choose_spans(
    tokens: np.ndarray,
    target_length: int,
    rng: np.random.RandomState,
    settings: MaskingSettings,
    excluded: frozenset[int] = frozenset(),
    *,
    span_limit: int | None = None,
    decoder_length: int | None = None,
) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """(encoder tokens, masked spans): the spans as sorted [start, end) positions of `tokens`; the
    tokens are `tokens` itself unless masking_do_permutation shuffled some unmasked n-grams.

    `span_limit` caps the number of spans (the sentinels available); `decoder_length` keeps the
    decoder input (bos, then a sentinel and the tokens of each span) within that length.
    """
    n = int(tokens.shape[0])
    is_candidate = np.ones(n, dtype=np.bool_)
    if excluded and n:
        is_candidate = ~np.isin(tokens, np.fromiter(excluded, np.int64))
    candidates = np.flatnonzero(is_candidate)
    # run[i]: how many candidates follow position i without a gap (itself included), so an n-gram
    # from candidate c covers [c, c + min(n, run[c])) and never crosses a special token.
    run = np.zeros(n + 1, dtype=np.int64)
    for i in range(n - 1, -1, -1):
        if is_candidate[i]:
            run[i] = run[i + 1] + 1
    n_maskings = min(settings.probability * target_length, max(1, round(n * settings.probability)))
    order = np.arange(candidates.size)
    rng.shuffle(order)
    nvals = np.arange(1, settings.max_ngram + 1, dtype=np.int64)
    nprobs = settings.ngram_probabilities()
    masked = np.zeros(n, dtype=np.bool_)
    count = 0
    spans: list[tuple[int, int]] = []
    for k in order:
        if count >= n_maskings:
            break
        if span_limit is not None and len(spans) >= span_limit:
            break
        start = int(candidates[k])
        if settings.use_geometric_distribution:
            size = min(int(rng.geometric(GEOMETRIC_P)), settings.max_ngram)
        else:
            size = int(rng.choice(nvals, p=nprobs))
        # Shrink the n-gram until it fits the masking budget (and the decoder), down to 1 token.
        while size > 0:
            width = min(size, int(run[start]))
            fits = count + width <= n_maskings
            if decoder_length is not None:
                # bos + (sentinel + tokens) per span, this one included
                fits = fits and 1 + count + width + len(spans) + 1 <= decoder_length
            if fits:
                break
            size -= 1
        if size == 0 or masked[start : start + width].any():
            continue
        masked[start : start + width] = True
        count += width
        spans.append((start, start + width))
    spans.sort()
    if settings.do_permutation:
        tokens = _permute(tokens, candidates, run, masked, n_maskings, rng, settings)
    return tokens, spans


def _permute(
    tokens: np.ndarray,
    candidates: np.ndarray,
    run: np.ndarray,
    masked: np.ndarray,
    budget: float,
    rng: np.random.RandomState,
    settings: MaskingSettings,
) -> np.ndarray:
    """Megatron's permutation: unmasked n-grams (up to `budget` tokens) whose tokens are shuffled."""
    order = np.arange(candidates.size)
    rng.shuffle(order)
    nvals = np.arange(1, settings.max_ngram + 1, dtype=np.int64)
    nprobs = settings.ngram_probabilities()
    chosen = np.zeros_like(masked)
    count = 0
    for k in order:
        if count >= budget:
            break
        start = int(candidates[k])
        size = int(rng.choice(nvals, p=nprobs))
        while size > 0:
            width = min(size, int(run[start]))
            if count + width <= budget:
                break
            size -= 1
        if size == 0 or (masked[start : start + width] | chosen[start : start + width]).any():
            continue
        chosen[start : start + width] = True
        count += width
    positions = np.flatnonzero(chosen)
    out = np.array(tokens, dtype=np.int64)
    out[positions] = out[rng.permutation(positions)]
    return out


def t5_sample(
    tokens: np.ndarray,
    spans: Sequence[tuple[int, int]],
    special: SpecialTokens,
    encoder_length: int,
    decoder_length: int,
    truncated: bool = False,
) -> dict[str, torch.Tensor]:
    """The sample dict of `tokens` with `spans` masked (see the module docstring and docs/data.md).

    text_enc / enc_mask / enc_dec_mask: [encoder_length]; text_dec / labels / loss_mask / dec_mask:
    [decoder_length]. The masks are True at real tokens and False at padding.
    """
    if len(spans) > len(special.sentinels):
        raise ConfigError(
            Problem(
                "tokenizer.vocab_extra_ids",
                f"gives {len(special.sentinels)} sentinel tokens; this sample masks {len(spans)} spans",
                len(special.sentinels),
                fix=f"set tokenizer.vocab_extra_ids to {len(spans)} or more (T5 uses 100)",
            )
        )
    enc: list[np.ndarray] = []
    target: list[np.ndarray] = []
    begin = 0
    for (start, end), sentinel in zip(spans, special.sentinels):
        mark = np.array([sentinel], dtype=np.int64)
        enc += [tokens[begin:start], mark]
        target += [mark, tokens[start:end]]
        begin = end
    enc.append(tokens[begin:])
    target.append(np.array([special.eos], dtype=np.int64))
    encoder = np.concatenate(enc).astype(np.int64, copy=False)
    labels = np.concatenate(target).astype(np.int64, copy=False)
    n_enc, n_dec = int(encoder.size), int(labels.size)
    if n_enc > encoder_length or n_dec > decoder_length:
        raise ValueError(
            f"a T5 sample of {n_enc} encoder / {n_dec} decoder tokens does not fit "
            f"{encoder_length} / {decoder_length}"
        )
    text_enc = np.full(encoder_length, special.pad, dtype=np.int64)
    text_enc[:n_enc] = encoder
    text_dec = np.full(decoder_length, special.pad, dtype=np.int64)
    text_dec[0] = special.bos
    text_dec[1:n_dec] = labels[:-1]
    # Megatron's value at padded positions (they carry no loss; the model ignores negative labels).
    padded_labels = np.full(decoder_length, -1, dtype=np.int64)
    padded_labels[:n_dec] = labels
    enc_mask = np.arange(encoder_length) < n_enc
    dec_mask = np.arange(decoder_length) < n_dec
    return {
        "text_enc": torch.from_numpy(text_enc),
        "text_dec": torch.from_numpy(text_dec),
        "labels": torch.from_numpy(padded_labels),
        "loss_mask": torch.from_numpy(dec_mask.astype(np.float32)),
        "enc_mask": torch.from_numpy(enc_mask),
        "dec_mask": torch.from_numpy(dec_mask),
        "enc_dec_mask": torch.from_numpy(enc_mask.copy()),
        "truncated": torch.tensor(int(truncated), dtype=torch.int64),
    }


def corrupt(
    tokens: np.ndarray,
    target_length: int,
    rng: np.random.RandomState,
    settings: MaskingSettings,
    special: SpecialTokens,
    encoder_length: int,
    decoder_length: int,
) -> dict[str, torch.Tensor]:
    """The sample dict of a raw token run: truncated to target_length, spans chosen, then built."""
    truncated = int(tokens.shape[0]) > target_length
    tokens = np.asarray(tokens[:target_length], dtype=np.int64)
    tokens, spans = choose_spans(
        tokens,
        target_length,
        rng,
        settings,
        special.excluded,
        span_limit=len(special.sentinels),
        decoder_length=decoder_length,
    )
    return t5_sample(tokens, spans, special, encoder_length, decoder_length, truncated)


__all__ = [
    "DEFAULT_DECODER_LENGTH",
    "MaskingSettings",
    "SpecialTokens",
    "choose_spans",
    "corrupt",
    "max_spans",
    "max_target_length",
    "short_ratio",
    "short_target_length",
    "t5_sample",
]
