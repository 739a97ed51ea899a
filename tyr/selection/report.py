"""A selection's reports: selection.json, candidates.csv, report.html (Pareto plot first, then any benchmark
results) and the terminal table."""

from __future__ import annotations

import csv
import html
import io
from collections.abc import Sequence
from pathlib import Path

from matplotlib.figure import Figure

from tyr.atomic import atomic_write_json, atomic_write_text
from tyr.benchmarking.report import html_table, plot_html, write_html_report
from tyr.benchmarking.results import BenchResult, flatten
from tyr.benchmarking.tables import number_cell, text_table
from tyr.selection.selection import Selection


def pareto_figure(selection: Selection) -> Figure:
    targets, ppl = selection.targets, selection.targets.metric == "perplexity"
    fig = Figure(figsize=(6.5, 4.2))
    ax = fig.subplots()

    def y(s) -> float:  # percent: perplexity increase or accuracy retention
        return s.quality_change * 100

    ax.scatter([s.speedup for s in selection.candidates], [y(s) for s in selection.candidates], color="#888",
               label="candidates", zorder=2)
    front = [next(s for s in selection.candidates if s.label == label) for label in selection.pareto_front]
    ax.plot([s.speedup for s in front], [y(s) for s in front], "-o", color="#1f77b4", label="Pareto front", zorder=3)
    for s in selection.candidates:
        ax.annotate(s.label, (s.speedup, y(s)), fontsize=7, textcoords="offset points", xytext=(4, 4))
    pick = selection.chosen or selection.closest
    if pick:
        s = next(c for c in selection.candidates if c.label == pick)
        ax.scatter([s.speedup], [y(s)], marker="*", s=250, color="#d62728" if selection.chosen else "#ff7f0e",
                   label="chosen" if selection.chosen else "closest (misses a target)", zorder=4)
    ax.axvline(targets.min_speedup, ls="--", color="#555", lw=1)
    ax.axhline((targets.max_ppl_increase if ppl else targets.min_accuracy_retention) * 100, ls="--", color="#555", lw=1)
    ax.set_xlabel(f"speed-up vs {selection.baseline} ({targets.runtime} output tokens/s)")
    ax.set_ylabel("perplexity increase (%)" if ppl else "accuracy retention (%)")
    if ppl:
        ax.invert_yaxis()  # up = better on both plots
    ax.set_title("Quality vs speed-up (dashed: targets)", fontsize=11)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def selection_section(selection: Selection) -> str:
    ppl = selection.targets.metric == "perplexity"
    verdict_class = "ok" if selection.chosen else "bad"
    rows = [[s.label, s.sparsity, s.target_sparsity, s.quality,
             f"{s.quality_change:+.1%}" if ppl else f"{s.quality_change:.1%}",
             s.tokens_per_s, f"{s.speedup:.2f}x", "yes" if s.meets_quality else "no",
             "yes" if s.meets_speed else "no", "yes" if s.on_front else "", s.shortfall]
            for s in sorted(selection.candidates, key=lambda s: s.speedup)]
    table = html_table(["model", "sparsity", "target", "perplexity" if ppl else "accuracy",
                        "ppl increase" if ppl else "retention", "tokens/s", "speed-up", "quality ok", "speed ok",
                        "Pareto", "shortfall"], rows)
    skipped = "".join(f"<li>{html.escape(k)}: {html.escape(v)}</li>" for k, v in selection.skipped.items())
    return (f"<h2>Selection</h2><p class='{verdict_class}'>{html.escape(selection.message)}</p>"
            f"{plot_html(pareto_figure(selection), '')}{table}"
            + (f"<p class='note'>Not scored:</p><ul>{skipped}</ul>" if skipped else ""))


def selection_table(selection: Selection) -> str:
    ppl = selection.targets.metric == "perplexity"
    rows = [[s.label + (" *" if s.label == selection.chosen else ""), number_cell(s.sparsity, ".2%"),
             number_cell(s.target_sparsity, ".2%"),
             f"{s.quality:.4g}", f"{s.quality_change:+.1%}" if ppl else f"{s.quality_change:.1%}",
             f"{s.speedup:.2f}x", "yes" if s.meets_quality else "no", "yes" if s.meets_speed else "no",
             "yes" if s.on_front else ""]
            for s in sorted(selection.candidates, key=lambda s: s.speedup)]
    return text_table(["model", "sparsity", "target", "perplexity" if ppl else "accuracy",
                       "ppl increase" if ppl else "retention",
                       "speed-up", "quality ok", "speed ok", "Pareto"], rows)


def write_selection_report(out_dir: str | Path, selection: Selection,
                           results: Sequence[BenchResult] = ()) -> dict[str, Path]:
    """selection.json, candidates.csv and report.html (Pareto plot + table) in out_dir."""
    out_dir = Path(out_dir)
    rows = [flatten(s) for s in selection.candidates]
    buffer = io.StringIO()
    if rows:
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return {"json": atomic_write_json(out_dir / "selection.json", selection.model_dump(mode="json")),
            "csv": atomic_write_text(out_dir / "candidates.csv", buffer.getvalue()),
            "html": write_html_report(out_dir / "report.html", results, baseline=selection.baseline,
                                      title="tyr select report", sections=[selection_section(selection)])}
