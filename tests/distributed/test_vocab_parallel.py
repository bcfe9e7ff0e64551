"""The vocabulary-parallel output layer and loss against one process holding the whole vocabulary:
per-token loss, hidden-state gradient and each rank's weight-shard gradient, over real gloo groups
(several chunks, kept and recomputed logits, ignored labels, labels on the slice boundaries, DTensor
inputs), the gathered logits, and a group of one plugged into GPTModel."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

from viaduct.distributed.vocab_parallel import VocabParallelOutput
from viaduct.models.common.loss import IGNORE_INDEX, linear_cross_entropy
from viaduct.testing import run_distributed

B, S, H = 2, 5, 8
TOL = dict(rtol=1e-5, atol=1e-5)


def _inputs(vocab: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """hidden [B, S, H], full weight [vocab, H], labels [B, S], loss weights [B, S]: the same on
    every rank. The labels include ignored tokens and ids on both sides of every slice boundary."""
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(B, S, H, generator=g)
    weight = torch.randn(vocab, H, generator=g)
    labels = torch.randint(0, vocab, (B, S), generator=g)
    labels[0, 0] = labels[1, 3] = IGNORE_INDEX
    labels[0, 1], labels[0, 2], labels[1, 0], labels[1, 1] = 0, vocab - 1, vocab // 2 - 1, vocab // 2
    scale = torch.rand(B, S, generator=g) + 0.5  # a non-uniform incoming gradient
    return hidden, weight, labels, scale


def _reference(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, scale: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, grad of hidden, grad of weight) with the whole vocabulary, in float64."""
    h = hidden.double().requires_grad_()
    w = weight.double().requires_grad_()
    logits = (h @ w.t()).reshape(-1, w.shape[0])
    loss = F.cross_entropy(logits, labels.reshape(-1), reduction="none", ignore_index=IGNORE_INDEX)
    (loss * scale.reshape(-1).double()).sum().backward()
    assert h.grad is not None and w.grad is not None
    return loss.view(labels.shape).float(), h.grad.float(), w.grad.float()


def _loss_worker(rank: int, world: int) -> int:
    dist.init_process_group("gloo")
    try:
        group = dist.group.WORLD
        assert group is not None
        vocab = 6 * world
        rows = slice(rank * 6, (rank + 1) * 6)
        hidden, weight, labels, scale = _inputs(vocab)
        ref_loss, ref_gh, ref_gw = _reference(hidden, weight, labels, scale)
        checked = 0
        # (tokens per chunk, kept-logits budget): one chunk kept; 4 chunks recomputed; 4 chunks kept;
        # uneven chunks (4, 4, 2) under a budget too small for all logits (recomputed).
        for chunk, keep in [(None, None), (3, 0), (3, None), (4, 100)]:
            h = hidden.clone().requires_grad_()
            w = weight[rows].clone().requires_grad_()
            out = VocabParallelOutput(group, chunk_tokens=chunk, keep_logits_bytes=keep)
            loss = out.loss(h, w, labels)
            assert loss.dtype == torch.float32 and loss.shape == (B, S)
            (loss * scale).sum().backward()
            case = f"rank {rank}, chunk_tokens={chunk}, keep_logits_bytes={keep}"
            torch.testing.assert_close(loss, ref_loss, **TOL, msg=f"loss, {case}")
            assert (loss[labels == IGNORE_INDEX] == 0).all()
            torch.testing.assert_close(h.grad, ref_gh, **TOL, msg=f"grad of hidden, {case}")
            assert (h.grad[labels == IGNORE_INDEX] == 0).all()  # type: ignore[index]
            torch.testing.assert_close(w.grad, ref_gw[rows], **TOL, msg=f"grad of weight shard, {case}")
            checked += 1

        # As the parallelizer hands them over: the weight a Shard(0) DTensor parameter, the hidden
        # states a Replicate DTensor.
        mesh = init_device_mesh("cpu", (world,))
        wp = nn.Parameter(distribute_tensor(weight, mesh, [Shard(0)]))
        h = hidden.clone().requires_grad_()
        loss = VocabParallelOutput(group, chunk_tokens=4).loss(
            DTensor.from_local(h, mesh, [Replicate()]), wp, labels
        )
        (loss * scale).sum().backward()
        assert isinstance(wp.grad, DTensor) and wp.grad.placements == (Shard(0),)
        torch.testing.assert_close(loss, ref_loss, **TOL)
        torch.testing.assert_close(h.grad, ref_gh, **TOL)
        torch.testing.assert_close(wp.grad.to_local(), ref_gw[rows], **TOL)
        checked += 1

        # A weight that is not split by vocabulary rows is refused with the placements named.
        whole = distribute_tensor(weight, mesh, [Replicate()])
        with pytest.raises(ValueError, match="Shard"):
            VocabParallelOutput(group).loss(hidden, whole, labels)
        return checked
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("world", [2, 4])
def test_loss_and_gradients_match_one_process_with_the_whole_vocabulary(world: int) -> None:
    assert run_distributed(_loss_worker, world, timeout=60) == 5


