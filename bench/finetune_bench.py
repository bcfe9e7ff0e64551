"""Fine-tuning speed and memory: LoRA against full fine-tuning, and the memory estimate against the peak.

    python bench/finetune_bench.py lora-8b        # Llama-3-8B shape, seq 4096, LoRA on one GPU:
                                                  #   peak memory vs `viaduct config validate`'s estimate
    python bench/finetune_bench.py lora-vs-full   # one model, one GPU: LoRA and full fine-tuning tokens/s
                                                  #   (--recipe llama32_1b by default: full FT must fit)
    python bench/finetune_bench.py packing        # short SFT examples: packed vs padded, real tokens/s
    python bench/finetune_bench.py all

Each case first writes a base checkpoint of the model with random weights (`--base-dir`, reused when
present: the weights do not change the speed), then runs `finetune()` through bench/pretrain_bench.py
(a real run: mock data through the DataLoader, optimizer, scheduler, logging) in a fresh process, so
that every run starts with an empty GPU. One JSON line per case.

Targets: LoRA on the 8B shape at sequence 4096 fits one 80 GB GPU, with a peak within 15% of the
estimate; LoRA runs at least 2.5x the tokens/s of full fine-tuning of the same model on the same GPU;
packing raises the real (non-padding) tokens/s on short examples at least 3x over padding. The
packing case trains the model of `--recipe` (all weights) on 20,000 examples of about 50 to 400
tokens cut from Python's documentation, with the built-in tokenizer: padded to the sequence length,
padded to the longest example of each micro-batch, and packed; real tokens are counted from the loss
masks (`answer_only_loss: false`).
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


def make_short_examples(directory: Path, n: int = 20000, seed: int = 0) -> str:
    """A dataset of short instruction examples (about 50 to 400 tokens) cut from Python's own
    documentation (`pydoc_data`): the case packing is for."""
    import random
    from pydoc_data.topics import topics

    if (directory / "training.jsonl").exists():
        return str(directory)
    directory.mkdir(parents=True, exist_ok=True)
    text = " ".join(topics.values()).split()
    rng = random.Random(seed)
    for split, count in (("training", n), ("validation", 200), ("test", 200)):
        with open(directory / f"{split}.jsonl", "w") as f:
            for _ in range(count):
                start, a, b = rng.randrange(len(text) - 400), rng.randint(10, 150), rng.randint(10, 150)
                question, answer = text[start : start + a], text[start + a : start + a + b]
                f.write(json.dumps({"input": " ".join(question), "output": " ".join(answer)}) + "\n")
    return str(directory)


PACKING_MODES = {
    # (micro-batch, dataset overrides): the same global batch of 16 sequences slots per step
    "pad-to-seq": (4, ["dataset.dataset_kwargs={answer_only_loss: false, pad_to_max_length: true}"]),
    "pad-to-longest": (4, ["dataset.dataset_kwargs={answer_only_loss: false}"]),
    "packed": (1, ["dataset.dataset_kwargs={answer_only_loss: false}", "dataset.packed_sequence_specs={}"]),
}


def packing_worker(mode: str, data: str, args: argparse.Namespace) -> dict[str, Any]:
    """One training run of `mode` (this process): real (non-padding) tokens per second."""
    import time

    import torch

    from viaduct.config import apply_overrides
    from viaduct.recipes import get_recipe
    from viaduct.training.callbacks import Callback
    from viaduct.training.gpt_step import forward_step
    from viaduct.training.pretrain import pretrain

    mbs, extra = PACKING_MODES[mode]
    steps = 3 + args.steps
    cfg = get_recipe(args.recipe)()
    apply_overrides(
        cfg,
        [
            f"model.seq_length={args.seq}",
            "tokenizer.tokenizer_type=HuggingFaceTokenizer",
            "tokenizer.tokenizer_model=builtin:pydoc-bpe",
            "tokenizer.vocab_size=null",
            "model.vocab_size=null",
            "dataset=finetuning",
            f"dataset.dataset_root={data}",
            "dataset.num_workers=2",
            f"train.micro_batch_size={mbs}",
            "train.global_batch_size=16",
            f"train.train_iters={steps}",
            "train.eval_iters=0",
            "scheduler.lr_warmup_fraction=null",
            "scheduler.lr_warmup_iters=1",
            "checkpoint.save=null",
            "checkpoint.load=null",
            "checkpoint.save_interval=null",
            "logger.tensorboard_dir=null",
            *extra,
        ],
    )
    real = torch.zeros((), dtype=torch.float64)
    marks: dict[int, tuple[float, float]] = {}

    def counting_step(state: Any, data_iterator: Any, model: Any) -> Any:
        batch = next(data_iterator)
        real.add_(batch["loss_mask"].sum().double())  # every real token but each example's last
        return forward_step(state, iter([batch]), model)

    class Clock(Callback):
        def on_train_step_end(self, ctx: Any) -> None:
            step = ctx.state.train_state.step
            if step in (3, steps):
                torch.cuda.synchronize() if torch.cuda.is_available() else None
                marks[step] = (time.perf_counter(), float(real))

    pretrain(cfg, forward_step_func=counting_step, callbacks=[Clock()])
    (t0, r0), (t1, r1) = marks[3], marks[steps]
    return {
        "mode": mode,
        "real_tokens_per_s": round((r1 - r0) / (t1 - t0)),
        "step_ms": round((t1 - t0) / args.steps * 1e3, 1),
        "real_tokens_per_step": round((r1 - r0) / args.steps),
        "slot_tokens_per_step": 16 * args.seq,
    }


def packing(args: argparse.Namespace) -> dict[str, Any]:
    data = make_short_examples(Path(args.base_dir) / "short_sft")
    out: dict[str, Any] = {"case": "packing", "recipe": args.recipe, "seq": args.seq}
    for mode in PACKING_MODES:
        command = [sys.executable, __file__, "packing-worker", f"--mode={mode}", f"--data={data}"]
        command += [f"--recipe={args.recipe}", f"--seq={args.seq}", f"--steps={args.steps}"]
        proc = subprocess.run(command, capture_output=True, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        out[mode] = json.loads(lines[-1]) if lines else {"error": (proc.stderr or proc.stdout)[-1500:]}
    rates = {m: out[m].get("real_tokens_per_s") for m in PACKING_MODES}
    if rates["packed"] and rates["pad-to-seq"] and rates["pad-to-longest"]:
        out["packed_over_pad_to_seq"] = round(rates["packed"] / rates["pad-to-seq"], 2)
        out["packed_over_pad_to_longest"] = round(rates["packed"] / rates["pad-to-longest"], 2)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("case", choices=["lora-8b", "lora-vs-full", "packing", "all", "packing-worker"])
    ap.add_argument("--mode", choices=list(PACKING_MODES), help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--recipe", default="llama32_1b", help="model of lora-vs-full")
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--mbs", type=int, default=2)
    ap.add_argument("--gbs", type=int, default=16)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--base-dir", default=os.environ.get("VIADUCT_BENCH_BASES", "/tmp/viaduct_bench_bases"))
    args = ap.parse_args()
    if args.case == "packing-worker":  # one run of `packing`, in its own process
        print(json.dumps(packing_worker(args.mode, args.data, args)), flush=True)
        return
    cases = {"lora-8b": lora_8b, "lora-vs-full": lora_vs_full, "packing": packing}
    for name, fn in cases.items():
        if args.case in (name, "all"):
            print(json.dumps(fn(args)), flush=True)


if __name__ == "__main__":
    main()
