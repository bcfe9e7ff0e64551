"""Hugging Face tokenizers from a local `tokenizer.json`, loaded with the `tokenizers` library.

No `transformers`: the fast tokenizer in `tokenizer.json` is the whole tokenizer, and
`tokenizer_config.json` / `special_tokens_map.json` beside it only name the bos/eos/pad/unk tokens.
As in Megatron's HuggingFaceTokenizer, `tokenize` applies the file's post-processor (a Llama 3
tokenizer prepends `<|begin_of_text|>`), special-token text in the input is matched as the special
token, and `detokenize` keeps special tokens as text. Truncation and padding stored in the file are
switched off, as `transformers` does on a plain call: documents are never cut.

`trust_remote_code` is accepted and changes nothing: no code is ever run. A directory whose
tokenizer_config.json names custom tokenizer code (`auto_map`) is refused rather than half-loaded.

`TokenizersBacked` is shared with the GPT-2 BPE tokenizer, which builds its `tokenizers.Tokenizer`
from vocab.json + merges.txt instead.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from viaduct.config import ConfigError, Problems
from viaduct.data.tokenizers._common import (
    added_token_ids,
    check_ids,
    check_kwargs,
    check_unused_fields,
    check_vocab_size,
    file_error,
    first_present,
    sentinel_tokens,
)

if TYPE_CHECKING:
    import tokenizers

    from viaduct.training.config.tokenizer import TokenizerConfig

# Common names, tried in order when the config files do not name a token.
EOS_NAMES = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>")
BOS_NAMES = ("<s>", "<|begin_of_text|>", "<bos>", "<|startoftext|>")
PAD_NAMES = ("<pad>", "[PAD]", "<|pad|>")
UNK_NAMES = ("<unk>", "[UNK]", "<|unk|>")
_ROLES = ("bos", "eos", "pad", "unk")

# hf_tokenizer_kwargs keys that mean something without transformers, with their types.
_HF_KWARGS: dict[str, type | tuple[type, ...]] = {
    "use_fast": bool,
    "add_special_tokens": bool,
    "include_special_tokens": bool,  # Megatron core's name for add_special_tokens
    "trust_remote_code": bool,
    "bos_token": str,
    "eos_token": str,
    "pad_token": str,
    "unk_token": str,
}

# A Hugging Face hub id: "name" or "org/name".
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


class TokenizersBacked:
    """The uniform surface over a `tokenizers.Tokenizer`; subclasses set `name`."""

    name = "TokenizersBacked"

    def __init__(
        self,
        tokenizer: tokenizers.Tokenizer,
        *,
        eos: int,
        bos: int | None = None,
        pad: int | None = None,
        unk: int | None = None,
        add_special_tokens: bool = True,
        additional_special_tokens_ids: Sequence[int] = (),
        source: str = "",
    ) -> None:
        tokenizer.no_truncation()
        tokenizer.no_padding()
        self._tok = tokenizer
        self._add_special_tokens = add_special_tokens
        self._fast = hasattr(tokenizer, "encode_batch_fast")  # tokenizers >= 0.20
        vocab = tokenizer.get_vocab(with_added_tokens=True)
        # One past the largest id, so that every id the tokenizer can produce has an embedding row.
        self.vocab_size: int = max(max(vocab.values(), default=-1) + 1, tokenizer.get_vocab_size(True))
        for role, value in (("eos", eos), ("bos", bos), ("pad", pad), ("unk", unk)):
            if value is not None and not 0 <= value < self.vocab_size:
                raise ValueError(f"{role} id {value} is outside the vocabulary [0, {self.vocab_size})")
        self.eos: int = eos
        self.eod: int = eos
        self.bos: int | None = bos
        self.pad: int | None = pad
        self.unk: int | None = unk
        self.additional_special_tokens_ids: list[int] = list(additional_special_tokens_ids)
        self.source = source

    @property
    def backend(self) -> tokenizers.Tokenizer:
        """The underlying `tokenizers.Tokenizer`."""
        return self._tok

    def tokenize(self, text: str) -> list[int]:
        """Token ids of `text` (with the post-processor's special tokens when it adds any)."""
        if self._fast:
            # ~30% faster than encode(): offsets, which nothing here reads, are not computed.
            return self._tok.encode_batch_fast([text], add_special_tokens=self._add_special_tokens)[0].ids
        return self._tok.encode(text, add_special_tokens=self._add_special_tokens).ids

    def tokenize_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """`tokenize` of each text in one call (threaded unless TOKENIZERS_PARALLELISM=false)."""
        encode = self._tok.encode_batch_fast if self._fast else self._tok.encode_batch
        return [e.ids for e in encode(list(texts), add_special_tokens=self._add_special_tokens)]

    def detokenize(self, ids: Sequence[int]) -> str:
        """Text of `ids`; special tokens appear as their text."""
        return self._tok.decode(check_ids(ids, self.vocab_size), skip_special_tokens=False)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self._tok.id_to_token(i)

    def __repr__(self) -> str:
        return f"{self.name}({self.source!r}, vocab_size={self.vocab_size}, eod={self.eod})"


class HuggingFaceTokenizer(TokenizersBacked):
    """A `tokenizer.json` (fast Hugging Face tokenizer) with its bos/eos/pad/unk ids."""

    name = "HuggingFaceTokenizer"


def build_huggingface(cfg: TokenizerConfig) -> HuggingFaceTokenizer:
    """`HuggingFaceTokenizer` from `cfg.tokenizer_model` (a tokenizer.json or a directory holding one)."""
    p = Problems()
    check_unused_fields(p, cfg)
    kwargs = dict(cfg.hf_tokenizer_kwargs)
    check_kwargs(
        p, "hf_tokenizer_kwargs", kwargs, _HF_KWARGS, "no transformers library behind this tokenizer"
    )
    if kwargs.get("use_fast") is False:
        p.add(
            "tokenizer.hf_tokenizer_kwargs.use_fast",
            "slow (Python) tokenizers need the transformers library; only tokenizer.json is read",
            False,
            fix="remove use_fast, or use SentencePieceTokenizer for a tokenizer.model",
        )
    add_special = kwargs.get("add_special_tokens", kwargs.get("include_special_tokens", True))
    if "add_special_tokens" in kwargs and "include_special_tokens" in kwargs:
        if kwargs["add_special_tokens"] != kwargs["include_special_tokens"]:
            p.add(
                "tokenizer.hf_tokenizer_kwargs",
                "add_special_tokens and include_special_tokens are the same switch and disagree",
                kwargs,
                fix="keep one of them",
            )
    files = _locate(p, cfg.tokenizer_model)
    p.raise_if_any()
    assert files is not None  # _locate added a problem otherwise
    tok_file, config_files = files

    names = _named_tokens(config_files)
    for role in _ROLES:
        if f"{role}_token" in kwargs:
            names[role] = kwargs[f"{role}_token"]
    _check_custom_code(config_files)

    import tokenizers  # a core dependency; imported here to keep `import viaduct.data` light

    try:
        tok = tokenizers.Tokenizer.from_file(str(tok_file))
    except Exception as exc:  # the Rust side raises plain Exception with its parse error
        raise file_error(
            tok_file,
            f"is not a valid tokenizer.json ({exc})",
            "point tokenizer.tokenizer_model at a tokenizer.json",
        ) from None

    extras = _add_tokens(tok, cfg)
    ids = _resolve_special(p, tok, names, tok_file, config_files)
    eos = ids.get("eos")
    if eos is None:
        if not p:  # otherwise a problem above already says why (a named eos_token not in the vocabulary)
            p.add(
                "tokenizer.tokenizer_model",
                "the tokenizer has no end-of-sequence token: "
                + ("its config files name no eos_token and " if config_files else "")
                + f"none of {', '.join(EOS_NAMES)} is in the vocabulary",
                cfg.tokenizer_model,
                fix="name it with tokenizer.hf_tokenizer_kwargs: {eos_token: '<its text>'}",
            )
        raise ConfigError(p.items)
    p.raise_if_any()
    out = HuggingFaceTokenizer(
        tok,
        eos=eos,
        bos=ids.get("bos"),
        pad=ids.get("pad"),
        unk=ids.get("unk"),
        add_special_tokens=add_special,
        additional_special_tokens_ids=extras,
        source=str(tok_file),
    )
    check_vocab_size(p, cfg, out.vocab_size)
    p.raise_if_any()
    return out


def _add_tokens(tok: tokenizers.Tokenizer, cfg: TokenizerConfig) -> list[int]:
    """Add `special_tokens` and the T5 sentinels as special tokens (after the vocabulary when new).

    Returns the sentinel ids.
    """
    sentinels = sentinel_tokens(cfg.vocab_extra_ids)
    new = [t for t in [*(cfg.special_tokens or []), *sentinels] if t]
    if new:
        tok.add_special_tokens(new)
    return added_token_ids(tok, sentinels)


def _locate(p: Problems, value: str | None) -> tuple[Path, list[Path]] | None:
    """The tokenizer.json and the config files beside it (a directory), or None with a problem added."""
    field = "tokenizer.tokenizer_model"
    if value is None:
        p.add(
            field,
            "HuggingFaceTokenizer needs it",
            None,
            fix=f"set {field} to a directory with tokenizer.json",
        )
        return None
    path = Path(os.path.expanduser(value))
    if path.is_file():
        # A lone file: whatever sits beside it may belong to another tokenizer, so only it is read.
        return path, []
    if path.is_dir():
        tok_file = path / "tokenizer.json"
        if tok_file.is_file():
            configs = [path / n for n in ("tokenizer_config.json", "special_tokens_map.json")]
            return tok_file, [c for c in configs if c.is_file()]
        fix = "point tokenizer.tokenizer_model at a directory that holds tokenizer.json"
        if (path / "tokenizer.model").is_file():
            fix = f"use tokenizer_type SentencePieceTokenizer with tokenizer_model {path / 'tokenizer.model'}"
        elif (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
            fix = "use tokenizer_type GPT2BPETokenizer with vocab_file vocab.json and merge_file merges.txt"
        p.add(field, "the directory has no tokenizer.json", value, fix=fix)
        return None
    if not value.startswith(("/", ".", "~")) and _HUB_ID.fullmatch(value):
        p.add(
            field,
            "is not a local file or directory, and downloading from the Hugging Face hub is not supported "
            "yet",
            value,
            fix="download the tokenizer files and point tokenizer.tokenizer_model at the directory "
            f"(e.g. huggingface-cli download {value} tokenizer.json tokenizer_config.json "
            "special_tokens_map.json --local-dir DIR)",
        )
    else:
        p.add(
            field,
            "HuggingFaceTokenizer file or directory does not exist",
            value,
            fix=f"check the path in {field}",
        )
    return None


def _read_json(path: Path) -> dict[str, object]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise file_error(path, f"cannot be read as JSON ({exc})", "repair or remove the file") from None
    if not isinstance(data, dict):
        raise file_error(path, "must hold a JSON object", "repair or remove the file")
    return data


def _named_tokens(config_files: list[Path]) -> dict[str, str | None]:
    """role -> token text named by tokenizer_config.json, then special_tokens_map.json (which wins).

    A role present with null means "none"; a role absent is guessed from the common names later.
    """
    names: dict[str, str | None] = {}
    for path in config_files:
        data = _read_json(path)
        for role in _ROLES:
            key = f"{role}_token"
            if key not in data:
                continue
            value = data[key]
            if isinstance(value, dict):  # a serialised AddedToken: {"content": "</s>", ...}
                value = value.get("content")
            if value is not None and not isinstance(value, str):
                raise file_error(path, f"{key} must be a string or null, got {value!r}", "repair the file")
            names[role] = value
    return names


def _check_custom_code(config_files: list[Path]) -> None:
    for path in config_files:
        auto_map = _read_json(path).get("auto_map")
        if isinstance(auto_map, dict) and "AutoTokenizer" in auto_map:
            raise file_error(
                path,
                f"names custom tokenizer code (auto_map.AutoTokenizer = {auto_map['AutoTokenizer']!r}), "
                "which cannot run without the transformers library",
                "use a tokenizer that tokenizer.json alone describes; if it does, remove auto_map from "
                f"{path.name}",
            )


def _resolve_special(
    p: Problems,
    tok: tokenizers.Tokenizer,
    names: dict[str, str | None],
    tok_file: Path,
    config_files: list[Path],
) -> dict[str, int | None]:
    """role -> id: the named token (a problem when it is not in the vocabulary), else a common name."""
    guesses = {"bos": BOS_NAMES, "eos": EOS_NAMES, "pad": PAD_NAMES, "unk": UNK_NAMES}
    ids: dict[str, int | None] = {}
    for role in _ROLES:
        name = names.get(role)
        if name is not None:
            i = tok.token_to_id(name)
            if i is None:
                where = ", ".join(str(c) for c in config_files) or "tokenizer.hf_tokenizer_kwargs"
                p.add(
                    "tokenizer.tokenizer_model",
                    f"{role}_token {name!r} (from {where}) is not in the vocabulary of {tok_file}",
                    name,
                    fix=f"set tokenizer.hf_tokenizer_kwargs: {{{role}_token: <a token of the vocabulary>}}",
                )
            ids[role] = i
        elif role in names and role != "eos":
            ids[role] = None  # explicitly null in the config files
        else:
            found = first_present(guesses[role], tok.token_to_id)
            if found is None and role == "unk":
                model_unk = getattr(tok.model, "unk_token", None)
                found = first_present([model_unk], tok.token_to_id) if isinstance(model_unk, str) else None
            ids[role] = found[1] if found else None
    return ids
