"""Helpers shared by the tokenizer builders: config checks, file checks, optional imports, id checks.

Builders collect every problem of a `TokenizerConfig` in one `Problems` before raising, so these
helpers add to a `Problems` instead of raising themselves.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, SupportsIndex

from viaduct.config import ConfigError, Problem, Problems

if TYPE_CHECKING:
    import tokenizers

    from viaduct.training.config.tokenizer import TokenizerConfig

# Fields that only one or a few tokenizer types read; anything else setting them would be ignored.
_ONLY_FOR: dict[str, tuple[str, ...]] = {
    "tokenizer_model": ("HuggingFaceTokenizer", "SentencePieceTokenizer", "TikTokenizer"),
    "vocab_file": ("GPT2BPETokenizer",),
    "merge_file": ("GPT2BPETokenizer",),
    "tiktoken_pattern": ("TikTokenizer",),
    "null_tokenizer_eod_id": ("NullTokenizer",),
    "hf_tokenizer_kwargs": ("HuggingFaceTokenizer",),
    "sp_tokenizer_kwargs": ("SentencePieceTokenizer",),
}


def sentinel_tokens(n: int) -> list[str]:
    """The T5 span-masking sentinels "<extra_id_0>" .. "<extra_id_{n-1}>"."""
    return [f"<extra_id_{i}>" for i in range(n)]


def check_unused_fields(p: Problems, cfg: TokenizerConfig) -> None:
    """Every field set for another tokenizer type is a problem: it would be silently ignored."""
    kind = cfg.tokenizer_type or ""
    for name, kinds in _ONLY_FOR.items():
        value = getattr(cfg, name)
        if value is None or value == {} or kind in kinds:
            continue
        p.add(
            f"tokenizer.{name}",
            f"{kind} does not use it (only {' and '.join(kinds)} do)",
            value,
            fix=f"remove tokenizer.{name}",
        )
    if cfg.null_tokenizer_pad_id != -1 and kind != "NullTokenizer":
        p.add(
            "tokenizer.null_tokenizer_pad_id",
            f"{kind} does not use it (only NullTokenizer does)",
            cfg.null_tokenizer_pad_id,
            fix="remove tokenizer.null_tokenizer_pad_id",
        )
    if cfg.trust_remote_code and kind != "HuggingFaceTokenizer":
        p.add(
            "tokenizer.trust_remote_code",
            f"{kind} runs no code from its files (only HuggingFaceTokenizer reads this flag)",
            True,
            fix="remove tokenizer.trust_remote_code",
        )
    if cfg.vocab_extra_ids < 0:
        p.add("tokenizer.vocab_extra_ids", "must be >= 0", cfg.vocab_extra_ids, fix="set it to 0 or more")


def check_vocab_size(p: Problems, cfg: TokenizerConfig, actual: int) -> None:
    """A set `tokenizer.vocab_size` must equal the size the files give: it cannot resize them."""
    if cfg.vocab_size is not None and cfg.vocab_size != actual:
        p.add(
            "tokenizer.vocab_size",
            f"{cfg.tokenizer_type} has {actual} ids (added tokens included); its files fix the size",
            cfg.vocab_size,
            fix="leave tokenizer.vocab_size unset (set model.vocab_size to pad the model's vocabulary)",
        )


def local_file(p: Problems, field: str, value: str | None, kind: str, example: str) -> Path | None:
    """`value` as an existing file, else None with a problem added."""
    if value is None:
        p.add(f"tokenizer.{field}", f"{kind} needs it", None, fix=f"set tokenizer.{field}, e.g. {example}")
        return None
    path = Path(os.path.expanduser(value))
    if not path.is_file():
        what = "is a directory, not a file" if path.is_dir() else "does not exist"
        p.add(f"tokenizer.{field}", f"{kind} file {what}", value, fix=f"check the path in tokenizer.{field}")
        return None
    return path


def check_kwargs(
    p: Problems,
    field: str,
    kwargs: Mapping[str, object],
    allowed: dict[str, type | tuple[type, ...]],
    why: str,
) -> None:
    """Only keys we honour, with values of the right type; anything else would be silently ignored."""
    for key, value in kwargs.items():
        want = allowed.get(key)
        if want is None:
            p.add(
                f"tokenizer.{field}.{key}",
                f"is not supported ({why})",
                value,
                fix=f"remove it; tokenizer.{field} accepts {', '.join(sorted(allowed))}",
            )
        elif not isinstance(value, want) or (want is int and isinstance(value, bool)):
            names = " or ".join(t.__name__ for t in (want if isinstance(want, tuple) else (want,)))
            p.add(f"tokenizer.{field}.{key}", f"must be a {names}", value, fix=f"set it to a {names}")


def import_optional(module: str, kind: str, extra: str) -> ModuleType:
    """Import a tokenizer library that is an optional extra; ConfigError with the install line if absent."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ConfigError(
            [
                Problem(
                    "tokenizer.tokenizer_type",
                    f"{kind} needs the {module} package, which is not installed ({exc})",
                    kind,
                    fix=f'pip install "viaduct[{extra}]"',
                )
            ]
        ) from None


def file_error(path: Path | str, message: str, fix: str) -> ConfigError:
    """A problem with the contents of a tokenizer file: its path is the problem's path."""
    return ConfigError([Problem(str(path), message, fix=fix)])


def check_ids(ids: Iterable[SupportsIndex], vocab_size: int) -> list[int]:
    """`ids` as plain ints (numpy and torch integers accepted); ValueError outside [0, vocab_size)."""
    out = [int(i) for i in ids]
    for i in out:
        if not 0 <= i < vocab_size:
            raise ValueError(f"token id {i} is outside the vocabulary [0, {vocab_size})")
    return out


def first_present(names: Sequence[str], lookup: Callable[[str], int | None]) -> tuple[str, int] | None:
    """The first of `names` that `lookup(name)` maps to an id."""
    for name in names:
        i = lookup(name)
        if i is not None:
            return name, int(i)
    return None


def added_token_ids(tok: tokenizers.Tokenizer, tokens: Iterable[str]) -> list[int]:
    """The ids of `tokens`, which `tok.add_special_tokens` has just added (new or already present)."""
    ids = []
    for token in tokens:
        i = tok.token_to_id(token)
        if i is None:  # add_special_tokens gives every token an id: a miss is a bug, not bad input
            raise RuntimeError(f"token {token!r} has no id right after being added to the tokenizer")
        ids.append(i)
    return ids
