"""Memory and disk of a streamed prune, measured beside what `tyr plan` predicts for it, in one run.

Two models, each pruned by `tyr prune` in its own process (so its peak RSS is its own):
  (a) the default SmolLM2-135M (stored in float32);
  (b) a synthetic Llama-shaped model of 1.2B parameters (TinyLlama's shape with SmolLM2's vocabulary), random
      weights saved in bfloat16 safetensors shards; it only has to be the size and layout of a real one.
Both use a small recipe (``--recipe``, default: `fast` with one coarse iteration, two short generations, no scans
and a 1024-token pool), since memory and disk, not quality, are measured. For every stage the table shows the
plan's host memory beside the peak RSS the prune report sampled, and for the run its peak disk and bytes written;
then the issue's targets: plan within 20% of measured, and for the 1B model a peak RSS of at most
0.5 x its bfloat16 size + 1 GB.

    .venv/bin/python benchmarks/bench_memory.py --out bench-memory
    .venv/bin/python benchmarks/bench_memory.py --out bench-memory --models smollm2     # the small one only

Not a timed test: the prunes take minutes on two cores; times are printed for reference only.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from bench_pruning import run_tyr, start

GB = 10 ** 9
# TinyLlama-1.1B's decoder with SmolLM2's tokenizer (so the real tokenizer and text calibrate it), untied.
SYNTHETIC = dict(hidden_size=2048, intermediate_size=5632, num_attention_heads=32, num_key_value_heads=4,
                 num_hidden_layers=22, max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=10000.0,
                 tie_word_embeddings=False, hidden_act="silu", model_type="llama", architectures=["LlamaForCausalLM"],
                 torch_dtype="bfloat16")
SMALL_RECIPE = {
    "name": "memory-bench", "description": "fast's supernet and fitness with a tiny search: memory, not quality",
    "iterations": 1, "initial_spacing": 0.125, "ladder_size": 9, "eea": "expectation",
    "calibration": {"num_sequences": 16, "seq_len": 256, "batch_sequences": 8},
    "local_pruner": {"damp": 0.01, "channel_step": 32, "refit": True, "ffn_multiple": 1},
    "search": {"generations": [2], "offspring": 4, "max_shifts": 4, "seq_len": 128, "batch_sequences": 1,
               "kl_top_k": 256, "stages": [{"tokens": 128, "survivors": 2}, {"tokens": 256, "survivors": 1}],
               "pool_tokens": 1024, "reuse_activations": True, "activation_cache_mb": 256,
               "weight_cache_mb": 384, "dtype": "auto", "scan_levels": 0},
}
# Plan stage -> the prune report's stages it covers.
STAGES = {"load model": ("load model", "calibration data"), "calibration + supernet": ("supernet",),
          "search": ("dense targets", "search"), "final build": ("assemble", "write model")}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench-memory", help="folder for the models, prunes and results")
    parser.add_argument("--models", nargs="+", default=["smollm2", "synthetic-1b"],
                        choices=["smollm2", "synthetic-1b"])
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--recipe", default=None, help="recipe file (default: the small recipe above)")
    parser.add_argument("--timeout", type=int, default=4 * 3600, help="seconds per prune")
    return parser.parse_args(argv)


def synthetic_model(folder: Path, tokenizer_dir: str) -> Path:
    """Write the synthetic 1B Llama once: bfloat16 shards of a few layers each, an index, config and tokenizer."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    if (folder / "model.safetensors.index.json").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    c = dict(SYNTHETIC, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
             eos_token_id=tokenizer.eos_token_id)
    h, f = c["hidden_size"], c["intermediate_size"]
    kv = c["num_key_value_heads"] * h // c["num_attention_heads"]
    generator = torch.Generator().manual_seed(0)

    def normal(*shape: int) -> torch.Tensor:      # std 1/sqrt(fan in): activations keep their scale
        return (torch.randn(*shape, generator=generator) / math.sqrt(shape[-1])).to(torch.bfloat16)

    shards = [{"model.embed_tokens.weight": normal(c["vocab_size"], h), "model.norm.weight": torch.ones(h).bfloat16(),
               "lm_head.weight": normal(c["vocab_size"], h)}]
    for i in range(c["num_hidden_layers"]):
        if i % 4 == 0:
            shards.append({})
        p = f"model.layers.{i}."
        shards[-1].update({p + "self_attn.q_proj.weight": normal(h, h), p + "self_attn.k_proj.weight": normal(kv, h),
                           p + "self_attn.v_proj.weight": normal(kv, h), p + "self_attn.o_proj.weight": normal(h, h),
                           p + "mlp.gate_proj.weight": normal(f, h), p + "mlp.up_proj.weight": normal(f, h),
                           p + "mlp.down_proj.weight": normal(h, f),
                           p + "input_layernorm.weight": torch.ones(h).bfloat16(),
                           p + "post_attention_layernorm.weight": torch.ones(h).bfloat16()})
    weight_map = {}
    for k, shard in enumerate(shards):
        name = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, folder / name, metadata={"format": "pt"})
        weight_map |= dict.fromkeys(shard, name)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps(c, indent=2))
    tokenizer.save_pretrained(folder)
    return folder


