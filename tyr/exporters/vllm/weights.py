"""Check a model folder's safetensors against its config before anything is built from it.

vLLM and transformers report a wrong folder late and obscurely (a shape assert deep in a weight loader, a silently
re-initialized tensor). Here the folder is compared with the architecture its config describes, built on the meta
device: every tensor present, none extra, every shape as the config says, every file complete.
"""

from __future__ import annotations

from pathlib import Path

from tyr.errors import TyrError
from tyr.models.facts import tensor_shapes

_SHOWN = 6  # how many offending tensors an error lists


def expected_shapes(config) -> dict[str, list[int]]:
    """Parameter name -> shape of the model ``config`` describes (built on the meta device: no memory)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    shapes = {name: list(p.shape) for name, p in model.state_dict().items()}
    if getattr(config, "tie_word_embeddings", False):
        shapes.pop("lm_head.weight", None)
    return shapes


def check_weights(folder: str | Path, config) -> None:
    """Raise TyrError naming the tensors that are missing, unexpected or of the wrong shape for ``config``."""
    folder = Path(folder)
    stored, expected = tensor_shapes(folder), expected_shapes(config)
    tied_head = "lm_head.weight" in stored and getattr(config, "tie_word_embeddings", False)
    missing = sorted(set(expected) - set(stored))
    unexpected = sorted(set(stored) - set(expected) - ({"lm_head.weight"} if tied_head else set()))
    wrong = [f"{name}: file {stored[name]}, config {expected[name]}" for name in sorted(set(stored) & set(expected))
             if stored[name] != expected[name]]
    problems = []
    if wrong:
        problems.append(f"{len(wrong)} tensors do not match the config's shapes: " + "; ".join(wrong[:_SHOWN]))
    if missing:
        problems.append(f"{len(missing)} tensors are missing: {missing[:_SHOWN]}")
    if unexpected:
        problems.append(f"{len(unexpected)} tensors are not in the architecture: {unexpected[:_SHOWN]}")
    if problems:
        raise TyrError(f"{folder}: the weights do not fit config.json: " + " | ".join(problems))
