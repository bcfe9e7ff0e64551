"""Data pipeline benchmarks (CPU). Prints one JSON line per result.

    python bench/data_bench.py --what preprocess [--mb 50] [--workers 1,2] [--tokenizer hf,direct,...]

* `preprocess`: `viaduct data preprocess` on ~50 MB of English JSONL (the Python documentation
  from `pydoc_data.topics`, paragraphs shuffled into documents) with a byte-level BPE tokenizer of
  8,192 ids trained here with the `tokenizers` library. Target: >= 5 MB/s of JSONL per worker.
  Tokenizers: `hf` is the registered HuggingFaceTokenizer type (skipped when `build_tokenizer` does
  not know it); `direct` calls `tokenizers.Tokenizer.encode` per document inside the worker;
  `direct-batch` calls `encode_batch_fast` on batches of documents (the `tokenize_batch` fast path);
  `tiktoken` runs the same BPE (same ids, checked) with the `tiktoken` library. TOKENIZERS_PARALLELISM
  is off, so each worker tokenizes on one core. `mb_per_s_per_worker` divides by the workers' wall
  time, `mb_per_cpu_s` by their CPU time (what one core does, even when other jobs share the machine);
  `ok` compares the latter with the target. `identical_to_first_run`: same .bin/.idx bytes as the first.

Each benchmark is a function `bench_<what>(args)` registered in BENCHES; add others beside it.
"""

from __future__ import annotations

import argparse
import base64
import functools
import json
import os
import random
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

TARGET_MB_PER_S_PER_WORKER = 5.0


# ---------------------------------------------------------------------------------------- inputs


def english_paragraphs() -> list[str]:
    """Paragraphs of the Python documentation that ships with Python (no download)."""
    from pydoc_data.topics import topics

    return [p.strip() for name in sorted(topics) for p in topics[name].split("\n\n") if p.strip()]


def write_jsonl(path: Path, target_mb: float, seed: int = 0) -> int:
    """~target_mb of {"text": ...} lines, documents of 1-12 shuffled paragraphs; returns bytes written."""
    rng = random.Random(seed)
    paras = english_paragraphs()
    target = int(target_mb * 1e6)
    written = 0
    with open(path, "w", encoding="utf-8") as f:
        while written < target:
            rng.shuffle(paras)
            i = 0
            while i < len(paras) and written < target:
                n = rng.randint(1, 12)
                line = json.dumps({"text": "\n\n".join(paras[i : i + n])}) + "\n"
                f.write(line)
                written += len(line.encode("utf-8"))
                i += n
    return written


def train_bpe(path: Path, vocab_size: int = 8192) -> None:
    """A byte-level BPE tokenizer (GPT-2 pre-tokenizer) trained on the documentation, as tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(english_paragraphs(), trainer=trainer)
    tok.save(str(path))


class DirectBPE:
    """The `tokenizers` library called directly: the Tokenizer protocol, plus `tokenize_batch` if asked."""

    def __init__(self, path: str, batch: bool = False) -> None:
        from tokenizers import Tokenizer

        self._tok = Tokenizer.from_file(path)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.eod = self._tok.token_to_id("<|endoftext|>")
        self.pad = None
        self.bos = None
        if batch:
            self.tokenize_batch = self._tokenize_batch

    def tokenize(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def _tokenize_batch(self, texts: list[str]) -> list[list[int]]:
        encode = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)  # fast: tokenizers >= 0.21
        return [e.ids for e in encode(texts, add_special_tokens=False)]

    def detokenize(self, ids: list[int]) -> str:
        return self._tok.decode(list(ids))


# GPT-2's pre-tokenization pattern: what the `tokenizers` ByteLevel pre-tokenizer splits with.
_GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def _byte_of_char() -> dict[str, int]:
    """Inverse of GPT-2's bytes -> printable characters map used by byte-level BPE vocabularies."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    chars = {b: b for b in printable}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = 256 + extra
            extra += 1
    return {chr(c): b for b, c in chars.items()}


