"""Qwen2/Qwen2.5, Qwen3 and Llama 3.x (rope_scaling llama3) end to end on tiny random models made with
transformers' own config and model classes: the format against transformers, slicing against masking, the
functional (supernet / search) layers, a Týr prune, `tyr eval`, the ONNX graph and the refusals.

No Qwen checkpoint is reachable here, so transformers' Qwen2ForCausalLM / Qwen3ForCausalLM are the reference.
The vLLM token identity per family is in tests/test_export_vllm.py.
"""

from __future__ import annotations

import json

import pytest
import torch

from tyr.cli import main as tyr_main
from tyr.compressor.layerwise import DenseParts, attention_delta, heads_of, mlp_delta, module_weights
from tyr.errors import TyrError
from tyr.models.io import load_model, save_model
from tyr.models.facts import layer_widths
from tyr.models.slicing import mask_model, slice_model, to_tyr
from tyr.testing import tiny_llama

from helpers import assert_onnx_decodes_like_torch, genai_greedy, keeps_for, load_without_tyr

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}
# As in released Qwen2.5 config.json files: sliding window off, with a window size and max_window_layers set.
QWEN25_WINDOW = {"use_sliding_window": False, "sliding_window": 32768, "max_window_layers": 2}
# family -> (arch for tiny_llama, config overrides). Qwen3's head_dim (32) is not hidden / heads (16).
FAMILIES = {
    "qwen2": ("qwen2", QWEN25_WINDOW),
    "qwen2-tied": ("qwen2", {"tie_word_embeddings": True}),
    "qwen3": ("qwen3", {"head_dim": 32}),
    "qwen3-tied": ("qwen3", {"head_dim": 32, "tie_word_embeddings": True}),
    "llama3-rope": ("llama", {"rope_scaling": LLAMA3_ROPE, "rope_theta": 500000.0}),
}
TYR_CLASSES = {"qwen2": "TyrQwen2ForCausalLM", "qwen3": "TyrQwen3ForCausalLM", "llama": "TyrLlamaForCausalLM"}


def tiny(family: str, **kwargs):
    arch, overrides = FAMILIES[family]
    return tiny_llama(arch, **(dict(hidden=64, layers=4, heads=4, kv_heads=2, ffn=96, seed=5) | overrides | kwargs))


