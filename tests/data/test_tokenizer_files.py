"""Tokenizers read from files made here: Hugging Face tokenizer.json, SentencePiece .model, GPT-2
vocab.json + merges.txt and .tiktoken. Round trips, special ids, vocabulary sizes and errors."""

from __future__ import annotations

import base64
import io
import json
import pickle
from pathlib import Path

import pytest
import sentencepiece as spm
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from viaduct.config import ConfigError
from viaduct.data.tokenizers import (
    GPT2BPETokenizer,
    HuggingFaceTokenizer,
    SentencePieceTokenizer,
    TikTokenizer,
    Tokenizer,
    build_tokenizer,
)
from viaduct.data.tokenizers._common import import_optional
from viaduct.training.config import TokenizerConfig

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world, hello there! Tokenizers turn text into ids.",
    "naïve café — 東京 🚀 Grüße, señor; ünïcödé ärger",
    "line one\nline two\tand a tab",
] * 10
TEXTS = ["hello world", "The lazy fox, the quick dog.", "naïve café — 東京 🚀", "Grüße\nline\ttab"]


def _paths(exc: pytest.ExceptionInfo[ConfigError]) -> set[str]:
    return {p.path for p in exc.value.problems}


def _round_trips(tok: Tokenizer) -> None:
    for text in TEXTS:
        ids = tok.tokenize(text)
        assert ids and all(0 <= i < tok.vocab_size for i in ids)
        assert tok.detokenize(ids) == text
    assert tok.tokenize("") == []
    assert tok.tokenize_batch(TEXTS) == [tok.tokenize(t) for t in TEXTS]
    # Every tokenizer crosses process boundaries (preprocessing workers, loader workers).
    copy = pickle.loads(pickle.dumps(tok))
    assert copy.tokenize(TEXTS[2]) == tok.tokenize(TEXTS[2]) and copy.vocab_size == tok.vocab_size


