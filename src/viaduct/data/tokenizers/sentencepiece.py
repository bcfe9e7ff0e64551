"""SentencePiece tokenizers (`tokenizer_model` = a `.model` file), run by the `sentencepiece` library.

eod is the model's eos piece (as Megatron's GPTSentencePieceTokenizer); bos, pad and unk come from
the model, None where it has none. `vocab_extra_ids` T5 sentinels ("<extra_id_N>") and
`special_tokens` are added to the model as user-defined pieces after its vocabulary (a name the
model already has keeps its id), so SentencePiece itself matches them in text and writes them back.
`detokenize` drops control pieces (bos, eos, pad), as SentencePiece does.

`sp_tokenizer_kwargs` (the Megatron/NeMo SentencePiece options):
  legacy: bool (default true) - false forbids tokens added by the wrapper (NeMo's non-legacy mode),
      so it cannot be combined with vocab_extra_ids or special_tokens.
  ignore_extra_whitespaces: bool (default true) - false keeps runs of spaces that the model's
      normaliser would collapse, so whitespace round-trips exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

from viaduct.config import Problems
from viaduct.data.tokenizers._common import (
    check_ids,
    check_kwargs,
    check_unused_fields,
    check_vocab_size,
    file_error,
    import_optional,
    local_file,
    sentinel_tokens,
)

if TYPE_CHECKING:
    from sentencepiece import SentencePieceProcessor

    from viaduct.training.config.tokenizer import TokenizerConfig

_SP_KWARGS: dict[str, type | tuple[type, ...]] = {"legacy": bool, "ignore_extra_whitespaces": bool}


class SentencePieceTokenizer:
    """A SentencePiece model with the uniform surface; eod is its eos piece."""

    name = "SentencePieceTokenizer"

    def __init__(
        self, processor: SentencePieceProcessor, *, sentinel_ids: Sequence[int] = (), source: str = ""
    ) -> None:
        self._sp = processor
        self.vocab_size: int = int(processor.get_piece_size())
        eos = _id_or_none(processor.eos_id())
        if eos is None:
            raise ValueError("the SentencePiece model has no eos piece, which end-of-document needs")
        self.eos: int = eos
        self.eod: int = eos
        self.bos: int | None = _id_or_none(processor.bos_id())
        self.pad: int | None = _id_or_none(processor.pad_id())
        self.unk: int | None = _id_or_none(processor.unk_id())
        self.additional_special_tokens_ids: list[int] = list(sentinel_ids)
        self.source = source

    @property
    def backend(self) -> SentencePieceProcessor:
        """The underlying `sentencepiece.SentencePieceProcessor`."""
        return self._sp

    def tokenize(self, text: str) -> list[int]:
        """Piece ids of `text` (no bos/eos added); sentinel text maps to the sentinel ids."""
        return self._sp.encode(text)

    def tokenize_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """`tokenize` of each text, in one call."""
        return self._sp.encode(list(texts))

    def detokenize(self, ids: Sequence[int]) -> str:
        """Text of `ids`; control pieces (bos, eos, pad) are dropped."""
        return self._sp.decode(check_ids(ids, self.vocab_size))

    def token_to_id(self, token: str) -> int | None:
        i = self._sp.piece_to_id(token)
        # piece_to_id answers unk for unknown pieces: only the unk piece itself maps there honestly.
        return None if i == self._sp.unk_id() and token != self._sp.id_to_piece(i) else int(i)

    def id_to_token(self, i: int) -> str | None:
        return self._sp.id_to_piece(i) if 0 <= i < self.vocab_size else None

    def __repr__(self) -> str:
        return f"SentencePieceTokenizer({self.source!r}, vocab_size={self.vocab_size}, eod={self.eod})"


def build_sentencepiece(cfg: TokenizerConfig) -> SentencePieceTokenizer:
    """`SentencePieceTokenizer` from `cfg.tokenizer_model`, with sentinels and special tokens added."""
    p = Problems()
    check_unused_fields(p, cfg)
    kwargs = dict(cfg.sp_tokenizer_kwargs)
    check_kwargs(p, "sp_tokenizer_kwargs", kwargs, _SP_KWARGS, "not an option of the SentencePiece tokenizer")
    added = [*(cfg.special_tokens or []), *sentinel_tokens(max(cfg.vocab_extra_ids, 0))]
    if kwargs.get("legacy") is False and added:
        p.add(
            "tokenizer.sp_tokenizer_kwargs.legacy",
            "non-legacy SentencePiece tokenizers add no tokens, "
            "but vocab_extra_ids/special_tokens ask for some",
            False,
            fix="remove legacy: false, "
            "or set tokenizer.vocab_extra_ids to 0 and remove tokenizer.special_tokens",
        )
    path = local_file(
        p, "tokenizer_model", cfg.tokenizer_model, "SentencePieceTokenizer", "/path/to/tokenizer.model"
    )
    p.raise_if_any()
    assert path is not None  # local_file added a problem otherwise

    spm = import_optional("sentencepiece", "SentencePieceTokenizer", "sentencepiece")
    proto = path.read_bytes()
    sp = _load(spm, proto, path)
    keep_spaces = kwargs.get("ignore_extra_whitespaces") is False
    if added or keep_spaces:
        sp = _load(spm, _edit_model(proto, path, added, keep_spaces), path)
    if sp.eos_id() < 0:
        raise file_error(
            path,
            "the SentencePiece model has no eos piece, which SentencePieceTokenizer uses as end-of-document",
            "train the model with an eos piece (spm_train --eos_id=N), or use another tokenizer type",
        )
    out = SentencePieceTokenizer(
        sp, sentinel_ids=[sp.piece_to_id(t) for t in sentinel_tokens(cfg.vocab_extra_ids)], source=str(path)
    )
    check_vocab_size(p, cfg, out.vocab_size)
    p.raise_if_any()
    return out


def _id_or_none(i: int) -> int | None:
    return None if i < 0 else int(i)


def _load(spm: ModuleType, proto: bytes, path: Path) -> SentencePieceProcessor:
    sp: SentencePieceProcessor = spm.SentencePieceProcessor()
    try:
        sp.LoadFromSerializedProto(proto)
    except (RuntimeError, OSError, ValueError) as exc:
        raise file_error(
            path, f"is not a SentencePiece model ({exc})", "point tokenizer.tokenizer_model at a .model file"
        ) from None
    return sp


def _edit_model(proto: bytes, path: Path, added: list[str], keep_spaces: bool) -> bytes:
    """The model with `added` as user-defined pieces and, with `keep_spaces`, whitespace kept."""
    try:
        from sentencepiece import sentencepiece_model_pb2 as pb
    except ImportError as exc:  # the generated module needs protobuf (a dependency of tensorboard)
        raise file_error(
            path,
            f"adding tokens to a SentencePiece model needs the protobuf package ({exc})",
            "pip install protobuf",
        ) from None
    # The generated module builds its message classes at import time and sentencepiece ships no
    # stub for it, so mypy cannot see ModelProto.
    model_proto = pb.ModelProto  # type: ignore[attr-defined]
    model = model_proto()
    model.ParseFromString(proto)
    user_defined = model_proto.SentencePiece.USER_DEFINED
    index = {piece.piece: piece for piece in model.pieces}
    for token in dict.fromkeys(added):  # de-duplicated, order kept
        piece = index.get(token)
        if piece is None:
            piece = model.pieces.add()
            piece.piece = token
            piece.score = 0.0
            index[token] = piece
        elif piece.type in (model_proto.SentencePiece.CONTROL, model_proto.SentencePiece.UNKNOWN):
            # Matching bos/eos/unk inside text would change what every existing document means.
            raise file_error(
                path,
                f"{token!r} is a control piece of the model; it cannot also be a text token",
                "remove it from tokenizer.special_tokens",
            )
        # User-defined pieces are matched as a whole in the text and never split.
        piece.type = user_defined
    if keep_spaces:
        model.normalizer_spec.remove_extra_whitespaces = False
    return model.SerializeToString()
