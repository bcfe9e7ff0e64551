"""Decode speed of `viaduct.inference.generate_tokens` with the KV cache: one JSON line per run and one
per target.

    python bench/generate_bench.py                              # Llama-3.2-1B shape, bf16, batch 1, GPU
    python bench/generate_bench.py --batch 8 --new 512          # other shapes
    python bench/generate_bench.py --tiny --device cpu          # a small model: a smoke test on a CPU
    python bench/generate_bench.py --model mamba2_130m          # Mamba-2 130M: a scan state, no KV cache

Random weights (the speed does not depend on them), a prompt of `--prompt` random token ids, greedy,
no end-of-sequence token (every row generates all `--new` tokens). Everything goes through the public
API, so on a GPU the decode step is compiled as `generate_tokens` does by default. After one warm-up
generation of the full length (compiles the decode graph for this batch and cache length), each
repeat times two calls:

* `max_new_tokens=1`: the prefill (one forward pass over the prompt) and the first token;
* `max_new_tokens=N`: the same prefill plus N - 1 decode steps (one token per row each).

The decode phase is their difference: decode tokens/s = batch × (N - 1) / (T(N) - T(1)), prefill
excluded. Prefill tokens/s = batch × prompt / T(1). The medians of `--repeats` are reported.
Target (the default shape, one GPU): decode ≥ 150 tokens/s.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

DECODE_TARGET = 150.0
"""Decode tokens/s the default shape must reach at batch 1 on one GPU."""


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from viaduct.inference import generate_tokens
    from viaduct.models.accounting import num_parameters
    from viaduct.models.gpt.provider import GPTModelProvider
    from viaduct.models.llama import Llama32ModelProvider1B
    from viaduct.models.mamba import MambaModelProvider130M

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    provider: GPTModelProvider
    overrides: dict[str, Any] = {}
    if args.model == "mamba2_130m":
        provider = MambaModelProvider130M(vocab_size=50277, should_pad_vocab=True)
        if args.tiny:  # two Mamba-2 layers, 128 wide
            overrides = dict(num_layers=None, hybrid_layer_pattern="MM", hidden_size=128, mamba_head_dim=32)
    else:
        provider = Llama32ModelProvider1B()
        if args.tiny:
            # Llama-3.2 layout (GQA, tied embeddings, llama3 rope) at a size a CPU runs in seconds.
            overrides = dict(
                num_layers=2,
                hidden_size=128,
                ffn_hidden_size=352,
                num_attention_heads=4,
                num_query_groups=2,
                kv_channels=32,
                vocab_size=512,
            )
    overrides.update(seq_length=max(args.prompt + args.new, 2048), hidden_dropout=0.0, attention_dropout=0.0)
    provider.apply_overrides_and_finalize(dtype=args.dtype, overrides=overrides)
    model = provider.provide(device=device, init_seed=0)
    vocab = provider.vocab_size
    assert vocab is not None  # set by the provider class or the override above
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, vocab, (args.batch, args.prompt), generator=g).tolist()
    compile_ = None if args.compile == "auto" else args.compile == "on"

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def timed(n: int) -> tuple[float, list[list[int]]]:
        sync()
        t0 = time.perf_counter()
        out = generate_tokens(model, prompts, max_new_tokens=n, temperature=0.0, compile=compile_)
        sync()  # the tokens were read back already; this only makes the end explicit
        return time.perf_counter() - t0, out

    t0 = time.perf_counter()
    _, warm = timed(args.new)  # compiles the decode step (GPU) for this batch and cache length
    timed(1)
    warmup_s = time.perf_counter() - t0
    prefill, full = [], []
    for _ in range(args.repeats):
        dt1, _ = timed(1)
        dtn, out = timed(args.new)
        if out != warm:  # greedy: every repeat must produce the same tokens
            raise RuntimeError("greedy generation differed between repeats")
        prefill.append(dt1)
        full.append(dtn)
    t_prefill, t_full = statistics.median(prefill), statistics.median(full)
    decode_s = t_full - t_prefill
    decode_tps = args.batch * (args.new - 1) / decode_s if decode_s > 0 else None
    return dict(
        shape=("tiny " if args.tiny else "") + args.model,
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        torch=torch.__version__,
        dtype=args.dtype,
        params=num_parameters(provider),
        batch=args.batch,
        prompt_tokens=args.prompt,
        new_tokens=args.new,
        compile=compile_ if compile_ is not None else device.type == "cuda",
        repeats=args.repeats,
        warmup_s=round(warmup_s, 2),
        prefill_ms=round(t_prefill * 1e3, 2),
        prefill_tokens_per_s=round(args.batch * args.prompt / t_prefill, 1),
        total_ms=round(t_full * 1e3, 2),
        decode_ms_per_token=round(decode_s * 1e3 / (args.new - 1), 3),
        decode_tokens_per_s=round(decode_tps, 1) if decode_tps is not None else None,
        end_to_end_tokens_per_s=round(args.batch * args.new / t_full, 1),
        peak_mem_gib=round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        if device.type == "cuda"
        else None,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: CUDA when available)")
    ap.add_argument("--model", choices=["llama32_1b", "mamba2_130m"], default="llama32_1b")
    ap.add_argument("--tiny", action="store_true", help="a 2-layer, 128-wide model of the same layout")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt", type=int, default=128, help="prompt tokens per row")
    ap.add_argument("--new", type=int, default=256, help="new tokens per row (at least 2)")
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats (the median is reported)")
    ap.add_argument("--dtype", default=None, help="bf16 (default on a GPU), fp32 (default on a CPU), fp16")
    ap.add_argument(
        "--compile", choices=["auto", "on", "off"], default="auto", help="auto: as generate_tokens decides"
    )
    args = ap.parse_args()
    if args.new < 2 or args.prompt < 1 or args.batch < 1 or args.repeats < 1:
        ap.error("--new must be at least 2; --prompt, --batch and --repeats at least 1")
    if args.dtype is None:
        cpu = args.device == "cpu" or (args.device is None and not _cuda_available())
        args.dtype = "fp32" if cpu else "bf16"
    result = run(args)
    print(json.dumps(result), flush=True)
    if (
        args.model == "llama32_1b"
        and not args.tiny
        and args.batch == 1
        and args.prompt == 128
        and args.new == 256
    ):
        value = result["decode_tokens_per_s"]
        target = {
            "target": "decode-1b",
            "value": value,
            "goal": DECODE_TARGET,
            "unit": "tokens/s",
            "device": result["device"],
            "met": value is not None and value >= DECODE_TARGET,
        }
        print(json.dumps(target), flush=True)


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    main()
