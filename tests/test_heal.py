"""Healing by distillation on tiny models: the KL falls, kill/resume is bit-identical, LoRA merges exactly,
a teacher with another vocabulary is refused, and the healed folder is an ordinary pruned folder."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from tyr.cli import main as tyr_main
from tyr.compressor.heal import HealSettings, batch_indices, heal
from tyr.compressor.prune import prune
from tyr.errors import TyrError
from tyr.models.io import load_model, save_model
from tyr.models.slicing import to_tyr
from tyr.testing import tiny_llama

# 8 steps of 2 x 32 tokens; held-out KL before, after step 4 and after step 8.
TINY = dict(tokens=512, seq_len=32, batch_sequences=2, eval_blocks=2, evaluations=2, checkpoint_every=2,
            lr=3e-3, warmup_fraction=0.25)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, tokenizer):
    """A tiny random Llama with the real SmolLM2 tokenizer (so the real calibration text tokenizes)."""
    model = to_tyr(tiny_llama(vocab_size=len(tokenizer), layers=4, heads=4, kv_heads=2, ffn=96, seed=5))
    return save_model(model, tokenizer, tmp_path_factory.mktemp("models") / "teacher")


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory, teacher_dir):
    """The teacher magnitude-pruned to 50%: heterogeneous widths, and a prune_report.json naming its teacher."""
    out = tmp_path_factory.mktemp("models") / "student"
    prune(teacher_dir, sparsity=0.5, method="magnitude", out_dir=out, progress=False)
    return out


@pytest.fixture(scope="module")
def healed(tmp_path_factory, student_dir):
    """A full-parameter healing run without interruption, its teacher taken from the student's prune report."""
    out = tmp_path_factory.mktemp("healed") / "straight"
    return heal(student_dir, out_dir=out, settings=HealSettings(**TINY), progress=False)


def weights(folder) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def held_out_ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(seed))


def test_batches_are_a_function_of_seed_and_step():
    epoch = [i for step in range(5) for i in batch_indices(7, step, 2, 10)]
    assert sorted(epoch) == list(range(10))                      # one epoch: every sequence once
    assert batch_indices(7, 6, 2, 10) == batch_indices(7, 6, 2, 10)
    assert [i for s in range(5, 10) for i in batch_indices(7, s, 2, 10)] != epoch   # a new shuffle each epoch
    assert batch_indices(8, 0, 10, 10) != batch_indices(7, 0, 10, 10)


def test_heal_lowers_the_kl_and_keeps_the_format(healed, student_dir, teacher_dir):
    out, report = healed.out_dir, healed.report
    assert report.teacher == str(teacher_dir)                    # taken from prune_report.json
    assert [h.step for h in report.held_out] == [0, 4, 8]
    assert report.after.kl < 0.9 * report.before.kl
    assert report.history[-1].loss < report.history[0].loss
    assert report.mode == "full" and report.trainable_params == report.student_params
    assert not out.with_name("straight.work").exists()
    for name in ("heal_report.json", "heal_report.md", "heal_curve.png", "prune_report.json"):
        assert (out / name).is_file()
    before, after = json.loads((student_dir / "config.json").read_text()), json.loads((out / "config.json").read_text())
    assert after == before                                       # per_layer_config and every other field
    assert {k: v.shape for k, v in weights(out).items()} == {k: v.shape for k, v in weights(student_dir).items()}
    assert any(not torch.equal(weights(out)[k], weights(student_dir)[k]) for k in weights(out))
    import tyr  # noqa: F401  (registers tyr_llama with the Auto classes)

    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    ours, _ = load_model(out)
    with torch.no_grad():
        assert torch.equal(loaded(held_out_ids()).logits, ours(held_out_ids()).logits)


def test_kill_and_resume_gives_the_same_weights(tmp_path, healed, student_dir, teacher_dir):
    settings = HealSettings(**TINY)

    class Killed(Exception):
        pass

    def kill_at_3(step, model):
        if step == 3:
            raise Killed

    out = tmp_path / "resumed"
    with pytest.raises(Killed):
        heal(student_dir, teacher_dir, out, settings=settings, progress=False, on_step=kill_at_3)
    assert not out.exists() and sorted(p.name for p in (tmp_path / "resumed.work").glob("step-*")) == ["step-00000002"]
    with pytest.raises(TyrError, match="settings"):              # other settings do not reuse this work
        heal(student_dir, teacher_dir, out, settings=HealSettings(**TINY | {"lr": 1e-3}), progress=False)
    resumed = heal(student_dir, teacher_dir, out, settings=settings, progress=False)
    assert resumed.report.resumed_from_step == 2
    a, b = weights(healed.out_dir), weights(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r.loss for r in resumed.report.history] == [r.loss for r in healed.report.history]
    assert resumed.report.held_out == healed.report.held_out


