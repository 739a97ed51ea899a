"""vLLM general plugin: lets stock vLLM serve tyr_llama folders without trust_remote_code.

vLLM calls ``register()`` in every process it starts (API server, engine core, workers) through the
``vllm.general_plugins`` entry point declared in pyproject.toml. It must stay cheap: the model class is registered
as a lazy "module:Class" string, so vLLM imports it only in the process that builds the model.
"""

from __future__ import annotations

ARCHITECTURE = "TyrLlamaForCausalLM"
MODEL_CLASS = "tyr.exporters.vllm.model:TyrLlamaForCausalLM"


def register() -> None:
    """Register TyrLlamaConfig with transformers' AutoConfig and TyrLlamaForCausalLM with vLLM's ModelRegistry."""
    import tyr  # noqa: F401  (registers model_type "tyr_llama" with AutoConfig, AutoModel, AutoModelForCausalLM)
    from vllm import ModelRegistry

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, MODEL_CLASS)
