"""genai_config.json: what onnxruntime-genai needs to run the exported graph (checked with onnxruntime-genai 0.18).

- search.past_present_share_buffer is false: the graph concatenates past and new keys into a present tensor
  that grows each step (share-buffer mode expects attention ops that write into a preallocated max_length buffer,
  and fails on this graph with a shape mismatch on the first present output).
- Per-layer KV heads: decoder.num_key_value_heads holds the dense (global) count, but genai reads each past
  input's static KV-head dimension from the graph and allocates that layer's cache with it; it also discovers
  which layers have a cache from the input names (``past_key_values.%d.key``), so layers without attention are
  simply absent. Greedy tokens match PyTorch (tests/test_export_onnx.py).
- session_options.graph_optimization_level carries the export's optimization level: the graph file stays
  portable (plain ONNX ops) and onnxruntime optimizes it when the session is created.
"""

from __future__ import annotations

from typing import Any

from tyr.exporters.onnx.layout import LOGITS, PAST_KEY, PAST_VALUE, PRESENT_KEY, PRESENT_VALUE
from tyr.exporters.onnx.runner import GENAI_OPT_LEVEL, OptLevel

GENAI_MODEL_TYPES = {"llama": "llama", "mistral": "mistral", "tyr_llama": "llama", "qwen2": "qwen2",
                     "tyr_qwen2": "qwen2", "qwen3": "qwen3", "tyr_qwen3": "qwen3", "gemma3_text": "gemma3_text",
                     "tyr_gemma3": "gemma3_text"}


def _token_id(value: Any) -> Any:
    return value[0] if isinstance(value, list) and len(value) == 1 else value


def genai_config(config, model_file: str, opt_level: OptLevel, generation_config=None) -> dict:
    """The genai_config.json content for an exported model of this HF ``config``."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    eos = getattr(generation_config, "eos_token_id", None) or config.eos_token_id
    pad = config.pad_token_id if config.pad_token_id is not None else _token_id(eos)
    context = getattr(config, "max_position_embeddings", 2048)
    decoder = {
        "session_options": {"log_id": "tyr", "provider_options": [],
                            "graph_optimization_level": GENAI_OPT_LEVEL[opt_level]},
        "filename": model_file,
        "head_size": head_dim,
        "hidden_size": config.hidden_size,
        "num_attention_heads": config.num_attention_heads,  # dense; per-layer counts come from the graph
        "num_key_value_heads": config.num_key_value_heads,
        "num_hidden_layers": config.num_hidden_layers,
        "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask", "position_ids": "position_ids",
                   "past_key_names": PAST_KEY, "past_value_names": PAST_VALUE},
        "outputs": {"logits": LOGITS, "present_key_names": PRESENT_KEY, "present_value_names": PRESENT_VALUE},
    }
    return {
        "model": {
            "type": GENAI_MODEL_TYPES.get(config.model_type, "llama"),
            "bos_token_id": config.bos_token_id,
            "eos_token_id": _token_id(eos),
            "pad_token_id": pad,
            "context_length": context,
            "vocab_size": config.vocab_size,
            "decoder": decoder,
        },
        "search": {
            "do_sample": False, "num_beams": 1, "num_return_sequences": 1, "max_length": context, "min_length": 0,
            "past_present_share_buffer": False, "temperature": 1.0, "top_k": 1, "top_p": 1.0,
            "repetition_penalty": 1.0, "length_penalty": 1.0, "early_stopping": True, "no_repeat_ngram_size": 0,
            "diversity_penalty": 0.0,
        },
    }