def test_lora_merge_matches_the_adapter(tmp_path, student_dir, teacher_dir):
    # Also the other loss terms: the sparse top-k KL and per-layer output matching.
    settings = HealSettings(**TINY | {"lora_rank": 4, "lr": 1e-2, "kl_top_k": 64, "hidden_weight": 0.5})
    ids = held_out_ids(1)
    unmerged = {}

    def record(step, model):
        if step == settings.steps:
            model.eval()
            with torch.no_grad():
                unmerged["logits"] = model(input_ids=ids).logits
            model.train()

    result = heal(student_dir, teacher_dir, tmp_path / "lora", settings=settings, progress=False, on_step=record)
    assert result.report.mode == "lora" and result.report.trainable_params < result.report.student_params / 10
    assert result.report.after.kl < result.report.before.kl
    healed, _ = load_model(tmp_path / "lora")
    assert weights(tmp_path / "lora").keys() == weights(student_dir).keys()      # plain weights, no adapters
    with torch.no_grad():
        merged = healed(input_ids=ids).logits
        original = load_model(student_dir)[0](input_ids=ids).logits
    assert (merged - unmerged["logits"]).abs().max() <= 1e-5
    assert (merged - original).abs().max() > 1e-3                # the adapters did change the model


def test_refuses_a_teacher_with_another_vocabulary(tmp_path, student_dir, tokenizer):
    bigger = save_model(to_tyr(tiny_llama(vocab_size=len(tokenizer) + 64, layers=4, ffn=96)), tokenizer,
                        tmp_path / "bigger")
    with pytest.raises(TyrError, match="vocab_size"):
        heal(student_dir, bigger, tmp_path / "out", settings=HealSettings(**TINY), progress=False)
    other = copy.deepcopy(tokenizer)
    other.add_tokens(["<not-in-the-student>"])
    renumbered = save_model(to_tyr(tiny_llama(vocab_size=len(tokenizer), layers=4, ffn=96)), other,
                            tmp_path / "renumbered")
    with pytest.raises(TyrError, match="tokenizers"):
        heal(student_dir, renumbered, tmp_path / "out", settings=HealSettings(**TINY), progress=False)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.work").exists()


def test_cli(tmp_path, student_dir, capsys):
    out = tmp_path / "cli"
    assert tyr_main(["heal", str(student_dir), "--out", str(out), "--tokens", "128", "--seq-len", "32",
                     "--batch-sequences", "2", "--eval-blocks", "1", "--no-progress"]) == 0
    assert "held-out KL" in capsys.readouterr().out
    assert json.loads((out / "heal_report.json").read_text())["tokens"] == 128
    assert tyr_main(["heal", str(student_dir), "--out", str(out), "--tokens", "128"]) == 2     # exists
    assert tyr_main(["heal", str(tmp_path / "missing"), "--teacher", str(student_dir), "--out",
                     str(tmp_path / "x")]) == 2
    assert "no such model folder" in capsys.readouterr().err


@pytest.mark.slow
def test_run_heals_each_pruned_model_and_measures_both(tmp_path, teacher_dir):
    import yaml

    from tyr.testing import TINY_RECIPE

    recipe = tmp_path / "tiny.yaml"
    # A wider budget band: the four-layer model's head and channel steps are too coarse for ±0.25 pp.
    recipe.write_text(yaml.safe_dump({**TINY_RECIPE, "search": {**TINY_RECIPE["search"], "budget_tolerance": 0.05}}))
    run = tmp_path / "run"
    assert tyr_main(["run", "--model", str(teacher_dir), "--sparsities", "0.5", "--recipe", str(recipe), "--no-vllm",
                     "--runtime", "onnx", "--heal-tokens", "256", "--eval-blocks", "2", "--eval-limit", "2",
                     "--out", str(run)]) == 0
    summary = json.loads((run / "summary.json").read_text())
    rows = {row["label"]: row for row in summary["models"]}
    assert list(rows) == ["dense", "tyr-0.5", "tyr-0.5-healed"]
    assert "heal" in summary["timings_s"]
    healed, pruned = rows["tyr-0.5-healed"], rows["tyr-0.5"]
    assert healed["matmul_params"] == pruned["matmul_params"]          # healing keeps the widths
    assert healed["perplexity"] != pruned["perplexity"]                # but changes the weights
    assert healed["onnx_tokens_per_s"] > 0                             # measured in the runtime like the others
    report = json.loads((run / "healed-0.5" / "heal_report.json").read_text())
    assert report["settings"]["tokens"] == 256
    assert json.loads((run / "healed-0.5" / "config.json").read_text())["per_layer_config"] == \
        json.loads((run / "pruned-0.5" / "config.json").read_text())["per_layer_config"]
