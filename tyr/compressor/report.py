"""The record of one pruning run: per-layer widths and sparsity, budget check, search history, time and memory.

Written next to the pruned model as prune_report.json (the data), prune_report.md (readable) and
prune_sparsity.png (per-layer attention and MLP sparsity).
"""

from __future__ import annotations

import contextlib
import resource
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from pydantic import BaseModel, Field

from tyr.atomic import atomic_write_json, atomic_write_text
from tyr.compressor.search import BudgetRepair, GenerationRecord, PoolScore, WarmStart

REPORT_JSON, REPORT_MD, REPORT_PNG = "prune_report.json", "prune_report.md", "prune_sparsity.png"


class StageTiming(BaseModel):
    name: str
    seconds: float
    peak_rss_mb: float = Field(description="highest resident set size of this process during the stage")
    peak_gpu_mb: float | None = Field(None, description="torch.cuda.max_memory_allocated during the stage")
    peak_disk_mb: float | None = Field(None, description="largest size of the run's work and output folders during "
                                       "the stage (sampled about every second and at its end)")


class LayerReport(BaseModel):
    layer: int
    heads: int
    kv_heads: int
    ffn: int
    attn_params: int
    mlp_params: int
    attn_sparsity: float = Field(description="1 - attention parameters / the input model's")
    mlp_sparsity: float = Field(description="1 - MLP parameters / the input model's")
    attn_level: float | None = Field(None, description="the searched (nominal) level, when a search ran")
    mlp_level: float | None = None


class IterationReport(BaseModel):
    iteration: int
    spacing: float
    generations: int
    start_fitness: float = Field(description="KL of the iteration's start distribution on the whole selection pool")
    fitness: float = Field(description="KL of the iteration's result on the whole selection pool")
    history: list[GenerationRecord]
    supernet_seconds: float
    search_seconds: float
    resumed_from_generation: int = 0
    module_evaluations: int = 0
    module_evaluations_without_reuse: int = 0
    activation_reuse_saving: float = Field(0.0, description="share of decoder-module evaluations avoided by "
                                           "restarting offspring from the parent's cached hidden states")
    fitness_seconds: float = 0.0
    fitness_dtype: str = Field("float32", description="compute dtype of the fitness forward (recipe search.dtype)")
    warm_start: WarmStart | None = Field(None, description="the sensitivity scan before the search, if the recipe "
                                         "asks for one")
    rescans: list[WarmStart] = Field([], description="later scans from the parent (search.scan_every)")
    pool_scores: list[PoolScore] = Field([], description="the parent's KL on the whole pool every "
                                         "search.pool_rescore_every generations, when set")
    start_sparsity: float | None = Field(None, description="real sparsity (share of decoder parameters removed) of "
                                         "the distribution the search started from, after any budget repair")
    budget_repair: BudgetRepair | None = Field(None, description="the level moves that brought the start into the "
                                               "real-parameter band (None: it was already in it)")
    achieved_sparsity: float | None = Field(None, description="real sparsity of the iteration's result")
    selected: bool = Field(False, description="this iteration's result is the output (lowest KL of all iterations, "
                           "all measured on the same selection tokens)")


class PruneReport(BaseModel):
    method: str
    model: str
    out_dir: str
    target_sparsity: float
    achieved_sparsity: float = Field(description="1 - decoder parameters (attention + MLP, norms included) / dense: "
                                     "the sparsity in real parameters")
    nominal_sparsity: float | None = Field(None, description="Σ dense_params · searched level / Σ dense_params "
                                           "(levels before rounding to whole heads and channels)")
    budget_tolerance: float | None = Field(None, description="the search kept the achieved sparsity within target ± "
                                           "this (recipe search.budget_tolerance; None: no search)")
    dense_decoder_params: int
    pruned_decoder_params: int
    dense_total_params: int
    pruned_total_params: int
    recipe: dict | None = None
    seed: int
    device: str
    text_source: str
    calibration_tokens: int = 0
    selection_tokens: int = 0
    layers: list[LayerReport]
    iterations: list[IterationReport] = []
    stages: list[StageTiming] = []
    wall_seconds: float = 0.0
    peak_rss_mb: float = 0.0
    peak_gpu_mb: float | None = None
    peak_disk_mb: float | None = Field(None, description="largest size of the work and output folders")
    bytes_written: int | None = Field(None, description="bytes written to disk by the run (supernets, checkpoints, "
                                      "search state, the output model; this report itself excluded), counted by "
                                      "the code that writes them")
    notes: list[str] = []


