"""`viaduct data preprocess`: JSONL -> Megatron .bin/.idx with every tokenizer type, any worker count,
bad lines reported by number, clear errors, and the command's exit codes."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from viaduct.cli.data import build_parser, run_data
from viaduct.config import ConfigError
from viaduct.data.indexed import IndexedDataset
from viaduct.data.preprocess import _make_tokenizer, output_prefix_for, preprocess_jsonl, split_ranges
from viaduct.data.tokenizers import build_tokenizer, supported_tokenizer_types
from viaduct.training.config.tokenizer import TokenizerConfig

BYTES = TokenizerConfig(tokenizer_type="ByteLevelTokenizer")
TEXTS = ["The quick brown fox.", "naïve café — 東京 🚀", "line one\nline two\tand a tab", "x", ""]


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    """300 documents with empty lines between some of them (allowed and skipped)."""
    rng = np.random.default_rng(0)
    lines = []
    for i in range(300):
        text = " ".join(TEXTS[int(j)] for j in rng.integers(0, len(TEXTS), int(rng.integers(1, 30))))
        lines.append(json.dumps({"text": f"doc {i}: {text}", "id": i}))
        if i % 50 == 7:
            lines.append("")
    return write_lines(tmp_path / "corpus.jsonl", lines)


def documents(prefix: str) -> list[list[int]]:
    ds = IndexedDataset(prefix)
    d = ds.document_indices
    return [
        np.concatenate([ds[j] for j in range(d[k], d[k + 1])] or [[]]).tolist() for k in range(len(d) - 1)
    ]


def test_any_worker_count_writes_identical_bytes(corpus, tmp_path):
    for workers in (1, 3):
        stats = preprocess_jsonl(
            corpus,
            tmp_path / f"w{workers}",
            ["text"],
            BYTES,
            append_eod=True,
            workers=workers,
            progress=False,
        )
        assert stats.documents == 300 and stats.empty_lines == 6 and stats.workers == workers
    assert len(split_ranges(str(corpus), 3)) == 3  # three workers really got three ranges
    for ext in ("bin", "idx"):
        one = Path(output_prefix_for(str(tmp_path / "w1"), "text") + f".{ext}").read_bytes()
        three = Path(output_prefix_for(str(tmp_path / "w3"), "text") + f".{ext}").read_bytes()
        assert one == three
    # The documents are the UTF-8 bytes of the texts, each ending with the eod id.
    tok = build_tokenizer(BYTES)
    texts = [json.loads(line)["text"] for line in corpus.read_text().splitlines() if line]
    assert documents(str(tmp_path / "w3_text_document")) == [[*t.encode(), tok.eod] for t in texts]
    assert stats.tokens == sum(len(t.encode()) + 1 for t in texts)
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".viaduct")]  # shards cleaned up


def test_append_eod_null_tokenizer_several_keys_and_sentences(tmp_path):
    path = write_lines(
        tmp_path / "ids.jsonl",
        [
            json.dumps({"a": "1 2 3", "b": "7"}),
            json.dumps({"a": ["4 5", "", "6"], "b": ""}),  # a list of sentences: one sequence each
            json.dumps({"a": "8", "b": "9 9"}),
        ],
    )
    cfg = TokenizerConfig(tokenizer_type="NullTokenizer", vocab_size=100)
    preprocess_jsonl(path, tmp_path / "plain", ["a", "b"], cfg, workers=1, progress=False)
    preprocess_jsonl(path, tmp_path / "eod", ["a", "b"], cfg, append_eod=True, workers=2, progress=False)
    a = IndexedDataset(str(tmp_path / "plain_a_document"))
    assert [a[i].tolist() for i in range(len(a))] == [[1, 2, 3], [4, 5], [6], [8]]
    assert a.document_indices.tolist() == [0, 1, 3, 4]
    assert documents(str(tmp_path / "plain_b_document")) == [[7], [], [9, 9]]
    # eod (99, the last id) ends the last sequence of every non-empty document, as in Megatron.
    a = IndexedDataset(str(tmp_path / "eod_a_document"))
    assert [a[i].tolist() for i in range(len(a))] == [[1, 2, 3, 99], [4, 5], [6, 99], [8, 99]]
    assert documents(str(tmp_path / "eod_b_document")) == [[7, 99], [], [9, 9, 99]]
    assert a.dtype == np.uint16


def test_bad_lines_are_reported_by_number_and_nothing_is_written(tmp_path):
    lines = [json.dumps({"text": "1 2"})] * 3
    lines[1] = "{not json"
    lines += [
        "",
        json.dumps({"other": "1"}),  # line 5: missing key
        json.dumps({"text": 5}),  # line 6: not a string
        json.dumps(["text"]),  # line 7: not an object
        json.dumps({"text": "1 x"}),  # line 8: the tokenizer refuses it
        json.dumps({"text": "1 500"}),  # line 9: id beyond the vocabulary
        json.dumps({"text": "3"}),
    ]
    path = write_lines(tmp_path / "bad.jsonl", lines)
    cfg = TokenizerConfig(tokenizer_type="NullTokenizer", vocab_size=100)
    with pytest.raises(ConfigError) as exc:
        preprocess_jsonl(path, tmp_path / "out", ["text"], cfg, workers=2, progress=False)
    text = str(exc.value)
    assert "6 bad lines; nothing was written" in text
    for line, what in [
        (2, "invalid JSON"),
        (5, "no key 'text'"),
        (6, "'text' is a number, not a string"),
        (7, "not a JSON object but a list"),
        (8, "cannot tokenize"),
        (9, "500 is outside the vocabulary"),
    ]:
        assert any(p.path == f"{path}:{line}" and what in p.message for p in exc.value.problems), (line, text)
    assert sorted(os.listdir(tmp_path)) == ["bad.jsonl"]


def test_many_bad_lines_are_listed_up_to_a_limit_then_counted(tmp_path):
    path = write_lines(tmp_path / "bad.jsonl", ["oops"] * 45 + [json.dumps({"text": "fine"})])
    with pytest.raises(ConfigError) as exc:
        preprocess_jsonl(path, tmp_path / "out", ["text"], BYTES, workers=1, progress=False)
    listed = [p.path for p in exc.value.problems]
    assert listed[:20] == [f"{path}:{i}" for i in range(1, 21)]
    assert "and 25 more bad lines" in str(exc.value)


def test_missing_input_wrong_key_and_empty_input(tmp_path, corpus):
    with pytest.raises(ConfigError, match="input file not found") as exc:
        preprocess_jsonl(tmp_path / "nope.jsonl", tmp_path / "o", ["text"], BYTES, progress=False)
    assert exc.value.problems[0].path == str(tmp_path / "nope.jsonl")
    with pytest.raises(ConfigError, match="directory .* does not exist"):
        preprocess_jsonl(corpus, tmp_path / "no" / "o", ["text"], BYTES, progress=False)

    with pytest.raises(ConfigError) as exc:
        preprocess_jsonl(corpus, tmp_path / "o", ["txt", "text"], BYTES, workers=2, progress=False)
    (problem,) = exc.value.problems  # one error for the key, not one per line
    assert problem.path == "json_keys" and "no line of" in problem.message and "'txt'" in problem.message
    assert "keys found: id, text" in problem.message and "did you mean text" in (problem.fix or "")
    assert not IndexedDataset.exists(str(tmp_path / "o_text_document"))

    empty = write_lines(tmp_path / "empty.jsonl", ["", "  "])
    with pytest.raises(ConfigError, match="holds no documents"):
        preprocess_jsonl(empty, tmp_path / "o", ["text"], BYTES, progress=False)


def test_a_worker_without_a_tokenizer_says_so():
    # preprocess_jsonl reports this before any work; a worker started without one still says what
    # is missing rather than failing inside build_tokenizer.
    with pytest.raises(ConfigError) as exc:
        _make_tokenizer(None, None)
    assert [p.path for p in exc.value.problems] == ["tokenizer"]
    assert "tokenizer_factory" in exc.value.problems[0].message


_DRIVER_PID = os.getpid()


def _tokenizer_failing_in_workers():
    from viaduct.data.tokenizers import ByteLevelTokenizer

    if os.getpid() != _DRIVER_PID:
        raise OSError("tokenizer file vanished")
    return ByteLevelTokenizer()


def test_a_worker_error_reaches_the_caller(corpus, tmp_path):
    with pytest.raises(OSError, match="tokenizer file vanished"):
        preprocess_jsonl(
            corpus, tmp_path / "o", ["text"], None, workers=2, progress=False,
            tokenizer_factory=_tokenizer_failing_in_workers,
        )  # fmt: skip
    assert sorted(os.listdir(tmp_path)) == ["corpus.jsonl"]


# ---------------------------------------------------------------------------- every tokenizer type

CORPUS = ["The quick brown fox jumps over the lazy dog.", "Hello world, hello there!", "naïve café 東京"] * 10


@pytest.fixture(scope="module")
def tokenizer_configs(tmp_path_factory) -> dict[str, TokenizerConfig]:
    """One config per tokenizer type, with its files made here."""
    root = tmp_path_factory.mktemp("tok")
    cfgs = {
        "ByteLevelTokenizer": BYTES,
        "NullTokenizer": TokenizerConfig(tokenizer_type="NullTokenizer", vocab_size=70000),
    }
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=alphabet)
    bpe.train_from_iterator(CORPUS, trainer)
    bpe.save(str(root / "tokenizer.json"))
    bpe.model.save(str(root))  # vocab.json + merges.txt
    cfgs["HuggingFaceTokenizer"] = TokenizerConfig(
        tokenizer_type="HuggingFaceTokenizer", tokenizer_model=str(root / "tokenizer.json")
    )
    cfgs["GPT2BPETokenizer"] = TokenizerConfig(
        tokenizer_type="GPT2BPETokenizer",
        vocab_file=str(root / "vocab.json"),
        merge_file=str(root / "merges.txt"),
    )
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS),
        model_writer=model,
        vocab_size=320,
        hard_vocab_limit=False,
        model_type="bpe",
        byte_fallback=True,
        minloglevel=2,
    )
    (root / "sp.model").write_bytes(model.getvalue())
    cfgs["SentencePieceTokenizer"] = TokenizerConfig(
        tokenizer_type="SentencePieceTokenizer", tokenizer_model=str(root / "sp.model")
    )
    ranks = [bytes([b]) for b in range(256)] + [b"th", b"he", b"the", b" the"]
    (root / "t.tiktoken").write_text(
        "".join(f"{base64.b64encode(t).decode()} {r}\n" for r, t in enumerate(ranks))
    )
    cfgs["TikTokenizer"] = TokenizerConfig(
        tokenizer_type="TikTokenizer", tokenizer_model=str(root / "t.tiktoken"), tiktoken_pattern="v2"
    )
    return cfgs


@pytest.mark.parametrize(
    "kind",
    [
        "ByteLevelTokenizer",
        "NullTokenizer",
        "HuggingFaceTokenizer",
        "GPT2BPETokenizer",
        "SentencePieceTokenizer",
        "TikTokenizer",
    ],
)
def test_every_tokenizer_type(kind, tokenizer_configs, tmp_path):
    if kind not in supported_tokenizer_types():
        pytest.skip(f"build_tokenizer does not support {kind} yet")
    cfg = tokenizer_configs[kind]
    texts = ["1 2 3", "65535 69999", "0"] if kind == "NullTokenizer" else [*CORPUS[:3], "new words: zebra ✓"]
    path = write_lines(tmp_path / "in.jsonl", [json.dumps({"text": t}) for t in texts * 4])
    stats = preprocess_jsonl(
        path, tmp_path / "out", ["text"], cfg, append_eod=True, workers=2, progress=False
    )
    tok = build_tokenizer(cfg)
    expected = [[*tok.tokenize(t), tok.eod] for t in texts * 4]
    assert documents(str(tmp_path / "out_text_document")) == expected
    assert stats.documents == len(expected) and stats.tokens == sum(map(len, expected))
    assert IndexedDataset(str(tmp_path / "out_text_document")).dtype == (
        np.int32 if tok.vocab_size >= 65500 else np.uint16
    )


# ---------------------------------------------------------------------------- command line


def run_cli(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "viaduct.cli.data", "preprocess", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


@pytest.mark.slow
def test_cli_writes_outputs_and_prints_a_summary(corpus, tmp_path):
    out = tmp_path / "cli"
    r = run_cli("--input", str(corpus), "--json-keys", "text", "--tokenizer-type", "ByteLevelTokenizer",
                "--output-prefix", str(out), "--append-eod", "--workers", "2")  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "300 documents" in r.stdout and "MB/s per worker" in r.stdout and "cli_text_document" in r.stdout
    assert "tokenizing" in r.stderr  # the progress bar
    assert len(IndexedDataset(str(out) + "_text_document")) == 300


def test_cli_errors_exit_2_without_traceback(tmp_path):
    r = run_cli("--input", str(tmp_path / "missing.jsonl"), "--tokenizer-type", "NullTokenizer",
                "--output-prefix", str(tmp_path / "o"))  # fmt: skip
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "missing.jsonl: input file not found" in r.stderr
    assert "--vocab-size: NullTokenizer needs it" in r.stderr  # every problem at once, named by flag


def test_run_data_bad_lines_and_wrong_key_return_2(tmp_path, capsys):
    bad = write_lines(tmp_path / "bad.jsonl", [json.dumps({"text": "a"}), "nope", json.dumps({"text": "b"})])
    args = [
        "--input",
        str(bad),
        "--tokenizer-type",
        "ByteLevelTokenizer",
        "--output-prefix",
        str(tmp_path / "o"),
    ]

    def run(*extra: str) -> int:
        return run_data(build_parser().parse_args(["data", "preprocess", *args, *extra]))

    assert run("--quiet") == 2
    out, err = capsys.readouterr()
    assert out == "" and f"{bad}:2: invalid JSON" in err and "1 bad line;" in err
    assert run("--json-keys", "txt", "--quiet") == 2
    assert "--json-keys: no line of" in capsys.readouterr().err
    assert not IndexedDataset.exists(str(tmp_path / "o_text_document"))
    bad.write_text(json.dumps({"text": "a"}) + "\n")
    assert run() == 0
    out, err = capsys.readouterr()
    assert out.startswith("1 documents, 1 tokens") and "tokenizing" in err


# ------------------------------------------------------------------------------- killed driver


def _process_table() -> dict[int, tuple[int, str, str]]:
    """pid -> (parent pid, start time, state) of every process, read from /proc."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:  # exited meanwhile
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # the name in parentheses may hold spaces
        table[int(entry)] = (int(fields[1]), fields[19], fields[0])
    return table


