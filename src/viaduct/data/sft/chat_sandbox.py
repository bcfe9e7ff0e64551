"""The Jinja environment chat templates render in: transformers' (trim_blocks, lstrip_blocks, the
loopcontrols and `{% generation %}` extensions, `tojson`, `raise_exception`, `strftime_now`,
`dict`, `namespace`) inside Jinja's immutable sandbox, made strict: reading an unsafe attribute
stops the render, `*` and `**` may not build huge values, namespaces refuse underscore names.
`viaduct.data.sft.chat` renders with it. Jinja is imported when the environment is first built."""

from __future__ import annotations

import functools
import json
from contextvars import ContextVar
from datetime import datetime
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import jinja2
    import jinja2.parser
    import jinja2.runtime
    import jinja2.sandbox

_MAX_REPEAT = 10_000_000
"""Longest string or list `*` may build in a template: `'x' * 10**12` must fail, not eat the memory."""
_MAX_POWER_BITS = 100_000
"""Largest integer (in bits) `**` may build in a template."""

# Two characters the `{% generation %}` blocks wrap their output in while `segments` renders; None
# otherwise, so that `render` writes exactly what transformers writes.
MARKERS: ContextVar[tuple[str, str] | None] = ContextVar("viaduct_chat_markers", default=None)
# The time `strftime_now` reads while `segments` renders one conversation several times: every
# render must see the same date, or a render that straddles midnight would look inconsistent.
NOW: ContextVar[datetime | None] = ContextVar("viaduct_chat_now", default=None)


class Refused(Exception):
    """`raise_exception(message)` called by a template: it refuses the conversation."""


@functools.lru_cache(maxsize=1)
def environment() -> jinja2.sandbox.ImmutableSandboxedEnvironment:
    """The environment transformers renders chat templates in, with the sandbox made strict."""
    import jinja2
    import jinja2.ext
    import jinja2.nodes
    import jinja2.runtime
    import jinja2.utils
    from jinja2.exceptions import SecurityError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Sandbox(ImmutableSandboxedEnvironment):
        # `*` and `**` build a huge value from a short expression; they are checked before they run.
        intercepted_binops = frozenset({"*", "**"})

        def unsafe_undefined(self, obj: Any, attribute: str) -> jinja2.Undefined:
            # Jinja returns an undefined that prints as "" and raises only when used further: a
            # template reaching for Python internals is hostile, so it stops here.
            raise SecurityError(
                f"access to attribute {attribute!r} of a {type(obj).__name__!r} object is unsafe"
            )

        def call_binop(self, context: jinja2.runtime.Context, operator: str, left: Any, right: Any) -> Any:
            if operator == "*":
                for seq, n in ((left, right), (right, left)):
                    if (
                        isinstance(seq, (str, list, tuple))
                        and isinstance(n, int)
                        and len(seq) * n > _MAX_REPEAT
                    ):
                        raise SecurityError(f"'*' would build a value of {len(seq) * n} items")
            elif isinstance(left, int) and isinstance(right, int) and right > 0 and abs(left) > 1:
                if right * abs(left).bit_length() > _MAX_POWER_BITS:
                    raise SecurityError(
                        f"'**' would build an integer of about {right * left.bit_length()} bits"
                    )
            return super().call_binop(context, operator, left, right)

    class Generation(jinja2.ext.Extension):
        """{% generation %} ... {% endgeneration %}: text the assistant writes (transformers' tag)."""

        tags = {"generation"}  # noqa: RUF012 - Jinja's own attribute, read-only

        def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_answer"), [], [], body).set_lineno(lineno)

        def _answer(self, caller: jinja2.runtime.Macro) -> str:
            text = caller()
            markers = MARKERS.get()
            return text if markers is None else f"{markers[0]}{text}{markers[1]}"

    class TemplateDict:
        # `dict(...)` without the class itself, so that no attribute of it leads anywhere.
        def __call__(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
            return dict(*args, **kwargs)

        def fromkeys(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
            return dict.fromkeys(*args, **kwargs)

    class TemplateNamespace(jinja2.utils.Namespace):
        # A namespace that refuses underscore names, which could shadow its internals.
        def __init__(*args: Any, **kwargs: Any) -> None:  # `self` is args[0], as in Jinja
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name: str, value: Any) -> None:
            TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check_name(name: object) -> None:
            if isinstance(name, str) and name.startswith("_"):
                raise SecurityError(f"a namespace attribute may not start with '_', got {name!r}")

    env = Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = TemplateDict()
    env.globals["namespace"] = TemplateNamespace
    return env


def _tojson(
    x: object,
    ensure_ascii: bool = False,
    indent: int | str | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # transformers' filter: plain json.dumps (Jinja's own escapes HTML characters) with its options.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message: object) -> None:
    raise Refused(str(message))


def _strftime_now(format: str) -> str:
    return (NOW.get() or datetime.now()).strftime(format)
