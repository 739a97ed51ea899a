"""Functional layers (parity with HF), supernet building (EEA modes, resume, disk full) and assembly."""

import errno
import resource
import time
from pathlib import Path

import pytest
import safetensors.torch
import torch

from tyr.compressor import supernet as supernet_module
from tyr.compressor.layerwise import DenseParts, attention_delta, heads_of, mlp_delta, module_weights
from tyr.compressor.recipes import LocalPrunerRecipe, MemoryRecipe
from tyr.compressor.supernet import DEFAULT_LADDER, Supernet, SupernetManifest, build_supernet
from tyr.errors import TyrError
from tyr.models.io import load_model, save_model
from tyr.models.facts import LayerWidth, gqa_widths, layer_params, layer_widths
from tyr.models.slicing import LayerKeep, slice_model
from tyr.testing import tiny_llama

EVERY_MODULE = MemoryRecipe(checkpoint_seconds=0, checkpoint_share=None)
BY_TIME = MemoryRecipe(checkpoint_seconds=60, checkpoint_share=None)


def layer_io(model, ids):
    """(input, output) hidden states of every decoder layer of an HF model, captured with hooks."""
    captured = []

    def record(module, args, kwargs, out):
        captured.append((args[0] if args else kwargs["hidden_states"], out))

    hooks = [layer.register_forward_hook(record, with_kwargs=True) for layer in model.model.layers]
    with torch.no_grad():
        logits = model(ids).logits
    for h in hooks:
        h.remove()
    return [(x, y[0] if isinstance(y, tuple) else y) for x, y in captured], logits


def functional_forward(parts: DenseParts, ids, modules: list[dict], keep_going=lambda i, x: None):
    """Run a model given as a list of module weight dicts (attn, mlp per layer) with the functional layers."""
    x = parts.embed(ids)
    cos, sin = parts.rope(ids.shape[1])
    for i, w in enumerate(modules):
        if i % 2 == 0:
            heads, kv = heads_of(w, parts.head_dim)
            x = x + attention_delta(x, w, heads, kv, cos, sin, parts.head_dim, parts.eps)
        else:
            x = x + mlp_delta(x, w, parts.eps)
        keep_going(i, x)
    return x


@pytest.fixture(scope="module")
def tiny():
    return tiny_llama(hidden=96, layers=3, heads=6, kv_heads=3, ffn=128, seed=4)


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 256, (6, 24), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("sliced", [False, True, "bias"])
def test_functional_layers_match_hf_layers(tiny, ids, sliced):
    model = tiny
    if sliced == "bias":
        model = tiny_llama(hidden=96, layers=3, heads=6, kv_heads=3, ffn=128, seed=4, attention_bias=True,
                           mlp_bias=True)
        assert "q_proj.bias" in module_weights(model, 0, "attn") and "down_proj.bias" in module_weights(model, 0, "mlp")
    if sliced is True:  # heterogeneous: layer 0 without attention, layer 2 without MLP, odd widths elsewhere
        model = slice_model(tiny, [LayerKeep(keep_heads=[], keep_ffn=list(range(0, 128, 3))),
                                   LayerKeep(keep_heads=[2, 3, 4, 5], keep_ffn=[1, 5, 7]),
                                   LayerKeep(keep_heads=[1, 5], keep_ffn=[])])
    io, logits = layer_io(model, ids)
    parts = DenseParts.from_model(model)
    cos, sin = parts.rope(ids.shape[1])
    assert torch.equal(parts.embed(ids), io[0][0])
    for i, (x, y) in enumerate(io):
        attn, mlp = module_weights(model, i, "attn"), module_weights(model, i, "mlp")
        heads, kv = heads_of(attn, parts.head_dim)
        h = x + attention_delta(x, attn, heads, kv, cos, sin, parts.head_dim, parts.eps)
        out = h + mlp_delta(h, mlp, parts.eps)
        assert (out - y).abs().max() <= 1e-5, f"layer {i}"
    assert (parts.logits(io[-1][1]) - logits).abs().max() <= 1e-5


