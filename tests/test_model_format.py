"""The heterogeneous-width format: slicing parity against masking, cached decoding, save/load round trips."""

import json

import pytest
import torch

from tyr.errors import TyrError
from tyr.models.io import load_model, save_model
from tyr.models.facts import layer_widths
from tyr.models.slicing import LayerKeep, mask_model, slice_model, to_tyr
from tyr.testing import tiny_hetero, tiny_llama

from helpers import load_without_tyr


def random_keeps(model, seed: int, drop_attention_layer: int | None = 0, drop_mlp_layer: int | None = 2):
    """GQA-consistent random keep sets; one layer loses its attention and one its MLP entirely."""
    g = torch.Generator().manual_seed(seed)
    keeps = []
    for i, w in enumerate(layer_widths(model.config)):
        rep = w.num_attention_heads // w.num_key_value_heads
        n_groups = int(torch.randint(1, w.num_key_value_heads + 1, (1,), generator=g))
        per_group = int(torch.randint(1, rep + 1, (1,), generator=g))
        groups = torch.randperm(w.num_key_value_heads, generator=g)[:n_groups].tolist()
        heads = [grp * rep + int(h) for grp in groups for h in torch.randperm(rep, generator=g)[:per_group]]
        ffn = torch.randperm(w.intermediate_size, generator=g)[: int(torch.randint(1, w.intermediate_size, (1,), generator=g))]
        keeps.append(LayerKeep(keep_heads=[] if i == drop_attention_layer else heads,
                               keep_ffn=[] if i == drop_mlp_layer else ffn.tolist()))
    return keeps


def greedy_by_hand(model, ids, steps):
    """Greedy decoding through the KV cache, one token at a time, returning logits of every step."""
    out = model(ids, use_cache=True)
    cache, logits = out.past_key_values, [out.logits[:, -1]]
    for _ in range(steps):
        nxt = logits[-1].argmax(-1, keepdim=True)
        out = model(nxt, past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        logits.append(out.logits[:, -1])
    return torch.stack(logits, 1)


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_slice_matches_mask(arch):
    dense = tiny_llama(arch, hidden=96, layers=4, heads=6, kv_heads=3, ffn=96)
    keeps = random_keeps(dense, seed=1)
    sliced, masked = slice_model(dense, keeps), mask_model(dense, keeps)
    assert layer_widths(sliced.config)[0][:2] == (0, 0)
    assert sum(p.numel() for p in sliced.parameters()) < sum(p.numel() for p in dense.parameters())
    ids = torch.randint(0, 256, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (sliced(ids).logits - masked(ids).logits).abs().max() <= 1e-4
        assert (greedy_by_hand(sliced, ids, 8) - greedy_by_hand(masked, ids, 8)).abs().max() <= 1e-4
        a = sliced.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False)
        b = masked.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False)
    assert torch.equal(a, b)


def test_cached_decoding_matches_full_forward_when_layer0_has_no_attention():
    model = tiny_hetero()
    assert layer_widths(model.config)[0] == (0, 0, 96)
    ids = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        generated = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)
        full = model(generated).logits[:, ids.shape[1] - 1:-1].argmax(-1)
    assert torch.equal(full, generated[:, ids.shape[1]:])


