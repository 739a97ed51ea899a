"""The heterogeneous-width model format: configuration, modeling, slicing, loading and saving."""

from tyr.models.modeling_tyr_llama import TyrLlamaConfig, TyrLlamaForCausalLM, TyrLlamaModel


def register_auto_classes() -> None:
    """Let transformers' Auto classes load tyr's formats (tyr_llama, tyr_qwen2, tyr_qwen3, tyr_gemma3) without
    trust_remote_code."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    from tyr.models.families import FAMILIES

    for family in FAMILIES:
        AutoConfig.register(family.model_type, family.config_class, exist_ok=True)
        AutoModel.register(family.config_class, family.model_class, exist_ok=True)
        AutoModelForCausalLM.register(family.config_class, family.causal_lm_class, exist_ok=True)


__all__ = ["TyrLlamaConfig", "TyrLlamaForCausalLM", "TyrLlamaModel", "register_auto_classes"]
