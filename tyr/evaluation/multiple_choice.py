"""Zero-shot multiple choice by log-likelihood: each choice is scored as a continuation of the prompt.

score(choice) = sum of log p(token | prompt, earlier choice tokens) over the choice's tokens.
  accuracy       : the highest score is a right answer (ties go to the first choice).
  accuracy_norm  : the same with score / (UTF-8 bytes of the choice text), as lm-eval-harness's acc_norm does,
                   so long choices are not penalized merely for having more tokens.
Tokenization follows lm-eval-harness: trailing whitespace of the prompt moves to the front of the choice (BPE
vocabularies attach the space to the next word), prompt + choice are encoded together and the choice tokens are
those after the prompt's own encoding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import BaseModel
from tqdm.auto import tqdm

from tyr.evaluation.bigbench import MultipleChoiceExample, MultipleChoiceTask
from tyr.evaluation.language_modeling import model_device

class ChoiceScore(BaseModel):
    logprob: float
    num_tokens: int
    num_bytes: int


class TaskScore(BaseModel):
    task: str
    accuracy: float
    accuracy_norm: float
    num_examples: int
    total_examples: int
    chance: float  # mean over examples of (right choices / choices): 1/num_choices with one right answer


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of (context, continuation) such that their concatenation is the encoding of the whole text."""
    stripped = context.rstrip()
    continuation = context[len(stripped):] + continuation
    whole = tokenizer(stripped + continuation, add_special_tokens=False)["input_ids"]
    context_ids = tokenizer(stripped, add_special_tokens=False)["input_ids"]
    if whole[:len(context_ids)] != context_ids:  # a token merged across the boundary: encode apart
        return context_ids, tokenizer(continuation, add_special_tokens=False)["input_ids"]
    return context_ids, whole[len(context_ids):]


def sequence_start(tokenizer) -> list[int]:
    """The tokens a tokenizer puts before text by itself (e.g. Llama's BOS); none for GPT-2-style vocabularies."""
    with_special = tokenizer("a")["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
    return with_special[: len(with_special) - len(without)] if with_special[-len(without):] == without else []


@torch.no_grad()
def score_choices(model, tokenizer, examples: list[MultipleChoiceExample], max_length: int | None = None,
                  progress: bool = True, desc: str = "multiple choice") -> list[list[ChoiceScore]]:
    """Log-likelihood of every choice of every example.

    The prompt runs once per example; its KV cache is then repeated for the choices, which run together in one
    right-padded batch (prompts are far longer than choices, so this saves most of the work).
    """
    device = model_device(model)
    start = sequence_start(tokenizer)
    fallback_start = [tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else fallback_start[0]
    max_length = max_length or getattr(model.config, "max_position_embeddings", None) or 2048
    all_scores: list[list[ChoiceScore]] = []
    for example in tqdm(examples, desc=desc, unit="example", disable=not progress, leave=False):
        encoded = [encode_pair(tokenizer, example.prompt, choice) for choice in example.choices]
        # Choices share the prompt encoding unless a token merged across the boundary (then it differs).
        by_context: dict[tuple[int, ...], list[int]] = {}
        for c, (context_ids, _) in enumerate(encoded):
            by_context.setdefault(tuple(context_ids), []).append(c)
        scores: list[ChoiceScore | None] = [None] * len(example.choices)
        for context_ids, members in by_context.items():
            choices_ids = [encoded[c][1][:max_length // 2] for c in members]
            context = (start + list(context_ids)) or fallback_start  # the first choice token must follow something
            context = context[-(max_length - max(len(ids) for ids in choices_ids)):]  # keep the end nearest the answer
            logprobs = _continuation_logprobs(model, context, choices_ids, pad_id, device)
            for c, logprob, ids in zip(members, logprobs, choices_ids):
                scores[c] = ChoiceScore(logprob=logprob, num_tokens=len(ids),
                                        num_bytes=len(example.choices[c].encode("utf-8")))
        all_scores.append(scores)  # type: ignore[arg-type]
    return all_scores


def _continuation_logprobs(model, context: list[int], continuations: list[list[int]], pad_id: int,
                           device: torch.device) -> list[float]:
    """sum log p(continuation tokens | context) for each continuation, sharing one forward pass of the context."""
    prompt = model(input_ids=torch.tensor([context], device=device), use_cache=True, logits_to_keep=1)
    first = F.log_softmax(prompt.logits[0, -1].float(), dim=-1)
    totals = [first[ids[0]].item() if ids else 0.0 for ids in continuations]
    longest = max(len(ids) for ids in continuations)
    if longest < 2:
        return totals
    # Feed every continuation token but the last; position k predicts continuation token k + 1.
    rows = len(continuations)
    input_ids = torch.full((rows, longest - 1), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((rows, len(context) + longest - 1), dtype=torch.long)
    attention_mask[:, :len(context)] = 1
    for row, ids in enumerate(continuations):
        if len(ids) > 1:
            input_ids[row, :len(ids) - 1] = torch.tensor(ids[:-1])
            attention_mask[row, len(context):len(context) + len(ids) - 1] = 1
    cache = prompt.past_key_values
    cache.batch_repeat_interleave(rows)
    logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                   past_key_values=cache, use_cache=True).logits
    for row, ids in enumerate(continuations):
        if len(ids) > 1:
            log_probs = F.log_softmax(logits[row, :len(ids) - 1].float(), dim=-1)
            targets = torch.tensor(ids[1:], device=log_probs.device)
            totals[row] += log_probs.gather(-1, targets[:, None]).sum().item()
    return totals


def evaluate_task(model, tokenizer, task: MultipleChoiceTask, progress: bool = True) -> TaskScore:
    scores = score_choices(model, tokenizer, task.examples, progress=progress, desc=task.name)
    right = right_norm = 0
    for example, choice_scores in zip(task.examples, scores):
        raw = [s.logprob for s in choice_scores]
        normalized = [s.logprob / max(s.num_bytes, 1) for s in choice_scores]
        right += _argmax(raw) in example.correct
        right_norm += _argmax(normalized) in example.correct
    n = len(task.examples)
    chance = sum(len(x.correct) / len(x.choices) for x in task.examples) / n
    return TaskScore(task=task.name, accuracy=right / n, accuracy_norm=right_norm / n, num_examples=n,
                     total_examples=task.total_examples, chance=chance)


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))
