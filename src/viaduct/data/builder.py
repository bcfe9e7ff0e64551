"""From `dataset` (data_path / blend / blend_per_split / split) to train, validation and test datasets.

Megatron's BlendedMegatronDatasetBuilder rules, for each split with samples to give:

- one prefix without weights: a `GPTDataset` over the split's documents;
- several prefixes with weights (or one weighted prefix of `blend` / `data_path`): one `GPTDataset`
  per prefix, each sized ceil(ceil(N·w) × (1 + mid_level_dataset_surplus)) samples (w normalized),
  blended by a `BlendedDataset` of sum(ceil(N·w)) samples, a few more than N;
- several prefixes without weights: one `GPTDataset` of one epoch per prefix, weighed by its length,
  blended by a `BlendedDataset` of min(N, the epochs' samples together): the blend is capped at one
  epoch of every prefix, as in Megatron-Core. With `unweighted_blend_repeats_epochs` (opt-in) the
  epochs' sample counts are used as weights instead, so the blend gives all N samples.

The result is Megatron-Core's datasets sample for sample (tests/data/test_megatron_parity.py).

`split` ("969,30,1", derived into split_matrix) cuts every prefix by documents: split i takes
documents [round(start·n), round(end·n)). `blend_per_split` gives each split its own prefixes, whole.

Checks that fail as one `ConfigError`: a prefix whose .bin/.idx is missing, damaged, or holds no
documents or no tokens (naming the field that named it), a split that gets no documents or too few
tokens for one sample, a token id the tokenizer's vocabulary does not hold (the largest id of each
.bin is found by a scan, cached next to the indices). Prefixes are opened, checked and indexed in
a thread pool of `num_dataset_builder_threads`.

Distributed use: the builder takes no process group. Let global rank 0 build first, then a barrier,
then the other ranks build (they hit the caches); index files are written atomically, so ranks
that race are still safe.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import numpy as np
from torch.utils.data import Dataset

from viaduct.config import ConfigError, Problem, Problems
from viaduct.data.blended import BlendedDataset, blend_counts, normalize_weights
from viaduct.data.gpt_dataset import GPTDataset
from viaduct.data.index_cache import atomic_write_text, file_signature, resolve_cache_dir
from viaduct.data.indexed import CorruptIndexError, IndexedDataset, bin_path, idx_path
from viaduct.training.config.dataset import GPTDatasetConfig

if TYPE_CHECKING:
    from viaduct.data.tokenizers import Tokenizer
    from viaduct.training.config import ConfigContainer

SPLITS = ("train", "validation", "test")
FULL_SCAN_BYTES = 4 << 30  # .bin files up to this size get an exact max-token scan; larger ones a sample
_SAMPLE_BLOCKS, _BLOCK_TOKENS = 1024, 16384
T = TypeVar("T")


@dataclass
class _Source:
    """One prefix as a config field named it."""

    prefix: str  # resolved (builtin: names become real prefixes)
    weight: float | None
    field: str


@dataclass
class _Prefix:
    """What the builder knows about one prefix: its sequence count and, once opened, its index."""

    prefix: str
    num_sequences: int
    indexed: IndexedDataset | None
    cache_dir: Path
    mmap: bool = True

    def index(self) -> IndexedDataset:
        """The open index (opened now when per_dataset_sequences_path let the builder skip it)."""
        if self.indexed is None:
            indexed = IndexedDataset(self.prefix, mmap=self.mmap)
            self.verify(indexed)
            self.indexed = indexed
        return self.indexed

    def verify(self, indexed: IndexedDataset) -> None:
        if len(indexed) != self.num_sequences:
            raise ConfigError(
                Problem(
                    "dataset.per_dataset_sequences_path",
                    f"says {self.prefix!r} holds {self.num_sequences} sequences, "
                    f"but its index holds {len(indexed)}",
                    fix="regenerate the file, or unset dataset.per_dataset_sequences_path",
                )
            )


def build_gpt_datasets(
    cfg: ConfigContainer, tokenizer: Tokenizer, sample_counts: tuple[int, int, int]
) -> tuple[Dataset | None, Dataset | None, Dataset | None]:
    """(train, validation, test) datasets holding at least sample_counts samples; None for a split
    with no samples or cut out by the split."""
    ds = cfg.dataset
    if not isinstance(ds, GPTDatasetConfig):  # other dataset kinds name no .bin/.idx prefixes
        raise ConfigError(
            Problem(
                "dataset",
                f"{type(ds).__name__} names no indexed (.bin/.idx) data to build GPT datasets from",
                fix=f"use a GPT dataset (dataset._target_: {GPTDatasetConfig.target()}) and set "
                "dataset.data_path, blend or blend_per_split",
            )
        )
    if ds.mock is None:  # not validated yet: derive split_matrix / effective_blend the same way
        ds.finalize()
    seq_length = ds.seq_length or ds.sequence_length or cfg.model.seq_length
    plan = _plan(ds, sample_counts)
    prefixes = _open_prefixes(ds, [src for split in plan for src, _ in split], tokenizer, cfg)

    p = Problems()
    jobs: list[tuple[int, int, _Source, np.ndarray]] = []  # (split, place in its blend, source, documents)
    for i, split in enumerate(plan):
        for j, (src, (start, end)) in enumerate(split):
            n = prefixes[src.prefix].num_sequences
            beg, stop = round(start * n), round(end * n)
            if stop <= beg:
                p.add(
                    "dataset.split" if ds.blend_per_split is None else src.field,
                    f"gives the {SPLITS[i]} split no documents of {src.prefix} ({n} in all)",
                    ds.split,
                    fix="give the split a larger share, or use more data",
                )
            jobs.append((i, j, src, np.arange(beg, stop, dtype=np.int64)))
    p.raise_if_any()

    # How many samples each mid-level dataset must hold, and how long each blend is: Megatron-Core's
    # BlendedMegatronDatasetBuilder rules, so the blend gives its samples in its order.
    extra = int(bool(ds.add_extra_token_to_sequence))
    sizes: dict[tuple[int, int], int | None] = {}
    weights_of: dict[int, list[float] | None] = {}
    blend_size: dict[int, int] = {}
    for i, split in enumerate(plan):
        count = sample_counts[i]
        srcs = [src for src, _ in split]
        if not srcs:
            continue
        given = [s.weight for s in srcs if s.weight is not None]  # a blend weighs all prefixes or none
        weighted = len(given) == len(srcs)
        # One prefix is a plain GPT dataset, except one *weighted* prefix of a shared blend, which
        # Megatron blends like several (so its component gets the surplus too).
        if len(srcs) == 1 and (not weighted or ds.blend_per_split is not None):
            sizes[(i, 0)] = count
            continue
        if not weighted:
            # Weighed by size: each component is one epoch of its split, the blend weighs them by
            # their lengths and is capped at their sum (the components never repeat an epoch).
            docs = [d for k, _, _, d in jobs if k == i]
            per_epoch = [
                max(0, _tokens(prefixes[s.prefix], d) - extra) // seq_length for s, d in zip(srcs, docs)
            ]
            if not any(per_epoch):  # weights by size would all be 0
                raise ConfigError(
                    Problem(
                        "dataset.split" if ds.blend_per_split is None else srcs[0].field,
                        f"gives the {SPLITS[i]} split too few tokens for one sample of {seq_length} in "
                        f"any of {', '.join(idx_path(s.prefix) for s in srcs)}",
                        ds.split if ds.blend_per_split is None else [s.prefix for s in srcs],
                        fix="give the split a larger share of the data, more data, or a shorter seq_length",
                    )
                )
            if not ds.unweighted_blend_repeats_epochs:
                for j in range(len(srcs)):
                    sizes[(i, j)] = None
                weights_of[i] = None
                continue
            # Opted out of the cap: weigh each prefix by its epoch's samples, as if given as weights.
            given = [float(n) for n in per_epoch]
        w = [float(x) for x in normalize_weights(given)]
        weights_of[i] = w
        # Each component is asked for ceil(N·w) samples plus the surplus; the blend is as long as the
        # components' targets together (a few samples more than N).
        targets = [math.ceil(count * wd) for wd in w]
        blend_size[i] = sum(targets)
        surplus = ds.mid_level_dataset_surplus
        for j, target in enumerate(targets):
            sizes[(i, j)] = math.ceil(target * (1 + surplus))
        # The greedy order keeps each component within one sample above its share, so it can only
        # run short of a component when the surplus is under a sample or two; then (where Megatron
        # fails) the component is sized to what the blend takes from it.
        if any(math.ceil(wd * blend_size[i]) + 1 > (sizes[(i, j)] or 0) for j, wd in enumerate(w)):
            need = blend_counts(w, blend_size[i])  # normalizes again, as BlendedDataset does
            for j, nd in enumerate(need):
                sizes[(i, j)] = max(int(nd), sizes[(i, j)] or 0)

    def build(job: tuple[int, int, _Source, np.ndarray]) -> GPTDataset | ConfigError:
        i, j, src, docs = job
        info = prefixes[src.prefix]
        try:
            built = GPTDataset(
                info.indexed if info.indexed is not None else info.prefix,
                docs,
                sizes[(i, j)],
                seq_length,
                ds,
                tokenizer,
                SPLITS[i],
                cache_dir=info.cache_dir,
            )
        except ConfigError as err:  # e.g. a split too small for one sample: named by its field below
            field = "dataset.split" if ds.blend_per_split is None else src.field
            value = ds.split if ds.blend_per_split is None else src.prefix
            return ConfigError(
                [Problem(field, f"{q.path}: {q.message}", value, fix=q.fix) for q in err.problems]
            )
        if info.indexed is None and built._indexed is not None:  # a cache miss opened the index:
            info.verify(built._indexed)  # check the count per_dataset_sequences_path gave
        return built

    results = _parallel(build, jobs, ds.num_dataset_builder_threads)
    for r in results:
        if isinstance(r, ConfigError):
            p.extend(r.problems)
    p.raise_if_any(header="the datasets cannot be built")
    built = [r for r in results if isinstance(r, GPTDataset)]
    out: list[Dataset | None] = []
    for i in range(len(plan)):
        parts = [b for (k, _, _, _), b in zip(jobs, built) if k == i]
        if not parts:
            out.append(None)
        elif len(parts) == 1 and i not in blend_size:  # a weighted single prefix is still blended
            out.append(parts[0])
        else:
            cache = Path(ds.path_to_cache) if ds.path_to_cache else parts[0].cache_dir
            weights = weights_of[i]
            if weights is None:  # weighed by size: by the components' one-epoch lengths
                lengths = [len(b) for b in parts]
                kept = [k for k, n in enumerate(lengths) if n > 0]  # a split too small for a sample
                parts = [parts[k] for k in kept]
                out.append(
                    BlendedDataset(
                        parts,
                        [lengths[k] for k in kept],
                        min(sample_counts[i], sum(lengths)),
                        ds.random_seed,
                        cache,
                    )
                )
            else:
                out.append(BlendedDataset(parts, weights, blend_size[i], ds.random_seed, cache))
    return out[0], out[1], out[2]


# -------------------------------------------------------------------------------------------- plan


def _plan(ds: GPTDatasetConfig, counts: Sequence[int]) -> list[list[tuple[_Source, tuple[float, float]]]]:
    """Per split: the prefixes it reads and the [start, end) fraction of each one's documents."""
    plan: list[list[tuple[_Source, tuple[float, float]]]] = [[] for _ in SPLITS]
    if ds.blend_per_split is not None:
        for i, blend in enumerate(ds.blend_per_split):
            if blend is None or counts[i] <= 0:
                continue
            field = f"dataset.blend_per_split[{i}]"
            for src in _sources(blend, field):
                plan[i].append((src, (0.0, 1.0)))
        return plan
    blend = ds.effective_blend
    if blend is None:
        raise ConfigError("dataset: names no data (set dataset.data_path, blend or blend_per_split)")
    field = "dataset.data_path" if ds.data_path is not None else "dataset.blend"
    matrix = ds.split_matrix or [(0.0, 1.0)] * len(SPLITS)
    sources = _sources(blend, field)
    for i, share in enumerate(matrix):
        if share is not None and counts[i] > 0:
            plan[i] = [(src, share) for src in sources]
    return plan


