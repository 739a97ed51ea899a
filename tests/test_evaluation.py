"""Perplexity, KL, BIG-bench multiple choice, the result report and `tyr eval`."""

import copy
import json
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from tyr.data import load_text, token_blocks
from tyr.evaluation.bigbench import (PACKAGED_TASKS_DIR, MultipleChoiceExample, MultipleChoiceTask, load_task,
                                    resolve_task_names)
from tyr.evaluation.language_modeling import (compare_all_to_reference, compare_to_reference, kl_to_reference,
                                              perplexity)
from tyr.evaluation.multiple_choice import encode_pair, evaluate_task, score_choices
from tyr.evaluation.report import EvalResult, ParameterCount
from tyr.evaluation.run import count_parameters, evaluate_models
from tyr.errors import TyrError
from tyr.testing import tiny_hetero, tiny_llama

BIGBENCH_DIR = PACKAGED_TASKS_DIR


@pytest.fixture(scope="module")
def blocks():
    return torch.randint(0, 256, (5, 24), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("make_model", [tiny_llama, tiny_hetero], ids=["llama", "tyr_hetero"])
def test_perplexity_equals_exp_of_transformers_loss(make_model, blocks):
    model = make_model()
    with torch.no_grad():
        losses = [model(input_ids=block[None], labels=block[None]).loss.item() for block in blocks]
    expected = math.exp(sum(losses) / len(losses))  # equal-length blocks: mean of means = mean over tokens
    # A batch size that does not divide the number of blocks exercises the ragged last batch.
    assert perplexity(model, blocks, batch_size=2, progress=False) == pytest.approx(expected, rel=1e-5)
    assert perplexity(model, blocks, batch_size=5, progress=False) == pytest.approx(expected, rel=1e-5)


def test_kl_is_zero_to_itself_and_positive_to_a_perturbed_copy(blocks):
    model = tiny_llama()
    assert abs(kl_to_reference(model, model, blocks, progress=False)) < 1e-6
    perturbed = copy.deepcopy(model)
    with torch.no_grad():
        perturbed.model.layers[1].mlp.down_proj.weight.mul_(0.5)
    kl = kl_to_reference(perturbed, model, blocks, batch_size=2, progress=False)
    with torch.no_grad():
        log_p = F.log_softmax(model(input_ids=blocks).logits, dim=-1)
        log_q = F.log_softmax(perturbed(input_ids=blocks).logits, dim=-1)
    expected = (log_p.exp() * (log_p - log_q)).sum(-1).mean().item()
    assert kl > 1e-4
    assert kl == pytest.approx(expected, rel=1e-4)
    kl_again, ppl, reference_ppl = compare_to_reference(perturbed, model, blocks, batch_size=3, progress=False)
    assert kl_again == pytest.approx(kl, rel=1e-6)
    assert ppl == pytest.approx(perplexity(perturbed, blocks, progress=False), rel=1e-6)
    assert reference_ppl == pytest.approx(perplexity(model, blocks, progress=False), rel=1e-6)
    assert ppl != pytest.approx(reference_ppl, rel=1e-3)
    # KL is not symmetric: swapping the roles measures a different quantity.
    assert kl_to_reference(model, perturbed, blocks, progress=False) != pytest.approx(kl, rel=1e-6)


def test_several_models_share_one_reference_pass(blocks):
    model = tiny_llama()
    halved, zeroed = copy.deepcopy(model), copy.deepcopy(model)
    with torch.no_grad():
        halved.model.layers[1].mlp.down_proj.weight.mul_(0.5)
        zeroed.model.layers[0].self_attn.o_proj.weight.zero_()
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    comparisons = compare_all_to_reference([halved, zeroed], model, blocks, batch_size=2, progress=False)
    assert len(calls) == 3  # one reference forward per batch of 2 out of 5 blocks, for both models
    for other, comparison in zip([halved, zeroed], comparisons):
        assert comparison.kl == pytest.approx(kl_to_reference(other, model, blocks, progress=False), rel=1e-5)
        assert comparison.perplexity == pytest.approx(perplexity(other, blocks, progress=False), rel=1e-5)
        assert comparison.reference_perplexity == pytest.approx(perplexity(model, blocks, progress=False), rel=1e-5)
    assert comparisons[0].kl != pytest.approx(comparisons[1].kl, rel=1e-3)


def test_evaluate_models_gives_the_reference_its_perplexity_and_the_others_kl(tokenizer):
    model = tiny_llama(vocab_size=len(tokenizer))
    halved = copy.deepcopy(model)
    with torch.no_grad():
        halved.model.layers[1].mlp.down_proj.weight.mul_(0.5)
    dense, pruned = evaluate_models([(model, "dense"), (halved, "halved")], tokenizer, reference_model=model,
                                    reference_name="dense", seq_len=16, num_blocks=4, tasks="none", progress=False)
    blocks = token_blocks(tokenizer, load_text(None, "validation"), 16, 4, 0)
    assert dense.reference is None and dense.kl_to_reference is None
    assert dense.perplexity == pytest.approx(perplexity(model, blocks, progress=False), rel=1e-5)
    assert pruned.reference == "dense" and pruned.kl_to_reference > 1e-4
    assert pruned.perplexity == pytest.approx(perplexity(halved, blocks, progress=False), rel=1e-5)
    assert pruned.reference_perplexity == pytest.approx(dense.perplexity, rel=1e-6)


def test_bad_blocks_are_rejected():
    with pytest.raises(ValueError, match="num_blocks, seq_len"):
        perplexity(tiny_llama(), torch.zeros(8, dtype=torch.long))


def test_encode_pair_moves_the_space_to_the_choice(tokenizer):
    context_ids, choice_ids = encode_pair(tokenizer, "The answer is ", "Paris")
    assert context_ids + choice_ids == tokenizer("The answer is Paris", add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(choice_ids) == " Paris"


def test_choice_scores_match_direct_log_probs(tokenizer):
    model = tiny_hetero(vocab_size=len(tokenizer))  # layer 0 without attention: a compacted KV cache
    examples = [MultipleChoiceExample(prompt="Q: what colour is the sky?\nA: ",
                                      choices=["blue", "green with yellow stripes", "x"], scores=[1, 0, 0]),
                MultipleChoiceExample(prompt="The above reasoning is ", choices=["correct", "incorrect"],
                                      scores=[0, 1])]
    scores = score_choices(model, tokenizer, examples, progress=False)
    for example, choice_scores in zip(examples, scores):
        prompt_ids = tokenizer(example.prompt.rstrip(), add_special_tokens=False)["input_ids"]
        for choice, score in zip(example.choices, choice_scores):
            whole = tokenizer(example.prompt + choice, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                log_probs = F.log_softmax(model(input_ids=torch.tensor([whole])).logits[0], dim=-1)
            direct = sum(log_probs[i - 1, whole[i]].item() for i in range(len(prompt_ids), len(whole)))
            assert score.num_tokens == len(whole) - len(prompt_ids)
            assert score.num_bytes == len(choice.encode())
            assert score.logprob == pytest.approx(direct, abs=1e-4)


def test_accuracy_and_length_normalization_pick_the_forced_choices(tokenizer):
    # With the final norm zeroed every logit is 0: each token costs log(vocab). The raw score then prefers the
    # choice with fewest tokens; the byte-normalized score the one with most bytes per token.
    model = tiny_llama(vocab_size=len(tokenizer))
    with torch.no_grad():
        model.model.norm.weight.zero_()
    choices = ["x", "internationalization"]
    tokens = [len(encode_pair(tokenizer, "Pick: ", c)[1]) for c in choices]
    bytes_per_token = [len(c) / n for c, n in zip(choices, tokens)]
    fewest_tokens, densest = tokens.index(min(tokens)), bytes_per_token.index(max(bytes_per_token))
    assert fewest_tokens != densest, (tokens, bytes_per_token)
    examples = [MultipleChoiceExample(prompt="Pick: ", choices=choices,
                                      scores=[float(i == right) for i in range(2)]) for right in (0, 1)]
    scores = score_choices(model, tokenizer, examples, progress=False)
    for choice_scores in scores:
        assert [s.logprob for s in choice_scores] == pytest.approx([-n * math.log(len(tokenizer)) for n in tokens],
                                                                   rel=1e-5)
    result = evaluate_task(model, tokenizer, MultipleChoiceTask(name="forced", examples=examples, total_examples=2),
                           progress=False)
    # Example 0 rewards choice 0, example 1 choice 1: raw gets the example whose answer has fewest tokens right.
    assert result.accuracy == 0.5 and result.accuracy_norm == 0.5 and result.chance == 0.5
    single = MultipleChoiceTask(name="forced", examples=[examples[fewest_tokens]], total_examples=1)
    result = evaluate_task(model, tokenizer, single, progress=False)
    assert (result.accuracy, result.accuracy_norm) == (1.0, 0.0)


def test_bigbench_prompts_follow_the_task_format():
    winowhy = load_task(BIGBENCH_DIR / "winowhy.json", limit=5, seed=3)
    data = json.loads((BIGBENCH_DIR / "winowhy.json").read_text())
    assert len(winowhy.examples) == 5 and winowhy.total_examples == len(data["examples"])
    inputs = [e["input"] for e in data["examples"]]
    for example in winowhy.examples:  # no choices appended: append_choices_to_input is false
        body = example.prompt.removeprefix(data["task_prefix"] + "\n").removesuffix("\nThe above reasoning is ")
        assert body in inputs and example.choices == ["correct", "incorrect"]
    assert load_task(BIGBENCH_DIR / "winowhy.json", limit=5, seed=3) == winowhy
    assert load_task(BIGBENCH_DIR / "winowhy.json", limit=5, seed=4) != winowhy

    physical = load_task(BIGBENCH_DIR / "physical_intuition.json", limit=None)
    assert len(physical.examples) == physical.total_examples == 81
    for example in physical.examples:  # defaults: "\nQ: ", choices appended, "\nA: "
        assert example.prompt.startswith("\nQ: ") and example.prompt.endswith("\nA: ")
        shown = example.prompt.split("\n  choice: ")[1:]
        shown[-1] = shown[-1].removesuffix("\nA: ")
        assert sorted(shown) == sorted(example.choices)
        assert len(example.correct) >= 1


def test_task_names_are_checked():
    assert resolve_task_names("all", BIGBENCH_DIR) == sorted(p.stem for p in BIGBENCH_DIR.glob("*.json"))
    assert resolve_task_names("winowhy", BIGBENCH_DIR) == ["winowhy"]
    with pytest.raises(TyrError, match="unknown BIG-bench task.*nope.*available: "):
        resolve_task_names("winowhy,nope", BIGBENCH_DIR)


def test_parameter_count_counts_tied_embeddings_once():
    untied = tiny_llama()
    tied = tiny_llama(tie_word_embeddings=True)
    embedding = untied.model.embed_tokens.weight.numel()
    assert count_parameters(untied).total == count_parameters(tied).total + embedding
    assert count_parameters(untied).non_embedding == count_parameters(tied).non_embedding
    assert count_parameters(untied).non_embedding == count_parameters(untied).total - 2 * embedding


def test_result_report_round_trips(tmp_path):
    from tyr.evaluation.multiple_choice import TaskScore

    result = EvalResult(model="m", parameters=ParameterCount(total=10, non_embedding=4), perplexity=12.5,
                        tasks={"t": TaskScore(task="t", accuracy=0.5, accuracy_norm=0.25, num_examples=4,
                                              total_examples=9, chance=0.5)}, seq_len=8, num_blocks=2)
    path = result.write(tmp_path / "r.json")
    assert EvalResult.read(path) == result
    assert not [p for p in tmp_path.iterdir() if p.name != "r.json"]
    assert "| t | 50.0 | 25.0 | 50.0 | 4/9 |" in result.to_markdown()
    assert "perplexity  12.500" in result.to_text()


def test_cli_rejects_bad_arguments_before_loading_a_model(tmp_path):
    from tyr.cli import main

    assert main(["eval", "--tasks", "nope", "--bigbench-dir", str(BIGBENCH_DIR)]) == 2
    assert main(["eval", "--bigbench-dir", str(tmp_path)]) == 2  # no task files there
    assert main(["eval", "--blocks", "0", "--tasks", "none"]) == 2
    assert main(["eval", "--seq-len", "1"]) == 2
    assert main(["eval", "--text", str(tmp_path / "missing.txt"), "--tasks", "none"]) == 2


@pytest.mark.slow
def test_tyr_eval_on_the_default_model(tmp_path, default_model_dir):
    out = tmp_path / "results.json"
    command = [sys.executable, "-m", "tyr.cli", "eval", "--reference", "default", "--blocks", "4", "--limit", "20",
               "--tasks", "winowhy,goal_step_wikihow_goal_inference", "--bigbench-dir", str(BIGBENCH_DIR), "--out", str(out),
               "--no-progress"]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=1200)
    assert completed.returncode == 0, completed.stderr[-3000:]
    result = EvalResult.read(out)
    assert out.with_suffix(".md").is_file()
    assert 120e6 < result.parameters.total < 140e6  # SmolLM2-135M, tied embeddings
    assert result.seq_len == 512 and result.num_blocks == 4
    assert 12 < result.perplexity < 35
    # The reference is the same model: KL vanishes and both perplexities agree.
    assert result.reference_perplexity == pytest.approx(result.perplexity, rel=1e-6)
    assert abs(result.kl_to_reference) < 1e-5
    assert set(result.tasks) == {"winowhy", "goal_step_wikihow_goal_inference"}
    for name, task in result.tasks.items():
        assert task.num_examples == 20
        assert 0 <= task.accuracy <= 1 and 0 <= task.accuracy_norm <= 1
    assert result.tasks["winowhy"].chance == pytest.approx(0.5)
    assert 0.2 < result.tasks["goal_step_wikihow_goal_inference"].chance <= 0.25
    assert "perplexity" in completed.stdout and "winowhy" in completed.stdout
