"""From a validated config to the train / validation / test batch iterators the loop reads.

`get_sample_counts(cfg)` says how many samples each split must provide (Megatron's rules),
`build_train_valid_test_datasets` builds one dataset per split, and
`build_train_valid_test_data_iterators` wraps them in DataLoaders whose batch samplers resume at
the consumed sample counts, so a resumed run sees exactly the batches it would have seen.

Each DataLoader draws its worker seeds from its own generator (`loader_generator`), seeded from
`rng.seed`, the split and the consumed samples: creating an iterator never draws from torch's global
generator, whose stream (dropout) must continue unchanged when a run resumes from a checkpoint.

Synthetic data comes from `MockGPTDataset`; named data (indexed `.bin`/`.idx` prefixes, blends,
splits, `builtin:` corpora) from `viaduct.data.builder.build_gpt_datasets`; fine-tuning data
(`FinetuningDatasetConfig`: JSONL records, padded or packed) from `viaduct.data.sft.build`.
"""

from __future__ import annotations

import functools
import hashlib
import signal
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
from torch.utils.data import DataLoader, Dataset

from viaduct.config import ConfigError, Problems
from viaduct.data.mock import MockGPTDataset
from viaduct.data.samplers import PretrainingRandomSampler, PretrainingSampler, check_dataloader_type
from viaduct.training.config.dataset import GPTDatasetConfig, MockGPTDatasetConfig
from viaduct.training.config.finetuning import FinetuningDatasetConfig
from viaduct.training.config.t5_dataset import T5DatasetConfig

if TYPE_CHECKING:
    from viaduct.data.tokenizers import Tokenizer
    from viaduct.training.config import ConfigContainer

SPLITS = ("train", "validation", "test")
Sampler = PretrainingSampler | PretrainingRandomSampler


def get_sample_counts(cfg: ConfigContainer) -> tuple[int, int, int]:
    """Samples the (train, validation, test) splits must hold over the whole run.

    train: train_samples when given, else train_iters × global batch; validation: eval_iters × eval
    global batch per evaluation, with train_iters // eval_interval + 1 evaluations (one, after
    training, when eval_interval is None); test: one evaluation's worth. eval_iters 0 gives 0.
    """
    t = cfg.train
    gbs = t.global_batch_size or 0
    iters = t.effective_train_iters if t.effective_train_iters is not None else (t.train_iters or 0)
    train = t.train_samples if t.train_samples is not None else iters * gbs
    eval_gbs = t.effective_eval_global_batch_size or gbs
    per_eval = t.eval_iters * eval_gbs
    evaluations = iters // t.eval_interval + 1 if t.eval_interval else 1
    return train, per_eval * evaluations, per_eval


def build_train_valid_test_datasets(
    cfg: ConfigContainer, tokenizer: Tokenizer, sample_counts: tuple[int, int, int]
) -> tuple[Dataset | None, Dataset | None, Dataset | None]:
    """One dataset per split, sized to `sample_counts`; None for a split with no samples (or cut
    out by dataset.split)."""
    ds = cfg.dataset
    p = Problems()
    if isinstance(ds, FinetuningDatasetConfig):
        # JSONL instruction data (viaduct.data.sft); rank 0 first in a distributed run (pack caches).
        from viaduct.data.sft.build import build_sft_datasets

        return build_sft_datasets(cfg, tokenizer, sample_counts)
    if isinstance(ds, T5DatasetConfig):
        # Span corruption for encoder-decoder models; rank 0 first in a distributed run (index caches).
        from viaduct.data.t5_builder import build_t5_datasets

        return build_t5_datasets(cfg, tokenizer, sample_counts)
    if not isinstance(ds, GPTDatasetConfig):
        p.add(
            "dataset",
            f"{type(ds).__name__} is not supported yet",
            fix=f"use a mock dataset (dataset._target_: {MockGPTDatasetConfig.target()}) or fine-tuning "
            f"data ({FinetuningDatasetConfig.target()})",
        )
        raise ConfigError(p.items)
    if not isinstance(ds, MockGPTDatasetConfig) and any(
        getattr(ds, name) is not None for name in ("data_path", "blend", "blend_per_split")
    ):
        # Megatron indexed datasets (.bin/.idx): splits, blends, cached indices. In a distributed
        # run, call this on global rank 0 first, then barrier, then on the other ranks (cache hits).
        from viaduct.data.builder import build_gpt_datasets

        return build_gpt_datasets(cfg, tokenizer, sample_counts)
    seq_length = ds.seq_length if ds.seq_length is not None else cfg.model.seq_length
    # split_matrix is derived by validate(); a split given 0 weight there gets no dataset.
    matrix = ds.split_matrix if ds.split_matrix is not None else [(0.0, 1.0)] * len(SPLITS)
    out: list[Dataset | None] = []
    for split, count, share in zip(SPLITS, sample_counts, matrix):
        if count <= 0 or share is None:
            out.append(None)
        else:
            out.append(MockGPTDataset(count, seq_length, tokenizer, ds, split))
    return out[0], out[1], out[2]


def _ignore_signal(signum: int, _worker_id: int) -> None:
    """worker_init_fn: the exit signal must not kill a worker; the main process decides when to exit.

    Module-level (through functools.partial) so it pickles for spawn/forkserver start methods.
    """
    signal.signal(signum, signal.SIG_IGN)


