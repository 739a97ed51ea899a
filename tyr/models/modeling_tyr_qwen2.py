# Copyright 2026 the tyr authors. Apache License 2.0.
"""Heterogeneous-width Qwen2 / Qwen2.5: each decoder layer has its own query heads, KV heads and FFN width.

The Llama layer of modeling_tyr_llama.py (copied next to this file) with transformers' Qwen2 attention: q/k/v
projections carry biases, o_proj none. Sliding-window attention is off, as in the released models (tyr refuses
configs that turn it on), so every layer is a full-attention layer and LlamaModel's forward applies unchanged.
"""

from __future__ import annotations

from transformers.models.qwen2.configuration_qwen2 import Qwen2Config
from transformers.models.qwen2.modeling_qwen2 import Qwen2Attention, Qwen2MLP, Qwen2RMSNorm, Qwen2RotaryEmbedding

from .modeling_tyr_llama import HeterogeneousWidths, TyrLlamaDecoderLayer, TyrLlamaForCausalLM, TyrLlamaModel


class TyrQwen2Config(HeterogeneousWidths, Qwen2Config):
    model_type = "tyr_qwen2"
    __init__ = HeterogeneousWidths.__init__  # in the class body: transformers' config dataclass would replace it


class TyrQwen2DecoderLayer(TyrLlamaDecoderLayer):
    attention_class, mlp_class, norm_class = Qwen2Attention, Qwen2MLP, Qwen2RMSNorm


class TyrQwen2Model(TyrLlamaModel):
    config_class = TyrQwen2Config
    config: TyrQwen2Config
    _no_split_modules = ["TyrQwen2DecoderLayer"]
    _can_record_outputs = {"hidden_states": TyrQwen2DecoderLayer, "attentions": Qwen2Attention}
    decoder_layer_class, norm_class, rotary_class = TyrQwen2DecoderLayer, Qwen2RMSNorm, Qwen2RotaryEmbedding


class TyrQwen2ForCausalLM(TyrLlamaForCausalLM):
    config_class = TyrQwen2Config
    config: TyrQwen2Config
    _no_split_modules = ["TyrQwen2DecoderLayer"]
    _can_record_outputs = {"hidden_states": TyrQwen2DecoderLayer, "attentions": Qwen2Attention}
    base_model_class = TyrQwen2Model


__all__ = ["TyrQwen2Config", "TyrQwen2Model", "TyrQwen2ForCausalLM"]
