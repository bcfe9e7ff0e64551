"""Reading fine-tuning records from JSONL and rendering them into text pieces.

A data file is untrusted: it is read line by line in binary with a cap on the line length (a
multi-gigabyte line is refused without being held in memory), each line must be one JSON object,
and every bad record becomes a `Problem` naming `file:line`, what is wrong and how to fix it.
Reading stops after `MAX_PROBLEMS` problems and raises them together (`SFTDataError`).

A record renders to `Piece`s: consecutive texts, each marked as answer (gets loss) or not, and
named by the template placeholder it came from (truncation cuts named pieces first):

- `{"input": ..., "output": ...}` (any keys the template names) through `prompt_template`; the
  answer is everything from the `{label_key}` placeholder on;
- `{"messages": [{"role": ..., "content": ...}, ...]}` through the tokenizer's chat template
  (`viaduct.data.sft.chat.ChatTemplate.segments`), whose assistant segments are the answer.
"""

from __future__ import annotations

import json
import string
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from viaduct.config import ConfigError, Problem

if TYPE_CHECKING:
    from viaduct.data.sft.chat import ChatTemplate
    from viaduct.training.config.finetuning import SFTOptions

MAX_LINE_BYTES = 16 * 1024 * 1024
"""Longest JSONL line accepted (16 MiB): a record is one example, never a whole corpus."""

MAX_PROBLEMS = 20
"""Bad records reported at once before reading stops (the rest is likely wrong the same way)."""


class SFTDataError(ConfigError):
    """Fine-tuning data that cannot be used; each problem names `file:line`, the fault and the fix."""


class Piece(NamedTuple):
    """One consecutive text of a rendered record."""

    text: str
    answer: bool
    """True for answer text: it gets loss (with answer_only_loss)."""
    field: str | None
    """The template placeholder the text came from (None: template literal or chat text)."""


@dataclass(frozen=True)
class Record:
    """A rendered record: where it came from and its pieces."""

    where: str
    """`file:line`, for messages about it."""
    pieces: list[Piece]
    chat: bool
    """Rendered through the chat template (truncation then only cuts the end)."""


class _Template:
    """A parsed prompt template: literal texts and placeholder names, in order."""

    def __init__(self, template: str, label_key: str) -> None:
        self.parts: list[tuple[str, bool]] = []  # (literal text or placeholder name, is placeholder)
        for literal, name, _spec, _conv in string.Formatter().parse(template):
            if literal:
                self.parts.append((literal, False))
            if name is not None:
                self.parts.append((name, True))
        self.keys = [name for name, is_key in self.parts if is_key]
        self.label_key = label_key
        self.answer_from = next(i for i, (n, k) in enumerate(self.parts) if k and n == label_key)

    def render(self, record: dict[str, Any]) -> list[Piece]:
        # Literal braces were written {{ }} in the template; Formatter.parse already unescaped them.
        return [
            Piece(str(record[name]) if is_key else name, i >= self.answer_from, name if is_key else None)
            for i, (name, is_key) in enumerate(self.parts)
        ]


