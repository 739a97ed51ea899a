"""Plain-text tables of benchmark results for the terminal."""

from __future__ import annotations

from collections.abc import Sequence

from tyr.benchmarking.results import BenchResult


def text_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(x)) for x in column) for column in zip(headers, *rows)]
    line = lambda cells: "  ".join(str(c).rjust(w) if i else str(c).ljust(w)  # noqa: E731
                                   for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(headers), line(["-" * w for w in widths]), *map(line, rows)])


def number_cell(value: float | None, fmt: str = ".1f") -> str:
    return "-" if value is None else format(value, fmt)


def bench_table(results: Sequence[BenchResult], baseline: str | None = None) -> str:
    if not results:
        return "(no results)"
    base = next((r for r in results if r.label == baseline), results[0])
    rows = []
    for r in results:
        lat, speed, base_speed = r.latency, r.output_tokens_per_s(), base.output_tokens_per_s()
        rows.append([r.label, number_cell(lat.ttft_ms and lat.ttft_ms.p50),
                     number_cell(lat.ttft_ms and lat.ttft_ms.p99), number_cell(lat.itl_ms and lat.itl_ms.p50),
                     number_cell(lat.e2e_ms and lat.e2e_ms.p50), number_cell(lat.e2e_ms and lat.e2e_ms.p99),
                     number_cell(r.throughput and r.throughput.requests_per_s, ".2f"),
                     number_cell(r.throughput and r.throughput.output_tokens_per_s),
                     number_cell(r.offline and r.offline.output_tokens_per_s),
                     number_cell(speed / base_speed if speed and base_speed else None, ".2f")])
    platform = results[0].platform
    header = (f"{results[0].runtime} on {platform.accelerator} ({platform.device_name}), "
              f"{platform.cpu_count} CPUs, vLLM {platform.vllm_version}, torch {platform.torch_version}\n")
    return header + text_table(["model", "TTFT p50 ms", "TTFT p99", "ITL p50 ms", "E2E p50 ms", "E2E p99",
                                "req/s", "online tok/s", "offline tok/s", "speed-up"], rows)
