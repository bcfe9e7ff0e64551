"""Forward + backward time of one layer of each family at a model's shape, compiled, with the GPU
kernels that take the time: where a family's step goes, without building the whole model.

    python bench/layer_bench.py                                   # Mamba-2 780M layer vs its GPT's
    python bench/layer_bench.py --chunks 64 128 256               # the SSD chunk length's effect
    python bench/layer_bench.py --profile 12                      # + the 12 costliest kernels
    python bench/layer_bench.py --cpu --batch 1 --seq 256         # a quick check on a CPU
    python bench/layer_bench.py --ssd torch                       # the scan without the Triton kernels

The Mamba layer is `MambaLayer` of `MambaModelProvider780M` (48 of them make the model); the GPT
layer is a `TransformerLayer` of the Llama-architecture GPT of about the same size that
`families_bench.py mamba` compares against (25 layers: hidden 1536, FFN 4096, 12 heads of 128).
The Mamba model reaches the issue's 60% of the GPT's tokens/s only if 48 Mamba layers cost at most
25 / 0.6 GPT layers, i.e. a Mamba layer at most 0.87 GPT layer: `mamba_over_gpt_budget` is the
measured ratio against that budget (at most 1 meets it). One JSON line per layer.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import torch
from torch import nn

from viaduct.models import MambaModelProvider780M
from viaduct.models.common.transformer import TransformerLayer
from viaduct.models.llama.provider import LlamaModelProvider
from viaduct.models.mamba.model import MambaLayer
from viaduct.models.mamba.ssd import SSD_BACKENDS, set_ssd_backend

# The GPT of `families_bench.py mamba`: 25 of these layers against 48 Mamba layers.
GPT_LAYERS, MAMBA_LAYERS, TARGET = 25, 48, 0.6


class _CausalLayer(nn.Module):
    """A transformer layer called as a Mamba layer is: hidden states in, hidden states out (causal)."""

    def __init__(self, layer: TransformerLayer) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x, None, None)


def _gpt_layer(device: str, dtype: torch.dtype, seq: int) -> nn.Module:
    p = LlamaModelProvider(
        num_layers=GPT_LAYERS,
        hidden_size=1536,
        ffn_hidden_size=4096,
        num_attention_heads=12,
        num_query_groups=12,
        kv_channels=128,
        seq_length=seq,
        position_embedding_type="none",  # rotary costs a few elementwise ops; the layer alone has none
        vocab_size=50288,
    )
    p.finalize()
    return _CausalLayer(TransformerLayer(p, 1, device=device, dtype=dtype))


def _mamba_layer(device: str, dtype: torch.dtype, chunk: int | None) -> nn.Module:
    p = MambaModelProvider780M()
    if chunk is not None:
        p.mamba_chunk_size = chunk
    p.finalize()
    return MambaLayer(p, 1, device=device, dtype=dtype)


def _time(step: Callable[[], None], steps: int, sync: Callable[[], None]) -> float:
    for _ in range(3):  # compile and warm up
        step()
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return (time.perf_counter() - start) / steps


def run(layer: nn.Module, args: argparse.Namespace, device: str, dtype: torch.dtype) -> dict[str, object]:
    torch._dynamo.reset()
    if not args.no_compile:
        layer.compile(fullgraph=True)
    x = torch.randn(args.batch, args.seq, 1536, device=device, dtype=dtype, requires_grad=True)

    def step() -> None:
        layer(x).sum().backward()

    cuda = device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if cuda else 0
    seconds = _time(step, args.steps, sync)
    out: dict[str, object] = {"ms": round(seconds * 1e3, 3)}
    if cuda:
        out["peak_gib"] = round((torch.cuda.max_memory_allocated() - base) / 2**30, 3)
        if args.profile:
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(3):
                    step()
                sync()
            events = sorted(prof.key_averages(), key=lambda e: e.device_time_total, reverse=True)
            out["kernels_ms_per_step"] = {
                e.key[:90]: round(e.device_time_total / 3e3, 3) for e in events[: args.profile]
            }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--chunks", type=int, nargs="*", default=[], help="SSD chunk lengths to try")
    ap.add_argument("--profile", type=int, default=0, help="list this many costliest GPU kernels")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument(
        "--keep-scan",
        action="store_true",
        help="no recompute of the SSD scan in backward (PyTorch path; the fused kernels always recompute)",
    )
    ap.add_argument("--cpu", action="store_true", help="run on the CPU in float32 (a smoke test)")
    ap.add_argument(
        "--ssd",
        choices=SSD_BACKENDS,
        default="auto",
        help="the scan's within-chunk step: Triton kernels or PyTorch",
    )
    args = ap.parse_args()
    set_ssd_backend(args.ssd)
    device = "cpu" if args.cpu or not torch.cuda.is_available() else "cuda"
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    torch.manual_seed(0)
    gpt = run(_gpt_layer(device, dtype, args.seq), args, device, dtype)
    print(json.dumps({"layer": "gpt_780m", "device": device, **gpt}), flush=True)
    for chunk in args.chunks or [None]:
        layer = _mamba_layer(device, dtype, chunk)
        layer.mixer.recompute_scan = not args.keep_scan
        mamba = run(layer, args, device, dtype)
        ratio = float(mamba["ms"]) / float(gpt["ms"])  # type: ignore[arg-type]
        budget = GPT_LAYERS / (TARGET * MAMBA_LAYERS)
        line = {
            "layer": "mamba2_780m",
            "chunk": chunk or "default",
            "ssd": args.ssd,
            "keep_scan": args.keep_scan,
        }
        line |= mamba
        line |= {"mamba_over_gpt": round(ratio, 3), "mamba_over_gpt_budget": round(ratio / budget, 3)}
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
