"""The bf16 CUDA path: fused loss, compiled layers and a few optimizer steps on a real GPU."""

from __future__ import annotations

import pytest
import torch

from viaduct.models import GPTModelProvider
from viaduct.models.common.loss import cross_entropy, linear_cross_entropy
from viaduct.models.compile import compile_model

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def _provider(dtype: str = "bf16", **kw: object) -> GPTModelProvider:
    base: dict[str, object] = dict(
        num_layers=2,
        hidden_size=256,
        num_attention_heads=4,
        num_query_groups=2,
        vocab_size=1000,
        seq_length=128,
        normalization="RMSNorm",
        activation_func="silu",
        gated_linear_unit=True,
        position_embedding_type="rope",
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
    )
    base.update(kw)
    p = GPTModelProvider(**base)  # type: ignore[arg-type]
    return p.apply_overrides_and_finalize(dtype=dtype)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_bf16_forward_matches_float32_reference() -> None:
    torch.manual_seed(0)
    p = _provider()
    with torch.device("cuda"):
        model = p.provide()
    ref = _provider("fp32").provide(device="cuda")
    ref.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    x = torch.randint(0, 1000, (2, 128), device="cuda")
    assert model.embedding is not None and model.embedding.word_embeddings.weight.dtype == torch.bfloat16
    logits = model(x)
    assert logits.dtype == torch.bfloat16 and logits.shape == (2, 128, 1000)
    assert _rel(logits, ref(x)) < 2e-2
    loss = model(x, labels=x)
    assert loss.dtype == torch.float32
    assert _rel(loss, ref(x, labels=x)) < 1e-2


@pytest.mark.parametrize("keep", [0, 1 << 30])
def test_fused_loss_matches_unfused_on_cuda(keep: int) -> None:
    torch.manual_seed(0)
    h = torch.randn(4096, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(5000, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    y = torch.randint(0, 5000, (4096,), device="cuda")
    g = torch.rand(4096, device="cuda")
    ref = cross_entropy(h.double() @ w.double().t(), y)
    (ref * g).sum().backward()
    gh, gw = h.grad.clone(), w.grad.clone()  # type: ignore[union-attr]
    h.grad = w.grad = None
    out = linear_cross_entropy(h, w, y, chunk_tokens=1024, keep_logits_bytes=keep)
    (out * g).sum().backward()
    assert _rel(out, ref) < 1e-2
    assert _rel(h.grad, gh) < 2e-2  # type: ignore[arg-type]
    assert _rel(w.grad, gw) < 2e-2  # type: ignore[arg-type]


def test_compiled_layers_match_eager_and_train() -> None:
    torch.manual_seed(0)
    model = _provider().provide(device="cuda")
    x = torch.randint(0, 1000, (4, 128), device="cuda")
    eager = model(x, labels=x).detach()
    compile_model(model)
    assert _rel(model(x, labels=x).detach(), eager) < 1e-2
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, fused=True)
    first = None
    for _ in range(30):
        loss = model(x, labels=x).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        first = first if first is not None else float(loss)
    assert float(loss) < 0.5 * first


def test_mamba_bf16_compiled_matches_float32_and_trains() -> None:
    """The Mamba-2 layer on CUDA: bf16 (bf16 scan matmuls) and per-layer compile against float32,
    and a model built on the meta device initializes on the GPU and trains."""
    from viaduct.models import MambaModelProvider
    from viaduct.models.compile import compile_model as compile_layers

    def provider(dtype: str, **kw: object) -> MambaModelProvider:
        p = MambaModelProvider(
            hybrid_layer_pattern="M*M-",
            hidden_size=256,
            num_attention_heads=4,
            ffn_hidden_size=512,
            mamba_num_groups=2,
            mamba_head_dim=32,
            mamba_state_dim=64,
            mamba_chunk_size=32,
            vocab_size=1000,
            seq_length=256,
            **kw,  # type: ignore[arg-type]
        )
        return p.apply_overrides_and_finalize(dtype=dtype)  # type: ignore[return-value]

    x = torch.randint(0, 1000, (2, 256), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    ref = provider("fp32").provide(device="cuda", init_seed=1)
    model = provider("bf16").provide(device="cuda", init_seed=1)
    with torch.no_grad():
        for p, q in zip(model.parameters(), ref.parameters(), strict=True):
            q.copy_(p.float())
    expected = ref(x, labels=x).detach()
    assert _rel(model(x, labels=x).detach().float(), expected) < 2e-2
    compile_layers(model, "layers")
    assert _rel(model(x, labels=x).detach().float(), expected) < 2e-2

    meta = provider("bf16", init_model_with_meta_device=True).provide()
    meta.to_empty(device="cuda")
    meta.init_weights(3)
    opt = torch.optim.AdamW(meta.parameters(), lr=3e-3)
    first = None
    for _ in range(30):
        loss = meta(x, labels=x).float().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        first = first if first is not None else float(loss)
    assert float(loss) < 0.5 * first
