"""One decoding protocol for PyTorch and onnxruntime, so their logits can be compared step by step.

Prompts are left-padded into one batch; position ids count real tokens only (cumsum of the mask - 1, as
transformers' generate does); prefill runs the whole prompt, then each decode step feeds one token per row.
With ``forced`` tokens the steps are teacher-forced: both runtimes see the same inputs even where their argmax
differs (fp16/int8 variants), so every step's logits stay comparable.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from tyr.exporters.onnx.runner import OrtCausalLM


class Stepper(Protocol):
    def reset(self, batch: int) -> None: ...

    def step(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray) -> np.ndarray:
        """Logits [batch, sequence, vocab] (float32) of the new tokens; the runtime keeps its own cache."""


@dataclass
class DecodeTrace:
    prompt_mask: np.ndarray  # [batch, prompt_len], 1 on real tokens
    prefill_logits: np.ndarray  # [batch, prompt_len, vocab]
    step_logits: np.ndarray  # [batch, steps + 1, vocab]: the logits each new token was chosen from
    tokens: np.ndarray  # [batch, steps + 1]: argmax of step_logits, or the forced tokens


class OrtStepper:
    def __init__(self, runner: OrtCausalLM):
        self.runner = runner
        self.past: dict[str, np.ndarray] = {}

    def reset(self, batch: int) -> None:
        self.past = self.runner.empty_past(batch)

    def step(self, input_ids, attention_mask, position_ids):
        logits, self.past = self.runner.forward(input_ids, attention_mask, position_ids, self.past)
        return logits


class TorchStepper:
    """The reference: the PyTorch model itself with transformers' DynamicCache."""

    def __init__(self, model):
        self.model = model
        self.cache = None

    def reset(self, batch: int) -> None:
        from transformers import DynamicCache

        self.cache = DynamicCache()

    @torch.no_grad()
    def step(self, input_ids, attention_mask, position_ids):
        device = next(self.model.parameters()).device
        out = self.model(input_ids=torch.from_numpy(input_ids).to(device),
                         attention_mask=torch.from_numpy(attention_mask).to(device),
                         position_ids=torch.from_numpy(position_ids).to(device),
                         past_key_values=self.cache, use_cache=True)
        self.cache = out.past_key_values
        logits = out.logits if out.logits.dtype == torch.float64 else out.logits.float()
        return logits.cpu().numpy()


def left_pad(prompts: list[list[int]], pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    width = max(len(p) for p in prompts)
    ids = np.full((len(prompts), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(prompts), width), dtype=np.int64)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = prompt
        mask[row, width - len(prompt):] = 1
    return ids, mask


def decode(stepper: Stepper, prompts: list[list[int]], steps: int, forced: np.ndarray | None = None) -> DecodeTrace:
    """Greedy decoding of ``steps`` tokens after the prompt (teacher-forced on ``forced`` [batch, steps+1])."""
    ids, mask = left_pad(prompts)
    stepper.reset(len(prompts))
    positions = np.clip(mask.cumsum(-1) - 1, 0, None)
    prefill = stepper.step(ids, mask, positions)
    step_logits, tokens = [prefill[:, -1]], []
    for i in range(steps + 1):
        token = forced[:, i] if forced is not None else step_logits[-1].argmax(-1)
        tokens.append(token)
        if i == steps:
            break
        mask = np.concatenate([mask, np.ones((len(prompts), 1), dtype=np.int64)], axis=1)
        positions = positions[:, -1:] + 1
        step_logits.append(stepper.step(token[:, None].astype(np.int64), mask, positions)[:, -1])
    return DecodeTrace(prompt_mask=left_pad(prompts)[1], prefill_logits=prefill,
                       step_logits=np.stack(step_logits, 1), tokens=np.stack(tokens, 1))
