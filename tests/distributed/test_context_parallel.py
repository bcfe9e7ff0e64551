"""Context parallelism: the load-balanced split and batch sharding (in-process), and the attention
kernel and a whole GPT model on real gloo groups, compared with one process running the full
sequence (outputs, per-token losses and gradients)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from viaduct.distributed.context_parallel import (
    ContextParallelAttention,
    ContextParallelError,
    apply_context_parallel,
    cp_positions,
    shard_batch,
)
from viaduct.models import AttnBackend, GPTModelProvider
from viaduct.models.common.attention import SelfAttention
from viaduct.testing import run_distributed

VOCAB = 128

# ---------------------------------------------------------------------------------------------- layout


def test_positions_pair_an_early_chunk_with_a_late_one() -> None:
    assert cp_positions(8, 2, 0).tolist() == [0, 1, 6, 7]
    assert cp_positions(8, 2, 1).tolist() == [2, 3, 4, 5]
    assert cp_positions(16, 4, 1).tolist() == [2, 3, 12, 13]
    assert cp_positions(6, 1, 0).tolist() == [0, 1, 2, 3, 4, 5]
    assert cp_positions(8, 2, 0).dtype == torch.int64


@pytest.mark.parametrize("cp", [1, 2, 3, 4])
def test_positions_cover_the_sequence_once_with_equal_causal_work(cp: int) -> None:
    seq = 2 * cp * 5
    parts = [cp_positions(seq, cp, r) for r in range(cp)]
    assert sorted(torch.cat(parts).tolist()) == list(range(seq))
    # Causal work of a rank: keys visible to its queries, sum of (position + 1).
    work = {int((p + 1).sum()) for p in parts}
    assert len(work) == 1


def test_indivisible_sequence_names_the_numbers_and_the_fix() -> None:
    with pytest.raises(ContextParallelError, match=r"sequence length 30 .* 2 x 4 = 8 .* multiple of 8") as e:
        cp_positions(30, 4, 0)
    assert isinstance(e.value, ValueError)
    assert "model.seq_length" in str(e.value)
    with pytest.raises(ContextParallelError, match="rank 2 is outside"):
        cp_positions(8, 2, 2)
    with pytest.raises(ContextParallelError, match=">= 1"):
        cp_positions(8, 0, 0)


def _batch(b: int = 2, s: int = 8) -> dict[str, torch.Tensor]:
    tokens = torch.arange(b * s).view(b, s) + 100
    return {
        "tokens": tokens,
        "labels": tokens + 1,
        "loss_mask": torch.ones(b, s),
        "num_samples": torch.tensor(b),  # no sequence dimension: passed through
    }


def test_shard_batch_creates_positions_before_slicing() -> None:
    batch = _batch()
    out = shard_batch(batch, 2, 1)
    assert out["tokens"].tolist() == [[102, 103, 104, 105], [110, 111, 112, 113]]
    assert torch.equal(out["labels"], out["tokens"] + 1)
    assert out["loss_mask"].shape == (2, 4)
    assert out["position_ids"].tolist() == [[2, 3, 4, 5]] * 2  # the true positions, not 0..3
    assert out["num_samples"] is batch["num_samples"]
    assert "position_ids" not in batch  # the input is left alone


def test_shard_batch_slices_given_positions_and_document_masks() -> None:
    batch = _batch()
    batch["position_ids"] = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4]] * 2)  # reset after a document end
    full = torch.rand(2, 1, 8, 8) > 0.5
    batch["attention_mask"] = full
    out = shard_batch(batch, 2, 0)
    assert out["position_ids"].tolist() == [[0, 1, 3, 4]] * 2
    rows = cp_positions(8, 2, 0)
    assert out["attention_mask"].shape == (2, 1, 4, 8)
    assert torch.equal(out["attention_mask"], full[:, :, rows, :])


def test_shard_batch_refuses_what_it_cannot_split() -> None:
    with pytest.raises(ContextParallelError, match="multiple of 4"):
        shard_batch(_batch(s=6), 2, 0)
    bad = _batch()
    bad["labels"] = bad["labels"][:, :7]
    with pytest.raises(ContextParallelError, match=r"batch\['labels'\] has shape \(2, 7\)"):
        shard_batch(bad, 2, 0)
    masked = _batch()
    masked["attention_mask"] = torch.zeros(2, 1, 1, 8, dtype=torch.bool)
    with pytest.raises(ContextParallelError, match=r"full \[batch, 1, seq, seq\] mask"):
        shard_batch(masked, 2, 0)
    with pytest.raises(ContextParallelError, match="no sequence to split"):
        shard_batch({"attention_mask": torch.zeros(1, 8, 8)}, 2, 0)


# ------------------------------------------------------------------------------------------ processes


def _close(actual: torch.Tensor, expected: torch.Tensor, where: str, *, rtol: float, atol: float) -> None:
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=lambda m: f"{where}: {m}")


def _init(backend: str = "gloo") -> None:
    torch.set_num_threads(1)
    dist.init_process_group(backend)


def _document_mask(b: int, s: int, gen: torch.Generator) -> torch.Tensor:
    """[b, 1, s, s] bool, True = may attend: causal within randomly placed documents."""
    doc = torch.cumsum(torch.rand(b, s, generator=gen) < 0.2, dim=1)
    same = doc[:, :, None] == doc[:, None, :]
    return (same & torch.ones(s, s, dtype=torch.bool).tril()).unsqueeze(1)


CPU_CASES: list[dict[str, object]] = [
    dict(num_query_groups=4),  # multi-head
    dict(num_query_groups=2),  # grouped-query
    dict(num_query_groups=1, attention_backend=AttnBackend.unfused),  # multi-query, math path
    dict(num_query_groups=2, window_size=(5, 0)),
    dict(num_query_groups=2, window_size=(5, 0), attention_backend=AttnBackend.local),
    dict(num_query_groups=2, document_mask=True),
    dict(num_query_groups=2, document_mask=True, attention_backend=AttnBackend.unfused),
]


def _check_attention(
    group: dist.ProcessGroup,
    cases: list[dict[str, object]],
    seed: int,
    *,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    tol: float = 1e-5,
) -> None:
    """Each rank feeds the CP kernel its shard of the same full q, k, v (and document mask) and
    compares the output and the q, k, v gradients with full attention on the whole sequence."""
    cp, cp_rank = dist.get_world_size(group), dist.get_rank(group)
    kernel = ContextParallelAttention(group)
    b, d, chunk = 2, 8, 3
    seq = 2 * cp * chunk
    pos = cp_positions(seq, cp, cp_rank).to(device)
    for i, case in enumerate(cases):
        kw = dict(case)
        document_mask = bool(kw.pop("document_mask", False))
        cfg = GPTModelProvider(
            num_layers=1,
            hidden_size=32,
            num_attention_heads=4,
            kv_channels=d,
            vocab_size=VOCAB,
            seq_length=seq,
            attention_dropout=0.0,
            **kw,  # type: ignore[arg-type]
        )
        cfg.finalize()
        module = SelfAttention(cfg)
        h, g = module.num_heads, module.num_groups
        gen = torch.Generator().manual_seed(seed + i)
        q, k, v = (torch.randn(b, n, seq, d, generator=gen).to(device, dtype) for n in (h, g, g))
        dout = torch.randn(b, h, seq, d, generator=gen).to(device, dtype)
        mask = _document_mask(b, seq, gen).to(device) if document_mask else None

        full = [t.clone().requires_grad_() for t in (q, k, v)]
        ref = module.core_attention(*full, mask)
        (ref * dout).sum().backward()

        local = [t[:, :, pos].clone().requires_grad_() for t in (q, k, v)]
        module.kernel = kernel
        out = module.core_attention(*local, None if mask is None else mask[:, :, pos])
        (out * dout[:, :, pos]).sum().backward()

        where = f"cp={cp} rank={cp_rank} {dtype} case={case}"
        _close(out, ref[:, :, pos], where, rtol=tol, atol=tol)
        for name, mine, whole in zip("qkv", local, full):
            assert mine.grad is not None and whole.grad is not None
            _close(mine.grad, whole.grad[:, :, pos], f"{where} d{name}", rtol=tol, atol=tol)


def _attention_worker(rank: int, world_size: int) -> None:
    _init()
    world = dist.group.WORLD
    assert world is not None
    _check_attention(world, CPU_CASES, seed=0)
    if world_size == 4:
        # Two CP groups of 2 ranks with different data: the kernel must use each rank's place in its
        # own group, not in the world.
        groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
        _check_attention(groups[rank // 2], CPU_CASES[:3], seed=100 * (1 + rank // 2))

    # Attention dropout is applied in training (and only then).
    cfg = GPTModelProvider(
        num_layers=1, hidden_size=32, num_attention_heads=4, vocab_size=VOCAB, seq_length=64
    )
    cfg.attention_dropout = 0.5
    cfg.finalize()
    module = SelfAttention(cfg)
    module.kernel = ContextParallelAttention(world)
    q = torch.randn(1, 4, 6, 8, generator=torch.Generator().manual_seed(0))
    module.eval()
    assert torch.equal(module.core_attention(q, q, q, None), module.core_attention(q, q, q, None))
    module.train()
    assert not torch.equal(module.core_attention(q, q, q, None), module.core_attention(q, q, q, None))

    # Inputs that were not split with shard_batch are refused with what to do.
    module.eval()
    with pytest.raises(ContextParallelError, match="shard_batch"):
        module.core_attention(q[:, :, :5], q[:, :, :5], q[:, :, :5], None)  # not two equal chunks
    unsplit_mask = torch.ones(6, 6, dtype=torch.bool).tril()  # the local square, not rows x all keys
    with pytest.raises(ContextParallelError, match=r"bool mask of this rank's 6 query rows"):
        module.core_attention(q, q, q, unsplit_mask)
    module.backend = AttnBackend.fused
    with pytest.raises(ContextParallelError, match="need CUDA"):
        module.core_attention(q, q, q, None)
    dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("cp", [2, 4])
def test_attention_matches_full_causal_attention(cp: int) -> None:
    """MHA, GQA, MQA, SDPA and math paths, sliding windows and document masks (fp32); with 4 ranks
    also two CP groups of 2."""
    run_distributed(_attention_worker, cp, timeout=90)


def _gpt_worker(rank: int, world_size: int) -> None:
    _init()
    group = dist.group.WORLD
    assert group is not None
    cp, b, seq = world_size, 2, 16
    variants: list[tuple[dict[str, object], bool]] = [
        (dict(position_embedding_type="rope"), False),
        (dict(position_embedding_type="learned_absolute"), False),
        (dict(position_embedding_type="rope"), True),  # document mask
        # The attention (and so its all-gather) is recomputed in the backward pass.
        (dict(position_embedding_type="rope", recompute_granularity="selective"), False),
    ]
    for kw, document_mask in variants:
        provider = GPTModelProvider(
            num_layers=2,
            hidden_size=32,
            num_attention_heads=4,
            num_query_groups=2,
            vocab_size=VOCAB,
            seq_length=seq,
            hidden_dropout=0.0,
            attention_dropout=0.0,
            **kw,  # type: ignore[arg-type]
        )
        torch.manual_seed(0)
        model = provider.provide()
        gen = torch.Generator().manual_seed(1)
        tokens = torch.randint(0, VOCAB, (b, seq + 1), generator=gen)
        batch = {
            "tokens": tokens[:, :-1],
            "labels": tokens[:, 1:],
            "loss_mask": (torch.rand(b, seq, generator=gen) > 0.2).float(),
        }
        if document_mask:
            batch["attention_mask"] = ~_document_mask(b, seq, gen)  # the model's convention: True = masked

        ref_losses = model(batch["tokens"], None, batch.get("attention_mask"), labels=batch["labels"])
        (ref_losses * batch["loss_mask"]).sum().backward()
        ref_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)

        assert apply_context_parallel(model, group) == 2
        shard = shard_batch(batch, cp, rank)
        mask = shard.get("attention_mask")
        losses = model(shard["tokens"], shard["position_ids"], mask, labels=shard["labels"])
        (losses * shard["loss_mask"]).sum().backward()

        gathered = [torch.empty_like(losses) for _ in range(cp)]
        dist.all_gather(gathered, losses.detach().contiguous(), group=group)
        full = torch.empty(b, seq)
        for r, part in enumerate(gathered):
            full[:, cp_positions(seq, cp, r)] = part
        where = f"{kw} document_mask={document_mask} cp={cp} rank={rank}"
        _close(full, ref_losses.detach(), where, rtol=1e-5, atol=1e-5)
        assert set(ref_grads) == {n for n, p in model.named_parameters() if p.grad is not None}
        for name, param in model.named_parameters():
            assert param.grad is not None
            dist.all_reduce(param.grad, group=group)  # CP ranks hold partial sums over their tokens
            _close(param.grad, ref_grads[name], f"{where} {name}", rtol=1e-4, atol=1e-5)
    dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.distributed
def test_gpt_losses_and_gradients_match_one_process() -> None:
    """A 2-layer GQA model on 2 CP ranks: rope, learned absolute positions, rope with a document
    mask, and with recomputed attention. Per-token losses reassembled, gradients summed over the group."""
    run_distributed(_gpt_worker, 2, timeout=90)


def _cuda_worker(rank: int, world_size: int) -> None:
    _init("nccl")
    torch.cuda.set_device(rank)
    world = dist.group.WORLD
    assert world is not None
    # Plain causal multi-head attention runs the lower-right causal bias (flash / memory-efficient
    # kernels); grouped queries, windows and document masks a tensor mask.
    cases: list[dict[str, object]] = [
        dict(num_query_groups=4),
        dict(num_query_groups=2),
        dict(num_query_groups=4, attention_backend=AttnBackend.fused),
        dict(num_query_groups=2, document_mask=True),
    ]
    # FlashAttention has no float32 kernel: only in bf16.
    flash: list[dict[str, object]] = [dict(num_query_groups=2, attention_backend=AttnBackend.flash)]
    _check_attention(world, cases, seed=0, device="cuda", dtype=torch.float32, tol=2e-3)
    _check_attention(world, cases + flash, seed=0, device="cuda", dtype=torch.bfloat16, tol=3e-2)
    dist.destroy_process_group()


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.distributed
def test_cuda_kernels_match_full_causal_attention() -> None:
    """NCCL and the CUDA attention kernels, on every visible GPU as one CP group."""
    run_distributed(_cuda_worker, torch.cuda.device_count(), timeout=120)
