"""What a user's machine needs: the BIG-bench tasks inside the package (a clean clone with nothing beside it)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tyr.errors import TyrError
from tyr.evaluation.bigbench import BIGBENCH_DIR_ENV, PACKAGED_TASKS_DIR, available_tasks, default_bigbench_dir

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
