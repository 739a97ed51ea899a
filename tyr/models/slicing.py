"""From per-layer keep sets (query heads, FFN channels) to a physically smaller heterogeneous-width model.

A layer keeps whole KV groups and the same number of query heads in each kept group, so every pruned layer is a
standard GQA layer. ``mask_model`` builds the dense twin with the same heads and channels zeroed: the two must
produce the same logits, which is how slicing is tested.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Mapping
from typing import NamedTuple

import torch
from pydantic import BaseModel, Field

from tyr.errors import TyrError
from tyr.models.facts import LayerWidth, layer_widths
from tyr.models.families import TYR_CAUSAL_LM_CLASSES, Family, family_of
from tyr.models.modeling_tyr_llama import TyrLlamaConfig, TyrLlamaForCausalLM
from tyr.models.streaming import StreamedModel

# Config fields that describe the dense architecture and are carried over into a TyrLlamaConfig.
_NOT_CARRIED = {"model_type", "architectures", "auto_map", "per_layer_config", "transformers_version",
                "allow_global_per_layer_attribute_access", "_name_or_path", "_model_name_or_path", "sliding_window",
                "quantization_config"}


class LayerKeep(BaseModel):
    """What one decoder layer keeps, as indices into that layer's current heads and FFN channels."""

    keep_heads: list[int] = Field(description="query heads that stay (GQA-consistent: whole KV groups, same count each)")
    keep_ffn: list[int] = Field(description="FFN channels (rows of gate/up, columns of down) that stay")


