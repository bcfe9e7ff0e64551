"""A `ConfigError` message stays readable however many problems it carries."""

import time

import pytest

from viaduct.config import ConfigError, ConfigWarning, Problem, apply_overrides
from viaduct.config.errors import MAX_LISTED

from .sample import Everything, Inner


def test_a_flood_of_unknown_keys_lists_the_first_problems_and_counts_the_rest():
    keys = {f"knob_{i}": i for i in range(100_000)}
    start = time.perf_counter()
    with pytest.raises(ConfigError) as info:
        Everything.from_dict({"inner": keys})
    assert time.perf_counter() - start < 10
    error = info.value
    assert len(error.problems) == 100_000  # every problem is still there for code to read
    text = str(error)
    assert len(text) < 20_000
    assert "inner.knob_0: no such field in Inner" in text
    assert f"inner.knob_{MAX_LISTED - 1}:" in text and f"inner.knob_{MAX_LISTED}:" not in text
    assert text.endswith(f"... and {100_000 - MAX_LISTED} more problems")


def test_one_huge_problem_is_cut():
    error = ConfigError(Problem("k" * 1_000_000, "no such field", fix="remove it"))
    assert len(str(error)) < 2_000


def test_dropped_keys_warning_is_bounded():
    with pytest.warns(ConfigWarning) as record:
        Everything.from_dict({"inner": {f"old_{i}": i for i in range(10_000)}}, strict=False)
    message = str(record[0].message)
    assert "dropped 10000 unknown key(s)" in message and message.endswith(
        f"... and {10_000 - MAX_LISTED} more"
    )
    assert len(message) < 5_000


def test_overrides_report_many_problems_the_same_way():
    with pytest.raises(ConfigError) as info:
        apply_overrides(Everything(inner=Inner()), [f"inner.nope_{i}=1" for i in range(200)])
    assert len(info.value.problems) == 200
    assert str(info.value).count("\n  - ") == MAX_LISTED
