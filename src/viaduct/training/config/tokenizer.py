"""`tokenizer`: which tokenizer to build and from which files.

Vocabulary padding is not configured here: the model provider pads the vocabulary (as in Megatron
Bridge). With `use_tokenizer_vocab_size` (or no `model.vocab_size`) the model takes the tokenizer's
vocabulary size.
"""

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from viaduct.config import ConfigBase, Problems
from viaduct.training.config._checks import dotted, path_exists, positive

TokenizerType = Literal[
    "HuggingFaceTokenizer",
    "SentencePieceTokenizer",
    "GPT2BPETokenizer",
    "TikTokenizer",
    "NullTokenizer",
    "ByteLevelTokenizer",
]

# Fields each tokenizer type needs, with an example value for the fix text.
_NEEDS: dict[str, tuple[tuple[str, str], ...]] = {
    "HuggingFaceTokenizer": (("tokenizer_model", "meta-llama/Llama-3.1-8B or a local directory"),),
    "SentencePieceTokenizer": (("tokenizer_model", "/path/to/tokenizer.model"),),
    "GPT2BPETokenizer": (
        ("vocab_file", "/path/to/gpt2-vocab.json"),
        ("merge_file", "/path/to/gpt2-merges.txt"),
    ),
    "TikTokenizer": (("tokenizer_model", "/path/to/tokenizer.json"), ("tiktoken_pattern", "v2")),
    "NullTokenizer": (("vocab_size", "32000"),),
    "ByteLevelTokenizer": (),
}

# Fields that must name a local file (a Hugging Face tokenizer_model may be a hub id instead).
_LOCAL_FILES = {
    "SentencePieceTokenizer": ("tokenizer_model",),
    "GPT2BPETokenizer": ("vocab_file", "merge_file"),
    "TikTokenizer": ("tokenizer_model",),
}


