"""Batch throughput: through vllm.LLM in a subprocess, or as one batched request to a running server.

`run_offline_throughput` runs this module as a script (`python -m tyr.benchmarking.offline SPEC OUT`). vLLM's workers
re-import the main script, so the engine is built only under `if __name__ == "__main__":`. One warm-up batch runs
first; each timed batch is every prompt at once, each generating exactly `output_tokens` tokens (ignore_eos), and
the median of `repeats` batches counts.

`batch_through_server` times the same batches sent to the server the load already warmed up, as one /v1/completions
request each (vLLM schedules a request's prompts together), and so spares a second engine start per model. Each
batch has its own prompts, so no batch reads another's prefix from the cache.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from pydantic import BaseModel, Field

from tyr.atomic import atomic_write_json
from tyr.errors import TyrError
from tyr.benchmarking.config import OfflineConfig, ServerConfig
from tyr.benchmarking.platform_info import Accelerator
from tyr.benchmarking.results import OfflineThroughput
from tyr.benchmarking.server import log_tail, vllm_env

log = logging.getLogger(__name__)


class OfflineSpec(BaseModel):
    model: str
    dtype: str
    max_model_len: int
    enforce_eager: bool
    trust_remote_code: bool
    gpu_memory_utilization: float | None
    tensor_parallel_size: int = 1
    prompts: list[list[int]] = Field(min_length=1)
    output_tokens: int
    repeats: int = 1


def run_offline_throughput(model_dir: str | Path, prompts: list[list[int]], offline: OfflineConfig,
                           server: ServerConfig, accelerator: Accelerator, work_dir: str | Path) -> OfflineThroughput:
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    spec_path, out_path, log_path = work_dir / "offline_spec.json", work_dir / "offline.json", work_dir / "offline.log"
    spec = OfflineSpec(model=str(model_dir), dtype=server.resolved_dtype(accelerator),
                       max_model_len=server.max_model_len, enforce_eager=server.eager(accelerator),
                       trust_remote_code=server.trust_remote_code,
                       gpu_memory_utilization=server.gpu_memory_utilization if accelerator != "cpu" else None,
                       tensor_parallel_size=server.tensor_parallel_size,
                       prompts=prompts, output_tokens=offline.output_tokens, repeats=offline.repeats)
    atomic_write_json(spec_path, spec.model_dump(mode="json"))
    out_path.unlink(missing_ok=True)
    log.info("offline throughput: %d prompts through vllm.LLM (log: %s)", len(prompts), log_path)
    with open(log_path, "w") as log_file:
        # Own session: on timeout or Ctrl-C the engine's workers go down with the script.
        proc = subprocess.Popen([sys.executable, "-m", "tyr.benchmarking.offline", str(spec_path), str(out_path)],
                                stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=vllm_env(server, accelerator), start_new_session=True)
        try:
            proc.wait(timeout=offline.timeout_s)
        except subprocess.TimeoutExpired as err:
            raise TyrError(f"offline throughput for {model_dir} did not finish within {offline.timeout_s:.0f} s; "
                           f"last lines of {log_path}:\n{log_tail(log_path)}") from err
        finally:
            _kill_group(proc)
    if proc.returncode != 0 or not out_path.is_file():
        raise TyrError(f"offline throughput for {model_dir} failed (exit code {proc.returncode}); last lines of "
                       f"{log_path}:\n{log_tail(log_path)}")
    return OfflineThroughput.model_validate_json(out_path.read_text())


def batch_through_server(base_url: str, model_name: str, batches: list[list[list[int]]], output_tokens: int,
                         timeout: float) -> OfflineThroughput:
    """Time each batch of prompt token ids as one request to an OpenAI-compatible vLLM server; the median counts."""
    seconds, generated = [], []
    for prompts in batches:
        body = {"model": model_name, "prompt": prompts, "max_tokens": output_tokens, "min_tokens": output_tokens,
                "ignore_eos": True, "temperature": 0.0}
        start = time.perf_counter()
        answer = _post_json(f"{base_url}/v1/completions", body, timeout)
        seconds.append(time.perf_counter() - start)
        generated.append(int((answer.get("usage") or {}).get("completion_tokens") or 0))
        if len(answer.get("choices") or []) != len(prompts) or generated[-1] != len(prompts) * output_tokens:
            raise TyrError(f"{base_url} answered a batch of {len(prompts)} prompts x {output_tokens} tokens with "
                           f"{len(answer.get('choices') or [])} completions and {generated[-1]} tokens")
    median = sorted(range(len(seconds)), key=seconds.__getitem__)[(len(seconds) - 1) // 2]
    return OfflineThroughput(num_prompts=len(batches[median]), prompt_tokens=len(batches[median][0]),
                             output_tokens=generated[median], elapsed_s=seconds[median],
                             output_tokens_per_s=generated[median] / seconds[median],
                             requests_per_s=len(batches[median]) / seconds[median], batch_seconds=seconds,
                             via="server")


def _post_json(url: str, body: dict, timeout: float) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback never goes through a proxy
    try:
        with opener.open(request, timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as err:
        raise TyrError(f"{url} answered HTTP {err.code}: {err.read()[:500]!r}") from err
    except (urllib.error.URLError, TimeoutError, json.JSONDecodeError) as err:
        raise TyrError(f"batch request to {url} failed: {err}") from err


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the script and any engine process it left behind
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def _measure(spec: OfflineSpec) -> OfflineThroughput:
    from vllm import LLM, SamplingParams

    llm = LLM(model=spec.model, dtype=spec.dtype, max_model_len=spec.max_model_len, enforce_eager=spec.enforce_eager,
              trust_remote_code=spec.trust_remote_code, seed=0, tensor_parallel_size=spec.tensor_parallel_size,
              **({"gpu_memory_utilization": spec.gpu_memory_utilization} if spec.gpu_memory_utilization else {}))
    params = SamplingParams(max_tokens=spec.output_tokens, min_tokens=spec.output_tokens, ignore_eos=True,
                            temperature=0.0)
    batch = [{"prompt_token_ids": ids} for ids in spec.prompts]
    llm.generate(batch[: min(4, len(batch))], params, use_tqdm=False)  # warm-up
    seconds = []
    for _ in range(spec.repeats):
        llm.reset_prefix_cache()  # every batch prefills its prompts, like the first
        start = time.perf_counter()
        outputs = llm.generate(batch, params, use_tqdm=False)
        seconds.append(time.perf_counter() - start)
    elapsed = statistics.median(seconds)
    generated = sum(len(o.outputs[0].token_ids) for o in outputs)
    return OfflineThroughput(num_prompts=len(batch), prompt_tokens=len(spec.prompts[0]), output_tokens=generated,
                             elapsed_s=elapsed, output_tokens_per_s=generated / elapsed,
                             requests_per_s=len(batch) / elapsed, batch_seconds=seconds)


if __name__ == "__main__":
    spec_file, out_file = sys.argv[1], sys.argv[2]
    result = _measure(OfflineSpec.model_validate_json(Path(spec_file).read_text()))
    atomic_write_json(out_file, result.model_dump(mode="json"))
    print(f"offline: {result.output_tokens} tokens in {result.elapsed_s:.2f} s = {result.output_tokens_per_s:.1f} tok/s")