def expected_widths(level: float, kind: str, heads: int = 6, kv: int = 3, ffn: int = 128) -> list[int]:
    if kind == "mlp":
        return [int((1 - level) * ffn + 0.5)]
    g, r = gqa_widths(heads, kv, level)[0]
    return [g * r, g]


@pytest.fixture(scope="module")
def built(tiny, ids, tmp_path_factory):
    out = tmp_path_factory.mktemp("supernet") / "sn"
    start = time.perf_counter()
    manifest = build_supernet(tiny, ids, out, [DEFAULT_LADDER] * 6, progress=False)
    return out, manifest, time.perf_counter() - start


def test_candidates_have_the_specified_widths_and_params(tiny, built):
    out, manifest, _ = built
    assert manifest.complete and manifest.checkpoint is None
    assert [(m.layer, m.kind) for m in manifest.modules] == [(i // 2, ("attn", "mlp")[i % 2]) for i in range(6)]
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "modules"]
    for m in manifest.modules:
        for level, width, params, keep, error in zip(m.levels, m.widths, m.params, m.keep, m.errors):
            if m.kind == "attn":
                configs = gqa_widths(6, 3, level)
                groups = {h // 2 for h in keep}
                assert (len(groups), len(keep) // max(len(groups), 1)) in configs
                assert width == [len(keep), len(groups)]
                lw = LayerWidth(num_attention_heads=width[0], num_key_value_heads=width[1], intermediate_size=0)
                assert params == layer_params(tiny.config, lw)[0]
            else:
                assert width == expected_widths(level, "mlp") == [len(keep)]
                lw = LayerWidth(num_attention_heads=0, num_key_value_heads=0, intermediate_size=width[0])
                assert params == layer_params(tiny.config, lw)[1]
        assert m.params[0] == max(m.params) and m.params[-1] == 0 and m.errors[0] == 0 and m.errors[-1] == 1
        assert all(a <= b + 1e-6 for a, b in zip(m.errors, m.errors[1:])), m.errors
    assert manifest.dense_params() == sum(m.params[0] for m in manifest.modules)


def test_all_dense_choice_reproduces_the_dense_model(tiny, ids, built, tmp_path, default_model_dir):
    from transformers import AutoTokenizer

    out, _, _ = built
    supernet = Supernet.open(out)
    model = supernet.assemble(tiny, [0] * 6)
    with torch.no_grad():
        assert (model(ids).logits - tiny(ids).logits).abs().max() <= 1e-5
    # A pruned choice: assemble() and the functional layers on weights() agree, and the folder round-trips.
    choice = [3, 5, 8, 2, 6, 7]
    pruned = supernet.assemble(tiny, choice)
    assert sum(p.numel() for name, p in pruned.named_parameters() if ".layers." in name) == supernet.params(choice)
    parts = DenseParts.from_model(tiny)
    x = functional_forward(parts, ids, [supernet.weights(m, c) for m, c in enumerate(choice)])
    with torch.no_grad():
        reference = pruned(ids).logits
    assert (parts.logits(x) - reference).abs().max() <= 1e-5
    save_model(pruned, AutoTokenizer.from_pretrained(default_model_dir), tmp_path / "pruned")
    loaded, _ = load_model(tmp_path / "pruned")
    assert layer_widths(loaded.config) == layer_widths(pruned.config)
    assert layer_widths(loaded.config)[1][:2] == (0, 0)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, reference)


def test_pruned_candidates_come_from_obs(tiny, built):
    """The stored out-projections are the OBS-updated ones, not slices of the dense weights."""
    out, manifest, _ = built
    supernet = Supernet.open(out)
    dense = module_weights(tiny, 0, "mlp")
    w = supernet.weights(1, 4)
    keep = manifest.modules[1].keep[4]
    assert torch.equal(w["gate_proj"], dense["gate_proj"][keep])
    assert not torch.allclose(w["down_proj"], dense["down_proj"][:, keep])
    assert supernet.weights(1, 8) == {} and supernet.weights(0, 8) == {}


def hidden_after(tiny, ids, tmp_path, eea, modules=1, **kwargs):
    seen = {}

    def stop(index, hidden):
        seen[index] = hidden.clone()
        if index + 1 == modules:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_supernet(tiny, ids, tmp_path / eea, [DEFAULT_LADDER] * 6, eea=eea, progress=False,
                       on_module_done=stop, memory=EVERY_MODULE, **kwargs)
    return seen, SupernetManifest.model_validate_json((tmp_path / eea / "manifest.json").read_text())


def test_eea_modes_propagate_the_right_inputs(tiny, ids, tmp_path, built):
    out, full, _ = built
    parts = DenseParts.from_model(tiny)
    x0 = parts.embed(ids)
    cos, sin = parts.rope(ids.shape[1])
    supernet = Supernet.open(out)
    deltas = [attention_delta(x0, supernet.weights(0, c), *heads_of(supernet.weights(0, c), parts.head_dim),
                              cos, sin, parts.head_dim, parts.eps) for c in range(9)]
    # expectation: the (1 − S)-weighted mean of the candidates' outputs
    seen, _ = hidden_after(tiny, ids, tmp_path, "expectation")
    weights = [(1 - s) / sum(1 - t for t in DEFAULT_LADDER) for s in DEFAULT_LADDER]
    expected = x0 + sum(w * d for w, d in zip(weights, deltas))
    assert (seen[0] - expected).abs().max() <= 1e-5
    # current: the output of the candidate at the current level
    seen, _ = hidden_after(tiny, ids, tmp_path, "current", current_levels=[0.625] * 6)
    assert (seen[0] - (x0 + deltas[5])).abs().max() <= 1e-5
    # none: the dense model's own hidden states, module after module; so the candidates of later modules differ
    seen, none = hidden_after(tiny, ids, tmp_path, "none", modules=3)
    io, _ = layer_io(tiny, ids)
    assert (seen[1] - io[0][1]).abs().max() <= 1e-5
    assert none.modules[0].keep == full.modules[0].keep
    assert none.modules[2].errors != full.modules[2].errors


def test_resume_after_interruption_is_bit_identical(tiny, ids, tmp_path, built):
    out, manifest, _ = built

    def interrupt(index, hidden):
        if index == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_supernet(tiny, ids, tmp_path / "sn", [DEFAULT_LADDER] * 6, progress=False, on_module_done=interrupt,
                       memory=EVERY_MODULE)
    partial = SupernetManifest.model_validate_json((tmp_path / "sn" / "manifest.json").read_text())
    assert len(partial.modules) == 3 and not partial.complete and partial.checkpoint
    with pytest.raises(TyrError, match="partial supernet"):
        Supernet.open(tmp_path / "sn")
    # A run killed mid-write leaves a temp file and maybe a checkpoint the manifest never pointed to.
    (tmp_path / "sn" / "modules" / ".003-layer001-mlp.safetensors.tmp-x").write_bytes(b"partial")
    (tmp_path / "sn" / "checkpoint-003.safetensors").write_bytes(b"orphan")
    resumed = []
    build_supernet(tiny, ids, tmp_path / "sn", [DEFAULT_LADDER] * 6, progress=False,
                   on_module_done=lambda i, h: resumed.append(i))
    assert resumed == [3, 4, 5]
    files = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path / "sn") for p in (tmp_path / "sn").rglob("*") if p.is_file())
    for f in files:
        assert (out / f).read_bytes() == (tmp_path / "sn" / f).read_bytes(), f
    # Different inputs are refused, a finished build is returned as is.
    with pytest.raises(TyrError, match="different inputs"):
        build_supernet(tiny, ids[:, :20], tmp_path / "sn", [DEFAULT_LADDER] * 6, progress=False)
    assert build_supernet(tiny, ids, tmp_path / "sn", [DEFAULT_LADDER] * 6, progress=False) == manifest


