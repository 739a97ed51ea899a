"""Measurements of models on runtimes: every `tyr bench` command and the one result format they share.

- vllm_bench.py: `tyr bench vllm`, a real vLLM server under a locust load (server.py, load.py, locust_user.py) and
  batch throughput through vllm.LLM or the same server (offline.py); config.py holds its settings
- onnx_bench.py: `tyr bench onnx`, prefill and decode latency of ONNX exports in onnxruntime
- layer_latency.py: `tyr bench layers`, the per-shape timings behind the search's cost model (tyr.compressor.latency)
- results.py: BenchResult, written by every runtime; platform_info.py, stats.py, prompts.py: what each result records
- report.py, tables.py: HTML (inline SVG), CSV and terminal tables of results
- cli.py: the `tyr bench` subcommands
"""
