"""Chat templates: `messages` records rendered to text as Hugging Face `transformers` renders them.

A supervised fine-tuning record ``{"messages": [{"role": ..., "content": ...}, ...]}`` becomes text
through the tokenizer's Jinja chat template, character for character what
``tokenizer.apply_chat_template(messages, tokenize=False)`` writes. The loss is taken on the
assistant's answers only, so `ChatTemplate.segments` also says which characters are answers:

* a template with ``{% generation %}`` blocks marks them itself (the blocks transformers'
  ``return_assistant_tokens_mask`` reads);
* otherwise an answer is what the conversation up to an assistant message adds to the conversation
  before it followed by the generation prompt: the answer and the end of its turn (``<|eot_id|>``,
  ``<|im_end|>\\n``), without the role header.

Templates come from configs and tokenizer files, so they are untrusted: they run in Jinja's immutable
sandbox, made strict (`viaduct.data.sft.chat_sandbox`: no Python internals, no changes to the
inputs, no huge values) and every failure, syntax or runtime, is a
`ChatTemplateError` naming where the template came from and its line. Jinja is imported only when a
template is used.
"""

from __future__ import annotations

import functools
import json
import os
import traceback
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields, is_dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from viaduct.config import ConfigError, Problem
from viaduct.data.sft.chat_sandbox import MARKERS as _MARKERS
from viaduct.data.sft.chat_sandbox import NOW as _NOW
from viaduct.data.sft.chat_sandbox import Refused as _Refused
from viaduct.data.sft.chat_sandbox import environment as _environment

if TYPE_CHECKING:
    import jinja2
    import jinja2.parser
    import jinja2.runtime
    import jinja2.sandbox

    from viaduct.training.config.tokenizer import TokenizerConfig

CONFIG_SOURCE = "tokenizer.chat_template"
"""The `source` of a template given in the configuration."""

# The named special tokens transformers always passes to a template (when the tokenizer has them).
_STANDARD_TOKENS = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)
# Overrides of the special tokens that `tokenizer.hf_tokenizer_kwargs` may carry (as from_pretrained kwargs).
_KWARG_TOKENS = ("bos_token", "eos_token", "pad_token", "unk_token")
# Names a message's reasoning is passed under; transformers fills the first two from any of them.
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")

_MAX_FILE_BYTES = 64 << 20
"""Tokenizer config files larger than this are refused unread (real ones are a few MB at most)."""
_GENERATION_FIX = (
    "wrap the assistant answers of the template in {% generation %} ... {% endgeneration %} so that "
    "they are marked directly, or write the records in the input/output format"
)


class ChatTemplateError(ConfigError):
    """A chat template that does not load, or that fails on (or refuses) a conversation."""

    def prefixed(self, prefix: str) -> ChatTemplateError:
        return ChatTemplateError([p.prefixed(prefix) for p in self.problems], header=self.header)

    def _render(self) -> str:
        if self.header is None and len(self.problems) == 1:
            return f"chat template error: {self.problems[0]}"
        return super()._render()


def _error(source: str, message: str, fix: str) -> ChatTemplateError:
    return ChatTemplateError([Problem(source, message, fix=fix)])


