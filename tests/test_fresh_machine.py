"""What a user's machine needs: the BIG-bench tasks inside the package (a clean clone with nothing beside it), the
accelerator used when there is one (torch device, vLLM dtype and compile mode, onnxruntime provider)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tyr.cli import main
from tyr.device import resolve_device
from tyr.errors import TyrError
from tyr.evaluation.bigbench import BIGBENCH_DIR_ENV, PACKAGED_TASKS_DIR, available_tasks, default_bigbench_dir
from tyr.benchmarking.config import ServerConfig, compiled_by_default, serving_dtype

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TASKS = {"cause_and_effect_one_sentence", "goal_step_wikihow_goal_inference", "physical_intuition", "winowhy"}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, default_model_dir):
    from transformers import AutoTokenizer

    from tyr.models.io import save_model
    from tyr.models.slicing import to_tyr
    from tyr.testing import tiny_llama

    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    model = to_tyr(tiny_llama(vocab_size=len(tokenizer), hidden=64, layers=2, heads=4, kv_heads=2, ffn=96, seed=1))
    return save_model(model, tokenizer, tmp_path_factory.mktemp("models") / "tiny")


def test_the_default_tasks_ship_with_their_licence(monkeypatch):
    monkeypatch.delenv(BIGBENCH_DIR_ENV, raising=False)
    assert default_bigbench_dir() == PACKAGED_TASKS_DIR
    assert set(available_tasks(PACKAGED_TASKS_DIR)) == DEFAULT_TASKS
    assert "Apache License" in (PACKAGED_TASKS_DIR / "LICENSE").read_text()
    notice = (PACKAGED_TASKS_DIR / "NOTICE").read_text()
    assert "google/BIG-bench" in notice and all(f"{name}.json" in notice for name in DEFAULT_TASKS)


def test_the_environment_variable_still_overrides(monkeypatch, tmp_path):
    monkeypatch.setenv(BIGBENCH_DIR_ENV, str(tmp_path))
    assert default_bigbench_dir() == tmp_path
    monkeypatch.setenv(BIGBENCH_DIR_ENV, str(tmp_path / "missing"))
    with pytest.raises(TyrError, match="is not a directory"):
        default_bigbench_dir()


def test_a_clean_clone_evaluates_the_default_tasks(tmp_path, tiny_dir):
    """The committed tree alone, cloned where no ../shared folder exists, runs `tyr eval` on the default tasks."""
    if shutil.which("git") is None or not (REPO_ROOT / ".git").exists():
        pytest.skip("needs git and a git checkout of tyr")
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "--quiet", str(REPO_ROOT), str(clone)], check=True, timeout=120)
    assert not (clone.parent / "shared").exists()
    env = {k: v for k, v in os.environ.items() if k != BIGBENCH_DIR_ENV} | {"PYTHONPATH": str(clone)}
    imported = subprocess.run([sys.executable, "-c", "import tyr; print(tyr.__file__)"], cwd=clone, env=env,
                              capture_output=True, text=True, check=True)
    assert Path(imported.stdout.strip()).is_relative_to(clone)
    out = tmp_path / "result.json"
    command = [sys.executable, "-m", "tyr.cli", "eval", "--model", str(tiny_dir), "--limit", "2", "--blocks", "1",
               "--seq-len", "32", "--out", str(out), "--no-progress"]
    completed = subprocess.run(command, cwd=clone, env=env, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    tasks = json.loads(out.read_text())["tasks"]
    assert set(tasks) == DEFAULT_TASKS
    assert all(task["num_examples"] == 2 for task in tasks.values())


# ---- the device: the accelerator when there is one, an explicit --device overrides ----

def test_device_defaults_to_the_accelerator_and_an_explicit_one_is_checked():
    assert resolve_device(None) == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(TyrError, match="unknown device"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        for name in ("cuda", "cuda:0", "rocm"):  # ROCm builds of torch call AMD GPUs "cuda" too
            with pytest.raises(TyrError, match="torch sees no GPU"):
                resolve_device(name)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal of a GPU that is not there")
def test_commands_refuse_a_missing_gpu_before_writing(tmp_path, tiny_dir):
    out = tmp_path / "out"
    assert main(["prune", "--model", str(tiny_dir), "--sparsity", "0.5", "--out", str(out), "--device", "cuda"]) == 2
    assert main(["run", "--model", str(tiny_dir), "--out", str(out), "--device", "cuda"]) == 2
    assert main(["eval", "--model", str(tiny_dir), "--device", "cuda", "--tasks", "none"]) == 2
    assert not out.exists() and not Path(f"{out}.work").exists()


# ---- vLLM: bfloat16 and compiled (torch.compile + CUDA graphs) on GPUs unless the user picks ----

def test_gpu_serving_defaults_to_bfloat16_and_compiled():
    for gpu in ("cuda", "rocm"):
        assert serving_dtype("auto", gpu) == "bfloat16"
        assert serving_dtype("auto", gpu, gpu_bf16=False) == "float16"  # e.g. V100 / T4: no bfloat16
        assert serving_dtype("float32", gpu) == "float32"
        assert compiled_by_default(gpu)
        assert not ServerConfig().eager(gpu) and ServerConfig(compile=False).eager(gpu)
    assert serving_dtype("auto", "cpu") == "float32" and serving_dtype("bfloat16", "cpu") == "bfloat16"
    assert not compiled_by_default("cpu")
    assert ServerConfig().eager("cpu") and not ServerConfig(compile=True).eager("cpu")


# ---- onnxruntime: the GPU provider where this build has it, recorded with every timing ----

def test_onnxruntime_runs_on_the_gpu_provider_when_installed_and_records_it(tmp_path, tiny_dir):
    import onnxruntime as ort

    from tyr.benchmarking.onnx_bench import bench_onnx, bench_results, report_table
    from tyr.exporters.onnx.export import export_onnx

    export = export_onnx(tiny_dir, tmp_path / "onnx", dtype="fp32", validate_steps=2, check_genai=False)
    expected = "CUDAExecutionProvider" if "CUDAExecutionProvider" in ort.get_available_providers() \
        else "CPUExecutionProvider"
    report = bench_onnx([export.out_dir], threads=[1], prompt_tokens=4, decode_tokens=2, runs=1, warmup_runs=0,
                        progress=False)
    (timing,) = report.timings[1]
    assert timing.provider == expected
    (result,) = bench_results(report)
    assert result.config["provider"] == expected and expected in report_table(report)


# ---- benchmarks/gpu_check.sh: the GPU check, dry-run on the CPU ----

GPU_CHECK = REPO_ROOT / "benchmarks" / "gpu_check.sh"


def _gpu_check(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.run(["bash", str(GPU_CHECK), "--python", sys.executable, *args], env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_gpu_check_refuses_unknown_arguments(tmp_path):
    assert _gpu_check("--device", "tpu", "--out", str(tmp_path / "x")).returncode == 2
    assert _gpu_check("--sparsity", "0.5").returncode == 2
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_gpu_check_dry_run_on_cpu(tmp_path):
    """The whole script on the CPU, shrunk: prune, evaluate, ONNX, vLLM export, server and offline benchmarks."""
    out = tmp_path / "gpu-check"
    completed = _gpu_check("--device", "cpu", "--out", str(out), timeout=3600)
    assert completed.returncode == 0, completed.stdout[-4000:] + completed.stderr[-4000:]
    run = json.loads((out / "bench-vllm" / "results.json").read_text())
    assert [r["label"] for r in run["results"]] == ["dense", "tyr-0.5"] and not run["failures"]
    for result in run["results"]:
        assert result["offline"]["output_tokens_per_s"] > 0 and result["throughput"]["output_tokens_per_s"] > 0
        assert result["config"]["engine"] == {"dtype": "float32", "eager": True}  # the CPU defaults
    summary = json.loads((out / "run" / "summary.json").read_text())
    assert [row["label"] for row in summary["models"]] == ["dense", "tyr-0.5"]
    assert summary["models"][1]["ideal_speedup"] > 1 and summary["models"][1]["onnx_tokens_per_s"] > 0
    report = (out / "gpu_check.md").read_text()
    assert report.strip() in completed.stdout
    pruned_row = next(line for line in report.splitlines() if line.startswith("| tyr-0.5 |"))
    assert "—" not in pruned_row  # every ratio and latency was measured
    assert "vLLM engine: float32, eager; onnxruntime: CPUExecutionProvider" in report
    for stage in ("platform", "tyr run", "tyr export vllm", "tyr bench vllm", "inside tyr run: prune"):
        assert stage in report, stage
