"""Self-contained HTML reports (inline SVG plots, no external assets) for benchmark runs and selections."""

from __future__ import annotations

import html
import io
from collections.abc import Sequence
from pathlib import Path

from matplotlib.figure import Figure

from tyr.atomic import atomic_write_json, atomic_write_text
from tyr.serving.results import BenchResult, Percentiles, flatten
from tyr.serving.selection import Selection

PERCENTILES = ("p50", "p90", "p99")
LATENCIES = (("ttft_ms", "time to first token"), ("itl_ms", "inter-token latency"), ("e2e_ms", "end-to-end latency"))

CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 24px; color: #222; max-width: 1150px; }
h1 { font-size: 22px; } h2 { font-size: 18px; margin-top: 32px; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 13px; margin: 8px 0; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: right; }
th { background: #f3f3f3; } td:first-child, th:first-child { text-align: left; }
.plot svg { max-width: 100%; height: auto; } .note { color: #555; font-size: 13px; }
.ok { color: #17692d; font-weight: bold; } .bad { color: #a11; font-weight: bold; }
pre { background: #f7f7f7; padding: 8px; font-size: 12px; overflow-x: auto; }
"""


def figure_svg(fig: Figure) -> str:
    buffer = io.StringIO()
    fig.savefig(buffer, format="svg", bbox_inches="tight")
    text = buffer.getvalue()
    return text[text.index("<svg"):]  # drop the XML prolog and DOCTYPE: the SVG is inlined in HTML


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 100 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return html.escape(str(value))


def _table(headers: Sequence[str], rows: Sequence[Sequence]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def sparsities(results: Sequence[BenchResult], baseline: str | None) -> dict[str, float | None]:
    """1 - matmul params / the baseline's (the first result when no baseline label is given)."""
    base = next((r for r in results if r.label == baseline), results[0] if results else None)
    if base is None or base.params is None or base.params.matmul == 0:
        return {r.label: None for r in results}
    return {r.label: (1 - r.params.matmul / base.params.matmul) if r.params else None for r in results}


def latency_figure(results: Sequence[BenchResult]) -> Figure | None:
    measured = [r for r in results if any(getattr(r.latency, key) for key, _ in LATENCIES)]
    if not measured:
        return None
    fig = Figure(figsize=(11, 3.6))
    axes = fig.subplots(1, len(LATENCIES))
    width = 0.8 / len(measured)
    for ax, (key, title) in zip(axes, LATENCIES):
        for i, result in enumerate(measured):
            stats: Percentiles | None = getattr(result.latency, key)
            values = [getattr(stats, p) if stats else 0.0 for p in PERCENTILES]
            ax.bar([x + i * width for x in range(len(PERCENTILES))], values, width, label=result.label)
        ax.set_xticks([x + width * (len(measured) - 1) / 2 for x in range(len(PERCENTILES))], PERCENTILES)
        ax.set_title(title, fontsize=10)
        ax.set_ylabel("ms")
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    return fig


def throughput_figure(results: Sequence[BenchResult], baseline: str | None) -> Figure | None:
    sparsity = sparsities(results, baseline)
    points = [(sparsity[r.label], r) for r in results if sparsity[r.label] is not None]
    if not points:
        return None
    fig = Figure(figsize=(6.5, 4))
    ax = fig.subplots()
    for source, marker in (("online", "o"), ("offline", "s")):
        series = sorted((s, r.output_tokens_per_s(source), r.label) for s, r in points
                        if r.output_tokens_per_s(source) is not None)
        if series:
            ax.plot([p[0] for p in series], [p[1] for p in series], marker=marker, label=f"{source} ({results[0].runtime})")
            for s, value, label in series:
                ax.annotate(label, (s, value), fontsize=7, textcoords="offset points", xytext=(4, 4))
    ax.set_xlabel("sparsity (1 - matmul params / baseline)")
    ax.set_ylabel("output tokens/s")
    ax.set_title("Throughput vs sparsity", fontsize=11)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


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


def _plot(fig: Figure | None, missing: str) -> str:
    if fig is None:
        return f'<p class="note">{html.escape(missing)}</p>'
    return f'<div class="plot">{figure_svg(fig)}</div>'


def _results_section(results: Sequence[BenchResult], baseline: str | None) -> str:
    sparsity = sparsities(results, baseline)
    base = next((r for r in results if r.label == baseline), results[0] if results else None)
    base_speed = base.output_tokens_per_s() if base else None
    rows = []
    for r in results:
        lat, speed = r.latency, r.output_tokens_per_s()
        rows.append([r.label, r.runtime, r.params.matmul if r.params else None, sparsity[r.label],
                     lat.ttft_ms.p50 if lat.ttft_ms else None, lat.ttft_ms.p99 if lat.ttft_ms else None,
                     lat.itl_ms.p50 if lat.itl_ms else None, lat.itl_ms.p99 if lat.itl_ms else None,
                     lat.e2e_ms.p50 if lat.e2e_ms else None, lat.e2e_ms.p99 if lat.e2e_ms else None,
                     r.throughput.requests_per_s if r.throughput else None,
                     r.throughput.output_tokens_per_s if r.throughput else None,
                     r.offline.output_tokens_per_s if r.offline else None,
                     speed / base_speed if speed and base_speed else None])
    table = _table(["model", "runtime", "matmul params", "sparsity", "TTFT p50 ms", "TTFT p99 ms", "ITL p50 ms",
                    "ITL p99 ms", "E2E p50 ms", "E2E p99 ms", "req/s", "online tok/s", "offline tok/s",
                    "speed-up"], rows)
    platforms = {r.platform.model_dump_json(): r.platform for r in results}
    platform_rows = [[p.accelerator, p.device_name, p.device_count, p.cpu_count, p.torch_version,
                      f"{p.vllm_distribution or ''} {p.vllm_version or '–'}", p.onnxruntime_version]
                     for p in platforms.values()]
    platform_table = _table(["accelerator", "device", "devices", "CPUs", "torch", "vLLM", "onnxruntime"],
                            platform_rows)
    configs = "".join(f"<details><summary>{html.escape(r.label)}: settings used</summary><pre>"
                      f"{html.escape(r.model_dump_json(include={'config'}, indent=2))}</pre></details>"
                      for r in results)
    return (f"<h2>Results</h2>{table}<p class='note'>speed-up: headline output tokens/s (offline when measured, "
            f"else online) over {html.escape(str(base.label if base else '–'))}'s. ITL: gap between streamed "
            f"tokens. Sparsity: share of matmul parameters (lm_head included) removed.</p>"
            f"<h2>Platform</h2>{platform_table}{configs}")


def _selection_section(selection: Selection) -> str:
    ppl = selection.targets.metric == "perplexity"
    verdict_class = "ok" if selection.chosen else "bad"
    rows = [[s.label, s.sparsity, s.quality, f"{s.quality_change:+.1%}" if ppl else f"{s.quality_change:.1%}",
             s.tokens_per_s, f"{s.speedup:.2f}x", "yes" if s.meets_quality else "no",
             "yes" if s.meets_speed else "no", "yes" if s.on_front else "", s.shortfall]
            for s in sorted(selection.candidates, key=lambda s: s.speedup)]
    table = _table(["model", "sparsity", "perplexity" if ppl else "accuracy",
                    "ppl increase" if ppl else "retention", "tokens/s", "speed-up", "quality ok", "speed ok",
                    "Pareto", "shortfall"], rows)
    skipped = "".join(f"<li>{html.escape(k)}: {html.escape(v)}</li>" for k, v in selection.skipped.items())
    return (f"<h2>Selection</h2><p class='{verdict_class}'>{html.escape(selection.message)}</p>"
            f"{_plot(pareto_figure(selection), '')}{table}"
            + (f"<p class='note'>Not scored:</p><ul>{skipped}</ul>" if skipped else ""))


def render_html(results: Sequence[BenchResult] = (), failures: Sequence = (), baseline: str | None = None,
                selection: Selection | None = None, title: str = "tyr benchmark report") -> str:
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>"]
    if selection is not None:
        parts.append(_selection_section(selection))
    if results:
        parts.append(_results_section(results, baseline))
        parts.append("<h2>Latency percentiles per model</h2>" + _plot(latency_figure(results), "no latency measurements"))
        parts.append("<h2>Throughput vs sparsity</h2>"
                     + _plot(throughput_figure(results, baseline), "no parameter counts to compute sparsity"))
    if failures:
        parts.append("<h2>Failures</h2>" + "".join(
            f"<h3>{html.escape(f.label)}</h3><pre>{html.escape(f.error)}</pre>" for f in failures))
    parts.append("</body></html>")
    return "".join(parts)


def write_html_report(path: str | Path, results: Sequence[BenchResult] = (), failures: Sequence = (),
                      baseline: str | None = None, selection: Selection | None = None,
                      title: str = "tyr benchmark report") -> Path:
    return atomic_write_text(path, render_html(results, failures, baseline, selection, title))


def write_selection_report(out_dir: str | Path, selection: Selection,
                           results: Sequence[BenchResult] = ()) -> dict[str, Path]:
    """selection.json, candidates.csv and report.html (Pareto plot + table) in out_dir."""
    import csv

    out_dir = Path(out_dir)
    rows = [flatten(s) for s in selection.candidates]
    buffer = io.StringIO()
    if rows:
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return {"json": atomic_write_json(out_dir / "selection.json", selection.model_dump(mode="json")),
            "csv": atomic_write_text(out_dir / "candidates.csv", buffer.getvalue()),
            "html": write_html_report(out_dir / "report.html", results, selection=selection,
                                      baseline=selection.baseline, title="tyr select report")}
