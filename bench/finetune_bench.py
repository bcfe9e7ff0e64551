"""Fine-tuning speed and memory: LoRA against full fine-tuning, and the memory estimate against the peak.

    python bench/finetune_bench.py lora-8b        # Llama-3-8B shape, seq 4096, LoRA on one GPU:
                                                  #   peak memory vs `viaduct config validate`'s estimate
    python bench/finetune_bench.py lora-vs-full   # one model, one GPU: LoRA and full fine-tuning tokens/s
                                                  #   (--recipe llama32_1b by default: full FT must fit)
    python bench/finetune_bench.py all

Each case first writes a base checkpoint of the model with random weights (`--base-dir`, reused when
present: the weights do not change the speed), then runs `finetune()` through bench/pretrain_bench.py
(a real run: mock data through the DataLoader, optimizer, scheduler, logging) in a fresh process, so
that every run starts with an empty GPU. One JSON line per case.

Targets: LoRA on the 8B shape at sequence 4096 fits one 80 GB GPU, with a peak within 15% of the
estimate; LoRA runs at least 2.5x the tokens/s of full fine-tuning of the same model on the same GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
VOCAB = 128256  # Llama 3's vocabulary: the NullTokenizer gives the model its size

LORA = ["peft=lora", "peft.dim=16", "peft.alpha=32"]


def make_base(recipe: str, seq: int, directory: Path) -> str:
    """A checkpoint of `recipe`'s model with freshly initialised bf16 weights (written once)."""
    if (directory / "latest_checkpointed_iteration.txt").exists():
        return str(directory)
    code = f"""
import torch
from viaduct.config import apply_overrides
from viaduct.distributed.init import DistributedContext
from viaduct.recipes import get_recipe
from viaduct.training.checkpoint.checkpointer import Checkpointer
from viaduct.training.state import TrainState

cfg = get_recipe({recipe!r})()
apply_overrides(cfg, ["model.seq_length={seq}", "tokenizer.tokenizer_type=NullTokenizer",
    "tokenizer.tokenizer_model=null", "tokenizer.vocab_size={VOCAB - 1}", "model.vocab_size={VOCAB}",
    "checkpoint.save={directory}", "checkpoint.load=null", "checkpoint.async_save=false",
    "logger.tensorboard_dir=null"])
cfg.validate(world_size=1)
device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
with torch.no_grad():
    model = cfg.model.provide(device=device)
Checkpointer(cfg, DistributedContext(device=device)).save(0, model=model, optimizer=None, scheduler=None,
    train_state=TrainState())
"""
    subprocess.run([sys.executable, "-c", code], check=True)
    return str(directory)


def run(recipe: str, seq: int, mbs: int, gbs: int, base: str, extra: list[str], steps: int) -> dict[str, Any]:
    """One `finetune()` run through pretrain_bench.py in its own process; its JSON line."""
    command = [
        sys.executable,
        str(HERE / "pretrain_bench.py"),
        "--finetune",
        "--estimate",
        f"--recipe={recipe}",
        f"--seq={seq}",
        f"--mbs={mbs}",
        f"--gbs={gbs}",
        "--warmup=3",
        f"--steps={steps}",
        "--log-interval=5",
        "scheduler.lr_warmup_fraction=null",
        f"checkpoint.pretrained_checkpoint={base}",
        "tokenizer.tokenizer_type=NullTokenizer",
        "tokenizer.tokenizer_model=null",
        f"tokenizer.vocab_size={VOCAB - 1}",
        f"model.vocab_size={VOCAB}",
        *extra,
    ]
    proc = subprocess.run(command, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"error": (proc.stderr or proc.stdout)[-1500:], "overrides": extra}
    return json.loads(lines[-1])


def lora_8b(args: argparse.Namespace) -> dict[str, Any]:
    base = make_base("llama3_8b", 4096, Path(args.base_dir) / "llama3_8b")
    got = run("llama3_8b", 4096, 1, 8, base, [*LORA, "mixed_precision=bf16_mixed"], args.steps)
    est = got.get("estimate_gib")
    peak = got.get("peak_mem_gib")
    if est and peak:
        got["peak_over_estimate"] = round(peak / est, 3)
        got["within_15pct"] = abs(peak / est - 1) <= 0.15
    got["case"] = "lora-8b"
    return got


def lora_vs_full(args: argparse.Namespace) -> dict[str, Any]:
    base = make_base(args.recipe, args.seq, Path(args.base_dir) / args.recipe)
    common = ["mixed_precision=bf16_mixed"]
    lora = run(args.recipe, args.seq, args.mbs, args.gbs, base, [*LORA, *common], args.steps)
    full = run(args.recipe, args.seq, args.mbs, args.gbs, base, common, args.steps)
    out: dict[str, Any] = {"case": "lora-vs-full", "recipe": args.recipe, "lora": lora, "full": full}
    if "tokens_per_s_per_gpu" in lora and "tokens_per_s_per_gpu" in full:
        out["speedup"] = round(lora["tokens_per_s_per_gpu"] / full["tokens_per_s_per_gpu"], 2)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("case", choices=["lora-8b", "lora-vs-full", "all"])
    ap.add_argument("--recipe", default="llama32_1b", help="model of lora-vs-full")
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--mbs", type=int, default=2)
    ap.add_argument("--gbs", type=int, default=16)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--base-dir", default=os.environ.get("VIADUCT_BENCH_BASES", "/tmp/viaduct_bench_bases"))
    args = ap.parse_args()
    cases = {"lora-8b": lora_8b, "lora-vs-full": lora_vs_full}
    for name, fn in cases.items():
        if args.case in (name, "all"):
            print(json.dumps(fn(args)), flush=True)


if __name__ == "__main__":
    main()