class TiktokenBPE:
    """The same trained BPE run by `tiktoken`: ranks are the token ids (merge order), same ids out.

    Valid for a byte-level BPE with the GPT-2 pattern, no normalizer and merges in id order, which is
    what `train_bpe` makes; the benchmark checks the output is byte-identical to `direct`'s.
    """

    def __init__(self, path: str) -> None:
        import tiktoken

        spec = json.loads(Path(path).read_text())
        vocab: dict[str, int] = spec["model"]["vocab"]
        specials = {t["content"]: t["id"] for t in spec.get("added_tokens", [])}
        to_byte = _byte_of_char()
        ranks = {bytes(to_byte[c] for c in tok): i for tok, i in vocab.items() if tok not in specials}
        self._enc = tiktoken.Encoding(
            "bench-bpe", pat_str=_GPT2_PATTERN, mergeable_ranks=ranks, special_tokens=specials
        )
        self.vocab_size = max([*vocab.values(), *specials.values()]) + 1
        self.eod = specials["<|endoftext|>"]
        self.pad = None
        self.bos = None

    def tokenize(self, text: str) -> list[int]:
        return self._enc.encode_ordinary(text)

    def detokenize(self, ids: list[int]) -> str:
        return self._enc.decode(list(ids))


def write_tiktoken_file(tokenizer_json: Path, out: Path) -> Path:
    """The trained BPE as a `.tiktoken` file (base64 token bytes, rank), for viaduct's TikTokenizer."""
    spec = json.loads(tokenizer_json.read_text())
    specials = {t["content"] for t in spec.get("added_tokens", [])}
    to_byte = _byte_of_char()
    vocab = spec["model"]["vocab"]
    rows = sorted((i, bytes(to_byte[c] for c in tok)) for tok, i in vocab.items() if tok not in specials)
    out.write_text("".join(f"{base64.b64encode(b).decode()} {rank}\n" for rank, (_, b) in enumerate(rows)))
    return out


# ---------------------------------------------------------------------------------------- preprocess


def bench_preprocess(args: argparse.Namespace) -> list[dict]:
    from viaduct.data.preprocess import preprocess_jsonl
    from viaduct.data.tokenizers import supported_tokenizer_types
    from viaduct.training.config.tokenizer import TokenizerConfig

    # One core per worker, so that "per worker" means per core.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    work = Path(args.workdir or tempfile.mkdtemp(prefix="viaduct-data-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    data, tok_file = work / "data.jsonl", work / "tokenizer.json"
    t0 = time.perf_counter()
    size = write_jsonl(data, args.mb)
    train_bpe(tok_file)
    print(
        f"# {size / 1e6:.1f} MB of JSONL and a BPE tokenizer in {time.perf_counter() - t0:.1f} s ({work})",
        file=sys.stderr,
    )

    variants: dict[str, tuple[TokenizerConfig | None, Callable | None]] = {
        "hf": (TokenizerConfig(tokenizer_type="HuggingFaceTokenizer", tokenizer_model=str(tok_file)), None),
        "direct": (None, functools.partial(DirectBPE, str(tok_file))),
        "direct-batch": (None, functools.partial(DirectBPE, str(tok_file), batch=True)),
        "tiktoken": (None, functools.partial(TiktokenBPE, str(tok_file))),
        # viaduct's own TikTokenizer type on the same merges (ids shifted by its reserved specials).
        "tiktokenizer": (
            TokenizerConfig(
                tokenizer_type="TikTokenizer",
                tokenizer_model=str(write_tiktoken_file(tok_file, work / "bpe.tiktoken")),
                tiktoken_pattern="v2",
            ),
            None,
        ),
    }
    first_output: dict[int, Path] = {}
    results = []
    for name in args.tokenizer.split(","):
        cfg, factory = variants[name]
        for workers in (int(w) for w in args.workers.split(",")):
            row: dict = {"bench": "preprocess", "tokenizer": name, "workers": workers, "cpus": os.cpu_count()}
            if name == "hf" and "HuggingFaceTokenizer" not in supported_tokenizer_types():
                row["skipped"] = "build_tokenizer does not support HuggingFaceTokenizer yet"
                _emit(row, results)
                continue
            prefix = work / f"out_{name}_{workers}"
            stats = preprocess_jsonl(
                str(data),
                str(prefix),
                ["text"],
                cfg,
                append_eod=True,
                workers=workers,
                progress=not args.no_progress,
                tokenizer_factory=factory,
            )
            row.update(
                mb=round(stats.input_bytes / 1e6, 2),
                documents=stats.documents,
                tokens=stats.tokens,
                seconds=round(stats.seconds, 2),
                mb_per_s=round(stats.mb_per_s, 2),
                mb_per_s_per_worker=round(stats.mb_per_s_per_worker, 2),
                mb_per_cpu_s=round(stats.mb_per_cpu_s, 2),
                target_mb_per_s_per_worker=TARGET_MB_PER_S_PER_WORKER,
                ok=stats.mb_per_cpu_s >= TARGET_MB_PER_S_PER_WORKER,
            )
            # Every tokenizer and worker count must write the same bytes as the first run.
            out = Path(stats.outputs["text"])
            ref = first_output.setdefault(0, out)
            row["identical_to_first_run"] = all(
                Path(f"{out}.{e}").read_bytes() == Path(f"{ref}.{e}").read_bytes() for e in ("bin", "idx")
            )
            _emit(row, results)
    return results


