"""Týr-the-Pruner vs baselines on the default SmolLM2-135M: quality, wall time and peak memory per run.

For every sparsity and method, `tyr prune` runs in its own process (so its peak RSS is its own), on the same
calibration text (the embedded Wikipedia sample's calibration split); the pruned model is then scored on held-out
text (the validation split): perplexity, KL divergence to the dense model, and zero-shot BIG-bench multiple choice.
Finished runs are reused when the script is rerun with the same --out.

    .venv/bin/python benchmarks/bench_pruning.py --sparsities 0.5 --methods tyr uniform --out bench-pruning

Not a timed test: timings depend on the machine and its load (on a shared machine they are pessimistic).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

METHODS = ("tyr", "uniform", "magnitude", "flap")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.25, 0.375, 0.5])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--recipe", default="fast")
    parser.add_argument("--text", default=None, help="calibration and held-out text (default: embedded wiki)")
    parser.add_argument("--out", default="bench-pruning", help="folder for pruned models and results")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-seq-len", type=int, default=256)
    parser.add_argument("--eval-blocks", type=int, default=24)
    parser.add_argument("--tasks", default="all", help="BIG-bench tasks ('all', 'none' or names)")
    parser.add_argument("--limit", type=int, default=50, help="examples per BIG-bench task")
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per pruning run")
    parser.add_argument("--reuse-generations", type=int, default=3,
                        help="after the Týr run at the highest sparsity, time this many search generations on its "
                             "last supernet with and without activation reuse (0 skips)")
    return parser.parse_args(argv)


def start(out: str) -> Path:
    """Offline hub, no autograd, the output folder made: what every benchmark sets up before it loads a model."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_grad_enabled(False)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def run_tyr(argv: list[str], what: str, timeout: float | None, launcher: list[str] | None = None) -> float:
    """`tyr argv...` in a subprocess, echoed and timed (returns its seconds); stop the benchmark if it fails.
    ``launcher``: module arguments that start it instead (e.g. torch.distributed.run's)."""
    command = [sys.executable, *(launcher or []), "-m", "tyr.cli", *argv]
    print(f"$ {' '.join(command)}", flush=True)
    started = time.perf_counter()
    run = subprocess.run(command, timeout=timeout, env=dict(os.environ, TOKENIZERS_PARALLELISM="false"))
    if run.returncode:
        raise SystemExit(f"{what} failed with exit code {run.returncode}")
    seconds = time.perf_counter() - started
    print(f"  done in {seconds:.0f} s", flush=True)
    return seconds


def run_prune(args, sparsity: float, method: str, out: Path) -> dict:
    """Run `tyr prune` in a subprocess unless its output exists; return its report."""
    model_dir = out / f"{method}-{sparsity:g}"
    if not (model_dir / "prune_report.json").is_file():
        run_tyr(["prune", "--model", args.model, "--sparsity", str(sparsity), "--recipe", args.recipe, "--method",
                 method, "--out", str(model_dir), "--seed", str(args.seed), "--no-progress",
                 *(["--text", args.text] if args.text else [])], f"pruning {method} at {sparsity}", args.timeout)
    report = json.loads((model_dir / "prune_report.json").read_text())
    report["model_dir"] = str(model_dir)
    return report


def evaluate(model_dir: str, dense, blocks, tasks) -> dict:
    from tyr.evaluation.language_modeling import compare_to_reference
    from tyr.evaluation.multiple_choice import evaluate_task
    from tyr.models.io import load_model

    model, tokenizer = load_model(model_dir)
    comparison = compare_to_reference(model, dense, blocks, progress=False)
    row = {"perplexity": comparison.perplexity, "kl": comparison.kl}
    if tasks:
        scores = [evaluate_task(model, tokenizer, task, progress=False) for task in tasks]
        row["bigbench"] = sum(s.accuracy for s in scores) / len(scores)
        row["bigbench_chance"] = sum(s.chance for s in scores) / len(scores)
    return row


def main(argv=None) -> int:
    args = parse_args(argv)
    out = start(args.out)
    from tyr.data import load_text, token_blocks
    from tyr.evaluation.bigbench import default_bigbench_dir, load_task, resolve_task_names
    from tyr.evaluation.language_modeling import perplexity
    from tyr.evaluation.multiple_choice import evaluate_task
    from tyr.models.io import load_model, resolve_model_path

    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    dense, tokenizer = load_model(args.model)
    blocks = token_blocks(tokenizer, load_text(args.text, "validation"), args.eval_seq_len, args.eval_blocks, args.seed)
    tasks = []
    if args.tasks.strip().lower() != "none":
        directory = default_bigbench_dir()
        tasks = [load_task(directory / f"{name}.json", limit=args.limit, seed=args.seed)
                 for name in resolve_task_names(args.tasks, directory)]
    if "dense" not in results:
        row = {"perplexity": perplexity(dense, blocks, progress=False), "kl": 0.0}
        if tasks:
            scores = [evaluate_task(dense, tokenizer, task, progress=False) for task in tasks]
            row["bigbench"] = sum(s.accuracy for s in scores) / len(scores)
            row["bigbench_chance"] = sum(s.chance for s in scores) / len(scores)
        results["dense"] = row
        results_path.write_text(json.dumps(results, indent=2))
    for sparsity in args.sparsities:
        for method in args.methods:
            key = f"{method}@{sparsity:g}"
            report = run_prune(args, sparsity, method, out)
            if key not in results:
                row = evaluate(report["model_dir"], dense, blocks, tasks)
                row.update(method=method, sparsity=sparsity, achieved=report["achieved_sparsity"],
                           seconds=report["wall_seconds"], peak_rss_mb=report["peak_rss_mb"])
                results[key] = row
                results_path.write_text(json.dumps(results, indent=2))
    top = max(args.sparsities)
    if "tyr" in args.methods and args.reuse_generations and "reuse" not in results:
        results["reuse"] = measure_reuse(args, out / f"tyr-{top:g}.work", dense, tokenizer, top)
        results_path.write_text(json.dumps(results, indent=2))
    table = render(results, args, resolve_model_path(args.model))
    (out / "results.md").write_text(table)
    print(table)
    return 0


