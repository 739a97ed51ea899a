"""`tyr export onnx`."""

from __future__ import annotations

import argparse

from tyr.errors import TyrError
from tyr.exporters.onnx.runner import OPT_LEVELS
from tyr.exporters.onnx.variants import DTYPES


def add_export(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="model folder (dense Llama/Mistral/Qwen2/Qwen3/Gemma 3 or pruned by tyr), "
                                      ".gguf file, hub id, 'default' or 'gemma3-270m'")
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
