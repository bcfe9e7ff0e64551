"""`dataset` for supervised fine-tuning: JSONL instruction data, padded batches or packed sequences.

`FinetuningDatasetConfig` mirrors Megatron Bridge's config of the same name: a directory holding
`training.jsonl`, `validation.jsonl` and `test.jsonl`, each line one record (`{"input": ...,
"output": ...}` rendered through a prompt template, or `{"messages": [...]}` rendered through the
tokenizer's chat template). Loss is taken on the answer only (by default). Micro-batches are padded
to their longest example (`dataloader_type="batch"`), or examples are packed offline into fixed-size
sequences (`packed_sequence_specs`). The reading, tokenizing and packing live in `viaduct.data.sft`.

`dataset_kwargs` takes the options of Bridge's GPTSFTDataset by their names; `SFTOptions` is what
they resolve to, checked here so that `viaduct config validate` refuses what a run refuses.
"""

from __future__ import annotations

import os
import re
import string
from dataclasses import dataclass
from typing import ClassVar, Literal

from viaduct.config import ConfigBase, Problem, Problems
from viaduct.config.errors import did_you_mean
from viaduct.training.config._checks import positive
from viaduct.training.config.dataset import DataloaderConfig

SPLIT_FILES = {"train": "training.jsonl", "validation": "validation.jsonl", "test": "test.jsonl"}
"""The file each split is read from, inside dataset_root (Bridge's names)."""

BUILTIN_SFT_DATASETS = ("pydoc-sft",)
"""Names `dataset_root` accepts after `builtin:` (built on first use, see viaduct.data.sft.builtin)."""

_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")

SFTKwargValue = str | int | bool | None


@dataclass(frozen=True)
class SFTOptions:
    """The resolved `dataset_kwargs` (Bridge's GPTSFTDataset options); see `KWARG_DOCS`."""

    prompt_template: str = "{input} {output}"
    label_key: str = "output"
    answer_only_loss: bool = True
    truncation_field: str = "input"
    truncation_method: Literal["right", "left"] = "right"
    add_bos: bool = False
    add_eos: bool = True
    add_sep: bool = False
    chat: bool | None = None
    pad_to_max_length: bool = False
    pad_seq_to_mult: int = 1

    @property
    def truncation_fields(self) -> list[str]:
        """The comma-separated truncation_field as a list."""
        return [f.strip() for f in self.truncation_field.split(",") if f.strip()]


KWARG_DOCS: dict[str, str] = {
    "prompt_template": "how an input/output record becomes text; placeholders are record keys "
    '("{input} {output}")',
    "label_key": "the record key holding the answer; its placeholder must be in prompt_template",
    "answer_only_loss": "loss on the answer tokens only (false: on every token but padding)",
    "truncation_field": "placeholder(s), comma-separated, cut first when an example is too long",
    "truncation_method": '"right" cuts the end of the truncation field, "left" its start',
    "add_bos": "put the tokenizer's bos token before each example",
    "add_eos": "put the tokenizer's eod/eos token after each example (counted as answer)",
    "add_sep": "put a separator token (the eod/eos id) between the prompt and the answer",
    "chat": "records with messages use the chat template: null (auto), true (required), false (refused)",
    "pad_to_max_length": "pad every micro-batch to seq_length instead of its longest example",
    "pad_seq_to_mult": "round a padded micro-batch's length up to a multiple of this",
}
"""Every `dataset_kwargs` key viaduct acts on, with what it does (also the did-you-mean list)."""

_KWARG_TYPES: dict[str, tuple[type, ...]] = {
    "prompt_template": (str,),
    "label_key": (str,),
    "answer_only_loss": (bool,),
    "truncation_field": (str,),
    "truncation_method": (str,),
    "add_bos": (bool,),
    "add_eos": (bool,),
    "add_sep": (bool,),
    "chat": (bool, type(None)),
    "pad_to_max_length": (bool,),
    "pad_seq_to_mult": (int,),
}


