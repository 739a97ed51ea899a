"""`tyr eval`: perplexity, KL to a dense reference and BIG-bench multiple choice of one model."""

from __future__ import annotations

import argparse
from pathlib import Path

from tyr.errors import TyrError


def add_eval(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="default",
                        help="model folder, .gguf file, hub id, 'default' (the embedded SmolLM2-135M-Instruct) "
                             "or 'gemma3-270m'")
    parser.add_argument("--reference", default=None,
                        help="dense reference model (folder, hub id or 'default'): adds KL(reference || model)")
    parser.add_argument("--text", default=None,
                        help="held-out text: 'wiki' (default, embedded Wikipedia sample), a .txt or .jsonl file, "
                             "or a dataset id (name or name:config; needs `datasets` and the hub)")
    parser.add_argument("--text-field", default="text", help="field holding the text in .jsonl / datasets")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per perplexity block")
    parser.add_argument("--blocks", type=int, default=32,
                        help="validation blocks for perplexity and KL (0 skips them)")
    parser.add_argument("--tasks", default="all",
                        help="BIG-bench tasks: 'all', 'none' or comma-separated names (task file stems)")
    parser.add_argument("--bigbench-dir", default=None,
                        help="folder of BIG-bench task .json files (default: $TYR_BIGBENCH_DIR, else the "
                             "four tasks shipped with tyr)")
    parser.add_argument("--limit", type=int, default=100, help="examples per task (a seeded sample; 0 = all)")
    parser.add_argument("--seed", type=int, default=0, help="seed for block and example sampling")
    parser.add_argument("--batch-size", type=int, default=4, help="blocks per forward pass for perplexity")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="dtype of the weights and activations (log-probs are always float32)")
    parser.add_argument("--trust-remote-code", action="store_true", help="allow model code from the hub folder")
    parser.add_argument("--out", default=None,
                        help="write the result as JSON here (and a Markdown table beside it, .md)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def run_eval(args: argparse.Namespace) -> int:
    """Evaluate a model: perplexity (and KL to a dense reference) on held-out text, BIG-bench multiple choice."""
    import torch

    from tyr.data import TextSource
    from tyr.device import resolve_device
    from tyr.evaluation.run import evaluate_model
    from tyr.models.io import load_model

    for name in ("seq_len", "blocks", "limit", "batch_size"):
        minimum = 2 if name == "seq_len" else (1 if name == "batch_size" else 0)
        if getattr(args, name) < minimum:
            raise TyrError(f"--{name.replace('_', '-')} must be at least {minimum}, got {getattr(args, name)}")
    if args.blocks == 0 and args.tasks.strip().lower() == "none":
        raise TyrError("nothing to evaluate: --blocks 0 and --tasks none")
    if args.reference and args.blocks == 0:
        raise TyrError("--reference needs perplexity blocks for the KL (--blocks > 0)")
    device = resolve_device(args.device)
    dtype = getattr(torch, args.dtype)
    out = Path(args.out) if args.out else None
    if out is not None and out.is_dir():
        raise TyrError(f"--out {out} is a directory; give a file name such as {out / 'results.json'}")
    if out is not None:
        from tyr.atomic import check_output_path

        check_output_path(out, folder=False)

    # Fail on a bad text source, task name or task folder before loading any model.
    source = TextSource.parse(args.text, text_field=args.text_field)
    if args.tasks.strip().lower() != "none":
        from tyr.evaluation.bigbench import default_bigbench_dir, load_task, resolve_task_names

        args.bigbench_dir = args.bigbench_dir or str(default_bigbench_dir())
        for name in resolve_task_names(args.tasks, args.bigbench_dir):
            load_task(Path(args.bigbench_dir) / f"{name}.json", limit=args.limit or None, seed=args.seed)

    model, tokenizer = load_model(args.model, dtype=dtype, device=device, trust_remote_code=args.trust_remote_code)
    reference = None
    if args.reference:
        reference, _ = load_model(args.reference, dtype=dtype, device=device,
                                  trust_remote_code=args.trust_remote_code)
    try:
        result = evaluate_model(model, tokenizer, model_name=_describe(args.model), reference_model=reference,
                                reference_name=_describe(args.reference) if args.reference else None,
                                text=source, seq_len=args.seq_len, num_blocks=args.blocks, tasks=args.tasks,
                                bigbench_dir=args.bigbench_dir, limit=args.limit or None, seed=args.seed,
                                batch_size=args.batch_size, progress=not args.no_progress)
    except ValueError as err:  # e.g. too little text for the requested blocks
        raise TyrError(str(err)) from err
    print(result.to_text())
    if out is not None:
        from tyr.atomic import atomic_write_text

        markdown = out.with_suffix(".md") if out.suffix != ".md" else out.with_name(out.name + ".md")
        result.write(out)
        atomic_write_text(markdown, result.to_markdown())
        print(f"wrote {out} and {markdown}")
    return 0


def _describe(spec: str | None) -> str:
    from tyr.models.default import NAMED_MODELS

    if spec is None or spec in NAMED_MODELS:
        name = spec or "default"
        return f"{name} ({NAMED_MODELS[name].folder})"
    path = Path(spec).expanduser()
    return str(path.resolve()) if path.exists() else spec
