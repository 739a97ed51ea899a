"""`tyr run` on a tiny model, in onnxruntime: prune at several sparsities, evaluate, export, benchmark, select,
report, and resume; then `tyr select` on what it recorded. (The vLLM stages are covered in test_serving and
test_export_vllm.)"""

from __future__ import annotations

import json

import pytest
import yaml
from transformers import AutoTokenizer

from tyr.cli import main
from tyr.models.io import load_model, save_model
from tyr.models.slicing import to_tyr
from tyr.pipeline import RunConfig
from tyr.selection.selection import Measurement
from tyr.testing import TINY_RECIPE, tiny_llama


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, default_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    model = to_tyr(tiny_llama(vocab_size=len(tokenizer), hidden=128, layers=4, heads=4, kv_heads=2, ffn=256, seed=5))
    return save_model(model, tokenizer, tmp_path_factory.mktemp("models") / "tiny")


@pytest.mark.slow
def test_run_prunes_measures_selects_and_resumes(tmp_path, tiny_dir):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(TINY_RECIPE))
    run = tmp_path / "run"
    # No pruned model runs 100x faster than dense, so nothing can meet the speed target: the job still succeeds.
    command = ["run", "--model", str(tiny_dir), "--sparsities", "0.25", "0.5", "--recipe", str(recipe), "--no-vllm",
               "--runtime", "onnx", "--max-ppl-increase", "1000", "--min-speedup", "100", "--out", str(run)]
    assert main(command) == 0
    measurements = [Measurement.model_validate(m)
                    for m in json.loads((run / "measurements.json").read_text())["measurements"]]
    assert [m.label for m in measurements] == ["dense", "tyr-0.25", "tyr-0.5"]
    assert [m.baseline for m in measurements] == [True, False, False]
    for m in measurements:
        assert m.perplexity > 1 and 0 <= m.accuracy <= 1 and m.tokens_per_s["onnx"] > 0 and not m.tokens_per_s.get("vllm")
    params = [m.matmul_params for m in measurements]
    assert params[0] > params[1] > params[2]
    for s in (0.25, 0.5):
        model, _ = load_model(run / f"pruned-{s:g}")
        assert model.config.model_type == "tyr_llama"
        assert (run / "onnx" / f"tyr-{s:g}" / "genai_config.json").is_file()
    assert json.loads((run / "selection.json").read_text())["chosen"] is None
    summary = json.loads((run / "summary.json").read_text())
    assert summary["chosen"] is None and summary["message"].startswith("no model meets both targets")
    assert [row["label"] for row in summary["models"]] == ["dense", "tyr-0.25", "tyr-0.5"]
    assert summary["models"][2]["ideal_speedup"] > summary["models"][1]["ideal_speedup"] > 1
    assert "onnx_speedup_vs_ideal" in summary["models"][2]
    for name in ("report.html", "summary.md", "bench-onnx/results.json"):
        assert (run / name).is_file(), name
    assert list(summary["timings_s"]) == ["prune", "evaluate", "export onnx", "bench onnx", "select"]
    assert "| prune |" in (run / "summary.md").read_text() and "| total |" in (run / "summary.md").read_text()
    evaluations = {label: json.loads((run / "eval" / f"{label}.json").read_text())
                   for label in ("dense", "tyr-0.25", "tyr-0.5")}
    assert evaluations["dense"]["kl_to_reference"] is None
    for label in ("tyr-0.25", "tyr-0.5"):  # compared with dense in the same pass that measured dense
        assert evaluations[label]["kl_to_reference"] > 0
        assert evaluations[label]["reference_perplexity"] == evaluations["dense"]["perplexity"]

    # The same command on the same folder resumes: nothing is pruned, exported or measured again.
    stamps = {p: p.stat().st_mtime_ns for p in [run / "pruned-0.5" / "config.json", run / "eval" / "dense.json",
                                                run / "onnx" / "dense" / "genai_config.json",
                                                run / "bench-onnx" / "results.json"]}
    assert main(command) == 0
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert json.loads((run / "summary.json").read_text())["models"] == summary["models"]

    # `tyr select` reads what the run recorded: with targets every model meets, the fastest is chosen.
    select = ["select", "--candidates", str(run / "measurements.json"), "--runtime", "onnx", "--max-ppl-increase",
              "1000"]
    assert main([*select, "--min-speedup", "100", "--out", str(tmp_path / "none")]) == 1
    assert json.loads((tmp_path / "none" / "selection.json").read_text())["chosen"] is None
    assert main([*select, "--min-speedup", "0.001", "--out", str(tmp_path / "any")]) == 0
    fastest = max(measurements, key=lambda m: m.tokens_per_s["onnx"]).label
    assert json.loads((tmp_path / "any" / "selection.json").read_text())["chosen"] == fastest


def test_run_config_rejects_bad_settings(tmp_path):
    with pytest.raises(ValueError, match="switched off"):
        RunConfig(vllm=False)
    with pytest.raises(ValueError, match="one quality target"):
        RunConfig(targets={"max_ppl_increase": 0.5, "min_accuracy_retention": 0.9, "min_speedup": 1.2})
    with pytest.raises(ValueError, match="between 0 and 1"):
        RunConfig(sparsities=[0.5, 1.0])
    assert RunConfig().targets.max_ppl_increase == 1.0
    assert main(["run", "--sparsity", "1.5", "--out", str(tmp_path / "a")]) == 2
    assert main(["run", "--runtime", "onnx", "--no-onnx", "--out", str(tmp_path / "b")]) == 2
    assert not any(tmp_path.iterdir())  # nothing written before the settings are checked
