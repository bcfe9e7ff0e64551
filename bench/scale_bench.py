"""Scale-out targets on one GPU machine, each measured with bench/pretrain_bench.py under torchrun.

    python bench/scale_bench.py fsdp-1b     # Llama-3.2-1B, seq 2048: FSDP2 on 2 GPUs vs one GPU (>= 95%)
    python bench/scale_bench.py 8b          # Llama-3-8B, seq 8192, bf16, FSDP2 on 8 GPUs: fits, >= 45% MFU
    python bench/scale_bench.py tp-8b       # the same with TP 2: >= 85% of FSDP-only tokens/s
    python bench/scale_bench.py pp-8b       # the same with PP 2 (1f1b) x FSDP on 8 GPUs (else 4), against
                                            # FSDP only on those GPUs at the same global batch: >= 90%
    python bench/scale_bench.py pp-bubble   # pp-8b's PP layout: measured bubble within 20% of the theory
    python bench/scale_bench.py all

Prints one JSON line per measured run, then one per target with the ratio and whether it is met.
Needs as many GPUs as the target uses (2, 4 or 8); a target whose GPUs are missing is reported as
skipped. A run that two targets share (pp-8b's PP run is pp-bubble's larger one) runs once.

The pipeline bubble (pp-bubble). A step of a pipeline schedule over m micro-batches takes about
T(m) = (m + b)·t: t is one micro-batch's forward and backward on one stage, b·t the time a stage
waits while the pipeline fills and drains. The PP layout runs at two micro-batch counts m1 < m2
(the global batch grows, the micro batch stays 1 sequence), so

    t = (T(m2) - T(m1)) / (m2 - m1)        one micro-batch's time per stage
    measured bubble at m1 = 1 - m1·t / T(m1)

against the theoretical bubble of the schedule at m1,
`viaduct.distributed.pipeline_split.bubble_fraction(schedule, pp, vpp, m1)`: (pp - 1) / (m1 + pp - 1)
for 1f1b. The target is met when |measured - theory| <= 0.2 × theory. Whatever a step costs once,
however many micro-batches it runs (the optimizer step, the gradient reduction and weight gathers
FSDP does not hide, the loss and gradient-norm reductions), counts as bubble in the measurement, so
the target bounds those as well. It runs for 1f1b and for interleaved_1f1b with 2 virtual stages,
each at 4 and 16 micro-batches. The line also gives b as measured, T(m1)/t - m1, in micro-batch
times (1f1b: pp - 1 in theory).
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


_measured: dict[tuple[str, ...], dict[str, Any]] = {}
"""Runs already made in this invocation, by GPU count and arguments (targets share some)."""


def measure(nproc: int, *args: str) -> dict[str, Any]:
    """One pretrain_bench.py run on `nproc` GPUs (torchrun for more than one); a repeat is not rerun."""
    key = (str(nproc), *args)
    if key in _measured:
        return _measured[key]
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
    _measured[key] = result
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


def _llama8b(nproc: int, gbs: int, *extra: str) -> dict[str, Any]:
    return measure(
        nproc, "--recipe", "llama3_8b", "--seq", "8192", "--mbs", "1", "--gbs", str(gbs), "--warmup", "5",
        "--steps", "10", *extra,
    )  # fmt: skip


def _8b(*extra: str) -> dict[str, Any]:
    return _llama8b(8, 8, *extra)


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


PP = 2
"""Pipeline stages of the PP layout (pp-8b, pp-bubble); FSDP shards over the other GPUs."""
PP_MICROBATCHES = 16
"""Micro-batches per step of pp-8b's PP run: a 1f1b bubble of (PP - 1) / (16 + PP - 1) = 1/17."""
BUBBLE_MICROBATCHES = (4, PP_MICROBATCHES)
"""pp-bubble's m1 and m2: far apart, so that noise in the two step times moves t little."""
BUBBLE_SCHEDULES: tuple[tuple[str, int | None], ...] = (("1f1b", None), ("interleaved_1f1b", 2))
"""pp-bubble's schedules, each with its virtual pipeline size."""


def _pp_gpus() -> int | None:
    """8 GPUs where there are, else 4; None with fewer."""
    n = _gpus()
    return 8 if n >= 8 else 4 if n >= 4 else None


def _pp(schedule: str, vpp: int | None) -> tuple[str, ...]:
    extra = [f"model.pipeline_model_parallel_size={PP}", f"model.pipeline_schedule={schedule}"]
    if vpp is not None:
        extra.append(f"model.virtual_pipeline_model_parallel_size={vpp}")
    return tuple(extra)