@dataclass(frozen=True)
class ChatTemplate:
    """A Jinja chat template with the special tokens it may read, rendered as transformers renders it."""

    text: str
    """The Jinja source."""
    source: str = CONFIG_SOURCE
    """Where it came from, for messages: "tokenizer.chat_template" or a file path."""
    special_tokens: Mapping[str, str] = field(default_factory=dict)
    """Special tokens the template reads as variables (bos_token, eos_token, ...), as text."""

    def __post_init__(self) -> None:
        if not isinstance(self.text, str):
            raise _error(self.source, f"must be a string, got {type(self.text).__name__}", "give a template")
        bad = [k for k, v in self.special_tokens.items() if not (isinstance(k, str) and isinstance(v, str))]
        if bad:
            raise _error(
                self.source,
                f"special tokens must be strings, got {bad[:5]!r}",
                "give special_tokens as a mapping of names to token text",
            )
        # A plain dict: a mapping proxy would not pickle into DataLoader workers.
        object.__setattr__(self, "special_tokens", dict(self.special_tokens))
        self.check()

    def __hash__(self) -> int:  # the generated one would fail on the special-tokens dict
        return hash((self.text, self.source, tuple(sorted(self.special_tokens.items()))))

    @classmethod
    def from_config(cls, tokenizer_cfg: TokenizerConfig) -> ChatTemplate | None:
        """The template of `tokenizer_cfg`: `tokenizer.chat_template`, else the Hugging Face tokenizer's own.

        The tokenizer's own is read from a local Hugging Face tokenizer directory (`tokenizer_model`
        is the directory or the tokenizer.json in it): chat_template.jinja, else the "chat_template"
        of tokenizer_config.json (a string, or a list of {"name", "template"} of which "default" is
        used). The special tokens come from the same directory's config files, as transformers reads
        them. None when there is no template.
        """
        directory = _tokenizer_directory(tokenizer_cfg)
        special = _special_tokens(directory) if directory is not None else {}
        if tokenizer_cfg.tokenizer_type == "HuggingFaceTokenizer":
            # from_pretrained keyword arguments override the files' special tokens.
            kwargs = tokenizer_cfg.hf_tokenizer_kwargs or {}
            special.update({k: kwargs[k] for k in _KWARG_TOKENS if isinstance(kwargs.get(k), str)})
        if tokenizer_cfg.chat_template is not None:
            return cls(tokenizer_cfg.chat_template, CONFIG_SOURCE, special)
        if directory is None:
            return None
        found = _template_in(directory)
        if found is None:
            return None
        text, source = found
        return cls(text, source, special)

    def check(self) -> None:
        """Compile the template: a `ChatTemplateError` naming the line when its syntax is wrong."""
        why = syntax_error(self.text)
        if why is not None:
            raise _error(self.source, why, "correct the template's Jinja syntax at that line")

    @property
    def has_generation_blocks(self) -> bool:
        """Whether the template marks the answers itself with {% generation %} blocks."""
        return _has_generation_blocks(self.text)

    def render(
        self,
        messages: Sequence[Mapping[str, object]],
        *,
        add_generation_prompt: bool = False,
        tools: Sequence[Mapping[str, object]] | None = None,
    ) -> str:
        """The text of `messages`, as `apply_chat_template(messages, tokenize=False, ...)` writes it."""
        return self._render(self._conversation(messages), add_generation_prompt, self._tools(tools))

    def segments(
        self,
        messages: Sequence[Mapping[str, object]],
        *,
        tools: Sequence[Mapping[str, object]] | None = None,
    ) -> list[tuple[str, bool]]:
        """`render(messages)` cut into consecutive pieces, each True when it is part of an assistant answer.

        The pieces concatenate to the rendered text; True pieces are what the model must learn to
        write (an answer and the end of its turn), False ones the rest (system and user turns, role
        headers, generation prompts). Adjacent pieces always differ in the flag; none is empty.
        """
        conversation = self._conversation(messages)
        tool_data = self._tools(tools)
        token = _NOW.set(datetime.now())
        try:
            if self.has_generation_blocks:
                text, spans = self._generation_spans(conversation, tool_data)
            else:
                text, spans = self._prefix_spans(conversation, tool_data)
        finally:
            _NOW.reset(token)
        pieces: list[tuple[str, bool]] = []
        pos = 0
        for start, end in spans:
            if start > pos:
                pieces.append((text[pos:start], False))
            if end > start:
                if pieces and pieces[-1][1]:  # answers that touch are one piece
                    pieces[-1] = (pieces[-1][0] + text[start:end], True)
                else:
                    pieces.append((text[start:end], True))
            pos = max(pos, end)
        if pos < len(text):
            pieces.append((text[pos:], False))
        return pieces

    # ------------------------------------------------------------------ internals

    def _conversation(self, messages: Sequence[Mapping[str, object]]) -> list[dict[Any, Any]]:
        """`messages` as transformers hands them to the template: plain data, no None values."""
        if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
            raise _error(
                "messages", f"must be a list of messages, got {type(messages).__name__}", "pass a list"
            )
        out = []
        for i, message in enumerate(messages):
            if not isinstance(message, Mapping):
                raise _error(
                    f"messages[{i}]",
                    f"must be a mapping with role and content, got {type(message).__name__}",
                    'write it as {"role": ..., "content": ...}',
                )
            # Keys holding None are dropped first: templates test for a missing key, and would
            # otherwise print "None" (transformers does the same).
            plain = self._plain({k: v for k, v in message.items() if v is not None})
            assert isinstance(plain, dict)  # _plain of a Mapping is a dict
            reasoning = next((plain[k] for k in _REASONING_FIELDS if plain.get(k) is not None), None)
            if reasoning is not None:
                plain = {"thinking": reasoning, **plain, "reasoning_content": reasoning}
            out.append(plain)
        return out

    def _tools(self, tools: Sequence[Mapping[str, object]] | None) -> list[object] | None:
        if tools is None:
            return None
        if isinstance(tools, (str, bytes)) or not isinstance(tools, Sequence):
            raise _error(
                "tools", f"must be a list of tool schemas, got {type(tools).__name__}", "pass a list"
            )
        for i, tool in enumerate(tools):
            if not isinstance(tool, Mapping):
                raise _error(
                    f"tools[{i}]",
                    f"must be a JSON schema mapping, got {type(tool).__name__}",
                    "pass a mapping",
                )
        plain = self._plain(list(tools))
        assert isinstance(plain, list)
        return plain

    def _plain(self, value: object) -> object:
        try:
            return _plain_data(value)
        except RecursionError:
            raise _error("messages", "is nested too deeply", "flatten the record") from None

    def _template(self) -> jinja2.Template:
        try:
            return _compile(self.text)
        except Exception:  # a syntax error: check() says which, with the line
            self.check()
            raise

    def _render(self, conversation: list[dict[Any, Any]], add_generation_prompt: bool, tools: object) -> str:
        from jinja2.exceptions import SecurityError

        template = self._template()
        # As transformers: the special tokens, then the call's own variables over them.
        variables: dict[str, object] = {
            **self.special_tokens,
            "messages": conversation,
            "tools": tools,
            "documents": None,
            "add_generation_prompt": add_generation_prompt,
        }
        try:
            return template.render(variables)
        except _Refused as exc:
            raise _error(
                self.source,
                f"the chat template refused the conversation{_where(exc)}: {exc}",
                "change the record so that it follows the template's rule, or use a template that accepts it",
            ) from None
        except SecurityError as exc:
            raise _error(
                self.source,
                f"tried something the sandbox forbids{_where(exc)}: {exc}",
                "use a template that only reads the messages, the tools and the special tokens",
            ) from None
        except Exception as exc:  # untrusted template: whatever it raises is its failure, not ours
            raise _error(
                self.source,
                f"failed to render{_where(exc)}: {type(exc).__name__}: {exc}",
                "correct the template (or the record it fails on)",
            ) from None

    def _generation_spans(
        self, conversation: list[dict[Any, Any]], tools: object
    ) -> tuple[str, list[tuple[int, int]]]:
        """The rendered text and the character spans its {% generation %} blocks wrote."""
        text = self._render(conversation, False, tools)
        used = set(self.text)
        used.update(*(set(s) for s in _strings([conversation, tools, self.special_tokens])))
        start, end = _free_characters(used, self.source)
        token = _MARKERS.set((start, end))
        try:
            marked = self._render(conversation, False, tools)
        finally:
            _MARKERS.reset(token)
        # Read the marks off: nested blocks count as one answer; a mark the template cut or moved
        # (a block inside a filter or a {% set %}) shows as unbalanced marks or a changed text.
        spans: list[tuple[int, int]] = []
        plain: list[str] = []
        pos = depth = 0
        opened = 0
        for ch in marked:
            if ch == start:
                if depth == 0:
                    opened = pos
                depth += 1
            elif ch == end:
                depth -= 1
                if depth < 0:
                    break
                if depth == 0:
                    spans.append((opened, pos))
            else:
                plain.append(ch)
                pos += 1
        if depth != 0 or "".join(plain) != text:
            raise _error(
                self.source,
                "the output of its {% generation %} blocks is changed afterwards (a block inside a filter, "
                "macro result or {% set %} that is cut or reformatted), so the answers cannot be located",
                "put {% generation %} blocks directly around the text the assistant writes",
            )
        return text, spans

    def _prefix_spans(
        self, conversation: list[dict[Any, Any]], tools: object
    ) -> tuple[str, list[tuple[int, int]]]:
        """The rendered text and its answers, found by rendering the conversation one turn at a time."""
        text = self._render(conversation, False, tools)
        spans: list[tuple[int, int]] = []
        for i, message in enumerate(conversation):
            if message.get("role") != "assistant":
                continue
            prompt = self._render(conversation[:i], True, tools)
            upto = self._render(conversation[: i + 1], False, tools)
            if not upto.startswith(prompt):
                at = _first_difference(prompt, upto)
                raise _error(
                    self.source,
                    f"does not render turn by turn: the conversation up to message {i} (an assistant answer) "
                    "does not begin with the conversation before it plus the generation prompt "
                    f"(at character {at}: {prompt[at : at + 40]!r} vs {upto[at : at + 40]!r}), so the "
                    "answer cannot be located",
                    _GENERATION_FIX,
                )
            if not text.startswith(upto):
                at = _first_difference(upto, text)
                raise _error(
                    self.source,
                    f"does not render turn by turn: the conversation up to message {i} (an assistant answer) "
                    "is not the start of the whole conversation "
                    f"(at character {at}: {upto[at : at + 40]!r} vs {text[at : at + 40]!r}), so the answer "
                    "cannot be located",
                    _GENERATION_FIX,
                )
            if spans and len(prompt) < spans[-1][1]:
                raise _error(
                    self.source,
                    f"does not render turn by turn: the prompt of message {i} (an assistant answer) is "
                    "shorter than the conversation before it",
                    _GENERATION_FIX,
                )
            spans.append((len(prompt), len(upto)))
        return text, spans


