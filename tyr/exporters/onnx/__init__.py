"""ONNX export of dense and pruned (heterogeneous-width) models for onnxruntime and onnxruntime-genai.

``tyr.exporters.onnx.export.export_onnx`` is the entry point and ``tyr export onnx`` its command (cli.py);
runner.py's ``OrtCausalLM`` runs an export. ``tyr bench onnx`` lives with the other benchmarks (tyr.benchmarking).
"""
