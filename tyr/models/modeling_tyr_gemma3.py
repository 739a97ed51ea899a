# Copyright 2026 the tyr authors. Apache License 2.0.
"""Heterogeneous-width Gemma 3 (text): each decoder layer has its own query heads, KV heads and FFN width.

transformers' Gemma 3 pieces (copied next to this file is only modeling_tyr_llama.py, for the shared config mixin):
Gemma3Attention (q_norm / k_norm over head_dim, scaling query_pre_attn_scalar ** -0.5, the layer's sliding window),
Gemma3MLP (GeGLU with tanh-approximate GELU), Gemma3RMSNorm ((1 + w) scaling), the scaled embedding and the rotary
embedding with one table per layer type. A decoder layer has four norms: input and post-attention around the
attention, pre- and post-feedforward around the MLP; a removed block (width 0) takes its two norms with it.

Layers interleave sliding-window and full attention (``layer_types``). The KV cache holds only the layers that keep
attention (``cache_slot``, as in the Llama file), so the cache is built here from those layers' types: the
config-built cache transformers would make indexes every layer and would give a slot the wrong window.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.cache_utils import DynamicCache
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast
from transformers.models.gemma3.configuration_gemma3 import Gemma3TextConfig
from transformers.models.gemma3.modeling_gemma3 import (
    Gemma3Attention,
    Gemma3ForCausalLM,
    Gemma3MLP,
    Gemma3PreTrainedModel,
    Gemma3RMSNorm,
    Gemma3RotaryEmbedding,
    Gemma3TextModel,
    Gemma3TextScaledWordEmbedding,
)
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from .modeling_tyr_llama import HeterogeneousWidths


class TyrGemma3Config(HeterogeneousWidths, Gemma3TextConfig):
    model_type = "tyr_gemma3"
    __init__ = HeterogeneousWidths.__init__  # in the class body: transformers' config dataclass would replace it


class TyrGemma3Attention(Gemma3Attention):
    """Gemma3Attention whose cache index (``layer_idx``) is its slot, while its window follows its own layer type:
    Gemma3Attention reads the type at ``layer_types[layer_idx]``, which is another layer's once a layer before it
    lost its attention."""

    def __init__(self, config: TyrGemma3Config, cache_slot: int, layer_type: str):
        super().__init__(config, layer_idx=0)
        self.layer_idx, self.layer_type = cache_slot, layer_type
        self.is_sliding = layer_type == "sliding_attention"
        self.sliding_window = config.sliding_window if self.is_sliding else None


class TyrGemma3DecoderLayer(GradientCheckpointingLayer):
    """A Gemma 3 decoder layer whose attention or MLP may be absent (with its norms)."""

    def __init__(self, config: TyrGemma3Config, cache_slot: int | None, layer_type: str):
        super().__init__()
        self.hidden_size, self.layer_type = config.hidden_size, layer_type
        has_attention, has_mlp = config.num_attention_heads > 0, config.intermediate_size > 0
        eps = config.rms_norm_eps
        self.self_attn = TyrGemma3Attention(config, cache_slot, layer_type) if has_attention else None
        self.input_layernorm = Gemma3RMSNorm(config.hidden_size, eps=eps) if has_attention else None
        self.post_attention_layernorm = Gemma3RMSNorm(config.hidden_size, eps=eps) if has_attention else None
        self.mlp = Gemma3MLP(config) if has_mlp else None
        self.pre_feedforward_layernorm = Gemma3RMSNorm(config.hidden_size, eps=eps) if has_mlp else None
        self.post_feedforward_layernorm = Gemma3RMSNorm(config.hidden_size, eps=eps) if has_mlp else None

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, position_ids=None,
                past_key_values=None, **kwargs) -> torch.Tensor:
        if self.self_attn is not None:
            attn_out, _ = self.self_attn(
                hidden_states=self.input_layernorm(hidden_states), position_embeddings=position_embeddings,
                attention_mask=attention_mask, position_ids=position_ids, past_key_values=past_key_values, **kwargs)
            hidden_states = hidden_states + self.post_attention_layernorm(attn_out)
        if self.mlp is not None:
            mlp_out = self.mlp(self.pre_feedforward_layernorm(hidden_states))
            hidden_states = hidden_states + self.post_feedforward_layernorm(mlp_out)
        return hidden_states


class TyrGemma3PreTrainedModel(Gemma3PreTrainedModel):
    config_class = TyrGemma3Config
    config: TyrGemma3Config
    _no_split_modules = ["TyrGemma3DecoderLayer"]
    _can_record_outputs = {"hidden_states": TyrGemma3DecoderLayer, "attentions": Gemma3Attention}
    input_modalities = ("text",)


class _CacheLayers:
    """What DynamicCache(config=...) reads from a config, for the layers that keep attention only (its slots)."""

    def __init__(self, config: TyrGemma3Config):
        kept = [i for i, layer in enumerate(config.per_layer_config) if layer.num_attention_heads > 0]
        self.layer_types = [config.layer_types[i] for i in kept]
        self.per_layer_config = [config.per_layer_config[i] for i in kept]

    def get_text_config(self, decoder: bool = False):
        return self


class TyrGemma3Model(TyrGemma3PreTrainedModel, Gemma3TextModel):
    def __init__(self, config: TyrGemma3Config):
        TyrGemma3PreTrainedModel.__init__(self, config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = Gemma3TextScaledWordEmbedding(config.vocab_size, config.hidden_size, self.padding_idx,
                                                          embed_scale=config.hidden_size ** 0.5)
        layers, next_slot = [], 0
        for layer_config, layer_type in zip(config.per_layer_config, config.layer_types):
            has_attention = layer_config.num_attention_heads > 0
            layers.append(TyrGemma3DecoderLayer(layer_config, next_slot if has_attention else None, layer_type))
            next_slot += has_attention
        self.layers = nn.ModuleList(layers)
        self.norm = Gemma3RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = Gemma3RotaryEmbedding(config)
        self.gradient_checkpointing = False
        self.post_init()

    def new_cache(self) -> DynamicCache:
        """An empty cache with one layer per kept attention, each with its layer's window."""
        return DynamicCache(config=_CacheLayers(self.config))

    @merge_with_config_defaults
    @capture_outputs
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, use_cache=None, **kwargs) -> BaseModelOutputWithPast:
        # Gemma3TextModel.forward without the bidirectional variant (refused on load), with this model's cache.
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if use_cache and past_key_values is None:
            past_key_values = self.new_cache()
        if position_ids is None:
            past_seen = past_key_values.get_seq_length() if past_key_values is not None else 0
            position_ids = (torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_seen)[None]
        masks = attention_mask
        if not isinstance(masks, dict):
            mask_kwargs = {"config": self.config, "inputs_embeds": inputs_embeds, "attention_mask": attention_mask,
                           "past_key_values": past_key_values, "position_ids": position_ids}
            masks = {"full_attention": create_causal_mask(**mask_kwargs),
                     "sliding_attention": create_sliding_window_causal_mask(**mask_kwargs)}
        hidden_states = inputs_embeds
        rope = {t: self.rotary_emb(hidden_states, position_ids, t) for t in set(self.config.layer_types)}
        for layer in self.layers:
            hidden_states = layer(hidden_states, attention_mask=masks[layer.layer_type],
                                  position_embeddings=rope[layer.layer_type], position_ids=position_ids,
                                  past_key_values=past_key_values, **kwargs)
        return BaseModelOutputWithPast(last_hidden_state=self.norm(hidden_states),
                                       past_key_values=past_key_values if use_cache else None)


class TyrGemma3ForCausalLM(TyrGemma3PreTrainedModel, Gemma3ForCausalLM):
    base_model_class = TyrGemma3Model

    def __init__(self, config: TyrGemma3Config):
        TyrGemma3PreTrainedModel.__init__(self, config)
        self.model = self.base_model_class(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        # generate() builds DynamicCache(config=...) over every layer; this model's cache has its kept layers only.
        result = super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)
        cache = model_kwargs.get("past_key_values")
        if type(cache) is DynamicCache and cache.get_seq_length() == 0:
            model_kwargs["past_key_values"] = self.model.new_cache()
        return result

    # forward (final logit soft-capping included) and generate: Gemma3ForCausalLM's, unchanged.


__all__ = ["TyrGemma3Config", "TyrGemma3Model", "TyrGemma3ForCausalLM"]
