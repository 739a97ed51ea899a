"""`tyr bench vllm`, `tyr bench onnx` and `tyr bench layers`."""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from tyr.errors import TyrError
from tyr.exporters.onnx.runner import OPT_LEVELS


def default_out(kind: str) -> str:
    """A fresh report folder per invocation, so reruns never overwrite an earlier report."""
    return str(Path("tyr-reports") / f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}")


def add_vllm(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", action="append", required=True, metavar="DIR",
                        help="model folder; repeat for several (the first is the baseline, e.g. the dense model)")
    parser.add_argument("--label", action="append", metavar="NAME", help="name per --model (default: folder name)")
    parser.add_argument("--out", default=None, help="output folder (default: tyr-reports/bench-vllm-<time>)")
    parser.add_argument("--config", metavar="FILE", help="YAML/JSON with server/load/offline settings; flags override")
    load = parser.add_argument_group("load (locust, bounded)")
    load.add_argument("--users", type=int, help="concurrent streaming users (default 2, at most 256)")
    load.add_argument("--spawn-rate", type=float, help="users started per second (default 2)")
    load.add_argument("--duration", type=float, help="seconds of load per model (default 10, at most 3600)")
    load.add_argument("--prompt-tokens", type=int, help="prompt length in tokens (default 64)")
    load.add_argument("--output-tokens", type=int, help="generated tokens per request (default 32)")
    load.add_argument("--num-prompts", type=int, help="distinct random prompts cycled by the users (default 64)")
    server = parser.add_argument_group("server")
    server.add_argument("--max-model-len", type=int, help="vLLM --max-model-len (default 512)")
    server.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"],
                        help="default auto: float32 on CPU, bfloat16 on GPUs (float16 where a GPU lacks bfloat16)")
    server.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="torch.compile and CUDA graphs (default: on for GPUs, off on CPU; --no-compile: eager)")
    server.add_argument("--kv-cache-gib", type=int, help="CPU only: VLLM_CPU_KVCACHE_SPACE (default 1)")
    server.add_argument("--startup-timeout", type=float, help="seconds to wait for /health (default 600)")
    server.add_argument("--tensor-parallel", type=int, metavar="N",
                        help="vLLM --tensor-parallel-size N (default 1); refused for a model whose layer widths "
                             "vLLM cannot split N ways (prune with `tyr prune --tensor-parallel N`). On CPU each "
                             "worker gets 1/N of the cores")
    server.add_argument("--trust-remote-code", action="store_true", default=None)
    server.add_argument("--host", metavar="URL", help="benchmark this already running server instead of starting "
                                                       "one (one --model, used for prompts and parameter counts)")
    offline = parser.add_argument_group("batch throughput (vllm.LLM, or one batched request to the server)")
    offline.add_argument("--offline", action=argparse.BooleanOptionalAction, default=None,
                         help="measure offline batch throughput too (default on)")
    offline.add_argument("--offline-prompts", type=int, help="prompts in the offline batch (default 32)")
    offline.add_argument("--offline-output-tokens", type=int, help="tokens generated per offline prompt (default 64)")
    offline.add_argument("--offline-via", choices=["engine", "server"],
                         help="engine: its own vllm.LLM engine after the server is down (default); server: one "
                              "batched request to the benchmark's server, no second engine start")


# flag -> (section, field) of BenchConfig
_BENCH_FLAGS = {
    "users": ("load", "users"), "spawn_rate": ("load", "spawn_rate"), "duration": ("load", "duration_s"),
    "prompt_tokens": ("load", "prompt_tokens"), "output_tokens": ("load", "output_tokens"),
    "num_prompts": ("load", "num_prompts"), "max_model_len": ("server", "max_model_len"),
    "dtype": ("server", "dtype"), "compile": ("server", "compile"), "kv_cache_gib": ("server", "kv_cache_space_gib"),
    "startup_timeout": ("server", "startup_timeout_s"), "trust_remote_code": ("server", "trust_remote_code"),
    "tensor_parallel": ("server", "tensor_parallel_size"),
    "offline": ("offline", "enabled"), "offline_prompts": ("offline", "num_prompts"),
    "offline_output_tokens": ("offline", "output_tokens"), "offline_via": ("offline", "via"),
}


def bench_config_from_args(args: argparse.Namespace):
    """--config's settings with the flags given on top."""
    from tyr.benchmarking.config import BenchConfig

    data = BenchConfig.from_file(args.config).model_dump() if args.config else {}
    for flag, (section, field) in _BENCH_FLAGS.items():
        value = getattr(args, flag, None)
        if value is not None:
            data.setdefault(section, {})[field] = value
    try:
        return BenchConfig.model_validate(data)
    except ValueError as err:
        raise TyrError(f"bad benchmark settings: {err}") from err


