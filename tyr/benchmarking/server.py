"""Start a vLLM OpenAI-compatible server as a subprocess on loopback and always tear it down.

    with VLLMServer(model_dir, log_path, ServerConfig(), accelerator="cpu") as server:
        ...  # server.base_url is healthy here

The server runs in its own process group (vLLM forks an engine core and workers), so teardown signals the whole
group: SIGTERM, then SIGKILL after `shutdown_timeout_s`. A server that exits or never becomes healthy raises
ServerError with the tail of its log; the log itself stays where the caller asked.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from tyr.errors import TyrError
from tyr.benchmarking.config import ServerConfig
from tyr.benchmarking.platform_info import Accelerator

log = logging.getLogger(__name__)
LOOPBACK = "127.0.0.1"
SERVED_MODEL_NAME = "tyr-bench"


class ServerError(TyrError):
    """The vLLM server crashed, never became healthy, or died under load."""


def free_port(host: str = LOOPBACK) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def log_tail(path: str | Path, lines: int = 40) -> str:
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.rstrip().splitlines()[-lines:])


def http_get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    """GET without proxies (loopback must never go through an HTTP proxy from the environment)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def vllm_env(config: ServerConfig, accelerator: Accelerator) -> dict[str, str]:
    env = dict(os.environ)
    if accelerator == "cpu":
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(config.kv_cache_space_gib))
        if config.tensor_parallel_size > 1 and "VLLM_CPU_OMP_THREADS_BIND" not in env:
            env["VLLM_CPU_OMP_THREADS_BIND"] = cpu_worker_binding(config.tensor_parallel_size)
    env.setdefault("HF_HUB_OFFLINE", "1")  # load only the given folder, never reach for a hub
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def cpu_worker_binding(workers: int) -> str:
    """VLLM_CPU_OMP_THREADS_BIND for ``workers`` CPU workers: this process's allowed cores in equal contiguous
    groups ("0-3|4-7"). vLLM's automatic binding gives each worker its own NUMA node and refuses when there are
    fewer nodes than workers, as on a one-socket machine."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < workers:
        raise TyrError(f"tensor parallelism {workers} on CPU needs a core per worker; this process may use "
                       f"{len(cores)}")
    size = len(cores) // workers
    groups = [cores[i * size:(i + 1) * size] for i in range(workers)]
    return "|".join(",".join(map(str, group)) for group in groups)


def server_command(model_dir: str | Path, port: int, config: ServerConfig, accelerator: Accelerator,
                   host: str = LOOPBACK) -> list[str]:
    # `python -m ...api_server`, not the `vllm` console script: the CPU build's script looks up a package named
    # vllm and fails.
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
           "--served-model-name", SERVED_MODEL_NAME, "--host", host, "--port", str(port),
           "--max-model-len", str(config.max_model_len), "--dtype", config.resolved_dtype(accelerator),
           "--disable-uvicorn-access-log"]
    if config.tensor_parallel_size > 1:
        cmd += ["--tensor-parallel-size", str(config.tensor_parallel_size)]
    if config.eager(accelerator):
        cmd.append("--enforce-eager")
    if config.gpu_memory_utilization is not None and accelerator != "cpu":
        cmd += ["--gpu-memory-utilization", str(config.gpu_memory_utilization)]
    if config.trust_remote_code:
        cmd.append("--trust-remote-code")
    return cmd + list(config.extra_args)


class VLLMServer:
    """Context manager around one vLLM api_server subprocess bound to 127.0.0.1 on a free port."""

    def __init__(self, model_dir: str | Path, log_path: str | Path, config: ServerConfig | None = None,
                 accelerator: Accelerator = "cpu", port: int | None = None):
        self.model_dir = Path(model_dir)
        self.log_path = Path(log_path)
        self.config = config or ServerConfig()
        self.accelerator = accelerator
        self.port = port or free_port()
        self.base_url = f"http://{LOOPBACK}:{self.port}"
        self.model_name = SERVED_MODEL_NAME
        self.process: subprocess.Popen | None = None
        self.startup_s: float | None = None

    def __enter__(self) -> VLLMServer:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        if not (self.model_dir / "config.json").is_file():
            raise ServerError(f"{self.model_dir} is not a model folder (no config.json)")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        cmd = server_command(self.model_dir, self.port, self.config, self.accelerator)
        log.info("starting vLLM for %s on %s (log: %s)", self.model_dir, self.base_url, self.log_path)
        started = time.monotonic()
        with open(self.log_path, "w") as log_file:
            log_file.write("$ " + " ".join(cmd) + "\n")
            log_file.flush()
            # A new session puts the server, its engine core and workers in one process group we can signal.
            self.process = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            env=vllm_env(self.config, self.accelerator), start_new_session=True)
        try:
            self._wait_healthy()
        except BaseException:  # includes KeyboardInterrupt: never leave a server behind
            self.stop()
            raise
        self.startup_s = time.monotonic() - started
        log.info("vLLM healthy after %.0f s", self.startup_s)

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + self.config.startup_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise self._error(f"exited with code {self.process.returncode} before becoming healthy")
            try:
                status, _ = http_get(f"{self.base_url}/health", timeout=2)
                if status == 200:
                    return
            except (OSError, urllib.error.URLError):
                pass  # not listening yet
            time.sleep(1.0)
        raise self._error(f"did not become healthy within {self.config.startup_timeout_s:.0f} s")

    def _error(self, what: str) -> ServerError:
        return ServerError(f"vLLM server for {self.model_dir} {what}. Last lines of {self.log_path}:\n"
                           f"{log_tail(self.log_path)}")

    def check_alive(self) -> None:
        """Raise ServerError if the server process has died (e.g. its engine crashed under load)."""
        if self.process is None or self.process.poll() is not None:
            code = None if self.process is None else self.process.returncode
            raise self._error(f"is no longer running (exit code {code})")
        status = None
        try:
            status, _ = http_get(f"{self.base_url}/health", timeout=5)
        except (OSError, urllib.error.URLError):
            pass
        if status != 200:
            raise self._error(f"is unhealthy (GET /health -> {status})")

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None:
            return
        group = process.pid  # start_new_session: the group id is the server's pid
        self._signal_group(group, signal.SIGTERM)
        deadline = time.monotonic() + self.config.shutdown_timeout_s
        try:
            process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
        while self._group_alive(group) and time.monotonic() < deadline:
            time.sleep(0.2)
        if self._group_alive(group):
            log.warning("vLLM server group %d did not stop in %.0f s: killing it", group, self.config.shutdown_timeout_s)
            self._signal_group(group, signal.SIGKILL)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            log.error("vLLM server %d survived SIGKILL", process.pid)

    @staticmethod
    def _signal_group(group: int, sig: int) -> None:
        try:
            os.killpg(group, sig)
        except (ProcessLookupError, PermissionError):
            pass

    @staticmethod
    def _group_alive(group: int) -> bool:
        try:
            os.killpg(group, 0)
            return True
        except (ProcessLookupError, PermissionError):
            return False
