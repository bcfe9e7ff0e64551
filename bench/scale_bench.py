"""Scale-out targets on one GPU machine, each measured with bench/pretrain_bench.py under torchrun.

    python bench/scale_bench.py fsdp-1b     # Llama-3.2-1B, seq 2048: FSDP2 on 2 GPUs vs one GPU (>= 95%)
    python bench/scale_bench.py 8b          # Llama-3-8B, seq 8192, bf16, FSDP2 on 8 GPUs: fits, >= 45% MFU
    python bench/scale_bench.py tp-8b       # the same with TP 2: >= 85% of FSDP-only tokens/s
    python bench/scale_bench.py all

Prints one JSON line per measured run, then one per target with the ratio and whether it is met.
Needs as many GPUs as the target uses (2 or 8); a target whose GPUs are missing is reported as skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
BENCH = os.path.join(HERE, "pretrain_bench.py")


def _gpus() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except ImportError:
        return 0


def measure(nproc: int, *args: str) -> dict[str, Any]:
    """One pretrain_bench.py run on `nproc` GPUs (torchrun for more than one)."""
    if nproc == 1:
        command = [sys.executable, BENCH, *args]
    else:
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            str(nproc),
            BENCH,
            *args,
        ]
    proc = subprocess.run(command, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    result = json.loads(lines[-1]) if lines else {"error": (proc.stderr or proc.stdout)[-2000:]}
    result["command"] = " ".join(command[1:])
    print(json.dumps(result), flush=True)
    return result


def _target(name: str, value: float | None, goal: float, unit: str) -> None:
    met = value is not None and value >= goal
    print(json.dumps({"target": name, "value": value, "goal": goal, "unit": unit, "met": met}), flush=True)


def fsdp_1b() -> None:
    if _gpus() < 2:
        print(json.dumps({"target": "fsdp-1b", "skipped": "needs 2 GPUs"}))
        return
    one = measure(1, "--recipe", "llama32_1b", "--seq", "2048", "--mbs", "8", "--gbs", "8")
    two = measure(
        2, "--recipe", "llama32_1b", "--seq", "2048", "--mbs", "8", "--gbs", "16",
        "ddp.use_distributed_optimizer=true",
    )  # fmt: skip
    ratio = None
    if "tokens_per_s_per_gpu" in one and "tokens_per_s_per_gpu" in two:
        ratio = round(100 * two["tokens_per_s_per_gpu"] / one["tokens_per_s_per_gpu"], 1)
    _target("FSDP2 on 2 GPUs, tokens/s per GPU vs one GPU", ratio, 95.0, "%")


def _8b(*extra: str) -> dict[str, Any]:
    return measure(
        8, "--recipe", "llama3_8b", "--seq", "8192", "--mbs", "1", "--gbs", "8", "--warmup", "5",
        "--steps", "10", *extra,
    )  # fmt: skip


def eight_b(tp: bool) -> None:
    if _gpus() < 8:
        print(json.dumps({"target": "8b", "skipped": "needs 8 GPUs"}))
        return
    fsdp = _8b()
    _target("Llama-3-8B FSDP2 on 8 GPUs, MFU", fsdp.get("mfu_pct"), 45.0, "%")
    if tp:
        tp2 = _8b("model.tensor_model_parallel_size=2", "model.sequence_parallel=true", "--gbs", "4")
        ratio = None
        if "tokens_per_s_per_gpu" in fsdp and "tokens_per_s_per_gpu" in tp2:
            ratio = round(100 * tp2["tokens_per_s_per_gpu"] / fsdp["tokens_per_s_per_gpu"], 1)
        _target("Llama-3-8B TP 2 x FSDP vs FSDP only, tokens/s", ratio, 85.0, "%")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("target", choices=["fsdp-1b", "8b", "tp-8b", "all"])
    args = ap.parse_args()
    if args.target in ("fsdp-1b", "all"):
        fsdp_1b()
    if args.target in ("8b", "tp-8b", "all"):
        eight_b(tp=args.target != "8b")


if __name__ == "__main__":
    main()