def run_vllm(args: argparse.Namespace) -> int:
    """Serve each model with vLLM, load it with locust, measure offline throughput; JSON, CSV and HTML report."""
    from tyr.benchmarking.tables import bench_table
    from tyr.benchmarking.vllm_bench import bench_vllm

    config = bench_config_from_args(args)
    out = args.out or default_out("bench-vllm")
    run = bench_vllm(args.model, config, out, labels=args.label, server_url=args.host)
    print(bench_table(run.results, run.baseline))
    for failure in run.failures:
        print(f"\nFAILED {failure.label}: {failure.error}")
    print(f"\nreport: {Path(out) / 'report.html'}  (JSON: results.json, CSV: results.csv)")
    return 1 if run.failures else 0


def add_onnx(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", action="append", required=True,
                        help="an ONNX export folder, or a model folder/'default' (exported fp32 first); repeat "
                             "the option: the first model is the baseline (dense)")
    parser.add_argument("--label", action="append", default=None, help="a short name per --model, in order")
    parser.add_argument("--threads", default="1,2", help="intra-op thread counts, comma-separated (default 1,2)")
    parser.add_argument("--prompt-tokens", type=int, default=128, help="prefill length (default 128)")
    parser.add_argument("--decode-tokens", type=int, default=32, help="decode steps per run (default 32)")
    parser.add_argument("--runs", type=int, default=15, help="measured runs per model (alternating, default 15)")
    parser.add_argument("--warmup", type=int, default=2, help="unmeasured runs per model first (default 2)")
    parser.add_argument("--opt-level", default=None,
                        help="override the exports' graph optimization level (disable, basic, extended, all)")
    parser.add_argument("--out", default=None,
                        help="write results here: onnx_bench.json/.md, results.csv, <label>-<n>t/result.json")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _parse_threads(text: str) -> list[int]:
    try:
        threads = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        threads = []
    if not threads or any(t < 1 for t in threads):
        raise TyrError(f"--threads must be positive integers separated by commas, got {text!r}")
    return threads


def run_onnx(args: argparse.Namespace) -> int:
    """Prefill and decode latency of ONNX exports in onnxruntime: dense vs pruned, measured vs ideal speed-up."""
    from tyr.benchmarking.onnx_bench import bench_onnx, report_table, write_report
    from tyr.exporters.onnx.export import INFO_FILE, export_onnx

    threads = _parse_threads(args.threads)
    if args.opt_level is not None and args.opt_level not in OPT_LEVELS:
        raise TyrError(f"unknown --opt-level {args.opt_level!r}: choose one of {', '.join(OPT_LEVELS)}")
    labels = args.label or [Path(m).name if m != "default" else "dense" for m in args.model]
    if len(labels) != len(args.model):
        raise TyrError(f"got {len(labels)} --label for {len(args.model)} --model")
    out = Path(args.out) if args.out else None
    with tempfile.TemporaryDirectory(prefix="tyr-bench-onnx-") as scratch:
        exports = []
        for model, label in zip(args.model, labels):
            if (Path(model) / INFO_FILE).is_file():
                exports.append(Path(model))
                continue
            target = (out / "exports" / label) if out else Path(scratch) / label
            if not (target / INFO_FILE).is_file():
                print(f"exporting {model} to {target} (fp32)")
                export_onnx(model, target, overwrite=target.exists())
            exports.append(target)
        report = bench_onnx(exports, labels, threads=threads, opt_level=args.opt_level,
                            prompt_tokens=args.prompt_tokens, decode_tokens=args.decode_tokens, runs=args.runs,
                            warmup_runs=args.warmup, progress=not args.no_progress)
    table = report_table(report)
    print(table)
    if out is not None:
        print(f"results: {write_report(report, table, out)}, {out / 'results.csv'}")
    return 0


def add_layers(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="default", help="dense model folder, or 'default'")
    parser.add_argument("--out", required=True, help="latency table JSON to write")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--batch", type=int, default=8, help="sequences per decode step")
    parser.add_argument("--context", type=int, default=256, help="KV-cache tokens each sequence attends to")
    parser.add_argument("--repeats", type=int, default=30, help="timed runs per shape (the best counts)")


def run_layers(args: argparse.Namespace) -> int:
    """Time one decode step of every attention and MLP shape of a model: the table `tyr prune --max-latency-ms` uses."""
    import torch

    from tyr.benchmarking.layer_latency import latency_table_for_model
    from tyr.models.io import resolve_model_path

    if args.batch < 1 or args.context < 1 or args.repeats < 1:
        raise TyrError("--batch, --context and --repeats must be positive")
    table = latency_table_for_model(resolve_model_path(args.model), batch=args.batch, context=args.context,
                                    device=args.device, dtype=getattr(torch, args.dtype), repeats=args.repeats)
    path = table.save(args.out)
    print(f"{table.method} on {table.device_name} ({table.dtype}), batch {table.batch}, context {table.context}")
    print(f"lm_head {table.lm_head_ms:.3f} ms; attention shapes {len(table.attention_ms)}, MLP widths {len(table.mlp_ms)}")
    print(f"table: {path}")
    return 0
