"""Megatron's TikTokenizer: a BPE of byte ranks run by the `tiktoken` library.

`tokenizer_model` is a local `.tiktoken` file (one "<base64 of the token bytes> <rank>" per line,
as OpenAI publishes them) or Megatron's JSON list of {"rank", "token_bytes", "token_str"}. Ranks
must be 0..n-1 and include all 256 single bytes, so that any text can be encoded.

Megatron's layout: the first `tiktoken_num_special_tokens` ids are reserved for special tokens,
`special_tokens` first (default "<unk>", "<s>", "</s>", "<mask>", "<pad>", "<cls>", "<sep>"), then
the T5 sentinels of `vocab_extra_ids`, then fillers "<SPECIAL_i>"; a regular token of rank r has id
r + tiktoken_num_special_tokens. eod (= eos) is "</s>", bos "<s>", unk "<unk>", pad "<pad>" where
listed. `tokenize` is tiktoken's encode_ordinary: special-token text inside a document stays text.
`tokenizer.vocab_size`, when set, is the total size and cuts the ranks to fit, as in Megatron;
unset, every rank of the file is used.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from viaduct.config import ConfigError, Problem, Problems
from viaduct.data.tokenizers._common import (
    check_ids,
    check_unused_fields,
    file_error,
    import_optional,
    local_file,
    sentinel_tokens,
)

if TYPE_CHECKING:
    import tiktoken

    from viaduct.training.config.tokenizer import TokenizerConfig

# Megatron's pre-tokenisation regexes (tiktoken_pattern "v1" and "v2").
PATTERN_V1 = r"[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"
PATTERN_V2 = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PATTERNS = {"v1": PATTERN_V1, "v2": PATTERN_V2}
DEFAULT_SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<mask>", "<pad>", "<cls>", "<sep>")
EOD_TOKEN = "</s>"


class TikTokenizer:
    """tiktoken over byte ranks, with `num_special_tokens` special ids before the regular ones."""

    name = "TikTokenizer"

    def __init__(
        self,
        ranks: dict[bytes, int],
        *,
        pattern: str,
        special_tokens: Sequence[str],
        num_special_tokens: int,
        sentinel_tokens: Sequence[str] = (),
        source: str = "",
    ) -> None:
        import tiktoken

        names = list(special_tokens)
        if len(names) > num_special_tokens or len(set(names)) != len(names):
            raise ValueError(f"{len(names)} special tokens (unique) must fit in {num_special_tokens} ids")
        names += [f"<SPECIAL_{i}>" for i in range(len(names), num_special_tokens)]
        if len(set(names)) != len(names):
            raise ValueError("a special token is named like a filler <SPECIAL_i> at another id")
        if EOD_TOKEN not in names:
            raise ValueError(f"special_tokens must include {EOD_TOKEN}, the end-of-document token")
        self._special = {name: i for i, name in enumerate(names)}
        self.num_special_tokens = num_special_tokens
        self.vocab_size: int = num_special_tokens + len(ranks)
        self._enc = tiktoken.Encoding(
            name=f"viaduct-{Path(source).stem or 'tiktoken'}",
            pat_str=pattern,
            # Shifting every rank by the same amount keeps the merge order and makes room for specials.
            mergeable_ranks={token: rank + num_special_tokens for token, rank in ranks.items()},
            special_tokens=self._special,
        )
        self.eos: int = self._special[EOD_TOKEN]
        self.eod: int = self.eos
        self.bos: int | None = self._special.get("<s>")
        self.unk: int | None = self._special.get("<unk>")
        self.pad: int | None = self._special.get("<pad>")
        self.additional_special_tokens_ids: list[int] = [self._special[t] for t in sentinel_tokens]
        self.source = source

    @property
    def backend(self) -> tiktoken.Encoding:
        """The underlying `tiktoken.Encoding`."""
        return self._enc

    def tokenize(self, text: str) -> list[int]:
        """Token ids of `text`; special-token text is encoded as ordinary text."""
        return self._enc.encode_ordinary(text)

    def tokenize_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """`tokenize` of each text, in one call (tiktoken runs it on threads)."""
        return self._enc.encode_ordinary_batch(list(texts))

    def detokenize(self, ids: Sequence[int]) -> str:
        """Text of `ids`; special ids appear as their names, broken UTF-8 as U+FFFD."""
        return self._enc.decode(check_ids(ids, self.vocab_size))

    def token_to_id(self, token: str) -> int | None:
        if token in self._special:
            return self._special[token]
        try:
            return self._enc.encode_single_token(token.encode("utf-8"))
        except KeyError:
            return None

    def __repr__(self) -> str:
        return f"TikTokenizer({self.source!r}, vocab_size={self.vocab_size}, eod={self.eod})"


def build_tiktoken(cfg: TokenizerConfig) -> TikTokenizer:
    """`TikTokenizer` from `cfg.tokenizer_model`, `tiktoken_pattern` and the special-token settings."""
    p = Problems()
    check_unused_fields(p, cfg)
    path = local_file(
        p, "tokenizer_model", cfg.tokenizer_model, "TikTokenizer", "/path/to/tokenizer.tiktoken"
    )
    pattern = PATTERNS.get(cfg.tiktoken_pattern or "")
    if pattern is None:
        p.add(
            "tokenizer.tiktoken_pattern",
            "TikTokenizer needs it" if cfg.tiktoken_pattern is None else "must be v1 or v2",
            cfg.tiktoken_pattern,
            fix="set tokenizer.tiktoken_pattern to v2 (or v1, the pattern the tokenizer was trained with)",
        )
    num_special = cfg.tiktoken_num_special_tokens
    special = list(DEFAULT_SPECIAL_TOKENS if cfg.special_tokens is None else cfg.special_tokens)
    sentinels = sentinel_tokens(max(cfg.vocab_extra_ids, 0))
    _check_special(p, special, sentinels, num_special)
    p.raise_if_any()
    assert path is not None and pattern is not None  # problems were raised otherwise

    import_optional("tiktoken", "TikTokenizer", "tiktoken")
    ranks = read_ranks(path)
    if cfg.vocab_size is not None:
        inner = cfg.vocab_size - num_special
        if inner > len(ranks) or inner < 256:
            p.add(
                "tokenizer.vocab_size",
                f"must lie in [{num_special + 256}, {num_special + len(ranks)}]: "
                f"{num_special} special ids plus 256 to {len(ranks)} ranks of {path}",
                cfg.vocab_size,
                fix=f"leave tokenizer.vocab_size unset to use all {len(ranks)} ranks",
            )
            p.raise_if_any()
        # Megatron's convention: the vocabulary size cuts the ranks (the first ones are kept).
        ranks = {token: rank for token, rank in ranks.items() if rank < inner}
    return TikTokenizer(
        ranks,
        pattern=pattern,
        special_tokens=[*special, *sentinels],
        num_special_tokens=num_special,
        sentinel_tokens=sentinels,
        source=str(path),
    )


def _check_special(p: Problems, special: list[str], sentinels: list[str], num_special: int) -> None:
    names = [*special, *sentinels]
    if EOD_TOKEN not in special:
        p.add(
            "tokenizer.special_tokens",
            f"TikTokenizer needs {EOD_TOKEN} among them (its end-of-document token)",
            special,
            fix=f"add {EOD_TOKEN}, e.g. [<unk>, <s>, </s>, <mask>, <pad>, <cls>, <sep>]",
        )
    duplicates = sorted({t for t in names if names.count(t) > 1})
    if duplicates:
        p.add("tokenizer.special_tokens", f"names {duplicates} twice", special, fix="list each token once")
    if len(names) > num_special:
        p.add(
            "tokenizer.tiktoken_num_special_tokens",
            f"reserves {num_special} ids, fewer than the {len(names)} special tokens and sentinels",
            num_special,
            fix=f"set tokenizer.tiktoken_num_special_tokens to at least {len(names)} (Megatron uses 1000)",
        )


def read_ranks(path: Path) -> dict[bytes, int]:
    """token bytes -> rank from a `.tiktoken` file or Megatron's JSON list; ConfigError when malformed."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise file_error(path, f"cannot be read ({exc})", "check the file") from None
    pairs = _json_pairs(path, raw) if raw.lstrip()[:1] == b"[" else _tiktoken_pairs(path, raw)
    problems: list[str] = []
    ranks: dict[bytes, int] = {}
    for where, token, rank in pairs:
        if token in ranks:
            problems.append(f"{where}: token {token!r} appears twice")
        ranks[token] = rank
    if not problems and sorted(ranks.values()) != list(range(len(ranks))):
        problems.append(f"ranks must be 0..{len(ranks) - 1}, each once")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        problems.append(f"{len(missing)} of the 256 single bytes have no rank (first: {missing[0]})")
    if problems:
        raise ConfigError([Problem(str(path), msg, fix="repair the tiktoken file") for msg in problems[:10]])
    return ranks


def _tiktoken_pairs(path: Path, raw: bytes) -> list[tuple[str, bytes, int]]:
    pairs: list[tuple[str, bytes, int]] = []
    bad: list[str] = []
    for n, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split()
        try:
            if len(parts) != 2:
                raise ValueError
            pairs.append((f"line {n}", base64.b64decode(parts[0], validate=True), int(parts[1])))
        except (ValueError, binascii.Error):
            bad.append(f"line {n}: expected '<base64 token> <rank>', got {line[:60]!r}")
    if bad:
        raise ConfigError([Problem(str(path), msg, fix="repair the tiktoken file") for msg in bad[:10]])
    return pairs


def _json_pairs(path: Path, raw: bytes) -> list[tuple[str, bytes, int]]:
    try:
        entries = json.loads(raw)
        return [
            (f"entry {n}", base64.b64decode(e["token_bytes"], validate=True), int(e["rank"]))
            for n, e in enumerate(entries)
        ]
    except (ValueError, KeyError, TypeError, binascii.Error) as exc:
        raise file_error(
            path,
            f"is not Megatron's tiktoken JSON (a list of {{rank, token_bytes, token_str}}): {exc!r}",
            "repair the file, or use a .tiktoken file",
        ) from None