def test_disk_full_is_reported_and_leaves_finished_modules_valid(tiny, ids, tmp_path, monkeypatch, built):
    """A full disk cannot be produced here, so the safetensors writer raises ENOSPC on the 3rd module file."""
    out, _, _ = built
    real_save, calls = safetensors.torch.save_file, []

    def save_until_full(tensors, path, *args, **kwargs):
        calls.append(path)
        if sum(Path(p).parent.name == "modules" for p in calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(tensors, path, *args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", save_until_full)
    with pytest.raises(TyrError, match="disk full .* the 2 finished modules"):
        build_supernet(tiny, ids, tmp_path / "sn", [DEFAULT_LADDER] * 6, progress=False, memory=EVERY_MODULE)
    assert not [p for p in (tmp_path / "sn").rglob("*.tmp-*")]
    monkeypatch.setattr(safetensors.torch, "save_file", real_save)
    build_supernet(tiny, ids, tmp_path / "sn", [DEFAULT_LADDER] * 6, progress=False)
    assert (tmp_path / "sn" / "manifest.json").read_bytes() == (out / "manifest.json").read_bytes()


def test_custom_ladders_and_bad_inputs(tiny, ids, tmp_path):
    ladders = [[0.25, 0.3125, 0.375], [0.0, 0.0625, 1.0]] * 3
    manifest = build_supernet(tiny, ids, tmp_path / "sn", ladders, eea="current",
                              current_levels=[0.3125, 0.0] * 3, settings=LocalPrunerRecipe(channel_step=5),
                              progress=False)
    assert [m.levels for m in manifest.modules] == ladders
    assert manifest.modules[1].widths == [[128], [120], [0]]
    with pytest.raises(TyrError, match="not on its ladder"):
        build_supernet(tiny, ids, tmp_path / "x", ladders, eea="current", current_levels=[0.5] * 6)
    with pytest.raises(TyrError, match="got 2 ladders"):
        build_supernet(tiny, ids, tmp_path / "x", ladders[:2])
    with pytest.raises(TyrError, match="already pruned"):
        build_supernet(slice_model(tiny, [LayerKeep(keep_heads=[0, 1], keep_ffn=[0])] * 3), ids, tmp_path / "x",
                       ladders)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "file").write_text("x")
    with pytest.raises(TyrError, match="not a supernet folder"):
        build_supernet(tiny, ids, tmp_path / "junk", ladders)


@pytest.mark.slow
def test_real_smollm2_two_layers(smollm2, tmp_path):
    """Two decoder layers of the real SmolLM2 on real text: candidate errors rise with sparsity; time and memory."""
    from transformers import LlamaForCausalLM

    from tyr.compressor.calibration import calibration_ids

    dense, tokenizer = smollm2
    config = dense.config.__class__.from_dict(dense.config.to_dict() | {"num_hidden_layers": 2})
    model = LlamaForCausalLM(config).eval()
    model.load_state_dict(dense.state_dict(), strict=False)
    ids = calibration_ids(tokenizer, num_sequences=16, seq_len=256)
    start = time.perf_counter()
    manifest = build_supernet(model, ids, tmp_path / "sn", [DEFAULT_LADDER] * 4, progress=False)
    seconds = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\nSmolLM2 2 layers, 16x256 tokens: supernet built in {seconds:.1f} s, process peak RSS {peak_mb:.0f} MB")
    for m in manifest.modules:
        print(f"  layer {m.layer} {m.kind}: widths {m.widths}\n    errors {[round(e, 4) for e in m.errors]}")
        if m.kind == "mlp":  # nested channel sets: the error rises level by level
            assert all(a <= b + 1e-4 for a, b in zip(m.errors, m.errors[1:])), m.errors
        # GQA head sets are not nested ((3, 2) cannot be reached from (2, 3)), so only the trend is certain.
        assert m.errors[0] == 0 and 0 < m.errors[2] < m.errors[4] < m.errors[6] < m.errors[7] < m.errors[8] == 1
    assert manifest.modules[0].widths[4] in ([4, 2], [3, 3])
    with torch.no_grad():
        pruned = Supernet.open(tmp_path / "sn").assemble(model, [4, 4, 4, 4])
        assert torch.isfinite(pruned(ids[:2]).logits).all()


def test_biases_are_kept_and_propagated(ids, tmp_path):
    model = tiny_llama(hidden=64, layers=2, heads=4, kv_heads=2, ffn=64, seed=2, attention_bias=True, mlp_bias=True)
    seen = {}
    build_supernet(model, ids, tmp_path / "sn", [DEFAULT_LADDER] * 4, progress=False,
                   on_module_done=lambda i, h: seen.setdefault(i, h.clone()))
    supernet = Supernet.open(tmp_path / "sn")
    with torch.no_grad():
        assert (supernet.assemble(model, [0] * 4)(ids).logits - model(ids).logits).abs().max() <= 1e-5
    parts = DenseParts.from_model(model)
    x0, (cos, sin) = parts.embed(ids), parts.rope(ids.shape[1])
    weights = [(1 - s) / sum(1 - t for t in DEFAULT_LADDER) for s in DEFAULT_LADDER]
    expected = x0 + sum(p * attention_delta(x0, w, *heads_of(w, parts.head_dim), cos, sin, parts.head_dim, parts.eps)
                        for p, w in ((p, supernet.weights(0, c)) for c, p in enumerate(weights)))
    assert "o_proj.bias" in supernet.weights(0, 3)
    assert (seen[0] - expected).abs().max() <= 1e-5


def test_chunked_recomputed_activations_give_the_same_supernet(tiny, ids, tmp_path, monkeypatch, built):
    """Activations too big to keep: Hessians accumulate over chunks of sequences and are recomputed to propagate."""
    from tyr.compressor import calibration

    out, manifest, _ = built
    monkeypatch.setattr(calibration, "CACHE_BYTES", 0)
    monkeypatch.setattr(calibration, "CHUNK_BYTES", 24 * 128 * 4 * 2)  # two sequences of the widest activation
    assert len(calibration.sequence_chunks(6, 24, 128)) == 3
    chunked = build_supernet(tiny, ids, tmp_path / "sn", [DEFAULT_LADDER] * 6, progress=False)
    for a, b in zip(chunked.modules, manifest.modules):
        assert a.keep == b.keep
        assert a.errors == pytest.approx(b.errors, rel=1e-3, abs=1e-6)
    for m in range(6):
        for c in (0, 3, 7):
            for name, tensor in Supernet.open(out).weights(m, c).items():
                assert torch.allclose(Supernet.open(tmp_path / "sn").weights(m, c)[name], tensor, atol=1e-4), name


# ----- on disk: only what candidates change, in the dense weights' dtype; time-based checkpoints -----

def saved_folder(model, path, dtype):
    """``model``'s weights saved as a safetensors folder in ``dtype``, and the model loaded back from it (fp32)."""
    import copy

    from transformers import AutoModelForCausalLM

    copy.deepcopy(model).to(dtype).save_pretrained(path, safe_serialization=True)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def file_tensors(path):
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        return {name: f.get_tensor(name) for name in f.keys()}


def test_referenced_dense_weights_give_the_same_supernet(tiny, ids, tmp_path, built):
    """An fp32 folder: module files hold only the candidates; the search reads the same weights as from a copy."""
    from tyr.atomic import counting_writes, tree_bytes

    out, manifest, _ = built
    model = saved_folder(tiny, tmp_path / "dense", torch.float32)
    with counting_writes() as written:
        referenced = build_supernet(model, ids, tmp_path / "sn", [DEFAULT_LADDER] * 6, progress=False,
                                    dense_folder=tmp_path / "dense")
    # no checkpoint was due: every file written once, and the empty manifest that claims the folder
    assert tree_bytes(tmp_path / "sn") < written.bytes < tree_bytes(tmp_path / "sn") + 2048
    copies = sum(t.numel() * t.itemsize for m in manifest.modules for k, t in file_tensors(out / m.file).items()
                 if k.startswith("dense."))
    assert tree_bytes(tmp_path / "sn") < tree_bytes(out) - 0.95 * copies
    assert [(m.keep, m.errors) for m in referenced.modules] == [(m.keep, m.errors) for m in manifest.modules]
    for record in referenced.modules:
        assert not [k for k in file_tensors(tmp_path / "sn" / record.file) if k.startswith("dense.")]
        assert set(record.referenced) | {"o_proj", "down_proj"} >= set(module_weights(tiny, 0, record.kind))
    copied, read = Supernet.open(out), Supernet.open(tmp_path / "sn")
    for m in range(6):
        for c in range(9):
            a, b = copied.weights(m, c), read.weights(m, c)
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), (m, c)
    # A rewritten dense file is noticed before the search reads from it.
    weights = next((tmp_path / "dense").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes())
    with pytest.raises(TyrError, match="rewritten since the supernet was built"):
        Supernet.open(tmp_path / "sn")
    build_supernet(model, ids, tmp_path / "sn", [DEFAULT_LADDER] * 6, progress=False, dense_folder=tmp_path / "dense")
    assert Supernet.open(tmp_path / "sn").weights(0, 3).keys() == read.weights(0, 3).keys()   # rebuilt


