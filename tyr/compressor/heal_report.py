"""The record of one healing run, written next to the healed model: heal_report.json (the data), heal_report.md
(readable) and heal_curve.png (training loss, held-out KL and perplexity against training tokens)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from tyr.atomic import atomic_write_json, atomic_write_text

if TYPE_CHECKING:
    from tyr.compressor.heal import HealReport

REPORT_JSON, REPORT_MD, REPORT_PNG = "heal_report.json", "heal_report.md", "heal_curve.png"


def write_heal_report(report: HealReport, directory: str | Path) -> dict[str, Path]:
    directory = Path(directory)
    paths = {"json": directory / REPORT_JSON, "markdown": directory / REPORT_MD, "plot": directory / REPORT_PNG}
    atomic_write_json(paths["json"], report.model_dump(mode="json"))
    atomic_write_text(paths["markdown"], render_markdown(report))
    plot_curve(report, paths["plot"])
    return paths


def plot_curve(report: HealReport, path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (loss_ax, kl_ax) = plt.subplots(1, 2, figsize=(10.0, 4.0))
    loss_ax.plot([r.tokens for r in report.history], [r.loss for r in report.history], linewidth=1)
    loss_ax.set_xlabel("training tokens")
    loss_ax.set_ylabel("distillation loss (training batches)")
    tokens = [h.tokens for h in report.held_out]
    kl_ax.plot(tokens, [h.kl for h in report.held_out], marker="o", color="tab:red", label="KL to teacher")
    kl_ax.set_xlabel("training tokens")
    kl_ax.set_ylabel("held-out KL to the teacher (nats/token)", color="tab:red")
    ppl_ax = kl_ax.twinx()
    ppl_ax.plot(tokens, [h.perplexity for h in report.held_out], marker="s", color="tab:blue")
    ppl_ax.axhline(report.teacher_perplexity, color="tab:blue", linestyle="--", linewidth=1)
    ppl_ax.set_ylabel("held-out perplexity (dashed: teacher)", color="tab:blue")
    fig.suptitle(f"healing ({report.mode}): KL {report.before.kl:.3f} -> {report.after.kl:.3f}, perplexity "
                 f"{report.before.perplexity:.2f} -> {report.after.perplexity:.2f}")
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path


def render_markdown(report: HealReport) -> str:
    s = report.settings
    mode = f"LoRA rank {s.lora_rank} (alpha {s.lora_alpha:g}), merged" if s.lora_rank else "full-parameter"
    lines = ["# Healing report", "",
             f"- student `{report.student}` -> `{report.out_dir}`; teacher `{report.teacher}`",
             f"- {mode}: {report.trainable_params:,} trainable of {report.student_params:,} parameters",
             f"- {report.steps} steps x {s.batch_sequences} x {s.seq_len} = {report.tokens:,} tokens from "
             f"{report.text_source} (calibration split, {report.train_blocks} sequences); held-out: "
             f"{s.eval_blocks} x {s.seq_len} tokens of the validation split",
             f"- AdamW lr {s.lr:g} (warm-up {100 * s.warmup_fraction:g}%, cosine to {s.min_lr_ratio:g}x), "
             f"temperature {s.temperature:g}, KL over "
             + (f"the teacher's top {s.kl_top_k}" if s.kl_top_k else "the whole vocabulary")
             + (f", per-layer output matching x {s.hidden_weight:g}" if s.hidden_weight else ""),
             f"- device {report.device}, autocast {report.compute_dtype}, seed {s.seed}"
             + (f"; resumed from step {report.resumed_from_step}" if report.resumed_from_step else ""),
             f"- training {report.train_seconds:.1f} s ({report.tokens_per_s:.0f} tokens/s), wall "
             f"{report.wall_seconds:.1f} s, peak RSS {report.peak_rss_mb:.0f} MiB"
             + (f", peak GPU {report.peak_gpu_mb:.0f} MiB" if report.peak_gpu_mb is not None else ""), "",
             "## Held-out", "",
             f"Teacher perplexity {report.teacher_perplexity:.2f}.", "",
             f"![curve]({REPORT_PNG})", "",
             "| step | tokens | KL to teacher | perplexity |", "|---|---|---|---|"]
    for h in report.held_out:
        lines.append(f"| {h.step} | {h.tokens:,} | {h.kl:.4f} | {h.perplexity:.2f} |")
    lines += ["", f"After / before: KL {report.after.kl / report.before.kl:.3f}x, perplexity "
              f"{report.after.perplexity / report.before.perplexity:.3f}x."]
    return "\n".join(lines) + "\n"
