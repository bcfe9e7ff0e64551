"""Megatron's GPT2BPETokenizer: OpenAI GPT-2 `vocab.json` + `merges.txt`, run by the `tokenizers` library.

A byte-level BPE with GPT-2's pre-tokenization regex and no prefix space, as the original GPT-2
encoder. The end-of-document id is `<|endoftext|>`. As in Megatron, that text inside a document is
ordinary text, not the special id; `detokenize` writes every id's text, `<|endoftext|>` included.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from viaduct.config import Problems
from viaduct.data.tokenizers._common import (
    added_token_ids,
    check_unused_fields,
    check_vocab_size,
    file_error,
    local_file,
    sentinel_tokens,
)
from viaduct.data.tokenizers.huggingface import TokenizersBacked

if TYPE_CHECKING:
    from viaduct.training.config.tokenizer import TokenizerConfig

EOD_TOKEN = "<|endoftext|>"


class GPT2BPETokenizer(TokenizersBacked):
    """GPT-2 byte-level BPE; eod (= eos) is `<|endoftext|>`, no bos or pad."""

    name = "GPT2BPETokenizer"


def build_gpt2_bpe(cfg: TokenizerConfig) -> GPT2BPETokenizer:
    """`GPT2BPETokenizer` from `cfg.vocab_file` and `cfg.merge_file`."""
    p = Problems()
    check_unused_fields(p, cfg)
    vocab_file = local_file(p, "vocab_file", cfg.vocab_file, "GPT2BPETokenizer", "/path/to/gpt2-vocab.json")
    merge_file = local_file(p, "merge_file", cfg.merge_file, "GPT2BPETokenizer", "/path/to/gpt2-merges.txt")
    p.raise_if_any()
    assert vocab_file is not None and merge_file is not None  # local_file added a problem otherwise

    vocab = _read_vocab(vocab_file)
    if EOD_TOKEN not in vocab:
        raise file_error(
            vocab_file,
            f"has no {EOD_TOKEN} token, the end-of-document token of GPT2BPETokenizer",
            f"use a GPT-2 vocabulary that contains {EOD_TOKEN}, "
            "or HuggingFaceTokenizer with a tokenizer.json",
        )

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    try:
        model = models.BPE.from_file(str(vocab_file), str(merge_file))
    except Exception as exc:  # the Rust side raises plain Exception naming the bad line
        raise file_error(
            merge_file,
            f"cannot be read with {vocab_file.name} as a GPT-2 BPE ({exc})",
            "check that vocab_file and merge_file belong together (merges.txt: one 'a b' pair per line)",
        ) from None
    tok = Tokenizer(model)
    # GPT-2: bytes mapped to printable characters, its split regex, no space added before the text.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()

    sentinels = sentinel_tokens(cfg.vocab_extra_ids)
    added = [*(cfg.special_tokens or []), *sentinels]
    if added:
        tok.add_special_tokens(added)
    out = GPT2BPETokenizer(
        tok,
        eos=int(vocab[EOD_TOKEN]),
        add_special_tokens=False,
        additional_special_tokens_ids=added_token_ids(tok, sentinels),
        source=str(vocab_file),
    )
    check_vocab_size(p, cfg, out.vocab_size)
    p.raise_if_any()
    return out


def _read_vocab(path: Path) -> dict[str, int]:
    try:
        vocab = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise file_error(
            path, f"cannot be read as JSON ({exc})", "point tokenizer.vocab_file at vocab.json"
        ) from None
    if not isinstance(vocab, dict) or not all(
        isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) for k, v in vocab.items()
    ):
        raise file_error(
            path, "must map token text to integer ids", "point tokenizer.vocab_file at a GPT-2 vocab.json"
        )
    return vocab