def test_bf16_model_stores_bf16_candidates_and_checkpoints(tiny, ids, tmp_path):
    model = saved_folder(tiny, tmp_path / "dense", torch.bfloat16)
    stop = []

    def interrupt(index, hidden):
        assert hidden.dtype == torch.bfloat16
        if index == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_supernet(model, ids, tmp_path / "sn", [DEFAULT_LADDER] * 6, progress=False,
                       dense_folder=tmp_path / "dense", memory=EVERY_MODULE, on_module_done=interrupt)
    partial = SupernetManifest.model_validate_json((tmp_path / "sn" / "manifest.json").read_text())
    assert file_tensors(tmp_path / "sn" / partial.checkpoint)["hidden"].dtype == torch.bfloat16
    manifest = build_supernet(model, ids, tmp_path / "sn", [DEFAULT_LADDER] * 6, progress=False,
                              dense_folder=tmp_path / "dense", on_module_done=lambda i, h: stop.append(i))
    assert stop == [2, 3, 4, 5] and manifest.store_dtype == "bfloat16"
    for record in manifest.modules:
        tensors = file_tensors(tmp_path / "sn" / record.file)
        assert tensors and all(t.dtype == torch.bfloat16 for t in tensors.values())
    assert torch.isfinite(Supernet.open(tmp_path / "sn").assemble(model, [2] * 6)(ids[:1]).logits).all()


