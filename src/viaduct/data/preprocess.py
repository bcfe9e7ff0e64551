"""JSONL text -> Megatron indexed datasets, tokenized by several processes (`viaduct data preprocess`).

Each line of the input is one JSON object, i.e. one document. For every json key the output is
Megatron's pair `{output_prefix}_{key}_document.bin/.idx`. A value may be a string, or a list of
strings (sentences already split, Megatron's `--split-sentences` output): each non-empty sentence
becomes one sequence of the document. `append_eod` adds the end-of-document token to a non-empty
document's last sequence, as Megatron does; text that yields no tokens stays a document without
sequences (also as Megatron), so every key's output has one document per non-empty line.

The input is cut into byte ranges at line boundaries; each range is tokenized into its own shard
by a worker process and the shards are concatenated in order, so the output is byte-identical for
any number of workers. Bad lines (invalid JSON, a missing key, a value that is not text, text the
tokenizer rejects) never vanish silently: all of them are collected, the run finishes, and then one
`ConfigError` lists them by 1-based line number; nothing is written then. Empty lines are skipped.

Workers end with the driver however it ends, SIGKILL included (which runs no cleanup): on Linux
the kernel kills them when their parent dies (PR_SET_PDEATHSIG), and a watchdog thread in each
worker, checking every half second that the driver still runs, covers other systems and a driver
that died before the worker set that up. A killed run can still leave its temporary directory
(`.viaduct-preprocess-*`, next to the output) behind.
"""

from __future__ import annotations

import ctypes
import itertools
import json
import math
import multiprocessing as mp
import os
import queue
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from viaduct.config import ConfigError, Problem, Problems
from viaduct.config.errors import did_you_mean
from viaduct.data.indexed import IndexedDatasetWriter, token_dtype

if TYPE_CHECKING:
    from multiprocessing.queues import Queue

    from viaduct.data.tokenizers import Tokenizer
    from viaduct.training.config.tokenizer import TokenizerConfig

CHUNK_BYTES = 8 << 20  # input bytes per task: small enough to balance workers and show progress
MAX_REPORTED_LINES = 20  # bad lines listed by number; the rest are counted
_MAX_KEYS_SEEN = 50
_BATCH_LINES = 128  # lines tokenized per call when the tokenizer has tokenize_batch
_WATCHDOG_SECONDS = 0.5  # how often a worker checks that its driver still runs
_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
_REPORT_BYTES = 4 << 20
# numpy >= 2 raises OverflowError when a Python int does not fit the array's dtype, so token ids can
# be converted straight to the file dtype; older numpy wraps silently, so go through int64 there.
_CONVERT_DTYPE = None if int(np.__version__.split(".")[0]) >= 2 else np.dtype(np.int64)


@dataclass
class PreprocessStats:
    """What a preprocessing run produced, and how fast."""

    documents: int
    """JSON lines written as documents (the same count in every key's output)."""
    tokens: int
    """Tokens written, all keys together."""
    tokens_per_key: dict[str, int]
    input_bytes: int
    """Size of the input file."""
    seconds: float
    """Wall time of the whole run (tokenizing and merging)."""
    worker_seconds: float
    """Time the workers spent tokenizing, summed over workers."""
    worker_cpu_seconds: float
    """CPU time of the workers' processes while tokenizing (immune to other load on the machine)."""
    workers: int
    outputs: dict[str, str] = field(default_factory=dict)
    """json key -> output prefix (without .bin/.idx)."""
    empty_lines: int = 0

    @property
    def mb_per_s(self) -> float:
        return self.input_bytes / 1e6 / self.seconds if self.seconds > 0 else 0.0

    @property
    def mb_per_s_per_worker(self) -> float:
        """Input MB per second of one worker's tokenizing time."""
        return self.input_bytes / 1e6 / self.worker_seconds if self.worker_seconds > 0 else 0.0

    @property
    def mb_per_cpu_s(self) -> float:
        """Input MB per CPU second of the workers: one core's throughput, however busy the machine."""
        return self.input_bytes / 1e6 / self.worker_cpu_seconds if self.worker_cpu_seconds > 0 else 0.0

    def summary(self) -> str:
        outs = ", ".join(f"{p}.{{bin,idx}}" for p in self.outputs.values())
        return (
            f"{self.documents:,} documents, {self.tokens:,} tokens, {self.input_bytes / 1e6:.1f} MB "
            f"in {self.seconds:.1f} s: {self.mb_per_s:.2f} MB/s, {self.mb_per_s_per_worker:.2f} MB/s per "
            f"worker ({self.workers} worker{'s' if self.workers != 1 else ''}) -> {outs}"
        )


