"""`tyr bench onnx`: prefill and per-token decode latency of exported models in onnxruntime, dense against pruned.

Each run is one prefill of ``prompt_tokens`` followed by ``decode_tokens`` cached decode steps per model, and the
models take turns at every call (prefill A, prefill B, step A, step B, ...; with more models A B C ...), so that
load from other processes hits every model alike. Medians over the runs are reported, and the median of the
per-run ratios (paired, less sensitive to slow drifts in machine load). The speed-up of a model over the first
(the baseline) is compared with the ideal set by matmul parameters per token (lm_head included; from the source
models' safetensors headers).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np
from pydantic import BaseModel

from tyr.atomic import atomic_write_json, atomic_write_text
from tyr.benchmarking.platform_info import detect_platform
from tyr.benchmarking.results import BenchResult, LatencyStats, param_counts, write_result, write_results_csv
from tyr.benchmarking.stats import summarize
from tyr.errors import TyrError
from tyr.exporters.onnx.export import load_export_info
from tyr.exporters.onnx.runner import OptLevel, OrtCausalLM


class ModelTiming(BaseModel):
    label: str
    export_dir: str
    source_model: str
    matmul_params: int | None
    provider: str = "CPUExecutionProvider"  # onnxruntime's execution provider that ran the session
    prefill_ms: list[float]  # one sample per run
    decode_ms_per_token: list[float]  # one sample (mean over the run's decode steps) per run

    @property
    def prefill_median_ms(self) -> float:
        return statistics.median(self.prefill_ms)

    @property
    def decode_median_ms(self) -> float:
        return statistics.median(self.decode_ms_per_token)


class SpeedComparison(BaseModel):
    """One model against the baseline at one thread count."""

    threads: int
    baseline: str
    model: str
    prefill_baseline_ms: float
    prefill_model_ms: float
    decode_baseline_ms: float
    decode_model_ms: float
    prefill_speedup: float  # baseline median / model median
    decode_speedup: float
    prefill_speedup_paired: float  # median over runs of baseline / model (same run)
    decode_speedup_paired: float
    ideal_speedup: float | None  # baseline matmul params / model matmul params
    prefill_vs_ideal: float | None  # measured / ideal
    decode_vs_ideal: float | None


class OnnxBenchReport(BaseModel):
    opt_level: str
    prompt_tokens: int
    decode_tokens: int
    runs: int
    warmup_runs: int
    timings: dict[int, list[ModelTiming]]  # threads -> per model
    comparisons: list[SpeedComparison]


class _Generation:
    """One greedy generation on one model, advanced a step at a time so that models can take turns."""

    def __init__(self, runner: OrtCausalLM, prompt: np.ndarray):
        self.runner, self.prompt = runner, prompt

    def prefill(self) -> float:
        self.mask = np.ones_like(self.prompt)
        positions = np.arange(self.prompt.shape[1], dtype=np.int64)[None]
        start = time.perf_counter()
        logits, self.past = self.runner.forward(self.prompt, self.mask, positions, self.runner.empty_past(1))
        elapsed = time.perf_counter() - start
        self.token = logits[:, -1].argmax(-1)[:, None]
        return elapsed

    def decode_step(self) -> float:
        self.mask = np.ones((1, self.mask.shape[1] + 1), dtype=np.int64)
        positions = np.array([[self.mask.shape[1] - 1]], dtype=np.int64)
        start = time.perf_counter()
        logits, self.past = self.runner.forward(self.token, self.mask, positions, self.past)
        elapsed = time.perf_counter() - start
        self.token = logits[:, -1].argmax(-1)[:, None]
        return elapsed


def _one_round(runners: list[OrtCausalLM], prompt: np.ndarray, decode_tokens: int) -> list[tuple[float, float]]:
    """(prefill seconds, mean seconds per decode step) per model; models alternate at every call (A B A B ...)."""
    generations = [_Generation(runner, prompt) for runner in runners]
    prefill = [g.prefill() for g in generations]
    decode = [0.0] * len(generations)
    for _ in range(decode_tokens):
        for i, g in enumerate(generations):
            decode[i] += g.decode_step()
    return [(p, d / decode_tokens) for p, d in zip(prefill, decode)]


def _matmul_params(source_model: str) -> int | None:
    try:
        return param_counts(source_model).matmul if Path(source_model).is_dir() else None
    except TyrError:
        return None


def time_models(export_dirs: list[Path], labels: list[str], threads: int, opt_level: OptLevel | None,
                prompt_tokens: int, decode_tokens: int, runs: int, warmup_runs: int,
                progress: bool = True) -> list[ModelTiming]:
    from tqdm import tqdm

    infos = [load_export_info(d) for d in export_dirs]
    runners = [OrtCausalLM(d / info.model_file, opt_level=opt_level or info.opt_level, threads=threads)
               for d, info in zip(export_dirs, infos)]
    vocab = min(info.layout.vocab_size for info in infos)
    prompt = np.random.default_rng(0).integers(0, vocab, (1, prompt_tokens), dtype=np.int64)
    samples: list[list[tuple[float, float]]] = [[] for _ in runners]
    for run in tqdm(range(warmup_runs + runs), desc=f"bench onnx, {threads} thread(s)", disable=not progress):
        for i, sample in enumerate(_one_round(runners, prompt, decode_tokens)):
            if run >= warmup_runs:
                samples[i].append(sample)
    return [ModelTiming(label=label, export_dir=str(d), source_model=info.source_model,
                        matmul_params=_matmul_params(info.source_model), provider=runner.provider,
                        prefill_ms=[round(p * 1e3, 4) for p, _ in s],
                        decode_ms_per_token=[round(t * 1e3, 4) for _, t in s])
            for label, d, info, runner, s in zip(labels, export_dirs, infos, runners, samples)]


def compare(timings: list[ModelTiming], threads: int) -> list[SpeedComparison]:
    base = timings[0]
    out = []
    for other in timings[1:]:
        ideal = (base.matmul_params / other.matmul_params
                 if base.matmul_params and other.matmul_params else None)
        prefill = base.prefill_median_ms / other.prefill_median_ms
        decode = base.decode_median_ms / other.decode_median_ms
        out.append(SpeedComparison(
            threads=threads, baseline=base.label, model=other.label, prefill_baseline_ms=base.prefill_median_ms,
            prefill_model_ms=other.prefill_median_ms, decode_baseline_ms=base.decode_median_ms,
            decode_model_ms=other.decode_median_ms, prefill_speedup=prefill, decode_speedup=decode,
            prefill_speedup_paired=statistics.median(a / b for a, b in zip(base.prefill_ms, other.prefill_ms)),
            decode_speedup_paired=statistics.median(
                a / b for a, b in zip(base.decode_ms_per_token, other.decode_ms_per_token)),
            ideal_speedup=ideal, prefill_vs_ideal=prefill / ideal if ideal else None,
            decode_vs_ideal=decode / ideal if ideal else None))
    return out


def bench_onnx(export_dirs: list[str | Path], labels: list[str] | None = None, threads: list[int] = (1,),
               opt_level: OptLevel | None = None, prompt_tokens: int = 128, decode_tokens: int = 32, runs: int = 15,
               warmup_runs: int = 2, progress: bool = True) -> OnnxBenchReport:
    """Time every export folder (the first is the baseline) at each thread count; see the module docstring."""
    dirs = [Path(d) for d in export_dirs]
    if len(dirs) < 1:
        raise TyrError("give at least one exported model (--model); the first is the baseline")
    labels = list(labels) if labels else [d.name for d in dirs]
    if len(labels) != len(dirs) or len(set(labels)) != len(labels):
        raise TyrError(f"need one distinct label per model, got {labels} for {len(dirs)} models")
    if prompt_tokens < 1 or decode_tokens < 1 or runs < 1 or warmup_runs < 0:
        raise TyrError("prompt_tokens, decode_tokens and runs must be >= 1 and warmup_runs >= 0")
    timings: dict[int, list[ModelTiming]] = {}
    comparisons: list[SpeedComparison] = []
    for count in threads:
        timings[count] = time_models(dirs, labels, count, opt_level, prompt_tokens, decode_tokens, runs,
                                     warmup_runs, progress)
        comparisons += compare(timings[count], count)
    return OnnxBenchReport(opt_level=opt_level or "from export_info.json", prompt_tokens=prompt_tokens,
                           decode_tokens=decode_tokens, runs=runs, warmup_runs=warmup_runs, timings=timings,
                           comparisons=comparisons)


def bench_results(report: OnnxBenchReport) -> list[BenchResult]:
    """One BenchResult per (model, thread count): prefill as ttft, decode step as tpot."""
    platform = detect_platform()
    results = []
    for threads, timings in report.timings.items():
        for t in timings:
            results.append(BenchResult(
                model=t.export_dir, label=f"{t.label}@{threads}t", runtime="onnxruntime", platform=platform,
                latency=LatencyStats(ttft_ms=summarize(t.prefill_ms), tpot_ms=summarize(t.decode_ms_per_token)),
                config={"threads": threads, "opt_level": report.opt_level, "prompt_tokens": report.prompt_tokens,
                        "decode_tokens": report.decode_tokens, "runs": report.runs, "batch_size": 1,
                        "source_model": t.source_model, "matmul_params": t.matmul_params, "provider": t.provider,
                        "ttft_means": "prefill latency", "tpot_means": "decode latency per token"}))
    return results


def write_report(report: OnnxBenchReport, table: str, out: Path) -> Path:
    """Each model's result.json (the BenchResult format `tyr bench vllm` writes too), results.csv, and the report
    as onnx_bench.json and onnx_bench.md (``table``) under ``out``; returns the JSON's path."""
    results = bench_results(report)
    for result in results:
        write_result(result, out / result.label.replace("@", "-") / "result.json")
    write_results_csv(results, out / "results.csv")
    atomic_write_text(out / "onnx_bench.md", table)
    return atomic_write_json(out / "onnx_bench.json", report.model_dump(mode="json"))


