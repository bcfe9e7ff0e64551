"""Speed of PyTorch's attention kernels (cuDNN, flash, memory-efficient) on T5-base's attention shapes.

    python bench/attention_bench.py                  # batch 32, 12 heads of 64, encoder 512 / decoder 128
    python bench/attention_bench.py --batch 128 --dropout 0.1 0.0

Cases: the encoder's self-attention (key padding), the decoder's self-attention (key padding and
causal, or causal alone: what the T5 step runs where the padding is at the end), and
cross-attention (key padding), each with and without attention dropout. A padding mask is the
additive [batch, 1, 1, keys] mask the T5 model builds; flash attention takes none and is reported
as n/a then. One line per case and kernel: forward, and forward + backward, in ms and TFLOP/s
(forward + backward counted as 3.5 times the forward's 4·b·h·q·k·d, as flash attention's papers
do). Needs CUDA.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

BACKENDS = (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION)


def _ms(fn: Callable[[], object], iters: int) -> float:
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def case(
    name: str, b: int, h: int, q_len: int, k_len: int, d: int, dropout: float, mask: str, iters: int
) -> None:
    """Time one shape; mask is "padding", "padding+causal", "causal" or "none"."""
    dev, dt = "cuda", torch.bfloat16
    q = torch.randn(b, h, q_len, d, device=dev, dtype=dt, requires_grad=True)
    k = torch.randn(b, h, k_len, d, device=dev, dtype=dt, requires_grad=True)
    v = torch.randn(b, h, k_len, d, device=dev, dtype=dt, requires_grad=True)
    grad = torch.randn(b, h, q_len, d, device=dev, dtype=dt)
    additive: torch.Tensor | None = None
    if mask.startswith("padding"):
        keep = torch.arange(k_len, device=dev) < torch.randint(
            k_len // 2, k_len + 1, (b, 1, 1, 1), device=dev
        )
        if mask == "padding+causal":
            keep = keep & torch.ones(q_len, k_len, dtype=torch.bool, device=dev).tril()
        additive = torch.where(keep, 0.0, torch.finfo(dt).min).to(dt)
    causal = mask == "causal"
    flops = 4 * b * h * q_len * k_len * d
    print(f"{name} (b {b}, h {h}, q {q_len}, k {k_len}, d {d}) dropout {dropout} mask {mask}")
    for backend in BACKENDS:

        def forward(backend: SDPBackend = backend) -> torch.Tensor:
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(
                    q, k, v, attn_mask=additive, dropout_p=dropout, is_causal=causal
                )

        def forward_backward() -> None:
            forward().backward(grad)

        try:
            f, fb = _ms(forward, iters), _ms(forward_backward, iters)
        except RuntimeError as exc:  # the kernel does not take this case
            print(f"    {backend.name:20s} n/a ({str(exc).splitlines()[0][:70]})")
            continue
        print(
            f"    {backend.name:20s} forward {f:.3f} ms ({flops / f / 1e9:.0f} TFLOP/s)"
            f"  forward+backward {fb:.3f} ms ({3.5 * flops / fb / 1e9:.0f} TFLOP/s)"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--encoder", type=int, default=512, help="encoder tokens")
    ap.add_argument("--decoder", type=int, default=128, help="decoder tokens")
    ap.add_argument("--dropout", type=float, nargs="+", default=[0.1, 0.0])
    ap.add_argument("--iters", type=int, default=30)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("attention_bench.py needs CUDA")
    shape = (args.batch, args.heads)
    enc, dec, d = args.encoder, args.decoder, args.head_dim
    for p in args.dropout:
        case("encoder self", *shape, enc, enc, d, p, "padding", args.iters)
        case("encoder self", *shape, enc, enc, d, p, "none", args.iters)
        case("decoder self", *shape, dec, dec, d, p, "padding+causal", args.iters)
        case("decoder self", *shape, dec, dec, d, p, "causal", args.iters)
        case("cross", *shape, dec, enc, d, p, "padding", args.iters)


if __name__ == "__main__":
    main()
