"""`prune(...)` and `tyr prune` end to end on tiny models: Týr, its resume, the baselines, reports, bad input."""

from __future__ import annotations

import errno
import json
import logging
import shutil

import pytest
import torch

from tyr.cli import main as tyr_main
from tyr.compressor.baselines import flap_prune, uniform_magnitude_keeps
from tyr.compressor.prune import LatencyBudget, prune
from tyr.compressor.recipes import Recipe
from tyr.errors import TyrError
from tyr.models.facts import layer_widths, tensor_index
from tyr.models.io import load_model, save_model
from tyr.models.slicing import to_tyr
from tyr.compressor.latency import LatencyTable
from tyr.testing import TINY_RECIPE, tiny_llama


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tokenizer):
    """A tiny random Llama (6 layers, GQA 4/2, FFN 96) with the real SmolLM2 tokenizer, as a model folder."""
    model = to_tyr(tiny_llama(vocab_size=len(tokenizer), layers=6, heads=4, kv_heads=2, ffn=96, seed=3))
    return save_model(model, tokenizer, tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="module")
def recipe():
    return Recipe.model_validate(TINY_RECIPE)


def decoder_params(model) -> int:
    return sum(p.numel() for p in model.model.layers.parameters())


@pytest.fixture(scope="module")
def tyr_run(tmp_path_factory, tiny_dir, recipe):
    out = tmp_path_factory.mktemp("tyr") / "out"
    return prune(tiny_dir, sparsity=0.5, recipe=recipe, out_dir=out, progress=False, keep_model=True)


def test_tyr_end_to_end(tyr_run, tiny_dir, recipe):
    report = tyr_run.report
    # The budget holds in real parameters (candidates rounded to whole heads and channels), in every iteration.
    assert report.budget_tolerance == recipe.search.budget_tolerance
    assert abs(report.achieved_sparsity - 0.5) <= recipe.search.budget_tolerance
    assert all(abs(it.achieved_sparsity - 0.5) <= recipe.search.budget_tolerance for it in report.iterations)
    assert len(report.iterations) == recipe.iterations
    first = report.iterations[0]
    assert first.fitness < first.start_fitness                               # the search beats the uniform start
    for iteration in report.iterations:
        assert all(h.fitness <= h.parent_fitness for h in iteration.history)  # elitism, on each generation's tokens
        assert 0 < iteration.activation_reuse_saving < 1
    selected = [it for it in report.iterations if it.selected]
    assert len(selected) == 1 and selected[0].fitness == min(it.fitness for it in report.iterations)
    levels = [lvl for layer in report.layers for lvl in (layer.attn_level, layer.mlp_level)]
    assert len(set(levels)) > 1                                              # not uniform any more
    model, _ = load_model(tyr_run.out_dir)
    dense, _ = load_model(tiny_dir)
    assert 1 - decoder_params(model) / decoder_params(dense) == pytest.approx(report.achieved_sparsity)
    assert [(r.heads, r.kv_heads, r.ffn) for r in report.layers] == list(layer_widths(model.config))
    ids = torch.randint(0, 1000, (2, 16))
    assert torch.equal(model(input_ids=ids).logits, tyr_run.model(input_ids=ids).logits)
    saved = json.loads((tyr_run.out_dir / "prune_report.json").read_text())
    assert saved["method"] == "tyr" and len(saved["iterations"]) == recipe.iterations
    assert "| iteration |" in (tyr_run.out_dir / "prune_report.md").read_text()
    # Another run may not reuse this output or its work directory with other settings.
    with pytest.raises(TyrError, match="already exists"):
        prune(tiny_dir, sparsity=0.5, recipe=recipe, out_dir=tyr_run.out_dir, progress=False)
    with pytest.raises(TyrError, match="different run"):
        prune(tiny_dir, sparsity=0.4, recipe=recipe, out_dir=tyr_run.out_dir.with_name("other"),
              work_dir=tyr_run.out_dir.with_name("out.work"), progress=False)


