"""TyrQwen2ForCausalLM and TyrQwen3ForCausalLM for vLLM: tyr's heterogeneous layer loop (model.py) with each
family's attention and MLP as vLLM runs them.

- Qwen3: vLLM's own Qwen3Attention (q_norm / k_norm over head_dim before RoPE, explicit head_dim) and Qwen3MLP.
- Qwen2: vLLM's Qwen2Attention derives head_dim from hidden_size / heads, which a layer with pruned heads breaks,
  so the attention is vLLM's LlamaAttention with Qwen2's bias layout (q/k/v biases, none on o_proj) and the
  global head_dim: the same math as Qwen2Attention (vLLM itself uses that class for Llama-like models with
  ``qkv_bias``). The MLP is vLLM's Qwen2MLP.

The outer model (embedding, compiled layer loop, final norm, LM head, tied embeddings, weight loading with fused
qkv / gate_up) is vLLM's LlamaForCausalLM, whose structure and tensor names are Qwen2's and Qwen3's too.
"""

from __future__ import annotations

from torch import nn

from vllm.config import VllmConfig
from vllm.model_executor.models.llama import LlamaAttention
from vllm.model_executor.models.qwen2 import Qwen2MLP
from vllm.model_executor.models.qwen3 import Qwen3Attention, Qwen3MLP
from vllm.v1.attention.backend import AttentionType

from tyr.exporters.vllm.model import TyrLlamaDecoderLayer, TyrLlamaForCausalLM


class TyrQwen2DecoderLayer(TyrLlamaDecoderLayer):
    def make_attention(self, config, vllm_config: VllmConfig, prefix: str) -> nn.Module:
        return LlamaAttention(
            config=config,
            hidden_size=config.hidden_size,
            num_heads=config.num_attention_heads,
            num_kv_heads=config.num_key_value_heads,
            max_position_embeddings=config.max_position_embeddings,
            quant_config=vllm_config.quant_config,
            bias=True,
            bias_o_proj=False,
            cache_config=vllm_config.cache_config,
            prefix=prefix,
            attn_type=AttentionType.DECODER,
        )

    def make_mlp(self, config, vllm_config: VllmConfig, prefix: str) -> nn.Module:
        return Qwen2MLP(hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
                        hidden_act=config.hidden_act, quant_config=vllm_config.quant_config, prefix=prefix)


class TyrQwen3DecoderLayer(TyrLlamaDecoderLayer):
    def make_attention(self, config, vllm_config: VllmConfig, prefix: str) -> nn.Module:
        return Qwen3Attention(
            hidden_size=config.hidden_size,
            num_heads=config.num_attention_heads,
            num_kv_heads=config.num_key_value_heads,
            rope_parameters=config.rope_parameters,
            max_position=config.max_position_embeddings,
            head_dim=config.head_dim,
            rms_norm_eps=config.rms_norm_eps,
            qkv_bias=getattr(config, "attention_bias", False),
            cache_config=vllm_config.cache_config,
            quant_config=vllm_config.quant_config,
            prefix=prefix,
            attn_type=AttentionType.DECODER,
        )

    def make_mlp(self, config, vllm_config: VllmConfig, prefix: str) -> nn.Module:
        return Qwen3MLP(hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
                        hidden_act=config.hidden_act, quant_config=vllm_config.quant_config, prefix=prefix)


class TyrQwen2ForCausalLM(TyrLlamaForCausalLM):
    decoder_layer_class = TyrQwen2DecoderLayer


class TyrQwen3ForCausalLM(TyrLlamaForCausalLM):
    decoder_layer_class = TyrQwen3DecoderLayer