IDS = torch.randint(0, 256, (2, 13), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("family", FAMILIES)
def test_dense_in_our_format_matches_transformers(family, tmp_path, tokenizer):
    dense = tiny(family)
    saved = save_model(to_tyr(dense), tokenizer, tmp_path / "m")
    config = json.loads((saved / "config.json").read_text())
    arch = FAMILIES[family][0]
    assert config["architectures"] == [TYR_CLASSES[arch]] and config["model_type"] == f"tyr_{arch}"
    modeling = sorted(p.name for p in saved.glob("modeling_*.py"))
    assert modeling == sorted({"modeling_tyr_llama.py", f"modeling_tyr_{arch}.py"})
    loaded, _ = load_model(saved)
    assert type(loaded).__name__ == TYR_CLASSES[arch]
    with torch.no_grad():
        assert (loaded(IDS).logits - dense(IDS).logits).abs().max() <= 1e-5
        a = loaded.generate(IDS, attention_mask=torch.ones_like(IDS), max_new_tokens=8, do_sample=False)
        b = dense.generate(IDS, attention_mask=torch.ones_like(IDS), max_new_tokens=8, do_sample=False)
    assert torch.equal(a, b)


@pytest.mark.parametrize("family", FAMILIES)
def test_pruned_matches_masked_dense(family):
    dense = tiny(family)
    keeps = keeps_for(dense)
    sliced, masked = slice_model(dense, keeps), mask_model(dense, keeps)
    assert [(w.num_attention_heads, w.num_key_value_heads) for w in layer_widths(sliced.config)] == \
           [(0, 0), (2, 2), (2, 1), (1, 1)]
    if FAMILIES[family][0] == "qwen2":  # q/k/v biases sliced with their heads, o_proj without a bias
        attention = sliced.model.layers[1].self_attn
        assert attention.q_proj.bias.shape == (2 * 16,) and attention.k_proj.bias.shape == (2 * 16,)
        assert attention.o_proj.bias is None
    if FAMILIES[family][0] == "qwen3":  # one q/k norm over head_dim, shared by the heads, kept whole
        assert sliced.model.layers[3].self_attn.q_norm.weight.shape == (32,)
        kept_norm, dense_norm = sliced.model.layers[3].self_attn.k_norm, dense.model.layers[3].self_attn.k_norm
        assert torch.equal(kept_norm.weight, dense_norm.weight)
    with torch.no_grad():
        assert (sliced(IDS).logits - masked(IDS).logits).abs().max() <= 1e-5
        a = sliced.generate(IDS, attention_mask=torch.ones_like(IDS), max_new_tokens=8, do_sample=False)
        b = masked.generate(IDS, attention_mask=torch.ones_like(IDS), max_new_tokens=8, do_sample=False)
    assert torch.equal(a, b)


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "llama3-rope"])
def test_functional_layers_match_transformers_layers(family):
    """The supernet and the search run modules from weight dicts: biases, q/k norms and the rope must be applied."""
    model = slice_model(tiny(family), keeps_for(tiny(family)))
    captured = []
    hooks = [layer.register_forward_hook(lambda m, a, k, out: captured.append((a[0] if a else k["hidden_states"], out)),
                                         with_kwargs=True) for layer in model.model.layers]
    with torch.no_grad():
        logits = model(IDS).logits
    for hook in hooks:
        hook.remove()
    parts = DenseParts.from_model(model)
    cos, sin = parts.rope(IDS.shape[1])
    if FAMILIES[family][0] == "qwen3":
        assert "q_norm" in module_weights(model, 1, "attn") and "k_norm" in module_weights(model, 1, "attn")
    for i, (x, y) in enumerate(captured):
        y = y[0] if isinstance(y, tuple) else y
        attn, mlp = module_weights(model, i, "attn"), module_weights(model, i, "mlp")
        heads, kv = heads_of(attn, parts.head_dim)
        h = x + attention_delta(x, attn, heads, kv, cos, sin, parts.head_dim, parts.eps)
        assert (h + mlp_delta(h, mlp, parts.eps) - y).abs().max() <= 1e-5, f"layer {i}"
    assert (parts.logits(captured[-1][1]) - logits).abs().max() <= 1e-5


def test_llama3_rope_scaling_survives_pruning_and_saving(tmp_path, tokenizer):
    dense = tiny("llama3-rope")
    pruned = slice_model(dense, keeps_for(dense))
    loaded, _ = load_model(save_model(pruned, tokenizer, tmp_path / "m"))
    assert loaded.config.rope_parameters["rope_type"] == "llama3"
    assert loaded.config.rope_parameters["factor"] == 8.0
    assert torch.equal(loaded.model.rotary_emb.inv_freq, dense.model.rotary_emb.inv_freq)
    # The scaling matters on this config: the same weights without it give other logits.
    plain = tiny_llama("llama", hidden=64, layers=4, heads=4, kv_heads=2, ffn=96, seed=5, rope_theta=500000.0)
    with torch.no_grad():
        assert (plain(IDS).logits - dense(IDS).logits).abs().max() > 1e-3
        assert (loaded(IDS).logits - mask_model(dense, keeps_for(dense))(IDS).logits).abs().max() <= 1e-5


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_saved_folder_loads_without_tyr_with_trust_remote_code(family, tmp_path):
    """The Qwen modeling file imports the shared Llama layer relatively; transformers must resolve that alone."""
    dense = tiny(family)
    pruned = slice_model(dense, keeps_for(dense))
    out = save_model(pruned, None, tmp_path / "m")
    with torch.no_grad():
        logits = pruned(IDS).logits
    assert f"OK {TYR_CLASSES[family]} transformers_modules" in load_without_tyr(out, IDS, logits, tmp_path)


