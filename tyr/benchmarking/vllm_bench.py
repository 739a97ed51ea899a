"""`tyr bench vllm`: serve each model with vLLM, load it with locust, measure offline throughput, report.

Models run one after another (one engine at a time). Each model's result is written to OUT/<label>/result.json as
soon as it is measured and the run summary (results.json, results.csv, report.html) is rewritten after every
model, so a crash or Ctrl-C on a later model keeps the earlier ones. A model whose server crashes is recorded as
a failure with the tail of its log and the run goes on; the command then exits non-zero.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from pydantic import BaseModel, Field

from tyr.atomic import atomic_write_json
from tyr.benchmarking.config import BenchConfig
from tyr.benchmarking.load import first_errors, run_load
from tyr.benchmarking.offline import batch_through_server, run_offline_throughput
from tyr.benchmarking.platform_info import PlatformInfo, detect_platform
from tyr.benchmarking.prompts import random_prompts
from tyr.benchmarking.results import BenchResult, load_result, param_counts, write_result, write_results_csv
from tyr.benchmarking.server import ServerError, VLLMServer, http_get, log_tail
from tyr.errors import TyrError
from tyr.models.facts import check_tensor_parallel, folder_layer_widths

log = logging.getLogger(__name__)


class BenchFailure(BaseModel):
    model: str
    label: str
    error: str


class BenchRun(BaseModel):
    """Everything one `tyr bench` invocation measured; the first model is the baseline for ratios."""

    results: list[BenchResult] = Field(default_factory=list)
    failures: list[BenchFailure] = Field(default_factory=list)
    baseline: str | None = None  # label


def model_labels(models: list[str | Path]) -> list[str]:
    """Folder names, made unique with a numeric suffix."""
    labels: list[str] = []
    for model in models:
        base = Path(model).name or str(model)
        label, n = base, 2
        while label in labels:
            label, n = f"{base}-{n}", n + 1
        labels.append(label)
    return labels


def warm_up(base_url: str, model_name: str, prompt: list[int], requests: int, timeout: float) -> None:
    import urllib.request

    body = json.dumps({"model": model_name, "prompt": prompt, "max_tokens": 4, "temperature": 0.0}).encode()
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    for _ in range(requests):
        request = urllib.request.Request(f"{base_url}/v1/completions", data=body,
                                         headers={"Content-Type": "application/json"})
        with opener.open(request, timeout=timeout) as response:
            response.read()


def _served_model_name(base_url: str) -> str:
    status, body = http_get(f"{base_url}/v1/models", timeout=10)
    if status != 200:
        raise TyrError(f"{base_url}/v1/models answered HTTP {status}: is it an OpenAI-compatible server?")
    models = json.loads(body).get("data") or []
    if not models:
        raise TyrError(f"{base_url} serves no model")
    return models[0]["id"]


def bench_vllm_model(model_dir: str | Path, label: str, config: BenchConfig, out_dir: str | Path,
                     platform: PlatformInfo, server_url: str | None = None) -> BenchResult:
    """Measure one model; `server_url` targets an already running server instead of starting one."""
    model_dir, model_out = Path(model_dir), Path(out_dir) / label
    model_out.mkdir(parents=True, exist_ok=True)
    params = param_counts(model_dir)
    load_prompts = random_prompts(model_dir, config.load.num_prompts, config.load.prompt_tokens, config.load.seed)
    used = config.model_dump(mode="json")
    used["engine"] = {"dtype": config.server.resolved_dtype(platform.accelerator),  # what "auto" and None became
                      "eager": config.server.eager(platform.accelerator)}
    offline = None
    if server_url is None:
        with VLLMServer(model_dir, model_out / "server.log", config.server, platform.accelerator) as server:
            warm_up(server.base_url, server.model_name, load_prompts[0], config.load.warmup_requests,
                    config.load.request_timeout_s)
            latency, throughput = run_load(server.base_url, server.model_name, load_prompts, config.load, model_out)
            server.check_alive()
            used["server_startup_s"] = server.startup_s
            if throughput.completed_requests == 0:
                raise ServerError(f"no request to {label} completed: {first_errors(model_out / 'load_records.json')}"
                                  f"\nLast lines of {server.log_path}:\n{log_tail(server.log_path)}")
            if config.offline.enabled and config.offline.via == "server":
                offline = batch_through_server(server.base_url, server.model_name, _offline_batches(model_dir, config),
                                               config.offline.output_tokens, config.offline.timeout_s)
                server.check_alive()
    else:
        name = _served_model_name(server_url)
        warm_up(server_url, name, load_prompts[0], config.load.warmup_requests, config.load.request_timeout_s)
        latency, throughput = run_load(server_url, name, load_prompts, config.load, model_out, allow_remote=True)
        used["server_url"] = server_url  # platform below describes this client machine, not that server
        if throughput.completed_requests == 0:
            raise TyrError(f"no request to {server_url} completed: {first_errors(model_out / 'load_records.json')}")
        if config.offline.enabled and config.offline.via == "server":
            offline = batch_through_server(server_url, name, _offline_batches(model_dir, config),
                                           config.offline.output_tokens, config.offline.timeout_s)
    if config.offline.enabled and config.offline.via == "engine" and server_url is None:
        offline_prompts = random_prompts(model_dir, config.offline.num_prompts, config.offline.prompt_tokens,
                                         config.offline.seed + 1)
        offline = run_offline_throughput(model_dir, offline_prompts, config.offline, config.server,
                                         platform.accelerator, model_out)
    result = BenchResult(model=str(model_dir), label=label, runtime="vllm", platform=platform, params=params,
                         latency=latency, throughput=throughput, offline=offline, config=used)
    write_result(result, model_out / "result.json")
    return result


def _offline_batches(model_dir: Path, config: BenchConfig) -> list[list[list[int]]]:
    """`repeats` batches of distinct prompts (the server's prefix cache stays on)."""
    offline = config.offline
    prompts = random_prompts(model_dir, offline.num_prompts * offline.repeats, offline.prompt_tokens, offline.seed + 1)
    return [prompts[i:i + offline.num_prompts] for i in range(0, len(prompts), offline.num_prompts)]


def bench_vllm(models: list[str | Path], config: BenchConfig, out_dir: str | Path, labels: list[str] | None = None,
               server_url: str | None = None) -> BenchRun:
    """Benchmark every model in turn (the first is the baseline); failures are recorded, not raised."""
    out_dir = Path(out_dir)
    labels = labels or model_labels(models)
    if len(labels) != len(models):
        raise TyrError(f"{len(labels)} labels for {len(models)} models")
    if server_url is not None and len(models) != 1:
        raise TyrError("an explicit --host serves one model: pass exactly one --model with it")
    for model in models:
        if not (Path(model) / "config.json").is_file():
            raise TyrError(f"{model} is not a model folder (no config.json)")
        if config.server.tensor_parallel_size > 1:  # a broken model otherwise fails alone, in its own server
            check_tensor_parallel(folder_layer_widths(model), config.server.tensor_parallel_size, str(model))
    out_dir.mkdir(parents=True, exist_ok=True)
    platform = detect_platform()
    log.info("platform: %s (%s), vLLM %s, torch %s, %d CPUs", platform.accelerator, platform.device_name,
             platform.vllm_version, platform.torch_version, platform.cpu_count)
    run = BenchRun(baseline=labels[0])
    for model, label in zip(models, labels):
        try:
            run.results.append(bench_vllm_model(model, label, config, out_dir, platform, server_url))
            log.info("%s: measured", label)
        except TyrError as err:  # ServerError included; KeyboardInterrupt is not caught
            log.error("%s failed: %s", label, err)
            run.failures.append(BenchFailure(model=str(model), label=label, error=str(err)))
        write_run(run, out_dir)
    return run


def write_run(run: BenchRun, out_dir: str | Path) -> dict[str, Path]:
    """results.json (results + failures), results.csv (one row per result) and report.html."""
    from tyr.benchmarking.report import write_html_report

    out_dir = Path(out_dir)
    paths = {"json": atomic_write_json(out_dir / "results.json", run.model_dump(mode="json")),
             "csv": write_results_csv(run.results, out_dir / "results.csv")}
    paths["html"] = write_html_report(out_dir / "report.html", run.results, failures=run.failures,
                                      baseline=run.baseline)
    return paths


def load_run(path: str | Path) -> BenchRun:
    """Read a results.json of `tyr bench` (a run), or a single result.json."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise TyrError(f"cannot read {path}: {err}") from err
    if isinstance(data, dict) and "results" in data:
        return BenchRun.model_validate(data)
    return BenchRun(results=[load_result(path)])