def template_fields(template: str) -> list[str] | str:
    """The placeholder names of `template` in order, or why it is not a plain template.

    Only `{name}` placeholders are allowed: attribute access, indexing, conversions and format
    specs would let a config reach into Python objects, so they are refused.
    """
    names: list[str] = []
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        return f"is not a valid template ({exc}); write literal braces as {{{{ and }}}}"
    for _literal, name, fmt, conversion in parsed:
        if name is None:
            continue
        if not name.isidentifier() or fmt or conversion:
            shown = name + (f"!{conversion}" if conversion else "") + (f":{fmt}" if fmt else "")
            return f"placeholder {{{shown}}} is not a plain {{key}}"
        names.append(name)
    return names


def resolve_sft_options(kwargs: dict[str, SFTKwargValue] | None, p: Problems) -> SFTOptions:
    """`dataset_kwargs` as `SFTOptions`; every problem goes to `p` (paths under dataset_kwargs)."""
    values: dict[str, SFTKwargValue] = {}
    for key, value in (kwargs or {}).items():
        path = f"dataset_kwargs.{key}"
        if key not in KWARG_DOCS:
            hint = did_you_mean(key, KWARG_DOCS)
            p.add(
                path,
                "is not a dataset option viaduct knows",
                value,
                fix=(hint + " " if hint else "") + f"use one of {', '.join(KWARG_DOCS)}",
            )
            continue
        types = _KWARG_TYPES[key]
        # bool is an int in Python: pad_seq_to_mult=true must not pass as 1.
        if not isinstance(value, types) or (bool not in types and isinstance(value, bool)):
            want = " or ".join("null" if t is type(None) else t.__name__ for t in types)
            p.add(path, f"must be {want}", value, fix=f"set dataset.{path} to a {want} value")
            continue
        values[key] = value
    try:
        opts = SFTOptions(**values)  # type: ignore[arg-type]  # types checked just above
    except TypeError:  # unreachable: keys and types are checked; keep the defaults
        opts = SFTOptions()
    if opts.truncation_method not in ("right", "left"):
        p.add(
            "dataset_kwargs.truncation_method",
            'must be "right" or "left"',
            opts.truncation_method,
            fix='set dataset.dataset_kwargs.truncation_method to "right" or "left"',
        )
    if opts.pad_seq_to_mult < 1:
        p.add(
            "dataset_kwargs.pad_seq_to_mult",
            "must be >= 1",
            opts.pad_seq_to_mult,
            fix="set dataset.dataset_kwargs.pad_seq_to_mult to 1 or more",
        )
    if not opts.label_key.isidentifier():
        p.add(
            "dataset_kwargs.label_key",
            "must be a plain key name (letters, digits, underscores)",
            opts.label_key,
            fix='set dataset.dataset_kwargs.label_key to the answer\'s record key, e.g. "output"',
        )
        return opts
    names = template_fields(opts.prompt_template)
    if isinstance(names, str):
        p.add(
            "dataset_kwargs.prompt_template",
            names,
            opts.prompt_template,
            fix='write placeholders as {key}, e.g. "{input} {output}"',
        )
        return opts
    label = opts.label_key
    if names.count(label) != 1:
        p.add(
            "dataset_kwargs.prompt_template",
            f"must hold the answer placeholder {{{label}}} exactly once (the answer starts there)",
            opts.prompt_template,
            fix=f'add {{{label}}} once, e.g. "{{input}} {{{label}}}", or change dataset_kwargs.label_key',
        )
    fields = opts.truncation_fields
    if not fields:
        p.add(
            "dataset_kwargs.truncation_field",
            "names no placeholder",
            opts.truncation_field,
            fix='name a placeholder of prompt_template, e.g. "input"',
        )
    for name in fields:
        if name not in names:
            hint = did_you_mean(name, names)
            p.add(
                "dataset_kwargs.truncation_field",
                f"{name!r} is not a placeholder of prompt_template ({', '.join(names) or 'none'})",
                opts.truncation_field,
                fix=(hint + " " if hint else "") + "name a placeholder of dataset_kwargs.prompt_template",
            )
    return opts