def output_prefix_for(output_prefix: str, key: str) -> str:
    """Megatron's name for a key's output: `{output_prefix}_{key}_document`."""
    return f"{output_prefix}_{key}_document"


# ---------------------------------------------------------------------------------------- worker


class _Settings(NamedTuple):
    """What every worker needs besides its tokenizer (picklable, sent once to each pool process)."""

    input_path: str
    json_keys: list[str]
    dtype: np.dtype
    append_eod: bool
    log_interval: int


_LineIds = list[list[list[int]]]
"""Token ids of one line: per json key, per sentence."""


@dataclass
class _Task:
    index: int
    start: int
    end: int
    shard_prefixes: list[str]  # one per json key


@dataclass
class _ChunkResult:
    index: int
    lines: int  # lines in the range (its line numbers start after the previous ranges' lines)
    documents: int = 0
    tokens: list[int] = field(default_factory=list)
    empty_lines: int = 0
    seconds: float = 0.0
    cpu_seconds: float = 0.0
    bad: list[tuple[int, str]] = field(default_factory=list)  # (line in range, message), first few
    bad_count: int = 0
    # Lines whose only fault is missing keys: missing keys -> (first few lines, count). Kept apart:
    # a key that no line has is one "wrong key" error, not a bad line each.
    missing: dict[frozenset[str], tuple[list[int], int]] = field(default_factory=dict)
    keys_found: Counter[str] = field(default_factory=Counter)
    keys_seen: set[str] = field(default_factory=set)


