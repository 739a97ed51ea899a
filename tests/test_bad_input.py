"""Bad input through the `tyr` command: a clear error (exit 2, no traceback), nothing lost, nothing left behind.

Tests run as root, so a folder without write permission is simulated with paths under a regular file, under /sys
(sysfs refuses new files even to root) and, where `chattr` works on the test filesystem, an immutable folder.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tyr.cli import main as tyr_main

TINY_RECIPE = {
    "name": "tiny-bad-input", "description": "one small search", "iterations": 1, "initial_spacing": 0.25,
    "ladder_size": 5, "eea": "expectation",
    "calibration": {"num_sequences": 8, "seq_len": 32, "batch_sequences": 8},
    "local_pruner": {"damp": 0.01, "channel_step": 8, "refit": True},
    # Two layers step in coarse head and channel sets: no distribution lands within the default ±0.25 pp.
    "search": {"budget_tolerance": 0.05, "generations": [2], "offspring": 3, "max_shifts": 2, "seq_len": 32,
               "batch_sequences": 2,
               "kl_top_k": 16, "stages": [{"tokens": 64, "survivors": 1}], "pool_tokens": 128,
               "reuse_activations": True, "activation_cache_mb": 16},
}


def make_tiny(folder: Path, seed: int) -> Path:
    from transformers import AutoTokenizer

    from tyr.models.default import default_model_dir
    from tyr.models.io import save_model
    from tyr.models.slicing import to_tyr
    from tyr.testing import tiny_llama

    tokenizer = AutoTokenizer.from_pretrained(default_model_dir())
    model = to_tyr(tiny_llama(vocab_size=len(tokenizer), layers=2, heads=4, kv_heads=2, ffn=48, seed=seed))
    return save_model(model, tokenizer, folder)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {"tiny": make_tiny(root / "tiny", seed=3), "other": make_tiny(root / "other", seed=5)}


@pytest.fixture(scope="module")
def recipe_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("recipe") / "tiny.json"
    path.write_text(json.dumps(TINY_RECIPE))
    return path


def tyr(capsys, *argv) -> tuple[int, str]:
    """Run `tyr argv...` in this process; returns (exit code, stderr)."""
    capsys.readouterr()
    code = tyr_main([str(a) for a in argv])
    return code, capsys.readouterr().err


def assert_clean_error(code: int, err: str, *fragments: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err and "error:" in err
    for fragment in fragments:
        assert fragment in err, err


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


# 1. Work is reused only when made from the same contents.

def test_changed_weights_discard_earlier_work_with_overwrite(tmp_path, models, recipe_file, capsys, caplog):
    model = tmp_path / "m1"
    shutil.copytree(models["tiny"], model)
    prune = ["prune", "--model", model, "--sparsity", 0.5, "--recipe", recipe_file, "--no-progress"]
    assert tyr(capsys, *prune, "--out", tmp_path / "chg")[0] == 0
    first = weights(tmp_path / "chg")
    shutil.copy(models["other"] / "model.safetensors", model / "model.safetensors")

    code, err = tyr(capsys, *prune, "--out", tmp_path / "chg")            # without --overwrite: refused as before
    assert_clean_error(code, err, "already exists")
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert tyr(capsys, *prune, "--out", tmp_path / "chg", "--overwrite")[0] == 0
    assert "discarding the earlier work" in caplog.text and "done in an earlier run" not in caplog.text
    second = weights(tmp_path / "chg")
    assert any(not torch.equal(first[k], second[k]) for k in first)

    assert tyr(capsys, *prune, "--model", models["other"], "--out", tmp_path / "fresh")[0] == 0
    fresh = weights(tmp_path / "fresh")
    assert second.keys() == fresh.keys() and all(torch.equal(second[k], fresh[k]) for k in fresh)


def small_recipe(folder: Path) -> Path:
    path = folder / "small.json"
    path.write_text(json.dumps({**TINY_RECIPE, "calibration": {"num_sequences": 4, "seq_len": 32}}))
    return path


def prose(folder: Path, sentence: str, paragraphs: int = 200) -> Path:
    path = folder / "text.txt"
    path.write_text("\n\n".join(sentence.format(i=i, j=7 * i) for i in range(paragraphs)))
    return path


def test_changed_text_file_is_not_reused(tmp_path, models, capsys, caplog):
    text = prose(tmp_path, "Paragraph {i} tells of the river, the hills and the town.")
    prune = ["prune", "--model", models["tiny"], "--sparsity", 0.5, "--method", "uniform", "--recipe",
             small_recipe(tmp_path), "--text", text, "--out", tmp_path / "o", "--no-progress"]
    assert tyr(capsys, *prune)[0] == 0
    code, err = tyr(capsys, *prune, "--overwrite")                        # same contents: the work is reused
    assert code == 0 and "discarding" not in caplog.text
    prose(tmp_path, "Section {i}: the numbers {j} and {i} stand in a table.")
    shutil.rmtree(tmp_path / "o")
    code, err = tyr(capsys, *prune)                                       # other text, same path: refused
    assert_clean_error(code, err, "holds a different run", "--overwrite")
    with caplog.at_level(logging.INFO):
        assert tyr(capsys, *prune, "--overwrite")[0] == 0
    assert "discarding the earlier work" in caplog.text


# 2. Output paths that cannot be written fail before any work, naming the path.

def unwritable_outputs(tmp_path: Path) -> list[Path]:
    a_file = tmp_path / "some_file.txt"
    a_file.write_text("not a folder")
    paths = [a_file / "out", Path("/sys/tyr-test-out")]
    frozen = tmp_path / "frozen"
    frozen.mkdir()
    if shutil.which("chattr") and subprocess.run(["chattr", "+i", str(frozen)], capture_output=True).returncode == 0:
        paths.append(frozen / "out")
    return paths


@pytest.fixture
def bad_outputs(tmp_path):
    paths = unwritable_outputs(tmp_path)
    yield paths
    subprocess.run(["chattr", "-i", str(tmp_path / "frozen")], capture_output=True)


def test_unwritable_outputs_are_clear_errors(tmp_path, models, bad_outputs, capsys):
    candidates = tmp_path / "candidates.json"
    candidates.write_text(json.dumps([{"label": "dense", "baseline": True, "perplexity": 20,
                                       "tokens_per_s": {"vllm": 100}}]))
    for out in bad_outputs:
        commands = [
            ["prune", "--model", models["tiny"], "--sparsity", 0.5, "--method", "magnitude", "--out", out],
            ["prune", "--model", models["tiny"], "--sparsity", 0.5, "--method", "magnitude",
             "--out", tmp_path / "ok", "--work-dir", out],
            ["export", "vllm", models["tiny"], out, "--no-check"],
            ["export", "onnx", models["tiny"], out, "--no-check"],
            ["select", "--candidates", candidates, "--min-speedup", 1, "--max-ppl-increase", 0.1, "--out", out],
            ["eval", "--model", models["tiny"], "--tasks", "none", "--blocks", 1, "--out", out / "result.json"],
        ]
        for command in commands:
            code, err = tyr(capsys, *command)
            assert_clean_error(code, err, f"cannot write {out}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["candidates.json", "frozen", "some_file.txt"]


def test_a_stray_os_error_names_the_path(tmp_path, models, capsys):
    """`tyr bench layers --out` has no early check: the OSError from writing the table still exits cleanly."""
    a_file = tmp_path / "some_file.txt"
    a_file.write_text("not a folder")
    code, err = tyr(capsys, "bench", "layers", "--model", models["tiny"], "--out", a_file / "table.json",
                    "--batch", 1, "--context", 8, "--repeats", 1)
    assert_clean_error(code, err, str(a_file))


# 3. Text that is not UTF-8.

def test_binary_text_file_is_named(tmp_path, models, capsys):
    binary = tmp_path / "binary.txt"
    binary.write_bytes(bytes(range(256)) * 40)
    code, err = tyr(capsys, "prune", "--model", models["tiny"], "--sparsity", 0.5, "--text", binary,
                    "--out", tmp_path / "b")
    assert_clean_error(code, err, str(binary), "not UTF-8")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["binary.txt"]
    code, err = tyr(capsys, "eval", "--model", models["tiny"], "--text", binary, "--tasks", "none", "--blocks", 1)
    assert_clean_error(code, err, str(binary), "not UTF-8")


# 4. Broken BIG-bench task files.

def test_broken_bigbench_tasks_are_named(tmp_path, models, capsys):
    tasks = tmp_path / "bigbench"
    tasks.mkdir()
    (tasks / "a_list.json").write_text("[1, 2, 3]")
    (tasks / "string_scores.json").write_text(json.dumps(
        {"examples": [{"input": "2 + 2", "target_scores": {"4": 1, "5": 0}},
                      {"input": "1 + 1", "target_scores": "2"}]}))
    for task, problem in (("a_list", "is not a BIG-bench task"), ("string_scores", "example 1: target_scores")):
        code, err = tyr(capsys, "eval", "--model", models["tiny"], "--bigbench-dir", tasks, "--tasks", task,
                        "--blocks", 0)
        assert_clean_error(code, err, str(tasks / f"{task}.json"), problem)


# 5. Measurements that are not finite, non-negative numbers.

@pytest.mark.parametrize("bad", ["NaN", "Infinity", "-5"])
def test_select_rejects_non_finite_or_negative_speeds(tmp_path, capsys, bad):
    path = tmp_path / "candidates.json"
    path.write_text('[{"label": "dense", "baseline": true, "perplexity": 20, "tokens_per_s": {"vllm": 100}},\n'
                    f' {{"label": "pruned-50", "perplexity": 22, "tokens_per_s": {{"vllm": {bad}}}}}]')
    code, err = tyr(capsys, "select", "--candidates", path, "--min-speedup", 1, "--max-ppl-increase", 0.2,
                    "--out", tmp_path / "sel")
    assert_clean_error(code, err, "pruned-50", "tokens_per_s.vllm")
    assert not (tmp_path / "sel").exists()


def test_select_rejects_a_nan_perplexity(tmp_path, capsys):
    path = tmp_path / "candidates.json"
    path.write_text('[{"label": "dense", "baseline": true, "perplexity": NaN, "tokens_per_s": {"vllm": 100}}]')
    code, err = tyr(capsys, "select", "--candidates", path, "--min-speedup", 1, "--max-ppl-increase", 0.2,
                    "--out", tmp_path / "sel")
    assert_clean_error(code, err, "'dense'", "perplexity")


# 6. A failed input check writes nothing, so the corrected retry runs.

def test_failed_input_check_leaves_nothing(tmp_path, models, capsys):
    text = tmp_path / "text.txt"
    text.write_text("One line of text.\n\nAnother line.\n")                  # too little to calibrate on
    prune = ["prune", "--model", models["tiny"], "--sparsity", 0.5, "--method", "flap", "--text", text,
             "--out", tmp_path / "out" / "model", "--recipe", "fast"]
    code, err = tyr(capsys, *prune)
    assert_clean_error(code, err, "too little text")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["text.txt"]
    prose(tmp_path, "Paragraph {i} tells of the river, the hills and the town.")
    prune[-1] = small_recipe(tmp_path)
    assert tyr(capsys, *prune)[0] == 0
    assert (tmp_path / "out" / "model" / "config.json").is_file()


# 7. What a killed run left is removed by the next run.

def test_stale_temporaries_of_a_killed_run_are_removed(tmp_path, models, capsys):
    pid = dead_pid()
    # As a killed run leaves them: a half-saved model in the prune's work folder, a half-written export.
    stale_final = tmp_path / "model.work" / f".final.tmp-{pid}-k1ll3d"
    stale_export = tmp_path / f".served.tmp-{pid}-k1ll3d"
    for stale in (stale_final, stale_export):
        stale.mkdir(parents=True)
        (stale / "model.safetensors").write_bytes(b"\0" * 1000)
    live = tmp_path / f".served.tmp-{os.getpid()}-running"                # a running process's: kept
    live.mkdir()
    assert tyr(capsys, "prune", "--model", models["tiny"], "--sparsity", 0.5, "--method", "magnitude",
               "--out", tmp_path / "model")[0] == 0
    assert not stale_final.exists()
    assert tyr(capsys, "export", "vllm", tmp_path / "model", tmp_path / "served", "--no-check")[0] == 0
    assert not stale_export.exists() and live.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [live.name, "model", "model.work", "served"]
    assert not [p.name for p in (tmp_path / "model.work").iterdir() if ".tmp-" in p.name]


# 8. Two runs on one output.

def test_a_second_run_on_the_same_output_fails_fast(tmp_path, models, capsys):
    out = tmp_path / "model"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys\nfrom tyr.atomic import exclusive\nwith exclusive(sys.argv[1]):\n"
         "    print('held', flush=True)\n    sys.stdin.read()\n", str(out)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    try:
        assert holder.stdout.readline().strip() == "held"
        code, err = tyr(capsys, "prune", "--model", models["tiny"], "--sparsity", 0.5, "--method", "magnitude",
                        "--out", out)
        assert_clean_error(code, err, f"another tyr run (pid {holder.pid}) holds {out}")
        code, err = tyr(capsys, "export", "onnx", models["tiny"], out, "--no-check")
        assert_clean_error(code, err, f"another tyr run (pid {holder.pid}) holds {out}")
    finally:
        holder.communicate("")
    assert holder.returncode == 0 and not out.exists()
    assert tyr(capsys, "prune", "--model", models["tiny"], "--sparsity", 0.5, "--method", "magnitude",
               "--out", out)[0] == 0                                    # free again once the holder is done


# 9. A path that does not exist is a missing folder, not a malformed hub id.

@pytest.mark.parametrize("spec", ["./no/such/dir", "../no/such", "no/such/dir", "/no/such", "~/no/such", "nosuch/"])
def test_missing_model_folder_is_named(tmp_path, capsys, spec):
    code, err = tyr(capsys, "prune", "--model", spec, "--sparsity", 0.5, "--method", "magnitude",
                    "--out", tmp_path / "o")
    assert_clean_error(code, err, f"no model folder at {spec}")


def test_hub_ids_stay_hub_ids(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no folder named "org" here
    code, err = tyr(capsys, "prune", "--model", "org/name", "--sparsity", 0.5, "--method", "magnitude",
                    "--out", tmp_path / "o")
    assert code == 2 and "Traceback" not in err
    assert "no model folder" not in err and "org/name" in err


# 10. The suggested vLLM server listens on loopback only.

def test_export_vllm_suggests_a_loopback_server(tmp_path, models, capsys):
    out = tmp_path / "served"
    assert tyr(capsys, "export", "vllm", models["tiny"], out, "--no-check")[0] == 0
    command = json.loads((out / "tyr_export.json").read_text())["serve_command"]
    assert "--host 127.0.0.1" in command and "0.0.0.0" not in command