def test_report_states_disk_and_bytes_written_and_supernets_reference_the_dense_files(tyr_run, tiny_dir):
    from safetensors import safe_open

    from tyr.atomic import tree_bytes
    from tyr.compressor.supernet import Supernet

    report, work = tyr_run.report, tyr_run.out_dir.with_name("out.work")
    supernets = [p.parent for p in work.glob("iter*/supernet/manifest.json")]
    assert supernets and report.bytes_written >= tree_bytes(tyr_run.out_dir) + sum(map(tree_bytes, supernets))
    assert report.peak_disk_mb * 2 ** 20 >= tree_bytes(work) and report.bytes_written >= report.peak_disk_mb
    assert all(stage.peak_disk_mb is not None for stage in report.stages)
    for folder in supernets:
        supernet = Supernet.open(folder)
        assert supernet.manifest.dense_weights.folder == str(tiny_dir.resolve())
        for record in supernet.manifest.modules:
            with safe_open(folder / record.file, framework="pt") as f:
                assert not [k for k in f.keys() if k.startswith("dense.")]


@pytest.mark.slow
def test_tyr_resume_after_interrupt_gives_the_same_model(tmp_path, tyr_run, tiny_dir, recipe):
    class Killed(Exception):
        pass

    def kill_in_second_iteration(iteration, record):
        if iteration == 1 and record.generation == 2:
            raise Killed

    out = tmp_path / "out"
    with pytest.raises(Killed):
        prune(tiny_dir, sparsity=0.5, recipe=recipe, out_dir=out, progress=False, on_generation=kill_in_second_iteration)
    assert not out.exists()
    resumed = prune(tiny_dir, sparsity=0.5, recipe=recipe, out_dir=out, progress=False)
    assert resumed.report.iterations[1].resumed_from_generation == 2
    assert [h.fitness for it in resumed.report.iterations for h in it.history] == \
           [h.fitness for it in tyr_run.report.iterations for h in it.history]
    first, _ = load_model(out)
    second, _ = load_model(tyr_run.out_dir)
    a, b = first.state_dict(), second.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_search_caches_larger_than_memory_shrink_and_give_the_same_model(tmp_path, tyr_run, tiny_dir, recipe,
                                                                           caplog):
    """Caches asked beyond this machine's memory are capped to what fits; caches only save recomputation, so the
    search and the model are the same."""
    asked = 10_000_000
    huge = recipe.model_copy(update={"search": recipe.search.model_copy(
        update={"activation_cache_mb": asked, "weight_cache_mb": asked})})
    with caplog.at_level(logging.INFO, logger="tyr.compressor.prune"):
        result = prune(tiny_dir, sparsity=0.5, recipe=huge, out_dir=tmp_path / "out", progress=False)
    assert f"(recipe: {asked} + {asked})" in caplog.text
    assert [h.fitness for it in result.report.iterations for h in it.history] == \
           [h.fitness for it in tyr_run.report.iterations for h in it.history]
    a, b = load_model(result.out_dir)[0].state_dict(), load_model(tyr_run.out_dir)[0].state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sparsities_on_one_grid_share_the_first_supernet(tmp_path, tyr_run, tiny_dir, recipe):
    cache = tmp_path / "supernets"
    quarter = prune(tiny_dir, sparsity=0.25, recipe=recipe, out_dir=tmp_path / "a", progress=False,
                    supernet_cache=cache).report
    # At 25% the uniform start removes too much (attention rounds to whole KV groups): it is repaired into the band.
    repair = quarter.iterations[0].budget_repair
    assert repair is not None and abs(repair.before - 0.25) > recipe.search.budget_tolerance and repair.moves
    assert abs(quarter.iterations[0].start_sparsity - 0.25) <= recipe.search.budget_tolerance
    assert abs(quarter.achieved_sparsity - 0.25) <= recipe.search.budget_tolerance
    assert "level moves brought it to" in (tmp_path / "a" / "prune_report.md").read_text()
    built = sorted(cache.iterdir())
    supernets, targets = [p for p in built if p.is_dir()], [p for p in built if p.suffix == ".safetensors"]
    # Kept for the next sparsity: the first supernet and the dense model's top-k on the selection tokens.
    assert len(supernets) == 1 and (supernets[0] / "manifest.json").is_file() and len(targets) == 1
    stamps = [(supernets[0] / "manifest.json").stat().st_mtime_ns, targets[0].stat().st_mtime_ns]
    second = prune(tiny_dir, sparsity=0.5, recipe=recipe, out_dir=tmp_path / "b", progress=False,
                   supernet_cache=cache)
    assert sorted(cache.iterdir()) == built
    assert [(supernets[0] / "manifest.json").stat().st_mtime_ns, targets[0].stat().st_mtime_ns] == stamps
    # Reusing it changes nothing: the same model as the run that built its own first supernet.
    a, b = load_model(second.out_dir)[0].state_dict(), load_model(tyr_run.out_dir)[0].state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_warm_start_scan_on_the_real_fitness(tmp_path, tyr_run, tiny_dir):
    data = {**TINY_RECIPE, "search": {**TINY_RECIPE["search"], "scan_levels": 1, "scan_every": 2}}
    result = prune(tiny_dir, sparsity=0.5, recipe=Recipe.model_validate(data), out_dir=tmp_path / "w", progress=False)
    report = result.report
    assert abs(report.achieved_sparsity - 0.5) <= report.budget_tolerance   # the scan's proposals are in the band
    for iteration in report.iterations:
        warm = iteration.warm_start
        assert warm is not None and warm.scanned > 0 and warm.start_fitness == iteration.start_fitness
        assert [scan.generation for scan in iteration.rescans] == [2]        # 3 generations, a rescan every 2
        for scan in [warm, *iteration.rescans]:
            if scan.chosen is not None:
                assert scan.proposals[scan.chosen].fitness == min(p.fitness for p in scan.proposals) \
                    < scan.start_fitness
    # The scan is part of the search's identity: the same run without it starts from the uniform distribution.
    assert tyr_run.report.iterations[0].warm_start is None
    markdown = (result.out_dir / "prune_report.md").read_text()
    assert "warm start:" in markdown and "scan after generation 2:" in markdown


