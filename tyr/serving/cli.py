"""`tyr bench vllm` and `tyr select` (registered in tyr/cli.py). Heavy imports stay inside run_*."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from tyr.errors import TyrError


def _default_out(kind: str) -> str:
    return str(Path("tyr-reports") / f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}")


def add_bench(parser: argparse.ArgumentParser) -> None:
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
                        help="default auto: float32 on CPU, the model's dtype on GPUs")
    server.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="torch.compile/graphs (default: off on CPU, on for GPUs)")
    server.add_argument("--kv-cache-gib", type=int, help="CPU only: VLLM_CPU_KVCACHE_SPACE (default 1)")
    server.add_argument("--startup-timeout", type=float, help="seconds to wait for /health (default 600)")
    server.add_argument("--trust-remote-code", action="store_true", default=None)
    server.add_argument("--host", metavar="URL", help="benchmark this already running server instead of starting "
                                                       "one (one --model, used for prompts and parameter counts)")
    offline = parser.add_argument_group("offline throughput (vllm.LLM)")
    offline.add_argument("--offline", action=argparse.BooleanOptionalAction, default=None,
                         help="measure offline batch throughput too (default on)")
    offline.add_argument("--offline-prompts", type=int, help="prompts in the offline batch (default 32)")
    offline.add_argument("--offline-output-tokens", type=int, help="tokens generated per offline prompt (default 64)")


# flag -> (section, field) of BenchConfig
_BENCH_FLAGS = {
    "users": ("load", "users"), "spawn_rate": ("load", "spawn_rate"), "duration": ("load", "duration_s"),
    "prompt_tokens": ("load", "prompt_tokens"), "output_tokens": ("load", "output_tokens"),
    "num_prompts": ("load", "num_prompts"), "max_model_len": ("server", "max_model_len"),
    "dtype": ("server", "dtype"), "compile": ("server", "compile"), "kv_cache_gib": ("server", "kv_cache_space_gib"),
    "startup_timeout": ("server", "startup_timeout_s"), "trust_remote_code": ("server", "trust_remote_code"),
    "offline": ("offline", "enabled"), "offline_prompts": ("offline", "num_prompts"),
    "offline_output_tokens": ("offline", "output_tokens"),
}


def bench_config_from_args(args: argparse.Namespace):
    from tyr.serving.config import BenchConfig

    data = BenchConfig.from_file(args.config).model_dump() if args.config else {}
    for flag, (section, field) in _BENCH_FLAGS.items():
        value = getattr(args, flag, None)
        if value is not None:
            data.setdefault(section, {})[field] = value
    try:
        return BenchConfig.model_validate(data)
    except ValueError as err:
        raise TyrError(f"bad benchmark settings: {err}") from err


def run_bench(args: argparse.Namespace) -> int:
    """Serve each model with vLLM, load it with locust, measure offline throughput; JSON, CSV and HTML report."""
    from tyr.serving.bench import bench_vllm
    from tyr.serving.tables import bench_table

    config = bench_config_from_args(args)
    out = args.out or _default_out("bench-vllm")
    run = bench_vllm(args.model, config, out, labels=args.label, server_url=args.host)
    print(bench_table(run.results, run.baseline))
    for failure in run.failures:
        print(f"\nFAILED {failure.label}: {failure.error}")
    print(f"\nreport: {Path(out) / 'report.html'}  (JSON: results.json, CSV: results.csv)")
    return 1 if run.failures else 0


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

    from tyr.models.io import resolve_model_path
    from tyr.serving.latency_table import latency_table_for_model

    if args.batch < 1 or args.context < 1 or args.repeats < 1:
        raise TyrError("--batch, --context and --repeats must be positive")
    table = latency_table_for_model(resolve_model_path(args.model), batch=args.batch, context=args.context,
                                    device=args.device, dtype=getattr(torch, args.dtype), repeats=args.repeats)
    path = table.save(args.out)
    print(f"{table.method} on {table.device_name} ({table.dtype}), batch {table.batch}, context {table.context}")
    print(f"lm_head {table.lm_head_ms:.3f} ms; attention shapes {len(table.attention_ms)}, MLP widths {len(table.mlp_ms)}")
    print(f"table: {path}")
    return 0


def add_select(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--candidates", nargs="+", action="extend", default=[], metavar="PATH",
                        help="measurement JSONs, benchmark results, pruned folders with measurement.json, or "
                             "folders of JSONs (the dense baseline among them, marked \"baseline\": true)")
    quality = parser.add_mutually_exclusive_group(required=True)
    quality.add_argument("--max-ppl-increase", type=float, metavar="X",
                         help="largest allowed perplexity increase over the baseline, as a fraction (0.1 = 10%%)")
    quality.add_argument("--min-accuracy-retention", type=float, metavar="X",
                         help="smallest allowed accuracy / baseline accuracy (0.95 = keep 95%%)")
    parser.add_argument("--min-speedup", type=float, required=True, metavar="Y",
                        help="smallest allowed output tokens/s over the baseline's (1.5 = 1.5x)")
    parser.add_argument("--runtime", choices=["vllm", "onnx"], default="vllm", help="whose speed counts")
    parser.add_argument("--speed-source", choices=["auto", "offline", "online"], default="auto",
                        help="which benchmark throughput to compare (auto: offline batch when measured)")
    parser.add_argument("--out", default=None, help="output folder (default: tyr-reports/select-<time>)")
    parser.add_argument("--prune-base", metavar="MODEL", help="prune this model ('default', a folder or a hub id) "
                        "at --prune-sparsities, then evaluate, export and benchmark it and every pruned model in "
                        "--runtime (the `tyr run` stages; rerunning with the same --out resumes)")
    parser.add_argument("--prune-sparsities", type=float, nargs="+", metavar="S", help="sparsities to prune at")
    parser.add_argument("--recipe", default="fast", help="pruning recipe for --prune-base: fast, paper or a file")


def run_select(args: argparse.Namespace) -> int:
    """Pick the fastest model meeting a quality and a speed-up target (Pareto front, report); exit 1 if none."""
    from tyr.atomic import check_output_path
    from tyr.serving.candidates import read_candidates
    from tyr.serving.report import write_selection_report
    from tyr.serving.selection import Targets, select
    from tyr.serving.tables import selection_table

    out = check_output_path(args.out or _default_out("select"))
    candidates = list(args.candidates)
    if args.prune_sparsities or args.prune_base:
        if not (args.prune_sparsities and args.prune_base):
            raise TyrError("--prune-base and --prune-sparsities go together")
        candidates.append(str(_prune_and_measure(args, out / "run")))
    if not candidates:
        raise TyrError("no candidates: pass --candidates (or --prune-base with --prune-sparsities)")
    try:
        targets = Targets(max_ppl_increase=args.max_ppl_increase, min_accuracy_retention=args.min_accuracy_retention,
                          min_speedup=args.min_speedup, runtime=args.runtime)
    except ValueError as err:
        raise TyrError(f"bad targets: {err}") from err
    selection = select(read_candidates(candidates, args.runtime, args.speed_source), targets)
    paths = write_selection_report(out, selection)
    print(selection_table(selection))
    print()
    print(selection.message)
    print(f"\nreport: {paths['html']}  (JSON: {paths['json'].name}, CSV: {paths['csv'].name})")
    return 0 if selection.chosen else 1


def _prune_and_measure(args: argparse.Namespace, out: Path) -> Path:
    """Run the `tyr run` stages for --prune-base in --runtime only; returns its measurements file."""
    from tyr.pipeline import RunConfig, run_pipeline

    try:
        config = RunConfig(model=args.prune_base, sparsities=args.prune_sparsities, recipe=args.recipe, out=out,
                           max_ppl_increase=args.max_ppl_increase,
                           min_accuracy_retention=args.min_accuracy_retention, min_speedup=args.min_speedup,
                           runtime=args.runtime, vllm=args.runtime == "vllm", onnx=args.runtime == "onnx")
    except ValueError as err:
        raise TyrError(f"bad --prune-* settings: {err}") from err
    run_pipeline(config)
    return out / "measurements.json"
