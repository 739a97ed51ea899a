# Copyright 2026 the tyr authors. Apache License 2.0.
"""Heterogeneous-width Qwen3: each decoder layer has its own query heads, KV heads and FFN width.

The Llama layer of modeling_tyr_llama.py (copied next to this file) with transformers' Qwen3 attention: an RMSNorm
over head_dim on every query and key head (q_norm, k_norm: one weight shared by all heads, so pruning heads leaves
it whole) before the rotary embedding, and head_dim set independently of hidden_size / heads. Sliding-window
attention is off, as in the released models (tyr refuses configs that turn it on), so every layer is a
full-attention layer and LlamaModel's forward applies unchanged.
"""

from __future__ import annotations

from transformers.models.qwen3.configuration_qwen3 import Qwen3Config
from transformers.models.qwen3.modeling_qwen3 import Qwen3Attention, Qwen3MLP, Qwen3RMSNorm, Qwen3RotaryEmbedding

from .modeling_tyr_llama import HeterogeneousWidths, TyrLlamaDecoderLayer, TyrLlamaForCausalLM, TyrLlamaModel


class TyrQwen3Config(HeterogeneousWidths, Qwen3Config):
    model_type = "tyr_qwen3"
    __init__ = HeterogeneousWidths.__init__  # in the class body: transformers' config dataclass would replace it


class TyrQwen3DecoderLayer(TyrLlamaDecoderLayer):
    attention_class, mlp_class, norm_class = Qwen3Attention, Qwen3MLP, Qwen3RMSNorm


class TyrQwen3Model(TyrLlamaModel):
    config_class = TyrQwen3Config
    config: TyrQwen3Config
    _no_split_modules = ["TyrQwen3DecoderLayer"]
    _can_record_outputs = {"hidden_states": TyrQwen3DecoderLayer, "attentions": Qwen3Attention}
    decoder_layer_class, norm_class, rotary_class = TyrQwen3DecoderLayer, Qwen3RMSNorm, Qwen3RotaryEmbedding


class TyrQwen3ForCausalLM(TyrLlamaForCausalLM):
    config_class = TyrQwen3Config
    config: TyrQwen3Config
    _no_split_modules = ["TyrQwen3DecoderLayer"]
    _can_record_outputs = {"hidden_states": TyrQwen3DecoderLayer, "attentions": Qwen3Attention}
    base_model_class = TyrQwen3Model


__all__ = ["TyrQwen3Config", "TyrQwen3Model", "TyrQwen3ForCausalLM"]
