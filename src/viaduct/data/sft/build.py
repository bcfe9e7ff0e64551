"""`FinetuningDatasetConfig` -> one dataset per split (what `build_train_valid_test_datasets` returns).

Per split with samples to give (and enabled by do_validation / do_test): read and render the
records of its JSONL file, tokenize them into examples truncated to seq_length + 1 ids, then

- without packing: an `SFTDataset` of variable-length samples, with a `PadCollate` as its
  `collate_fn` (the data loader pads each micro-batch);
- with `packed_sequence_specs`: the split's packs, loaded from their cache when it is valid for the
  same data, tokenizer and options, else built and cached; a `PackedSFTDataset` of them.

In a distributed run the loop calls this on rank 0 first (it builds the pack caches) and then on
every rank (each loads them). Tokenization progress is shown on rank 0 only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import warnings
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from torch.utils.data import Dataset

from viaduct.config import ConfigError, Problem
from viaduct.data.sft.builtin import resolve_dataset_root
from viaduct.data.sft.chat import ChatTemplate
from viaduct.data.sft.dataset import PadCollate, SFTDataset, pad_multiple
from viaduct.data.sft.examples import BuildStats, Example, build_examples
from viaduct.data.sft.packing import PackedSFTDataset, file_sha256, load_packs, pack_examples, save_packs
from viaduct.data.sft.records import RecordReader, SFTDataError
from viaduct.training.config.finetuning import SPLIT_FILES, FinetuningDatasetConfig, SFTOptions

if TYPE_CHECKING:
    from viaduct.data.tokenizers import Tokenizer
    from viaduct.training.config import ConfigContainer

SPLITS = ("train", "validation", "test")
log = logging.getLogger(__name__)
_PROBE = "Hello, world! Grüße 你好 🙂 0123456789 \t\n<|endoftext|> <s></s>"


class SFTDataWarning(UserWarning):
    """Examples were dropped (no answer left after truncation) or a pack cache could not be written."""


def _rank() -> int:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return int(dist.get_rank())
    return int(os.environ.get("RANK", "0") or 0)


def tokenizer_fingerprint(tokenizer: Tokenizer) -> str:
    """A short hash telling tokenizers apart: type, vocabulary size, special ids, the ids of a probe text."""
    parts = [
        type(tokenizer).__name__,
        str(tokenizer.vocab_size),
        str(tokenizer.eod),
        str(tokenizer.bos),
        str(tokenizer.pad),
        ",".join(map(str, tokenizer.tokenize(_PROBE))),
    ]
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()[:16]


def _chat_template(cfg: ConfigContainer) -> tuple[ChatTemplate | None, str | None]:
    """The tokenizer's chat template and, when there is none, why."""
    tpl = ChatTemplate.from_config(cfg.tokenizer)
    return tpl, None if tpl is not None else "tokenizer.chat_template is not set"


def build_sft_datasets(
    cfg: ConfigContainer, tokenizer: Tokenizer, sample_counts: tuple[int, int, int]
) -> tuple[Dataset | None, Dataset | None, Dataset | None]:
    """One dataset per split (see module docstring); None where a split has no samples or is off."""
    ds = cfg.dataset
    assert isinstance(ds, FinetuningDatasetConfig)  # the caller dispatches on it
    if ds.dataset_root is None:
        raise ConfigError(
            Problem(
                "dataset.dataset_root", "must be set", None, fix="set dataset.dataset_root (see docs/sft.md)"
            )
        )
    options = ds.options()
    root = Path(os.path.expanduser(resolve_dataset_root(ds.dataset_root)))
    seq_length = ds.seq_length if ds.seq_length is not None else cfg.model.seq_length
    pack_size = ds.effective_packed_size(cfg.model.seq_length)
    max_tokens = (pack_size if pack_size is not None else seq_length) + 1
    enabled = {"train": True, "validation": ds.do_validation, "test": ds.do_test}
    wanted = [s for s, n in zip(SPLITS, sample_counts) if n > 0 and enabled[s]]

    # Loaded at the first messages record only, then shared by the splits.
    chat: list[tuple[ChatTemplate | None, str | None]] = []

    def load_chat() -> tuple[ChatTemplate | None, str | None]:
        if not chat:
            chat.append(_chat_template(cfg))
        return chat[0]

    def reader() -> RecordReader:
        return RecordReader(options, None, chat_loader=load_chat)

    def examples_of(split: str, path: Path) -> list[Example]:
        records = reader().read(path)
        if split == "train" and ds.max_train_samples is not None:
            records = records[: ds.max_train_samples]
        progress = f"tokenizing {path.name}" if _rank() == 0 else None
        examples, stats = build_examples(
            records, tokenizer, options, max_tokens, workers=ds.memmap_workers, progress=progress
        )
        _report(path, stats, max_tokens)
        if not examples:
            raise SFTDataError(
                Problem(
                    str(path),
                    f"has no example left to train on: all {stats.records} were dropped",
                    fix="raise dataset.seq_length, or shorten the prompts (dataset_kwargs.truncation_field)",
                )
            )
        return examples

    out: dict[str, Dataset | None] = dict.fromkeys(SPLITS)
    m = cfg.model
    collate = PadCollate(
        _pad_id(tokenizer),
        pad_multiple(
            options.pad_seq_to_mult,
            m.tensor_model_parallel_size,
            m.context_parallel_size,
            m.sequence_parallel,
        ),
        seq_length if options.pad_to_max_length else None,
    )
    for split, count in zip(SPLITS, sample_counts):
        if split not in wanted:
            continue
        path = root / SPLIT_FILES[split]
        if not path.is_file():
            raise SFTDataError(
                Problem(
                    "dataset.dataset_root",
                    f"holds no {SPLIT_FILES[split]} (the {split} split)",
                    str(root),
                    fix=f"add {SPLIT_FILES[split]}, or turn the split off (dataset.do_validation / do_test)",
                )
            )
        if pack_size is None:
            sft = SFTDataset(
                examples_of(split, path),
                count,
                seed=ds.seed,
                split=split,
                answer_only_loss=options.answer_only_loss,
            )
            sft.collate_fn = collate  # type: ignore[attr-defined]  # read by build_data_loader
            out[split] = sft
            continue
        packs = _packs(cfg, tokenizer, options, split, path, root, pack_size, examples_of)
        out[split] = PackedSFTDataset(packs, count, seed=ds.seed, split=split)
    return out["train"], out["validation"], out["test"]