def _sources(blend: tuple[list[str], list[float] | None], field: str) -> list[_Source]:
    from viaduct.data import builtin

    prefixes, weights = blend
    out = []
    for j, name in enumerate(prefixes):
        if builtin.is_builtin(name):
            prefix = builtin.resolve_dataset(name, field)
        else:
            prefix = os.path.expanduser(name)
        out.append(_Source(prefix, None if weights is None else float(weights[j]), field))
    return out


# ---------------------------------------------------------------------------------------- prefixes


def _open_prefixes(
    ds: GPTDatasetConfig, sources: list[_Source], tokenizer: Tokenizer, cfg: ConfigContainer
) -> dict[str, _Prefix]:
    """Check every prefix exists, learn its sequence count and check its token ids (in parallel)."""
    p = Problems()
    first: dict[str, _Source] = {}
    for src in sources:
        first.setdefault(src.prefix, src)
    for prefix, src in first.items():
        missing = [path for path in (idx_path(prefix), bin_path(prefix)) if not os.path.isfile(path)]
        if missing:
            p.add(
                src.field,
                f"names prefix {prefix!r}, but {' and '.join(missing)} "
                f"{'does' if len(missing) == 1 else 'do'} not exist",
                prefix,
                fix="give the path prefix without .bin/.idx; build the files with `viaduct data preprocess`",
            )
    counts = _sequence_counts(ds, list(first), p)
    p.raise_if_any()

    vocab = int(tokenizer.vocab_size)

    def open_one(prefix: str) -> tuple[_Prefix, int | None]:
        try:
            cache_dir = resolve_cache_dir(prefix, ds.path_to_cache)
        except OSError as err:
            raise ConfigError(
                f"dataset.path_to_cache: {err}; set dataset.path_to_cache to a writable directory"
            ) from err
        indexed = None
        if prefix in counts:
            n = counts[prefix]  # per_dataset_sequences_path: the index is opened only when needed
        else:
            indexed = IndexedDataset(prefix, mmap=ds.mmap_bin_files)
            n = len(indexed)
        info = _Prefix(prefix, n, indexed, cache_dir, ds.mmap_bin_files)
        if n == 0 or (indexed is not None and indexed.num_tokens == 0):
            return info, None  # reported below; there are no tokens to check
        return info, max_token_id(info, vocab)

    def opened(prefix: str) -> tuple[_Prefix, int | None] | ConfigError:
        try:
            return open_one(prefix)
        except CorruptIndexError as err:  # name the field too, and report every damaged prefix
            return ConfigError(
                [
                    Problem(first[prefix].field, f"{q.path}: {q.message}", prefix, fix=q.fix)
                    for q in err.problems
                ]
            )

    results = []
    for r in _parallel(opened, list(first), ds.num_dataset_builder_threads):
        if isinstance(r, ConfigError):
            p.extend(r.problems)
        else:
            results.append(r)
    for info, _ in results:
        empty = "no documents" if info.num_sequences == 0 else ""
        if not empty and info.indexed is not None and info.indexed.num_tokens == 0:
            empty = f"{info.num_sequences} sequences but no tokens"
        if empty:
            p.add(
                first[info.prefix].field,
                f"names prefix {info.prefix!r}, whose {idx_path(info.prefix)} holds {empty}",
                info.prefix,
                fix="preprocess non-empty text into it (viaduct data preprocess), or leave it out",
            )
    for info, top in results:
        if top is not None and top >= vocab:
            model_vocab = getattr(cfg.model, "vocab_size", None)
            p.add(
                bin_path(info.prefix),
                f"holds token id {top}, but the tokenizer's vocabulary has {vocab} ids "
                f"(tokenizer vocab_size {vocab}, model.vocab_size {model_vocab})",
                fix="use the tokenizer the data was preprocessed with (tokenizer.tokenizer_type / "
                "tokenizer_model), or a tokenizer with a larger vocabulary",
            )
    p.raise_if_any()
    return {info.prefix: info for info, _ in results}


