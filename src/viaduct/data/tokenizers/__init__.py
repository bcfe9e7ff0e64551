"""Tokenizers behind one small surface, built from `TokenizerConfig` by `build_tokenizer(cfg)`.

Every tokenizer has `vocab_size` (added and special tokens included), `eod` (end-of-document id),
`pad` and `bos` (None when it has none), `tokenize(text) -> ids` and `detokenize(ids) -> text`; the
built-in ones also have `name` (their tokenizer_type), `eos`, `unk` and
`additional_special_tokens_ids` (the `vocab_extra_ids` sentinels) and `tokenize_batch(texts)`.
`tokenize` appends no eod; only a Hugging Face post-processor adds tokens (as in Megatron).

Types: `HuggingFaceTokenizer` (local tokenizer.json), `SentencePieceTokenizer` (.model),
`GPT2BPETokenizer` (vocab.json + merges.txt), `TikTokenizer` (.tiktoken), Megatron's
`NullTokenizer` and the file-free `ByteLevelTokenizer`. Every option a type cannot honour is a
`ConfigError`, never silently ignored. `detokenize` follows Megatron per type: Hugging Face, GPT-2
and tiktoken write special tokens as text, SentencePiece and byte-level drop them.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from viaduct.config import ConfigError, Problems
from viaduct.data.tokenizers._common import check_unused_fields
from viaduct.data.tokenizers.byte_level import ByteLevelTokenizer
from viaduct.data.tokenizers.gpt2_bpe import GPT2BPETokenizer, build_gpt2_bpe
from viaduct.data.tokenizers.huggingface import HuggingFaceTokenizer, build_huggingface
from viaduct.data.tokenizers.null import NullTokenizer
from viaduct.data.tokenizers.sentencepiece import SentencePieceTokenizer, build_sentencepiece
from viaduct.data.tokenizers.tiktoken import TikTokenizer, build_tiktoken

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
    check_unused_fields(p, cfg)
    _no_special_tokens(p, cfg)
    if cfg.vocab_extra_ids < 0:  # check_unused_fields reported it; the size below needs it valid
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
    check_unused_fields(p, cfg)
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
            fix="remove tokenizer.special_tokens (they apply to tokenizers read from files)",
        )


# tokenizer_type -> builder. New tokenizers register here; the Protocol above is all they must meet.
_BUILDERS: dict[str, Callable[[TokenizerConfig], Tokenizer]] = {
    "HuggingFaceTokenizer": build_huggingface,
    "SentencePieceTokenizer": build_sentencepiece,
    "GPT2BPETokenizer": build_gpt2_bpe,
    "TikTokenizer": build_tiktoken,
    "NullTokenizer": _build_null,
    "ByteLevelTokenizer": _build_byte_level,
}


def supported_tokenizer_types() -> tuple[str, ...]:
    """The tokenizer_type values `build_tokenizer` can build."""
    return tuple(_BUILDERS)


def build_tokenizer(cfg: TokenizerConfig) -> Tokenizer:
    """The tokenizer `cfg` describes; `ConfigError` when it cannot be built exactly as asked."""
    kind = cfg.tokenizer_type
    builder = _BUILDERS.get(kind) if kind is not None else None
    if builder is not None:
        from viaduct.data import builtin

        model = cfg.tokenizer_model
        if builtin.is_builtin(model):
            # A tokenizer viaduct builds itself (builtin:pydoc-bpe): made on first use, then cached.
            cfg = copy.deepcopy(cfg)
            cfg.tokenizer_model = builtin.resolve_tokenizer(model)
        return builder(cfg)
    supported = ", ".join(_BUILDERS)
    p = Problems()
    p.add(
        "tokenizer.tokenizer_type",
        "must be set" if kind is None else f"{kind} is not a tokenizer type viaduct builds",
        kind,
        fix=f"set tokenizer.tokenizer_type to one of {supported} "
        "(NullTokenizer also needs tokenizer.vocab_size)",
    )
    raise ConfigError(p.items)


__all__ = [
    "ByteLevelTokenizer",
    "GPT2BPETokenizer",
    "HuggingFaceTokenizer",
    "NullTokenizer",
    "SentencePieceTokenizer",
    "TikTokenizer",
    "Tokenizer",
    "build_tokenizer",
    "supported_tokenizer_types",
]
