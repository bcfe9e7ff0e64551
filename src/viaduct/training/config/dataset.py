"""`dataset`: which data to train on and how to load it.

`DataloaderConfig` holds the data-loader settings every dataset kind shares; `GPTDatasetConfig`
describes Megatron-style indexed datasets (`.bin`/`.idx` prefixes, blends and splits) and falls
back to synthetic tokens when no data is named; `MockGPTDatasetConfig` always uses synthetic tokens.

Values the user gives are never rewritten: what `finalize()` resolves goes to derived fields
(`effective_blend`, `split_matrix`, `mock`, `effective_persistent_workers`).
"""

import math
from dataclasses import dataclass
from typing import ClassVar, Literal

from viaduct.config import ConfigBase, Problems, derived, unsupported
from viaduct.training.config._checks import file_must_exist, positive

Blend = tuple[list[str], list[float] | None]
"""Dataset prefixes and their weights (None: weight by size)."""

_SPLITS = ("train", "validation", "test")

DATALOADER_TYPES_SUPPORTED = ("single", "cyclic")
"""The dataloader_type values the training loop builds for every dataset ("external" is not built)."""

VARIABLE_LENGTH_DATALOADER_TYPES = ("batch",)
"""Built only for datasets whose samples vary in length (fine-tuning data): padded micro-batches."""


def dataloader_type_problem(
    dataloader_type: str | None, variable_length: bool = False
) -> tuple[str, str] | None:
    """(rule, fix) when the loop cannot build `dataloader_type`; None when it can (None means "single").

    `variable_length`: the dataset's samples vary in length (`_variable_length_batches_` of its
    config), so "batch" (micro-batches padded to their longest sample) is built for it.
    The one statement of this rule: validation and the data loaders both ask it.
    """
    if dataloader_type is None or dataloader_type in DATALOADER_TYPES_SUPPORTED:
        return None
    if variable_length and dataloader_type in VARIABLE_LENGTH_DATALOADER_TYPES:
        return None
    if dataloader_type in VARIABLE_LENGTH_DATALOADER_TYPES:
        return (
            f"{dataloader_type} is not supported yet for this dataset (it pads variable-length samples, "
            "which only fine-tuning datasets have)",
            'set dataset.dataloader_type to "single" (one resumable pass) or "cyclic" (reshuffled epochs), '
            "or use fine-tuning data (dataset=finetuning)",
        )
    return (
        f"{dataloader_type} is not supported yet",
        'set dataset.dataloader_type to "single" (one resumable pass) or "cyclic" (reshuffled epochs)',
    )


@dataclass(kw_only=True)
class DataloaderConfig(ConfigBase):
    """Data-loader settings shared by every dataset kind."""

    _component_: ClassVar[str] = "dataset"
    _abstract_config_ = True
    _variable_length_batches_: ClassVar[bool] = False
    """True where samples vary in length, so "batch" (padded micro-batches) is built."""

    dataloader_type: Literal["single", "cyclic", "batch", "external"] | None = None
    """Sampler: "single" (one resumable pass), "cyclic" (reshuffled epochs), "batch" (fine-tuning data)."""

    num_workers: int = 2
    """Data-loader worker processes per rank (0 loads in the training process)."""

    data_sharding: bool = True
    """Shard the sample order over data-parallel ranks."""

    pin_memory: bool = True
    """Put batches in pinned host memory for faster copies to the accelerator."""

    drop_last: bool = True
    """Drop the last incomplete batch."""

    persistent_workers: bool = True
    """Keep worker processes alive between epochs (ignored when num_workers is 0)."""

    trust_remote_code: bool | None = unsupported("loading Hugging Face datasets", default=None)
    """Allow Hugging Face datasets to run code from their repository."""

    effective_persistent_workers: bool | None = derived()
    """persistent_workers, except False when num_workers is 0 (PyTorch rejects that combination)."""

    _legacy_fields_: ClassVar[dict[str, str]] = {
        "dataloader_save": "Energon data-loader state is not built",
        "dataloader_load": "Energon data-loader state is not built",
    }

    def finalize(self) -> None:
        """Check the settings and derive what they resolve to."""
        p = Problems()
        self._check(p)
        p.raise_if_any()
        self._derive_values()

    def _check(self, p: Problems) -> None:
        positive(p, self, "num_workers", zero_ok=True)
        problem = dataloader_type_problem(self.dataloader_type, self._variable_length_batches_)
        if problem is not None:
            p.add("dataloader_type", problem[0], self.dataloader_type, fix=problem[1])

    def _derive_values(self) -> None:
        # A default persistent_workers=True with num_workers=0 (usual when debugging) is not an
        # error: there are no workers to keep, so the effective value is simply False.
        self.derive(
            "effective_persistent_workers",
            self.persistent_workers and self.num_workers > 0,
            "persistent_workers, False without workers",
        )