def _pad_id(tokenizer: Tokenizer) -> int:
    pad = tokenizer.pad
    return int(pad) if pad is not None and 0 <= int(pad) < tokenizer.vocab_size else int(tokenizer.eod)


def pack_paths(
    cfg: ConfigContainer, tokenizer: Tokenizer, split: str, root: Path, size: int
) -> tuple[Path, Path]:
    """(.npy, metadata .json) of a split's pack cache: the explicit specs paths, else
    `<root>/packed/<tokenizer name or fingerprint>/<split>_<size>.npy` and `.json` beside it."""
    ds = cfg.dataset
    assert isinstance(ds, FinetuningDatasetConfig) and ds.packed_sequence_specs is not None
    specs = ds.packed_sequence_specs
    folder = root / "packed" / (specs.tokenizer_model_name or f"tok-{tokenizer_fingerprint(tokenizer)}")
    npy = folder / f"{split}_{size}.npy"
    explicit = {"train": specs.packed_train_data_path, "validation": specs.packed_val_data_path}.get(split)
    if explicit is not None:
        npy = Path(os.path.expanduser(explicit))
    meta = npy.with_suffix(".json")
    if split == "train" and specs.packed_metadata_path is not None:
        meta = Path(os.path.expanduser(specs.packed_metadata_path))
    return npy, meta


def _packs(
    cfg: ConfigContainer,
    tokenizer: Tokenizer,
    options: SFTOptions,
    split: str,
    path: Path,
    root: Path,
    size: int,
    examples_of: Callable[[str, Path], list[Example]],
) -> np.ndarray:
    ds = cfg.dataset
    assert isinstance(ds, FinetuningDatasetConfig) and ds.packed_sequence_specs is not None
    specs = ds.packed_sequence_specs
    npy, meta = pack_paths(cfg, tokenizer, split, root, size)
    try:
        source_sha256 = file_sha256(path)
    except OSError as exc:
        raise SFTDataError(
            Problem(
                str(path), f"cannot be read ({exc.strerror or exc})", fix="check the file and its permissions"
            )
        ) from None
    depends = {
        "source_sha256": source_sha256,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "options": asdict(options),
        "size": size,
        "seed": ds.seed,
        "pad_seq_to_mult": specs.pad_seq_to_mult,
        "max_train_samples": ds.max_train_samples if split == "train" else None,
        "chat_template": _chat_fingerprint(cfg),
    }
    fingerprint = hashlib.sha256(json.dumps(depends, sort_keys=True).encode()).hexdigest()
    packs = load_packs(npy, meta, fingerprint, size, int(tokenizer.vocab_size))
    if packs is not None:
        return packs
    examples = examples_of(split, path)
    packs = pack_examples(
        examples,
        size,
        seed=ds.seed,
        pad_id=_pad_id(tokenizer),
        answer_only_loss=options.answer_only_loss,
        pad_seq_to_mult=specs.pad_seq_to_mult,
    )
    info: dict[str, object] = {
        "fingerprint": fingerprint,
        "size": size,
        "source": str(path),
        "examples": len(examples),
        "fill": round(float(sum(len(e) - 1 for e in examples)) / (len(packs) * size), 4),
    }
    try:
        save_packs(packs, npy, meta, info)
    except OSError as exc:
        # A read-only dataset directory must not stop the run: the packs are used from memory.
        warnings.warn(
            SFTDataWarning(f"cannot write the pack cache {npy} ({exc}); packing again next run"), stacklevel=2
        )
    return packs


def _chat_fingerprint(cfg: ConfigContainer) -> str | None:
    """The chat template that renders messages records, wherever it comes from (the config or the
    tokenizer's directory), with the special tokens it sees: a change to either re-packs."""
    tpl = ChatTemplate.from_config(cfg.tokenizer)
    if tpl is None:
        return None
    text = json.dumps([tpl.text, sorted(tpl.special_tokens.items())])
    return hashlib.sha256(text.encode()).hexdigest()


def _report(path: Path, stats: BuildStats, max_tokens: int) -> None:
    if stats.dropped:
        shown = ", ".join(stats.dropped[:5]) + (
            f" and {len(stats.dropped) - 5} more" if len(stats.dropped) > 5 else ""
        )
        warnings.warn(
            SFTDataWarning(
                f"{path}: dropped {len(stats.dropped)} of {stats.records} examples whose answer did not fit "
                f"{max_tokens - 1} tokens after truncation ({shown}); raise dataset.seq_length to keep them"
            ),
            stacklevel=3,
        )
    if stats.truncated:  # expected with long records (Bridge truncates them the same way): info only
        log.info(
            "%s: truncated %d of %d examples to %d tokens", path, stats.truncated, stats.records, max_tokens
        )
