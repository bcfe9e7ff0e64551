"""One exception type for every user-facing configuration problem.

A `ConfigError` carries *all* problems found in one pass (never just the first), each with the
dotted field path, the offending value, the rule it breaks, how to fix it and, where known, where
the value came from (default, Python file:line, YAML file:line, CLI). The message lists the first
`MAX_LISTED` problems and counts the rest; `ConfigError.problems` holds them all.
"""

from __future__ import annotations

import difflib
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

_MISSING_VALUE = object()

MAX_LISTED = 50
"""How many problems (or dropped keys) a message lists before it says how many more there are: a
file with half a million unknown keys must produce a readable message, not a 45 MB one."""
_MAX_PROBLEM_CHARS = 1000
"""One problem's line is cut here (a key can be megabytes long; the start names it well enough)."""


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _short_repr(value: Any, limit: int = 80) -> str:
    # reprlib would be cheaper for huge containers, but repr() of a config value is bounded by
    # the (bounded) file it came from.
    return _clip(repr(value), limit)


def join_limited(items: Sequence[str], limit: int = MAX_LISTED, sep: str = ", ") -> str:
    """The first `limit` items joined, then "... and K more" when there are more."""
    shown = sep.join(_clip(str(item), _MAX_PROBLEM_CHARS) for item in items[:limit])
    rest = len(items) - limit
    return shown + (f"{sep}... and {rest} more" if rest > 0 else "")


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a configuration."""

    path: str
    """Dotted path of the field ("train.train_iters"); empty for the whole object."""
    message: str
    """The rule that is broken, in words."""
    value: Any = _MISSING_VALUE
    """The offending value (left out of the text when not meaningful)."""
    fix: str | None = None
    """What to do about it."""
    source: str | None = None
    """Where the value came from: "default", "python (recipe.py:12)", "file a.yaml:3", "CLI"."""

    def prefixed(self, prefix: str) -> Problem:
        if not prefix:
            return self
        return replace(self, path=f"{prefix}.{self.path}" if self.path else prefix)

    def __str__(self) -> str:
        head = self.path or "<config>"
        parts = [f"{head}: {self.message}"]
        if self.value is not _MISSING_VALUE:
            parts.append(f"(got {_short_repr(self.value)}")
            parts[-1] += f", from {self.source})" if self.source else ")"
        elif self.source:
            parts.append(f"(from {self.source})")
        text = " ".join(parts)
        if self.fix:
            text += f"; fix: {self.fix}"
        return _clip(text, _MAX_PROBLEM_CHARS)


class ConfigError(ValueError):
    """Raised with every problem of a configuration at once."""

    def __init__(self, problems: Iterable[Problem] | Problem | str, *, header: str | None = None):
        if isinstance(problems, str):
            problems = [Problem("", problems)]
        elif isinstance(problems, Problem):
            problems = [problems]
        self.problems: list[Problem] = list(problems)
        self.header = header
        super().__init__(self._render())

    def _render(self) -> str:
        n = len(self.problems)
        header = self.header or ("invalid configuration" if n != 1 else "invalid configuration (1 problem)")
        if n == 1 and self.header is None:
            return f"{header}: {self.problems[0]}"
        lines = [f"{header} ({n} problems):" if self.header is None else f"{header}:"]
        lines += [f"  - {p}" for p in self.problems[:MAX_LISTED]]
        if n > MAX_LISTED:
            lines.append(f"  ... and {n - MAX_LISTED} more problems")
        return "\n".join(lines)

    def prefixed(self, prefix: str) -> ConfigError:
        return ConfigError([p.prefixed(prefix) for p in self.problems], header=self.header)

    def __reduce__(self):  # keeps the problems across pickling (multiprocessing, pytest-xdist)
        return (self.__class__, (self.problems,), {"header": self.header})


class ConfigFileNotFoundError(ConfigError, FileNotFoundError):
    """A configuration file that does not exist (both a `ConfigError` and a `FileNotFoundError`)."""


class ConfigWarning(UserWarning):
    """Something worth knowing that does not stop the run (a dropped key, an overridden value)."""


def warn(message: str) -> None:
    warnings.warn(message, ConfigWarning, stacklevel=3)


@dataclass
class Problems:
    """Collects problems while checking, then raises them together.

    `finalize()` methods use it so that one call reports everything that is wrong::

        p = Problems()
        if self.lr is not None and self.lr < 0:
            p.add("lr", "must be >= 0", self.lr, fix="set optimizer.lr to a positive rate")
        p.raise_if_any()
    """

    items: list[Problem] = field(default_factory=list)

    def add(self, path: str, message: str, value: Any = _MISSING_VALUE, *, fix: str | None = None) -> None:
        self.items.append(Problem(path, message, value, fix))

    def extend(self, problems: Iterable[Problem], prefix: str = "") -> None:
        self.items.extend(p.prefixed(prefix) for p in problems)

    def __bool__(self) -> bool:
        return bool(self.items)

    def __len__(self) -> int:
        return len(self.items)

    def raise_if_any(self, header: str | None = None) -> None:
        if self.items:
            raise ConfigError(self.items, header=header)


def fields_with_problems(problems: Iterable[Problem]) -> set[str]:
    """The field each problem is about, as its first path segment ("model.num_layers" -> "model",
    "target_modules[0]" -> "target_modules").

    A `finalize()` takes this set right after `check_types()` and skips every rule that reads one of
    these fields: a value of the wrong type is reported once, by its type problem, and never reaches
    a comparison that would crash on it or add a second, confusing problem.
    """
    return {p.path.split(".", 1)[0].split("[", 1)[0] for p in problems}


def suggest(name: str, candidates: Iterable[str], n: int = 3) -> list[str]:
    """The closest valid names to a misspelt one."""
    cands = list(candidates)
    found = difflib.get_close_matches(name, cands, n=n, cutoff=0.6)
    if not found:
        # A prefix or substring match catches truncations like "train_iter" -> "train_iters".
        found = [c for c in cands if name and (c.startswith(name) or name in c)][:n]
    return found


def did_you_mean(name: str, candidates: Iterable[str]) -> str:
    found = suggest(name, candidates)
    if not found:
        return ""
    return "did you mean " + " or ".join(found) + "?"