@dataclass(kw_only=True)
class TokenizerConfig(ConfigBase):
    """Tokenizer kind, its files and options."""

    _component_: ClassVar[str] = "tokenizer"

    tokenizer_type: TokenizerType | None = None
    """Tokenizer to build (required); NullTokenizer reads whitespace-separated ids, needs only vocab_size."""

    tokenizer_model: str | None = None
    """Tokenizer model: a Hugging Face hub id or directory, a SentencePiece .model or a tiktoken file."""

    vocab_file: str | None = None
    """Vocabulary file of a GPT-2 BPE tokenizer."""

    merge_file: str | None = None
    """Merges file of a GPT-2 BPE tokenizer."""

    vocab_size: int | None = None
    """Vocabulary size of the NullTokenizer (other tokenizers know theirs)."""

    vocab_extra_ids: int = 0
    """Extra sentinel tokens appended to the vocabulary (T5 span masking)."""

    special_tokens: list[str] | None = None
    """Special tokens to add (TikTokenizer needs <unk>, <s>, </s>, <mask>, <pad>, <cls>, <sep>)."""

    tiktoken_pattern: Literal["v1", "v2"] | None = None
    """Pre-tokenization pattern of the TikTokenizer."""

    tiktoken_num_special_tokens: int = 1000
    """Ids reserved for special tokens at the start of the TikTokenizer vocabulary."""

    null_tokenizer_eod_id: int | None = None
    """End-of-document id of the NullTokenizer; None uses vocab_size - 1."""

    null_tokenizer_pad_id: int = -1
    """Padding id of the NullTokenizer; -1 means none."""

    chat_template: str | None = None
    """Jinja chat template used for SFT `messages` records; overrides the tokenizer's own."""

    trust_remote_code: bool = False
    """Allow a Hugging Face tokenizer to run code from its repository."""

    use_tokenizer_vocab_size: bool = False
    """Give the model the tokenizer's vocabulary size (training from scratch) instead of model.vocab_size."""

    hf_tokenizer_kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra keyword arguments of AutoTokenizer.from_pretrained (e.g. {use_fast: false})."""

    sp_tokenizer_kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra keyword arguments of the SentencePiece tokenizer (e.g. {legacy: true})."""

    _legacy_fields_: ClassVar[dict[str, str]] = {
        "padded_vocab_size": "the model provider pads the vocabulary",
        "pad_vocab_size": "the model provider pads the vocabulary",
        "make_vocab_size_divisible_by": "set on the model provider",
        "tensor_model_parallel_size": "taken from the model provider",
        "rank": "runtime value",
        "metadata_path": "multimodal tokenizers are not built",
        "tokenizer_hf_no_use_fast": "use hf_tokenizer_kwargs: {use_fast: false}",
        "tokenizer_hf_no_include_special_tokens": "use hf_tokenizer_kwargs",
        "tokenizer_sentencepiece_legacy": "use sp_tokenizer_kwargs: {legacy: true}",
        "tokenizer_sentencepiece_ignore_extra_whitespaces": "use sp_tokenizer_kwargs",
        "chat_template_path": "put the template's text in chat_template",
        "tokenizer_prompt_format": "SFT tokenizers are not built",
        "image_tag_type": "multimodal tokenizers are not built",
        "force_system_message": "SFT tokenizers are not built",
    }

    def finalize(self) -> None:
        """Check that the chosen tokenizer has the fields and files it needs."""
        p = Problems()
        kind = self.tokenizer_type
        if kind is None:
            p.add(
                "tokenizer_type",
                "must be set",
                None,
                fix="set tokenizer.tokenizer_type, e.g. HuggingFaceTokenizer with tokenizer.tokenizer_model, "
                "or NullTokenizer with tokenizer.vocab_size for synthetic data",
            )
        for name, example in _NEEDS.get(kind or "", ()):
            if getattr(self, name) is None:
                p.add(name, f"{kind} needs it", None, fix=f"set {dotted(self, name)}, e.g. {example}")
        local = _LOCAL_FILES.get(kind or "", ())
        if kind == "HuggingFaceTokenizer" and _looks_local(self.tokenizer_model):
            local = ("tokenizer_model",)
        for name in local:
            value = getattr(self, name)
            if value is not None and not path_exists(value):
                p.add(
                    name, f"{kind} file does not exist", value, fix=f"check the path in {dotted(self, name)}"
                )

        positive(p, self, "vocab_size")
        positive(p, self, "vocab_extra_ids", zero_ok=True)
        positive(p, self, "tiktoken_num_special_tokens", zero_ok=True)
        eod = self.null_tokenizer_eod_id
        if eod is not None and (eod < 0 or (self.vocab_size is not None and eod >= self.vocab_size)):
            p.add(
                "null_tokenizer_eod_id",
                f"must be a token id in [0, vocab_size) = [0, {self.vocab_size})",
                eod,
                fix="set tokenizer.null_tokenizer_eod_id inside the vocabulary, or leave it unset",
            )
        if self.chat_template is not None:
            self._check_chat_template(p)
        p.raise_if_any()

    def _check_chat_template(self, p: Problems) -> None:
        """A set chat template must be a Jinja template that compiles (Jinja is imported only then)."""
        from viaduct.data.sft.chat import syntax_error

        if not self.chat_template or not self.chat_template.strip():
            p.add(
                "chat_template",
                "is empty",
                self.chat_template,
                fix=f"set {dotted(self, 'chat_template')} to a Jinja chat template, or leave it unset to "
                "use the tokenizer's own",
            )
            return
        why = syntax_error(self.chat_template)
        if why is not None:
            p.add(
                "chat_template",
                why,
                self.chat_template,
                fix=f"correct the Jinja syntax of {dotted(self, 'chat_template')} at that line",
            )


def _looks_local(path: str | None) -> bool:
    """A Hugging Face name that is clearly a file-system path (hub ids are "org/name")."""
    return path is not None and path.startswith(("/", "./", "../", "~"))