class _Worker:
    """Tokenizes byte ranges of the input into shards; one per process."""

    def __init__(
        self,
        input_path: str,
        json_keys: list[str],
        dtype: np.dtype,
        append_eod: bool,
        log_interval: int,
        tokenizer: Tokenizer,
        report: Callable[[int], None],
    ) -> None:
        self.input_path, self.keys, self.dtype, self.tok = input_path, json_keys, dtype, tokenizer
        self.eod = tokenizer.eod if append_eod else None
        self.vocab_size = tokenizer.vocab_size
        self.log_interval = max(1, log_interval)
        self.report = report
        batch = getattr(tokenizer, "tokenize_batch", None)  # optional fast path (one call per batch)
        self.tokenize_batch: Callable[[list[str]], list[list[int]]] | None = (
            batch if callable(batch) else None
        )

    def process(self, task: _Task) -> _ChunkResult:
        t0, c0 = time.perf_counter(), time.process_time()
        with open(self.input_path, "rb") as f:
            f.seek(task.start)
            data = f.read(task.end - task.start)
        lines = data.split(b"\n")
        if data.endswith(b"\n"):
            lines.pop()
        res = _ChunkResult(task.index, len(lines), tokens=[0] * len(self.keys))
        writers = [IndexedDatasetWriter(p, self.dtype) for p in task.shard_prefixes]
        try:
            pending: list[tuple[int, list[list[str]]]] = []
            batch = _BATCH_LINES if self.tokenize_batch else 1
            done = reported = docs_since = 0
            for i, line in enumerate(lines):
                done += len(line) + 1
                texts = self._parse(i, line, res)
                if texts is not None:
                    pending.append((i, texts))
                if len(pending) >= batch:
                    docs_since += self._flush(pending, writers, res)
                    pending = []
                # Every log_interval documents, or every few MB when lines yield no documents.
                if docs_since >= self.log_interval or done - reported >= _REPORT_BYTES:
                    self.report(done - reported)
                    reported, docs_since = done, 0
            self._flush(pending, writers, res)
            for w in writers:
                w.finalize()
        except BaseException:
            for w in writers:
                w.abort()
            raise
        self.report(task.end - task.start - reported)
        res.seconds = time.perf_counter() - t0
        res.cpu_seconds = time.process_time() - c0
        return res

    def _parse(self, i: int, line: bytes, res: _ChunkResult) -> list[list[str]] | None:
        """The sentences of each key on line `i`, or None (empty or bad line, recorded in `res`)."""
        raw = line.strip()
        if not raw:
            res.empty_lines += 1
            return None
        try:
            obj = json.loads(raw)
        except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError both are ValueErrors
            self._bad(res, i, f"invalid JSON ({exc})")
            return None
        if not isinstance(obj, dict):
            self._bad(res, i, f"not a JSON object but a {_json_type(obj)}")
            return None
        if len(res.keys_seen) < _MAX_KEYS_SEEN:
            res.keys_seen.update(list(obj)[: _MAX_KEYS_SEEN - len(res.keys_seen)])
        texts: list[list[str]] = []
        missing: list[str] = []
        errors: list[str] = []
        for key in self.keys:
            if key not in obj:
                missing.append(key)
                continue
            res.keys_found[key] += 1
            value = obj[key]
            if isinstance(value, str):
                texts.append([value])
            elif isinstance(value, list) and all(isinstance(s, str) for s in value):
                texts.append(value)
            else:
                errors.append(f"{key!r} is a {_json_type(value)}, not a string (or a list of strings)")
        if errors:
            errors += [f"no key {k!r}" for k in missing]
            self._bad(res, i, "; ".join(errors))
            return None
        if missing:
            lines_, count = res.missing.get(frozenset(missing), ([], 0))
            if len(lines_) < MAX_REPORTED_LINES:
                lines_.append(i)
            res.missing[frozenset(missing)] = (lines_, count + 1)
            return None
        return texts

    def _flush(
        self,
        pending: list[tuple[int, list[list[str]]]],
        writers: list[IndexedDatasetWriter],
        res: _ChunkResult,
    ) -> int:
        """Tokenize and write the pending lines; returns how many became documents."""
        if not pending:
            return 0
        ids = None
        if self.tokenize_batch is not None and len(pending) > 1:
            ids = self._tokenize_batched(self.tokenize_batch, pending)
        written = 0
        for n, (i, texts) in enumerate(pending):
            try:
                doc = (
                    ids[n] if ids is not None else [[self.tok.tokenize(s) for s in sents] for sents in texts]
                )
                seqs = [self._sequences(sent_ids) for sent_ids in doc]
            except Exception as exc:  # a tokenizer may raise anything on text it cannot handle
                self._bad(res, i, f"cannot tokenize: {type(exc).__name__}: {exc}")
                continue
            # Written only once every key is tokenized, so all keys' outputs stay aligned by document.
            for k, (w, s) in enumerate(zip(writers, seqs)):
                w.add_document(s)
                res.tokens[k] += sum(len(x) for x in s)
            res.documents += 1
            written += 1
        return written

    @staticmethod
    def _tokenize_batched(
        tokenize_batch: Callable[[list[str]], list[list[int]]], pending: list[tuple[int, list[list[str]]]]
    ) -> list[_LineIds] | None:
        flat = [s for _, texts in pending for sents in texts for s in sents]
        try:
            out = tokenize_batch(flat)
        except Exception:
            return None  # tokenize line by line to find the line at fault
        it = iter(out)
        return [[[next(it) for _ in sents] for sents in texts] for _, texts in pending]

    def _sequences(self, sent_ids: list[list[int]]) -> list[np.ndarray]:
        seqs = []
        for ids in sent_ids:
            if not len(ids):
                continue  # as Megatron: an empty sentence adds no sequence
            try:
                arr = np.array(ids, dtype=_CONVERT_DTYPE or self.dtype)
            except OverflowError:  # numpy >= 2 refuses ids that do not fit the dtype
                arr = np.array(ids, dtype=np.int64)
            if int(arr.max()) >= self.vocab_size or (arr.dtype.kind == "i" and int(arr.min()) < 0):
                bad = int(arr.max()) if int(arr.max()) >= self.vocab_size else int(arr.min())
                raise ValueError(
                    f"the tokenizer produced id {bad} outside its vocabulary [0, {self.vocab_size})"
                )
            seqs.append(arr if arr.dtype == self.dtype else arr.astype(self.dtype))
        if seqs and self.eod is not None:
            seqs[-1] = np.append(seqs[-1], np.array(self.eod, dtype=self.dtype))
        return seqs

    @staticmethod
    def _bad(res: _ChunkResult, i: int, message: str) -> None:
        res.bad_count += 1
        if len(res.bad) < MAX_REPORTED_LINES:
            res.bad.append((i, message if len(message) <= 300 else message[:297] + "..."))


