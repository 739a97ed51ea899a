"""A stand-in pruned model for export tests and speed benchmarks: magnitude-chosen heads and channels.

Export and runtime speed depend on the pruned shapes, not on which heads or channels are kept, so this builds a
realistic heterogeneous model without the real (search-based) pruner: every layer gets its own keep fraction
(spread around the target), whole KV groups with the same number of query heads each (GQA-consistent), and FFN
widths rounded to ``ffn_multiple``; the total decoder parameters land within about 1% of the target.
Heads and channels are ranked by weight magnitude.
"""

from __future__ import annotations

import torch

from tyr.errors import TyrError
from tyr.models.facts import LayerWidth, layer_params, layer_widths
from tyr.models.slicing import LayerKeep


def _layer_fractions(num_layers: int, keep: float, spread: float) -> list[float]:
    # A fixed permutation of evenly spaced offsets: widths vary per layer without randomness.
    offsets = [((i * 7) % num_layers) / max(num_layers - 1, 1) - 0.5 for i in range(num_layers)]
    return [min(1.0, max(0.05, keep + spread * o)) for o in offsets]


def _head_scores(layer, head_dim: int) -> torch.Tensor:
    attention = layer.self_attn
    q = attention.q_proj.weight.view(-1, head_dim, attention.q_proj.in_features)
    o = attention.o_proj.weight.view(attention.o_proj.out_features, -1, head_dim)
    return q.norm(dim=(1, 2)) * o.norm(dim=(0, 2))


def _ffn_scores(layer) -> torch.Tensor:
    mlp = layer.mlp
    return mlp.down_proj.weight.norm(dim=0) * (mlp.up_proj.weight.norm(dim=1) + mlp.gate_proj.weight.norm(dim=1))


@torch.no_grad()
def magnitude_keeps(model, keep: float = 0.5, spread: float = 0.4, ffn_multiple: int = 16) -> list[LayerKeep]:
    """Keep sets (for ``slicing.slice_model``) holding about ``keep`` of the decoder layers' parameters."""
    if not 0 < keep <= 1:
        raise TyrError(f"keep fraction must be in (0, 1], got {keep}")
    config = model.config
    widths = layer_widths(config)
    head_dim = config.head_dim
    dense = [sum(layer_params(config, w)) for w in widths]
    target_total = keep * sum(dense)
    fractions = _layer_fractions(len(widths), keep, spread)

    attention_choice: list[tuple[int, int]] = []  # (kv groups, query heads per group) per layer
    ffn_target: list[float] = []
    for width, fraction, layer_total in zip(widths, fractions, dense):
        if width.num_attention_heads == 0:
            attention_choice.append((0, 0))
        else:
            per_group = width.num_attention_heads // width.num_key_value_heads
            options = [(g, q) for g in range(1, width.num_key_value_heads + 1) for q in range(1, per_group + 1)]
            dense_attn = layer_params(config, width)[0]
            attention_choice.append(min(options, key=lambda gq: abs(
                layer_params(config, LayerWidth(num_attention_heads=gq[0] * gq[1], num_key_value_heads=gq[0],
                                                intermediate_size=0))[0] - fraction * dense_attn)))
        ffn_target.append(fraction * width.intermediate_size)

    def ffn_widths(scale: float) -> list[int]:
        return [min(w.intermediate_size, max(ffn_multiple, int(round(t * scale / ffn_multiple)) * ffn_multiple))
                if w.intermediate_size else 0 for w, t in zip(widths, ffn_target)]

    def total(ffn: list[int]) -> int:
        return sum(sum(layer_params(config, LayerWidth(num_attention_heads=g * q, num_key_value_heads=g,
                                                       intermediate_size=f)))
                   for (g, q), f in zip(attention_choice, ffn))

    low, high = 0.0, 4.0  # bisect the FFN scale so attention rounding is absorbed by the FFN widths
    for _ in range(40):
        mid = (low + high) / 2
        low, high = (mid, high) if total(ffn_widths(mid)) < target_total else (low, mid)
    ffn = ffn_widths(high)

    keeps = []
    for layer, width, (groups, per_group), ffn_width in zip(model.model.layers, widths, attention_choice, ffn):
        heads: list[int] = []
        if groups:
            scores = _head_scores(layer, head_dim).view(width.num_key_value_heads, -1)
            top_groups = scores.sum(1).topk(groups).indices.tolist()
            rep = width.num_attention_heads // width.num_key_value_heads
            heads = sorted(g * rep + h for g in top_groups for h in scores[g].topk(per_group).indices.tolist())
        channels = sorted(_ffn_scores(layer).topk(ffn_width).indices.tolist()) if ffn_width else []
        keeps.append(LayerKeep(keep_heads=heads, keep_ffn=channels))
    return keeps