def measure_reuse(args, work_dir: Path, dense, tokenizer, sparsity: float) -> dict:
    """Time the same short search on the last supernet with and without activation reuse (same results)."""
    from tyr.compressor.calibration import calibration_ids
    from tyr.compressor.fitness import SupernetKL, dense_targets
    from tyr.compressor.layerwise import DenseParts
    from tyr.compressor.prune import IterationOutcome, _module_list, _space, iteration_seed
    from tyr.compressor.recipes import load_recipe
    from tyr.compressor.search import run_search
    from tyr.compressor.supernet import Supernet

    recipe = load_recipe(args.recipe)
    kept = [i for i in range(recipe.iterations) if (work_dir / f"iter{i}" / "supernet" / "manifest.json").is_file()]
    iteration = kept[-1]          # the supernet of the output iteration (the others are deleted)
    outcome = IterationOutcome.model_validate_json((work_dir / f"iter{iteration}" / "result.json").read_text())
    supernet = Supernet.open(work_dir / f"iter{iteration}" / "supernet")
    modules = _module_list(dense)
    unit = recipe.initial_spacing / 2 ** (recipe.iterations - 1)
    step = 2 ** (recipe.iterations - 1 - iteration)
    space = _space(supernet.manifest, modules, sparsity, unit, step)
    ticks = outcome.start_ticks
    selection = calibration_ids(tokenizer, args.text, recipe.search.selection_sequences, recipe.search.seq_len,
                                args.seed + 1, purpose="selection")
    targets = dense_targets(dense, selection, recipe.search.kl_top_k, recipe.search.batch_sequences, progress=False)
    settings = recipe.search.model_copy(update=dict(generations=[args.reuse_generations]))
    out = {}
    for reuse in (False, True):
        fitness = SupernetKL(DenseParts.from_model(dense), supernet.weights, [k for _, k, _ in modules], targets,
                             recipe.search.batch_sequences, reuse_activations=reuse,
                             activation_cache_mb=recipe.search.activation_cache_mb,
                             cached_batches=recipe.search.stage_batches()[-1])
        started = time.perf_counter()
        result = run_search(space, fitness, settings, space.choice_at(ticks),
                            seed=iteration_seed(args.seed, iteration), progress=False)
        out["with" if reuse else "without"] = {
            "seconds": time.perf_counter() - started, "fitness": result.fitness,
            "generation_seconds": sum(h.seconds for h in result.history),
            "module_evaluations": fitness.stats.module_evaluations}
    out["same_result"] = out["with"]["fitness"] == out["without"]["fitness"]
    out["time_saving"] = 1 - out["with"]["generation_seconds"] / out["without"]["generation_seconds"]
    out["module_saving"] = 1 - out["with"]["module_evaluations"] / out["without"]["module_evaluations"]
    return out


def render(results: dict, args, model_path: str) -> str:
    dense = results["dense"]
    lines = [f"Model {args.model} ({model_path}); recipe {args.recipe}; held-out text: {args.eval_blocks} blocks x "
             f"{args.eval_seq_len} tokens; BIG-bench: {args.tasks} (limit {args.limit}).",
             f"Dense: perplexity {dense['perplexity']:.2f}"
             + (f", BIG-bench accuracy {100 * dense['bigbench']:.1f}% (chance {100 * dense['bigbench_chance']:.1f}%)"
                if "bigbench" in dense else ""), "",
             "| sparsity | method | achieved | perplexity | ppl / Týr's | KL to dense | BIG-bench acc | wall s | "
             "peak RSS MiB |", "|---|---|---|---|---|---|---|---|---|"]
    for sparsity in args.sparsities:
        tyr = results.get(f"tyr@{sparsity:g}")
        for method in args.methods:
            row = results.get(f"{method}@{sparsity:g}")
            if row is None:
                continue
            ratio = f"{row['perplexity'] / tyr['perplexity']:.2f}" if tyr else "-"
            accuracy = f"{100 * row['bigbench']:.1f}%" if "bigbench" in row else "-"
            lines.append(f"| {100 * sparsity:g}% | {method} | {100 * row['achieved']:.2f}% | {row['perplexity']:.2f} "
                         f"| {ratio} | {row['kl']:.4f} | {accuracy} | {row['seconds']:.0f} | "
                         f"{row['peak_rss_mb']:.0f} |")
    reuse = results.get("reuse")
    if reuse:
        lines += ["", f"Activation reuse ({args.reuse_generations} generations on the last supernet at "
                  f"{100 * max(args.sparsities):g}%): {reuse['without']['seconds']:.1f} s without, "
                  f"{reuse['with']['seconds']:.1f} s with ({100 * reuse['time_saving']:.0f}% less time, "
                  f"{100 * reuse['module_saving']:.0f}% fewer decoder-module evaluations; identical result: "
                  f"{reuse['same_result']})."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
