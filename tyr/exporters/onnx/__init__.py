"""ONNX export of dense and pruned (heterogeneous-width) models for onnxruntime and onnxruntime-genai.

``export_onnx(model_dir, out_dir, dtype, opt_level, check)`` is the entry point; ``tyr export onnx`` and
``tyr bench onnx`` are the commands (cli.py). Heavy imports happen on first use, so the CLI stays fast.
"""

from __future__ import annotations

__all__ = ["export_onnx", "OnnxExportResult", "load_export_info", "bench_onnx", "OrtCausalLM"]


def __getattr__(name: str):
    if name in ("export_onnx", "OnnxExportResult", "load_export_info"):
        from tyr.exporters.onnx import export

        return getattr(export, name)
    if name == "bench_onnx":
        from tyr.exporters.onnx.bench import bench_onnx

        return bench_onnx
    if name == "OrtCausalLM":
        from tyr.exporters.onnx.runner import OrtCausalLM

        return OrtCausalLM
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
