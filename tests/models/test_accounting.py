"""viaduct.models.accounting against the models it describes: parameter counts, FLOPs and memory."""

from __future__ import annotations

import pytest
import torch

from viaduct.config import ConfigError
from viaduct.distributed.layout import ParallelLayout, ShardingStrategy, layout_of
from viaduct.models import AttnBackend, GPTModelProvider, Llama3ModelProvider70B
from viaduct.models.accounting import (
    MemoryBudgetError,
    MemoryEstimate,
    check_memory,
    embedding_parameters,
    estimate_config_memory,
    estimate_config_pipeline_memory,
    estimate_memory,
    estimate_pipeline_memory,
    flops_per_token,
    memory_options,
    mfu,
    num_parameters,
)
from viaduct.models.common.loss import default_chunk_tokens
from viaduct.recipes import get_recipe, llama3_70b_pretrain_config


def provider(**kw: object) -> GPTModelProvider:
    base: dict[str, object] = dict(
        num_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        vocab_size=128,
        seq_length=32,
        hidden_dropout=0.0,
        attention_dropout=0.0,
    )
    base.update(kw)
    return GPTModelProvider(**base)  # type: ignore[arg-type]


CONFIGS = {
    "gpt2-like": dict(),
    "llama-like": dict(
        normalization="RMSNorm",
        add_bias_linear=False,
        gated_linear_unit=True,
        activation_func="silu",
        position_embedding_type="rope",
        num_query_groups=2,
        share_embeddings_and_output_weights=False,
    ),
    "qwen3-like": dict(
        normalization="RMSNorm",
        add_bias_linear=False,
        qk_layernorm=True,
        kv_channels=32,
        gated_linear_unit=True,
        position_embedding_type="rope",
        num_query_groups=1,
    ),
    "qwen2-like": dict(
        normalization="RMSNorm", add_bias_linear=False, add_qkv_bias=True, position_embedding_type="rope"
    ),
    "layernorm-qk-untied": dict(qk_layernorm=True, share_embeddings_and_output_weights=False),
    "padded-vocab": dict(vocab_size=1000, should_pad_vocab=True, make_vocab_size_divisible_by=64),
    "no-positions": dict(position_embedding_type="none", ffn_hidden_size=96, num_layers=3),
    "zero-centered": dict(layernorm_zero_centered_gamma=True, normalization="RMSNorm", num_query_groups=2),
}


@pytest.mark.parametrize("kw", CONFIGS.values(), ids=CONFIGS.keys())
def test_num_parameters_matches_the_built_model(kw: dict) -> None:
    p = provider(**kw)
    model = p.provide()
    params = dict(model.named_parameters())
    assert num_parameters(p) == sum(t.numel() for t in params.values())
    tables = sum(t.numel() for n, t in params.items() if n.startswith("embedding."))
    assert embedding_parameters(p) == tables
    assert num_parameters(p, exclude_embeddings=True) == num_parameters(p) - tables
    expected_tables = p.padded_vocab_size() * 64
    if p.position_embedding_type == "learned_absolute":
        expected_tables += p.seq_length * 64
    assert tables == expected_tables


def test_flops_per_token_by_hand() -> None:
    p = provider(ffn_hidden_size=256)  # LayerNorm, biases, tied, learned positions
    L, h, heads, d, ffn, V, s = 2, 64, 4, 16, 256, 128, 32
    layer = (
        2 * 2 * h  # two LayerNorms (weight + bias)
        + (3 * heads * d) * h
        + 3 * heads * d  # linear_qkv
        + h * heads * d
        + h  # linear_proj
        + ffn * h
        + ffn  # linear_fc1
        + h * ffn
        + h  # linear_fc2
    )
    non_embedding = L * layer + 2 * h  # + final norm
    assert num_parameters(p, exclude_embeddings=True) == non_embedding == 100096
    attention = 12 * L * heads * d * s
    assert flops_per_token(p) == 6 * (non_embedding + V * h) + attention == 698880
    assert flops_per_token(p, causal=True) == 6 * (non_embedding + V * h) + attention / 2
    assert flops_per_token(p, 64) - flops_per_token(p) == 12 * L * heads * d * 32
    # The output GEMM counts once, tied or not.
    assert flops_per_token(provider(ffn_hidden_size=256, share_embeddings_and_output_weights=False)) == (
        flops_per_token(p)
    )
    assert mfu(1000.0, flops_per_token(p), peak_flops=698880e3) == pytest.approx(1.0)