def _sequence_counts(ds: GPTDatasetConfig, prefixes: list[str], p: Problems) -> dict[str, int]:
    """{prefix: number of sequences} from per_dataset_sequences_path ({} when unset)."""
    path = ds.per_dataset_sequences_path
    if path is None:
        return {}
    field = "dataset.per_dataset_sequences_path"
    try:
        with open(path) as f:
            table = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        fix = "give a JSON file {prefix: [num_sequences, num_documents]}"
        p.add(field, f"cannot be read as JSON: {err}", path, fix=fix)
        return {}
    if not isinstance(table, dict):
        p.add(field, "must hold a JSON object {prefix: [sequences, documents]}", path)
        return {}
    counts: dict[str, int] = {}
    for prefix in prefixes:
        entry = table.get(prefix)
        ok = isinstance(entry, list) and len(entry) == 2 and all(isinstance(v, int) and v >= 0 for v in entry)
        if entry is None:
            fix = "add [num_sequences, num_documents] for it"
            p.add(field, f"has no entry for prefix {prefix!r}", path, fix=fix)
        elif not ok:
            p.add(field, f"entry of {prefix!r} must be [num_sequences, num_documents]", entry)
        else:
            counts[prefix] = entry[0]
    return counts


def _tokens(info: _Prefix, documents: np.ndarray) -> int:
    return int(info.index().sequence_lengths[documents].sum(dtype=np.int64))


