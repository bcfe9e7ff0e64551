"""CPU speed of viaduct's training loop against a minimal nanoGPT-style loop on the same model.

    python bench/cpu_loop_bench.py                      # GPT-2-style shape: 4 layers, 256 wide, vocab 50304
    python bench/cpu_loop_bench.py --shape default      # the embedded default (`viaduct pretrain`)
    python bench/cpu_loop_bench.py --steps 20 --repeats 2 viaduct:dataset.num_workers=0

Two variants, each run `--repeats` times in its own process, alternating (baseline, viaduct,
baseline, viaduct, ...), so a busy machine slows both alike:

- `baseline`: viaduct's `GPTModel` of the shape in a bare loop: forward to the full logits,
  `F.cross_entropy`, backward, `torch.optim.AdamW` step (weight decay on matrices only, as nanoGPT
  groups them), gradient accumulation over the same micro-batches; the batches are made up front.
- `viaduct`: a real `pretrain()` of the recipe at that shape: the DataLoader, the model's own loss
  path, the loop's optimizer (with clipping), scheduler, a log line every 10 steps and the recipe's
  TensorBoard logging. It runs in a fresh temporary directory, so the recipe's run directory
  (./runs/tiny_gpt: checkpoints, logs) starts empty and is thrown away.

Both are float32 and eager on the CPU, with torch's default number of threads. The clock starts after
`--warmup` steps and stops after `--steps` more. One JSON line per run (tokens/s, step time, and for
viaduct the ratio to the baseline run just before it), then one summary line with the best run of
each variant and their ratio (the best, because other work on the machine only ever slows a run).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

# Shapes: model width and depth come from the recipe's model; these set the rest.
SHAPES: dict[str, dict[str, Any]] = {
    # GPT-2's padded vocabulary on the default model: the logits dominate the step.
    "gpt2": dict(vocab=50304, seq=256, micro_batch=8, global_batch=8),
    # `viaduct pretrain` with no arguments: the pydoc corpus and its 4,096-token tokenizer.
    "default": dict(vocab=None, seq=256, micro_batch=8, global_batch=16),
}


def _viaduct_config(shape: dict[str, Any], steps: int, overrides: list[str]) -> Any:
    from viaduct.config import apply_overrides
    from viaduct.recipes import get_recipe
    from viaduct.training.config import MockGPTDatasetConfig, TokenizerConfig

    cfg = get_recipe("default")()
    if shape["vocab"] is not None:  # synthetic tokens over the vocabulary (the DataLoader's defaults)
        cfg.dataset = MockGPTDatasetConfig(random_seed=1234)
        cfg.tokenizer = TokenizerConfig(tokenizer_type="NullTokenizer", vocab_size=shape["vocab"])
    apply_overrides(
        cfg,
        [
            f"model.seq_length={shape['seq']}",
            f"train.micro_batch_size={shape['micro_batch']}",
            f"train.global_batch_size={shape['global_batch']}",
            f"train.train_iters={steps}",
            "train.eval_iters=0",  # evaluation is not training time
            *overrides,
        ],
    )
    return cfg


def run_viaduct(shape: dict[str, Any], warmup: int, steps: int, overrides: list[str]) -> dict[str, Any]:
    import torch

    from viaduct.training.callbacks import Callback
    from viaduct.training.pretrain import pretrain

    total = warmup + steps
    cfg = _viaduct_config(shape, total, overrides)

    class Clock(Callback):
        def __init__(self) -> None:
            self.t: dict[int, float] = {}

        def on_train_step_end(self, ctx: Any) -> None:
            step = ctx.state.train_state.step
            if step in (warmup, total):
                self.t[step] = time.perf_counter()

    clock = Clock()
    pretrain(cfg, callbacks=[clock])
    dt = (clock.t[total] - clock.t[warmup]) / steps
    return dict(
        variant="viaduct",
        step_ms=round(dt * 1e3, 1),
        tokens_per_s=round(shape["global_batch"] * shape["seq"] / dt),
        vocab=cfg.model.vocab_size,
        num_workers=cfg.dataset.num_workers,
        threads=torch.get_num_threads(),
    )


def run_baseline(shape: dict[str, Any], warmup: int, steps: int, overrides: list[str]) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F

    cfg = _viaduct_config(shape, warmup + steps, overrides)
    provider = cfg.model
    if provider.vocab_size is None:  # the recipe's vocabulary follows its tokenizer
        from viaduct.data.tokenizers import build_tokenizer

        provider.vocab_size = build_tokenizer(cfg.tokenizer).vocab_size
    provider.finalize()
    torch.manual_seed(0)
    model = provider.provide()
    o = cfg.optimizer
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=o.lr,
        betas=(o.adam_beta1, o.adam_beta2),
        eps=o.adam_eps,
    )
    vocab = provider.padded_vocab_size()
    accumulation = shape["global_batch"] // shape["micro_batch"]
    g = torch.Generator().manual_seed(0)
    batches = [
        torch.randint(0, vocab, (shape["micro_batch"], shape["seq"] + 1), generator=g) for _ in range(8)
    ]

    def step(i: int) -> torch.Tensor:
        for m in range(accumulation):
            x = batches[(i * accumulation + m) % len(batches)]
            logits = model(x[:, :-1])
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), x[:, 1:].reshape(-1)) / accumulation
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    model.train()
    for i in range(warmup):
        step(i)
    t0 = time.perf_counter()
    for i in range(warmup, warmup + steps):
        step(i)
    dt = (time.perf_counter() - t0) / steps
    return dict(
        variant="baseline",
        step_ms=round(dt * 1e3, 1),
        tokens_per_s=round(shape["global_batch"] * shape["seq"] / dt),
        vocab=vocab,
        threads=torch.get_num_threads(),
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="gpt2")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument(
        "overrides",
        nargs="*",
        help="config overrides (a.b=v) for both variants; prefix one with viaduct: for the loop alone",
    )
    ap.add_argument("--variant", choices=["baseline", "viaduct"], help=argparse.SUPPRESS)  # one run
    args = ap.parse_args()
    shape = SHAPES[args.shape]
    if args.variant:
        overrides = [o.removeprefix("viaduct:") for o in args.overrides]
        if args.variant == "baseline":
            overrides = [o for o in args.overrides if not o.startswith("viaduct:")]
        run = run_baseline if args.variant == "baseline" else run_viaduct
        print(json.dumps(run(shape, args.warmup, args.steps, overrides)), flush=True)
        return

    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # a CPU benchmark, also on a GPU machine
    results: dict[str, list[float]] = {"baseline": [], "viaduct": []}
    for repeat in range(args.repeats):
        for variant in ("baseline", "viaduct"):
            cmd = [sys.executable, os.path.abspath(__file__), "--variant", variant, "--shape", args.shape]
            cmd += ["--warmup", str(args.warmup), "--steps", str(args.steps), *args.overrides]
            with tempfile.TemporaryDirectory(prefix="cpu_loop_bench_") as cwd:
                proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
            if proc.returncode != 0 or not lines:
                print(json.dumps(dict(variant=variant, error=proc.stderr.strip()[-1500:])), flush=True)
                sys.exit(1)
            result = json.loads(lines[-1])
            results[variant].append(result["tokens_per_s"])
            result.update(bench="cpu_loop", shape=args.shape, repeat=repeat, steps=args.steps)
            # Other work on the machine shows here: the run's own threads add about their number.
            result["loadavg_1min_after"] = round(os.getloadavg()[0], 2)
            if variant == "viaduct":
                result["ratio_to_baseline"] = round(result["tokens_per_s"] / results["baseline"][-1], 3)
            print(json.dumps(result), flush=True)
    base, ours = max(results["baseline"]), max(results["viaduct"])
    summary = dict(
        bench="cpu_loop",
        shape=args.shape,
        summary=True,
        best_baseline_tokens_per_s=round(base),
        best_viaduct_tokens_per_s=round(ours),
        ratio=round(ours / base, 3),
        overrides=args.overrides,
    )
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
