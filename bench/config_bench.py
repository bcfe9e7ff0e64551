"""Configuration benchmarks (CPU). Prints one JSON line per result.

    python bench/config_bench.py [--recipe llama3_8b] [--repeat 50]

* `cli_validate_s`: wall time of `viaduct config validate --recipe R` in a fresh process
  (target: < 0.5 s on a 2-core CPU machine);
* `in_process_ms`: build the recipe + validate() + to_yaml() + from_yaml() in one process
  (target: < 20 ms).
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


def cli_validate(recipe: str, repeat: int) -> list[float]:
    cmd = [sys.executable, "-m", "viaduct", "config", "validate", "--recipe", recipe]
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        times.append(time.perf_counter() - t0)
    return times


def in_process(recipe: str, repeat: int) -> list[float]:
    from viaduct.recipes import get_recipe
    from viaduct.training.config import ConfigContainer

    fn = get_recipe(recipe)
    path = os.path.join(tempfile.mkdtemp(), "cfg.yaml")
    times = []
    for _ in range(repeat + 3):
        t0 = time.perf_counter()
        cfg = fn()
        cfg.validate()
        cfg.to_yaml(path)
        back = ConfigContainer.from_yaml(path)
        times.append(time.perf_counter() - t0)
        assert back == cfg
    return times[3:]  # the first runs pay for class introspection, once per process


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipe", default="llama3_8b")
    ap.add_argument("--repeat", type=int, default=50)
    args = ap.parse_args()
    cli = cli_validate(args.recipe, max(5, args.repeat // 10))
    print(
        json.dumps(
            {
                "bench": "cli_validate_s",
                "recipe": args.recipe,
                "median": round(statistics.median(cli), 4),
                "min": round(min(cli), 4),
                "runs": len(cli),
                "target": 0.5,
            }
        )
    )
    ip = in_process(args.recipe, args.repeat)
    print(
        json.dumps(
            {
                "bench": "in_process_ms",
                "recipe": args.recipe,
                "median": round(1000 * statistics.median(ip), 2),
                "min": round(1000 * min(ip), 2),
                "runs": len(ip),
                "target": 20,
            }
        )
    )


if __name__ == "__main__":
    main()
