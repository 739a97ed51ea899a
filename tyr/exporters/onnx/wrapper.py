"""A causal LM with flat tensor inputs and outputs, the form torch.onnx.export traces.

The exporter cannot trace a Cache object, so the past key/values arrive as flat tensors and a DynamicCache is
rebuilt inside forward. The cache holds only layers that keep attention, in order: slot s is the s-th such layer,
which is the slot the tyr model's attention modules use (compacted cache slots) and, for a dense model, the layer
index itself.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import DynamicCache

from tyr.exporters.onnx.layout import GraphLayout


class FlatCacheCausalLM(nn.Module):
    def __init__(self, model: nn.Module, layout: GraphLayout):
        super().__init__()
        self.model = model
        self.num_kv_layers = len(layout.kv_layers)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        cache = DynamicCache()
        for slot in range(self.num_kv_layers):
            cache.update(past[2 * slot], past[2 * slot + 1], slot)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=cache, use_cache=True)
        present = []
        for slot in range(self.num_kv_layers):
            present += [cache.layers[slot].keys, cache.layers[slot].values]
        return (out.logits, *present)


def example_inputs(layout: GraphLayout, dtype: torch.dtype, batch: int = 2, sequence: int = 5,
                   past: int = 3) -> tuple[torch.Tensor, ...]:
    """Tracing inputs: a non-empty past (so the cache's concat path is traced) and a left-padded row (so no
    all-ones-mask shortcut is baked in)."""
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, layout.vocab_size, (batch, sequence), generator=generator)
    attention_mask = torch.ones(batch, past + sequence, dtype=torch.long)
    attention_mask[0, :2] = 0
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)[:, past:]
    tensors = []
    for kv in layout.kv_layers:
        tensors += [torch.randn(batch, kv.kv_heads, past, kv.head_dim, generator=generator).to(dtype)
                    for _ in range(2)]
    return (input_ids, attention_mask, position_ids, *tensors)