def _descendants(root: int) -> dict[int, str]:
    """pid -> start time of every living descendant of `root` (the start time tells a reused pid)."""
    table = _process_table()
    found: dict[int, str] = {}
    frontier = [root]
    while frontier:
        parent = frontier.pop()
        for pid, (ppid, start, state) in table.items():
            if ppid == parent and pid not in found and state != "Z":
                found[pid] = start
                frontier.append(pid)
    return found


def _alive(pids: dict[int, str]) -> list[int]:
    table = _process_table()
    return [p for p, start in pids.items() if p in table and table[p][1] == start and table[p][2] != "Z"]


@pytest.mark.slow
def test_workers_exit_when_the_driver_is_killed(tmp_path):
    if not Path("/proc/self/stat").exists():
        pytest.skip("needs /proc (Linux)")
    text = "the quick brown fox jumps over the lazy dog " * 40
    path = tmp_path / "big.jsonl"
    with open(path, "w") as f:  # about 150 MB: tokenizing takes far longer than the test waits
        line = json.dumps({"text": text}) + "\n"
        f.write(line * (150_000_000 // len(line)))
    cmd = [sys.executable, "-m", "viaduct", "data", "preprocess", "--input", str(path),
           "--tokenizer-type", "ByteLevelTokenizer", "--output-prefix", str(tmp_path / "out"),
           "--workers", "2", "--quiet"]  # fmt: skip
    driver = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    workers: dict[int, str] = {}
    try:
        deadline = time.monotonic() + 60
        while len(workers) < 2 and time.monotonic() < deadline and driver.poll() is None:
            time.sleep(0.1)
            workers = _descendants(driver.pid)
        assert driver.poll() is None, driver.stderr.read().decode()
        assert len(workers) >= 2, "the worker processes did not start"
        time.sleep(1.0)  # mid-run: the workers are tokenizing and reporting progress
        workers = _descendants(driver.pid)
        driver.kill()  # SIGKILL: the driver runs no cleanup at all
        driver.wait(10)
        deadline = time.monotonic() + 5
        while _alive(workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _alive(workers) == [], f"processes of the killed driver still run: {_alive(workers)}"
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait(10)
        for pid in _alive(workers):  # only processes this test started (same pid and start time)
            os.kill(pid, signal.SIGKILL)