@dataclass(kw_only=True)
class PackedSequenceSpecs(ConfigBase):
    """How examples are packed offline into fixed-length sequences (Megatron Bridge's fields)."""

    packed_sequence_size: int = -1
    """Tokens per packed sequence; -1 means dataset.seq_length."""

    tokenizer_model_name: str | None = None
    """Name of the pack cache folder (`<dataset_root>/packed/<name>/`); None: a tokenizer fingerprint."""

    packed_train_data_path: str | None = None
    """Where the packed training split is cached (.npy); None: under `<dataset_root>/packed/`."""

    packed_val_data_path: str | None = None
    """Where the packed validation split is cached (.npy); None: under `<dataset_root>/packed/`."""

    packed_metadata_path: str | None = None
    """Where the training pack's metadata (.json) is written; None: next to its .npy file."""

    pad_cu_seqlens: bool = False
    """Pad cu_seqlens to a fixed size (CUDA graphs); not built: packs carry a block attention mask."""

    pad_seq_to_mult: int = 1
    """Each example in a pack is padded to a multiple of this many tokens (padding carries no loss)."""

    def problems(self, seq_length: int | None) -> Problems:
        """What is wrong with these specs (paths relative to packed_sequence_specs)."""
        p = Problems()
        size = self.packed_sequence_size
        prefix = "dataset.packed_sequence_specs"
        if size != -1 and size < 1:
            p.add(
                "packed_sequence_size",
                "must be >= 1, or -1 for dataset.seq_length",
                size,
                fix=f"set {prefix}.packed_sequence_size to -1 or a positive size",
            )
        elif seq_length is not None and size > seq_length:
            p.add(
                "packed_sequence_size",
                f"is longer than seq_length ({seq_length}), the most tokens the model reads",
                size,
                fix=f"set {prefix}.packed_sequence_size to -1 (= seq_length) or at most {seq_length}",
            )
        if self.pad_seq_to_mult < 1:
            p.add(
                "pad_seq_to_mult",
                "must be >= 1",
                self.pad_seq_to_mult,
                fix=f"set {prefix}.pad_seq_to_mult to 1 or more",
            )
        if self.pad_cu_seqlens:
            p.add(
                "pad_cu_seqlens",
                "is not built: packed sequences carry a block-causal attention mask, not cu_seqlens",
                True,
                fix=f"set {prefix}.pad_cu_seqlens=false",
            )
        name = self.tokenizer_model_name
        if name is not None and not _SAFE_NAME.match(name):
            p.add(
                "tokenizer_model_name",
                "names a cache folder: letters, digits, '.', '_' and '-' only, not starting with '.'",
                name,
                fix=f"set {prefix}.tokenizer_model_name to a plain name such as llama3-8b",
            )
        for attr in ("packed_train_data_path", "packed_val_data_path"):
            value = getattr(self, attr)
            if value is not None and not value.endswith(".npy"):
                p.add(
                    attr, "must name a .npy file", value, fix=f"set {prefix}.{attr} to a path ending in .npy"
                )
        meta = self.packed_metadata_path
        if meta is not None and not meta.endswith(".json"):
            p.add(
                "packed_metadata_path",
                "must name a .json file",
                meta,
                fix=f"set {prefix}.packed_metadata_path to a path ending in .json",
            )
        return p


