"""`tyr select --prune-base` and `tyr run` on a tiny model, in onnxruntime: prune, evaluate, export, benchmark,
select, report, and resume. (The vLLM stages are covered in test_serving and test_export_vllm.)"""

from __future__ import annotations

import json

import pytest
import yaml
from test_prune import TINY_RECIPE
from transformers import AutoTokenizer

from tyr.cli import main
from tyr.models.io import load_model, save_model
from tyr.models.slicing import to_tyr
from tyr.pipeline import RunConfig
from tyr.serving.selection import Measurement, Targets, select
from tyr.testing import tiny_llama


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, default_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    model = to_tyr(tiny_llama(vocab_size=len(tokenizer), hidden=128, layers=4, heads=4, kv_heads=2, ffn=256, seed=5))
    return save_model(model, tokenizer, tmp_path_factory.mktemp("models") / "tiny")


@pytest.mark.slow
def test_select_prunes_measures_and_picks_then_run_resumes(tmp_path, tiny_dir):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(TINY_RECIPE))
    out = tmp_path / "select"
    code = main(["select", "--prune-base", str(tiny_dir), "--prune-sparsities", "0.25", "0.5", "--recipe", str(recipe),
                 "--runtime", "onnx", "--max-ppl-increase", "1000", "--min-speedup", "0.5", "--out", str(out)])
    run = out / "run"
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
    # The choice is what `select` makes of the recorded measurements; the exit code says whether there was one.
    expected = select(measurements, Targets(max_ppl_increase=1000, min_speedup=0.5, runtime="onnx"))
    chosen = json.loads((out / "selection.json").read_text())["chosen"]
    assert chosen == expected.chosen and code == (0 if chosen else 1)
    summary = json.loads((run / "summary.json").read_text())
    assert [row["label"] for row in summary["models"]] == ["dense", "tyr-0.25", "tyr-0.5"]
    assert summary["models"][2]["ideal_speedup"] > summary["models"][1]["ideal_speedup"] > 1
    assert "onnx_speedup_vs_ideal" in summary["models"][2]
    for name in ("report.html", "summary.md", "bench-onnx/results.json"):
        assert (run / name).is_file(), name

    # `tyr run` on the same folder and settings resumes: nothing is pruned, exported or measured again.
    stamps = {p: p.stat().st_mtime_ns for p in [run / "pruned-0.5" / "config.json", run / "eval" / "dense.json",
                                                run / "onnx" / "dense" / "genai_config.json",
                                                run / "bench-onnx" / "results.json"]}
    assert main(["run", "--model", str(tiny_dir), "--sparsity", "0.25", "--sparsity", "0.5", "--recipe", str(recipe),
                 "--no-vllm", "--runtime", "onnx", "--out", str(run)]) == 0
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert json.loads((run / "summary.json").read_text())["models"] == summary["models"]


def test_run_config_rejects_bad_settings():
    with pytest.raises(ValueError, match="switched off"):
        RunConfig(vllm=False)
    with pytest.raises(ValueError, match="one quality target"):
        RunConfig(max_ppl_increase=0.5, min_accuracy_retention=0.9)
    with pytest.raises(ValueError, match="between 0 and 1"):
        RunConfig(sparsities=[0.5, 1.0])
    assert RunConfig().max_ppl_increase == 1.0
    assert main(["run", "--sparsity", "1.5", "--out", "/nonexistent/x"]) == 2