def test_checkpoints_are_time_based_and_a_kill_redoes_only_the_modules_since(tiny, ids, tmp_path, monkeypatch,
                                                                              built):
    """A fake clock: one checkpoint interval passes while module 0 is reported, none after; killed after module 3."""
    from types import SimpleNamespace

    from tyr.atomic import counting_writes

    out, manifest, _ = built
    clock = [0.0]
    monkeypatch.setattr(supernet_module, "time", SimpleNamespace(monotonic=lambda: clock[0]))

    def tick_then_kill(index, hidden):
        clock[0] += 100.0 if index == 0 else 0.0
        if index == 3:
            raise KeyboardInterrupt

    with counting_writes() as written, pytest.raises(KeyboardInterrupt):
        build_supernet(tiny, ids, tmp_path / "sn", [DEFAULT_LADDER] * 6, progress=False, memory=BY_TIME,
                       on_module_done=tick_then_kill)
    partial = SupernetManifest.model_validate_json((tmp_path / "sn" / "manifest.json").read_text())
    assert len(partial.modules) == 2 and partial.checkpoint == "checkpoint-001.safetensors"
    assert written.bytes > 0
    resumed = []
    build_supernet(tiny, ids, tmp_path / "sn", [DEFAULT_LADDER] * 6, progress=False, memory=BY_TIME,
                   on_module_done=lambda i, h: resumed.append(i))
    assert resumed == [2, 3, 4, 5]
    files = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path / "sn") for p in (tmp_path / "sn").rglob("*") if p.is_file())
    assert [f for f in files if (out / f).read_bytes() != (tmp_path / "sn" / f).read_bytes()] == []
    # A supernet of the earlier format (version 1) in the folder is rebuilt in place, to the same bytes.
    manifest_path = tmp_path / "sn" / "manifest.json"
    manifest_path.write_text(manifest_path.read_text().replace('"version": 2', '"version": 1'))
    build_supernet(tiny, ids, tmp_path / "sn", [DEFAULT_LADDER] * 6, progress=False)
    assert manifest_path.read_bytes() == (out / "manifest.json").read_bytes()