# ---------------------------------------------------------------------------------------------- memory


def saved_bytes(p: GPTModelProvider, micro_batch_size: int) -> int:
    """Bytes of the non-parameter tensors a CPU float32 training forward saves for backward."""
    torch.manual_seed(0)
    model = p.provide()
    weights = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    x = torch.randint(0, p.vocab_size, (micro_batch_size, p.seq_length))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(x, labels=x)
    loss.mean().backward()  # the graph was real
    return sum(seen.values())


FULL_UNIFORM = dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
SELECTIVE = {m: dict(recompute_granularity="selective", recompute_modules=[m]) for m in ("core_attn", "mlp")}
MEMORY_CONFIGS = {
    "plain": dict(),
    "dropout": dict(hidden_dropout=0.1),
    "llama-like": CONFIGS["llama-like"],
    "wider": dict(hidden_size=128, num_layers=3, seq_length=64),
    "selective-mlp": SELECTIVE["mlp"],
    "selective-core_attn": SELECTIVE["core_attn"],
}


@pytest.mark.slow
@pytest.mark.parametrize("kw", MEMORY_CONFIGS.values(), ids=MEMORY_CONFIGS.keys())
def test_activation_estimate_is_close_to_the_saved_tensors(kw: dict) -> None:
    p = provider(**kw)
    estimate = estimate_memory(p, 2).activations
    measured = saved_bytes(p, 2)
    assert 0.5 <= estimate / measured <= 2, (estimate, measured)


def test_full_recompute_estimate_is_saved_inputs_plus_one_layer() -> None:
    # With uniform chunks of one layer the peak is the chunk inputs plus one recomputed layer.
    p = provider(**FULL_UNIFORM)
    per_layer = saved_bytes(provider(), 2) / 2
    measured = saved_bytes(p, 2)
    assert measured < 0.3 * saved_bytes(provider(), 2)
    estimate = estimate_memory(p, 2).activations
    assert 0.5 <= estimate / (measured + per_layer) <= 2


def test_recompute_shrinks_the_estimate_and_the_saved_tensors() -> None:
    none = provider()
    est = estimate_memory(none, 2).activations
    for kw in (FULL_UNIFORM, SELECTIVE["mlp"]):
        assert estimate_memory(provider(**kw), 2).activations < est, kw
    # The fused kernels keep only q, k, v and the output, so core_attn recompute frees nothing there.
    assert estimate_memory(provider(**SELECTIVE["core_attn"]), 2).activations == est
    measured = saved_bytes(none, 2)
    assert saved_bytes(provider(**FULL_UNIFORM), 2) < 0.3 * measured
    assert saved_bytes(provider(**SELECTIVE["mlp"]), 2) < 0.7 * measured
    # The unfused attention keeps its [heads, seq, seq] probabilities unless core_attn is recomputed.
    unfused = provider(attention_backend=AttnBackend.unfused)
    unfused_core = provider(attention_backend=AttnBackend.unfused, **SELECTIVE["core_attn"])
    assert saved_bytes(unfused_core, 2) < saved_bytes(unfused, 2) - 2 * 2 * 4 * 32 * 32 * 4


def test_block_recompute_never_costs_more_than_no_recompute() -> None:
    block = provider(recompute_granularity="full", recompute_method="block", recompute_num_layers=1)
    assert saved_bytes(block, 2) < saved_bytes(provider(), 2)  # what really happens
    assert estimate_memory(block, 2).activations < estimate_memory(provider(), 2).activations


def test_layernorm_recompute_is_refused_until_it_can_free_memory() -> None:
    p = provider(recompute_granularity="selective", recompute_modules=["layernorm"])
    with pytest.raises(ConfigError, match="recomputing 'layernorm' is not supported yet"):
        p.finalize()


def test_activations_grow_linearly_with_the_micro_batch() -> None:
    p = provider(**CONFIGS["llama-like"])
    one = estimate_memory(p, 1)
    for b in (2, 3, 8):
        est = estimate_memory(p, b)
        assert est.activations == b * one.activations
        assert (est.parameters, est.gradients, est.optimizer) == (
            one.parameters,
            one.gradients,
            one.optimizer,
        )
    assert saved_bytes(p, 3) == pytest.approx(3 * saved_bytes(p, 1), rel=0.02)
    assert estimate_memory(p, 1, seq_length=16).activations == one.activations // 2


