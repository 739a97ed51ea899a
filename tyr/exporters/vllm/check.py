"""Export-time check: greedy tokens from vLLM (in a subprocess) must equal greedy tokens from transformers (fp32).

vLLM runs ``vllm_greedy.py`` in its own process, so the caller never holds vLLM engine state. Both sides get the
same prompt token ids and generate a fixed number of tokens (EOS ignored). A prompt agrees when the token lists are
equal. Where they part at a step where transformers scores vLLM's token within fp32 noise of its best token
(``TIE_TOLERANCE`` times the largest logit), two correct implementations may differ: the prompt counts as agreeing
up to that step and the divergence is reported as a near tie. Any other difference fails the check.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from pydantic import BaseModel, Field

from tyr.errors import TyrError
from tyr.exporters.vllm.vllm_greedy import GreedyRequest, GreedyResult

GREEDY_SCRIPT = Path(__file__).with_name("vllm_greedy.py")
TIE_TOLERANCE = 2e-4
DEFAULT_PROMPTS = [
    "The capital of France is",
    "Structured pruning removes attention heads and",
    "Once upon a time, in a small village by the sea,",
    "def fibonacci(n):",
    "The three primary colors are",
    "Water boils at a temperature of",
    "In 1969, the first humans to walk on the moon were",
    "A good way to learn a new language is",
]


class PromptCheck(BaseModel):
    prompt_ids: list[int]
    vllm_tokens: list[int]
    reference_tokens: list[int]
    agree: bool
    first_difference: int | None = Field(None, description="step where the two token lists part, if they do")
    near_tie: bool = Field(False, description="they part where transformers scores vLLM's token within tolerance "
                                             "of its best")


class CheckResult(BaseModel):
    passed: bool
    problems: list[str] = Field(description="why the check failed; empty when it passed")
    max_new_tokens: int
    prompts: list[PromptCheck]
    model_class: str = Field(description="the model class vLLM built")
    kv_cache_layers: dict[str, int] = Field(description="attention layer name -> KV heads of its cache in vLLM")
    vllm_version: str
    device: str
    engine_seconds: float


@torch.no_grad()
def reference_greedy(model, prompts: list[list[int]], max_new_tokens: int) -> tuple[list[list[int]], list[torch.Tensor]]:
    """Greedy tokens and per-step logits [steps, vocab] from a transformers model, decoding through its KV cache."""
    device = next(model.parameters()).device
    tokens, logits = [], []
    for ids in prompts:
        out = model(torch.tensor([ids], device=device), use_cache=True)
        step_logits, generated = [], []
        for _ in range(max_new_tokens):
            last = out.logits[0, -1].float()
            step_logits.append(last.cpu())
            generated.append(int(last.argmax()))
            out = model(torch.tensor([[generated[-1]]], device=device), past_key_values=out.past_key_values,
                        use_cache=True)
        tokens.append(generated)
        logits.append(torch.stack(step_logits))
    return tokens, logits


def compare(prompt_ids: list[int], vllm_tokens: list[int], reference: list[int], step_logits: torch.Tensor) -> PromptCheck:
    step = next((i for i, (a, b) in enumerate(zip(vllm_tokens, reference)) if a != b), None)
    if step is None and len(vllm_tokens) == len(reference):
        return PromptCheck(prompt_ids=prompt_ids, vllm_tokens=vllm_tokens, reference_tokens=reference, agree=True)
    near_tie = False
    if step is not None:
        logits = step_logits[step]
        gap = float(logits.max() - logits[vllm_tokens[step]])
        near_tie = gap <= TIE_TOLERANCE * float(logits.abs().max())
    else:
        step = min(len(vllm_tokens), len(reference))
    return PromptCheck(prompt_ids=prompt_ids, vllm_tokens=vllm_tokens, reference_tokens=reference, agree=near_tie,
                       first_difference=step, near_tie=near_tie)


def run_vllm_greedy(request: GreedyRequest, env: dict[str, str] | None = None, timeout: float = 1200,
                    python: str = sys.executable, wrapper: list[str] | None = None) -> GreedyResult:
    """Run vllm_greedy.py in a fresh interpreter; raise TyrError with the tail of its log if it fails."""
    with tempfile.TemporaryDirectory(prefix="tyr-vllm-check-") as tmp:
        request_path, result_path, log_path = (Path(tmp) / n for n in ("request.json", "result.json", "vllm.log"))
        request_path.write_text(request.model_dump_json())
        full_env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
                    **(env or {})}
        command = [python, *(wrapper or []), str(GREEDY_SCRIPT), str(request_path), str(result_path)]
        with log_path.open("w") as log:
            try:
                code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=full_env,
                                      timeout=timeout).returncode
            except subprocess.TimeoutExpired:
                code = None
        if code != 0 or not result_path.is_file():
            why = f"timed out after {timeout:.0f} s" if code is None else f"exited with {code}"
            raise TyrError(f"vLLM could not run {request.model} ({why}). {summarize_log(log_path.read_text(errors='replace'))}")
        return GreedyResult.model_validate_json(result_path.read_text())


def summarize_log(text: str, tail: int = 12) -> str:
    """The errors a vLLM log names (its root cause is often far above the last line) and its last lines."""
    lines = text.splitlines()
    errors = dict.fromkeys(line.split("] ", 1)[-1].strip() for line in lines
                           if re.search(r"\b[A-Z]\w*(Error|Exception): ", line))
    shown = "\n".join(list(errors)[:5]) or "(no error line)"
    return f"Errors in its log:\n{shown}\nLast lines:\n" + "\n".join(lines[-tail:])


def check_folder(folder: Path, reference_model, prompts: list[list[int]], max_new_tokens: int,
                 expected_class: str, expected_kv_heads: dict[int, int], trust_remote_code: bool = False,
                 timeout: float = 1200) -> CheckResult:
    """Serve ``folder`` in vLLM and compare with ``reference_model``; ``expected_kv_heads``: layer -> KV heads."""
    max_model_len = max(len(p) for p in prompts) + max_new_tokens
    max_model_len = min(-(-max_model_len // 64) * 64, reference_model.config.max_position_embeddings)
    request = GreedyRequest(model=str(folder), prompts=prompts, max_tokens=max_new_tokens, dtype="float32",
                            max_model_len=max_model_len, enforce_eager=True, trust_remote_code=trust_remote_code)
    result = run_vllm_greedy(request, timeout=timeout)
    reference, logits = reference_greedy(reference_model, prompts, max_new_tokens)
    checks = [compare(p, v, r, l) for p, v, r, l in zip(prompts, result.tokens, reference, logits)]
    kv_layers = {name: cache.num_kv_heads for name, cache in result.kv_cache.items()}
    problems = explain_failure(result.model_class, kv_layers, checks, expected_class, expected_kv_heads)
    return CheckResult(passed=not problems, problems=problems, max_new_tokens=max_new_tokens, prompts=checks,
                       model_class=result.model_class, kv_cache_layers=kv_layers, vllm_version=result.vllm_version,
                       device=result.device, engine_seconds=result.engine_seconds)


def layer_of(attention_layer_name: str) -> int:
    """'model.layers.7.self_attn.attn' -> 7."""
    parts = attention_layer_name.split(".")
    return int(parts[parts.index("layers") + 1])


def explain_failure(model_class: str, kv_cache_layers: dict[str, int], prompts: list[PromptCheck],
                    expected_class: str, expected_kv_heads: dict[int, int]) -> list[str]:
    """What is wrong, as sentences; empty when vLLM built the expected model, cache and tokens."""
    problems = []
    if model_class != expected_class:
        problems.append(f"vLLM built {model_class}, expected {expected_class}")
    cached = {layer_of(name): heads for name, heads in kv_cache_layers.items()}
    if cached != expected_kv_heads:
        problems.append(f"vLLM's KV cache per layer (layer: KV heads) is {dict(sorted(cached.items()))}, "
                        f"the model has attention in {dict(sorted(expected_kv_heads.items()))}")
    for i, p in enumerate(prompts):
        if not p.agree:
            problems.append(f"prompt {i}: vLLM and transformers part at generated token {p.first_difference} "
                            f"(vLLM {p.vllm_tokens[:p.first_difference + 1]}, "
                            f"transformers {p.reference_tokens[:p.first_difference + 1]})")
    return problems


def format_table(check: CheckResult) -> str:
    rows = [f"{'prompt':>6}  {'tokens':>6}  {'agree':>5}  note"]
    for i, p in enumerate(check.prompts):
        note = "" if p.first_difference is None else f"parts at {p.first_difference}" + (" (near tie)" if p.near_tie else "")
        rows.append(f"{i:>6}  {len(p.vllm_tokens):>6}  {str(p.agree):>5}  {note}")
    return "\n".join(rows)