def _logits_worker(rank: int, world: int) -> bool:
    dist.init_process_group("gloo")
    try:
        group = dist.group.WORLD
        assert group is not None
        vocab = 6 * world
        rows = slice(rank * 6, (rank + 1) * 6)
        hidden, weight, _, _ = _inputs(vocab)
        probe = torch.randn(B, S, vocab, generator=torch.Generator().manual_seed(1))
        h64 = hidden.double().requires_grad_()
        w64 = weight.double().requires_grad_()
        ref = h64 @ w64.t()
        (ref * probe.double()).sum().backward()
        assert h64.grad is not None and w64.grad is not None

        h = hidden.clone().requires_grad_()
        w = weight[rows].clone().requires_grad_()
        logits = VocabParallelOutput(group).logits(h, w)
        assert logits.shape == (B, S, vocab)
        (logits * probe).sum().backward()
        torch.testing.assert_close(logits, ref.float(), **TOL)
        torch.testing.assert_close(h.grad, h64.grad.float(), **TOL)
        torch.testing.assert_close(w.grad, w64.grad[rows].float(), **TOL)
        return True
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.distributed
def test_gathered_logits_and_their_gradients_match_one_process() -> None:
    assert run_distributed(_logits_worker, 2, timeout=60)


# ------------------------------------------------------------------ a group of one, in this process


@pytest.fixture
def group_of_one() -> Iterator[dist.ProcessGroup]:
    assert not dist.is_initialized()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        group = dist.group.WORLD
        assert group is not None
        yield group
    finally:
        dist.destroy_process_group()


def test_group_of_one_matches_the_local_fused_loss_also_under_autocast(
    group_of_one: dist.ProcessGroup,
) -> None:
    hidden, weight, labels, scale = _inputs(12)
    for autocast in (False, True):
        results = []
        for vocab_parallel in (False, True):
            h = hidden.clone().requires_grad_()
            w = weight.clone().requires_grad_()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                if vocab_parallel:
                    loss = VocabParallelOutput(group_of_one, chunk_tokens=3).loss(h, w, labels)
                else:  # what GPTModel.loss does under autocast
                    hh, ww = (h.bfloat16(), w.bfloat16()) if autocast else (h, w)
                    loss = linear_cross_entropy(hh, ww, labels, chunk_tokens=3)
            (loss * scale).sum().backward()
            results.append((loss, h.grad, w.grad))
        (loss_a, gh_a, gw_a), (loss_b, gh_b, gw_b) = results
        assert loss_b.dtype == torch.float32
        assert gh_b is not None and gw_b is not None and gw_b.dtype == torch.float32
        torch.testing.assert_close(loss_b, loss_a, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(gh_b, gh_a, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(gw_b, gw_a, rtol=1e-6, atol=1e-6)
    # bf16 GEMMs really ran: the autocast loss is not the float32 one.
    ref_loss = _reference(hidden, weight, labels, scale)[0]
    assert not torch.allclose(loss_b, ref_loss, rtol=0, atol=1e-5)


def test_gpt_model_with_a_group_of_one_matches_its_own_output_layer(
    group_of_one: dist.ProcessGroup,
) -> None:
    # Imported here: the spawned ranks import this module and need none of the model stack.
    from viaduct.models import GPTModelProvider

    cfg = GPTModelProvider(
        num_layers=1,
        hidden_size=32,
        num_attention_heads=4,
        vocab_size=64,
        seq_length=8,
        hidden_dropout=0.0,
        attention_dropout=0.0,
    )
    torch.manual_seed(0)
    model = cfg.provide()
    x = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))
    y = torch.roll(x, -1, 1)
    y[:, -1] = IGNORE_INDEX
    outputs = []
    for vocab_output in (None, VocabParallelOutput(group_of_one, chunk_tokens=5, keep_logits_bytes=0)):
        model.vocab_output = vocab_output
        model.zero_grad()
        loss = model(x, labels=y)
        loss.sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        outputs.append((model(x), loss, grads))
    (logits_a, loss_a, grads_a), (logits_b, loss_b, grads_b) = outputs
    torch.testing.assert_close(logits_b, logits_a, rtol=0, atol=0)
    torch.testing.assert_close(loss_b, loss_a, **TOL)
    assert grads_b.keys() == grads_a.keys()
    for name, g in grads_a.items():
        torch.testing.assert_close(grads_b[name], g, **TOL, msg=name)


def test_bad_settings_and_split_hidden_states_are_refused(group_of_one: dist.ProcessGroup) -> None:
    with pytest.raises(ValueError, match="chunk_tokens=0"):
        VocabParallelOutput(group_of_one, chunk_tokens=0)
    with pytest.raises(ValueError, match="keep_logits_bytes=-1"):
        VocabParallelOutput(group_of_one, keep_logits_bytes=-1)
    hidden, weight, labels, _ = _inputs(12)
    mesh = init_device_mesh("cpu", (1,))
    split = DTensor.from_local(hidden, mesh, [Shard(1)])
    with pytest.raises(ValueError, match=r"hidden states.*Replicate"):
        VocabParallelOutput(group_of_one).loss(split, weight, labels)
