"""Pruned vs dense output tokens/s through vLLM (offline batch, vllm.LLM), against the ideal speed-up.

    .venv/bin/python benchmarks/bench_vllm.py --dense DENSE_DIR --pruned PRUNED_DIR [--pruned ...]

For each model: output tokens/s of one batch (each prompt generates exactly --output-tokens tokens, ignore_eos),
measured in a subprocess with one engine at a time. Printed per pruned model:
  measured ratio   = pruned tokens/s / dense tokens/s
  ideal ratio      = dense matmul parameters / pruned matmul parameters (lm_head included), read from
                     safetensors headers: the speed-up if decoding were bound by matmul weight traffic alone
  measured / ideal = how much of that ideal the engine realises (attention over the KV cache, sampling,
                     scheduling and Python overheads do not shrink with pruning)
Results are also written as JSON (--out). Runs on whatever accelerator is present (CUDA, ROCm or CPU).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from tyr.atomic import atomic_write_json
from tyr.benchmarking.config import OfflineConfig, ServerConfig
from tyr.benchmarking.offline import run_offline_throughput
from tyr.benchmarking.platform_info import detect_platform
from tyr.benchmarking.prompts import random_prompts
from tyr.benchmarking.results import matmul_params
from tyr.errors import TyrError


def measure(model_dir: Path, args: argparse.Namespace, accelerator: str, work_dir: Path) -> dict:
    server = ServerConfig(max_model_len=args.prompt_tokens + args.output_tokens + 16, dtype=args.dtype,
                          compile=args.compile)
    offline = OfflineConfig(num_prompts=args.prompts, prompt_tokens=args.prompt_tokens,
                            output_tokens=args.output_tokens)
    prompts = random_prompts(model_dir, args.prompts, args.prompt_tokens, seed=1)
    runs = [run_offline_throughput(model_dir, prompts, offline, server, accelerator, work_dir / f"rep{i}")
            for i in range(args.repeats)]
    best = max(runs, key=lambda r: r.output_tokens_per_s)  # best of N: least disturbed by other load
    return {"model": str(model_dir), "matmul_params": matmul_params(model_dir),
            "output_tokens_per_s": best.output_tokens_per_s, "all_output_tokens_per_s": [r.output_tokens_per_s for r in runs]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dense", required=True, type=Path)
    parser.add_argument("--pruned", required=True, type=Path, action="append")
    parser.add_argument("--prompts", type=int, default=32, help="prompts in the batch")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--output-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=1, help="engine runs per model (best is kept)")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--out", type=Path, default=Path("tyr-reports") / f"bench-vllm-ratio-{time.strftime('%Y%m%d-%H%M%S')}")
    args = parser.parse_args()

    platform = detect_platform()
    print(f"{platform.accelerator} ({platform.device_name}), {platform.cpu_count} CPUs, "
          f"{platform.vllm_distribution} {platform.vllm_version}, torch {platform.torch_version}", flush=True)
    try:
        dense = measure(args.dense, args, platform.accelerator, args.out / "dense")
        print(f"dense  {args.dense}: {dense['output_tokens_per_s']:.1f} tok/s, "
              f"{dense['matmul_params']:,} matmul params", flush=True)
        rows = []
        for i, pruned_dir in enumerate(args.pruned):
            pruned = measure(pruned_dir, args, platform.accelerator, args.out / f"pruned{i}")
            measured = pruned["output_tokens_per_s"] / dense["output_tokens_per_s"]
            ideal = dense["matmul_params"] / pruned["matmul_params"]
            rows.append(pruned | {"measured_ratio": measured, "ideal_ratio": ideal, "measured_over_ideal": measured / ideal})
            print(f"pruned {pruned_dir}: {pruned['output_tokens_per_s']:.1f} tok/s, {pruned['matmul_params']:,} matmul "
                  f"params | measured ratio {measured:.2f}x, ideal ratio {ideal:.2f}x, measured/ideal {measured / ideal:.2f}",
                  flush=True)
    except TyrError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    atomic_write_json(args.out / "ratios.json", {"platform": platform.model_dump(mode="json"), "dense": dense,
                                                 "pruned": rows, "settings": {k: str(v) for k, v in vars(args).items()}})
    print(f"written: {args.out / 'ratios.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
