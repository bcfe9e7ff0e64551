"""`dataset` for T5 models: Megatron's span-corruption data over the same indexed `.bin`/`.idx` files.

`T5DatasetConfig` adds Megatron's masking settings (names and defaults of Megatron Core's
`MaskedWordPieceDatasetConfig` / `T5MaskedWordPieceDatasetConfig`, as in Megatron Bridge) and the
encoder/decoder lengths to `GPTDatasetConfig`; `MockT5DatasetConfig` always uses synthetic tokens.
The datasets themselves are `viaduct.data.t5_dataset`.
"""

from dataclasses import dataclass

from viaduct.config import Problems, unsupported
from viaduct.training.config._checks import in_range, positive
from viaduct.training.config.dataset import GPTDatasetConfig

GEOMETRIC_P = 0.2
"""Success probability of the geometric n-gram length draw (SpanBERT's value, as in Megatron)."""


@dataclass(kw_only=True)
class T5DatasetConfig(GPTDatasetConfig):
    """T5 span corruption over Megatron indexed datasets: masked spans become sentinel tokens."""

    _aliases_ = ("t5",)

    masking_probability: float = 0.15
    """Fraction of each sample's tokens to mask (in masked spans)."""

    short_sequence_probability: float = 0.1
    """Probability that a sample's target length is drawn shorter than the encoder length."""

    masking_max_ngram: int = 10
    """Longest masked span (n-gram), in tokens."""

    masking_do_full_word: bool = unsupported(
        "whole-word masking (viaduct's tokenizers do not mark word pieces)", default=False
    )
    """Mask whole words instead of single word pieces."""

    masking_do_permutation: bool = False
    """Also shuffle a subset of unmasked n-grams among themselves (excludes the geometric distribution)."""

    masking_use_longer_ngrams: bool = False
    """Weight n-gram lengths towards longer ones (without the geometric distribution)."""

    masking_use_geometric_distribution: bool = True
    """Draw span lengths from a geometric distribution (p=0.2, SpanBERT) clipped at masking_max_ngram."""

    sequence_length_encoder: int | None = None
    """Encoder tokens per sample; None takes seq_length (the model's seq_length)."""

    sequence_length_decoder: int | None = None
    """Decoder tokens per sample; None takes the model's seq_length_dec (128 when it has none)."""

    def _check(self, p: Problems) -> None:
        super()._check(p)
        for name in ("masking_probability", "short_sequence_probability"):
            in_range(p, self, name, 0.0, 1.0)
        positive(p, self, "masking_max_ngram")
        positive(p, self, "sequence_length_encoder")
        positive(p, self, "sequence_length_decoder")
        for name in ("sequence_length_encoder", "sequence_length_decoder"):
            value = getattr(self, name)
            # Room for at least one token and one masked span (sentinel + token + eos / bos).
            if value is not None and 0 < value < 3:
                p.add(
                    name,
                    "must be >= 3 (a token, a sentinel and eos/bos)",
                    value,
                    fix=f"set dataset.{name} to 3 or more",
                )
        length = self.seq_length if self.seq_length is not None else self.sequence_length
        if None not in (self.sequence_length_encoder, length) and self.sequence_length_encoder != length:
            p.add(
                "sequence_length_encoder",
                f"conflicts with seq_length ({length}): both are the encoder's length",
                self.sequence_length_encoder,
                fix="set only one of dataset.seq_length / dataset.sequence_length_encoder",
            )
        if self.masking_use_geometric_distribution and self.masking_do_permutation:
            p.add(
                "masking_do_permutation",
                "cannot be combined with masking_use_geometric_distribution (as in Megatron)",
                True,
                fix="set dataset.masking_do_permutation=false or "
                "dataset.masking_use_geometric_distribution=false",
            )


@dataclass(kw_only=True)
class MockT5DatasetConfig(T5DatasetConfig):
    """Synthetic tokens shaped like the T5 dataset; names no data (no blend, blend_per_split, data_path)."""

    _aliases_ = ("mock_t5",)

    def _check(self, p: Problems) -> None:
        for name in ("blend", "blend_per_split", "data_path"):
            if getattr(self, name) is not None:
                p.add(
                    name,
                    "a mock dataset uses synthetic tokens and reads no data",
                    getattr(self, name),
                    fix=f"remove dataset.{name}, or use a T5 dataset (dataset._target_: "
                    f"{T5DatasetConfig.target()})",
                )
        super()._check(p)
