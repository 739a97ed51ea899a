"""`tyr heal`: distil the dense model into a pruned folder to recover its quality; same widths, same format."""

from __future__ import annotations

import argparse

# Command-line flag -> HealSettings field, for the settings given on the command line.
_SETTINGS_FLAGS = ("tokens", "seq_len", "batch_sequences", "lora_rank", "lr", "temperature", "kl_top_k",
                   "hidden_weight", "eval_blocks", "seed")


def add_heal(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("pruned", metavar="PRUNED", help="pruned model folder (from tyr prune)")
    parser.add_argument("--teacher", default=None,
                        help="dense model to distil from: a folder, hub id or 'default' (default: the model PRUNED "
                             "was pruned from, as its prune_report.json records it)")
    parser.add_argument("--out", required=True, help="output folder for the healed model and its report")
    parser.add_argument("--work-dir", default=None,
                        help="checkpoints (default: <out>.work); rerunning the same command resumes from here")
    parser.add_argument("--tokens", type=int, default=None,
                        help="training tokens (default sized for about 10 minutes on two CPU cores for SmolLM2-135M)")
    parser.add_argument("--text", default=None,
                        help="training text: 'wiki' (default, embedded Wikipedia sample), a .txt or .jsonl file, or "
                             "a dataset id; only its calibration split is trained on, the validation split is held out")
    parser.add_argument("--lora-rank", type=int, default=None,
                        help="train LoRA adapters of this rank, merged into the weights at the end (default 0: "
                             "every parameter; use LoRA when AdamW state for the whole model does not fit)")
    parser.add_argument("--lr", type=float, default=None, help="peak learning rate (default 5e-4, LoRA 1e-3)")
    parser.add_argument("--temperature", type=float, default=None, help="distillation temperature (default 1)")
    parser.add_argument("--kl-top-k", type=int, default=None,
                        help="KL over the teacher's top-k tokens only (less memory); default: whole vocabulary")
    parser.add_argument("--hidden-weight", type=float, default=None,
                        help="add per-layer output matching with this weight (default 0: logits only)")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per training sequence (default 256)")
    parser.add_argument("--batch-sequences", type=int, default=None, help="sequences per step (default 4)")
    parser.add_argument("--eval-blocks", type=int, default=None,
                        help="held-out sequences for the periodic KL (default 8)")
    parser.add_argument("--seed", type=int, default=None, help="seed of the data order and LoRA initialisation")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing --out folder, and discard a work folder made with other inputs")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def run_heal(args: argparse.Namespace) -> int:
    """Heal a pruned model by distillation from its dense teacher (logit KL, AdamW; full or LoRA); resumable."""
    from pydantic import ValidationError

    from tyr.compressor.heal import HealSettings, heal
    from tyr.data import TextSource
    from tyr.errors import TyrError

    given = {name: getattr(args, name) for name in _SETTINGS_FLAGS if getattr(args, name) is not None}
    try:
        settings = HealSettings(**given, text=TextSource.parse(args.text))
    except ValidationError as err:
        problems = "; ".join(f"--{'-'.join(str(p) for p in e['loc']).replace('_', '-')}: {e['msg']}"
                             for e in err.errors())
        raise TyrError(f"bad heal settings: {problems}") from err
    result = heal(args.pruned, args.teacher, args.out, settings=settings, work_dir=args.work_dir, device=args.device,
                  overwrite=args.overwrite, progress=not args.no_progress)
    r = result.report
    print(f"healed {r.student} from {r.teacher} ({r.mode}, {r.trainable_params:,} trainable parameters): "
          f"{r.tokens:,} tokens in {r.train_seconds:.0f} s ({r.tokens_per_s:.0f} tokens/s)")
    print(f"  held-out KL {r.before.kl:.4f} -> {r.after.kl:.4f}, perplexity {r.before.perplexity:.2f} -> "
          f"{r.after.perplexity:.2f} (teacher {r.teacher_perplexity:.2f}); peak RSS {r.peak_rss_mb:.0f} MiB")
    print(f"model: {result.out_dir}\nreport: {result.report_paths.get('markdown')}")
    return 0