@pytest.mark.parametrize("method", ["tyr", "uniform"])
def test_a_folder_is_streamed_and_prunes_as_the_loaded_model_does(tmp_path, tiny_dir, tokenizer, recipe, monkeypatch,
                                                                  method):
    """Týr and uniform read a model folder a module at a time: the dense model is never loaded whole, and the
    pruned model is the one the same model, loaded and passed in, gives."""
    loaded, _ = load_model(tiny_dir)
    from_memory = prune(loaded, tokenizer=tokenizer, sparsity=0.5, recipe=recipe, out_dir=tmp_path / "loaded",
                        method=method, progress=False, keep_model=True).model

    def refuse(*args, **kwargs):
        raise AssertionError("the dense model was loaded whole")

    monkeypatch.setattr("tyr.models.io.load_model", refuse)
    streamed = prune(tiny_dir, sparsity=0.5, recipe=recipe, out_dir=tmp_path / "streamed", method=method,
                     progress=False)
    monkeypatch.undo()
    model, _ = load_model(streamed.out_dir)
    assert layer_widths(model.config) == layer_widths(from_memory.config)
    expected = from_memory.state_dict()
    assert all(torch.equal(tensor, expected[name]) for name, tensor in model.state_dict().items())
    assert streamed.report.achieved_sparsity == pytest.approx(1 - decoder_params(model) / decoder_params(loaded))


def test_a_half_precision_folder_is_pruned_in_its_own_dtype(tmp_path, tiny_dir, tokenizer, recipe, monkeypatch):
    half, _ = load_model(tiny_dir, dtype=torch.bfloat16)
    half_dir = save_model(half, tokenizer, tmp_path / "half")
    monkeypatch.setattr("tyr.models.io.load_model", lambda *a, **k: pytest.fail("the dense model was loaded whole"))
    result = prune(half_dir, sparsity=0.5, recipe=recipe, out_dir=tmp_path / "out", progress=False)
    assert {t.dtype for t in tensor_index(result.out_dir).values()} == {"BF16"}
    assert abs(result.report.achieved_sparsity - 0.5) <= recipe.search.budget_tolerance
    monkeypatch.undo()
    model, _ = load_model(result.out_dir, dtype=torch.bfloat16)
    ids = torch.randint(0, len(tokenizer), (1, 12))
    assert torch.isfinite(model(input_ids=ids).logits).all()


