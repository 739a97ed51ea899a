"""Benchmark prompts as token ids: exact lengths, distinct, reproducible.

Random ids drawn from the tokenizer's ordinary vocabulary (special tokens excluded), like vLLM's own "random"
benchmark dataset. A dense transformer's cost does not depend on which tokens it reads, and distinct random
prompts keep vLLM's prefix cache from turning the benchmark into a cache benchmark. Outputs run to a fixed length
because every request sets ignore_eos.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from tyr.errors import TyrError


def usable_token_ids(model_dir: str | Path) -> np.ndarray:
    """Ids the model and its tokenizer both know, minus special tokens."""
    from transformers import AutoTokenizer

    model_dir = Path(model_dir)
    try:
        config = json.loads((model_dir / "config.json").read_text())
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError) as err:
        raise TyrError(f"cannot read the config and tokenizer of {model_dir}: {err}") from err
    vocab = min(len(tokenizer), int(config.get("vocab_size") or len(tokenizer)))
    ids = np.setdiff1d(np.arange(vocab), np.asarray(tokenizer.all_special_ids, dtype=np.int64))
    if ids.size == 0:
        raise TyrError(f"{model_dir}: the tokenizer has no ordinary tokens to build prompts from")
    return ids


def random_prompts(model_dir: str | Path, num_prompts: int, prompt_tokens: int, seed: int = 0) -> list[list[int]]:
    ids = usable_token_ids(model_dir)
    rng = np.random.default_rng(seed)
    return rng.choice(ids, size=(num_prompts, prompt_tokens)).tolist()
