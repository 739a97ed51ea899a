"""Validated settings of a serving benchmark: the vLLM server, the locust load and the offline batch."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from tyr.errors import TyrError
from tyr.benchmarking.platform_info import Accelerator

Dtype = Literal["auto", "float32", "bfloat16", "float16"]
CPU_DTYPES = ("float32", "bfloat16")


class ServerConfig(BaseModel):
    """How the vLLM engine is started (the same settings serve the offline vllm.LLM run)."""

    model_config = ConfigDict(extra="forbid")

    # "auto": serving_dtype() below.
    dtype: Dtype = "auto"
    max_model_len: int = Field(512, ge=16, le=1_048_576)
    compile: bool | None = None  # None: compiled_by_default()
    kv_cache_space_gib: int = Field(1, ge=1, le=1024)  # CPU only: VLLM_CPU_KVCACHE_SPACE
    gpu_memory_utilization: float | None = Field(None, gt=0, le=1)  # GPUs only; None keeps vLLM's default
    # vLLM --tensor-parallel-size: devices (GPUs, or CPU cores split into one group per worker) the model is split over
    tensor_parallel_size: int = Field(1, ge=1, le=64)
    trust_remote_code: bool = False
    startup_timeout_s: float = Field(600, gt=0, le=7200)
    shutdown_timeout_s: float = Field(30, gt=0, le=600)
    extra_args: list[str] = Field(default_factory=list)  # appended verbatim to the api_server command only

    def resolved_dtype(self, accelerator: Accelerator) -> str:
        bf16 = accelerator != "cpu" and self.dtype == "auto" and _gpu_supports_bf16()
        return serving_dtype(self.dtype, accelerator, gpu_bf16=bf16)

    def eager(self, accelerator: Accelerator) -> bool:
        return not compiled_by_default(accelerator) if self.compile is None else not self.compile


def serving_dtype(dtype: Dtype, accelerator: Accelerator, gpu_bf16: bool = True) -> str:
    """The dtype vLLM serves in. "auto": float32 on CPU (vLLM's CPU backend runs float32 or bfloat16); on GPUs
    bfloat16, not the folder's own dtype (tyr writes float32), and float16 where a GPU lacks bfloat16."""
    if accelerator == "cpu":
        if dtype == "auto":
            return "float32"
        if dtype not in CPU_DTYPES:
            raise TyrError(f"dtype {dtype} is not supported by vLLM's CPU backend: use float32 or bfloat16")
        return dtype
    if dtype == "auto":
        return "bfloat16" if gpu_bf16 else "float16"
    return dtype


def compiled_by_default(accelerator: Accelerator) -> bool:
    """torch.compile and CUDA graphs on GPUs (vLLM's default there); eager on CPU, where compiling costs 1-2 extra
    minutes per engine start. `compile` in ServerConfig (`--compile/--no-compile`) overrides."""
    return accelerator != "cpu"


def _gpu_supports_bf16() -> bool:
    import torch

    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


class LoadConfig(BaseModel):
    """A bounded locust load: `users` concurrent streams of /v1/completions for `duration_s` seconds."""

    model_config = ConfigDict(extra="forbid")

    users: int = Field(2, ge=1, le=256)
    spawn_rate: float = Field(2.0, gt=0, le=256)  # users started per second
    duration_s: float = Field(10.0, gt=0, le=3600)
    prompt_tokens: int = Field(64, ge=1, le=131_072)
    output_tokens: int = Field(32, ge=2, le=131_072)  # >= 2 so inter-token latency exists
    num_prompts: int = Field(64, ge=1, le=100_000)  # distinct random prompts, cycled (keeps prefix-cache hits rare)
    request_timeout_s: float = Field(120, gt=0, le=3600)
    warmup_requests: int = Field(2, ge=0, le=100)  # sequential requests before the load (first-call overheads)
    seed: int = 0


class OfflineConfig(BaseModel):
    """Batch throughput: every prompt at once, each generating exactly `output_tokens`; the median batch counts."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    via: Literal["engine", "server"] = Field(
        "engine", description="engine: vllm.LLM.generate in its own engine, started after the server is down; "
        "server: one request holding the whole batch, sent to the benchmark's server after its load (no second "
        "engine start)")
    num_prompts: int = Field(32, ge=1, le=100_000)
    prompt_tokens: int = Field(64, ge=1, le=131_072)
    output_tokens: int = Field(64, ge=1, le=131_072)
    repeats: int = Field(3, ge=1, le=100, description="timed batches in the same engine; the median counts (one "
                         "batch on a shared CPU is noisy)")
    timeout_s: float = Field(1800, gt=0, le=86_400)
    seed: int = 0


class BenchConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    server: ServerConfig = Field(default_factory=ServerConfig)
    load: LoadConfig = Field(default_factory=LoadConfig)
    offline: OfflineConfig = Field(default_factory=OfflineConfig)

    @model_validator(mode="after")
    def _lengths_fit(self) -> BenchConfig:
        limit = self.server.max_model_len
        for name, part in (("load", self.load), ("offline", self.offline)):
            if part.prompt_tokens + part.output_tokens > limit:
                raise ValueError(f"{name}: prompt_tokens {part.prompt_tokens} + output_tokens {part.output_tokens} "
                                 f"exceed server.max_model_len {limit}")
        return self

    @classmethod
    def from_file(cls, path: str | Path) -> BenchConfig:
        """Read a YAML or JSON file of these settings (unknown keys are errors)."""
        import yaml

        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text()) or {}
            return cls.model_validate(data)
        except (OSError, yaml.YAMLError, ValueError) as err:
            raise TyrError(f"bad benchmark config {path}: {err}") from err
