"""Export pruned models for vLLM: the tyr_llama folder (served through tyr's vLLM plugin) or DeciLM block configs.

Attributes load lazily: vLLM imports ``tyr.exporters.vllm.plugin`` in every process it starts, and ``tyr --help``
imports the CLI module; neither should pay for the exporter's imports.
"""

__all__ = ["ExportResult", "export_vllm"]


def __getattr__(name: str):
    if name in __all__:
        from tyr.exporters.vllm import export

        return getattr(export, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
