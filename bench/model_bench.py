"""Training-step speed of the GPT models: tokens/s, MFU and peak memory, one JSON line per run.

    python bench/model_bench.py --model llama32_1b --batch 16 --seq 2048            # one run
    python bench/model_bench.py --sweep step-speed                             # the docs/models.md table

A step is forward + backward + the training loop's optimizer (fused AdamW on float32 master
weights and main grads, gradient clipping), with bf16 weights and activations (Megatron's bf16
mixed precision). MFU uses the PaLM convention: FLOPs per token from
`viaduct.models.accounting.flops_per_token` over 989 TFLOP/s. Each sweep entry runs in its own
process so peak memory and an out-of-memory error stay with their run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any

SWEEPS: dict[str, list[dict[str, Any]]] = {
    "step-speed": [
        dict(model="llama32_1b", batch=16, seq=2048),
        dict(model="llama32_1b", batch=16, seq=2048, compile_scope="layers"),
        dict(model="llama32_1b", batch=8, seq=2048),
        dict(model="llama32_1b", batch=16, seq=2048, untied=True),
        dict(model="llama32_1b", batch=8, seq=2048, compile=False),
        dict(model="llama32_1b", batch=8, seq=2048, loss="unfused"),
        dict(model="llama32_1b", batch=16, seq=2048, recompute="full"),
        dict(model="llama32_1b", batch=32, seq=2048, recompute="full"),
        dict(model="llama32_1b", batch=16, seq=2048, recompute="selective"),
        dict(model="gpt2_124m", batch=32, seq=1024),
        dict(model="gpt2_124m", batch=64, seq=1024),
        dict(model="gpt2_124m", batch=64, seq=1024, compile_scope="layers"),
        dict(model="gpt2_124m", batch=32, seq=1024, compile=False),
    ],
    # The embedded default on a laptop-class CPU (float32, eager).
    "cpu": [
        dict(model="recipe:default", batch=8, seq=256, dtype="fp32", vocab=512),
        dict(
            model="recipe:default",
            batch=8,
            seq=256,
            dtype="fp32",
            vocab=512,
            overrides=dict(num_layers=2, hidden_size=128, ffn_hidden_size=352),
        ),
    ],
}


def run_one(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    from viaduct.models import AttnBackend, GPTModelProvider
    from viaduct.models.accounting import estimate_memory, flops_per_token, mfu, num_parameters
    from viaduct.models.compile import compile_model
    from viaduct.training.config import OptimizerConfig
    from viaduct.training.optim import build_optimizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    batch, seq = spec["batch"], spec["seq"]
    if spec["model"].startswith("recipe:"):  # the model of a recipe, e.g. recipe:default
        from viaduct.recipes import get_recipe

        provider = get_recipe(spec["model"].split(":", 1)[1])().model
        provider.vocab_size = provider.vocab_size or spec.get("vocab", 512)
    else:
        provider = GPTModelProvider.variant(spec["model"])()
    provider.seq_length = seq
    for name, value in spec.get("overrides", {}).items():
        setattr(provider, name, value)
    provider.hidden_dropout = provider.attention_dropout = 0.0
    provider.should_pad_vocab = True
    if spec.get("untied"):
        provider.share_embeddings_and_output_weights = False
    if spec.get("loss") == "unfused":
        provider.cross_entropy_loss_fusion = False
    if spec.get("backend"):
        provider.attention_backend = AttnBackend[spec["backend"]]
    provider.apply_overrides_and_finalize(dtype=spec.get("dtype", "bf16"))
    rc = spec.get("recompute")
    if rc == "full":
        provider.recompute_granularity, provider.recompute_method, provider.recompute_num_layers = (
            "full",
            "uniform",
            1,
        )
    elif rc == "selective":
        provider.recompute_granularity = "selective"
        provider.recompute_modules = spec.get("recompute_modules", ["mlp"])
    provider.finalize()
    torch.manual_seed(0)
    model = provider.provide(device=device)
    if spec.get("compile", device == "cuda"):
        kw = {"mode": spec["compile_mode"]} if spec.get("compile_mode") else {}
        compile_model(model, spec.get("compile_scope", "model"), **kw)
    # The training loop's own optimizer: fp32 master weights and main grads, fused AdamW, clipping.
    opt_cfg = OptimizerConfig(
        lr=1e-4, weight_decay=0.1, adam_beta2=0.95, clip_grad=spec.get("clip_grad", 1.0)
    )
    opt = build_optimizer(opt_cfg, model)
    g = torch.Generator(device=device).manual_seed(0)
    vocab = provider.vocab_size or 1
    x = torch.randint(0, vocab, (batch, seq + 1), device=device, generator=g)
    inputs, labels = x[:, :-1].contiguous(), x[:, 1:].contiguous()

    def step() -> torch.Tensor:
        opt.zero_grad()
        loss = model(inputs, labels=labels).mean()
        loss.backward()
        opt.step()
        return loss.detach()

    t0 = time.perf_counter()
    for _ in range(spec.get("warmup", 3)):
        step()
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    warmup_s = time.perf_counter() - t0
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    steps = spec.get("steps", 10)
    t0 = time.perf_counter()
    for _ in range(steps):
        last = step()
    sync()
    dt = (time.perf_counter() - t0) / steps
    if spec.get("profile"):
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            t1 = time.perf_counter()
            for _ in range(2):
                step()
            sync()
            wall = time.perf_counter() - t1
        events = prof.key_averages()
        table = events.table(sort_by="cuda_time_total", row_limit=int(spec["profile"]))
        busy = sum(e.self_device_time_total for e in events) / 1e6
        print(table, f"\nGPU busy {busy * 1e3:.1f} ms of {wall * 1e3:.1f} ms wall", file=sys.stderr)
    tokens = batch * seq
    fpt = flops_per_token(provider, seq)
    from viaduct.models.common.loss import keep_logits_budget

    est = estimate_memory(provider, batch, seq, keep_logits_bytes=keep_logits_budget(torch.device(device)))
    out = dict(spec)
    out.update(
        device=torch.cuda.get_device_name() if device == "cuda" else "cpu",
        torch=torch.__version__,
        params=num_parameters(provider),
        step_ms=round(dt * 1e3, 1),
        tokens_per_s=round(tokens / dt),
        mfu_pct=round(100 * mfu(tokens / dt, fpt), 1),
        mfu_causal_pct=round(100 * mfu(tokens / dt, flops_per_token(provider, seq, causal=True)), 1),
        peak_mem_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2) if device == "cuda" else None,
        estimate_gib=est.as_gib()["total"],
        warmup_s=round(warmup_s, 1),
        final_loss=round(float(last), 3),
    )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama32_1b", help="named provider alias")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--recompute", choices=["full", "selective"])
    ap.add_argument("--loss", choices=["fused", "unfused"], default="fused")
    ap.add_argument("--backend", choices=["auto", "flash", "fused", "unfused"])
    ap.add_argument("--untied", action="store_true")
    ap.add_argument("--sweep", choices=sorted(SWEEPS))
    ap.add_argument("--profile", type=int, default=0, help="print the top N CUDA kernels of 2 steps")
    ap.add_argument("--compile-mode", help="torch.compile mode, e.g. max-autotune-no-cudagraphs")
    ap.add_argument("--spec", help=argparse.SUPPRESS)  # one run, as JSON (used by --sweep)
    args = ap.parse_args()
    if args.spec:
        print(json.dumps(run_one(json.loads(args.spec))), flush=True)
        return
    if args.sweep:
        for spec in SWEEPS[args.sweep]:
            proc = subprocess.run(
                [sys.executable, __file__, "--spec", json.dumps(spec)],
                capture_output=True,
                text=True,
                env=os.environ,
            )
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
            if proc.returncode == 0 and lines:
                print(lines[-1], flush=True)
            else:
                err = "out of memory" if "OutOfMemory" in proc.stderr else proc.stderr.strip()[-800:]
                print(json.dumps(dict(spec, error=err)), flush=True)
        return
    spec = dict(
        model=args.model,
        batch=args.batch,
        seq=args.seq,
        steps=args.steps,
        compile=not args.no_compile,
        recompute=args.recompute,
        loss=args.loss,
        backend=args.backend,
        untied=args.untied,
        profile=args.profile,
        compile_mode=args.compile_mode,
    )
    print(json.dumps(run_one(spec)), flush=True)


if __name__ == "__main__":
    main()
