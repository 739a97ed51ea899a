"""vLLM export on the real vLLM CPU backend: greedy tokens of vLLM (offline and OpenAI server) equal transformers'.

Engine starts are the cost here, so each starts once, and every test that starts one is marked slow: the
tyr-format export of a tiny heterogeneous model (its export check is the offline run), one OpenAI server on that
folder, the trust_remote_code path without tyr, the DeciLM format, and SmolLM2 pruned to 50%.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import requests
import torch

from tyr.benchmarking.config import ServerConfig
from tyr.benchmarking.server import VLLMServer
from tyr.cli import main as tyr_main
from tyr.errors import TyrError
from tyr.exporters.vllm.check import compare, explain_failure, reference_greedy, run_vllm_greedy
from tyr.exporters.vllm.export import export_vllm
from tyr.exporters.vllm.vllm_greedy import GreedyRequest
from tyr.models.io import save_model
from tyr.models.facts import layer_params, layer_widths
from tyr.models.slicing import LayerKeep, slice_model
from tyr.testing import tiny_hetero

VOCAB = 49152  # SmolLM2's tokenizer: vLLM needs a real tokenizer
HIDDEN = 128  # head_dim 32: vLLM's CPU attention supports head sizes 32, 64, 80, ...
PROMPTS = ["The capital of France is", "Structured pruning removes", "def fibonacci(n):", "Once upon a time"]
NEW_TOKENS = 12


def greedy(model, tokenizer, prompts=PROMPTS, new_tokens=NEW_TOKENS) -> list[list[int]]:
    return reference_greedy(model, [tokenizer(p).input_ids for p in prompts], new_tokens)[0]


@pytest.fixture(scope="module")
def hetero(tmp_path_factory, tokenizer):
    """Layer 0 without attention, layer 2 without MLP, per-layer heads 0/4/2/2, KV heads 0/2/1/1, FFN 96/48/0/40."""
    model = tiny_hetero(vocab_size=VOCAB, hidden=HIDDEN)
    return model, save_model(model, tokenizer, tmp_path_factory.mktemp("src") / "hetero")


@pytest.fixture(scope="module")
def hetero_export(hetero, tmp_path_factory):
    """The tyr-format export, checked by vLLM (engine start 1)."""
    _, src = hetero
    out = tmp_path_factory.mktemp("out") / "hetero-vllm"
    return export_vllm(src, out, prompts=PROMPTS, max_new_tokens=NEW_TOKENS)


@pytest.mark.slow
def test_tyr_export_matches_transformers_offline(hetero, hetero_export, tokenizer):
    model, _ = hetero
    result = hetero_export
    out = Path(result.out_dir)
    assert (out / "config.json").is_file() and not any(p.name.startswith(".") for p in out.parent.iterdir())
    check = result.check
    assert check.passed and check.model_class == "TyrLlamaForCausalLM"
    # The reference here is computed independently of the export's own check.
    assert [p.vllm_tokens for p in check.prompts] == greedy(model, tokenizer)
    assert all(p.first_difference is None for p in check.prompts)
    # No KV cache for layer 0 (no attention); every other layer's cache has that layer's KV-head count.
    assert check.kv_cache_layers == {"model.layers.1.self_attn.attn": 2, "model.layers.2.self_attn.attn": 1,
                                     "model.layers.3.self_attn.attn": 1}
    saved = json.loads((out / "tyr_export.json").read_text())
    assert saved["fmt"] == "tyr" and saved["check"]["passed"] and saved["transformers_backend"] is False
    assert json.loads((out / "config.json").read_text())["architectures"] == ["TyrLlamaForCausalLM"]


@pytest.mark.slow
def test_openai_server_matches_transformers(hetero, hetero_export, tokenizer, tmp_path):
    """The OpenAI server on the export (engine start 2), without trust_remote_code, started as `tyr bench` does."""
    model, _ = hetero
    served = []
    with VLLMServer(hetero_export.out_dir, tmp_path / "server.log", ServerConfig(max_model_len=256)) as server:
        for prompt in PROMPTS:
            response = requests.post(f"{server.base_url}/v1/completions", timeout=120, json={
                "model": server.model_name, "prompt": prompt, "max_tokens": NEW_TOKENS, "temperature": 0,
                "ignore_eos": True, "return_token_ids": True})
            response.raise_for_status()
            choice = response.json()["choices"][0]
            assert choice["prompt_token_ids"] == tokenizer(prompt).input_ids
            assert choice["text"] == tokenizer.decode(choice["token_ids"])
            served.append(choice["token_ids"])
    assert served == greedy(model, tokenizer)


NO_TYR = '''
import importlib.abc, os, runpy, sys
class NoTyr(importlib.abc.MetaPathFinder):  # this interpreter behaves as if tyr were not installed
    def find_spec(self, name, path=None, target=None):
        if name == "tyr" or name.startswith("tyr."):
            raise ImportError("tyr is not installed here")
sys.meta_path.insert(0, NoTyr())
if __name__ == "__main__":
    script = sys.argv[1]
    sys.argv = sys.argv[1:]
    runpy.run_path(script, run_name="__main__")
'''


@pytest.mark.slow
def test_trust_remote_code_serves_without_tyr(tokenizer, tmp_path):
    """vLLM's Transformers backend (engine start 3) with the tyr plugin unavailable: per-layer widths, no MLP in
    layer 2. That backend needs an attention in every layer, so this model keeps attention everywhere."""
    model = tiny_hetero(vocab_size=VOCAB, hidden=HIDDEN, widths=[(4, 2, 96), (4, 2, 48), (2, 1, 0), (2, 1, 40)])
    out = export_vllm(save_model(model, tokenizer, tmp_path / "src"), tmp_path / "out", check=False)
    assert out.transformers_backend and not out.needs_trust_remote_code
    (tmp_path / "no_tyr.py").write_text(NO_TYR)
    prompts = [tokenizer(p).input_ids for p in PROMPTS]
    request = GreedyRequest(model=out.out_dir, prompts=prompts, max_tokens=NEW_TOKENS, trust_remote_code=True)
    # VLLM_PLUGINS names no plugin, so vLLM's loader skips tyr's entry point in every process it starts.
    result = run_vllm_greedy(request, env={"VLLM_PLUGINS": "none"}, wrapper=[str(tmp_path / "no_tyr.py")])
    assert result.model_class == "TransformersForCausalLM" and not result.tyr_imported
    assert {k: v.num_kv_heads for k, v in result.kv_cache.items()} == {
        f"model.layers.{i}.self_attn.attn": kv for i, kv in enumerate([2, 2, 1, 1])}
    assert result.tokens == greedy(model, tokenizer)


@pytest.mark.slow
def test_deci_format_serves_in_stock_vllm(tokenizer, tmp_path):
    """DeciLM / nemotron-nas (engine start 4): all 4 query heads kept; KV groups, FFN widths and no-op blocks vary."""
    model = tiny_hetero(vocab_size=VOCAB, hidden=HIDDEN, widths=[(4, 2, 96), (4, 1, 48), (0, 0, 64), (4, 2, 0)])
    result = export_vllm(save_model(model, tokenizer, tmp_path / "src"), tmp_path / "deci", fmt="deci",
                         prompts=PROMPTS, max_new_tokens=NEW_TOKENS)
    config = json.loads((tmp_path / "deci" / "config.json").read_text())
    assert config["model_type"] == "nemotron-nas" and config["architectures"] == ["DeciLMForCausalLM"]
    assert config["block_configs"][1] == {"attention": {"no_op": False, "n_heads_in_group": 4},
                                          "ffn": {"no_op": False, "intermediate_size": 48}}
    assert config["block_configs"][2]["attention"] == {"no_op": True}
    assert config["block_configs"][3]["ffn"] == {"no_op": True}
    assert "ffn_mult" not in json.dumps(config["block_configs"])
    assert result.needs_trust_remote_code and result.check.model_class == "DeciLMForCausalLM"
    assert result.check.kv_cache_layers == {"model.layers.0.self_attn.attn": 2, "model.layers.1.self_attn.attn": 1,
                                            "model.layers.3.self_attn.attn": 2}
    assert [p.vllm_tokens for p in result.check.prompts] == greedy(model, tokenizer)


def test_deci_refuses_models_whose_query_heads_vary(hetero, tmp_path):
    _, src = hetero  # layers 2 and 3 keep 2 of 4 query heads
    with pytest.raises(TyrError, match="keeps all 4 query heads.*layer 2: 2, layer 3: 2"):
        export_vllm(src, tmp_path / "deci", fmt="deci")
    assert not (tmp_path / "deci").exists()


def test_deci_refuses_a_first_block_without_attention(tokenizer, tmp_path):
    model = tiny_hetero(vocab_size=VOCAB, hidden=HIDDEN, widths=[(0, 0, 96), (4, 2, 48)])
    src = save_model(model, tokenizer, tmp_path / "src")
    with pytest.raises(TyrError, match="first computing block is an MLP"):
        export_vllm(src, tmp_path / "deci", fmt="deci")


def _cli(*args: str, capsys) -> tuple[int, str]:
    code = tyr_main(["export", "vllm", *args])
    return code, capsys.readouterr().err


def test_cli_names_what_is_wrong_with_a_folder(hetero, tmp_path, capsys):
    _, src = hetero
    code, err = _cli(str(tmp_path / "nowhere"), str(tmp_path / "out"), capsys=capsys)
    assert code == 2 and f"no model folder at {tmp_path / 'nowhere'}" in err
    (tmp_path / "empty").mkdir()
    code, err = _cli(str(tmp_path / "empty"), str(tmp_path / "out"), capsys=capsys)
    assert code == 2 and "has no config.json" in err

    # safetensors shapes that do not match config.json
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad_shape"
    bad.mkdir()
    for f in Path(src).iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    tensors = load_file(bad / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"] = tensors["model.layers.1.mlp.up_proj.weight"][:40].clone()
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    code, err = _cli(str(bad), str(tmp_path / "out"), capsys=capsys)
    assert code == 2
    assert "model.layers.1.mlp.up_proj.weight: file [40, 128], config [48, 128]" in err

    # a tensor missing, one that the architecture does not have
    del tensors["model.layers.3.self_attn.k_proj.weight"]
    tensors["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(64, HIDDEN)
    tensors["model.layers.1.mlp.up_proj.weight"] = torch.zeros(48, HIDDEN)
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    code, err = _cli(str(bad), str(tmp_path / "out"), capsys=capsys)
    assert code == 2
    assert "missing: ['model.layers.3.self_attn.k_proj.weight']" in err
    assert "not in the architecture: ['model.layers.0.self_attn.q_proj.weight']" in err

    # a truncated weights file
    weights = bad / "model.safetensors"
    save_file({k: v for k, v in load_file(Path(src) / "model.safetensors").items()}, weights)
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    code, err = _cli(str(bad), str(tmp_path / "out"), capsys=capsys)
    assert code == 2 and "model.safetensors is truncated" in err

    # no weights at all
    weights.unlink()
    code, err = _cli(str(bad), str(tmp_path / "out"), capsys=capsys)
    assert code == 2 and "no *.safetensors weights" in err

    # a config that is not JSON
    (bad / "config.json").write_text("{not json")
    (bad / "model.safetensors").write_bytes((Path(src) / "model.safetensors").read_bytes())
    code, err = _cli(str(bad), str(tmp_path / "out"), capsys=capsys)
    assert code == 2 and "cannot read the model config" in err

    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []

    # an existing output folder is never replaced silently
    (tmp_path / "taken").mkdir()
    code, err = _cli(str(src), str(tmp_path / "taken"), "--no-check", capsys=capsys)
    assert code == 2 and "already exists" in err


@pytest.mark.slow
def test_failed_check_leaves_no_folder(hetero, tmp_path, monkeypatch):
    """vLLM failing on the folder (here: tyr's plugin not loaded, so it fails before starting an engine) aborts
    the export with vLLM's own error and a hint, leaving nothing behind."""
    _, src = hetero
    monkeypatch.setenv("VLLM_PLUGINS", "none")
    with pytest.raises(TyrError, match="(?s)vLLM could not run.*trust_remote_code.*Is tyr's vLLM plugin loaded"):
        export_vllm(src, tmp_path / "out", prompts=PROMPTS[:1], max_new_tokens=2, timeout=600)
    assert list(tmp_path.iterdir()) == []


def test_tokens_agree_only_exactly_or_at_a_near_tie():
    logits = torch.zeros(3, 10)
    logits[:, 5] = 20.0
    logits[2, 7] = 20.0 - 1e-4  # a near tie at step 2
    assert compare([1], [5, 5, 5], [5, 5, 5], logits).agree
    near = compare([1], [5, 5, 7], [5, 5, 5], logits)
    assert near.agree and near.near_tie and near.first_difference == 2
    wrong = compare([1], [5, 7, 5], [5, 5, 5], logits)
    assert not wrong.agree and wrong.first_difference == 1
    assert not compare([1], [5, 5], [5, 5, 5], logits).agree
    problems = explain_failure("LlamaForCausalLM", {"model.layers.0.self_attn.attn": 2}, [wrong],
                               "TyrLlamaForCausalLM", {1: 2})
    assert len(problems) == 3 and "part at generated token 1" in problems[2]


# --- the default SmolLM2 pruned to 50% (magnitude-chosen heads and channels: serving depends on the shapes) ---

def half_pruned_keeps(model, target: float = 0.5) -> list[LayerKeep]:
    """GQA-consistent keep sets by weight magnitude, about ``target`` of the decoder-layer parameters, with widths
    that vary by layer (a cosine profile from 30% to 70% kept)."""
    config = model.config
    head_dim = config.head_dim
    widths = layer_widths(config)
    keeps = []
    for i, (layer, width) in enumerate(zip(model.model.layers, widths)):
        ratio = target + 0.2 * math.cos(2 * math.pi * i / len(widths))
        heads, kv_heads, ffn = width.num_attention_heads, width.num_key_value_heads, width.intermediate_size
        rep = heads // kv_heads
        attn = layer.self_attn
        q = attn.q_proj.weight.view(heads, head_dim, -1).norm(dim=(1, 2))
        o = attn.o_proj.weight.view(-1, heads, head_dim).norm(dim=(0, 2))
        head_score = (q * o).view(kv_heads, rep)
        # (groups, heads per group) whose attention parameters come closest to ratio of the dense layer's
        dense_units = 2 * heads + 2 * kv_heads
        groups, per_group = min(((g, p) for g in range(1, kv_heads + 1) for p in range(1, rep + 1)),
                                key=lambda gp: abs(2 * gp[0] * gp[1] + 2 * gp[0] - ratio * dense_units))
        top_groups = head_score.sum(1).topk(groups).indices.tolist()
        keep_heads = sorted(g * rep + int(h) for g in top_groups for h in head_score[g].topk(per_group).indices)
        mlp = layer.mlp
        channel_score = mlp.down_proj.weight.norm(dim=0) * (mlp.up_proj.weight.norm(dim=1) + mlp.gate_proj.weight.norm(dim=1))
        keep_ffn = sorted(channel_score.topk(round(ratio * ffn)).indices.tolist())
        keeps.append(LayerKeep(keep_heads=keep_heads, keep_ffn=keep_ffn))
    return keeps


def decoder_params(config) -> int:
    return sum(sum(layer_params(config, w)) for w in layer_widths(config))


@pytest.mark.slow
def test_smollm2_pruned_to_half_matches_transformers(smollm2, tmp_path):
    """The real SmolLM2-135M pruned to 50% of its decoder parameters, widths varying per layer (engine start 5)."""
    dense, tokenizer = smollm2
    pruned = slice_model(dense, half_pruned_keeps(dense))
    kept = decoder_params(pruned.config) / decoder_params(dense.config)
    assert 0.45 <= kept <= 0.55, kept
    assert len(set(pruned.config.layer_widths())) > 5  # heterogeneous
    src = save_model(pruned, tokenizer, tmp_path / "pruned")
    result = export_vllm(src, tmp_path / "pruned-vllm", max_new_tokens=16)
    assert result.check.passed and result.check.model_class == "TyrLlamaForCausalLM"
    assert len(result.check.kv_cache_layers) == 30
    # fp32 on a real model: allow a divergence only at a near tie, and only rarely.
    assert sum(p.first_difference is None for p in result.check.prompts) >= len(result.check.prompts) - 1
    with torch.no_grad():
        reference = reference_greedy(pruned, [p.prompt_ids for p in result.check.prompts], 16)[0]
    exact = [p.vllm_tokens == r for p, r in zip(result.check.prompts, reference)]
    assert sum(exact) >= len(exact) - 1


# --- other families: Qwen2 (q/k/v biases, tied embeddings), Qwen3 (q/k norms, head_dim != hidden / heads),
# Llama 3.x rope_scaling "llama3"; tiny random models from transformers' own classes (one engine start each) ---

FAMILY_MODELS = {
    "qwen2-tied": ("qwen2", {"tie_word_embeddings": True, "use_sliding_window": False, "sliding_window": 32768,
                             "max_window_layers": 2}),
    "qwen3": ("qwen3", {"head_dim": 64}),
    "llama3-rope": ("llama", {"rope_theta": 500000.0, "rope_scaling": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16}}),
}


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILY_MODELS)
def test_family_export_matches_transformers(family, tokenizer, tmp_path):
    """Layer 0 without attention, layer 2 without MLP, heads 0/2/2/1 and KV heads 0/2/1/1 of 4/2."""
    from tyr.testing import tiny_llama

    arch, overrides = FAMILY_MODELS[family]
    dense = tiny_llama(arch, vocab_size=VOCAB, hidden=HIDDEN, layers=4, heads=4, kv_heads=2, ffn=96, seed=2,
                       **overrides)
    keeps = [LayerKeep(keep_heads=heads, keep_ffn=[] if i == 2 else list(range(0, 96, 1 + i)))
             for i, heads in enumerate([[], [0, 2], [2, 3], [1]])]
    pruned = slice_model(dense, keeps)
    result = export_vllm(save_model(pruned, tokenizer, tmp_path / "src"), tmp_path / "out", prompts=PROMPTS,
                         max_new_tokens=NEW_TOKENS)
    architecture = {"qwen2": "TyrQwen2ForCausalLM", "qwen3": "TyrQwen3ForCausalLM", "llama": "TyrLlamaForCausalLM"}
    assert result.check.passed and result.check.model_class == architecture[arch]
    assert result.check.kv_cache_layers == {"model.layers.1.self_attn.attn": 2, "model.layers.2.self_attn.attn": 1,
                                            "model.layers.3.self_attn.attn": 1}
    assert [p.vllm_tokens for p in result.check.prompts] == greedy(pruned, tokenizer)