def _emit(row: dict, results: list[dict]) -> None:
    print(json.dumps(row), flush=True)
    results.append(row)


# ---------------------------------------------------------------------------------------- read / index

TARGET_READ_TOKENS_PER_S_PER_WORKER = 2e6
TARGET_INDEX_SECONDS = 10.0


def token_file(work: Path, tokens: int, max_doc: int = 2000, vocab: int = 50_000, seed: int = 0) -> str:
    """An indexed dataset of `tokens` uint16 tokens in documents of 1-max_doc tokens (reused if present)."""
    import numpy as np

    from viaduct.data.indexed import IndexedDataset, IndexedDatasetWriter

    prefix = str(work / f"tokens_{tokens}_{max_doc}")
    if IndexedDataset.exists(prefix) and IndexedDataset(prefix).num_tokens == tokens:
        return prefix
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    with IndexedDatasetWriter(prefix, np.uint16) as w:
        left = tokens
        while left:
            chunk = rng.integers(0, vocab - 1, size=min(left, 1 << 24), dtype=np.uint16)
            ends = np.cumsum(rng.integers(1, max_doc + 1, size=2 * chunk.size // max_doc + 2))
            ends = np.append(ends[ends < chunk.size], chunk.size)
            chunk[ends - 1] = vocab - 1  # every document ends with the eod id
            for a, b in zip(np.concatenate(([0], ends[:-1])), ends):
                w.add_document(chunk[a:b])
            left -= chunk.size
    seconds = time.perf_counter() - t0
    print(f"# wrote {tokens / 1e6:.0f}M tokens in {seconds:.1f} s ({prefix})", file=sys.stderr)
    return prefix


def _gpt_dataset(prefix: str, seq_length: int, num_samples: int | None, cache: Path, **flags):
    import numpy as np

    from viaduct.data.gpt_dataset import GPTDataset
    from viaduct.data.indexed import IndexedDataset
    from viaduct.data.tokenizers import NullTokenizer
    from viaduct.training.config.dataset import GPTDatasetConfig

    indexed = IndexedDataset(prefix)
    cfg = GPTDatasetConfig(random_seed=1234, seq_length=seq_length, path_to_cache=str(cache), **flags)
    docs = np.arange(len(indexed))
    return GPTDataset(indexed, docs, num_samples, seq_length, cfg, NullTokenizer(50_000), "train")


def bench_index(args: argparse.Namespace) -> list[dict]:
    """GPT document/sample/shuffle index build (and cache load) for a file of --tokens tokens."""
    import shutil

    import numpy as np

    from viaduct.data.blended import blending_indices
    from viaduct.data.builder import _Prefix, max_token_id
    from viaduct.data.indexed import IndexedDataset

    work = Path(args.workdir or tempfile.mkdtemp(prefix="viaduct-data-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    prefix = token_file(work, args.tokens, args.max_doc_tokens)
    results: list[dict] = []
    for seq in (int(s) for s in args.seq_length.split(",")):
        for epochs in (1, 3):
            cache = work / f"cache_index_{seq}_{epochs}"
            shutil.rmtree(cache, ignore_errors=True)
            samples = epochs * args.tokens // seq - 1
            t0 = time.perf_counter()
            ds = _gpt_dataset(prefix, seq, samples, cache)
            build = time.perf_counter() - t0
            t0 = time.perf_counter()
            hit = _gpt_dataset(prefix, seq, samples, cache)
            load = time.perf_counter() - t0
            assert ds.built_anew and not hit.built_anew
            row = {
                "bench": "index",
                "tokens": args.tokens,
                "max_doc_tokens": args.max_doc_tokens,
                "documents": int(ds.documents.size),
                "seq_length": seq,
                "epochs": epochs,
                "samples": len(ds),
                "build_s": round(build, 3),
                "cache_hit_s": round(load, 3),
                "target_s": TARGET_INDEX_SECONDS,
                "ok": build < TARGET_INDEX_SECONDS,
            }
            _emit(row, results)
    scan_cache = work / "max_token"
    shutil.rmtree(scan_cache, ignore_errors=True)
    scan_cache.mkdir()
    indexed = IndexedDataset(prefix)
    t0 = time.perf_counter()
    top = max_token_id(_Prefix(prefix, len(indexed), indexed, scan_cache), 50_000)
    seconds = round(time.perf_counter() - t0, 3)
    row = {"bench": "index", "what": "vocab check (max token id scan)", "tokens": args.tokens}
    _emit({**row, "max_token_id": top, "seconds": seconds}, results)
    t0 = time.perf_counter()
    blending_indices(np.array([0.5, 0.3, 0.2]), 10_000_000)
    seconds = round(time.perf_counter() - t0, 3)
    row = {"bench": "index", "what": "blend of 3 datasets", "samples": 10_000_000}
    _emit({**row, "seconds": seconds}, results)
    return results


def bench_read(args: argparse.Namespace) -> list[dict]:
    """Samples/s and tokens/s reading shuffled GPT samples through a DataLoader, per loader worker."""
    import itertools

    import torch
    from torch.utils.data import DataLoader

    from viaduct.data.loaders import collate_samples

    work = Path(args.workdir or tempfile.mkdtemp(prefix="viaduct-data-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    prefix = token_file(work, args.tokens, args.max_doc_tokens)
    results: list[dict] = []
    flag_sets = {"plain": {}, "eod_mask+reset_pos": {"eod_mask_loss": True, "reset_position_ids": True}}
    for seq in (int(s) for s in args.seq_length.split(",")):
        for label, flags in flag_sets.items():
            ds = _gpt_dataset(prefix, seq, None, work / "cache_read", **flags)
            for workers in (int(w) for w in args.loader_workers.split(",")):
                # Sample ids 0, 1, 2, ... cycling: the dataset's shuffle index makes the reads random.
                cycle = itertools.islice(itertools.cycle(range(len(ds))), 1 << 40)
                loader = DataLoader(
                    ds,
                    batch_size=args.batch_size,
                    sampler=cycle,
                    num_workers=workers,
                    collate_fn=collate_samples,
                )
                it = iter(loader)
                next(it)  # start the workers and fault in the index pages
                samples, t0 = 0, time.perf_counter()
                while time.perf_counter() - t0 < args.seconds:
                    batch = next(it)
                    samples += batch["tokens"].shape[0]
                wall = time.perf_counter() - t0
                del it
                per = max(workers, 1)
                tps = samples * seq / wall / per
                row = {
                    "bench": "read",
                    "seq_length": seq,
                    "flags": label,
                    "loader_workers": workers,
                    "batch_size": args.batch_size,
                    "samples_per_s_per_worker": round(samples / wall / per, 1),
                    "tokens_per_s_per_worker": round(tps),
                    "target_tokens_per_s_per_worker": TARGET_READ_TOKENS_PER_S_PER_WORKER,
                    "ok": tps >= TARGET_READ_TOKENS_PER_S_PER_WORKER,
                    "torch_threads": torch.get_num_threads(),
                }
                _emit(row, results)
    return results


# ---------------------------------------------------------------------------------------- main

BENCHES: dict[str, Callable[[argparse.Namespace], list[dict]]] = {
    "preprocess": bench_preprocess,
    "read": bench_read,
    "index": bench_index,
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--what", choices=["preprocess", "read", "index"], default="preprocess")
    p.add_argument("--workdir", help="where inputs and outputs go (default: a new temporary directory)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    pre = p.add_argument_group("preprocess")
    pre.add_argument("--mb", type=float, default=50.0, help="size of the generated JSONL in MB")
    pre.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    pre.add_argument(
        "--tokenizer",
        default="hf,direct,direct-batch,tiktoken",
        help="comma-separated: hf, direct, direct-batch, tiktoken, tiktokenizer",
    )
    rd = p.add_argument_group("read / index")
    rd.add_argument("--tokens", type=int, default=100_000_000, help="tokens in the generated indexed dataset")
    rd.add_argument("--max-doc-tokens", type=int, default=2000, help="documents have 1 to this many tokens")
    rd.add_argument("--seq-length", default="2048,128", help="comma-separated sample lengths")
    rd.add_argument("--loader-workers", default="0,1", help="comma-separated DataLoader worker counts (read)")
    rd.add_argument("--batch-size", type=int, default=8, help="DataLoader batch size (read)")
    rd.add_argument("--seconds", type=float, default=5.0, help="seconds of reading per measurement (read)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.what not in BENCHES:
        print(f"--what {args.what}: not written yet", file=sys.stderr)
        return 2
    BENCHES[args.what](args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
