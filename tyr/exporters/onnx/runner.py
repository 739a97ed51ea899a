"""Run an exported graph in onnxruntime: session settings, the KV cache between calls, and the inputs it expects."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

import numpy as np

from tyr.errors import TyrError
from tyr.exporters.onnx.layout import KvLayer, LOGITS, PAST_KEY, PAST_VALUE, PRESENT_KEY, PRESENT_VALUE

OptLevel = Literal["disable", "basic", "extended", "all"]
OPT_LEVELS: tuple[str, ...] = ("disable", "basic", "extended", "all")
# The same levels as onnxruntime-genai's genai_config.json spells them.
GENAI_OPT_LEVEL = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED",
                   "all": "ORT_ENABLE_ALL"}
_PAST_KEY_NAME = re.compile(re.escape(PAST_KEY).replace("%d", r"(\d+)") + "$")


def session_options(opt_level: OptLevel = "all", threads: int | None = None):
    import onnxruntime as ort

    if opt_level not in OPT_LEVELS:
        raise TyrError(f"unknown graph optimization level {opt_level!r}; choose one of {', '.join(OPT_LEVELS)}")
    options = ort.SessionOptions()
    options.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[opt_level]
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3  # errors only: shape-inference warnings on dynamic axes are expected
    return options


def default_providers() -> list[str]:
    """CUDA (or ROCm) when this onnxruntime build has it (onnxruntime-gpu, as `make setup RUNTIME=cuda` installs),
    else CPU; the CPU provider stays last as the fallback for operators the GPU provider lacks."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    preferred = [p for p in ("CUDAExecutionProvider", "ROCMExecutionProvider") if p in available]
    return [*preferred[:1], "CPUExecutionProvider"]


class OrtCausalLM:
    """One inference session over an exported graph, with the per-layer KV layout read back from its inputs."""

    def __init__(self, model_path: str | Path, opt_level: OptLevel = "all", threads: int | None = None,
                 providers: list[str] | None = None):
        import onnxruntime as ort

        self.path = Path(model_path)
        if not self.path.is_file():
            raise TyrError(f"{self.path} does not exist (expected an exported model.onnx)")
        self.session = ort.InferenceSession(str(self.path), sess_options=session_options(opt_level, threads),
                                            providers=providers or default_providers())
        # The provider that took the session: a GPU provider whose CUDA libraries fail to load drops back to the CPU.
        self.provider: str = self.session.get_providers()[0]
        inputs = {i.name: i for i in self.session.get_inputs()}
        self.kv_layers: list[KvLayer] = []
        for name, info in inputs.items():
            if match := _PAST_KEY_NAME.match(name):
                _, heads, _, head_dim = info.shape
                self.kv_layers.append(KvLayer(layer=int(match.group(1)), kv_heads=heads, head_dim=head_dim))
        self.kv_layers.sort(key=lambda kv: kv.layer)
        self.kv_dtype = np.float16 if self.kv_layers and "float16" in inputs[PAST_KEY % self.kv_layers[0].layer].type \
            else np.float32
        self.output_names = [LOGITS] + [n for kv in self.kv_layers for n in (PRESENT_KEY % kv.layer,
                                                                              PRESENT_VALUE % kv.layer)]

    def empty_past(self, batch: int) -> dict[str, np.ndarray]:
        return {name: np.zeros((batch, kv.kv_heads, 0, kv.head_dim), dtype=self.kv_dtype)
                for kv in self.kv_layers for name in (PAST_KEY % kv.layer, PAST_VALUE % kv.layer)}

    def forward(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray,
                past: dict[str, np.ndarray]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """(logits [batch, sequence, vocab] as float32, the next call's past)."""
        feeds = {"input_ids": input_ids.astype(np.int64), "attention_mask": attention_mask.astype(np.int64),
                 "position_ids": position_ids.astype(np.int64), **past}
        logits, *present = self.session.run(self.output_names, feeds)
        next_past = {}
        for kv, i in zip(self.kv_layers, range(0, len(present), 2)):
            next_past[PAST_KEY % kv.layer], next_past[PAST_VALUE % kv.layer] = present[i], present[i + 1]
        return logits.astype(np.float32, copy=False), next_past
