"""Speed and memory of the Hugging Face conversion (`viaduct.AutoBridge`) on a Llama-3-8B-shaped model:
one JSON line per run and one per target.

    python bench/conversion_bench.py                        # Llama-3-8B, 32 layers (16 GB of bf16)
    python bench/conversion_bench.py --layers 4             # the same widths, 4 layers (2.9 GB)
    python bench/conversion_bench.py --dir /data/l8b --keep # write once into /data/l8b, keep it, reuse it
    python bench/conversion_bench.py --cache warm           # read what the page cache still holds

A Hugging Face directory (config.json, `model-0000k-of-0000N.safetensors` shards of `--shard-gb` GB
with model.safetensors.index.json) is written with random bf16 weights by the `safetensors` library
directly, one shard's tensors at a time (never the whole model in memory). Then, in this process:

* import: `bridge.to_megatron_provider(load_weights=False).provide(device="cpu")` (model construction,
  with its random initialization, timed apart), then `bridge.load_hf_weights(model)` (the weights):
  GB/s = safetensors bytes / load seconds. `to_megatron_provider().provide()` is these two in one.
* export: `bridge.save_hf_pretrained(model, out)`: GB/s = bytes of the written safetensors files /
  seconds (the whole call: config, shards, index, rename into place). `convert_only_gb_per_s` is the
  same model through `bridge.export_hf_weights` with nothing written: the conversion's own cost,
  so a figure below the target that this one meets is the disk's.

`--cache cold` (the default) asks the kernel to drop the files' cached pages before each read
(`posix_fadvise(DONTNEED)` after an fsync), so the import reads the disk as a fresh process on a
fresh machine would; `warm` leaves the page cache as it is.

Memory: the peak resident set of each phase (`VmHWM`, reset through /proc/self/clear_refs before the
phase) and of the whole process (`ru_maxrss`), plus the largest anonymous and file-backed parts seen
by a sampling thread (file-backed: pages of the memory-mapped safetensors files). Targets: import and
export ≥ 1 GB/s each; the peak of each phase ≤ model bytes + largest shard bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

GB = 1e9
GIB = 2**30
SPEED_TARGET_GBPS = 1.0
"""Import and export speed goal, GB/s of safetensors bytes."""


def llama3_8b_config(layers: int) -> dict[str, Any]:
    """meta-llama/Meta-Llama-3-8B's config.json, with `layers` decoder layers."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 128000,
        "eos_token_id": 128001,
        "hidden_act": "silu",
        "hidden_size": 4096,
        "initializer_range": 0.02,
        "intermediate_size": 14336,
        "max_position_embeddings": 8192,
        "mlp_bias": False,
        "num_attention_heads": 32,
        "num_hidden_layers": layers,
        "num_key_value_heads": 8,
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-05,
        "rope_scaling": None,
        "rope_theta": 500000.0,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "vocab_size": 128256,
    }


def hf_tensor_shapes(cfg: dict[str, Any]) -> list[tuple[str, tuple[int, ...]]]:
    """Every tensor of the Llama checkpoint, in the order transformers saves them."""
    h, ffn, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    d = h // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * d
    out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (v, h))]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out += [
            (p + "self_attn.q_proj.weight", (h, h)),
            (p + "self_attn.k_proj.weight", (kv, h)),
            (p + "self_attn.v_proj.weight", (kv, h)),
            (p + "self_attn.o_proj.weight", (h, h)),
            (p + "mlp.gate_proj.weight", (ffn, h)),
            (p + "mlp.up_proj.weight", (ffn, h)),
            (p + "mlp.down_proj.weight", (h, ffn)),
            (p + "input_layernorm.weight", (h,)),
            (p + "post_attention_layernorm.weight", (h,)),
        ]
    out += [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]
    return out


