"""The architecture families tyr prunes: which dense model types each covers and which classes and files its
pruned (heterogeneous-width) form uses. Everything that depends on the family looks it up here."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from tyr.errors import TyrError
from tyr.models import modeling_tyr_gemma3, modeling_tyr_llama, modeling_tyr_qwen2, modeling_tyr_qwen3


@dataclass(frozen=True)
class Family:
    name: str
    dense_model_types: dict[str, str]   # model_type -> what the user sees in the list of supported models
    modeling: ModuleType                # the self-contained modeling file copied into every saved folder
    config_class: type
    model_class: type
    causal_lm_class: type
    genai_type: str                     # onnxruntime-genai's model.type
    # The norms each block owns (a removed block takes them with it): Llama-style layers norm each block's input;
    # Gemma 3 also norms each block's output before the residual add.
    attention_norms: tuple[str, ...] = ("input_layernorm",)
    mlp_norms: tuple[str, ...] = ("post_attention_layernorm",)
    sliding_layers: bool = False        # layers keep their own sliding window (Gemma 3's layer_types)

    @property
    def model_type(self) -> str:
        return self.config_class.model_type

    @property
    def architecture(self) -> str:
        return self.causal_lm_class.__name__

    def block_norms(self, kind: str) -> tuple[str, ...]:
        """The norms of a layer's "attn" or "mlp" block."""
        return self.attention_norms if kind == "attn" else self.mlp_norms

    @property
    def modeling_files(self) -> list[Path]:
        """This family's modeling file and the files it imports (relative imports, resolved by transformers)."""
        files = [Path(modeling_tyr_llama.__file__)]
        if self.modeling is not modeling_tyr_llama:
            files.append(Path(self.modeling.__file__))
        return files

    def auto_map(self) -> dict[str, str]:
        module = Path(self.modeling.__file__).stem
        return {"AutoConfig": f"{module}.{self.config_class.__name__}",
                "AutoModel": f"{module}.{self.model_class.__name__}",
                "AutoModelForCausalLM": f"{module}.{self.causal_lm_class.__name__}"}


FAMILIES = (
    Family("llama", {"llama": "LlamaForCausalLM (Llama 2/3.x incl. rope_scaling llama3, SmolLM, TinyLlama)",
                     "mistral": "MistralForCausalLM (sliding_window null or at least the sequence length used)"},
           modeling_tyr_llama, modeling_tyr_llama.TyrLlamaConfig, modeling_tyr_llama.TyrLlamaModel,
           modeling_tyr_llama.TyrLlamaForCausalLM, "llama"),
    Family("qwen2", {"qwen2": "Qwen2ForCausalLM (Qwen2, Qwen2.5; use_sliding_window false)"},
           modeling_tyr_qwen2, modeling_tyr_qwen2.TyrQwen2Config, modeling_tyr_qwen2.TyrQwen2Model,
           modeling_tyr_qwen2.TyrQwen2ForCausalLM, "qwen2"),
    Family("qwen3", {"qwen3": "Qwen3ForCausalLM (dense Qwen3; use_sliding_window false)"},
           modeling_tyr_qwen3, modeling_tyr_qwen3.TyrQwen3Config, modeling_tyr_qwen3.TyrQwen3Model,
           modeling_tyr_qwen3.TyrQwen3ForCausalLM, "qwen3"),
    Family("gemma3", {"gemma3_text": "Gemma3ForCausalLM (Gemma 3 text models, e.g. gemma-3-270m / 1b; sliding-window "
                                     "and global layers)"},
           modeling_tyr_gemma3, modeling_tyr_gemma3.TyrGemma3Config, modeling_tyr_gemma3.TyrGemma3Model,
           modeling_tyr_gemma3.TyrGemma3ForCausalLM, "gemma3_text",
           attention_norms=("input_layernorm", "post_attention_layernorm"),
           mlp_norms=("pre_feedforward_layernorm", "post_feedforward_layernorm"), sliding_layers=True),
)
TYR_CAUSAL_LM_CLASSES = tuple(f.causal_lm_class for f in FAMILIES)


def supported_model_types() -> dict[str, str]:
    """model_type -> description, for every dense architecture and every pruned format tyr reads."""
    types: dict[str, str] = {}
    for family in FAMILIES:
        types.update(family.dense_model_types)
    for family in FAMILIES:
        types[family.model_type] = f"{family.architecture} (a {family.name} model pruned by tyr)"
    return types


def family_of(config) -> Family:
    """The family of a dense or pruned config (an object with ``model_type``, or a config dict)."""
    model_type = config.get("model_type") if isinstance(config, dict) else getattr(config, "model_type", None)
    for family in FAMILIES:
        if model_type == family.model_type or model_type in family.dense_model_types:
            return family
    supported = "\n  ".join(supported_model_types().values())
    raise TyrError(f"model_type {model_type!r} is not supported. Supported:\n  {supported}")


def family_named(name: str) -> Family:
    """The family called ``name`` ("llama", "qwen2", "qwen3", "gemma3")."""
    for family in FAMILIES:
        if family.name == name:
            return family
    raise TyrError(f"unknown model family {name!r}: {', '.join(f.name for f in FAMILIES)}")
