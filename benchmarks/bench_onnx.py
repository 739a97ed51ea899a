"""Dense vs 50%-pruned SmolLM2-135M in onnxruntime on CPU: prefill and per-token decode latency.

Target: the pruned/dense speed-up reaches at least 90% of the ideal set by matmul parameters per token
(lm_head included). Until the real pruner's output is used, the pruned model is built with
tyr.exporters.onnx.magnitude (magnitude-chosen GQA-consistent heads and FFN channels, widths varying per layer,
50% of the decoder parameters): speed depends on the shapes, not on which channels are kept.

    .venv/bin/python benchmarks/bench_onnx.py --out runs/bench_onnx
    .venv/bin/python benchmarks/bench_onnx.py --pruned path/to/pruned_model   # a real pruned model instead

Runs alternate dense/pruned (ABAB...) at each thread count and report medians, because the machine may be
shared. Exports are reused from --work when present (delete it after changing the exporter).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dense", default="default", help="dense model folder (default: embedded SmolLM2-135M)")
    parser.add_argument("--pruned", default=None, help="pruned model folder (default: built by magnitude at --keep)")
    parser.add_argument("--keep", type=float, default=0.5, help="decoder parameter fraction of the built model")
    parser.add_argument("--work", default="runs/bench_onnx/work", help="model and export cache")
    parser.add_argument("--out", default="runs/bench_onnx", help="results folder")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--opt-level", default="all", help="onnxruntime graph optimization level of both exports")
    parser.add_argument("--compare-opt-levels", action="store_true",
                        help="also time every optimization level at one thread (where the speed-up comes from)")
    args = parser.parse_args(argv)

    from tyr.benchmarking.onnx_bench import bench_onnx, report_table, write_report
    from tyr.exporters.onnx.export import INFO_FILE, export_onnx
    from tyr.models.io import load_model, resolve_model_path, save_model

    work, out = Path(args.work), Path(args.out)
    pruned_dir = Path(args.pruned) if args.pruned else work / f"pruned{round(args.keep * 100)}"
    if args.pruned is None and not (pruned_dir / "config.json").is_file():
        from tyr.exporters.onnx.magnitude import magnitude_keeps
        from tyr.models.slicing import slice_model

        model, tokenizer = load_model(args.dense)
        save_model(slice_model(model, magnitude_keeps(model, keep=args.keep)), tokenizer, pruned_dir)
        del model
    exports = []
    for label, source in (("dense", resolve_model_path(args.dense)), ("pruned", str(pruned_dir))):
        target = work / f"onnx_{label}"
        if not (target / INFO_FILE).is_file():
            print(f"exporting {label} ({source}) to {target}", flush=True)
            result = export_onnx(source, target, opt_level=args.opt_level, overwrite=target.exists())
            print(f"  validation: max diff {result.validation.max_abs_diff:.2e}, "
                  f"agreement {result.validation.token_agreement:.0%}", flush=True)
        exports.append(target)

    threads = [int(t) for t in args.threads.split(",")]
    report = bench_onnx(exports, ["dense", "pruned"], threads=threads, opt_level=args.opt_level,
                        prompt_tokens=args.prompt_tokens, decode_tokens=args.decode_tokens, runs=args.runs,
                        warmup_runs=args.warmup)
    table = report_table(report)
    if args.compare_opt_levels:
        for level in ("disable", "basic", "extended"):
            level_report = bench_onnx(exports, ["dense", "pruned"], threads=[1], opt_level=level,
                                      prompt_tokens=args.prompt_tokens, decode_tokens=args.decode_tokens,
                                      runs=max(5, args.runs // 2), warmup_runs=1)
            table += "\n" + report_table(level_report)
    print(table)
    for comparison in report.comparisons:
        verdict = "meets" if min(comparison.prefill_vs_ideal, comparison.decode_vs_ideal) >= 0.9 else "MISSES"
        print(f"{comparison.threads} thread(s): measured prefill {comparison.prefill_speedup:.3f}x, decode "
              f"{comparison.decode_speedup:.3f}x; ideal {comparison.ideal_speedup:.3f}x; measured/ideal "
              f"{comparison.prefill_vs_ideal:.1%} / {comparison.decode_vs_ideal:.1%} -> {verdict} the 90% target")
    print(f"results: {write_report(report, table, out)}, {out / 'onnx_bench.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
