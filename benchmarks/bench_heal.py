"""Healing after pruning on the default SmolLM2-135M: Týr and uniform, before and after the same distillation budget.

For every sparsity and method the pruned model comes from --pruned (an existing folder) or from
tyr.compressor.prune.prune (kept under --out and reused on a rerun). Each is healed with `tyr heal` in its own
process (so its peak RSS is its own) with the same token budget(s), on the calibration split of the text; then the
dense, pruned and healed models are scored on held-out text (the validation split, as `tyr run` evaluates: blocks
of 512 tokens): perplexity, KL to the dense model, and optionally BIG-bench multiple choice. Finished steps are
reused when the script is rerun with the same --out.

    .venv/bin/python benchmarks/bench_heal.py --out bench-heal                       # 25% and 50%, Týr and uniform
    .venv/bin/python benchmarks/bench_heal.py --pruned tyr@0.5=runs/default/pruned-0.5 --sparsities 0.5
    .venv/bin/python benchmarks/bench_heal.py --quick --out bench-heal-quick         # uniform 50%, a few steps

The quality target of `tyr run` (perplexity at most 2x dense) is checked for every model; healing does not change
widths, so a healed model's speed is its unhealed twin's. Not a timed test: timings depend on the machine's load.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bench_pruning import evaluate, run_tyr, start  # the same held-out perplexity, KL and BIG-bench as the pruning benchmark

METHODS = ("tyr", "uniform")
DEFAULT_TARGET_PPL_RATIO = 2.0    # tyr run's default quality target: perplexity at most (1 + 1.0) x dense
HEALED_TARGET_RATIO = 0.65        # issue 16: healed Týr perplexity at most 0.65x unhealed Týr at 50%


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default", help="dense model (the teacher)")
    parser.add_argument("--sparsities", type=float, nargs="+", default=None, help="default 0.25 0.5 (quick: 0.5)")
    parser.add_argument("--methods", nargs="+", default=None, choices=METHODS,
                        help="default tyr uniform (quick: uniform, plus any method given by --pruned)")
    parser.add_argument("--pruned", nargs="*", default=[], metavar="METHOD@SPARSITY=DIR",
                        help="reuse existing pruned folders, e.g. tyr@0.5=runs/default/pruned-0.5")
    parser.add_argument("--tokens", type=int, nargs="+", default=None,
                        help="healing budgets in training tokens (default: tyr heal's; quick: 4096)")
    parser.add_argument("--lora-rank", type=int, default=0, help="heal with LoRA adapters of this rank (0: full)")
    parser.add_argument("--heal-args", default="", help="more `tyr heal` arguments, e.g. '--lr 2e-4'")
    parser.add_argument("--recipe", default="fast", help="pruning recipe for Týr and uniform")
    parser.add_argument("--text", default=None, help="calibration/training and held-out text (default: embedded wiki)")
    parser.add_argument("--out", default="bench-heal", help="folder for pruned and healed models and results")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-seq-len", type=int, default=512)
    parser.add_argument("--eval-blocks", type=int, default=None, help="held-out blocks (default 16, quick 4)")
    parser.add_argument("--bigbench", action="store_true", help="also score BIG-bench multiple choice")
    parser.add_argument("--limit", type=int, default=50, help="examples per BIG-bench task")
    parser.add_argument("--quick", action="store_true", help="a smoke run: uniform at 50%%, 4096 tokens, 4 blocks")
    parser.add_argument("--timeout", type=int, default=7200, help="seconds per healing run")
    args = parser.parse_args(argv)
    given = dict(_parse_pruned(spec) for spec in args.pruned)
    args.pruned = given
    args.sparsities = args.sparsities or ([0.5] if args.quick else [0.25, 0.5])
    args.methods = args.methods or (sorted({"uniform", *(m for m, _ in given)}) if args.quick else list(METHODS))
    args.tokens = args.tokens or ([4096] if args.quick else [None])
    args.eval_blocks = args.eval_blocks or (4 if args.quick else 16)
    return args


def _parse_pruned(spec: str) -> tuple[tuple[str, float], str]:
    key, _, path = spec.partition("=")
    method, _, sparsity = key.partition("@")
    if method not in METHODS or not path or not sparsity:
        raise SystemExit(f"--pruned {spec!r}: expected METHOD@SPARSITY=DIR with METHOD one of {', '.join(METHODS)}")
    if not (Path(path) / "config.json").is_file():
        raise SystemExit(f"--pruned {spec!r}: {path} is not a model folder")
    return (method, float(sparsity)), path


def pruned_dir(args, method: str, sparsity: float, dense_dir: str, out: Path) -> Path:
    """The given folder, or a prune of the dense model kept under --out."""
    if (method, sparsity) in args.pruned:
        return Path(args.pruned[(method, sparsity)])
    from tyr.compressor.prune import prune

    model_dir = out / "pruned" / f"{method}-{sparsity:g}"
    if not (model_dir / "prune_report.json").is_file():
        print(f"pruning: {method} at {sparsity:g}", flush=True)
        prune(dense_dir, sparsity=sparsity, recipe=args.recipe, out_dir=model_dir, text=args.text, method=method,
              seed=args.seed, overwrite=True, progress=False)
    return model_dir


def heal_dir(args, source: Path, teacher: str, tokens: int | None, out: Path, label: str) -> Path:
    """Heal ``source`` with `tyr heal` in a subprocess unless its output exists."""
    healed = out / "healed" / label
    if not (healed / "heal_report.json").is_file():
        argv = ["heal", str(source), "--teacher", teacher, "--out", str(healed), "--seed", str(args.seed),
                "--no-progress", "--lora-rank", str(args.lora_rank)]
        argv += (["--tokens", str(tokens)] if tokens else []) + (["--text", args.text] if args.text else [])
        run_tyr(argv + args.heal_args.split(), f"healing {label}", args.timeout)
    return healed


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

    def save():
        results_path.write_text(json.dumps(results, indent=2))

    dense_dir = resolve_model_path(args.model)
    dense, tokenizer = load_model(dense_dir)
    blocks = token_blocks(tokenizer, load_text(args.text, "validation"), args.eval_seq_len, args.eval_blocks,
                          args.seed)
    tasks = []
    if args.bigbench:
        directory = default_bigbench_dir()
        tasks = [load_task(directory / f"{name}.json", limit=args.limit, seed=args.seed)
                 for name in resolve_task_names("all", directory)]
    if "dense" not in results:
        row = {"perplexity": perplexity(dense, blocks, progress=False), "kl": 0.0}
        if tasks:
            scores = [evaluate_task(dense, tokenizer, task, progress=False) for task in tasks]
            row["bigbench"] = sum(s.accuracy for s in scores) / len(scores)
        results["dense"] = row
        save()
    for sparsity in args.sparsities:
        for method in args.methods:
            source = pruned_dir(args, method, sparsity, dense_dir, out)
            key = f"{method}@{sparsity:g}"
            if key not in results:
                results[key] = evaluate(source, dense, blocks, tasks) | {"model_dir": str(source)}
                save()
            for tokens in args.tokens:
                label = "-".join([f"{method}-{sparsity:g}-heal-{tokens or 'default'}"]
                                 + ([f"lora{args.lora_rank}"] if args.lora_rank else [])
                                 + args.heal_args.replace("--", "").split())
                healed = heal_dir(args, source, dense_dir, tokens, out, label)
                heal_key = f"{key}+{label}"
                if heal_key not in results:
                    report = json.loads((healed / "heal_report.json").read_text())
                    row = evaluate(healed, dense, blocks, tasks)
                    row.update(model_dir=str(healed), method=method, sparsity=sparsity, unhealed=key,
                               tokens=report["tokens"], mode=report["mode"], tokens_per_s=report["tokens_per_s"],
                               train_seconds=report["train_seconds"], wall_seconds=report["wall_seconds"],
                               peak_rss_mb=report["peak_rss_mb"], compute_dtype=report["compute_dtype"],
                               lr=report["settings"]["lr"], heal_args=args.heal_args)
                    results[heal_key] = row
                    save()
    table = render(results, args, dense_dir)
    (out / "results.md").write_text(table)
    print(table)
    return 0


def render(results: dict, args, dense_dir: str) -> str:
    dense = results["dense"]
    target = DEFAULT_TARGET_PPL_RATIO * dense["perplexity"]
    lines = [f"Dense {args.model} ({dense_dir}): held-out perplexity {dense['perplexity']:.2f} on {args.eval_blocks} "
             f"blocks x {args.eval_seq_len} tokens" + (f", BIG-bench {100 * dense['bigbench']:.1f}%"
                                                         if "bigbench" in dense else "")
             + f"; tyr run's quality target: perplexity <= {target:.2f} (2x dense).", "",
             "| sparsity | method | heal tokens | mode | lr | ppl unhealed | ppl healed | healed/unhealed | KL unhealed | "
             "KL healed | Týr/uniform ppl (healed) | BIG-bench unhealed -> healed | train tok/s | train s | "
             "peak RSS MiB | meets 2x dense |", "|" + "---|" * 16]
    healed_rows = {k: v for k, v in results.items() if "+" in k}
    for row in healed_rows.values():
        before = results[row["unhealed"]]
        twin = next((v for v in healed_rows.values() if v["sparsity"] == row["sparsity"]
                     and v["tokens"] == row["tokens"] and v["lr"] == row["lr"] and v["mode"] == row["mode"]
                     and v["method"] == "uniform"),
                    None)
        versus = f"{row['perplexity'] / twin['perplexity']:.3f}" if twin and row["method"] == "tyr" else "-"
        bigbench = (f"{100 * before['bigbench']:.1f}% -> {100 * row['bigbench']:.1f}%"
                    if "bigbench" in row and "bigbench" in before else "-")
        lines.append(
            f"| {100 * row['sparsity']:g}% | {row['method']} | {row['tokens']:,} | {row['mode']} | {row['lr']:g} | "
            f"{before['perplexity']:.2f} | {row['perplexity']:.2f} | {row['perplexity'] / before['perplexity']:.3f} | "
            f"{before['kl']:.4f} | {row['kl']:.4f} | {versus} | {bigbench} | {row['tokens_per_s']:.0f} | "
            f"{row['train_seconds']:.0f} | {row['peak_rss_mb']:.0f} | "
            f"{'yes' if row['perplexity'] <= target else 'no'} (unhealed: "
            f"{'yes' if before['perplexity'] <= target else 'no'}) |")
    lines.append("")
    for sparsity in sorted({row["sparsity"] for row in healed_rows.values()}):
        tyr, uniform = results.get(f"tyr@{sparsity:g}"), results.get(f"uniform@{sparsity:g}")
        if tyr and uniform:
            lines.append(f"- {100 * sparsity:g}%, unhealed: Týr/uniform perplexity "
                         f"{tyr['perplexity'] / uniform['perplexity']:.3f}")
        for row in healed_rows.values():
            if row["method"] == "tyr" and row["sparsity"] == sparsity:
                ratio = row["perplexity"] / results[row["unhealed"]]["perplexity"]
                lines.append(f"- {100 * sparsity:g}%, Týr healed with {row['tokens']:,} tokens ({row['mode']}): "
                             f"lr {row['lr']:g}: perplexity {ratio:.3f}x unhealed (issue 16's target at 50%: at most "
                             f"{HEALED_TARGET_RATIO}x) -> {'met' if ratio <= HEALED_TARGET_RATIO else 'not met'}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
