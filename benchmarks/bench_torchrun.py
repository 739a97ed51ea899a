"""One process against torchrun: SmolLM2-135M pruned to 50% by `tyr prune` alone and by two gloo processes on this CPU.

Both runs use the same recipe, seed and calibration text. The single process uses every core (torch's default
threads); torchrun gives each of its workers one thread, so both runs use the machine's cores. Each pruned model is
scored on held-out text (perplexity and KL to the dense model, as bench_pruning does); the script prints the wall
time of each run, whether the two models have the same structure (per-layer heads and FFN widths) and the same
weights, and the ratios two processes / one. Finished runs are reused when the script is rerun with the same --out.

    .venv/bin/python benchmarks/bench_torchrun.py --out bench-torchrun

Not a timed test: timings depend on the machine and its load. With one thread in every process the two models are
bitwise identical (tests/test_torchrun.py); with more threads in the single process BLAS may round differently, so
the weights (and, rarely, a search decision) may differ slightly: the script measures it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bench_pruning import evaluate, run_tyr, start


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default", help="dense model ('default': the embedded SmolLM2-135M)")
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--recipe", default="fast")
    parser.add_argument("--processes", type=int, default=2, help="torchrun workers (gloo, one thread each)")
    parser.add_argument("--text", default=None, help="calibration and held-out text (default: embedded wiki)")
    parser.add_argument("--out", default="bench-torchrun", help="folder for pruned models and results")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-seq-len", type=int, default=256)
    parser.add_argument("--eval-blocks", type=int, default=24)
    parser.add_argument("--timeout", type=int, default=7200, help="seconds per pruning run")
    return parser.parse_args(argv)


def prune(args, name: str, launcher: list[str], out: Path) -> dict:
    """`tyr prune` (under ``launcher``) unless its output exists; its report and the command's wall time."""
    model_dir, timing = out / name, out / f"{name}.seconds.json"
    if not (model_dir / "prune_report.json").is_file():
        seconds = run_tyr(["prune", "--model", args.model, "--sparsity", str(args.sparsity), "--recipe", args.recipe,
                           "--out", str(model_dir), "--seed", str(args.seed), "--device", "cpu", "--no-progress",
                           *(["--text", args.text] if args.text else [])], f"pruning {name}", args.timeout, launcher)
        timing.write_text(json.dumps({"seconds": seconds}))
    report = json.loads((model_dir / "prune_report.json").read_text())
    return {"model_dir": str(model_dir), "achieved": report["achieved_sparsity"],
            "prune_seconds": report["wall_seconds"], "command_seconds": json.loads(timing.read_text())["seconds"],
            "layers": [(layer["heads"], layer["kv_heads"], layer["ffn"]) for layer in report["layers"]]}


def compare_weights(a: str, b: str) -> dict:
    """Same tensors bit for bit, else the largest absolute difference between tensors of equal shape."""
    from safetensors.torch import load_file

    wa, wb = load_file(Path(a) / "model.safetensors"), load_file(Path(b) / "model.safetensors")
    same_shapes = wa.keys() == wb.keys() and all(wa[k].shape == wb[k].shape for k in wa)
    if not same_shapes:
        return {"identical": False, "max_abs_difference": None}
    return {"identical": all(wa[k].equal(wb[k]) for k in wa),
            "max_abs_difference": max(float((wa[k].double() - wb[k].double()).abs().max()) for k in wa)}


def main(argv=None) -> int:
    args = parse_args(argv)
    out = start(args.out)
    from tyr.data import load_text, token_blocks
    from tyr.evaluation.language_modeling import perplexity
    from tyr.models.io import load_model

    runs = {"one-process": [],
            f"torchrun-{args.processes}": ["-m", "torch.distributed.run", "--standalone",
                                           f"--nproc_per_node={args.processes}"]}
    rows = {name: prune(args, name, launcher, out) for name, launcher in runs.items()}
    dense, tokenizer = load_model(args.model)
    blocks = token_blocks(tokenizer, load_text(args.text, "validation"), args.eval_seq_len, args.eval_blocks, args.seed)
    dense_perplexity = perplexity(dense, blocks, progress=False)
    for row in rows.values():
        row.update(evaluate(row["model_dir"], dense, blocks, tasks=[]))
    single, multi = rows.values()
    comparison = {"same_structure": single["layers"] == multi["layers"],
                  **compare_weights(single["model_dir"], multi["model_dir"])}
    (out / "results.json").write_text(json.dumps({"dense_perplexity": dense_perplexity, "runs": rows,
                                                  "comparison": comparison}, indent=2))
    table = render(args, dense_perplexity, rows, comparison)
    (out / "results.md").write_text(table)
    print(table)
    return 0


def render(args, dense_perplexity: float, rows: dict, comparison: dict) -> str:
    (one_name, one), (multi_name, multi) = rows.items()
    lines = [f"{args.model} at {args.sparsity:.0%} ({args.recipe} recipe, seed {args.seed}), CPU; held-out "
             f"perplexity on {args.eval_blocks} x {args.eval_seq_len} tokens; dense perplexity {dense_perplexity:.2f}",
             "", "| run | prune s | command s | achieved sparsity | perplexity | KL to dense |",
             "|---|---|---|---|---|---|"]
    for name, row in rows.items():
        lines.append(f"| {name} | {row['prune_seconds']:.0f} | {row['command_seconds']:.0f} | {row['achieved']:.2%} | "
                     f"{row['perplexity']:.2f} | {row['kl']:.4f} |")
    lines.append(f"| {multi_name} / {one_name} | {multi['prune_seconds'] / one['prune_seconds']:.2f} | "
                 f"{multi['command_seconds'] / one['command_seconds']:.2f} | | "
                 f"{multi['perplexity'] / one['perplexity']:.3f} | "
                 f"{multi['kl'] / one['kl'] if one['kl'] else float('nan'):.3f} |")
    difference = comparison["max_abs_difference"]
    lines += ["", f"Same structure (heads, KV heads, FFN width per layer): {comparison['same_structure']}; "
              f"identical weights: {comparison['identical']}"
              + (f" (largest weight difference {difference:.3g})" if difference else "") + "."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