class RecordReader:
    """Reads and renders the records of JSONL files with one set of options (see module docstring)."""

    def __init__(
        self,
        options: SFTOptions,
        chat_template: ChatTemplate | None,
        *,
        chat_unavailable: str | None = None,
        chat_loader: Callable[[], tuple[ChatTemplate | None, str | None]] | None = None,
        max_line_bytes: int = MAX_LINE_BYTES,
    ) -> None:
        """`chat_unavailable`: why there is no chat template (shown for a messages record).
        `chat_loader`: called at the first messages record when `chat_template` is None, returning
        (template, why there is none); data without messages never loads a template."""
        self.options = options
        self.template = _Template(options.prompt_template, options.label_key)
        self.chat_template = chat_template
        self.chat_unavailable = chat_unavailable
        self._chat_loader = chat_loader
        self.max_line_bytes = max_line_bytes

    def read(self, path: str | Path) -> list[Record]:
        """Every record of `path`; SFTDataError listing the bad ones (up to MAX_PROBLEMS)."""
        path = Path(path)
        problems: list[Problem] = []
        records: list[Record] = []
        try:
            lines = iter(_lines(path, self.max_line_bytes))
            for lineno, raw in lines:
                where = f"{path}:{lineno}"
                if isinstance(raw, Problem):
                    problems.append(raw)
                else:
                    result = self._record(where, raw)
                    if isinstance(result, Problem):
                        problems.append(result)
                    elif result is not None:
                        records.append(result)
                if len(problems) >= MAX_PROBLEMS:
                    problems.append(
                        Problem(
                            str(path),
                            f"stopped reading after {MAX_PROBLEMS} bad records",
                            fix="fix these first",
                        )
                    )
                    break
        except OSError as exc:
            problems.append(
                Problem(str(path), f"cannot be read ({exc.strerror or exc})", fix="check the file")
            )
        if not problems and not records:
            problems.append(
                Problem(
                    str(path),
                    "holds no records",
                    fix='write one JSON object per line, e.g. {"input": "...", "output": "..."}',
                )
            )
        if problems:
            raise SFTDataError(problems, header=f"bad fine-tuning data in {path} ({len(problems)} problems)")
        return records

    def _record(self, where: str, raw: bytes) -> Record | Problem | None:
        text = raw.strip()
        if not text:
            return None  # blank lines are allowed (a trailing newline, separators)
        try:
            obj = json.loads(text)
        except UnicodeDecodeError as exc:
            return Problem(
                where, f"is not UTF-8 ({exc.reason} at byte {exc.start})", fix="save the file as UTF-8"
            )
        except ValueError as exc:  # JSONDecodeError, and int-too-long from huge numbers
            return Problem(
                where, f"is not valid JSON ({exc})", fix="write one JSON object per line (JSON Lines)"
            )
        except RecursionError:
            return Problem(where, "nests too deeply to read", fix="write one flat JSON object per line")
        if not isinstance(obj, dict):
            return Problem(
                where,
                f"is a JSON {type(obj).__name__}, not an object",
                fix='write one object per line, e.g. {"input": "...", "output": "..."}',
            )
        chat = self.options.chat
        if "messages" in obj and chat is not False:
            return self._chat_record(where, obj["messages"])
        if chat is True:
            return Problem(
                where,
                "has no messages, but dataset_kwargs.chat=true reads chat records only",
                fix='give the record "messages": [{"role": ..., "content": ...}], '
                "or unset dataset.dataset_kwargs.chat",
            )
        return self._template_record(where, obj)

    def _template_record(self, where: str, obj: dict[str, Any]) -> Record | Problem:
        label = self.options.label_key
        missing = [k for k in self.template.keys if k not in obj]
        if missing:
            names = ", ".join(repr(k) for k in dict.fromkeys(missing))
            extra = (
                " (records with messages are read only when dataset_kwargs.chat is not false)"
                if "messages" in obj
                else ""
            )
            return Problem(
                where,
                f"misses {names}, named by the prompt template {self.options.prompt_template!r}{extra}",
                sorted(obj)[:10],
                fix=f"give every record the keys {', '.join(dict.fromkeys(self.template.keys))}, or change "
                "dataset.dataset_kwargs.prompt_template / label_key",
            )
        for key in dict.fromkeys(self.template.keys):
            if not isinstance(obj[key], str):
                return Problem(
                    where,
                    f"{key!r} is a JSON {type(obj[key]).__name__}, not a string",
                    fix=f"write {key!r} as a string",
                )
        if not obj[label].strip():
            return Problem(
                where,
                f"has an empty answer ({label!r})",
                fix=f"give {label!r} the text the model should learn to produce, or remove the record",
            )
        return Record(where, self.template.render(obj), chat=False)

    def _chat_record(self, where: str, messages: object) -> Record | Problem:
        if not isinstance(messages, list) or not messages:
            return Problem(
                where,
                '\'messages\' must be a non-empty list of {"role": ..., "content": ...} objects',
                type(messages).__name__,
                fix='write "messages": [{"role": "user", "content": "..."}, '
                '{"role": "assistant", "content": "..."}]',
            )
        for i, m in enumerate(messages):
            if (
                not isinstance(m, dict)
                or not isinstance(m.get("role"), str)
                or not isinstance(m.get("content"), str)
            ):
                return Problem(
                    where,
                    f"messages[{i}] is not an object with string 'role' and 'content'",
                    fix='write each message as {"role": "user", "content": "..."}',
                )
        if self.chat_template is None and self._chat_loader is not None:
            loader, self._chat_loader = self._chat_loader, None
            self.chat_template, self.chat_unavailable = loader()
        if self.chat_template is None:
            return Problem(
                where,
                "holds messages, but the tokenizer has no chat template"
                + (f" ({self.chat_unavailable})" if self.chat_unavailable else ""),
                fix="set tokenizer.chat_template (or use a tokenizer that ships one), "
                "or write input/output records",
            )
        from viaduct.data.sft.chat import ChatTemplateError

        try:
            segments = self.chat_template.segments(messages)
        except ChatTemplateError as exc:
            return Problem(
                where, f"cannot be rendered by the chat template: {exc}", fix="correct the messages"
            )
        pieces = [Piece(text, bool(answer), None) for text, answer in segments]
        if not any(p.answer and p.text.strip() for p in pieces):
            return Problem(
                where,
                "has no assistant answer to learn",
                fix='add an {"role": "assistant", "content": "..."} message with text',
            )
        return Record(where, pieces, chat=True)


def _lines(path: Path, limit: int) -> Iterator[tuple[int, bytes | Problem]]:
    """(line number, raw bytes) of each line of `path`; a Problem for a line over `limit` bytes,
    whose rest is skipped in bounded chunks."""
    with open(path, "rb") as f:
        lineno = 0
        while True:
            raw = f.readline(limit + 1)
            if not raw:
                return
            lineno += 1
            if len(raw) > limit and not raw.endswith(b"\n"):
                size = len(raw)
                while True:  # skip the rest of the line without holding it
                    chunk = f.readline(1 << 20)
                    size += len(chunk)
                    if not chunk or chunk.endswith(b"\n"):
                        break
                yield (
                    lineno,
                    Problem(
                        f"{path}:{lineno}",
                        f"is {size:,} bytes long, over the {limit:,}-byte limit for one record",
                        fix="split the record, or check that the file is JSON Lines (one object per line)",
                    ),
                )
                continue
            yield lineno, raw
