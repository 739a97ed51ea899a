"""One evaluation pass: perplexity and KL on held-out text, then BIG-bench multiple choice."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from tyr.data import TextSource, load_text, token_blocks
from tyr.evaluation.bigbench import default_bigbench_dir, load_task, resolve_task_names
from tyr.evaluation.language_modeling import compare_to_reference, model_device, perplexity
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
    started = time.perf_counter()
    source = text if isinstance(text, TextSource) else TextSource.parse(text)
    result = EvalResult(model=model_name, reference=reference_name, parameters=count_parameters(model),
                        limit=limit, seed=seed, device=str(model_device(model)),
                        dtype=str(next(model.parameters()).dtype).removeprefix("torch."))
    task_names = []
    if tasks.strip().lower() != "none":
        # Read the tasks before the long perplexity pass, so a typo or a broken task file fails fast.
        directory = Path(bigbench_dir) if bigbench_dir else default_bigbench_dir()
        task_names = resolve_task_names(tasks, directory)
    loaded = [load_task(directory / f"{name}.json", limit=limit, seed=seed) for name in task_names]
    if reference_model is not None:
        result.reference_parameters = count_parameters(reference_model)
    if num_blocks != 0:
        blocks = token_blocks(tokenizer, load_text(source, "validation"), seq_len, num_blocks, seed)
        result.text_source, result.seq_len, result.num_blocks = source.describe(), seq_len, blocks.shape[0]
        if reference_model is None:
            result.perplexity = perplexity(model, blocks, batch_size=batch_size, progress=progress)
        else:
            result.kl_to_reference, result.perplexity, result.reference_perplexity = compare_to_reference(
                model, reference_model, blocks, progress=progress)
    for name, task in zip(task_names, loaded):
        result.tasks[name] = evaluate_task(model, tokenizer, task, progress=progress)
    result.wall_time_s = time.perf_counter() - started
    return result
