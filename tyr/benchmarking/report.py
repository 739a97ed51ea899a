"""Self-contained HTML reports (inline SVG plots, no external assets) for benchmark runs.

The selection report reuses the page, its table and plot helpers, and puts its own section first."""

from __future__ import annotations

import html
import io
from collections.abc import Sequence
from pathlib import Path

from matplotlib.figure import Figure

from tyr.atomic import atomic_write_text
from tyr.benchmarking.results import BenchResult, Percentiles

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


def html_table(headers: Sequence[str], rows: Sequence[Sequence]) -> str:
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


def plot_html(fig: Figure | None, missing: str) -> str:
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
    table = html_table(["model", "runtime", "matmul params", "sparsity", "TTFT p50 ms", "TTFT p99 ms", "ITL p50 ms",
                    "ITL p99 ms", "E2E p50 ms", "E2E p99 ms", "req/s", "online tok/s", "offline tok/s",
                    "speed-up"], rows)
    platforms = {r.platform.model_dump_json(): r.platform for r in results}
    platform_rows = [[p.accelerator, p.device_name, p.device_count, p.cpu_count, p.torch_version,
                      f"{p.vllm_distribution or ''} {p.vllm_version or '–'}", p.onnxruntime_version]
                     for p in platforms.values()]
    platform_table = html_table(["accelerator", "device", "devices", "CPUs", "torch", "vLLM", "onnxruntime"],
                            platform_rows)
    configs = "".join(f"<details><summary>{html.escape(r.label)}: settings used</summary><pre>"
                      f"{html.escape(r.model_dump_json(include={'config'}, indent=2))}</pre></details>"
                      for r in results)
    return (f"<h2>Results</h2>{table}<p class='note'>speed-up: headline output tokens/s (offline when measured, "
            f"else online) over {html.escape(str(base.label if base else '–'))}'s. ITL: gap between streamed "
            f"tokens. Sparsity: share of matmul parameters (lm_head included) removed.</p>"
            f"<h2>Platform</h2>{platform_table}{configs}")


def render_html(results: Sequence[BenchResult] = (), failures: Sequence = (), baseline: str | None = None,
                title: str = "tyr benchmark report", sections: Sequence[str] = ()) -> str:
    """The page: ``sections`` (HTML a caller renders, such as a selection) come before the results."""
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>", *sections]
    if results:
        parts.append(_results_section(results, baseline))
        parts.append("<h2>Latency percentiles per model</h2>"
                     + plot_html(latency_figure(results), "no latency measurements"))
        parts.append("<h2>Throughput vs sparsity</h2>"
                     + plot_html(throughput_figure(results, baseline), "no parameter counts to compute sparsity"))
    if failures:
        parts.append("<h2>Failures</h2>" + "".join(
            f"<h3>{html.escape(f.label)}</h3><pre>{html.escape(f.error)}</pre>" for f in failures))
    parts.append("</body></html>")
    return "".join(parts)


def write_html_report(path: str | Path, results: Sequence[BenchResult] = (), failures: Sequence = (),
                      baseline: str | None = None, title: str = "tyr benchmark report",
                      sections: Sequence[str] = ()) -> Path:
    return atomic_write_text(path, render_html(results, failures, baseline, title, sections))
