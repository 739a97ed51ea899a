"""The DeciLM / nemotron-nas format: per-block configs that stock vLLM's DeciLMForCausalLM serves.

It expresses per-layer KV groups (n_heads_in_group), FFN widths and removed blocks (no_op), but every attention
keeps the model's full query-head count, so it fits models pruned in KV groups and FFN channels only. Weight names
are the Llama names tyr already writes. transformers does not know model_type "nemotron-nas": the folder carries
configuration_decilm.py (named in auto_map) and is served with --trust-remote-code.
"""

from __future__ import annotations

from pathlib import Path

from tyr.errors import TyrError

ARCHITECTURE = "DeciLMForCausalLM"
MODEL_TYPE = "nemotron-nas"
CONFIGURATION_FILE = Path(__file__).with_name("configuration_decilm.py")
# Fields of the tyr config that are not DeciLM fields (or are re-expressed per block).
_DROPPED = {"per_layer_config", "allow_global_per_layer_attribute_access", "auto_map", "architectures", "model_type",
            "num_key_value_heads", "transformers_version", "_name_or_path"}


def block_configs(config) -> list[dict]:
    """DeciLM block configs for a tyr config; TyrError if some attention keeps fewer query heads than the model."""
    heads = config.num_attention_heads
    varying = [(i, h) for i, (h, _, _) in enumerate(config.layer_widths()) if h not in (0, heads)]
    if varying:
        shown = ", ".join(f"layer {i}: {h}" for i, h in varying[:8])
        raise TyrError(f"the DeciLM (nemotron-nas) format keeps all {heads} query heads in every attention layer, "
                       f"but this model has fewer in {len(varying)} layers ({shown}). Export it with format "
                       "'tyr' (served by tyr's vLLM plugin) instead.")
    first_block = next(((i, "attention" if h else "mlp") for i, (h, _, f) in enumerate(config.layer_widths())
                        if h or f), None)
    if first_block is None or first_block[1] == "mlp":
        raise TyrError("vLLM's DeciLM (nemotron-nas) model cannot run a model whose first computing block is an MLP "
                       f"(layer {first_block[0] if first_block else '-'} has its MLP but no attention before it): its "
                       "fused residual norm gets no residual there. Export it with format 'tyr' instead.")
    blocks = []
    for query_heads, kv_heads, ffn in config.layer_widths():
        attention = ({"no_op": True} if query_heads == 0 else
                     {"no_op": False, "n_heads_in_group": query_heads // kv_heads})
        blocks.append({"attention": attention,
                       "ffn": {"no_op": True} if ffn == 0 else {"no_op": False, "intermediate_size": ffn}})
    return blocks


def deci_config_dict(config) -> dict:
    """config.json contents of the DeciLM folder for a tyr (or dense Llama, via to_tyr) config."""
    base = {k: v for k, v in config.to_diff_dict().items() if k not in _DROPPED}
    return {
        "architectures": [ARCHITECTURE],
        "model_type": MODEL_TYPE,
        "auto_map": {"AutoConfig": f"{CONFIGURATION_FILE.stem}.DeciLMConfig"},
        **base,
        "block_configs": block_configs(config),
    }