def syntax_error(text: str) -> str | None:
    """Why `text` is not a valid chat template, naming the line; None when it compiles."""
    import jinja2

    try:
        _compile(text)
    except jinja2.TemplateSyntaxError as exc:
        lines = text.splitlines()
        line = lines[exc.lineno - 1] if 0 < exc.lineno <= len(lines) else ""
        shown = line if len(line) <= 80 else line[:77] + "..."
        return f"is not a valid Jinja template: {exc.message} at line {exc.lineno}: {shown!r}"
    except RecursionError:
        return "is not a valid Jinja template: it is nested too deeply to compile"
    return None


# ---------------------------------------------------------------------- Jinja


@functools.lru_cache(maxsize=64)
def _compile(text: str) -> jinja2.Template:
    return _environment().from_string(text)


@functools.lru_cache(maxsize=64)
def _has_generation_blocks(text: str) -> bool:
    import jinja2.nodes

    tree = _environment().parse(text)
    return any(
        isinstance(call.node, jinja2.nodes.ExtensionAttribute) and call.node.name == "_answer"
        for block in tree.find_all(jinja2.nodes.CallBlock)
        if isinstance(call := block.call, jinja2.nodes.Call)
    )


def _where(exc: BaseException) -> str:
    """ " at template line N" from the traceback Jinja rewrites to template lines, or ""."""
    line = None
    for frame in traceback.extract_tb(exc.__traceback__):
        if frame.filename == "<template>":
            line = frame.lineno
    return f" at template line {line}" if line is not None else ""