def test_a_hub_id_is_streamed_from_the_hub_cache(tmp_path, tiny_dir, monkeypatch):
    """A hub id is fetched into the Hugging Face cache and read from there a module at a time (here the cache is
    filled by hand and the hub is offline, as on a machine that downloaded it before)."""
    import huggingface_hub.constants

    revision = "0" * 40
    repo = tmp_path / "hub" / "models--tyr-test--tiny"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    shutil.copytree(tiny_dir, repo / "snapshots" / revision)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr("tyr.models.io.load_model", lambda *a, **k: pytest.fail("the dense model was loaded whole"))
    result = prune("tyr-test/tiny", sparsity=0.5, recipe="fast", out_dir=tmp_path / "out", method="uniform",
                   progress=False)
    assert result.report.model == "tyr-test/tiny" and abs(result.report.achieved_sparsity - 0.5) <= 0.0625
    with pytest.raises(TyrError, match="cannot fetch tyr-test/absent from the hub"):
        prune("tyr-test/absent", sparsity=0.5, out_dir=tmp_path / "absent", method="uniform", progress=False)
    assert not (tmp_path / "absent").exists()


def test_uniform_baseline_is_the_local_pruner_at_one_level(tmp_path, tiny_dir, recipe):
    result = prune(tiny_dir, sparsity=0.5, recipe=recipe, out_dir=tmp_path / "u", method="uniform", progress=False)
    model, _ = load_model(result.out_dir)
    assert len(set(layer_widths(model.config))) == 1
    assert abs(result.report.achieved_sparsity - 0.5) <= 0.0625
    assert all(layer.attn_level == 0.5 and layer.mlp_level == 0.5 for layer in result.report.layers)


@pytest.mark.parametrize("method", ["magnitude", "flap"])
def test_baselines_give_loadable_models_at_the_requested_sparsity(tmp_path, tiny_dir, recipe, method):
    result = prune(tiny_dir, sparsity=0.5, recipe=recipe, out_dir=tmp_path / "out", method=method, progress=False)
    model, _ = load_model(result.out_dir)
    dense, _ = load_model(tiny_dir)
    achieved = 1 - decoder_params(model) / decoder_params(dense)
    assert achieved == pytest.approx(result.report.achieved_sparsity, abs=0.01)   # FLAP's zero biases count too
    assert abs(achieved - 0.5) <= 0.0625
    widths = layer_widths(model.config)
    assert len(set(widths)) == 1                                                   # uniform across layers
    for name in ("prune_report.json", "prune_report.md", "prune_sparsity.png"):
        assert (result.out_dir / name).is_file()
    ids = torch.randint(0, 1000, (1, 12))
    assert torch.isfinite(model(input_ids=ids).logits).all()


def test_magnitude_keeps_the_largest_heads_and_channels():
    model = tiny_llama(layers=1, heads=4, kv_heads=2, ffn=32, seed=0)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[:, 5] *= 100      # one dominant channel
        model.model.layers[0].self_attn.o_proj.weight[:, 3 * 16:4 * 16] *= 100   # head 3 (group 1) dominant
    keep = uniform_magnitude_keeps(model, 0.5)[0]
    assert 5 in keep.keep_ffn and len(keep.keep_ffn) == 16
    assert 3 in keep.keep_heads and set(keep.keep_heads) <= {2, 3}


def test_flap_bias_compensation_reduces_the_output_error():
    model = tiny_llama(layers=2, heads=4, kv_heads=2, ffn=64, seed=4)
    with torch.no_grad():   # give the MLP inputs a large mean, which only a bias can restore
        model.model.layers[0].mlp.up_proj.weight.add_(0.3)
    ids = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(0))
    pruned = flap_prune(model, ids, 0.5, progress=False)
    no_bias = pruned.__class__(pruned.config)
    state = {k: (torch.zeros_like(v) if k.endswith(".bias") else v) for k, v in pruned.state_dict().items()}
    no_bias.load_state_dict(state)
    reference = model.model(input_ids=ids).last_hidden_state
    error = lambda m: (m.model(input_ids=ids).last_hidden_state - reference).pow(2).mean().item()  # noqa: E731
    assert error(pruned) < error(no_bias.eval())
    assert pruned.model.layers[0].mlp.down_proj.bias.abs().sum() > 0
    assert pruned.model.layers[0].mlp.up_proj.bias.abs().sum() == 0