@dataclass(kw_only=True)
class GPTDatasetConfig(DataloaderConfig):
    """Megatron indexed datasets (blends of `.bin`/`.idx` prefixes split into train/validation/test)."""

    _aliases_ = ("gpt",)

    seq_length: int | None = None
    """Tokens per sample; None takes model.seq_length (the model owns the value)."""

    sequence_length: int | None = None
    """Megatron Core's name for seq_length, accepted as in Megatron Bridge; must agree with seq_length."""

    random_seed: int = 1234
    """Seed of the dataset sample order and of blending."""

    data_path: str | list[str] | None = None
    """Data prefixes as Megatron's --data-path: "a b" or [a, b], optionally weighted ["0.3", a, "0.7", b]."""

    blend: Blend | None = None
    """Data prefixes and optional weights, ([prefix, ...], [weight, ...] or None); split by `split`."""

    blend_per_split: list[Blend | None] | None = None
    """Separate blends for train, validation and test (excludes blend, data_path and split)."""

    split: str | None = None
    """Train/validation/test proportions such as "969,30,1" (required with blend or data_path)."""

    path_to_cache: str | None = None
    """Directory for the dataset index caches; None puts them next to the data."""

    mmap_bin_files: bool = True
    """Memory-map the .bin files instead of reading them."""

    reset_position_ids: bool = False
    """Restart position ids after each end-of-document token."""

    reset_attention_mask: bool = False
    """Stop attention across end-of-document tokens."""

    eod_mask_loss: bool = False
    """Exclude end-of-document tokens from the loss."""

    create_attention_mask: bool = True
    """Let the dataset build document masks (with reset_attention_mask); the causal mask is the kernel's."""

    num_dataset_builder_threads: int = 1
    """Threads that build the dataset indices."""

    mid_level_dataset_surplus: float = 0.005
    """Extra fraction of samples built per blended component, so blending never runs short."""

    unweighted_blend_repeats_epochs: bool = False
    """A blend without weights repeats its prefixes' epochs to give every requested sample, rather than
    stopping after one epoch of each (Megatron-Core's rule, the default)."""

    add_extra_token_to_sequence: bool = True
    """Read seq_length + 1 tokens per sample so inputs and shifted labels both have seq_length tokens."""

    drop_last_partial_validation_sequence: bool = True
    """Drop the last validation sample when it is shorter than seq_length."""

    per_dataset_sequences_path: str | None = None
    """JSON file of precomputed sequence/document counts per prefix (skips reading each index)."""

    effective_blend: Blend | None = derived()  # noqa: RUF009 (derived field)
    """blend, or the blend parsed from data_path."""

    split_matrix: list[tuple[float, float] | None] | None = derived()  # noqa: RUF009 (derived field)
    """[start, end) fractions of the train/validation/test splits (None: split not used)."""

    mock: bool | None = derived()
    """True when no data is named: synthetic tokens are used."""

    _legacy_fields_: ClassVar[dict[str, str]] = {
        "tokenizer": "a runtime object, built from the tokenizer component",
        "split_vector": "derived by Megatron Core; viaduct derives split_matrix",
        "token_dtype_code": "derived at runtime from the vocabulary size",
        "sequences_per_dataset": "loaded at build time from per_dataset_sequences_path",
        "skip_getting_attention_mask_from_dataset": "use create_attention_mask",
        "multiple_validation_sets": "multiple validation sets are not built",
        "full_validation": "full-dataset validation is not built",
        "allow_ambiguous_pad_tokens": "pad tokens come from the tokenizer",
        "fast_cache_load": "Megatron Core index-cache detail",
        "defer_npy_index_mmap": "Megatron Core index-cache detail",
        "object_storage_cache_path": "object-storage datasets are not built",
        "s3_cache_path": "object-storage datasets are not built",
        "data_parallel_size": "runtime value, taken from the process groups",
        "context_parallel_size": "runtime value, taken from the model",
        "sequence_parallel_size": "runtime value, taken from the model",
        "hybrid_context_parallel": "hybrid context parallelism is not built",
        "inter_document_masking": "use reset_attention_mask",
    }

    def _check(self, p: Problems) -> None:
        super()._check(p)
        positive(p, self, "seq_length")
        positive(p, self, "sequence_length")
        if None not in (self.seq_length, self.sequence_length) and self.seq_length != self.sequence_length:
            p.add(
                "sequence_length",
                f"conflicts with seq_length ({self.seq_length}, from {self.source_of('seq_length')})",
                self.sequence_length,
                fix="set only dataset.seq_length (sequence_length is its Megatron Core name)",
            )
        if self.random_seed is not None and not 0 <= self.random_seed < 2**32:
            p.add(
                "random_seed",
                "must be in [0, 2**32)",
                self.random_seed,
                fix="set dataset.random_seed to a non-negative 32-bit number",
            )
        if self.reset_attention_mask and not self.create_attention_mask:
            p.add(
                "reset_attention_mask",
                "needs create_attention_mask: the per-document mask is built by the dataset",
                True,
                fix="set dataset.create_attention_mask=true, or dataset.reset_attention_mask=false",
            )
        positive(p, self, "num_dataset_builder_threads")
        positive(p, self, "mid_level_dataset_surplus", zero_ok=True)
        file_must_exist(p, self, "per_dataset_sequences_path", "the sequence-count file")

        if self.blend is not None and self.data_path is not None:
            p.add(
                "data_path",
                "blend and data_path both name the data",
                self.data_path,
                fix="keep one of dataset.blend / dataset.data_path",
            )
        if self.blend_per_split is not None:
            for name in ("blend", "data_path", "split"):
                if getattr(self, name) is not None:
                    p.add(
                        name,
                        "cannot be combined with blend_per_split",
                        getattr(self, name),
                        fix=f"remove dataset.{name} or dataset.blend_per_split",
                    )
            if len(self.blend_per_split) != len(_SPLITS):
                p.add(
                    "blend_per_split",
                    f"needs {len(_SPLITS)} entries ({', '.join(_SPLITS)}; None for an unused split)",
                    self.blend_per_split,
                    fix="give dataset.blend_per_split three blends",
                )
            for i, b in enumerate(self.blend_per_split):
                _check_blend(p, f"blend_per_split[{i}]", b)
        _check_blend(p, "blend", self.blend)
        parsed = self._data_path_blend(p)
        _check_blend(p, "data_path", parsed)

        named = self.blend is not None or self.data_path is not None
        if named and self.split is None:
            p.add(
                "split",
                "must be set when blend or data_path names the data",
                None,
                fix='set dataset.split, e.g. "969,30,1"',
            )
        if self.split is not None:
            _parse_split(p, self.split)

    def _derive_values(self) -> None:
        super()._derive_values()
        blend = self.blend if self.blend is not None else self._data_path_blend(Problems())
        self.derive("effective_blend", blend, "blend, or parsed from data_path")
        mock = blend is None and self.blend_per_split is None
        self.derive("mock", mock, "no data named" if mock else "data named")
        if self.blend_per_split is not None:
            self.derive("split_matrix", None, "blend_per_split names each split's data")
        else:
            split = self.split if self.split is not None else "1,1,1"
            matrix = _split_matrix(_parse_split(Problems(), split) or [])
            self.derive("split_matrix", matrix, f"from split {split!r}")

    def _data_path_blend(self, p: Problems) -> Blend | None:
        """The blend named by `data_path` (Megatron --data-path rules); problems go to `p`."""
        if self.data_path is None:
            return None
        items = self.data_path.split() if isinstance(self.data_path, str) else list(self.data_path)
        if not items:
            p.add(
                "data_path",
                "names no data",
                self.data_path,
                fix="give dataset.data_path one or more prefixes",
            )
            return None
        if len(items) % 2 == 1:
            return [s.strip() for s in items], None
        weights = [w for w in map(_as_float, items[0::2]) if w is not None]
        if not weights:
            return [s.strip() for s in items], None
        if len(weights) < len(items[0::2]):
            p.add(
                "data_path",
                "mixes weighted and unweighted entries; weights go before every prefix or none",
                self.data_path,
                fix='write dataset.data_path as ["0.3", "prefix_a", "0.7", "prefix_b"] or as prefixes only',
            )
            return None
        return [s.strip() for s in items[1::2]], weights


