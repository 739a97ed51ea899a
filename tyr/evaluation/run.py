"""One evaluation pass: perplexity and KL on held-out text, then BIG-bench multiple choice."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from tyr.data import TextSource, load_text, token_blocks
from tyr.evaluation.bigbench import default_bigbench_dir, load_task, resolve_task_names
from tyr.evaluation.language_modeling import compare_all_to_reference, model_device, perplexity
from tyr.evaluation.multiple_choice import evaluate_task
from tyr.evaluation.report import EvalResult, ParameterCount


def count_parameters(model: torch.nn.Module) -> ParameterCount:
    total = sum(p.numel() for p in model.parameters())  # parameters() yields a tied tensor once
    embeddings = {id(m.weight): m.weight.numel() for m in (model.get_input_embeddings(), model.get_output_embeddings())
                  if m is not None and getattr(m, "weight", None) is not None}
    return ParameterCount(total=total, non_embedding=total - sum(embeddings.values()))


def evaluate_model(model, tokenizer, model_name: str, reference_model=None, reference_name: str | None = None,
                   text: str | TextSource | None = None, seq_len: int = 512, num_blocks: int | None = 32,
                   tasks: str = "all", bigbench_dir: str | Path | None = None, limit: int | None = 100,
                   seed: int = 0, batch_size: int = 4, progress: bool = True) -> EvalResult:
    """Evaluate an in-memory model. ``num_blocks=0`` skips perplexity/KL; ``tasks="none"`` skips BIG-bench."""
    return evaluate_models([(model, model_name)], tokenizer, reference_model, reference_name, text=text,
                           seq_len=seq_len, num_blocks=num_blocks, tasks=tasks, bigbench_dir=bigbench_dir,
                           limit=limit, seed=seed, batch_size=batch_size, progress=progress)[0]


def evaluate_models(models: list[tuple[torch.nn.Module, str]], tokenizer, reference_model=None,
                    reference_name: str | None = None, text: str | TextSource | None = None, seq_len: int = 512,
                    num_blocks: int | None = 32, tasks: str = "all", bigbench_dir: str | Path | None = None,
                    limit: int | None = 100, seed: int = 0, batch_size: int = 4,
                    progress: bool = True) -> list[EvalResult]:
    """``evaluate_model`` for (model, name) pairs that share ``tokenizer``, on the same blocks and tasks.

    The reference runs once per block for all models. A model that is the reference object itself gets its
    perplexity from that pass and no KL. Each result's wall time is the shared pass plus its own tasks.
    """
    started = time.perf_counter()
    source = text if isinstance(text, TextSource) else TextSource.parse(text)
    results = [EvalResult(model=name, reference=None if model is reference_model else reference_name,
                          parameters=count_parameters(model), limit=limit, seed=seed, device=str(model_device(model)),
                          dtype=str(next(model.parameters()).dtype).removeprefix("torch."))
               for model, name in models]
    task_names = []
    if tasks.strip().lower() != "none":
        # Read the tasks before the long perplexity pass, so a typo or a broken task file fails fast.
        directory = Path(bigbench_dir) if bigbench_dir else default_bigbench_dir()
        task_names = resolve_task_names(tasks, directory)
    loaded = [load_task(directory / f"{name}.json", limit=limit, seed=seed) for name in task_names]
    if num_blocks != 0:
        blocks = token_blocks(tokenizer, load_text(source, "validation"), seq_len, num_blocks, seed)
        for result in results:
            result.text_source, result.seq_len, result.num_blocks = source.describe(), seq_len, blocks.shape[0]
        _language_modeling([m for m, _ in models], results, reference_model, blocks, batch_size, progress)
    shared_s = time.perf_counter() - started
    for (model, _), result in zip(models, results):
        started = time.perf_counter()
        if reference_model is not None and model is not reference_model:
            result.reference_parameters = count_parameters(reference_model)
        for name, task in zip(task_names, loaded):
            result.tasks[name] = evaluate_task(model, tokenizer, task, progress=progress)
        result.wall_time_s = shared_s + time.perf_counter() - started
    return results


def _language_modeling(models: list, results: list[EvalResult], reference_model, blocks: torch.Tensor,
                       batch_size: int, progress: bool) -> None:
    compared = [(m, r) for m, r in zip(models, results) if reference_model is not None and m is not reference_model]
    if compared:
        comparisons = compare_all_to_reference([m for m, _ in compared], reference_model, blocks, progress=progress)
        for (_, result), comparison in zip(compared, comparisons):
            result.kl_to_reference, result.perplexity, result.reference_perplexity = comparison
        for model, result in zip(models, results):
            if model is reference_model:
                result.perplexity = comparisons[0].reference_perplexity
    for model, result in zip(models, results):
        if result.perplexity is None:
            result.perplexity = perplexity(model, blocks, batch_size=batch_size, progress=progress)