def test_latency_budget_from_a_measured_table(tmp_path, tiny_dir, recipe):
    """`tyr bench layers` times the tiny model's shapes; the search then keeps its output within a latency budget."""
    table_path = tmp_path / "latency.json"
    assert tyr_main(["bench", "layers", "--model", str(tiny_dir), "--out", str(table_path), "--batch", "2",
                     "--context", "32", "--repeats", "3"]) == 0
    table = LatencyTable.load(table_path)
    assert {"4,2", "2,1", "2,2"} <= set(table.attention_ms) and len(table.mlp_ms) == 8 and table.lm_head_ms > 0
    # The search starts from the uniform distribution: a budget of exactly its predicted latency is feasible.
    uniform, _ = load_model(prune(tiny_dir, sparsity=0.5, recipe=recipe, out_dir=tmp_path / "u", method="uniform",
                                  progress=False).out_dir)
    budget = table.predict_latency(layer_widths(uniform.config))
    result = prune(tiny_dir, sparsity=0.5, recipe=recipe, out_dir=tmp_path / "fast", progress=False, keep_model=True,
                   latency=LatencyBudget(table=table, max_ms=budget))
    assert table.predict_latency(layer_widths(result.model.config)) <= budget * (1 + 1e-9)
    assert any("latency budget" in note for note in result.report.notes)
    with pytest.raises(TyrError, match="exceeds the budget"):
        prune(tiny_dir, sparsity=0.5, recipe=recipe, out_dir=tmp_path / "tight", progress=False,
              latency=LatencyBudget(table=table, max_ms=0.5 * budget))
    assert tyr_main(["prune", "--model", str(tiny_dir), "--sparsity", "0.5", "--max-latency-ms", "1",
                     "--out", str(tmp_path / "o")]) == 2


def test_bad_input_is_rejected_clearly(tmp_path, tiny_dir, recipe):
    for sparsity in (0, 1, 1.5, -0.1):
        with pytest.raises(TyrError, match="strictly between 0 and 1"):
            prune(tiny_dir, sparsity=sparsity, recipe=recipe, out_dir=tmp_path / "x")
    with pytest.raises(TyrError, match="unknown method"):
        prune(tiny_dir, sparsity=0.5, recipe=recipe, out_dir=tmp_path / "x", method="random")
    greedy = recipe.model_copy(update={"calibration": recipe.calibration.model_copy(update={"num_sequences": 100_000})})
    with pytest.raises(TyrError, match="too little text"):
        prune(tiny_dir, sparsity=0.5, recipe=greedy, out_dir=tmp_path / "x", method="flap", progress=False)
    assert not (tmp_path / "x").exists()


def test_cli_errors_exit_2(tmp_path, tiny_dir, capsys):
    assert tyr_main(["prune", "--model", str(tiny_dir), "--sparsity", "1.2", "--out", str(tmp_path / "o")]) == 2
    assert "strictly between 0 and 1" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text(json.dumps({**TINY_RECIPE, "iterations": 99}))
    assert tyr_main(["prune", "--model", str(tiny_dir), "--sparsity", "0.5", "--recipe", str(bad),
                     "--out", str(tmp_path / "o")]) == 2
    assert "iterations" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_disk_full_becomes_a_clear_error(tmp_path, tiny_dir, recipe, monkeypatch):
    import tyr.compressor.prune as prune_module

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(prune_module, "atomic_write_json", full)
    with pytest.raises(TyrError, match="disk is full"):
        prune(tiny_dir, sparsity=0.5, recipe=recipe, out_dir=tmp_path / "o", method="magnitude", progress=False)
    assert not (tmp_path / "o").exists()
