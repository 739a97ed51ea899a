"""vLLM general plugin: lets stock vLLM serve tyr_llama / tyr_qwen2 / tyr_qwen3 / tyr_gemma3 folders without
trust_remote_code.

vLLM calls ``register()`` in every process it starts (API server, engine core, workers) through the
``vllm.general_plugins`` entry point declared in pyproject.toml. It must stay cheap: the model class is registered
as a lazy "module:Class" string, so vLLM imports it only in the process that builds the model.
"""

from __future__ import annotations

ARCHITECTURE = "TyrLlamaForCausalLM"
# config.json's architectures entry -> vLLM model class, one per family (tyr.models.families).
MODEL_CLASSES = {
    ARCHITECTURE: "tyr.exporters.vllm.model:TyrLlamaForCausalLM",
    "TyrQwen2ForCausalLM": "tyr.exporters.vllm.qwen:TyrQwen2ForCausalLM",
    "TyrQwen3ForCausalLM": "tyr.exporters.vllm.qwen:TyrQwen3ForCausalLM",
    "TyrGemma3ForCausalLM": "tyr.exporters.vllm.gemma3:TyrGemma3ForCausalLM",
}


def register() -> None:
    """Register tyr's configs with transformers' AutoConfig and its model classes with vLLM's ModelRegistry."""
    import tyr  # noqa: F401  (registers tyr's model_types with transformers' Auto classes)
    from vllm import ModelRegistry

    supported = ModelRegistry.get_supported_archs()
    for architecture, model_class in MODEL_CLASSES.items():
        if architecture not in supported:
            ModelRegistry.register_model(architecture, model_class)
