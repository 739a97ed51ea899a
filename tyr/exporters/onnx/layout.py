"""The graph's interface: input/output names, per-layer KV shapes and named dynamic axes.

One graph serves prefill (past_sequence = 0) and decode. Only layers that keep attention have past/present
tensors, each with its own KV-head count; names carry the model's layer index (``past_key_values.3.key`` belongs to
decoder layer 3), so a layer without attention leaves a gap. onnxruntime-genai discovers the layer indices from
the names and the per-layer KV-head counts from the inputs' static shapes.
"""

from __future__ import annotations

from pydantic import BaseModel

PAST_KEY = "past_key_values.%d.key"
PAST_VALUE = "past_key_values.%d.value"
PRESENT_KEY = "present.%d.key"
PRESENT_VALUE = "present.%d.value"
TOKEN_INPUTS = ("input_ids", "attention_mask", "position_ids")
LOGITS = "logits"

# Named dynamic axes. A past tensor is [batch, kv_heads, past_sequence, head_dim], a present one
# [batch, kv_heads, total_sequence, head_dim]; kv_heads and head_dim are static per layer.
BATCH, SEQUENCE, PAST_SEQUENCE, TOTAL_SEQUENCE = "batch", "sequence", "past_sequence", "total_sequence"


class KvLayer(BaseModel):
    """One decoder layer that keeps attention, and so has a KV cache."""

    layer: int  # index among all decoder layers (names use it)
    kv_heads: int
    head_dim: int

    @property
    def past_names(self) -> tuple[str, str]:
        return PAST_KEY % self.layer, PAST_VALUE % self.layer

    @property
    def present_names(self) -> tuple[str, str]:
        return PRESENT_KEY % self.layer, PRESENT_VALUE % self.layer


class GraphLayout(BaseModel):
    num_layers: int
    kv_layers: list[KvLayer]
    vocab_size: int

    @property
    def input_names(self) -> list[str]:
        return [*TOKEN_INPUTS, *(name for kv in self.kv_layers for name in kv.past_names)]

    @property
    def output_names(self) -> list[str]:
        return [LOGITS, *(name for kv in self.kv_layers for name in kv.present_names)]

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        axes = {"input_ids": {0: BATCH, 1: SEQUENCE}, "attention_mask": {0: BATCH, 1: TOTAL_SEQUENCE},
                "position_ids": {0: BATCH, 1: SEQUENCE}, LOGITS: {0: BATCH, 1: SEQUENCE}}
        for kv in self.kv_layers:
            axes.update({name: {0: BATCH, 2: PAST_SEQUENCE} for name in kv.past_names})
            axes.update({name: {0: BATCH, 2: TOTAL_SEQUENCE} for name in kv.present_names})
        return axes


def graph_layout(model) -> GraphLayout:
    """The layout of a loaded causal LM: a dense Llama/Mistral/Qwen2/Qwen3/Gemma 3 or a tyr model of those families."""
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_layers = []
    for i, layer in enumerate(model.model.layers):
        attention = getattr(layer, "self_attn", None)
        if attention is not None:
            kv_layers.append(KvLayer(layer=i, kv_heads=attention.k_proj.out_features // head_dim, head_dim=head_dim))
    return GraphLayout(num_layers=len(model.model.layers), kv_layers=kv_layers, vocab_size=config.vocab_size)
