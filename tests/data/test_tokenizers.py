"""Tokenizers built from TokenizerConfig: round trips, special ids, Megatron's NullTokenizer, errors."""

from __future__ import annotations

import pytest

from viaduct.config import ConfigError
from viaduct.data.tokenizers import (
    ByteLevelTokenizer,
    NullTokenizer,
    Tokenizer,
    build_tokenizer,
    supported_tokenizer_types,
)
from viaduct.training.config import TokenizerConfig


def _problem(exc: pytest.ExceptionInfo[ConfigError], path: str):
    (p,) = [p for p in exc.value.problems if p.path == path]
    return p


@pytest.mark.parametrize(
    "text", ["", "hello world", "naïve café — 東京 🚀", "line\nbreak\ttab\x00nul", "ÿ" * 3]
)
def test_byte_level_round_trips_utf8(text: str):
    tok = build_tokenizer(TokenizerConfig(tokenizer_type="ByteLevelTokenizer"))
    ids = tok.tokenize(text)
    assert ids == list(text.encode("utf-8"))
    assert all(0 <= i < 256 for i in ids)
    assert tok.detokenize(ids) == text


def test_byte_level_special_ids_and_detokenize_drops_them():
    tok = build_tokenizer(TokenizerConfig(tokenizer_type="ByteLevelTokenizer"))
    assert isinstance(tok, ByteLevelTokenizer) and isinstance(tok, Tokenizer)
    assert (tok.vocab_size, tok.eod, tok.pad, tok.bos) == (259, 256, 257, 258)
    ids = [tok.bos, *tok.tokenize("é!"), tok.eod, tok.pad]
    assert tok.detokenize(ids) == "é!"
    # Invalid UTF-8 (a lone continuation byte) is replaced, not an error.
    assert tok.detokenize([0x80, *tok.tokenize("a")]) == "\ufffda"
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.detokenize([259])


def test_byte_level_vocab_extra_ids_are_sentinels_after_the_specials():
    tok = build_tokenizer(TokenizerConfig(tokenizer_type="ByteLevelTokenizer", vocab_extra_ids=3))
    assert tok.vocab_size == 262
    assert tok.additional_special_tokens_ids == [259, 260, 261]
    assert tok.detokenize([104, 259, 105, 261]) == "hi"


def test_byte_level_rejects_what_it_cannot_honour():
    cfg = TokenizerConfig(tokenizer_type="ByteLevelTokenizer", special_tokens=["<mask>"], vocab_size=1000)
    with pytest.raises(ConfigError) as exc:
        build_tokenizer(cfg)
    assert {p.path for p in exc.value.problems} == {"tokenizer.special_tokens", "tokenizer.vocab_size"}
    assert "259" in _problem(exc, "tokenizer.vocab_size").message
    # The matching size is accepted: nothing would be ignored.
    assert (
        build_tokenizer(TokenizerConfig(tokenizer_type="ByteLevelTokenizer", vocab_size=259)).vocab_size
        == 259
    )


def test_null_tokenizer_megatron_semantics():
    tok = build_tokenizer(TokenizerConfig(tokenizer_type="NullTokenizer", vocab_size=100))
    assert isinstance(tok, NullTokenizer)
    assert (tok.vocab_size, tok.eod, tok.pad, tok.bos) == (100, 99, None, None)
    assert tok.tokenize(" 3 1\t4\n15  ") == [3, 1, 4, 15]
    assert tok.detokenize([3, 1, 4, 99]) == "3 1 4 99"
    assert tok.tokenize(tok.detokenize([7, 0, 98])) == [7, 0, 98]
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.tokenize("100")
    with pytest.raises(ValueError, match="integers"):
        tok.tokenize("3 x")


@pytest.mark.parametrize(
    "cfg",
    [
        TokenizerConfig(tokenizer_type="ByteLevelTokenizer"),
        TokenizerConfig(tokenizer_type="NullTokenizer", vocab_size=300),
    ],
)
def test_uniform_extras(cfg: TokenizerConfig):
    tok = build_tokenizer(cfg)
    assert tok.name == cfg.tokenizer_type
    assert (tok.eos, tok.unk, tok.additional_special_tokens_ids) == (tok.eod, None, [])
    texts = ["1 2 3", "", "45 6"]
    assert tok.tokenize_batch(texts) == [tok.tokenize(t) for t in texts]