def test_left_padded_batch_matches_single_sequences():
    model = tiny_hetero()
    a, b = torch.tensor([[5, 6, 7, 8, 9]]), torch.tensor([[11, 12, 13]])
    batch = torch.tensor([[5, 6, 7, 8, 9], [2, 2, 11, 12, 13]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    with torch.no_grad():
        out = model.generate(batch, attention_mask=mask, max_new_tokens=5, do_sample=False)[:, 5:]
        ref_a = model.generate(a, attention_mask=torch.ones_like(a), max_new_tokens=5, do_sample=False)[:, 5:]
        ref_b = model.generate(b, attention_mask=torch.ones_like(b), max_new_tokens=5, do_sample=False)[:, 3:]
    assert torch.equal(out[0], ref_a[0]) and torch.equal(out[1], ref_b[0])


def test_slicing_twice_equals_slicing_once():
    dense = tiny_llama(layers=2, heads=4, kv_heads=2, ffn=64)
    first = [LayerKeep(keep_heads=[0, 1, 2, 3], keep_ffn=list(range(0, 64, 2)))] * 2
    then = [LayerKeep(keep_heads=[2, 3], keep_ffn=list(range(10)))] * 2
    once = [LayerKeep(keep_heads=[2, 3], keep_ffn=list(range(0, 20, 2)))] * 2
    ids = torch.randint(0, 256, (1, 7))
    with torch.no_grad():
        twice = slice_model(slice_model(dense, first), then)(ids).logits
        assert torch.allclose(twice, slice_model(dense, once)(ids).logits, atol=1e-5)


def test_gqa_inconsistent_keep_is_rejected():
    dense = tiny_llama(layers=1, heads=4, kv_heads=2)
    with pytest.raises(TyrError, match="same number of query heads"):
        slice_model(dense, [LayerKeep(keep_heads=[0, 1, 2], keep_ffn=[0])])
    with pytest.raises(TyrError, match="keep_ffn has indices outside"):
        slice_model(dense, [LayerKeep(keep_heads=[0], keep_ffn=[999])])
    with pytest.raises(TyrError, match="keep sets for 2 layers"):
        slice_model(dense, [LayerKeep(keep_heads=[0], keep_ffn=[0])] * 2)


def test_config_rejects_widths_that_break_gqa():
    from tyr.models import TyrLlamaConfig

    base = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_hidden_layers=2,
                intermediate_size=32)
    with pytest.raises(ValueError, match=r"per_layer_config\[1\].num_attention_heads=3 is not a multiple"):
        TyrLlamaConfig(**base, per_layer_config={1: {"num_attention_heads": 3}})
    with pytest.raises(ValueError, match=r"per_layer_config\[0\].intermediate_size=64 is outside"):
        TyrLlamaConfig(**base, per_layer_config={0: {"intermediate_size": 64}})
    with pytest.raises(ValueError, match="must both be 0"):
        TyrLlamaConfig(**base, per_layer_config={0: {"num_attention_heads": 0}})


def _tokenizer(default_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model_dir)


def test_round_trip_with_tyr_installed(tmp_path):
    model = tiny_hetero()
    out = save_model(model, None, tmp_path / "m")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "tyr_llama" and config["architectures"] == ["TyrLlamaForCausalLM"]
    assert set(config["auto_map"]) >= {"AutoModel", "AutoModelForCausalLM"}
    assert config["allow_global_per_layer_attribute_access"] is True
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(out)  # no trust_remote_code: tyr registered the class
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    assert layer_widths(loaded.config) == layer_widths(model.config)


def test_round_trip_without_tyr_needs_only_trust_remote_code(tmp_path):
    model = tiny_hetero()
    out = save_model(model, None, tmp_path / "m")
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    with torch.no_grad():
        expected = model(ids).logits
    assert "OK TyrLlamaForCausalLM transformers_modules" in load_without_tyr(out, ids, expected, tmp_path)


def test_save_refuses_to_overwrite_and_leaves_nothing_half_written(tmp_path):
    model = tiny_hetero()
    save_model(model, None, tmp_path / "m")
    with pytest.raises(FileExistsError):
        save_model(model, None, tmp_path / "m")
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


def test_load_errors_name_the_problem(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(TyrError, match="no config.json"):
        load_model(tmp_path / "empty")
    (tmp_path / "file").write_text("x")
    with pytest.raises(TyrError, match="not a model folder"):
        load_model(tmp_path / "file")
    nosafe = tmp_path / "nosafe"
    nosafe.mkdir()
    (nosafe / "config.json").write_text("{}")
    with pytest.raises(TyrError, match="no \\*.safetensors"):
        load_model(nosafe)
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    (gpt2 / "model.safetensors").write_bytes(b"")
    with pytest.raises(TyrError, match="'gpt2' is not supported. Supported:"):
        load_model(gpt2)


def test_corrupt_weights_get_a_clear_error(tmp_path, default_model_dir):
    out = save_model(tiny_hetero(), _tokenizer(default_model_dir), tmp_path / "m")
    weights = out / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(TyrError, match="cannot load the model"):
        load_model(out)


@pytest.mark.slow
def test_real_smollm2_slicing_parity(smollm2):
    dense, tokenizer = smollm2
    keeps = random_keeps(dense, seed=7, drop_attention_layer=0, drop_mlp_layer=5)
    sliced, masked = slice_model(dense, keeps), mask_model(dense, keeps)
    ids = tokenizer(["The capital of France is", "Structured pruning makes"], return_tensors="pt", padding=True)
    with torch.no_grad():
        reference = masked(**ids).logits
        # fp32 over 30 layers: summation order alone moves logits of magnitude ~30 by ~1e-4 (relative 5e-6) ...
        assert (sliced(**ids).logits - reference).abs().max() <= 1e-5 * reference.abs().max()
        # ... and in float64 the two networks agree exactly up to rounding: slicing itself loses nothing.
        diff64 = (sliced.double()(**ids).logits - masked.double()(**ids).logits).abs().max()
        sliced.float(), masked.float()
        assert diff64 <= 1e-9
        a = sliced.generate(**ids, max_new_tokens=12, do_sample=False)
        b = masked.generate(**ids, max_new_tokens=12, do_sample=False)
    assert torch.equal(a, b)
    full = to_tyr(dense)
    with torch.no_grad():
        assert (full(**ids).logits - dense(**ids).logits).abs().max() == 0


def test_model_facts_agree_with_the_modules_and_the_files(tmp_path):
    from tyr.models.facts import LayerWidth, decoder_params, layer_params, module_params, tensor_shapes

    model = tiny_hetero()                              # hidden 64, head_dim 16; layer 1: 4 heads, 2 KV heads, FFN 48
    assert layer_params(model.config, LayerWidth(4, 2, 48)) == ((2 * 4 + 2 * 2) * 16 * 64 + 64, 3 * 48 * 64 + 64)
    assert decoder_params(model.config) == sum(a + m for a, m in module_params(model))
    folder = save_model(model, None, tmp_path / "m")
    shapes = tensor_shapes(folder)
    assert shapes == {name: list(t.shape) for name, t in model.state_dict().items()}
    assert shapes["model.layers.1.mlp.up_proj.weight"] == [48, 64] and "model.layers.0.self_attn.q_proj.weight" not in shapes
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(TyrError, match="model.safetensors is truncated"):
        tensor_shapes(folder)


def test_a_streamed_slice_written_in_shards_is_the_sliced_model(tmp_path):
    """save_sliced writes what slice_model builds, a shard at a time and from a folder read a tensor at a time:
    the same tensors, config and module counts (norms of removed blocks excluded, as the loaded modules count)."""
    from tyr.models.facts import module_params, total_params
    from tyr.models.io import save_sliced
    from tyr.models.slicing import sliced_tensors
    from tyr.models.streaming import StreamedModel

    dense = to_tyr(tiny_llama(layers=3, heads=4, kv_heads=2, ffn=96, seed=5)).to(torch.bfloat16)
    dense_dir = save_model(dense, None, tmp_path / "dense")
    keeps = [LayerKeep(keep_heads=[0, 1], keep_ffn=list(range(0, 96, 3))), LayerKeep(keep_heads=[], keep_ffn=[5, 7]),
             LayerKeep(keep_heads=[0, 1, 2, 3], keep_ffn=[])]
    expected = slice_model(dense, keeps)
    out = save_sliced(sliced_tensors(StreamedModel(dense_dir), keeps), None, tmp_path / "out", shard_bytes=4096)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1                        # several shards, named as HF names them
    written = StreamedModel(out)
    assert module_params(written) == module_params(expected) and total_params(written) == total_params(expected)
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    assert layer_widths(loaded.config) == layer_widths(expected.config)
    assert set(loaded.state_dict()) == set(expected.state_dict())
    assert all(torch.equal(t, expected.state_dict()[name]) for name, t in loaded.state_dict().items())