def _json_type(value: object) -> str:
    names = {dict: "object", list: "list", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


_PoolSpec = tuple[_Settings, "TokenizerConfig | None", "Callable[[], Tokenizer] | None"]
"""What a pool worker builds its `_Worker` from: the settings and how to make the tokenizer."""

# State of a pool worker process, set by _init_pool_worker.
_POOL_WORKER: _Worker | None = None
_POOL_INIT_ERROR: BaseException | None = None


def _die_with_driver(driver_pid: int) -> None:
    """End this worker process when the driver process ends, however it ends.

    Without this a worker outlives a killed driver for ever: it waits on the task pipe, whose
    writing end its sibling workers also hold (inherited), so the driver's death never closes it.
    """
    parent = os.getppid()  # the driver, or the fork server that started this worker
    if sys.platform.startswith("linux"):
        # The kernel kills this process the moment the thread that started it ends: the driver's
        # main thread (the pool starts its workers from `submit`), so in effect the driver.
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        except (OSError, AttributeError):
            pass  # no prctl: the watchdog below still ends the worker

    def driver_gone() -> bool:
        if os.getppid() != parent:  # re-parented: the parent died
            return True
        try:
            os.kill(driver_pid, 0)
        except (ProcessLookupError, PermissionError):  # gone, or its pid now belongs to another user
            return True
        return False

    if driver_gone():  # died before prctl took effect: no signal will come
        os._exit(1)

    def watch() -> None:
        while not driver_gone():
            time.sleep(_WATCHDOG_SECONDS)
        os._exit(1)  # nothing to save: the driver that would merge this worker's shards is gone

    threading.Thread(target=watch, name="viaduct-driver-watchdog", daemon=True).start()


def _init_pool_worker(spec: _PoolSpec, progress: Queue[int], driver_pid: int) -> None:
    global _POOL_WORKER, _POOL_INIT_ERROR
    _die_with_driver(driver_pid)
    # The processes already use every core: a Rust thread pool per worker would only oversubscribe.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    settings, tok_cfg, factory = spec
    try:
        tok = _make_tokenizer(tok_cfg, factory)
    except Exception as exc:  # re-raised by the first task, where the driver sees the real error
        _POOL_INIT_ERROR = exc
        return
    _POOL_WORKER = _Worker(*settings, tok, progress.put)


def _run_pool_task(task: _Task) -> _ChunkResult:
    if _POOL_WORKER is None:
        raise _POOL_INIT_ERROR or RuntimeError("a preprocessing worker was not initialized")
    return _POOL_WORKER.process(task)


def _make_tokenizer(cfg: TokenizerConfig | None, factory: Callable[[], Tokenizer] | None) -> Tokenizer:
    if factory is not None:
        return factory()
    if cfg is None:  # preprocess_jsonl's argument check reports this first, with the other problems
        raise ConfigError(Problem("tokenizer", "a tokenizer config (or tokenizer_factory) is needed"))
    from viaduct.data.tokenizers import build_tokenizer

    return build_tokenizer(cfg)


# ---------------------------------------------------------------------------------------- driver


def split_ranges(path: str, n: int) -> list[tuple[int, int]]:
    """About `n` byte ranges of the file that start at line beginnings (fewer for small files)."""
    size = os.path.getsize(path)
    bounds = [0]
    with open(path, "rb") as f:
        for k in range(1, n):
            pos = k * size // n
            if pos <= bounds[-1]:
                continue
            f.seek(pos - 1)  # when the byte before `pos` ends a line, the range starts at `pos`
            f.readline()
            cut = f.tell()
            if cut >= size:
                break
            if cut > bounds[-1]:
                bounds.append(cut)
    bounds.append(size)
    return [(a, b) for a, b in itertools.pairwise(bounds) if b > a] or [(0, 0)]


def preprocess_jsonl(
    input_path: str,
    output_prefix: str,
    json_keys: Sequence[str],
    tokenizer_config: TokenizerConfig | None,
    *,
    append_eod: bool = False,
    workers: int = 1,
    progress: bool = True,
    log_interval: int = 1000,
    tokenizer_factory: Callable[[], Tokenizer] | None = None,
) -> PreprocessStats:
    """Tokenize the JSONL file into `{output_prefix}_{key}_document.bin/.idx`, one pair per key.

    `tokenizer_factory` (a picklable callable returning a tokenizer) replaces `tokenizer_config`
    for tokenizers that `build_tokenizer` does not know. Raises `ConfigError` for a missing input,
    bad arguments, keys that appear on no line and bad lines (listed by line number); on any error
    no output file is written. The progress bar goes to stderr.
    """
    t0 = time.perf_counter()
    input_path, output_prefix = os.fspath(input_path), os.fspath(output_prefix)
    keys = list(json_keys)
    _check_arguments(input_path, output_prefix, keys, workers, tokenizer_config, tokenizer_factory)
    tokenizer = _make_tokenizer(tokenizer_config, tokenizer_factory)  # config errors surface before any work
    dtype = token_dtype(tokenizer.vocab_size)

    size = os.path.getsize(input_path)
    n_ranges = max(1, math.ceil(size / CHUNK_BYTES))
    if workers > 1:
        n_ranges = math.ceil(max(n_ranges, workers) / workers) * workers
    ranges = split_ranges(input_path, n_ranges)

    out_dir = os.path.dirname(os.path.abspath(output_prefix))
    tmp = tempfile.mkdtemp(prefix=".viaduct-preprocess-", dir=out_dir)  # same disk: shards are big
    try:
        tasks = [
            _Task(i, a, b, [os.path.join(tmp, f"r{i:06d}_k{k}") for k in range(len(keys))])
            for i, (a, b) in enumerate(ranges)
        ]
        from tqdm import tqdm

        bar_args = {"unit": "B", "unit_scale": True, "unit_divisor": 1000, "mininterval": 0.5}
        with tqdm(total=size, desc="tokenizing", file=sys.stderr, disable=not progress, **bar_args) as bar:
            settings = _Settings(input_path, keys, dtype, append_eod, log_interval)
            used = 1 if len(tasks) == 1 else min(workers, len(tasks))
            if used == 1:
                worker = _Worker(*settings, tokenizer, bar.update)
                results = [worker.process(t) for t in tasks]
            else:
                results = _run_pool((settings, tokenizer_config, tokenizer_factory), tasks, used, bar.update)
        _raise_problems(input_path, keys, results)

        outputs = {key: output_prefix_for(output_prefix, key) for key in keys}
        for k, key in enumerate(keys):
            with IndexedDatasetWriter(outputs[key], dtype) as out:
                for t in tasks:
                    out.add_index(t.shard_prefixes[k])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    tokens = [sum(r.tokens[k] for r in results) for k in range(len(keys))]
    return PreprocessStats(
        documents=sum(r.documents for r in results),
        tokens=sum(tokens),
        tokens_per_key=dict(zip(keys, tokens)),
        input_bytes=size,
        seconds=time.perf_counter() - t0,
        worker_seconds=sum(r.seconds for r in results),
        worker_cpu_seconds=sum(r.cpu_seconds for r in results),
        workers=used,
        outputs=outputs,
        empty_lines=sum(r.empty_lines for r in results),
    )


def _run_pool(
    spec: _PoolSpec, tasks: list[_Task], workers: int, report: Callable[[int], object]
) -> list[_ChunkResult]:
    # ProcessPoolExecutor, not Pool: a worker that dies (killed, out of memory, failing start) raises
    # BrokenProcessPool here instead of being respawned forever while the driver waits.
    from concurrent.futures import ProcessPoolExecutor

    ctx = mp.get_context()
    progress = ctx.Queue()
    init_args = (spec, progress, os.getpid())
    with ProcessPoolExecutor(workers, ctx, initializer=_init_pool_worker, initargs=init_args) as pool:
        futures = [pool.submit(_run_pool_task, t) for t in tasks]
        while not all(f.done() for f in futures):
            try:
                report(progress.get(timeout=0.2))
            except queue.Empty:
                pass
        results = [f.result() for f in futures]  # re-raises a worker's exception here
    while True:  # what the workers reported after the last poll
        try:
            report(progress.get(timeout=0.05))
        except queue.Empty:
            break
    return results


def _check_arguments(
    input_path: str,
    output_prefix: str,
    keys: list[str],
    workers: int,
    tokenizer_config: TokenizerConfig | None,
    factory: Callable[[], Tokenizer] | None,
) -> None:
    p = Problems()
    if not os.path.exists(input_path):
        p.add(input_path, "input file not found", fix="check the --input path")
    elif not os.path.isfile(input_path):
        p.add(input_path, "is not a file", fix="point --input at a JSONL file")
    if not keys:
        p.add("json_keys", "name at least one json key", keys, fix="e.g. --json-keys text")
    dup = sorted(k for k, n in Counter(keys).items() if n > 1)
    if dup:
        p.add("json_keys", f"repeats {', '.join(dup)}", keys, fix="name each key once")
    if not isinstance(workers, int) or workers < 1:
        p.add("workers", "must be a positive number of processes", workers, fix="e.g. --workers 4")
    out_dir = os.path.dirname(os.path.abspath(output_prefix))
    if not output_prefix or output_prefix.endswith(os.sep):
        p.add("output_prefix", "must name files, not a directory", output_prefix, fix="e.g. out/my_corpus")
    elif not os.path.isdir(out_dir):
        p.add("output_prefix", f"directory {out_dir} does not exist", output_prefix, fix="create it first")
    if factory is None:
        if tokenizer_config is None:
            p.add("tokenizer", "a tokenizer config (or tokenizer_factory) is needed")
        else:
            try:
                tokenizer_config.finalize()  # the fields and files the chosen tokenizer needs
            except ConfigError as exc:
                p.extend(exc.problems)
    p.raise_if_any(header="cannot preprocess")


def _raise_problems(input_path: str, keys: list[str], results: list[_ChunkResult]) -> None:
    """One ConfigError with the keys no line has and every bad line (numbered from 1)."""
    found: Counter[str] = Counter()
    seen: set[str] = set()
    for r in results:
        found.update(r.keys_found)
        seen |= r.keys_seen
    p = Problems()
    if all(r.empty_lines == r.lines for r in results):
        p.add(input_path, "holds no documents (every line is empty)", fix="check the --input file")
        p.raise_if_any(header="cannot preprocess")
    never = [k for k in keys if not found[k]]
    for key in never:
        hint = did_you_mean(key, seen)
        fields = ", ".join(sorted(seen)[:20]) or "none"
        p.add(
            "json_keys",
            f"no line of {input_path} has the key {key!r} (keys found: {fields})",
            key,
            fix=hint or "name keys the JSON objects have",
        )

    bad: list[tuple[int, str]] = []
    count = 0
    first = 1  # line number of the first line of the current range
    for r in results:
        count += r.bad_count
        bad += [(first + i, msg) for i, msg in r.bad]
        for missing, (lines, n) in r.missing.items():
            really = sorted(missing - set(never))  # keys no line has are reported once, above
            if really:
                count += n
                text = "no key " + ", ".join(repr(k) for k in really)
                bad += [(first + i, text) for i in lines]
        first += r.lines
    bad.sort()
    for line, msg in bad[:MAX_REPORTED_LINES]:
        p.add(f"{input_path}:{line}", msg)
    if count > MAX_REPORTED_LINES:
        p.add(input_path, f"... and {count - MAX_REPORTED_LINES} more bad lines")
    if p:
        what = [f"{count} bad line{'s' if count != 1 else ''}"] if count else []
        what += [f"no key {k!r}" for k in never]
        p.raise_if_any(header=f"{input_path}: {', '.join(what)}; nothing was written")


__all__ = ["PreprocessStats", "output_prefix_for", "preprocess_jsonl", "split_ranges"]