@pytest.mark.slow
def test_trust_remote_code_serves_qwen3_without_tyr(tokenizer, tmp_path):
    """vLLM's Transformers backend on a pruned Qwen3 folder with tyr unavailable: transformers resolves the Qwen3
    modeling file's relative import of the shared Llama layer, and the q/k norms run (one engine start)."""
    from tyr.testing import tiny_llama

    dense = tiny_llama("qwen3", vocab_size=VOCAB, hidden=HIDDEN, layers=3, heads=4, kv_heads=2, ffn=96, seed=2,
                       head_dim=64)
    model = slice_model(dense, [LayerKeep(keep_heads=[0, 1, 2, 3], keep_ffn=list(range(96))),
                                LayerKeep(keep_heads=[2, 3], keep_ffn=[]),
                                LayerKeep(keep_heads=[0, 2], keep_ffn=list(range(0, 96, 2)))])
    out = export_vllm(save_model(model, tokenizer, tmp_path / "src"), tmp_path / "out", check=False)
    assert out.transformers_backend
    (tmp_path / "no_tyr.py").write_text(NO_TYR)
    prompts = [tokenizer(p).input_ids for p in PROMPTS]
    request = GreedyRequest(model=out.out_dir, prompts=prompts, max_tokens=NEW_TOKENS, trust_remote_code=True)
    result = run_vllm_greedy(request, env={"VLLM_PLUGINS": "none"}, wrapper=[str(tmp_path / "no_tyr.py")])
    assert result.model_class == "TransformersForCausalLM" and not result.tyr_imported
    assert {k: v.num_kv_heads for k, v in result.kv_cache.items()} == {
        f"model.layers.{i}.self_attn.attn": kv for i, kv in enumerate([2, 1, 2])}
    assert result.tokens == greedy(model, tokenizer)
