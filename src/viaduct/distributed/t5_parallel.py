"""Tensor (and sequence) parallelism for T5 encoder-decoder models, built from GPT's pieces
(`viaduct.distributed.parallelize`).

Megatron's split, per part:

* encoder layers: as GPT's transformer layers (`_layer_plan`): QKV and fc1 column-parallel (heads and
  MLP units split), the attention output projection and fc2 row-parallel;
* decoder layers: self-attention and MLP as GPT's; cross-attention `linear_q` and `linear_kv`
  column-parallel (the heads split: `linear_kv`'s rows are grouped per head as [k | v], so a
  contiguous share is whole heads), `linear_proj` row-parallel;
* the relative position bias tables [buckets, heads] split by heads, so each rank adds the bias of
  exactly the heads it attends with;
* the token table (shared by encoder and decoder, and the tied output weight), an untied output
  weight and the tied output bias split by vocabulary rows; the loss never gathers the vocabulary
  (`viaduct.distributed.vocab_parallel`).

With sequence parallelism the residual stream of both stacks is split along the sequence between
the layers (norms and dropout run on shards), as in GPT. The encoder output stays split after the
encoder's final norm: each decoder layer's cross-attention gathers it before its key/value
projection (as Megatron's column-parallel `linear_kv` does), and backward returns each rank the
gradient of its own slice.

As in `parallelize`, the model code knows nothing of this: DTensor styles go on its linear layers
and the vocabulary-parallel output goes into its `vocab_output` hook.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch.distributed.tensor import Placement, Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from viaduct.distributed.parallelize import (
    _distribute_own,
    _layer_plan,
    _SequenceGatheredOutput,
    _wait_for_collective,
    embedding_plan,
)
from viaduct.models.common.transformer import TransformerLayer

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

    from viaduct.models.t5.model import T5DecoderLayer, T5Model


def _decoder_layer_plan(layer: T5DecoderLayer, sp: bool) -> dict[str, ParallelStyle]:
    """GPT's plan for the decoder layer's self-attention, MLP and their norms (the layer has the same
    submodule names), plus the cross-attention: queries and keys/values column-parallel, the output
    projection row-parallel (reduce-scattered along the sequence with sequence parallelism)."""
    # `_layer_plan` reads only the submodules a decoder layer shares with a TransformerLayer.
    plan = _layer_plan(layer, sp)
    plan["cross_attention.linear_q"] = ColwiseParallel()
    plan["cross_attention.linear_kv"] = ColwiseParallel()
    plan["cross_attention.linear_proj"] = RowwiseParallel(output_layouts=Shard(1) if sp else Replicate())
    if sp:
        plan["pre_cross_attn_layernorm"] = SequenceParallel(use_local_output=True)
        # Both the decoder's hidden states and the encoder output arrive split along the sequence;
        # the attention needs every query and every key.
        plan["cross_attention"] = PrepareModuleInput(
            input_layouts=(Shard(1), Shard(1), None),
            desired_input_layouts=(Replicate(), Replicate(), None),
            use_local_output=True,
        )
    return plan


def apply_t5_tensor_parallel(model: T5Model, tp_mesh: DeviceMesh, *, sequence_parallel: bool) -> None:
    """Split the T5 `model` over `tp_mesh` (see the module docstring); the vocabulary is split too.

    The model's vocabulary must be a multiple of the tensor-parallel size (`padded_vocab_size` pads
    it so), and its heads and MLP units divisible by it (the provider's finalize() checks)."""
    from viaduct.distributed.vocab_parallel import VocabParallelOutput
    from viaduct.models.t5.model import T5DecoderLayer

    sp = sequence_parallel
    # As GPT's embedding (one table for both stacks).
    plan = embedding_plan("embedding", model.embedding.position_embeddings is not None, sp)
    for name in ("encoder_relative_pos_emb", "decoder_relative_pos_emb"):
        if getattr(model, name) is not None:
            # [buckets, heads] split by columns: each rank looks up the bias of its own heads, in the
            # order the column-parallel QKV projection gives them ([batch, seq, seq, heads / tp]).
            plan[f"{name}.relative_attention_bias"] = ColwiseParallel(
                input_layouts=Replicate(), output_layouts=Shard(-1)
            )
    if sp:
        plan["encoder.final_layernorm"] = SequenceParallel(use_local_output=True)
        plan["decoder.final_layernorm"] = SequenceParallel(use_local_output=True)
    parallelize_module(model, tp_mesh, plan)
    model.embedding.register_forward_hook(_wait_for_collective)
    for i, layer in enumerate(model.encoder.layers):
        if not isinstance(layer, TransformerLayer):
            raise TypeError(f"encoder.layers.{i} is a {type(layer).__name__}, not a TransformerLayer")
        parallelize_module(layer, tp_mesh, _layer_plan(layer, sp))
    for i, layer in enumerate(model.decoder.layers):
        if not isinstance(layer, T5DecoderLayer):
            raise TypeError(f"decoder.layers.{i} is a {type(layer).__name__}, not a T5DecoderLayer")
        parallelize_module(layer, tp_mesh, _decoder_layer_plan(layer, sp))
    # The output layer holds an untied weight or the tied output bias (never called as a layer: the
    # model reads them), split by vocabulary rows like the token table.
    rows: list[Placement] = [Shard(0)]
    _distribute_own(model.output_layer, {"weight": rows, "bias": rows}, tp_mesh)
    vocab = VocabParallelOutput(tp_mesh.get_group())
    model.vocab_output = _SequenceGatheredOutput(vocab, tp_mesh) if sp else vocab


__all__ = ["apply_t5_tensor_parallel"]
