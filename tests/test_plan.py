"""`tyr plan`: a plan from a config alone, checked against what a real prune of that model measures."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoTokenizer

from tyr.atomic import tree_bytes
from tyr.cli import main as tyr_main
from tyr.compressor.plan import plan_prune
from tyr.compressor.prune import prune
from tyr.compressor.recipes import Recipe
from tyr.testing import TINY_RECIPE, tiny_llama


@pytest.fixture(scope="module")
def bf16_run(tmp_path_factory, default_model_dir):
    """A tiny Llama stored in bfloat16 with the real SmolLM2 tokenizer, pruned with the tiny recipe."""
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    folder = tmp_path_factory.mktemp("plan") / "dense"
    model = tiny_llama(vocab_size=len(tokenizer), layers=6, heads=4, kv_heads=2, ffn=96, seed=3)
    model.to(torch.bfloat16).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    recipe = Recipe.model_validate(TINY_RECIPE | {"keep_supernets": True})
    result = prune(folder, sparsity=0.5, recipe=recipe, out_dir=folder.with_name("out"), progress=False)
    return folder, recipe, result


def test_plan_matches_a_real_prune_on_disk_and_bytes_written(bf16_run):
    folder, recipe, result = bf16_run
    plan = plan_prune(folder / "config.json", recipe=recipe, sparsity=0.5)
    report = result.report
    written = sum(s.written_bytes for s in plan.stages)
    peak_disk = max(s.disk_bytes for s in plan.stages)
    print(f"\nplanned / measured: written {written / report.bytes_written:.3f}, peak disk "
          f"{peak_disk / (report.peak_disk_mb * 2 ** 20):.3f}")
    assert abs(written / report.bytes_written - 1) <= 0.2, (written, report.bytes_written)
    assert abs(peak_disk / (report.peak_disk_mb * 2 ** 20) - 1) <= 0.2, (peak_disk, report.peak_disk_mb)
    # The supernets alone (a small part of this model's totals): the plan's sizing against their folders.
    work = result.out_dir.with_name("out.work")
    measured = [tree_bytes(work / f"iter{i}" / "supernet") for i in range(recipe.iterations)]
    assert len(plan.supernet_bytes) == len(measured) and all(m > 0 for m in measured)
    print(f"supernets planned / measured: {[round(p / m, 3) for p, m in zip(plan.supernet_bytes, measured)]}")
    for planned, size in zip(plan.supernet_bytes, measured):
        assert abs(planned / size - 1) <= 0.2, (planned, size)


def test_plan_cli_prints_a_table_and_writes_json(tmp_path, bf16_run, capsys):
    folder, _, _ = bf16_run
    assert tyr_main(["plan", "--model", str(folder), "--recipe", "paper", "--device-memory", "2GB",
                     "--json", str(tmp_path / "plan.json")]) == 0
    out = capsys.readouterr().out
    assert "calibration + supernet" in out and "DOES NOT FIT" in out and "calibration.num_sequences <=" in out
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert [s["name"] for s in plan["stages"]][:3] == ["load model", "calibration + supernet", "search"]
    assert plan["fits"] is False and plan["weights_dtype"] == "bfloat16"


@pytest.mark.parametrize("case", ["missing", "family", "not json", "size"])
def test_plan_bad_input_exits_2(tmp_path, case, capsys):
    config = tmp_path / "config.json"
    args = ["plan", "--model", str(config)]
    if case == "family":
        config.write_text(json.dumps({"model_type": "gpt2", "n_embd": 64}))
    elif case == "not json":
        config.write_text("{")
    elif case == "size":
        config.write_text(json.dumps({"model_type": "llama"}))
        args += ["--device-memory", "lots", "--json", str(tmp_path / "plan.json")]
    assert tyr_main(args) == 2
    err = capsys.readouterr().err
    expected = {"missing": "no model config", "family": "'gpt2' is not supported", "not json": "not a readable JSON",
                "size": "cannot read the size"}[case]
    assert expected in err and "Traceback" not in err
    assert not (tmp_path / "plan.json").exists()


LLAMA_31_8B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
               "intermediate_size": 14336, "num_attention_heads": 32, "num_key_value_heads": 8,
               "num_hidden_layers": 32, "vocab_size": 128256, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
               "max_position_embeddings": 131072, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
               "hidden_act": "silu", "head_dim": 128}


@pytest.mark.parametrize("recipe", ["fast", "paper"])
def test_llama_8b_fits_a_24gb_gpu_with_either_recipe(tmp_path, recipe):
    """The search caches shrink to the device, as the run's do: `paper` asks for 32 GiB of them."""
    config = tmp_path / "config.json"
    config.write_text(json.dumps(LLAMA_31_8B))
    plan = plan_prune(config, recipe=recipe, sparsity=0.5, device_memory=24 * 10 ** 9)
    assert plan.fits and plan.peak_device <= 24 * 10 ** 9, plan.advice
    search = next(s for s in plan.stages if s.name == "search")
    assert any("search caches capped" in note for note in search.notes) == (recipe == "paper")
    roomy = plan_prune(config, recipe=recipe, sparsity=0.5, device_memory=141 * 10 ** 9)
    assert not any("capped" in note for s in roomy.stages for note in s.notes)