def report_table(report: OnnxBenchReport) -> str:
    """Markdown: medians per model and thread count, then measured vs ideal speed-ups."""
    lines = [f"ONNX Runtime, batch 1, prompt {report.prompt_tokens} tokens, {report.decode_tokens} decode steps, "
             f"median of {report.runs} runs (models alternating at every call), opt level {report.opt_level}", "",
             "| threads | model | provider | matmul params | prefill ms | decode ms/token |", "|---|---|---|---|---|---|"]
    for threads, timings in report.timings.items():
        for t in timings:
            params = f"{t.matmul_params / 1e6:.1f} M" if t.matmul_params else "?"
            lines.append(f"| {threads} | {t.label} | {t.provider} | {params} | {t.prefill_median_ms:.1f} | "
                         f"{t.decode_median_ms:.2f} |")
    lines += ["", "| threads | model vs baseline | prefill speed-up | decode speed-up | ideal | prefill/ideal | "
              "decode/ideal | paired prefill / decode |", "|---|---|---|---|---|---|---|---|"]
    for c in report.comparisons:
        ideal = f"{c.ideal_speedup:.3f}" if c.ideal_speedup else "?"
        pv = f"{c.prefill_vs_ideal:.1%}" if c.prefill_vs_ideal else "?"
        dv = f"{c.decode_vs_ideal:.1%}" if c.decode_vs_ideal else "?"
        lines.append(f"| {c.threads} | {c.model} vs {c.baseline} | {c.prefill_speedup:.3f}x | "
                     f"{c.decode_speedup:.3f}x | {ideal}x | {pv} | {dv} | "
                     f"{c.prefill_speedup_paired:.3f}x / {c.decode_speedup_paired:.3f}x |")
    return "\n".join(lines) + "\n"
