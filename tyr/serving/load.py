"""Drive a server with a bounded locust load and summarize latencies and throughput.

`run_load` starts this module as a subprocess (`python -m tyr.serving.load SPEC RECORDS`): locust runs there as a
library (Environment + LocalRunner), so its gevent monkey-patching never touches the calling process. The child
stops the users after `duration_s`, writes one JSON record per request, and the parent computes the statistics.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

from pydantic import BaseModel, Field

from tyr.atomic import atomic_write_json
from tyr.errors import TyrError
from tyr.serving.config import LoadConfig
from tyr.serving.results import LatencyStats, Throughput
from tyr.serving.server import log_tail
from tyr.serving.stats import summarize

log = logging.getLogger(__name__)
LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1"}


class LoadSpec(BaseModel):
    """What the load subprocess needs (crosses a process boundary as JSON)."""

    base_url: str
    model_name: str
    prompts: list[list[int]] = Field(min_length=1)
    load: LoadConfig


class LoadRecords(BaseModel):
    started: float
    stopped: float
    chunks_received: int
    requests: list[dict]


def check_target(base_url: str, allow_remote: bool) -> None:
    host = urlparse(base_url).hostname
    if host not in LOOPBACK_HOSTS and not allow_remote:
        raise TyrError(f"refusing to load-test {base_url}: only loopback servers unless a host is given explicitly")


def run_load(base_url: str, model_name: str, prompts: list[list[int]], load: LoadConfig, work_dir: str | Path,
             allow_remote: bool = False) -> tuple[LatencyStats, Throughput]:
    """Run the load against `base_url` and return (latency percentiles, throughput). Files go to work_dir."""
    check_target(base_url, allow_remote)
    work_dir = Path(work_dir)
    spec_path, records_path, log_path = work_dir / "load_spec.json", work_dir / "load_records.json", work_dir / "locust.log"
    atomic_write_json(spec_path, LoadSpec(base_url=base_url, model_name=model_name, prompts=prompts,
                                          load=load).model_dump(mode="json"))
    records_path.unlink(missing_ok=True)
    # Bound: the load itself, the longest request it may still wait for at quit, and interpreter start-up.
    timeout = load.duration_s + load.request_timeout_s + 120
    log.info("locust: %d users for %.0f s against %s", load.users, load.duration_s, base_url)
    with open(log_path, "w") as log_file:
        try:
            proc = subprocess.run([sys.executable, "-m", "tyr.serving.load", str(spec_path), str(records_path)],
                                  stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, timeout=timeout)
        except subprocess.TimeoutExpired as err:
            raise TyrError(f"the locust load did not finish within {timeout:.0f} s; see {log_path}:\n"
                           f"{log_tail(log_path)}") from err
    if proc.returncode != 0 or not records_path.is_file():
        raise TyrError(f"the locust load failed (exit code {proc.returncode}); last lines of {log_path}:\n"
                       f"{log_tail(log_path)}")
    return summarize_load(LoadRecords.model_validate_json(records_path.read_text()), load.users)


def summarize_load(records: LoadRecords, users: int | None = None) -> tuple[LatencyStats, Throughput]:
    done = [r for r in records.requests if r["ok"]]
    failed = [r for r in records.requests if not r["ok"]]
    duration = max(records.stopped - records.started, 1e-9)
    ms = 1000.0
    tpot = [(r["e2e_s"] - r["ttft_s"]) / (r["output_tokens"] - 1) * ms for r in done if r["output_tokens"] > 1]
    latency = LatencyStats(
        ttft_ms=summarize([r["ttft_s"] * ms for r in done]),
        itl_ms=summarize([gap * ms for r in done for gap in r["itl_s"]]),
        tpot_ms=summarize(tpot),
        e2e_ms=summarize([r["e2e_s"] * ms for r in done]))
    throughput = Throughput(duration_s=duration, completed_requests=len(done), failed_requests=len(failed),
                            requests_per_s=len(done) / duration,
                            output_tokens_per_s=records.chunks_received / duration, concurrency=users)
    return latency, throughput


def first_errors(records_path: str | Path, limit: int = 3) -> list[str]:
    try:
        requests = LoadRecords.model_validate_json(Path(records_path).read_text()).requests
    except (OSError, ValueError):
        return []
    return [r["error"] for r in requests if r.get("error")][:limit]


def _run_locust(spec: LoadSpec) -> LoadRecords:
    """Child process: run the users for duration_s with locust as a library, then stop them."""
    import gevent
    from locust.env import Environment

    from tyr.serving.locust_user import CompletionStreamUser

    CompletionStreamUser.host = spec.base_url
    CompletionStreamUser.model_name = spec.model_name
    CompletionStreamUser.prompts = spec.prompts
    CompletionStreamUser.output_tokens = spec.load.output_tokens
    CompletionStreamUser.request_timeout_s = spec.load.request_timeout_s
    env = Environment(user_classes=[CompletionStreamUser])
    runner = env.create_local_runner()
    started = time.time()
    runner.start(spec.load.users, spawn_rate=spec.load.spawn_rate)
    gevent.sleep(spec.load.duration_s)
    stopped = time.time()
    # gevent switches only at I/O, so nothing can land between these reads: both describe the same window.
    chunks = CompletionStreamUser.tally["chunks"]
    requests = list(CompletionStreamUser.records)
    runner.quit()  # kills users mid-request; those partial requests are not recorded
    return LoadRecords(started=started, stopped=stopped, chunks_received=chunks, requests=requests)


if __name__ == "__main__":
    spec_file, records_file = sys.argv[1], sys.argv[2]
    records = _run_locust(LoadSpec.model_validate_json(Path(spec_file).read_text()))
    atomic_write_json(records_file, records.model_dump(mode="json"))
    print(f"locust: {len(records.requests)} requests, {records.chunks_received} chunks in "
          f"{records.stopped - records.started:.1f} s")
