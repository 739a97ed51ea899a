"""The heterogeneous-width model format: configuration, modeling, slicing, loading and saving."""

from tyr.models.modeling_tyr_llama import TyrLlamaConfig, TyrLlamaForCausalLM, TyrLlamaModel


def register_auto_classes() -> None:
    """Let transformers' Auto classes load tyr_llama folders without trust_remote_code."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    AutoConfig.register(TyrLlamaConfig.model_type, TyrLlamaConfig, exist_ok=True)
    AutoModel.register(TyrLlamaConfig, TyrLlamaModel, exist_ok=True)
    AutoModelForCausalLM.register(TyrLlamaConfig, TyrLlamaForCausalLM, exist_ok=True)


__all__ = ["TyrLlamaConfig", "TyrLlamaForCausalLM", "TyrLlamaModel", "register_auto_classes"]
