"""Drive a server with a bounded locust load and summarize latencies and throughput.

`run_load` runs tyr/benchmarking/locust_user.py as a subprocess: locust runs there as a library (Environment +
LocalRunner), so its gevent monkey-patching never touches the calling process. The child stops the users after
`duration_s` and writes one JSON record per request; this side computes the statistics.

Throughput counts what arrived inside the load window (ramp-up included): output tokens/s = tokens received /
window, requests/s = requests completed / window.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

from pydantic import BaseModel, Field

from tyr.atomic import atomic_write_json
from tyr.errors import TyrError
from tyr.benchmarking.config import LoadConfig
from tyr.benchmarking.results import LatencyStats, Throughput
from tyr.benchmarking.server import log_tail
from tyr.benchmarking.stats import summarize

log = logging.getLogger(__name__)
LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1"}
# Run by path, never imported here: importing locust would monkey-patch this process with gevent.
LOCUST_USER_FILE = Path(__file__).with_name("locust_user.py")


class LoadSpec(BaseModel):
    """What the load subprocess needs (crosses a process boundary as JSON)."""

    base_url: str
    model_name: str
    prompts: list[list[int]] = Field(min_length=1)
    load: LoadConfig


class LoadRecords(BaseModel):
    started: float
    stopped: float
    tokens_received: int
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
    spec_path, records_path = work_dir / "load_spec.json", work_dir / "load_records.json"
    log_path = work_dir / "locust.log"
    atomic_write_json(spec_path, LoadSpec(base_url=base_url, model_name=model_name, prompts=prompts,
                                          load=load).model_dump(mode="json"))
    records_path.unlink(missing_ok=True)
    # Bound: the load itself, the longest request it may still wait for at quit, and interpreter start-up.
    timeout = load.duration_s + load.request_timeout_s + 120
    log.info("locust: %d users for %.0f s against %s", load.users, load.duration_s, base_url)
    with open(log_path, "w") as log_file:
        try:
            # -I: isolated, so the script's folder (tyr/benchmarking) is not on sys.path and cannot shadow modules.
            proc = subprocess.run([sys.executable, "-I", str(LOCUST_USER_FILE), str(spec_path), str(records_path)],
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
                            output_tokens_per_s=records.tokens_received / duration, concurrency=users)
    return latency, throughput


def first_errors(records_path: str | Path, limit: int = 3) -> list[str]:
    try:
        requests = LoadRecords.model_validate_json(Path(records_path).read_text()).requests
    except (OSError, ValueError):
        return []
    return [r["error"] for r in requests if r.get("error")][:limit]
