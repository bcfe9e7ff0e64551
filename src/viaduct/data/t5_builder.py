"""From a validated config to the T5 span-corruption datasets of each split (`dataset:
T5DatasetConfig` / `MockT5DatasetConfig`), as `viaduct.data.builder` does for GPT data.

Indexed data (`data_path`, `blend`, `blend_per_split`, `builtin:` corpora) is split by *documents*
(T5 samples are runs of one document's sentences), with the split shares and caches of the GPT
builder; a split drawn from several prefixes (a blend) is not built yet and refused clearly. Without
named data, or with the mock config, every split is synthetic (`MockT5Dataset`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from torch.utils.data import Dataset

from viaduct.config import ConfigError, Problem, Problems
from viaduct.data.builder import _open_prefixes, _plan
from viaduct.data.t5_dataset import MockT5Dataset, T5Dataset, t5_lengths
from viaduct.training.config.t5_dataset import MockT5DatasetConfig, T5DatasetConfig

if TYPE_CHECKING:
    from viaduct.data.tokenizers import Tokenizer
    from viaduct.training.config import ConfigContainer

SPLITS = ("train", "validation", "test")


def build_t5_datasets(
    cfg: ConfigContainer, tokenizer: Tokenizer, sample_counts: tuple[int, int, int]
) -> tuple[Dataset | None, Dataset | None, Dataset | None]:
    """(train, validation, test) T5 datasets holding at least `sample_counts` samples; None for a
    split with no samples or cut out by the split."""
    ds = cfg.dataset
    if not isinstance(ds, T5DatasetConfig):
        raise TypeError(f"build_t5_datasets needs a T5DatasetConfig, got {type(ds).__name__}")
    if ds.mock is None:  # not validated yet: derive split_matrix / effective_blend as validate() does
        ds.finalize()
    enc, dec = t5_lengths(ds, cfg.model.seq_length, getattr(cfg.model, "seq_length_dec", None))
    named = any(getattr(ds, n) is not None for n in ("data_path", "blend", "blend_per_split"))
    if isinstance(ds, MockT5DatasetConfig) or not named:
        matrix = ds.split_matrix if ds.split_matrix is not None else [(0.0, 1.0)] * len(SPLITS)
        return tuple(  # type: ignore[return-value]
            None
            if count <= 0 or share is None
            else MockT5Dataset(count, tokenizer, ds, split, seq_length=enc, seq_length_dec=dec)
            for split, count, share in zip(SPLITS, sample_counts, matrix)
        )
    plan = _plan(ds, sample_counts)
    p = Problems()
    for i, split in enumerate(plan):
        if len(split) > 1:
            p.add(
                "dataset.data_path" if ds.blend_per_split is None else "dataset.blend_per_split",
                f"blends {len(split)} prefixes into the {SPLITS[i]} split: T5 data blends are not built yet",
                [src.prefix for src, _ in split],
                fix="name one indexed prefix (merge the data first: viaduct data merge)",
            )
    p.raise_if_any()
    prefixes = _open_prefixes(ds, [src for split in plan for src, _ in split], tokenizer, cfg)
    out: list[Dataset | None] = []
    for i, split in enumerate(plan):
        if not split:
            out.append(None)
            continue
        src, (start, end) = split[0]
        info = prefixes[src.prefix]
        index = info.index()
        n_docs = len(index.document_indices) - 1
        docs = np.arange(round(start * n_docs), round(end * n_docs), dtype=np.int64)
        if docs.size == 0:
            raise ConfigError(
                Problem(
                    "dataset.split" if ds.blend_per_split is None else src.field,
                    f"gives the {SPLITS[i]} split no documents of {src.prefix} ({n_docs} in all)",
                    ds.split,
                    fix="give the split a larger share, or use more data",
                )
            )
        out.append(
            T5Dataset(
                index,
                docs,
                sample_counts[i],
                ds,
                tokenizer,
                SPLITS[i],
                seq_length=enc,
                seq_length_dec=dec,
                cache_dir=info.cache_dir,
            )
        )
    return out[0], out[1], out[2]
