"""TyrLlamaForCausalLM for vLLM: vLLM's own Llama layers, each decoder layer at its own width.

Everything that runs is vLLM's (LlamaAttention, LlamaMLP, RMSNorm, VocabParallelEmbedding, ParallelLMHead, the
compiled LlamaModel loop), so a pruned model runs at vLLM's native speed. Only the construction differs: decoder
layer i is built from ``hf_config.per_layer_config[i]`` (its query heads, KV heads and FFN width). A layer whose
attention was removed creates no ``Attention`` module, so vLLM allocates no KV cache for it (vLLM sizes the cache
from the Attention layers it finds, by layer name); each remaining layer's cache has that layer's KV-head count.
"""

from __future__ import annotations

import torch
from torch import nn

from vllm.config import VllmConfig
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.models.llama import LlamaAttention, LlamaForCausalLM, LlamaMLP
from vllm.model_executor.models.utils import extract_layer_index
from vllm.v1.attention.backend import AttentionType


def add_and_norm(norm: nn.Module, hidden_states: torch.Tensor, residual: torch.Tensor | None):
    """vLLM's fused residual add + norm (RMSNorm, GemmaRMSNorm). The first block that runs (an attention, or the
    MLP of a layer whose attention was removed) has no residual pending yet."""
    if residual is None:
        return norm(hidden_states), hidden_states
    return norm(hidden_states, residual)


class TyrLlamaDecoderLayer(nn.Module):
    """vLLM's LlamaDecoderLayer with this layer's widths; attention or MLP may be absent (width 0).

    vLLM's fused RMSNorm(x, residual) adds the pending residual before normalizing; a missing block simply leaves
    (hidden_states, residual) for the next block, as in vLLM's DeciLM (nemotron-nas) layer.
    """

    def __init__(self, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        global_config = vllm_config.model_config.hf_config
        config = global_config.per_layer_config[extract_layer_index(prefix)]
        self.hidden_size = config.hidden_size
        self.has_attention = config.num_attention_heads > 0
        self.has_mlp = config.intermediate_size > 0
        if self.has_attention:
            self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
            self.self_attn = self.make_attention(config, vllm_config, f"{prefix}.self_attn")
        if self.has_mlp:
            self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
            self.mlp = self.make_mlp(config, vllm_config, f"{prefix}.mlp")

    def make_attention(self, config, vllm_config: VllmConfig, prefix: str) -> nn.Module:
        """This layer's attention module (other families override it with their own vLLM attention class)."""
        # Same bias rules as LlamaDecoderLayer.
        attention_bias = getattr(config, "attention_bias", False) or getattr(config, "bias", False)
        bias_o_proj = attention_bias
        if hasattr(config, "qkv_bias"):
            attention_bias = config.qkv_bias
        return LlamaAttention(
            config=config,
            hidden_size=config.hidden_size,
            num_heads=config.num_attention_heads,
            num_kv_heads=config.num_key_value_heads,
            max_position_embeddings=getattr(config, "max_position_embeddings", 8192),
            quant_config=vllm_config.quant_config,
            bias=attention_bias,
            bias_o_proj=bias_o_proj,
            cache_config=vllm_config.cache_config,
            prefix=prefix,
            attn_type=AttentionType.DECODER,
        )

    def make_mlp(self, config, vllm_config: VllmConfig, prefix: str) -> nn.Module:
        return LlamaMLP(
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            hidden_act=config.hidden_act,
            quant_config=vllm_config.quant_config,
            bias=getattr(config, "mlp_bias", False),
            prefix=prefix,
        )

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor, residual: torch.Tensor | None,
                **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.has_attention:
            hidden_states, residual = add_and_norm(self.input_layernorm, hidden_states, residual)
            hidden_states = self.self_attn(positions=positions, hidden_states=hidden_states)
        if self.has_mlp:
            hidden_states, residual = add_and_norm(self.post_attention_layernorm, hidden_states, residual)
            hidden_states = self.mlp(hidden_states)
        return hidden_states, residual


class TyrLlamaForCausalLM(LlamaForCausalLM):
    """vLLM's LlamaForCausalLM (embedding, compiled layer loop, final norm, LM head, weight loading) with
    heterogeneous decoder layers. Weight names are standard Llama names; removed blocks have no tensors."""

    decoder_layer_class = TyrLlamaDecoderLayer

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        config = vllm_config.model_config.hf_config
        if not getattr(config, "is_heterogeneous", False):
            raise ValueError("TyrLlamaForCausalLM needs a config with per_layer_config (model_type tyr_llama)")
        if sum(c.num_attention_heads > 0 or c.intermediate_size > 0 for c in config.per_layer_config) == 0:
            raise ValueError("every decoder layer is empty: nothing to run")
        super().__init__(vllm_config=vllm_config, prefix=prefix, layer_type=self.decoder_layer_class)
