"""Export pruned models for vLLM: the tyr_llama folder (served through tyr's vLLM plugin) or DeciLM block configs.

``tyr.exporters.vllm.export.export_vllm`` is the entry point and ``tyr export vllm`` its command (cli.py). vLLM
imports ``tyr.exporters.vllm.plugin`` in every process it starts, so this package imports nothing itself.
"""