def measure(name: str, model_dir: Path, recipe_path: Path, args, out: Path) -> dict:
    """Prune in a subprocess (unless done) and put the plan beside the report's measurements."""
    from tyr.compressor.plan import plan_prune

    pruned = out / f"{name}-pruned"
    if not (pruned / "prune_report.json").is_file():
        run_tyr(["prune", "--model", str(model_dir), "--sparsity", str(args.sparsity), "--recipe", str(recipe_path),
                 "--out", str(pruned), "--no-progress", "--overwrite"], f"pruning {name}", args.timeout)
    report = json.loads((pruned / "prune_report.json").read_text())
    plan = plan_prune(model_dir / "config.json", recipe=recipe_path, sparsity=args.sparsity)
    planned = {s.name: s for s in plan.stages}
    stages = []
    for stage, names in STAGES.items():
        measured = [s["peak_rss_mb"] for s in report["stages"] if any(n in s["name"] for n in names)]
        stages.append({"stage": stage, "planned_host_mb": planned[stage].host_bytes / 2 ** 20,
                       "measured_rss_mb": max(measured) if measured else None,
                       "seconds": sum(s["seconds"] for s in report["stages"] if any(n in s["name"] for n in names))})
    weights = sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))
    return {"model": name, "params": plan.total_params, "weights_dtype": plan.weights_dtype, "weights_bytes": weights,
            "stages": stages,
            "peak_rss_mb": report["peak_rss_mb"],
            "planned_peak_host_mb": max(planned[stage].host_bytes for stage in STAGES) / 2 ** 20,
            "peak_disk_mb": report["peak_disk_mb"],
            "planned_peak_disk_mb": max(planned[stage].disk_bytes for stage in STAGES) / 2 ** 20,
            "bytes_written": report["bytes_written"],
            "planned_bytes_written": sum(planned[stage].written_bytes for stage in STAGES),
            "wall_seconds": report["wall_seconds"], "achieved_sparsity": report["achieved_sparsity"]}


def render(rows: list[dict]) -> str:
    lines = []
    for row in rows:
        bf16 = 2 * row["params"]
        lines += [f"## {row['model']}: {row['params'] / 1e9:.2f}B parameters, stored in {row['weights_dtype']} "
                  f"({row['weights_bytes'] / GB:.2f} GB), achieved sparsity {100 * row['achieved_sparsity']:.2f}%, "
                  f"{row['wall_seconds']:.0f} s", "",
                  "| stage | planned host MiB | measured peak RSS MiB | measured / planned | s |",
                  "|---|---:|---:|---:|---:|"]
        for s in row["stages"]:
            measured = s["measured_rss_mb"]
            ratio = f"{measured / s['planned_host_mb']:.2f}" if measured else "-"
            lines.append(f"| {s['stage']} | {s['planned_host_mb']:.0f} | {measured or 0:.0f} | {ratio} | "
                         f"{s['seconds']:.0f} |")
        checks = [("peak RSS (MiB)", row["peak_rss_mb"], row["planned_peak_host_mb"]),
                  ("peak disk (MiB)", row["peak_disk_mb"], row["planned_peak_disk_mb"]),
                  ("bytes written (MiB)", row["bytes_written"] / 2 ** 20, row["planned_bytes_written"] / 2 ** 20)]
        lines += ["", "| run | measured | planned | measured / planned | within 20% |", "|---|---:|---:|---:|---|"]
        lines += [f"| {what} | {m:.0f} | {p:.0f} | {m / p:.2f} | {'yes' if abs(m / p - 1) <= 0.2 else 'NO'} |"
                  for what, m, p in checks]
        ideal = (0.5 * bf16 + GB) / 2 ** 20
        lines += ["", f"peak RSS {row['peak_rss_mb']:.0f} MiB against 0.5 x bfloat16 size + 1 GB = {ideal:.0f} MiB: "
                  f"{row['peak_rss_mb'] / ideal:.2f}x ({'met' if row['peak_rss_mb'] <= ideal else 'NOT met'}); the "
                  f"dense model in bfloat16 alone is {bf16 / 2 ** 20:.0f} MiB, in float32 {2 * bf16 / 2 ** 20:.0f} MiB",
                  ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    out = start(args.out)
    from tyr.benchmarking.platform_info import detect_platform
    from tyr.models.io import resolve_model_path

    recipe_path = Path(args.recipe) if args.recipe else out / "recipe.json"
    if not args.recipe:
        recipe_path.write_text(json.dumps(SMALL_RECIPE, indent=2))
    default = resolve_model_path("default")
    folders = {"smollm2": Path(default), "synthetic-1b": out / "synthetic-1b"}
    rows = []
    for name in args.models:
        model_dir = synthetic_model(folders[name], default) if name == "synthetic-1b" else folders[name]
        rows.append(measure(name, model_dir, recipe_path, args, out))
    platform = detect_platform()
    text = (f"Platform: {platform.cpu_name}, {platform.cpu_count} CPUs, torch {platform.torch_version}\n\n"
            + render(rows))
    print(text)
    (out / "results.json").write_text(json.dumps(rows, indent=2))
    (out / "results.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