def test_a_kill_while_hidden_states_spill_to_disk_resumes_to_the_same_supernet(tiny, ids, tmp_path, monkeypatch,
                                                                              built):
    """Hidden states kept on the host (on the CPU the same memory as the device; no GPU here) and checkpointed
    after every module: killed half-way through writing the second checkpoint, the rerun gives the same files."""
    out, _, _ = built
    real_save, checkpoints = safetensors.torch.save_file, []

    def killed_in_second_checkpoint(tensors, path, *args, **kwargs):
        if Path(path).name.startswith(".checkpoint-"):
            checkpoints.append(path)
            if len(checkpoints) == 2:
                Path(path).write_bytes(b"half a checkpoint")
                raise KeyboardInterrupt
        real_save(tensors, path, *args, **kwargs)

    spilled = MemoryRecipe(hidden_states="host", checkpoint_seconds=0, checkpoint_share=None)
    monkeypatch.setattr(safetensors.torch, "save_file", killed_in_second_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        build_supernet(tiny, ids, tmp_path / "sn", [DEFAULT_LADDER] * 6, progress=False, memory=spilled)
    monkeypatch.undo()
    partial = SupernetManifest.model_validate_json((tmp_path / "sn" / "manifest.json").read_text())
    assert len(partial.modules) == 1 and partial.checkpoint == "checkpoint-000.safetensors"
    resumed = []
    build_supernet(tiny, ids, tmp_path / "sn", [DEFAULT_LADDER] * 6, progress=False, memory=spilled,
                   on_module_done=lambda i, h: resumed.append(i))
    assert resumed == [1, 2, 3, 4, 5]
    files = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path / "sn") for p in (tmp_path / "sn").rglob("*") if p.is_file())
    assert [f for f in files if (out / f).read_bytes() != (tmp_path / "sn" / f).read_bytes()] == []


