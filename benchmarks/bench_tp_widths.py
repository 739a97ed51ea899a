"""The cost of deployable widths: SmolLM2-135M pruned to 50% freely, and with widths vLLM can split over 2 devices.

Two `tyr prune` runs on the same calibration text and seed: the recipe as it is (unconstrained widths), and the
recipe with ``ffn_multiple: 64`` and ``--tensor-parallel 2`` (every layer's query heads and FFN width divisible by 2,
KV heads divisible by 2 or dividing it, FFN widths multiples of 128). Both are scored on held-out text (perplexity
and KL to the dense model) and printed side by side with their parameter counts and the tensor-parallel sizes their
widths allow. Finished runs are reused when the script is rerun with the same --out.

    .venv/bin/python benchmarks/bench_tp_widths.py --out bench-tp-widths

SmolLM2 has 9 query heads in 3 KV groups: at tensor parallelism 2 no layer keeps more than 6 heads (2 groups of 3),
so even the least pruned attention candidate gives up a third of its heads.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from bench_pruning import run_tyr, start

import yaml


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--recipe", default="fast", help="recipe of both runs (the constrained one adds the rules)")
    parser.add_argument("--tensor-parallel", type=int, default=2)
    parser.add_argument("--ffn-multiple", type=int, default=64)
    parser.add_argument("--text", default=None, help="calibration and held-out text (default: embedded wiki)")
    parser.add_argument("--out", default="bench-tp-widths", help="folder for pruned models and results")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-seq-len", type=int, default=256)
    parser.add_argument("--eval-blocks", type=int, default=24)
    parser.add_argument("--timeout", type=int, default=7200, help="seconds per pruning run")
    return parser.parse_args(argv)


def constrained_recipe(args, out: Path) -> Path:
    """The recipe with the FFN alignment (the tensor-parallel size goes on the command line, as a user gives it)."""
    from tyr.compressor.recipes import load_recipe

    data = load_recipe(args.recipe).model_dump(mode="json")
    data["name"] = f"{data['name']}-ffn{args.ffn_multiple}"
    data["local_pruner"]["ffn_multiple"] = args.ffn_multiple
    path = out / "constrained-recipe.yaml"
    with tempfile.NamedTemporaryFile("w", dir=out, delete=False, suffix=".tmp") as f:
        yaml.safe_dump(data, f, sort_keys=False)
    os.replace(f.name, path)
    return path


def run_prune(args, name: str, extra: list[str], recipe: str, out: Path) -> dict:
    """`tyr prune` in a subprocess unless its output exists; its report."""
    model_dir = out / name
    if not (model_dir / "prune_report.json").is_file():
        run_tyr(["prune", "--model", args.model, "--sparsity", str(args.sparsity), "--recipe", recipe, "--out",
                 str(model_dir), "--seed", str(args.seed), "--no-progress", *extra,
                 *(["--text", args.text] if args.text else [])], f"pruning {name}", args.timeout)
    report = json.loads((model_dir / "prune_report.json").read_text())
    report["model_dir"] = str(model_dir)
    return report


def main(argv=None) -> int:
    args = parse_args(argv)
    out = start(args.out)
    from tyr.data import load_text, token_blocks
    from tyr.evaluation.language_modeling import compare_to_reference, perplexity
    from tyr.models.facts import folder_layer_widths, supported_tensor_parallel
    from tyr.models.io import load_model

    runs = {"unconstrained": ([], args.recipe),
            f"tp{args.tensor_parallel}-ffn{args.ffn_multiple}": (["--tensor-parallel", str(args.tensor_parallel)],
                                                                  str(constrained_recipe(args, out)))}
    dense, tokenizer = load_model(args.model)
    blocks = token_blocks(tokenizer, load_text(args.text, "validation"), args.eval_seq_len, args.eval_blocks, args.seed)
    rows = {"dense": {"perplexity": perplexity(dense, blocks, progress=False), "kl": 0.0}}
    for name, (extra, recipe) in runs.items():
        report = run_prune(args, name, extra, recipe, out)
        model, _ = load_model(report["model_dir"])
        comparison = compare_to_reference(model, dense, blocks, progress=False)
        rows[name] = {"perplexity": comparison.perplexity, "kl": comparison.kl,
                      "achieved": report["achieved_sparsity"], "params": report["pruned_decoder_params"],
                      "tensor_parallel": supported_tensor_parallel(folder_layer_widths(report["model_dir"])),
                      "seconds": report["wall_seconds"]}
    (out / "results.json").write_text(json.dumps(rows, indent=2))
    lines = [f"SmolLM2 at {args.sparsity:.0%} ({args.recipe} recipe, seed {args.seed}; held-out perplexity, "
             f"{args.eval_blocks} x {args.eval_seq_len} tokens)", "",
             "| run | perplexity | KL to dense | achieved sparsity | decoder params | vLLM TP sizes | prune s |",
             "|---|---|---|---|---|---|---|"]
    for name, row in rows.items():
        if name == "dense":
            lines.append(f"| dense | {row['perplexity']:.2f} | 0 | 0 | | | |")
            continue
        lines.append(f"| {name} | {row['perplexity']:.2f} | {row['kl']:.4f} | {row['achieved']:.2%} | "
                     f"{row['params']:,} | {', '.join(map(str, row['tensor_parallel']))} | {row['seconds']:.0f} |")
    table = "\n".join(lines)
    (out / "results.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
