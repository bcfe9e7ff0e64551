"""Supervised fine-tuning data: JSONL records -> examples -> padded or packed samples.

`records` reads and renders the records (prompt template or chat template), `examples` tokenizes
and truncates them, `dataset` holds them as variable-length samples with a padding collate
function, `packing` packs them into fixed-length sequences with an on-disk cache, `build` turns a
`FinetuningDatasetConfig` into the three split datasets, `builtin` builds `builtin:pydoc-sft`.
See docs/sft.md.
"""
