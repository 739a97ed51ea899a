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