@dataclass(kw_only=True)
class MockGPTDatasetConfig(GPTDatasetConfig):
    """Synthetic tokens shaped like the GPT dataset; names no data (no blend, blend_per_split, data_path)."""

    _aliases_ = ("mock",)

    def _check(self, p: Problems) -> None:
        for name in ("blend", "blend_per_split", "data_path"):
            if getattr(self, name) is not None:
                p.add(
                    name,
                    "a mock dataset uses synthetic tokens and reads no data",
                    getattr(self, name),
                    fix=f"remove dataset.{name}, or use a GPT dataset (dataset._target_: "
                    f"{GPTDatasetConfig.target()})",
                )
        super()._check(p)


def _as_float(text: str) -> float | None:
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def _check_blend(p: Problems, path: str, blend: Blend | None) -> None:
    if blend is None:
        return
    prefixes, weights = blend
    if not prefixes:
        p.add(path, "names no data prefixes", blend, fix=f"list at least one prefix in dataset.{path}")
    if weights is None:
        return
    if len(weights) != len(prefixes):
        p.add(
            path,
            f"has {len(prefixes)} prefixes but {len(weights)} weights",
            blend,
            fix=f"give one weight per prefix in dataset.{path}, or None to weight by size",
        )
    elif any(w < 0 for w in weights) or not any(w > 0 for w in weights):
        p.add(
            path, "weights must be >= 0 and not all 0", weights, fix=f"correct the weights in dataset.{path}"
        )


def _parse_split(p: Problems, split: str) -> list[float] | None:
    """ "969,30,1" -> [0.969, 0.03, 0.001]; missing trailing parts are 0. Problems go to `p`."""
    texts = split.split(",")
    parts = [v for v in map(_as_float, texts) if v is not None]
    fix = 'set dataset.split to up to three comma-separated non-negative numbers, e.g. "969,30,1"'
    if len(texts) > len(_SPLITS) or len(parts) < len(texts) or not all(0 <= v < math.inf for v in parts):
        p.add("split", "is not a list of up to three finite non-negative numbers", split, fix=fix)
        return None
    total = sum(parts)
    if total <= 0:
        p.add("split", "proportions sum to 0", split, fix=fix)
        return None
    return [v / total for v in parts] + [0.0] * (len(_SPLITS) - len(parts))


def _split_matrix(vector: list[float]) -> list[tuple[float, float] | None]:
    """[0.9, 0.1, 0.0] -> [(0.0, 0.9), (0.9, 1.0), None]: [start, end) per split, None when empty."""
    out: list[tuple[float, float] | None] = []
    start = 0.0
    for v in vector:
        end = start + v
        out.append((start, end) if end > start else None)
        start = end
    return out
