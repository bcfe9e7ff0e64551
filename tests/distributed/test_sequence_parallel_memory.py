"""What a transformer layer keeps for backward under sequence parallelism, measured on 2 gloo ranks:
the residual stream's activations are split along the sequence, but the column-parallel GEMMs keep
their all-gathered inputs whole (PyTorch's DTensor layers do; Megatron's gather again in backward).
The memory estimate (`viaduct.models.accounting`) counts exactly that."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import parallelize_module

from viaduct.testing import run_distributed

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

B, S, H = 2, 16, 64


def _layer_bytes(rank: int, world: int, sp: bool) -> int:
    """Bytes of the distinct storages one tensor-parallel rank's layer saves for backward (weights
    excluded) for a [B, S, H] batch (each rank's sequence shard of it under sequence parallelism)."""
    from torch.distributed.device_mesh import init_device_mesh

    from viaduct.distributed.parallelize import _layer_plan
    from viaduct.models import GPTModelProvider
    from viaduct.models.common.transformer import TransformerLayer

    torch.manual_seed(0)
    p = GPTModelProvider(
        num_layers=1,
        hidden_size=H,
        num_attention_heads=4,
        ffn_hidden_size=4 * H,
        vocab_size=128,
        seq_length=S,
        normalization="LayerNorm",
        hidden_dropout=0.0,
        attention_dropout=0.0,
        params_dtype="float32",
        bf16=False,
        tensor_model_parallel_size=world,
        sequence_parallel=sp,
    )
    p.finalize()
    layer = TransformerLayer(p, 1, device="cpu", dtype=torch.float32)
    parallelize_module(layer, init_device_mesh("cpu", (world,)), _layer_plan(layer, sp))
    weights = {
        (q._local_tensor if isinstance(q, DTensor) else q).untyped_storage().data_ptr()
        for q in layer.parameters()
    }
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        local = t._local_tensor if isinstance(t, DTensor) else t
        storage = local.untyped_storage()
        if storage.data_ptr() not in weights:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    x = torch.randn(B, S // world if sp else S, H, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = layer(x, None, None)
    out.sum().backward()
    return sum(seen.values())


def test_sequence_parallel_splits_the_stream_but_not_the_gathered_gemm_inputs() -> None:
    plain: Any = run_distributed(_layer_bytes, 2, False, timeout=120, reuse=True)
    split: Any = run_distributed(_layer_bytes, 2, True, timeout=120, reuse=True)
    tokens, a = B * S, 4
    # What sequence parallelism splits: each LayerNorm's input and its float32 mean and rstd, and
    # nothing more: the two gathered [hidden] inputs (QKV's and fc1's) stay whole on each rank (had
    # the GEMMs kept their shards, SP would save another tokens x 2 x a x H / 2 bytes).
    stream = 2 * (a * H + 8)
    assert plain - split == tokens * stream // 2