def test_checkpoints_write_at_most_their_share_of_the_candidates(tiny, ids, tmp_path, monkeypatch):
    real_save, written = safetensors.torch.save_file, []

    def recording_save(tensors, path, *args, **kwargs):
        real_save(tensors, path, *args, **kwargs)
        written.append((Path(path).parent.name == "modules", Path(path).stat().st_size))

    monkeypatch.setattr(safetensors.torch, "save_file", recording_save)
    wide_ids = ids.repeat(4, 1)    # hidden states of a size that makes the share, not the time, decide
    build_supernet(tiny, wide_ids, tmp_path / "sn", [DEFAULT_LADDER] * 6, progress=False,
                   memory=MemoryRecipe(checkpoint_seconds=0, checkpoint_share=0.5))
    modules = sum(size for is_module, size in written if is_module)
    checkpoints = [size for is_module, size in written if not is_module]
    assert 0 < len(checkpoints) < 5 and sum(checkpoints) <= 0.5 * modules


def test_streamed_build_gives_the_same_candidates(tiny, ids, tmp_path):
    """The dense model read module by module from its bf16 files gives the bytes of the same model loaded whole in
    fp32 (bf16 values are exact in fp32; the math is fp32 in both)."""
    from tyr.models.streaming import StreamedModel

    loaded = saved_folder(tiny, tmp_path / "dense", torch.bfloat16)
    whole = build_supernet(loaded, ids, tmp_path / "whole", [DEFAULT_LADDER] * 6, progress=False,
                           dense_folder=tmp_path / "dense")
    streamed_model = StreamedModel(tmp_path / "dense")
    streamed = build_supernet(streamed_model, ids, tmp_path / "streamed", [DEFAULT_LADDER] * 6, progress=False)
    assert streamed.store_dtype == whole.store_dtype == "bfloat16"
    assert streamed.dense_weights.folder == whole.dense_weights.folder
    for a, b in zip(whole.modules, streamed.modules, strict=True):
        assert (a.keep, a.widths, a.params) == (b.keep, b.widths, b.params)
        assert a.errors == b.errors
    x, y = Supernet.open(tmp_path / "whole"), Supernet.open(tmp_path / "streamed")
    for m in range(6):
        for c in range(9):
            a, b = x.weights(m, c), y.weights(m, c)
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k])
                                                for k in a), (m, c)
