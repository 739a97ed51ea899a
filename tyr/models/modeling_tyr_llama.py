# Copyright 2026 the tyr authors. Apache License 2.0.
"""Heterogeneous-width Llama: each decoder layer has its own query heads, KV heads and FFN width.

This file is self-contained (it imports only torch and transformers) because it is copied next to every
exported model and referenced from config.json's ``auto_map``: ``AutoModelForCausalLM.from_pretrained(dir,
trust_remote_code=True)`` then works on a machine without tyr. With tyr installed, ``import tyr`` registers
these classes and no remote code is needed.

The per-layer sizes live in transformers' own ``per_layer_config`` ({layer: {num_attention_heads,
num_key_value_heads, intermediate_size}}); the global fields keep the dense model's sizes. A width of 0 removes
that layer's attention or MLP entirely (with its norm).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.models.llama.configuration_llama import LlamaConfig
from transformers.models.llama.modeling_llama import (
    LlamaAttention,
    LlamaDecoderLayer,
    LlamaForCausalLM,
    LlamaMLP,
    LlamaModel,
    LlamaPreTrainedModel,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
)
from transformers.modeling_layers import GradientCheckpointingLayer

PER_LAYER_FIELDS = ("num_attention_heads", "num_key_value_heads", "intermediate_size")


class HeterogeneousWidths:
    """Config mixin: ``per_layer_config`` holds each layer's widths (shared by every tyr family's config)."""

    def __init__(self, per_layer_config: dict | None = None, **kwargs):
        # Per-layer sizes vary by design; code that reads the global (dense) value knows what it gets.
        kwargs["allow_global_per_layer_attribute_access"] = True
        super().__init__(per_layer_config=per_layer_config, **kwargs)
        if per_layer_config is not None:
            validate_layer_widths(self)

    def layer_widths(self) -> list[tuple[int, int, int]]:
        """(num_attention_heads, num_key_value_heads, intermediate_size) of every decoder layer."""
        return [tuple(getattr(layer, f) for f in PER_LAYER_FIELDS) for layer in self.per_layer_config]


class TyrLlamaConfig(HeterogeneousWidths, LlamaConfig):
    model_type = "tyr_llama"
    __init__ = HeterogeneousWidths.__init__  # in the class body: transformers' config dataclass would replace it


def validate_layer_widths(config: HeterogeneousWidths) -> None:
    """Raise ValueError naming the field when a layer's widths cannot run in standard GQA kernels."""
    dense_heads, dense_kv = config.num_attention_heads, config.num_key_value_heads
    for i, layer in enumerate(config.per_layer_config):
        heads, kv_heads, ffn = (getattr(layer, f) for f in PER_LAYER_FIELDS)
        where = f"per_layer_config[{i}]"
        if not 0 <= heads <= dense_heads:
            raise ValueError(f"{where}.num_attention_heads={heads} is outside [0, {dense_heads}]")
        if not 0 <= kv_heads <= dense_kv:
            raise ValueError(f"{where}.num_key_value_heads={kv_heads} is outside [0, {dense_kv}]")
        if (heads == 0) != (kv_heads == 0):
            raise ValueError(f"{where}: num_attention_heads={heads} and num_key_value_heads={kv_heads} "
                             "must both be 0 (attention removed) or both positive")
        if heads and heads % kv_heads:
            raise ValueError(f"{where}.num_attention_heads={heads} is not a multiple of "
                             f"num_key_value_heads={kv_heads} (GQA kernels need whole groups)")
        if not 0 <= ffn <= config.intermediate_size:
            raise ValueError(f"{where}.intermediate_size={ffn} is outside [0, {config.intermediate_size}]")


class TyrLlamaDecoderLayer(LlamaDecoderLayer):
    """A Llama decoder layer whose attention or MLP may be absent.

    ``cache_slot`` is this layer's index among the layers that keep attention: the KV cache holds only those, so
    ``DynamicCache.get_seq_length()`` (which reads slot 0) stays right when layer 0 has no attention.
    Other families (Qwen2, Qwen3) subclass it with their own attention, MLP and norm classes.
    """

    attention_class, mlp_class, norm_class = LlamaAttention, LlamaMLP, LlamaRMSNorm

    def __init__(self, config: LlamaConfig, cache_slot: int | None):
        GradientCheckpointingLayer.__init__(self)
        self.hidden_size = config.hidden_size
        has_attention = config.num_attention_heads > 0
        has_mlp = config.intermediate_size > 0
        norm = self.norm_class
        self.self_attn = self.attention_class(config=config, layer_idx=cache_slot) if has_attention else None
        self.input_layernorm = norm(config.hidden_size, eps=config.rms_norm_eps) if has_attention else None
        self.mlp = self.mlp_class(config) if has_mlp else None
        self.post_attention_layernorm = norm(config.hidden_size, eps=config.rms_norm_eps) if has_mlp else None

    def forward(self, hidden_states, attention_mask=None, position_ids=None, past_key_values=None,
                use_cache=False, position_embeddings=None, **kwargs) -> torch.Tensor:
        if self.self_attn is not None:
            attn_out, _ = self.self_attn(
                hidden_states=self.input_layernorm(hidden_states), attention_mask=attention_mask,
                position_ids=position_ids, past_key_values=past_key_values, use_cache=use_cache,
                position_embeddings=position_embeddings, **kwargs)
            hidden_states = hidden_states + attn_out
        if self.mlp is not None:
            hidden_states = hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))
        return hidden_states


class TyrLlamaPreTrainedModel(LlamaPreTrainedModel):
    config_class = TyrLlamaConfig
    config: TyrLlamaConfig
    _no_split_modules = ["TyrLlamaDecoderLayer"]
    _can_record_outputs = {"hidden_states": TyrLlamaDecoderLayer, "attentions": LlamaAttention}


class TyrLlamaModel(TyrLlamaPreTrainedModel, LlamaModel):
    decoder_layer_class, norm_class, rotary_class = TyrLlamaDecoderLayer, LlamaRMSNorm, LlamaRotaryEmbedding

    def __init__(self, config: TyrLlamaConfig):
        TyrLlamaPreTrainedModel.__init__(self, config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        layers, next_slot = [], 0
        for layer_config in config.per_layer_config:
            has_attention = layer_config.num_attention_heads > 0
            layers.append(self.decoder_layer_class(layer_config, next_slot if has_attention else None))
            next_slot += has_attention
        self.layers = nn.ModuleList(layers)
        self.norm = self.norm_class(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = self.rotary_class(config=config)
        self.gradient_checkpointing = False
        self.post_init()

    # forward: LlamaModel.forward, unchanged.


class TyrLlamaForCausalLM(TyrLlamaPreTrainedModel, LlamaForCausalLM):
    base_model_class = TyrLlamaModel

    def __init__(self, config: TyrLlamaConfig):
        TyrLlamaPreTrainedModel.__init__(self, config)
        self.model = self.base_model_class(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    # forward and generate: LlamaForCausalLM's, unchanged.


__all__ = ["HeterogeneousWidths", "TyrLlamaConfig", "TyrLlamaModel", "TyrLlamaForCausalLM", "TyrLlamaPreTrainedModel"]
