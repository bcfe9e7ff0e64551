"""Hostile YAML: documents that expand without bound are refused quickly, at their file and line."""

import subprocess
import sys
import textwrap
import time

import pytest

from viaduct.config import ConfigError, apply_overrides, process_config_with_overrides
from viaduct.config.yaml_io import MAX_FILE_BYTES

from .sample import Everything, Inner


def billion_laughs() -> str:
    """The classic 342-byte document: nine levels of nine aliases, 9^9 strings once expanded."""
    text = 'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n'
    for prev, name in zip("abcdefgh", "bcdefghi"):
        text += f"{name}: &{name} [" + ",".join([f"*{prev}"] * 9) + "]\n"
    assert len(text) == 342
    return text


def interpolation_chain(*outer: str) -> str:
    """Each string is the previous one ten times: 100 characters become 10^10 after eight links."""
    lines, indent = [], ""
    for key in outer:
        lines.append(f"{indent}{key}:")
        indent += "  "
    lines.append(f"{indent}a: " + "x" * 100)
    for prev, name in zip("abcdefgh", "bcdefghi"):
        lines.append(f"{indent}{name}: " + f"${{.{prev}}}" * 10)
    return "\n".join(lines) + "\n"


def test_billion_laughs_is_refused_at_its_line(tmp_path):
    path = tmp_path / "laughs.yaml"
    path.write_text(billion_laughs())
    start = time.perf_counter()
    with pytest.raises(ConfigError) as info:
        process_config_with_overrides(Everything(inner=Inner()), config_filepath=path)
    assert time.perf_counter() - start < 5.0  # expanded, it would not end
    problem = info.value.problems[0]
    assert "anchors and aliases expand" in problem.message
    # The first value already past the limit: nine to the fifth "lol"s, on line 5.
    assert problem.source == f"{path}:5"
    with pytest.raises(ConfigError, match="anchors and aliases expand"):
        Everything.from_yaml(path)


def test_billion_laughs_in_an_override_value():
    value = "[" + ",".join(["&a [" + ",".join(['"lol"'] * 9) + "]"] + ["*a"] * 8) + "]"
    flat = apply_overrides(Everything(inner=Inner()), [f"+table.small={value}"])  # 81 strings: fine
    assert len(flat.table["small"]) == 9
    bomb = '{a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]'
    for prev, name in zip("abcdefgh", "bcdefghi"):
        bomb += f", {name}: &{name} [" + ",".join([f"*{prev}"] * 9) + "]"
    bomb += "}"
    start = time.perf_counter()
    with pytest.raises(ConfigError) as info:
        apply_overrides(Everything(inner=Inner()), [f"table={bomb}"])
    assert time.perf_counter() - start < 5.0  # expanded, it would not end
    assert info.value.problems[0].path == "table"
    assert "anchors and aliases expand" in info.value.problems[0].message


def test_recursive_anchors_and_deep_nesting_are_refused(tmp_path):
    path = tmp_path / "loop.yaml"
    path.write_text("inner: {}\ntable:\n  x: &loop [1, *loop]\n")
    with pytest.raises(ConfigError, match="recursive anchor") as info:
        process_config_with_overrides(Everything(inner=Inner()), config_filepath=path)
    assert info.value.problems[0].source == f"{path}:3"
    path.write_text("table: " + "[" * 500 + "]" * 500 + "\n")
    with pytest.raises(ConfigError, match="nests deeper than 100 levels"):
        process_config_with_overrides(Everything(inner=Inner()), config_filepath=path)


def test_ordinary_anchors_still_load(tmp_path):
    path = tmp_path / "shared.yaml"
    path.write_text(
        "inner: &common {iters: 4, lr: 0.5}\noptional: *common\nnames: &n [a, b]\ntable: {n: *n}\n"
    )
    cfg = process_config_with_overrides(Everything(inner=Inner()), config_filepath=path)
    assert cfg.inner.iters == cfg.optional.iters == 4 and cfg.optional is not cfg.inner
    assert cfg.table == {"n": ["a", "b"]}


def test_interpolation_chain_is_refused_at_the_first_long_link(tmp_path):
    path = tmp_path / "chain.yaml"
    path.write_text(interpolation_chain("table"))
    start = time.perf_counter()
    with pytest.raises(ConfigError) as info:
        process_config_with_overrides(Everything(inner=Inner()), config_filepath=path)
    assert time.perf_counter() - start < 5.0  # expanded, it would not end
    by_path = {p.path: p for p in info.value.problems}
    # b, c and d are 1,000 / 10,000 / 100,000 characters; e would be a million.
    assert "would be 1,000,000 characters" in by_path["table.e"].message
    assert by_path["table.e"].source == f"file {path}:6"
    assert "could not be resolved" in by_path["table.f"].message


def test_too_large_and_undecodable_files_are_config_errors(tmp_path):
    big = tmp_path / "big.yaml"
    with open(big, "w") as f:
        f.truncate(MAX_FILE_BYTES + 1)
    with pytest.raises(ConfigError, match="at most"):
        Everything.from_yaml(big)
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"inner: {}\nnames: [\xff\xfe]\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        Everything.from_yaml(binary)


_MEMORY_CAPPED = textwrap.dedent(
    """
    import resource, sys
    limit = 1 << 30  # 1 GiB of address space: the unguarded loader needed more than 4.5 GB
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    from viaduct.cli.main import main
    sys.exit(main(sys.argv[1:]))
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("shape", ["billion_laughs", "interpolation_chain"])
def test_the_cli_refuses_bombs_within_a_memory_cap(tmp_path, shape):
    path = tmp_path / f"{shape}.yaml"
    if shape == "billion_laughs":
        path.write_text(billion_laughs())
    else:  # a mapping field of the real configuration takes any keys
        path.write_text(interpolation_chain("tokenizer", "hf_tokenizer_kwargs"))
    r = subprocess.run(
        [sys.executable, "-c", _MEMORY_CAPPED, "config", "show", "--config-file", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and "MemoryError" not in r.stderr
    assert f"{path}:" in r.stderr