def kept_groups(keep_heads: list[int], heads_per_group: int, where: str) -> list[int]:
    """The KV groups a GQA-consistent head set keeps; raise naming the layer if the set is not consistent."""
    groups: dict[int, int] = {}
    for head in keep_heads:
        groups[head // heads_per_group] = groups.get(head // heads_per_group, 0) + 1
    if len(set(groups.values())) > 1:
        raise TyrError(f"{where}: kept query heads per KV group differ ({dict(sorted(groups.items()))}); "
                       "GQA kernels need the same number of query heads in every kept group")
    return sorted(groups)


def tyr_config(config, widths: list[LayerWidth]) -> TyrLlamaConfig:
    """The family's tyr config (TyrLlamaConfig, TyrQwen2Config, ...) with the dense sizes global and ``widths`` per
    layer."""
    family = family_of(config)
    # Gemma 3's sliding windows are part of its layers; other families run without one (refused otherwise).
    dropped = _NOT_CARRIED - {"sliding_window"} if family.sliding_layers else _NOT_CARRIED
    base = {k: v for k, v in config.to_dict().items() if k not in dropped}
    base.setdefault("head_dim", base["hidden_size"] // base["num_attention_heads"])
    per_layer = {i: w._asdict() for i, w in enumerate(widths)}
    try:
        return family.config_class(**base, per_layer_config=per_layer)
    except ValueError as err:
        raise TyrError(str(err)) from err


def to_tyr(model) -> TyrLlamaForCausalLM:
    """The same network as its family's tyr model (a dense Llama, Mistral, Qwen2, Qwen3 or Gemma 3 keeps all its
    widths)."""
    if isinstance(model, TYR_CAUSAL_LM_CLASSES):
        return model
    full = [LayerKeep(keep_heads=list(range(w.num_attention_heads)), keep_ffn=list(range(w.intermediate_size)))
            for w in layer_widths(model.config)]
    return slice_model(model, full)


def _rows(weight: torch.Tensor, blocks: list[int], block: int) -> torch.Tensor:
    index = torch.cat([torch.arange(b * block, (b + 1) * block) for b in blocks]) if blocks else torch.empty(0, dtype=torch.long)
    return weight.index_select(0, index.to(weight.device))


def _kept_width(width: LayerWidth, keep: LayerKeep, where: str) -> LayerWidth:
    """The widths a layer has after keeping ``keep``; TyrError naming the layer for indices it does not have."""
    heads, kv_heads, ffn = width.num_attention_heads, width.num_key_value_heads, width.intermediate_size
    if any(not 0 <= h < heads for h in keep.keep_heads):
        raise TyrError(f"{where}.keep_heads has indices outside [0, {heads})")
    if any(not 0 <= c < ffn for c in keep.keep_ffn):
        raise TyrError(f"{where}.keep_ffn has indices outside [0, {ffn})")
    keep_heads = sorted(set(keep.keep_heads))
    groups = kept_groups(keep_heads, heads // kv_heads, where) if keep_heads else []
    return LayerWidth(num_attention_heads=len(keep_heads), num_key_value_heads=len(groups),
                      intermediate_size=len(set(keep.keep_ffn)))


def _slice_layer(state: Mapping, prefix: str, width: LayerWidth, keep: LayerKeep, head_dim: int, where: str,
                 family: Family) -> dict:
    """The tensors of one decoder layer keeping ``keep`` (``state``: the layer's current checkpoint tensors)."""
    keep_heads, keep_ffn = sorted(set(keep.keep_heads)), sorted(set(keep.keep_ffn))
    out = {}
    groups = kept_groups(keep_heads, width.num_attention_heads // width.num_key_value_heads, where) \
        if keep_heads else []
    attn, mlp = f"{prefix}self_attn.", f"{prefix}mlp."
    if keep_heads:
        for name in ("q_proj", "k_proj", "v_proj"):
            blocks = keep_heads if name == "q_proj" else groups
            for kind in ("weight", "bias"):
                if (key := f"{attn}{name}.{kind}") in state:
                    out[key] = _rows(state[key], blocks, head_dim)
        out[f"{attn}o_proj.weight"] = _rows(state[f"{attn}o_proj.weight"].T, keep_heads, head_dim).T.contiguous()
        if (key := f"{attn}o_proj.bias") in state:
            out[key] = state[key]
        for norm in family.attention_norms:
            out[f"{prefix}{norm}.weight"] = state[f"{prefix}{norm}.weight"]
        for norm in ("q_norm", "k_norm"):  # Qwen3, Gemma 3: one weight over head_dim, shared by every head
            if (key := f"{attn}{norm}.weight") in state:
                out[key] = state[key]
    if keep_ffn:
        down = state[f"{mlp}down_proj.weight"]
        index = torch.tensor(keep_ffn, device=down.device)
        for name in ("gate_proj", "up_proj"):
            for kind in ("weight", "bias"):
                if (key := f"{mlp}{name}.{kind}") in state:
                    out[key] = state[key].index_select(0, index)
        out[f"{mlp}down_proj.weight"] = down.index_select(1, index)
        if (key := f"{mlp}down_proj.bias") in state:
            out[key] = state[key]
        for norm in family.mlp_norms:
            out[f"{prefix}{norm}.weight"] = state[f"{prefix}{norm}.weight"]
    return out


class SlicedTensors(NamedTuple):
    """A pruned model as its config and its tensors, produced a part at a time (the non-layer tensors, then each
    decoder layer's), so it can be written or loaded without the dense model or the whole result in memory."""

    config: TyrLlamaConfig
    parts: Iterator[dict[str, torch.Tensor]]
    dtype: torch.dtype


def sliced_tensors(model, keeps: list[LayerKeep]) -> SlicedTensors:
    """The tensors of ``model`` keeping ``keeps[i]`` of layer i (indices into its current widths), in the dtype
    ``model`` holds or stores its weights in. A StreamedModel's tensors are read when their part is produced."""
    config = model.config
    widths = layer_widths(config)
    if len(keeps) != len(widths):
        raise TyrError(f"got keep sets for {len(keeps)} layers, the model has {len(widths)}")
    family = family_of(config)
    new_config = tyr_config(config, [_kept_width(w, k, f"layers[{i}]") for i, (w, k) in enumerate(zip(widths, keeps))])
    state = model.state_dict()

    def parts() -> Iterator[dict[str, torch.Tensor]]:
        for name in state:
            tied_head = name == "lm_head.weight" and new_config.tie_word_embeddings
            if not name.startswith("model.layers.") and not tied_head:
                yield {name: state[name]}
        for i, (width, keep) in enumerate(zip(widths, keeps)):
            yield _slice_layer(state, f"model.layers.{i}.", width, keep, config.head_dim, f"layers[{i}]", family)

    return SlicedTensors(new_config, parts(), _dtype_and_device(model)[0])


def build_model(sliced: SlicedTensors, generation_config=None,
                device: str | torch.device = "cpu") -> TyrLlamaForCausalLM:
    """The tyr model of ``sliced``, built in its dtype (no float32 copy of a half model) and filled part by part."""
    with torch.device(device), _default_dtype(sliced.dtype):
        pruned = family_of(sliced.config).causal_lm_class(sliced.config)
    loaded = set()
    for tensors in sliced.parts:
        unexpected = pruned.load_state_dict(tensors, strict=False).unexpected_keys
        if unexpected:
            raise TyrError(f"sliced weights do not fit the pruned architecture: unexpected {unexpected}")
        loaded.update(tensors)
    missing = [k for k in pruned.state_dict() if k not in loaded
               and not (k == "lm_head.weight" and sliced.config.tie_word_embeddings)]
    if missing:
        raise TyrError(f"sliced weights do not fit the pruned architecture: missing {missing}")
    if generation_config is not None:
        pruned.generation_config = copy.deepcopy(generation_config)
    return pruned.eval()


def slice_model(model, keeps: list[LayerKeep]) -> TyrLlamaForCausalLM:
    """A new, physically smaller tyr model of the same family keeping ``keeps[i]`` of layer i (indices into its
    current widths), in the dtype and on the device ``model`` holds its weights in (a StreamedModel: its stored
    dtype, on the CPU, read one layer at a time)."""
    return build_model(sliced_tensors(model, keeps), model.generation_config, _dtype_and_device(model)[1])


def _dtype_and_device(model) -> tuple[torch.dtype, torch.device]:
    if isinstance(model, StreamedModel):
        return model.dtype, torch.device("cpu")
    param = next(model.parameters())
    return param.dtype, param.device


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


@torch.no_grad()
def mask_model(model, keeps: list[LayerKeep]):
    """A copy of ``model`` with the heads and channels that ``keeps`` drops zeroed at their output projections."""
    masked = copy.deepcopy(model)
    head_dim = model.config.head_dim
    for i, (layer, keep) in enumerate(zip(masked.model.layers, keeps)):
        if layer.self_attn is not None:
            heads = layer.self_attn.o_proj.in_features // head_dim
            drop = sorted(set(range(heads)) - set(keep.keep_heads))
            kept_groups(keep.keep_heads, heads // (layer.self_attn.k_proj.out_features // head_dim), f"layers[{i}]")
            for h in drop:
                layer.self_attn.o_proj.weight[:, h * head_dim:(h + 1) * head_dim] = 0
        if layer.mlp is not None:
            drop = sorted(set(range(layer.mlp.down_proj.in_features)) - set(keep.keep_ffn))
            layer.mlp.down_proj.weight[:, drop] = 0
    return masked
