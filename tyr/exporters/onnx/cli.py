"""`tyr export onnx` and `tyr bench onnx`."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from tyr.errors import TyrError
from tyr.exporters.onnx.runner import OPT_LEVELS
from tyr.exporters.onnx.variants import DTYPES


def add_export(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="model folder (dense Llama/Mistral/Qwen2/Qwen3 or pruned by tyr), .gguf file, "
                                      "hub id, or 'default'")
    parser.add_argument("out", help="output folder (must not exist unless --overwrite)")
    parser.add_argument("--dtype", default="fp32", help=f"one of {', '.join(DTYPES)} (default fp32)")
    parser.add_argument("--opt-level", default="all",
                        help=f"onnxruntime graph optimization level written to genai_config.json and used by "
                             f"validation and benchmarks: one of {', '.join(OPT_LEVELS)} (default all)")
    parser.add_argument("--external-data", action="store_true",
                        help="store the weights in one model.onnx.data file even below 2 GiB (automatic above)")
    parser.add_argument("--no-check", action="store_true", help="skip validation against PyTorch")
    parser.add_argument("--steps", type=int, default=32, help="cached decode steps checked by validation")
    parser.add_argument("--atol", type=float, default=1e-4, help="fp32 max |logits diff| bound (default 1e-4)")
    parser.add_argument("--strict", action="store_true",
                        help="fp32: fail above --atol even when PyTorch fp32 itself is that far from fp64")
    parser.add_argument("--min-agreement", type=float, default=None,
                        help="fp16/int8: least greedy-token agreement with PyTorch (default 0.9 fp16, 0.75 int8)")
    parser.add_argument("--no-genai-check", action="store_true", help="skip the onnxruntime-genai generation check")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    parser.add_argument("--trust-remote-code", action="store_true", help="allow model code from a hub folder")


def run_export(args: argparse.Namespace) -> int:
    """Export a dense or pruned model to ONNX (onnxruntime and onnxruntime-genai), validated against PyTorch."""
    from tyr.exporters.onnx.export import export_onnx

    if args.dtype not in DTYPES:
        raise TyrError(f"unsupported --dtype {args.dtype!r}: choose one of {', '.join(DTYPES)}")
    if args.opt_level not in OPT_LEVELS:
        raise TyrError(f"unknown --opt-level {args.opt_level!r}: choose one of {', '.join(OPT_LEVELS)}")
    if args.steps < 1:
        raise TyrError(f"--steps must be at least 1, got {args.steps}")
    result = export_onnx(args.model, args.out, dtype=args.dtype, opt_level=args.opt_level, check=not args.no_check,
                         external_data=True if args.external_data else None, overwrite=args.overwrite,
                         validate_steps=args.steps, atol=args.atol, min_agreement=args.min_agreement,
                         check_genai=not args.no_genai_check, strict=args.strict,
                         trust_remote_code=args.trust_remote_code)
    print(f"wrote {result.model_path} ({result.folder_bytes / 2**20:.1f} MiB folder, {result.dtype}, "
          f"{len(result.layout.kv_layers)}/{result.layout.num_layers} layers with a KV cache) "
          f"in {result.export_seconds:.0f} s")
    if result.validation is not None:
        v = result.validation
        print(f"validation passed: prefill max diff {v.prefill_max_abs_diff:.2e}, decode max diff "
              f"{v.decode_max_abs_diff:.2e}, greedy agreement {v.token_agreement:.1%}, "
              f"onnxruntime-genai {'identical' if v.genai_tokens_match else 'not checked'}\n  rule: {v.rule}")
    return 0


def add_bench(parser: argparse.ArgumentParser) -> None:
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


def run_bench(args: argparse.Namespace) -> int:
    """Prefill and decode latency of ONNX exports in onnxruntime: dense vs pruned, measured vs ideal speed-up."""
    from tyr.exporters.onnx.bench import bench_onnx, report_table, write_report
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