def _first_difference(a: str, b: str) -> int:
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)


def _free_characters(used: set[str], source: str) -> tuple[str, str]:
    """Two private-use characters found nowhere in the template or its inputs."""
    free = (chr(c) for c in (*range(0xF0000, 0xFFFFE), *range(0x100000, 0x10FFFE)) if chr(c) not in used)
    start, end = next(free, None), next(free, None)
    if start is None or end is None:
        raise _error(
            source, "the conversation uses every private-use character", "remove them from the record"
        )
    return start, end


# ---------------------------------------------------------------------- inputs


def _plain_data(value: object) -> object:
    """`value` rebuilt from plain JSON types, as transformers hands data to a template.

    Rich objects have methods the sandbox does not know to be dangerous, so anything that is not
    JSON-like data becomes an inert "<TypeName>" placeholder.
    """
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain_data(k): _plain_data(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain_data(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain_data(v) for v in value)
    if type(value).__module__ == "numpy":
        import numpy as np

        if isinstance(value, np.generic):
            return _plain_data(value.item())
    if is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain_data(getattr(value, f.name)) for f in fields(value)}
    dump = getattr(value, "model_dump", None)
    if callable(dump):  # pydantic models, e.g. messages from an OpenAI client
        return _plain_data(dump())
    return f"<{type(value).__name__}>"