def test_null_tokenizer_explicit_eod_and_pad():
    cfg = TokenizerConfig(
        tokenizer_type="NullTokenizer", vocab_size=50, null_tokenizer_eod_id=0, null_tokenizer_pad_id=1
    )
    tok = build_tokenizer(cfg)
    assert (tok.eod, tok.pad) == (0, 1)


def test_null_tokenizer_problems_reported_together():
    cfg = TokenizerConfig(
        tokenizer_type="NullTokenizer",
        vocab_size=10,
        vocab_extra_ids=2,
        special_tokens=["<s>"],
        null_tokenizer_pad_id=10,
    )
    with pytest.raises(ConfigError) as exc:
        build_tokenizer(cfg)
    assert {p.path for p in exc.value.problems} == {
        "tokenizer.vocab_extra_ids",
        "tokenizer.special_tokens",
        "tokenizer.null_tokenizer_pad_id",
    }
    with pytest.raises(ConfigError) as exc:
        build_tokenizer(TokenizerConfig(tokenizer_type="NullTokenizer"))
    assert "e.g. 32000" in _problem(exc, "tokenizer.vocab_size").fix
    with pytest.raises(ConfigError, match="end-of-document id too"):
        build_tokenizer(
            TokenizerConfig(tokenizer_type="NullTokenizer", vocab_size=10, null_tokenizer_pad_id=9)
        )


@pytest.mark.parametrize(
    ("kind", "needs"),
    [
        ("HuggingFaceTokenizer", {"tokenizer.tokenizer_model"}),
        ("SentencePieceTokenizer", {"tokenizer.tokenizer_model"}),
        ("GPT2BPETokenizer", {"tokenizer.vocab_file", "tokenizer.merge_file"}),
        ("TikTokenizer", {"tokenizer.tokenizer_model", "tokenizer.tiktoken_pattern"}),
    ],
)
def test_file_tokenizers_name_the_fields_they_need(kind: str, needs: set[str]):
    with pytest.raises(ConfigError) as exc:
        build_tokenizer(TokenizerConfig(tokenizer_type=kind))
    assert {p.path for p in exc.value.problems} == needs
    assert all(p.fix for p in exc.value.problems)


def test_unknown_tokenizer_type_raises():
    with pytest.raises(ConfigError) as exc:
        build_tokenizer(TokenizerConfig(tokenizer_type="BertWordPieceCase"))  # type: ignore[arg-type]
    p = _problem(exc, "tokenizer.tokenizer_type")
    assert p.value == "BertWordPieceCase" and "BertWordPieceCase" in p.message
    assert all(name in p.fix for name in supported_tokenizer_types())
    assert len(supported_tokenizer_types()) == 6


def test_fields_of_other_tokenizer_types_are_not_silently_ignored():
    cfg = TokenizerConfig(
        tokenizer_type="ByteLevelTokenizer",
        tokenizer_model="x",
        tiktoken_pattern="v2",
        hf_tokenizer_kwargs={"use_fast": True},
        trust_remote_code=True,
        null_tokenizer_pad_id=0,
    )
    with pytest.raises(ConfigError) as exc:
        build_tokenizer(cfg)
    assert {p.path for p in exc.value.problems} == {
        "tokenizer.tokenizer_model",
        "tokenizer.tiktoken_pattern",
        "tokenizer.hf_tokenizer_kwargs",
        "tokenizer.trust_remote_code",
        "tokenizer.null_tokenizer_pad_id",
    }
    with pytest.raises(ConfigError) as exc:
        build_tokenizer(TokenizerConfig(tokenizer_type="NullTokenizer", vocab_size=10, vocab_file="v.json"))
    assert "only GPT2BPETokenizer" in _problem(exc, "tokenizer.vocab_file").message


def test_missing_tokenizer_type_raises():
    with pytest.raises(ConfigError) as exc:
        build_tokenizer(TokenizerConfig())
    assert _problem(exc, "tokenizer.tokenizer_type").message == "must be set"
