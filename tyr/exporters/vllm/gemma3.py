"""TyrGemma3ForCausalLM for vLLM: vLLM's own Gemma 3 layers, each decoder layer at its own width.

Everything that runs is vLLM's: Gemma3Attention (q_norm / k_norm, query_pre_attn_scalar scaling, the rotary table
and sliding window of its layer's type, read from ``layer_types`` at its own layer index), Gemma3MLP (GeGLU),
GemmaRMSNorm ((1 + w), fused with the residual add), the scaled embedding, the final logit soft-capping and the
weight loading of Gemma3Model / Gemma3ForCausalLM. Only the construction differs: decoder layer i is built from
``hf_config.per_layer_config[i]``; a layer whose attention was removed creates no Attention module, so vLLM keeps
no KV cache for it, and each remaining layer's cache has its own KV heads and window.
"""

from __future__ import annotations

import torch
from torch import nn

from vllm.compilation.decorators import support_torch_compile
from vllm.config import VllmConfig
from vllm.model_executor.layers.layernorm import GemmaRMSNorm
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.models.gemma3 import Gemma3Attention, Gemma3ForCausalLM, Gemma3MLP, Gemma3Model
from vllm.model_executor.models.utils import (
    extract_layer_index,
    make_empty_intermediate_tensors_factory,
    make_layers,
    maybe_prefix,
)

from tyr.exporters.vllm.model import add_and_norm


class TyrGemma3DecoderLayer(nn.Module):
    """vLLM's Gemma3DecoderLayer with this layer's widths; attention or MLP may be absent (with its two norms).

    GemmaRMSNorm(x, residual) adds the pending residual before normalizing, so a missing block simply leaves
    (hidden_states, residual) for the next block, as in tyr's Llama layer for vLLM.
    """

    def __init__(self, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config.per_layer_config[extract_layer_index(prefix)]
        self.has_attention = config.num_attention_heads > 0
        self.has_mlp = config.intermediate_size > 0
        hidden, eps = config.hidden_size, config.rms_norm_eps
        if self.has_attention:
            self.input_layernorm = GemmaRMSNorm(hidden, eps=eps)
            self.post_attention_layernorm = GemmaRMSNorm(hidden, eps=eps)
            self.self_attn = Gemma3Attention(
                config=config, hidden_size=hidden, num_heads=config.num_attention_heads,
                num_kv_heads=config.num_key_value_heads, head_dim=config.head_dim,
                max_position_embeddings=config.max_position_embeddings, cache_config=vllm_config.cache_config,
                quant_config=vllm_config.quant_config, attn_logits_soft_cap=None, prefix=f"{prefix}.self_attn")
        if self.has_mlp:
            self.pre_feedforward_layernorm = GemmaRMSNorm(hidden, eps=eps)
            self.post_feedforward_layernorm = GemmaRMSNorm(hidden, eps=eps)
            self.mlp = Gemma3MLP(hidden_size=hidden, intermediate_size=config.intermediate_size,
                                 hidden_activation=config.hidden_activation, quant_config=vllm_config.quant_config,
                                 prefix=f"{prefix}.mlp")

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor, residual: torch.Tensor | None,
                **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.has_attention:
            hidden_states, residual = add_and_norm(self.input_layernorm, hidden_states, residual)
            hidden_states = self.self_attn(positions=positions, hidden_states=hidden_states, **kwargs)
            hidden_states = self.post_attention_layernorm(hidden_states)
        if self.has_mlp:
            hidden_states, residual = add_and_norm(self.pre_feedforward_layernorm, hidden_states, residual)
            hidden_states = self.post_feedforward_layernorm(self.mlp(hidden_states))
        return hidden_states, residual


@support_torch_compile
class TyrGemma3Model(nn.Module):
    """vLLM's Gemma3Model (its forward, embedding scale and weight loading) over heterogeneous layers.

    Not a subclass: Gemma3Model's constructor builds same-width layers, whose Attention modules would register
    KV caches under the layer names."""

    hf_to_vllm_mapper = Gemma3Model.hf_to_vllm_mapper
    embed_input_ids = Gemma3Model.embed_input_ids
    forward = Gemma3Model.forward
    load_weights = Gemma3Model.load_weights

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.config, self.quant_config = config, vllm_config.quant_config
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size,
                                                   quant_config=vllm_config.quant_config,
                                                   prefix=f"{prefix}.embed_tokens")
        self.start_layer, self.end_layer, self.layers = make_layers(
            config.num_hidden_layers, lambda prefix: TyrGemma3DecoderLayer(vllm_config, prefix=prefix),
            prefix=f"{prefix}.layers")
        self.norm = GemmaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        # As Gemma3Model: sqrt(hidden_size), cast to the model's dtype with the other buffers.
        self.register_buffer("normalizer", torch.tensor(config.hidden_size ** 0.5), persistent=False)
        self.make_empty_intermediate_tensors = make_empty_intermediate_tensors_factory(
            ["hidden_states", "residual"], config.hidden_size)


class TyrGemma3ForCausalLM(Gemma3ForCausalLM):
    """vLLM's Gemma3ForCausalLM (LM head tied or not, soft-capped logits, weight loading) over TyrGemma3Model."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        config = vllm_config.model_config.hf_config
        if not getattr(config, "is_heterogeneous", False):
            raise ValueError("TyrGemma3ForCausalLM needs a config with per_layer_config (model_type tyr_gemma3)")
        if sum(c.num_attention_heads > 0 or c.intermediate_size > 0 for c in config.per_layer_config) == 0:
            raise ValueError("every decoder layer is empty: nothing to run")
        nn.Module.__init__(self)
        self.config, self.quant_config = config, vllm_config.quant_config
        self.model = TyrGemma3Model(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "model"))
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, quant_config=vllm_config.quant_config,
                                      prefix=maybe_prefix(prefix, "lm_head"))
        if config.tie_word_embeddings:
            self.lm_head = self.lm_head.tie_weights(self.model.embed_tokens)
        self.logits_processor = LogitsProcessor(config.vocab_size, soft_cap=config.final_logit_softcapping)
        self.make_empty_intermediate_tensors = self.model.make_empty_intermediate_tensors
