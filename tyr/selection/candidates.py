"""Gather `Measurement`s for `tyr select` from recorded files.

Accepted inputs (`--candidates`, any mix):
- a measurement JSON: one object {"label", "perplexity" and/or "accuracy", optional "model", "baseline",
  "sparsity", "tokens_per_s": {"vllm": .., "onnx": ..}}, a list of them, or {"measurements": [...]};
- a benchmark result JSON (tyr bench vllm|onnx: a result.json, or a run's results.json): its output tokens/s
  attaches to the measurement of the same model folder (or label), or makes a speed-only entry;
- a pruned model folder holding `measurement.json` (label and model default to the folder);
- any other folder: every *.json directly inside it, as above.

A model folder without measurements is not measured here: `tyr run` prunes, evaluates and benchmarks, and writes
the measurements this module reads.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Literal

from pydantic import ValidationError

from tyr.errors import TyrError
from tyr.benchmarking.results import BenchResult, is_bench_result
from tyr.selection.selection import Measurement

log = logging.getLogger(__name__)
MEASUREMENT_FILE = "measurement.json"
RUNTIME_KEYS = {"vllm": "vllm", "onnxruntime": "onnx"}  # BenchResult.runtime -> select's --runtime
SpeedSource = Literal["auto", "offline", "online"]


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise TyrError(f"cannot read {path}: {err}") from err


def _parse(data, where: str, measurements: list[Measurement], results: list[BenchResult],
           defaults: dict | None = None) -> None:
    if isinstance(data, list):
        for i, item in enumerate(data):
            _parse(item, f"{where}[{i}]", measurements, results, defaults)
        return
    if not isinstance(data, dict):
        raise TyrError(f"{where}: expected a measurement or benchmark result object, got {type(data).__name__}")
    for key in ("measurements", "candidates", "results"):
        if key in data and isinstance(data[key], list):
            _parse(data[key], f"{where}.{key}", measurements, results, defaults)
            return
    try:
        if is_bench_result(data):
            results.append(BenchResult.model_validate(data))
        else:
            measurements.append(Measurement.model_validate((defaults or {}) | data))
    except ValidationError as err:
        label = f" (candidate {data['label']!r})" if isinstance(data.get("label"), str) else ""
        kind = "benchmark result" if is_bench_result(data) else "measurement"
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']} (got {e['input']!r})" for e in err.errors())
        raise TyrError(f"{where}{label} is not a valid {kind}: {problems}") from err


def read_candidates(paths: list[str | Path], runtime: str = "vllm", speed_source: SpeedSource = "auto"
                    ) -> list[Measurement]:
    measurements: list[Measurement] = []
    results: list[BenchResult] = []
    for path in map(Path, paths):
        if path.is_file():
            _parse(_read_json(path), str(path), measurements, results)
        elif (path / "config.json").is_file():  # a model folder
            defaults = {"label": path.name, "model": str(path)}
            if (path / MEASUREMENT_FILE).is_file():
                _parse(_read_json(path / MEASUREMENT_FILE), str(path / MEASUREMENT_FILE), measurements, results,
                       defaults)
            else:
                raise TyrError(f"{path} is a model folder without {MEASUREMENT_FILE}: measure it first (tyr eval and "
                               f"tyr bench {runtime}), or let `tyr run` prune and measure")
        elif path.is_dir():
            files = sorted(path.glob("*.json"))
            if not files:
                raise TyrError(f"{path} holds no *.json measurements and is not a model folder")
            for file in files:
                _parse(_read_json(file), str(file), measurements, results)
        else:
            raise TyrError(f"candidate {path} does not exist")
    return merge_speeds(measurements, results, speed_source)


def _same_model(a: str | None, b: str | None) -> bool:
    return a is not None and b is not None and Path(a).resolve() == Path(b).resolve()


def merge_speeds(measurements: list[Measurement], results: list[BenchResult],
                 speed_source: SpeedSource = "auto") -> list[Measurement]:
    """Attach each benchmark result's output tokens/s to the measurement of the same model (folder, else label)."""
    merged = [m.model_copy(deep=True) for m in measurements]
    for result in sorted(results, key=lambda r: r.created_at):  # later measurements win
        speed = result.output_tokens_per_s(speed_source)
        if speed is None:
            log.warning("%s (%s) has no %s throughput: ignored", result.label, result.runtime, speed_source)
            continue
        runtime = RUNTIME_KEYS[result.runtime]
        target = (next((m for m in merged if _same_model(m.model, result.model)), None)
                  or next((m for m in merged if m.label == result.label), None))
        if target is None:
            target = Measurement(label=result.label, model=result.model)
            merged.append(target)
        target.tokens_per_s[runtime] = speed
        if target.matmul_params is None and result.params is not None:
            target.matmul_params = result.params.matmul
    return fill_sparsity(merged)


def fill_sparsity(measurements: list[Measurement]) -> list[Measurement]:
    """sparsity = 1 - matmul params / the baseline's, where not recorded and both counts are known."""
    base = next((m for m in measurements if m.baseline), None)
    if base is None or not base.matmul_params:
        return measurements
    for m in measurements:
        if m.sparsity is None and m.matmul_params is not None:
            m.sparsity = max(0.0, 1 - m.matmul_params / base.matmul_params)
    return measurements