def collate_samples(samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack samples into a batch whose tensors of one dtype and shape share one storage.

    A worker hands each storage to the main process through its own shared-memory segment, which
    costs far more than the copy: tokens, labels and position ids (int64) travel as one block and
    the loss mask as another, instead of a segment per key.
    """
    keys = list(samples[0])
    # Tensors stack into one block per dtype and shape (T5's encoder and decoder rows differ).
    by_dtype: dict[tuple[torch.dtype, tuple[int, ...]], list[str]] = {}
    for k in keys:
        by_dtype.setdefault((samples[0][k].dtype, tuple(samples[0][k].shape)), []).append(k)
    out: dict[str, torch.Tensor] = {}
    for names in by_dtype.values():
        # [key, batch, *shape]: one allocation; each key is a contiguous slice of it.
        block = torch.stack([torch.stack([s[n] for s in samples]) for n in names])
        for i, n in enumerate(names):
            out[n] = block[i]
    return {k: out[k] for k in keys}


def loader_generator(seed: int, split: str, consumed_samples: int, dp_rank: int = 0) -> torch.Generator:
    """The generator a DataLoader draws its workers' base seed from, a function of its arguments alone.

    Without one, `iter(DataLoader)` draws that seed from torch's global generator: a resumed run
    would then shift the stream its dropout masks come from. The seed mixes in the consumed samples
    so the workers of a resumed run do not replay the random draws of the run's first workers.
    """
    key = f"{seed}/{split}/{consumed_samples}/{dp_rank}".encode()
    return torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(key).digest()[:8], "little") >> 1)


def build_data_loader(
    dataset: Dataset,
    batch_sampler: Sampler,
    cfg: ConfigContainer,
    *,
    exit_signal: signal.Signals | None = None,
    generator: torch.Generator | None = None,
) -> DataLoader:
    """A DataLoader over `dataset` reading the index lists of `batch_sampler`, per cfg.dataset.

    `generator` (see `loader_generator`) gives the workers their seeds; None draws them from torch's
    global generator.
    """
    ds = cfg.dataset
    worker_init_fn = None
    if exit_signal is not None and cfg.train.exit_signal_handler_for_dataloader:
        worker_init_fn = functools.partial(_ignore_signal, int(exit_signal))
    persistent = ds.effective_persistent_workers
    if persistent is None:  # not validated: apply the same rule validate() does
        persistent = ds.persistent_workers and ds.num_workers > 0
    # Variable-length samples (fine-tuning data) bring the function that pads their micro-batches.
    collate = getattr(dataset, "collate_fn", None) or collate_samples
    return DataLoader(
        dataset,
        batch_sampler=batch_sampler,
        num_workers=ds.num_workers,
        pin_memory=ds.pin_memory and torch.cuda.is_available(),
        persistent_workers=persistent,
        worker_init_fn=worker_init_fn,
        collate_fn=collate,
        generator=generator,
    )


def build_train_valid_test_data_iterators(
    cfg: ConfigContainer,
    tokenizer: Tokenizer,
    *,
    dp_rank: int,
    dp_size: int,
    consumed_train_samples: int,
    consumed_valid_samples: int,
    train_samples: int,
    valid_samples: int,
    test_samples: int,
    exit_signal: signal.Signals | None = None,
) -> tuple[Iterator | None, Iterator | None, Iterator | None]:
    """Batch iterators for train, validation and test (None where a split has no samples).

    Train follows dataset.dataloader_type ("single" when None: finite, resumes at
    consumed_train_samples; "batch": the same for fine-tuning data, micro-batches padded; "cyclic":
    reshuffled epochs, infinite). Validation and test cycle
    forever through reshuffled epochs as in Megatron (validation resumes at consumed_valid_samples).
    Each batch is a dict of stacked tensors ([micro batch, ...]).
    """
    ds = cfg.dataset
    train_kind = check_dataloader_type(ds.dataloader_type, ds._variable_length_batches_)
    train_ds, valid_ds, test_ds = build_train_valid_test_datasets(
        cfg, tokenizer, (train_samples, valid_samples, test_samples)
    )
    seed = ds.random_seed if isinstance(ds, GPTDatasetConfig) else getattr(ds, "seed", 0)
    mbs = cfg.train.micro_batch_size
    if mbs is None:
        p = Problems()
        p.add("train.micro_batch_size", "must be set", None, fix="set train.micro_batch_size, e.g. 1")
        raise ConfigError(p.items)
    eval_mbs = cfg.train.effective_eval_micro_batch_size or mbs

    def loader(dataset: Dataset | None, split: str, kind: str, consumed: int, micro: int) -> Iterator | None:
        if dataset is None:
            return None
        size = len(dataset)  # type: ignore[arg-type]
        sampler: Sampler
        if kind in ("single", "batch"):
            # "batch": the same resumable ordered pass; the dataset shuffles its epochs and the
            # collate function pads each micro-batch to its longest sample.
            sampler = PretrainingSampler(size, consumed, micro, dp_rank, dp_size, drop_last=ds.drop_last)
        else:
            sampler = PretrainingRandomSampler(
                size, None, consumed, micro, dp_rank, dp_size, ds.data_sharding, seed
            )
        generator = loader_generator(cfg.rng.seed, split, consumed, dp_rank)
        return iter(build_data_loader(dataset, sampler, cfg, exit_signal=exit_signal, generator=generator))

    return (
        loader(train_ds, "train", train_kind, consumed_train_samples, mbs),
        loader(valid_ds, "validation", "cyclic", consumed_valid_samples, eval_mbs),
        loader(test_ds, "test", "cyclic", 0, eval_mbs),
    )