def write_random_hf(directory: Path, cfg: dict[str, Any], shard_bytes: int, seed: int = 0) -> None:
    """config.json plus random bf16 safetensors shards and their index, one shard in memory at a time."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    shapes = hf_tensor_shapes(cfg)
    groups: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in shapes:
        n = 2 * _numel(shape)
        if groups[-1] and size + n > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append((name, shape))
        size += n
    g = torch.Generator().manual_seed(seed)
    weight_map: dict[str, str] = {}
    total = 0
    for k, group in enumerate(groups, start=1):
        file = f"model-{k:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for name, shape in group:
            t = torch.empty(shape, dtype=torch.bfloat16)
            # Norm weights near 1, matrices small: the values of a trained model's scale.
            (t.uniform_(0.5, 1.5, generator=g) if len(shape) == 1 else t.uniform_(-0.05, 0.05, generator=g))
            tensors[name] = t
            weight_map[name] = file
            total += t.nbytes
        save_file(tensors, str(directory / file), metadata={"format": "pt"})
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (directory / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def safetensors_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.safetensors"))


def evict_page_cache(directory: Path) -> None:
    """Drop the cached pages of the directory's safetensors files (no root needed: they are clean
    after the fsync), so the next read comes from the disk."""
    for path in safetensors_files(directory):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


# ---------------------------------------------------------------------------- memory


def _status_kib(*keys: str) -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in keys:
                out[key] = int(rest.split()[0])
    return out


class MemoryWatch:
    """The peak resident set of a phase: VmHWM after resetting it, and the largest anonymous and
    file-backed parts a thread sees every `interval` seconds."""

    def __init__(self, interval: float = 0.05) -> None:
        self.interval = interval
        self.max_anon = self.max_file = self.max_rss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            s = _status_kib("VmRSS", "RssAnon", "RssFile")
            self.max_rss = max(self.max_rss, s.get("VmRSS", 0))
            self.max_anon = max(self.max_anon, s.get("RssAnon", 0))
            self.max_file = max(self.max_file, s.get("RssFile", 0))
            self._stop.wait(self.interval)

    def __enter__(self) -> MemoryWatch:
        try:  # "5" resets the peak resident set size (VmHWM) to the current one (Linux >= 4.0)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.hwm = _status_kib("VmHWM").get("VmHWM", 0)

    def report(self) -> dict[str, float]:
        return {
            "peak_rss_gb": round(max(self.hwm, self.max_rss) * 1024 / GB, 2),
            "peak_anon_gb": round(self.max_anon * 1024 / GB, 2),
            "peak_file_mapped_gb": round(self.max_file * 1024 / GB, 2),
        }


@contextmanager
def timer() -> Iterator[dict[str, float]]:
    out: dict[str, float] = {}
    t0 = time.perf_counter()
    yield out
    out["s"] = time.perf_counter() - t0


# ---------------------------------------------------------------------------- run


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    from viaduct import AutoBridge

    torch.set_num_threads(args.threads or torch.get_num_threads())
    tmp_root = Path(tempfile.mkdtemp(prefix="viaduct-conv-bench-", dir=args.tmp))
    src = Path(args.dir) if args.dir else tmp_root / "hf"
    out_dir = tmp_root / "exported"
    cfg = llama3_8b_config(args.layers)
    shard_bytes = int(args.shard_gb * GB)
    lines: list[dict[str, Any]] = []
    try:
        wrote_s = None
        if not (src / "config.json").is_file():
            with MemoryWatch() as mem, timer() as t:
                write_random_hf(src, cfg, shard_bytes)
            wrote_s = t["s"]
            print(json.dumps({"phase": "write", "s": round(wrote_s, 1), **mem.report()}), flush=True)
        files = safetensors_files(src)
        src_bytes = sum(p.stat().st_size for p in files)
        largest = max(p.stat().st_size for p in files)

        bridge = AutoBridge.from_hf_pretrained(src)
        provider = bridge.to_megatron_provider(load_weights=False)
        with MemoryWatch() as mem_build, timer() as t_build:
            model = provider.provide(device="cpu", init_seed=0)
        model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        if args.cache == "cold":
            evict_page_cache(src)
        with MemoryWatch() as mem_load, timer() as t_load:
            bridge.load_hf_weights(model)
        import_gbps = src_bytes / GB / t_load["s"]
        budget = model_bytes + largest
        common = dict(
            layers=args.layers,
            cache=args.cache,
            threads=torch.get_num_threads(),
            model_gb=round(model_bytes / GB, 3),
            largest_shard_gb=round(largest / GB, 3),
            budget_gb=round(budget / GB, 3),
        )
        imp = dict(
            phase="import",
            **common,
            safetensors_gb=round(src_bytes / GB, 3),
            shards=len(files),
            build_s=round(t_build["s"], 2),
            build_peak_rss_gb=mem_build.report()["peak_rss_gb"],
            load_s=round(t_load["s"], 2),
            gb_per_s=round(import_gbps, 3),
            **mem_load.report(),
        )
        print(json.dumps(imp), flush=True)
        lines.append(imp)

        # The conversion alone (split QKV and gate/up back, one tensor at a time, nothing written):
        # what the export costs before the disk.
        with timer() as t_split:
            split_bytes = sum(t.contiguous().nbytes for _, t in bridge.export_hf_weights(model))
        with MemoryWatch() as mem_save, timer() as t_save:
            bridge.save_hf_pretrained(model, out_dir, max_shard_size=shard_bytes)
        out_files = safetensors_files(out_dir)
        out_bytes = sum(p.stat().st_size for p in out_files)
        exp = dict(
            phase="export",
            **common,
            safetensors_gb=round(out_bytes / GB, 3),
            shards=len(out_files),
            s=round(t_save["s"], 2),
            gb_per_s=round(out_bytes / GB / t_save["s"], 3),
            convert_only_s=round(t_split["s"], 2),
            convert_only_gb_per_s=round(split_bytes / GB / t_split["s"], 3),
            **mem_save.report(),
        )
        print(json.dumps(exp), flush=True)
        lines.append(exp)
        # Before the check, which maps both directories' files and so has a peak of its own.
        peak_process = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        if args.verify:
            del model
            lines.append(verify(src, out_dir))
            print(json.dumps(lines[-1]), flush=True)
        targets = [
            ("import-speed", imp["gb_per_s"], SPEED_TARGET_GBPS, "GB/s", True),
            ("export-speed", exp["gb_per_s"], SPEED_TARGET_GBPS, "GB/s", True),
            ("import-peak-memory", imp["peak_rss_gb"], common["budget_gb"], "GB", False),
            ("export-peak-memory", exp["peak_rss_gb"], common["budget_gb"], "GB", False),
            ("process-peak-memory", round(peak_process / GB, 2), common["budget_gb"], "GB", False),
        ]
        for name, value, goal, unit, higher in targets:
            met = value >= goal if higher else value <= goal
            line = {"target": name, "value": value, "goal": goal, "unit": unit, "met": met}
            print(json.dumps(line), flush=True)
    finally:
        if args.keep:
            print(json.dumps({"kept": str(tmp_root), "source": str(src)}), flush=True)
        else:
            shutil.rmtree(tmp_root, ignore_errors=True)
    return lines


def verify(src: Path, out: Path) -> dict[str, Any]:
    """Every exported tensor equals its source bitwise (read tensor by tensor)."""
    from viaduct.models.conversion.safetensors_io import SafetensorsReader

    with SafetensorsReader(src) as a, SafetensorsReader(out) as b:
        names_a, names_b = sorted(a.names()), sorted(b.names())
        bad = [n for n in names_a if n not in names_b or not torch.equal(a.tensor(n), b.tensor(n))]
    return {"phase": "verify", "tensors": len(names_a), "same_names": names_a == names_b, "differ": bad[:5]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=32, help="decoder layers (Llama-3-8B: 32)")
    ap.add_argument("--dir", help="the Hugging Face directory: written there when it has no config.json")
    ap.add_argument("--tmp", help="where the temporary directories go (default: the system's)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directories")
    ap.add_argument("--shard-gb", type=float, default=5.0, help="shard size, GB (written and exported)")
    ap.add_argument("--cache", choices=["cold", "warm"], default="cold")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    ap.add_argument("--verify", action="store_true", help="check the export bitwise against the source")
    args = ap.parse_args()
    if args.layers < 1 or args.shard_gb <= 0:
        ap.error("--layers must be at least 1 and --shard-gb positive")
    run(args)


if __name__ == "__main__":
    main()
