"""Tiny random models of each supported architecture and a tiny pruning recipe, for fast tests and examples."""

from __future__ import annotations

import torch

from tyr.models.modeling_tyr_llama import TyrLlamaConfig, TyrLlamaForCausalLM

# A recipe (tyr.compressor.recipes.Recipe) small enough to prune a tiny model end to end in seconds.
TINY_RECIPE = {
    "name": "tiny", "description": "unit tests", "iterations": 2, "initial_spacing": 0.25, "ladder_size": 5,
    "eea": "expectation",
    "calibration": {"num_sequences": 16, "seq_len": 64, "batch_sequences": 8},
    "local_pruner": {"damp": 0.01, "channel_step": 8, "refit": True},
    "search": {"generations": [3, 3], "offspring": 6, "max_shifts": 2, "seq_len": 32, "batch_sequences": 2,
               "kl_top_k": 64, "stages": [{"tokens": 64, "survivors": 3}, {"tokens": 256, "survivors": 1}],
               "pool_tokens": 512,
               "reuse_activations": True, "activation_cache_mb": 64},
}


def _dense_kwargs(vocab_size: int, hidden: int, layers: int, heads: int, kv_heads: int, ffn: int) -> dict:
    return dict(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=hidden // heads,
                max_position_embeddings=512, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                pad_token_id=2)


def _randomize(model, seed: int):
    # Default init (std 0.02) makes tiny models nearly uniform; larger weights give distinct, testable outputs.
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=generator))
            else:
                p.copy_(torch.randn(p.shape, generator=generator) / p.shape[-1] ** 0.5)
    return model.eval()


def tiny_llama(arch: str = "llama", vocab_size: int = 256, hidden: int = 64, layers: int = 4, heads: int = 4,
               kv_heads: int = 2, ffn: int = 96, seed: int = 0, **overrides):
    """A random dense model of ``arch`` ("llama", "mistral", "qwen2", "qwen3" or "gemma3"), built with
    transformers' own config and model classes, small enough for unit tests. ``overrides`` go to the config (e.g.
    head_dim, tie_word_embeddings, rope_scaling; Gemma 3: layer_types, sliding_window, final_logit_softcapping)."""
    import transformers

    classes = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "mistral": ("MistralConfig", "MistralForCausalLM"),
               "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"), "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
               "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM")}
    if arch not in classes:
        raise ValueError(f"unknown tiny architecture {arch!r}: {', '.join(classes)}")
    kwargs = _dense_kwargs(vocab_size, hidden, layers, heads, kv_heads, ffn) | overrides
    if arch == "mistral":
        kwargs.setdefault("sliding_window", None)
    config_class, model_class = (getattr(transformers, name) for name in classes[arch])
    return _randomize(model_class(config_class(**kwargs)), seed)


def tiny_hetero(vocab_size: int = 256, hidden: int = 64, heads: int = 4, kv_heads: int = 2, ffn: int = 96,
                widths: list[tuple[int, int, int]] | None = None, seed: int = 0) -> TyrLlamaForCausalLM:
    """A random heterogeneous model; by default layer 0 has no attention and layer 2 no MLP."""
    widths = widths or [(0, 0, ffn), (heads, kv_heads, ffn // 2), (heads // 2, kv_heads // 2, 0), (2, 1, 40)]
    per_layer = {i: dict(num_attention_heads=h, num_key_value_heads=kv, intermediate_size=f)
                 for i, (h, kv, f) in enumerate(widths)}
    config = TyrLlamaConfig(per_layer_config=per_layer,
                            **_dense_kwargs(vocab_size, hidden, len(widths), heads, kv_heads, ffn))
    config.architectures = ["TyrLlamaForCausalLM"]
    return _randomize(TyrLlamaForCausalLM(config), seed)
