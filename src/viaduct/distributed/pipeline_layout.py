"""Megatron's pipeline layout language (`model.pipeline_model_parallel_layout`), parsed into one list
of symbols per slice of the model: ``E`` the embedding, ``t`` a transformer layer, ``L`` the loss,
``m`` a multi-token-prediction layer. See `viaduct.distributed.pipeline_split` for what the slices
mean; this module only reads the text (no torch).
"""

from __future__ import annotations

from viaduct.config.errors import Problem

_MAX_LAYOUT_SYMBOLS = 1_000_000
"""A layout string expands to at most this many symbols (``t*999999999`` must not exhaust memory)."""

_LAYOUT_NAMES = {
    "E": "E",
    "t": "t",
    "L": "L",
    "m": "m",
    "embedding": "E",
    "decoder": "t",
    "loss": "L",
    "mtp": "m",
}
"""Layout symbols and Megatron's `LayerType` names for them (its list form uses the names)."""


class LayoutError(ValueError):
    """A malformed layout: what is wrong and where (a character offset, or a slice index)."""

    def __init__(self, message: str, position: int | None = None):
        self.position = position
        super().__init__(message)


class _LayoutParser:
    """Recursive descent over a layout string (grammar in the module docstring)."""

    def __init__(self, text: str):
        self.text = text
        self.pos = 0

    def _skip_commas(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos] == ",":
            self.pos += 1

    def _peek(self) -> str:
        self._skip_commas()
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def _count(self) -> int:
        """Reads ``*N`` if present (1 otherwise)."""
        if self._peek() != "*":
            return 1
        star = self.pos
        self.pos += 1
        self._skip_commas()
        start = self.pos
        while self.pos < len(self.text) and self.text[self.pos].isdigit():
            self.pos += 1
        if start == self.pos:
            raise LayoutError("'*' must be followed by a repeat count", star)
        if self.pos - start > 7:
            raise LayoutError(f"repeat count {self.text[start : self.pos]} is too large", start)
        return int(self.text[start : self.pos])

    def sequence(self, depth: int = 0) -> str:
        """The expanded symbols ('|' included) up to the end, or to the ')' closing this group."""
        out: list[str] = []
        size = 0
        while True:
            ch = self._peek()
            if ch == "" or (ch == ")" and depth > 0):
                return "".join(out)
            start = self.pos
            if ch == "(":
                if depth > 0:
                    raise LayoutError("parentheses cannot nest", start)
                self.pos += 1
                inner = self.sequence(depth + 1)
                if self._peek() != ")":
                    raise LayoutError("'(' is never closed", start)
                self.pos += 1
                if self._peek() != "*":
                    raise LayoutError("a parenthesized group must be followed by '*N'", self.pos)
                piece = inner
            elif ch in "EtLm|":
                self.pos += 1
                piece = ch
            elif ch == ")":
                raise LayoutError("')' without a matching '('", start)
            elif ch == "*":
                raise LayoutError("'*' must follow a symbol, '|' or a group", start)
            else:
                raise LayoutError(f"unknown symbol {ch!r} (known: E, t, L, m, |, (, ), *, ',')", start)
            count = self._count()
            size += len(piece) * count
            if size > _MAX_LAYOUT_SYMBOLS:
                raise LayoutError(f"expands to more than {_MAX_LAYOUT_SYMBOLS} symbols", start)
            out.append(piece * count)


def parse_layout(layout: str | list[list[str]]) -> list[list[str]]:
    """A `pipeline_model_parallel_layout` as one list of symbols ('E', 't', 'L', 'm') per slice.

    Raises `ValueError` for a malformed layout, naming the position in a string or the slice and
    item of a list."""
    if isinstance(layout, str):
        text = _LayoutParser(layout).sequence()
        return [list(stage) for stage in text.split("|")]
    if not isinstance(layout, list) or not all(isinstance(stage, list) for stage in layout):
        raise LayoutError("must be a string or a list of lists (one per slice)")
    slices: list[list[str]] = []
    for i, stage in enumerate(layout):
        symbols = []
        for j, item in enumerate(stage):
            name = item.strip() if isinstance(item, str) else item
            symbol = _LAYOUT_NAMES.get(name) if isinstance(name, str) else None
            if symbol is None and isinstance(name, str):
                symbol = _LAYOUT_NAMES.get(name.lower())
            if symbol is None:
                raise LayoutError(
                    f"slice {i}, item {j}: unknown layer {item!r} (known: E/embedding, t/decoder, L/loss)", i
                )
            symbols.append(symbol)
        slices.append(symbols)
    return slices


def layout_error_problem(layout: str | list[list[str]], exc: LayoutError) -> Problem:
    where = ""
    if isinstance(layout, str) and exc.position is not None:
        pos = exc.position
        pointer = layout[max(0, pos - 10) : pos] + "»" + layout[pos : pos + 10]
        where = f" at position {pos} (…{pointer}…)" if len(layout) > 20 else f" at position {pos} ({pointer})"
    return Problem(
        "pipeline_model_parallel_layout",
        f"malformed{where}: {exc}",
        layout,
        fix='write the slices separated by "|" with E, t, L, "x*N" and "(...)*N", e.g. "Et*3|t*4|t*4|t*3L"',
    )