def test_fused_loss_keeps_fewer_logits_when_they_do_not_fit() -> None:
    vocab, seq, b = 128000, 4096, 4
    fused = provider(vocab_size=vocab, seq_length=seq)
    unfused = provider(vocab_size=vocab, seq_length=seq, cross_entropy_loss_fusion=False)
    tokens = b * seq
    chunk = default_chunk_tokens(vocab)
    assert chunk == 8192 < tokens  # more than one chunk
    all_logits = tokens * vocab * 4
    unfused_logits = estimate_memory(unfused, b).logits
    assert unfused_logits == tokens * vocab * (2 * 4 + 4)  # logits, their gradient, a float32 copy
    over = estimate_memory(fused, b, keep_logits_bytes=all_logits - 1).logits
    assert over == 2 * chunk * vocab * 4 + tokens * 8  # two chunks + float32 loss and lse
    assert over < unfused_logits
    kept = estimate_memory(fused, b, keep_logits_bytes=all_logits).logits
    assert kept == all_logits + chunk * vocab * 4 + tokens * 8
    assert over < kept < unfused_logits
    assert estimate_memory(unfused, b, keep_logits_bytes=0).logits == unfused_logits  # fused only


def test_memory_estimate_parts() -> None:
    p = provider()
    n = num_parameters(p)
    est = estimate_memory(p, 1)
    assert (est.parameters, est.gradients, est.optimizer) == (4 * n, 4 * n, 8 * n)
    assert est.total == est.parameters + est.gradients + est.optimizer + est.activations + est.logits
    bf16 = provider().apply_overrides_and_finalize(dtype="bf16")
    est16 = estimate_memory(bf16, 1)
    assert (est16.parameters, est16.gradients, est16.optimizer) == (2 * n, 4 * n, 12 * n)
    assert est16.activations == est.activations // 2
    assert estimate_memory(bf16, 1, master_weights=False).gradients == 2 * n
    assert est.gathered_weights == 0  # only FSDP gathers copies
    assert set(est.as_gib()) == {
        "parameters",
        "gradients",
        "optimizer",
        "gathered_weights",
        "activations",
        "logits",
        "total",
    }


# ------------------------------------------------------------------------------------ parallel layouts

GiB = 2**30


def bf16(**kw: object) -> GPTModelProvider:
    """The llama-like test model in bf16 (the bf16_mixed recipe's params_dtype)."""
    p = provider(**CONFIGS["llama-like"], **kw)  # type: ignore[arg-type]
    p.apply_overrides_and_finalize(dtype="bf16")
    return p


def weight_state(est: MemoryEstimate) -> int:
    return est.parameters + est.gradients + est.optimizer


# Parameters the tensor-parallel plan splits (viaduct.distributed.parallelize): the column-parallel
# layers' weights and biases, the row-parallel layers' weights, the embedding tables, the output layer.
_SPLIT = (
    "linear_qkv.weight",
    "linear_qkv.bias",
    "linear_fc1.weight",
    "linear_fc1.bias",
    "linear_proj.weight",
    "linear_fc2.weight",
    "embeddings.weight",
    "output_layer.weight",
)


@pytest.mark.parametrize("kw", CONFIGS.values(), ids=CONFIGS.keys())
def test_tensor_parallel_weights_are_the_built_models_split_and_replicated_tensors(kw: dict) -> None:
    p = provider(**kw)
    params = dict(p.provide().named_parameters())
    split = sum(t.numel() for n, t in params.items() if n.endswith(_SPLIT))
    replicated = sum(t.numel() for n, t in params.items() if not n.endswith(_SPLIT))
    groups = p.num_query_groups or p.num_attention_heads
    sizes = [tp for tp in (2, 4) if p.num_attention_heads % tp == 0 and groups % tp == 0]
    assert sizes or groups == 1
    for tp in sizes:
        assert split % tp == 0
        # Tensor parallelism without sharding: FSDP2 over one rank, float32 weights, no master copy.
        est = estimate_memory(p, 1, layout=ParallelLayout(world_size=tp, tp=tp))
        local = split // tp + replicated
        assert (est.parameters, est.optimizer) == (4 * local, 8 * local)
        # Unsharded, FSDP reduces once per step: micro-batches accumulate into a second set of gradients.
        assert est.gradients == 4 * local + 4 * local
        sharded = ParallelLayout(world_size=tp, tp=tp, strategy="optim_grads_params")
        assert estimate_memory(p, 1, layout=sharded).gradients == 4 * local


