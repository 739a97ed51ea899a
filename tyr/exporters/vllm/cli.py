"""`tyr export vllm MODEL OUT`: write a folder vLLM serves, checked against transformers."""

from __future__ import annotations

import argparse


def add_export(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="pruned (tyr_llama, tyr_qwen2, tyr_qwen3, tyr_gemma3) or dense "
                                      "Llama/Mistral/Qwen2/Qwen3/Gemma 3 folder, .gguf file, 'default' or "
                                      "'gemma3-270m'")
    parser.add_argument("out", help="folder to write (must not exist unless --overwrite)")
    parser.add_argument("--format", dest="fmt", choices=("tyr", "deci"), default="tyr",
                        help="tyr: served through tyr's vLLM plugin (any widths); deci: DeciLM/nemotron-nas block "
                             "configs for stock vLLM with --trust-remote-code (all query heads kept)")
    parser.add_argument("--no-check", dest="check", action="store_false",
                        help="skip loading the folder in vLLM and comparing greedy tokens with transformers")
    parser.add_argument("--max-new-tokens", type=int, default=16, help="greedy tokens per prompt in the check")
    parser.add_argument("--prompt", action="append", dest="prompts", metavar="TEXT",
                        help="check prompt (repeatable; default: a fixed set of 8)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    parser.add_argument("--timeout", type=float, default=1200, help="seconds allowed for the vLLM check")


def run_export(args: argparse.Namespace) -> int:
    """Export a model as a folder that vLLM serves (checked: same greedy tokens in vLLM and transformers)."""
    from tyr.exporters.vllm.check import format_table
    from tyr.exporters.vllm.export import RESULT_FILE, export_vllm

    result = export_vllm(args.model, args.out, check=args.check, fmt=args.fmt, overwrite=args.overwrite,
                         prompts=args.prompts, max_new_tokens=args.max_new_tokens, timeout=args.timeout)
    print(f"wrote {result.out_dir} ({result.fmt} format, {result.architecture}, "
          f"{len(result.layer_widths)} layers)")
    if result.check is not None:
        print(f"check: vLLM {result.check.vllm_version} on {result.check.device} built {result.check.model_class}; "
              f"KV cache in {len(result.check.kv_cache_layers)} layers; greedy tokens agree with transformers:")
        print(format_table(result.check))
    print(f"details: {result.out_dir}/{RESULT_FILE}")
    print(f"serve:   {result.serve_command}")
    print(f"tensor parallel (--tensor-parallel-size): {', '.join(map(str, result.tensor_parallel_sizes))}")
    if result.fmt == "tyr" and not result.transformers_backend:
        print("note: some layers have no attention, so only vLLM with tyr installed serves this folder "
              "(vLLM's Transformers backend needs an attention in every layer)")
    return 0