def _strings(value: object) -> Iterator[str]:
    """Every string in plain data, keys included."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            yield item
        elif isinstance(item, Mapping):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)


# ---------------------------------------------------------------------- tokenizer files


def _tokenizer_directory(cfg: TokenizerConfig) -> Path | None:
    """The local Hugging Face tokenizer directory of `cfg`, or None."""
    if cfg.tokenizer_type != "HuggingFaceTokenizer" or cfg.tokenizer_model is None:
        return None
    path = Path(os.path.expanduser(cfg.tokenizer_model))
    if path.is_dir():
        return path
    if path.is_file() and path.name == "tokenizer.json":
        return path.parent
    return None


def _read_text(path: Path) -> str:
    try:
        size = path.stat().st_size
        if size > _MAX_FILE_BYTES:
            raise _error(
                str(path),
                f"is {size} bytes, more than a tokenizer file holds ({_MAX_FILE_BYTES} at most)",
                "point tokenizer.tokenizer_model at a Hugging Face tokenizer directory",
            )
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise _error(str(path), f"cannot be read ({exc})", "repair or remove the file") from None


def _read_json(path: Path) -> dict[str, object]:
    try:
        data = json.loads(_read_text(path))
    except (json.JSONDecodeError, RecursionError) as exc:
        raise _error(str(path), f"is not valid JSON ({exc})", "repair or remove the file") from None
    if not isinstance(data, dict):
        raise _error(str(path), f"must hold a JSON object, not {type(data).__name__}", "repair the file")
    return data


def _template_in(directory: Path) -> tuple[str, str] | None:
    """The default chat template of a tokenizer directory and where it is, or None.

    chat_template.jinja wins over tokenizer_config.json, as in transformers.
    """
    jinja_file = directory / "chat_template.jinja"
    if jinja_file.is_file():
        return _read_text(jinja_file), str(jinja_file)
    config_file = directory / "tokenizer_config.json"
    if not config_file.is_file():
        return None
    value = _read_json(config_file).get("chat_template")
    where = f"{config_file} (chat_template)"
    if value is None:
        return None
    if isinstance(value, str):
        return value, str(config_file)
    if isinstance(value, list):
        named: dict[str, object] = {}
        for item in value:
            if not (isinstance(item, dict) and isinstance(item.get("name"), str) and "template" in item):
                raise _error(
                    where,
                    f"a list of templates must hold {{'name': ..., 'template': ...}} objects, got {item!r}",
                    "repair the file, or set tokenizer.chat_template",
                )
            named[item["name"]] = item["template"]
        if "default" not in named:
            raise _error(
                where,
                f"has several templates ({', '.join(sorted(named))}) and none is named 'default'",
                "set tokenizer.chat_template to the one to use",
            )
        text = named["default"]
        if not isinstance(text, str):
            raise _error(where, f"the 'default' template must be a string, got {text!r}", "repair the file")
        return text, str(config_file)
    raise _error(where, f"must be a string or a list of named templates, got {value!r}", "repair the file")


def _special_tokens(directory: Path) -> dict[str, str]:
    """The named special tokens transformers passes to the template, from the directory's config files.

    Every "*_token" key of tokenizer_config.json that holds a token (bos_token, eos_token, ... and
    model-specific ones such as image_token), with special_tokens_map.json over them when the config
    does not list its added tokens (transformers reads that file only then). A token may be stored as
    text or as {"content": text, ...}.
    """
    tokens: dict[str, str] = {}
    config_file = directory / "tokenizer_config.json"
    config = _read_json(config_file) if config_file.is_file() else {}
    sources: list[tuple[Path, dict[str, object]]] = [(config_file, config)]
    map_file = directory / "special_tokens_map.json"
    if "added_tokens_decoder" not in config and map_file.is_file():
        sources.append((map_file, _read_json(map_file)))
    for path, data in sources:
        named = dict(data)
        extra = data.get("extra_special_tokens")
        if isinstance(extra, dict):  # named extra tokens, e.g. {"image_token": "<image>"}
            named.update(extra)
        for key, value in named.items():
            if not key.endswith("_token"):
                continue
            if isinstance(value, dict):  # a serialised AddedToken
                value = value.get("content", value)
            if value is None:
                tokens.pop(key, None)
            elif isinstance(value, str):
                tokens[key] = value
            elif key in _STANDARD_TOKENS:
                raise _error(
                    f"{path} ({key})",
                    f"must be a token (text or {{'content': text}}), got {value!r}",
                    "repair the file",
                )
    return tokens
