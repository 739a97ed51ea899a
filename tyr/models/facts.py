"""Facts about a model's structure, in one place for every package: per-layer widths, parameter counts, the width a
sparsity level leaves, and the tensors a safetensors folder holds.

The facts below are those of the Llama family, the one tyr prunes today: Llama and Mistral checkpoints, and
tyr_llama, the heterogeneous format tyr writes. Their decoder layers are GQA attention (q/k/v/o projections without
bias, an RMSNorm before it) and a SiLU-gated MLP (gate/up/down, an RMSNorm before it), and a layer's size follows
from three widths: query heads, KV heads and FFN channels. A new family (Qwen2/3 with q/k/v biases or q/k norms,
Gemma 3 with four norms per layer) adds its own counts and tensor names here, next to these, so the compressor, the
exporters and the benchmarks keep reading them from one module.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import NamedTuple

from safetensors import SafetensorError, safe_open

from tyr.errors import TyrError


# ----- widths -----

class LayerWidth(NamedTuple):
    """The widths of one decoder layer (0 heads: no attention block; 0 FFN channels: no MLP block)."""

    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int


def layer_widths(config) -> list[LayerWidth]:
    """Every decoder layer's widths: a tyr_llama config's per-layer sizes, or a dense config's sizes in each layer."""
    layers = getattr(config, "per_layer_config", None)
    if layers is None:
        return [LayerWidth(config.num_attention_heads, config.num_key_value_heads,
                           config.intermediate_size)] * config.num_hidden_layers
    return [LayerWidth(c.num_attention_heads, c.num_key_value_heads, c.intermediate_size) for c in layers]


# ----- parameter counts -----

def layer_params(config, width: LayerWidth) -> tuple[int, int]:
    """(attention, MLP) weight parameters of a Llama decoder layer of ``width``, each block's norm included."""
    hidden, head_dim = config.hidden_size, config.head_dim
    attn = (2 * width.num_attention_heads + 2 * width.num_key_value_heads) * head_dim * hidden
    mlp = 3 * width.intermediate_size * hidden
    return attn + (hidden if attn else 0), mlp + (hidden if mlp else 0)


def decoder_params(config) -> int:
    """Weight parameters of all decoder layers (embeddings, final norm and LM head excluded): what sparsity counts."""
    return sum(sum(layer_params(config, width)) for width in layer_widths(config))


def module_params(model) -> list[tuple[int, int]]:
    """(attention, MLP) parameters of every decoder layer as the loaded modules hold them (biases and norms
    included); the counts the pruning report and the search budget use."""
    out = []
    for layer in model.model.layers:
        attn = sum(p.numel() for m in (layer.self_attn, layer.input_layernorm) if m is not None for p in m.parameters())
        mlp = sum(p.numel() for m in (layer.mlp, layer.post_attention_layernorm) if m is not None
                  for p in m.parameters())
        out.append((attn, mlp))
    return out


def total_params(model) -> int:
    """Every parameter of a loaded model, a tied embedding and LM head counted once."""
    return sum(p.numel() for p in model.parameters())


# ----- width rules: what a sparsity level keeps -----

def ffn_width(ffn: int, level: float) -> int:
    """FFN channels kept at sparsity ``level``: (1 - level) · ffn, rounded half up."""
    return max(0, min(ffn, math.floor((1 - level) * ffn + 0.5)))


def gqa_attention_params(groups: int, heads_per_group: int) -> int:
    """Attention weights of a GQA configuration in units of head_dim · hidden: q and o (2·g·r), k and v (2·g)."""
    return 2 * groups * heads_per_group + 2 * groups


def gqa_widths(heads: int, kv_heads: int, level: float) -> list[tuple[int, int]]:
    """The GQA configurations (KV groups kept, query heads per group) whose attention size is closest to
    (1 - level) · dense, so every pruned layer still runs in standard GQA kernels.

    Ties in distance go to the less pruned size; all configurations of that size are returned ((0, 0) = removed).
    """
    if heads == 0:
        return [(0, 0)]
    per_group = heads // kv_heads
    configs = [(0, 0)] + [(g, r) for g in range(1, kv_heads + 1) for r in range(1, per_group + 1)]
    goal = (1 - level) * gqa_attention_params(kv_heads, per_group)
    size = min({gqa_attention_params(g, r) for g, r in configs}, key=lambda p: (abs(p - goal), -p))
    return sorted(c for c in configs if gqa_attention_params(*c) == size)


# ----- a safetensors folder -----

def weight_files(folder: str | Path) -> list[Path]:
    """The safetensors files of a model folder: those its index lists, else every *.safetensors file."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError) as err:
            raise TyrError(f"{index} is not a valid safetensors index ({err})") from err
        files = [folder / name for name in names]
        if missing := [f.name for f in files if not f.is_file()]:
            raise TyrError(f"{folder}: weight files listed in {index.name} are missing: {missing}")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise TyrError(f"{folder} has no *.safetensors weights")
    return files


def file_shapes(path: str | Path) -> dict[str, list[int]]:
    """Tensor name -> shape of one safetensors file, without loading a tensor; TyrError if it is cut short or not
    a safetensors file."""
    try:
        with safe_open(path, framework="pt") as f:
            return {name: list(f.get_slice(name).get_shape()) for name in f.keys()}
    except (SafetensorError, OSError) as err:
        raise TyrError(f"{path} is truncated or not a readable safetensors file ({err})") from err


def tensor_shapes(folder: str | Path) -> dict[str, list[int]]:
    """Tensor name -> shape over every weight file of a model folder."""
    shapes: dict[str, list[int]] = {}
    for path in weight_files(folder):
        shapes.update(file_shapes(path))
    return shapes
