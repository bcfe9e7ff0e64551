"""What is known of a PEFT run before any model is built: the layers it adapts on the whole model,
its adapter parameter count, and the memory estimate with a frozen base."""

from __future__ import annotations

import pytest
import torch

from viaduct.distributed.layout import ParallelLayout
from viaduct.models import GPTModelProvider
from viaduct.models.accounting import estimate_memory, estimate_pipeline_memory
from viaduct.peft import DoRA, LoRA
from viaduct.peft.transform import adapter_parameter_count, layer_linears, planned_adapters


def provider(**kw: object) -> GPTModelProvider:
    base: dict[str, object] = dict(
        num_layers=4,
        hidden_size=64,
        ffn_hidden_size=96,
        num_attention_heads=4,
        num_query_groups=2,
        vocab_size=128,
        seq_length=32,
        gated_linear_unit=True,
    )
    return GPTModelProvider(**{**base, **kw})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "peft",
    [
        LoRA(dim=4),
        DoRA(dim=2, target_modules=["linear_qkv", "*.layers.2.*"]),
        LoRA(target_modules=[], exclude_modules=["linear_fc2"]),
    ],
    ids=["lora", "dora-wildcard", "exclude"],
)
def test_planned_adapters_are_those_of_the_built_model(peft: LoRA | DoRA) -> None:
    p = provider()
    model = p.provide()
    assert set(layer_linears(p)) == {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    planned = planned_adapters(peft, p)
    peft(model)
    adapters = [(n, q) for n, q in model.named_parameters() if q.requires_grad]
    assert {n.split(".adapter.")[0] for n, _ in adapters} == set(planned)
    assert adapter_parameter_count(peft, p) == sum(q.numel() for _, q in adapters)


def test_unmatched_targets_are_found_without_building_the_model() -> None:
    with pytest.raises(ValueError, match=r"peft.target_modules\[0\].*matches no linear layer"):
        planned_adapters(LoRA(target_modules=["*.layers.9.*"]), provider())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_memory_estimate_counts_state_for_the_adapters_only(dtype: torch.dtype) -> None:
    p = provider(params_dtype=dtype)
    n = adapter_parameter_count(LoRA(dim=4), p)
    full = estimate_memory(p, 2)
    peft = estimate_memory(p, 2, trainable=n)
    b = dtype.itemsize
    assert peft.parameters == full.parameters + n * b
    assert peft.gradients == n * 4
    assert peft.optimizer == n * (8 if b == 4 else 12)
    assert (peft.activations, peft.logits) == (full.activations, full.logits)


def test_sharded_peft_stores_the_base_in_16_bits_and_adapters_in_float32_shards() -> None:
    p = provider(params_dtype=torch.bfloat16)
    n = adapter_parameter_count(LoRA(dim=4), p)
    layout = ParallelLayout(world_size=4, dp_shard=4, strategy="optim_grads_params")
    full = estimate_memory(p, 2, layout=layout)
    peft = estimate_memory(p, 2, layout=layout, trainable=n)
    shard = -(-n // 4)
    assert peft.parameters == full.parameters // 4 * 2 + 4 * shard
    assert (peft.gradients, peft.optimizer) == (4 * shard, 8 * shard)


def test_pipeline_ranks_hold_the_adapters_of_their_layers() -> None:
    p = provider(pipeline_model_parallel_size=2)
    n = adapter_parameter_count(LoRA(dim=4), p)
    layout = ParallelLayout(world_size=2, pp=2)
    ranks = estimate_pipeline_memory(p, 2, layout=layout, trainable=n)
    assert [r.optimizer for r in ranks] == [8 * n // 2, 8 * n // 2]


def test_flops_of_a_peft_step_leave_out_the_frozen_weight_gradients() -> None:
    from viaduct.models.accounting import flops_per_token

    p = provider()
    n = adapter_parameter_count(LoRA(dim=4), p)
    full, peft = flops_per_token(p, 32), flops_per_token(p, 32, trainable=n)
    attention = 12 * p.num_layers * p.num_attention_heads * p.kv_channels * 32
    matmul = (full - attention) / 6
    assert peft == 4 * matmul + 6 * n + attention