# ----- time and memory per stage -----

def _rss_mb() -> float:
    try:
        import psutil

        return psutil.Process().memory_info().rss / 2 ** 20
    except ImportError:  # pragma: no cover - psutil ships with the environment
        return max_rss_mb()


def max_rss_mb() -> float:
    """The process's peak resident set size so far (ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2 ** 20 if sys.platform == "darwin" else peak / 2 ** 10


class StageMeter:
    """Collects one StageTiming per ``with meter.stage(name):`` block (RSS sampled every 0.2 s in a thread)."""

    def __init__(self, device: str = "cpu", folders: tuple[Path, ...] = ()):
        self.stages: list[StageTiming] = []
        self.cuda = str(device).startswith("cuda")
        self.folders = folders      # their size on disk is sampled too (every fifth RSS sample)

    def _disk_mb(self) -> float | None:
        from tyr.atomic import tree_bytes

        return sum(tree_bytes(f) for f in self.folders) / 2 ** 20 if self.folders else None

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        import torch

        peak, disk = [_rss_mb()], [self._disk_mb()]
        done = threading.Event()

        def sample():
            ticks = 0
            while not done.wait(0.2):
                peak[0] = max(peak[0], _rss_mb())
                ticks += 1
                if self.folders and ticks % 5 == 0:
                    disk[0] = max(disk[0], self._disk_mb())

        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        try:
            yield
        finally:
            done.set()
            thread.join()
            peak[0] = max(peak[0], _rss_mb())
            if self.folders:
                disk[0] = max(disk[0], self._disk_mb())
            gpu = torch.cuda.max_memory_allocated() / 2 ** 20 if self.cuda else None
            self.stages.append(StageTiming(name=name, seconds=time.perf_counter() - started, peak_rss_mb=peak[0],
                                           peak_gpu_mb=gpu, peak_disk_mb=disk[0]))


# ----- writing -----

def write_report(report: PruneReport, directory: str | Path) -> dict[str, Path]:
    """Write JSON, Markdown and the sparsity plot into ``directory``; return their paths."""
    directory = Path(directory)
    paths = {"json": directory / REPORT_JSON, "markdown": directory / REPORT_MD, "plot": directory / REPORT_PNG}
    atomic_write_json(paths["json"], report.model_dump(mode="json"))
    atomic_write_text(paths["markdown"], render_markdown(report))
    plot_sparsity(report, paths["plot"])
    return paths


def plot_sparsity(report: PruneReport, path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = [r.layer for r in report.layers]
    width = 0.4
    fig, ax = plt.subplots(figsize=(max(6.0, 0.28 * len(layers) + 2), 4.0))
    ax.bar([x - width / 2 for x in layers], [100 * r.attn_sparsity for r in report.layers], width, label="attention")
    ax.bar([x + width / 2 for x in layers], [100 * r.mlp_sparsity for r in report.layers], width, label="MLP")
    ax.axhline(100 * report.target_sparsity, color="black", linestyle="--", linewidth=1, label="target")
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("sparsity (%)")
    ax.set_ylim(0, 105)
    ax.set_title(f"{report.method}: {100 * report.achieved_sparsity:.1f}% of decoder parameters removed")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=3, fontsize=8, frameon=False)
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path


def render_markdown(report: PruneReport) -> str:
    return "\n".join(_summary(report) + _search_section(report) + _stages_section(report)
                     + _layers_section(report)) + "\n"


def _summary(report: PruneReport) -> list[str]:
    lines = [f"# Pruning report: {report.method}", "",
             f"- model: `{report.model}` -> `{report.out_dir}`",
             f"- sparsity achieved {100 * report.achieved_sparsity:.2f}% of decoder parameters removed (target "
             f"{100 * report.target_sparsity:.2f}%"
             + (f" ± {100 * report.budget_tolerance:.2f} pp" if report.budget_tolerance is not None else "")
             + (f"; searched levels' nominal {100 * report.nominal_sparsity:.2f}%"
                if report.nominal_sparsity is not None else "") + ")",
             f"- decoder parameters {report.dense_decoder_params:,} -> {report.pruned_decoder_params:,}; all "
             f"parameters {report.dense_total_params:,} -> {report.pruned_total_params:,}",
             f"- recipe `{(report.recipe or {}).get('name', '-')}`, seed {report.seed}, device {report.device}, "
             f"text {report.text_source}",
             f"- calibration tokens {report.calibration_tokens:,}, selection tokens {report.selection_tokens:,}",
             f"- wall time {report.wall_seconds:.1f} s, peak RSS {report.peak_rss_mb:.0f} MiB"
             + (f", peak GPU {report.peak_gpu_mb:.0f} MiB" if report.peak_gpu_mb is not None else ""),
             *([f"- disk: peak {report.peak_disk_mb:.1f} MiB used, {report.bytes_written / 2 ** 20:.1f} MiB written"]
               if report.peak_disk_mb is not None and report.bytes_written is not None else []), ""]
    lines += [f"> {note}" for note in report.notes]
    return lines + ([""] if report.notes else [])


def _search_section(report: PruneReport) -> list[str]:
    if not report.iterations:
        return []
    lines = ["## Search", "", "| iteration | spacing | generations | sparsity start | sparsity end | KL start (pool) | "
             "KL end (pool) | reuse saving | supernet s | search s | fitness dtype | output |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for it in report.iterations:
        lines.append(f"| {it.iteration} | {100 * it.spacing:.4g}% | {it.generations} | {_percent(it.start_sparsity)} | "
                     f"{_percent(it.achieved_sparsity)} | {it.start_fitness:.4f} | "
                     f"{it.fitness:.4f} | {100 * it.activation_reuse_saving:.1f}% | {it.supernet_seconds:.1f} | "
                     f"{it.search_seconds:.1f} | {it.fitness_dtype} | {'yes' if it.selected else ''} |")
    for it in report.iterations:
        if it.budget_repair is not None:
            r = it.budget_repair
            lines.append(f"- iteration {it.iteration}: the start removed {100 * r.before:.3f}% of the decoder "
                         f"parameters (levels rounded to whole heads and channels); {len(r.moves)} level moves "
                         f"brought it to {100 * r.after:.3f}%: " + ", ".join(r.moves))
    for it in report.iterations:
        for w in ([it.warm_start] if it.warm_start is not None else []) + it.rescans:
            lines.append(_scan_line(it.iteration, w))
    for it in report.iterations:
        if it.pool_scores:
            best = min(it.pool_scores, key=lambda score: score.fitness)
            values = ", ".join(f"{score.generation}: {score.fitness:.4f}" for score in it.pool_scores)
            lines.append(f"- iteration {it.iteration} parent's KL on the pool by generation: {values}; the "
                         f"result is the parent after generation {best.generation}")
    lines += ["", "Sparse KL to the dense model per generation (the winner's, on that generation's fresh last-stage "
              "tokens; the pool values above compare across iterations):", ""]
    for it in report.iterations:
        lines.append(f"- iteration {it.iteration}: " + ", ".join(f"{h.fitness:.4f}" for h in it.history))
    return lines + [""]


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def _scan_line(iteration: int, w: WarmStart) -> str:
    tried = ", ".join(f"{p.fitness:.4f} (penalty {p.penalty:.2g}, {p.moved} modules moved)" for p in w.proposals)
    where = f"scan after generation {w.generation}" if w.generation else "warm start"
    return (f"- iteration {iteration} {where}: {w.scanned} single-module moves scored on {w.tokens:,} tokens in "
            f"{w.seconds:.1f} s; KL (pool) of the parent {w.start_fitness:.4f}, of the additive optima "
            f"{tried or '-'}; the search goes on from "
            + (f"optimum {w.chosen + 1}" if w.chosen is not None else "the parent"))


def _stages_section(report: PruneReport) -> list[str]:
    lines = ["## Stages", "", "| stage | seconds | peak RSS MiB | peak GPU MiB | peak disk MiB |",
             "|---|---|---|---|---|"]
    for s in report.stages:
        gpu = f"{s.peak_gpu_mb:.0f}" if s.peak_gpu_mb is not None else "-"
        disk = f"{s.peak_disk_mb:.1f}" if s.peak_disk_mb is not None else "-"
        lines.append(f"| {s.name} | {s.seconds:.1f} | {s.peak_rss_mb:.0f} | {gpu} | {disk} |")
    return lines


def _layers_section(report: PruneReport) -> list[str]:
    lines = ["", "## Layers", "", f"![per-layer sparsity]({REPORT_PNG})", "",
             "| layer | heads | kv heads | ffn | attn params | mlp params | attn sparsity | mlp sparsity |",
             "|---|---|---|---|---|---|---|---|"]
    for r in report.layers:
        lines.append(f"| {r.layer} | {r.heads} | {r.kv_heads} | {r.ffn} | {r.attn_params:,} | {r.mlp_params:,} | "
                     f"{100 * r.attn_sparsity:.1f}% | {100 * r.mlp_sparsity:.1f}% |")
    return lines
