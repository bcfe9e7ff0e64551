"""Speed of the whole training loop (`pretrain()`), against the pure model step of model_bench.py.

    python bench/pretrain_bench.py                                   # Llama-3.2-1B shape, 16×2048, one GPU
    python bench/pretrain_bench.py --compare                         # also the model benchmark: loop overhead
    torchrun --nproc-per-node 2 bench/pretrain_bench.py --mbs 16 --gbs 32   # data parallel
    python bench/pretrain_bench.py --profile 20                      # + the 20 costliest GPU kernels
    python bench/pretrain_bench.py --trace /tmp/t.json               # + a Chrome trace of two more steps

The run is a real `pretrain()` of a recipe (mock data through DataLoader workers, the optimizer,
scheduler, logging every `--log-interval` steps) with checkpoints and evaluation off. Timing: the
device is synchronised once after `--warmup` steps and once at the end (a callback), so the loop
itself keeps its own no-sync behaviour in between. One JSON line per run (rank 0).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any


def run_pretrain(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from viaduct.config import apply_overrides
    from viaduct.models.accounting import flops_per_token, mfu, peak_flops, trainable_parameters
    from viaduct.recipes import get_recipe
    from viaduct.training.callbacks import Callback
    from viaduct.training.pretrain import finetune, pretrain

    cfg = get_recipe(args.recipe)()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    steps = args.warmup + args.steps  # the timed window ends here
    # A trace records two more steps after the timed ones: the profiler's overhead and the trace's
    # export (seconds) stay out of the timing.
    total = steps + (2 if args.trace else 0)
    apply_overrides(
        cfg,
        [
            f"model.seq_length={args.seq}",
            f"train.micro_batch_size={args.mbs}",
            f"train.global_batch_size={args.gbs}",
            f"train.train_iters={total}",
            "train.eval_iters=0",
            "scheduler.lr_warmup_iters=2",
            "checkpoint.save=null",
            "checkpoint.load=null",
            "checkpoint.save_interval=null",
            "logger.tensorboard_dir=null",
            f"logger.log_interval={args.log_interval}",
            *args.overrides,
        ],
    )

    class Clock(Callback):
        """Times the steps of this process after its first `warmup` (a resumed run starts later)."""

        def __init__(self) -> None:
            self.done = 0
            self.timed_steps = 0
            self.t: dict[int, float] = {}
            self.peak_mem_max: float | None = None
            self.profiler: torch.profiler.profile | None = None
            self.kernels: dict[str, float] = {}
            self.tracer: torch.profiler.profile | None = None

        def on_train_step_end(self, ctx: Any) -> None:
            self.done += 1
            step = ctx.state.train_state.step
            if self.done == args.warmup or step == steps:
                torch.cuda.synchronize() if torch.cuda.is_available() else None
                self.t[self.done] = time.perf_counter()
                self.timed_steps = self.done - args.warmup
                if args.profile and self.done == args.warmup and torch.cuda.is_available():
                    self.profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA])
                    self.profiler.__enter__()
                elif self.profiler is not None:
                    self.profiler.__exit__(None, None, None)
                    events = sorted(
                        self.profiler.key_averages(), key=lambda e: e.device_time_total, reverse=True
                    )
                    n = self.done - args.warmup
                    self.kernels = {e.key[:90]: round(e.device_time_total / n / 1e3, 3) for e in events}
            if args.trace:
                self._trace(step)

        def _trace(self, step: int) -> None:
            """Record CPU (and GPU) activity of the two steps after the timed ones into `args.trace`."""
            if step == steps:
                acts = [torch.profiler.ProfilerActivity.CPU]
                if torch.cuda.is_available():
                    acts.append(torch.profiler.ProfilerActivity.CUDA)
                self.tracer = torch.profiler.profile(activities=acts)
                self.tracer.__enter__()
            elif self.tracer is not None and step == total:
                self.tracer.__exit__(None, None, None)
                self.tracer.export_chrome_trace(args.trace)
                self.tracer = None

        def on_train_end(self, ctx: Any) -> None:
            # Ranks differ under pipeline parallelism (the first stage keeps the most micro-batches'
            # activations, the last one the logits): what fits is decided by the fullest GPU. Every
            # rank ends here while the process group is still up.
            if not torch.cuda.is_available():
                return
            peak = torch.tensor([float(torch.cuda.max_memory_allocated())], device="cuda")
            if torch.distributed.is_initialized():
                torch.distributed.all_reduce(peak, op=torch.distributed.ReduceOp.MAX)
            self.peak_mem_max = peak.item() / 2**30

    clock = Clock()
    state = (finetune if args.finetune else pretrain)(cfg, callbacks=[clock])
    estimate: float | str | None = None
    if args.estimate:  # what `viaduct config validate` prints for this run (validated by the run)
        from viaduct.models.accounting import estimate_config_memory

        try:
            estimate = round(estimate_config_memory(cfg).total / 2**30, 2)
        except ValueError as exc:  # a layout the estimate does not cover: say why, keep the timing
            estimate = f"not estimated: {exc}"
    dt = (clock.t[args.warmup + clock.timed_steps] - clock.t[args.warmup]) / clock.timed_steps
    from viaduct.models.t5.provider import T5ModelProvider, t5_flops_per_sample

    if isinstance(cfg.model, T5ModelProvider):  # encoder and decoder tokens; the sample's FLOPs
        tokens = cfg.model.seq_length + cfg.model.seq_length_dec
        fpt = t5_flops_per_sample(cfg.model) / tokens
    else:
        tokens = args.seq
        fpt = flops_per_token(cfg.model, args.seq, trainable=trainable_parameters(cfg))
    tokens_per_gpu = args.gbs * tokens / world / dt
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    peak = peak_flops(name)
    return dict(
        bench="pretrain",
        recipe=args.recipe,
        world_size=world,
        seq=args.seq,
        micro_batch=args.mbs,
        global_batch=args.gbs,
        overrides=args.overrides,
        device=name,
        torch=torch.__version__,
        step_ms=round(dt * 1e3, 1),
        tokens_per_s_per_gpu=round(tokens_per_gpu),
        mfu_pct=round(100 * mfu(tokens_per_gpu, fpt, peak), 1) if peak else None,
        peak_mem_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2)
        if torch.cuda.is_available()
        else None,
        peak_mem_gib_max=round(clock.peak_mem_max, 2) if clock.peak_mem_max is not None else None,
        estimate_gib=estimate,
        # The layout validate() settled on, so that a caller can relate the step time to the
        # micro-batches each rank ran (the pipeline bubble depends on their number).
        data_parallel=cfg.data_parallel_size,
        tensor_parallel=cfg.model.tensor_model_parallel_size,
        pipeline_parallel=cfg.model.pipeline_model_parallel_size,
        virtual_pipeline_parallel=cfg.model.virtual_pipeline_model_parallel_size,
        num_microbatches=cfg.num_microbatches,
        steps=state.train_state.step,
        **(_kernel_summary(clock.kernels, args.profile, dt) if clock.kernels else {}),
    )


def _kernel_summary(kernels: dict[str, float], top: int, step_s: float) -> dict[str, Any]:
    """The costliest GPU kernels (ms per step) and the share of the step each kind takes."""
    # Attention first: cuDNN's attention kernels carry an "sm90_" in their names too.
    kinds = {
        "attention": ("flash", "fmha", "sdpa"),
        "gemm": ("gemm", "nvjet", "xmma", "cutlass", "sm90_", "sm80_"),
    }
    shares = dict.fromkeys([*kinds, "other"], 0.0)
    for name, ms in kernels.items():
        kind = next((k for k, keys in kinds.items() if any(key in name.lower() for key in keys)), "other")
        shares[kind] += ms
    return {
        "kernels_ms_per_step": dict(list(kernels.items())[:top]),
        "kernel_ms_by_kind": {k: round(v, 2) for k, v in shares.items()},
        "gpu_busy_pct": round(100 * sum(kernels.values()) / (step_s * 1e3), 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="llama32_1b")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--mbs", type=int, default=16)
    ap.add_argument("--gbs", type=int, default=16)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--log-interval", type=int, default=10)
    ap.add_argument("--compare", action="store_true", help="also run model_bench.py on the same shape")
    ap.add_argument(
        "--finetune", action="store_true", help="run finetune() (checkpoint.pretrained_checkpoint set)"
    )
    ap.add_argument("--estimate", action="store_true", help="also report the memory estimate (GiB)")
    ap.add_argument(
        "--profile",
        type=int,
        default=0,
        help="profile the timed steps (GPU): list this many costliest kernels",
    )
    ap.add_argument(
        "--trace", help="write a Chrome trace (CPU and GPU) of two extra steps after the timed ones here"
    )
    ap.add_argument("overrides", nargs="*", help="config overrides (a.b=v)")
    args = ap.parse_intermixed_args()  # overrides may come on both sides of the options
    model_result: dict[str, Any] | None = None
    if args.compare:  # first, so the two runs never hold GPU memory at the same time
        spec = dict(model=args.recipe, batch=args.mbs, seq=args.seq, steps=args.steps)
        bench = os.path.join(os.path.dirname(os.path.abspath(__file__)), "model_bench.py")
        proc = subprocess.run(
            [sys.executable, bench, "--spec", json.dumps(spec)], capture_output=True, text=True
        )
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        model_result = json.loads(lines[-1]) if lines else {"error": proc.stderr[-800:]}
    result = run_pretrain(args)
    if int(os.environ.get("RANK", "0")) != 0:
        return
    if model_result is not None:
        result["model_bench"] = model_result
        if "step_ms" in model_result:
            per_micro = result["step_ms"] / (args.gbs // (args.mbs * result["world_size"]))
            result["loop_overhead_pct"] = round(100 * (per_micro / model_result["step_ms"] - 1), 2)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
