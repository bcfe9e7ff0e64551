"""Cost of the resilience features when nothing goes wrong: the same `pretrain()` with them off and on.

    python bench/resilience_bench.py                         # tiny test model, 1 process, then 2 gloo ranks
    python bench/resilience_bench.py --world-sizes 1 --repeats 3 --steps 40
    python bench/resilience_bench.py --recipe llama32_1b --seq 2048 --mbs 4 --gbs 4 --world-sizes 1  # a GPU

Cases, all run in one process per world size (a torchrun job of that many ranks above 1), interleaved
round after round (off, on, determinism, off, on, ...), each a fresh `pretrain()`: fresh processes
differed from one another by up to 40% on the tiny model here, far more than the effect measured.

- `off`: every resilience feature off (`rerun_state_machine.rerun_mode=disabled`, the defaults).
- `on`: everything that goes together when nothing fails: `rerun_mode=validate_results` with
  `check_for_spiky_loss` (a host read of the step's losses; with several ranks its verdict rides
  in the metrics' all-reduce), `ft.enable_ft_package` (the hang watchdog thread), `straggler.log_straggler`
  (its report every `logger.log_interval` steps and the control endpoint on a free port) and
  `nvrx_straggler.enabled` (its default 300 s interval: the calibration exchange only).
- `determinism`: `rerun_mode=report_determinism_stats`, which runs every iteration twice by design:
  its own case, expected near +100%.

Every case saves to its own temporary `checkpoint.save` (the watchdog needs one) with no save
interval, so only the final save happens, after the clock stops. The device is pretrain()'s own
(CUDA when available); it is synchronised at the two clock readings. The clock starts after
`--warmup` steps and stops after `--steps` more; each run reports its mean step time and the median
of its step times (one step's time: `on_train_step_end` to the next), and compares `step_ms`: the
median on a CPU (a busy machine's stalls hit single steps), the mean on a GPU (the steps between
the two synchronisations are host times there). One JSON line per run, then one summary line per
world size and case: the median over repeats of the runs' `step_ms`, and the overhead against `off`
(the median of each round's ratio to its `off` run). The target: `on`
under 1% above `off`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

CASES: dict[str, list[str]] = {
    "off": ["rerun_state_machine.rerun_mode=disabled"],
    "on": [
        "rerun_state_machine.rerun_mode=validate_results",
        "rerun_state_machine.check_for_spiky_loss=true",
        "ft.enable_ft_package=true",
        "straggler.log_straggler=true",
        "nvrx_straggler.enabled=true",
    ],
    "determinism": ["rerun_state_machine.rerun_mode=report_determinism_stats"],
    # One feature of `on` each, to find where an overhead goes (--cases off,rerun,ft,straggler,nvrx).
    "rerun": [
        "rerun_state_machine.rerun_mode=validate_results",
        "rerun_state_machine.check_for_spiky_loss=true",
    ],
    "ft": ["ft.enable_ft_package=true"],
    "straggler": ["straggler.log_straggler=true"],
    "nvrx": ["nvrx_straggler.enabled=true"],
}


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_case(args: argparse.Namespace) -> dict[str, Any] | None:
    """One `pretrain()` of `args.case` in this process (one rank of a torchrun job); rank 0 returns."""
    import torch

    from viaduct.config import apply_overrides
    from viaduct.training.callbacks import Callback
    from viaduct.training.pretrain import pretrain

    steps = args.warmup + args.steps
    if args.recipe == "tiny":
        from viaduct.testing.configs import tiny_pretrain_config

        cfg = tiny_pretrain_config(seq_length=args.seq)
    else:
        from viaduct.recipes import get_recipe

        cfg = get_recipe(args.recipe)()
    apply_overrides(
        cfg,
        [
            f"model.seq_length={args.seq}",
            f"train.micro_batch_size={args.mbs}",
            f"train.global_batch_size={args.gbs}",
            f"train.train_iters={steps}",
            "train.eval_iters=0",
            "train.eval_interval=null",
            f"checkpoint.save={args.save_dir}",
            "checkpoint.load=null",
            "checkpoint.save_interval=null",
            "logger.tensorboard_dir=null",
            f"logger.log_interval={args.log_interval}",
            *CASES[args.case],
            f"straggler.straggler_ctrlr_port={args.port}",  # the default port may be taken
            *args.overrides,
        ],
    )

    class Clock(Callback):
        """Reads the clock at the end of every step from the `warmup`-th on."""

        def __init__(self) -> None:
            self.done = 0
            self.t: list[float] = []

        def on_train_step_end(self, ctx: Any) -> None:
            self.done += 1
            if self.done < args.warmup:
                return
            # Synchronising only at the window's ends keeps the loop's own no-sync behaviour on a
            # GPU; there the per-step times are host times, and only the window's mean is the device's.
            if self.done in (args.warmup, steps) and torch.cuda.is_available():
                torch.cuda.synchronize()
            self.t.append(time.perf_counter())

    clock = Clock()
    state = pretrain(cfg, callbacks=[clock])
    if int(os.environ.get("RANK", "0")) != 0:
        return None
    per_step = [b - a for a, b in zip(clock.t, clock.t[1:], strict=False)]
    mean = 1e3 * (clock.t[-1] - clock.t[0]) / len(per_step)
    median = 1e3 * statistics.median(per_step)
    return dict(
        # What the summary compares: on a CPU the median step (a busy machine's stalls hit single
        # steps); on a GPU the mean over the synchronised window.
        step_ms=round(mean if torch.cuda.is_available() else median, 3),
        mean_step_ms=round(mean, 3),
        median_step_ms=round(median, 3),
        steps=state.train_state.step,
        device=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        threads=torch.get_num_threads(),
        torch=torch.__version__,
    )


def worker(args: argparse.Namespace) -> None:
    """Every round of every case in this process (one rank of a torchrun job); rank 0 prints."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:  # one group for all the runs: pretrain() uses it and leaves it up
        import torch

        if torch.cuda.is_available():  # the device and backend pretrain() itself would choose
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank = int(os.environ.get("RANK", "0"))
    cases = args.cases.split(",")
    medians: dict[str, list[float]] = {c: [] for c in cases}
    ratios: dict[str, list[float]] = {c: [] for c in cases}
    for repeat in range(args.repeats):
        for case in cases:
            with tempfile.TemporaryDirectory(prefix="resilience_bench_") as tmp:
                args.case, args.save_dir = case, os.path.join(tmp, "ckpt")
                if world > 1:  # every rank needs the same directory and port: rank 0's
                    shared = [args.save_dir, _free_port()]
                    dist.broadcast_object_list(shared, src=0)
                    args.save_dir, args.port = shared
                else:
                    args.port = _free_port()
                result = run_case(args)
                if world > 1:
                    dist.barrier()  # rank 0's directory stays until every rank is done with it
            if result is None:
                continue
            result.update(bench="resilience", case=case, world_size=world, repeat=repeat)
            medians[case].append(result["step_ms"])
            if case != "off":
                # Against the `off` run of the same round, which ran moments before.
                ratios[case].append(result["step_ms"] / medians["off"][-1])
                result["overhead_pct"] = round(100 * (ratios[case][-1] - 1), 2)
            result["loadavg_1min_after"] = round(os.getloadavg()[0], 2)
            print(json.dumps(result), flush=True)
    if rank == 0:
        for case in cases:
            summary: dict[str, Any] = dict(
                bench="resilience",
                summary=True,
                case=case,
                world_size=world,
                recipe=args.recipe,
                runs=len(medians[case]),
                steps=args.steps,
                step_ms=round(statistics.median(medians[case]), 3),
            )
            if case != "off":
                summary["overhead_pct"] = round(100 * (statistics.median(ratios[case]) - 1), 2)
                if case == "on":
                    summary["target_pct"] = 1.0
                    summary["met"] = summary["overhead_pct"] < 1.0
            print(json.dumps(summary), flush=True)
    if world > 1:
        dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="tiny", help="'tiny' (viaduct.testing's 2-layer model) or a recipe")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--mbs", type=int, default=4)
    ap.add_argument("--gbs", type=int, default=8, help="global batch of one rank (see --scale-gbs)")
    ap.add_argument(
        "--scale-gbs",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="multiply --gbs by the world size, so each rank's work per step stays the same",
    )
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--log-interval", type=int, default=10)
    ap.add_argument("--world-sizes", default="1,2", help="comma-separated; above 1 runs under torchrun")
    ap.add_argument("--cases", default="off,on,determinism", help=f"comma-separated of {', '.join(CASES)}")
    ap.add_argument("overrides", nargs="*", help="config overrides (a.b=v) for every case")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # the runs, in this process
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return

    cases = [c for c in args.cases.split(",") if c]
    if any(c not in CASES for c in cases) or cases[:1] != ["off"]:
        ap.error(f"--cases must start with 'off' and name only {', '.join(CASES)} (got {args.cases!r})")
    me = os.path.abspath(__file__)
    flags = ["--worker", "--recipe", args.recipe, "--seq", str(args.seq), "--mbs", str(args.mbs)]
    flags += ["--warmup", str(args.warmup), "--steps", str(args.steps), "--repeats", str(args.repeats)]
    flags += ["--log-interval", str(args.log_interval), "--cases", ",".join(cases)]
    failed = False
    for world in [int(w) for w in args.world_sizes.split(",") if w]:
        gbs = args.gbs * world if args.scale_gbs else args.gbs
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if world > 1:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(world)]
            cmd += ["--master-port", str(_free_port()), me]
            # N ranks on a small CPU: one intra-op thread each, as the multi-process tests run.
            env.setdefault("OMP_NUM_THREADS", "1")
        else:
            cmd = [sys.executable, me]
        # A fresh working directory: nothing a run writes beside its checkpoint stays behind.
        with tempfile.TemporaryDirectory(prefix="resilience_bench_") as cwd:
            proc = subprocess.run(
                [*cmd, *flags, "--gbs", str(gbs), *args.overrides],
                text=True,
                env=env,
                cwd=cwd,
                capture_output=True,
            )
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        for line in lines:
            print(line, flush=True)
        if proc.returncode != 0 or not lines:
            failed = True
            error = (proc.stderr or proc.stdout).strip()[-1500:]
            print(json.dumps(dict(bench="resilience", world_size=world, error=error)), flush=True)
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
