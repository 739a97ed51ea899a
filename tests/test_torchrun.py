"""`tyr prune` under torchrun: two gloo processes on this CPU prune the same model as one process, bit for bit, write
one output folder, and resume together after being killed.

Every run gets OMP_NUM_THREADS=1 (torchrun's default for its workers): BLAS may split a matmul differently with
another number of threads, and then its float sums round differently.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tyr.testing import TINY_RECIPE

# Four calibration chunks of 4 sequences and eight selection batches, so both ranks get a share of each; tiny
# models step in coarse heads and channels, so the budget band is wider than the default.
RECIPE = TINY_RECIPE | {"calibration": TINY_RECIPE["calibration"] | {"batch_sequences": 4},
                        "search": TINY_RECIPE["search"] | {"budget_tolerance": 0.05}}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny random Llama with the real SmolLM2 tokenizer, and the recipe file."""
    from transformers import AutoTokenizer

    from tyr.models.default import default_model_dir
    from tyr.models.io import save_model
    from tyr.models.slicing import to_tyr
    from tyr.testing import tiny_llama

    root = tmp_path_factory.mktemp("inputs")
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir())
    model = save_model(to_tyr(tiny_llama(vocab_size=len(tokenizer), layers=4, heads=4, kv_heads=2, ffn=96, seed=3)),
                       tokenizer, root / "tiny")
    recipe = root / "recipe.json"
    recipe.write_text(json.dumps(RECIPE))
    return model, recipe


def prune_command(inputs: tuple[Path, Path], out: Path, processes: int) -> list[str]:
    model, recipe = inputs
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"] if processes > 1 else []
    return [sys.executable, *launcher, "-m", "tyr.cli", "prune", "--model", str(model), "--sparsity", "0.5",
            "--recipe", str(recipe), "--out", str(out), "--device", "cpu", "--seed", "1", "--no-progress"]


def environment() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).parents[1]))


def prune(inputs: tuple[Path, Path], out: Path, processes: int) -> subprocess.CompletedProcess:
    run = subprocess.run(prune_command(inputs, out, processes), capture_output=True, text=True, env=environment(),
                         timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    return run


@pytest.fixture(scope="module")
def one_process(inputs, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("one") / "pruned"
    prune(inputs, out, 1)
    return out


def crash(launch: subprocess.Popen) -> None:
    """SIGKILL the launcher and its workers (torchrun starts each in a session of its own), as a power cut would."""
    workers = children(launch.pid)
    launch.kill()
    launch.wait()
    for pid in workers:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    while any(Path(f"/proc/{pid}").exists() and not zombie(pid) for pid in workers):
        time.sleep(0.1)


def children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(stat.parent.name))
    return found


def zombie(pid: int) -> bool:
    with contextlib.suppress(OSError, IndexError):
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    return True


def assert_same_model(a: Path, b: Path) -> None:
    assert json.loads((a / "config.json").read_text()) == json.loads((b / "config.json").read_text())
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    for name in wa:
        assert wa[name].shape == wb[name].shape and wa[name].equal(wb[name]), name
    ra, rb = (json.loads((folder / "prune_report.json").read_text()) for folder in (a, b))
    assert ra["layers"] == rb["layers"]
    assert [it["fitness"] for it in ra["iterations"]] == [it["fitness"] for it in rb["iterations"]]


@pytest.mark.slow
def test_two_gloo_processes_prune_the_same_model_as_one(inputs, one_process, tmp_path):
    out = tmp_path / "pruned"
    run = prune(inputs, out, 2)
    assert_same_model(one_process, out)
    # Rank 0 alone writes: one output folder, one report, one summary on the console.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pruned", "pruned.work"]
    reports = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("prune_report*"))
    assert reports == [Path("pruned/prune_report.json"), Path("pruned/prune_report.md")]
    assert run.stdout.count("removed") == 1, run.stdout
    report = json.loads((out / "prune_report.json").read_text())
    assert abs(report["achieved_sparsity"] - 0.5) <= RECIPE["search"]["budget_tolerance"]


@pytest.mark.slow
def test_two_gloo_processes_resume_together_after_a_kill(inputs, one_process, tmp_path):
    out = tmp_path / "pruned"
    first_iteration = tmp_path / "pruned.work" / "iter0" / "result.json"
    launch = subprocess.Popen(prune_command(inputs, out, 2), env=environment(), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        while not first_iteration.is_file() and launch.poll() is None:
            time.sleep(0.1)
    finally:
        crash(launch)
    assert first_iteration.is_file() and not out.exists()     # killed during the second iteration
    run = prune(inputs, out, 2)
    assert "iteration 0: done in an earlier run" in run.stderr
    assert_same_model(one_process, out)


def test_other_commands_refuse_several_processes(monkeypatch, capsys, tmp_path):
    """Only prune shares its work; `tyr run` and the rest would run N times over the same outputs."""
    from tyr.cli import main as tyr_main

    monkeypatch.setenv("WORLD_SIZE", "2")
    code = tyr_main(["run", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and "only `tyr prune` runs under torchrun" in err and "Traceback" not in err
    assert not any(tmp_path.iterdir())