@pytest.mark.parametrize("shards", [2, 4, 8, 3])
def test_fsdp_shards_parameters_gradients_and_optimizer_state(shards: int) -> None:
    p = bf16(num_layers=6)
    n = num_parameters(p)
    # A sharding strategy on one data-parallel rank has nothing to shard over: plain training.
    one = ParallelLayout(world_size=1, dp_shard=1, strategy="optim_grads_params")
    assert estimate_memory(p, 1, layout=one) == estimate_memory(p, 1)
    layout = ParallelLayout(world_size=shards, dp_shard=shards, strategy="optim_grads_params")
    est = estimate_memory(p, 1, layout=layout)
    shard = -(-n // shards)
    # float32 shards of the weights (the master copy), of their gradients and of Adam's two moments.
    assert (est.parameters, est.gradients, est.optimizer) == (4 * shard, 4 * shard, 8 * shard)
    assert weight_state(est) == pytest.approx(16 * n / shards, abs=16)
    ddp = estimate_memory(p, 1)
    assert weight_state(ddp) == 18 * n  # bf16 weights + fp32 grads + fp32 master + two moments
    # The data each rank sees does not change with the number of shards.
    assert (est.activations, est.logits) == (ddp.activations, ddp.logits)
    assert 0 < est.gathered_weights < 2 * n  # the root group and two of the six layers, in bf16


def test_fsdp_strategies_differ_in_what_stays_unsharded() -> None:
    p = bf16(num_layers=6)
    n = num_parameters(p)
    shard = -(-n // 4)

    def strategy(
        name: ShardingStrategy, grad_reduce_in_fp32: bool | None = None, num_microbatches: int | None = None
    ) -> MemoryEstimate:
        layout = ParallelLayout(world_size=4, dp_shard=4, strategy=name)
        return estimate_memory(
            p, 1, layout=layout, grad_reduce_in_fp32=grad_reduce_in_fp32, num_microbatches=num_microbatches
        )

    zero3, zero2, zero1 = strategy("optim_grads_params"), strategy("optim_grads"), strategy("optim")
    # Without reshard_after_forward every layer's bf16 weights stay gathered until its backward.
    assert zero2.gathered_weights == zero1.gathered_weights == 2 * n
    assert zero3.gathered_weights < zero2.gathered_weights
    assert zero2.gradients == zero3.gradients == 4 * shard
    # optim accumulates unsharded gradients over the micro-batches: float32 with grad_reduce_in_fp32.
    assert zero1.gradients == 4 * shard + 4 * n
    assert strategy("optim", grad_reduce_in_fp32=False).gradients == 4 * shard + 2 * n
    assert strategy("optim", num_microbatches=2).gradients == 4 * shard + 4 * n
    # With one micro-batch per step there is nothing to accumulate: each layer reduces as it goes.
    assert strategy("optim", num_microbatches=1).gradients == 4 * shard
    assert zero3.total < zero2.total < zero1.total


def test_plain_data_parallel_holds_everything_on_every_rank() -> None:
    p = bf16()
    assert estimate_memory(p, 2, layout=ParallelLayout(world_size=8, dp_replicate=8)) == estimate_memory(p, 2)


@pytest.mark.parametrize("recompute", [{}, FULL_UNIFORM, SELECTIVE["mlp"]], ids=["none", "full", "mlp"])
@pytest.mark.parametrize("tp", [2, 4])
def test_tensor_parallel_divides_activations_and_the_vocabulary(tp: int, recompute: dict) -> None:
    p = bf16(**recompute)
    one = estimate_memory(p, 2)
    plain = estimate_memory(p, 2, layout=ParallelLayout(world_size=tp, tp=tp))
    sp = estimate_memory(p, 2, layout=ParallelLayout(world_size=tp, tp=tp, sequence_parallel=True))
    # With sequence parallelism the residual stream is split too, but not the all-gathered inputs the
    # column-parallel GEMMs keep (QKV's, and fc1's unless the MLP is recomputed): one 16-bit [hidden]
    # tensor per GEMM, layer and token, whole on each rank.
    assert sp.activations < plain.activations < one.activations
    gemms = 1 if recompute.get("recompute_modules") == ["mlp"] else 2
    tokens, kept_layers = 2 * p.seq_length, (1 if recompute == FULL_UNIFORM else p.num_layers)
    gathered = tokens * 2 * p.hidden_size * (gemms * kept_layers + 1)  # + the output layer's input
    assert sp.activations == pytest.approx(one.activations / tp + gathered * (1 - 1 / tp), rel=1e-3)
    # The logits (all kept at this size, plus one chunk) are split by vocabulary; the per-token loss is not.
    per_token = 2 * p.seq_length * 8
    assert plain.logits - per_token == (one.logits - per_token) // tp == sp.logits - per_token


@pytest.mark.parametrize("cp", [2, 4])
def test_context_parallel_divides_activations_and_shards_weights(cp: int) -> None:
    p = bf16(**FULL_UNIFORM)
    one = estimate_memory(p, 2)
    est = estimate_memory(p, 2, layout=ParallelLayout(world_size=cp, cp=cp))
    assert est.activations == one.activations // cp
    # Context-parallel ranks reduce gradients together, so FSDP shards the weights over them too.
    n = num_parameters(p)
    assert est.parameters == 4 * -(-n // cp)


def test_llama3_8b_recipe_fits_eight_80gb_gpus_but_not_one() -> None:
    cfg = get_recipe("llama3_8b")()
    assert isinstance(cfg.model, GPTModelProvider)
    assert cfg.model.init_model_with_meta_device and cfg.train.micro_batch_size == 1
    cfg.validate(world_size=8)
    layout = layout_of(cfg, 8)
    assert (layout.strategy, layout.dp_shard, layout.tp) == ("optim_grads_params", 8, 1)
    est = check_memory(cfg, 8, 80)
    assert est == estimate_config_memory(cfg)
    n = num_parameters(cfg.model)
    assert weight_state(est) == pytest.approx(16 * n / 8, abs=16)
    assert est.total < 80 * GiB

    cfg.validate(world_size=1)
    with pytest.raises(MemoryBudgetError) as info:
        check_memory(cfg, 1, 80)
    err = info.value
    assert err.estimate.total > 80 * GiB and err.layout.world_size == 1
    assert weight_state(err.estimate) == 18 * n  # one rank: plain training, with bf16 weights
    text = str(err)
    assert f"needs about {err.estimate.total / GiB:.1f} GiB per GPU on 1 GPU" in text
    assert "more than the 80 GiB of one GPU" in text
    # One GPU cannot hold it whatever the settings: the options end with how many GPUs can.
    assert err.options and err.options[-1].fits and err.options[-1].world_size == 2
    assert "model.recompute_granularity=full" in text and "on 2 GPUs, fits" in text
    assert est.activations == err.estimate.activations  # the GPU count changes the weights only


def test_unsharded_llama3_8b_lists_sharding_tensor_parallel_recompute_and_micro_batch() -> None:
    cfg = get_recipe("llama3_8b")(micro_batch_size=2)
    cfg.ddp.use_distributed_optimizer = False
    cfg.ddp.data_parallel_sharding_strategy = "no_shard"
    cfg.validate(world_size=8)
    est = estimate_config_memory(cfg)
    assert est.total > 80 * GiB and est.gathered_weights == 0
    options = {" ".join(o.changes): o for o in memory_options(cfg, 8, 80)}
    shard = options["ddp.use_distributed_optimizer ddp.data_parallel_sharding_strategy"]
    tensor = options["model.tensor_model_parallel_size model.sequence_parallel"]
    recompute = options["model.recompute_granularity model.recompute_method model.recompute_num_layers"]
    micro = options["train.micro_batch_size"]
    # Each option is the estimate of the configuration it describes.
    for option in (shard, tensor, recompute, micro):
        variant = get_recipe("llama3_8b")(micro_batch_size=2)
        variant.ddp.use_distributed_optimizer = False
        variant.ddp.data_parallel_sharding_strategy = "no_shard"
        for path, value in option.changes.items():
            section, name = path.split(".")
            setattr(getattr(variant, section), name, value)
        variant.validate(world_size=8)
        assert estimate_config_memory(variant).total == option.total < est.total
    assert tensor.changes["model.tensor_model_parallel_size"] == 4  # the smallest that fits
    assert tensor.fits and not micro.fits
    with pytest.raises(MemoryBudgetError, match=r"model.tensor_model_parallel_size=4 .*GiB on 8 GPUs, fits"):
        check_memory(cfg, 8, 80)


@pytest.mark.parametrize("tied", [True, False])
def test_each_pipeline_rank_holds_the_weights_of_its_built_stage(tied: bool) -> None:
    p = provider(num_layers=4, share_embeddings_and_output_weights=tied, pipeline_model_parallel_size=2)
    layout = ParallelLayout(world_size=2, pp=2, schedule="1f1b")
    ranks = estimate_pipeline_memory(p, 1, layout=layout, num_microbatches=4)
    assert [(e.pipeline_rank, e.layers) for e in ranks] == [(0, 2), (1, 2)]
    for rank, est in enumerate(ranks):
        # What provide() builds for the stage: the first holds the embedding, the last the final norm and
        # the output layer (with tied embeddings a copy of the table).
        local = sum(t.numel() for t in p.provide(pp_rank=rank).parameters())
        # FSDP2 over one data-parallel rank: float32 weights, Adam's moments, the gradients and the
        # unsharded gradients a step accumulates (PyTorch's schedules reduce once per step), and the
        # weights gathered for compute (all of them: they stay gathered between micro-batches).
        assert (est.parameters, est.optimizer, est.gradients) == (4 * local, 8 * local, 8 * local)
        assert est.gathered_weights == 4 * local
    # Only the last stage computes logits; the estimate of the configuration is its busiest rank.
    assert ranks[0].logits == 0 < ranks[1].logits
    assert estimate_memory(p, 1, layout=layout, num_microbatches=4) == max(ranks, key=lambda e: e.total)


def test_a_pipeline_rank_holds_less_than_a_data_parallel_replica() -> None:
    p = bf16(num_layers=8, pipeline_model_parallel_size=2)
    ddp = estimate_memory(p, 1, layout=ParallelLayout(world_size=2, dp_replicate=2))
    pipeline = estimate_pipeline_memory(
        p, 1, layout=ParallelLayout(world_size=2, pp=2, schedule="1f1b"), num_microbatches=4
    )
    # Half the layers each, in float32 with float32 gradients accumulated per step and the weights
    # gathered in bf16, against the whole model's bf16 weights, float32 gradients, master and moments.
    for est in pipeline:
        assert weight_state(est) + est.gathered_weights < 0.75 * weight_state(ddp)


def test_activations_of_the_micro_batches_in_flight() -> None:
    # 8 layers on 4 pipeline ranks, without dropout: activations are (micro-batches in flight) × (one
    # micro-batch's activations of the rank's layers, plus the output it sent).
    p = provider(num_layers=8, pipeline_model_parallel_size=4)

    def activations(schedule: str, m: int, vpp: int = 1) -> list[int]:
        layout = ParallelLayout(world_size=4, pp=4, vpp=vpp, schedule=schedule)
        cfg = (
            p
            if vpp == 1
            else provider(
                num_layers=8, pipeline_model_parallel_size=4, virtual_pipeline_model_parallel_size=vpp
            )
        )
        return [e.activations for e in estimate_pipeline_memory(cfg, 1, layout=layout, num_microbatches=m)]

    one_f_one_b = activations("1f1b", 8)
    # 1f1b: rank r runs pp - r forwards before its first backward.
    assert one_f_one_b[0] * 2 == one_f_one_b[2] * 4 and one_f_one_b[0] * 3 == one_f_one_b[1] * 4
    # ... but never more than the step has; gpipe keeps every micro-batch of the step.
    assert activations("1f1b", 2)[0] * 2 == one_f_one_b[0]
    assert activations("gpipe", 8)[0] == 2 * one_f_one_b[0]
    # Interleaved with 2 chunks of 1 layer: the first rank keeps pp × vpp + pp - 1 = 11 chunks in flight,
    # the second 9 (Megatron's count).
    interleaved = activations("interleaved_1f1b", 8, vpp=2)
    chunk = (interleaved[0] - interleaved[1]) // 2
    assert interleaved[0] == 11 * chunk
    assert activations("interleaved_zero_bubble", 8, vpp=2)[0] == interleaved[0]


def test_llama3_70b_recipe_fits_64_80gb_gpus() -> None:
    cfg = llama3_70b_pretrain_config()
    m = cfg.model
    assert type(m) is Llama3ModelProvider70B and m.init_model_with_meta_device
    assert (m.num_layers, m.hidden_size, m.ffn_hidden_size, m.num_attention_heads, m.num_query_groups) == (
        80,
        8192,
        28672,
        64,
        8,
    )
    assert (m.vocab_size, m.seq_length, m.rotary_base) == (128256, 8192, 500_000)
    assert get_recipe("llama3_70b") is llama3_70b_pretrain_config
    cfg.validate(world_size=64)
    layout = layout_of(cfg, 64)
    assert (layout.pp, layout.vpp, layout.schedule) == (4, 5, "interleaved_1f1b")
    assert (layout.tp, layout.sequence_parallel, layout.dp_shard, layout.strategy) == (8, True, 2, "optim")
    assert cfg.num_microbatches == 16  # a multiple of the pipeline size, as the interleaved schedule needs
    est = check_memory(cfg, 64, 80)
    assert est.total < 60 * 2**30  # room for the CUDA context, communication buffers and fragmentation
    ranks = estimate_config_pipeline_memory(cfg)
    assert [e.layers for e in ranks] == [20] * 4 and [e.pipeline_rank for e in ranks] == [0, 1, 2, 3]
    assert est == max(ranks, key=lambda e: e.total)
    # A middle rank holds a quarter of the layers, split 8 ways: float32 weights, gradients and Adam's
    # moments sharded over the 2 data-parallel ranks, plus the float32 gradients a step accumulates.
    layers = num_parameters(m) - 2 * embedding_parameters(m)
    assert weight_state(ranks[1]) == pytest.approx((16 / 2 + 4) * layers / 32, rel=0.01)
    # Megatron Bridge's keywords still choose the split.
    tp4 = llama3_70b_pretrain_config(tensor_model_parallel_size=4)
    tp4.validate(world_size=64)
    assert layout_of(tp4, 64).tp == 4
    # Half the split: twice the split activations, the gathered GEMM inputs (whole) unchanged.
    assert (
        ranks[0].activations < estimate_config_pipeline_memory(tp4)[0].activations < 2 * ranks[0].activations
    )
    # Eight GPUs cannot hold the 8 × 4 tensor- and pipeline-parallel ranks.
    with pytest.raises(ConfigError, match=r"world size 8 is not divisible by .* \(8 × 4 × 1 = 32\)"):
        cfg.validate(world_size=8)


def test_config_estimate_counts_the_micro_batches_of_a_step() -> None:
    # ZeRO-1 (strategy optim) accumulates unsharded gradients only when a step has several micro-batches.
    cfg = get_recipe("llama3_8b")(global_batch_size=8)
    cfg.ddp.data_parallel_sharding_strategy = "optim"
    cfg.validate(world_size=8)
    assert cfg.num_microbatches == 1
    one = estimate_config_memory(cfg)
    assert isinstance(cfg.model, GPTModelProvider)
    n = num_parameters(cfg.model)
    assert one.gradients == 4 * -(-n // 8)
    # The planner's other world sizes get their own count: 8 samples on 4 ranks are 2 micro-batches.
    assert estimate_config_memory(cfg, 4).gradients == 4 * -(-n // 4) + 4 * n
    cfg.train.global_batch_size = 16
    cfg.validate(world_size=8)
    assert estimate_config_memory(cfg).gradients == one.gradients + 4 * n


def test_memory_budget_error_is_a_config_error_that_pickles() -> None:
    import pickle

    cfg = get_recipe("llama3_8b")()
    cfg.validate(world_size=1)
    with pytest.raises(ConfigError) as info:
        check_memory(cfg, 1, 80)
    again = pickle.loads(pickle.dumps(info.value))
    assert isinstance(again, MemoryBudgetError) and str(again) == str(info.value)