def test_refusals_name_what_is_supported(tmp_path):
    sliding = tiny_llama("qwen2", layers=2, use_sliding_window=True, sliding_window=8, max_window_layers=1)
    folder = tmp_path / "sliding"
    sliding.save_pretrained(folder)
    with pytest.raises(TyrError, match="use_sliding_window=true is not supported"):
        load_model(folder)
    phi = tmp_path / "phi"
    phi.mkdir()
    (phi / "config.json").write_text(json.dumps({"model_type": "phi3"}))
    (phi / "model.safetensors").write_bytes(b"")
    with pytest.raises(TyrError, match=r"(?s)'phi3' is not supported.*Qwen2ForCausalLM.*Qwen3ForCausalLM.*Gemma3"):
        load_model(phi)


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_tyr_prune_and_eval_end_to_end(family, tmp_path, tokenizer):
    from tyr.testing import TINY_RECIPE

    from tyr.compressor.prune import prune
    from tyr.compressor.recipes import Recipe

    dense = tiny(family, vocab_size=len(tokenizer), layers=4, seed=3)
    src = save_model(to_tyr(dense), tokenizer, tmp_path / "dense")
    result = prune(src, sparsity=0.5, recipe=Recipe.model_validate(TINY_RECIPE), out_dir=tmp_path / "pruned",
                   progress=False, keep_model=True)
    assert abs(result.report.achieved_sparsity - 0.5) <= 0.125
    model, _ = load_model(result.out_dir)
    assert type(model).__name__ == TYR_CLASSES[family]
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


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "llama3-rope"])
def test_onnx_matches_pytorch_on_prefill_and_cached_decode(family, tmp_path, tokenizer):
    from tyr.exporters.onnx.export import export_onnx

    dense = tiny(family, vocab_size=len(tokenizer))
    src = save_model(slice_model(dense, keeps_for(dense)), tokenizer, tmp_path / "pruned")
    export = export_onnx(src, tmp_path / "onnx", dtype="fp32")
    assert export.validation.passed
    assert [(kv.layer, kv.kv_heads) for kv in export.layout.kv_layers] == [(1, 2), (2, 1), (3, 1)]
    genai = json.loads((export.model_path.parent / "genai_config.json").read_text())
    assert genai["model"]["type"] == FAMILIES[family][0]
    model, _ = load_model(src)
    prompts = [list(range(100, 117)), [7, 8000, 31000, 12, 5]]  # the second is left-padded
    assert_onnx_decodes_like_torch(export.model_path, model, prompts)


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_onnxruntime_genai_runs_the_export(family, tmp_path, tokenizer):
    from tyr.exporters.onnx.export import export_onnx

    dense = tiny(family, vocab_size=len(tokenizer))
    src = save_model(slice_model(dense, keeps_for(dense)), tokenizer, tmp_path / "pruned")
    export = export_onnx(src, tmp_path / "onnx", dtype="fp32")
    prompt = tokenizer("The capital of France is").input_ids
    _, tokens = genai_greedy(export.model_path.parent, prompt, 10)
    pruned, _ = load_model(src)
    ids = torch.tensor([prompt])
    with torch.no_grad():
        expected = pruned.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False,
                                   min_new_tokens=10)[0, len(prompt):].tolist()
    assert tokens == expected[:len(tokens)] and len(tokens) > 0


def test_flap_refuses_qwen2_whose_attention_has_no_output_bias():
    from tyr.compressor.baselines import flap_prune

    with pytest.raises(TyrError, match="Qwen2 attention does not have"):
        flap_prune(tiny("qwen2"), IDS, 0.5, progress=False)


def test_a_gguf_file_that_transformers_cannot_read_gets_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TYR_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(TyrError, match="cannot read the GGUF file"):
        load_model(bad)
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("config.json"))


@pytest.mark.slow
def test_a_gguf_file_loads_as_its_dequantized_model(tmp_path, monkeypatch, smollm2):
    """The SmolLM2 GGUF given as a path: converted once into the cache, then the same model as the default one."""
    from tyr.models.default import gguf_path

    monkeypatch.setenv("TYR_CACHE", str(tmp_path / "cache"))
    model, tokenizer = load_model(gguf_path())
    converted = list((tmp_path / "cache" / "models" / "gguf").iterdir())
    assert len(converted) == 1 and (converted[0] / "config.json").is_file()
    reference, _ = smollm2
    ids = tokenizer(["The capital of France is"], return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)
    stamp = (converted[0] / "config.json").stat().st_mtime_ns
    load_model(gguf_path())  # the second load reuses the converted folder
    assert (converted[0] / "config.json").stat().st_mtime_ns == stamp


def test_deci_format_refuses_qwen_layers(tmp_path, tokenizer):
    from tyr.exporters.vllm.export import export_vllm

    src = save_model(to_tyr(tiny("qwen3")), tokenizer, tmp_path / "src")
    with pytest.raises(TyrError, match="holds Llama layers only, not qwen3 ones"):
        export_vllm(src, tmp_path / "deci", fmt="deci")
    assert not (tmp_path / "deci").exists()
