"""The common benchmark result format, written by `tyr bench vllm` and `tyr bench onnx` alike (JSON + CSV).

One `BenchResult` per (model, runtime) measurement. Latency fields are in milliseconds, throughput in per-second
units; anything a runtime cannot measure stays None (an offline ONNX loop has no time to first token over HTTP).
"""

from __future__ import annotations

import csv
import io
import json
import math
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

from tyr.atomic import atomic_write_json, atomic_write_text
from tyr.benchmarking.platform_info import PlatformInfo
from tyr.errors import TyrError
from tyr.models.facts import tensor_shapes

SCHEMA_VERSION = 1
Runtime = Literal["vllm", "onnxruntime"]


class Percentiles(BaseModel):
    """Summary of one latency distribution (milliseconds)."""

    count: int = Field(ge=0)
    mean: float
    p50: float
    p90: float
    p99: float


class LatencyStats(BaseModel):
    ttft_ms: Percentiles | None = None  # request sent -> first output token received
    itl_ms: Percentiles | None = None  # gap between consecutive streamed tokens (inter-token latency)
    tpot_ms: Percentiles | None = None  # per request: (e2e - ttft) / (output tokens - 1)
    e2e_ms: Percentiles | None = None  # request sent -> last token received


class Throughput(BaseModel):
    """Served (online) throughput under a bounded load."""

    duration_s: float = Field(gt=0)
    completed_requests: int = Field(ge=0)
    failed_requests: int = Field(ge=0)
    requests_per_s: float = Field(ge=0)
    output_tokens_per_s: float = Field(ge=0, allow_inf_nan=False)
    concurrency: int | None = None  # simulated users


class OfflineThroughput(BaseModel):
    """Batch generation throughput through the runtime's offline API (vllm.LLM, an ONNX generate loop...)."""

    num_prompts: int = Field(gt=0)
    prompt_tokens: int = Field(ge=0)  # per prompt
    output_tokens: int = Field(gt=0)  # total generated
    elapsed_s: float = Field(gt=0)  # of the median batch
    output_tokens_per_s: float = Field(gt=0, allow_inf_nan=False)
    requests_per_s: float = Field(gt=0)
    batch_seconds: list[float] = Field(default_factory=list, description="every timed batch, in order")
    via: str = Field("offline API", description="'offline API', or 'server': one batched request to the running "
                                                "server")


class ParamCounts(BaseModel):
    total: int = Field(ge=0)  # every stored parameter once (tied embeddings counted once)
    matmul: int = Field(ge=0)  # weights used in matrix multiplies per token, lm_head included
    lm_head: int = Field(ge=0)
    embedding: int = Field(ge=0)


class BenchResult(BaseModel):
    schema_version: int = SCHEMA_VERSION
    model: str  # model folder (or exported artefact) that was measured
    label: str  # short name for tables and plots
    runtime: Runtime
    platform: PlatformInfo
    params: ParamCounts | None = None
    latency: LatencyStats = Field(default_factory=LatencyStats)
    throughput: Throughput | None = None
    offline: OfflineThroughput | None = None
    config: dict[str, Any] = Field(default_factory=dict)  # the validated settings used, as given
    created_at: str = Field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))

    def output_tokens_per_s(self, source: Literal["auto", "offline", "online"] = "auto") -> float | None:
        """Headline speed: offline batch throughput when measured (least noisy), else the served one."""
        offline = self.offline.output_tokens_per_s if self.offline else None
        online = self.throughput.output_tokens_per_s if self.throughput else None
        if source == "offline":
            return offline
        if source == "online":
            return online
        return offline if offline is not None else online


# ---- parameter counts from the weight files' shapes (no tensor is loaded) ----

def _is_embedding(name: str) -> bool:
    return "embed_tokens" in name or name.endswith(("wte.weight", "word_embeddings.weight"))


def param_counts(model_dir: str | Path) -> ParamCounts:
    """Parameter counts of a model folder from its safetensors headers only.

    matmul = every 2-D weight except the input embedding (a lookup, not a matmul), plus the lm_head; with tied
    embeddings (no lm_head tensor stored) the lm_head multiply uses the embedding matrix, so it counts that.
    """
    shapes = tensor_shapes(model_dir)
    numel = {name: math.prod(shape) for name, shape in shapes.items()}
    embedding = sum(n for name, n in numel.items() if _is_embedding(name))
    lm_head = sum(n for name, n in numel.items() if name.endswith("lm_head.weight"))
    matmul = sum(n for name, n in numel.items()
                 if len(shapes[name]) == 2 and name.endswith(".weight") and not _is_embedding(name))
    if lm_head == 0:  # tied: logits = hidden @ embedding^T
        lm_head = embedding
        matmul += embedding
    return ParamCounts(total=sum(numel.values()), matmul=matmul, lm_head=lm_head, embedding=embedding)


def matmul_params(model_dir: str | Path) -> int:
    """Matmul parameters per token (lm_head included), read from safetensors headers without loading tensors."""
    return param_counts(model_dir).matmul


# ---- JSON and CSV ----

def write_result(result: BenchResult, path: str | Path) -> Path:
    return atomic_write_json(path, result.model_dump(mode="json"))


def load_result(path: str | Path) -> BenchResult:
    path = Path(path)
    try:
        return BenchResult.model_validate_json(path.read_text())
    except (OSError, ValueError) as err:
        raise TyrError(f"{path} is not a tyr benchmark result: {err}") from err


def is_bench_result(data: Any) -> bool:
    return isinstance(data, dict) and "runtime" in data and "platform" in data and "model" in data


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists become JSON strings so a CSV cell holds them."""
    if isinstance(data, BaseModel):
        data = data.model_dump(mode="json")
    if isinstance(data, dict):
        flat: dict[str, Any] = {}
        for key, value in data.items():
            flat.update(flatten(value, f"{prefix}{key}."))
        return flat
    key = prefix[:-1]
    return {key: json.dumps(data) if isinstance(data, list) else data}


def results_csv(results: list[BenchResult]) -> str:
    rows = [flatten(r) for r in results]
    columns: list[str] = []
    for row in rows:
        columns += [c for c in row if c not in columns]
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def write_results_csv(results: list[BenchResult], path: str | Path) -> Path:
    return atomic_write_text(path, results_csv(results))