def _train_bpe(special: list[str], vocab_size: int = 320) -> HFTokenizer:
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    return tok


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every tokenizer file the tests read, made once."""
    root = tmp_path_factory.mktemp("tokenizer_files")
    out: dict[str, Path] = {}
    gpt = _train_bpe(["<|endoftext|>", "<pad>"])
    out["hf_file"] = root / "gpt_tokenizer.json"
    gpt.save(str(out["hf_file"]))
    gpt_dir = root / "gpt2"
    gpt_dir.mkdir()
    gpt.model.save(str(gpt_dir))  # vocab.json + merges.txt, GPT-2's format
    out["vocab"], out["merges"] = gpt_dir / "vocab.json", gpt_dir / "merges.txt"

    llama_dir = root / "llama_like"
    llama_dir.mkdir()
    llama = _train_bpe(["<unk>", "<s>", "</s>", "<pad>", "<|eot|>"])
    llama.save(str(llama_dir / "tokenizer.json"))
    (llama_dir / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "bos_token": "<s>",
                "eos_token": {"__type": "AddedToken", "content": "</s>", "special": True},
                "pad_token": None,
                "model_max_length": 4096,
            }
        )
    )
    (llama_dir / "special_tokens_map.json").write_text(json.dumps({"pad_token": "<pad>"}))
    out["hf_dir"] = llama_dir

    no_eos = _train_bpe(["<pad>"])
    out["hf_no_eos"] = root / "no_eos.json"
    no_eos.save(str(out["hf_no_eos"]))

    bos_adding = _train_bpe(["<s>", "</s>"])
    bos_adding.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", bos_adding.token_to_id("<s>"))]
    )
    out["hf_bos"] = root / "bos_adding.json"
    bos_adding.save(str(out["hf_bos"]))

    out["sp"] = _train_sp(root / "sp.model", pad_id=3)
    out["sp_no_eos"] = _train_sp(root / "sp_no_eos.model", eos_id=-1)
    out["tiktoken"] = _write_tiktoken(root / "tiny.tiktoken")
    return out


def _train_sp(path: Path, **options: int) -> Path:
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS),
        model_writer=model,
        vocab_size=SP_VOCAB,
        model_type="bpe",
        byte_fallback=True,  # any text round-trips, whatever the tiny corpus lacked
        normalization_rule_name="identity",  # keep newlines and tabs (the default maps them to spaces)
        minloglevel=2,
        **options,
    )
    path.write_bytes(model.getvalue())
    return path


SP_VOCAB = 320
MERGES = [b"th", b"he", b"the", b" t", b" the", b"ll", b"llo", b"hello", b"\xc3\xa9"]


def _tiktoken_lines() -> list[tuple[bytes, int]]:
    tokens = [bytes([b]) for b in range(256)] + MERGES
    return [(t, rank) for rank, t in enumerate(tokens)]


def _write_tiktoken(path: Path) -> Path:
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in _tiktoken_lines()))
    return path


def _hf(model: Path | str, **kw) -> TokenizerConfig:
    return TokenizerConfig(tokenizer_type="HuggingFaceTokenizer", tokenizer_model=str(model), **kw)


# ---------------------------------------------------------------- Hugging Face tokenizer.json


def test_hf_tokenizer_json_file(files):
    tok = build_tokenizer(_hf(files["hf_file"]))
    assert isinstance(tok, HuggingFaceTokenizer) and isinstance(tok, Tokenizer)
    assert tok.name == "HuggingFaceTokenizer"
    _round_trips(tok)
    backend = HFTokenizer.from_file(str(files["hf_file"]))
    assert tok.vocab_size == backend.get_vocab_size(True) == 320
    # No config files: eos and pad found by their common names, no bos.
    assert tok.eod == tok.eos == backend.token_to_id("<|endoftext|>")
    assert tok.pad == backend.token_to_id("<pad>") and tok.bos is None
    # Special-token text is matched as the special id; detokenize writes it back.
    ids = tok.tokenize("end<|endoftext|>")
    assert ids[-1] == tok.eod and tok.detokenize(ids) == "end<|endoftext|>"
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.detokenize([tok.vocab_size])


def test_hf_directory_with_config_files(files):
    tok = build_tokenizer(_hf(files["hf_dir"]))
    backend = HFTokenizer.from_file(str(files["hf_dir"] / "tokenizer.json"))
    _round_trips(tok)
    assert tok.eod == backend.token_to_id("</s>")  # from tokenizer_config.json (an AddedToken dict)
    assert tok.bos == backend.token_to_id("<s>")
    assert tok.pad == backend.token_to_id("<pad>")  # special_tokens_map.json overrides null
    assert tok.unk == backend.token_to_id("<unk>")
    # hf_tokenizer_kwargs name tokens over the files; special_tokens and sentinels are added at the end.
    cfg = _hf(
        files["hf_dir"],
        hf_tokenizer_kwargs={"eos_token": "<|eot|>"},
        special_tokens=["<|image|>"],
        vocab_extra_ids=2,
    )
    tok = build_tokenizer(cfg)
    assert tok.eod == backend.token_to_id("<|eot|>")
    assert tok.vocab_size == 323 and tok.additional_special_tokens_ids == [321, 322]
    assert tok.tokenize("<|image|>") == [320]
    assert tok.detokenize(tok.tokenize("a<extra_id_1>b")) == "a<extra_id_1>b"


def test_hf_post_processor_and_add_special_tokens(files):
    tok = build_tokenizer(_hf(files["hf_bos"]))
    assert tok.bos is not None and tok.tokenize("hello")[0] == tok.bos  # as Megatron: the file adds bos
    plain = build_tokenizer(_hf(files["hf_bos"], hf_tokenizer_kwargs={"add_special_tokens": False}))
    assert plain.tokenize("hello") == tok.tokenize("hello")[1:]
    assert plain.detokenize(plain.tokenize(TEXTS[2])) == TEXTS[2]


def test_hf_errors(files, tmp_path):
    with pytest.raises(ConfigError) as exc:
        build_tokenizer(_hf("meta-llama/Llama-3.1-8B"))
    (p,) = exc.value.problems
    assert p.path == "tokenizer.tokenizer_model"
    assert "downloading from the Hugging Face hub is not supported yet" in p.message
    assert "point tokenizer.tokenizer_model at the directory" in p.fix
    with pytest.raises(ConfigError, match="does not exist"):
        build_tokenizer(_hf(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="no end-of-sequence token") as exc:
        build_tokenizer(_hf(files["hf_no_eos"]))
    assert "eos_token" in exc.value.problems[0].fix
    with pytest.raises(ConfigError, match="'<nope>'.*not in the vocabulary"):
        build_tokenizer(_hf(files["hf_file"], hf_tokenizer_kwargs={"eos_token": "<nope>"}))
    # A directory of another tokenizer kind points at the right type.
    sp_dir = tmp_path / "sp_dir"
    sp_dir.mkdir()
    (sp_dir / "tokenizer.model").write_bytes(files["sp"].read_bytes())
    with pytest.raises(ConfigError, match="no tokenizer.json") as exc:
        build_tokenizer(_hf(sp_dir))
    assert "SentencePieceTokenizer" in exc.value.problems[0].fix
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not a valid tokenizer.json"):
        build_tokenizer(_hf(bad))


def test_hf_options_it_cannot_honour_are_errors(files, tmp_path):
    cfg = _hf(
        files["hf_file"],
        hf_tokenizer_kwargs={"use_fast": False, "padding_side": "left"},
        sp_tokenizer_kwargs={"legacy": True},
        vocab_size=1000,
    )
    with pytest.raises(ConfigError) as exc:
        build_tokenizer(cfg)
    assert _paths(exc) == {
        "tokenizer.hf_tokenizer_kwargs.use_fast",
        "tokenizer.hf_tokenizer_kwargs.padding_side",
        "tokenizer.sp_tokenizer_kwargs",
    }
    with pytest.raises(ConfigError, match="320 ids"):
        build_tokenizer(_hf(files["hf_file"], vocab_size=1000))
    # trust_remote_code is a permission: nothing is run, so it is accepted; custom code is refused.
    assert build_tokenizer(_hf(files["hf_dir"], trust_remote_code=True)).eod is not None
    custom = tmp_path / "custom"
    custom.mkdir()
    (custom / "tokenizer.json").write_bytes((files["hf_dir"] / "tokenizer.json").read_bytes())
    auto_map = {"auto_map": {"AutoTokenizer": ["tok.T", None]}}
    (custom / "tokenizer_config.json").write_text(json.dumps(auto_map))
    with pytest.raises(ConfigError, match="custom tokenizer code"):
        build_tokenizer(_hf(custom, trust_remote_code=True))


# ---------------------------------------------------------------- GPT-2 BPE


def _gpt2(files, **kw) -> TokenizerConfig:
    kw = {"vocab_file": str(files["vocab"]), "merge_file": str(files["merges"]), **kw}
    return TokenizerConfig(tokenizer_type="GPT2BPETokenizer", **kw)


def test_gpt2_bpe_matches_the_trained_tokenizer(files):
    tok = build_tokenizer(_gpt2(files))
    assert isinstance(tok, GPT2BPETokenizer) and tok.name == "GPT2BPETokenizer"
    _round_trips(tok)
    hf = build_tokenizer(_hf(files["hf_file"]))
    for text in TEXTS:
        assert tok.tokenize(text) == hf.tokenize(text)
    vocab = json.loads(files["vocab"].read_text())
    assert tok.vocab_size == len(vocab) and tok.eod == vocab["<|endoftext|>"]
    assert (tok.bos, tok.pad) == (None, None)
    # As Megatron's GPT-2 encoder: the eod text inside a document is text, not the eod id.
    assert tok.eod not in tok.tokenize("a<|endoftext|>b")
    assert tok.detokenize([*tok.tokenize("ab"), tok.eod]) == "ab<|endoftext|>"
    extra = build_tokenizer(_gpt2(files, vocab_extra_ids=2))
    assert extra.vocab_size == tok.vocab_size + 2
    assert extra.additional_special_tokens_ids == [tok.vocab_size, tok.vocab_size + 1]


def test_gpt2_bpe_errors(files, tmp_path):
    with pytest.raises(ConfigError) as exc:
        build_tokenizer(TokenizerConfig(tokenizer_type="GPT2BPETokenizer", tokenizer_model="gpt2"))
    assert _paths(exc) == {"tokenizer.vocab_file", "tokenizer.merge_file", "tokenizer.tokenizer_model"}
    with pytest.raises(ConfigError, match="does not exist"):
        build_tokenizer(_gpt2(files, merge_file=str(tmp_path / "nope.txt")))
    vocab = json.loads(files["vocab"].read_text())
    del vocab["<|endoftext|>"]
    no_eod = tmp_path / "vocab.json"
    no_eod.write_text(json.dumps(vocab))
    with pytest.raises(ConfigError, match="has no <\\|endoftext\\|>") as exc:
        build_tokenizer(_gpt2(files, vocab_file=str(no_eod)))
    assert exc.value.problems[0].path == str(no_eod)
    bad_merges = tmp_path / "merges.txt"
    bad_merges.write_text("#version: 0.2\nzz\u2603 qq\u2603\n")
    with pytest.raises(ConfigError, match="cannot be read"):
        build_tokenizer(_gpt2(files, merge_file=str(bad_merges)))


# ---------------------------------------------------------------- SentencePiece


def _sp(model: Path, **kw) -> TokenizerConfig:
    return TokenizerConfig(tokenizer_type="SentencePieceTokenizer", tokenizer_model=str(model), **kw)


def test_sentencepiece_round_trip_and_special_ids(files):
    tok = build_tokenizer(_sp(files["sp"]))
    assert isinstance(tok, SentencePieceTokenizer) and tok.name == "SentencePieceTokenizer"
    _round_trips(tok)
    assert tok.vocab_size == SP_VOCAB
    assert (tok.unk, tok.bos, tok.eos, tok.eod, tok.pad) == (0, 1, 2, 2, 3)
    # Control pieces are dropped by detokenize, as SentencePiece does.
    assert tok.detokenize([tok.bos, *tok.tokenize("hello"), tok.eod, tok.pad]) == "hello"


def test_sentencepiece_sentinels_and_special_tokens(files):
    tok = build_tokenizer(_sp(files["sp"], vocab_extra_ids=3, special_tokens=["<sep>"]))
    v = SP_VOCAB
    assert tok.vocab_size == v + 4
    assert tok.additional_special_tokens_ids == [v + 1, v + 2, v + 3]
    assert tok.token_to_id("<sep>") == v
    text = "hello <extra_id_0> world<extra_id_2>, naïve <sep> café"
    ids = tok.tokenize(text)
    assert {v, v + 1, v + 3} <= set(ids)
    assert tok.detokenize(ids) == text
    _round_trips(tok)


def test_sentencepiece_kwargs(files):
    spaced = "a   b  c"
    collapse = build_tokenizer(_sp(files["sp"]))
    assert collapse.detokenize(collapse.tokenize(spaced)) == "a b c"  # the model's normaliser
    keep = build_tokenizer(_sp(files["sp"], sp_tokenizer_kwargs={"ignore_extra_whitespaces": False}))
    assert keep.detokenize(keep.tokenize(spaced)) == spaced
    assert build_tokenizer(_sp(files["sp"], sp_tokenizer_kwargs={"legacy": True})).vocab_size == SP_VOCAB
    cfg = _sp(files["sp"], vocab_extra_ids=2, sp_tokenizer_kwargs={"legacy": False, "add_bos": True})
    with pytest.raises(ConfigError) as exc:
        build_tokenizer(cfg)
    assert _paths(exc) == {"tokenizer.sp_tokenizer_kwargs.legacy", "tokenizer.sp_tokenizer_kwargs.add_bos"}


def test_sentencepiece_errors(files, tmp_path):
    with pytest.raises(ConfigError, match="no eos piece") as exc:
        build_tokenizer(_sp(files["sp_no_eos"]))
    assert exc.value.problems[0].path == str(files["sp_no_eos"])
    garbage = tmp_path / "garbage.model"
    garbage.write_bytes(b"\x00not a model at all")
    with pytest.raises(ConfigError, match="not a SentencePiece model"):
        build_tokenizer(_sp(garbage))
    with pytest.raises(ConfigError, match="does not exist"):
        build_tokenizer(_sp(tmp_path / "missing.model"))
    with pytest.raises(ConfigError, match="control piece"):
        build_tokenizer(_sp(files["sp"], special_tokens=["</s>"]))
    with pytest.raises(ConfigError, match=f"{SP_VOCAB} ids"):
        build_tokenizer(_sp(files["sp"], vocab_size=SP_VOCAB + 1))


# ---------------------------------------------------------------- tiktoken


def _tik(model: Path, **kw) -> TokenizerConfig:
    kw.setdefault("tiktoken_pattern", "v2")
    return TokenizerConfig(tokenizer_type="TikTokenizer", tokenizer_model=str(model), **kw)


@pytest.mark.parametrize("pattern", ["v1", "v2"])
def test_tiktoken_layout_and_round_trip(files, pattern):
    tok = build_tokenizer(_tik(files["tiktoken"], tiktoken_pattern=pattern))
    assert isinstance(tok, TikTokenizer) and tok.name == "TikTokenizer"
    _round_trips(tok)
    # 1000 reserved ids first (Megatron's default), then the 265 ranks shifted by 1000.
    assert tok.vocab_size == 1000 + 256 + len(MERGES)
    assert (tok.unk, tok.bos, tok.eod, tok.eos, tok.pad) == (0, 1, 2, 2, 4)
    assert tok.tokenize("A") == [1000 + ord("A")]
    assert tok.tokenize("hello") == [1000 + 256 + MERGES.index(b"hello")]
    assert tok.tokenize("é") == [1000 + 256 + MERGES.index(b"\xc3\xa9")]
    # Special names in text stay text; special ids detokenize to their names.
    assert all(i >= 1000 for i in tok.tokenize("</s>"))
    assert tok.detokenize([tok.bos, *tok.tokenize("hi"), tok.eod, 999]) == "<s>hi</s><SPECIAL_999>"


def test_tiktoken_special_tokens_sentinels_and_vocab_size(files, tmp_path):
    cfg = _tik(
        files["tiktoken"], special_tokens=["<s>", "</s>"], tiktoken_num_special_tokens=8, vocab_extra_ids=2
    )
    tok = build_tokenizer(cfg)
    assert (tok.bos, tok.eod, tok.unk, tok.pad) == (0, 1, None, None)
    assert tok.additional_special_tokens_ids == [2, 3]
    assert tok.vocab_size == 8 + 265 and tok.tokenize("A") == [8 + 65]
    # vocab_size cuts the ranks, as in Megatron: the merges go, bytes remain.
    cut = build_tokenizer(_tik(files["tiktoken"], tiktoken_num_special_tokens=8, vocab_size=8 + 256))
    assert cut.vocab_size == 264 and cut.tokenize("hello") == [8 + b for b in b"hello"]
    assert cut.detokenize(cut.tokenize(TEXTS[2])) == TEXTS[2]
    # Megatron's JSON form of the same ranks gives the same ids.
    entries = [
        {"rank": r, "token_bytes": base64.b64encode(t).decode(), "token_str": t.decode("latin-1")}
        for t, r in _tiktoken_lines()
    ]
    as_json = tmp_path / "tok.json"
    as_json.write_text(json.dumps(entries))
    from_json = build_tokenizer(_tik(as_json))
    assert from_json.tokenize(TEXTS[1]) == build_tokenizer(_tik(files["tiktoken"])).tokenize(TEXTS[1])


def test_tiktoken_errors(files, tmp_path):
    cfg = _tik(
        tmp_path / "missing.tiktoken",
        tiktoken_pattern=None,
        special_tokens=["<s>", "<s>"],
        tiktoken_num_special_tokens=1,
    )
    with pytest.raises(ConfigError) as exc:
        build_tokenizer(cfg)
    assert _paths(exc) == {
        "tokenizer.tokenizer_model",
        "tokenizer.tiktoken_pattern",
        "tokenizer.special_tokens",
        "tokenizer.tiktoken_num_special_tokens",
    }
    assert any("</s>" in p.message for p in exc.value.problems)
    broken = tmp_path / "broken.tiktoken"
    broken.write_text("QQ== 0\nnot-base64!! 1\nQg==\n")
    with pytest.raises(ConfigError) as exc:
        build_tokenizer(_tik(broken))
    assert [p.message.split(":")[0] for p in exc.value.problems] == ["line 2", "line 3"]
    few = tmp_path / "few.tiktoken"
    few.write_text("".join(f"{base64.b64encode(bytes([b])).decode()} {b}\n" for b in range(200)))
    with pytest.raises(ConfigError, match="56 of the 256 single bytes"):
        build_tokenizer(_tik(few))
    with pytest.raises(ConfigError, match="must lie in"):
        build_tokenizer(_tik(files["tiktoken"], vocab_size=5000))


def test_missing_optional_library_names_the_extra():
    with pytest.raises(ConfigError) as exc:
        import_optional("viaduct_no_such_tokenizer_lib", "TikTokenizer", "tiktoken")
    (p,) = exc.value.problems
    assert p.path == "tokenizer.tokenizer_type" and p.fix == 'pip install "viaduct[tiktoken]"'
