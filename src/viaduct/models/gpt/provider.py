"""`GPTModelProvider`: configuration of a decoder-only (GPT-style) language model."""

from __future__ import annotations

from dataclasses import dataclass

from viaduct.config import DType, unsupported
from viaduct.models.provider import ModelProvider


@dataclass(kw_only=True)
class GPTModelProvider(ModelProvider):
    """A GPT-style decoder-only model: its architecture, precision and parallel sizes.

    Standalone use: `GPTModelProvider(num_layers=24, hidden_size=2048, num_attention_heads=16,
    vocab_size=50000, seq_length=2048).finalize()`.
    """

    _aliases_ = ("gpt",)

    share_embeddings_and_output_weights: bool = True
    """Tie the output layer to the input embedding."""
    parallel_output: bool = True
    """Keep the logits split over tensor-parallel ranks for the loss (no gather)."""
    fp16_lm_cross_entropy: bool = False
    """Compute the language-model cross entropy in half precision."""
    logit_dtype: DType | None = None
    """Dtype of the output logits; unset means the compute dtype."""
    scatter_embedding_sequence_parallel: bool = True
    """Scatter the embedding output along the sequence when sequence_parallel is on."""
    mtp_num_layers: int | None = unsupported("multi-token prediction", default=None)
    """Number of multi-token-prediction layers."""
    mtp_loss_scaling_factor: float = 0.1
    """Weight of the multi-token-prediction loss (only with mtp_num_layers)."""
    hf_model_id: str | None = None
    """Hugging Face model id this configuration comes from (for export and tokenizer defaults)."""
    hf_model_revision: str | None = None
    """Revision (branch, tag or commit) of hf_model_id."""
