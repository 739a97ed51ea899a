"""Serving benchmarks and model selection.

- server.py: a vLLM OpenAI server as a subprocess on loopback, always torn down (VLLMServer context manager)
- load.py + locust_user.py: a bounded locust load streaming /v1/completions (TTFT, ITL, E2E, throughput)
- offline.py: offline batch throughput through vllm.LLM in a subprocess
- bench.py: `tyr bench vllm` for several models; results.py: the BenchResult format shared with `tyr bench onnx`
- latency_table.py: per-layer-shape latency table and predict_latency for latency-budgeted search
- selection.py + candidates.py: `tyr select` (Pareto front, targets) on recorded measurements
- report.py / tables.py: HTML (inline SVG), CSV, JSON and terminal tables

Kept free of heavy imports: `tyr --help` imports tyr.serving.cli.
"""