def max_token_id(info: _Prefix, vocab_size: int) -> int | None:
    """Largest token id in the prefix's .bin (None when its dtype cannot exceed `vocab_size`).

    Exact for files up to FULL_SCAN_BYTES; larger files are checked on an even sample of blocks,
    which catches data made with another tokenizer. Cached by the file signature.
    """
    sig = file_signature(info.prefix)
    key = hashlib.md5(json.dumps(sig, sort_keys=True).encode()).hexdigest()
    cache = info.cache_dir / f"{key}-max_token.json"
    if cache.is_file():
        try:
            return int(json.loads(cache.read_text())["max_token_id"])
        except (ValueError, KeyError, TypeError):
            pass  # unreadable: scan again
    dtype = info.index().dtype
    if dtype.kind in "iu" and np.iinfo(dtype).max < vocab_size:
        return None
    if os.path.getsize(bin_path(info.prefix)) == 0:
        return -1  # no tokens (and an empty file cannot be mapped)
    tokens = np.memmap(bin_path(info.prefix), dtype=dtype.newbyteorder("<"), mode="r")
    exact = tokens.nbytes <= FULL_SCAN_BYTES
    top = -1
    if tokens.size and exact:
        step = 1 << 24
        top = max(int(tokens[i : i + step].max()) for i in range(0, tokens.size, step))
    elif tokens.size:
        starts = np.linspace(0, tokens.size - _BLOCK_TOKENS, _SAMPLE_BLOCKS).astype(np.int64)
        top = max(int(tokens[s : s + _BLOCK_TOKENS].max()) for s in starts)
    del tokens
    atomic_write_text(cache, json.dumps({"max_token_id": top, "exact": exact, **sig}, indent=2))
    return top


def _parallel(fn: Callable[..., T], items: Sequence, threads: int) -> list[T]:
    if threads <= 1 or len(items) <= 1:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(max_workers=min(threads, len(items))) as pool:
        return list(pool.map(fn, items))