def pp_8b() -> None:
    n = _pp_gpus()
    if n is None:
        print(json.dumps({"target": "pp-8b", "skipped": "needs 4 GPUs"}))
        return
    # The same global batch for both: PP_MICROBATCHES micro-batches per pipeline, half as many
    # (gradient accumulation) per FSDP-only rank.
    gbs = n // PP * PP_MICROBATCHES
    fsdp = _llama8b(n, gbs)
    pp = _llama8b(n, gbs, *_pp("1f1b", None))
    ratio = None
    if "tokens_per_s_per_gpu" in fsdp and "tokens_per_s_per_gpu" in pp:
        ratio = round(100 * pp["tokens_per_s_per_gpu"] / fsdp["tokens_per_s_per_gpu"], 1)
    _target(
        f"Llama-3-8B PP {PP} (1f1b) x FSDP vs FSDP only on {n} GPUs, global batch {gbs}, tokens/s per GPU",
        ratio,
        90.0,
        "%",
    )


def bubble(m1: int, step1_ms: float, m2: int, step2_ms: float, theory: float) -> dict[str, Any]:
    """The measured bubble at `m1` from the step times at `m1` < `m2` micro-batches, against `theory`.

    The step time is taken as T(m) = (m + b)·t, so the two runs give t, one micro-batch's time per
    stage, and the share of T(m1) that is not micro-batch work is the measured bubble.
    """
    if not 0 < m1 < m2:
        raise ValueError(f"needs 0 < m1 < m2 micro-batches, got m1={m1}, m2={m2}")
    if step1_ms <= 0 or step2_ms <= 0:
        raise ValueError(f"step times must be positive, got {step1_ms} ms and {step2_ms} ms")
    t = (step2_ms - step1_ms) / (m2 - m1)
    measured = 1 - m1 * t / step1_ms
    return {
        "microbatch_ms": round(t, 2),
        "bubble_microbatches": round(step1_ms / t - m1, 3) if t > 0 else None,
        "measured": round(measured, 4),
        "theory": round(theory, 4),
        "ratio": round(measured / theory, 3) if theory else None,
        # A step that does not grow with m (t <= 0) is no pipeline; its bubble is not measured.
        "met": t > 0 and abs(measured - theory) <= 0.2 * theory,
    }


def pp_bubble() -> None:
    n = _pp_gpus()
    if n is None:
        print(json.dumps({"target": "pp-bubble", "skipped": "needs 4 GPUs"}))
        return
    # Here and not at the top: the other targets need nothing of viaduct in this driver process.
    from viaduct.distributed.pipeline_split import bubble_fraction

    m1, m2 = BUBBLE_MICROBATCHES
    for schedule, vpp in BUBBLE_SCHEDULES:
        runs = [_llama8b(n, n // PP * m, *_pp(schedule, vpp)) for m in (m1, m2)]
        line: dict[str, Any] = {
            "target": f"Llama-3-8B PP {PP} x FSDP on {n} GPUs, {schedule}"
            + (f" vpp {vpp}" if vpp else "")
            + f": measured pipeline bubble at {m1} micro-batches within 20% of the theory",
            "schedule": schedule,
            "pp": PP,
            "vpp": vpp,
            "microbatches": [m1, m2],
            "step_ms": [r.get("step_ms") for r in runs],
        }
        if all("step_ms" in r for r in runs):
            # The micro-batch counts the runs report, in case validate() settled on others.
            ms = [r.get("num_microbatches") or m for r, m in zip(runs, (m1, m2))]
            line["microbatches"] = ms
            theory = bubble_fraction(schedule, PP, vpp or 1, ms[0])
            line |= bubble(ms[0], runs[0]["step_ms"], ms[1], runs[1]["step_ms"], theory)
        else:
            line["met"] = False
        print(json.dumps(line), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("target", choices=["fsdp-1b", "8b", "tp-8b", "pp-8b", "pp-bubble", "all"])
    args = ap.parse_args()
    if args.target in ("fsdp-1b", "all"):
        fsdp_1b()
    if args.target in ("8b", "tp-8b", "all"):
        eight_b(tp=args.target != "8b")
    if args.target in ("pp-8b", "all"):
        pp_8b()
    if args.target in ("pp-bubble", "all"):
        pp_bubble()


if __name__ == "__main__":
    main()
