"""Tokenizers behind one small surface, built from `TokenizerConfig` by `build_tokenizer(cfg)`.

Every tokenizer has `vocab_size`, `eod` (end-of-document id), `pad` and `bos` (None when it has none),
`tokenize(text) -> ids` and `detokenize(ids) -> text`. Built now: `ByteLevelTokenizer` and Megatron's
`NullTokenizer`. The Hugging Face, SentencePiece, GPT-2 BPE and TikToken tokenizers slot in later as
entries of `_BUILDERS`; until then asking for them is a `ConfigError`, never a silent fallback.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from viaduct.config import ConfigError, Problems
from viaduct.data.tokenizers.byte_level import ByteLevelTokenizer
from viaduct.data.tokenizers.null import NullTokenizer

if TYPE_CHECKING:
    from viaduct.training.config.tokenizer import TokenizerConfig


@runtime_checkable
class Tokenizer(Protocol):
    """The uniform tokenizer surface the data pipeline and the loop rely on."""

    vocab_size: int
    eod: int
    pad: int | None
    bos: int | None

    def tokenize(self, text: str) -> list[int]: ...

    def detokenize(self, ids: Sequence[int]) -> str: ...


def _build_byte_level(cfg: TokenizerConfig) -> Tokenizer:
    p = Problems()
    _no_special_tokens(p, cfg)
    if cfg.vocab_extra_ids < 0:
        p.add("tokenizer.vocab_extra_ids", "must be >= 0", cfg.vocab_extra_ids, fix="set it to 0 or more")
        p.raise_if_any()
    tok = ByteLevelTokenizer(vocab_extra_ids=cfg.vocab_extra_ids)
    # Its vocabulary is fixed: a different vocab_size would be silently ignored, so say so.
    if cfg.vocab_size is not None and cfg.vocab_size != tok.vocab_size:
        p.add(
            "tokenizer.vocab_size",
            f"ByteLevelTokenizer has a fixed vocabulary of {tok.vocab_size} ids "
            f"(256 bytes, eod, pad, bos{', extra ids' if cfg.vocab_extra_ids else ''})",
            cfg.vocab_size,
            fix="leave tokenizer.vocab_size unset (set model.vocab_size to pad the model's vocabulary)",
        )
    p.raise_if_any()
    return tok


def _build_null(cfg: TokenizerConfig) -> Tokenizer:
    p = Problems()
    _no_special_tokens(p, cfg)
    if cfg.vocab_extra_ids:
        p.add(
            "tokenizer.vocab_extra_ids",
            "NullTokenizer has no sentinel tokens to add",
            cfg.vocab_extra_ids,
            fix="set tokenizer.vocab_extra_ids to 0, or use ByteLevelTokenizer",
        )
    size = cfg.vocab_size
    if size is None or size < 1:
        p.add(
            "tokenizer.vocab_size",
            "NullTokenizer needs a positive vocabulary size",
            size,
            fix="set tokenizer.vocab_size, e.g. 32000",
        )
    else:
        eod = cfg.null_tokenizer_eod_id
        if eod is not None and not 0 <= eod < size:
            p.add(
                "tokenizer.null_tokenizer_eod_id",
                f"must be a token id in [0, vocab_size) = [0, {size})",
                eod,
                fix="set tokenizer.null_tokenizer_eod_id inside the vocabulary, or leave it unset",
            )
        pad = cfg.null_tokenizer_pad_id
        if pad != -1 and not 0 <= pad < size:
            p.add(
                "tokenizer.null_tokenizer_pad_id",
                f"must be a token id in [0, vocab_size) = [0, {size}), or -1 for none",
                pad,
                fix="set tokenizer.null_tokenizer_pad_id inside the vocabulary, or to -1",
            )
        elif pad != -1 and pad == (size - 1 if eod is None else eod):
            p.add(
                "tokenizer.null_tokenizer_pad_id",
                "is the end-of-document id too; padding would be indistinguishable from document ends",
                pad,
                fix="choose a different tokenizer.null_tokenizer_pad_id, or -1 for none",
            )
    p.raise_if_any()
    return NullTokenizer(int(size or 0), eod_id=cfg.null_tokenizer_eod_id, pad_id=cfg.null_tokenizer_pad_id)


def _no_special_tokens(p: Problems, cfg: TokenizerConfig) -> None:
    if cfg.special_tokens:
        p.add(
            "tokenizer.special_tokens",
            f"{cfg.tokenizer_type} cannot add special tokens",
            cfg.special_tokens,
            fix="remove tokenizer.special_tokens (they apply to tokenizers that are not supported yet)",
        )


# tokenizer_type -> builder. Later tokenizers register here; the Protocol above is all they must meet.
_BUILDERS: dict[str, Callable[[TokenizerConfig], Tokenizer]] = {
    "ByteLevelTokenizer": _build_byte_level,
    "NullTokenizer": _build_null,
}


def supported_tokenizer_types() -> tuple[str, ...]:
    """The tokenizer_type values `build_tokenizer` can build."""
    return tuple(_BUILDERS)


def build_tokenizer(cfg: TokenizerConfig) -> Tokenizer:
    """The tokenizer `cfg` describes; `ConfigError` when it cannot be built exactly as asked."""
    kind = cfg.tokenizer_type
    builder = _BUILDERS.get(kind) if kind is not None else None
    if builder is not None:
        return builder(cfg)
    supported = " or ".join(_BUILDERS)
    p = Problems()
    p.add(
        "tokenizer.tokenizer_type",
        "must be set" if kind is None else f"{kind} is not supported yet",
        kind,
        fix=f"set tokenizer.tokenizer_type to {supported} (NullTokenizer also needs tokenizer.vocab_size)",
    )
    raise ConfigError(p.items)


__all__ = [
    "ByteLevelTokenizer",
    "NullTokenizer",
    "Tokenizer",
    "build_tokenizer",
    "supported_tokenizer_types",
]
