"""Which torch device a stage runs on: the accelerator when there is one, unless the user names a device."""

from __future__ import annotations

import torch

from tyr.errors import TyrError


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """None -> "cuda" when torch sees a GPU, else "cpu"; an explicit device is checked, not second-guessed.

    ROCm builds of torch drive AMD GPUs through the same "cuda" device type, so "rocm" is accepted as its alias.
    """
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(device, str) and device.strip().lower().startswith("rocm"):
        device = "cuda" + device.strip()[len("rocm"):]
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise TyrError(f"unknown device {device!r}: use cpu, cuda or cuda:N") from err
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise TyrError(f"device {device} was requested but torch sees no GPU")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise TyrError(f"device {device} was requested but torch sees {torch.cuda.device_count()} GPU(s)")
    return device


def free_memory(device: torch.device) -> int | None:
    """Bytes a new allocation can still take on ``device``: the GPU's free memory, or the host's available memory
    for the CPU (None where it cannot be read)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        import psutil
    except ImportError:  # pragma: no cover - psutil ships with the environment
        return None
    return psutil.virtual_memory().available