@dataclass(kw_only=True)
class FinetuningDatasetConfig(DataloaderConfig):
    """Instruction data for supervised fine-tuning: JSONL splits in one directory (Megatron Bridge's
    FinetuningDatasetConfig)."""

    _aliases_ = ("finetuning", "sft")
    _variable_length_batches_: ClassVar[bool] = True

    dataloader_type: Literal["single", "cyclic", "batch", "external"] | None = "batch"
    """Sampler: "batch" (one resumable pass, micro-batches padded to their longest), "single", "cyclic"."""

    dataset_root: str | None = None
    """Directory with training.jsonl, validation.jsonl, test.jsonl; or builtin:pydoc-sft."""

    seq_length: int | None = None
    """Most tokens of one example (longer ones are truncated); None takes model.seq_length."""

    seed: int = 1234
    """Seed of the per-epoch shuffles of the examples and of packing."""

    memmap_workers: int = 1
    """Threads tokenizing the records (Hugging Face, SentencePiece, tiktoken tokenizers run in parallel)."""

    max_train_samples: int | None = None
    """Use only the first N training examples (None: all)."""

    packed_sequence_specs: PackedSequenceSpecs | None = None
    """Pack examples offline into fixed-length sequences (None: padded micro-batches)."""

    dataset_kwargs: dict[str, SFTKwargValue] | None = None
    """Options of the SFT dataset (prompt_template, label_key, answer_only_loss, truncation_field, ...)."""

    do_validation: bool = True
    """Read validation.jsonl (it must exist)."""

    do_test: bool = True
    """Read test.jsonl (it must exist)."""

    def _check(self, p: Problems) -> None:
        super()._check(p)
        positive(p, self, "seq_length")
        positive(p, self, "memmap_workers")
        positive(p, self, "max_train_samples")
        if not 0 <= self.seed < 2**32:
            p.add(
                "seed",
                "must be in [0, 2**32)",
                self.seed,
                fix="set dataset.seed to a non-negative 32-bit number",
            )
        resolve_sft_options(self.dataset_kwargs, p)
        if self.packed_sequence_specs is not None:
            p.extend(self.packed_sequence_specs.problems(self.seq_length).items, "packed_sequence_specs")
        self._check_root(p)

    def _check_root(self, p: Problems) -> None:
        root = self.dataset_root
        if root is None:
            p.add(
                "dataset_root",
                "must name the directory of training.jsonl (and validation.jsonl, test.jsonl)",
                None,
                fix="set dataset.dataset_root to that directory (or builtin:pydoc-sft, the embedded example)",
            )
            return
        if root.startswith("builtin:"):
            name = root[len("builtin:") :]
            if name not in BUILTIN_SFT_DATASETS:
                hint = did_you_mean(name, BUILTIN_SFT_DATASETS)
                p.add(
                    "dataset_root",
                    "no such built-in dataset",
                    root,
                    fix=(hint + " " if hint else "")
                    + "use builtin:"
                    + ", builtin:".join(BUILTIN_SFT_DATASETS),
                )
            return
        path = os.path.expanduser(root)
        if not os.path.isdir(path):
            p.add(
                "dataset_root",
                "is not a directory" if os.path.exists(path) else "does not exist",
                root,
                fix="set dataset.dataset_root to the directory holding training.jsonl",
            )
            return
        wanted = [("train", "training.jsonl"), ("validation", "validation.jsonl"), ("test", "test.jsonl")]
        for split, name in wanted:
            if (split == "validation" and not self.do_validation) or (split == "test" and not self.do_test):
                continue
            if not os.path.isfile(os.path.join(path, name)):
                skip = {
                    "validation": " or set dataset.do_validation=false",
                    "test": " or set dataset.do_test=false",
                }
                p.add(
                    "dataset_root",
                    f"holds no {name} (the {split} split)",
                    root,
                    fix=f"add {name} to {root}" + skip.get(split, ""),
                )

    def layout_problems(self, pipeline_model_parallel_size: int) -> list[Problem]:
        """What the parallel layout cannot run: pipeline stages exchange activations of one static
        shape, so micro-batches of varying length (padded to their longest) cannot flow through them."""
        if pipeline_model_parallel_size <= 1 or self.packed_sequence_specs is not None:
            return []
        p = Problems()
        opts = resolve_sft_options(self.dataset_kwargs, p)
        if p or opts.pad_to_max_length:
            return []
        return [
            Problem(
                "dataset.dataset_kwargs.pad_to_max_length",
                f"micro-batches padded to their longest example vary in length, which pipeline "
                f"parallelism (model.pipeline_model_parallel_size={pipeline_model_parallel_size}) cannot "
                "run: its stages exchange tensors of one fixed shape",
                False,
                fix="set dataset.dataset_kwargs.pad_to_max_length=true, or pack the examples "
                "(dataset.packed_sequence_specs)",
            )
        ]

    def effective_packed_size(self, model_seq_length: int) -> int | None:
        """Tokens per packed sequence, or None without packing."""
        specs = self.packed_sequence_specs
        if specs is None:
            return None
        seq = self.seq_length if self.seq_length is not None else model_seq_length
        return seq if specs.packed_sequence_size == -1 else specs.packed_sequence_size

    def options(self) -> SFTOptions:
        """dataset_kwargs resolved to every option's value; ConfigError when they are wrong."""
        p = Problems()
        opts = resolve_sft_options(self.dataset_kwargs, p)
        p.raise_if_any()
        return opts


__all__ = [
    "BUILTIN_SFT_DATASETS",
    "KWARG_DOCS",
    "SPLIT_FILES",
    "FinetuningDatasetConfig",
    "PackedSequenceSpecs",
    "SFTOptions",
]
