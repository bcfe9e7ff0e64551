"""Speed of the other model families on one GPU, through the whole training loop (pretrain_bench.py).

    python bench/families_bench.py mamba   # Mamba-2 780M shape vs a GPT of the same size, seq 4096
    python bench/families_bench.py t5      # T5 220M (T5-base shape), 128 x (encoder 512 / decoder 128)
    python bench/families_bench.py all
    python bench/families_bench.py mamba model.mamba_chunk_size=64   # overrides for the family's run
    python bench/families_bench.py t5 --profile 25   # + the costliest GPU kernels of the timed steps
    python bench/families_bench.py t5 model.cuda_graph_impl=local   # T5 replaying CUDA graphs

Targets: the Mamba-2 780M shape at sequence 4096 runs at least 60% of the tokens/s of a GPT (Llama
architecture) of about the same parameter count and vocabulary at the same sequence length; T5-base
reaches at least 40% MFU on one H100. MFU counts the SSD scan as matmul work (`flops_per_token`) and
T5's encoder, decoder and cross-attention (`t5_flops_per_sample`). One JSON line per case; each run
also reports the memory estimate of `viaduct config validate` (`estimate_gib`), its peak GPU memory
(`peak_mem_gib`) and their ratio (`estimate_over_peak`).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
COMMON = ["--warmup=3", "--steps=10", "--log-interval=5", "--estimate", "scheduler.lr_warmup_fraction=null"]
NULL_TOKENIZER = ["tokenizer.tokenizer_type=NullTokenizer", "tokenizer.tokenizer_model=null"]

# A Llama-architecture GPT of about 780M parameters with Mamba-2's vocabulary (50288 padded).
GPT_780M = [
    "model.num_layers=25",
    "model.hidden_size=1536",
    "model.ffn_hidden_size=4096",
    "model.num_attention_heads=12",
    "model.num_query_groups=12",
    "model.kv_channels=128",
    "model.share_embeddings_and_output_weights=true",
    "model.vocab_size=50288",
    "tokenizer.vocab_size=50287",
]


T5_BASE_VOCAB = 32128

PROFILE: list[str] = []  # ["--profile=N"] from the command line


def run(recipe: str, seq: int, mbs: int, gbs: int, extra: list[str]) -> dict[str, Any]:
    command = [sys.executable, str(HERE / "pretrain_bench.py"), f"--recipe={recipe}", f"--seq={seq}"]
    command += [f"--mbs={mbs}", f"--gbs={gbs}", *COMMON, *PROFILE, *extra]
    proc = subprocess.run(command, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"error": (proc.stderr or proc.stdout)[-1500:], "overrides": extra}
    result: dict[str, Any] = json.loads(lines[-1])
    estimate, peak = result.get("estimate_gib"), result.get("peak_mem_gib")
    if isinstance(estimate, float) and peak:
        result["estimate_over_peak"] = round(estimate / peak, 3)
    return result


def mamba(extra: list[str]) -> dict[str, Any]:
    m = run("mamba2_130m", 4096, 4, 16, ["model._target_=viaduct.models.MambaModelProvider780M", *extra])
    g = run("llama32_1b", 4096, 4, 16, [*NULL_TOKENIZER, *GPT_780M])
    out: dict[str, Any] = {"case": "mamba", "mamba2_780m": m, "gpt_780m": g}
    if "tokens_per_s_per_gpu" in m and "tokens_per_s_per_gpu" in g:
        out["mamba_over_gpt"] = round(m["tokens_per_s_per_gpu"] / g["tokens_per_s_per_gpu"], 3)
    return out


def t5(extra: list[str]) -> dict[str, Any]:
    # The T5 paper's pre-training batch: 128 sequences of 512 encoder tokens, here in one micro-batch
    # (about 32 GiB of activations on the GPU), as large GEMMs and few kernel launches run best. The
    # recipe's built-in tokenizer has 4,196 ids; T5-base's vocabulary (32,000 SentencePiece pieces and
    # 100 sentinels, padded to 32,128) sizes the embedding and the output layer here.
    t5_base = ["dataset=mock_t5", f"model.vocab_size={T5_BASE_VOCAB}"]
    return {"case": "t5", "t5_220m": run("t5_220m", 512, 128, 128, [*t5_base, *extra])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("case", choices=["mamba", "t5", "all"])
    ap.add_argument("overrides", nargs="*", help="config overrides for the family's model (a.b=v)")
    ap.add_argument("--profile", type=int, default=0, help="list this many costliest GPU kernels per run")
    args = ap.parse_intermixed_args()
    if args.profile:
        PROFILE.append(f"--profile={args.profile}")
    for name, fn in (("mamba", mamba), ("t5", t5)):
        if args.case in (name, "all"):
            print(json.dumps(fn(args.overrides)), flush=True)


if __name__ == "__main__":
    main()
